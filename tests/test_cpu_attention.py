"""Training attention on CPU (cancerllm/cpu_attention.py, csrc/score_matmul.cpp, csrc/attention_softmax.cpp): one
document's output and its three gradients against the float64 reference on fresh random inputs, at odd lengths, head
counts and widths, with and without a sliding window and at both thread counts; torch's flash forward's output and
log-sum-exp in our row order, and the gradients our backward takes from them; the score matmul alone; the fused bf16
backward pass against the score matmul and softmax backward it fuses; packed batches through kernels.attention;
documents too long for the score buffer taken by the reference's SDPA."""
import pytest
import torch

from cancerllm import cpu_attention, gemv, kernels
from cancerllm.kernels import reference
from cancerllm.kernels.testing import assert_close, poisoned_allocations, threads_set

pytestmark = pytest.mark.skipif(not cpu_attention.usable(torch.zeros(1, 2), 1),
                                reason="cancerllm._C built without the attention kernels")
DTYPES = [torch.float32, torch.bfloat16]
# (L, Hq, Hkv, D, window): a few tokens, grouped and plain heads, head widths off the vector width, a window shorter
# than the document, rows past one 256-value chunk, one 8-row tile and the threads' work threshold.
SHAPES = [(5, 2, 1, 8, None), (6, 4, 4, 6, None), (37, 4, 2, 16, None), (37, 4, 2, 16, 5), (50, 9, 3, 64, None),
          (300, 6, 2, 24, 100), (129, 3, 1, 130, 64)]


def leaves(shape, dtype):
    return torch.randn(shape).to(dtype).requires_grad_()


def float64_grads(q, k, v, grad, window, cu_seqlens=None):
    """The reference attention in float64 on [B, T, H, D] inputs: output and the gradients of q, k, v."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = reference.attention(q64, k64, v64, window=window, cu_seqlens=cu_seqlens)
    out.backward(grad.double())
    return out, q64.grad, k64.grad, v64.grad


def amx_or_not(amx: bool):
    """The score matmul's AMX tiles (where this CPU and Linux allow them) or its AVX512-BF16 ones."""
    usable = cpu_attention.native("score_matmul") is not None and cpu_attention.native("score_matmul").has_amx()
    return pytest.param(amx, id="amx" if amx else "avx512", marks=pytest.mark.skipif(amx and not usable,
                                                                                    reason="no AMX here"))


@pytest.mark.skipif(not gemv.fast_kernel(), reason="this CPU lacks AVX512-BF16: bf16 scores go through torch")
@pytest.mark.parametrize("amx", [amx_or_not(True), amx_or_not(False)])
@pytest.mark.parametrize("threads", [1, 2])
# K of 2, 6 and 130 leave AMX's 32-wide slices of K a remainder; M past one and two 16-row blocks, N past 32.
@pytest.mark.parametrize("shape", [(1, 1, 1, 2, 0), (3, 20, 9, 6, 0), (2, 45, 15, 64, 3), (1, 33, 33, 130, 1),
                                   (2, 70, 70, 96, 1)])
def test_score_matmul_is_fp32_exact_where_the_softmax_reads(shape, threads, amx):
    heads, M, N, K, group = shape
    a, b = torch.randn(heads, M, K).bfloat16(), torch.randn(heads, N, K).bfloat16()
    out = torch.full((heads, M, N), float("nan"))
    cpu_attention.native("score_matmul").score_matmul(a.data_ptr(), b.data_ptr(), out.data_ptr(), heads, M, N, K,
                                                      group, threads, allow_amx=amx)
    ref = a.double() @ b.double().transpose(1, 2)
    visible = torch.ones(M, N, dtype=torch.bool)
    if group:
        visible = torch.arange(N)[None, :] <= torch.arange(M)[:, None] // group
    torch.testing.assert_close(out[:, visible].double(), ref[:, visible], rtol=1e-6, atol=1e-5)


@pytest.mark.skipif(not gemv.fast_kernel(), reason="this CPU lacks AVX512-BF16: bf16 scores go through torch")
@pytest.mark.parametrize("amx", [amx_or_not(True), amx_or_not(False)])
@pytest.mark.parametrize("threads", [1, 2])
# (L, G, Hkv, D, window): one position, odd lengths past one and two row blocks, K with and without a remainder of 32.
@pytest.mark.parametrize("shape", [(1, 1, 1, 2, 0), (7, 3, 2, 6, 0), (37, 2, 3, 64, 0), (37, 2, 3, 64, 5),
                                   (70, 1, 1, 130, 0), (130, 3, 2, 32, 40)])
def test_fused_backward_pass_gives_the_bits_of_its_three_kernels(shape, threads, amx):
    """attention_backward_scores against score_matmul twice and attention_softmax_backward on the same inputs:
    the same tiles and the same row function, so the same bits of P and dS, zeros where a key is not visible."""
    L, G, heads, D, window = shape
    q, grad_out = torch.randn(heads, L * G, D).bfloat16(), torch.randn(heads, L * G, D).bfloat16()
    k, v = torch.randn(heads, L, D).bfloat16(), torch.randn(heads, L, D).bfloat16()
    lse, delta = torch.randn(heads, L * G) + 3, torch.randn(heads, L * G)
    ext = cpu_attention.native("attention_backward_scores")
    expected = []
    for a, b in ((q, k), (grad_out, v)):
        out = torch.empty(heads, L * G, L)
        ext.score_matmul(a.data_ptr(), b.data_ptr(), out.data_ptr(), heads, L * G, L, D, G, threads, allow_amx=amx)
        expected.append(out)
    probs, grad_scores = (torch.full((heads, L * G, L), float("nan")).bfloat16() for _ in range(2))
    ext.attention_softmax_backward(expected[0].data_ptr(), lse.data_ptr(), expected[1].data_ptr(), delta.data_ptr(),
                                   probs.data_ptr(), grad_scores.data_ptr(), 1, heads * L * G, L, G, window,
                                   D ** -0.5, threads)
    fused = [torch.full((heads, L * G, L), float("nan")).bfloat16() for _ in range(2)]
    ext.attention_backward_scores(q.data_ptr(), k.data_ptr(), grad_out.data_ptr(), v.data_ptr(), lse.data_ptr(),
                                  delta.data_ptr(), fused[0].data_ptr(), fused[1].data_ptr(), heads, L * G, L, D, G,
                                  window, D ** -0.5, threads, allow_amx=amx)
    assert torch.equal(fused[0], probs) and torch.equal(fused[1], grad_scores)
    assert fused[0].abs().sum() > 0 and fused[1].abs().sum() > 0


@pytest.mark.parametrize("shape", [(37, 4, 2, 16, None), (130, 9, 3, 64, 50)],
                         ids=lambda s: "L{}-Hq{}-Hkv{}-D{}-w{}".format(*s))
def test_bf16_backward_fused_or_not_gives_the_same_gradients(shape):
    """The whole backward through the fused pass or the three kernels: the same bits (on a CPU without AVX512-BF16
    both are the unfused path)."""
    L, Hq, Hkv, D, window = shape
    q, k, v = (torch.randn(L, h, D).bfloat16() for h in (Hq, Hkv, Hkv))
    grad = torch.randn(L, Hq, D).bfloat16()
    grads = []
    for fused in (True, False):
        leaves_ = [t.clone().requires_grad_() for t in (q, k, v)]
        cpu_attention.attention(*leaves_, window, fused_backward=fused).backward(grad)
        grads.append([t.grad for t in leaves_])
    for name, a, b in zip("qkv", *grads):
        assert torch.equal(a, b), name


def test_fused_backward_pass_rejects_bad_sizes():
    ext = cpu_attention.native("attention_backward_scores")
    with pytest.raises(ValueError, match="M = N \\* group"):
        ext.attention_backward_scores(0, 0, 0, 0, 0, 0, 0, 0, 1, 5, 2, 8, 2, 0, 1.0, 1)
    with pytest.raises(ValueError, match="K even"):
        ext.attention_backward_scores(0, 0, 0, 0, 0, 0, 0, 0, 1, 4, 2, 7, 2, 0, 1.0, 1)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "L{}-Hq{}-Hkv{}-D{}-w{}".format(*s))
def test_one_document_matches_float64(shape, dtype, threads):
    L, Hq, Hkv, D, window = shape
    q, k, v = leaves((L, Hq, D), dtype), leaves((L, Hkv, D), dtype), leaves((L, Hkv, D), dtype)
    grad = torch.randn(L, Hq, D).to(dtype)
    with threads_set(threads), poisoned_allocations():
        out = cpu_attention.attention(q, k, v, window)
        out.backward(grad)
    ref = float64_grads(q[None], k[None], v[None], grad[None], window)
    for name, actual, expected in zip(("out", "grad q", "grad k", "grad v"), (out, q.grad, k.grad, v.grad), ref):
        assert actual.dtype == dtype
        assert_close(name, actual, expected[0], dtype)


def in_our_row_order(t: torch.Tensor, n_kv: int) -> torch.Tensor:
    """[Hq, L, ...] -> [Hkv, L * G, ...]: row r of key/value head h is position r // G, query head h * G + r % G."""
    Hq, L, rest = t.shape[0], t.shape[1], t.shape[2:]
    return t.reshape(n_kv, Hq // n_kv, L, *rest).transpose(1, 2).reshape(n_kv, L * (Hq // n_kv), *rest)


# Max-abs error of torch's log-sum-exp (|lse| < 10 here), ~3x the worst of 450 random draws of these shapes: fp32
# 9.5e-7, a few units in its last place; bf16 7.2e-5 from float64 on the same bf16 inputs (a coarser exp there).
LSE_MAX_ABS = {torch.float32: 4e-6, torch.bfloat16: 2e-4}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37, 6, 2, 16), (130, 9, 3, 64), (37, 4, 4, 8)],
                         ids=lambda s: "L{}-Hq{}-Hkv{}-D{}".format(*s))
def test_torch_flash_forward_gives_what_our_backward_reads(shape, dtype, monkeypatch):
    """The flash forward's out and lse, in our row order, against float64; then the gradients our backward takes
    from them (the flash path forced in every dtype)."""
    L, Hq, Hkv, D = shape
    q, k, v = leaves((L, Hq, D), dtype), leaves((L, Hkv, D), dtype), leaves((L, Hkv, D), dtype)
    grad = torch.randn(L, Hq, D).to(dtype)
    ref_out, ref_lse = reference.attention(*(t.detach()[None].double() for t in (q, k, v)), lse=True)
    with torch.no_grad():
        out, lse = cpu_attention.flash_forward(q, k, v)
    assert_close("out", out, in_our_row_order(ref_out[0].transpose(0, 1), Hkv), dtype)
    assert lse.dtype == torch.float32 and lse.shape == (Hkv, L * Hq // Hkv)
    lse_error = (lse.double() - in_our_row_order(ref_lse[0].double(), Hkv)).abs().max().item()
    assert lse_error <= LSE_MAX_ABS[dtype], f"lse: max-abs error {lse_error:.3g} ({dtype})"

    calls, real = [], cpu_attention.flash_forward
    monkeypatch.setattr(cpu_attention, "flash_applies", lambda *a: True)
    monkeypatch.setattr(cpu_attention, "flash_forward", lambda *a: calls.append(1) or real(*a))
    with poisoned_allocations():
        out = cpu_attention.attention(q, k, v)
        out.backward(grad)
    assert calls == [1]
    ref = float64_grads(q[None], k[None], v[None], grad[None], None)
    for name, actual, expected in zip(("out", "grad q", "grad k", "grad v"), (out, q.grad, k.grad, v.grad), ref):
        assert_close(name, actual, expected[0], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [None, 6])
def test_packed_batches_take_this_path_through_kernels_attention(dtype, window, monkeypatch):
    B, T, Hq, Hkv, D = 2, 24, 6, 3, 16
    q, k, v = leaves((B, T, Hq, D), dtype), leaves((B, T, Hkv, D), dtype), leaves((B, T, Hkv, D), dtype)
    cu_seqlens = torch.tensor([0, 5, 17, 24, 31, 48], dtype=torch.int32)
    grad = torch.randn(B, T, Hq, D).to(dtype)
    lengths, real = [], cpu_attention.attention
    monkeypatch.setattr(cpu_attention, "attention", lambda *a: lengths.append(a[0].shape[0]) or real(*a))
    monkeypatch.setattr(cpu_attention, "faster_path", lambda *a: "ours")
    out = kernels.attention(q, k, v, window=window, cu_seqlens=cu_seqlens)
    assert lengths == [5, 12, 7, 7, 17]                 # every document, cut at the row end
    out.backward(grad)
    ref = float64_grads(q, k, v, grad, window, cu_seqlens)
    for name, actual, expected in zip(("out", "grad q", "grad k", "grad v"), (out, q.grad, k.grad, v.grad), ref):
        assert_close(name, actual, expected, dtype)


def test_a_document_too_long_for_the_score_buffer_goes_to_sdpa(monkeypatch):
    B, T, Hq, Hkv, D = 1, 40, 4, 2, 8
    q, k, v = (leaves((B, T, H, D), torch.float32) for H in (Hq, Hkv, Hkv))
    cu_seqlens = torch.tensor([0, 8, 40], dtype=torch.int32)
    monkeypatch.setattr(cpu_attention, "MAX_SCORE_BYTES", Hq * 10 * 10 * 4)   # the 8-token document fits, not 32
    lengths, real = [], cpu_attention.attention
    monkeypatch.setattr(cpu_attention, "attention", lambda *a: lengths.append(a[0].shape[0]) or real(*a))
    monkeypatch.setattr(cpu_attention, "faster_path", lambda *a: "ours")
    out = cpu_attention.by_document(q, k, v, cu_seqlens=cu_seqlens)
    assert lengths == [8]
    assert_close("out", out, float64_grads(q, k, v, torch.zeros_like(out), None, cu_seqlens)[0], torch.float32)


def test_other_dtypes_odd_widths_and_lse_take_the_reference():
    assert not cpu_attention.usable(torch.zeros(5, 2, 4, dtype=torch.float64), 5)
    assert not cpu_attention.usable(torch.zeros(5, 2, 5), 5)
    q = torch.randn(1, 5, 2, 4)
    out, lse = kernels.attention(q, q[:, :, :1], q[:, :, :1], lse=True)
    assert lse.shape == (1, 2, 5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_each_document_takes_the_path_this_machine_measured_faster(dtype, monkeypatch, tmp_path):
    """faster_path: measured once per shape and length bucket (here: SDPA faster at 64 tokens, ours at 128), kept in
    the process and in the cache file; either path's output and gradients match the float64 reference."""
    monkeypatch.setenv("CANCERLLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_attention, "_chosen", {})
    measured = []
    monkeypatch.setattr(cpu_attention, "time_paths",
                        lambda L, *shape: measured.append(L) or ("sdpa" if L == 64 else "ours"))
    lengths, real = [], cpu_attention.attention
    monkeypatch.setattr(cpu_attention, "attention", lambda *a: lengths.append(a[0].shape[0]) or real(*a))
    B, T, Hq, Hkv, D = 1, 115, 4, 2, 16
    q, k, v = leaves((B, T, Hq, D), dtype), leaves((B, T, Hkv, D), dtype), leaves((B, T, Hkv, D), dtype)
    cu_seqlens = torch.tensor([0, 5, 75, 115], dtype=torch.int32)
    grad = torch.randn(B, T, Hq, D).to(dtype)
    out = cpu_attention.by_document(q, k, v, cu_seqlens=cu_seqlens)
    assert sorted(measured) == [64, 128] and lengths == [70]    # 5 and 40 tokens: the 64 bucket, SDPA
    out.backward(grad)
    ref = float64_grads(q, k, v, grad, None, cu_seqlens)
    for name, actual, expected in zip(("out", "grad q", "grad k", "grad v"), (out, q.grad, k.grad, v.grad), ref):
        assert_close(name, actual, expected, dtype)
    cpu_attention.by_document(q, k, v, cu_seqlens=cu_seqlens)
    monkeypatch.setattr(cpu_attention, "_chosen", {})          # a new process: read from the file, not measured
    cpu_attention.by_document(q, k, v, cu_seqlens=cu_seqlens)
    assert sorted(measured) == [64, 128] and lengths == [70] * 3


def test_the_measurement_runs_both_paths_and_leaves_the_random_stream_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    with torch.inference_mode():   # as in an evaluation's forward: the measurement still takes gradients
        choices = {cpu_attention.time_paths(37, 4, 2, 16, dtype, window) for dtype in DTYPES for window in (None, 5)}
    assert torch.equal(torch.rand(3), expected) and choices <= {"ours", "sdpa"}

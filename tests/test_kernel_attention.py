"""Flash attention (Triton, under the interpreter) against the float64 reference: output, log-sum-exp and dQ/dK/dV
on fresh random inputs; dispatch; the model with the Triton path forced; bad input. Tolerances: kernels.testing."""
import os
import subprocess
import sys

import pytest
import torch

from cancerllm import ModelArgs, Transformer, kernels
from cancerllm.kernels import reference
from cancerllm.kernels.attention import attention as triton_attention
from cancerllm.kernels.testing import assert_close, poisoned_allocations


def random_qkv(B, T, Hq, Hkv, D, dtype):
    return [torch.randn(B, T, H, D, dtype=dtype).requires_grad_() for H in (Hq, Hkv, Hkv)]


def check_against_reference(B, T, Hq, Hkv, D, dtype=torch.float32, window=None, offsets=None):
    cu_seqlens = None if offsets is None else torch.tensor(offsets, dtype=torch.int32)
    q, k, v = random_qkv(B, T, Hq, Hkv, D, dtype)
    with poisoned_allocations():
        out, lse = triton_attention(q, k, v, window=window, cu_seqlens=cu_seqlens, lse=True)
        grad_out = torch.randn_like(out)
        out.backward(grad_out)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out64, lse64 = reference.attention(q64, k64, v64, window=window, cu_seqlens=cu_seqlens, lse=True)
    out64.backward(grad_out.double())
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close("out", out, out64, dtype)
    assert_close("lse", lse, lse64, torch.float32)
    assert_close("dq", q.grad, q64.grad, dtype)
    assert_close("dk", k.grad, k64.grad, dtype)
    assert_close("dv", v.grad, v64.grad, dtype)


# Under the interpreter the tiles are 16 query rows (16 // G tokens) by 16 keys, so these lengths are odd and
# cross several blocks. (B, T, Hq, Hkv, D, window)
SHAPES = [
    pytest.param(1, 37, 4, 4, 16, None, id="causal-G1-odd-T"),
    pytest.param(2, 29, 4, 2, 32, 5, id="window-below-block-G2"),
    pytest.param(1, 45, 8, 2, 24, 100, id="window-above-T-G4-D24"),
    pytest.param(1, 40, 4, 1, 16, 16, id="window-one-block-G4"),
    pytest.param(1, 21, 6, 2, 16, 7, id="G3-not-power-of-two"),
    pytest.param(1, 19, 2, 1, 128, 11, id="D128"),
]


@pytest.mark.parametrize("B, T, Hq, Hkv, D, window", SHAPES)
def test_matches_reference(B, T, Hq, Hkv, D, window):
    check_against_reference(B, T, Hq, Hkv, D, window=window)


# Several documents of unequal lengths per row, documents of length 1, an empty one (repeated offset).
PACKED = [
    pytest.param(2, 24, 4, 1, 16, 4, [0, 1, 7, 24, 30, 31, 48], id="docs-window4-G4"),
    pytest.param(1, 40, 4, 2, 64, None, [0, 17, 17, 18, 40], id="docs-causal-empty-doc-G2"),
    pytest.param(2, 20, 2, 2, 16, 30, [0, 20, 23, 39, 40], id="docs-G1-doc-of-1-at-end"),
]


# Long enough for the split key loops: with window 50 and a document from 10, the query block at 64 has masked low
# tiles (keys 0-31), an unmasked middle (32-63) and a masked diagonal; the dK/dV loop has its own unmasked middle.
# Many documents (the binary search takes 5 steps), empty ones at a row's start, inside and at the very end,
# documents ending exactly at row ends.
MANY_DOCS = [0, 0, 1, 4, 9, 9, 16, 17, 33, 33, 40, 41, 50, 66, 67, 70, 72, 80, 81, 98, 99, 99]
PACKED += [
    pytest.param(2, 80, 2, 1, 16, 50, [0, 10, 80, 110, 160], id="split-loops-masked-low-middle-diagonal"),
    pytest.param(1, 70, 2, 2, 16, None, [0, 3, 70], id="split-loops-causal-long-document"),
    pytest.param(3, 33, 3, 1, 16, 12, MANY_DOCS, id="binary-search-many-docs-G3"),
]


@pytest.mark.parametrize("B, T, Hq, Hkv, D, window, offsets", PACKED)
def test_packed_documents_match_reference(B, T, Hq, Hkv, D, window, offsets):
    check_against_reference(B, T, Hq, Hkv, D, window=window, offsets=offsets)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_storage(dtype):
    check_against_reference(2, 26, 4, 2, 32, dtype=dtype, window=9, offsets=[0, 3, 26, 27, 52])


def test_non_contiguous_inputs_are_copied():
    """q, k, v transposed views ([B, H, T, D] storage): the kernel copies them and gives the same result."""
    q, k, v = (torch.randn(1, H, 23, 16).transpose(1, 2) for H in (4, 2, 2))
    assert not q.is_contiguous()
    expected = reference.attention(q.double(), k.double(), v.double(), window=6)
    assert_close("out", triton_attention(q, k, v, window=6), expected, torch.float32)


def test_poisoning_is_active():
    with poisoned_allocations():
        assert torch.empty(3).isnan().all() and torch.empty_like(torch.ones(2)).isnan().all()


# ---------------------------------------------------------------------------------------------- dispatch, model

def test_dispatch(kernel_backend):
    """By default CPU tensors take the reference and CUDA ones the kernels (the GPU run makes CUDA the default
    device, so a probe on it is added there); set_backend overrides both, and rejects an unknown path."""
    probes = [torch.ones(1, device="cpu")]
    if torch.get_default_device().type == "cuda":
        probes.append(torch.ones(1))
    for x in probes:
        kernel_backend("auto")
        assert kernels.use_triton(x) == x.is_cuda
        kernel_backend("triton")
        assert kernels.use_triton(x)
        with kernels.using_backend(" Torch "):
            assert kernels.get_backend() == "torch" and not kernels.use_triton(x)
        assert kernels.get_backend() == "triton"
        with pytest.raises(ValueError, match="set_backend must be 'triton', 'torch', 'auto'"):
            kernel_backend("cuda")
        assert kernels.use_triton(x)


def test_dispatch_env_var_read_once_at_import():
    """CANCERLLM_KERNELS sets the starting backend when cancerllm.kernels is imported (setting it afterwards
    changes nothing: set_backend does); an unknown value fails the import, naming the variable."""
    code = ("import os; from cancerllm import kernels; os.environ['CANCERLLM_KERNELS'] = 'torch'; "
            "print(kernels.get_backend())")
    for value, expected in (("TRITON", "triton"), ("cuda", None)):
        proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "CANCERLLM_KERNELS": value},
                              capture_output=True, text=True, timeout=120)
        if expected:
            assert proc.returncode == 0 and proc.stdout.split() == [expected], proc.stderr[-2000:]
        else:
            assert proc.returncode != 0 and "CANCERLLM_KERNELS must be 'triton', 'torch', 'auto'" in proc.stderr


def model_loss_and_grads(model, tokens, targets, cu_seqlens):
    model.zero_grad()
    loss = model(tokens, cu_seqlens=cu_seqlens, targets=targets)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_model_triton_path_equals_reference_path(monkeypatch, kernel_backend):
    """A tiny Mistral (sliding window shorter than the sequence, GQA, packed documents, ignored targets):
    loss and every parameter gradient agree between the "triton" and "torch" backends."""
    args = ModelArgs.preset("tiny", vocab_size=256, max_seq_len=64, sliding_window=5)
    model = Transformer(args)
    tokens = torch.randint(0, args.vocab_size, (2, 12))
    targets = torch.randint(0, args.vocab_size, (2, 12))
    targets[0, :3] = -100
    cu_seqlens = torch.tensor([0, 7, 12, 13, 24], dtype=torch.int32)

    calls = []
    for name in ("triton_attention", "triton_rms_norm", "triton_linear_cross_entropy"):
        real = getattr(kernels, name)
        spy = lambda *a, _real=real, _name=name, **kw: calls.append(_name) or _real(*a, **kw)  # noqa: E731
        monkeypatch.setattr(kernels, name, spy)

    kernel_backend("torch")
    ref_loss, ref_grads = model_loss_and_grads(model, tokens, targets, cu_seqlens)
    assert not calls
    kernel_backend("triton")
    loss, grads = model_loss_and_grads(model, tokens, targets, cu_seqlens)
    assert set(calls) == {"triton_attention", "triton_rms_norm", "triton_linear_cross_entropy"}

    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------- bad input

def test_rejects_mismatched_shapes_dtypes_devices():
    q, k, v = (torch.randn(1, 8, H, 16) for H in (4, 2, 2))
    with pytest.raises(ValueError, match="k and v must have one shape"):
        kernels.attention(q, k, v[:, :, :1])
    with pytest.raises(ValueError, match=r"k and v must be \[B, T, Hkv, D\]"):
        kernels.attention(q, k[:, :7], v[:, :7])
    with pytest.raises(ValueError, match="multiple of k/v's 3 heads"):
        kernels.attention(q, torch.randn(1, 8, 3, 16), torch.randn(1, 8, 3, 16))
    with pytest.raises(ValueError, match="q must be 4-D"):
        kernels.attention(q[0], k, v)
    with pytest.raises(ValueError, match="must share one dtype"):
        kernels.attention(q, k.half(), v)
    with pytest.raises(ValueError, match="must share one device"):
        kernels.attention(q, k.to("meta"), v)
    with pytest.raises(TypeError, match="q must have dtype"):
        kernels.attention(q.long(), k.long(), v.long())


def test_triton_path_limits():
    with pytest.raises(ValueError, match="head dim must be in 16..128"):
        triton_attention(*(torch.randn(1, 4, 2, 8) for _ in range(3)))
    with pytest.raises(TypeError, match="float64"):
        triton_attention(*(torch.randn(1, 4, 2, 16, dtype=torch.float64) for _ in range(3)))


@pytest.mark.parametrize("window, message", [(0, "window must be positive"), (-3, "window must be positive"),
                                             (2.5, "window must be a positive int"), (True, "positive int")])
def test_rejects_bad_window(window, message):
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises((ValueError, TypeError), match=message):
        kernels.attention(q, q, q, window=window)


@pytest.mark.parametrize("offsets, message", [
    ([1, 8, 16], "from 0 to B\\*T=16"),
    ([0, 8, 15], "from 0 to B\\*T=16"),
    ([0, 8, 5, 8, 16], "non-decreasing"),
    ([0, 5, 16], "every multiple of T=8"),
    ([16], "from 0 to B\\*T=16"),
])
def test_rejects_cu_seqlens_that_do_not_cover_the_sequence(offsets, message):
    q = torch.randn(2, 8, 2, 16)
    with pytest.raises(ValueError, match=message):
        kernels.attention(q, q, q, cu_seqlens=torch.tensor(offsets, dtype=torch.int32))


def test_rejects_cu_seqlens_of_wrong_type_or_device():
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(TypeError, match="cu_seqlens must have dtype"):
        kernels.attention(q, q, q, cu_seqlens=torch.tensor([0.0, 8.0]))
    with pytest.raises(ValueError, match="cu_seqlens must be 1-D"):
        kernels.attention(q, q, q, cu_seqlens=torch.tensor([[0, 8]], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens is on meta"):
        kernels.attention(q, q, q, cu_seqlens=torch.tensor([0, 8], dtype=torch.int32, device="meta"))


def test_cu_seqlens_rechecked_after_in_place_change():
    q = torch.randn(1, 8, 2, 16)
    cu_seqlens = torch.tensor([0, 3, 8], dtype=torch.int32)
    kernels.attention(q, q, q, cu_seqlens=cu_seqlens)
    cu_seqlens[1] = 9
    with pytest.raises(ValueError, match="non-decreasing"):
        kernels.attention(q, q, q, cu_seqlens=cu_seqlens)


def test_rejects_unknown_backend():
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(ValueError, match="backend must be 'auto' or 'xformers'"):
        kernels.attention(q, q, q, backend="flash")


# ---------------------------------------------------------------------------------------------- GPU compilation

COMPILE_FOR_H100 = r'''
import collections, importlib, os, re, subprocess, tempfile, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

FP32_POINTERS = {"LSE", "DELTA", "RSTD", "DW_PARTIAL", "LOSS", "W"}
INT_POINTERS = {"CU_SEQLENS": "*i32", "TARGETS": "*i64", "N_VALID": "*i64"}
FLOATS = {"qk_scale", "sm_scale", "eps", "z_loss"}
UPPER_CASE_SCALARS = {"T", "N", "M", "WINDOW", "N_DOCS", "SEARCH_STEPS"}
CUOBJDUMP = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")

def signature(module, fn, constexprs):
    # Pointers are the upper-case arguments of our kernels (but sizes); scalars are i32 but the named floats.
    def kind(name):
        if name in constexprs: return "constexpr"
        scalar = name in UPPER_CASE_SCALARS or (module == "cross_entropy" and name == "V")
        if name.isupper() and not scalar:
            return INT_POINTERS.get(name, "*fp32" if name in FP32_POINTERS else "*bf16")
        return "fp32" if name in FLOATS else "i32"
    return {name: kind(name) for name in fn.arg_names}

def compile_for_sm90(module, name, constexprs, num_warps, num_stages):
    fn = getattr(mod[module], name)
    src = ASTSource(fn=fn, signature=signature(module, fn, constexprs),
                    constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    assert compiled.metadata.shared <= 227 * 1024, (name, compiled.metadata.shared)
    return compiled

def stack_bytes(compiled):
    # ptxas spills registers to the stack frame: a frame of 0 bytes means no spill (cuobjdump reads the cubin's
    # resource usage; compiled.n_spills needs a GPU driver to load the binary).
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    return int(re.search(r"STACK:(\d+)", usage).group(1))

def expected_wgmma(kernel, rows, keys, d, warps):
    # (M, N, K) of each tl.dot in one loop iteration; each loop is emitted three times (masked low, unmasked
    # middle, masked high). A warpgroup issues M / 64 / warpgroups m64nNk16 per 16 of K: the tile's full N, and
    # its own rows of M (fewer n, or more instructions, would mean split or duplicated work).
    dots = {"fwd": [(rows, keys, d), (rows, d, keys)],
            "dq": [(rows, keys, d), (rows, keys, d), (rows, d, keys)],
            "dkdv": [(keys, rows, d), (keys, d, rows), (keys, rows, d), (keys, d, rows)]}[kernel]
    counts = collections.Counter()
    for m, n, k in dots:
        assert m % (64 * (warps // 4)) == 0, (kernel, m, warps)
        counts[f"m64n{n}k16"] += 3 * m // (64 * (warps // 4)) * k // 16
    return counts

mod = {m: importlib.import_module(f"cancerllm.kernels.{m}") for m in ("attention", "rms_norm", "cross_entropy")}
attn = mod["attention"]
for d in (64, 128):
    for kernel in ("fwd", "dq", "dkdv"):
        name = {"fwd": "_attn_fwd", "dq": "_attn_bwd_dq", "dkdv": "_attn_bwd_dkdv"}[kernel]
        cfg = attn._config(d, kernel, G_PAD=4)
        constexprs = dict(G=4, G_PAD=4, HEAD_DIM=d, D_PAD=d, HAS_DOCS=True, DOT_DTYPE=tl.bfloat16,
                          BLOCK_T=cfg["BLOCK_T"], BLOCK_N=cfg["BLOCK_N"])
        compiled = compile_for_sm90("attention", name, constexprs, cfg["num_warps"], cfg["num_stages"])
        wgmma = collections.Counter(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", compiled.asm["ptx"]))
        expected = expected_wgmma(kernel, 4 * cfg["BLOCK_T"], cfg["BLOCK_N"], d, cfg["num_warps"])
        assert wgmma == expected, (name, d, dict(wgmma), dict(expected))
        # dK/dV at D = 128 spills in every full-width tiling (kernels/attention.py, _GPU_TILES): bounded, not 0.
        max_stack = 512 if (kernel, d) == ("dkdv", 128) else 0
        assert stack_bytes(compiled) <= max_stack, (name, d, stack_bytes(compiled))
        print(name, d, dict(wgmma), "stack", stack_bytes(compiled))

others = [
    ("attention", "_attn_bwd_delta", dict(HEAD_DIM=128, D_PAD=128, BLOCK_R=64)),
    ("rms_norm", "_rms_norm_fwd", dict(HAS_RESIDUAL=True, BLOCK_N=4096)),
    ("rms_norm", "_rms_norm_bwd", dict(HAS_DH_OUT=True, BLOCK_N=4096)),
    ("cross_entropy", "_cross_entropy_fwd", dict(MEAN=True, COMPUTE_GRAD=True, BLOCK_V=8192)),
]
for module, name, constexprs in others:
    compile_for_sm90(module, name, constexprs, num_warps=8, num_stages=2)
print("compiled", 6 + len(others))
'''


def test_every_kernel_compiles_for_an_h100():
    """The interpreter runs kernels as numpy and misses what only the compiler rejects (globals that are not
    constexpr, loop-carried type changes, shared memory over the limit): compile each kernel for sm_90 with the
    bundled ptxas, in a process without TRITON_INTERPRET, at the GPU's bf16 tile sizes. The attention kernels
    at head dims 64 and 128, with the tiles `_config` gives on a GPU, must also issue full-width wgmma without
    duplicated work and spill no registers."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", COMPILE_FOR_H100], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "compiled 10" in result.stdout

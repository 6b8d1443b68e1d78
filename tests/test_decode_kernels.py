"""The CPU decoding kernels beside the small-M matmul: one step's cached attention (cancerllm/decode_attention.py,
csrc/decode_attention.cpp) and RMSNorm rows (decode_rms_norm.py, csrc/rms_norm.cpp), each against its float64
reference on fresh random inputs, at odd sizes and both thread counts, and their refusals."""
import math

import pytest
import torch
import torch.nn.functional as F

from cancerllm import decode_attention, decode_rms_norm
from cancerllm.cache import KVCache
from cancerllm.decode_rms_norm import RowNorm
from cancerllm.kernels.testing import threads_set

pytestmark = pytest.mark.skipif(not (decode_attention.available() and decode_rms_norm.available()),
                                reason="cancerllm._C built without the decoding kernels")
DTYPES = [torch.float32, torch.bfloat16]
KERNELS = [pytest.param(False, id="avx512" if decode_attention.fast_kernel() else "avx512-unavailable-portable"),
           pytest.param(True, id="portable")]
# Relative 2-norm error against float64 (measured: fp32 1.6e-7, bf16 1.8e-3 from rounding the output and the rotated
# q and k to bf16 once each) and the largest absolute error on outputs of magnitude ~1.
TOLERANCE = {torch.float32: (1e-6, 1e-5), torch.bfloat16: (8e-3, 3e-2)}
# (n, Hq, Hkv, S slots, D, window): one or several rows, grouped and plain heads, head widths not a multiple of the
# vector width, Mistral's 128 and past it (the AVX512 value loops' limit), a window shorter than the cache, a long
# cache past the threads' work threshold.
SHAPES = [(1, 9, 3, 37, 64, None), (3, 4, 2, 50, 16, 7), (2, 8, 8, 5, 6, None), (1, 1, 1, 1, 2, None),
          (4, 6, 2, 300, 64, 100), (2, 12, 4, 700, 24, None), (1, 4, 1, 9, 130, None), (2, 8, 2, 33, 128, 20)]


def step_inputs(n, Hq, Hkv, S, D, dtype, empty_share=0.2):
    """A decode step's inputs: random caches whose slots hold random past positions (a share empty, -1), each
    row's new position recorded in its slot as KVCache.begin does."""
    qkv = torch.randn(n, 1, Hq + 2 * Hkv, D).to(dtype)
    angles = torch.randn(n, 1, D // 2) * 10
    k_cache, v_cache = (torch.randn(n, Hkv, S, D).to(dtype) for _ in range(2))
    positions = torch.randint(0, 3 * S, (n,))
    slot_pos = torch.randint(0, 3 * S, (n, S))
    slot_pos[torch.rand(n, S) < empty_share] = -1
    slot_pos[torch.arange(n), positions % S] = positions
    return qkv, angles.cos(), angles.sin(), k_cache, v_cache, slot_pos, positions


def assert_close(out, ref, dtype):
    relative, absolute = TOLERANCE[dtype]
    error = (out.double() - ref).norm() / ref.norm()
    assert error < relative, f"relative error {error:.3g}"
    assert (out.double() - ref).abs().max() < absolute


@pytest.mark.parametrize("portable", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "n{}-Hq{}-Hkv{}-S{}-D{}-w{}".format(*s))
def test_attention_step_matches_float64(shape, threads, dtype, portable):
    n, Hq, Hkv, S, D, window = shape
    inputs = step_inputs(n, Hq, Hkv, S, D, dtype)
    caches_before = (inputs[3].clone(), inputs[4].clone())
    ref_inputs = list(inputs)
    ref_inputs[3:5] = [c.clone() for c in caches_before]
    with torch.inference_mode(), threads_set(threads):
        out = decode_attention.attend_step(*inputs, window=window, portable=portable)
    ref = decode_attention.reference(*ref_inputs, window=window)
    assert out.shape == (n, 1, Hq, D) and out.dtype == dtype
    assert_close(out, ref, dtype)
    # The new key (rotated) and value are in their slots, in the cache's dtype; nothing else changed.
    slots = inputs[6] % S
    written = torch.zeros(n, S, dtype=torch.bool)
    written[torch.arange(n), slots] = True
    for ours, theirs, before in zip(inputs[3:5], ref_inputs[3:5], caches_before):
        assert torch.equal(ours.transpose(1, 2)[~written], before.transpose(1, 2)[~written])
        torch.testing.assert_close(ours, theirs, rtol=TOLERANCE[dtype][0], atol=TOLERANCE[dtype][0])


def test_attention_step_sees_only_its_rows_causal_window():
    """A slot whose position is ahead of the query, out of the window or empty has no weight: its value may be
    anything (here huge) without reaching the output; the visible slots alone give the output."""
    n, Hq, Hkv, S, D, window = 1, 4, 2, 12, 8, 4
    qkv, cos, sin, k_cache, v_cache, slot_pos, _ = step_inputs(n, Hq, Hkv, S, D, torch.float32, empty_share=0)
    positions = torch.tensor([20])
    slot_pos[0] = torch.tensor([16, 17, 18, 19, 20, 21, 30, -1, 5, 15, 14, 13])   # slot 20 % 12 = 8 is the new one
    slot_pos[0, 8], slot_pos[0, 4] = 20, -1
    visible = (slot_pos[0] >= 0) & (slot_pos[0] <= 20) & (slot_pos[0] > 20 - window)
    assert visible.sum() == 4   # 17, 18, 19 and the new 20
    v_cache[0, :, ~visible] = 1e6
    out = decode_attention.attend_step(qkv, cos, sin, k_cache, v_cache, slot_pos, positions, window=window)
    assert out.abs().max() < 100
    assert_close(out, decode_attention.reference(qkv, cos, sin, k_cache.clone(), v_cache.clone(), slot_pos,
                                                 positions, window=window), torch.float32)


def test_the_cache_attends_alike_with_and_without_the_step_kernel():
    """KVCache's two routes for a one-token pass, the kernel and the torch ops (rotation, store, SDPA): the same
    attention and the same cache contents, over a rolling window buffer."""
    torch.manual_seed(0)
    n_layers, batch, Hq, Hkv, D, window = 2, 3, 6, 2, 16, 5
    caches = [KVCache(n_layers, batch, window, Hq, Hkv, D, window=window) for _ in range(2)]
    caches[1].step_kernel = False
    from cancerllm.model import rotate
    for position in range(9):
        qkv = torch.randn(batch, 1, Hq + 2 * Hkv, D)
        angles = torch.randn(batch, 1, D // 2)
        outs = []
        for cache in caches:
            cache.begin(slice(0, batch), torch.full((batch, 1), position))
            if cache.step_kernel:
                outs.append(cache.attend_step(1, qkv, angles.cos(), angles.sin()))
            else:
                qk = rotate(qkv[:, :, :Hq + Hkv], angles.cos(), angles.sin(), sign=1.0)
                outs.append(cache.attend(1, qk[:, :, :Hq], qk[:, :, Hq:], qkv[:, :, Hq + Hkv:]))
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(caches[0].k, caches[1].k, rtol=1e-6, atol=1e-6)
        assert torch.equal(caches[0].v, caches[1].v)


def test_a_prefill_chunk_attends_over_the_slots_held_only():
    """A multi-token pass leaves out the slots past the last one any row holds (a first chunk: all of them), and
    its attention is plain causal attention over everything stored before it and itself."""
    from cancerllm.cache import used_slots
    assert used_slots(torch.tensor([[-1, -1, -1]])) == 0 and used_slots(torch.tensor([[0, -1, 5], [-1, 1, -1]])) == 3
    torch.manual_seed(0)
    Hq, Hkv, D = 4, 2, 8
    cache = KVCache(1, 2, 20, Hq, Hkv, D)
    keys, values, queries = [], [], []
    for start, T in [(0, 5), (5, 3), (8, 6)]:
        q, k, v = torch.randn(2, T, Hq, D), torch.randn(2, T, Hkv, D), torch.randn(2, T, Hkv, D)
        cache.begin(slice(0, 2), torch.arange(start, start + T).expand(2, T))
        assert cache.used == start
        out = cache.attend(0, q, k, v)
        keys, values, queries = keys + [k], values + [v], queries + [q]
        K, V = (torch.cat(t, dim=1).repeat_interleave(Hq // Hkv, dim=2).transpose(1, 2) for t in (keys, values))
        expected = F.scaled_dot_product_attention(torch.cat(queries, dim=1).transpose(1, 2), K, V, is_causal=True)
        torch.testing.assert_close(out, expected.transpose(1, 2)[:, start:], rtol=1e-5, atol=1e-5)


def test_attention_step_refuses_what_it_cannot_read():
    qkv, cos, sin, k_cache, v_cache, slot_pos, positions = step_inputs(2, 4, 2, 10, 8, torch.float32)
    good = dict(qkv=qkv, cos=cos, sin=sin, k_cache=k_cache, v_cache=v_cache, slot_pos=slot_pos, positions=positions)
    cases = {
        "qkv must be .*one token per row": dict(qkv=torch.randn(2, 2, 8, 8)),
        "v_cache must have the activations. dtype": dict(v_cache=v_cache.bfloat16()),
        "k_cache must be contiguous": dict(k_cache=k_cache.transpose(2, 3).contiguous().transpose(2, 3)),
        "slot_pos must be int64": dict(slot_pos=slot_pos.int()),
        "cos must be float32": dict(cos=cos.double()),
        "cos and sin must hold": dict(cos=cos[:1], sin=sin[:1]),
        "heads are not Hq": dict(qkv=torch.randn(2, 1, 9, 8)),
        "must both be": dict(v_cache=v_cache[:1]),
        "qkv must be float32, bfloat16": dict(qkv=qkv.half(), k_cache=k_cache.half(), v_cache=v_cache.half()),
    }
    for message, change in cases.items():
        with pytest.raises((ValueError, TypeError), match=message):
            decode_attention.attend_step(**{**good, **change})
    with pytest.raises(ValueError, match="window must be None or an int"):
        decode_attention.attend_step(**good, window=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(1, 1, 576), (3, 7, 33), (700, 130), (5,), (0, 16)])
def test_rms_norm_rows_match_float64(shape, threads, dtype):
    weight = torch.randn(shape[-1]).to(dtype)
    x = (torch.randn(shape) * 3).to(dtype)
    with threads_set(threads):
        y = RowNorm(weight, 1e-5)(x)
    ref = decode_rms_norm.reference(x, weight, 1e-5)
    assert y.shape == x.shape and y.dtype == dtype
    # Element by element: fp32 arithmetic, then one rounding to the dtype (bf16 keeps 8 significant bits: 2^-8).
    share = 2.0**-8 + 1e-6 if dtype == torch.bfloat16 else 1e-6
    assert ((y.double() - ref).abs() <= share * ref.abs() + 1e-6).all()


def test_rms_norm_rows_refuse_what_they_cannot_read():
    norm = RowNorm(torch.ones(8), 1e-5)
    with pytest.raises(ValueError, match=r"x must be \[..., 8\]"):
        norm(torch.randn(2, 9))
    with pytest.raises(TypeError, match="x must be float32, bfloat16"):
        norm(torch.randn(2, 8).half())
    with pytest.raises(ValueError, match="weight must be a 1-D CPU tensor"):
        RowNorm(torch.ones(2, 8), 1e-5)


@pytest.mark.parametrize("portable", KERNELS)
def test_exp_of_the_softmax_is_accurate_over_its_range(portable):
    """The kernel's own exp (vectorizable, for scores minus their max, all <= 0): a softmax over scores spread over
    the whole range it sees, from 0 down past underflow, equals float64's."""
    D = 2
    qkv = torch.zeros(1, 1, 3, D)
    qkv[0, 0, 0] = torch.tensor([1.0, 0.0])   # q; k of the new token below; cos 1, sin 0: no rotation
    S = 64
    k_cache = torch.zeros(1, 1, S, D)
    k_cache[0, 0, :, 0] = -torch.linspace(0, 200, S) * math.sqrt(D)   # scores 0 .. -200
    v_cache = torch.randn(1, 1, S, D)
    positions, slot_pos = torch.tensor([S - 1]), torch.arange(S)[None]
    qkv[0, 0, 1] = k_cache[0, 0, S - 1]
    qkv[0, 0, 2] = v_cache[0, 0, S - 1]
    cos, sin = torch.ones(1, 1, 1), torch.zeros(1, 1, 1)
    ref = decode_attention.reference(qkv, cos, sin, k_cache.clone(), v_cache.clone(), slot_pos, positions)
    out = decode_attention.attend_step(qkv, cos, sin, k_cache, v_cache, slot_pos, positions, portable=portable)
    assert_close(out, ref, torch.float32)


# ---------------------------------------------------------------------------------------------- a whole block

BLOCK_CASES = {   # model dtype, DecodeLinear path
    "bf16": (torch.bfloat16, "aten"),
    "int8 weights, fp32 activations": (torch.float32, "int8"),
    "int8 weights, bf16 activations": (torch.bfloat16, "int8"),
}


def block_pair(dtype, path, window, rows=16):
    """A random Block in decoding form on our small-M kernel up to `rows` rows, and its BlockStep."""
    from cancerllm.decode_layer import BlockStep
    from cancerllm.model import Block, DecodeLinear, FusedBlock, ModelArgs
    args = ModelArgs(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=16, hidden_dim=80, vocab_size=64,
                     sliding_window=window, max_seq_len=64, norm_eps=1e-5)
    block = Block(args, layer_id=1)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3) if p.dim() == 2 else p.normal_(1, 0.1)
    block = block.to(dtype)
    fused = FusedBlock(block, lambda weight, name: DecodeLinear(weight, path, rows))
    assert BlockStep.possible(fused)
    return fused, BlockStep(fused), args


@pytest.mark.parametrize("kernel", [pytest.param({}, id="best"), pytest.param({"amx": False}, id="no-amx"),
                                    pytest.param({"portable": True}, id="portable")])
@pytest.mark.parametrize("n", [1, 3, 16])
@pytest.mark.parametrize("case", list(BLOCK_CASES))
def test_block_step_computes_the_block_op_by_op(case, n, kernel):
    """BlockStep against the same FusedBlock run op by op, step after step over a rolling window cache: the same
    roundings in the same places, so the outputs agree to within a few units of the last place of a rare value
    (a rounding that flips) and the caches alike."""
    from cancerllm.model import rope_tables
    torch.manual_seed(n)
    dtype, path = BLOCK_CASES[case]
    window = 6
    fused, step, args = block_pair(dtype, path, window)
    caches = [KVCache(2, n, window, args.n_heads, args.n_kv_heads, args.head_dim, window=window, dtype=dtype)
              for _ in range(2)]
    cos_table, sin_table = rope_tables(args.head_dim, args.max_seq_len, args.rope_theta)
    starts = torch.randint(0, 20, (n, 1))
    with torch.inference_mode():
        for t in range(9):
            positions = starts + t
            x = torch.randn(n, 1, args.dim).to(dtype)
            cos, sin = cos_table[positions], sin_table[positions]
            for cache in caches:
                cache.begin(slice(0, n), positions)
            fused.step = None
            expected = fused(x, cos, sin, None, caches[0])
            got = step(x, cos, sin, caches[1], **kernel)
            assert got.dtype == dtype and got.shape == x.shape
            error = float((got.double() - expected.double()).norm() / expected.double().norm())
            assert error < 1e-3, f"step {t}: relative error {error:.3g}"
            torch.testing.assert_close(caches[1].k, caches[0].k, rtol=1e-2, atol=1e-2)
            torch.testing.assert_close(caches[1].v, caches[0].v, rtol=1e-2, atol=1e-2)


def test_a_fused_block_runs_its_step_only_where_it_can():
    """Decode steps of up to `rows` rows go to the BlockStep; larger batches and prefill chunks run op by op."""
    from cancerllm.model import rope_tables
    fused, step, args = block_pair(torch.bfloat16, "aten", None, rows=2)
    calls = []

    class Counted:   # the block's step, counting the inputs it is called with
        rows = step.rows

        def __call__(self, x, *rest):
            calls.append(tuple(x.shape))
            return step(x, *rest)

    fused.step = Counted()
    cos_table, sin_table = rope_tables(args.head_dim, args.max_seq_len, args.rope_theta)
    for n, T in [(2, 1), (3, 1), (2, 4)]:
        cache = KVCache(2, n, 16, args.n_heads, args.n_kv_heads, args.head_dim, dtype=torch.bfloat16)
        positions = torch.arange(T).expand(n, T)
        cache.begin(slice(0, n), positions)
        with torch.inference_mode():
            fused(torch.randn(n, T, args.dim).bfloat16(), cos_table[positions], sin_table[positions], None, cache)
    assert calls == [(2, 1, args.dim)]


def test_block_step_refuses_what_it_cannot_run():
    fused, step, args = block_pair(torch.bfloat16, "aten", None, rows=4)
    cache = KVCache(2, 5, 8, args.n_heads, args.n_kv_heads, args.head_dim, dtype=torch.bfloat16)
    cache.begin(slice(0, 5), torch.zeros(5, 1, dtype=torch.int64))
    angles = torch.zeros(5, 1, args.head_dim // 2)
    with pytest.raises(ValueError, match=r"x must be \[n <= 4, 1, 48\]"):
        step(torch.randn(5, 1, args.dim).bfloat16(), angles, angles, cache)
    cache.begin(slice(0, 3), torch.zeros(3, 1, dtype=torch.int64))
    with pytest.raises(TypeError, match="x must be float32, bfloat16"):
        step(torch.randn(3, 1, args.dim).half(), angles[:3], angles[:3], cache)
    with pytest.raises(TypeError, match="k_cache must have the activations' dtype"):
        step(torch.randn(3, 1, args.dim), angles[:3], angles[:3], cache)
    fused.down_proj.gemv_rows = 0
    from cancerllm.decode_layer import BlockStep
    assert not BlockStep.possible(fused)

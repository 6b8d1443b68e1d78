"""One decoding step's attention on CPU in one C++ call (csrc/decode_attention.cpp): for every row's new token,
rotate its query and key heads (RoPE, the model's `rotate`), store its key and value in the cache slot of its
position, and attend with each query head over the slots its row may see (causal, and Mistral's window when there
is one). cache.py's general path does the same in a dozen torch ops per layer; at one token per row their fixed
costs were a fifth of a bf16 decode step of SmolLM2-135M (docs/experiments.md).

    out = attend_step(qkv, cos, sin, k_cache, v_cache, slot_pos, positions, window=None)

Arithmetic in fp32 whatever the cache holds; the rotated query and key are rounded to the activations' dtype first
(the tensors torch would hold), the output to it last. `reference` is the same step in float64 plain torch, which
the tests compare against. Every check happens in `attend_step`, before the C++ call takes data pointers.
"""
import math

import torch

from .extension import FLOATS, check_cpu_tensor, native

OP = "decode_attention"


def available() -> bool:
    return native(OP) is not None


def usable(cache: torch.Tensor) -> bool:
    """Whether a KV cache tensor like `cache` can be attended by the kernel: on CPU, fp32 or bf16, kernel built."""
    return cache.device.type == "cpu" and cache.dtype in FLOATS and available()


def heads(qkv: torch.Tensor, k_cache: torch.Tensor) -> tuple:
    """(Hq, Hkv): the query and KV heads of a fused [n, 1, Hq + 2 Hkv, D] projection for a cache [n, Hkv, S, D]."""
    Hkv = k_cache.shape[1]
    return qkv.shape[2] - 2 * Hkv, Hkv


def check(qkv, cos, sin, k_cache, v_cache, slot_pos, positions, window) -> None:
    check_cpu_tensor(OP, "qkv", qkv, dtypes=tuple(FLOATS))
    if qkv.dim() != 4 or qkv.shape[1] != 1:
        raise ValueError(f"{OP}: qkv must be [n, 1, Hq + 2 Hkv, D] (one token per row), got {tuple(qkv.shape)}")
    n, _, heads_in_qkv, D = qkv.shape
    check_step(OP, cos, sin, k_cache, v_cache, slot_pos, positions, window, n=n, D=D, dtype=qkv.dtype)
    Hq, Hkv = heads(qkv, k_cache)
    if Hq < Hkv or Hq % Hkv:
        raise ValueError(f"{OP}: qkv's {heads_in_qkv} heads are not Hq + 2 Hkv with Hq a multiple of the cache's "
                         f"Hkv={Hkv}")


def check_step(op, cos, sin, k_cache, v_cache, slot_pos, positions, window, *, n, D, dtype) -> None:
    """The cache and rotary inputs of a decode step for n rows and heads of width D in `dtype` (what attend_step
    and decode_layer's BlockStep both hand to C++)."""
    for name, t in dict(k_cache=k_cache, v_cache=v_cache).items():
        check_cpu_tensor(op, name, t)
        if t.dtype != dtype:
            raise TypeError(f"{op}: {name} must have the activations' dtype {dtype}, got {t.dtype}")
    for name, t in dict(cos=cos, sin=sin).items():
        check_cpu_tensor(op, name, t, dtypes=(torch.float32,))
    for name, t in dict(slot_pos=slot_pos, positions=positions).items():
        check_cpu_tensor(op, name, t, dtypes=(torch.int64,))
    if k_cache.dim() != 4 or k_cache.shape[0] != n or k_cache.shape[3] != D or v_cache.shape != k_cache.shape:
        raise ValueError(f"{op}: k_cache and v_cache must both be [n={n}, Hkv, S, D={D}], got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if D % 2:
        raise ValueError(f"{op}: the head width D={D} must be even (the rotation pairs its halves)")
    if cos.shape != sin.shape or cos.numel() != n * D // 2:
        raise ValueError(f"{op}: cos and sin must hold n * D / 2 = {n * D // 2} angles each, got "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}")
    if slot_pos.shape != (n, k_cache.shape[2]) or positions.shape != (n,):
        raise ValueError(f"{op}: slot_pos must be [n, S] = {(n, k_cache.shape[2])} and positions [n] = ({n},), got "
                         f"{tuple(slot_pos.shape)} and {tuple(positions.shape)}")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"{op}: window must be None or an int >= 1, got {window!r}")


def fast_kernel() -> bool:
    """Whether this CPU runs the AVX512 loops (otherwise the portable ones run)."""
    return available() and native(OP).has_avx512()


def attend_step(qkv, cos, sin, k_cache, v_cache, slot_pos, positions, *, window=None,
                portable: bool = False) -> torch.Tensor:
    """qkv [n, 1, Hq + 2 Hkv, D]: each row's new token projected (q, k, v heads; not rotated); cos, sin [n, 1, D/2]
    fp32: its rotary angles; k_cache, v_cache [n, Hkv, S, D]: the rows' caches (the new key and value are written
    at slot position % S); slot_pos [n, S] int64: the position each slot holds, -1 when empty, already recording
    the new one; positions [n] int64. Returns the attention output [n, 1, Hq, D] in qkv's dtype. `portable` runs
    the portable loops on any CPU (tests cover both on one machine)."""
    check(qkv, cos, sin, k_cache, v_cache, slot_pos, positions, window)
    n, _, _, D = qkv.shape
    Hq, Hkv = heads(qkv, k_cache)
    out = torch.empty(n, 1, Hq, D, dtype=qkv.dtype)
    native(OP).decode_attention(qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(),
                                v_cache.data_ptr(), slot_pos.data_ptr(), positions.data_ptr(), out.data_ptr(),
                                FLOATS[qkv.dtype], n, Hq, Hkv, k_cache.shape[2], D, window or 0,
                                1 / math.sqrt(D), torch.get_num_threads(), portable)
    return out


def reference(qkv, cos, sin, k_cache, v_cache, slot_pos, positions, *, window=None) -> torch.Tensor:
    """attend_step in float64 plain torch (the caches written in their own dtype): the output [n, 1, Hq, D]."""
    n, _, _, D = qkv.shape
    Hq, Hkv = heads(qkv, k_cache)
    x = qkv[:, 0].double()
    cos, sin = cos.reshape(n, 1, D // 2).double(), sin.reshape(n, 1, D // 2).double()
    x1, x2 = x[..., :D // 2], x[..., D // 2:]
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(qkv.dtype).double()
    q, k, v = rotated[:, :Hq], rotated[:, Hq:Hq + Hkv], x[:, Hq + Hkv:]
    slots = positions % k_cache.shape[2]
    rows = torch.arange(n)
    k_cache[rows, :, slots] = k.to(k_cache.dtype)
    v_cache[rows, :, slots] = v.to(v_cache.dtype)
    keys = k_cache.double().repeat_interleave(Hq // Hkv, dim=1)      # [n, Hq, S, D]: query head j reads KV j // groups
    values = v_cache.double().repeat_interleave(Hq // Hkv, dim=1)
    scores = torch.einsum("nhd,nhsd->nhs", q, keys) / math.sqrt(D)
    query_pos = positions[:, None]
    visible = (slot_pos >= 0) & (slot_pos <= query_pos)
    if window is not None:
        visible &= slot_pos > query_pos - window
    weights = scores.masked_fill(~visible[:, None, :], -math.inf).softmax(dim=-1)
    return torch.einsum("nhs,nhsd->nhd", weights, values)[:, None]

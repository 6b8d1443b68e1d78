"""Causal grouped-query attention of packed documents for training on CPU: torch's flash forward where it is the
faster, else ours, and always our backward: matmuls at the machine's matmul rate around a softmax in one C++ pass
(csrc/score_matmul.cpp, csrc/attention_softmax.cpp).

    out = attention(q, k, v, window)                 # q [L, Hq, D], k and v [L, Hkv, D]: one document
    out = by_document(q, k, v, window, cu_seqlens)   # [B, T, H, D] batches: kernels.attention's CPU path

by_document sends each document through `attention` or, where it measured faster on this machine for documents of
that shape and length bucket (faster_path: once per machine, cached), through torch's SDPA forward and backward:
ours wins on a CPU with native bf16, SDPA's flash kernel on one without (where ours multiplies the full square of
fp32 scores).

Forward, in bf16 without a window shorter than the document (torch's causal mask has none): torch's CPU flash
attention (oneDNN brgemm; bf16 products summed in fp32), which returns the log-sum-exp too. On an AMX Xeon with 2
threads it took 1.3 - 1.4x less time than ours at 64 tokens, ~2x less at 512 and ~2.5x at 1,024 (forward and
backward together up to 1.2x less). In fp32 it won only past ~512 tokens there, a tie below: fp32 keeps ours, as do
windows. Ours, per key/value head and its G query heads at once: the scores S = Q K^T in fp32 (bf16 products summed
in fp32 by our score matmul on AMX or AVX512-BF16 tiles, causal tiles only; fp32 inputs through torch's fp32
matmul), P = softmax(S / sqrt(D)) under the causal (and sliding-window) mask, rounded to q's dtype, O = P V
(torch's matmul). Either saves q, k, v, O and the log-sum-exp: no [L, L] tensor is kept. Backward recomputes S,
takes dP = dO V^T in fp32, and in one pass gets P and dS = P (dP - rowsum(dO O)) / sqrt(D), rounded to q's dtype for
dV = P^T dO, dQ = dS K and dK = dS^T Q: the roundings of P and dS before their matmuls are those flash attention
makes on a GPU. In bf16 (on AVX512-BF16) S and dP are made 16 or 8 rows at a time into the thread's own buffers and
turned into P and dS there, in one C++ pass: the [Hq * L, L] fp32 S and dP never go through memory (they were half
of the backward's time outside its matmuls: docs/experiments.md, 2026-12-02). In bf16 torch's flash backward took
1.1 - 1.4x as long as the unfused one at 512 tokens and ~2x at 200; at 1,024 tokens and in fp32 it was mostly the
faster (a choice not yet measured cleanly: the AMX Xeon's 2 cores were shared).

A document's scores are [Hq * L, L] fp32 while one call runs (9 heads at L = 1,024: 38 MB; the fused bf16 backward
makes only P and dS, half that each); past MAX_SCORE_BYTES a document goes to the reference's SDPA instead
(`usable`). The score and probability buffers are kept between calls (extension.scratch).
"""
import torch

from . import gemv
from .extension import FLOATS, check_cpu_tensor, native, scratch
from .kernels import reference

OP = "attention_softmax_forward"
MAX_SCORE_BYTES = 128 * 2**20   # at most 2 x this in fp32 and as much again in q's dtype stay allocated as scratch
MIN_BUCKET = 64     # faster_path measures documents at their length's power of two, this at least
SDPA_MARGIN = 1.25  # ... and takes SDPA only this much faster than ours
_chosen = {}        # faster_path's answers in this process


def usable(q: torch.Tensor, length: int) -> bool:
    """Whether a document of `length` tokens with queries like q ([..., Hq, D]) runs here: CPU, fp32 or bf16, an even
    head width, kernels built, its fp32 scores within MAX_SCORE_BYTES."""
    return (q.device.type == "cpu" and q.dtype in FLOATS and q.shape[-1] % 2 == 0 and native(OP) is not None
            and native("score_matmul") is not None and q.shape[-2] * length * length * 4 <= MAX_SCORE_BYTES)


def scores(rows: torch.Tensor, keys: torch.Tensor, group: int, name: str) -> torch.Tensor:
    """rows [H, R, D] @ keys[H, L, D]^T per head -> [H, R, L] fp32, in the scratch buffer `name`. Row r is the query
    at position r // group: entries past it may be left unwritten (the softmax never reads them)."""
    check_cpu_tensor("attention scores", "rows", rows, dtypes=tuple(FLOATS))
    check_cpu_tensor("attention scores", "keys", keys, dtypes=(rows.dtype,))
    if rows.dtype != torch.bfloat16 or not gemv.fast_kernel():
        return torch.bmm(rows.float(), keys.float().transpose(1, 2))
    H, R, D = rows.shape
    out = scratch(name, (H, R, keys.shape[1]), torch.float32)
    native("score_matmul").score_matmul(rows.data_ptr(), keys.data_ptr(), out.data_ptr(), H, R, keys.shape[1], D,
                                        group, torch.get_num_threads())
    return out


def by_kv_head(t: torch.Tensor, n_kv: int) -> torch.Tensor:
    """[L, Hkv * G, D] -> [Hkv, L * G, D], contiguous: row t * G + g is position t's query head kv * G + g."""
    L, H, D = t.shape
    return t.view(L, n_kv, H // n_kv, D).transpose(0, 1).reshape(n_kv, L * (H // n_kv), D).contiguous()


def from_kv_heads(t: torch.Tensor, length: int) -> torch.Tensor:
    """The inverse of by_kv_head: [Hkv, L * G, D] -> [L, Hkv * G, D]."""
    n_kv, rows, D = t.shape
    return t.view(n_kv, length, rows // length, D).transpose(0, 1).reshape(length, -1, D)


def flash_applies(q: torch.Tensor, length: int, window) -> bool:
    """Whether torch's flash forward computes this document's attention: bf16 (where it was the faster at every
    length), and no window shorter than the document (its causal mask has none)."""
    return q.dtype == torch.bfloat16 and (window is None or window >= length)


def flash_forward(q, k, v):
    """Torch's CPU flash attention on q [L, Hq, D], k and v [L, Hkv, D] (GQA taken as it is) -> out [Hkv, L * G, D]
    and the natural-log log-sum-exp of the scaled scores, [Hkv, L * G] fp32: the layouts `softmax_forward` gives."""
    n_kv = k.shape[1]
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        *(t.transpose(0, 1)[None] for t in (q, k, v)), is_causal=True, scale=q.shape[-1] ** -0.5)
    return by_kv_head(out[0].transpose(0, 1), n_kv), by_kv_head(lse[0].t()[..., None], n_kv)[..., 0]


def softmax_forward(rows, keys, values, shape):
    """Our score matmul, softmax and torch's P @ V on rows [Hkv, L * G, D], keys and values [Hkv, L, D] -> out
    [Hkv, L * G, D] and the log-sum-exp [Hkv, L * G] fp32."""
    probs = scratch("probs", (*rows.shape[:2], shape["L"]), rows.dtype)
    lse = torch.empty(rows.shape[:2], dtype=torch.float32)
    raw = scores(rows, keys, shape["group"], "scores")
    native(OP).attention_softmax_forward(raw.data_ptr(), probs.data_ptr(), lse.data_ptr(), FLOATS[rows.dtype],
                                         **shape)
    return torch.bmm(probs, values), lse


class CPUAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, window, fused_backward):
        L, Hq, D = q.shape
        n_kv = k.shape[1]
        rows, keys, values = by_kv_head(q, n_kv), k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous()
        shape = dict(rows=rows.shape[0] * rows.shape[1], L=L, group=Hq // n_kv, window=window or 0, scale=D ** -0.5,
                     threads=torch.get_num_threads())
        if flash_applies(q, L, window):
            out, lse = flash_forward(q, k, v)
        else:
            out, lse = softmax_forward(rows, keys, values, shape)
        ctx.save_for_backward(rows, keys, values, out, lse)
        ctx.shape, ctx.fused_backward = shape, fused_backward
        return from_kv_heads(out, L)

    @staticmethod
    def backward(ctx, grad_out):
        rows, keys, values, out, lse = ctx.saved_tensors
        n_kv, L = keys.shape[:2]
        grad_rows = by_kv_head(grad_out.to(rows.dtype), n_kv)
        delta = (grad_rows.float() * out.float()).sum(-1)
        probs, grad_scores = softmax_backward(rows, keys, grad_rows, values, lse, delta, ctx.shape, ctx.fused_backward)
        grad_v = torch.bmm(probs.transpose(1, 2), grad_rows)
        grad_q = torch.bmm(grad_scores, keys)
        grad_k = torch.bmm(grad_scores.transpose(1, 2), rows)
        return from_kv_heads(grad_q, L), grad_k.transpose(0, 1), grad_v.transpose(0, 1), None, None


def softmax_backward(rows, keys, grad_rows, values, lse, delta, shape, fused=True):
    """P and dS = P (dP - delta) / sqrt(D) in q's dtype ([Hkv, L * G, L] scratch buffers) from the scores recomputed
    and dP = dO V^T. bf16 on AVX512-BF16: one C++ pass over blocks of rows, whose scores and dP stay in the thread's
    buffers (csrc/score_matmul.cpp); otherwise the two [Hkv, L * G, L] fp32 products through memory, then the
    softmax's pass over them (also with fused=False: bench/kernels.py's peer)."""
    n_kv, R, L = keys.shape[0], rows.shape[1], keys.shape[1]
    probs = scratch("probs", (n_kv, R, L), rows.dtype)
    grad_scores = scratch("grad_scores", (n_kv, R, L), rows.dtype)
    if fused and rows.dtype == torch.bfloat16 and gemv.fast_kernel() and native("attention_backward_scores"):
        native("attention_backward_scores").attention_backward_scores(
            rows.data_ptr(), keys.data_ptr(), grad_rows.data_ptr(), values.data_ptr(), lse.data_ptr(),
            delta.data_ptr(), probs.data_ptr(), grad_scores.data_ptr(), n_kv, R, L, rows.shape[2], shape["group"],
            shape["window"], shape["scale"], shape["threads"])
        return probs, grad_scores
    raw = scores(rows, keys, shape["group"], "scores")
    grad_probs = scores(grad_rows, values, shape["group"], "grad_probs")
    native(OP).attention_softmax_backward(raw.data_ptr(), lse.data_ptr(), grad_probs.data_ptr(), delta.data_ptr(),
                                          probs.data_ptr(), grad_scores.data_ptr(), FLOATS[rows.dtype], **shape)
    return probs, grad_scores


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window=None, fused_backward=True) -> torch.Tensor:
    """Causal attention of one document: q [L, Hq, D], k and v [L, Hkv, D] (CPU, one dtype) -> [L, Hq, D].
    fused_backward=False: the bf16 backward's score matmuls and softmax as separate passes (to measure the fused)."""
    return CPUAttention.apply(q, k, v, window, fused_backward)


def sdpa(q, k, v, window=None) -> torch.Tensor:
    """One document through the reference: torch's SDPA (its CPU flash kernel, forward and backward, when causal
    without a shorter window), q [L, Hq, D], k and v [L, Hkv, D] -> [L, Hq, D]."""
    return reference.attention(q[None], k[None], v[None], window=window)[0]


def faster_path(q, k, window) -> str:
    """"ours" or "sdpa" for a document like q [L, Hq, D], k [L, Hkv, D] with `window`: whichever ran forward and
    backward faster on this machine at L's power-of-two bucket (cached per machine with decode_paths'
    measurements). Ours keeps the tie: SDPA must be SDPA_MARGIN faster. On an AMX Xeon in bf16 ours took ~0.7x
    SDPA's time at 512 tokens; on an Ice Lake without native bf16, in fp32, SDPA took 0.65x ours at 512 and 0.37x
    at 1,024 (ours computes the full square of scores in fp32 there): a constant would be wrong on one of them."""
    from .decode_paths import cache_path, machine_key, remembered
    L, Hq, D = q.shape
    Hkv = k.shape[1]
    bucket = max(MIN_BUCKET, 1 << (L - 1).bit_length())
    shorter = window if window is not None and window < bucket else None
    shape = (q.dtype, Hq, Hkv, D, bucket, shorter, torch.get_num_threads(), str(cache_path()))
    if shape not in _chosen:   # each layer of each step asks: the file is read once per shape and process
        key = f"{machine_key()} | attention | {q.dtype} | heads {Hq}/{Hkv} x {D} | {bucket} tokens | {shorter}"
        _chosen[shape] = remembered(key, ("ours", "sdpa"), lambda: time_paths(bucket, Hq, Hkv, D, q.dtype, shorter))
    return _chosen[shape]


def time_paths(L, Hq, Hkv, D, dtype, window) -> str:
    """faster_path's measurement: both paths' forward and backward on random leaves of one document."""
    from .decode_paths import best_times
    generator = torch.Generator().manual_seed(0)   # the caller's random stream left as it was
    q, k, v, grad = (torch.randn(L, H, D, generator=generator).to(dtype) for H in (Hq, Hkv, Hkv, Hq))

    def run(path):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        path(*leaves, window).backward(grad)
    with torch.inference_mode(False), torch.enable_grad():
        seconds = best_times({"ours": lambda: run(attention), "sdpa": lambda: run(sdpa)}, rounds=3, calls=1)
    return "sdpa" if seconds["sdpa"] * SDPA_MARGIN < seconds["ours"] else "ours"


def by_document(q, k, v, window=None, cu_seqlens=None) -> torch.Tensor:
    """q [B, T, Hq, D], k and v [B, T, Hkv, D] -> [B, T, Hq, D]: each packed document (each row without
    `cu_seqlens`) through `attention`, or through the reference's SDPA where that measured faster on this machine
    (faster_path) or the document is too long for our scores."""
    B, T, Hq, D = q.shape
    flat = [t.reshape(B * T, t.shape[2], D) for t in (q, k, v)]
    outs = []
    for start, end in reference.segments(B, T, cu_seqlens):
        q_doc, k_doc, v_doc = (t[start:end] for t in flat)
        ours = usable(q, end - start) and faster_path(q_doc, k_doc, window) == "ours"
        outs.append((attention if ours else sdpa)(q_doc, k_doc, v_doc, window))
    return torch.cat(outs).view(B, T, Hq, D)

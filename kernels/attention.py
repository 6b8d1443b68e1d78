"""Flash attention in Triton: causal, Mistral sliding window, grouped-query, packed documents; forward and backward.

Layout: q [B, T, Hq, D], k and v [B, T, Hkv, D]; query head h reads KV head h // G, G = Hq / Hkv.

- GQA without repeat_kv: a program owns one KV head and a block of BLOCK_T tokens for all G query heads of its
  group, folded into the rows of one tile (row r = token r // G_PAD, head r % G_PAD). Each K/V tile is loaded
  once and used by the whole group; in the backward the dK/dV of a key block sum over the group in registers.
- Which keys a query sees: query i (position within its row of T tokens) sees key j iff lo_i <= j <= i with
  lo_i = max(i - W + 1, start of i's document). lo is non-decreasing in i, so a query block's keys form one
  range [lo of its first query, its last query]: key blocks outside it (beyond the window, before the document)
  are skipped by the loop bounds, and only blocks the range cuts through are masked.
- Packed documents (`cu_seqlens` over the flattened B*T tokens, including every multiple of T) never span two
  rows, so per-token document starts/ends in row coordinates are all the kernels need.
- Backward recomputes the probabilities from the saved log-sum-exp: one kernel for dK/dV (a program per key block,
  looping over the queries that see it), one for dQ (a program per query block, like the forward).
"""
import torch
import triton
import triton.language as tl

from .reference import document_ids
from .triton_utils import INTERPRET, dot_dtype, mm
from .validate import check_triton_attention

LOG2E = tl.constexpr(1.4426950408889634)      # scores are exponentiated with exp2: s * log2(e)
# Initial running max: a finite "minus infinity", so that a row whose first visited key block is entirely
# masked gets exp2(-inf - NEG_BIG) = 0 rather than exp2(-inf - -inf) = NaN.
NEG_BIG = tl.constexpr(-1.0e30)


# ---------------------------------------------------------------------------------------------- shared pieces

@triton.jit
def _rows(t0, kv_head, T, G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr):
    """Token, query head and validity of each row of a folded (token, head-in-group) tile."""
    r = tl.arange(0, BLOCK_T * G_PAD)
    tok = t0 + r // G_PAD
    g = r % G_PAD
    return tok, kv_head * G + g, (tok < T) & (g < G)


@triton.jit
def _first_key(tok, ok, DOC_START, b, T, WINDOW, HAS_DOCS: tl.constexpr):
    """lo_i = max(i - W + 1, document start): the first key each query may see."""
    lo = tok - WINDOW + 1
    if HAS_DOCS:
        lo = tl.maximum(lo, tl.load(DOC_START + b * T + tok, mask=ok, other=0))
    return lo


@triton.jit
def _key_range(DOC_START, b, T, t0, WINDOW, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DOCS: tl.constexpr):
    """Key blocks [lo, hi) a query block starting at token t0 must visit; lo is aligned to BLOCK_N."""
    lo = tl.maximum(t0 - WINDOW + 1, 0)
    if HAS_DOCS:
        lo = tl.maximum(lo, tl.load(DOC_START + b * T + t0))
    return (lo // BLOCK_N) * BLOCK_N, tl.minimum(t0 + BLOCK_T, T)


@triton.jit
def _visible(tok, lo, keys):
    """[rows, keys] mask: lo_i <= j <= i."""
    return (keys[None, :] >= lo[:, None]) & (keys[None, :] <= tok[:, None])


# ---------------------------------------------------------------------------------------------- forward

@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE, DOC_START,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh,
    T, Hq, WINDOW, qk_scale,
    G: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DOCS: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    t0 = tl.program_id(0) * BLOCK_T
    b = tl.program_id(1)
    kv_head = tl.program_id(2)
    tok, head, ok = _rows(t0, kv_head, T, G, G_PAD, BLOCK_T)
    d = tl.arange(0, D_PAD)
    d_ok = d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=ok[:, None] & d_ok[None, :], other=0.0)
    lo = _first_key(tok, ok, DOC_START, b, T, WINDOW, HAS_DOCS)
    K += b * stride_kb + kv_head * stride_kh
    V += b * stride_vb + kv_head * stride_vh

    m_i = tl.full([BLOCK_T * G_PAD], NEG_BIG, tl.float32)      # running max of the scores (log2 units)
    l_i = tl.zeros([BLOCK_T * G_PAD], tl.float32)              # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_T * G_PAD, D_PAD], tl.float32)
    key_lo, key_hi = _key_range(DOC_START, b, T, t0, WINDOW, BLOCK_T, BLOCK_N, HAS_DOCS)
    for n0 in range(key_lo, key_hi, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        kv_mask = (keys < T)[:, None] & d_ok[None, :]
        k = tl.load(K + keys[:, None] * stride_kt + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + keys[:, None] * stride_vt + d[None, :], mask=kv_mask, other=0.0)
        s = mm(q, tl.trans(k), DOT_DTYPE) * qk_scale
        s = tl.where(_visible(tok, lo, keys), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + mm(p.to(v.dtype), v, DOT_DTYPE)
        m_i = m_new

    l_i = tl.where(l_i > 0, l_i, 1.0)      # only padding rows (past T or past G) have an empty sum
    out = acc / l_i[:, None]
    tl.store(O + b * stride_ob + tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
             out.to(O.dtype.element_ty), mask=ok[:, None] & d_ok[None, :])
    tl.store(LSE + (b * Hq + head) * T + tok, (m_i + tl.log2(l_i)) / LOG2E, mask=ok)


# ---------------------------------------------------------------------------------------------- backward

@triton.jit
def _attn_bwd_delta(O, DO, DELTA, n_rows, T, Hq,
                    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_R: tl.constexpr):
    """delta = rowsum(O * dO) per (token, head), stored [B, Hq, T] like the LSE."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)     # r = (b * T + t) * Hq + h over contiguous O
    d = tl.arange(0, D_PAD)
    mask = (r < n_rows)[:, None] & (d < HEAD_DIM)[None, :]
    o = tl.load(O + r[:, None] * HEAD_DIM + d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + r[:, None] * HEAD_DIM + d[None, :], mask=mask, other=0.0).to(tl.float32)
    h = r % Hq
    bt = r // Hq
    tl.store(DELTA + ((bt // T) * Hq + h) * T + bt % T, tl.sum(o * do, 1), mask=r < n_rows)


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, DOC_START, DOC_END,
    T, Hq, Hkv, WINDOW, qk_scale, sm_scale,
    G: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DOCS: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """One program per (key block, batch row, KV head); q, k, v, dO contiguous [B, T, H, D]."""
    n0 = tl.program_id(0) * BLOCK_N
    b = tl.program_id(1)
    kv_head = tl.program_id(2)
    keys = n0 + tl.arange(0, BLOCK_N)
    d = tl.arange(0, D_PAD)
    kv_mask = (keys < T)[:, None] & (d < HEAD_DIM)[None, :]
    kv_offs = (b * T + keys[:, None]) * Hkv * HEAD_DIM + kv_head * HEAD_DIM + d[None, :]
    k = tl.load(K + kv_offs, mask=kv_mask, other=0.0)
    v = tl.load(V + kv_offs, mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], tl.float32)

    # Queries that see some key of this block: from its first key to the window's or the document's end.
    last_key = tl.minimum(n0 + BLOCK_N, T) - 1
    q_hi = tl.minimum(T, last_key + WINDOW)
    if HAS_DOCS:
        q_hi = tl.minimum(q_hi, tl.load(DOC_END + b * T + last_key))
    for t0 in range((n0 // BLOCK_T) * BLOCK_T, q_hi, BLOCK_T):
        tok, head, ok = _rows(t0, kv_head, T, G, G_PAD, BLOCK_T)
        q_mask = ok[:, None] & (d < HEAD_DIM)[None, :]
        q_offs = (b * T + tok[:, None]) * Hq * HEAD_DIM + head[:, None] * HEAD_DIM + d[None, :]
        q = tl.load(Q + q_offs, mask=q_mask, other=0.0)
        do = tl.load(DO + q_offs, mask=q_mask, other=0.0)
        lse = tl.load(LSE + (b * Hq + head) * T + tok, mask=ok, other=0.0) * LOG2E
        delta = tl.load(DELTA + (b * Hq + head) * T + tok, mask=ok, other=0.0)
        lo = _first_key(tok, ok, DOC_START, b, T, WINDOW, HAS_DOCS)
        s_t = mm(k, tl.trans(q), DOT_DTYPE) * qk_scale                         # [keys, rows]
        visible_t = tl.trans(_visible(tok, lo, keys)) & ok[None, :]
        p_t = tl.where(visible_t, tl.exp2(s_t - lse[None, :]), 0.0)
        dv += mm(p_t.to(do.dtype), do, DOT_DTYPE)
        dp_t = mm(v, tl.trans(do), DOT_DTYPE)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += mm(ds_t.to(q.dtype), q, DOT_DTYPE)
    tl.store(DK + kv_offs, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_offs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, DOC_START,
    T, Hq, Hkv, WINDOW, qk_scale, sm_scale,
    G: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DOCS: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """One program per (query block, batch row, KV head), visiting the same key blocks as the forward."""
    t0 = tl.program_id(0) * BLOCK_T
    b = tl.program_id(1)
    kv_head = tl.program_id(2)
    tok, head, ok = _rows(t0, kv_head, T, G, G_PAD, BLOCK_T)
    d = tl.arange(0, D_PAD)
    d_ok = d < HEAD_DIM
    q_mask = ok[:, None] & d_ok[None, :]
    q_offs = (b * T + tok[:, None]) * Hq * HEAD_DIM + head[:, None] * HEAD_DIM + d[None, :]
    q = tl.load(Q + q_offs, mask=q_mask, other=0.0)
    do = tl.load(DO + q_offs, mask=q_mask, other=0.0)
    lse = tl.load(LSE + (b * Hq + head) * T + tok, mask=ok, other=0.0) * LOG2E
    delta = tl.load(DELTA + (b * Hq + head) * T + tok, mask=ok, other=0.0)
    lo = _first_key(tok, ok, DOC_START, b, T, WINDOW, HAS_DOCS)
    dq = tl.zeros([BLOCK_T * G_PAD, D_PAD], tl.float32)
    key_lo, key_hi = _key_range(DOC_START, b, T, t0, WINDOW, BLOCK_T, BLOCK_N, HAS_DOCS)
    for n0 in range(key_lo, key_hi, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        kv_mask = (keys < T)[:, None] & d_ok[None, :]
        kv_offs = (b * T + keys[:, None]) * Hkv * HEAD_DIM + kv_head * HEAD_DIM + d[None, :]
        k = tl.load(K + kv_offs, mask=kv_mask, other=0.0)
        v = tl.load(V + kv_offs, mask=kv_mask, other=0.0)
        s = mm(q, tl.trans(k), DOT_DTYPE) * qk_scale
        visible = _visible(tok, lo, keys) & ok[:, None]
        p = tl.where(visible, tl.exp2(s - lse[:, None]), 0.0)
        dp = mm(do, tl.trans(v), DOT_DTYPE)
        ds = p * (dp - delta[:, None])
        dq += mm(ds.to(k.dtype), k, DOT_DTYPE)
    tl.store(DQ + q_offs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)


# ---------------------------------------------------------------------------------------------- launch

def _config(D: int, backward: bool):
    """Rows per query tile (BLOCK_T * G_PAD), keys per key tile, launch options. Under the interpreter the tiles
    are small so that tests cover many blocks cheaply; on a GPU, the usual flash-attention-2 tiles."""
    if INTERPRET:
        return dict(rows=16, BLOCK_N=16, num_warps=1, num_stages=1)
    if backward:
        return dict(rows=64, BLOCK_N=64, num_warps=4 if D <= 64 else 8, num_stages=2)
    return dict(rows=128, BLOCK_N=64, num_warps=4 if D <= 64 else 8, num_stages=3 if D <= 64 else 2)


def _document_bounds(cu_seqlens, B, T):
    """Per-token start and end (exclusive) of its document, in row coordinates, int32 [B * T]."""
    offsets = cu_seqlens.to(torch.int64)
    doc = document_ids(cu_seqlens, B * T)
    row_start = torch.arange(B * T, device=cu_seqlens.device) // T * T
    return ((offsets[doc] - row_start).to(torch.int32).contiguous(),
            (offsets[doc + 1] - row_start).to(torch.int32).contiguous())


class FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, window, cu_seqlens):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        B, T, Hq, D = q.shape
        Hkv = k.shape[2]
        G = Hq // Hkv
        G_PAD = triton.next_power_of_2(G)
        cfg = _config(D, backward=False)
        block_t = max(1, cfg["rows"] // G_PAD)
        window = T if window is None else min(window, T)
        has_docs = cu_seqlens is not None
        doc_start, doc_end = _document_bounds(cu_seqlens, B, T) if has_docs else (q.new_empty(0, dtype=torch.int32),) * 2

        out = torch.empty_like(q)
        lse = torch.empty(B, Hq, T, device=q.device, dtype=torch.float32)
        sm_scale = D ** -0.5
        grid = (triton.cdiv(T, block_t), B, Hkv)
        _attn_fwd[grid](
            q, k, v, out, lse, doc_start,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            T, Hq, window, sm_scale * LOG2E.value,
            G=G, G_PAD=G_PAD, HEAD_DIM=D, D_PAD=max(16, triton.next_power_of_2(D)),
            BLOCK_T=block_t, BLOCK_N=cfg["BLOCK_N"], HAS_DOCS=has_docs, DOT_DTYPE=dot_dtype(q.dtype),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        ctx.save_for_backward(q, k, v, out, lse, doc_start, doc_end)
        ctx.window, ctx.has_docs = window, has_docs
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, doc_start, doc_end = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        B, T, Hq, D = q.shape
        Hkv = k.shape[2]
        G = Hq // Hkv
        G_PAD = triton.next_power_of_2(G)
        D_PAD = max(16, triton.next_power_of_2(D))
        cfg = _config(D, backward=True)
        block_t = max(1, cfg["rows"] // G_PAD)
        launch = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])

        delta = torch.empty_like(lse)
        n_rows = B * T * Hq
        block_r = 16 if INTERPRET else 64
        _attn_bwd_delta[(triton.cdiv(n_rows, block_r),)](out, grad_out, delta, n_rows, T, Hq,
                                                         HEAD_DIM=D, D_PAD=D_PAD, BLOCK_R=block_r)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        sm_scale = D ** -0.5
        common = dict(G=G, G_PAD=G_PAD, HEAD_DIM=D, D_PAD=D_PAD, BLOCK_T=block_t, BLOCK_N=cfg["BLOCK_N"],
                      HAS_DOCS=ctx.has_docs, DOT_DTYPE=dot_dtype(q.dtype), **launch)
        _attn_bwd_dkdv[(triton.cdiv(T, cfg["BLOCK_N"]), B, Hkv)](
            q, k, v, grad_out, lse, delta, dk, dv, doc_start, doc_end,
            T, Hq, Hkv, ctx.window, sm_scale * LOG2E.value, sm_scale, **common)
        _attn_bwd_dq[(triton.cdiv(T, block_t), B, Hkv)](
            q, k, v, grad_out, lse, delta, dq, doc_start,
            T, Hq, Hkv, ctx.window, sm_scale * LOG2E.value, sm_scale, **common)
        return dq, dk, dv, None, None


def attention(q, k, v, *, window=None, cu_seqlens=None, lse=False):
    """Causal grouped-query flash attention, the Triton twin of `reference.attention` (same arguments and
    results; inputs already checked by `cancerllm.kernels.attention`). Non-contiguous inputs are copied to
    contiguous ones. With `lse=True` also returns the natural-log log-sum-exp, [B, Hq, T] fp32."""
    check_triton_attention(q)
    out, logsumexp = FlashAttention.apply(q, k, v, window, cu_seqlens)
    return (out, logsumexp) if lse else out

"""Flash attention in Triton: causal, Mistral sliding window, grouped-query, packed documents; forward and backward.

Layout: q [B, T, Hq, D], k and v [B, T, Hkv, D]; query head h reads KV head h // G, G = Hq / Hkv.

- GQA without repeat_kv: a program owns one KV head and a block of BLOCK_T tokens for all G query heads of its
  group, folded into the rows of one tile (row r = token r // G_PAD, head r % G_PAD). Each K/V tile is loaded
  once and used by the whole group; in the backward the dK/dV of a key block sum over the group in registers.
- Which keys a query sees: query i (position within its row of T tokens) sees key j iff lo_i <= j <= i with
  lo_i = max(i - W + 1, start of i's document). lo is non-decreasing in i, so a query block's keys form one
  range [lo of its first query, its last query]; the key tiles in it split three ways: low tiles the window's or
  a document's start cuts through (masked), a middle every query of the block sees whole (no mask), and the
  tiles the diagonal cuts through (masked). The backward's dK/dV loop splits the same way from the key side.
- Packed documents (`cu_seqlens` over the flattened B*T tokens, including every multiple of T) never span two
  rows. The kernels find each token's document by a binary search over cu_seqlens, so packed documents cost no
  extra launch and no host sync.
- Backward recomputes the probabilities from the saved log-sum-exp: one kernel for dK/dV (a program per key block,
  looping over the queries that see it), one for dQ (a program per query block, like the forward).
"""
import torch
import triton
import triton.language as tl

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
def _document(CU_SEQLENS, N_DOCS, SEARCH_STEPS, flat):
    """Index d of the document holding each flattened token index, cu[d] <= flat < cu[d + 1] (an empty document,
    cu[d] == cu[d + 1], holds none): a binary search keeping cu[lo] <= flat < cu[hi], SEARCH_STEPS =
    ceil(log2(N_DOCS)) halvings. Indices past the last token end at N_DOCS - 1, still in bounds."""
    lo = tl.zeros_like(flat)
    hi = lo + N_DOCS
    for _ in range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        right = tl.load(CU_SEQLENS + mid).to(tl.int32) <= flat
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid)
    return lo


@triton.jit
def _first_key(tok, b, T, WINDOW, CU_SEQLENS, N_DOCS, SEARCH_STEPS, HAS_DOCS: tl.constexpr):
    """lo_i = max(i - W + 1, 0, start of i's document): the first key each query may see."""
    lo = tl.maximum(tok - WINDOW + 1, 0)
    if HAS_DOCS:
        doc = _document(CU_SEQLENS, N_DOCS, SEARCH_STEPS, b * T + tok)
        lo = tl.maximum(lo, tl.load(CU_SEQLENS + doc).to(tl.int32) - b * T)
    return lo


@triton.jit
def _query_end(keys, b, T, WINDOW, CU_SEQLENS, N_DOCS, SEARCH_STEPS, HAS_DOCS: tl.constexpr):
    """hi_j = min(j + W, T, end of j's document): key j is seen by the queries j <= i < hi_j (a query i >= j shares
    j's document iff i is before that document's end)."""
    hi = tl.minimum(keys + WINDOW, T)
    if HAS_DOCS:
        doc = _document(CU_SEQLENS, N_DOCS, SEARCH_STEPS, b * T + keys)
        hi = tl.minimum(hi, tl.load(CU_SEQLENS + doc + 1).to(tl.int32) - b * T)
    return hi


@triton.jit
def _visible(tok, lo, keys):
    """[rows, keys] mask: lo_i <= j <= i."""
    return (keys[None, :] >= lo[:, None]) & (keys[None, :] <= tok[:, None])


@triton.jit
def _key_tiles(t0, lo, ok, T, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    """The key tiles a query block [t0, t0 + BLOCK_T) visits, as bounds start <= mid_lo <= mid_hi <= end: tiles in
    [mid_lo, mid_hi) are seen whole by every query of the block (each tile starts at or after the largest lo_i and
    ends at or before t0), those outside need the mask. Padded rows (past T, past G) have no say: they only read
    zeros and store nothing, and tiles of the middle end at or before t0 < T."""
    end = tl.minimum(t0 + BLOCK_T, T)
    start = tl.min(tl.where(ok, lo, T), 0) // BLOCK_N * BLOCK_N
    mid_lo = tl.minimum(tl.cdiv(tl.max(tl.where(ok, lo, 0), 0), BLOCK_N) * BLOCK_N, end)
    mid_hi = tl.maximum(mid_lo, (t0 + 1) // BLOCK_N * BLOCK_N)
    return start, mid_lo, mid_hi, end


@triton.jit
def _query_tiles(n0, hi, key_ok, T, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    """The query tiles (of BLOCK_T tokens, aligned to BLOCK_T) that see some key of the block [n0, n0 + BLOCK_N),
    as bounds start <= mid_lo <= mid_hi <= end: every query of a tile in [mid_lo, mid_hi) sees every key of the
    block (the tile starts at or after the last key and ends before the smallest hi_j); the tiles outside, at the
    diagonal and where the window or a document ends, need the mask. Keys past T only hold zeros."""
    start = n0 // BLOCK_T * BLOCK_T
    end = tl.max(tl.where(key_ok, hi, 0), 0)
    mid_lo = tl.minimum(tl.cdiv(tl.minimum(n0 + BLOCK_N, T) - 1, BLOCK_T) * BLOCK_T, end)
    mid_hi = tl.maximum(mid_lo, tl.min(tl.where(key_ok, hi, T), 0) // BLOCK_T * BLOCK_T)
    return start, mid_lo, mid_hi, end


# ---------------------------------------------------------------------------------------------- forward

@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, tok, lo, d, d_ok, T, qk_scale, n_start, n_end,
               BLOCK_N: tl.constexpr, MASKED: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """Online softmax over the key tiles [n_start, n_end); MASKED tiles apply lo_i <= j <= i and j < T."""
    for n0 in range(n_start, n_end, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        kv_mask = (keys < T)[:, None] & d_ok[None, :] if MASKED else d_ok[None, :]
        k = tl.load(K + keys[:, None] * stride_kt + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + keys[:, None] * stride_vt + d[None, :], mask=kv_mask, other=0.0)
        s = mm(q, tl.trans(k), DOT_DTYPE) * qk_scale
        if MASKED:
            s = tl.where(_visible(tok, lo, keys), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + mm(p.to(v.dtype), v, DOT_DTYPE)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE, CU_SEQLENS,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh,
    T, Hq, WINDOW, N_DOCS, SEARCH_STEPS, qk_scale,
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
    lo = _first_key(tok, b, T, WINDOW, CU_SEQLENS, N_DOCS, SEARCH_STEPS, HAS_DOCS)
    K += b * stride_kb + kv_head * stride_kh
    V += b * stride_vb + kv_head * stride_vh

    m_i = tl.full([BLOCK_T * G_PAD], NEG_BIG, tl.float32)      # running max of the scores (log2 units)
    l_i = tl.zeros([BLOCK_T * G_PAD], tl.float32)              # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_T * G_PAD, D_PAD], tl.float32)
    start, mid_lo, mid_hi, end = _key_tiles(t0, lo, ok, T, BLOCK_T, BLOCK_N)
    tiles = (K, V, stride_kt, stride_vt, tok, lo, d, d_ok, T, qk_scale)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, *tiles, start, mid_lo, BLOCK_N, True, DOT_DTYPE)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, *tiles, mid_lo, mid_hi, BLOCK_N, False, DOT_DTYPE)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, *tiles, mid_hi, end, BLOCK_N, True, DOT_DTYPE)

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
def _query_tile(Q, DO, LSE, DELTA, b, tok, head, ok, T, Hq, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    """A query tile's q and dO (zeros on padded rows), its log-sum-exp in log2 units and delta = rowsum(O * dO),
    with the offsets and mask of its [rows, D] elements (where dQ is stored)."""
    d = tl.arange(0, D_PAD)
    q_mask = ok[:, None] & (d < HEAD_DIM)[None, :]
    q_offs = (b * T + tok[:, None]) * Hq * HEAD_DIM + head[:, None] * HEAD_DIM + d[None, :]
    q = tl.load(Q + q_offs, mask=q_mask, other=0.0)
    do = tl.load(DO + q_offs, mask=q_mask, other=0.0)
    lse = tl.load(LSE + (b * Hq + head) * T + tok, mask=ok, other=0.0) * LOG2E
    delta = tl.load(DELTA + (b * Hq + head) * T + tok, mask=ok, other=0.0)
    return q, do, lse, delta, q_offs, q_mask


@triton.jit
def _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, keys, hi, b, kv_head, T, Hq, qk_scale, t_start, t_end,
                G: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                BLOCK_T: tl.constexpr, MASKED: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """Accumulate a key block's dK, dV over the query tiles [t_start, t_end); MASKED tiles apply j <= i < hi_j.
    Rows past T or G read zeros (q, dO, lse, delta), so they add nothing even unmasked."""
    for t0 in range(t_start, t_end, BLOCK_T):
        tok, head, ok = _rows(t0, kv_head, T, G, G_PAD, BLOCK_T)
        q, do, lse, delta, _, _ = _query_tile(Q, DO, LSE, DELTA, b, tok, head, ok, T, Hq, HEAD_DIM, D_PAD)
        s_t = mm(k, tl.trans(q), DOT_DTYPE) * qk_scale                         # [keys, rows]
        p_t = tl.exp2(s_t - lse[None, :])
        if MASKED:
            visible_t = (tok[None, :] >= keys[:, None]) & (tok[None, :] < hi[:, None]) & ok[None, :]
            p_t = tl.where(visible_t, p_t, 0.0)
        dv += mm(p_t.to(do.dtype), do, DOT_DTYPE)
        dp_t = mm(v, tl.trans(do), DOT_DTYPE)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += mm(ds_t.to(q.dtype), q, DOT_DTYPE)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU_SEQLENS,
    T, Hq, Hkv, WINDOW, N_DOCS, SEARCH_STEPS, qk_scale, sm_scale,
    G: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DOCS: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """One program per (key block, batch row, KV head); q, k, v, dO contiguous [B, T, H, D]."""
    n0 = tl.program_id(0) * BLOCK_N
    b = tl.program_id(1)
    kv_head = tl.program_id(2)
    keys = n0 + tl.arange(0, BLOCK_N)
    d = tl.arange(0, D_PAD)
    key_ok = keys < T
    kv_mask = key_ok[:, None] & (d < HEAD_DIM)[None, :]
    kv_offs = (b * T + keys[:, None]) * Hkv * HEAD_DIM + kv_head * HEAD_DIM + d[None, :]
    k = tl.load(K + kv_offs, mask=kv_mask, other=0.0)
    v = tl.load(V + kv_offs, mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], tl.float32)

    hi = _query_end(keys, b, T, WINDOW, CU_SEQLENS, N_DOCS, SEARCH_STEPS, HAS_DOCS)
    start, mid_lo, mid_hi, end = _query_tiles(n0, hi, key_ok, T, BLOCK_T, BLOCK_N)
    dk, dv = _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, keys, hi, b, kv_head, T, Hq, qk_scale, start, mid_lo,
                         G, G_PAD, HEAD_DIM, D_PAD, BLOCK_T, True, DOT_DTYPE)
    dk, dv = _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, keys, hi, b, kv_head, T, Hq, qk_scale, mid_lo, mid_hi,
                         G, G_PAD, HEAD_DIM, D_PAD, BLOCK_T, False, DOT_DTYPE)
    dk, dv = _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, keys, hi, b, kv_head, T, Hq, qk_scale, mid_hi, end,
                         G, G_PAD, HEAD_DIM, D_PAD, BLOCK_T, True, DOT_DTYPE)
    tl.store(DK + kv_offs, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_offs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, K, V, tok, lo, ok, b, kv_head, T, Hkv, qk_scale, n_start, n_end,
              HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
              DOT_DTYPE: tl.constexpr):
    """Accumulate a query block's dQ over the key tiles [n_start, n_end); MASKED tiles apply lo_i <= j <= i < T."""
    d = tl.arange(0, D_PAD)
    d_ok = d < HEAD_DIM
    for n0 in range(n_start, n_end, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        kv_mask = (keys < T)[:, None] & d_ok[None, :] if MASKED else d_ok[None, :]
        kv_offs = (b * T + keys[:, None]) * Hkv * HEAD_DIM + kv_head * HEAD_DIM + d[None, :]
        k = tl.load(K + kv_offs, mask=kv_mask, other=0.0)
        v = tl.load(V + kv_offs, mask=kv_mask, other=0.0)
        s = mm(q, tl.trans(k), DOT_DTYPE) * qk_scale
        p = tl.exp2(s - lse[:, None])
        if MASKED:
            p = tl.where(_visible(tok, lo, keys) & ok[:, None], p, 0.0)
        dp = mm(do, tl.trans(v), DOT_DTYPE)
        ds = p * (dp - delta[:, None])
        dq += mm(ds.to(k.dtype), k, DOT_DTYPE)
    return dq


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, CU_SEQLENS,
    T, Hq, Hkv, WINDOW, N_DOCS, SEARCH_STEPS, qk_scale, sm_scale,
    G: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DOCS: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """One program per (query block, batch row, KV head), visiting the same key tiles as the forward. Rows past T
    or G read zeros (q, dO, lse, delta), so their dQ, never stored, is all the unmasked tiles give them."""
    t0 = tl.program_id(0) * BLOCK_T
    b = tl.program_id(1)
    kv_head = tl.program_id(2)
    tok, head, ok = _rows(t0, kv_head, T, G, G_PAD, BLOCK_T)
    q, do, lse, delta, q_offs, q_mask = _query_tile(Q, DO, LSE, DELTA, b, tok, head, ok, T, Hq, HEAD_DIM, D_PAD)
    lo = _first_key(tok, b, T, WINDOW, CU_SEQLENS, N_DOCS, SEARCH_STEPS, HAS_DOCS)
    dq = tl.zeros([BLOCK_T * G_PAD, D_PAD], tl.float32)
    start, mid_lo, mid_hi, end = _key_tiles(t0, lo, ok, T, BLOCK_T, BLOCK_N)
    dq = _dq_tiles(dq, q, do, lse, delta, K, V, tok, lo, ok, b, kv_head, T, Hkv, qk_scale, start, mid_lo,
                   HEAD_DIM, D_PAD, BLOCK_N, True, DOT_DTYPE)
    dq = _dq_tiles(dq, q, do, lse, delta, K, V, tok, lo, ok, b, kv_head, T, Hkv, qk_scale, mid_lo, mid_hi,
                   HEAD_DIM, D_PAD, BLOCK_N, False, DOT_DTYPE)
    dq = _dq_tiles(dq, q, do, lse, delta, K, V, tok, lo, ok, b, kv_head, T, Hkv, qk_scale, mid_hi, end,
                   HEAD_DIM, D_PAD, BLOCK_N, True, DOT_DTYPE)
    tl.store(DQ + q_offs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)


# ---------------------------------------------------------------------------------------------- launch

# Tiles per kernel on a GPU: (query rows = BLOCK_T * G_PAD, keys, warps, pipeline stages), by head dim (80 and 96
# take the 128 row: D_PAD = 128). Chosen from the sm_90 compile, which tests/test_kernel_attention.py checks: every
# wgmma is a full-width m64nN with each warpgroup on its own 64 rows of M (8 warps on a 64-row M had both
# warpgroups compute the same S and dP), and ptxas spills nothing but where said below. The forward and dQ
# programs own 128 query rows (M = rows) and loop over key tiles: 128 keys where the registers allow it (forward
# at D <= 64), 32 for dQ at D = 128, else 64. The dK/dV programs own 128 keys (M = keys) and loop over 64- or
# 32-row query tiles, FA2's split. dK/dV at D = 128 spills a few hundred bytes in every full-width tiling tried
# (64 or 128 keys, 16 to 64 rows, 1 or 2 stages: its two fp32 accumulators alone take half the registers);
# 32 x 128 spills least among those without the small-N wgmma of 16-row tiles.
_GPU_TILES = {
    "fwd": {64: (128, 128, 8, 3), 128: (128, 64, 8, 2)},
    "dq": {64: (128, 64, 8, 2), 128: (128, 32, 8, 2)},
    "dkdv": {64: (64, 128, 8, 2), 128: (32, 128, 8, 2)},
}


def _config(D: int, kernel: str, G_PAD: int):
    """BLOCK_T (tokens per query tile), BLOCK_N (keys per key tile) and launch options of `kernel` ("fwd", "dq" or
    "dkdv"). Under the interpreter the tiles are 16 x 16 so that tests cover many blocks cheaply."""
    rows, keys, warps, stages = (16, 16, 1, 1) if INTERPRET else _GPU_TILES[kernel][64 if D <= 64 else 128]
    return dict(BLOCK_T=max(1, rows // G_PAD), BLOCK_N=keys, num_warps=warps, num_stages=stages)


def _documents(cu_seqlens, like):
    """Kernel arguments for packed documents: cu_seqlens (a placeholder without), their count and the binary
    search's steps, ceil(log2(count)). Shapes only: nothing is read back from the device."""
    if cu_seqlens is None:
        return like.new_empty(0, dtype=torch.int32), 1, 0
    n_docs = cu_seqlens.numel() - 1
    return cu_seqlens, n_docs, (n_docs - 1).bit_length()


class FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, window, cu_seqlens):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        B, T, Hq, D = q.shape
        Hkv = k.shape[2]
        G = Hq // Hkv
        G_PAD = triton.next_power_of_2(G)
        cfg = _config(D, "fwd", G_PAD)
        window = T if window is None else min(window, T)
        cu, n_docs, search_steps = _documents(cu_seqlens, q)

        out = torch.empty_like(q)
        lse = torch.empty(B, Hq, T, device=q.device, dtype=torch.float32)
        sm_scale = D ** -0.5
        grid = (triton.cdiv(T, cfg["BLOCK_T"]), B, Hkv)
        _attn_fwd[grid](
            q, k, v, out, lse, cu,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            T, Hq, window, n_docs, search_steps, sm_scale * LOG2E.value,
            G=G, G_PAD=G_PAD, HEAD_DIM=D, D_PAD=max(16, triton.next_power_of_2(D)),
            HAS_DOCS=cu_seqlens is not None, DOT_DTYPE=dot_dtype(q.dtype), **cfg,
        )
        ctx.save_for_backward(q, k, v, out, lse, cu)
        ctx.window, ctx.has_docs, ctx.n_docs, ctx.search_steps = window, cu_seqlens is not None, n_docs, search_steps
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, cu = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        B, T, Hq, D = q.shape
        Hkv = k.shape[2]
        G = Hq // Hkv
        G_PAD = triton.next_power_of_2(G)
        D_PAD = max(16, triton.next_power_of_2(D))

        delta = torch.empty_like(lse)
        n_rows = B * T * Hq
        block_r = 16 if INTERPRET else 64
        _attn_bwd_delta[(triton.cdiv(n_rows, block_r),)](out, grad_out, delta, n_rows, T, Hq,
                                                         HEAD_DIM=D, D_PAD=D_PAD, BLOCK_R=block_r)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        sm_scale = D ** -0.5
        scalars = (T, Hq, Hkv, ctx.window, ctx.n_docs, ctx.search_steps, sm_scale * LOG2E.value, sm_scale)
        common = dict(G=G, G_PAD=G_PAD, HEAD_DIM=D, D_PAD=D_PAD, HAS_DOCS=ctx.has_docs, DOT_DTYPE=dot_dtype(q.dtype))
        cfg = _config(D, "dkdv", G_PAD)
        _attn_bwd_dkdv[(triton.cdiv(T, cfg["BLOCK_N"]), B, Hkv)](
            q, k, v, grad_out, lse, delta, dk, dv, cu, *scalars, **common, **cfg)
        cfg = _config(D, "dq", G_PAD)
        _attn_bwd_dq[(triton.cdiv(T, cfg["BLOCK_T"]), B, Hkv)](
            q, k, v, grad_out, lse, delta, dq, cu, *scalars, **common, **cfg)
        return dq, dk, dv, None, None


def attention(q, k, v, *, window=None, cu_seqlens=None, lse=False):
    """Causal grouped-query flash attention, the Triton twin of `reference.attention` (same arguments and
    results; inputs already checked by `cancerllm.kernels.attention`). Non-contiguous inputs are copied to
    contiguous ones. With `lse=True` also returns the natural-log log-sum-exp, [B, Hq, T] fp32."""
    check_triton_attention(q)
    out, logsumexp = FlashAttention.apply(q, k, v, window, cu_seqlens)
    return (out, logsumexp) if lse else out

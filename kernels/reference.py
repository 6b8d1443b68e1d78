"""Plain-PyTorch versions of every op: the CPU path and the test oracle of the Triton kernels.

Each computes in fp32 whatever the storage dtype (float64 stays float64, so tests can use it as the oracle),
and returns the input's dtype. Shapes and semantics are those of docs/design.md.
"""
import weakref

import torch
import torch.nn.functional as F

# A target that carries no loss (SFT prompt tokens, padding): PyTorch's and Hugging Face's value, used everywhere.
IGNORE_INDEX = -100


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------- attention

def document_ids(cu_seqlens: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Index of the document each of the flattened tokens belongs to."""
    idx = torch.arange(n_tokens, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens.to(torch.int64), idx, right=True) - 1


def attention_mask(B: int, T: int, *, window=None, cu_seqlens=None, device=None) -> torch.Tensor:
    """Boolean [B, T, T] mask, True where query i may attend key j: causal, Mistral window
    (i - W < j <= i), and never across a document boundary."""
    i = torch.arange(T, device=device)
    rel = i[:, None] - i[None, :]
    mask = rel >= 0
    if window is not None:
        mask = mask & (rel < window)
    mask = mask.expand(B, T, T)
    if cu_seqlens is not None:
        doc = document_ids(cu_seqlens, B * T).view(B, T)
        mask = mask & (doc[:, :, None] == doc[:, None, :])
    return mask


def segments(B: int, T: int, cu_seqlens) -> list[tuple[int, int]]:
    """(start, end) of every run of the flattened B*T tokens that attends only within itself: the documents of
    `cu_seqlens` cut at row ends (a row never attends to another), or the rows themselves."""
    bounds = set(range(0, B * T + 1, T))
    if cu_seqlens is not None:
        bounds.update(cu_seqlens.tolist())
    bounds = sorted(bounds)
    return [(s, e) for s, e in zip(bounds, bounds[1:]) if e > s]


_window_masks = weakref.WeakValueDictionary()   # window_mask's masks, for as long as something holds them


def window_mask(L: int, window: int, device, dtype) -> torch.Tensor:
    """Additive [L, L] mask of a causal window: 0 where i - W < j <= i, -inf elsewhere.

    SDPA keeps its mask for backward, and every layer of a forward asks for the same one: a mask is handed out
    again while it is alive, so backward holds one copy instead of one per layer and segment."""
    if torch.compiler.is_compiling():    # inside a compiled graph the mask is traced, not memoised
        return additive_window_mask(L, window, device, dtype)
    key = (L, window, str(device), dtype, torch.is_inference_mode_enabled())
    mask = _window_masks.get(key)
    if mask is None:
        mask = _window_masks[key] = additive_window_mask(L, window, device, dtype)
    return mask


def additive_window_mask(L: int, window: int, device, dtype) -> torch.Tensor:
    allowed = attention_mask(1, L, window=window, device=device)[0]
    return torch.zeros(L, L, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))


def attention(q, k, v, *, window=None, cu_seqlens=None, lse=False):
    """Causal grouped-query attention. q [B, T, Hq, D], k and v [B, T, Hkv, D] -> [B, T, Hq, D].

    K and V are used once per group of G = Hq / Hkv query heads instead of being copied G times (no
    repeat_kv). With `lse=True` also returns the natural-log log-sum-exp of the scaled scores, [B, Hq, T] in fp32,
    from an explicit masked softmax (the oracle the faster path is tested against).
    """
    B, T, Hq, D = q.shape
    dt = compute_dtype(q.dtype)
    if not lse:
        return attention_by_segment(q, k, v, window, cu_seqlens, dt)
    kt = k.to(dt).permute(0, 2, 1, 3)
    vt = v.to(dt).permute(0, 2, 1, 3)
    mask = attention_mask(B, T, window=window, cu_seqlens=cu_seqlens, device=q.device)[:, None]
    G = Hq // k.shape[2]
    qg = q.to(dt).permute(0, 2, 1, 3).reshape(B, -1, G * T, D)   # query head h = kv * G + g, folded into length
    mask = mask[:, :, None].expand(B, 1, G, T, T).reshape(B, 1, G * T, T)
    scores = (qg @ kt.transpose(-1, -2)) * D ** -0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    logsumexp = torch.logsumexp(scores, dim=-1, keepdim=True)
    out = (torch.exp(scores - logsumexp) @ vt).view(B, -1, G, T, D).reshape(B, Hq, T, D)
    return out.permute(0, 2, 1, 3).to(q.dtype), logsumexp.view(B, Hq, T).float()


def attention_by_segment(q, k, v, window, cu_seqlens, dt):
    """PyTorch's fused SDPA once per document (per row without documents), causal: no [B, T, T] mask to build or
    keep for backward, and no work on the key blocks another document or the causal order hides (the CPU kernel
    skips the upper triangle only with is_causal). Only a segment longer than the window needs a mask."""
    B, T, Hq, D = q.shape
    if cu_seqlens is None:                                          # whole rows: one call
        mask = None if window is None or T <= window else window_mask(T, window, q.device, dt)
        out = F.scaled_dot_product_attention(*(t.to(dt).transpose(1, 2) for t in (q, k, v)), attn_mask=mask,
                                             is_causal=mask is None, enable_gqa=True)
        return out.transpose(1, 2).to(q.dtype)
    qf, kf, vf = (t.reshape(B * T, t.shape[2], D).to(dt) for t in (q, k, v))
    outs = []
    for s, e in segments(B, T, cu_seqlens):
        qs, ks, vs = (t[s:e].transpose(0, 1)[None] for t in (qf, kf, vf))
        if window is None or e - s <= window:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
        else:
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=window_mask(e - s, window, q.device, dt),
                                               enable_gqa=True)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs).view(B, T, Hq, D).to(q.dtype)


# ---------------------------------------------------------------------------------------------- RMSNorm

class RMSNormFunction(torch.autograd.Function):
    """RMSNorm that keeps only its input (x, or h = x + residual) and the per-row 1/rms for backward; autograd
    through pow/mean/rsqrt/mul would keep several full-size fp32 intermediates per norm."""

    @staticmethod
    def forward(ctx, x, weight, eps, residual):
        h = x if residual is None else x + residual
        hf = h.to(compute_dtype(h.dtype))
        rstd = torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
        y = (hf * rstd * weight.to(hf.dtype)).to(h.dtype)
        ctx.save_for_backward(h, weight, rstd)
        ctx.has_residual = residual is not None
        return (y, h) if ctx.has_residual else y

    @staticmethod
    def backward(ctx, grad_y, grad_h=None):
        h, weight, rstd = ctx.saved_tensors
        dt = rstd.dtype
        xhat = h.to(dt) * rstd
        grad_xhat = grad_y.to(dt) * weight.to(dt)
        grad_weight = (grad_y.to(dt) * xhat).flatten(0, -2).sum(0).to(weight.dtype)
        # d xhat / d h: rstd * (g - xhat * mean(g * xhat)), the projection off the normalised direction.
        grad_in = rstd * (grad_xhat - xhat * (grad_xhat * xhat).mean(-1, keepdim=True))
        if grad_h is not None:
            grad_in += grad_h.to(dt)
        grad_in = grad_in.to(h.dtype)
        return grad_in, grad_weight, None, grad_in if ctx.has_residual else None


def rms_norm(x, weight, eps=1e-5, residual=None):
    """y = x / rms(x) * weight over the last axis; with `residual`, h = x + residual is normalised and
    (y, h) returned, so the caller carries h on as the new residual stream."""
    return RMSNormFunction.apply(x, weight, eps, residual)


# ---------------------------------------------------------------------------------------------- SwiGLU

class SwiGLUFunction(torch.autograd.Function):
    """silu(gate) * up keeping only gate and up for backward; silu(gate) and sigmoid(gate) are recomputed."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        dt = compute_dtype(gate.dtype)
        return F.silu(gate.to(dt)).mul_(up.to(dt)).to(gate.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        gate, up = ctx.saved_tensors
        dt = compute_dtype(gate.dtype)
        g, u, dy = gate.to(dt), up.to(dt), grad_out.to(dt)
        sig = torch.sigmoid(g)
        silu = g * sig
        grad_up = (dy * silu).to(up.dtype)
        # silu'(g) = sig * (1 + g * (1 - sig)) = sig + silu * (1 - sig)
        grad_gate = (dy * u * (sig + silu * (1 - sig))).to(gate.dtype)
        return grad_gate, grad_up


def swiglu(gate, up):
    """silu(gate) * up, elementwise (the SwiGLU feed-forward's activation)."""
    return SwiGLUFunction.apply(gate, up)


# ---------------------------------------------------------------------------------------------- cross-entropy

def cross_entropy(logits, targets, *, ignore_index=IGNORE_INDEX, reduction="mean", z_loss=0.0):
    """Token cross-entropy over logits [N, V] in fp32. "mean" divides by the number of non-ignored targets
    (0 when there are none, with zero gradient). `z_loss` adds z_loss * logsumexp(logits)^2 per token."""
    lf = logits.to(compute_dtype(logits.dtype))
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, 0)
    lse = torch.logsumexp(lf, dim=-1)
    loss = lse - lf.gather(1, safe_targets[:, None]).squeeze(1)
    if z_loss:
        loss = loss + z_loss * lse.pow(2)
    loss = torch.where(valid, loss, 0.0)
    return reduce_loss(loss, valid, reduction)


def reduce_loss(loss, valid, reduction):
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / valid.sum().clamp(min=1)
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def loss_row_weights(targets, ignore_index, reduction, token_weights, dtype):
    """(each token's weight in the loss's sum, in `dtype`: 1 or its token weight, 0 where its target is ignored;
    the reduction's scale: 1 / their sum for "mean", 1 when that sum is 0 or for "sum")."""
    valid = targets != ignore_index
    row_weight = valid.to(dtype) if token_weights is None else torch.where(valid, token_weights.to(dtype), 0.0)
    denom = row_weight.sum()
    scale = (1.0 / torch.where(denom > 0, denom, 1.0) if reduction == "mean"
             else torch.ones((), dtype=dtype, device=targets.device))
    return row_weight, scale


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """cross_entropy(hidden @ weight.T, targets) a chunk of tokens at a time: the [N, V] logits never exist,
    only [chunk, V]. Gradients are computed in the forward pass (accumulated in fp32), so backward is a scale."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, reduction, chunk_size, token_weights):
        dt = compute_dtype(hidden.dtype)
        w = weight.to(dt)
        valid = targets != ignore_index
        row_weight, scale = loss_row_weights(targets, ignore_index, reduction, token_weights, dt)
        total = torch.zeros((), dtype=dt, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=dt)
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start:start + chunk_size].to(dt)
            t = targets[start:start + chunk_size]
            safe = torch.where(valid[start:start + chunk_size], t, 0)
            logits = h @ w.T
            target_logit = logits.gather(1, safe[:, None]).squeeze(1)
            # The softmax in place over the chunk's logits (logsumexp would allocate a second [chunk, V] buffer):
            # exp(logits - max), then its row sums give lse = max + log(sum).
            row_max = logits.amax(-1, keepdim=True)
            probs = logits.sub_(row_max).exp_()
            row_sum = probs.sum(-1, keepdim=True)
            lse = (row_sum.log() + row_max).squeeze(1)
            row_scale = row_weight[start:start + chunk_size] * scale
            total += (row_weight[start:start + chunk_size] * (lse - target_logit)).sum()
            # d loss / d logits = (softmax - onehot) * row scale, the row scale being 0 on ignored rows.
            grad_logits = probs.mul_(row_scale[:, None] / row_sum)
            grad_logits[torch.arange(len(t), device=t.device), safe] -= row_scale
            grad_hidden[start:start + chunk_size] = (grad_logits @ w).to(hidden.dtype)
            grad_weight.addmm_(grad_logits.T, h)
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return (total * scale).to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_output, grad_weight * grad_output, None, None, None, None, None


def linear_cross_entropy(hidden, weight, targets, *, ignore_index=IGNORE_INDEX, reduction="mean", chunk_size=512,
                         token_weights=None):
    """Equals cross_entropy(hidden @ weight.T, targets) without holding the [N, V] logits.
    hidden [N, D], weight [V, D], targets [N]; reduction "mean" or "sum". With token_weights [N], token i's loss
    counts token_weights[i] times: "sum" = sum(w * loss), "mean" = sum(w * loss) / sum(w), over non-ignored
    tokens (0 when that weight is 0)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"linear_cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}")
    return ChunkedLinearCrossEntropy.apply(hidden, weight, targets, ignore_index, reduction, chunk_size,
                                           token_weights)

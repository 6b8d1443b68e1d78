"""Cross-entropy over [N, V] logits in Triton, with the gradient computed in the forward pass.

One program per row makes two passes over the vocabulary in BLOCK_V chunks, in fp32 whatever the storage dtype:
an online max / sum-of-exponentials gives lse = logsumexp(logits), then the gradient
    d loss / d logits = softmax * (1 + 2 * z_loss * lse) - onehot(target)
is written, scaled by 1 / (number of non-ignored targets) for the mean, and by the row's weight when rows are
weighted (the fused linear cross-entropy's `token_weights`). Ignored rows get loss 0 and gradient 0; when every
row is ignored the mean is 0 (no 0 / 0). The backward is then a multiplication by the incoming
gradient, in place. The gradient may overwrite the logits (`grad` is `logits`): the fused linear cross-entropy does
so for the logits chunks it owns, and `cross_entropy(..., inplace_backward=True)` for the caller's logits, saving
the [N, V] gradient tensor.
"""
import torch
import triton
import triton.language as tl

from .reference import IGNORE_INDEX, reduce_loss
from .triton_utils import INTERPRET


@triton.jit
def row_grad_scale(row, valid, DENOM, WEIGHTS, MEAN: tl.constexpr, WEIGHTED: tl.constexpr):
    """d(reduced loss) / d(the row's loss): 0 on an ignored row, else its weight (1 unweighted), over the
    denominator for the mean. Shared with the fused linear cross-entropy's weight-gradient pass."""
    scale = tl.where(valid, 1.0, 0.0)
    if WEIGHTED:
        scale = scale * tl.load(WEIGHTS + row).to(tl.float32)
    if MEAN:
        scale = scale / tl.load(DENOM).to(tl.float32)
    return scale


@triton.jit
def softmax_grad(x, cols, target, lse, softmax_scale, scale):
    """d loss / d logits at columns `cols` of a row: softmax * softmax_scale - onehot(target) * scale."""
    return tl.exp(x - lse) * softmax_scale - tl.where(cols == target, scale, 0.0)


@triton.jit
def _cross_entropy_fwd(
    LOGITS, GRAD, TARGETS, LOSS, LSE, DENOM, WEIGHTS, stride_row, stride_grad_row, V, ignore_index, z_loss,
    MEAN: tl.constexpr, WEIGHTED: tl.constexpr, COMPUTE_GRAD: tl.constexpr, STORE_LSE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    LOGITS += row * stride_row
    GRAD += row * stride_grad_row
    target = tl.load(TARGETS + row)
    valid = target != ignore_index
    cols = tl.arange(0, BLOCK_V)

    m = float("-inf")
    s = 0.0
    for v0 in range(0, V, BLOCK_V):
        x = tl.load(LOGITS + v0 + cols, mask=v0 + cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    lse = m + tl.log(s)
    if STORE_LSE:
        tl.store(LSE + row, lse)
    target_logit = tl.load(LOGITS + tl.where(valid, target, 0)).to(tl.float32)
    loss = lse - target_logit + z_loss * lse * lse
    tl.store(LOSS + row, tl.where(valid, loss, 0.0))

    if COMPUTE_GRAD:
        scale = row_grad_scale(row, valid, DENOM, WEIGHTS, MEAN, WEIGHTED)
        softmax_scale = scale * (1.0 + 2.0 * z_loss * lse)
        for v0 in range(0, V, BLOCK_V):
            mask = v0 + cols < V
            x = tl.load(LOGITS + v0 + cols, mask=mask, other=0.0).to(tl.float32)
            grad = softmax_grad(x, v0 + cols, target, lse, softmax_scale, scale)
            tl.store(GRAD + v0 + cols, grad.to(GRAD.dtype.element_ty), mask=mask)


def cross_entropy_rows(logits, targets, denom, *, ignore_index, z_loss=0.0, mean_grad=True, grad=None,
                       weights=None, lse=None):
    """Per-row losses [N] (fp32, 0 on ignored rows, unweighted); when `grad` ([N, V], may be `logits` itself) is
    given, fills it with d(sum of losses)/d logits, or d(sum of losses / denom)/d logits with `mean_grad`, denom
    being a positive 0-d tensor; with `weights` [N] (fp32), row i's loss counts weights[i] times in those sums.
    When `lse` ([N] fp32) is given, it receives each row's logsumexp (ignored rows too)."""
    N, V = logits.shape
    loss = torch.empty(N, device=logits.device, dtype=torch.float32)
    block_v = min(triton.next_power_of_2(V), 1024 if INTERPRET else 8192)
    _cross_entropy_fwd[(N,)](
        logits, logits if grad is None else grad, targets, loss, loss if lse is None else lse, denom,
        loss if weights is None else weights, logits.stride(0), logits.stride(0) if grad is None else grad.stride(0),
        V, ignore_index, z_loss, MEAN=mean_grad, WEIGHTED=weights is not None, COMPUTE_GRAD=grad is not None,
        STORE_LSE=lse is not None, BLOCK_V=block_v,
        num_warps=1 if INTERPRET else 16 if block_v >= 8192 else 8,
    )
    return loss


def _row_major(t):
    """Logits with unit stride along the vocabulary; rows may be strided (a slice of a larger tensor)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def scale_in_place(grad, grad_output):
    """grad *= grad_output (a 0-d tensor, or [N] for per-row losses), without a new tensor. The multiply is not
    skipped when grad_output is 1 (a plain loss.backward()): knowing that means reading grad_output on the host,
    a device sync that stalls the stream for longer than this bandwidth-bound pass takes."""
    return grad.mul_(grad_output[:, None] if grad_output.dim() == 1 else grad_output)


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index, reduction, z_loss, inplace_backward):
        logits = _row_major(logits)
        targets = targets.contiguous()
        n_valid = (targets != ignore_index).sum().clamp(min=1)
        grad = None
        if ctx.needs_input_grad[0]:
            grad = logits.detach() if inplace_backward else torch.empty_like(logits)
        loss = cross_entropy_rows(logits, targets, n_valid, ignore_index=ignore_index, z_loss=z_loss,
                                  mean_grad=reduction == "mean", grad=grad)
        if inplace_backward and grad is not None:
            # Autograd cannot see the kernel's write: bump the logits' version, so that a backward which saved
            # them (say, exp's output) raises instead of reading gradients as logits.
            torch.autograd.graph.increment_version(logits)
        ctx.save_for_backward(grad)
        return reduce_loss(loss, targets != ignore_index, reduction)

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return scale_in_place(grad, grad_output), None, None, None, None, None


def cross_entropy(logits, targets, *, ignore_index=IGNORE_INDEX, reduction="mean", z_loss=0.0, inplace_backward=False):
    """The Triton twin of `reference.cross_entropy` (inputs already checked by `cancerllm.kernels`); logits whose
    vocabulary axis is strided are copied to contiguous ones, strided rows are read in place.
    inplace_backward=True writes d loss / d logits over the logits (when they require grad and have unit vocabulary
    stride): no [N, V] gradient is allocated, and the logits hold the gradient from this call on. The gradient is
    scaled in place in backward, so a second backward through the same graph is refused by autograd."""
    return CrossEntropyFunction.apply(logits, targets, ignore_index, reduction, float(z_loss), inplace_backward)

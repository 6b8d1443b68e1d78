"""Fused linear cross-entropy: cross_entropy(hidden @ weight.T, targets) without ever holding the [N, V] logits.

The tokens are processed a chunk at a time (Liger-Kernel's design): the chunk's logits come from a torch matmul,
the Triton cross-entropy kernel turns them in place into d loss / d logits, and two more matmuls give the chunk's
share of the gradients w.r.t. hidden (written once) and weight (accumulated in fp32 across chunks). Everything is
done in the forward pass; the backward scales the stored gradients. Peak extra memory: one [chunk, V] logits
buffer in the storage dtype, the fp32 weight-gradient accumulator and the [N, D] hidden gradient.

With `token_weights`, token i's loss counts token_weights[i] times: "sum" is sum(w * loss) and "mean" is
sum(w * loss) / sum(w) over the non-ignored tokens (torch's weighted-mean convention), which with w = 1 / (the
example's loss tokens) makes every example count once whatever its answer's length.
"""
import torch

from .cross_entropy import cross_entropy_rows


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, reduction, chunk_size, token_weights):
        hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
        N = hidden.shape[0]
        valid = targets != ignore_index
        if token_weights is not None:
            token_weights = torch.where(valid, token_weights.float(), 0.0).contiguous()
        denom = valid.sum() if token_weights is None else token_weights.sum()
        denom = torch.where(denom > 0, denom, 1).float()     # nothing to average: the mean is 0, not 0 / 0
        need_hidden_grad, need_weight_grad = ctx.needs_input_grad[:2]
        need_grad = need_hidden_grad or need_weight_grad
        grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight_grad else None
        loss = torch.empty(N, device=hidden.device, dtype=torch.float32)
        for start in range(0, N, chunk_size):
            h = hidden[start:start + chunk_size]
            logits = h @ weight.T
            rows = slice(start, start + chunk_size)
            loss[rows] = cross_entropy_rows(
                logits, targets[rows], denom, ignore_index=ignore_index, mean_grad=reduction == "mean",
                grad=logits if need_grad else None, weights=None if token_weights is None else token_weights[rows])
            if need_hidden_grad:
                torch.mm(logits, weight, out=grad_hidden[rows])
            if need_weight_grad:
                grad_weight += (logits.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        total = loss.sum() if token_weights is None else (loss * token_weights).sum()
        total = total / denom if reduction == "mean" else total
        return total.to(hidden.dtype)      # the reference's result dtype

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_output).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def linear_cross_entropy(hidden, weight, targets, *, ignore_index=-100, reduction="mean", chunk_size=1024,
                         token_weights=None):
    """The Triton twin of `reference.linear_cross_entropy` (inputs already checked by `cancerllm.kernels`;
    non-contiguous ones are copied). hidden [N, D], weight [V, D], targets [N], token_weights None or [N];
    reduction "mean" or "sum"."""
    return LinearCrossEntropyFunction.apply(hidden, weight, targets, ignore_index, reduction, chunk_size,
                                            token_weights)

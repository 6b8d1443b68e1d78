"""Fused linear cross-entropy: cross_entropy(hidden @ weight.T, targets) without ever holding the [N, V] logits.

The tokens are processed a chunk at a time (Liger-Kernel's design): the chunk's logits come from a torch matmul,
the Triton cross-entropy kernel turns them in place into d loss / d logits, and two more matmuls give the chunk's
share of the gradients w.r.t. hidden (written once) and weight (accumulated in fp32 across chunks). Everything is
done in the forward pass; the backward scales the stored gradients. Peak extra memory: one [chunk, V] logits
buffer in the storage dtype, the fp32 weight-gradient accumulator and the [N, D] hidden gradient.
"""
import torch

from .cross_entropy import cross_entropy_rows


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, reduction, chunk_size):
        hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
        N = hidden.shape[0]
        valid = targets != ignore_index
        n_valid = valid.sum()
        need_hidden_grad, need_weight_grad = ctx.needs_input_grad[:2]
        need_grad = need_hidden_grad or need_weight_grad
        grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight_grad else None
        loss = torch.empty(N, device=hidden.device, dtype=torch.float32)
        for start in range(0, N, chunk_size):
            h = hidden[start:start + chunk_size]
            logits = h @ weight.T
            loss[start:start + chunk_size] = cross_entropy_rows(
                logits, targets[start:start + chunk_size], n_valid, ignore_index=ignore_index,
                mean_grad=reduction == "mean", grad=logits if need_grad else None)
            if need_hidden_grad:
                torch.mm(logits, weight, out=grad_hidden[start:start + chunk_size])
            if need_weight_grad:
                grad_weight += (logits.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        total = loss.sum() / n_valid.clamp(min=1) if reduction == "mean" else loss.sum()
        return total.to(hidden.dtype)      # the reference's result dtype

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_output).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


def linear_cross_entropy(hidden, weight, targets, *, ignore_index=-100, reduction="mean", chunk_size=1024):
    """The Triton twin of `reference.linear_cross_entropy` (inputs already checked by `cancerllm.kernels`;
    non-contiguous ones are copied). hidden [N, D], weight [V, D], targets [N]; reduction "mean" or "sum"."""
    return LinearCrossEntropyFunction.apply(hidden, weight, targets, ignore_index, reduction, chunk_size)

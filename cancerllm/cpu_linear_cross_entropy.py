"""Fused linear cross-entropy on CPU: cross_entropy(hidden @ weight.T, targets) with the output head's three matmuls
in the inputs' own dtype (bf16 on AMX runs at several times fp32's rate) and the softmax in one C++ pass per chunk of
rows (csrc/cross_entropy.cpp), fp32 inside.

    loss = linear_cross_entropy(hidden, weight, targets)   # kernels.linear_cross_entropy's CPU path (fp32, bf16)

Forward, `chunk_size` tokens at a time through one reused logits buffer (extension.scratch): logits = h @ W^T in the
inputs' dtype (the matmul sums in fp32 and rounds once); the C++ pass reads each row once into fp32, writes its loss
and turns the row in place into d loss / d logits, rounded to that dtype; grad_hidden = dlogits @ W and
grad_weight = dlogits^T h, two more matmuls, each only when its input needs it (a LoRA step's head is frozen: its
[V, D] gradient was a third of the head's work, thrown away). The gradients are computed here, as in the reference
and Liger-Kernel, so backward is a scale (none when grad_output is 1, as a step's loss usually is).

In bf16 the logits and their gradient are rounded to bf16 before the softmax and before the two gradient matmuls, as
Liger-Kernel and a model run under torch.autocast do; the reference (kernels.reference.ChunkedLinearCrossEntropy)
instead upcasts the head's weight and runs all three matmuls in fp32, ~3x the time at SmolLM2's 49k vocabulary
(docs/experiments.md, 2026-12-01), and is what this is tested against. With more than one chunk, grad_weight's
per-chunk parts (each rounded once by its matmul) are summed in an fp32 [V, D] accumulator, not in bf16 one chunk
after another as Liger-Kernel's addmm_ does.
"""
import torch

from .extension import FLOATS, check_cpu_tensor, native, scratch
from .kernels.reference import IGNORE_INDEX, loss_row_weights

OP = "cross_entropy_rows"


def usable(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether hidden and weight go through here: CPU, one dtype of fp32 or bf16, extension built with the pass."""
    return (hidden.device.type == "cpu" and hidden.dtype in FLOATS and weight.dtype == hidden.dtype
            and native(OP) is not None)


def loss_rows(logits: torch.Tensor, targets: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
    """Each row's cross-entropy (fp32) of logits [n, V]; the logits become row_scale[r] * (softmax - onehot) in
    place. targets [n] int64 within [0, V), row_scale [n] fp32."""
    check_cpu_tensor("linear_cross_entropy", "logits", logits, dtypes=tuple(FLOATS))
    check_cpu_tensor("linear_cross_entropy", "targets", targets, dtypes=(torch.int64,))
    check_cpu_tensor("linear_cross_entropy", "row_scale", row_scale, dtypes=(torch.float32,))
    n, V = logits.shape
    losses = torch.empty(n, dtype=torch.float32)
    native(OP).cross_entropy_rows(logits.data_ptr(), FLOATS[logits.dtype], targets.data_ptr(),
                                  row_scale.data_ptr(), losses.data_ptr(), n, V, torch.get_num_threads())
    return losses


class CPULinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, reduction, chunk_size, token_weights):
        hidden, weight = hidden.contiguous(), weight.contiguous()
        need_hidden_grad, need_weight_grad = ctx.needs_input_grad[:2]
        row_weight, scale = loss_row_weights(targets, ignore_index, reduction, token_weights, torch.float32)
        row_scale = (row_weight * scale).contiguous()
        safe_targets = torch.where(targets != ignore_index, targets, 0).long().contiguous()
        losses, grad_hidden, grad_weight = [], torch.empty_like(hidden) if need_hidden_grad else None, None
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            h = hidden[rows]
            logits = torch.mm(h, weight.T, out=scratch("head logits", (h.shape[0], weight.shape[0]), hidden.dtype))
            losses.append(loss_rows(logits, safe_targets[rows], row_scale[rows]))
            if need_hidden_grad:
                torch.mm(logits, weight, out=grad_hidden[rows])
            if not need_weight_grad:   # a frozen head (LoRA): its [V, D] gradient would be a third of the head's work
                continue
            part = logits.T @ h
            if grad_weight is None:
                grad_weight = part
            else:                           # a second chunk: sum the parts in fp32 (a no-op cast in fp32)
                grad_weight = grad_weight.float().add_(part)
        if need_weight_grad:
            grad_weight = torch.zeros_like(weight) if grad_weight is None else grad_weight.to(weight.dtype)
        total = (row_weight * torch.cat(losses)).sum() * scale if losses else torch.zeros(())
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total.to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        if float(grad_output) != 1.0:    # a [V, D] product is a full pass over the head: skip it when it is 1
            grad_hidden = None if grad_hidden is None else grad_hidden * grad_output
            grad_weight = None if grad_weight is None else grad_weight * grad_output
        return grad_hidden, grad_weight, None, None, None, None, None


def linear_cross_entropy(hidden, weight, targets, *, ignore_index=IGNORE_INDEX, reduction="mean", chunk_size=512,
                         token_weights=None):
    """cross_entropy(hidden @ weight.T, targets) for CPU fp32/bf16 hidden [N, D] and weight [V, D] of one dtype
    (kernels.linear_cross_entropy checks its arguments first); reduction "mean" or "sum", token_weights as there.
    Only the gradients autograd will ask for are computed: none under torch.no_grad (an evaluation's loss), no
    grad_weight for a frozen head."""
    if not torch.is_grad_enabled():   # Function.forward sees needs_input_grad from requires_grad alone
        hidden, weight = hidden.detach(), weight.detach()
    return CPULinearCrossEntropy.apply(hidden, weight, targets, ignore_index, reduction, chunk_size, token_weights)

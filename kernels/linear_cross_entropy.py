"""Fused linear cross-entropy: cross_entropy(hidden @ weight.T, targets) without ever holding the [N, V] logits.

Two passes over the output head, each through one reused logits buffer:
  forward, `chunk_size` tokens at a time (Liger-Kernel's design): logits[chunk, V] = hidden[chunk] @ weight.T
    (torch); the Triton cross-entropy kernel gives each token's loss and logsumexp (lse, kept for backward) and
    turns the logits in place into dlogits = d loss / d logits; grad_hidden[chunk] = dlogits @ weight, written once.
  backward, for grad_weight, Vc rows of weight at a time: logits[N, Vc] = hidden @ weight[v0:v1].T again; a Triton
    kernel turns them in place into grad_output * dlogits from the saved lse; grad_weight[v0:v1] = dlogits.T @ hidden
    is one torch matmul over all N tokens.
That last matmul sums all tokens in fp32 inside cuBLAS and rounds once to the storage dtype (unless cuBLAS splits K
and reduces the parts in bf16, which torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = True,
torch's default, permits): fp32 accumulation without the [V, D] fp32 accumulator a token-chunked grad_weight needs
(V*D*4 bytes, alone 0.33x of the naive peak below) and without a bf16 rounding per token chunk (Liger's choice).
The price is the head's logits matmul done twice: four N*V*D matmuls instead of three, +33% of the head's FLOPs
(~2% of a 7B training step).
Vc keeps the backward's [N, Vc] buffer no larger than the forward's [chunk, V] one: chunk * V / N, rounded down to
a multiple of 128 (whole matmul tiles), at least 128.

Peak extra memory, bf16 at N=8192 tokens, V=32000, D=4096, 512-token chunks (Vc = 1920; MB = 1e6 bytes):
    forward    logits chunk 512*V*2 32.8 + grad_hidden N*D*2 67.1 + loss, lse N*4 each 0.1       99.9 MB
    backward   grad_hidden 67.1 + grad_weight V*D*2 262.1 + logits N*Vc*2 31.5 + lse, loss 0.1  360.8 MB
The naive F.cross_entropy(hidden @ weight.T) forward + backward peaks in backward at three [N, V] bf16 tensors
(log-softmax saved, nll gradient, log-softmax gradient: 3 * 524.3 = 1572.9 MB); its grad_hidden and grad_weight
come after, next to the one [N, V] gradient left (524.3 + 67.1 + 262.1 = 853.5 MB). Counting both sides' gradients:
360.8 / 1572.9 = 0.23x (the fp32-accumulator design was 0.54x).
When the dispatcher drops ignored rows, its copy of the kept rows (at most N*D*2, 67.1 MB) is held until backward
when weight needs grad (the backward reads it): at most 427.9 MB, 0.27x, when nearly every row is kept.

With `token_weights`, token i's loss counts token_weights[i] times: "sum" is sum(w * loss) and "mean" is
sum(w * loss) / sum(w) over the non-ignored tokens (torch's weighted-mean convention), which with w = 1 / (the
example's loss tokens) makes every example count once whatever its answer's length.
"""
import torch
import triton
import triton.language as tl

from .cross_entropy import cross_entropy_rows, row_grad_scale, scale_in_place, softmax_grad
from .reference import IGNORE_INDEX
from .triton_utils import INTERPRET

# [rows, columns] per program of the backward's elementwise kernel: 8 bf16 per thread and row at 4 warps (16-byte
# loads and stores) on a GPU; few, large programs under the interpreter, whose cost is per program.
GRAD_TILE = (64, 1024) if INTERPRET else (8, 1024)


@triton.jit
def _logits_to_grad(
    LOGITS, TARGETS, LSE, DENOM, WEIGHTS, GRAD_OUTPUT, N, V, v0, ignore_index,
    MEAN: tl.constexpr, WEIGHTED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """LOGITS [N, V], contiguous, holding columns v0 .. v0 + V of the logits, become grad_output * d loss / d logits
    in place, from each row's lse; one program per [BLOCK_N, BLOCK_V] tile."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = (rows[:, None] < N) & (cols[None, :] < V)
    row = tl.minimum(rows, N - 1).to(tl.int64)      # rows past N read row N - 1's values and store nothing
    target = tl.load(TARGETS + row)
    # grad_output is folded in here, in fp32, so that grad_weight is rounded once, by its matmul.
    scale = row_grad_scale(row, target != ignore_index, DENOM, WEIGHTS, MEAN, WEIGHTED)
    scale = scale * tl.load(GRAD_OUTPUT).to(tl.float32)
    ptrs = LOGITS + row[:, None] * V + cols[None, :]
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    grad = softmax_grad(x, v0 + cols[None, :], target[:, None], tl.load(LSE + row)[:, None], scale[:, None],
                        scale[:, None])
    tl.store(ptrs, grad.to(LOGITS.dtype.element_ty), mask=mask)


def vocabulary_chunk(N, V, chunk_size):
    """Rows of weight per backward step: the [N, Vc] logits are no larger than the forward's [chunk_size, V]."""
    if N <= chunk_size:
        return V
    return min(V, max(128, chunk_size * V // N // 128 * 128))


def weight_gradient(hidden, weight, targets, lse, denom, token_weights, grad_output, ignore_index, mean, chunk_size):
    """grad_output * d loss / d weight, Vc rows at a time, each a single matmul over all N tokens."""
    N, V = hidden.shape[0], weight.shape[0]
    grad_weight = torch.empty_like(weight)
    step = vocabulary_chunk(N, V, chunk_size)
    buffer = hidden.new_empty(N * step)      # flat, so that the last, narrower chunk is contiguous too
    for v0 in range(0, V, step):
        w = weight[v0:v0 + step]
        logits = torch.mm(hidden, w.T, out=buffer[:N * w.shape[0]].view(N, w.shape[0]))
        _logits_to_grad[(triton.cdiv(N, GRAD_TILE[0]), triton.cdiv(w.shape[0], GRAD_TILE[1]))](
            logits, targets, lse, denom, lse if token_weights is None else token_weights, grad_output, N, w.shape[0],
            v0, ignore_index, MEAN=mean, WEIGHTED=token_weights is not None, BLOCK_N=GRAD_TILE[0],
            BLOCK_V=GRAD_TILE[1], num_warps=1 if INTERPRET else 4,
        )
        torch.mm(logits.T, hidden, out=grad_weight[v0:v0 + step])
    return grad_weight


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, reduction, chunk_size, token_weights):
        hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
        N, V = hidden.shape[0], weight.shape[0]
        valid = targets != ignore_index
        if token_weights is not None:
            token_weights = torch.where(valid, token_weights.float(), 0.0).contiguous()
        denom = valid.sum() if token_weights is None else token_weights.sum()
        denom = torch.where(denom > 0, denom, 1).float()     # nothing to average: the mean is 0, not 0 / 0
        need_hidden_grad, need_weight_grad = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
        lse = torch.empty(N, device=hidden.device, dtype=torch.float32) if need_weight_grad else None
        loss = torch.empty(N, device=hidden.device, dtype=torch.float32)
        logits_buffer = hidden.new_empty(min(chunk_size, N), V)
        for start in range(0, N, chunk_size):
            rows = slice(start, start + chunk_size)
            h = hidden[rows]
            logits = torch.mm(h, weight.T, out=logits_buffer[:h.shape[0]])
            loss[rows] = cross_entropy_rows(
                logits, targets[rows], denom, ignore_index=ignore_index, mean_grad=reduction == "mean",
                grad=logits if need_hidden_grad else None, lse=None if lse is None else lse[rows],
                weights=None if token_weights is None else token_weights[rows])
            if need_hidden_grad:
                torch.mm(logits, weight, out=grad_hidden[rows])
        for_weight = (hidden, weight, targets, lse, denom, token_weights) if need_weight_grad else (None,) * 6
        ctx.save_for_backward(grad_hidden, *for_weight)
        ctx.options = ignore_index, reduction == "mean", chunk_size
        total = loss.sum() if token_weights is None else (loss * token_weights).sum()
        total = total / denom if reduction == "mean" else total
        return total.to(hidden.dtype)      # the reference's result dtype

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, hidden, weight, targets, lse, denom, token_weights = ctx.saved_tensors
        if grad_hidden is not None:
            scale_in_place(grad_hidden, grad_output)
        grad_weight = None
        if lse is not None:
            grad_weight = weight_gradient(hidden, weight, targets, lse, denom, token_weights, grad_output,
                                          *ctx.options)
        return grad_hidden, grad_weight, None, None, None, None, None


def linear_cross_entropy(hidden, weight, targets, *, ignore_index=IGNORE_INDEX, reduction="mean", chunk_size=512,
                         token_weights=None):
    """The Triton twin of `reference.linear_cross_entropy` (inputs already checked by `cancerllm.kernels`;
    non-contiguous ones are copied). hidden [N, D], weight [V, D], targets [N], token_weights None or [N];
    reduction "mean" or "sum"; chunk_size tokens per forward step (the backward's vocabulary step follows from it).
    grad_hidden is scaled in place in backward, so a second backward through the same graph (retain_graph=True)
    is refused by autograd's in-place check."""
    return LinearCrossEntropyFunction.apply(hidden, weight, targets, ignore_index, reduction, chunk_size,
                                            token_weights)

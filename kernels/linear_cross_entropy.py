"""Fused linear cross-entropy: cross_entropy(hidden @ weight.T, targets) without ever holding the [N, V] logits.

The tokens are processed a chunk at a time (Liger-Kernel's design): the chunk's logits come from a torch matmul into
one reused [chunk, V] buffer, the Triton cross-entropy kernel turns them in place into d loss / d logits, then
    grad_hidden[chunk] = dlogits @ weight       (torch, written once in the storage dtype)
    grad_weight      += dlogits.T @ hidden[chunk]   (our Triton matmul, into the fp32 accumulator in place)
Everything is done in the forward pass; the backward scales the stored gradients by the upstream gradient.

Adding the chunk's product inside the matmul matters: `grad_weight += (dlogits.T @ h).float()` made a [V, D]
product in the storage dtype and an fp32 copy of it per chunk, each as large as the accumulator.

Peak extra memory, bf16 at N=8192 tokens, V=32000, D=4096, 512-token chunks (MB = 1e6 bytes):
    fp32 grad_weight accumulator   V*D*4     524.3 MB
    logits chunk                   512*V*2    32.8 MB
    grad_hidden                    N*D*2      67.1 MB
    forward peak                             624.2 MB
    backward: + grad_weight in bf16 V*D*2    262.1 MB (written from the accumulator)  ->  peak 853.5 MB
against the naive F.cross_entropy(hidden @ weight.T) forward+backward, whose peak holds three [N, V] bf16 tensors
(log-softmax saved, nll gradient, log-softmax gradient: 3 * 524.3 = 1572.9 MB): 0.54x. The fp32 accumulator alone is
0.33x; only accumulating in bf16 across chunks (Liger's choice, a rounding per chunk) would go below that.
The dispatcher's dropping of ignored rows adds a copy of the kept rows of hidden (at most N*D*2, 67.1 MB).

With `token_weights`, token i's loss counts token_weights[i] times: "sum" is sum(w * loss) and "mean" is
sum(w * loss) / sum(w) over the non-ignored tokens (torch's weighted-mean convention), which with w = 1 / (the
example's loss tokens) makes every example count once whatever its answer's length.
"""
import torch
import triton
import triton.language as tl

from .cross_entropy import cross_entropy_rows, scale_in_place
from .triton_utils import INTERPRET, dot_dtype, mm


@triton.jit
def _add_transposed_product(
    ACC, A, B, V, D, C, stride_a, stride_b, stride_acc,
    DOT_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """ACC[V, D] (fp32) += A[C, V].T @ B[C, D]; one program per [BLOCK_V, BLOCK_D] tile of ACC. Consecutive programs
    share their A columns (B, [C, D], is small enough to stay in L2 whatever the order). A is loaded as stored,
    [BLOCK_C, BLOCK_V] rows, and transposed for the dot."""
    pid = tl.program_id(0)
    n_d = tl.cdiv(D, BLOCK_D)
    v = (pid // n_d) * BLOCK_V + tl.arange(0, BLOCK_V)
    d = (pid % n_d) * BLOCK_D + tl.arange(0, BLOCK_D)
    c = tl.arange(0, BLOCK_C)
    a_ptrs = A + c[:, None] * stride_a + v[None, :]
    b_ptrs = B + c[:, None] * stride_b + d[None, :]
    product = tl.zeros((BLOCK_V, BLOCK_D), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c_in = c[:, None] < C - c0
        a = tl.load(a_ptrs, mask=c_in & (v[None, :] < V), other=0.0)
        b = tl.load(b_ptrs, mask=c_in & (d[None, :] < D), other=0.0)
        product += mm(tl.trans(a), b, DOT_DTYPE)
        a_ptrs += BLOCK_C * stride_a
        b_ptrs += BLOCK_C * stride_b
    out = ACC + v[:, None].to(tl.int64) * stride_acc + d[None, :]
    mask = (v[:, None] < V) & (d[None, :] < D)
    tl.store(out, tl.load(out, mask=mask) + product, mask=mask)


def _product_tiles(dtype):
    """(BLOCK_V, BLOCK_D, BLOCK_C, warps, stages), from the sm_90 compile (tests/test_kernel_cross_entropy.py):
    16-bit operands take m64n128 wgmmas on 128 x 128 tiles with cp.async-pipelined loads, 186 registers and no
    spills (when V and D are multiples of 16, as the JIT then knows; other sizes run correctly, unpipelined); fp32
    operands (IEEE FMA, no tensor cores) spill nothing at 64 x 64. The interpreter takes few, large programs."""
    if INTERPRET:
        return 256, 64, 16, 1, 1
    return (128, 128, 64, 8, 3) if dtype != torch.float32 else (64, 64, 32, 4, 3)


def add_transposed_product(acc, a, b):
    """acc += a.T @ b in place: acc [V, D] fp32, a [C, V] and b [C, D] row-major in one storage dtype, summed in
    fp32 inside the matmul (no [V, D] temporary)."""
    C, V = a.shape
    D = b.shape[1]
    block_v, block_d, block_c, warps, stages = _product_tiles(a.dtype)
    grid = (triton.cdiv(V, block_v) * triton.cdiv(D, block_d),)
    _add_transposed_product[grid](
        acc, a, b, V, D, C, a.stride(0), b.stride(0), acc.stride(0),
        DOT_DTYPE=dot_dtype(a.dtype), BLOCK_V=block_v, BLOCK_D=block_d, BLOCK_C=block_c,
        num_warps=warps, num_stages=stages,
    )
    return acc


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
        need_grad = need_hidden_grad or need_weight_grad
        grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight_grad else None
        loss = torch.empty(N, device=hidden.device, dtype=torch.float32)
        logits_buffer = hidden.new_empty(min(chunk_size, N), V)
        for start in range(0, N, chunk_size):
            rows = slice(start, start + chunk_size)
            h = hidden[rows]
            logits = torch.mm(h, weight.T, out=logits_buffer[:h.shape[0]])
            loss[rows] = cross_entropy_rows(
                logits, targets[rows], denom, ignore_index=ignore_index, mean_grad=reduction == "mean",
                grad=logits if need_grad else None, weights=None if token_weights is None else token_weights[rows])
            if need_hidden_grad:
                torch.mm(logits, weight, out=grad_hidden[rows])
            if need_weight_grad:
                add_transposed_product(grad_weight, logits, h)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        total = loss.sum() if token_weights is None else (loss * token_weights).sum()
        total = total / denom if reduction == "mean" else total
        return total.to(hidden.dtype)      # the reference's result dtype

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            scale_in_place(grad_hidden, grad_output)
        if grad_weight is not None:
            # Scaled in fp32, then rounded once. (torch.mul(..., out=<bf16>) would read the accumulator once less,
            # but on CPU it computes into an fp32 temporary as large as the accumulator.)
            grad_weight = scale_in_place(grad_weight, grad_output).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def linear_cross_entropy(hidden, weight, targets, *, ignore_index=-100, reduction="mean", chunk_size=1024,
                         token_weights=None):
    """The Triton twin of `reference.linear_cross_entropy` (inputs already checked by `cancerllm.kernels`;
    non-contiguous ones are copied). hidden [N, D], weight [V, D], targets [N], token_weights None or [N];
    reduction "mean" or "sum". The gradients are scaled in place in backward, so a second backward through the
    same graph (retain_graph=True) is refused by autograd's in-place check."""
    return LinearCrossEntropyFunction.apply(hidden, weight, targets, ignore_index, reduction, chunk_size,
                                            token_weights)

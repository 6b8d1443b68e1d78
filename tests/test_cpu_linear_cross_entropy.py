"""The CPU fused linear cross-entropy (cancerllm/cpu_linear_cross_entropy.py, csrc/cross_entropy.cpp) against the
float64 unfused loss on fresh random inputs: loss and both gradients in fp32 and bf16, one chunk and many (the fp32
accumulator of grad_weight), odd vocabulary and row counts, ignored targets, token weights, both reductions, a
grad_output of 1 and not, both thread counts; the C++ row pass alone; extreme logits; what the dispatcher sends here.
Tolerances: kernels.testing's, per storage dtype."""
import pytest
import torch

from cancerllm import cpu_linear_cross_entropy, kernels
from cancerllm.kernels import reference
from cancerllm.kernels.testing import TOLERANCES, assert_close, poisoned_allocations, threads_set

pytestmark = pytest.mark.skipif(not cpu_linear_cross_entropy.usable(torch.zeros(1), torch.zeros(1)),
                                reason="cancerllm._C built without the cross-entropy rows")
DTYPES = [torch.float32, torch.bfloat16]
# (rows, vocabulary, width, chunk): one row; many chunks with a partial last one; one chunk past the threading
# threshold (2**15 values) with an odd vocabulary.
SHAPES = [(1, 7, 4, 8), (37, 1003, 24, 8), (96, 5003, 64, 512)]


def unfused64(hidden, weight, targets, token_weights, reduction):
    """The float64 loss of the unfused op: each token's cross-entropy, weighted (token_weights or 1 where the
    target is not ignored), summed or averaged over the weights (a mean over no weight is 0)."""
    losses = reference.cross_entropy(hidden @ weight.T, targets, reduction="none")
    weights = torch.ones_like(losses) if token_weights is None else token_weights.double()
    weights = torch.where(targets != -100, weights, 0.0)
    total = weights.sum()
    return (weights * losses).sum() / (total if reduction == "mean" and total > 0 else 1.0)


def random_problem(N, V, D, dtype):
    hidden = torch.randn(N, D).to(dtype).requires_grad_()
    # Logits of std 1.5. In bf16 the logits are rounded before the softmax, an error of |logit| * 2^-9 in each
    # probability's exponent: at std 3 the largest logits put a one-row gradient past bf16's tolerance.
    weight = (1.5 * D ** -0.5 * torch.randn(V, D)).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (N,))
    targets[torch.rand(N) < 0.25] = -100
    return hidden, weight, targets


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction, weighted, grad_output", [("mean", False, 1.0), ("sum", True, 0.7),
                                                               ("mean", True, 1.0)])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64_unfused(shape, reduction, weighted, grad_output, dtype, threads):
    N, V, D, chunk = shape
    hidden, weight, targets = random_problem(N, V, D, dtype)
    token_weights = torch.rand(N) * 2 if weighted else None
    with threads_set(threads), poisoned_allocations():
        loss = cpu_linear_cross_entropy.linear_cross_entropy(hidden, weight, targets, reduction=reduction,
                                                             chunk_size=chunk, token_weights=token_weights)
        loss.backward(torch.tensor(grad_output, dtype=dtype))
    h64, w64 = (t.detach().double().requires_grad_() for t in (hidden, weight))
    loss64 = unfused64(h64, w64, targets, token_weights, reduction)
    (grad_output * loss64).backward()
    assert loss.dtype == dtype and hidden.grad.dtype == dtype and weight.grad.dtype == dtype
    # The loss alone on assert_close's max-abs scale: a one-row loss can be near 0 (a confident right answer), where
    # lse - logit[target] cancels and its relative error says nothing.
    atol = TOLERANCES[dtype][0]
    assert abs(loss.item() - loss64.item()) <= atol * max(1.0, abs(loss64.item())), (loss.item(), loss64.item())
    assert_close("dhidden", hidden.grad, h64.grad, dtype)
    assert_close("dweight", weight.grad, w64.grad, dtype)


@pytest.mark.parametrize("threads", [1, 2])
def test_row_pass_gives_losses_and_gradients_in_place(threads):
    """The C++ pass alone, fp32: per-row losses and scale * (softmax - onehot) within fp32 rounding; a row whose
    scale is 0 becomes exactly 0."""
    logits = torch.randn(70, 1030) * 4
    targets = torch.randint(0, 1030, (70,))
    row_scale = torch.rand(70)
    row_scale[5] = 0.0
    expected_loss = torch.logsumexp(logits.double(), 1) - logits.double().gather(1, targets[:, None]).squeeze(1)
    onehot = torch.nn.functional.one_hot(targets, 1030).double()
    expected_grad = row_scale.double()[:, None] * (torch.softmax(logits.double(), 1) - onehot)
    with threads_set(threads):
        losses = cpu_linear_cross_entropy.loss_rows(logits, targets, row_scale)
    assert_close("losses", losses, expected_loss, torch.float32)
    assert_close("gradient", logits, expected_grad, torch.float32)
    assert torch.equal(logits[5], torch.zeros(1030))


def test_extreme_logits_stay_finite():
    """Logits in the thousands (a diverging run's): the max is subtracted before exp, nothing overflows."""
    hidden = torch.tensor([[1.0, -1.0], [50.0, 20.0], [-30.0, 0.5]], requires_grad=True)
    weight = torch.tensor([[100.0, 0.0], [0.0, 100.0], [-100.0, 3.0], [1.0, 1.0]], requires_grad=True)
    targets = torch.tensor([0, 2, 3])
    loss = cpu_linear_cross_entropy.linear_cross_entropy(hidden, weight, targets)
    loss.backward()
    h64, w64 = (t.detach().double().requires_grad_() for t in (hidden, weight))
    loss64 = unfused64(h64, w64, targets, None, "mean")
    loss64.backward()
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()
    assert_close("loss", loss, loss64, torch.float32)
    assert_close("dhidden", hidden.grad, h64.grad, torch.float32)


def test_all_ignored_rows_give_zero_loss_and_gradients():
    """Every target ignored, without the dispatcher dropping the rows first: loss 0 and zero gradients."""
    hidden = torch.randn(9, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    loss = cpu_linear_cross_entropy.linear_cross_entropy(hidden, weight, torch.full((9,), -100), chunk_size=4)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(hidden.grad, torch.zeros_like(hidden)) and torch.equal(weight.grad, torch.zeros_like(weight))


def test_a_frozen_head_gets_no_gradient_and_no_grad_mode_none_at_all(monkeypatch):
    """A LoRA step's frozen head: hidden's gradient as with a trainable head, no [V, D] gradient made (none saved for
    backward); under torch.no_grad neither gradient matmul runs (torch.mm computes the logits and grad_hidden)."""
    hidden = torch.randn(10, 16, requires_grad=True)
    weight = torch.randn(40, 16)
    targets = torch.randint(0, 40, (10,))
    trained = weight.clone().requires_grad_()
    loss = cpu_linear_cross_entropy.linear_cross_entropy(hidden, trained, targets, chunk_size=4)
    assert loss.grad_fn.saved_tensors[1].shape == weight.shape
    loss.backward()
    expected = hidden.grad.clone()
    hidden.grad = None
    loss = cpu_linear_cross_entropy.linear_cross_entropy(hidden, weight, targets, chunk_size=4)
    assert loss.grad_fn.saved_tensors[1] is None
    loss.backward()
    torch.testing.assert_close(hidden.grad, expected, rtol=0, atol=0)
    assert weight.grad is None
    calls = []
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *a, **k: calls.append(a[0].shape) or real_mm(*a, **k))
    with torch.no_grad():
        evaluated = cpu_linear_cross_entropy.linear_cross_entropy(hidden, trained, targets, chunk_size=4)
    assert len(calls) == 3 and evaluated.grad_fn is None      # the logits of each of 3 chunks, nothing else
    torch.testing.assert_close(evaluated, loss.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("dtype, path", [(torch.float32, "CPULinearCrossEntropyBackward"),
                                         (torch.bfloat16, "CPULinearCrossEntropyBackward"),
                                         (torch.float16, "ChunkedLinearCrossEntropyBackward")])
def test_dispatcher_sends_fp32_and_bf16_here(dtype, path, kernel_backend):
    """kernels.linear_cross_entropy on CPU: fp32 and bf16 to the C++ path whatever the backend setting ("torch"
    names plain PyTorch against Triton; the C++ kernels serve both), other dtypes to the reference."""
    kernel_backend("torch")
    hidden, weight, targets = random_problem(12, 50, 8, dtype)
    assert kernels.linear_cross_entropy(hidden, weight, targets).grad_fn.name() == path

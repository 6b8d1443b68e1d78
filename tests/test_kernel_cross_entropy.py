"""Cross-entropy and fused linear cross-entropy (Triton, under the interpreter) against float64 references: loss
and gradients on fresh random inputs, ignored and all-ignored targets, z-loss; bad input. Tolerances:
kernels.testing (the loss is fp32 math whatever the storage dtype)."""
import pytest
import torch

from cancerllm import kernels
from cancerllm.kernels import reference
from cancerllm.kernels.cross_entropy import cross_entropy as triton_cross_entropy
from cancerllm.kernels.linear_cross_entropy import linear_cross_entropy as triton_linear_cross_entropy
from cancerllm.kernels.testing import assert_close, poisoned_allocations

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
V = 1500    # the interpreter's vocabulary chunk is 1024: two chunks, the second partial


def random_targets(n, vocab, ignore_index=-100):
    targets = torch.randint(0, vocab, (n,))
    targets[torch.rand(n) < 0.3] = ignore_index
    return targets


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
def test_cross_entropy_matches_reference(dtype, reduction, z_loss):
    logits = (3 * torch.randn(11, V)).to(dtype).requires_grad_()
    targets = random_targets(11, V)
    with poisoned_allocations():
        loss = triton_cross_entropy(logits, targets, reduction=reduction, z_loss=z_loss)
        # Order-one upstream gradients: a scalar one near 0 (mean, sum) scales all of an fp16 dlogits into the
        # subnormals, where rounding to fp16 alone exceeds the tolerance (loss scaling keeps training away).
        grad_loss = torch.rand_like(loss) + 0.5
        loss.backward(grad_loss)
    logits64 = logits.detach().double().requires_grad_()
    loss64 = reference.cross_entropy(logits64, targets, reduction=reduction, z_loss=z_loss)
    loss64.backward(grad_loss.double())
    assert loss.dtype == torch.float32
    assert_close("loss", loss, loss64, torch.float32)
    assert_close("dlogits", logits.grad, logits64.grad, dtype)


def test_custom_ignore_index_and_strided_rows():
    """Class 0 as the ignore_index; logits that are a column slice of a wider tensor are read in place."""
    wide = torch.randn(9, V + 7)
    logits = wide[:, :V].requires_grad_()
    targets = random_targets(9, V, ignore_index=0)
    loss = triton_cross_entropy(logits, targets, ignore_index=0)
    loss.backward()
    logits64 = logits.detach().double().requires_grad_()
    loss64 = reference.cross_entropy(logits64, targets, ignore_index=0)
    loss64.backward()
    assert_close("loss", loss, loss64, torch.float32)
    assert_close("dlogits", logits.grad, logits64.grad, torch.float32)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_loss_and_gradient(reduction):
    logits = torch.randn(5, 40, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.full((5,), -100)
    loss = triton_cross_entropy(logits, targets, reduction=reduction)
    loss.sum().backward()
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_cross_entropy_matches_unfused(dtype, reduction):
    """Chunks of 16 over 50 tokens (the last chunk partial); compared with cross_entropy(h @ W.T) in float64."""
    hidden = torch.randn(50, 32, dtype=dtype, requires_grad=True)
    weight = (0.3 * torch.randn(V, 32)).to(dtype).requires_grad_()
    targets = random_targets(50, V)
    with poisoned_allocations():
        loss = triton_linear_cross_entropy(hidden, weight, targets, reduction=reduction, chunk_size=16)
        loss.backward(torch.tensor(0.5, dtype=loss.dtype))
    h64, w64 = (t.detach().double().requires_grad_() for t in (hidden, weight))
    loss64 = reference.cross_entropy(h64 @ w64.T, targets, reduction=reduction)
    (0.5 * loss64).backward()
    assert loss.dtype == dtype          # the reference's result dtype
    assert_close("loss", loss, loss64, dtype)
    assert_close("dhidden", hidden.grad, h64.grad, dtype)
    assert_close("dweight", weight.grad, w64.grad, dtype)


def test_linear_cross_entropy_all_ignored():
    hidden = torch.randn(6, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    loss = triton_linear_cross_entropy(hidden, weight, torch.full((6,), -100), chunk_size=4)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(hidden.grad, torch.zeros_like(hidden)) and torch.equal(weight.grad, torch.zeros_like(weight))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("ignored_fraction", [0.8, 1.0])
def test_linear_cross_entropy_dispatch_drops_ignored_rows(monkeypatch, backend, ignored_fraction):
    """The dispatcher computes logits only for rows that carry loss (SFT prompts carry none); loss and gradients
    still equal the float64 unfused loss over all rows, and ignored rows get exactly zero gradient."""
    monkeypatch.setenv("CANCERLLM_KERNELS", backend)
    hidden = torch.randn(37, 24, requires_grad=True)
    weight = (0.3 * torch.randn(V, 24)).requires_grad_()
    targets = torch.randint(0, V, (37,))
    ignored = torch.rand(37) < ignored_fraction
    targets[ignored] = -100
    loss = kernels.linear_cross_entropy(hidden, weight, targets, chunk_size=8)
    loss.backward()
    h64, w64 = (t.detach().double().requires_grad_() for t in (hidden, weight))
    loss64 = reference.cross_entropy(h64 @ w64.T, targets)
    loss64.backward()
    assert_close("loss", loss, loss64, torch.float32)
    assert_close("dhidden", hidden.grad, h64.grad, torch.float32)
    assert_close("dweight", weight.grad, w64.grad, torch.float32)
    assert torch.equal(hidden.grad[ignored], torch.zeros_like(hidden.grad[ignored]))


def weighted_unfused(hidden, weight, targets, token_weights, reduction):
    """sum(w * loss) or its weighted mean, from the float64 per-token losses of the unfused op."""
    losses = reference.cross_entropy(hidden @ weight.T, targets, reduction="none")
    w = torch.where(targets != -100, token_weights.double(), 0.0)
    return (w * losses).sum() / (w.sum() if reduction == "mean" else 1.0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_cross_entropy_token_weights(monkeypatch, backend, dtype, reduction):
    """Per-token weights (zero on some valid tokens, arbitrary on ignored ones) on both backends, chunks of 8 over
    45 tokens: loss and both gradients equal the float64 weighted sum / weighted mean of the unfused losses."""
    monkeypatch.setenv("CANCERLLM_KERNELS", backend)
    hidden = torch.randn(45, 24, dtype=dtype, requires_grad=True)
    weight = (0.3 * torch.randn(V, 24)).to(dtype).requires_grad_()
    targets = random_targets(45, V)
    token_weights = torch.rand(45) * 3
    token_weights[::7] = 0.0
    with poisoned_allocations():
        loss = kernels.linear_cross_entropy(hidden, weight, targets, reduction=reduction, chunk_size=8,
                                            token_weights=token_weights)
        loss.backward(torch.tensor(0.5, dtype=loss.dtype))
    h64, w64 = (t.detach().double().requires_grad_() for t in (hidden, weight))
    loss64 = weighted_unfused(h64, w64, targets, token_weights, reduction)
    (0.5 * loss64).backward()
    assert_close("loss", loss, loss64, dtype)
    assert_close("dhidden", hidden.grad, h64.grad, dtype)
    assert_close("dweight", weight.grad, w64.grad, dtype)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_linear_cross_entropy_unit_weights_and_zero_weights(monkeypatch, backend):
    """Weights of 1 give the unweighted loss exactly; weights summing to 0 give loss 0 and zero gradients."""
    monkeypatch.setenv("CANCERLLM_KERNELS", backend)
    hidden, weight, targets = torch.randn(13, 16), torch.randn(300, 16), random_targets(13, 300)
    plain = kernels.linear_cross_entropy(hidden, weight, targets, chunk_size=4)
    ones = kernels.linear_cross_entropy(hidden, weight, targets, chunk_size=4, token_weights=torch.ones(13))
    assert torch.allclose(plain, ones, rtol=1e-6, atol=0)
    hidden.requires_grad_()
    zero = kernels.linear_cross_entropy(hidden, weight, targets, chunk_size=4, token_weights=torch.zeros(13))
    zero.backward()
    assert zero.item() == 0.0 and torch.equal(hidden.grad, torch.zeros_like(hidden))


def test_linear_cross_entropy_dispatch_passes_only_loss_rows(monkeypatch):
    seen = []
    real = reference.linear_cross_entropy
    def recording(hidden, *args, **kwargs):
        seen.append(hidden.shape[0])
        return real(hidden, *args, **kwargs)
    monkeypatch.setattr(reference, "linear_cross_entropy", recording)
    monkeypatch.setenv("CANCERLLM_KERNELS", "torch")
    targets = torch.tensor([-100, 3, -100, -100, 7, -100])
    kernels.linear_cross_entropy(torch.randn(6, 8), torch.randn(10, 8), targets)
    assert seen == [2]


def test_dispatch_forced_triton_on_cpu(monkeypatch):
    monkeypatch.setenv("CANCERLLM_KERNELS", "triton")
    logits, targets = torch.randn(4, 30), torch.randint(0, 30, (4,))
    expected = reference.cross_entropy(logits.double(), targets)
    assert_close("loss", kernels.cross_entropy(logits, targets), expected, torch.float32)
    assert_close("loss", kernels.linear_cross_entropy(torch.eye(4), logits.T.contiguous(), targets),
                 expected, torch.float32)


@pytest.mark.parametrize("make_args, error, message", [
    (lambda x, t: (x[None], t), ValueError, "logits must be 2-D"),
    (lambda x, t: (x, t[:-1]), ValueError, "targets has 5 entries but there are 6 rows"),
    (lambda x, t: (x, t.float()), TypeError, "targets must have dtype"),
    (lambda x, t: (x, t.to("meta")), ValueError, "logits, targets must share one device"),
    (lambda x, t: (x, torch.tensor([0, 1, 2, 3, 4, 10])), ValueError, r"targets\[5\]=10 is outside \[0, 10\)"),
    (lambda x, t: (x, torch.tensor([0, 1, -5, 3, 4, 9])), ValueError, r"targets\[2\]=-5"),
])
def test_cross_entropy_rejects_bad_input(make_args, error, message):
    with pytest.raises(error, match=message):
        kernels.cross_entropy(*make_args(torch.randn(6, 10), torch.randint(0, 10, (6,))))


def test_cross_entropy_rejects_bad_options():
    logits, targets = torch.randn(6, 10), torch.randint(0, 10, (6,))
    with pytest.raises(ValueError, match="reduction must be one of"):
        kernels.cross_entropy(logits, targets, reduction="avg")
    with pytest.raises(ValueError, match="z_loss must be a non-negative number"):
        kernels.cross_entropy(logits, targets, z_loss=-1.0)


@pytest.mark.parametrize("make_args, kwargs, message", [
    (lambda h, w, t: (h, w[:, :-1], t), {}, r"weight must be \[V, D\] with hidden's D=8"),
    (lambda h, w, t: (h, w.half(), t), {}, "hidden, weight must share one dtype"),
    (lambda h, w, t: (h, w, t), {"reduction": "none"}, "reduction must be one of 'mean', 'sum'"),
    (lambda h, w, t: (h, w, t), {"chunk_size": 0}, "chunk_size must be a positive int"),
    (lambda h, w, t: (h, w, t + 20), {}, "is outside"),
    (lambda h, w, t: (h, w, t), {"token_weights": torch.ones(5)}, r"token_weights must be \[N\] with hidden's N=6"),
    (lambda h, w, t: (h, w, t), {"token_weights": torch.ones(6, 1)}, "token_weights must be 1-D"),
    (lambda h, w, t: (h, w, t), {"token_weights": torch.tensor([1., 1, -1, 1, 1, 1])}, "finite and >= 0"),
    (lambda h, w, t: (h, w, t), {"token_weights": torch.tensor([1., 1, 1, float("nan"), 1, 1])}, "finite and >= 0"),
])
def test_linear_cross_entropy_rejects_bad_input(make_args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        kernels.linear_cross_entropy(*make_args(torch.randn(6, 8), torch.randn(20, 8), torch.randint(0, 20, (6,))),
                                     **kwargs)

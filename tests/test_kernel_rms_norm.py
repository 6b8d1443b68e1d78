"""RMSNorm (Triton, under the interpreter) against the float64 reference: y, the fused x + residual, and the
gradients of x, residual and weight, on fresh random inputs; bad input. Tolerances: kernels.testing."""
import pytest
import torch

from cancerllm import kernels
from cancerllm.kernels import reference
from cancerllm.kernels.rms_norm import rms_norm as triton_rms_norm
from cancerllm.kernels.testing import assert_close, poisoned_allocations

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused_residual", [False, True], ids=["plain", "residual"])
def test_matches_reference(dtype, fused_residual):
    # 3 x 5 rows of 48 (not a power of two); an fp32 weight on half-precision activations, as in mixed training.
    x = torch.randn(3, 5, 48, dtype=dtype, requires_grad=True)
    residual = torch.randn(3, 5, 48, dtype=dtype, requires_grad=True) if fused_residual else None
    weight = (1 + 0.1 * torch.randn(48)).requires_grad_()
    with poisoned_allocations():
        result = triton_rms_norm(x, weight, 1e-5, residual=residual)
        outputs = result if fused_residual else (result,)
        grads = [torch.randn_like(o) for o in outputs]
        torch.autograd.backward(outputs, grads)

    inputs64 = [t.detach().double().requires_grad_() for t in (x, weight, residual) if t is not None]
    x64, w64 = inputs64[:2]
    result64 = reference.rms_norm(x64, w64, 1e-5, residual=inputs64[2] if fused_residual else None)
    outputs64 = result64 if fused_residual else (result64,)
    torch.autograd.backward(outputs64, [g.double() for g in grads])

    assert all(o.dtype == dtype for o in outputs)
    assert_close("y", outputs[0], outputs64[0], dtype)
    assert_close("dx", x.grad, x64.grad, dtype)
    assert_close("dweight", weight.grad, w64.grad, dtype)
    if fused_residual:
        assert_close("x + residual", outputs[1], outputs64[1], dtype)
        assert_close("dresidual", residual.grad, inputs64[2].grad, dtype)


def test_many_rows_split_over_programs():
    """More rows than backward programs, so each program's dW partial sums several rows."""
    x = torch.randn(37, 24, requires_grad=True)
    weight = torch.randn(24, requires_grad=True)
    with poisoned_allocations():
        triton_rms_norm(x, weight, 1e-6).sum().backward()
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, weight))
    reference.rms_norm(x64, w64, 1e-6).sum().backward()
    assert_close("dx", x.grad, x64.grad, torch.float32)
    assert_close("dweight", weight.grad, w64.grad, torch.float32)


def test_non_contiguous_input_is_copied():
    x = torch.randn(32, 6).t()
    weight = torch.randn(32)
    assert_close("y", triton_rms_norm(x, weight), reference.rms_norm(x.double(), weight.double()), torch.float32)


def test_dispatch_forced_triton_on_cpu(kernel_backend):
    kernel_backend("triton")
    x, weight = torch.randn(4, 16), torch.randn(16)
    assert_close("y", kernels.rms_norm(x, weight), reference.rms_norm(x.double(), weight.double()), torch.float32)


@pytest.mark.parametrize("make_args, error, message", [
    (lambda x, w: (x, w[:-1]), ValueError, "weight .* must match x's last axis"),
    (lambda x, w: (x, w[None]), ValueError, "weight must be 1-D"),
    (lambda x, w: (x, w, 1e-5, x[:, :-1]), ValueError, "residual .* must have x's shape"),
    (lambda x, w: (x, w, 1e-5, x.half()), ValueError, "x, residual must share one dtype"),
    (lambda x, w: (x, w.to("meta")), ValueError, "x, weight must share one device"),
    (lambda x, w: (x, w, -1.0), ValueError, "eps must be a non-negative number"),
    (lambda x, w: (x.long(), w), TypeError, "x must have dtype"),
])
def test_rejects_bad_input(make_args, error, message):
    with pytest.raises(error, match=message):
        kernels.rms_norm(*make_args(torch.randn(4, 16), torch.randn(16)))

"""RMSNorm for training on CPU in one C++ pass each way (csrc/rms_norm.cpp), the residual addition fused in:
h = x + residual, y = h / sqrt(mean(h^2) + eps) * weight forward; the gradients of x (and residual) and weight
backward; fp32 arithmetic on fp32 or bf16 activations, rounded once on store. torch runs the reference's backward as
~10 elementwise ops over full-size fp32 temporaries: ~9 ms per norm of SmolLM2's 2 x 1,024 x 576 bf16 activations,
61 norms a step (docs/experiments.md, 2026-12-01). Saves h and the per-row 1/rms, as the reference does.

    y = rms_norm(x, weight, eps)                    # kernels.rms_norm sends CPU tensors here when the extension
    y, h = rms_norm(x, weight, eps, residual=r)     # is built with the kernel

`kernels.reference.rms_norm` is the plain PyTorch version it is tested against (and the float64 oracle).
"""
import torch

from .extension import FLOATS, check_cpu_tensor, native

OP = "rms_norm_forward"


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernel takes tensors like these: CPU, fp32 or bf16 activations, a float weight on the CPU, the
    extension built with it."""
    return (x.device.type == "cpu" and x.dtype in FLOATS and weight.device.type == "cpu"
            and weight.is_floating_point() and native(OP) is not None)


def contiguous(op: str, dtype: torch.dtype, **tensors) -> list:
    """Each tensor (None stays None) as a contiguous tensor of `dtype`, checked before C++ reads its pointer."""
    out = []
    for name, t in tensors.items():
        if t is not None:
            t = t.to(dtype).contiguous()
            check_cpu_tensor(op, name, t, dtypes=tuple(FLOATS))
        out.append(t)
    return out


def pointer(t) -> int:
    return 0 if t is None else t.data_ptr()


class CPURMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, residual):
        x, residual = contiguous("rms_norm", x.dtype, x=x, residual=residual)
        if residual is not None and residual.shape != x.shape:
            raise ValueError(f"rms_norm: residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        dim = x.shape[-1]
        w = weight.detach().float().contiguous()
        y = torch.empty_like(x)
        h = x if residual is None else torch.empty_like(x)
        rstd = torch.empty(x.shape[:-1], dtype=torch.float32)
        native(OP).rms_norm_forward(x.data_ptr(), pointer(residual), w.data_ptr(), float(eps), y.data_ptr(),
                                    0 if residual is None else h.data_ptr(), rstd.data_ptr(), FLOATS[x.dtype],
                                    x.numel() // dim, dim, torch.get_num_threads())
        ctx.save_for_backward(h, weight, rstd)
        ctx.has_residual = residual is not None
        return (y, h) if ctx.has_residual else y

    @staticmethod
    def backward(ctx, grad_y, grad_h=None):
        h, weight, rstd = ctx.saved_tensors
        grad_y, grad_h = contiguous("rms_norm backward", h.dtype, grad_y=grad_y, grad_h=grad_h)
        dim = h.shape[-1]
        w = weight.detach().float().contiguous()
        grad_in = torch.empty_like(h)
        grad_weight = torch.empty(dim, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        native(OP).rms_norm_backward(grad_y.data_ptr(), pointer(grad_h), h.data_ptr(), w.data_ptr(), rstd.data_ptr(),
                                     grad_in.data_ptr(), pointer(grad_weight), FLOATS[h.dtype], h.numel() // dim,
                                     dim, torch.get_num_threads())
        grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
        return grad_in, grad_weight, None, grad_in if ctx.has_residual else None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor = None):
    """y, or (y, x + residual) with `residual`, for CPU fp32/bf16 tensors (kernels.rms_norm checks them first)."""
    return CPURMSNormFunction.apply(x, weight, eps, residual)

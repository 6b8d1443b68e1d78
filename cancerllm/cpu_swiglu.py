"""SwiGLU's elementwise part on CPU in one C++ pass each way (csrc/swiglu.cpp): silu(gate) * up forward, both
gradients backward, fp32 arithmetic on fp32 or bf16 tensors rounded once on store. torch runs the backward as
~10 elementwise ops, each a pass over a full-size fp32 temporary (docs/experiments.md, 2026-11-30, for what that
cost). Saves only gate and up, as the reference does.

    out = swiglu(gate, up)     # kernels.swiglu sends CPU tensors here when the extension is built

`kernels.reference.swiglu` is the plain PyTorch version it is tested against (and the float64 oracle).
"""
import torch

from .extension import FLOATS, check_cpu_tensor, native

OP = "swiglu_forward"


def usable(gate: torch.Tensor) -> bool:
    """Whether the kernel takes tensors like `gate`: CPU, fp32 or bf16, extension built with it."""
    return gate.device.type == "cpu" and gate.dtype in FLOATS and native(OP) is not None


def contiguous(op: str, **tensors) -> list[torch.Tensor]:
    out = []
    for name, t in tensors.items():
        t = t.contiguous()
        check_cpu_tensor(op, name, t, dtypes=tuple(FLOATS))
        out.append(t)
    return out


class CPUSwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        gate, up = contiguous("swiglu", gate=gate, up=up)
        out = torch.empty_like(gate)
        native(OP).swiglu_forward(gate.data_ptr(), up.data_ptr(), out.data_ptr(), FLOATS[gate.dtype], gate.numel(),
                                  torch.get_num_threads())
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        gate, up = ctx.saved_tensors
        (grad,) = contiguous("swiglu backward", grad=grad_out.to(gate.dtype))
        grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
        native(OP).swiglu_backward(grad.data_ptr(), gate.data_ptr(), up.data_ptr(), grad_gate.data_ptr(),
                                   grad_up.data_ptr(), FLOATS[gate.dtype], gate.numel(), torch.get_num_threads())
        return grad_gate, grad_up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for CPU fp32/bf16 tensors of one shape and dtype (kernels.swiglu checks them first)."""
    return CPUSwiGLUFunction.apply(gate, up)

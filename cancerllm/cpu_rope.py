"""The rotary embedding's rotation on CPU in one C++ pass (csrc/rope.cpp): each head's halves (x1, x2) become
(x1 cos - sign x2 sin, x2 cos + sign x1 sin) in fp32, rounded once to x's dtype. model.Rotary calls it forward
(sign 1) and backward (sign -1, the inverse rotation) where torch ran a widening, four products and a narrowing
over the whole tensor (docs/experiments.md, 2026-12-01).

    out = rotate(x, cos, sin, sign=1.0)     # x [B, T, H, D] fp32 or bf16; cos, sin [B, T, D/2] fp32

`model.rotate` is the plain PyTorch version it is tested against.
"""
import torch

from .extension import FLOATS, check_cpu_tensor, native

OP = "rope_rotate"


def usable(x: torch.Tensor, cos: torch.Tensor) -> bool:
    """Whether the kernel takes tensors like these: CPU, fp32 or bf16 x, fp32 angles, the extension built with it."""
    return (x.device.type == "cpu" and x.dtype in FLOATS and cos.dtype == torch.float32 and cos.device.type == "cpu"
            and native(OP) is not None)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    x, cos, sin = x.contiguous(), cos.contiguous(), sin.contiguous()
    check_cpu_tensor(OP, "x", x, dtypes=tuple(FLOATS))
    B, T, H, D = x.shape
    for name, t in (("cos", cos), ("sin", sin)):
        check_cpu_tensor(OP, name, t, dtypes=(torch.float32,))
        if t.shape != (B, T, D // 2):
            raise ValueError(f"{OP}: {name} must be [B, T, D/2] = {(B, T, D // 2)} for x {tuple(x.shape)}, got "
                             f"{tuple(t.shape)}")
    out = torch.empty_like(x)
    native(OP).rope_rotate(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), float(sign), FLOATS[x.dtype],
                           B * T, H, D, torch.get_num_threads())
    return out

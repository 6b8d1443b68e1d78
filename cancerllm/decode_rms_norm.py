"""RMSNorm for decoding on CPU in one C++ call (csrc/rms_norm.cpp): y = x / sqrt(mean(x^2) + eps) * weight, in fp32
whatever x holds, y in x's dtype. torch's F.rms_norm on a bf16 row runs as several ops (a widening, the norm, a
narrowing) whose fixed costs made a decode step's 61 norms ~2 ms of SmolLM2-135M's 23 ms (docs/experiments.md).

    norm = RowNorm(weight, eps)
    y = norm(x)            # x [..., dim], fp32 or bf16, on CPU

`reference` is the same norm in float64; RowNorm checks its inputs before the C++ call takes data pointers.
"""
import torch

from .extension import FLOATS, check_cpu_tensor, native

OP = "rms_norm_rows"


def available() -> bool:
    return native(OP) is not None


def usable(x: torch.Tensor) -> bool:
    """Whether the kernel can normalise tensors like `x`: on CPU, fp32 or bf16, kernel built."""
    return x.device.type == "cpu" and x.dtype in FLOATS and available()


class RowNorm:
    """An RMSNorm's weight (kept in fp32, the precision it multiplies in) and eps, applied by the kernel."""

    def __init__(self, weight: torch.Tensor, eps: float):
        if weight.dim() != 1 or weight.device.type != "cpu":
            raise ValueError(f"{OP}: weight must be a 1-D CPU tensor, got {tuple(weight.shape)} on {weight.device}")
        self.weight, self.eps = weight.detach().float().contiguous(), float(eps)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        check_cpu_tensor(OP, "x", x, dtypes=tuple(FLOATS))
        dim = self.weight.shape[0]
        if x.dim() < 1 or x.shape[-1] != dim:
            raise ValueError(f"{OP}: x must be [..., {dim}] (the weight's width), got {tuple(x.shape)}")
        y = torch.empty_like(x)
        native(OP).rms_norm_rows(x.data_ptr(), self.weight.data_ptr(), self.eps, y.data_ptr(), FLOATS[x.dtype],
                                 x.numel() // dim, dim, torch.get_num_threads())
        return y


def reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.double()

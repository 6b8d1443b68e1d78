"""Our small-M CPU matmul for decoding (csrc/gemv.cpp): y = x @ W.T for a few rows of x, W in bf16, in int8 with a
bf16 scale per output row (model.quantize_int8's format) or in fp32, read once per call in its own [N, K] layout.

With bf16 or int8 weights x (fp32 or bf16) is rounded to bf16 and multiplied with fp32 sums: for bf16 weights on
AMX tiles where the CPU has them and Linux grants them, otherwise (and for int8 weights) AVX512-BF16 dot products
where the CPU has them (chosen at run time), a portable kernel elsewhere. With fp32 weights everything is
fp32 (AVX512F fused multiply-adds, or the portable kernel). y comes back in x's dtype; with int8 weights its values
are rounded to bf16 (scale applied first), the contract of torch's _weight_int8pack_mm, which the int8 paths share.
Every check happens here, before the C++ call takes the tensors' data pointers.
"""
import os

import torch

from .extension import FLOATS, check_cpu_tensor, native

MAX_ROWS = 16   # up to this many rows the decoding form calls these kernels; prefill goes to the GEMM libraries
WEIGHTS = {torch.bfloat16: 0, torch.int8: 1, torch.float32: 2}


def _extension():
    return native("small_matmul")


def available() -> bool:
    """Whether the extension with these kernels is built."""
    return _extension() is not None


def fast_kernel() -> bool:
    """Whether this CPU runs the AVX512-BF16 kernel (otherwise the portable one runs)."""
    return available() and _extension().has_avx512_bf16()


def amx_kernel() -> bool:
    """Whether bf16 weights run on this CPU's AMX tiles (where Linux grants them; otherwise on AVX512-BF16)."""
    return available() and _extension().has_amx()


def build_id() -> str:
    """Names the built kernels (the extension file's size and modification time): decode_paths measures a rebuilt
    kernel again rather than trust what the previous build measured."""
    info = os.stat(_extension().__file__)
    return f"{info.st_size}-{int(info.st_mtime)}"


class Multiplier:
    """A weight [N, K] (bf16, or int8 with its bf16 scales [N]) checked once, then multiplied by many x: decoding
    calls it ~150 times a step, where checking the weight again would cost as much as a small matmul."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor = None):
        self.extension = _extension()
        if self.extension is None:
            raise RuntimeError("gemv: cancerllm._C lacks small_matmul; rebuild the extension (csrc/README.md)")
        check_cpu_tensor("gemv", "weight", weight)
        if weight.dtype not in WEIGHTS:
            raise TypeError(f"gemv: weight must be bfloat16, int8 or float32, got {weight.dtype}")
        if weight.dim() != 2:
            raise ValueError(f"gemv: weight [N, K] must be 2-D, got {tuple(weight.shape)}")
        if (weight.dtype == torch.int8) != (scales is not None):
            raise ValueError("gemv: int8 weights need their scales, bf16 and fp32 weights take none")
        if scales is not None:
            check_cpu_tensor("gemv", "scales", scales)
            if scales.dtype != torch.bfloat16 or scales.shape != weight.shape[:1]:
                raise ValueError(f"gemv: scales must be bfloat16 of shape ({weight.shape[0]},), got {scales.dtype} "
                                 f"{tuple(scales.shape)}")
        self.weight, self.scales = weight, scales   # kept: the kernel reads their memory
        self.N, self.K = weight.shape
        self.weight_args = (weight.data_ptr(), WEIGHTS[weight.dtype], 0 if scales is None else scales.data_ptr())

    def __call__(self, x: torch.Tensor, *, portable: bool = False, amx: bool = True) -> torch.Tensor:
        """x [..., K] @ weight.T (times the scales) -> [..., N] in x's dtype, on torch's thread count. `portable`
        runs the portable kernel on any CPU; `amx=False` the AVX512 one for bf16 weights where AMX would run (tests
        cover every kernel on one machine)."""
        check_cpu_tensor("gemv", "x", x)
        if x.dtype not in FLOATS:
            raise TypeError(f"gemv: x must be float32 or bfloat16, got {x.dtype}")
        if x.dim() < 2 or x.shape[-1] != self.K:
            raise ValueError(f"gemv: x must be [..., K] with K={self.K} (the weight's [N, K]), got {tuple(x.shape)}")
        y = torch.empty(*x.shape[:-1], self.N, dtype=x.dtype)
        rows = x.numel() // self.K if self.K else 0
        if not self.K:
            y.zero_()
        elif rows and self.N:
            self.extension.small_matmul(x.data_ptr(), FLOATS[x.dtype], *self.weight_args, y.data_ptr(),
                                        FLOATS[y.dtype], self.scales is not None, rows, self.N, self.K,
                                        torch.get_num_threads(), kernel(portable, amx))
        return y


def kernel(portable: bool, amx: bool) -> int:
    """csrc/gemv.h's Kernel for the `portable` and `amx` options: 0 the best this CPU runs, 1 AVX512, 2 portable."""
    return 2 if portable else 0 if amx else 1


def matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor = None, *, portable: bool = False,
           amx: bool = True):
    """x [..., K] @ weight[N, K].T (times scales [N] for int8 weights) -> [..., N] in x's dtype: Multiplier once."""
    return Multiplier(weight, scales)(x, portable=portable, amx=amx)

"""The C++ extension's CPU kernels as Python sees them: whether a kernel is built, the checks every wrapper makes
before handing a tensor's data pointer to C++ (which trusts what it is given), and the scratch buffers the training
kernels' wrappers reuse between calls."""
import functools
import math

import torch

# The activation dtypes the kernels take, as the C++ side numbers them (csrc/bf16.h's Float).
FLOATS = {torch.float32: 0, torch.bfloat16: 1}
_scratch = {}   # (name, dtype) -> a flat buffer that `scratch` hands out views of, grown when too small


@functools.cache   # decoding asks ~200 times a step
def native(symbol: str):
    """cancerllm._C when it is built with `symbol`, else None (an extension built before that kernel existed)."""
    try:
        from . import _C
    except ImportError:
        return None
    return _C if hasattr(_C, symbol) else None


def check_cpu_tensor(op: str, name: str, t, *, dtypes=None) -> None:
    """`t` is a contiguous CPU tensor (of one of `dtypes`): ValueError or TypeError naming `op` and `name`."""
    if not isinstance(t, torch.Tensor) or not t.is_cpu:
        raise ValueError(f"{op}: {name} must be a CPU tensor, got "
                         f"{t.device if isinstance(t, torch.Tensor) else type(t).__name__}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous, got strides {t.stride()} for shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must be {names}, got {t.dtype}")


def scratch(name: str, shape, dtype) -> torch.Tensor:
    """A [shape] tensor of `dtype` whose memory is reused by the next call with the same name: for buffers that die
    before their call returns. A fresh multi-MB tensor costs a page fault per 4 KB each time it is allocated, which
    took as long as the matmuls that fill it (docs/experiments.md, 2026-11-30)."""
    n = math.prod(shape)
    buffer = _scratch.get((name, dtype))
    if buffer is None or buffer.numel() < n:
        buffer = _scratch[(name, dtype)] = torch.empty(n, dtype=dtype)
    return buffer[:n].view(shape)

"""What every Triton kernel file needs: whether we run under the interpreter, and a matmul that is exact there.

The interpreter (TRITON_INTERPRET=1, the CPU test path) multiplies bf16 tiles wrongly, so under it every tl.dot
runs on fp32 operands; on a GPU the tensor cores take fp16/bf16 operands directly and fp32 storage uses IEEE fp32
(never TF32: fp32 inputs ask for fp32 results).
"""
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def dot_dtype(dtype: torch.dtype):
    """The tl dtype tl.dot operands are cast to for tensors stored as `dtype`."""
    return tl.float32 if INTERPRET else TL_DTYPES[dtype]


@triton.jit
def mm(a, b, DOT_DTYPE: tl.constexpr):
    """a @ b with fp32 accumulation, operands cast to DOT_DTYPE."""
    if DOT_DTYPE == tl.float32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE))


def num_programs(device: torch.device, rows: int) -> int:
    """Programs for a persistent row loop: a few per SM on a GPU, a handful under the interpreter."""
    if device.type == "cuda":
        return min(rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(rows, 4)

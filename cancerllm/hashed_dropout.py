"""Dropout with a hashed mask (csrc/dropout.cpp), for LoRA on CPU: element i of a tensor is kept under a 64-bit seed
when a 32-bit hash of (seed, i) clears p, so a backward regenerates the mask from the seed instead of keeping it,
and one pass applies it. torch's CPU dropout draws every value from mt19937, one at a time, and keeps its mask and
the dropped input for backward (docs/experiments.md, 2026-11-30: what that cost a LoRA step).

    seed = draw_seed()                      # from torch's CPU generator: torch.manual_seed reproduces a run
    y = drop(x, p, seed)                    # x with the dropped elements zeroed; the same seed, the same mask

`drop` leaves the kept values as they are (a copy of their bits): dropout's 1 / (1 - p) is the caller's to fold into
a scale it applies anyway (LoRA's alpha / r), which saves a rounding and keeps the pass free of arithmetic.
`keep_mask` computes the same mask in plain torch integer ops: the test oracle.
"""
import torch

from .extension import FLOATS, check_cpu_tensor, native

OP = "hashed_dropout"
KEY_MIX, GOLDEN, MIX1, MIX2 = 0x27D4EB2F, 0x9E3779B9, 0x85EBCA6B, 0xC2B2AE35
LOW32 = 0xFFFFFFFF


def usable(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in FLOATS and native(OP) is not None


def draw_seed() -> int:
    """A 63-bit seed from torch's default CPU generator."""
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))


def threshold(p: float) -> int:
    """Kept when the hash's top 24 bits are >= this: probability 1 - round(p * 2^24) / 2^24."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{OP}: p must be in [0, 1), got {p}")
    return round(p * 2**24)


def drop(x: torch.Tensor, p: float, seed: int, *, avx512: bool = True) -> torch.Tensor:
    """x with the elements the mask drops set to 0 and the others unchanged (not rescaled), CPU fp32/bf16.
    avx512=False: the kernel's portable loop, whatever the CPU (the same mask; tests compare the two)."""
    x = x.contiguous()
    check_cpu_tensor(OP, "x", x, dtypes=tuple(FLOATS))
    out = torch.empty_like(x)
    native(OP).hashed_dropout(x.data_ptr(), out.data_ptr(), x.element_size(), x.numel(), seed % 2**64, threshold(p),
                              torch.get_num_threads(), avx512)
    return out


def keep_mask(n: int, p: float, seed: int) -> torch.Tensor:
    """The kernel's mask for n elements, in torch int64 arithmetic kept to 32 bits (products wrap like uint32)."""
    seed %= 2**64
    index = torch.arange(n, dtype=torch.int64)
    key = ((seed & LOW32) + ((seed >> 32) ^ (index >> 32)) * KEY_MIX) & LOW32
    h = (((index + 1) & LOW32) * GOLDEN & LOW32) ^ key
    h = ((h ^ (h >> 16)) * MIX1) & LOW32
    h = ((h ^ (h >> 13)) * MIX2) & LOW32
    h = h ^ (h >> 16)
    return (h >> 8) >= threshold(p)

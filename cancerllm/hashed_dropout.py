"""Dropout with a hashed mask (csrc/dropout.cpp), for LoRA on CPU: element i of a tensor is kept under a 64-bit seed
when a splitmix64 hash of (seed, i) clears p, so a backward regenerates the mask from the seed instead of keeping
it, and one pass applies it. torch's CPU dropout draws every value from mt19937, one at a time, and keeps its mask
and the dropped input for backward (docs/experiments.md, 2026-11-30: what that cost a LoRA step).

    seed = draw_seed()                      # from torch's CPU generator: torch.manual_seed reproduces a run
    y = dropout(x, p, seed)                 # x * keep / (1 - p); the same seed, the same mask (a backward's)

`keep_mask` computes the same mask in plain torch integer ops: the test oracle.
"""
import torch

from .extension import FLOATS, check_cpu_tensor, native

OP = "hashed_dropout"
GOLDEN, MIX1, MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


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


def dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """x * keep / (1 - p) on CPU fp32/bf16 tensors, fp32 arithmetic rounded once."""
    x = x.contiguous()
    check_cpu_tensor(OP, "x", x, dtypes=tuple(FLOATS))
    out = torch.empty_like(x)
    native(OP).hashed_dropout(x.data_ptr(), out.data_ptr(), FLOATS[x.dtype], x.numel(), seed % 2**64, threshold(p),
                              1.0 / (1.0 - p), torch.get_num_threads())
    return out


def keep_mask(n: int, p: float, seed: int) -> torch.Tensor:
    """The kernel's mask for n elements, in torch int64 arithmetic (wrapping like uint64; >> made logical)."""
    def signed(v):
        return v - 2**64 if v >= 2**63 else v

    def shift_right(z, bits):
        return (z >> bits) & ((1 << (64 - bits)) - 1)

    z = signed(seed % 2**64) + torch.arange(1, n + 1, dtype=torch.int64) * signed(GOLDEN)
    z = (z ^ shift_right(z, 30)) * signed(MIX1)
    z = (z ^ shift_right(z, 27)) * signed(MIX2)
    z = z ^ shift_right(z, 31)
    return shift_right(z, 40) >= threshold(p)

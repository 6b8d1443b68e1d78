"""Keep freed host memory in the process (glibc's malloc) for CPU training.

glibc hands blocks above its mmap threshold (128 KB at start, raised up to 32 MB as such blocks are freed) straight
back to the kernel on free, and trims the heap's free top past twice that threshold: a training step, which frees and
re-allocates the same activation-sized tensors every step, then faults every page of them in again, a few percent
of a small model's step in system time (docs/experiments.md, 2026-12-02). Peak RSS is unchanged: the step re-uses
what it freed.
"""
import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3     # mallopt's parameter numbers (malloc.h)
# glibc's own largest dynamic threshold: the heap holds what it would hold after warming up, no more. Higher (64 or
# 512 MB) let a full fine-tune's 32-512 MB blocks into the heap, where the SFT's varying shapes fragmented it: peak
# RSS grew ~25 MB a step more than by default. Larger blocks map and unmap on their own.
MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 2**31 - 1                      # mallopt takes an int: never trim the heap's free top


def glibc_mallopt():
    """The C library's mallopt, or None where it has none (not glibc)."""
    path = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(path), "mallopt", None) if path else None


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed blocks below MMAP_THRESHOLD for re-use instead of returning them to the
    kernel. True when set; False where the C library has no mallopt (nothing to do there)."""
    mallopt = glibc_mallopt()
    if mallopt is None:
        return False
    mapped, trimmed = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD), mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    return bool(mapped and trimmed)

"""Weights that decoding streams every step, packed into one allocation in the order a step reads them.

Decoding a token reads every matmul weight once, so its speed is the rate memory delivers them. Measured on this
project's CPU (docs/experiments.md), one thread streaming SmolLM2-135M's 151 bf16 matmul weights with our small-M
kernel: 17.5 GB/s from separate allocations, 21 GB/s from one allocation in reading order (the hardware prefetcher
and the DRAM pages see one long stream), 26.5 GB/s when that allocation is also backed by transparent huge pages
(no TLB miss every 4 KiB; what llama.cpp's step reaches). So `pack` copies tensors into one anonymous mapping the
kernel is asked to back with huge pages (MADV_HUGEPAGE; honoured where THP is `always` or `madvise`), tensor after
tensor, and returns views of it. Where there is no such call (not Linux), one torch allocation serves.
"""
import mmap

import torch

ALIGN = 64   # bytes: each tensor starts on a cache line


def allocate(nbytes: int) -> torch.Tensor:
    """A uint8 tensor of `nbytes`, backed by huge pages where the OS offers them. The mapping lives as long as any
    tensor viewing it (torch.frombuffer keeps a reference)."""
    if nbytes == 0 or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(nbytes, dtype=torch.uint8)
    mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mapping.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(mapping, dtype=torch.uint8)


def aligned(offset: int) -> int:
    return -(-offset // ALIGN) * ALIGN


def pack(tensors: list) -> list:
    """Copies of CPU `tensors` (any dtypes and shapes) in one allocation, in the order given, each starting on a
    cache line: contiguous views of it, equal to the tensors."""
    offsets, end = [], 0
    for t in tensors:
        offsets.append(aligned(end))
        end = offsets[-1] + t.numel() * t.element_size()
    memory = allocate(end)
    views = []
    for t, offset in zip(tensors, offsets):
        view = memory[offset:offset + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        views.append(view.copy_(t))
    return views


def adjacent(tensors: list) -> bool:
    """Whether contiguous `tensors` of one dtype lie back to back in one storage, in order (so that their
    concatenation along the first dimension is a view)."""
    first = tensors[0]
    ptr = first.data_ptr()
    for t in tensors:
        same_kind = t.dtype == first.dtype and t.device == first.device and t.shape[1:] == first.shape[1:]
        same_storage = t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        if not (t.is_contiguous() and same_kind and same_storage and t.data_ptr() == ptr):
            return False
        ptr += t.numel() * t.element_size()
    return True


def in_order(tensors: list) -> bool:
    """Whether `tensors` lie in one storage at increasing addresses, in the order given."""
    storage = tensors[0].untyped_storage().data_ptr()
    addresses = [t.data_ptr() for t in tensors]
    return (all(t.untyped_storage().data_ptr() == storage for t in tensors)
            and all(a < b for a, b in zip(addresses, addresses[1:])))


def concat_rows(tensors: list) -> torch.Tensor:
    """torch.cat(tensors) along the first dimension: a view where they lie back to back (packed weights), else a
    copy."""
    if adjacent(tensors):
        first = tensors[0]
        rows = sum(t.shape[0] for t in tensors)
        return first.as_strided((rows, *first.shape[1:]), first.stride())
    return torch.cat(tensors)

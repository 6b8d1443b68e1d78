"""Test support for the kernels (like torch.testing): tolerances per storage dtype, comparison against a float64
reference, and poisoned allocations so that an output element a kernel forgets to write cannot pass."""
from contextlib import contextmanager

import torch

# (max-abs tolerance relative to max(1, max |reference|), relative error ||actual - ref|| / ||ref||), per
# storage dtype: a few units in the last place of the storage format, the kernels computing in fp32 within.
# Under the interpreter casts to bf16 truncate rather than round, hence bf16's extra factor.
TOLERANCES = {
    torch.float32: (2e-5, 1e-5),
    torch.float16: (4e-3, 2e-3),
    torch.bfloat16: (4e-2, 1.6e-2),
}


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """`actual` matches the float64 `expected` within TOLERANCES[dtype]; every element must be finite."""
    atol, rtol = TOLERANCES[dtype]
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual = actual.detach().double()
    expected = expected.detach().double()
    bad = ~torch.isfinite(actual)
    assert not bad.any(), f"{name}: {int(bad.sum())} non-finite elements (unwritten?), first at {bad.nonzero()[0].tolist()}"
    err = (actual - expected).abs()
    max_abs = err.max().item() if err.numel() else 0.0
    scale = max(1.0, expected.abs().max().item() if expected.numel() else 0.0)
    rel = (err.norm() / expected.norm().clamp(min=1e-30)).item()
    assert max_abs <= atol * scale, f"{name}: max-abs error {max_abs:.3g} > {atol * scale:.3g} ({dtype})"
    assert rel <= rtol, f"{name}: relative error {rel:.3g} > {rtol:.3g} ({dtype})"


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point():
        return t.fill_(float("nan"))
    if t.dtype != torch.bool:
        return t.fill_(torch.iinfo(t.dtype).min)
    return t


@contextmanager
def poisoned_allocations():
    """While active, torch.empty and torch.empty_like return NaN-filled floating tensors (integer ones: the
    dtype's minimum), so results the kernels never wrote show up as non-finite or wrong."""
    real_empty, real_empty_like = torch.empty, torch.empty_like
    torch.empty = lambda *args, **kwargs: _poison(real_empty(*args, **kwargs))
    torch.empty_like = lambda *args, **kwargs: _poison(real_empty_like(*args, **kwargs))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like


@contextmanager
def threads_set(threads: int):
    """torch's thread count set for a block (the CPU kernels take it as theirs), restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)

"""The memory-lean autograd Functions of the CPU path against plain autograd through the same math, in float64:
values and every gradient, on fresh random inputs (conftest reseeds each test)."""
import pytest
import torch
import torch.nn.functional as F

from cancerllm.model import apply_rope, rope_tables
from kernels import reference, swiglu

TOL = dict(rtol=1e-10, atol=1e-12)   # float64 throughout: only summation order differs


def leaves(*shapes):
    return [torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in shapes]


def grads_of(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out)


def plain_rms_norm(x, weight, eps, residual=None):
    h = x if residual is None else x + residual
    y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight
    return y if residual is None else (y, h)


@pytest.mark.parametrize("shape", [(3, 5, 16), (7, 33)])
def test_rms_norm_matches_autograd(shape):
    x, w = leaves(shape, shape[-1:])
    gy = torch.randn(shape, dtype=torch.float64)
    y = reference.rms_norm(x, w, 1e-5)
    assert torch.allclose(y, plain_rms_norm(x, w, 1e-5), **TOL)
    for g, ref in zip(grads_of(y, [x, w], gy), grads_of(plain_rms_norm(x, w, 1e-5), [x, w], gy)):
        assert torch.allclose(g, ref, **TOL)


def test_fused_residual_rms_norm_matches_autograd():
    x, res, w = leaves((2, 9, 24), (2, 9, 24), (24,))
    gy, gh = torch.randn(2, 9, 24, dtype=torch.float64), torch.randn(2, 9, 24, dtype=torch.float64)
    y, h = reference.rms_norm(x, w, 1e-6, residual=res)
    y_ref, h_ref = plain_rms_norm(x, w, 1e-6, residual=res)
    assert torch.allclose(y, y_ref, **TOL) and torch.equal(h, h_ref)
    got = torch.autograd.grad((y, h), [x, res, w], (gy, gh))
    ref = torch.autograd.grad((y_ref, h_ref), [x, res, w], (gy, gh))
    for g, r in zip(got, ref):
        assert torch.allclose(g, r, **TOL)


def test_fused_residual_rms_norm_when_only_the_norm_is_used():
    """h unused downstream: its incoming gradient is zero, the input gradients come from y alone."""
    x, res, w = leaves((4, 8), (4, 8), (8,))
    y, _ = reference.rms_norm(x, w, 1e-5, residual=res)
    y.sum().backward()
    xr, rr, wr = (t.detach().clone().requires_grad_() for t in (x, res, w))
    plain_rms_norm(xr, wr, 1e-5, residual=rr)[0].sum().backward()
    for g, r in ((x.grad, xr.grad), (res.grad, rr.grad), (w.grad, wr.grad)):
        assert torch.allclose(g, r, **TOL)


def test_rms_norm_bf16_computes_in_fp32():
    x = torch.randn(4, 64, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(64, dtype=torch.bfloat16, requires_grad=True)
    y = reference.rms_norm(x, w)
    y_ref = plain_rms_norm(x.float(), w.float(), 1e-5).to(torch.bfloat16)
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_ref)
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16


def test_swiglu_matches_autograd():
    gate, up = leaves((3, 11, 40), (3, 11, 40))
    gate.data[0, 0, :4] = torch.tensor([0.0, -30.0, 30.0, 1e-8])   # silu's flat tails and its origin
    gy = torch.randn(3, 11, 40, dtype=torch.float64)
    out, ref = swiglu(gate, up), F.silu(gate) * up
    assert torch.allclose(out, ref, **TOL)
    for g, r in zip(grads_of(out, [gate, up], gy), grads_of(ref, [gate, up], gy)):
        assert torch.allclose(g, r, **TOL)


def test_swiglu_refuses_mismatched_inputs():
    with pytest.raises(ValueError, match="swiglu"):
        swiglu(torch.randn(2, 3), torch.randn(2, 4))


def plain_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def test_rope_matches_autograd():
    B, T, H, D = 2, 13, 3, 16
    cos, sin = (t.double() for t in rope_tables(D, 64, 10000.0))
    positions = torch.randint(0, 64, (B, T))
    cos, sin = cos[positions], sin[positions]
    (x,) = leaves((B, T, H, D))
    gy = torch.randn(B, T, H, D, dtype=torch.float64)
    out, ref = apply_rope(x, cos, sin), plain_rope(x, cos, sin)
    assert torch.allclose(out, ref, **TOL)
    assert torch.allclose(grads_of(out, [x], gy)[0], grads_of(ref, [x], gy)[0], **TOL)


def test_rope_saves_only_cos_and_sin():
    cos, sin = rope_tables(8, 16, 10000.0)
    cos, sin = cos[None, :10], sin[None, :10]
    x = torch.randn(1, 10, 2, 8, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        apply_rope(x, cos, sin)
    assert len(saved) == 2 and all(s.data_ptr() in (cos.data_ptr(), sin.data_ptr()) for s in saved)


# (B, T, window, offsets): rows without documents inside and beyond the window; documents shorter and longer than
# the window, one running across a row end, an empty one (repeated offset), one of a single token.
ATTENTION_LAYOUTS = [
    pytest.param(2, 13, None, None, id="rows-causal"),
    pytest.param(2, 13, 5, None, id="rows-longer-than-window"),
    pytest.param(2, 16, 6, [0, 3, 3, 12, 20, 21, 32], id="docs-window-crossing-row-end"),
    pytest.param(1, 24, None, [0, 1, 10, 24], id="docs-causal"),
]


@pytest.mark.parametrize("B, T, window, offsets", ATTENTION_LAYOUTS)
def test_attention_by_segment_matches_the_explicit_softmax(B, T, window, offsets):
    """The CPU path (fused SDPA once per document) against the masked softmax that also yields the LSE."""
    cu_seqlens = None if offsets is None else torch.tensor(offsets, dtype=torch.int32)
    q, k, v = leaves((B, T, 6, 8), (B, T, 2, 8), (B, T, 2, 8))
    out = reference.attention(q, k, v, window=window, cu_seqlens=cu_seqlens)
    expected, _ = reference.attention(q, k, v, window=window, cu_seqlens=cu_seqlens, lse=True)
    torch.testing.assert_close(out, expected, **TOL)
    grad_out = torch.randn_like(out)
    for got, want in zip(grads_of(out, (q, k, v), grad_out), grads_of(expected, (q, k, v), grad_out)):
        torch.testing.assert_close(got, want, **TOL)

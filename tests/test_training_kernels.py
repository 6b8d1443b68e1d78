"""The CPU training kernels: SwiGLU forward and backward (cancerllm/cpu_swiglu.py, csrc/swiglu.cpp), RMSNorm forward
and backward with the residual addition fused in (cancerllm/cpu_rms_norm.py, csrc/rms_norm.cpp) and hashed
dropout (cancerllm/hashed_dropout.py, csrc/dropout.cpp) and the rotary embedding's rotation (cancerllm/cpu_rope.py,
csrc/rope.cpp) against float64 references on fresh random inputs, at odd
sizes and both thread counts; the LoRA branch built on them (train/lora.py's LoRABranch) against autograd through
the same mask; and their refusals."""
import pytest
import torch
import torch.nn as nn

from cancerllm import cpu_rms_norm, cpu_rope, cpu_swiglu, hashed_dropout, kernels
from cancerllm.kernels import reference
from cancerllm.kernels.testing import assert_close, poisoned_allocations, threads_set
from cancerllm.model import apply_rope
from cancerllm.train.lora import LoRALinear

pytestmark = pytest.mark.skipif(not (cpu_swiglu.usable(torch.zeros(1)) and hashed_dropout.usable(torch.zeros(1))
                                     and cpu_rms_norm.usable(torch.zeros(1), torch.zeros(1))
                                     and cpu_rope.usable(torch.zeros(1), torch.zeros(1))),
                                reason="cancerllm._C built without the training kernels")
DTYPES = [torch.float32, torch.bfloat16]
SIZES = [(1,), (7, 3), (2, 37, 129), (3, 4097), (2, 512, 96)]   # past one 256-chunk, one 4096-block, the threshold


def swiglu64(gate, up):
    g, u = gate.double(), up.double()
    return g * torch.sigmoid(g) * u


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", SIZES, ids=str)
def test_swiglu_forward_and_backward_match_float64(size, dtype, threads):
    gate = (torch.randn(size) * 4).to(dtype).requires_grad_()   # past the sigmoid's flat ends
    up = torch.randn(size).to(dtype).requires_grad_()
    grad = torch.randn(size).to(dtype)
    with threads_set(threads), poisoned_allocations():
        out = kernels.swiglu(gate, up)
        out.backward(grad)
    g64, u64 = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    ref = swiglu64(g64, u64)
    ref.backward(grad.double())
    assert out.dtype == dtype and gate.grad.dtype == dtype
    assert_close("out", out, ref, dtype)
    assert_close("grad gate", gate.grad, g64.grad, dtype)
    assert_close("grad up", up.grad, u64.grad, dtype)


def test_swiglu_takes_the_kernel_on_cpu_and_extremes_stay_finite():
    gate = torch.tensor([-1e4, -90.0, -20.0, 0.0, 20.0, 90.0, 1e4], requires_grad=True)
    up = torch.ones(7, requires_grad=True)
    out = kernels.swiglu(gate, up)
    assert out.grad_fn.name() == "CPUSwiGLUFunctionBackward"
    out.sum().backward()
    torch.testing.assert_close(out, swiglu64(gate, up).float(), rtol=1e-6, atol=1e-6)
    assert torch.isfinite(gate.grad).all() and torch.isfinite(up.grad).all()


# [..., dim]: one row; odd widths and row counts; past the threading threshold (2**16 values) with a row count that
# does not split evenly; SmolLM2's width.
NORM_SIZES = [(1, 5), (3, 7, 129), (37, 1031), (2, 100, 576)]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("size", NORM_SIZES, ids=str)
def test_rms_norm_forward_and_backward_match_float64(size, fused_residual, dtype, threads):
    # Rows of different scales (the 1/rms must be per row); an fp32 weight on bf16 activations, as in mixed training.
    x = (torch.randn(size) * torch.rand(size[:-1] + (1,)) * 8).to(dtype).requires_grad_()
    residual = torch.randn(size).to(dtype).requires_grad_() if fused_residual else None
    weight = (1 + 0.3 * torch.randn(size[-1])).requires_grad_()
    with threads_set(threads), poisoned_allocations():
        result = kernels.rms_norm(x, weight, 1e-5, residual=residual)
        outputs = result if fused_residual else (result,)
        grads = [torch.randn_like(o) for o in outputs]
        torch.autograd.backward(outputs, grads)
    assert outputs[0].grad_fn.name() == "CPURMSNormFunctionBackward"
    inputs64 = [t.detach().double().requires_grad_() for t in (x, weight, residual) if t is not None]
    result64 = reference.rms_norm(inputs64[0], inputs64[1], 1e-5, residual=inputs64[2] if fused_residual else None)
    outputs64 = result64 if fused_residual else (result64,)
    torch.autograd.backward(outputs64, [g.double() for g in grads])
    assert outputs[0].dtype == dtype and x.grad.dtype == dtype and weight.grad.dtype == torch.float32
    assert_close("y", outputs[0], outputs64[0], dtype)
    assert_close("grad x", x.grad, inputs64[0].grad, dtype)
    assert_close("grad weight", weight.grad, inputs64[1].grad, dtype)
    if fused_residual:
        assert_close("h", outputs[1], outputs64[1], dtype)
        assert_close("grad residual", residual.grad, inputs64[2].grad, dtype)


def test_rms_norm_frozen_weight_gets_no_gradient_and_bf16_weight_a_bf16_one():
    x = torch.randn(4, 33, dtype=torch.bfloat16, requires_grad=True)
    frozen = torch.ones(33)
    kernels.rms_norm(x, frozen, 1e-6).sum().backward()
    assert frozen.grad is None and x.grad is not None
    weight = torch.ones(33, dtype=torch.bfloat16, requires_grad=True)
    kernels.rms_norm(x, weight, 1e-6).sum().backward()
    assert weight.grad.dtype == torch.bfloat16


def test_rms_norm_grad_weight_is_the_same_bits_for_the_same_thread_count():
    x = torch.randn(300, 257, requires_grad=True)
    weight = torch.randn(257, requires_grad=True)
    grads = []
    for _ in range(2):
        weight.grad = None
        with threads_set(2):
            kernels.rms_norm(x, weight, 1e-5).backward(torch.ones(300, 257))
        grads.append(weight.grad.clone())
    assert torch.equal(*grads)


# [B, T, H, D]: one token and head; odd token and head counts; past the threading threshold (2**15 values).
ROPE_SIZES = [(1, 1, 1, 2), (2, 37, 5, 18), (1, 300, 9, 64)]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", ROPE_SIZES, ids=str)
def test_rope_forward_and_backward_match_float64(size, dtype, threads):
    B, T, H, D = size
    x = torch.randn(size).to(dtype).requires_grad_()
    angles = torch.rand(B, T, D // 2) * 100                 # the angles' tables are fp32, as the model's
    cos, sin = angles.cos(), angles.sin()
    grad = torch.randn(size).to(dtype)
    with threads_set(threads), poisoned_allocations():
        out = apply_rope(x, cos, sin)
        out.backward(grad)
    x64 = x.detach().double().requires_grad_()
    ref = apply_rope(x64, cos.double(), sin.double())        # float64: the PyTorch path (reference_rotate)
    ref.backward(grad.double())
    assert out.dtype == dtype and x.grad.dtype == dtype
    assert_close("out", out, ref, dtype)
    assert_close("grad x", x.grad, x64.grad, dtype)
    # backward is the inverse rotation: rotating forward then back gives x again
    assert_close("round trip", cpu_rope.rotate(out.detach(), cos, sin, -1.0), x.detach().double(), dtype)


@pytest.mark.parametrize("avx512", [True, False], ids=["avx512-if-present", "portable"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", SIZES, ids=str)
def test_hashed_drop_zeroes_its_mask_and_copies_the_rest(size, dtype, threads, avx512):
    x = torch.randn(size).to(dtype)
    p, seed = 0.3, hashed_dropout.draw_seed()
    keep = hashed_dropout.keep_mask(x.numel(), p, seed).view(size)
    with threads_set(threads), poisoned_allocations():
        out = hashed_dropout.drop(x, p, seed, avx512=avx512)
    assert torch.equal(out, torch.where(keep, x, torch.zeros_like(x)))    # kept bits copied, not rescaled


@pytest.mark.parametrize("p", [0.0, 0.05, 0.5, 0.9])
def test_hashed_dropout_keeps_one_minus_p_of_the_values_independently_of_the_seed_and_the_neighbour(p):
    n = 200_000
    masks = [hashed_dropout.keep_mask(n, p, hashed_dropout.draw_seed()) for _ in range(3)]
    independent = p * p + (1 - p) ** 2                      # how often two independent draws agree
    for mask in masks:
        assert abs(mask.double().mean() - (1 - p)) < 5 * ((p * (1 - p) / n) ** 0.5 + 1e-9)
        if 0 < p:   # neighbours (consecutive indices: one hash's lanes) agree as often as independent draws
            assert abs((mask[1:] == mask[:-1]).double().mean() - independent) < 5 * (0.25 / n) ** 0.5
    if 0 < p:   # two seeds' masks agree as often as independent draws would
        assert abs((masks[0] == masks[1]).double().mean() - independent) < 5 * (0.25 / n) ** 0.5
    kernel = hashed_dropout.drop(torch.ones(n), p, 12345) != 0
    assert torch.equal(kernel, hashed_dropout.keep_mask(n, p, 12345))


@pytest.mark.parametrize("call, message", [
    (lambda: hashed_dropout.drop(torch.ones(3), 1.0, 1), "p must be in"),
    (lambda: hashed_dropout.drop(torch.ones(3), -0.1, 1), "p must be in"),
    (lambda: hashed_dropout.drop(torch.ones(3, dtype=torch.float64), 0.1, 1), "x must be float32, bfloat16"),
    (lambda: hashed_dropout.drop(torch.ones(3, device="meta"), 0.1, 1), "x must be a CPU tensor"),
    (lambda: cpu_swiglu.swiglu(torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)),
     "gate must be float32, bfloat16"),
    (lambda: kernels.swiglu(torch.ones(3), torch.ones(4)), "gate and up must share shape"),
    (lambda: cpu_rms_norm.rms_norm(torch.ones(2, 3), torch.ones(3), 1e-5, residual=torch.ones(3, 3)),
     "residual must have x's shape"),
    (lambda: cpu_rope.rotate(torch.ones(1, 4, 2, 8), torch.ones(1, 4, 8), torch.ones(1, 4, 8), 1.0),
     r"cos must be \[B, T, D/2\]"),
    (lambda: cpu_rope.rotate(torch.ones(1, 4, 2, 8), torch.ones(1, 4, 4), torch.ones(1, 4, 4).double(), 1.0),
     "sin must be float32"),
])
def test_refusals_name_the_argument(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


def lora_layer(dtype, dropout, in_features=37, out_features=23, rank=5):
    layer = LoRALinear(nn.Linear(in_features, out_features, bias=False), rank=rank, alpha=10.0, dropout=dropout)
    with torch.no_grad():
        layer.lora_B.normal_(0.0, 0.5)                            # B = 0 would leave A's gradient zero
    return layer.to(dtype)


def autograd_lora(layer, x, keep):
    """The layer's output as autograd computes it in float64 with the dropout mask `keep` made explicit."""
    w, a, b = (t.detach().double().requires_grad_(t.requires_grad) for t in (layer.weight, layer.lora_A, layer.lora_B))
    p = layer.dropout.p if isinstance(layer.dropout, nn.Dropout) and layer.training else 0.0
    dropped = x * keep / (1 - p)
    return x @ w.t() + (dropped @ a.t()) @ b.t() * layer.scale, (a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dropout, training", [(0.0, True), (0.2, True), (0.2, False)])
def test_lora_branch_matches_autograd_through_the_same_mask(dtype, dropout, training):
    layer = lora_layer(dtype, dropout).train(training)
    x = torch.randn(2, 11, 37).to(dtype).requires_grad_()
    grad = torch.randn(2, 11, 23).to(dtype)
    state = torch.get_rng_state()
    y = layer(x)
    y.backward(grad)
    torch.set_rng_state(state)   # the seed the layer drew: the same draw again
    p = dropout if training else 0.0
    keep = (hashed_dropout.keep_mask(x.numel(), p, hashed_dropout.draw_seed()).view(x.shape) if p
            else torch.ones(x.shape, dtype=torch.bool))
    x64 = x.detach().double().requires_grad_()
    ref, (a64, b64) = autograd_lora(layer, x64, keep)
    ref.backward(grad.double())
    assert "LoRABranch" in y.grad_fn.name()
    assert_close("y", y, ref, dtype)
    assert_close("grad x", x.grad, x64.grad, dtype)
    assert_close("grad A", layer.lora_A.grad, a64.grad, dtype)
    assert_close("grad B", layer.lora_B.grad, b64.grad, dtype)
    assert layer.weight.grad is None


def test_lora_branch_draws_a_new_mask_per_call_and_none_in_eval():
    layer = lora_layer(torch.float32, 0.5)
    x = torch.randn(4, 37)
    assert not torch.equal(layer(x), layer(x))
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x), rtol=0, atol=0)

"""Our small-M matmul (cancerllm/gemv.py, csrc/gemv.cpp), both its kernels, against an fp64 product of the same
rounded operands on fresh random inputs, and its refusals of what it cannot read."""
import pytest
import torch

from cancerllm import decode_paths, gemv
from cancerllm.model import DecodeLinear, dequantize_int8, quantize_int8

pytestmark = pytest.mark.skipif(not gemv.available(), reason="cancerllm._C built without the gemv kernels")
# Every kernel this CPU runs, as the options that pick it (AMX applies to bf16 weights; where a kernel is missing,
# the next one runs under its name, as the id says).
KERNELS = [pytest.param({}, id="amx" if gemv.amx_kernel() else "amx-unavailable-next"),
           pytest.param({"amx": False}, id="avx512" if gemv.fast_kernel() else "avx512-unavailable-portable"),
           pytest.param({"portable": True}, id="portable")]
# Odd sizes: K past whole 32-wide steps (masked tails), N past whole tiles and 16- and 24-row blocks, M past 8-row
# tiles and a 16-row AMX block.
SHAPES = [(1, 7, 45), (3, 161, 97), (8, 50, 33), (16, 97, 576), (11, 1536, 576), (1, 576, 1536), (5, 1, 1),
          (18, 40, 70)]
FP32_SUMS = 1e-6   # fp32 sums of <= 1536 products: error within this share of sum |x w| (measured: 4e-8)
BF16_HALF_STEP = 2.0**-8   # rounding to bf16 (8 significant bits) moves a value by at most this share of it


def operands(M, N, K, weights):
    """x (fp32) and the kernel's weight (and scales), with the fp64 weight it stands for."""
    w = torch.randn(N, K) * torch.rand(N, 1)    # rows of different scales
    x = torch.randn(M, K)
    if weights == "int8":
        q, scales = quantize_int8(w)
        return x, (q, scales), dequantize_int8(q, scales).double()
    if weights == "f32":
        return x, (w, None), w.double()
    return x, (w.bfloat16(), None), w.bfloat16().double()


def check_close(y, x, w64, rounded_to_bf16, x_rounded=True):
    """y against (x rounded to bf16, unless not `x_rounded`) @ w64.T in fp64, element by element: fp32 sums' error,
    plus half a bf16 step where the results are rounded to bf16; and over the whole output in the 2-norm."""
    x64 = (x.bfloat16() if x_rounded else x).double()
    expected, magnitude = x64 @ w64.t(), x64.abs() @ w64.abs().t()
    step = BF16_HALF_STEP if rounded_to_bf16 else 0.0
    bound = FP32_SUMS * magnitude + step * (expected.abs() + FP32_SUMS * magnitude)
    error = (y.double() - expected).abs()
    assert (error <= bound).all(), f"max error {error.max():.3g} where the bound is {bound[error > bound][0]:.3g}"
    relative = float((y.double() - expected).norm() / expected.norm())
    assert relative < (BF16_HALF_STEP if rounded_to_bf16 else FP32_SUMS), relative   # measured: 1.7e-3, 9e-8


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("M, N, K", SHAPES)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_bf16_weights_against_fp64(M, N, K, x_dtype, kernel):
    x, (w, _), w64 = operands(M, N, K, "bf16")
    y = gemv.matmul(x.to(x_dtype), w, **kernel)
    assert y.dtype == x_dtype and y.shape == (M, N)
    check_close(y, x, w64, rounded_to_bf16=x_dtype == torch.bfloat16)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("M, N, K", SHAPES)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_int8_weights_against_fp64(M, N, K, x_dtype, kernel):
    """int8 weights: results rounded to bf16 whatever y's dtype (the contract of torch's int8 kernel)."""
    x, (q, scales), w64 = operands(M, N, K, "int8")
    y = gemv.matmul(x.to(x_dtype), q, scales, **kernel)
    assert y.dtype == x_dtype and y.shape == (M, N)
    assert torch.equal(y, y.bfloat16().to(x_dtype))
    check_close(y, x, w64, rounded_to_bf16=True)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("M, N, K", SHAPES)
def test_fp32_weights_against_fp64(M, N, K, kernel):
    """fp32 weights: fp32 throughout, x not rounded."""
    x, (w, _), w64 = operands(M, N, K, "f32")
    y = gemv.matmul(x, w, **kernel)
    assert y.dtype == torch.float32 and y.shape == (M, N)
    check_close(y, x, w64, rounded_to_bf16=False, x_rounded=False)
    if x.numel() > 1:
        assert not torch.equal(y, gemv.matmul(x.bfloat16().float(), w, **kernel))   # x was not rounded


@pytest.mark.skipif(not gemv.fast_kernel(), reason="this CPU runs the portable kernel only")
def test_the_options_force_the_other_kernels():
    """The kernels add in different orders: their fp32 results differ in the last bits somewhere, so `portable=True`
    and (where AMX runs) `amx=False` really run other code (and the tests above cover each)."""
    x, (w, _), _ = operands(8, 256, 1536, "bf16")
    assert not torch.equal(gemv.matmul(x, w), gemv.matmul(x, w, portable=True))
    if gemv.amx_kernel():
        assert not torch.equal(gemv.matmul(x, w), gemv.matmul(x, w, amx=False))
        assert not torch.equal(gemv.matmul(x, w, amx=False), gemv.matmul(x, w, portable=True))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("weights", ["bf16", "int8", "f32"])
def test_threads_split_rows_without_changing_results(weights, kernel):
    x, (q, scales), _ = operands(8, 1000, 320, weights)
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(gemv.matmul(x, q, scales, **kernel))
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(results[0], r) for r in results[1:])



@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("weights", ["bf16", "int8", "f32"])
def test_a_row_gets_the_same_bits_however_many_rows_share_the_call(weights, kernel):
    """Batch-invariant decoding rests on this: the kernel tiles rows of x and of W differently for each M (and
    reduces four sums at a time where it can), yet each output is the same sum in the same order. N and K are odd:
    tiles of W's rows end in a remainder, K in a masked step."""
    x, (w, scales), _ = operands(21, 1000, 577, weights)
    multiply = gemv.Multiplier(w, scales)
    alone = torch.cat([multiply(x[i:i + 1], **kernel) for i in range(len(x))])
    for M in range(2, len(x) + 1):
        together = multiply(x[:M], **kernel)
        assert torch.equal(together, alone[:M]), f"M={M}: {(together != alone[:M]).sum()} outputs differ"

@pytest.mark.parametrize("make, error, message", [
    (lambda: (torch.randn(2, 8).half(), torch.randn(4, 8).bfloat16(), None), TypeError, "x must be float32 or bf"),
    (lambda: (torch.randn(2, 8), torch.randn(4, 8).double(), None), TypeError, "weight must be bfloat16, int8 or"),
    (lambda: (torch.randn(8, 2).t(), torch.randn(4, 8).bfloat16(), None), ValueError, "x must be contiguous"),
    (lambda: (torch.randn(2, 8), torch.randn(8, 4).bfloat16().t(), None), ValueError, "weight must be contiguous"),
    (lambda: (torch.randn(2, 8), torch.zeros(4, 8, dtype=torch.int8), None), ValueError, "need their scales"),
    (lambda: (torch.randn(2, 8), torch.zeros(4, 8, dtype=torch.int8), torch.ones(3).bfloat16()), ValueError,
     r"scales must be bfloat16 of shape \(4,\)"),
    (lambda: (torch.randn(2, 8), torch.zeros(4, 8, dtype=torch.int8), torch.ones(4)), ValueError,
     "scales must be bfloat16"),
    (lambda: (torch.randn(8), torch.randn(4, 8).bfloat16(), None), ValueError, r"x must be \[..., K\] with K=8"),
    (lambda: (torch.randn(2, 8), torch.randn(2, 4, 8).bfloat16(), None), ValueError, r"weight \[N, K\] must be 2-D"),
    (lambda: (torch.randn(2, 9), torch.randn(4, 8).bfloat16(), None), ValueError, r"K=8 .*got \(2, 9\)"),
])
def test_bad_operands_are_refused_by_name(make, error, message):
    x, w, scales = make()
    with pytest.raises(error, match=message):
        gemv.matmul(x, w, scales)


@pytest.mark.parametrize("path, dtype", [("int8", torch.float32), ("int8", torch.bfloat16),
                                         ("int8-bf16", torch.float32), ("aten", torch.bfloat16),
                                         ("onednn", torch.bfloat16), ("aten", torch.float32), ("onednn", torch.float32)])
def test_decode_linear_sends_small_inputs_to_the_kernel_and_the_rest_to_the_path(path, dtype, monkeypatch):
    """With gemv_rows=4 inputs of up to 4 rows take our kernel, larger ones the path, each with the same result
    as the path alone up to the sums' order and one bf16 rounding (both round to bf16 where the path does)."""
    weight = (torch.randn(40, 64) * 0.05).to(dtype)
    fronted, plain = DecodeLinear(weight, path, gemv_rows=4), DecodeLinear(weight, path)
    calls = []
    multiply = gemv.Multiplier.__call__
    monkeypatch.setattr(gemv.Multiplier, "__call__",
                        lambda self, x, **k: calls.append(x.numel() // x.shape[-1]) or multiply(self, x, **k))
    for shape in [(1, 1, 64), (2, 2, 64), (1, 5, 64)]:
        x = torch.randn(shape).to(dtype)
        residual = torch.randn(*shape[:-1], 40).to(dtype)
        with torch.inference_mode():
            pairs = [(fronted(x), plain(x)), (fronted.plus(x, residual), plain.plus(x, residual)),
                     (fronted.silu(x), plain.silu(x)), (fronted.times(x, residual.clone()), plain.times(x, residual.clone()))]
        for actual, expected in pairs:
            assert actual.dtype == expected.dtype and actual.shape == expected.shape
            assert float((actual.double() - expected.double()).norm() / expected.double().norm()) < 1e-2
    assert calls == [1] * 4 + [4] * 4   # the 5-row input went to the path


class Timed:
    """A linear that sleeps `delay(rows)` seconds per call."""

    def __init__(self, delay):
        self.delay = delay

    def __call__(self, x):
        import time
        time.sleep(self.delay(x.shape[0]))
        return x


def test_gemv_rows_are_measured_up_to_the_first_loss_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("CANCERLLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(decode_paths, "EVICT_BYTES", 2**20)
    made = []

    def make(weight, path, gemv_rows=0):   # ours is faster up to 4 rows, slower from 8 on
        made.append(gemv_rows)
        return Timed((lambda rows: 1e-3 if rows <= 4 else 4e-3) if gemv_rows else (lambda rows: 2e-3))

    weight = torch.randn(24, 16)
    assert decode_paths.choose_gemv_rows(weight, "aten", make) == 4
    assert decode_paths.choose_gemv_rows(weight, "aten", make) == 4 and len(made) == 2   # from the cache
    never = lambda weight, path, gemv_rows=0: Timed(lambda rows: 4e-3 if gemv_rows else 1e-3)   # noqa: E731
    assert decode_paths.choose_gemv_rows(torch.randn(25, 16), "aten", never) == 0
    monkeypatch.setattr(gemv, "build_id", lambda: "a rebuilt kernel")   # measured again, not read from the cache
    assert decode_paths.choose_gemv_rows(weight, "aten", never) == 0

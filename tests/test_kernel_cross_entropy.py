"""Cross-entropy and fused linear cross-entropy (Triton, under the interpreter) against float64 references: loss
and gradients on fresh random inputs, ignored and all-ignored targets, z-loss, the in-place gradient option; the
fused op's peak memory and host syncs; bad input. Tolerances: kernels.testing (the loss is fp32 math whatever the
storage dtype)."""
import gc
import importlib
import re

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from cancerllm import cpu_linear_cross_entropy, kernels
from cancerllm.kernels import reference
from cancerllm.kernels.cross_entropy import cross_entropy as triton_cross_entropy
from cancerllm.kernels.linear_cross_entropy import linear_cross_entropy as triton_linear_cross_entropy
from cancerllm.kernels.testing import assert_close, poisoned_allocations

lce_module = importlib.import_module("cancerllm.kernels.linear_cross_entropy")   # the package re-exports the function

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
V = 1500    # the interpreter's vocabulary chunk is 1024: two chunks, the second partial


def random_targets(n, vocab, ignore_index=-100):
    targets = torch.randint(0, vocab, (n,))
    targets[torch.rand(n) < 0.3] = ignore_index
    return targets


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
def test_cross_entropy_matches_reference(dtype, reduction, z_loss):
    logits = (3 * torch.randn(11, V)).to(dtype).requires_grad_()
    targets = random_targets(11, V)
    with poisoned_allocations():
        loss = triton_cross_entropy(logits, targets, reduction=reduction, z_loss=z_loss)
        # Order-one upstream gradients: a scalar one near 0 (mean, sum) scales all of an fp16 dlogits into the
        # subnormals, where rounding to fp16 alone exceeds the tolerance (loss scaling keeps training away).
        grad_loss = torch.rand_like(loss) + 0.5
        loss.backward(grad_loss)
    logits64 = logits.detach().double().requires_grad_()
    loss64 = reference.cross_entropy(logits64, targets, reduction=reduction, z_loss=z_loss)
    loss64.backward(grad_loss.double())
    assert loss.dtype == torch.float32
    assert_close("loss", loss, loss64, torch.float32)
    assert_close("dlogits", logits.grad, logits64.grad, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_inplace_backward_reuses_the_logits(dtype, reduction):
    """inplace_backward=True: the same gradient as out of place, written over the logits' own storage (the leaf's
    .grad is that storage; an upstream mm receives it) instead of a new [N, V] tensor."""
    logits = (3 * torch.randn(13, V)).to(dtype)
    targets = random_targets(13, V)
    upstream_grad = torch.rand(13) + 0.5 if reduction == "none" else torch.tensor(0.7)
    grads, pointers = [], []
    for inplace in (False, True):
        leaf = logits.clone().requires_grad_()
        triton_cross_entropy(leaf, targets, reduction=reduction, inplace_backward=inplace).backward(upstream_grad)
        grads.append(leaf.grad)
        pointers.append((leaf.data_ptr(), leaf.grad.data_ptr()))
    assert torch.equal(grads[0], grads[1])
    assert pointers[0][0] != pointers[0][1] and pointers[1][0] == pointers[1][1]
    hidden, weight = torch.randn(13, 16, requires_grad=True), torch.randn(V, 16)
    upstream = hidden @ weight.T
    seen = []
    upstream.register_hook(lambda grad: seen.append(grad.data_ptr()))
    triton_cross_entropy(upstream, targets, inplace_backward=True).backward()
    assert seen == [upstream.data_ptr()] and hidden.grad is not None


def test_cross_entropy_inplace_backward_guards():
    """Logits that another backward saved (exp keeps its output) raise at backward instead of feeding it the
    gradient; a second backward through one graph raises (the gradient is scaled in place); the dispatcher takes
    the keyword on both paths and checks its type."""
    targets = random_targets(6, 50)
    x = torch.randn(6, 50, requires_grad=True)
    loss = triton_cross_entropy(x.exp(), targets, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    loss = triton_cross_entropy(x, targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    for backend in ("torch", "triton"):
        with kernels.using_backend(backend):
            values = torch.randn(6, 50)
            leaf = values.clone().requires_grad_()
            kernels.cross_entropy(leaf, targets, inplace_backward=True).backward()
            expected = torch.func.grad(lambda t: reference.cross_entropy(t, targets))(values.double())
            assert_close("dlogits", leaf.grad, expected, torch.float32)
    with pytest.raises(TypeError, match="inplace_backward must be a bool"):
        kernels.cross_entropy(leaf, targets, inplace_backward=1)


def test_custom_ignore_index_and_strided_rows():
    """Class 0 as the ignore_index; logits that are a column slice of a wider tensor are read in place."""
    wide = torch.randn(9, V + 7)
    logits = wide[:, :V].requires_grad_()
    targets = random_targets(9, V, ignore_index=0)
    loss = triton_cross_entropy(logits, targets, ignore_index=0)
    loss.backward()
    logits64 = logits.detach().double().requires_grad_()
    loss64 = reference.cross_entropy(logits64, targets, ignore_index=0)
    loss64.backward()
    assert_close("loss", loss, loss64, torch.float32)
    assert_close("dlogits", logits.grad, logits64.grad, torch.float32)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_loss_and_gradient(reduction):
    logits = torch.randn(5, 40, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.full((5,), -100)
    loss = triton_cross_entropy(logits, targets, reduction=reduction)
    loss.sum().backward()
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_cross_entropy_matches_unfused(dtype, reduction):
    """Chunks of 16 over 50 tokens (the last chunk partial); compared with cross_entropy(h @ W.T) in float64."""
    hidden = torch.randn(50, 32, dtype=dtype, requires_grad=True)
    weight = (0.3 * torch.randn(V, 32)).to(dtype).requires_grad_()
    targets = random_targets(50, V)
    with poisoned_allocations():
        loss = triton_linear_cross_entropy(hidden, weight, targets, reduction=reduction, chunk_size=16)
        loss.backward(torch.tensor(0.5, dtype=loss.dtype))
    h64, w64 = (t.detach().double().requires_grad_() for t in (hidden, weight))
    loss64 = reference.cross_entropy(h64 @ w64.T, targets, reduction=reduction)
    (0.5 * loss64).backward()
    assert loss.dtype == dtype          # the reference's result dtype
    assert_close("loss", loss, loss64, dtype)
    assert_close("dhidden", hidden.grad, h64.grad, dtype)
    assert_close("dweight", weight.grad, w64.grad, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("needs", ["hidden", "weight"])
def test_linear_cross_entropy_gradient_of_one_input(dtype, needs):
    """One input requires grad, at odd sizes: 77 tokens (two partial 64-row tiles of the backward kernel) in chunks
    of 8, D=19, and V=1500 in backward vocabulary steps of 128 (the last partial), weighted tokens and an upstream
    gradient of 0.5; that input's gradient equals the float64 unfused one's, the other input gets none."""
    hidden = torch.randn(77, 19, dtype=dtype).requires_grad_(needs == "hidden")
    weight = (0.3 * torch.randn(V, 19)).to(dtype).requires_grad_(needs == "weight")
    targets, token_weights = random_targets(77, V), torch.rand(77) * 2
    assert lce_module.vocabulary_chunk(77, V, 8) == 128
    with poisoned_allocations():
        loss = triton_linear_cross_entropy(hidden, weight, targets, chunk_size=8, token_weights=token_weights)
        loss.backward(torch.tensor(0.5, dtype=loss.dtype))
    h64, w64 = (t.detach().double().requires_grad_() for t in (hidden, weight))
    (0.5 * weighted_unfused(h64, w64, targets, token_weights, "mean")).backward()
    leaf, leaf64, other = (hidden, h64, weight) if needs == "hidden" else (weight, w64, hidden)
    assert_close(f"d{needs}", leaf.grad, leaf64.grad, dtype)
    assert other.grad is None


@pytest.mark.parametrize("N, V_, chunk", [(8192, 32000, 512), (8192, 32000, 1024), (100, 1500, 8), (50, 1500, 16),
                                          (10**6, 32000, 512), (40, 300, 64), (0, 300, 64)])
def test_vocabulary_chunk_follows_chunk_size(N, V_, chunk):
    """The backward's [N, Vc] logits are no larger than the forward's [chunk_size, V] ones, in whole 128-row steps,
    unless one 128-row step is already larger; the whole vocabulary when there are no more tokens than a chunk."""
    vc = lce_module.vocabulary_chunk(N, V_, chunk)
    if N <= chunk:
        assert vc == V_
    else:
        assert vc % 128 == 0 and 128 <= vc <= V_
        assert N * vc <= chunk * V_ or vc == 128
        assert N * (vc + 128) > chunk * V_       # the largest such step


def peak_bytes(fn):
    """Peak bytes held by torch's CPU allocator while fn() runs, above what was held before (the profiler's
    allocation and free events, paired by address, so blocks freed from earlier work do not count)."""
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []
    def collect(nodes):
        for node in nodes:
            if node.tag == torch._C._profiler._EventType.Allocation:
                events.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.ptr))
            collect(node.children)
    collect(prof.profiler.kineto_results.experimental_event_tree())
    live, held, peak = {}, 0, 0
    for _, size, ptr in sorted(events):
        if size > 0:
            live[ptr] = size
            held += size
        elif ptr in live:
            held -= live.pop(ptr)
        peak = max(peak, held)
    return peak


def test_linear_cross_entropy_peak_memory():
    """Forward + backward in bf16 at 7B's proportions (N = 2D, chunks of N / 16: N=8192, D=4096, 512): the fused op
    holds grad_hidden, the bf16 grad_weight, the backward's [N, Vc] logits and the lse and losses, plus one forward
    logits chunk (the interpreter keeps its last launch's arguments until the garbage collector runs) and what a CPU
    bf16 matmul allocates for itself (fp32 operand copies; cuBLAS allocates nothing per call), measured apart. Less
    that CPU workspace it stays under 0.25x of the naive loss's peak (three [N, V] bf16 tensors): 0.22x here, 0.23x
    at 7B (module docstring). A token-chunked grad_weight's fp32 [V, D] accumulator alone is 0.33x and fails."""
    N, D, V_, C = 256, 128, 3000, 16
    hidden = torch.randn(N, D, dtype=torch.bfloat16, requires_grad=True)
    weight = (0.1 * torch.randn(V_, D)).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, V_, (N,))
    def naive():
        F.cross_entropy(hidden @ weight.T, targets).backward()
        hidden.grad = weight.grad = None
    def fused():
        triton_linear_cross_entropy(hidden, weight, targets, chunk_size=C).backward()
        hidden.grad = weight.grad = None
    naive_peak, fused_peak = peak_bytes(naive), peak_bytes(fused)
    vc = lce_module.vocabulary_chunk(N, V_, C)
    h, w = hidden.detach(), weight.detach()
    logits, grad_rows = torch.empty(N, vc, dtype=torch.bfloat16), torch.empty(vc, D, dtype=torch.bfloat16)
    cpu_matmul = max(peak_bytes(lambda: torch.mm(h, w[:vc].T, out=logits)),
                     peak_bytes(lambda: torch.mm(logits.T, h, out=grad_rows)))
    expected = N * D * 2 + V_ * D * 2 + N * vc * 2 + 2 * N * 4 + C * V_ * 2 + cpu_matmul
    assert vc < V_
    assert naive_peak >= 3 * N * V_ * 2
    assert fused_peak <= expected * 1.01, (fused_peak, expected)
    assert (fused_peak - cpu_matmul) / naive_peak <= 0.25, (fused_peak, cpu_matmul, naive_peak)


class HostSyncCounter(TorchDispatchMode):
    """Counts the ops that make the host wait for the device: a value read back (bool(), item()) or nonzero's
    data-dependent size."""
    SYNCING = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in self.SYNCING
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("ignored_fraction", [0.0, 0.5])
def test_linear_cross_entropy_dispatch_syncs_once(monkeypatch, kernel_backend, ignored_fraction):
    """Past the input checks (validate.py's own reads), the dispatcher reads the device once per call, whether or
    not rows are dropped."""
    kernel_backend("torch")
    monkeypatch.setattr(kernels, "check_linear_cross_entropy", lambda *args: None)
    targets = torch.randint(0, 50, (20,))
    targets[torch.rand(20) < ignored_fraction] = -100
    hidden = torch.randn(20, 8, requires_grad=True)
    with HostSyncCounter() as syncs:
        kernels.linear_cross_entropy(hidden, torch.randn(50, 8), targets, token_weights=torch.rand(20))
    assert syncs.count == 1


def test_linear_cross_entropy_all_ignored():
    hidden = torch.randn(6, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    loss = triton_linear_cross_entropy(hidden, weight, torch.full((6,), -100), chunk_size=4)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(hidden.grad, torch.zeros_like(hidden)) and torch.equal(weight.grad, torch.zeros_like(weight))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("ignored_fraction", [0.8, 1.0])
def test_linear_cross_entropy_dispatch_drops_ignored_rows(kernel_backend, backend, ignored_fraction):
    """The dispatcher computes logits only for rows that carry loss (SFT prompts carry none); loss and gradients
    still equal the float64 unfused loss over all rows, and ignored rows get exactly zero gradient."""
    kernel_backend(backend)
    hidden = torch.randn(37, 24, requires_grad=True)
    weight = (0.3 * torch.randn(V, 24)).requires_grad_()
    targets = torch.randint(0, V, (37,))
    ignored = torch.rand(37) < ignored_fraction
    targets[ignored] = -100
    loss = kernels.linear_cross_entropy(hidden, weight, targets, chunk_size=8)
    loss.backward()
    h64, w64 = (t.detach().double().requires_grad_() for t in (hidden, weight))
    loss64 = reference.cross_entropy(h64 @ w64.T, targets)
    loss64.backward()
    assert_close("loss", loss, loss64, torch.float32)
    assert_close("dhidden", hidden.grad, h64.grad, torch.float32)
    assert_close("dweight", weight.grad, w64.grad, torch.float32)
    assert torch.equal(hidden.grad[ignored], torch.zeros_like(hidden.grad[ignored]))


def weighted_unfused(hidden, weight, targets, token_weights, reduction):
    """sum(w * loss) or its weighted mean, from the float64 per-token losses of the unfused op."""
    losses = reference.cross_entropy(hidden @ weight.T, targets, reduction="none")
    w = torch.where(targets != -100, token_weights.double(), 0.0)
    return (w * losses).sum() / (w.sum() if reduction == "mean" else 1.0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_cross_entropy_token_weights(kernel_backend, backend, dtype, reduction):
    """Per-token weights (zero on some valid tokens, arbitrary on ignored ones) on both backends, chunks of 8 over
    45 tokens: loss and both gradients equal the float64 weighted sum / weighted mean of the unfused losses."""
    kernel_backend(backend)
    hidden = torch.randn(45, 24, dtype=dtype, requires_grad=True)
    weight = (0.3 * torch.randn(V, 24)).to(dtype).requires_grad_()
    targets = random_targets(45, V)
    token_weights = torch.rand(45) * 3
    token_weights[::7] = 0.0
    with poisoned_allocations():
        loss = kernels.linear_cross_entropy(hidden, weight, targets, reduction=reduction, chunk_size=8,
                                            token_weights=token_weights)
        loss.backward(torch.tensor(0.5, dtype=loss.dtype))
    h64, w64 = (t.detach().double().requires_grad_() for t in (hidden, weight))
    loss64 = weighted_unfused(h64, w64, targets, token_weights, reduction)
    (0.5 * loss64).backward()
    assert_close("loss", loss, loss64, dtype)
    assert_close("dhidden", hidden.grad, h64.grad, dtype)
    assert_close("dweight", weight.grad, w64.grad, dtype)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_linear_cross_entropy_unit_weights_and_zero_weights(kernel_backend, backend):
    """Weights of 1 give the unweighted loss exactly; weights summing to 0 give loss 0 and zero gradients."""
    kernel_backend(backend)
    hidden, weight, targets = torch.randn(13, 16), torch.randn(300, 16), random_targets(13, 300)
    plain = kernels.linear_cross_entropy(hidden, weight, targets, chunk_size=4)
    ones = kernels.linear_cross_entropy(hidden, weight, targets, chunk_size=4, token_weights=torch.ones(13))
    assert torch.allclose(plain, ones, rtol=1e-6, atol=0)
    hidden.requires_grad_()
    zero = kernels.linear_cross_entropy(hidden, weight, targets, chunk_size=4, token_weights=torch.zeros(13))
    zero.backward()
    assert zero.item() == 0.0 and torch.equal(hidden.grad, torch.zeros_like(hidden))


def test_linear_cross_entropy_dispatch_passes_only_loss_rows(monkeypatch, kernel_backend):
    """Whichever CPU path runs (the C++ one when the extension is built, else the reference) sees the 2 loss rows."""
    seen = []
    for module in (reference, cpu_linear_cross_entropy):
        def recording(hidden, *args, real=module.linear_cross_entropy, **kwargs):
            seen.append(hidden.shape[0])
            return real(hidden, *args, **kwargs)
        monkeypatch.setattr(module, "linear_cross_entropy", recording)
    kernel_backend("torch")
    targets = torch.tensor([-100, 3, -100, -100, 7, -100])
    kernels.linear_cross_entropy(torch.randn(6, 8), torch.randn(10, 8), targets)
    assert seen == [2]


def test_dispatch_forced_triton_on_cpu(kernel_backend):
    kernel_backend("triton")
    logits, targets = torch.randn(4, 30), torch.randint(0, 30, (4,))
    expected = reference.cross_entropy(logits.double(), targets)
    assert_close("loss", kernels.cross_entropy(logits, targets), expected, torch.float32)
    assert_close("loss", kernels.linear_cross_entropy(torch.eye(4), logits.T.contiguous(), targets),
                 expected, torch.float32)


@pytest.mark.parametrize("make_args, error, message", [
    (lambda x, t: (x[None], t), ValueError, "logits must be 2-D"),
    (lambda x, t: (x, t[:-1]), ValueError, "targets has 5 entries but there are 6 rows"),
    (lambda x, t: (x, t.float()), TypeError, "targets must have dtype"),
    (lambda x, t: (x, t.to("meta")), ValueError, "logits, targets must share one device"),
    (lambda x, t: (x, torch.tensor([0, 1, 2, 3, 4, 10])), ValueError, r"targets\[5\]=10 is outside \[0, 10\)"),
    (lambda x, t: (x, torch.tensor([0, 1, -5, 3, 4, 9])), ValueError, r"targets\[2\]=-5"),
])
def test_cross_entropy_rejects_bad_input(make_args, error, message):
    with pytest.raises(error, match=message):
        kernels.cross_entropy(*make_args(torch.randn(6, 10), torch.randint(0, 10, (6,))))


def test_cross_entropy_rejects_bad_options():
    logits, targets = torch.randn(6, 10), torch.randint(0, 10, (6,))
    with pytest.raises(ValueError, match="reduction must be one of"):
        kernels.cross_entropy(logits, targets, reduction="avg")
    with pytest.raises(ValueError, match="z_loss must be a non-negative number"):
        kernels.cross_entropy(logits, targets, z_loss=-1.0)


@pytest.mark.parametrize("make_args, kwargs, message", [
    (lambda h, w, t: (h, w[:, :-1], t), {}, r"weight must be \[V, D\] with hidden's D=8"),
    (lambda h, w, t: (h, w.half(), t), {}, "hidden, weight must share one dtype"),
    (lambda h, w, t: (h, w, t), {"reduction": "none"}, "reduction must be one of 'mean', 'sum'"),
    (lambda h, w, t: (h, w, t), {"chunk_size": 0}, "chunk_size must be a positive int"),
    (lambda h, w, t: (h, w, t + 20), {}, "is outside"),
    (lambda h, w, t: (h, w, t), {"token_weights": torch.ones(5)}, r"token_weights must be \[N\] with hidden's N=6"),
    (lambda h, w, t: (h, w, t), {"token_weights": torch.ones(6, 1)}, "token_weights must be 1-D"),
    (lambda h, w, t: (h, w, t), {"token_weights": torch.tensor([1., 1, -1, 1, 1, 1])}, "finite and >= 0"),
    (lambda h, w, t: (h, w, t), {"token_weights": torch.tensor([1., 1, 1, float("nan"), 1, 1])}, "finite and >= 0"),
])
def test_linear_cross_entropy_rejects_bad_input(make_args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        kernels.linear_cross_entropy(*make_args(torch.randn(6, 8), torch.randn(20, 8), torch.randint(0, 20, (6,))),
                                     **kwargs)


COMPILE_FOR_H100 = r'''
import importlib, os, re, subprocess, tempfile, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
CUOBJDUMP = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
TYPES = {"LOGITS": "*bf16", "GRAD": "*bf16", "TARGETS": "*i64", "N": "i32", "V": "i32", "v0": "i32",
         "ignore_index": "i32", "stride_row": "i32", "stride_grad_row": "i32", "z_loss": "fp32"}

def compile_for_sm90(module, name, constexprs, aligned, num_warps):
    # Other pointers are fp32; `aligned` are the arguments the JIT sees divisible by 16 at 7B shapes.
    fn = getattr(importlib.import_module(f"cancerllm.kernels.{module}"), name)
    sig = {n: "constexpr" if n in constexprs else TYPES.get(n, "*fp32") for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
                    attrs={(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in aligned})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"]); f.flush()
        usage = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    ptx = compiled.asm["ptx"]
    print(name, "stack", re.search(r"STACK:(\d+)", usage).group(1), "v4", ptx.count("ld.global.v4"),
          ptx.count("st.global.v4"))

block_n, block_v = importlib.import_module("cancerllm.kernels.linear_cross_entropy").GRAD_TILE
compile_for_sm90("linear_cross_entropy", "_logits_to_grad",
                 dict(MEAN=True, WEIGHTED=True, BLOCK_N=block_n, BLOCK_V=block_v), ("LOGITS", "V"), 4)
compile_for_sm90("cross_entropy", "_cross_entropy_fwd",
                 dict(MEAN=True, WEIGHTED=True, COMPUTE_GRAD=True, STORE_LSE=True, BLOCK_V=8192),
                 ("LOGITS", "GRAD", "stride_row", "stride_grad_row", "V"), 16)
'''


def test_linear_cross_entropy_kernels_compile_for_an_h100():
    """The fused op's two Triton kernels at their GPU configurations (the backward's elementwise kernel at its
    tile, the cross-entropy kernel storing lse for a 32k vocabulary), compiled for sm_90 as the JIT would at 7B
    shapes: no register spills, and the bandwidth-bound passes load and store bf16 16 bytes at a time."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", COMPILE_FOR_H100], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if line.startswith("_"))
    assert set(lines) == {"_logits_to_grad", "_cross_entropy_fwd"}, result.stdout
    for name, line in lines.items():
        stack, loads, stores = map(int, re.match(r"stack (\d+) v4 (\d+) (\d+)", line).groups())
        assert stack == 0 and loads > 0 and stores > 0, (name, line)

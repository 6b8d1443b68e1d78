"""Kernel benchmarks: attention, RMSNorm, cross-entropy and fused linear cross-entropy against their peers.

On CUDA: fwd, bwd and fwd+bwd times (triton's do_bench: CUDA events, median) at 7B-like shapes (bf16) for our
Triton kernels; "eager", the op PyTorch users write in the storage dtype (scaled_dot_product_attention's own
dispatch, F.rms_norm, F.cross_entropy, F.cross_entropy(h @ W.T)); torch.compile of it; SDPA pinned to its flash
and cuDNN kernels (causal flag, no explicit mask, grouped K/V as they are and repeated to every query head, to see
which of their paths is fast); and xformers / liger-kernel when installed ("missing" otherwise). TFLOP/s for
attention (4*B*H*T*T_eff*D forward, 2.5x that backward), GB/s for the memory-bound ops, the share of the card's
peak, peak memory, and "ours/peer" = peer time / our time (above 1: ours is faster). Sliding-window and
packed-document rows are ours (and xformers) alone: SDPA's fast kernels cannot mask either.
On CPU: the reference paths at CPU-sized shapes (bf16 attention at SmolLM2's heads also with our backward unfused as
its peer), and the peak memory of the chunked linear cross-entropy against
the naive F.cross_entropy(x @ W.T) at V=32000, each measured as the peak RSS growth of its own subprocess.

    python bench/kernels.py [--quick]

Prints the tables and writes bench/results/kernels-<time>.json.
"""
import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine, print_table, time_fn, write_results  # noqa: E402

from cancerllm import cpu_attention, kernels  # noqa: E402

MACHINE = machine()
COLUMNS = ["op", "shape", "provider", "fwd_ms", "bwd_ms", "fwdbwd_ms", "tflops", "gbps", "pct_peak", "peak_mb",
           "ours/peer", "status"]


# ---------------------------------------------------------------------------------------------- measuring

def measure(fn, leaves, *, warmup=3, reps=10) -> dict:
    """Times fn() forward and forward+backward (bwd = the difference), gradients of `leaves` reset each call;
    on CUDA also the peak memory allocated above what was live before the call."""
    out = fn()
    grad = torch.randn_like(out)
    del out

    def step(backward):
        for t in leaves:
            t.grad = None
        out = fn()
        if backward:
            out.backward(grad)

    fwd = time_fn(lambda: step(False), warmup=warmup, reps=reps)
    both = time_fn(lambda: step(True), warmup=warmup, reps=reps)
    row = {"fwd_ms": fwd, "bwd_ms": max(both - fwd, 0.0), "fwdbwd_ms": both}
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(True)
        torch.cuda.synchronize()
        row["peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return row


def run_providers(op, shape, providers, leaves, *, flops=None, bytes_moved=None, peak_tflops=None,
                  peak_gbps=None, warmup=None, reps=None):
    """One row per provider (a provider of None: a peer that is not installed, reported as missing; one that
    raises, e.g. an SDPA backend refusing the inputs, reported with its error). flops / bytes_moved: (fwd, bwd)
    counts giving TFLOP/s or GB/s (fwd+bwd, and each pass apart), as a share of peak_tflops / peak_gbps
    (default: the card's data sheet)."""
    peak_tflops = peak_tflops or MACHINE.get("peak_tflops_bf16")
    peak_gbps = peak_gbps or MACHINE.get("peak_gbps")
    default_warmup, default_reps = (3, 10) if torch.cuda.is_available() else (1, 2)
    rows = []
    for name, fn in providers.items():
        row = {"op": op, "shape": shape, "provider": name, "status": "ok"}
        rows.append(row)
        if fn is None:
            row["status"] = "missing"
            continue
        try:
            row.update(measure(fn, leaves, warmup=default_warmup if warmup is None else warmup,
                               reps=reps or default_reps))
        except torch.cuda.OutOfMemoryError:
            row["status"] = "out of memory"
            torch.cuda.empty_cache()
            continue
        except Exception as e:   # e.g. an SDPA backend refusing the inputs, a peer that cannot run on this device
            row.update(status="error", error=f"{type(e).__name__}: {str(e).strip()[:200]}")
            continue
        for key, counts, scale, peak in (("tflops", flops, 1e12, peak_tflops), ("gbps", bytes_moved, 1e9, peak_gbps)):
            if not counts:
                continue
            row[key] = sum(counts) / (row["fwdbwd_ms"] / 1e3) / scale
            row[f"fwd_{key}"] = counts[0] / (row["fwd_ms"] / 1e3) / scale
            row[f"bwd_{key}"] = counts[1] / (row["bwd_ms"] / 1e3) / scale if row["bwd_ms"] > 0 else None
            row["pct_peak"] = 100 * row[key] / peak if peak else None
    ours = next((r for r in rows if r["provider"] == "ours" and "fwdbwd_ms" in r), None)
    for r in rows:
        if ours and "fwdbwd_ms" in r:
            r["ours/peer"] = r["fwdbwd_ms"] / ours["fwdbwd_ms"]
    return rows


def optional(module):
    """The module, or None when it is not installed (or fails to import)."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        return None


def compiled_peer(fn, compile_reference):
    return torch.compile(fn) if compile_reference else None


# ---------------------------------------------------------------------------------------------- ops

def effective_keys(T, window):
    """Mean number of keys a query sees under the causal window."""
    w = min(window or T, T)
    return (w * (w + 1) / 2 + (T - w) * w) / T


def sdpa(q, k, v, *, backend=None, repeat_kv=False):
    """scaled_dot_product_attention on our [B, T, H, D] layout, causal flag and no explicit mask (a mask sends it
    to the slower kernels); pinned to `backend` (an SDPBackend) when given. repeat_kv: K/V copied to every query
    head (the copy is timed too) instead of enable_gqa, for kernels whose grouped path is missing or slow."""
    from torch.nn.attention import sdpa_kernel
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    group = q.shape[2] // k.shape[2]
    if repeat_kv:
        kt, vt = kt.repeat_interleave(group, dim=1), vt.repeat_interleave(group, dim=1)

    def run():
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=not repeat_kv and group > 1)
    if backend is None:
        return run().transpose(1, 2)
    with sdpa_kernel([backend]):
        return run().transpose(1, 2)


def sdpa_peers(q, k, v):
    """SDPA's flash and cuDNN kernels, each with grouped and with repeated K/V (see sdpa)."""
    from torch.nn.attention import SDPBackend
    peers = {}
    for label, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        for repeat_kv in (False, True):
            name = f"sdpa-{label}" + ("-repeat-kv" if repeat_kv else "")
            peers[name] = lambda b=backend, r=repeat_kv: sdpa(q, k, v, backend=b, repeat_kv=r)
    return peers


def bench_attention(B, T, Hq, Hkv, D, window, dtype, device, *, cu_seqlens=None, peers=True, unfused_peer=False,
                    **run_options):
    """Causal attention rows. Peers (eager SDPA, its flash and cuDNN kernels, xformers) run only on plain causal
    rows: none of SDPA's fast kernels takes a sliding window or packed documents. cu_seqlens (packed documents)
    wants B=1. unfused_peer (CPU, one document per row): ours with the bf16 backward's score matmuls and softmax as
    separate passes (cpu_attention.attention(fused_backward=False)), the fused pass's own before/after."""
    q = torch.randn(B, T, Hq, D, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(B, T, Hkv, D, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(B, T, Hkv, D, device=device, dtype=dtype, requires_grad=True)
    window = None if window is not None and window >= T else window
    providers = {"ours": lambda: kernels.attention(q, k, v, window=window, cu_seqlens=cu_seqlens)}
    plain = window is None and cu_seqlens is None
    if unfused_peer:
        providers["unfused-backward"] = lambda: torch.stack([
            cpu_attention.attention(q[b], k[b], v[b], window, fused_backward=False) for b in range(B)])
    if peers and plain:
        providers["eager"] = lambda: sdpa(q, k, v)
        providers.update(sdpa_peers(q, k, v))
    if peers and device == "cuda":
        providers["xformers"] = (lambda: kernels.xformers_attention(q, k, v, window=window, cu_seqlens=cu_seqlens)
                                 ) if optional("xformers.ops") else None
    lengths = [T] * B if cu_seqlens is None else cu_seqlens.diff().tolist()
    fwd_flops = 4 * Hq * D * sum(n * effective_keys(n, window) for n in lengths if n)   # query-key pairs
    shape = f"B{B} T{T} H{Hq}/{Hkv} D{D} W{window}" + (f" docs{len(cu_seqlens) - 1}" if cu_seqlens is not None
                                                       else "")
    return run_providers("attention", shape, providers, [q, k, v], flops=(fwd_flops, 2.5 * fwd_flops),
                         **run_options)


def eager_rms_norm(x, w, eps, residual=None):
    """RMSNorm as PyTorch runs it in the storage dtype: F.rms_norm, after the residual add."""
    h = x if residual is None else x + residual
    y = F.rms_norm(h, (h.shape[-1],), w, eps)
    return y if residual is None else (y, h)


def liger_rms_norm(N, w, device, dtype):
    """Liger's RMSNorm holding our weight's values (its own Parameter, which must stay one), not in place so that
    the gradient given to backward stays intact between timed calls; None when liger-kernel is not installed."""
    liger = optional("liger_kernel.transformers")
    if liger is None:
        return None
    norm = liger.LigerRMSNorm(N, eps=1e-5, in_place=False).to(device, dtype)
    with torch.no_grad():
        norm.weight.copy_(w)
    return norm


def bench_rms_norm(M, N, dtype, device, compile_reference, residual, **run_options):
    x = torch.randn(M, N, device=device, dtype=dtype, requires_grad=True)
    res = torch.randn(M, N, device=device, dtype=dtype, requires_grad=True) if residual else None
    w = (1 + 0.1 * torch.randn(N, device=device, dtype=dtype)).requires_grad_()
    first = (lambda out: out[0] + out[1]) if residual else (lambda out: out)   # one output to backprop through
    compiled = compiled_peer(eager_rms_norm, compile_reference and device == "cuda")
    providers = {"ours": lambda: first(kernels.rms_norm(x, w, 1e-5, residual=res)),
                 "eager": lambda: first(eager_rms_norm(x, w, 1e-5, residual=res))}
    if compiled:
        providers["compile"] = lambda: first(compiled(x, w, 1e-5, residual=res))
    leaves = [t for t in (x, w, res) if t is not None]
    if not residual:   # Liger's plain RMSNorm; its fused-add variant has another contract
        norm = liger_rms_norm(N, w, device, dtype)
        providers["liger"] = (lambda: norm(x)) if norm is not None else None
        leaves += [norm.weight] if norm is not None else []
    elt = x.element_size()
    streams = 2 if residual else 1                 # inputs read (x, residual)
    fwd_bytes = M * N * elt * 2 * streams          # read inputs, write y (and h)
    bwd_bytes = M * N * elt * (3 + residual)       # read dy (and dh), h; write dx
    shape = f"{M}x{N}" + (" +residual" if residual else "")
    return run_providers("rms_norm", shape, providers, leaves, bytes_moved=(fwd_bytes, bwd_bytes), **run_options)


def bench_cross_entropy(N, V, dtype, device, compile_reference, **run_options):
    logits = torch.randn(N, V, device=device, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, V, (N,), device=device)
    compiled = compiled_peer(F.cross_entropy, compile_reference and device == "cuda")
    providers = {"ours": lambda: kernels.cross_entropy(logits, targets),
                 "eager": lambda: F.cross_entropy(logits, targets)}
    if compiled:
        providers["compile"] = lambda: compiled(logits, targets)
    liger = optional("liger_kernel.transformers")
    loss = liger.LigerCrossEntropyLoss() if liger else None
    providers["liger"] = (lambda: loss(logits, targets)) if loss else None
    elt = logits.element_size()
    return run_providers("cross_entropy", f"{N}x{V}", providers, [logits],
                         bytes_moved=(3 * N * V * elt, 2 * N * V * elt), **run_options)   # fwd: read twice + grad


def bench_linear_cross_entropy(N, D, V, dtype, device, **run_options):
    hidden = torch.randn(N, D, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(V, D, device=device, dtype=dtype) * D ** -0.5).requires_grad_()
    targets = torch.randint(0, V, (N,), device=device)
    providers = {"ours": lambda: kernels.linear_cross_entropy(hidden, weight, targets),
                 "naive": lambda: F.cross_entropy(hidden @ weight.T, targets)}
    liger = optional("liger_kernel.transformers")
    loss = liger.LigerFusedLinearCrossEntropyLoss() if liger else None
    providers["liger"] = (lambda: loss(weight, hidden, targets)) if loss else None
    flops = 2 * N * D * V
    return run_providers("linear_cross_entropy", f"N{N} D{D} V{V}", providers, [hidden, weight],
                         flops=(flops, 2 * flops), **run_options)


# ---------------------------------------------------------------------------------------------- CPU memory

def _status_kb(key):
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def memory_probe(kind, N, D, V):
    """Run in a subprocess: peak RSS growth (MB) of one fwd+bwd of the naive or the chunked loss, inputs excluded."""
    hidden = torch.randn(N, D, requires_grad=True)
    weight = (torch.randn(V, D) * D ** -0.5).requires_grad_()
    targets = torch.randint(0, V, (N,))
    Path("/proc/self/clear_refs").write_text("5")          # reset the high-water mark to the current RSS
    base = _status_kb("VmRSS")
    if kind == "naive":
        loss = F.cross_entropy(hidden @ weight.T, targets)
    else:
        loss = kernels.linear_cross_entropy(hidden, weight, targets)
    loss.backward()
    print(json.dumps({"peak_mb": (_status_kb("VmHWM") - base) / 1024}))


def cpu_memory_comparison(N, D, V):
    peaks = {}
    for kind in ("naive", "fused"):
        result = subprocess.run([sys.executable, __file__, "--memory-probe", kind, "--n", str(N), "--d", str(D),
                                 "--v", str(V)], capture_output=True, text=True, check=True,
                                env={**os.environ, "CANCERLLM_KERNELS": "torch"})
        peaks[kind] = json.loads(result.stdout.strip().splitlines()[-1])["peak_mb"]
    ratio = peaks["fused"] / peaks["naive"]
    return {"N": N, "D": D, "V": V, "naive_peak_mb": peaks["naive"], "fused_peak_mb": peaks["fused"],
            "ratio": ratio, "target": 0.25, "meets_target": ratio <= 0.25}


# ---------------------------------------------------------------------------------------------- main

def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile peers")
    parser.add_argument("--memory-probe", choices=["naive", "fused"], help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--v", type=int, default=32000)
    args = parser.parse_args()
    if args.memory_probe:
        return memory_probe(args.memory_probe, args.n, args.d, args.v)

    print("machine:", MACHINE)
    rows, extra = [], {}
    if torch.cuda.is_available():
        dt, dev, comp = torch.bfloat16, "cuda", not args.no_compile
        attn_shapes = [(8, 1024), (4, 2048), (2, 4096), (1, 8192), (1, 16384)]
        for B, T in attn_shapes[2:4] if args.quick else attn_shapes:
            rows += bench_attention(B, T, 32, 8, 128, None, dt, dev)
        rows += bench_attention(1, 16384, 32, 8, 128, 4096, dt, dev)   # Mistral's window, ours alone
        for M, N in [(4096, 4096), (8192, 32000)]:
            for residual in (False, True):
                rows += bench_rms_norm(M, N, dt, dev, comp, residual)
        for N, V in [(4096, 4096), (8192, 32000)]:
            rows += bench_cross_entropy(N, V, dt, dev, comp)
        for N in ([8192] if args.quick else [8192, 32768]):
            rows += bench_linear_cross_entropy(N, 4096, 32000, dt, dev)
    else:
        dt, dev = torch.float32, "cpu"
        rows += bench_attention(1, 1024, 8, 2, 64, None, dt, dev)
        for T in (512, 1024):   # SmolLM2's heads in bf16, the training step's path
            rows += bench_attention(1, T, 9, 3, 64, None, torch.bfloat16, dev, unfused_peer=True)
        rows += bench_rms_norm(1024, 1024, dt, dev, False, residual=True)
        rows += bench_cross_entropy(1024, 32000, dt, dev, False)
        rows += bench_linear_cross_entropy(2048, 256, 32000, dt, dev)
        print("\nCPU: 'ours' is the reference path (the Triton kernels run on CUDA only)")
    print_table(rows, COLUMNS)

    memory = cpu_memory_comparison(args.n, args.d, args.v)
    extra["cpu_linear_cross_entropy_memory"] = memory
    print(f"\nlinear cross-entropy peak memory on CPU (RSS growth, fwd+bwd, N={args.n} D={args.d} V={args.v} fp32): "
          f"chunked {memory['fused_peak_mb']:.0f} MB vs naive {memory['naive_peak_mb']:.0f} MB, "
          f"ratio {memory['ratio']:.3f} (target <= 0.25: {'met' if memory['meets_target'] else 'NOT met'})")
    path = write_results("kernels", rows, **extra)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

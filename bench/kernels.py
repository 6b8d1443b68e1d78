"""Kernel benchmarks: attention, RMSNorm, cross-entropy and fused linear cross-entropy against their peers.

On CUDA: fwd, bwd and fwd+bwd times at 7B-like shapes (bf16) for our Triton kernels, PyTorch eager (the reference
ops), torch.compile of the reference, scaled_dot_product_attention, and xformers / liger-kernel when installed;
TFLOP/s for attention (4*B*H*T*T_eff*D forward, 2.5x that backward), GB/s for the memory-bound ops, the share of
the card's peak, peak memory, and "ours/peer" = peer time / our time (above 1: ours is faster).
On CPU: the reference paths at CPU-sized shapes, and the peak memory of the chunked linear cross-entropy against
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, print_table, time_fn, write_results  # noqa: E402

from cancerllm import kernels  # noqa: E402
from cancerllm.kernels import reference  # noqa: E402

MACHINE = machine()
COLUMNS = ["op", "shape", "provider", "fwd_ms", "bwd_ms", "fwdbwd_ms", "tflops", "gbps", "pct_peak", "peak_mb",
           "ours/peer"]


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


def run_providers(op, shape, providers, leaves, *, flops=None, bytes_moved=None):
    """One row per provider; flops / bytes_moved: (fwd, bwd) counts giving TFLOP/s or GB/s of fwd+bwd."""
    peak_tflops, peak_gbps = MACHINE.get("peak_tflops_bf16"), MACHINE.get("peak_gbps")
    warmup, reps = (3, 10) if torch.cuda.is_available() else (1, 2)
    rows = []
    for name, fn in providers.items():
        row = {"op": op, "shape": shape, "provider": name}
        try:
            row.update(measure(fn, leaves, warmup=warmup, reps=reps))
        except torch.cuda.OutOfMemoryError:
            row["provider"] = f"{name} (out of memory)"
            torch.cuda.empty_cache()
            rows.append(row)
            continue
        seconds = row["fwdbwd_ms"] / 1e3
        if flops:
            row["tflops"] = sum(flops) / seconds / 1e12
            row["pct_peak"] = 100 * row["tflops"] / peak_tflops if peak_tflops else None
        if bytes_moved:
            row["gbps"] = sum(bytes_moved) / seconds / 1e9
            row["pct_peak"] = 100 * row["gbps"] / peak_gbps if peak_gbps else None
        rows.append(row)
    ours = next((r for r in rows if r["provider"] == "ours" and "fwdbwd_ms" in r), None)
    for r in rows:
        if ours and "fwdbwd_ms" in r:
            r["ours/peer"] = r["fwdbwd_ms"] / ours["fwdbwd_ms"]
    return rows


def optional(module):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        return None


# ---------------------------------------------------------------------------------------------- ops

def effective_keys(T, window):
    """Mean number of keys a query sees under the causal window."""
    w = min(window or T, T)
    return (w * (w + 1) / 2 + (T - w) * w) / T


def bench_attention(B, T, Hq, Hkv, D, window, dtype, device, compile_reference):
    q = torch.randn(B, T, Hq, D, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(B, T, Hkv, D, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(B, T, Hkv, D, device=device, dtype=dtype, requires_grad=True)
    i = torch.arange(T, device=device)
    window_mask = None if window is None or window >= T else (i[:, None] - i[None, :] < window) & (i[:, None] >= i[None, :])

    def sdpa():
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=window_mask, is_causal=window_mask is None,
                                             enable_gqa=True)
        return out.transpose(1, 2)

    providers = {"ours": lambda: kernels.attention(q, k, v, window=window), "sdpa": sdpa}
    if device == "cuda":
        providers["eager"] = lambda: reference.attention(q, k, v, window=window)
        if compile_reference:
            compiled = torch.compile(reference.attention)
            providers["compile"] = lambda: compiled(q, k, v, window=window)
        if optional("xformers.ops"):
            providers["xformers"] = lambda: kernels.xformers_attention(q, k, v, window=window)
    fwd_flops = 4 * B * Hq * T * effective_keys(T, window) * D
    shape = f"B{B} T{T} H{Hq}/{Hkv} D{D} W{window}"
    return run_providers("attention", shape, providers, [q, k, v], flops=(fwd_flops, 2.5 * fwd_flops))


def bench_rms_norm(M, N, dtype, device, compile_reference, residual):
    x = torch.randn(M, N, device=device, dtype=dtype, requires_grad=True)
    res = torch.randn(M, N, device=device, dtype=dtype, requires_grad=True) if residual else None
    w = torch.ones(N, device=device, dtype=dtype, requires_grad=True)
    first = (lambda out: out[0] + out[1]) if residual else (lambda out: out)   # one output to backprop through
    providers = {"ours": lambda: first(kernels.rms_norm(x, w, 1e-5, residual=res))}
    if device == "cuda":
        providers["eager"] = lambda: first(reference.rms_norm(x, w, 1e-5, residual=res))
    if device == "cuda" and compile_reference:
        compiled = torch.compile(reference.rms_norm)
        providers["compile"] = lambda: first(compiled(x, w, 1e-5, residual=res))
    liger = optional("liger_kernel.transformers") if device == "cuda" and not residual else None
    if liger:
        norm = liger.LigerRMSNorm(N, eps=1e-5).to(device, dtype)
        norm.weight = w
        providers["liger"] = lambda: norm(x)
    elt = x.element_size()
    streams = 2 if residual else 1                 # inputs read (x, residual)
    fwd_bytes = M * N * elt * 2 * streams          # read inputs, write y (and h)
    bwd_bytes = M * N * elt * (3 + residual)       # read dy (and dh), h; write dx
    shape = f"{M}x{N}" + (" +residual" if residual else "")
    return run_providers("rms_norm", shape, providers, [t for t in (x, w, res) if t is not None],
                         bytes_moved=(fwd_bytes, bwd_bytes))


def bench_cross_entropy(N, V, dtype, device, compile_reference):
    logits = torch.randn(N, V, device=device, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, V, (N,), device=device)
    providers = {"ours": lambda: kernels.cross_entropy(logits, targets),
                 "F.cross_entropy": lambda: F.cross_entropy(logits, targets)}
    if device == "cuda":
        providers["eager"] = lambda: reference.cross_entropy(logits, targets)
    if device == "cuda" and compile_reference:
        compiled = torch.compile(reference.cross_entropy)
        providers["compile"] = lambda: compiled(logits, targets)
    liger = optional("liger_kernel.transformers") if device == "cuda" else None
    if liger:
        loss = liger.LigerCrossEntropyLoss()
        providers["liger"] = lambda: loss(logits, targets)
    elt = logits.element_size()
    return run_providers("cross_entropy", f"{N}x{V}", providers, [logits],
                         bytes_moved=(3 * N * V * elt, 2 * N * V * elt))   # fwd: read twice + write grad


def bench_linear_cross_entropy(N, D, V, dtype, device):
    hidden = torch.randn(N, D, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(V, D, device=device, dtype=dtype) * D ** -0.5).requires_grad_()
    targets = torch.randint(0, V, (N,), device=device)
    providers = {"ours": lambda: kernels.linear_cross_entropy(hidden, weight, targets),
                 "naive": lambda: F.cross_entropy(hidden @ weight.T, targets)}
    liger = optional("liger_kernel.transformers") if device == "cuda" else None
    if liger:
        loss = liger.LigerFusedLinearCrossEntropyLoss()
        providers["liger"] = lambda: loss(weight, hidden, targets)
    flops = 2 * N * D * V
    return run_providers("linear_cross_entropy", f"N{N} D{D} V{V}", providers, [hidden, weight],
                         flops=(flops, 2 * flops))


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
            rows += bench_attention(B, T, 32, 8, 128, 4096, dt, dev, comp)
        for M, N in [(4096, 4096), (8192, 32000)]:
            for residual in (False, True):
                rows += bench_rms_norm(M, N, dt, dev, comp, residual)
        for N, V in [(4096, 4096), (8192, 32000)]:
            rows += bench_cross_entropy(N, V, dt, dev, comp)
        for N in ([8192] if args.quick else [8192, 32768]):
            rows += bench_linear_cross_entropy(N, 4096, 32000, dt, dev)
    else:
        dt, dev = torch.float32, "cpu"
        rows += bench_attention(1, 1024, 8, 2, 64, 256, dt, dev, False)
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

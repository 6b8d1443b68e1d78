"""Small helpers shared by the benchmarks: what machine this is, timing, a plain-text table, JSON results.

Every benchmark prints its table with the machine it ran on and writes the same rows to bench/results/.
Importing this module makes this checkout's `cancerllm` importable, installed or not (bench/repo_path.py).
"""
import json
import os
import platform
import time
from pathlib import Path

import torch

from bench import repo_path  # noqa: F401
from cancerllm.hardware import gpu_peaks

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """The facts a reader needs to judge a number: CPU, cores, GPU and its peaks, library versions."""
    info = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        info["gpu"] = name
        info["peak_tflops_bf16"], info["peak_gbps"] = gpu_peaks(name)
    return info


def time_fn(fn, *, warmup: int = 3, reps: int = 10, best: bool = False) -> float:
    """Milliseconds per fn(): the median, or with best=True the fastest (on a shared machine, the run least slowed
    by other work). CUDA: triton's do_bench, which times each call with CUDA events (L2 flushed between calls,
    warm-up and repetitions chosen by time), so a microsecond kernel is timed rather than the Python call
    launching it; `warmup` and `reps` only apply to the CPU's wall clock."""
    if torch.cuda.is_available():
        from triton.testing import do_bench
        return do_bench(fn, warmup=25, rep=100, return_mode="min" if best else "median")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return times[0] if best else times[len(times) // 2]


def matmul_tflops(device: torch.device, n: int = None, dtype: torch.dtype = None) -> float:
    """Measured dense matmul rate of n x n x n (default: bf16 8192 on GPU, the ceiling matrix-bound kernels are
    judged against; fp32 2048 on CPU, or `dtype`: bf16 for a step computing in it); the fastest of the timed runs."""
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    n = n or (8192 if device.type == "cuda" else 2048)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n**3 / (time_fn(lambda: a @ b, warmup=1, reps=10, best=True) / 1e3) / 1e12


def copy_gbps(device: torch.device, mib: int = 1024) -> float:
    """Measured memory bandwidth, the ceiling memory-bound kernels are judged against: a copy of `mib` MiB (far
    past the caches), bytes read plus bytes written; the fastest of the timed runs."""
    src = torch.randn(mib * 2**18, device=device)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / (time_fn(lambda: dst.copy_(src), warmup=1, reps=5, best=True) / 1e3) / 1e9


def print_table(rows: list, columns: list) -> None:
    """Rows (dicts) as aligned text columns; missing values print as '-', floats with 3 significant digits."""
    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def write_results(name: str, rows: list, **extra) -> Path:
    """bench/results/<name>-<UTC time>.json holding the machine, the rows and any extra fields."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = RESULTS_DIR / f"{name}-{stamp}.json"
    path.write_text(json.dumps({"benchmark": name, "machine": machine(), "rows": rows, **extra}, indent=2))
    return path

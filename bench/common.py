"""Small helpers shared by the benchmarks: what machine this is, timing, a plain-text table, JSON results.

Every benchmark prints its table with the machine it ran on and writes the same rows to bench/results/.
"""
import json
import os
import platform
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Dense bf16 tensor-core TFLOP/s and HBM GB/s from the vendors' data sheets, matched on the device name.
GPU_PEAKS = {
    "H200": (989.0, 4800.0),
    "H100 SXM": (989.0, 3350.0),
    "H100 PCIe": (756.0, 2000.0),
    "H100": (989.0, 3350.0),
    "A100-SXM4-80GB": (312.0, 2039.0),
    "A100": (312.0, 1555.0),
    "L40S": (362.0, 864.0),
    "A10G": (70.0, 600.0),
}


def gpu_peaks(device_name: str):
    """(peak bf16 TFLOP/s, peak GB/s) of a GPU by name, or (None, None) when it is not in the table."""
    for key, peaks in GPU_PEAKS.items():
        if key.lower() in device_name.lower():
            return peaks
    return None, None


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


def time_fn(fn, *, warmup: int = 3, reps: int = 10) -> float:
    """Median wall time of fn() in milliseconds; synchronises CUDA around each call when it is in use."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return times[len(times) // 2]


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

"""Our small-M matmul (cancerllm/gemv.py, csrc/gemv.cpp) against torch's paths, per SmolLM2-135M weight shape.

    .venv/bin/python bench/gemv.py [--rows 1 8 16 32 64] [--threads N] [--reps 5]

Each path is a DecodeLinear (model.PATHS) as the decoding form calls it, Python overhead included: bf16 weights on
"gemv" (ours: gemv_rows in front of "aten"; AMX tiles where they run) against "gemv-avx512" (ours without AMX),
"onednn" (prepacked) and "aten" (F.linear); int8 weights with a bf16 scale per row on "int8-gemv" (ours:
gemv_rows in front of "int8") against "int8" (torch's _weight_int8pack_mm), on fp32 activations as the int8 model
runs; fp32 weights (how a CPU without native bf16 decodes) on "gemv" against "onednn" and "aten". Every path
cycles through copies of the weight that together exceed the last-level cache, so the weight
streams from memory as in a decode step. Reported: microseconds per matmul, the weight's bytes per second, that as
a fraction of the copy bandwidth measured here, ours / the fastest of torch's paths (above 1: ours is faster) and,
for bf16, the AVX512 kernel's time / ours (the gain from AMX). Rows above gemv.MAX_ROWS run the library on every
path (ours falls back), which shows where the threshold sits.
"""
import argparse
import functools
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import copy_gbps, print_table, time_fn, write_results  # noqa: E402

from cancerllm import gemv  # noqa: E402
from cancerllm.model import DecodeLinear  # noqa: E402

SHAPES = {"qkv_proj": (960, 576), "o_proj": (576, 576), "gate/up_proj": (1536, 576), "down_proj": (576, 1536),
          "lm_head": (49152, 576)}
PRECISIONS = {   # weight dtype, activations, the paths (ours first) as name: (DecodeLinear path, gemv_rows), bytes
    "bf16": (torch.bfloat16, torch.bfloat16,
             {"gemv": ("aten", gemv.MAX_ROWS), "gemv-avx512": ("aten", gemv.MAX_ROWS), "onednn": ("onednn", 0),
              "aten": ("aten", 0)}, 2),
    "int8": (torch.float32, torch.float32, {"int8-gemv": ("int8", gemv.MAX_ROWS), "int8": ("int8", 0)}, 1),
    "fp32": (torch.float32, torch.float32,
             {"gemv": ("aten", gemv.MAX_ROWS), "onednn": ("onednn", 0), "aten": ("aten", 0)}, 4),
}
STREAMED_BYTES = 96 * 2**20   # the copies of a weight a path cycles through: three times a 32 MiB L3


def linears(shape, weight_dtype, path, gemv_rows, bytes_per_weight, amx=True):
    copies = max(2, math.ceil(STREAMED_BYTES / (shape[0] * shape[1] * bytes_per_weight)))
    layers = [DecodeLinear((torch.randn(shape) * 0.05).to(weight_dtype), path, gemv_rows) for _ in range(copies)]
    for layer in layers if not amx else []:
        layer.rows_matmul = functools.partial(layer.rows_matmul, amx=False)
    return layers


def measure(shape, precision, rows_list, reps, bandwidth):
    weight_dtype, act_dtype, paths, bytes_per_weight = PRECISIONS[precision]
    weight_bytes = shape[0] * shape[1] * bytes_per_weight
    rows = []
    for path, (decode_path, gemv_rows) in paths.items():
        layer = linears(shape, weight_dtype, decode_path, gemv_rows, bytes_per_weight, amx=path != "gemv-avx512")
        for m in rows_list:
            x = torch.randn(m, shape[1]).to(act_dtype)
            with torch.inference_mode():
                ms = time_fn(lambda: [f(x) for f in layer], warmup=1, reps=reps, best=True) / len(layer)
            gbps = weight_bytes / (ms / 1e3) / 1e9
            rows.append(dict(precision=precision, shape=f"{shape[1]}->{shape[0]}", rows=m, path=path, us=ms * 1e3,
                             gbps=gbps, vs_copy_bw=gbps / bandwidth))
        del layer
    for m in rows_list:
        ours, *peers = [r for r in rows if r["rows"] == m]
        torch_peers = [p for p in peers if p["path"] != "gemv-avx512"]
        ours["ours/best_torch"] = min(p["us"] for p in torch_peers) / ours["us"]
        ours["avx512/amx"] = next((p["us"] / ours["us"] for p in peers if p["path"] == "gemv-avx512"), None)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16, 32, 64])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    bandwidth = copy_gbps(torch.device("cpu"), mib=512)
    rows = [row for precision in opts.precisions for name, shape in SHAPES.items()
            for row in measure(shape, precision, opts.rows, opts.reps, bandwidth)]
    print(f"gemv bench: {opts.threads} thread(s), AVX512-BF16 kernel: {gemv.fast_kernel()}, AMX: "
          f"{gemv.amx_kernel()}, copy bandwidth "
          f"{bandwidth:.1f} GB/s; our kernel up to {gemv.MAX_ROWS} rows, the library beyond")
    print_table(rows, ["precision", "shape", "rows", "path", "us", "gbps", "vs_copy_bw", "ours/best_torch",
                       "avx512/amx"])
    path = write_results("gemv", rows, threads=opts.threads, bandwidth_gbps=bandwidth,
                         fast_kernel=gemv.fast_kernel(), amx=gemv.amx_kernel(), max_rows=gemv.MAX_ROWS)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""QLoRA's memory and speed: training steps of full fine-tuning, LoRA over a bf16 base and QLoRA (LoRA over an NF4
base, lora.quantize_base = "nf4") on the same model, each variant in its own process, all on train.py's path:
build_model() from a Hugging Face directory of random bf16 weights (so QLoRA's base is read and quantized tensor by
tensor, as from a real checkpoint), one-rank FSDP2 for the bf16 cast, fused AdamW. Then the 7B-on-one-GPU estimate
recomputed from the measured bytes.

    python bench/qlora.py                                   # CPU: 2 blocks at Mistral-7B width, and SmolLM2-135M
    python bench/qlora.py --shape small --seq-len 1024 --batch 4
    python bench/qlora.py --libraries                       # NF4 itself: torchao against bitsandbytes

Per variant: the frozen base's bytes, exactly, from its storage (NF4: codes, scales, factors), the adapted linears
apart from the rest (embeddings, norms); the load's peak anonymous memory (sampled from /proc/self/status, net of
the process before it: memory-mapped checkpoint pages are the page cache's, not the load's), the peak RSS of the
whole process (ru_maxrss) and its growth over the steps, and step tokens/s (the median step after the warm-up).
The variants alternate, `--repeats` runs each (the order flips every round), and each reports its best tokens/s and
its highest peak memory (bench/train.py's best_of): on a shared machine the best run is the least slowed by other
work. Ratios are against the bf16-base LoRA variant; the issue's goals: frozen adapted weights <= 0.3x, tokens/s
within 1.3x of it.

`--libraries` times NF4 itself on one weight of Mistral-7B's q_proj shape in this process: quantize, dequantize and
the round trip's error for torchao's NF4Tensor (ours) and bitsandbytes' quantize_4bit (a `missing` row when it is
not installed), against a bf16 matmul of `--seq-len` tokens by the same weight.
"""
import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine, print_table, time_fn, write_results  # noqa: E402
from bench.train import best_of, fill_weights, make_batches, peak_rss_gib  # noqa: E402
from cancerllm import ModelArgs, Transformer  # noqa: E402
from cancerllm.train.config import LoraConfig  # noqa: E402

SHAPES = {
    "mistral-7b-2": lambda: ModelArgs.preset("mistral-7b", n_layers=2),   # Mistral-7B's blocks and vocabulary
    "smollm2-135m": lambda: ModelArgs.preset("smollm2-135m"),
    "small": lambda: ModelArgs.preset("small"),
}
VARIANTS = {"full": None, "lora-bf16": LoraConfig(enabled=True, rank=64),
            "qlora-nf4": LoraConfig(enabled=True, rank=64, quantize_base="nf4")}
MISTRAL_7B_LAYERS = 32


def memory_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class PeakAnonymous:
    """The highest RssAnon (the process's own memory, not mapped files) seen every 5 ms inside the `with`."""

    def __enter__(self):
        self.start = self.peak = memory_kib("RssAnon")
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self):
        while not self.done.wait(0.005):
            self.peak = max(self.peak, memory_kib("RssAnon"))

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, memory_kib("RssAnon"))

    @property
    def growth_gib(self) -> float:
        return (self.peak - self.start) / 2**20


def storage_bytes(p: torch.Tensor) -> int:
    """Bytes a parameter's storage holds on this rank: an NF4 weight's codes, scales and factors, or its elements."""
    from cancerllm.train.nf4 import is_nf4
    t = p.to_local() if hasattr(p, "to_local") else p
    if is_nf4(t):
        return sum(getattr(t, name).nbytes for name in t.__tensor_flatten__()[0])
    return t.numel() * t.element_size()


def parameter_bytes(model) -> dict:
    """Frozen adapted linears, the rest of the frozen base, and the trainable parameters (numbers and bytes)."""
    out = {"frozen_linear_bytes": 0, "frozen_other_bytes": 0, "trainable_params": 0, "frozen_linear_params": 0}
    for name, p in model.named_parameters():
        if p.requires_grad:
            out["trainable_params"] += p.numel()
        elif name.startswith("layers.") and name.endswith("proj.weight"):
            out["frozen_linear_bytes"] += storage_bytes(p)
            out["frozen_linear_params"] += p.numel()
        else:
            out["frozen_other_bytes"] += storage_bytes(p)
    return out


def write_base(args: ModelArgs, path: Path):
    """Random bf16 weights (bench.train.fill_weights) as a Hugging Face directory, built without an fp32 copy."""
    with torch.device("meta"):
        model = Transformer(args).to(torch.bfloat16)
    model.to_empty(device="cpu")
    fill_weights(model.named_parameters())
    model.save_pretrained(path, dtype=torch.bfloat16)


def measure(variant: str, base: Path, a) -> dict:
    """One variant in this process: load, then `a.warmup` + `a.steps` training steps."""
    import torch.distributed as dist
    from cancerllm.train.build import build_model
    from cancerllm.train.config import Config, ModelConfig, OptimConfig, ParallelConfig
    from cancerllm.train.optim import build_optimizer
    from cancerllm.train.parallel import Dist, build_mesh
    from cancerllm.train.step import train_step
    device = torch.device("cpu")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    cfg = Config(model=ModelConfig(init_from=str(base)), lora=VARIANTS[variant] or LoraConfig(),
                 parallel=ParallelConfig(mixed_precision=a.mixed_precision))
    start = time.perf_counter()
    with PeakAnonymous() as load:
        args, model = build_model(cfg, Dist(0, 0, 1, device), build_mesh(cfg.parallel, 1, device))
    row = {"variant": variant, "load_s": time.perf_counter() - start, "load_peak_anon_gib": load.growth_gib,
           **parameter_bytes(model)}
    rss_loaded = peak_rss_gib()
    optimizer = build_optimizer(model, OptimConfig(lr=1e-4, weight_decay=0.0))
    batches = make_batches(args, a.batch, a.seq_len, a.warmup + a.steps, device)
    times, losses = [], []
    for batch in batches:
        begin = time.perf_counter()
        losses.append(train_step(model, optimizer, [batch], dp_size=1, max_norm=1.0, device=device).loss)
        times.append(time.perf_counter() - begin)
    step_s = statistics.median(times[a.warmup:])
    row.update(step_s=step_s, tokens_per_s=a.batch * a.seq_len / step_s, first_loss=losses[0],
               peak_mem_gib=peak_rss_gib(), step_rss_growth_gib=peak_rss_gib() - rss_loaded)
    dist.destroy_process_group()
    return row


def run_child(variant: str, base: Path, a) -> dict:
    cmd = [sys.executable, __file__, "--variant", variant, "--base", str(base), "--mixed-precision",
           a.mixed_precision, "--batch", str(a.batch), "--seq-len", str(a.seq_len), "--steps", str(a.steps),
           "--warmup", str(a.warmup)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"variant": variant, "error": proc.stderr.strip().splitlines()[-1][:160]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def add_ratios(rows: list[dict]):
    """Each row against the bf16-base LoRA row of its shape."""
    lora = next((r for r in rows if r["variant"] == "lora-bf16" and "step_s" in r), None)
    for row in rows:
        if lora and "step_s" in row:
            row["frozen_linear_ratio"] = row["frozen_linear_bytes"] / lora["frozen_linear_bytes"] if row[
                "frozen_linear_bytes"] else None
            row["frozen_base_ratio"] = ((row["frozen_linear_bytes"] + row["frozen_other_bytes"]) /
                                        (lora["frozen_linear_bytes"] + lora["frozen_other_bytes"])
                                        if row["frozen_linear_bytes"] else None)
            row["slowdown"] = row["step_s"] / lora["step_s"]
            row["peak_mem_ratio"] = row["peak_mem_gib"] / lora["peak_mem_gib"]


def mistral_7b_estimate(rows: list[dict]) -> dict:
    """The 7B run's weights and optimizer state on one GPU from the 2-block measurement: the blocks' bytes scale with
    the block count, the embeddings and head are the full model's already. GiB."""
    out = {}
    for row in rows:
        if "step_s" not in row or row["variant"] == "full":
            continue
        blocks = MISTRAL_7B_LAYERS / 2
        frozen = row["frozen_linear_bytes"] * blocks + row["frozen_other_bytes"]
        adapters = row["trainable_params"] * blocks * 16          # fp32 weights, gradients, two AdamW moments
        out[row["variant"]] = {"frozen_base_gib": frozen / 2**30, "adapters_with_adamw_gib": adapters / 2**30,
                               "weights_and_optimizer_gib": (frozen + adapters) / 2**30}
    return out


def nf4_libraries(seq_len: int) -> list[dict]:
    """torchao's and bitsandbytes' NF4 (blocks of 64, double-quantized scales) on one 4096 x 4096 bf16 weight."""
    from cancerllm.train.nf4 import BLOCK_SIZE, dequantize, quantize
    weight = torch.randn(4096, 4096).bfloat16()
    x = torch.randn(seq_len, 4096).bfloat16()
    matmul_ms = time_fn(lambda: torch.nn.functional.linear(x, weight), warmup=1, reps=5, best=True)

    def row(library, quantize_fn, dequantize_fn):
        packed = quantize_fn()
        restored = dequantize_fn(packed).float()
        dequantize_ms = time_fn(lambda: dequantize_fn(packed), warmup=1, reps=5, best=True)
        error = torch.linalg.norm(restored - weight.float()) / torch.linalg.norm(weight.float())
        return {"library": library, "quantize_ms": time_fn(quantize_fn, warmup=0, reps=2, best=True),
                "dequantize_ms": dequantize_ms, "matmul_ms": matmul_ms,
                "dequantize_per_matmul": dequantize_ms / matmul_ms, "round_trip_error": float(error)}
    rows = [row("torchao", lambda: quantize(weight, "weight"), lambda q: dequantize(q))]
    try:
        import bitsandbytes.functional as bnb
    except ImportError as e:
        rows.append({"library": "bitsandbytes", "status": "missing", "error": str(e)[:120]})
    else:
        rows.append(row("bitsandbytes", lambda: bnb.quantize_4bit(weight, blocksize=BLOCK_SIZE, quant_type="nf4",
                                                                    compress_statistics=True),
                        lambda q: bnb.dequantize_4bit(q[0], q[1], quant_type="nf4")))
        rows[-1]["dequantize_speedup_vs_torchao"] = rows[0]["dequantize_ms"] / rows[-1]["dequantize_ms"]
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", nargs="+", choices=sorted(SHAPES), default=["mistral-7b-2", "smollm2-135m"])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--mixed-precision", choices=["bf16", "fp32"], default="bf16",
                        help="compute dtype (bf16: the recipe's; the LoRA base is stored in it)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="runs per variant, alternating")
    parser.add_argument("--libraries", action="store_true", help="time NF4 itself: torchao against bitsandbytes")
    parser.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)    # child process
    parser.add_argument("--base", type=Path, help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.variant:
        print(json.dumps(measure(a.variant, a.base, a)))
        return
    if a.libraries:
        rows = nf4_libraries(a.seq_len)
        print(json.dumps({**machine(), "threads": torch.get_num_threads()}))
        print_table(rows, ["library", "quantize_ms", "dequantize_ms", "matmul_ms", "dequantize_per_matmul",
                           "dequantize_speedup_vs_torchao", "round_trip_error", "status", "error"])
        print(f"results: {write_results('qlora-libraries', rows, seq_len=a.seq_len)}")
        return
    rows, estimate = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for shape in a.shape:
            args = SHAPES[shape]()
            base = Path(tmp) / shape
            write_base(args, base)
            runs = {v: [] for v in a.variants}
            for r in range(a.repeats):
                for v in (a.variants if r % 2 == 0 else a.variants[::-1]):
                    runs[v].append(run_child(v, base, a))
            shape_rows = [{"shape": shape, "seq_len": a.seq_len, "batch": a.batch, **best_of(runs[v])}
                          for v in a.variants]
            add_ratios(shape_rows)
            if shape == "mistral-7b-2":
                estimate = mistral_7b_estimate(shape_rows)
            rows += shape_rows
    print(json.dumps({**machine(), "threads": torch.get_num_threads(), "compute": a.mixed_precision}))
    columns = ["shape", "variant", "seq_len", "load_s", "load_peak_anon_gib", "frozen_linear_bytes",
               "frozen_other_bytes", "frozen_linear_ratio", "frozen_base_ratio", "trainable_params", "peak_mem_gib",
               "peak_mem_ratio", "step_rss_growth_gib", "runs", "tokens_per_s", "tokens_per_s_runs", "slowdown",
               "first_loss", "error"]
    print_table([{k.replace("_bytes", "_gib"): v / 2**30 if k.endswith("_bytes") else v for k, v in r.items()}
                 for r in rows], [c.replace("_bytes", "_gib") for c in columns])
    if estimate:
        print("Mistral-7B on one GPU, weights and optimizer state (GiB):", json.dumps(estimate, indent=1))
    print(f"results: {write_results('qlora', rows, mistral_7b_estimate=estimate, settings=vars(a) | {'base': None})}")


if __name__ == "__main__":
    main()

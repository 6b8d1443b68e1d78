"""Training-step throughput: our single-process step (train.py's path: parallelize() over a one-rank mesh, fused linear
cross-entropy, GQA attention without repeated K/V) against transformers' MistralForCausalLM trained with plain
PyTorch (forward, loss, backward, AdamW) on the same batches for the same number of steps.

    python bench/train.py                      # CPU: `small` at seq 1024 (target >= 1.1x tokens/s, <= 0.6x memory)
    python bench/train.py --preset 1b          # GPU: tokens/s/GPU and MFU (add --preset mistral-7b if it fits)

Each side runs in its own process so that its peak memory is its own (CPU: peak RSS, also net of the process
before the model existed; GPU: peak allocated). The two sides alternate, `--repeats` runs each (the order flips
every round), and each side reports its best tokens/s and its highest peak memory over those runs: on a shared
machine the best run is the one least slowed by other work, while memory does not depend on load. Model FLOP/s use
ModelArgs.flops_per_token (6N + attention) and are given as a fraction of this machine's fp32 matmul rate (CPU),
measured once in the parent before the runs (best of several timings), or of the GPU's bf16 peak.
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import gpu_peaks, machine, matmul_tflops, print_table, write_results  # noqa: E402


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_batches(args, batch, seq_len, steps, device):
    """Random token rows, one document per row (so both models see the same attention pattern)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        tokens = torch.randint(0, args.vocab_size, (batch, seq_len + 1), generator=g)
        cu = torch.arange(0, batch * seq_len + 1, seq_len, dtype=torch.int32)
        out.append({"tokens": tokens[:, :-1].to(device), "targets": tokens[:, 1:].to(device),
                    "positions": torch.arange(seq_len).expand(batch, seq_len).to(device), "cu_seqlens": cu.to(device)})
    return out


def ours(args, device, checkpoint_every: int = 0):
    """train.py's step: parallelize() over a one-rank mesh (plain module in fp32, FSDP2 for a bf16 cast), fused loss;
    `checkpoint_every`: activation checkpointing of every k-th block (0: none)."""
    import torch.distributed as dist
    from cancerllm import Transformer
    from cancerllm.train.config import OptimConfig, ParallelConfig
    from cancerllm.train.optim import build_optimizer
    from cancerllm.train.parallel import build_mesh, parallelize
    from cancerllm.train.step import train_step
    if not dist.is_initialized():   # one process group serves every model a process builds
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
    parallel = ParallelConfig(activation_checkpoint_every=checkpoint_every)
    with torch.device(device):
        model = Transformer(args)
    parallelize(model, build_mesh(parallel, 1, device), parallel, device)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-4, implementation="auto"))

    def step(batch):
        return train_step(model, optimizer, [batch], dp_size=1, max_norm=1.0, device=device).loss
    return step


def transformers_side(args, device):
    """MistralForCausalLM as a plain PyTorch user trains it: labels -> loss, backward, AdamW (bf16 autocast on GPU)."""
    from transformers import MistralConfig, MistralForCausalLM
    config = MistralConfig(vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.hidden_dim,
                           num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                           num_key_value_heads=args.n_kv_heads, head_dim=args.head_dim,
                           sliding_window=args.sliding_window, rope_theta=args.rope_theta, rms_norm_eps=args.norm_eps,
                           max_position_embeddings=args.max_seq_len, tie_word_embeddings=False)
    model = MistralForCausalLM(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)

    def step(batch):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(batch["tokens"]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch["targets"].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)
    return step


def run_side(side: str, preset: str, batch: int, seq_len: int, steps: int, warmup: int) -> dict:
    from cancerllm import ModelArgs
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    row = measure_training(side, ModelArgs.preset(preset), batch, seq_len, steps, warmup, device)
    return {"side": side, "preset": preset, **row}


def measure_training(side: str, args, batch: int, seq_len: int, steps: int, warmup: int, device,
                     checkpoint_every: int = 0) -> dict:
    """tokens/s, model TFLOP/s (ModelArgs.flops_per_token), MFU against the data-sheet peak and peak memory of
    `steps` timed steps after `warmup` untimed ones. GPU: the peak is counted from this call's start."""
    batches = make_batches(args, batch, seq_len, warmup + steps, device)
    rss_before = peak_rss_gib()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    step = ours(args, device, checkpoint_every) if side == "ours" else transformers_side(args, device)
    for b in batches[:warmup]:
        step(b)
    sync(device)
    start = time.perf_counter()
    losses = [step(b) for b in batches[warmup:]]
    sync(device)
    elapsed = time.perf_counter() - start
    tokens_per_s = batch * seq_len * steps / elapsed
    flops = args.flops_per_token(seq_len) * tokens_per_s
    row = {"batch": batch, "seq_len": seq_len, "steps": steps, "tokens_per_s": tokens_per_s,
           "model_tflops": flops / 1e12, "final_loss": losses[-1]}
    if device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        peak = gpu_peaks(torch.cuda.get_device_name())[0]
        row["mfu"] = flops / (peak * 1e12) if peak else None
    else:
        row["peak_mem_gib"] = peak_rss_gib()
        row["train_mem_gib"] = row["peak_mem_gib"] - rss_before
    return row


def run_child(side: str, preset: str, a) -> dict:
    """One side in a fresh process; a failure (e.g. out of memory for 7B on one GPU) becomes an error row."""
    cmd = [sys.executable, __file__, "--side", side, "--preset", preset, "--batch", str(a.batch),
           "--seq-len", str(a.seq_len), "--steps", str(a.steps), "--warmup", str(a.warmup)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"side": side, "preset": preset, "error": proc.stderr.strip().splitlines()[-1][:120]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def best_of(runs: list[dict]) -> dict:
    """The fastest run's row, with the highest peak memory of all runs and every run's tokens/s."""
    ok = [r for r in runs if "tokens_per_s" in r]
    if not ok:
        return runs[-1]
    row = dict(max(ok, key=lambda r: r["tokens_per_s"]))
    for key in ("peak_mem_gib", "train_mem_gib"):
        if key in row:
            row[key] = max(r[key] for r in ok)
    row["runs"] = len(ok)
    row["tokens_per_s_runs"] = " ".join(f"{r['tokens_per_s']:.0f}" for r in ok)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = torch.cuda.is_available()
    parser.add_argument("--preset", action="append", help="model preset(s) (default: small on CPU, 1b on GPU)")
    parser.add_argument("--batch", type=int, default=4 if gpu else 2)
    parser.add_argument("--seq-len", type=int, default=2048 if gpu else 1024)
    parser.add_argument("--steps", type=int, default=10 if gpu else 3)
    parser.add_argument("--warmup", type=int, default=3 if gpu else 1)
    parser.add_argument("--repeats", type=int, default=1 if gpu else 3, help="runs per side, alternating")
    parser.add_argument("--side", choices=["ours", "transformers"], help=argparse.SUPPRESS)  # child process
    a = parser.parse_args()
    presets = a.preset or ["1b" if gpu else "small"]
    if a.side:
        print(json.dumps(run_side(a.side, presets[0], a.batch, a.seq_len, a.steps, a.warmup)))
        return
    device = torch.device("cuda" if gpu else "cpu")
    rate = matmul_tflops(device)
    rows = []
    for preset in presets:
        runs = {"ours": [], "transformers": []}
        for r in range(a.repeats):
            for side in (("ours", "transformers") if r % 2 == 0 else ("transformers", "ours")):
                runs[side].append(run_child(side, preset, a))
        pair = [best_of(runs["ours"]), best_of(runs["transformers"])]
        for row in pair:
            if "model_tflops" in row:
                row["matmul_tflops"] = rate
                row["fraction_of_matmul"] = row["model_tflops"] / rate
        ours_row, theirs = pair
        if "tokens_per_s" in ours_row and "tokens_per_s" in theirs:
            ours_row["speedup"] = ours_row["tokens_per_s"] / theirs["tokens_per_s"]
            ours_row["memory_ratio"] = ours_row["peak_mem_gib"] / theirs["peak_mem_gib"]
            if "train_mem_gib" in ours_row:
                ours_row["train_memory_ratio"] = ours_row["train_mem_gib"] / theirs["train_mem_gib"]
        rows.extend(pair)
    print(json.dumps(machine()))
    columns = ["preset", "side", "seq_len", "runs", "tokens_per_s", "tokens_per_s_runs", "peak_mem_gib",
               "train_mem_gib", "model_tflops", "matmul_tflops", "fraction_of_matmul", "mfu", "speedup",
               "memory_ratio", "train_memory_ratio", "error"]
    print_table(rows, columns)
    print(f"results: {write_results('train', rows)}")


if __name__ == "__main__":
    main()

"""Training-step throughput: our single-process step (train.py's path: build_model() and parallelize() over a
one-rank mesh, fused linear cross-entropy, GQA attention without repeated K/V, fused AdamW) against transformers
(MistralForCausalLM or LlamaForCausalLM, as the preset's family) trained with plain PyTorch (forward, loss, backward,
AdamW) on the same weights and batches for the same number of steps; with `--mode lora`, LoRA on both sides (ours:
cancerllm.train.lora with the frozen base in lora.base_dtype; the peer: PEFT on the same target modules).

    python bench/train.py                      # CPU: `small` at seq 1024 (target >= 1.1x tokens/s, <= 0.6x memory)
    python bench/train.py --preset 1b          # GPU: tokens/s/GPU and MFU (add --preset mistral-7b if it fits)
    python bench/train.py --preset smollm2-135m --mode full lora --lora-rank 8 64 --mixed-precision bf16 \
        --seq-len 512 --loss-fraction 0.3      # fine-tuning on the SmolLM2 shape, against transformers + PEFT
    python bench/train.py --preset smollm2-135m --mode lora ... --profile   # where our step's time goes

Each side runs in its own process so that its peak memory is its own (CPU: peak RSS, also net of the process
before the model existed; GPU: peak allocated). The two sides alternate, `--repeats` runs each (the order flips
every round), and each side reports its best tokens/s and its highest peak memory over those runs: on a shared
machine the best run is the one least slowed by other work, while memory does not depend on load. Both sides get
the same weights (each parameter's values follow from its name, fill_weights) and report their first step's loss,
which should agree. FLOP/s count the matmul work our step does (flops_per_token) and are given as a fraction of
this machine's matmul rate in the compute dtype (CPU), measured in the parent before and after the runs (the best
of both), or of the GPU's bf16 peak. Beside it, the fraction of the rate the model's own block linears reach at the
step's rows (shape_matmul_tflops, measured the same way): an n^3 matmul is a ceiling these shapes do not reach, so
this says how much of the gap is the step's and how much the shapes'.
"""
import argparse
import json
import re
import resource
import subprocess
import sys
import time
import zlib
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import gpu_peaks, machine, matmul_tflops, print_table, time_fn, write_results  # noqa: E402
from cancerllm.kernels import IGNORE_INDEX  # noqa: E402
from cancerllm.train.config import LoraConfig  # noqa: E402


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_batches(args, batch, seq_len, steps, device, loss_fraction: float = 1.0):
    """Random token rows, one document per row (so both models see the same attention pattern); the loss is on the
    last `loss_fraction` of each row (an SFT row's answer), the targets before it are IGNORE_INDEX."""
    g = torch.Generator().manual_seed(0)
    unscored = seq_len - round(loss_fraction * seq_len)
    out = []
    for _ in range(steps):
        tokens = torch.randint(0, args.vocab_size, (batch, seq_len + 1), generator=g)
        targets = tokens[:, 1:].clone()
        targets[:, :unscored] = IGNORE_INDEX
        cu = torch.arange(0, batch * seq_len + 1, seq_len, dtype=torch.int32)
        out.append({"tokens": tokens[:, :-1].to(device), "targets": targets.to(device),
                    "positions": torch.arange(seq_len).expand(batch, seq_len).to(device), "cu_seqlens": cu.to(device)})
    return out


def our_name(name: str) -> str:
    """A parameter's name in our model, from the peer's (transformers, PEFT) or a wrapped one of ours."""
    name = name.removeprefix("base_model.model.").removeprefix("model.")
    name = re.sub(r"(_checkpoint_wrapped_module|_orig_mod)\.", "", name)
    return name.replace(".base_layer", "").replace(".default.weight", "")


@torch.no_grad()
def fill_weights(named_params):
    """Give each parameter values that follow from its name (our naming) alone: both sides then hold the same
    weights however their models were built, and no process holds a second model to copy from. Norm weights are 1,
    everything else N(0, 0.02), LoRA's B included, so that the first step's loss checks the adapters too."""
    for name, p in named_params:
        local = p.to_local() if hasattr(p, "to_local") else p   # a one-rank FSDP2 shard is the whole tensor
        if name.endswith("norm.weight"):
            local.fill_(1.0)
            continue
        g = torch.Generator(device=local.device).manual_seed(zlib.crc32(name.encode()))
        local.copy_(torch.randn(local.shape, generator=g, device=local.device) * 0.02)


def ours(args, device, checkpoint_every: int = 0, lora: LoraConfig = None, precision: str = "auto"):
    """train.py's model and step: build_model() (LoRA applied and the frozen base stored in lora.base_dtype when
    `lora` is given) and parallelize() over a one-rank mesh (a plain module when nothing is cast, else FSDP2 for
    the cast to `precision`), fused AdamW; `checkpoint_every`: activation checkpointing of every k-th block."""
    import torch.distributed as dist
    from cancerllm.train.allocator import keep_freed_memory
    from cancerllm.train.build import build_model
    from cancerllm.train.config import Config, ModelConfig, OptimConfig, ParallelConfig
    from cancerllm.train.optim import build_optimizer
    from cancerllm.train.parallel import Dist, build_mesh
    from cancerllm.train.step import train_step
    if device.type == "cpu":        # as train.py does
        keep_freed_memory()
    if not dist.is_initialized():   # one process group serves every model a process builds
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
    # Every ModelArgs field as an override: build_model makes exactly `args`, whatever the preset's name.
    cfg = Config(model=ModelConfig(overrides=asdict(args)), lora=lora or LoraConfig(),
                 parallel=ParallelConfig(mixed_precision=precision, activation_checkpoint_every=checkpoint_every))
    _, model = build_model(cfg, Dist(0, 0, 1, device), build_mesh(cfg.parallel, 1, device))
    fill_weights((our_name(n), p) for n, p in model.named_parameters())
    optimizer = build_optimizer(model, OptimConfig(lr=1e-4, implementation="auto"))

    def step(batch):
        return train_step(model, optimizer, [batch], dp_size=1, max_norm=1.0, device=device).loss
    return step


def transformers_side(args, device, lora: LoraConfig = None, precision: str = "auto"):
    """The preset's transformers model as a plain PyTorch user trains it: logits -> loss, backward, AdamW. bf16 as
    such a user has it: fp32 weights under autocast, and for LoRA (PEFT, `lora`'s rank, alpha, dropout and target
    modules) the frozen base stored in bf16 as ours, with PEFT's fp32 adapters."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from cancerllm.checkpoint import config_dict
    from cancerllm.train.config import ParallelConfig
    from cancerllm.train.parallel import param_dtype
    bf16 = param_dtype(ParallelConfig(mixed_precision=precision), device) == torch.bfloat16
    dtype = torch.bfloat16 if bf16 and lora else torch.float32
    fields = config_dict(args, dtype)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
    if lora:
        from peft import LoraConfig as PeftLoraConfig, get_peft_model
        model = get_peft_model(model, PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                     target_modules=lora.targets))
    fill_weights((our_name(n), p) for n, p in model.named_parameters())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95),
                                  weight_decay=0.1)

    def step(batch):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=batch["tokens"], use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch["targets"].flatten(),
                                                 ignore_index=IGNORE_INDEX)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())
    return step


def flops_per_token(args, seq_len: int, lora: LoraConfig = None, loss_fraction: float = 1.0) -> float:
    """Matmul FLOPs our step does per input token. A linear layer's weight costs 2 FLOPs forward, 2 for its input's
    gradient and 2 for its own gradient when it trains; attention costs ModelArgs.flops_per_token's term; the output
    head runs on the loss tokens only (ours drops the others before it). Full fine-tuning with the loss on every
    token is ModelArgs.flops_per_token exactly. LoRA: the frozen base and head need no weight gradients (4 per
    weight), the adapters train (6 per weight); the first block's five input-side linears, whose input gradients
    autograd skips too, are still counted at 4 (~1% too many at SmolLM2's shape; bench/README.md, SmolLM2)."""
    matmul = args.num_params(embedding=False)          # blocks (with their norm weights, <0.1%) and the head
    head = args.vocab_size * args.dim
    attention = args.flops_per_token(seq_len) - 6 * matmul
    if lora is None:
        return 6 * (matmul - head) + 6 * head * loss_fraction + attention
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    shapes = {"q_proj": args.dim + q, "k_proj": args.dim + kv, "v_proj": args.dim + kv, "o_proj": q + args.dim,
              "gate_proj": args.dim + args.hidden_dim, "up_proj": args.dim + args.hidden_dim,
              "down_proj": args.hidden_dim + args.dim}
    adapters = args.n_layers * lora.rank * sum(shapes[t] for t in lora.targets)    # r x (in + out) per linear
    return 4 * (matmul - head) + 6 * adapters + 4 * head * loss_fraction + attention


def shape_matmul_tflops(args, rows: int, device, dtype) -> float:
    """The rate the block linears' own matmuls reach at `rows` tokens: the forward (x W^T), grad-input (g W) and
    grad-weight (g^T x) matmul of each, each the fastest of its timed runs; all their FLOPs over all their times."""
    flops = seconds = 0.0
    for k, n in args.block_linear_shapes():
        x, w, g = (torch.randn(*shape, device=device, dtype=dtype) for shape in ((rows, k), (n, k), (rows, n)))
        for matmul in (lambda: x @ w.t(), lambda: g @ w, lambda: g.t() @ x):
            seconds += time_fn(matmul, warmup=1, reps=10, best=True) / 1e3
            flops += 2 * rows * k * n
    return flops / seconds / 1e12


def lora_setting(mode: str, rank: int):
    """LoRA as train.py's [lora] section with `rank` (alpha, dropout and targets its defaults), or None: full."""
    return LoraConfig(enabled=True, rank=rank) if mode == "lora" else None


def build_side(side: str, args, device, checkpoint_every: int = 0, lora: LoraConfig = None, precision="auto"):
    if side == "ours":
        return ours(args, device, checkpoint_every, lora, precision)
    return transformers_side(args, device, lora, precision)


def measure_training(side: str, args, batch: int, seq_len: int, steps: int, warmup: int, device,
                     checkpoint_every: int = 0, *, lora: LoraConfig = None, precision: str = "auto",
                     loss_fraction: float = 1.0) -> dict:
    """tokens/s, TFLOP/s (flops_per_token), MFU against the data-sheet peak and peak memory of `steps` timed steps
    after `warmup` untimed ones, and the first step's loss. GPU: the peak is counted from this call's start."""
    batches = make_batches(args, batch, seq_len, warmup + steps, device, loss_fraction)
    rss_before = peak_rss_gib()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    step = build_side(side, args, device, checkpoint_every, lora, precision)
    losses = [step(b) for b in batches[:warmup]]
    sync(device)
    start = time.perf_counter()
    losses += [step(b) for b in batches[warmup:]]
    sync(device)
    elapsed = time.perf_counter() - start
    tokens_per_s = batch * seq_len * steps / elapsed
    flops = flops_per_token(args, seq_len, lora, loss_fraction) * tokens_per_s
    row = {"mode": "lora" if lora else "full", "rank": lora.rank if lora else None, "batch": batch,
           "seq_len": seq_len, "loss_fraction": loss_fraction, "steps": steps, "tokens_per_s": tokens_per_s,
           "model_tflops": flops / 1e12, "first_loss": losses[0], "final_loss": losses[-1]}
    if device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        peak = gpu_peaks(torch.cuda.get_device_name())[0]
        row["mfu"] = flops / (peak * 1e12) if peak else None
    else:
        row["peak_mem_gib"] = peak_rss_gib()
        row["train_mem_gib"] = row["peak_mem_gib"] - rss_before
    return row


def profile_ours(args, a, lora: LoraConfig, device):
    """torch.profiler's ten operators with the most self CPU time over `--steps` of our step after the warm-up."""
    from torch.profiler import ProfilerActivity, profile
    batches = make_batches(args, a.batch, a.seq_len, a.warmup + a.steps, device, a.loss_fraction)
    step = ours(args, device, 0, lora, a.mixed_precision)
    for b in batches[:a.warmup]:
        step(b)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for b in batches[a.warmup:]:
            step(b)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))


def run_child(side: str, preset: str, mode: str, rank: int, a) -> dict:
    """One side in a fresh process; a failure (e.g. out of memory for 7B on one GPU) becomes an error row."""
    cmd = [sys.executable, __file__, "--side", side, "--preset", preset, "--mode", mode, "--lora-rank", str(rank),
           "--mixed-precision", a.mixed_precision, "--loss-fraction", str(a.loss_fraction), "--batch", str(a.batch),
           "--seq-len", str(a.seq_len), "--steps", str(a.steps), "--warmup", str(a.warmup)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"side": side, "preset": preset, "mode": mode, "error": proc.stderr.strip().splitlines()[-1][:120]}
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


def compare(runs: dict, rate: float, shape_rate: float) -> list[dict]:
    """Each side's best row with its fractions of the n^3 matmul rate and of its shapes' rate, ours with the ratios
    to the peer."""
    pair = [best_of(runs["ours"]), best_of(runs["transformers"])]
    for row in pair:
        if "model_tflops" in row:
            row["matmul_tflops"], row["shape_matmul_tflops"] = rate, shape_rate
            row["fraction_of_matmul"] = row["model_tflops"] / rate
            row["fraction_of_shapes"] = row["model_tflops"] / shape_rate
    ours_row, theirs = pair
    if "tokens_per_s" in ours_row and "tokens_per_s" in theirs:
        ours_row["speedup"] = ours_row["tokens_per_s"] / theirs["tokens_per_s"]
        ours_row["memory_ratio"] = ours_row["peak_mem_gib"] / theirs["peak_mem_gib"]
        if "train_mem_gib" in ours_row:
            ours_row["train_memory_ratio"] = ours_row["train_mem_gib"] / theirs["train_mem_gib"]
    return pair


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = torch.cuda.is_available()
    parser.add_argument("--preset", action="append", help="model preset(s) (default: small on CPU, 1b on GPU)")
    parser.add_argument("--mode", nargs="+", choices=["full", "lora"], default=["full"],
                        help="full fine-tuning and/or LoRA on every block linear (default: full)")
    parser.add_argument("--lora-rank", nargs="+", type=int, default=[8], help="LoRA rank(s) (default: 8)")
    parser.add_argument("--mixed-precision", choices=["auto", "bf16", "fp32", "fastest"], default="auto",
                        help="compute dtype, as parallel.mixed_precision (auto: bf16 on GPU, fp32 on CPU; fastest: "
                             "bf16 on GPU, on CPU the faster of the two here, measured)")
    parser.add_argument("--loss-fraction", type=float, default=1.0,
                        help="share of each row, at its end, that carries loss (default: 1, every token)")
    parser.add_argument("--batch", type=int, default=4 if gpu else 2)
    parser.add_argument("--seq-len", type=int, default=2048 if gpu else 1024)
    parser.add_argument("--steps", type=int, default=10 if gpu else 3)
    parser.add_argument("--warmup", type=int, default=3 if gpu else 1)
    parser.add_argument("--repeats", type=int, default=1 if gpu else 3, help="runs per side, alternating")
    parser.add_argument("--profile", action="store_true",
                        help="profile our step for the first preset, mode and rank instead of comparing")
    parser.add_argument("--side", choices=["ours", "transformers"], help=argparse.SUPPRESS)  # child process
    a = parser.parse_args()
    from cancerllm import ModelArgs
    from cancerllm.train.config import ParallelConfig
    from cancerllm.train.parallel import Dist, param_dtype, resolve_mixed_precision
    presets = a.preset or ["1b" if gpu else "small"]
    device = torch.device("cuda" if gpu else "cpu")
    if a.mixed_precision == "fastest":   # resolved once, so that both sides and every child compute in one type
        a.mixed_precision = resolve_mixed_precision(ParallelConfig(mixed_precision="fastest"),
                                                    ModelArgs.preset(presets[0]), a.batch * a.seq_len,
                                                    Dist(0, 0, 1, device))
    if a.side or a.profile:
        args, lora = ModelArgs.preset(presets[0]), lora_setting(a.mode[0], a.lora_rank[0])
        if a.profile:
            profile_ours(args, a, lora, device)
            return
        row = measure_training(a.side, args, a.batch, a.seq_len, a.steps, a.warmup, device, lora=lora,
                               precision=a.mixed_precision, loss_fraction=a.loss_fraction)
        print(json.dumps({"side": a.side, "preset": presets[0], **row}))
        return
    compute_dtype = param_dtype(ParallelConfig(mixed_precision=a.mixed_precision), device)

    def rates():
        return matmul_tflops(device, dtype=compute_dtype), {preset: shape_matmul_tflops(
            ModelArgs.preset(preset), a.batch * a.seq_len, device, compute_dtype) for preset in presets}

    rate, shape_rates = rates()
    settings = [(preset, mode, rank) for preset in presets for mode in a.mode
                for rank in (a.lora_rank if mode == "lora" else a.lora_rank[:1])]
    runs = {s: {"ours": [], "transformers": []} for s in settings}
    for r in range(a.repeats):
        for setting in settings:
            for side in (("ours", "transformers") if r % 2 == 0 else ("transformers", "ours")):
                runs[setting][side].append(run_child(side, *setting, a))
    rate_after, shape_rates_after = rates()       # load may have slowed the first measurement: the best of both
    rate = max(rate, rate_after)
    shape_rates = {preset: max(shape_rates[preset], shape_rates_after[preset]) for preset in presets}
    rows = [row for setting in settings for row in compare(runs[setting], rate, shape_rates[setting[0]])]
    print(json.dumps({**machine(), "threads": torch.get_num_threads(), "matmul_dtype": str(compute_dtype)}))
    columns = ["preset", "mode", "rank", "side", "seq_len", "runs", "tokens_per_s", "tokens_per_s_runs",
               "peak_mem_gib", "train_mem_gib", "model_tflops", "matmul_tflops", "fraction_of_matmul",
               "shape_matmul_tflops", "fraction_of_shapes", "mfu",
               "speedup", "memory_ratio", "train_memory_ratio", "first_loss", "error"]
    print_table(rows, columns)
    print(f"results: {write_results('train', rows, matmul_dtype=str(compute_dtype))}")


if __name__ == "__main__":
    main()

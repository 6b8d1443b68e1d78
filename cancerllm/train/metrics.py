"""What a run reports: per-step metrics on the console (rank 0) and in `metrics.jsonl`, and the resolved config
and environment in the run directory."""
import json
import math
import platform
import resource
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

from ..hardware import gpu_peaks


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory, or on CPU the process's peak resident set size, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB on Linux
    return rss_kib / 2**20


def environment(world_size: int, device: torch.device) -> dict:
    import numpy
    env = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
           "numpy": numpy.__version__, "world_size": world_size, "device": device.type,
           "cuda": torch.version.cuda, "argv": sys.argv}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["gpu_peak_tflops_bf16"] = gpu_peaks(env["gpu"])[0]   # the data sheet's, to judge log.peak_tflops by
    return env


def write_run_info(run_dir: Path, config_toml: str, env: dict):
    """The resolved config (re-runnable with --config) and the environment, next to the metrics."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(config_toml)
    (run_dir / "environment.json").write_text(json.dumps(env, indent=2))


class MetricsLogger:
    """Rank 0 prints every `every` steps and appends every record to run_dir/metrics.jsonl; other ranks are
    silent. MFU = model FLOPs per second per device / `peak_tflops`, reported on GPU only; peak_tflops=None takes
    the GPU's data-sheet peak (cancerllm.hardware), and a GPU missing from that table reports no MFU."""

    def __init__(self, run_dir, *, is_main: bool, every: int, flops_per_token: float, peak_tflops: Optional[float],
                 device: torch.device, world_size: int):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.is_main, self.every = is_main, every
        if peak_tflops is None and device.type == "cuda":
            peak_tflops = gpu_peaks(torch.cuda.get_device_name(device))[0]
        self.flops_per_token, self.peak_tflops = flops_per_token, peak_tflops
        self.device, self.world_size = device, world_size
        self.last = time.perf_counter()

    def truncate_after(self, step: int):
        """On resume: drop records of steps after the checkpoint, which the resumed run logs again. A last line
        cut short (a run killed, or a disk filled, mid-append) is dropped with a warning; a bad line before it is
        an error naming the line."""
        if not self.is_main or not self.path.exists():
            return
        lines = self.path.read_text().splitlines()
        kept = []
        for number, line in enumerate(lines, 1):
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line + "\n")
            except (json.JSONDecodeError, AttributeError) as e:
                if number < len(lines):
                    raise ValueError(f"{self.path}:{number}: not a JSON record ({e})") from None
                warnings.warn(f"{self.path}:{number}: dropping a partial last line (the run writing it was stopped "
                              f"mid-append): {line[:80]!r}", stacklevel=2)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(kept))
        tmp.replace(self.path)                  # never a half-rewritten log, even if this run is killed here

    def write(self, record: dict):
        if self.is_main:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def print(self, text: str):
        if self.is_main:
            print(text, flush=True)

    def reset_timer(self):
        self.last = time.perf_counter()

    def step(self, step: int, result, lr: float, skipped_total: int):
        now = time.perf_counter()
        step_time, self.last = now - self.last, now
        tokens_per_s = result.tokens / step_time
        record = {"step": step, "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm,
                  "tokens": result.tokens, "loss_tokens": result.loss_tokens, "tokens_per_s": tokens_per_s,
                  "tokens_per_s_per_device": tokens_per_s / self.world_size, "step_time_s": step_time,
                  "peak_mem_gib": peak_memory_gib(self.device), "skipped": result.skipped,
                  "skipped_total": skipped_total}
        if self.device.type == "cuda" and self.peak_tflops:
            record["mfu"] = self.flops_per_token * tokens_per_s / self.world_size / (self.peak_tflops * 1e12)
        self.write(record)
        if step % self.every == 0 or result.skipped:
            mfu = f"  mfu {record['mfu']:.1%}" if "mfu" in record else ""
            flag = "  SKIPPED (non-finite)" if result.skipped else ""
            self.print(f"step {step:6d}  loss {result.loss:.4f}  lr {lr:.2e}  gnorm {result.grad_norm:.3f}  "
                       f"{tokens_per_s:,.0f} tok/s  {step_time * 1e3:.0f} ms  "
                       f"mem {record['peak_mem_gib']:.2f} GiB{mfu}{flag}")

    def validation(self, step: int, loss: float, tokens: int):
        ppl = math.exp(min(loss, 80.0))
        self.write({"step": step, "val_loss": loss, "val_ppl": ppl, "val_tokens": tokens})
        self.print(f"step {step:6d}  val loss {loss:.4f}  ppl {ppl:.2f}  ({tokens:,} tokens)")

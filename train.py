"""Train a Mistral model: `torchrun --nproc_per_node=N train.py --config configs/X.toml [--set key=value ...]`,
or `python train.py ...` as a single process.

config -> process group and mesh -> model (LoRA, FSDP2) -> optimizer -> loaders -> resume -> loop -> export.
The pieces live in cancerllm/train/; configs/ holds the CPU default and the 7B recipes.
"""
import argparse
import gc
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from cancerllm.train.allocator import keep_freed_memory
from cancerllm.train.build import build_loader, build_model, export_dtype, resolve_tokenizer, shards_prompt_settings
from cancerllm.train.checkpointing import CheckpointError, Checkpointer, run_settings
from cancerllm.train.config import ConfigError, load_config, to_toml
from cancerllm.train.lora import trainable_summary
from cancerllm.train.metrics import MetricsLogger, environment, write_run_info
from cancerllm.train.optim import build_optimizer, build_scheduler, optimizer_bytes
from cancerllm.train.parallel import all_reduce_sum, build_mesh, init_distributed
from cancerllm.train.step import NonFiniteGuard, evaluate, to_device, train_step


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="TOML run config")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config key (repeatable)")
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_const", const="always", dest="resume",
                        help="resume from the run directory's latest checkpoint (an error if there is none)")
    resume.add_argument("--no-resume", action="store_const", const="never", dest="resume",
                        help="start from scratch even if the run directory has a checkpoint")
    args = parser.parse_args(argv)
    overrides = args.set + ([f'checkpoint.resume="{args.resume}"'] if args.resume else [])
    return args.config, overrides


class StopSignal:
    """SIGTERM (a preempted job, a cancelled torchrun) sets a flag; the loop saves a checkpoint and exits with
    EXIT_STOPPED, so a scheduler or script sees that the run is not finished."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self.handle)

    def handle(self, signum, frame):
        self.requested = True


EXIT_STOPPED = 128 + signal.SIGTERM     # 143, the shell's status for a process ended by SIGTERM


def main(argv=None):
    config_path, overrides = parse_args(argv)
    try:
        cfg = load_config(config_path, overrides)       # every key checked before any work starts
        tokenizer = resolve_tokenizer(cfg.data.tokenizer)
    except (ConfigError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    stop = StopSignal()
    d = init_distributed()
    if d.device.type == "cpu":
        keep_freed_memory()                             # a step's freed activations re-used, not faulted in again
    try:
        finished = train(cfg, tokenizer, d, stop)
    except CheckpointError as e:                        # a resume refused: the same on every rank
        sys.exit(f"error: {e}")
    finally:
        # Free the model, optimizer and their DTensors (and the Work objects they hold) while the group and
        # the interpreter are both alive, so no backend thread outlives its objects at exit.
        gc.collect()
        dist.destroy_process_group()
    if not finished:
        sys.exit(EXIT_STOPPED)


def train(cfg, tokenizer, d, stop: StopSignal):
    """One run, from the mesh to the export; returns False early (after a checkpoint) when SIGTERM arrived, True
    when the run is complete."""
    mesh = build_mesh(cfg.parallel, d.world_size, d.device)
    run_dir = Path(cfg.checkpoint.dir)

    args, model = build_model(cfg, d, mesh)
    torch.manual_seed(cfg.train.seed + d.rank)           # per-rank stream for dropout from here on
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    loader = build_loader(cfg.data, cfg.data.train, "data.train", stage=cfg.train.stage, seed=cfg.train.seed)
    val_loader = (build_loader(cfg.data, cfg.data.val, "data.val", stage=cfg.train.stage, seed=cfg.train.seed)
                  if cfg.data.val else None)
    guard = NonFiniteGuard(cfg.train.max_bad_steps)

    log = MetricsLogger(run_dir, is_main=d.is_main, every=cfg.log.every, flops_per_token=args.flops_per_token(
        cfg.data.seq_len), peak_tflops=cfg.log.peak_tflops, device=d.device, world_size=d.world_size)
    trainable, total = trainable_summary(model)
    log.print(f"model {cfg.model.init_from or cfg.model.preset}: {total:,} parameters, {trainable:,} trainable "
              f"({trainable / total:.2%}); AdamW state {2 * 4 * trainable / 2**20:,.1f} MiB in all; "
              f"{d.world_size} rank(s) on {d.device.type} computing in {cfg.parallel.mixed_precision}, "
              f"mesh {mesh.shape}")

    checkpointer = Checkpointer(run_dir, d, keep=cfg.checkpoint.keep,
                                settings=run_settings(args, cfg.lora, cfg.model.init_from))
    start = 0
    latest = checkpointer.latest() if cfg.checkpoint.resume != "never" else None
    if cfg.checkpoint.resume == "always" and latest is None:
        raise FileNotFoundError(f"--resume: {run_dir}/checkpoints has no checkpoint")
    if latest is not None:
        start = checkpointer.load(latest, model, optimizer, scheduler, loader, guard)
        log.print(f"resumed from {latest} (step {start})")
    if d.is_main:                                        # after the resume checks: a refused run changes nothing
        write_run_info(run_dir, to_toml(cfg), environment(d.world_size, d.device))
    log.truncate_after(start)                            # steps after `start` are (re)logged by this run

    def validate(step):
        val_loader.load_state_dict(val_state)            # the same validation batches every time
        loss, tokens = evaluate(model, (next(val_loader) for _ in range(cfg.train.val_batches)), d.device)
        log.validation(step, loss, tokens)

    val_state = val_loader.state_dict() if val_loader else None
    step = start
    log.reset_timer()
    while step < cfg.train.steps:
        micro_batches = [to_device(next(loader), d.device, cfg.train.loss_weighting)
                         for _ in range(cfg.train.grad_accum)]
        result = train_step(model, optimizer, micro_batches, dp_size=d.world_size, max_norm=cfg.train.max_norm,
                            device=d.device, stop_requested=stop.requested,
                            defer_gradient_sync=cfg.parallel.defer_gradient_sync)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        step += 1
        guard.update(step, result)
        log.step(step, result, lr, guard.skipped_total)
        if step == start + 1 and not result.skipped:
            (state_bytes,) = all_reduce_sum([optimizer_bytes(optimizer)], d.device)
            log.print(f"optimizer state: {state_bytes / 2**20:,.1f} MiB over all ranks")
        if val_loader and cfg.train.val_every and step % cfg.train.val_every == 0:
            validate(step)
        if result.stop_requested:
            checkpointer.save(step, model, optimizer, scheduler, loader, guard)
            log.print(f"stop requested (SIGTERM): saved a checkpoint at step {step}; exiting with {EXIT_STOPPED}")
            return False
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < cfg.train.steps:
            checkpointer.save(step, model, optimizer, scheduler, loader, guard)
        log.reset_timer()                                # checkpoint and validation time is not step time

    if step > start:                 # a finished run started again: nothing to validate, its checkpoint kept
        if val_loader and not (cfg.train.val_every and step % cfg.train.val_every == 0):
            validate(step)
        checkpointer.save(step, model, optimizer, scheduler, loader, guard)
    if cfg.checkpoint.export:
        prompts = shards_prompt_settings(cfg.data.train, "data.train") if cfg.train.stage == "sft" else None
        path = checkpointer.export(model, args, run_dir / "export", tokenizer=tokenizer,
                                   dtype=export_dtype(cfg, d.device), lora=cfg.lora if cfg.lora.enabled else None,
                                   prompt_settings=prompts)
        log.print(f"exported a Hugging Face checkpoint to {path}")
    loader.close()
    if val_loader:
        val_loader.close()
    dist.barrier()                                       # no rank tears the group down under another's feet
    return True


if __name__ == "__main__":
    main()

"""Training checkpoints with torch.distributed.checkpoint (each rank writes its own shards), and the Hugging Face
export at the end of a run.

Layout of the run directory's `checkpoints/`: `step-00000100/` (one DCP checkpoint) ... and `latest`, a text file
naming the newest complete one. A checkpoint is written to `step-N.tmp/`, renamed once every rank has finished,
and only then is `latest` replaced (atomically) and old checkpoints pruned: a run killed mid-write leaves the
previous checkpoint and `latest` intact, and the stale `.tmp` directory is removed by the next run.

One checkpoint holds the model and optimizer (sharded), the scheduler, the step and skip counters, and per rank
the loader position and the RNG state, so a resumed run continues the same trajectory.
"""
import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from ..checkpoint import save_state_dict
from .lora import merge_state_dict, save_adapters

LATEST = "latest"
EXPORT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def barrier():
    if dist.is_initialized():
        dist.barrier()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def rng_states() -> dict:
    """This rank's RNG states (CPU, and CUDA when present) under rank-specific keys."""
    states = {f"rng_rank{rank()}": torch.get_rng_state()}
    if torch.cuda.is_available():
        states[f"cuda_rng_rank{rank()}"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(state: dict):
    if f"rng_rank{rank()}" in state:
        torch.set_rng_state(state[f"rng_rank{rank()}"])
    if f"cuda_rng_rank{rank()}" in state:
        torch.cuda.set_rng_state(state[f"cuda_rng_rank{rank()}"])


class Checkpointer:
    def __init__(self, run_dir, *, keep: int):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep = keep
        if rank() == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in self.dir.glob("*.tmp"):
                print(f"checkpoint: removing {stale}, left by a run stopped while writing it")
                shutil.rmtree(stale)
        barrier()

    def latest(self):
        """The newest complete checkpoint directory, or None."""
        pointer = self.dir / LATEST
        if not pointer.exists():
            return None
        path = self.dir / pointer.read_text().strip()
        if not (path / ".metadata").exists():
            raise FileNotFoundError(f"{pointer} names {path.name}, which is not a complete checkpoint")
        return path

    # ------------------------------------------------------------------------------------------ state

    def state(self, model, optimizer):
        """The sharded tensors DCP writes into or reads from, in place."""
        return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer),
                **rng_states()}

    def save(self, step: int, model, optimizer, scheduler, loader, guard):
        state = self.state(model, optimizer)
        state["progress"] = json.dumps({"step": step, "scheduler": scheduler.state_dict(),
                                        "guard": guard.state_dict(), "world_size": world_size()})
        state[f"loader_rank{rank()}"] = json.dumps(loader.state_dict())
        final = self.dir / step_name(step)
        tmp = final.with_name(final.name + ".tmp")
        dcp.save(state, checkpoint_id=str(tmp))
        barrier()
        if rank() == 0:
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            pointer_tmp = self.dir / (LATEST + ".tmp")
            pointer_tmp.write_text(final.name + "\n")
            pointer_tmp.replace(self.dir / LATEST)
            self.prune()
        barrier()
        return final

    def prune(self):
        complete = sorted(p for p in self.dir.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in complete[:-self.keep]:
            shutil.rmtree(old)

    def load(self, path, model, optimizer, scheduler, loader, guard) -> int:
        """Restore everything saved by `save`; returns the step the checkpoint was taken after."""
        path = Path(path)
        saved_keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata.keys()
        state = self.state(model, optimizer)
        # The loader position is a global sample index, so rank 0's serves any world size; the RNG state of a
        # rank exists only when the world size is unchanged.
        loader_key = f"loader_rank{rank()}" if f"loader_rank{rank()}" in saved_keys else "loader_rank0"
        state.update(progress="", **{loader_key: ""})
        for key in [k for k in rng_states() if k not in saved_keys]:
            del state[key]
        dcp.load(state, checkpoint_id=str(path))
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optim"])
        set_rng_states(state)
        progress = json.loads(state["progress"])
        scheduler.load_state_dict(progress["scheduler"])
        guard.load_state_dict(progress["guard"])
        loader.load_state_dict(json.loads(state[loader_key]))
        return int(progress["step"])

    # ------------------------------------------------------------------------------------------ export

    def export(self, model, args, path, *, tokenizer=None, dtype="bfloat16", lora=None, prompt_settings=None):
        """Gather the full weights on rank 0 and write a Hugging Face directory; with LoRA, the adapters alone
        go to `<path>-adapters/` and the export holds the base weights with the adapters merged in.
        prompt_settings (tasks.prompts.PromptSettings): how the training examples were prompted, saved beside the
        weights so that the Generator's task helpers prompt the same way."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model, options=options)
        path = Path(path)
        if rank() == 0:
            if lora is not None:
                save_adapters(state, lora, path.with_name(path.name + "-adapters"))
                state = merge_state_dict(state, lora, EXPORT_DTYPES[dtype])
            tmp = path.with_name(path.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            save_state_dict(state, args, tmp, tokenizer=tokenizer, dtype=EXPORT_DTYPES[dtype])
            if prompt_settings is not None:
                prompt_settings.save(tmp)
            shutil.rmtree(path, ignore_errors=True)
            tmp.rename(path)
        barrier()
        return path


def load_full_weights(model, state: dict):
    """Fill a sharded (FSDP2) model from a full state dict held by rank 0 only (the others pass {}), e.g. a
    Hugging Face checkpoint to continue pretraining from; parameters it lacks (LoRA adapters) keep their values."""
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    set_model_state_dict(model, state, options=options)

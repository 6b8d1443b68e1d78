"""Training checkpoints with torch.distributed.checkpoint (each rank writes its own shards), and the Hugging Face
export at the end of a run.

Layout of the run directory's `checkpoints/`: `step-00000100/` (one checkpoint) ... and `latest`, a text file
naming the newest complete one. A checkpoint is written to `step-N.tmp/`, its `manifest.json` (every file's size
and SHA-256) last, renamed once every rank has finished, and only then is `latest` replaced (atomically) and old
checkpoints pruned: a run killed mid-write leaves the previous checkpoint and `latest` intact, and the stale `.tmp`
directory is removed by the next run.

One checkpoint holds the model (with a quantized base, all of it but the NF4 weights: a resumed run quantizes them
again from model.init_from, or from the seed, as deterministically as the first time), the optimizer's moments and
per rank the RNG state (DCP tensors), `progress.json` (step, scheduler, guard, world size, and the settings a resumed
run must share) and per rank `loader_rank{r}.json`, so a resumed run continues the same trajectory.

Resuming never executes anything from the checkpoint directory: DCP's `.metadata` is a pickle, read here through an
allow-list of the classes DCP writes for tensors (a crafted file raises CheckpointError instead of running code),
entries that DCP would unpickle (non-tensor values) are refused, and tensors are read by DCP with
`torch.load(weights_only=True)`. `latest` must name a `step-N` directory inside `checkpoints/`; a checkpoint whose
files do not match its manifest is skipped for the previous one, with a warning.
"""
import hashlib
import json
import pickle
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.tensor import DTensor

from ..checkpoint import DTYPES, plain_file_name, save_state_dict
from .lora import merge_state_dict, save_adapters
from .nf4 import gather_dequantized, is_nf4
from .optim import resume_schedule
from .parallel import Dist, all_reduce_sum, full_tensor

LATEST = "latest"
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
METADATA = ".metadata"
STEP_DIR = re.compile(r"step-(\d{8})")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the file or the setting at fault."""


def step_name(step: int) -> str:
    return f"step-{step:08d}"


# ModelArgs fields that do not change what the model computes or holds: the attention kernel, and the family,
# which only names the architecture in an export's config.json (a Llama is a Mistral without a window).
NAMING_FIELDS = ("attn_backend", "family")
# Settings that checkpoints written before they existed lack, with the value those checkpoints were written with.
LATER_SETTINGS = {"model.tie_word_embeddings": False, "lora.quantize_base": "none"}


def run_settings(args, lora, init_from=None) -> dict:
    """What a resumed run must share with the run that wrote the checkpoint: the model's shape, the LoRA
    adapters' (config names) and whether the base is quantized; a quantized base, which the checkpoint does not hold,
    must come from the same model.init_from. The rest (lr, steps, data, batch size, world size) may change on resume."""
    settings = {f"model.{key}": value for key, value in args.to_dict().items() if key not in NAMING_FIELDS}
    settings["lora.enabled"] = lora.enabled
    if lora.enabled:
        settings.update({"lora.rank": lora.rank, "lora.targets": list(lora.targets),
                         "lora.quantize_base": lora.quantize_base})
        if lora.quantize_base != "none":
            settings["model.init_from"] = init_from
    return settings


# ---------------------------------------------------------------------------------------------- DCP metadata

# Every class a DCP `.metadata` holds for a state dict of tensors (see torch/distributed/checkpoint/metadata.py and
# filesystem.py), plus torch dtypes. find_class is the only way a pickle reaches a callable, so a file naming
# anything else (os.system, BytesStorageMetadata for a pickled object entry, ...) is refused before it runs.
METADATA_CLASSES = {("torch.distributed.checkpoint.metadata", name) for name in (
    "Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata", "MetadataIndex", "StorageMeta",
    "_MEM_FORMAT_ENCODING")} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                                ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath")}


class MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in METADATA_CLASSES or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                   torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not something DCP metadata of tensors holds")


def read_metadata(directory: Path) -> Metadata:
    """A checkpoint's DCP metadata, read through the allow-list, with only tensor entries stored in files of the
    checkpoint directory itself."""
    path = directory / METADATA
    try:
        with path.open("rb") as f:
            metadata = MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except Exception as e:      # a truncated or garbage pickle raises any of a dozen types; all mean the same here
        raise CheckpointError(f"{path}: not the DCP metadata of a cancerllm checkpoint ({type(e).__name__}: {e})"
                              ) from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise CheckpointError(f"{path}: not DCP metadata (a {type(metadata).__name__})")
    for key, entry in metadata.state_dict_metadata.items():
        if not isinstance(entry, TensorStorageMetadata):
            raise CheckpointError(f"{path}: entry {key!r} is not a tensor (cancerllm checkpoints hold tensors only)")
    for info in metadata.storage_data.values():
        if not isinstance(info, _StorageInfo) or not plain_file_name(info.relative_path):
            raise CheckpointError(f"{path}: storage entry {info!r} is not a file of the checkpoint directory")
    return metadata


class SafeReader(FileSystemReader):
    """DCP's file reader with its metadata read by `read_metadata` above instead of `pickle.load`."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        metadata = read_metadata(Path(self.path))
        metadata.storage_meta = metadata.storage_meta or StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# ---------------------------------------------------------------------------------------------- state

def model_state(model) -> dict:
    """The model's tensors a checkpoint holds: all but the NF4 weights (frozen, and rebuilt by quantizing the base
    again on resume; DCP cannot write them)."""
    return {name: t for name, t in get_model_state_dict(model).items() if not is_nf4(t)}


def set_model_state(model, state: dict):
    """Load `model_state`'s tensors; the NF4 weights it leaves out keep the values the model was built with."""
    quantized = any(is_nf4(p) for p in model.parameters())
    set_model_state_dict(model, state, options=StateDictOptions(strict=not quantized))


def rng_states(rank: int) -> dict:
    """This rank's RNG states (CPU, and CUDA when present) under rank-specific keys."""
    states = {f"rng_rank{rank}": torch.get_rng_state()}
    if torch.cuda.is_available():
        states[f"cuda_rng_rank{rank}"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(state: dict, rank: int):
    if f"rng_rank{rank}" in state:
        torch.set_rng_state(state[f"rng_rank{rank}"])
    if f"cuda_rng_rank{rank}" in state:
        torch.cuda.set_rng_state(state[f"cuda_rng_rank{rank}"])


def file_digest(path: Path) -> dict:
    with path.open("rb") as f:
        return {"bytes": path.stat().st_size, "sha256": hashlib.file_digest(f, "sha256").hexdigest()}


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return value


class Checkpointer:
    """Saves and resumes the checkpoints of the run directory `run_dir`; `settings` (run_settings) are recorded in
    each checkpoint and must be equal on resume."""

    def __init__(self, run_dir, d: Dist, *, keep: int, settings: dict | None = None):
        self.dir = Path(run_dir) / "checkpoints"
        self.d, self.keep, self.settings = d, keep, settings or {}
        if d.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in self.dir.glob("*.tmp"):
                print(f"checkpoint: removing {stale}, left by a run stopped while writing it")
                shutil.rmtree(stale)
        d.barrier()

    def on_all_ranks(self, items: list, fn) -> list:
        """fn over items, shared round-robin between the ranks; every rank gets every result, in rank order."""
        mine = [fn(item) for item in items[self.d.rank::self.d.world_size]]
        gathered = [None] * self.d.world_size
        dist.all_gather_object(gathered, mine)
        return [result for part in gathered for result in part]

    # ------------------------------------------------------------------------------------------ resume

    def latest(self):
        """The newest intact checkpoint: the one `latest` names or, when its files are missing or do not match its
        manifest, the newest intact one before it (with a warning). None when the run has no checkpoint yet."""
        pointer = self.dir / LATEST
        if not pointer.is_file():
            return None
        name = pointer.read_text().strip()
        named = STEP_DIR.fullmatch(name)
        if not named:
            raise CheckpointError(f"{pointer} names {name!r}, which is not a checkpoint of this run (a step-NNNNNNNN "
                                  f"directory inside {self.dir})")
        older = sorted((p for p in self.dir.iterdir() if (m := STEP_DIR.fullmatch(p.name)) and m[1] < named[1]),
                       reverse=True)
        problems = []
        for path in [self.dir / name, *older]:
            problem = self.problem(path)
            if problem is None:
                return path
            problems.append(f"{path.name}: {problem}")
            if self.d.is_main:
                warnings.warn(f"checkpoint {path} cannot be resumed from ({problem}); trying the one before it",
                              stacklevel=2)
        raise CheckpointError(f"{self.dir}: no intact checkpoint to resume from ({'; '.join(problems)}); start over "
                              "with --no-resume or another checkpoint.dir")

    def problem(self, path: Path):
        """Why `path` is not an intact checkpoint of this run, or None. Every rank hashes a share of the files."""
        if path.is_symlink() or not path.is_dir():
            return "missing" if not path.exists() else "not a directory of checkpoints/"
        try:
            files = read_json(path / MANIFEST).get("files")
            if not isinstance(files, dict) or not all(map(plain_file_name, files)):
                raise CheckpointError(f"{path / MANIFEST}: no valid 'files' table")
        except CheckpointError as e:
            return str(e)

        def check(name):
            file = path / name
            if not file.is_file():
                return f"{file}: missing"
            digest = file_digest(file)
            return None if digest == files[name] else f"{file}: {digest['bytes']} bytes, sha256 " \
                f"{digest['sha256'][:12]}..., but the manifest says {files[name]}"
        found = [p for p in self.on_all_ranks(sorted(files), check) if p]
        if found:
            return found[0]
        try:
            read_metadata(path)
        except CheckpointError as e:
            return str(e)
        return None

    def check_settings(self, saved: dict, path: Path):
        saved = {**LATER_SETTINGS, **saved}
        differ = [f"{key} = {saved.get(key)!r} there, {value!r} now" for key, value in self.settings.items()
                  if saved.get(key) != value]
        if differ:
            raise CheckpointError(f"{path} was written by a run with other settings ({'; '.join(differ)}): resume "
                                  "with the settings it was written with, or start over with --no-resume or another "
                                  "checkpoint.dir")

    def load(self, path, model, optimizer, scheduler, loader, guard) -> int:
        """Restore everything saved by `save`; returns the step the checkpoint was taken after. The optimizer's
        hyperparameters and peak lr are this run's config (optim.resume_schedule), its moments the checkpoint's."""
        path = Path(path)
        progress = read_json(path / PROGRESS)
        missing = {"step", "scheduler", "guard"} - progress.keys()
        if missing:
            raise CheckpointError(f"{path / PROGRESS}: missing {', '.join(sorted(missing))}")
        self.check_settings(progress.get("settings", {}), path)
        saved_keys = read_metadata(path).state_dict_metadata.keys()
        optim_state = get_optimizer_state_dict(model, optimizer)
        tensors = {"model": model_state(model), "optim": optim_state["state"],
                   **{k: v for k, v in rng_states(self.d.rank).items() if k in saved_keys}}
        dcp.load(tensors, storage_reader=SafeReader(path))
        set_model_state(model, tensors["model"])
        set_optimizer_state_dict(model, optimizer, {"state": tensors["optim"],
                                                    "param_groups": optim_state["param_groups"]})
        set_rng_states(tensors, self.d.rank)
        saved_lr = resume_schedule(scheduler, progress["scheduler"])
        if self.d.is_main and saved_lr != scheduler.base_lrs[0]:
            print(f"checkpoint: optim.lr = {scheduler.base_lrs[0]:g} (it was {saved_lr:g} when {path.name} was "
                  f"written): the schedule uses the new peak from step {progress['step']} on")
        guard.load_state_dict(progress["guard"])
        # The loader position is a global sample index, so rank 0's serves any world size.
        loader_file = path / f"loader_rank{self.d.rank}.json"
        loader.load_state_dict(read_json(loader_file if loader_file.is_file() else path / "loader_rank0.json"))
        return int(progress["step"])

    # ------------------------------------------------------------------------------------------ save

    def save(self, step: int, model, optimizer, scheduler, loader, guard):
        """Write checkpoint `step` and point `latest` at it; refused (FloatingPointError) when the weights are
        not finite, so `latest` never moves onto a diverged model."""
        self.refuse_non_finite(model, step)
        final = self.dir / step_name(step)
        tmp = final.with_name(final.name + ".tmp")
        tensors = {"model": model_state(model), "optim": get_optimizer_state_dict(model, optimizer)["state"],
                   **rng_states(self.d.rank)}
        dcp.save(tensors, checkpoint_id=str(tmp))
        (tmp / f"loader_rank{self.d.rank}.json").write_text(json.dumps(loader.state_dict()))
        if self.d.is_main:
            (tmp / PROGRESS).write_text(json.dumps({
                "step": step, "scheduler": scheduler.state_dict(), "guard": guard.state_dict(),
                "world_size": self.d.world_size, "settings": self.settings}, indent=1))
        self.d.barrier()
        digests = self.on_all_ranks(sorted(p.name for p in tmp.iterdir()), lambda name: (name, file_digest(tmp / name)))
        if self.d.is_main:
            (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": dict(digests)}, indent=1))
            if final.exists():          # a damaged checkpoint of the same step that resume skipped
                shutil.rmtree(final)
            tmp.rename(final)
            pointer_tmp = self.dir / (LATEST + ".tmp")
            pointer_tmp.write_text(final.name + "\n")
            pointer_tmp.replace(self.dir / LATEST)
            self.prune()
        self.d.barrier()
        return final

    def refuse_non_finite(self, model, step: int):
        local = [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters() if not is_nf4(p)]
        finite = torch.stack([torch.isfinite(t).all() for t in local]).all()
        (bad_ranks,) = all_reduce_sum([float(not finite)], self.d.device)
        if bad_ranks:
            raise FloatingPointError(f"step {step}: the model's weights are not finite; no checkpoint written "
                                     f"({self.dir / LATEST} still names the last good one)")

    def prune(self):
        complete = sorted(p for p in self.dir.iterdir() if STEP_DIR.fullmatch(p.name) and p.is_dir())
        for old in complete[:-self.keep]:
            shutil.rmtree(old)

    # ------------------------------------------------------------------------------------------ export

    def full_state(self, model) -> dict:
        """The model's whole tensors on rank 0's CPU ({} on the other ranks), gathered one at a time; NF4 weights
        dequantized (nf4.gather_dequantized)."""
        state = {}
        for name, t in get_model_state_dict(model).items():
            whole = gather_dequantized(t) if is_nf4(t) else full_tensor(t)
            if self.d.is_main:
                state[name] = whole.detach().cpu()
        return state

    def export(self, model, args, path, *, tokenizer=None, dtype="bfloat16", lora=None, prompt_settings=None):
        """Gather the full weights on rank 0 and write a Hugging Face directory; with LoRA, the adapters alone
        go to `<path>-adapters/` and the export holds the base weights (dequantized, if NF4) with the adapters
        merged in.
        prompt_settings (tasks.prompts.PromptSettings): how the training examples were prompted, saved beside the
        weights so that the Generator's task helpers prompt the same way."""
        # With tied embeddings this holds the embedding under both names (two gathered copies): save_state_dict
        # checks that they are equal and writes one, as transformers does.
        state = self.full_state(model)
        path = Path(path)
        if self.d.is_main:
            if lora is not None:
                save_adapters(state, lora, path.with_name(path.name + "-adapters"))
                state = merge_state_dict(state, lora, DTYPES[dtype])
            tmp = path.with_name(path.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            save_state_dict(state, args, tmp, tokenizer=tokenizer, dtype=DTYPES[dtype])
            if prompt_settings is not None:
                prompt_settings.save(tmp)
            shutil.rmtree(path, ignore_errors=True)
            tmp.rename(path)
        self.d.barrier()
        return path


def load_full_weights(model, state: dict):
    """Fill a sharded (FSDP2) model from a full state dict held by rank 0 only (the others pass {}), e.g. a
    Hugging Face checkpoint to continue pretraining from; parameters it lacks (LoRA adapters) keep their values."""
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    set_model_state_dict(model, state, options=options)

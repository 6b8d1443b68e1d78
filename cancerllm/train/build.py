"""Building the pieces of a run from its config: the model (random init or a Hugging Face checkpoint, LoRA,
FSDP2) and the training and validation loaders."""
import glob
import json
from pathlib import Path

import torch
import torch.distributed as dist

from ..data import PackedLoader
from ..model import ModelArgs, Transformer
from .checkpointing import load_full_weights
from .config import Config, DataConfig
from .lora import apply_lora, reset_adapters, store_frozen_in
from .parallel import Dist, param_dtype, parallelize

BASE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def build_model(cfg: Config, d: Dist, mesh) -> tuple[ModelArgs, Transformer]:
    """Create, adapt, shard and fill the model.

    A random init on CPU builds the full model on every rank from the same seed and then shards it, so the
    weights do not depend on the world size. On GPU, and whenever weights come from a checkpoint, the model is
    created on the meta device, sharded, and only then materialised: no rank ever holds a full fp32 copy on GPU.
    With LoRA the frozen base is stored in lora.base_dtype (the checkpoint is read in it too); the adapters are fp32.
    """
    args = (read_pretrained_args(cfg.model.init_from) if cfg.model.init_from
            else ModelArgs.preset(cfg.model.preset, **cfg.model.overrides))
    torch.manual_seed(cfg.train.seed)
    on_meta = d.device.type == "cuda" or cfg.model.init_from is not None
    with torch.device("meta" if on_meta else "cpu"):
        model = Transformer(args)
    base_dtype = torch.float32
    if cfg.lora.enabled:
        apply_lora(model, cfg.lora)
        base_dtype = lora_base_dtype(cfg, d.device)
        store_frozen_in(model, base_dtype)
    parallelize(model, mesh, cfg.parallel, d.device)
    if on_meta:
        model.to_empty(device=d.device)
        model.init_rope()
        if cfg.model.init_from:
            state = (Transformer.from_pretrained(cfg.model.init_from, dtype=base_dtype).state_dict()
                     if d.is_main else {})
            load_full_weights(model, state)
        else:
            model.init_weights()
        if cfg.lora.enabled:
            reset_adapters(model)
    return args, model


def lora_base_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """lora.base_dtype, "auto" being the compute dtype: frozen weights are only ever read in it."""
    if cfg.lora.base_dtype == "auto":
        return param_dtype(cfg.parallel, device)
    return BASE_DTYPES[cfg.lora.base_dtype]


def read_pretrained_args(path) -> ModelArgs:
    from ..checkpoint import CONFIG, read_config
    if not Path(path).is_dir():
        raise FileNotFoundError(f"model.init_from: {path} is not a directory")
    return read_config(Path(path) / CONFIG)[0]


def resolve_tokenizer(value):
    """data.tokenizer: a tokenizer.model path, "mistral" for Mistral's v1 vocabulary (shipped in mistral-common),
    or None (the export then has no tokenizer.model)."""
    if value == "mistral":
        from ..tokenizer import mistral_tokenizer_path
        return mistral_tokenizer_path()
    if value is not None and not Path(value).is_file():
        raise FileNotFoundError(f"data.tokenizer: {value} is not a file")
    return value


def expand_paths(patterns: list[str], key: str) -> list[str]:
    paths = []
    for pattern in patterns:
        matched = sorted(glob.glob(pattern))
        if not matched:
            raise FileNotFoundError(f"{key}: no shard matches {pattern!r} (run `python -m cancerllm.data.prepare` "
                                    "first?)")
        paths.extend(matched)
    return paths


def shards_prompt_settings(patterns: list[str], key: str):
    """The prompt settings the SFT shards were made with (prepare --prompt-settings records them in the manifest
    beside the shards), as tasks.prompts.PromptSettings, or None when no manifest records any. Shards whose
    manifests disagree are refused: the export could not say how it is to be prompted."""
    from ..tasks.prompts import PromptSettings
    found = {}
    for folder in sorted({Path(p).parent for p in expand_paths(patterns, key)}):
        manifest = folder / "manifest.json"
        if manifest.is_file():
            settings = json.loads(manifest.read_text()).get("prompt_settings")
            if settings is not None:
                found[manifest] = PromptSettings(**settings)
    settings = list(found.values())
    if any(other != settings[0] for other in settings[1:]):
        raise ValueError(f"{key}: the shards' manifests record different prompt settings "
                         f"({', '.join(map(str, found))}): train on shards prompted one way")
    return settings[0] if settings else None


def build_loader(cfg: DataConfig, patterns: list[str], key: str, *, stage: str, seed: int) -> PackedLoader:
    """A PackedLoader over this rank's part of the shards; the stage must match the shards' kind."""
    loader = PackedLoader(expand_paths(patterns, key), seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                          rank=dist.get_rank(), world_size=dist.get_world_size(), seed=seed, backend=cfg.backend,
                          num_threads=cfg.num_threads)
    if loader.sft != (stage == "sft"):
        kind = "SFT (prompt/completion, with a loss mask)" if loader.sft else "pretraining"
        raise ValueError(f"{key}: the shards are {kind} shards but train.stage = {stage!r}")
    return loader

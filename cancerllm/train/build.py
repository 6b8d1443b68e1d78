"""Building the pieces of a run from its config: the model (random init or a Hugging Face checkpoint, LoRA,
FSDP2) and the training and validation loaders."""
import glob
import json
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint import CONFIG, DTYPES, load_pretrained, read_config
from ..data import PackedLoader, ShardError, read_shard
from ..model import ModelArgs, Transformer
from ..tokenizer import open_tokenizer
from .checkpointing import load_full_weights
from .config import Config, DataConfig
from .lora import apply_lora, is_target, reset_adapters, store_frozen_in
from .nf4 import check_shardable, quantize, quantize_lora_bases
from .parallel import Dist, param_dtype, parallelize, resolve_mixed_precision



def build_model(cfg: Config, d: Dist, mesh) -> tuple[ModelArgs, Transformer]:
    """Create, adapt, shard and fill the model.

    A random init on CPU builds the full model on every rank from the same seed and then shards it, so the
    weights do not depend on the world size. On GPU, and whenever weights come from a checkpoint, the model is
    created on the meta device, sharded, and only then materialised: no rank ever holds a full fp32 copy on GPU.
    With LoRA the frozen base is stored in lora.base_dtype (the checkpoint is read in it too); the adapters are fp32.
    A quantized base (QLoRA) is built whole on every rank instead, then sharded: `build_quantized`.
    parallel.mixed_precision "fastest" is resolved here for this model and written back into cfg, so that the run's
    records and its export name the type it computed in.
    """
    args = (read_pretrained_args(cfg.model.init_from) if cfg.model.init_from
            else ModelArgs.preset(cfg.model.preset, **cfg.model.overrides))
    cfg.parallel.mixed_precision = resolve_mixed_precision(cfg.parallel, args, cfg.data.batch_size * cfg.data.seq_len,
                                                           d)
    # Here rather than in build_loader: this is the first point that knows both the model's vocabulary and the
    # data, and a mismatch found now costs no weights built.
    check_data(cfg.data, args.vocab_size)
    torch.manual_seed(cfg.train.seed)
    if cfg.lora.quantize_base != "none":
        model = build_quantized(cfg, args, d)
        check_shardable(model, mesh.size())
        return args, parallelize(model, mesh, cfg.parallel, d.device)
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


def build_quantized(cfg: Config, args: ModelArgs, d: Dist) -> Transformer:
    """The unsharded model with its LoRA-adapted weights in NF4, on every rank (the same on each: quantizing is
    deterministic). From a checkpoint, every rank reads the files itself and quantizes each adapted weight as soon
    as it is read: no rank holds more than one unquantized weight at a time, nor needs rank 0 to send it any.
    A random init (tests, benchmarks) is the CPU path's: the whole model built in fp32, then quantized."""
    base_dtype = lora_base_dtype(cfg, d.device)
    if cfg.model.init_from:
        def quantize_targets(name, tensor):
            return quantize(tensor, name) if is_target(name.removesuffix(".weight"), cfg.lora) else tensor
        model = load_pretrained(cfg.model.init_from, device=d.device, dtype=base_dtype, convert=quantize_targets)
    else:
        with torch.device(d.device):
            model = Transformer(args)
    apply_lora(model, cfg.lora)
    store_frozen_in(model, base_dtype)
    quantize_lora_bases(model)
    return model


def export_dtype(cfg: Config, device: torch.device) -> str:
    """checkpoint.export_dtype, "compute" being the name of the run's compute dtype (after build_model)."""
    if cfg.checkpoint.export_dtype != "compute":
        return cfg.checkpoint.export_dtype
    return str(param_dtype(cfg.parallel, device)).removeprefix("torch.")


def lora_base_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """lora.base_dtype, "auto" being the compute dtype: frozen weights are only ever read in it."""
    if cfg.lora.base_dtype == "auto":
        return param_dtype(cfg.parallel, device)
    return DTYPES[cfg.lora.base_dtype]


def read_pretrained_args(path) -> ModelArgs:
    if not Path(path).is_dir():
        raise FileNotFoundError(f"model.init_from: {path} is not a directory")
    return read_config(Path(path) / CONFIG)[0]


def resolve_tokenizer(value):
    """data.tokenizer: a tokenizer file (tokenizer.model or tokenizer.json) or a checkpoint directory holding one,
    "mistral" for Mistral's v1 vocabulary (shipped in mistral-common), or None (the export then has no tokenizer).
    Returns the tokenizer file's path."""
    if value == "mistral":
        from ..tokenizer import mistral_tokenizer_path
        return mistral_tokenizer_path()
    if value is None:
        return None
    try:
        return open_tokenizer(value).path
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"data.tokenizer: {e}") from None


def expand_paths(patterns: list[str], key: str) -> list[str]:
    paths = []
    for pattern in patterns:
        matched = sorted(glob.glob(pattern))
        if not matched:
            raise FileNotFoundError(f"{key}: no shard matches {pattern!r} (run `python -m cancerllm.data.prepare` "
                                    "first?)")
        paths.extend(matched)
    return paths


def read_manifest(path: Path) -> dict:
    """The manifest.json that prepare writes beside its shards."""
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "cancerllm-shards" or "tokenizer" not in manifest:
        raise ValueError(f"{path}: not the manifest.json of python -m cancerllm.data.prepare")
    return manifest


def shards_prompt_settings(patterns: list[str], key: str):
    """The prompt settings the SFT shards were made with (prepare --prompt-settings records them in the manifest
    beside the shards), as tasks.prompts.PromptSettings, or None when no manifest records any. Shards whose
    manifests disagree are refused: the export could not say how it is to be prompted."""
    from ..tasks.prompts import settings_from_json
    found = {}
    for folder in sorted({Path(p).parent for p in expand_paths(patterns, key)}):
        manifest = folder / "manifest.json"
        if manifest.is_file():
            settings = read_manifest(manifest).get("prompt_settings")
            if settings is not None:
                found[manifest] = settings_from_json(settings)
    settings = list(found.values())
    if any(other != settings[0] for other in settings[1:]):
        raise ValueError(f"{key}: the shards' manifests record different prompt settings "
                         f"({', '.join(map(str, found))}): train on shards prompted one way")
    return settings[0] if settings else None


def check_data(cfg: DataConfig, vocab_size: int):
    """Refuse shards that do not fit the run before training on them:

    - a tokenizer (data.tokenizer) other than the one the shards were made with, as recorded by the manifest.json
      that prepare writes beside them: the run would learn one vocabulary and export another's tokenizer.model.
      Shards without a manifest (written by write_shard directly) cannot be checked: they train, with a warning
      when data.tokenizer is set. Manifests that disagree with each other are refused, data.tokenizer set or not;
    - a tokenizer with more pieces than the model's vocab_size;
    - token ids the model cannot embed: a shard whose header's vocab_size exceeds the model's, or (a corrupt
      shard) a token id not below its header's vocab_size. This reads every shard's tokens once (NumPy's max over
      the memory map, at disk or page-cache speed), which the loader, unverified, never does.
    Every error names the shard or manifest and the tokenizer."""
    tokenizer = resolve_tokenizer(cfg.tokenizer)
    if tokenizer is not None:
        open_tokenizer(tokenizer).check_fits(vocab_size)
    for key, patterns in (("data.train", cfg.train), ("data.val", cfg.val)):
        paths = expand_paths(patterns, key)
        check_shard_tokenizers(sorted({Path(p).parent for p in paths}), tokenizer, key)
        for path in paths:
            check_token_ids(path, vocab_size)


def check_shard_tokenizers(folders: list[Path], tokenizer, key: str):
    """The tokenizer the manifests beside the shards record must be data.tokenizer (when set), and one for all."""
    sha256 = open_tokenizer(tokenizer).fingerprint() if tokenizer is not None else None
    recorded = {}
    for folder in folders:
        manifest = folder / "manifest.json"
        if not manifest.is_file():
            if sha256 is not None:
                warnings.warn(f"{key}: {folder} holds no manifest.json, so the tokenizer its shards were made with "
                              f"cannot be checked against data.tokenizer = {tokenizer}")
            continue
        made_with = read_manifest(manifest)["tokenizer"]
        if sha256 is not None and made_with["sha256"] != sha256:
            raise ValueError(f"{key}: the shards in {folder} were made with the tokenizer {made_with['path']} "
                             f"(sha256 {made_with['sha256'][:12]}…, recorded in {manifest}), not data.tokenizer = "
                             f"{tokenizer} (sha256 {sha256[:12]}…): the export would ship the wrong tokenizer")
        recorded[manifest] = made_with
    if len({t["sha256"] for t in recorded.values()}) > 1:
        raise ValueError(f"{key}: the shards were made with different tokenizers: " + ", ".join(
            f"{t['path']} (in {manifest})" for manifest, t in recorded.items()))


def check_token_ids(path: str, vocab_size: int):
    shard = read_shard(path, verify=False)
    if shard.vocab_size > vocab_size:
        raise ShardError(f"{path}: made for a vocabulary of {shard.vocab_size} ids, but the model's vocab_size is "
                         f"{vocab_size}: its token ids could index past the embedding")
    largest = int(shard.tokens.max())
    if largest >= shard.vocab_size:
        raise ShardError(f"{path}: token id {largest} is not below the shard's vocab_size {shard.vocab_size}: the "
                         "file is corrupt")


def build_loader(cfg: DataConfig, patterns: list[str], key: str, *, stage: str, seed: int) -> PackedLoader:
    """A PackedLoader over this rank's part of the shards; the stage must match the shards' kind."""
    loader = PackedLoader(expand_paths(patterns, key), seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                          rank=dist.get_rank(), world_size=dist.get_world_size(), seed=seed, backend=cfg.backend,
                          num_threads=cfg.num_threads)
    if loader.sft != (stage == "sft"):
        kind = "SFT (prompt/completion, with a loss mask)" if loader.sft else "pretraining"
        raise ValueError(f"{key}: the shards are {kind} shards but train.stage = {stage!r}")
    return loader

"""Run configuration: a TOML file with the sections below, checked against this schema before any work starts.

Every key has a type and a default; a key the schema does not know, a value of the wrong type or an impossible
value is refused with an error naming the file and the key. `--set section.key=value` overrides any key; the
value is read as a TOML value (`8`, `3e-4`, `true`, `"text"`, `[0.9, 0.95]`), and as a plain string otherwise.
"""
import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..model import ModelArgs
from ..tasks.mixture import MixtureSpec


class ConfigError(ValueError):
    """A config file or override that the schema refuses; the message names the file and key."""


@dataclass
class ModelConfig:
    preset: str = "small"                     # a ModelArgs preset
    overrides: dict = field(default_factory=dict)   # ModelArgs fields replacing the preset's, e.g. {n_layers = 2}
    init_from: Optional[str] = None           # a Hugging Face Mistral directory to start from (else random init)


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)  # shard files or glob patterns
    val: list[str] = field(default_factory=list)    # validation shards; empty: no validation
    tokenizer: Optional[str] = None           # file or checkpoint dir, copied into the export; "mistral": Mistral's v1
    seq_len: int = 1024
    batch_size: int = 8                       # rows per micro-batch per rank
    backend: str = "auto"                     # PackedLoader backend: auto | cpp | python
    num_threads: int = 1                      # C++ loader prefetch threads


@dataclass
class TrainConfig:
    stage: str = "pretrain"                   # pretrain (causal LM on token shards) | sft (prompt/completion shards)
    steps: int = 1000
    seed: int = 0
    grad_accum: int = 1                       # micro-batches per optimizer step
    max_norm: float = 1.0                     # global gradient-norm clip; 0 disables clipping
    max_bad_steps: int = 5                    # consecutive non-finite steps before the run stops
    loss_weighting: str = "token"             # token: mean over loss tokens | example: mean of each example's mean
    val_every: int = 0                        # steps between validations; 0: only at the end (when data.val is set)
    val_batches: int = 8                      # micro-batches per rank per validation


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1                 # the cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1                 # not applied to norms and embeddings
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    implementation: str = "auto"              # auto | fused | foreach | for-loop


@dataclass
class LoraConfig:
    enabled: bool = False
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    # Storage dtype of the frozen base weights (the adapters and their AdamW state stay fp32). auto: the compute
    # dtype (parallel.mixed_precision), so a bf16 run keeps a 7B base in 14.5 GB instead of 29 GB and casts nothing.
    base_dtype: str = "auto"                  # auto | bfloat16 | float32
    # QLoRA: "nf4" stores every adapted weight in 4-bit NormalFloat (train/nf4.py, ~0.26x of bf16), dequantized to
    # base_dtype inside each linear; the rest of the frozen base (embeddings, norms) stays in base_dtype.
    quantize_base: str = "none"               # none | nf4


@dataclass
class CheckpointConfig:
    dir: str = "runs/default"                 # the run directory: checkpoints/, export/, metrics.jsonl, config
    every: int = 0                            # steps between checkpoints; 0: only at the end
    keep: int = 3                             # checkpoints kept (the newest)
    resume: str = "auto"                      # auto (when the run directory has one) | always | never
    export: bool = True                       # write a Hugging Face directory (run_dir/export) at the end
    export_dtype: str = "bfloat16"            # bfloat16 | float16 | float32 | compute (the run's compute dtype)


@dataclass
class ParallelConfig:
    replicate: int = 1                        # HSDP replicas (e.g. nodes); 1: plain FSDP
    shard: int = -1                           # ranks each replica shards over; -1: world_size / replicate
    # auto: bf16 on GPU, fp32 on CPU | bf16 | fp32 | fastest: bf16 on GPU, on CPU whichever of bf16 and fp32 this
    # machine multiplies the model's linears faster (cancerllm/fast_dtype.py; native bf16 only with AMX or AVX512-BF16)
    mixed_precision: str = "auto"
    activation_checkpoint_every: int = 0      # 0: none, 1: every block, k: every k-th block
    compile: bool = False                     # torch.compile each block
    # true: reduce-scatter gradients once per step, after the last micro-batch, instead of after each one. Saves
    # grad_accum - 1 reduce-scatters per step, but FSDP2 then holds the unsharded fp32 gradients in between:
    # 4 bytes per trainable parameter on every rank, 29 GB for a full 7B. Only for a single node with memory to spare.
    defer_gradient_sync: bool = False


@dataclass
class LogConfig:
    every: int = 1                            # steps between console lines (metrics.jsonl gets every step)
    peak_tflops: Optional[float] = None       # per-device peak for MFU; None: the GPU's data-sheet bf16 peak


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    log: LogConfig = field(default_factory=LogConfig)
    # What `python -m cancerllm.tasks.mixture --config` makes the SFT data of (train.py itself does not read it):
    # the SFT config carries the recipe of the shards it trains on.
    sft_mixture: MixtureSpec = field(default_factory=MixtureSpec)


CHOICES = {
    ("data", "backend"): ("auto", "cpp", "python"),
    ("train", "stage"): ("pretrain", "sft"),
    ("train", "loss_weighting"): ("token", "example"),
    ("optim", "implementation"): ("auto", "fused", "foreach", "for-loop"),
    ("checkpoint", "resume"): ("auto", "always", "never"),
    ("checkpoint", "export_dtype"): ("bfloat16", "float16", "float32", "compute"),
    ("parallel", "mixed_precision"): ("auto", "bf16", "fp32", "fastest"),
    ("lora", "base_dtype"): ("auto", "bfloat16", "float32"),
    ("lora", "quantize_base"): ("none", "nf4"),
}
POSITIVE = {("data", "seq_len"), ("data", "batch_size"), ("data", "num_threads"), ("train", "steps"),
            ("train", "grad_accum"), ("train", "max_bad_steps"), ("train", "val_batches"), ("optim", "lr"),
            ("lora", "rank"), ("checkpoint", "keep"), ("parallel", "replicate"), ("log", "every"),
            ("log", "peak_tflops")}
NON_NEGATIVE = {("train", "seed"), ("train", "max_norm"), ("train", "val_every"), ("optim", "min_lr_ratio"),
                ("optim", "warmup_steps"), ("optim", "weight_decay"), ("lora", "dropout"), ("checkpoint", "every"),
                ("parallel", "activation_checkpoint_every")}


# ---------------------------------------------------------------------------------------------- types

def type_ok(value, annotation) -> bool:
    """Whether a TOML value fits a schema annotation (int is accepted for float, bool is never an int)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(type_ok(v, item) for v in value)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def type_name(annotation) -> str:
    return getattr(annotation, "__name__", None) if typing.get_origin(annotation) is None else str(annotation).replace(
        "typing.", "")


def coerce(value, annotation):
    """TOML ints become floats where the schema wants a float, so the resolved config is typed exactly."""
    if annotation is float or (typing.get_origin(annotation) is typing.Union and float in typing.get_args(annotation)):
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if typing.get_origin(annotation) is list and typing.get_args(annotation) == (float,):
        return [float(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------- loading

def parse_override(text: str, source: str):
    """'section.key=value' (or 'model.overrides.key=value') -> (['section', 'key'], value)."""
    if "=" not in text:
        raise ConfigError(f"{source}: expected section.key=value, got {text!r}")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if len(path) < 2 or not all(path):
        raise ConfigError(f"{source}: expected section.key=value, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()                    # a bare word: a string
    return path, value


def merge_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text, f"--set {text}")
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text}: {'.'.join(path[:-1])} is not a section")
        node[path[-1]] = value
    return raw


def build_section(cls, values: dict, section: str, source: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: [{section}] must be a table, got {values!r}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{source}: unknown key {section}.{key}; known keys of [{section}]: "
                              f"{', '.join(known)}")
        if not type_ok(value, hints[key]):
            raise ConfigError(f"{source}: {section}.{key} must be {type_name(hints[key])}, got {value!r}")
        kwargs[key] = coerce(value, hints[key])
    try:
        return cls(**kwargs)
    except ValueError as e:      # a section's own checks (MixtureSpec's)
        raise ConfigError(f"{source}: {e}") from None


INT64 = 2**63     # TOML integers are 64-bit; tomllib reads bigger ones, which torch and the loader cannot take


def check_numbers(section: str, values, source: str):
    """Every float finite (TOML has nan and inf: an infinite lr writes NaN weights) and every int 64-bit."""
    for key, value in values.items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, float) and not math.isfinite(item):
                raise ConfigError(f"{source}: {section}.{key} must be a finite number, got {item!r}")
            if isinstance(item, int) and not -INT64 <= item < INT64:
                raise ConfigError(f"{source}: {section}.{key} = {item} does not fit in 64 bits")


def check_values(config: Config, source: str):
    for section in dataclasses.fields(config):
        values = getattr(config, section.name)
        check_numbers(section.name, values if isinstance(values, dict) else vars(values), source)
    check_numbers("model.overrides", config.model.overrides, source)
    for (section, key), allowed in CHOICES.items():
        value = getattr(getattr(config, section), key)
        if value not in allowed:
            raise ConfigError(f"{source}: {section}.{key} must be one of {', '.join(allowed)}; got {value!r}")
    for (section, key) in POSITIVE | NON_NEGATIVE:
        value = getattr(getattr(config, section), key)
        if value is None:                        # an optional key left to its default (log.peak_tflops)
            continue
        if value < 0 or (value == 0 and (section, key) in POSITIVE):
            kind = "positive" if (section, key) in POSITIVE else "non-negative"
            raise ConfigError(f"{source}: {section}.{key} must be {kind}, got {value!r}")
    if not config.data.train:
        raise ConfigError(f"{source}: data.train must list the training shards")
    if len(config.optim.betas) != 2 or not all(0 <= b < 1 for b in config.optim.betas):
        raise ConfigError(f"{source}: optim.betas must be two numbers in [0, 1), got {config.optim.betas!r}")
    if config.lora.quantize_base != "none" and not config.lora.enabled:
        raise ConfigError(f"{source}: lora.quantize_base = {config.lora.quantize_base!r} needs lora.enabled = true: "
                          "a quantized weight cannot be trained, so full fine-tuning cannot use a quantized base")
    if config.parallel.shard != -1 and config.parallel.shard < 1:
        raise ConfigError(f"{source}: parallel.shard must be -1 or positive, got {config.parallel.shard}")
    try:
        ModelArgs.preset(config.model.preset, **config.model.overrides)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{source}: model.preset / model.overrides: {e}") from None


def load_config(path, overrides: list[str] = ()) -> Config:
    """Read a TOML run config, apply `--set` overrides, and check every key and value against the schema."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    raw = merge_overrides(raw, list(overrides))
    source = str(path) + (" (with --set overrides)" if overrides else "")
    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    unknown = raw.keys() - sections.keys()
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {', '.join(sorted(unknown))}; known: {', '.join(sections)}")
    hints = typing.get_type_hints(Config)
    config = Config(**{name: build_section(hints[name], raw.get(name, {}), name, source) for name in sections})
    check_values(config, source)
    return config


# ---------------------------------------------------------------------------------------------- saving

def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(config: Config) -> str:
    """The resolved config as TOML that `load_config` reads back (None values, the defaults, are left out)."""
    lines = []
    for section in dataclasses.fields(config):
        lines.append(f"[{section.name}]")
        for key, value in dataclasses.asdict(getattr(config, section.name)).items():
            if value is not None:
                lines.append(f"{key} = {toml_value(value)}")
        lines.append("")
    return "\n".join(lines)

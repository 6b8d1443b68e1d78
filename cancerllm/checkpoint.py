"""Read and write the Hugging Face Mistral and Llama layouts without `transformers`: config.json, model.safetensors or
sharded model-0000k-of-0000n.safetensors + model.safetensors.index.json, and tokenizer.model beside them. A model is
saved in the family it was loaded in (config.json's model_type); with tied embeddings the files hold no
lm_head.weight, as transformers writes them.

Loading streams tensor by tensor into a model built on the meta device, so a checkpoint needs about its own size
in RAM, not twice that. Nothing is ever unpickled.
"""
import json
import os
import re
import shutil
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .model import ModelArgs, Transformer

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.model"
# A byte-level BPE's files (tokenizer.JsonTokenizer): the vocabulary, and beside it the special tokens and the chat
# template that transformers reads.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
HF_PREFIX = "model."
# Buffers some older exports carry that the architecture recomputes.
IGNORED_KEYS = re.compile(r".*rotary_emb\.inv_freq$")
# The storage dtypes by their Hugging Face `torch_dtype` names: the one map of dtype names (configs, the export, the
# command lines), with the short names the command lines also take.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHORT_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def parse_dtype(name: str) -> torch.dtype:
    """torch dtype of a name in DTYPES or SHORT_DTYPE_NAMES ("bfloat16" or "bf16")."""
    full = SHORT_DTYPE_NAMES.get(name, name)
    if full not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join([*DTYPES, *SHORT_DTYPE_NAMES])}, got {name!r}")
    return DTYPES[full]
HEAD, EMBEDDING = "lm_head.weight", "embed_tokens.weight"
ARCHITECTURES = {"mistral": "MistralForCausalLM", "llama": "LlamaForCausalLM"}
# transformers' defaults for keys a config.json may leave out, where the two families differ.
DEFAULT_MAX_POSITIONS = {"mistral": 32768, "llama": 2048}


# ---------------------------------------------------------------------------------------------- config

def read_config(path) -> tuple[ModelArgs, torch.dtype]:
    """ModelArgs and stored dtype from a Mistral or Llama config.json in transformers v4 (`rope_theta`,
    `torch_dtype`) or v5 (`rope_parameters`, `dtype`) naming. Refuses what the architecture cannot represent."""
    path = Path(path)
    check_file(path, f"missing (a Hugging Face checkpoint directory needs {CONFIG})")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(cfg).__name__}")

    def refuse(key, why):
        raise ValueError(f"{path}: {key}={cfg.get(key)!r} is not supported: {why}")

    def get(key, kind, default=None):
        value = cfg.get(key, default)
        if value is None and default is None and key in REQUIRED:
            raise ValueError(f"{path}: missing required key {key!r}")
        if value is not None and not is_a(value, kind):
            raise ValueError(f"{path}: {key} must be {kind_name(kind)}, got {value!r}")
        return value

    family = cfg.get("model_type")
    if family not in ARCHITECTURES:
        refuse("model_type", f"only {' and '.join(map(repr, ARCHITECTURES))} checkpoints can be represented")
    if cfg.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "the feed-forward is SwiGLU (silu)")
    rope = get("rope_parameters", dict) or {}
    scaling_key, scaling = rope_scaling_of(cfg, get("rope_scaling", dict), rope)
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            refuse(key, "the projections have no bias")
    rope_theta = rope.get("rope_theta", get("rope_theta", NUMBER, 10000.0))
    if not is_a(rope_theta, NUMBER):
        raise ValueError(f"{path}: rope_parameters.rope_theta must be a number, got {rope_theta!r}")

    n_heads = get("num_attention_heads", int)
    dim = get("hidden_size", int)
    try:
        args = ModelArgs(
            dim=dim, n_layers=get("num_hidden_layers", int), n_heads=n_heads,
            n_kv_heads=get("num_key_value_heads", int, n_heads),
            head_dim=get("head_dim", int, None) or (dim // n_heads if n_heads > 0 else 0),
            hidden_dim=get("intermediate_size", int), vocab_size=get("vocab_size", int),
            # LlamaForCausalLM has no window: it ignores a sliding_window key, and so do we.
            sliding_window=get("sliding_window", int, None) if family == "mistral" else None,
            rope_theta=float(rope_theta), norm_eps=float(get("rms_norm_eps", NUMBER, 1e-6)),
            max_seq_len=get("max_position_embeddings", int, DEFAULT_MAX_POSITIONS[family]),
            tie_word_embeddings=get("tie_word_embeddings", bool, False), family=family, rope_scaling=scaling)
    except (ValueError, TypeError) as e:      # ModelArgs' own checks: name the file (and key) whose value it refused
        raise ValueError(f"{path}: {e}".replace("ModelArgs.rope_scaling", scaling_key)) from None
    dtype_name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise ValueError(f"{path}: dtype {dtype_name!r} is not one of {', '.join(DTYPES)}")
    return args, DTYPES[dtype_name]


NUMBER = (int, float)


def is_a(value, kind) -> bool:
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def kind_name(kind) -> str:
    return kind.__name__ if isinstance(kind, type) else "a number"


def rope_scaling_of(cfg: dict, v4: dict | None, v5: dict) -> tuple[str, dict | None]:
    """(the key it came from, ModelArgs.rope_scaling) from transformers v4's rope_scaling or v5's rope_parameters
    (which holds rope_theta too). Llama 3.1's llama3 scaling may leave original_max_position_embeddings to the
    config's max_position_embeddings, as transformers reads it."""
    key, scaling = ("rope_scaling", dict(v4)) if v4 else ("rope_parameters", dict(v5))
    scaling.pop("rope_theta", None)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return key, None
    if kind == "llama3":
        scaling.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings"))
    return key, scaling


REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


def config_dict(args: ModelArgs, dtype: torch.dtype, bos_id=1, eos_id=2) -> dict:
    """A config.json of the model's family that transformers v4 and v5 both read; `eos_id` an id or a list of the
    ids generation stops on (the first the EOS)."""
    dtype_name = next(k for k, v in DTYPES.items() if v == dtype)
    window = {"sliding_window": args.sliding_window} if args.family == "mistral" else \
             {"attention_bias": False, "mlp_bias": False}
    return {
        "architectures": [ARCHITECTURES[args.family]], "model_type": args.family,
        "hidden_size": args.dim, "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim, "intermediate_size": args.hidden_dim,
        "vocab_size": args.vocab_size, **window,
        "max_position_embeddings": args.max_seq_len, "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta, "rope_scaling": args.rope_scaling,
        "rope_parameters": {**(args.rope_scaling or {"rope_type": "default"}), "rope_theta": args.rope_theta},
        "hidden_act": "silu", "tie_word_embeddings": args.tie_word_embeddings, "attention_dropout": 0.0,
        "initializer_range": 0.02, "bos_token_id": bos_id, "eos_token_id": eos_id, "use_cache": True,
        "torch_dtype": dtype_name, "dtype": dtype_name,
    }


# ---------------------------------------------------------------------------------------------- load

def check_file(path: Path, missing: str):
    """Refuse a path that is not a readable file, saying why: missing (`missing` says what that means), a
    symbolic link loop, or something other than a file."""
    try:
        path.resolve(strict=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {missing}") from None
    except (RuntimeError, OSError) as e:      # RuntimeError up to Python 3.12, OSError(ELOOP) after
        raise ValueError(f"{path}: cannot be read: a symbolic link loop ({e})") from None
    if not path.is_file():
        raise ValueError(f"{path}: not a file")


def plain_file_name(name) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def weight_files(directory: Path) -> dict[Path, set | None]:
    """The weight files and the tensor names to read from each (None: all of them). A sharded checkpoint's index
    is authoritative: each tensor is read from the file it names and nowhere else, and it may name only files of
    the directory itself."""
    index = directory / INDEX
    if not index.exists() and not index.is_symlink():
        check_file(directory / SINGLE, f"no {SINGLE} or {INDEX} found in {directory}")
        return {directory / SINGLE: None}
    check_file(index, "missing")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index}: not a safetensors index ({e})") from None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: weight_map must map tensor names to file names")
    files = {}
    for name, file in weight_map.items():
        if not plain_file_name(file):
            raise ValueError(f"{index}: weight_map[{name!r}] = {file!r} is not a file name in {directory}")
        files.setdefault(directory / file, set()).add(name)
    for f in files:
        check_file(f, f"listed in {INDEX} but missing")
    return dict(sorted(files.items()))


def iter_tensors(files: dict):
    """(file, name, tensor) one at a time, each read from its memory-mapped file when asked for."""
    for f, names in files.items():
        try:
            with safe_open(str(f), framework="pt") as sf:
                present = set(sf.keys())
                if names is not None and names - present:
                    raise ValueError(f"{f}: lacks {', '.join(sorted(names - present))}, which {INDEX} places there")
                for name in sorted(present if names is None else names):
                    yield f, name, sf.get_tensor(name)
        except SafetensorError as e:
            raise ValueError(f"{f}: unreadable safetensors file ({e})") from None


def load_pretrained(path, *, device="cpu", dtype=None, convert=None) -> Transformer:
    """Build a Transformer from a Hugging Face Mistral or Llama directory, in `dtype` (default: the stored one).
    `convert(name, tensor)`, when given, replaces each tensor as soon as it is read (e.g. quantizes it), so that only
    one tensor of the file is ever held in `dtype` at a time."""
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: checkpoint directory not found")
    args, stored_dtype = read_config(directory / CONFIG)
    dtype = dtype or stored_dtype
    with torch.device("meta"):
        model = Transformer(args)
    expected = {name: p.shape for name, p in model.state_dict().items()}
    tied = args.tie_word_embeddings
    if tied:                          # one tensor, stored as the embedding; a copy as lm_head.weight is checked
        del expected[HEAD]
    state, unexpected, misshapen, not_float, tied_pair = {}, [], [], [], {}
    for file, name, tensor in iter_tensors(weight_files(directory)):
        key = name[len(HF_PREFIX):] if name.startswith(HF_PREFIX) else name
        if IGNORED_KEYS.match(key):
            continue
        if tied and key in (HEAD, EMBEDDING):
            tied_pair[key] = (file, tensor)           # as stored, to compare exactly once both are read
            if key == HEAD:
                continue
        if key not in expected:
            unexpected.append(name)
        elif tensor.shape != expected[key]:
            misshapen.append(f"{name}: {tuple(tensor.shape)} in the file, {tuple(expected[key])} expected")
        elif not tensor.dtype.is_floating_point:
            not_float.append(f"{name}: {tensor.dtype}")
        else:
            state[key] = tensor.to(device=device, dtype=dtype)
            if convert is not None:
                state[key] = convert(key, state[key])
    missing = sorted(HF_PREFIX * (k != HEAD) + k for k in expected.keys() - state.keys())
    problems = [f"missing: {', '.join(missing)}"] * bool(missing) + \
               [f"unexpected: {', '.join(unexpected)}"] * bool(unexpected) + \
               [f"wrong shape: {'; '.join(misshapen)}"] * bool(misshapen) + \
               [f"not floating point: {'; '.join(not_float)}"] * bool(not_float)
    if problems:
        raise ValueError(f"{directory}: weights do not match config.json: " + " | ".join(problems))
    if HEAD in tied_pair:
        check_tied_head(tied_pair, directory / CONFIG)
    if tied:
        state[HEAD] = state[EMBEDDING]
    model.load_state_dict(state, assign=True)
    if tied:
        model.tie_weights()           # assign=True gave each name its own Parameter
    model.init_rope()
    return model


def check_tied_head(pair: dict, config: Path):
    """A tied checkpoint may hold lm_head.weight too, but only as an exact copy of the embedding."""
    (head_file, head), (_, embedding) = pair[HEAD], pair[EMBEDDING]
    if head.shape != embedding.shape or head.dtype != embedding.dtype or not torch.equal(head, embedding):
        raise ValueError(f"{head_file}: lm_head.weight differs from {HF_PREFIX}{EMBEDDING}, but {config} says "
                         "tie_word_embeddings=true (one tensor for both): remove lm_head.weight or untie the config")


# ---------------------------------------------------------------------------------------------- save

def parse_size(size) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", str(size).upper())
    if not match:
        raise ValueError(f"max_shard_size must be bytes or like '5GB' / '500MB', got {size!r}")
    return int(float(match[1]) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[match[2]])


def plan_shards(state: dict, max_bytes: int) -> list[dict]:
    shards, current, used = [], {}, 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and used + nbytes > max_bytes:
            shards.append(current)
            current, used = {}, 0
        current[name] = tensor
        used += nbytes
    return shards + [current]


def own_storage(t: torch.Tensor) -> torch.Tensor:
    """`t` alone in its storage, as safetensors writes tensors: a copy of a view into a larger one (the packed
    weights of a model the Generator loaded, arena.py)."""
    return t if t.untyped_storage().nbytes() == t.nbytes else t.clone()


def save_state_dict(state: dict, args: ModelArgs, path, *, tokenizer=None, max_shard_size="5GB", dtype=None):
    """Write a model state dict (our names) as a Hugging Face directory. Used for a local model and for the full
    state dict that FSDP training gathers on rank 0.

    Every argument is checked before anything is written, and the files are written into a temporary sibling
    directory, then moved into `path` only when all are complete: a refused or interrupted save leaves an earlier
    save intact. In an existing directory only the files of the layout (config.json, model.safetensors, the index
    and the shards it lists, tokenizer.model) are replaced or removed; other files stay. A save without a tokenizer
    into a directory that holds a tokenizer.model is refused: the old vocabulary would sit beside new weights."""
    directory = Path(path)
    if not state:
        raise ValueError("save_pretrained: the state dict is empty")
    if args.tie_word_embeddings:
        state = without_tied_head(state)
    dtype = dtype or next(iter(state.values())).dtype
    if dtype not in DTYPES.values():
        raise ValueError(f"save_pretrained: dtype must be one of torch.{', torch.'.join(DTYPES)}, got {dtype}")
    max_bytes = parse_size(max_shard_size)
    tok = load_tokenizer(tokenizer, args.vocab_size)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"save_pretrained: {directory} exists and is not a directory")
    earlier = [directory / name for name in (TOKENIZER, *TOKENIZER_FILES) if (directory / name).exists()]
    if tok is None and earlier:
        raise ValueError(f"save_pretrained: {earlier[0]} is from an earlier save and would not match these "
                         "weights; pass tokenizer= (its path keeps it) or remove it first")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.with_name(f".{directory.name}.saving-{uuid.uuid4().hex[:8]}")
    staging.mkdir()                            # (not mkdtemp: its mode 0700 would become the directory's)
    try:
        write_layout(staging, state, args, dtype, tok, max_bytes)
        move_into(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def without_tied_head(state: dict) -> dict:
    """A tied model's tensors as transformers stores them: the embedding alone, which loading ties the head to. The
    state may name the head too (state_dict() does; FSDP's full gather makes it a copy), as long as it is equal."""
    head, embedding = state.get(HEAD), state.get(EMBEDDING)
    if embedding is None:
        raise ValueError(f"save_pretrained: the state dict has no {EMBEDDING}, which a tied model's head is")
    if head is not None and head is not embedding and not (head.shape == embedding.shape and
                                                           torch.equal(head, embedding.to(head.device, head.dtype))):
        raise ValueError(f"save_pretrained: {HEAD} differs from {EMBEDDING}, but the model's ModelArgs say "
                         "tie_word_embeddings=True (one tensor for both); nothing written")
    return {name: tensor for name, tensor in state.items() if name != HEAD}


def load_tokenizer(tokenizer, vocab_size: int):
    """A tokenizer object, file or checkpoint directory (tokenizer.open_tokenizer) checked against the vocabulary."""
    if tokenizer is None:
        return None
    from .tokenizer import TokenizerBase, open_tokenizer
    tok = tokenizer if isinstance(tokenizer, TokenizerBase) else open_tokenizer(tokenizer)
    tok.check_fits(vocab_size)
    return tok


def copy_tokenizer(tok, directory: Path):
    """The tokenizer's own files, byte for byte (its fingerprint is the file's hash): tokenizer.model, or
    tokenizer.json with the tokenizer_config.json beside it when there is one."""
    if tok.path.suffix != ".json":
        shutil.copyfile(tok.path, directory / TOKENIZER)
        return
    for name, source in zip(TOKENIZER_FILES, (tok.path, tok.path.with_name(TOKENIZER_FILES[1]))):
        if source.is_file():
            shutil.copyfile(source, directory / name)


def write_layout(directory: Path, state: dict, args: ModelArgs, dtype: torch.dtype, tok, max_bytes: int):
    """The files of a Hugging Face directory, written into an empty `directory`."""
    hf_state = {(k if k == HEAD else HF_PREFIX + k): own_storage(v.detach().to("cpu", dtype).contiguous())
                for k, v in state.items()}
    shards = plan_shards(hf_state, max_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(directory / SINGLE), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(directory / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in hf_state.values())
        (directory / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                  indent=2))
    ids = {}
    if tok is not None:
        copy_tokenizer(tok, directory)
        stops = tok.stop_ids       # every id generation stops on, so that a reload stops on each (JsonTokenizer)
        ids = dict(bos_id=tok.bos_id, eos_id=stops[0] if len(stops) == 1 else list(stops))
    (directory / CONFIG).write_text(json.dumps(config_dict(args, dtype, **ids), indent=2))


def layout_files(directory: Path) -> set[str]:
    """The files of the layout an earlier save left in `directory`: shards only by their standard names and only
    when its index lists them, so a user's own model_final.safetensors is never among them."""
    names = {CONFIG, SINGLE, INDEX, TOKENIZER, *TOKENIZER_FILES}
    try:
        names |= {f for f in json.loads((directory / INDEX).read_text())["weight_map"].values()
                  if isinstance(f, str) and SHARD_NAME.fullmatch(f)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass                                   # no index, or not one of ours: no shards of ours to remove
    return {name for name in names if (directory / name).is_file()}


def move_into(staging: Path, directory: Path):
    """Make `directory` hold the files of `staging`: by renaming it when `directory` does not exist, else file by
    file (each an atomic rename: weights, then the index, tokenizer and config.json), removing last the files of an
    earlier save that the new one does not replace."""
    if not directory.exists():
        staging.rename(directory)
        return
    stale = layout_files(directory)
    order = {INDEX: 1, TOKENIZER: 2, **dict.fromkeys(TOKENIZER_FILES, 2), CONFIG: 3}
    for f in sorted(staging.iterdir(), key=lambda f: (order.get(f.name, 0), f.name)):
        os.replace(f, directory / f.name)
        stale.discard(f.name)
    for name in stale:
        (directory / name).unlink()


def save_pretrained(model: Transformer, path, *, tokenizer=None, max_shard_size="5GB", dtype=None):
    save_state_dict(model.state_dict(), model.args, path, tokenizer=tokenizer, max_shard_size=max_shard_size,
                    dtype=dtype)

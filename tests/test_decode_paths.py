"""The decoding form's matmul paths (model.PATHS): int8 weight-only and bf16 weights against plain fp64/fp32
references on fresh random inputs, the choice by measurement (decode_paths.py) and its per-machine cache, and the
errors for what cannot run."""
import json
import subprocess
import sys
import time

import pytest
import torch

from cancerllm import Generator, ModelArgs, Transformer
from cancerllm import decode_paths, gemv
from cancerllm.model import INT8_PATHS, DecodeLinear, dequantize_int8, fuse_for_decoding, quantize_int8
from cancerllm.tokenizer import Tokenizer, mistral_tokenizer_path
from test_decode_form import Recorder

BASE = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96, vocab_size=32000,
            sliding_window=8, max_seq_len=64)
# Relative error (of the whole output, in the 2-norm) a dtype's rounding allows: fp32 accumulations of <= 1536
# products; bf16 inputs and outputs rounded to 8 significant bits (2^-8 relative each).
MATMUL_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2}


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(mistral_tokenizer_path())


def random_model(**overrides) -> Transformer:
    model = Transformer(ModelArgs(**{**BASE, **overrides})).eval()
    with torch.no_grad():   # norms away from 1 so that their weights matter
        for name, p in model.named_parameters():
            p.normal_(1.0, 0.1) if name.endswith("norm.weight") else p.normal_(0.0, 0.05)
    return model


def relative_error(actual, expected) -> float:
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).norm() / expected.norm())


def decode_logits(model, tokenizer, prompts, steps=6, **options):
    """Every step's fp32 logits of greedy decoding by the Generator, and the tokens, per prompt."""
    recorder = Recorder()
    results = Generator(model, tokenizer, prefill_chunk=4, **options).generate(
        prompts, max_new_tokens=steps, ignore_eos=True, logits_processor=recorder)
    return recorder.logits, [r.token_ids for r in results]


def full_logits(model, ids: list):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0, -1].double()


# ---------------------------------------------------------------------------------------------- int8

@pytest.mark.parametrize("out_features, in_features", [(96, 64), (7, 48), (32000, 64), (64, 1536)])
def test_quantized_rows_are_within_half_a_step_and_use_the_full_range(out_features, in_features):
    # rows of different scales, none zero but row 0 (torch.rand can draw 0.0: at 32,000 rows ~0.2% of runs did)
    weight = torch.randn(out_features, in_features) * (torch.rand(out_features, 1) + 1e-3)
    weight[0] = 0.0                                                                # and an all-zero row
    q, scales = quantize_int8(weight)
    assert q.dtype == torch.int8 and scales.shape == (out_features,)
    step = scales.float()[:, None]   # half a step, plus fp32's rounding of weight / step and of q * step
    assert ((dequantize_int8(q, scales) - weight).abs() <= step / 2 + 1e-6 * weight.abs()).all()
    assert (q[1:].abs().amax(dim=1) == 127).all() and (q[0] == 0).all()


@pytest.mark.parametrize("gemv_rows", [0, 8], ids=["library", "gemv in front"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", ["int8", "int8-bf16", "onednn", "aten"])
def test_each_path_and_epilogue_against_fp64(path, dtype, gemv_rows):
    """forward, plus, silu and times of a DecodeLinear against the fp64 product with the weight it multiplies by
    (for int8: the dequantized weight, and the input rounded to bf16 as the kernel takes it), at decode and prefill
    row counts; with our small-M kernel in front (gemv_rows) where it can take the weight (bf16, int8)."""
    int8 = path in INT8_PATHS
    weight = (torch.randn(160, 96) * 0.05).to(dtype)
    linear = DecodeLinear(weight, path, gemv_rows)
    exact = dequantize_int8(linear.weight, linear.scales) if int8 else weight
    exact = exact.double()
    for shape in [(1, 1, 96), (8, 1, 96), (2, 37, 96)]:
        x = torch.randn(shape).to(dtype)
        residual, other = torch.randn(*shape[:-1], 160).to(dtype), torch.randn(*shape[:-1], 160).to(dtype)
        y = (x.bfloat16() if int8 else x).double() @ exact.t()
        with torch.inference_mode():
            results = {"forward": (linear(x), y),
                       "plus": (linear.plus(x, residual), residual.double() + y),
                       "silu": (linear.silu(x), torch.nn.functional.silu(y)),
                       "times": (linear.times(x, other.clone()), other.double() * y)}
        for name, (actual, expected) in results.items():
            assert actual.dtype == dtype and actual.shape == expected.shape, name
            rtol = MATMUL_RTOL[torch.bfloat16 if int8 else dtype]   # the int8 kernels return bf16
            assert relative_error(actual, expected) < rtol, (name, shape)


def round_input_to_bf16(module, inputs):
    return tuple(x.bfloat16().to(x.dtype) for x in inputs)


def round_output_to_bf16(module, inputs, output):
    return output.bfloat16().to(output.dtype)


def dequantized_copy(model: Transformer) -> Transformer:
    """The plain reference of the int8 decoding form: the model with each matmul weight replaced by its int8
    rounding (per row, as quantize_int8 rounds the fused q/k/v weight: rows are quantized independently), each
    matmul's input and output rounded to bf16 (the kernel takes and returns bf16), computing in fp32."""
    copy = Transformer(model.args).eval()
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, p in copy.named_parameters():
            if p.dim() == 2 and name != "embed_tokens.weight":
                p.copy_(dequantize_int8(*quantize_int8(p)))
    if model.args.tie_word_embeddings:   # the output head's int8 copy; the embedding lookup keeps the fp32 table
        copy.lm_head.weight = torch.nn.Parameter(dequantize_int8(*quantize_int8(model.lm_head.weight)))
    for module in copy.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(round_input_to_bf16)
            module.register_forward_hook(round_output_to_bf16)
    return copy


@pytest.mark.parametrize("overrides", [{}, {"sliding_window": None, "n_kv_heads": 4},
                                       dict(sliding_window=None, tie_word_embeddings=True, family="llama")],
                         ids=["mistral", "no window", "tied llama (SmolLM2's layout)"])
def test_int8_decoding_equals_the_model_on_its_rounded_weights(tokenizer, overrides):
    """Every step's logits of the int8 Generator against its plain reference (dequantized_copy) recomputing the
    whole sequence: the same arithmetic but for the order of fp32 sums, which can move a matmul output's bf16
    rounding by one step (2^-8), and the layers after it carry that on: measured 0.005% to 0.46% over 12 seeds (the
    bound: 1.5%). Against the original fp32 model int8 and bf16 rounding move the logits by about 2% here (the
    bound: 5%); a wrong scale or row would move them by order 100%."""
    model = random_model(**overrides)
    reference = dequantized_copy(model)
    prompts = [torch.randint(3, 32000, (n,)).tolist() for n in (11, 3)]
    logged, tokens = decode_logits(model, tokenizer, prompts, quantize="int8")
    for prompt, ids, steps in zip(prompts, tokens, logged):
        for t, logits in enumerate(steps):
            assert relative_error(logits, full_logits(reference, prompt + ids[:t])) < 1.5e-2
            assert relative_error(logits, full_logits(model, prompt + ids[:t])) < 5e-2


@pytest.mark.parametrize("onednn", [True, False, None])
def test_bf16_decoding_stays_within_bf16_rounding_of_fp32(tokenizer, onednn):
    """A bf16 model (weights, activations and cache in bf16) on each path, every step's logits against the fp32
    model it was rounded from, recomputing in fp32: within bf16's rounding (about 1% here; the bound: 3%)."""
    model = random_model()
    bf16 = random_model()
    bf16.load_state_dict(model.state_dict())
    bf16 = bf16.to(torch.bfloat16)
    prompts = [torch.randint(3, 32000, (n,)).tolist() for n in (11, 3)]
    logged, tokens = decode_logits(bf16, tokenizer, prompts, onednn=onednn)
    for prompt, ids, steps in zip(prompts, tokens, logged):
        for t, logits in enumerate(steps):
            assert relative_error(logits, full_logits(model, prompt + ids[:t])) < 3e-2


# ---------------------------------------------------------------------------------------------- measuring

class FakeLinear:
    """A 'linear' that takes `delay` seconds per call and counts its calls."""
    calls = 0

    def __init__(self, delay):
        self.delay = delay

    def __call__(self, x):
        FakeLinear.calls += 1
        time.sleep(self.delay)
        return x


def test_the_faster_path_is_chosen_once_per_shape_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("CANCERLLM_CACHE_DIR", str(tmp_path))
    for slow, fast in [("onednn", "aten"), ("aten", "onednn")]:
        weight = torch.randn(8 + len(slow), 16)   # a new shape per round: nothing cached for it yet
        make = lambda w, path: FakeLinear(2e-3 if path == slow else 0.0)   # noqa: E731
        assert decode_paths.choose(weight, ("onednn", "aten"), make) == fast
        calls = FakeLinear.calls
        assert decode_paths.choose(weight, ("onednn", "aten"), make) == fast and FakeLinear.calls == calls
    cache = json.loads((tmp_path / decode_paths.CACHE_FILE).read_text())
    assert len(cache) == 2 and all(decode_paths.machine_key() in key for key in cache)
    # Another machine (or torch, or thread count) measures again.
    monkeypatch.setattr(decode_paths, "machine_key", lambda: "another machine")
    assert decode_paths.choose(weight, ("onednn", "aten"), make) == fast and FakeLinear.calls > calls


def test_an_unreadable_cache_is_measured_again(tmp_path, monkeypatch):
    monkeypatch.setenv("CANCERLLM_CACHE_DIR", str(tmp_path))
    (tmp_path / decode_paths.CACHE_FILE).write_text("{not json")
    make = lambda w, path: FakeLinear(2e-3 if path == "onednn" else 0.0)   # noqa: E731
    assert decode_paths.choose(torch.randn(5, 16), ("onednn", "aten"), make) == "aten"
    assert list(json.loads((tmp_path / decode_paths.CACHE_FILE).read_text()).values()) == ["aten"]


def test_an_unwritable_cache_still_chooses_and_says_it_was_not_saved(tmp_path, monkeypatch):
    (tmp_path / "a file").write_text("")
    monkeypatch.setenv("CANCERLLM_CACHE_DIR", str(tmp_path / "a file"))   # no directory can be made there
    make = lambda w, path: FakeLinear(2e-3 if path == "onednn" else 0.0)   # noqa: E731
    with pytest.warns(UserWarning, match="not saved"):
        assert decode_paths.choose(torch.randn(6, 16), ("onednn", "aten"), make) == "aten"


def test_the_first_answer_saved_wins_over_a_later_measurement(tmp_path, monkeypatch):
    """Two processes measure one key at once (a training run's ranks) and their timings disagree: the one that saves
    second takes the first one's answer, so both run the same path, as does a later run reading the file."""
    monkeypatch.setenv("CANCERLLM_CACHE_DIR", str(tmp_path))
    path = decode_paths.cache_path()

    def measure_while_another_process_saves():
        decode_paths.save_cache(path, {"key": "sdpa"})   # the other rank finished first
        return "ours"
    assert decode_paths.remembered("key", ("ours", "sdpa"), measure_while_another_process_saves) == "sdpa"
    assert decode_paths.load_cache(path) == {"key": "sdpa"}
    # An answer that is not one of the allowed ones is measured again and replaced.
    decode_paths.save_cache(path, {"key": "stale"})
    assert decode_paths.remembered("key", ("ours", "sdpa"), lambda: "ours") == "ours"
    assert decode_paths.load_cache(path) == {"key": "ours"}


def test_the_cache_lock_excludes_another_process(tmp_path):
    path = tmp_path / decode_paths.CACHE_FILE
    try_lock = ("import fcntl, sys; f = open(sys.argv[1], 'a')\n"
                "try: fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept BlockingIOError: sys.exit(3)")
    lock_file = str(tmp_path / f".{path.name}.lock")
    with decode_paths.cache_lock(path):
        assert subprocess.run([sys.executable, "-c", try_lock, lock_file]).returncode == 3
    assert subprocess.run([sys.executable, "-c", try_lock, lock_file]).returncode == 0


def test_machine_key_without_proc_cpuinfo(monkeypatch):
    monkeypatch.setattr(decode_paths, "cpuinfo_lines", lambda: [])
    assert f"torch:{torch.__version__}" in decode_paths.machine_key()


def test_measured_paths_are_real_paths_and_the_form_follows_them(tmp_path, monkeypatch):
    """With onednn=None each weight shape gets the path the cache names: force one shape to each path."""
    monkeypatch.setenv("CANCERLLM_CACHE_DIR", str(tmp_path))
    model = random_model()
    fused = fuse_for_decoding(model, onednn=None)
    cache = json.loads((tmp_path / decode_paths.CACHE_FILE).read_text())
    paths = {key: path for key, path in cache.items() if "gemv rows" not in key}   # the rest: our kernel's rows
    assert set(paths.values()) <= {"onednn", "aten"} and len(paths) == 5   # qkv, o, gate/up, down, lm_head
    if gemv.available():   # our kernel takes the decoding batches: the library path was timed on a prefill chunk
        assert all(key.endswith(f"rows {decode_paths.PREFILL_ROWS[0]}") for key in paths)
    flipped = {key: "aten" if path == "onednn" else "onednn" for key, path in paths.items()}
    (tmp_path / decode_paths.CACHE_FILE).write_text(json.dumps(flipped))
    flipped_form = fuse_for_decoding(model, onednn=None)
    assert fused.lm_head.path != flipped_form.lm_head.path
    assert {fused.layers[1].down_proj.path, flipped_form.layers[1].down_proj.path} == {"onednn", "aten"}


# ---------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("options, message", [
    (dict(quantize="int4"), "quantize must be one of None, 'int8', got 'int4'"),
    (dict(quantize="INT8"), "quantize must be one of"),
    (dict(onednn="yes"), "onednn must be None"),
])
def test_unknown_options_are_named(tokenizer, options, message):
    with pytest.raises(ValueError, match=message):
        Generator(random_model(), tokenizer, **options)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_on_shapes_the_kernel_cannot_take_is_refused(tokenizer, dtype):
    """torch's int8 kernel reads bf16 inputs 16 at a time (other widths crash the process or compute wrong
    values): refused by name, before any weight is quantized."""
    model = random_model(dim=40, head_dim=24, hidden_dim=72).to(dtype)
    with pytest.raises(ValueError, match="multiple of 16 .*but qkv_proj takes 40"):
        Generator(model, tokenizer, quantize="int8")
    with pytest.raises(ValueError, match="fp32 or bf16 models, this one is torch.float16"):
        Generator(random_model().half(), tokenizer, quantize="int8")


def test_from_pretrained_and_command_line_quantize(tokenizer, tmp_path):
    model = random_model()
    model.save_pretrained(tmp_path, tokenizer=tokenizer)
    prompt = torch.randint(3, 32000, (6,)).tolist()
    expected = Generator(model, tokenizer, quantize="int8").generate([prompt], max_new_tokens=5, ignore_eos=True)
    loaded = Generator.from_pretrained(tmp_path, dtype="float32", quantize="int8")
    assert loaded.generate([prompt], max_new_tokens=5, ignore_eos=True)[0].token_ids == expected[0].token_ids
    done = subprocess.run([sys.executable, "-m", "cancerllm.generate", "--model", str(tmp_path), "--prompt",
                           "Invasive ductal carcinoma", "--max-new-tokens", "4", "--quantize", "int8", "--jsonl"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([sys.executable, "-m", "cancerllm.generate", "--model", str(tmp_path), "--prompt", "x",
                           "--quantize", "int4"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "invalid choice: 'int4'" in done.stderr

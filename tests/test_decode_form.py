"""The model in decoding form (model.fuse_for_decoding) against the model itself: every option of ModelArgs must reach
the decode path, through the Generator and through Transformer.forward with a cache."""
import pytest
import torch

from cancerllm import Generator, ModelArgs, Transformer
from cancerllm.cache import KVCache
from cancerllm.kernels import reference
from cancerllm.model import DecodeRMSNorm, RMSNorm, fuse_for_decoding
from cancerllm.tokenizer import Tokenizer, mistral_tokenizer_path

BASE = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96, vocab_size=32000,
            sliding_window=8, max_seq_len=64)
# Each option away from its default in a way that changes the logits (the model has no tied embeddings: its
# output head is always its own weight, and checkpoint.py refuses configs that tie them).
CONFIGS = {
    "window 5, one KV head": dict(sliding_window=5, n_kv_heads=1),
    "no window, as many KV heads as heads": dict(sliding_window=None, n_kv_heads=4),
    "rope_theta 37": dict(rope_theta=37.0),
    "norm_eps 0.5": dict(norm_eps=0.5),
    "head_dim 24 with dim 40": dict(dim=40, head_dim=24, hidden_dim=72, sliding_window=7),
}


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(mistral_tokenizer_path())


def random_model(seed: int, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**{**BASE, **overrides})).eval()
    with torch.no_grad():   # norms away from 1 so that their weights and eps matter
        for name, p in model.named_parameters():
            p.normal_(1.0, 0.1) if name.endswith("norm.weight") else p.normal_(0.0, 0.05)
    return model


class Recorder:
    """A logits processor that leaves the logits alone and keeps a copy of each row's."""

    def reset(self, batch_size):
        self.logits = [[] for _ in range(batch_size)]

    def mask(self, logits, rows):
        for i, row in enumerate(rows):
            self.logits[row].append(logits[i].clone())

    def advance(self, row, token_id):
        """Nothing to follow: the recorder constrains no row (the protocol calls this after every step)."""


def full_logits(model, ids: list):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0, -1].float()


@pytest.mark.parametrize("onednn", [True, False, None])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_model_option_reaches_the_decoding_form(tokenizer, name, onednn):
    """Every step's logits of the Generator (which decodes with the fused form) against the model recomputing the
    whole sequence; prompts and outputs run past the window, prefill in chunks shorter than it."""
    model = random_model(len(name), **CONFIGS[name])
    prompts = [torch.randint(3, 32000, (n,)).tolist() for n in (11, 3)]
    recorder = Recorder()
    results = Generator(model, tokenizer, prefill_chunk=4, onednn=onednn).generate(
        prompts, max_new_tokens=9, ignore_eos=True, logits_processor=recorder)
    for prompt, result, logged in zip(prompts, results, recorder.logits):
        for t, logits in enumerate(logged):
            torch.testing.assert_close(logits, full_logits(model, prompt + result.token_ids[:t]), rtol=1e-4,
                                       atol=1e-4)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_model_with_a_cache_decodes_like_its_fused_form(name):
    """Transformer.forward(cache=...) on the model's own modules (Attention calls cache.attend) and on its decoding
    form: chunked prefill, then one token per step, against full recomputation."""
    model = random_model(len(name) + 1, **CONFIGS[name])
    ids = torch.randint(3, 32000, (1, 20))
    for form in (model, fuse_for_decoding(model), fuse_for_decoding(model, onednn=False)):
        cache = KVCache.for_model(model.args, 1, 20, dtype=torch.float32, device="cpu")
        with torch.inference_mode():
            for start, end in [(0, 6), (6, 10)] + [(t, t + 1) for t in range(10, 20)]:
                positions = torch.arange(start, end)[None]
                cache.begin(slice(0, 1), positions)
                logits = form(ids[:, start:end], positions, cache=cache, last_only=True)
                assert logits.shape == (1, 1, 32000)
                torch.testing.assert_close(logits[0, -1], full_logits(model, ids[0, :end].tolist()), rtol=1e-4,
                                           atol=1e-4)


def test_the_fused_form_is_a_snapshot_that_leaves_the_model_alone():
    model = random_model(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = fuse_for_decoding(model)
    assert fused.embed_tokens is model.embed_tokens and fused.rope_cos is model.rope_cos
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert type(model.layers[0]).__name__ == "Block" and type(fused.layers[0]).__name__ == "FusedBlock"
    with pytest.raises(ValueError, match="decoding form .* only with a cache"):
        fused(torch.tensor([[1, 2]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_decoding_norm_matches_the_models(dtype):
    """The Generator's logits move only by rounding when the norm changes kernel: torch's route (off CPU, or without
    the extension) equals the model's norm off CPU (the reference) bit for bit; our CPU kernels (the decoding one,
    and the training one the model's norm takes on CPU) sum in other orders, so each is held to the reference's
    error against float64 (fp32 sums of the same values, rounded once to the dtype)."""
    torch.manual_seed(0)
    for shape in [(1, 1, 64), (3, 5, 40), (8, 1, 384)]:
        norm = RMSNorm(shape[-1], eps=0.3).to(dtype)
        with torch.no_grad():
            norm.weight.normal_(1.0, 0.1)
        x = torch.randn(shape).to(dtype)
        with torch.inference_mode():
            decode_norm, expected = DecodeRMSNorm(norm), reference.rms_norm(x, norm.weight, 0.3)
            ours, model = decode_norm(x), norm(x)
            decode_norm.row_norm = None   # torch's route
            assert torch.equal(decode_norm(x), expected), shape
        exact = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 0.3) * norm.weight.double()
        reference_error = float((expected.double() - exact).abs().max())
        for kernel in (ours, model):
            assert float((kernel.double() - exact).abs().max()) <= max(2 * reference_error, 1e-6), shape


def logits_per_row(generator, prompts: list) -> list:
    """Every decode step's logits of each prompt, decoded together in one call."""
    recorder = Recorder()
    generator.generate(prompts, max_new_tokens=5, ignore_eos=True, logits_processor=recorder)
    return recorder.logits


@pytest.mark.parametrize("dtype, quantize", [(torch.bfloat16, None), (torch.float32, None), (torch.bfloat16, "int8")])
def test_a_prompt_decodes_to_the_same_bits_in_any_batch(tokenizer, dtype, quantize):
    """Batch invariance: each prompt's logits, step by step, decoded alone and among 18 others (past the 8-row tiles
    of the row kernel and past the 16 rows up to which it is measured against the library) are equal bit for bit."""
    model = random_model(5, sliding_window=None).to(dtype)
    generator = Generator(model, tokenizer, quantize=quantize)
    assert generator.batch_invariant
    prompts = [torch.randint(3, 32000, (n,)).tolist() for n in torch.randint(2, 40, (19,)).tolist()]
    together = logits_per_row(generator, prompts)
    for i, prompt in enumerate(prompts):
        (alone,) = logits_per_row(generator, [prompt])
        assert all(torch.equal(a, b) for a, b in zip(alone, together[i], strict=True)), f"prompt {i}"


def test_batch_invariance_is_on_where_its_kernels_run_and_refused_by_name_elsewhere(tokenizer, monkeypatch):
    from cancerllm import decode_layer
    model = random_model(6)
    assert not Generator(model, tokenizer, batch_invariant=False).batch_invariant
    with pytest.raises(ValueError, match="batch_invariant must be None"):
        Generator(model, tokenizer, batch_invariant="yes")
    monkeypatch.setattr(decode_layer, "available", lambda: False)
    assert not Generator(model, tokenizer).batch_invariant
    with pytest.raises(ValueError, match="batch-invariant decoding cannot run this model: .*decode-step kernels"):
        Generator(model, tokenizer, batch_invariant=True)

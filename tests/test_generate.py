"""The generator against Hugging Face transformers (greedy, token for token) and against full recomputation;
stopping, streaming, sampling and its parameters, the logits-processor protocol, the lock, bad input and the
command line."""
import dataclasses
import json
import math
import subprocess
import sys
import threading

import pytest
import torch

from cancerllm import ModelArgs, Transformer, Generator
from cancerllm.cache import KVCache
from cancerllm.generate import IncrementalText, SamplingParams, main, sample
from cancerllm.tasks.prompts import PromptSettings, load_templates
from cancerllm.tokenizer import Tokenizer, mistral_tokenizer_path, train
from hf_util import hf_model, our_name, tiny_args
from generation_util import VOCAB, random_prompts

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(mistral_tokenizer_path())


def hf_and_ours(window, max_seq_len=256):
    """A random tiny MistralForCausalLM and our Transformer holding the same weights."""
    args = tiny_args(vocab_size=VOCAB, sliding_window=window, max_seq_len=max_seq_len)
    hf = hf_model(args)
    hf.generation_config.eos_token_id = None     # generate through EOS, like ignore_eos=True on our side
    hf.generation_config.pad_token_id = 0
    ours = Transformer(args)
    ours.load_state_dict({our_name(name): p for name, p in hf.state_dict().items()})
    return hf, ours


def hf_greedy(hf, prompts, max_new_tokens, **options):
    """transformers' generate on left-padded prompts; the new tokens of each row."""
    L = max(map(len, prompts))
    ids = torch.tensor([[0] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, **options)
    return out[:, L:].tolist()


class ForceTokens:
    """A logits processor that makes row r emit sequences[r] (None: unconstrained) and logs every call."""

    def __init__(self, sequences, record_logits=False):
        self.sequences, self.record_logits = sequences, record_logits

    def reset(self, batch_size):
        self.batch_size = batch_size
        self.steps = [0] * batch_size
        self.logits = [[] for _ in range(batch_size)]
        self.advanced = []

    def mask(self, logits, rows):
        assert logits.dtype == torch.float32 and logits.shape[0] == len(rows)
        for i, row in enumerate(rows):
            if self.record_logits:
                self.logits[row].append(logits[i].clone())
            sequence = self.sequences[row]
            if sequence is not None and self.steps[row] < len(sequence):
                forced = sequence[self.steps[row]]
                logits[i] = -math.inf
                logits[i, forced] = 0.0

    def advance(self, row, token_id):
        self.advanced.append((row, token_id))
        self.steps[row] += 1


# ---------------------------------------------------------------------------------------------- vs transformers

def test_greedy_matches_transformers_past_the_window(tokenizer):
    hf, ours = hf_and_ours(window=8)
    prompts = random_prompts(13)                       # prompt alone exceeds W; prompt + output is 5 W
    expected = hf_greedy(hf, prompts, 27)[0]
    for prefill_chunk in (3, 8, 64):                   # chunks smaller than, equal to and larger than W
        gen = Generator(ours, tokenizer, prefill_chunk=prefill_chunk)
        [result] = gen.generate(prompts, max_new_tokens=27, ignore_eos=True)
        assert result.token_ids == expected, f"prefill_chunk={prefill_chunk}"
        assert result.finish_reason == "length"


def test_greedy_matches_transformers_without_window(tokenizer):
    hf, ours = hf_and_ours(window=None)
    prompts = random_prompts(9)
    [result] = Generator(ours, tokenizer, prefill_chunk=4).generate(prompts, max_new_tokens=20, ignore_eos=True)
    assert result.token_ids == hf_greedy(hf, prompts, 20)[0]


@pytest.mark.parametrize("window, onednn", [(8, True), (None, True), (8, False)])
def test_batched_prompts_of_different_lengths_match_transformers(tokenizer, window, onednn):
    hf, ours = hf_and_ours(window=window)
    prompts = random_prompts(3, 12, 20, 1)
    gen = Generator(ours, tokenizer, prefill_chunk=5, onednn=onednn)
    results = gen.generate(prompts, max_new_tokens=16, ignore_eos=True)
    assert [r.token_ids for r in results] == hf_greedy(hf, prompts, 16)


def test_repetition_penalty_matches_transformers(tokenizer):
    hf, ours = hf_and_ours(window=8)
    prompts = random_prompts(10)
    [result] = Generator(ours, tokenizer).generate(prompts, max_new_tokens=20, repetition_penalty=1.5,
                                                   ignore_eos=True)
    assert result.token_ids == hf_greedy(hf, prompts, 20, repetition_penalty=1.5)[0]


@pytest.mark.parametrize("scale, negative", [(1.5, None), (3.0, 7), (0.5, 4)])
def test_classifier_free_guidance_matches_transformers(tokenizer, scale, negative):
    """transformers' guidance_scale / negative_prompt_ids (default: the prompt's last token), past the window."""
    hf, ours = hf_and_ours(window=8)
    prompts = random_prompts(11)
    negatives = None if negative is None else random_prompts(negative)
    extra = {} if negatives is None else {"negative_prompt_ids": torch.tensor(negatives)}
    [result] = Generator(ours, tokenizer, prefill_chunk=4).generate(
        prompts, max_new_tokens=18, guidance_scale=scale, negative_prompts=negatives, ignore_eos=True)
    assert result.token_ids == hf_greedy(hf, prompts, 18, guidance_scale=scale, **extra)[0]


def test_guided_batch_equals_each_prompt_guided_alone(tokenizer):
    """Rows and their unconditional rows stay paired in a batch of mixed lengths, through a row leaving early."""
    _, model = hf_and_ours(window=6)
    gen = Generator(model, tokenizer, prefill_chunk=4)
    prompts, negatives = random_prompts(9, 3, 14), random_prompts(2, 10, 5)
    stops_early = ForceTokens([None, [5, 6, tokenizer.eos_id], None])
    batched = gen.generate(prompts, max_new_tokens=12, guidance_scale=2.0, negative_prompts=negatives,
                           logits_processor=stops_early)
    assert len(batched[1].token_ids) == 3
    for i in (0, 2):
        [alone] = gen.generate([prompts[i]], max_new_tokens=12, guidance_scale=2.0, negative_prompts=[negatives[i]])
        assert batched[i].token_ids == alone.token_ids
    unguided = gen.generate(prompts[:1], max_new_tokens=12)
    assert gen.generate(prompts[:1], max_new_tokens=12, guidance_scale=1)[0].token_ids == unguided[0].token_ids


# ---------------------------------------------------------------------------------------------- the cache

@pytest.mark.parametrize("window", [6, None])
def test_cached_logits_equal_full_recomputation_every_step(tokenizer, window):
    """Every step's logits, seen through a processor, against the model run on the whole sequence so far; rows
    of different lengths, one finishing early (EOS forced at its 3rd token) so the batch is compacted."""
    _, model = hf_and_ours(window=window)
    prompts = random_prompts(10, 4, 15)
    processor = ForceTokens([None, [5, 6, tokenizer.eos_id], None], record_logits=True)
    results = Generator(model, tokenizer, prefill_chunk=4).generate(prompts, max_new_tokens=12,
                                                                    logits_processor=processor)
    assert [len(r.token_ids) for r in results][1] == 3 and results[1].finish_reason == "eos"
    with torch.no_grad():
        for prompt, result, logged in zip(prompts, results, processor.logits):
            assert len(logged) == len(result.token_ids)
            for t, logits in enumerate(logged):
                full = model(torch.tensor([prompt + result.token_ids[:t]]))[0, -1].float()
                torch.testing.assert_close(logits, full, rtol=1e-4, atol=1e-4)


def test_rolling_buffer_holds_window_slots_only():
    args = ModelArgs.preset("tiny", sliding_window=32, max_seq_len=4096)
    cache = KVCache.for_model(args, batch=2, max_len=4000, dtype=torch.float32, device="cpu")
    assert cache.k.shape == (args.n_layers, 2, args.n_kv_heads, 32, args.head_dim)
    assert cache.bytes_per_token == 2 * args.n_layers * args.n_kv_heads * args.head_dim * 4
    short = KVCache.for_model(args, batch=1, max_len=10, dtype=torch.float32, device="cpu")
    assert short.k.shape[3] == 10


def test_generator_follows_changes_to_the_model_weights(tokenizer):
    """The decode-time weights are rebuilt when the model's parameters change in place or are replaced, and by
    refresh() after writes the version counters miss."""
    _, model = hf_and_ours(window=8)
    _, other = hf_and_ours(window=8)
    prompts = random_prompts(6, 9)

    def tokens(gen):
        return [r.token_ids for r in gen.generate(prompts, max_new_tokens=8, ignore_eos=True)]

    gen = Generator(model, tokenizer)
    before = tokens(gen)
    model.load_state_dict(other.state_dict())               # in place: version counters move
    assert tokens(gen) == tokens(Generator(other, tokenizer)) != before
    with torch.no_grad():
        model.layers[0].self_attn.k_proj.weight.mul_(3.0)
    assert tokens(gen) == tokens(Generator(model, tokenizer))
    model.layers[1].mlp.up_proj.weight = torch.nn.Parameter(other.layers[1].mlp.up_proj.weight * -1.0)
    assert tokens(gen) == tokens(Generator(model, tokenizer))
    expected_stale = tokens(gen)
    model.lm_head.weight.data.mul_(-1.0)                     # invisible to version counters: refresh() needed
    assert tokens(gen) == expected_stale
    gen.refresh()
    assert tokens(gen) == tokens(Generator(model, tokenizer)) != expected_stale


# ---------------------------------------------------------------------------------------------- ensembles

@pytest.mark.parametrize("windows", [(6, 6), (None, 5)])
def test_ensemble_scores_are_the_log_mean_of_member_probabilities(tokenizer, windows):
    """Every step's scores, seen through a processor, against log(mean(softmax)) of each member run on the whole
    sequence so far (members of different windows and context lengths); rows of different lengths, one finishing
    early so the batch and every member's cache are compacted."""
    members = [hf_and_ours(window=w, max_seq_len=n)[1] for w, n in zip(windows, (256, 64))]
    prompts = random_prompts(9, 3, 14)
    processor = ForceTokens([None, [7, tokenizer.eos_id], None], record_logits=True)
    gen = Generator(members, tokenizer, prefill_chunk=4)
    assert gen.max_seq_len == 64
    results = gen.generate(prompts, max_new_tokens=10, logits_processor=processor)
    assert results[1].finish_reason == "eos" and len(results[0].token_ids) == 10
    with torch.no_grad():
        for prompt, result, logged in zip(prompts, results, processor.logits):
            for t, scores in enumerate(logged):
                ids = torch.tensor([prompt + result.token_ids[:t]])
                probs = torch.stack([m(ids)[0, -1].double().softmax(-1) for m in members]).mean(0)
                torch.testing.assert_close(scores.double(), probs.log(), rtol=1e-4, atol=1e-4)


def test_ensemble_of_one_model_twice_decodes_as_the_model(tokenizer):
    _, model = hf_and_ours(window=8)
    prompts = random_prompts(6, 11)
    alone = [r.token_ids for r in Generator(model, tokenizer).generate(prompts, max_new_tokens=8, ignore_eos=True)]
    twice = Generator([model, model], tokenizer).generate(prompts, max_new_tokens=8, ignore_eos=True)
    assert [r.token_ids for r in twice] == alone


def test_ensemble_rejects_mismatched_members(tokenizer, tmp_path):
    _, model = hf_and_ours(window=8)
    with pytest.raises(ValueError, match="non-empty list"):
        Generator([], tokenizer)
    small = Transformer(tiny_args(vocab_size=VOCAB + 64, sliding_window=8, max_seq_len=256))
    with pytest.raises(ValueError, match=r"model\[1\] has vocab_size 32064, model\[0\] 32000"):
        Generator([model, small], tokenizer)
    with pytest.raises(ValueError, match=r"model\[1\] is on cpu in torch.bfloat16"):
        Generator([model, hf_and_ours(window=8)[1].to(torch.bfloat16)], tokenizer)
    model.save_pretrained(tmp_path / "a", tokenizer=tokenizer)
    model.save_pretrained(tmp_path / "b", tokenizer=tokenizer)
    (tmp_path / "corpus.txt").write_text("\n".join(f"colon adenocarcinoma, stage {i % 4}" for i in range(200)))
    other = train([tmp_path / "corpus.txt"], tmp_path / "other", vocab_size=280, num_threads=1)
    (tmp_path / "b" / "tokenizer.model").write_bytes(other.path.read_bytes())       # a valid, different vocabulary
    with pytest.raises(ValueError, match="b/tokenizer.model differs from .*a/tokenizer.model"):
        Generator.from_pretrained([tmp_path / "a", tmp_path / "b"])
    model.save_pretrained(tmp_path / "c", tokenizer=tokenizer)
    PromptSettings(load_templates(), max_report_chars=900).save(tmp_path / "c")
    assert Generator.from_pretrained(tmp_path / "c").prompt_settings.max_report_chars == 900
    with pytest.raises(ValueError, match="c was prompted differently from .*a .prompt_settings.json"):
        Generator.from_pretrained([tmp_path / "a", tmp_path / "c"])


# ---------------------------------------------------------------------------------------------- stopping

def test_rows_stop_on_their_own_without_disturbing_the_others(tokenizer):
    _, model = hf_and_ours(window=8)
    gen = Generator(model, tokenizer)
    prompts = random_prompts(7, 11, 5)
    text_ids = tokenizer.encode("Gleason score 7. Done", bos=False)
    processor = ForceTokens([[tokenizer.eos_id], text_ids, None])
    results = gen.generate(prompts, max_new_tokens=10, stop=[". D"], logits_processor=processor)
    assert [r.finish_reason for r in results] == ["eos", "stop", "length"]
    assert results[0].token_ids == [tokenizer.eos_id] and results[0].text == ""
    assert results[1].text == "Gleason score 7"
    assert len(results[2].token_ids) == 10
    alone = gen.generate([prompts[2]], max_new_tokens=10)[0]
    assert alone.token_ids == results[2].token_ids
    assert processor.batch_size == 3
    assert [row for row, _ in processor.advanced[:3]] == [0, 1, 2]     # every row, in batch order
    assert all(row != 0 for row, _ in processor.advanced[3:])          # row 0 finished after one token


def test_stop_string_across_tokens_and_in_any_position(tokenizer):
    _, model = hf_and_ours(window=None)
    ids = tokenizer.encode("Stage IIB, pT2 pN1. Receptors negative.", bos=False)
    gen = Generator(model, tokenizer)
    for stop, expected in [("pN1", "Stage IIB, pT2 "), (["XYZ", "2 p"], "Stage IIB, pT"), ("Stage", "")]:
        [r] = gen.generate(["x"], max_new_tokens=len(ids), stop=stop, logits_processor=ForceTokens([ids]))
        assert (r.text, r.finish_reason) == (expected, "stop")
    [r] = gen.generate(["x"], max_new_tokens=len(ids), stop="absent", logits_processor=ForceTokens([ids]))
    assert (r.text, r.finish_reason, r.token_ids) == ("Stage IIB, pT2 pN1. Receptors negative.", "length", ids)


# ---------------------------------------------------------------------------------------------- streaming

NON_ASCII = "Carcinome épidermoïde du poumon — 肺癌, grade 3 🙂 ok"


def test_stream_concatenates_to_the_full_text_with_non_ascii(tokenizer):
    _, model = hf_and_ours(window=8)
    gen = Generator(model, tokenizer)
    ids = tokenizer.encode(NON_ASCII, bos=False)
    assert any(tokenizer.id_to_piece(i).startswith("<0x") for i in ids)   # byte pieces: multi-byte characters
    options = dict(max_new_tokens=len(ids), logits_processor=ForceTokens([ids]))
    pieces = list(gen.stream("Report:", **options))
    assert "".join(pieces) == NON_ASCII == gen.generate(["Report:"], **options)[0].text
    assert len(pieces) > 5 and not any("\ufffd" in p for p in pieces)


def test_stream_holds_back_a_possible_stop_string(tokenizer):
    _, model = hf_and_ours(window=8)
    gen = Generator(model, tokenizer)
    ids = tokenizer.encode(NON_ASCII, bos=False)
    options = dict(max_new_tokens=len(ids), stop="grade 3", logits_processor=ForceTokens([ids]))
    pieces = list(gen.stream("Report:", **options))
    expected = "Carcinome épidermoïde du poumon — 肺癌, "
    assert "".join(pieces) == expected == gen.generate(["Report:"], **options)[0].text


def test_stream_of_random_tokens_equals_generate(tokenizer):
    _, model = hf_and_ours(window=8)
    gen = Generator(model, tokenizer)
    options = dict(max_new_tokens=40, temperature=1.0, seed=7)
    assert "".join(gen.stream("Report:", **options)) == gen.generate(["Report:"], **options)[0].text


def test_incremental_text_holds_back_unfinished_characters(tokenizer):
    text = IncrementalText(tokenizer, stop=())
    ids = tokenizer.encode("🙂", bos=False)    # four byte pieces after the space piece
    shown = []
    for i in ids:
        text.push(i)
        shown.append(text.take())
    assert "".join(shown) == "🙂" and shown[-1] == "🙂"


# ---------------------------------------------------------------------------------------------- sampling

def test_seeded_sampling_is_reproducible(tokenizer):
    _, model = hf_and_ours(window=8)
    gen = Generator(model, tokenizer)
    prompts = random_prompts(5, 9)
    options = dict(max_new_tokens=15, temperature=1.2, top_k=100, top_p=0.95, repetition_penalty=1.1)
    first = [r.token_ids for r in gen.generate(prompts, seed=1234, **options)]
    assert first == [r.token_ids for r in gen.generate(prompts, seed=1234, **options)]
    assert first != [r.token_ids for r in gen.generate(prompts, seed=4321, **options)]
    greedy = [r.token_ids for r in gen.generate(prompts, max_new_tokens=15)]
    assert greedy == [r.token_ids for r in gen.generate(prompts, max_new_tokens=15, temperature=1.0, top_k=1,
                                                        seed=3)]


def test_top_k_and_top_p_restrict_the_draws():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).expand(2000, 5)
    rng = torch.Generator().manual_seed(0)
    top2 = sample(logits.clone(), SamplingParams(1, temperature=1.0, top_k=2), rng)
    assert set(top2.tolist()) == {0, 1}
    p = torch.softmax(logits[0], -1)                      # 0.64, 0.24, ...: top_p 0.8 keeps two tokens
    nucleus = sample(logits.clone(), SamplingParams(1, temperature=1.0, top_p=float(p[0] + p[1]) - 0.01), rng)
    assert set(nucleus.tolist()) == {0, 1}
    free = sample(logits.clone(), SamplingParams(1, temperature=1.0), rng)
    assert set(free.tolist()) == {0, 1, 2, 3, 4}
    assert abs((free == 0).float().mean().item() - p[0].item()) < 0.05


def test_tiny_temperatures_decode_greedily(tokenizer):
    """Dividing by a temperature near fp32's smallest numbers overflowed the logits to NaN (every token id 0)."""
    _, model = hf_and_ours(window=8)
    gen = Generator(model, tokenizer)
    prompts = random_prompts(5, 9)
    greedy = [r.token_ids for r in gen.generate(prompts, max_new_tokens=10, ignore_eos=True)]
    for temperature in (1e-45, 1e-38, 1e-20, 9.9e-6):
        tiny = gen.generate(prompts, max_new_tokens=10, temperature=temperature, seed=0, ignore_eos=True)
        assert [r.token_ids for r in tiny] == greedy, temperature
    assert SamplingParams(1, temperature=9.9e-6).greedy and not SamplingParams(1, temperature=1e-5).greedy


# ---------------------------------------------------------------------------------------------- SamplingParams

def test_sampling_params_and_keywords_decode_alike(tokenizer):
    _, model = hf_and_ours(window=8)
    gen = Generator(model, tokenizer)
    prompts = random_prompts(5, 9)
    options = dict(max_new_tokens=12, temperature=0.9, top_k=40, top_p=0.9, repetition_penalty=1.2, stop="xyz",
                   seed=5, ignore_eos=True, guidance_scale=1.5)
    params = SamplingParams(**options)
    assert params.stop == ("xyz",)

    def tokens(*args, **kwargs):
        return [r.token_ids for r in gen.generate(prompts, *args, **kwargs)]

    expected = tokens(**options)
    assert tokens(params) == tokens(sampling=params) == expected
    assert tokens(params, seed=6) == tokens(**{**options, "seed": 6}) != expected   # keywords replace fields
    assert params.seed == 5
    negatives = random_prompts(3, 2)
    assert tokens(params, negative_prompts=negatives) == tokens(**options, negative_prompts=negatives)
    assert "".join(gen.stream(prompts[0], params)) == gen.generate(prompts[:1], params)[0].text
    assert "".join(gen.stream(prompts[0], params, negative_prompt=negatives[0])) == \
        gen.generate(prompts[:1], params, negative_prompts=negatives[:1])[0].text
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.seed = 1


@pytest.mark.parametrize("call, error, message", [
    (lambda gen: gen.generate(["ok"]), TypeError, "max_new_tokens"),
    (lambda gen: gen.generate(["ok"], max_new_tokens=2, temprature=1.0), TypeError, "temprature"),
    (lambda gen: gen.generate(["ok"], {"max_new_tokens": 2}), TypeError, "sampling must be a SamplingParams"),
    (lambda gen: gen.generate(["ok"], SamplingParams(2), top_p=2.0), ValueError, "top_p"),
    (lambda gen: next(gen.stream("ok", max_new_tokens=2, seed=1.5)), ValueError, "seed"),
])
def test_bad_sampling_arguments_raise_clear_errors(tokenizer, call, error, message):
    _, model = hf_and_ours(window=8)
    with pytest.raises(error, match=message):
        call(Generator(model, tokenizer))


def test_command_line_refuses_bad_sampling_flags(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--model", "unused", "--prompt", "x", "--top-p", "2"])
    assert exit.value.code == 2 and "top_p must be in (0, 1]" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- the lock

def in_thread(function, timeout: float = 120):
    """function() in a daemon thread: a deadlock fails the test instead of hanging the suite."""
    outcome = {}

    def run():
        try:
            outcome["value"] = function()
        except BaseException as e:   # noqa: B036 - handed to the test's thread
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"no answer within {timeout} s: deadlock"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def test_a_call_while_this_threads_stream_is_open_raises_instead_of_waiting_forever(tokenizer):
    _, model = hf_and_ours(window=8)
    gen = Generator(model, tokenizer)
    ids = tokenizer.encode(NON_ASCII, bos=False)

    def misuse():
        stream = gen.stream("Report:", max_new_tokens=len(ids), logits_processor=ForceTokens([ids]))
        first = next(stream)
        with pytest.raises(RuntimeError, match=r"generate\(\) while this thread's stream\(\) .*close\(\)"):
            gen.generate(["x"], max_new_tokens=2)
        with pytest.raises(RuntimeError, match=r"stream\(\) while this thread's stream\(\)"):
            next(gen.stream("x", max_new_tokens=2))
        rest = "".join(stream)                       # the open stream is unharmed
        assert first + rest == NON_ASCII
        gen.generate(["x"], max_new_tokens=2)        # exhausted: the Generator is free again
        stream = gen.stream("Report:", max_new_tokens=len(ids), logits_processor=ForceTokens([ids]))
        next(stream)
        stream.close()
        return gen.generate(["x"], max_new_tokens=3, ignore_eos=True)

    [result] = in_thread(misuse)
    assert len(result.token_ids) == 3


def test_a_logits_processor_calling_back_into_the_generator_raises(tokenizer):
    _, model = hf_and_ours(window=8)
    gen = Generator(model, tokenizer)

    class CallsBack(ForceTokens):
        def mask(self, logits, rows):
            gen.generate(["x"], max_new_tokens=1)

    with pytest.raises(RuntimeError, match=r"generate\(\) while this thread's generate\(\)"):
        in_thread(lambda: gen.generate(["x"], max_new_tokens=2, logits_processor=CallsBack([None])))
    assert len(in_thread(lambda: gen.generate(["x"], max_new_tokens=2, ignore_eos=True))[0].token_ids) == 2


# ---------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("prompts, options, message", [
    ([], {}, "prompts"),
    ("a string", {}, "prompts"),
    ([[]], {}, r"prompts\[0\] is empty"),
    (["ok", 3], {}, r"prompts\[1\]"),
    ([[1, VOCAB]], {}, r"prompts\[0\] has token ids"),
    ([[1] * 300], {}, "max_seq_len"),
    (["ok"], {"max_new_tokens": -1}, "max_new_tokens"),
    (["ok"], {"top_p": 0.0}, "top_p"),
    (["ok"], {"top_p": 1.5}, "top_p"),
    (["ok"], {"top_k": 0}, "top_k"),
    (["ok"], {"temperature": -1.0}, "temperature"),
    (["ok"], {"stop": 3}, "stop"),
    (["ok"], {"stop": ["a", None]}, "stop"),
    (["ok"], {"seed": "1"}, "seed"),
    (["ok"], {"ignore_eos": "yes"}, "ignore_eos"),
    (["ok"], {"temperature": True}, "temperature"),
    (["ok"], {"logits_processor": object()}, "logits_processor"),
    (["ok"], {"guidance_scale": float("nan")}, "guidance_scale"),
    (["ok"], {"negative_prompts": ["a"]}, "guidance_scale != 1"),
    (["ok"], {"guidance_scale": 2.0, "negative_prompts": ["a", "b"]}, "one entry per prompt"),
    (["ok"], {"guidance_scale": 2.0, "negative_prompts": [[]]}, r"negative_prompts\[0\] is empty"),
])
def test_bad_input_raises_a_clear_value_error(tokenizer, prompts, options, message):
    _, model = hf_and_ours(window=None, max_seq_len=256)
    with pytest.raises(ValueError, match=message):
        Generator(model, tokenizer).generate(prompts, **{"max_new_tokens": 4, **options})


def test_generation_stops_at_the_context_and_zero_new_tokens_is_empty(tokenizer):
    _, model = hf_and_ours(window=None, max_seq_len=32)
    gen = Generator(model, tokenizer)
    [r] = gen.generate([random_prompts(28)[0]], max_new_tokens=10, ignore_eos=True)
    assert (len(r.token_ids), r.finish_reason) == (4, "length")
    [r] = gen.generate(["x"], max_new_tokens=0)
    assert (r.token_ids, r.text, r.finish_reason) == ([], "", "length")


# ---------------------------------------------------------------------------------------------- from disk

def test_from_pretrained_and_command_line(tokenizer, tmp_path):
    _, model = hf_and_ours(window=8)
    model.save_pretrained(tmp_path, tokenizer=tokenizer)
    loaded = Generator.from_pretrained(tmp_path, dtype="float32")
    prompts = ["Invasive ductal carcinoma", "Left breast"]
    expected = [r.token_ids for r in Generator(model, tokenizer).generate(prompts, max_new_tokens=6)]
    assert [r.token_ids for r in loaded.generate(prompts, max_new_tokens=6)] == expected
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    done = subprocess.run([sys.executable, "-m", "cancerllm.generate", "--model", str(tmp_path), "--prompt-file",
                           str(tmp_path / "prompts.txt"), "--lines", "--max-new-tokens", "6", "--jsonl"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["token_ids"] for line in done.stdout.splitlines()] == expected
    assert "tok/s" in done.stderr
    guided = [r.token_ids for r in loaded.generate(prompts, max_new_tokens=6, guidance_scale=2.0,
                                                   negative_prompts=["Report", "Right"])]
    done = subprocess.run([sys.executable, "-m", "cancerllm.generate", "--model", str(tmp_path), "--prompt",
                           prompts[0], "--prompt", prompts[1], "--max-new-tokens", "6", "--jsonl",
                           "--guidance-scale", "2", "--negative-prompt", "Report", "--negative-prompt", "Right"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["token_ids"] for line in done.stdout.splitlines()] == guided
    other = tmp_path / "other"
    hf_and_ours(window=None)[1].save_pretrained(other, tokenizer=tokenizer)
    ensemble = [r.token_ids for r in Generator.from_pretrained([tmp_path, other]).generate(prompts, max_new_tokens=6)]
    done = subprocess.run([sys.executable, "-m", "cancerllm.generate", "--model", str(tmp_path), str(other),
                           "--prompt", prompts[0], "--prompt", prompts[1], "--max-new-tokens", "6", "--jsonl"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["token_ids"] for line in done.stdout.splitlines()] == ensemble != expected

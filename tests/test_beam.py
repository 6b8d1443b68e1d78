"""Beam search (Generator.generate with num_beams > 1, cancerllm/beam.py) against transformers' beam search, against
a plain beam search that recomputes every sequence from scratch, and against exhaustive search; batch invariance,
grammars, stop strings, the cache's row copies and bad options."""
import json
import math

import pytest
import torch

from cancerllm import Generator
from cancerllm.cache import KVCache
from cancerllm.tokenizer import Tokenizer, mistral_tokenizer_path
from hf_util import hf_model, our_name, tiny_args
from generation_util import VOCAB, AllowOnly, random_prompts
from cancerllm import Transformer

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(mistral_tokenizer_path())


def tiny_model(window=8, seed=0):
    torch.manual_seed(seed)
    args = tiny_args(vocab_size=VOCAB, sliding_window=window, max_seq_len=256)
    hf = hf_model(args)
    ours = Transformer(args)
    ours.load_state_dict({our_name(name): p for name, p in hf.state_dict().items()})
    return hf, ours


def reference_beam_search(model, prompt, k, max_new_tokens, eos_id, allowed=None, length_penalty=1.0):
    """Hugging Face's beam search (early_stopping=False) written plainly: every beam's sequence rerun through the
    model at every step, candidates sorted in Python. Returns (tokens, finish reason)."""
    beams, hypotheses = [([], 0.0)], []

    def scored(score, tokens):
        return score / len(tokens) ** length_penalty

    for _ in range(max_new_tokens):
        candidates = []
        for b, (tokens, score) in enumerate(beams):
            with torch.no_grad():
                logprobs = torch.log_softmax(model(torch.tensor([prompt + tokens]))[0, -1].float(), dim=-1)
            for t in (range(VOCAB) if allowed is None else allowed):
                candidates.append((score + logprobs[t].item(), b, t))
        candidates.sort(key=lambda c: -c[0])
        new = []
        for rank, (score, b, t) in enumerate(candidates[:2 * k]):
            if len(new) == k:
                break
            tokens = beams[b][0] + [t]
            if t == eos_id:
                if rank < k:
                    hypotheses.append((scored(score, tokens), tokens, "eos"))
            else:
                new.append((tokens, score))
        hypotheses = sorted(hypotheses, key=lambda h: -h[0])[:k]
        if new and len(new[0][0]) >= max_new_tokens:
            hypotheses += [(scored(score, tokens), tokens, "length") for tokens, score in new]
            break
        if not new or (len(hypotheses) == k and
                       scored(max(s for _, s in new), new[0][0]) <= hypotheses[-1][0]):
            break
        beams = new
    best = max(hypotheses, key=lambda h: h[0])
    return best[1], best[2]


def sequence_logprob(model, prompt, tokens):
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([prompt + tokens]))[0].float(), dim=-1)
    return sum(logprobs[len(prompt) - 1 + i, t].item() for i, t in enumerate(tokens))


# ---------------------------------------------------------------------------------------------- the search itself

@pytest.mark.parametrize("k", [2, 4])
def test_beam_search_matches_transformers(tokenizer, k):
    """transformers' generate(num_beams=k) on the same random model: length_penalty 0, no EOS, so every
    hypothesis has max_new_tokens tokens and the best is the most probable sequence the beams kept."""
    hf, model = tiny_model(window=None)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    gen = Generator(model, tokenizer)
    for prompt in random_prompts(7, 12):
        ours = gen.generate([prompt], max_new_tokens=8, num_beams=k, length_penalty=0.0, ignore_eos=True)[0]
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=8, num_beams=k, do_sample=False,
                             length_penalty=0.0, early_stopping=False)[0, len(prompt):].tolist()
        assert ours.token_ids == theirs and ours.finish_reason == "length"


@pytest.mark.parametrize("window, k, length_penalty", [(None, 2, 1.0), (6, 3, 0.0), (6, 4, 2.0)])
def test_beam_search_equals_plain_recomputation(tokenizer, window, k, length_penalty):
    """Batched prompts of different lengths, a 5-token vocabulary with EOS in it (so beams end at different
    steps, ends fall outside the top k, and prompts leave the batch early), the sliding window's rolling cache:
    every prompt's answer equals the plain search's."""
    _, model = tiny_model(window=window, seed=1)
    allowed = [tokenizer.eos_id, 7, 300, 1200, 31000]
    prompts = random_prompts(5, 11, 3, 9)
    processor = AllowOnly(allowed)
    results = Generator(model, tokenizer, prefill_chunk=4).generate(
        prompts, max_new_tokens=10, num_beams=k, length_penalty=length_penalty, logits_processor=processor)
    assert processor.reorders > 0
    for prompt, result in zip(prompts, results):
        tokens, reason = reference_beam_search(model, prompt, k, 10, tokenizer.eos_id, allowed, length_penalty)
        assert (result.token_ids, result.finish_reason) == (tokens, reason)
    assert {r.finish_reason for r in results} >= {"eos"}


class Answers:
    """A logits processor allowing exactly the token sequences `answers`, each followed by EOS: a trie, so the
    partial answers alive at any step are at most len(answers), whatever the vocabulary."""

    def __init__(self, answers, eos_id):
        self.answers, self.eos_id = [tuple(a) for a in answers], eos_id

    def reset(self, batch_size):
        self.prefixes = [()] * batch_size

    def mask(self, logits, rows):
        for i, row in enumerate(rows):
            prefix = self.prefixes[row]
            allowed = {a[len(prefix)] for a in self.answers if len(a) > len(prefix) and a[:len(prefix)] == prefix}
            allowed |= {self.eos_id} if prefix in self.answers else set()
            keep = logits[i, sorted(allowed)].clone()
            logits[i] = -math.inf
            logits[i, sorted(allowed)] = keep

    def advance(self, row, token_id):
        self.prefixes[row] += (token_id,)

    def reorder(self, rows, sources):
        prefixes = list(self.prefixes)
        for row, source in zip(rows, sources):
            prefixes[row] = self.prefixes[source]
        self.prefixes = prefixes


def test_enough_beams_find_the_most_probable_answer(tokenizer):
    """With as many beams as there are answers and length_penalty 0, beam search is exhaustive: it returns the
    answer of highest probability (EOS included), answers that are prefixes of others among them."""
    _, model = tiny_model(window=None, seed=2)
    answers = [[40, 41], [40, 41, 42], [40, 900, 7], [5000], [5000, 12, 13, 14], [31000, 8]]
    gen = Generator(model, tokenizer)
    found_by_beams_only = 0
    for prompt in random_prompts(6, 9, 14, 3, 11):
        processor = Answers(answers, tokenizer.eos_id)
        result = gen.generate([prompt], max_new_tokens=8, num_beams=len(answers), length_penalty=0.0,
                              logits_processor=processor)[0]
        scores = {tuple(a): sequence_logprob(model, prompt, a + [tokenizer.eos_id]) for a in answers}
        assert result.finish_reason == "eos"
        assert scores[tuple(result.token_ids[:-1])] == pytest.approx(max(scores.values()), abs=1e-5)
        greedy = gen.generate([prompt], max_new_tokens=8, logits_processor=processor)[0]
        found_by_beams_only += greedy.token_ids != result.token_ids
    assert found_by_beams_only > 0   # the test would not tell beams from greedy decoding otherwise


def test_beams_of_a_prompt_do_not_depend_on_the_batch(tokenizer):
    """bf16 on the row kernels (batch invariance): each prompt's beams alone and among others, bit for bit."""
    _, model = tiny_model(window=None, seed=3)
    gen = Generator(model.to(torch.bfloat16), tokenizer)
    if not gen.batch_invariant:
        pytest.skip("the batch-invariant row kernels do not run here")
    prompts = random_prompts(4, 13, 8, 21, 6)
    options = dict(max_new_tokens=9, num_beams=3, ignore_eos=True)
    together = gen.generate(prompts, **options)
    for prompt, result in zip(prompts, together):
        assert gen.generate([prompt], **options)[0].token_ids == result.token_ids


def test_json_schema_beams_answer_valid_json(tokenizer):
    """Under a JSON schema of the phenotype fields' values (xgrammar matchers forked per beam), every prompt's
    answer parses and obeys it, on a random model that would never write JSON by itself."""
    from cancerllm.tasks.constrained import JsonSchemaProcessor
    from cancerllm.tasks.fields import ALLOWED
    fields = ("pT", "pN", "ER")
    schema = {"type": "object", "properties": {f: {"enum": [*ALLOWED[f], None]} for f in fields},
              "required": list(fields), "additionalProperties": False}
    _, model = tiny_model(window=None, seed=4)
    processor = JsonSchemaProcessor(tokenizer, schema, vocab_size=VOCAB)
    results = Generator(model, tokenizer).generate(random_prompts(5, 8, 13), max_new_tokens=120, num_beams=3,
                                                   logits_processor=processor)
    for r in results:
        answer = json.loads(r.text)
        assert r.finish_reason == "eos" and list(answer) == list(fields)
        assert all(answer[f] in (*ALLOWED[f], None) for f in fields)


def test_stop_strings_end_hypotheses(tokenizer):
    """A stop string ends a beam as EOS does; the text is cut before it, the tokens keep the one that made it."""
    _, model = tiny_model(window=None, seed=5)
    allowed = [tokenizer.encode(w, bos=False)[-1] for w in ("a", "b", "c", "x")]
    processor = AllowOnly(allowed)
    results = Generator(model, tokenizer).generate(random_prompts(6, 3, 9, 12), max_new_tokens=12, num_beams=3,
                                                   stop="x", logits_processor=processor)
    for result in results:
        text = tokenizer.decode(result.token_ids)
        if result.finish_reason == "stop":
            assert "x" in text and result.text == text[:text.index("x")]
        else:
            assert result.finish_reason == "length" and "x" not in text
    assert any(r.finish_reason == "stop" for r in results)   # else the test would not have seen a stop


def test_zero_new_tokens_and_a_full_context(tokenizer):
    _, model = tiny_model(window=None)
    gen = Generator(model, tokenizer)
    results = gen.generate(random_prompts(4, 255), max_new_tokens=0, num_beams=2)
    assert [(r.text, r.token_ids, r.finish_reason) for r in results] == [("", [], "length")] * 2
    assert len(gen.generate(random_prompts(254), max_new_tokens=5, num_beams=2)[0].token_ids) == 2


# ---------------------------------------------------------------------------------------------- the cache

def test_keep_rows_copies_parents_including_repeats():
    """Row i becomes a copy of row keep[i] (repeats allowed, as beams share a parent); rows past len(keep) are
    left alone."""
    cache = KVCache(n_layers=2, batch=5, n_slots=7, n_heads=4, n_kv_heads=2, head_dim=3)
    cache.k.normal_()
    cache.v.normal_()
    cache.slot_pos.copy_(torch.randint(-1, 7, cache.slot_pos.shape))
    cache.slot_pos[:, 6] = 6   # every row holds the last slot: the copy covers all of them
    before = (cache.k.clone(), cache.v.clone(), cache.slot_pos.clone())
    keep = torch.tensor([3, 3, 0, 1])
    cache.keep_rows(keep)
    for tensor, old in zip((cache.k, cache.v), before[:2]):
        assert torch.equal(tensor[:, :4], old[:, keep]) and torch.equal(tensor[:, 4], old[:, 4])
    assert torch.equal(cache.slot_pos[:4], before[2][keep])


# ---------------------------------------------------------------------------------------------- bad options

@pytest.mark.parametrize("options, message", [
    (dict(num_beams=0), "num_beams must be an int >= 1"),
    (dict(num_beams=2.0), "num_beams must be an int >= 1"),
    (dict(num_beams=2, temperature=0.7), "needs temperature=0.0"),
    (dict(num_beams=2, guidance_scale=1.5), "needs guidance_scale=1.0"),
    (dict(num_beams=2, repetition_penalty=1.2), "needs repetition_penalty=1.0"),
    (dict(num_beams=2, length_penalty=math.inf), "length_penalty must be a finite number"),
])
def test_bad_beam_options_are_refused(tokenizer, options, message):
    _, model = tiny_model()
    with pytest.raises(ValueError, match=message):
        Generator(model, tokenizer).generate(random_prompts(4), max_new_tokens=2, **options)


def test_beams_need_a_processor_that_can_reorder_and_generate(tokenizer):
    class NoReorder(AllowOnly):
        reorder = None

    _, model = tiny_model()
    gen = Generator(model, tokenizer)
    with pytest.raises(ValueError, match="reorder"):
        gen.generate(random_prompts(4), max_new_tokens=2, num_beams=2, logits_processor=NoReorder([5, 6]))
    with pytest.raises(ValueError, match="use generate"):
        next(gen.stream(random_prompts(4)[0], max_new_tokens=2, num_beams=2))
    with pytest.raises(ValueError, match="negative_prompts"):
        gen.generate(random_prompts(4), max_new_tokens=2, num_beams=2, negative_prompts=["x"])

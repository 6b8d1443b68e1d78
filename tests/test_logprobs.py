"""Each new token's log-probability (SamplingParams.logprobs) against transformers' logits for the whole sequence
recomputed in fp32: greedy, sampled, under a logits processor, guided, by beam search; and its options."""
import json
import math

import pytest
import torch

from cancerllm import Generator, Transformer
from cancerllm.generate import SamplingParams, main
from cancerllm.tokenizer import Tokenizer, mistral_tokenizer_path
from hf_util import hf_model, our_name, tiny_args
from generation_util import VOCAB, AllowOnly, random_prompts

pytest.importorskip("transformers")

TOLERANCE = 1e-4   # fp32 cached decoding against one fp32 forward pass over the whole sequence


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(mistral_tokenizer_path())


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    args = tiny_args(vocab_size=VOCAB, sliding_window=8, max_seq_len=256)
    hf = hf_model(args)
    ours = Transformer(args)
    ours.load_state_dict({our_name(name): p for name, p in hf.state_dict().items()})
    return hf, ours


def reference_logprobs(hf, prompt, tokens):
    """log-softmax of transformers' logits over prompt + tokens, at each new token: [len(tokens), V]."""
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + tokens])).logits[0].double()
    return logits.log_softmax(dim=-1)[len(prompt) - 1:len(prompt) - 1 + len(tokens)]


def chosen(table, tokens):
    return table[torch.arange(len(tokens)), torch.tensor(tokens)]


def assert_close(got, want):
    got = torch.tensor(got, dtype=torch.float64)
    assert got.shape == want.shape
    assert (got - want).abs().max() <= TOLERANCE, (got, want)


def test_greedy_logprobs_are_the_models_and_its_maximum(models, tokenizer):
    hf, ours = models
    prompts = random_prompts(5, 13, 2)
    results = Generator(ours, tokenizer).generate(prompts, max_new_tokens=12, ignore_eos=True, logprobs=True)
    for prompt, r in zip(prompts, results):
        table = reference_logprobs(hf, prompt, r.token_ids)
        assert len(r.logprobs) == len(r.token_ids) == 12
        assert_close(r.logprobs, chosen(table, r.token_ids))
        assert_close(r.logprobs, table.max(dim=-1).values)   # greedy takes the most probable token


def test_sampled_logprobs_are_before_temperature_and_top_k(models, tokenizer):
    hf, ours = models
    prompts = random_prompts(7, 4)
    results = Generator(ours, tokenizer).generate(prompts, max_new_tokens=10, ignore_eos=True, temperature=1.7,
                                                  top_k=20, seed=3, logprobs=True)
    for prompt, r in zip(prompts, results):
        table = reference_logprobs(hf, prompt, r.token_ids)
        assert_close(r.logprobs, chosen(table, r.token_ids))
        assert (table.max(dim=-1).values - torch.tensor(r.logprobs) > 1e-3).any()   # sampled, not all argmax


def test_a_processors_forbidden_tokens_keep_their_mass(models, tokenizer):
    """Under a processor the log-probabilities are the model's own, not renormalised over the allowed tokens: the
    allowed tokens here carry little of the mass, and their log-probabilities say so."""
    hf, ours = models
    prompt = random_prompts(9)[0]
    allowed = [101, 2020, 3003]
    r = Generator(ours, tokenizer).generate([prompt], max_new_tokens=8, ignore_eos=True,
                                            logits_processor=AllowOnly(allowed), logprobs=True)[0]
    table = reference_logprobs(hf, prompt, r.token_ids)
    assert_close(r.logprobs, chosen(table, r.token_ids))
    assert set(r.token_ids) <= set(allowed)
    assert max(r.logprobs) < math.log(0.5)


def test_guided_logprobs_are_the_guided_distributions(models, tokenizer):
    hf, ours = models
    prompt, negative = random_prompts(11, 3)
    scale = 1.5
    r = Generator(ours, tokenizer).generate([prompt], max_new_tokens=8, ignore_eos=True, guidance_scale=scale,
                                            negative_prompts=[negative], logprobs=True)[0]
    cond = reference_logprobs(hf, prompt, r.token_ids)
    uncond = reference_logprobs(hf, negative, r.token_ids)
    guided = (uncond + scale * (cond - uncond)).log_softmax(dim=-1)
    assert_close(r.logprobs, chosen(guided, r.token_ids))


@pytest.mark.parametrize("allowed", [None, [101, 2020, 3003, 17]])
def test_beam_logprobs_sum_to_the_hypothesis_score(models, tokenizer, allowed):
    hf, ours = models
    prompts = random_prompts(6, 10)
    processor = AllowOnly(allowed) if allowed else None
    results = Generator(ours, tokenizer).generate(prompts, max_new_tokens=7, ignore_eos=True, num_beams=3,
                                                  length_penalty=0.0, logits_processor=processor, logprobs=True)
    for prompt, r in zip(prompts, results):
        assert len(r.logprobs) == len(r.token_ids) == 7
        assert_close(r.logprobs, chosen(reference_logprobs(hf, prompt, r.token_ids), r.token_ids))


def test_logprobs_only_when_asked_and_a_bool(models, tokenizer):
    _, ours = models
    gen = Generator(ours, tokenizer)
    assert gen.generate(random_prompts(4), max_new_tokens=3)[0].logprobs is None
    assert gen.generate(random_prompts(4), max_new_tokens=3, num_beams=2)[0].logprobs is None
    assert gen.generate(random_prompts(4), max_new_tokens=0, logprobs=True)[0].logprobs == []
    with pytest.raises(ValueError, match="logprobs must be a bool"):
        SamplingParams(max_new_tokens=3, logprobs=1)


def test_command_line_prints_logprobs(models, tokenizer, tmp_path, capsys):
    _, ours = models
    ours.save_pretrained(tmp_path, tokenizer=tokenizer)
    main(["--model", str(tmp_path), "--prompt", "Tumor size", "--max-new-tokens", "4", "--jsonl", "--logprobs",
          "--dtype", "float32"])
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert len(row["logprobs"]) == len(row["token_ids"]) == 4
    assert all(lp <= 0 for lp in row["logprobs"])

"""Beam search for Generator.generate (`num_beams` > 1): each prompt keeps the `num_beams` most probable partial
answers instead of one, and returns the most probable complete one.

Why: greedy decoding commits to a token by its probability alone, which under a logits processor can be the mass of
continuations the processor then forbids. Asked for a cancer type, a model that wants to write "Tongue" puts most of
its mass on "T"; the schema forbids "ong", and greedy must go on with "T" + "esticular" (log-probability -7.3)
although it preferred "Head and neck ..." (-1.1) to anything the schema allows. A beam keeps "Head" alive until
"T"'s allowed continuations have shown how improbable they are. Whether that pays is the task's to measure: on the
demo's phenotype JSON it did not (docs/experiments.md, 2026-12-01), because a beam weighs the whole answer, and
there the fields a cancer type's schema forces to null also vote on the type.

How a call runs (Hugging Face's beam search, `early_stopping=False`, with the Generator's cache and kernels):
- Each prompt is prefilled once; its cache row is then copied to its num_beams rows (KVCache.keep_rows).
- Every step scores each live beam's continuations by the model's log-probabilities (log-softmax of the logits, and
  only then the logits processor's mask: a forbidden token is excluded, its mass is not handed to the allowed ones;
  that is what defuses the trap above), adds the beam's score, and takes the 2 * num_beams best (beam, token) pairs
  of each prompt. A pair that ends its sequence (EOS, a stop string) and ranks among the first num_beams becomes a
  hypothesis; the others fill the num_beams new beams, whose cache rows and processor states are copied from their
  parents (the processor's reorder()).
- A hypothesis scores sum(log-probabilities of its new tokens) / len(new tokens) ** length_penalty (the end token
  counted); the prompt keeps the num_beams best. It is done when it holds num_beams hypotheses and its best live
  beam, scored the same way at the current length, does not beat the worst of them (exact for length_penalty 0,
  where a beam's score can only fall), or when its beams reach the token budget (then they are its hypotheses).
- Rows of different prompts never mix: the decode steps run on the batch-invariant row kernels (see generate.py), so
  a prompt's beams, and its answer, are the same alone or in any batch.
Cost: num_beams rows per prompt in every decode step; the prefill is paid once per prompt.

Logits processors used with beams need a fourth method besides reset/mask/advance (generate.py's module docstring):
    reorder(rows, sources)  before the step's advance calls: row rows[i] now continues from the state row sources[i]
                            had (rows are beam slots: prompt p's beams are p * num_beams + j; reset() gets
                            number of prompts * num_beams).
"""
import math
import time
from dataclasses import dataclass

import torch

from .generate import GenerationResult, first_stop


@dataclass
class Hypothesis:
    score: float        # sum of the new tokens' log-probabilities
    tokens: list
    finish_reason: str  # "eos", "stop" or "length"
    logprobs: list      # each new token's log-probability


class PromptBeams:
    """One prompt's search: its live beams (token lists and scores) and its best hypotheses."""

    def __init__(self, prompt: list, budget: int, num_beams: int, length_penalty: float):
        self.prompt, self.budget, self.k, self.length_penalty = prompt, budget, num_beams, length_penalty
        self.tokens, self.scores = [[]], [0.0]   # live beams; one until the first step branches
        self.logprobs = [[]]                     # each live beam's per-token log-probabilities
        self.hypotheses = []                     # (normalised score, Hypothesis), best first, at most k
        self.done = budget == 0
        self.finished_at = 0.0

    def normalised(self, score: float, length: int) -> float:
        return score / max(length, 1) ** self.length_penalty

    def add(self, hypothesis: Hypothesis) -> None:
        self.hypotheses.append((self.normalised(hypothesis.score, len(hypothesis.tokens)), hypothesis))
        self.hypotheses.sort(key=lambda h: -h[0])
        del self.hypotheses[self.k:]

    def best(self) -> Hypothesis:
        return self.hypotheses[0][1] if self.hypotheses else Hypothesis(0.0, [], "length", [])

    def advance(self, candidates, ends) -> list:
        """Take one step from `candidates`, this prompt's (score, beam, token) best first; `ends(tokens)` is a
        sequence's finish reason ("eos", "stop") or None. Returns the k new beams' (parent beam, token), [] when
        the prompt is done."""
        tokens, scores, logprobs, parents = [], [], [], []
        for rank, (score, beam, token) in enumerate(candidates):
            if score == -math.inf or len(tokens) == self.k:
                break
            sequence = self.tokens[beam] + [token]
            sequence_logprobs = self.logprobs[beam] + [score - self.scores[beam]]
            reason = ends(sequence)
            if reason is None:
                tokens.append(sequence)
                scores.append(score)
                logprobs.append(sequence_logprobs)
                parents.append((beam, token))
            elif rank < self.k:   # an end outranked by k continuations is not among the k best
                self.add(Hypothesis(score, sequence, reason, sequence_logprobs))
        if tokens and len(tokens[0]) >= self.budget:
            for sequence, score, sequence_logprobs in zip(tokens, scores, logprobs):
                self.add(Hypothesis(score, sequence, "length", sequence_logprobs))
            tokens = []
        self.done = not tokens or (len(self.hypotheses) == self.k and
                                   self.normalised(max(scores), len(tokens[0])) <= self.hypotheses[-1][0])
        if self.done:
            self.finished_at = time.perf_counter()
            return []
        # Fewer continuations than k (a processor allowing few tokens): the last beam is repeated, its score -inf
        # so that it is never chosen, and the prompt keeps its k rows.
        missing = self.k - len(tokens)
        self.tokens, self.scores = tokens + [tokens[-1]] * missing, scores + [-math.inf] * missing
        self.logprobs = logprobs + [logprobs[-1]] * missing
        return parents + [parents[-1]] * missing


class BeamSearch:
    """generate(prompts) with params.num_beams > 1 (the params checked by SamplingParams): see the module
    docstring. prompt_ids: each prompt's token ids, checked by the Generator."""

    def __init__(self, gen, prompt_ids: list, params):
        self.gen, self.params, self.k = gen, params, params.num_beams
        self.processor = params.logits_processor
        self.stop_ids = () if params.ignore_eos else gen.tokenizer.stop_ids
        self.searches = [PromptBeams(ids, min(params.max_new_tokens, gen.max_seq_len - len(ids)), self.k,
                                     params.length_penalty) for ids in prompt_ids]

    def ends(self, tokens: list):
        if tokens[-1] in self.stop_ids:
            return "eos"
        if self.params.stop and first_stop(self.gen.tokenizer.decode(tokens), self.params.stop) is not None:
            return "stop"
        return None

    def run(self) -> list:
        gen, k, searches = self.gen, self.k, self.searches
        caches = gen.new_caches(len(searches) * k, max(len(s.prompt) + s.budget for s in searches))
        if self.processor is not None:
            self.processor.reset(len(searches) * k)
        start = time.perf_counter()
        active = [i for i, s in enumerate(searches) if not s.done]   # the prompts in the batch, `width` rows each
        width = 1
        with torch.inference_mode():
            logits = torch.cat([gen.prefill(caches, row, searches[i].prompt) for row, i in enumerate(active)]) \
                if active else None
        prefill_s = time.perf_counter() - start
        while active:
            with torch.inference_mode():
                candidates = self.candidates(logits, active, width)
            kept, cache_rows, slots, slot_sources, tokens = [], [], [], [], []
            for a, (i, prompt_candidates) in enumerate(zip(active, candidates)):
                parents = searches[i].advance(prompt_candidates, self.ends)
                if parents:
                    kept.append(i)
                for j, (beam, token) in enumerate(parents):
                    cache_rows.append(a * width + beam)
                    slots.append(i * k + j)
                    slot_sources.append(i * k + beam)
                    tokens.append(token)
            active, width = kept, k
            if not active:
                break
            with torch.inference_mode():
                for cache in caches:   # each new beam's rows become a copy of its parent's
                    cache.keep_rows(torch.tensor(cache_rows, device=gen.device))
                if self.processor is not None:
                    self.processor.reorder(slots, slot_sources)
                    for slot, token in zip(slots, tokens):
                        self.processor.advance(slot, token)
                positions = torch.tensor([[len(searches[i].prompt) + len(searches[i].tokens[0]) - 1]
                                          for i in active for _ in range(k)], device=gen.device)
                logits = gen.forward(torch.tensor(tokens, device=gen.device)[:, None], positions, caches,
                                     slice(0, len(tokens)))
        return [self.result(s, prefill_s, start + prefill_s) for s in searches]

    def candidates(self, logits, active: list, width: int) -> list:
        """Per active prompt, its 2k best (score, beam, token) continuations, best first: the model's
        log-probabilities, the processor's forbidden tokens at -inf, plus each beam's score."""
        logprobs = logits.log_softmax(dim=-1)
        if self.processor is not None:
            self.processor.mask(logprobs, [i * self.k + j for i in active for j in range(width)])
        scores = torch.tensor([self.searches[i].scores[j] for i in active for j in range(width)],
                              device=logprobs.device)
        vocab = logprobs.shape[1]
        total = (logprobs + scores[:, None]).view(len(active), width * vocab)
        best = total.topk(min(2 * self.k, width * vocab), dim=1)
        return [[(score, index // vocab, index % vocab) for score, index in zip(row_scores, row_indices)]
                for row_scores, row_indices in zip(best.values.tolist(), best.indices.tolist())]

    def result(self, search: PromptBeams, prefill_s: float, prefill_end: float) -> GenerationResult:
        best = search.best()
        text = self.gen.tokenizer.decode(best.tokens[:-1] if best.finish_reason == "eos" else best.tokens)
        if best.finish_reason == "stop":
            text = text[:first_stop(text, self.params.stop)]
        decode_s = max(search.finished_at - prefill_end, 0.0) if best.tokens else 0.0
        return GenerationResult(text, best.tokens, best.finish_reason, len(search.prompt), prefill_s, decode_s,
                                best.logprobs if self.params.logprobs else None)

"""Text generation with a KV cache: batched prompts of different lengths, sampling, stop strings, streaming.

    gen = Generator.from_pretrained("export/", device="cpu", dtype=torch.float32)
    results = gen.generate(["Report: ...", [1, 415, 2990]], max_new_tokens=64, stop=["\\n\\n"])
    for piece in gen.stream("Report: ...", max_new_tokens=64):
        print(piece, end="", flush=True)

    python -m cancerllm.generate --model export/ --prompt "Report: ..." --max-new-tokens 64

How a call runs
- Prefill: each prompt is run through the model on its own row of the cache (cancerllm/cache.py), in chunks of
  `prefill_chunk` tokens that attend to the cache plus themselves. Rows keep their own positions 0..len-1: no
  padding anywhere, so prompts of any lengths share a batch and no work is spent on pad tokens.
- Decode: every unfinished row advances one token per step in one forward pass. A row stops on its own: EOS,
  a stop string, `max_new_tokens`, or the model's max_seq_len (the length of its rotary table, which bounds
  positions even when a sliding window keeps the cache itself at W slots). Finished rows are compacted out of
  the batch and the cache, so they cost nothing afterwards.
- Batch invariance (on CPU, the default where the kernels run; Generator's `batch_invariant`): every decode step,
  whatever its batch size, runs on our row kernels, whose per-row sums do not depend on the other rows, so a prompt's
  logits and greedy tokens are the same bits alone or in any batch (prefill already runs each prompt on its own).
- Host synchronisation: one per decode step, copying the n new token ids to the host, where EOS, budgets and
  stop strings are checked (and text is streamed). Sampling itself never syncs: a categorical draw is the argmax
  of probs / Exponential(1) noise, drawn from the call's own torch.Generator.
- Forward passes: Transformer.forward with the cache, on the model in decoding form (fuse_for_decoding in model.py,
  built once per Generator and again when the model's weights change; see Generator): the model's own embedding,
  norm weights, rotary embedding and cache attention, with q/k/v fused into one matmul and, in fp32 or bf16 on CPU,
  each matmul on oneDNN (its weight prepacked in oneDNN's blocked layout, SwiGLU and the residual additions fused
  in as post-ops) or on F.linear, whichever this machine measured faster for that weight's shape (decode_paths.py;
  a fast path chosen on one machine was the slow one on another), or with `quantize="int8"` on int8 weights. The
  cache is allocated once per call and written in place (no per-step concatenation). What each
  choice bought is measured in bench/generate.py and bench/README.md.

Decoding options: one SamplingParams (max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop, seed,
ignore_eos, guidance_scale, logits_processor, num_beams, length_penalty, logprobs), checked when it is made;
generate() and stream() take one, or its fields as keywords (`generate(prompts, max_new_tokens=64)`), or both (the
keywords replace the object's fields). num_beams > 1 decodes by beam search (generate() only; cancerllm/beam.py).

Sampling: logits are processed in fp32, in this order: classifier-free guidance when `guidance_scale` != 1,
repetition penalty (Hugging Face's: a seen token's positive logit is divided by the penalty, a negative one
multiplied; "seen" is the prompt plus what was generated), the logits processor, then greedy argmax when the
temperature is below GREEDY_BELOW (0 included), otherwise temperature, top-k, top-p and the draw. A `seed` makes
sampling reproducible: the same prompts, options and seed give the same tokens (a row's draws depend on the batch
it is in, since all rows share the call's generator).

Log-probabilities (`logprobs=True`; vLLM's `logprobs`, transformers' `output_scores`): each new token's
log-probability under the model's own distribution at its step, the log-softmax of the logits (of the guided scores
with guidance, of the ensemble's averaged probabilities), before repetition penalty, the logits processor's mask,
temperature, top-k and top-p. A processor's forbidden tokens keep their mass in the denominator: a token the schema
forced where the model wanted another has a low log-probability, which is what tells a forced answer from a
confident one. Beam search reports the same quantity (its scores are their sums).

Logits processors (schema-constrained decoding) are objects with three methods:
    reset(batch_size)       once per call, before the first token; batch_size = number of prompts.
    mask(logits, rows)      before every sampling step. logits: fp32 [n, vocab] tensor of the n unfinished rows;
                            rows: list of n prompt indices (row i of logits belongs to prompt rows[i]). Set the
                            logits of forbidden tokens to -inf in place and return None; leave at least one
                            token allowed per row.
    advance(row, token_id)  after every step, for each row that was masked, in the same order, with the token
                            chosen for prompt `row` (both ints).
Under greedy decoding the argmax sees exactly the logits the processor left. Beam search (num_beams > 1) calls
them per beam rather than per prompt, and needs a fourth method, reorder (cancerllm/beam.py).

Classifier-free guidance (Sanchez et al. 2023, "Stay on topic with classifier-free guidance"; transformers'
`guidance_scale` / `negative_prompt_ids`): each prompt gets a second, unconditional row in the batch, its negative
prompt (by default the prompt's last token, as in transformers), fed the same new tokens. The scores are then
    uncond + guidance_scale * (cond - uncond)       (both log-softmaxed)
so a scale above 1 moves each choice away from what the model would say without the prompt's context, towards
what that context adds: for extraction, a value stated in the report over the value that is merely frequent.
Cost: the negative rows' prefill, and twice the rows in every decode step.

Ensembles: a Generator can hold several models that share one tokenizer (e.g. fine-tunes of one base from different
seeds). Each keeps its own decoding form and KV cache; every step scores a token by the members' averaged
probability, log(mean_k softmax(logits_k)) (fairseq's ensemble rule), and sampling, guidance and logits processors
then work on those scores as on one model's. A one-model Generator uses its logits as they are. Cost: every
member's forward pass, prefill and decode alike.

Thread safety: a Generator serialises its calls with a lock (a stream holds it from its first piece until exhausted
or closed), so sharing one between threads is safe but not parallel; for parallel generation use one Generator per
thread. A call made while the same thread holds the lock (e.g. generate() while a stream it has not finished
reading is open) would wait for itself forever: it raises RuntimeError instead.
"""
import argparse
import collections
import contextlib
import dataclasses
import json
import math
import secrets
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch

from .cache import KVCache
from .checkpoint import parse_dtype
from .model import QUANTIZE, Transformer, batch_invariance_blocker, fuse_for_decoding, pack_weights
from .tasks.abstention import load_abstention
from .tasks.prompts import SETTINGS_FILE, load_prompt_settings
from .tokenizer import TokenizerBase, open_tokenizer


@dataclass
class GenerationResult:
    text: str                 # the new text, cut before the stop string when one ended it
    token_ids: list           # the new tokens, including the EOS or the token that completed a stop string
    finish_reason: str        # "eos", "stop" or "length"
    prompt_tokens: int
    prefill_s: float          # the whole batch's prefill, which produced this row's first token
    decode_s: float           # from the end of the prefill until this row finished
    logprobs: Optional[list] = None   # with SamplingParams.logprobs: each new token's log-probability (module doc)


# Temperatures below this sample as greedy argmax. Dividing fp32 logits by a tiny temperature overflows to inf
# (below ~1e-38 even a logit of 1 does), and softmax then gives NaN; long before that, sampling is greedy in all but
# name: at 1e-5 a logit gap of 0.001 is a probability ratio of exp(100).
GREEDY_BELOW = 1e-5


FASTEST_ROWS = 256   # the rows dtype="fastest" times a model's linears at: a prefill chunk's (most of decoding's time)


def decoding_dtype(dtype, path, device="cpu") -> Optional[torch.dtype]:
    """from_pretrained's dtype as a torch dtype (None: the checkpoint's own): a name parsed, and "fastest" the
    faster of bf16 and fp32 for the checkpoint at `path` on this machine (bf16 on GPU; on CPU measured once and
    cached, cancerllm/fast_dtype.py): bf16 where the CPU multiplies it natively, fp32 where oneDNN emulates it."""
    if dtype == "fastest":
        from .checkpoint import CONFIG, read_config
        from .fast_dtype import fastest_dtype
        return fastest_dtype(read_config(Path(path) / CONFIG)[0], FASTEST_ROWS, device)
    return parse_dtype(dtype) if isinstance(dtype, str) else dtype


@dataclass(frozen=True)
class SamplingParams:
    """Every decoding option of a generate() or stream() call, checked here (ValueError naming the option).

    max_new_tokens: new tokens per prompt at most (also capped by the model's max_seq_len); stop: a string or a
    list of strings that end a row (kept as a tuple); seed: the call's sampling generator (None: a fresh random
    one); ignore_eos: generate through EOS (benchmarks); guidance_scale: classifier-free guidance (1: off; the
    negative prompts are arguments of generate and stream); logits_processor: see the module docstring;
    num_beams: beam search's beams per prompt (1: off; generate() only, at temperature 0, without guidance or
    repetition penalty; cancerllm/beam.py); length_penalty: a beam search hypothesis scores its summed
    log-probability / its length ** length_penalty (Hugging Face's default 1.0; 0: the sequence's probability);
    logprobs: return each new token's log-probability in GenerationResult.logprobs (module docstring)."""
    max_new_tokens: int
    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: tuple = ()
    seed: Optional[int] = None
    ignore_eos: bool = False
    guidance_scale: float = 1.0
    logits_processor: object = None
    num_beams: int = 1
    length_penalty: float = 1.0
    logprobs: bool = False

    def __post_init__(self):
        if not is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {self.max_new_tokens!r}")
        if not is_number(self.temperature) or not 0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if self.top_k is not None and (not is_int(self.top_k) or self.top_k < 1):
            raise ValueError(f"top_k must be None or an int >= 1, got {self.top_k!r}")
        if not is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not is_number(self.repetition_penalty) or not 0 < self.repetition_penalty < math.inf:
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}")
        object.__setattr__(self, "stop", check_stop(self.stop))
        if self.seed is not None and not is_int(self.seed):
            raise ValueError(f"seed must be None or an int, got {self.seed!r}")
        for name in ("ignore_eos", "logprobs"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if not is_number(self.guidance_scale) or not math.isfinite(self.guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number, got {self.guidance_scale!r}")
        processor = self.logits_processor
        if processor is not None and not all(callable(getattr(processor, m, None))
                                             for m in ("reset", "mask", "advance")):
            raise ValueError("logits_processor must have reset(batch_size), mask(logits, rows) and "
                             f"advance(row, token_id) methods, got {type(processor).__name__}")
        self.check_beams()

    def check_beams(self):
        if not is_int(self.num_beams) or self.num_beams < 1:
            raise ValueError(f"num_beams must be an int >= 1, got {self.num_beams!r}")
        if not is_number(self.length_penalty) or not math.isfinite(self.length_penalty):
            raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty!r}")
        if self.num_beams == 1:
            return
        # Beam search keeps the most probable sequences: a sampled, guided or penalised step has no such score.
        for name, value, off in (("temperature", self.temperature, 0.0), ("guidance_scale", self.guidance_scale, 1.0),
                                 ("repetition_penalty", self.repetition_penalty, 1.0)):
            if value != off:
                raise ValueError(f"num_beams={self.num_beams} decodes by beam search, which needs {name}={off} "
                                 f"(got {value!r})")
        if self.logits_processor is not None and not callable(getattr(self.logits_processor, "reorder", None)):
            raise ValueError(f"num_beams={self.num_beams}: the logits_processor needs a reorder(rows, sources) method "
                             f"to copy a beam's state to its children (cancerllm/beam.py), "
                             f"{type(self.logits_processor).__name__} has none")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_stop(stop) -> tuple:
    """Stop strings as a tuple: None, a string, or a list/tuple of non-empty strings."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise ValueError(f"stop must be None, a string or a list of strings, got {stop!r:.80}")
    if any(s == "" for s in stop):
        raise ValueError("stop strings must not be empty")
    return tuple(stop)


def sampling_params(sampling: Optional[SamplingParams], options: dict) -> SamplingParams:
    """A call's SamplingParams: `sampling` with the keyword `options` replacing its fields, or built from them."""
    if sampling is None:
        return SamplingParams(**options)
    if not isinstance(sampling, SamplingParams):
        raise TypeError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
    return dataclasses.replace(sampling, **options)


# ---------------------------------------------------------------------------------------------- sampling

def penalize_repeats(logits, seen, penalty: float) -> None:
    """Hugging Face's repetition penalty, in place: logits [n, V], seen [n, V] bool."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    torch.where(seen, penalized, logits, out=logits)


def sample(logits, sampling: SamplingParams, rng: torch.Generator):
    """Next token ids [n] from fp32 logits [n, V] (modified in place), without a host sync."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    logits /= sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[:, -1:]
        logits.masked_fill_(logits < kth, -math.inf)
    if sampling.top_p < 1:
        # Keep the smallest set of most likely tokens whose probability reaches top_p (at least one).
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= sampling.top_p
        logits.scatter_(1, order, sorted_logits.masked_fill(outside, -math.inf))
    probs = logits.softmax(dim=-1)
    noise = torch.empty_like(probs).exponential_(generator=rng)
    return (probs / noise).argmax(dim=-1)   # argmax of p / Exp(1) is a draw from p


# ---------------------------------------------------------------------------------------------- text

def first_stop(text: str, stop: tuple) -> Optional[int]:
    """Where the first of the stop strings found in `text` begins, or None."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else None


class IncrementalText:
    """The text of a growing token sequence, cut at the first stop string, handed out piece by piece.

    The whole sequence is decoded at each token, because sentencepiece pieces cannot be decoded one by one (byte
    pieces combine into characters; the first piece loses its leading space). `take()` returns only text that can
    no longer change: a trailing unfinished multi-byte character (decoded as U+FFFD for now) and a tail that may
    still grow into a stop string are held back until resolved.
    """

    def __init__(self, tokenizer, stop: tuple):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids = []
        self.text = ""
        self.stopped = False
        self.shown = 0        # characters of text already handed out

    def push(self, token: int) -> bool:
        """Append a token; True when the text now contains a stop string (the text is then cut before it)."""
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids)
        cut = first_stop(self.text, self.stop)
        if cut is not None:
            self.text = self.text[:cut]
            self.stopped = True
        return self.stopped

    def take(self, final: bool = False) -> str:
        """The text not handed out yet that is safe to show; all of it when `final`."""
        end = len(self.text) if final or self.stopped else self.stable_end()
        piece = self.text[self.shown:end]
        self.shown = max(self.shown, end)
        return piece

    def stable_end(self) -> int:
        end = len(self.text.rstrip("\ufffd"))
        held = max((k for s in self.stop for k in range(1, min(len(s), end + 1))
                    if self.text.endswith(s[:k], 0, end)), default=0)
        return end - held


@dataclass
class Row:
    """One prompt's state during a call."""
    prompt: list
    budget: int                               # new tokens allowed: max_new_tokens, capped by max_seq_len
    text: Optional[IncrementalText] = None    # kept up to date when stop strings or streaming need it
    tokens: list = field(default_factory=list)
    logprobs: Optional[list] = None   # each new token's log-probability, when SamplingParams.logprobs asks for them
    finish_reason: Optional[str] = None
    prefill_end: float = 0.0
    finished_at: float = 0.0

    def push(self, token: int, stop_ids: tuple, logprob: Optional[float] = None) -> None:
        self.tokens.append(token)
        if self.logprobs is not None:
            self.logprobs.append(logprob)
        if token in stop_ids:
            self.finish_reason = "eos"
        elif self.text is not None and self.text.push(token):
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.budget:
            self.finish_reason = "length"
        if self.finish_reason is not None:
            self.finished_at = time.perf_counter()


# ---------------------------------------------------------------------------------------------- generator

def check_members(model) -> list:
    """A model, or an ensemble's list of models, as a list; members must share vocabulary, device and dtype."""
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    if not models or not all(isinstance(m, Transformer) for m in models):
        raise ValueError(f"model must be a Transformer or a non-empty list of them, got {model!r:.80}")
    first = models[0]
    for i, m in enumerate(models[1:], 1):
        if m.args.vocab_size != first.args.vocab_size:
            raise ValueError(f"model[{i}] has vocab_size {m.args.vocab_size}, model[0] {first.args.vocab_size}: an "
                             "ensemble's members must share one vocabulary")
        w, w0 = m.lm_head.weight, first.lm_head.weight
        if (w.device, w.dtype) != (w0.device, w0.dtype):
            raise ValueError(f"model[{i}] is on {w.device} in {w.dtype}, model[0] on {w0.device} in {w0.dtype}")
    return [m.eval() for m in models]


def tensor_versions(model) -> list:
    """Each parameter and buffer with its version counter and storage: changes when one is replaced or modified."""
    return [(t, t._version, t.data_ptr()) for t in (*model.parameters(), *model.buffers())]


def versions_differ(now: list, then: list) -> bool:
    return len(now) != len(then) or any(t is not t0 or version != v0 or ptr != p0
                                        for (t, version, ptr), (t0, v0, p0) in zip(now, then))


class Generator:
    """A model (or an ensemble: a list of models with one vocabulary) and its tokenizer, ready to generate. See the
    module docstring for how a call runs.

    prefill_chunk: prompt tokens per prefill forward pass (bounds prefill activation memory).
    onednn: on CPU in fp32 or bf16, True runs the matmuls on oneDNN with prepacked weights, False on F.linear, None
        (the default) each weight shape on whichever this machine measured faster (cancerllm/decode_paths.py).
    quantize: None (weights in the model's dtype) or "int8": weight-only int8 with a bf16 scale per output row,
        multiplied with the activations rounded to bf16 (fp32 sums); norms, attention and the KV cache stay in the
        model's dtype (CPU; every matmul's input width must be a multiple of 16, else ValueError).
    batch_invariant: whether a prompt's logits, and so its greedy tokens, are the same bits whatever other prompts
        share its call (a helper answering one report gives the answer a batched eval gave): every decode step on
        our row kernels, whose per-row sums do not depend on the batch, instead of the kernel each batch size ran
        fastest (decode_paths.py; in bf16 within the noise, in fp32 ~20% of decoding speed at batch 16 where the
        library beat our fp32 kernel: docs/experiments.md). None (the default): on
        where those kernels run (CPU, fp32 or bf16 or int8 weights, cancerllm._C built), else off; True: on,
        ValueError where they cannot run; False: off. `self.batch_invariant` says which holds. Sampled draws still
        depend on the batch.

    Weights: the Generator decodes with each model's decoding form (fuse_for_decoding in model.py), a snapshot of its
    weights that leaves the model itself untouched, so a model still being trained can be sampled from. Before each
    call it checks the models' parameters and buffers (identity, version counter, storage) and rebuilds the forms
    when any was replaced or modified in place (an optimizer step, load_state_dict, model.to(...)), so edits to the
    model are always seen; writes the version counters miss (through `.data`) need an explicit `refresh()`.
    """

    def __init__(self, model, tokenizer: TokenizerBase, *, prefill_chunk: int = 512, onednn: Optional[bool] = None,
                 quantize: Optional[str] = None, batch_invariant: Optional[bool] = None):
        if not isinstance(prefill_chunk, int) or prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be an int >= 1, got {prefill_chunk!r}")
        if onednn not in (None, True, False):
            raise ValueError(f"onednn must be None (measure), True or False, got {onednn!r}")
        if quantize not in QUANTIZE:
            raise ValueError(f"quantize must be one of {', '.join(map(repr, QUANTIZE))}, got {quantize!r}")
        if batch_invariant not in (None, True, False):
            raise ValueError(f"batch_invariant must be None (where possible), True or False, got {batch_invariant!r}")
        self.models = check_members(model)
        tokenizer.check_fits(self.models[0].args.vocab_size)
        self.model = self.models[0]
        self.tokenizer = tokenizer
        self.args = self.model.args
        self.max_seq_len = min(m.args.max_seq_len for m in self.models)
        self.prefill_chunk = prefill_chunk
        self.onednn, self.quantize, self.batch_invariant_option = onednn, quantize, batch_invariant
        self.lock = threading.Lock()
        self.holder = None   # (thread id, call) while a call holds the lock; see claim()
        # How the checkpoint's training data was prompted (tasks.prompts.PromptSettings), read by the task helpers;
        # from_pretrained sets it from the checkpoint, a Generator built from a model in memory has none.
        self.prompt_settings = None
        # The checkpoint's calibrated abstention thresholds (tasks/abstention.py), read by extract_phenotypes; set by
        # from_pretrained from a single checkpoint's abstention.json (an ensemble's scores are not its members').
        self.abstention = None
        self.refresh()

    def refresh(self) -> None:
        """Rebuild the models' decoding forms from their current weights (see the class docstring)."""
        weight = self.model.lm_head.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.versions = [tensor_versions(m) for m in self.models]
        self.batch_invariant = self.batch_invariant_option is True or (
            self.batch_invariant_option is None and not any(batch_invariance_blocker(m, self.quantize)
                                                            for m in self.models))
        self.decode_models = [fuse_for_decoding(m, onednn=self.onednn, quantize=self.quantize,
                                                batch_invariant=self.batch_invariant) for m in self.models]

    def refresh_if_changed(self) -> None:
        """refresh() when a model's weights changed since the decoding forms were made."""
        if any(versions_differ(tensor_versions(m), then) for m, then in zip(self.models, self.versions)):
            self.refresh()

    @classmethod
    def from_pretrained(cls, path, *, device="cpu", dtype=None, **options) -> "Generator":
        """Load a training export or a Hugging Face checkpoint directory (config.json, safetensors weights, and
        tokenizer.model or tokenizer.json); a list of directories loads an ensemble, whose tokenizers must be
        identical. dtype: None (the checkpoint's), a dtype or its name, or "fastest" (decoding_dtype)."""
        paths = [Path(p) for p in path] if isinstance(path, (list, tuple)) else [Path(path)]
        if not paths:
            raise ValueError("from_pretrained: an empty list of checkpoint directories")
        dtype = decoding_dtype(dtype, paths[0], device)
        tokenizer = open_tokenizer(paths[0])
        for other in map(open_tokenizer, paths[1:]):
            if other.fingerprint() != tokenizer.fingerprint():
                raise ValueError(f"{other.path} differs from {tokenizer.path}: an ensemble's members must share one "
                                 "tokenizer")
        models = [Transformer.from_pretrained(p, device=device, dtype=dtype) for p in paths]
        for model in models:   # its own: its weights can move into the layout decoding reads fastest
            pack_weights(model)
        settings = [load_prompt_settings(p) for p in paths]
        for other, member in zip(paths[1:], settings[1:]):
            if member != settings[0]:
                raise ValueError(f"{other} was prompted differently from {paths[0]} ({SETTINGS_FILE}): an ensemble's "
                                 "members must share their prompt settings")
        generator = cls(models if len(models) > 1 else models[0], tokenizer, **options)
        generator.prompt_settings = settings[0]
        generator.abstention = load_abstention(paths[0]) if len(paths) == 1 else None
        return generator

    def generate(self, prompts, sampling: Optional[SamplingParams] = None, *, negative_prompts=None,
                 **options) -> list:
        """One GenerationResult per prompt (a string, or a list of token ids used as given). Decoding options:
        `sampling`, a SamplingParams, and/or its fields as keywords (max_new_tokens=..., temperature=..., ...), which
        replace the object's. `negative_prompts` (one per prompt, strings or token ids): the unconditional prompts
        of classifier-free guidance (module docstring)."""
        params = sampling_params(sampling, options)
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError(f"prompts must be a non-empty list of prompts, got {prompts!r:.80}")
        if params.num_beams > 1:
            return self.beam_search(prompts, params, negative_prompts)
        with self.claim("generate()"):
            rows, steps = self.start(prompts, params, negative_prompts, track_text=False)
            collections.deque(steps, maxlen=0)   # run every decode step; generate() needs no per-step text
        return [self.result(row, steps.prefill_s) for row in rows]

    def stream(self, prompt, sampling: Optional[SamplingParams] = None, *, negative_prompt=None,
               **options) -> Iterator[str]:
        """Yield the text of one prompt's continuation piece by piece, as generate() would return it whole. The
        stream holds the Generator from its first piece until exhausted or closed (`close()`)."""
        params = sampling_params(sampling, options)
        if params.num_beams > 1:
            raise ValueError(f"num_beams={params.num_beams}: stream() hands out one sequence as it grows, and beam "
                             "search knows its answer only at the end; use generate()")
        with self.claim("stream()"):
            rows, steps = self.start([prompt], params, None if negative_prompt is None else [negative_prompt],
                                     track_text=True)
            text = rows[0].text
            for _ in steps:
                piece = text.take(final=rows[0].finish_reason is not None)
                if piece:
                    yield piece

    def extract_phenotypes(self, report: str, **options) -> dict:
        """{field: value or None} for a pathology report, decoded under the JSON schema (cancerllm/tasks/api.py)."""
        from .tasks.api import extract_phenotypes
        return extract_phenotypes(self, report, **options)

    def generate_diagnosis(self, report: str, **options) -> str:
        """A one-line diagnosis statement for a pathology report (cancerllm/tasks/api.py)."""
        from .tasks.api import generate_diagnosis
        return generate_diagnosis(self, report, **options)

    # ------------------------------------------------------------------------------------------ internals

    def beam_search(self, prompts, params: SamplingParams, negative_prompts) -> list:
        from .beam import BeamSearch
        if negative_prompts is not None:
            raise ValueError("negative_prompts belong to classifier-free guidance, which beam search does not do")
        with self.claim("generate()"):
            self.refresh_if_changed()
            prompt_ids = [self.prompt_ids(prompt, f"prompts[{i}]") for i, prompt in enumerate(prompts)]
            return BeamSearch(self, prompt_ids, params).run()

    @contextlib.contextmanager
    def claim(self, call: str):
        """Hold the lock for `call`. The thread that holds it already would wait for itself forever: refuse."""
        holder = self.holder
        if holder is not None and holder[0] == threading.get_ident():
            raise RuntimeError(
                f"{call} while this thread's {holder[1]} still holds this Generator: a stream holds it until "
                "it is read to the end or closed (call its close()), and a logits processor cannot call back into "
                "the Generator; or use a second Generator")
        with self.lock:
            self.holder = (threading.get_ident(), call)
            try:
                yield
            finally:
                self.holder = None

    def start(self, prompts, params: SamplingParams, negative_prompts, track_text: bool):
        """Check the prompts and set up the rows; returns (rows, an iterator of decode steps)."""
        self.refresh_if_changed()
        prompt_ids = [self.prompt_ids(prompt, f"prompts[{i}]") for i, prompt in enumerate(prompts)]
        negatives = self.negative_ids(params.guidance_scale, negative_prompts, prompt_ids)
        rows = []
        for i, ids in enumerate(prompt_ids):
            longest = max(len(ids), len(negatives[i]) if negatives else 0)
            budget = min(params.max_new_tokens, self.max_seq_len - longest)
            text = IncrementalText(self.tokenizer, params.stop) if params.stop or track_text else None
            rows.append(Row(ids, budget, text, logprobs=[] if params.logprobs else None))
        guidance = Guidance(float(params.guidance_scale), negatives) if negatives else None
        return rows, DecodeSteps(self, rows, params, guidance)

    def negative_ids(self, guidance_scale, negative_prompts, prompt_ids: list):
        """The unconditional rows' token ids, one list per prompt, or None when guidance is off."""
        if guidance_scale == 1:
            if negative_prompts is not None:
                raise ValueError("negative_prompts need guidance_scale != 1 (at 1 guidance is off)")
            return None
        if negative_prompts is None:
            return [ids[-1:] for ids in prompt_ids]   # transformers' default: the prompt's last token
        if not isinstance(negative_prompts, (list, tuple)) or len(negative_prompts) != len(prompt_ids):
            raise ValueError(f"negative_prompts must be a list with one entry per prompt ({len(prompt_ids)}), "
                             f"got {negative_prompts!r:.80}")
        return [self.prompt_ids(p, f"negative_prompts[{i}]") for i, p in enumerate(negative_prompts)]

    def prompt_ids(self, prompt, name: str) -> list:
        """A prompt's token ids; `name` says which argument it is in errors."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, bos=True)
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
        else:
            raise ValueError(f"{name} must be a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError(f"{name} is empty")
        if not all(0 <= t < self.args.vocab_size for t in ids):
            raise ValueError(f"{name} has token ids outside [0, {self.args.vocab_size})")
        if len(ids) >= self.max_seq_len:
            raise ValueError(f"{name} has {len(ids)} tokens, but the model's context (max_seq_len="
                             f"{self.max_seq_len}) leaves no room for a new token")
        return ids

    def new_caches(self, batch: int, max_len: int) -> list:
        """One KV cache per member for `batch` rows of at most `max_len` positions."""
        return [KVCache.for_model(m.args, batch, max_len, dtype=self.dtype, device=self.device) for m in self.models]

    def forward(self, tokens, positions, caches: list, rows: slice):
        """fp32 scores [n, V] of the last position of each row's tokens [n, T]: the model's logits, or an
        ensemble's log mean probability."""
        scores = []
        for model, cache in zip(self.decode_models, caches):
            cache.begin(rows, positions)
            scores.append(model(tokens, positions, cache=cache, last_only=True)[:, -1].float())
        if len(scores) == 1:
            return scores[0]
        return torch.stack(scores).log_softmax(dim=-1).logsumexp(dim=0) - math.log(len(scores))

    def prefill(self, caches: list, row: int, prompt: list):
        """Run one prompt into its row of the caches, chunk by chunk; its last position's scores [1, V]."""
        ids = torch.tensor([prompt], device=self.device)
        for start in range(0, len(prompt), self.prefill_chunk):
            chunk = ids[:, start:start + self.prefill_chunk]
            positions = torch.arange(start, start + chunk.shape[1], device=self.device)[None]
            logits = self.forward(chunk, positions, caches, slice(row, row + 1))
        return logits

    def result(self, row: Row, prefill_s: float) -> GenerationResult:
        # The EOS token ends the text without being part of it (a tokenizer.json decodes it as "<|im_end|>").
        spoken = row.tokens[:-1] if row.finish_reason == "eos" else row.tokens
        text = row.text.text if row.text is not None else self.tokenizer.decode(spoken)
        decode_s = max(row.finished_at - row.prefill_end, 0.0) if row.tokens else 0.0
        return GenerationResult(text, row.tokens, row.finish_reason or "length", len(row.prompt), prefill_s,
                                decode_s, row.logprobs)


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance: its scale and each prompt's unconditional (negative) prompt ids."""
    scale: float
    negatives: list

    def combine(self, logits):
        """Guided scores [n, V] from the logits [2n, V] of n conditional rows followed by their unconditional rows."""
        n = logits.shape[0] // 2
        cond, uncond = logits[:n].log_softmax(dim=-1), logits[n:].log_softmax(dim=-1)
        return uncond.add_(cond.sub_(uncond), alpha=self.scale)


class DecodeSteps:
    """Iterating runs a call: the prefill, then one decode step per iteration, yielding after each step (the rows'
    tokens, text and finish reasons are up to date).

    With guidance the batch holds the n active conditional rows, then their n unconditional rows in the same
    order; both halves are fed the same tokens and leave the batch together."""

    def __init__(self, gen: Generator, rows: list, sampling: SamplingParams, guidance: Optional[Guidance] = None):
        self.gen, self.rows, self.sampling, self.guidance = gen, rows, sampling, guidance
        self.processor = sampling.logits_processor
        self.stop_ids = () if sampling.ignore_eos else gen.tokenizer.stop_ids
        seed = secrets.randbits(63) if sampling.seed is None else sampling.seed
        self.rng = torch.Generator(gen.device).manual_seed(seed)
        self.prefill_s = 0.0

    def __iter__(self):
        gen, rows, guided = self.gen, self.rows, self.guidance is not None
        if all(row.budget == 0 for row in rows):
            return
        device = gen.device
        prompts = [row.prompt for row in rows] + (self.guidance.negatives if guided else [])
        budgets = [row.budget for row in rows] * (2 if guided else 1)
        max_len = max(len(prompt) + budget for prompt, budget in zip(prompts, budgets))
        caches = gen.new_caches(len(prompts), max_len)
        seen = self.seen_tokens() if self.sampling.repetition_penalty != 1 else None
        if self.processor is not None:
            self.processor.reset(len(rows))
        start = time.perf_counter()
        with torch.inference_mode():
            logits = torch.cat([gen.prefill(caches, i, prompt) for i, prompt in enumerate(prompts)])
            positions = torch.tensor([[len(prompt)] for prompt in prompts], device=device)   # of the next token
        active = list(range(len(rows)))   # prompt index of each (conditional) batch row
        self.prefill_s = time.perf_counter() - start
        for row in rows:
            row.prefill_end = start + self.prefill_s
        while True:
            with torch.inference_mode():
                tokens, logprobs = self.pick(logits, active, seen)
                picked = torch.stack([tokens.double(), logprobs]).tolist() if logprobs is not None else \
                    [tokens.tolist(), [None] * len(active)]   # the step's one host sync
            for index, token, logprob in zip(active, *picked):
                token = int(token)
                rows[index].push(token, self.stop_ids, logprob)
                if self.processor is not None:
                    self.processor.advance(index, token)
            yield
            keep = [i for i, index in enumerate(active) if rows[index].finish_reason is None]
            if not keep:
                return
            with torch.inference_mode():
                if len(keep) < len(active):   # compact: finished rows leave the batch and the cache
                    keep_t = torch.tensor(keep, device=device)
                    cache_rows = torch.cat([keep_t, keep_t + len(active)]) if guided else keep_t
                    for cache in caches:
                        cache.keep_rows(cache_rows)
                    tokens, positions = tokens[keep_t], positions[cache_rows]
                    seen = seen[keep_t] if seen is not None else None
                    active = [active[i] for i in keep]
                fed = torch.cat([tokens, tokens]) if guided else tokens
                logits = gen.forward(fed[:, None], positions, caches, slice(0, len(fed)))
                positions += 1

    def pick(self, logits, active: list, seen):
        """The next token of each active row [n] and, when asked for, its log-probability [n] (fp64, else None);
        `seen` learns the tokens."""
        if self.guidance is not None:
            logits = self.guidance.combine(logits)
        logprobs = logits.log_softmax(dim=-1) if self.sampling.logprobs else None   # before anything edits logits
        if seen is not None:
            penalize_repeats(logits, seen, self.sampling.repetition_penalty)
        if self.processor is not None:
            self.processor.mask(logits, list(active))
        tokens = sample(logits, self.sampling, self.rng)
        if seen is not None:
            seen.scatter_(1, tokens[:, None], True)
        if logprobs is not None:
            logprobs = logprobs.gather(1, tokens[:, None])[:, 0].double()
        return tokens, logprobs

    def seen_tokens(self):
        seen = torch.zeros(len(self.rows), self.gen.args.vocab_size, dtype=torch.bool, device=self.gen.device)
        for i, row in enumerate(self.rows):
            seen[i, torch.tensor(row.prompt, device=self.gen.device)] = True
        return seen




# ---------------------------------------------------------------------------------------------- command line

def read_prompts(args, parser) -> list:
    """--prompt arguments, else --prompt-file (or stdin when neither is given): the whole text is one prompt,
    or one prompt per non-empty line with --lines."""
    if args.prompt:
        return args.prompt
    if args.prompt_file in (None, "-"):
        text = sys.stdin.read()
    else:
        try:
            text = Path(args.prompt_file).read_text()
        except OSError as e:
            parser.error(f"--prompt-file {args.prompt_file}: {e.strerror}")
    prompts = [line for line in text.splitlines() if line.strip()] if args.lines else [text]
    if not prompts or not any(p.strip() for p in prompts):
        parser.error(f"no prompt found in {args.prompt_file or 'stdin'}")
    return prompts


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m cancerllm.generate",
                                     description="Generate text from a cancerllm or Hugging Face Mistral checkpoint.")
    parser.add_argument("--model", required=True, nargs="+",
                        help="checkpoint directory (config.json, safetensors, tokenizer); several: an ensemble")
    parser.add_argument("--prompt", action="append", help="a prompt; repeat for a batch")
    parser.add_argument("--prompt-file", help="read the prompt(s) from this file ('-': stdin, the default)")
    parser.add_argument("--lines", action="store_true", help="one prompt per non-empty line of the file or stdin")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--stop", action="append", help="a stop string; repeatable")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--guidance-scale", type=float, default=1.0, help="classifier-free guidance (1: off)")
    parser.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (1: off)")
    parser.add_argument("--length-penalty", type=float, default=1.0,
                        help="beam search: a hypothesis scores log-probability / length ** this")
    parser.add_argument("--logprobs", action="store_true",
                        help="--jsonl: add each new token's log-probability (the model's, before any processing)")
    parser.add_argument("--negative-prompt", action="append",
                        help="the unconditional prompt for guidance; one per prompt (default: its last token)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16 or fastest (the faster of bf16 and "
                        "fp32 on this machine); default: the checkpoint's")
    parser.add_argument("--prefill-chunk", type=int, default=512)
    parser.add_argument("--no-onednn", action="store_true",
                        help="keep F.linear on CPU (default: per weight shape the path this machine runs faster)")
    parser.add_argument("--quantize", choices=[q for q in QUANTIZE if q], default=None,
                        help="int8: weight-only int8 matmuls, a scale per output row (CPU)")
    parser.add_argument("--jsonl", action="store_true", help="print one JSON object per result")
    args = parser.parse_args(argv)
    prompts = read_prompts(args, parser)
    try:
        sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                  top_p=args.top_p, repetition_penalty=args.repetition_penalty, stop=args.stop,
                                  seed=args.seed, guidance_scale=args.guidance_scale, num_beams=args.num_beams,
                                  length_penalty=args.length_penalty, logprobs=args.logprobs)
    except ValueError as e:   # the message names the option; its flag is --the-same-name
        parser.error(str(e))
    gen = Generator.from_pretrained(args.model, device=args.device, dtype=args.dtype,
                                    prefill_chunk=args.prefill_chunk, onednn=False if args.no_onednn else None,
                                    quantize=args.quantize)
    results = gen.generate(prompts, sampling, negative_prompts=args.negative_prompt)
    for i, r in enumerate(results):
        if args.jsonl:
            print(json.dumps({"text": r.text, "token_ids": r.token_ids, "finish_reason": r.finish_reason,
                              **({"logprobs": r.logprobs} if args.logprobs else {})}))
        else:
            print(("---\n" if i else "") + r.text)
    print_speed(results)


def print_speed(results: list) -> None:
    """Tokens/s on stderr: prefill (prompt tokens, which also yield each row's first new token) and decode."""
    prompt_tokens = sum(r.prompt_tokens for r in results)
    decoded = sum(max(len(r.token_ids) - 1, 0) for r in results)
    prefill_s, decode_s = results[0].prefill_s, max(r.decode_s for r in results)
    print(f"{len(results)} prompt(s): prefill {prompt_tokens} tokens in {prefill_s:.3f} s "
          f"({prompt_tokens / max(prefill_s, 1e-9):.1f} tok/s); decode {decoded} tokens in {decode_s:.3f} s "
          f"({decoded / max(decode_s, 1e-9):.1f} tok/s)", file=sys.stderr)


if __name__ == "__main__":
    main()

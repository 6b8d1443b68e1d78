"""Constrained decoding for the phenotype tasks, as logits processors for cancerllm.Generator: the JSON answer under
the phenotype schema, and a question's answer restricted to its field's values or "not mentioned".

Why xgrammar rather than our own state machine: masking a 32k sentencepiece vocabulary against a JSON schema means
knowing, per step, which token strings (with byte-fallback pieces, '▁' spaces and multi-character merges) keep the
output a prefix of some valid document. xgrammar compiles the schema into a pushdown automaton and precomputes
per-state token masks in C++, so a step costs microseconds; a hand-written Python walk over the vocabulary would
cost tens of milliseconds per row per step and would be one more parser to get right. It installs beside the
pinned torch (it needs torch>=1.10 and transformers, both present) and is maintained by the MLC/SGLang authors.

The grammar is fields.json_schema() with no free whitespace, so keys come in FIELDS order with json.dumps's
separators: exactly the form the SFT completions were written in (prompts.json_answer), plus one optional leading
space, because sentencepiece encodes a completion with its dummy prefix ('▁{"'), the token a trained model
expects to emit first. With the fields the registry records per cancer type (PromptSettings.recorded_fields) the
schema is one object per type, told apart by the cancer type the answer names first. A question about a categorical
field is answered the same way, from a grammar whose root is the choice between the field's allowed values and the
not-mentioned answer.
"""
import json

import torch

from . import extra  # noqa: F401  (names the `tasks` extra when xgrammar is missing)
import xgrammar as xgr  # noqa: E402

from .fields import ALLOWED, json_schema


def optional_space(body: xgr.Grammar) -> xgr.Grammar:
    # sentencepiece encodes a completion with its dummy prefix, so a trained model's first token starts with '▁'.
    return xgr.Grammar.concat(xgr.Grammar.from_ebnf('root ::= " " | ""'), body)


def choice_grammar(choices) -> xgr.Grammar:
    """Exactly one of the strings `choices`."""
    if not choices:
        raise ValueError("choice_grammar needs at least one choice")
    return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c) for c in choices))


def spelling(tokenizer) -> tuple:
    """How the vocabulary's pieces spell text, which the grammar engine must know to read them: sentencepiece's
    byte-fallback pieces with a leading "▁" added before the text, or a byte-level BPE's printable alphabet of the
    256 bytes (GPT-2's, as tokenizer.json's ByteLevel decoder says) with nothing added."""
    from ..tokenizer import JsonTokenizer
    if not isinstance(tokenizer, JsonTokenizer):
        return xgr.VocabType.BYTE_FALLBACK, True
    decoder = json.loads(tokenizer.backend.to_str()).get("decoder") or {}
    kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders") or []}
    if "ByteLevel" not in kinds:
        raise ValueError(f"{tokenizer.path}: constrained decoding reads sentencepiece and byte-level BPE vocabularies; "
                         f"this tokenizer's decoder is {decoder.get('type')!r}")
    return xgr.VocabType.BYTE_LEVEL, False


class GrammarProcessor:
    """reset(batch_size) / mask(logits, rows) / advance(row, token_id), the Generator's logits-processor protocol,
    and reorder(rows, sources) for beam search: every row's output is kept a prefix of a sentence of `grammar`
    (then only the stop token is allowed).

    tokenizer: cancerllm.Tokenizer; vocab_size: the model's logits width (>= the tokenizer's pieces)."""

    def __init__(self, tokenizer, grammar: xgr.Grammar, vocab_size: int = None):
        self.vocab_size = vocab_size or tokenizer.vocab_size
        if self.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"vocab_size={self.vocab_size} is smaller than the tokenizer's "
                             f"{tokenizer.vocab_size} pieces")
        pieces = [tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size)]
        vocab_type, add_prefix_space = spelling(tokenizer)
        info = xgr.TokenizerInfo(pieces, vocab_type=vocab_type, vocab_size=self.vocab_size,
                                 stop_token_ids=[tokenizer.eos_id], add_prefix_space=add_prefix_space)
        self.grammar = xgr.GrammarCompiler(info).compile_grammar(grammar)
        self.matchers, self.bitmask = [], None

    def reset(self, batch_size: int):
        self.matchers = [xgr.GrammarMatcher(self.grammar) for _ in range(batch_size)]
        self.bitmask = xgr.allocate_token_bitmask(batch_size, self.vocab_size)

    def mask(self, logits: torch.Tensor, rows) -> None:
        if logits.shape[1] != self.vocab_size:
            raise ValueError(f"logits have {logits.shape[1]} columns, the processor was built for {self.vocab_size}")
        for i, row in enumerate(rows):
            self.matchers[row].fill_next_token_bitmask(self.bitmask, i)
        xgr.apply_token_bitmask_inplace(logits, self.bitmask[:len(rows)].to(logits.device))

    def reorder(self, rows, sources) -> None:
        """Beam search: row rows[i] continues from the state row sources[i] has now."""
        taken, matchers = set(), list(self.matchers)
        for row, source in zip(rows, sources):
            # The first child takes its parent's matcher, every further child a copy of it.
            matchers[row] = self.matchers[source].fork() if source in taken else self.matchers[source]
            taken.add(source)
        self.matchers = matchers

    def advance(self, row: int, token_id: int) -> None:
        matcher = self.matchers[row]
        if matcher.is_terminated():       # the answer is complete; only the stop token was allowed
            return
        if not matcher.accept_token(token_id):
            raise RuntimeError(f"row {row}: token {token_id} breaks the grammar although it was masked in")


class JsonSchemaProcessor(GrammarProcessor):
    """The phenotype object (fields.json_schema() unless `schema` is given), keys in order, no free whitespace."""

    def __init__(self, tokenizer, schema: dict = None, vocab_size: int = None):
        body = xgr.Grammar.from_json_schema(json.dumps(schema or json_schema()), any_whitespace=False,
                                            strict_mode=True)
        super().__init__(tokenizer, optional_space(body), vocab_size)


class ChoiceProcessor(GrammarProcessor):
    """One of `choices`, e.g. a categorical field's allowed values and the not-mentioned answer."""

    def __init__(self, tokenizer, choices, vocab_size: int = None):
        super().__init__(tokenizer, optional_space(choice_grammar(choices)), vocab_size)


class TaskProcessors:
    """The task answers' processors for one tokenizer and logits width, each compiled on first use and kept:
    compiling a grammar costs far more than decoding a short answer, and a processor is reset per batch."""

    def __init__(self, tokenizer, vocab_size: int = None):
        self.tokenizer, self.vocab_size, self.compiled = tokenizer, vocab_size, {}

    def json(self, recorded_fields: dict = None) -> JsonSchemaProcessor:
        """The phenotype object under the schema; with `recorded_fields` (PromptSettings.recorded_fields), under
        the schema of the fields the registry records for the cancer type the answer names first."""
        key = ("json", json.dumps(recorded_fields, sort_keys=True))
        if key not in self.compiled:
            self.compiled[key] = JsonSchemaProcessor(self.tokenizer, json_schema(recorded_fields), self.vocab_size)
        return self.compiled[key]

    def answer(self, field: str, not_mentioned: str):
        """For a question about a categorical field: its allowed values or the not-mentioned answer, and nothing
        else. None for the free-text fields (primary site, histology)."""
        if field not in ALLOWED:
            return None
        choices = (*ALLOWED[field], not_mentioned)
        if choices not in self.compiled:
            self.compiled[choices] = ChoiceProcessor(self.tokenizer, choices, self.vocab_size)
        return self.compiled[choices]

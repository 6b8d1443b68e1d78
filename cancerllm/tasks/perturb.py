"""Robustness perturbations of a report, each seeded and deterministic (the same text, seed and key give the same
output on every run and machine: random.Random seeded with a string is).

- misspell: each word of three or more letters is, with probability `rate`, given one character edit (deletion,
  insertion, substitution or transposition of neighbours). Values are left alone: words with digits (pT2, 3+4)
  and short all-capital words (IIA, ER, HER).
- ocr: each character is, with probability `rate`, replaced by a typical OCR confusion (l->1, O->0, m->rn, ...,
  a space dropped, a period read as a comma).
- counterfactual: one value the report states for a field (found by mentions.py's patterns, and equal to
  the gold) is rewritten at every mention to another valid value, and the gold changes with it: a model that
  reads the text should follow the edit.
"""
import random
import re
import string

from .fields import normalize_value
from .mentions import PATTERNS, find_mentions

OCR_CONFUSIONS = {"l": "1", "I": "l", "O": "0", "o": "0", "S": "5", "s": "5", "e": "c", "c": "e", "m": "rn",
                  "n": "ri", "B": "8", "g": "q", "i": "l", "a": "o", "t": "f", " ": "", ".": ","}
WORD = re.compile(r"\b(?![A-Z]{1,4}\b)[A-Za-z]{3,}\b")


def rng_for(seed: int, key: str) -> random.Random:
    return random.Random(f"{seed}:{key}")


def check_rate(rate: float):
    if not 0 <= rate <= 1:
        raise ValueError(f"perturbation rate must be in [0, 1], got {rate}")


def edit_word(word: str, rng: random.Random) -> str:
    i = rng.randrange(len(word))
    kind = rng.choice(("delete", "insert", "substitute", "transpose"))
    letter = rng.choice(string.ascii_lowercase)
    if kind == "delete":
        return word[:i] + word[i + 1:]
    if kind == "insert":
        return word[:i] + letter + word[i:]
    if kind == "substitute":
        return word[:i] + letter + word[i + 1:]
    i = min(i, len(word) - 2)
    return word[:i] + word[i + 1] + word[i] + word[i + 2:]


def misspell(text: str, rate: float, seed: int = 0, key: str = "") -> str:
    check_rate(rate)
    rng = rng_for(seed, key)
    return WORD.sub(lambda m: edit_word(m.group(0), rng) if rng.random() < rate else m.group(0), text)


def ocr_noise(text: str, rate: float, seed: int = 0, key: str = "") -> str:
    check_rate(rate)
    rng = rng_for(seed, key)
    return "".join(OCR_CONFUSIONS[c] if c in OCR_CONFUSIONS and rng.random() < rate else c for c in text)


def match_case(new: str, old: str) -> str:
    if old.isupper() and len(old) > 1 and new.isalpha():     # LEFT -> RIGHT, but NX -> N2a, not N2A
        return new.upper()
    return new[0].upper() + new[1:] if old[0].isupper() else new


def editable(field: str, gold_value, report: str):
    """(mentions stating the gold, the normalised values every one of them can be rewritten to), or None."""
    gold = normalize_value(field, gold_value)
    if gold is None:
        return None
    mentions = [m for m in find_mentions(field, report) if normalize_value(field, m.value) == gold]
    if not mentions:
        return None
    options = None
    for m in mentions:
        values = {normalize_value(field, m.pattern.canonical(s)) for s in m.pattern.spellings(m.surface)}
        options = values if options is None else options & values
    options.discard(gold)
    return (mentions, sorted(options)) if options else None


def rewrite(report: str, field: str, mentions, target: str):
    """The report with every mention of `field` rewritten to the normalised value `target` -> (report, new gold)."""
    new_value = None
    for m in sorted(mentions, key=lambda m: m.start, reverse=True):
        surface = next(s for s in m.pattern.spellings(m.surface)
                       if normalize_value(field, m.pattern.canonical(s)) == target)
        report = report[:m.start] + match_case(surface, report[m.start:m.end]) + report[m.end:]
        new_value = m.pattern.canonical(surface)
    return report, new_value


def counterfactual(report: str, fields: dict, seed: int = 0, key: str = ""):
    """-> (edited report, edited gold fields, the field edited), or None when no stated value can be edited."""
    rng = rng_for(seed, key)
    candidates = [(f, *found) for f in PATTERNS if (found := editable(f, fields.get(f), report))]
    if not candidates:
        return None
    field, mentions, options = rng.choice(candidates)
    report, new_value = rewrite(report, field, mentions, rng.choice(options))
    return report, {**fields, field: new_value}, field


def counterfactual_all(report: str, fields: dict, seed: int = 0, key: str = ""):
    """Every editable stated value rewritten at once (training augmentation: with the value drawn at random, only
    the text predicts the answer) -> (edited report, edited gold fields, the fields edited), or None."""
    rng = rng_for(seed, key)
    edited = []
    for field in PATTERNS:       # one field at a time: an edit shifts the offsets of the mentions after it
        found = editable(field, fields.get(field), report)
        if found:
            mentions, options = found
            report, new_value = rewrite(report, field, mentions, rng.choice(options))
            fields = {**fields, field: new_value}
            edited.append(field)
    return (report, fields, edited) if edited else None


PERTURBATIONS = ("misspell", "ocr", "counterfactual")

"""The study's metrics, and per-field scores on normalised values.

- Instance-averaged set F1 (CancerLLM): per instance, each predicted item takes its best match among the gold
  items (precision) and each gold item its best match among the predictions (recall); P, R and F1 are averaged
  over instances. Two match functions: `exact_match` (lower-case, punctuation removed, Porter-stemmed tokens equal)
  and `rouge1_match` (ROUGE-1 F with beta = 1.2, from rouge-score's precision and recall).
- Per-field precision, recall and F1 over normalised values (`normalize_value`: "pT2a" ~ "T2a", "Stage IIA" ~
  "IIA" ~ "stage 2A", "G2" ~ "Grade 2" ~ "moderately differentiated"), with micro and macro averages. A predicted
  value that differs from the gold counts as one false positive and one false negative; "not mentioned" is null.
- Diagnosis statements: token F1 and ROUGE-L F against the reference.
- Whether one system's field F1 beats another's beyond chance: a paired bootstrap over the records.
"""
import re
import string
from collections import Counter

import numpy as np
from nltk.stem.porter import PorterStemmer
from rouge_score import rouge_scorer

from .fields import CANCER_TYPES, FIELDS

NULL_ANSWERS = {"", "not mentioned", "null", "none"}
ROUGE_BETA = 1.2
_stemmer = PorterStemmer()
_scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
_punctuation = str.maketrans({c: " " for c in string.punctuation})


# ---------------------------------------------------------------------------------------------- study F1

def exact_tokens(text: str) -> list[str]:
    return [_stemmer.stem(w) for w in text.lower().translate(_punctuation).split()]


def exact_match(pred: str, gold: str) -> float:
    return float(exact_tokens(pred) == exact_tokens(gold))


def f_beta(p: float, r: float, beta: float = 1.0) -> float:
    b2 = beta * beta
    return (1 + b2) * p * r / (b2 * p + r) if p + r > 0 else 0.0


def rouge1_match(pred: str, gold: str) -> float:
    s = _scorer.score(gold, pred)["rouge1"]
    return f_beta(s.precision, s.recall, ROUGE_BETA)


MATCHES = {"exact": exact_match, "rouge1": rouge1_match}


def set_prf(pred_items, gold_items, match) -> tuple[float, float, float]:
    """P, R, F1 of one instance. Two empty sets agree fully; one empty set against a non-empty one scores 0."""
    if not pred_items or not gold_items:
        return (1.0, 1.0, 1.0) if not pred_items and not gold_items else (0.0, 0.0, 0.0)
    p = sum(max(match(x, g) for g in gold_items) for x in pred_items) / len(pred_items)
    r = sum(max(match(x, g) for x in pred_items) for g in gold_items) / len(gold_items)
    return p, r, f_beta(p, r)


def instance_f1(preds, golds, match="exact") -> dict:
    """Average of per-instance set P/R/F1; preds and golds are lists (one per instance) of item lists."""
    if len(preds) != len(golds):
        raise ValueError(f"instance_f1: {len(preds)} predictions for {len(golds)} gold instances")
    fn = MATCHES[match] if isinstance(match, str) else match
    scores = [set_prf(p, g, fn) for p, g in zip(preds, golds)]
    n = len(scores)
    mean = lambda i: sum(s[i] for s in scores) / n if n else 0.0
    return {"precision": mean(0), "recall": mean(1), "f1": mean(2), "n": n}


# ---------------------------------------------------------------------------------------------- normalisation

ROMAN = {"1": "i", "2": "ii", "3": "iii", "4": "iv"}
GRADE_WORDS = (("undifferentiated", "g4"), ("poorly", "g3"), ("moderately", "g2"), ("well", "g1"),
               ("high", "high"), ("low", "low"))
GRADE_NUMBERS = {"1": "g1", "i": "g1", "2": "g2", "ii": "g2", "3": "g3", "iii": "g3", "4": "g4", "iv": "g4",
                 "x": "gx"}
CANCER_NAMES = {name.lower(): code for code, name in CANCER_TYPES.items()}
PATTERN_SUM = re.compile(r"\D*?\d+\s*\+\s*\d+")   # a Gleason value that opens with "primary + secondary"


def normalize_tnm(field: str, value: str) -> str:
    """'pT2a', 'T2a', 'ypT2a', '2a' -> 't2a'; qualifiers in parentheses ('N0 (i-)') are dropped."""
    s = re.sub(r"\(.*?\)", "", value.lower()).replace(" ", "")
    s = re.sub(r"^[yra]?[pc]?(?=[tnm])", "", s)
    letter = field[1].lower()
    return s if s.startswith(letter) else letter + s


def normalize_stage(value: str) -> str:
    """'Stage IIA', 'stage 2a', 'IIA' -> 'iia'."""
    s = re.sub(r"\b(ajcc|pathologic|stage)\b", "", value.lower()).replace(" ", "")
    return re.sub(r"^[1-4]", lambda m: ROMAN[m.group(0)], s)


def normalize_grade(value: str) -> str:
    """'G2', 'Grade 2', 'grade II', 'moderately differentiated' -> 'g2'; 'High Grade' -> 'high'."""
    s = value.lower()
    for word, grade in GRADE_WORDS:
        if word in s:
            return grade
    s = re.sub(r"\b(histologic|grade)\b", "", s).replace(" ", "")
    return GRADE_NUMBERS.get(s.removeprefix("g"), s)


def normalize_receptor(value: str) -> str:
    s = value.lower()
    for word, status in (("equivocal", "equivocal"), ("indeterminate", "indeterminate"), ("neg", "negative"),
                         ("pos", "positive")):
        if word in s:
            return status
    return {"+": "positive", "-": "negative"}.get(s.strip(), s.strip())


def normalize_gleason(value: str) -> str:
    """'3+4=7', '4+3 (7)', '3 + 4', '7 (4+3)', 'Gleason score 7' -> '7': a stated sum wins over the patterns."""
    numbers = [int(n) for n in re.findall(r"\d+", value)]
    if PATTERN_SUM.match(value):                     # "a+b", then maybe the sum ("= s", "(s)")
        return str(numbers[2] if len(numbers) > 2 else numbers[0] + numbers[1])
    return str(numbers[0]) if numbers else value.lower().strip()


def normalize_laterality(value: str) -> str:
    s = value.lower()
    for side in ("bilateral", "left", "right", "midline", "isthmus"):
        if side in s:
            return side
    return s.strip()


def normalize_value(field: str, value):
    """A field's value in canonical form, or None for no value ("not mentioned", null, empty)."""
    if value is None or str(value).strip().lower() in NULL_ANSWERS:
        return None
    value = str(value).strip()
    if field in ("pT", "pN", "pM"):
        return normalize_tnm(field, value)
    if field == "stage":
        return normalize_stage(value)
    if field == "grade":
        return normalize_grade(value)
    if field in ("ER", "PR", "HER2"):
        return normalize_receptor(value)
    if field == "gleason":
        return normalize_gleason(value)
    if field == "laterality":
        return normalize_laterality(value)
    if field == "cancer_type":
        value = CANCER_NAMES.get(value.lower(), value.upper() if value.upper() in CANCER_TYPES else value)
    return " ".join(exact_tokens(value))


# ---------------------------------------------------------------------------------------------- per field

def prf(tp: int, fp: int, fn: int) -> dict:
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return {"precision": p, "recall": r, "f1": f_beta(p, r), "tp": tp, "fp": fp, "fn": fn}


def field_counts(preds, golds, fields=FIELDS) -> np.ndarray:
    """[records, fields, 3] int array: (tp, fp, fn) of each record's field on normalised values. preds/golds: lists
    of {field: value}; a field missing from a prediction counts as null."""
    if len(preds) != len(golds):
        raise ValueError(f"field scores: {len(preds)} predictions for {len(golds)} gold records")
    counts = np.zeros((len(golds), len(fields), 3), dtype=np.int64)
    for i, (pred, gold) in enumerate(zip(preds, golds)):
        for j, f in enumerate(fields):
            p, g = normalize_value(f, pred.get(f)), normalize_value(f, gold.get(f))
            if p is not None and p == g:
                counts[i, j, 0] = 1
            else:
                counts[i, j, 1:] = p is not None, g is not None
    return counts


def field_scores(preds, golds, fields=FIELDS) -> dict:
    """Per-field P/R/F1 on normalised values plus micro and macro averages (see field_counts for the arguments).
    -> {"fields": {f: scores}, "micro": ..., "macro": ...}."""
    totals = field_counts(preds, golds, fields).sum(axis=0).tolist()
    per_field = {f: {**prf(*c), "n": len(golds), "n_gold": c[0] + c[2]} for f, c in zip(fields, totals)}
    micro = prf(*map(sum, zip(*totals)))
    macro = {k: sum(s[k] for s in per_field.values()) / len(per_field) for k in ("precision", "recall", "f1")}
    return {"fields": per_field, "micro": micro, "macro": macro}


def f1_of_counts(counts: np.ndarray) -> np.ndarray:
    """F1 = 2tp / (2tp + fp + fn) over the last axis (tp, fp, fn); 0 where there is nothing to score."""
    tp, fp, fn = np.moveaxis(counts, -1, 0)
    denominator = 2 * tp + fp + fn
    return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)


def paired_bootstrap(counts_a: np.ndarray, counts_b: np.ndarray, fields=FIELDS, samples: int = 1000,
                     seed: int = 0) -> dict:
    """How sure is "a beats b"? The paired bootstrap (Koehn 2004; Berg-Kirkpatrick et al. 2012): draw the records
    with replacement `samples` times, score both systems on each draw, and look at the F1 difference a - b.
    counts_*: field_counts of the two systems on the same records.
    -> {field, and "micro": {"delta": a - b on all records, "ci95": [2.5, 97.5] percentiles of the drawn deltas,
    "wins": the fraction of draws where a scores higher}}."""
    if counts_a.shape != counts_b.shape:
        raise ValueError(f"paired_bootstrap: counts of shape {counts_a.shape} and {counts_b.shape} differ")
    n = len(counts_a)
    draws = np.random.default_rng(seed).multinomial(n, np.full(n, 1 / n), size=samples)   # [draw, record]: times drawn

    def f1s(counts):           # [draws + 1, fields + 1]: row 0 is the full set, the last column micro
        totals = np.concatenate([counts.sum(0, keepdims=True), np.einsum("dr,rfk->dfk", draws, counts)])
        return np.concatenate([f1_of_counts(totals), f1_of_counts(totals.sum(1))[:, None]], axis=1)

    delta = f1s(counts_a) - f1s(counts_b)
    low, high = np.percentile(delta[1:], [2.5, 97.5], axis=0)
    wins = (delta[1:] > 0).mean(0)
    return {name: {"delta": float(delta[0, j]), "ci95": [float(low[j]), float(high[j])], "wins": float(wins[j])}
            for j, name in enumerate([*fields, "micro"])}


# ---------------------------------------------------------------------------------------------- diagnosis text

def token_f1(pred: str, gold: str) -> float:
    """Bag-of-tokens F1 over the exact-match tokens (lower-cased, punctuation removed, stemmed)."""
    p, g = Counter(exact_tokens(pred)), Counter(exact_tokens(gold))
    overlap = sum((p & g).values())
    if not p or not g:
        return float(not p and not g)
    return f_beta(overlap / sum(p.values()), overlap / sum(g.values()))


def rouge_l(pred: str, gold: str) -> float:
    return _scorer.score(gold, pred)["rougeL"].fmeasure


def text_scores(preds, golds) -> dict:
    n = len(golds)
    if len(preds) != n:
        raise ValueError(f"text_scores: {len(preds)} predictions for {n} references")
    return {"token_f1": sum(map(token_f1, preds, golds)) / n if n else 0.0,
            "rouge_l": sum(map(rouge_l, preds, golds)) / n if n else 0.0, "n": n}

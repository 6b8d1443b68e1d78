"""The study's metrics, and per-field scores on normalised values.

- Instance-averaged set F1 (CancerLLM): per instance, each predicted item takes its best match among the gold
  items (precision) and each gold item its best match among the predictions (recall); P, R and F1 are averaged
  over instances. Two match functions: `exact_match` (lower-case, punctuation removed, Porter-stemmed tokens equal)
  and `rouge1_match` (ROUGE-1 F with beta = 1.2, from rouge-score's precision and recall).
- Per-field precision, recall and F1 over normalised values (`fields.normalize_value`: "pT2a" ~ "T2a", "Stage IIA" ~
  "IIA" ~ "stage 2A", "G2" ~ "Grade 2" ~ "moderately differentiated"), with micro and macro averages. A predicted
  value that differs from the gold counts as one false positive and one false negative; "not mentioned" is null.
- Diagnosis statements: token F1 and ROUGE-L F against the reference.
- Whether one system's field F1 beats another's beyond chance: a paired bootstrap over the records.
"""
import functools
from collections import Counter

import numpy as np
from rouge_score import rouge_scorer

from .fields import FIELDS, exact_tokens, normalize_value

ROUGE_BETA = 1.2
_scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)


# ---------------------------------------------------------------------------------------------- study F1

def exact_match(pred: str, gold: str) -> float:
    return float(exact_tokens(pred) == exact_tokens(gold))


def f_beta(p: float, r: float, beta: float = 1.0) -> float:
    b2 = beta * beta
    return (1 + b2) * p * r / (b2 * p + r) if p + r > 0 else 0.0


@functools.lru_cache(maxsize=2**16)
def rouge_scores(gold: str, pred: str) -> dict:
    """rouge-score's ROUGE-1 and ROUGE-L of a pair, memoised: the same (prediction, gold) pairs recur across
    records, fields and systems."""
    return _scorer.score(gold, pred)


def rouge1_match(pred: str, gold: str) -> float:
    s = rouge_scores(gold, pred)["rouge1"]
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
    return rouge_scores(gold, pred)["rougeL"].fmeasure


def text_scores(preds, golds) -> dict:
    n = len(golds)
    if len(preds) != n:
        raise ValueError(f"text_scores: {len(preds)} predictions for {n} references")
    return {"token_f1": sum(map(token_f1, preds, golds)) / n if n else 0.0,
            "rouge_l": sum(map(rouge_l, preds, golds)) / n if n else 0.0, "n": n}

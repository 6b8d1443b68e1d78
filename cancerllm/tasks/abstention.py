"""Abstention for the phenotype JSON answer: a field's value is given only where the model is sure enough of it.

    python -m cancerllm.tasks.abstention runs/demo/cpt-sft/export --data runs/demo/tasks    # writes abstention.json

Why: the registry records values a report need not state (a pT where the report gives neither a size nor a stage),
and a fine-tuned model answers every field anyway; where the report is silent its values are close to uniform
guesses. Withholding an answer that is right with probability p raises F1 = 2TP / (2TP + FP + FN) exactly when
p < F1 / 2, so guesses should go and readings stay. The model's log-probability of the value it wrote tells the two
apart; how low is too low differs by field and by model, so each threshold is chosen on the validation split
(patients neither trained nor tested on) from the model's own answers there, and saved beside its weights
(abstention.json), where Generator.from_pretrained finds it: the task helpers then withhold what the eval withheld.

A value's log-probability is the sum over the tokens that wrote it, from its opening quote (or `null`) through the
delimiter after it (the token that closes `T1` rather than going on to `T1a` is part of the choice); they are the
model's own log-probabilities (generate.py's logprobs), in which tokens the schema forbade keep their mass, so a
value the schema forced scores low. Thresholds are chosen field by field in FIELDS order, each the one that gives
the validation answers the highest micro F1 with the earlier fields' thresholds in place (the headline metric, and
a withheld T changes the stage looked up from T, N and M); a field with fewer than `min_answers` values in the
validation answers keeps all of its answers (too few to place a threshold), and ties keep the answers.

The best threshold on 91 validation reports often wins by one or two values, and a threshold fitted to that noise
withholds right answers on new patients. So a field keeps its threshold only when choosing one this way helps on
validation patients it was not chosen on: k-fold cross-validation, repeated over shuffles of the reports, must give a
higher micro F1 with the field's threshold than without it. And the thresholds are kept at all only when the whole
procedure passes the same test: fitted on k-1 folds, they must raise the held-out folds' micro F1 over answering every
value (a model whose guesses its log-probabilities do not tell apart gets no abstention.json thresholds).
"""
import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

from .fields import FIELDS, derive_stage, normalize_value

ABSTENTION_FILE = "abstention.json"
MIN_ANSWERS = 20
FOLDS = 5
REPEATS = 20           # shuffles of the folds for one field's threshold: cheap, counts are reused
PROCEDURE_REPEATS = 4  # for all of them together: each refits every field's threshold on every fold


# ---------------------------------------------------------------------------------------------- confidences

def value_spans(text: str) -> dict:
    """{field: (start, end)} of each value in a JSON answer with its keys in FIELDS order (the schema's form): from
    the value's first character through the delimiter after it. Fields after the point where the answer stops
    parsing are left out."""
    decoder, spans, at = json.JSONDecoder(), {}, 0
    for f in FIELDS:
        key = json.dumps(f) + ":"
        at = text.find(key, at)
        if at < 0:
            break
        start = at + len(key)
        start += len(text[start:]) - len(text[start:].lstrip())
        try:
            _, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            break
        spans[f], at = (start, end + 1), end
    return spans


def value_logprobs(tokenizer, token_ids: list, logprobs: list) -> dict:
    """{field: log-probability of its value} of a JSON answer from its tokens and their log-probabilities
    (GenerationResult.token_ids and .logprobs): the sum over the tokens whose text overlaps the value's span."""
    if len(token_ids) != len(logprobs):
        raise ValueError(f"{len(token_ids)} tokens but {len(logprobs)} log-probabilities")
    ends = [len(tokenizer.decode(token_ids[:k + 1])) for k in range(len(token_ids))]   # where each token's text ends
    starts = [0] + ends[:-1]
    return {f: sum(lp for s, e, lp in zip(starts, ends, logprobs) if s < end and e > start)
            for f, (start, end) in value_spans(tokenizer.decode(token_ids)).items()}


def abstain(fields: dict, confidences: dict, thresholds: dict) -> dict:
    """The answer with each value whose log-probability is below its field's threshold withheld (None)."""
    return {f: None if f in thresholds and f in confidences and confidences[f] < thresholds[f] else v
            for f, v in fields.items()}


def finish_answer(fields: dict, confidences, thresholds, stage_groups) -> dict:
    """A parsed JSON answer as the task helpers give it: the values below their thresholds withheld (where both
    are given), then the stage looked up from the cancer type, T, N and M (where stage_groups are given)."""
    if confidences is not None and thresholds:
        fields = abstain(fields, confidences, thresholds)
    return derive_stage(fields, stage_groups) if stage_groups else fields


# ---------------------------------------------------------------------------------------------- calibration

# The calibration imports tasks.metrics where it uses it: metrics needs the `tasks` extra, and the generator imports
# this module for load_abstention.

def micro_f1(golds: list, answers: list) -> float:
    """Micro F1 over FIELDS, scored as the eval scores (tasks.metrics)."""
    from .metrics import f1_of_counts
    return float(f1_of_counts(record_counts(golds, answers).sum(0)))


def record_counts(golds: list, answers: list) -> np.ndarray:
    """[records, 3]: each record's (tp, fp, fn) summed over FIELDS, as the eval counts them."""
    from .metrics import field_counts
    return field_counts(answers, golds).sum(1)


def finished_answers(answers: list, confidences: list, thresholds: dict, stage_groups) -> list:
    """finish_answer of each parsed answer ({}: one that did not parse stays empty)."""
    return [finish_answer(a, c, thresholds, stage_groups) if a else a for a, c in zip(answers, confidences)]


def best_cut(totals: np.ndarray) -> int:
    """The index of the candidate whose summed (tp, fp, fn) give the highest micro F1, the first of equals; 0 (the
    candidate that withholds nothing) unless another beats it."""
    from .metrics import f1_of_counts
    f1 = f1_of_counts(totals)
    best = int(np.argmax(f1))
    return best if f1[best] > f1[0] else 0


def mean_held_out_gain(n: int, held_out_counts, baseline: np.ndarray, folds: int, repeats: int, seed: int) -> float:
    """Mean over `repeats` shuffles of n records into `folds` folds of the micro F1 of the held-out folds' pooled
    counts, minus that of `baseline` (summed (tp, fp, fn)). held_out_counts(fitted, held): the summed counts of the
    records in the `held` mask when chosen on those in `fitted`."""
    from .metrics import f1_of_counts
    rng, gains = np.random.default_rng(seed), []
    for _ in range(repeats):
        fold = rng.permutation(n) % folds
        pooled = sum(held_out_counts(fold != k, fold == k) for k in range(folds))
        gains.append(f1_of_counts(pooled) - f1_of_counts(baseline))
    return float(np.mean(gains))


def cross_validated_gain(counts: np.ndarray, folds: int, repeats: int, seed: int) -> float:
    """mean_held_out_gain of choosing a cut (best_cut) on k-1 folds over withholding nothing. counts:
    [candidates, records, 3], candidate 0 withholds nothing."""
    def held_out_counts(fitted, held):
        return counts[best_cut(counts[:, fitted].sum(1)), held].sum(0)

    return mean_held_out_gain(counts.shape[1], held_out_counts, counts[0].sum(0), folds, repeats, seed)


def field_thresholds(golds: list, answers: list, confidences: list, stage_groups, min_answers: int, folds: int,
                     repeats: int, seed: int) -> dict:
    """{field: threshold} for the fields, in FIELDS order, where the best threshold raises the records' micro F1 with
    the earlier ones in place and cross-validation says choosing one helps (module docstring)."""
    thresholds = {}
    for f in FIELDS:
        given = [c[f] for a, c in zip(answers, confidences) if f in c and normalize_value(f, a.get(f)) is not None]
        if len(given) < min_answers:
            continue
        # Between consecutive distinct confidences, lowest first: each candidate withholds one more group.
        levels = sorted(set(given))
        cuts = [None] + [(low + high) / 2 for low, high in zip(levels, levels[1:])]
        counts = np.stack([record_counts(golds, finished_answers(
            answers, confidences, thresholds if cut is None else {**thresholds, f: cut}, stage_groups)) for cut in cuts])
        best = best_cut(counts.sum(1))
        if best and cross_validated_gain(counts, folds, repeats, seed) > 0:
            thresholds[f] = cuts[best]
    return thresholds


def held_out_gain(fit, golds: list, answers: list, confidences: list, stage_groups, folds: int, repeats: int,
                  seed: int) -> float:
    """mean_held_out_gain of thresholds fitted (fit(golds, answers, confidences)) on k-1 folds over answering every
    value."""
    def held_out_counts(fitted, held):
        fitted, held = ([[x[i] for i in np.flatnonzero(side)] for x in (golds, answers, confidences)]
                        for side in (fitted, held))
        return record_counts(held[0], finished_answers(*held[1:], fit(*fitted), stage_groups)).sum(0)

    every = record_counts(golds, finished_answers(answers, confidences, {}, stage_groups)).sum(0)
    return mean_held_out_gain(len(golds), held_out_counts, every, folds, repeats, seed)


def calibrate(golds: list, answers: list, confidences: list, stage_groups: dict = None,
              min_answers: int = MIN_ANSWERS, folds: int = FOLDS, repeats: int = REPEATS, seed: int = 0):
    """-> ({field: threshold}, held-out gain): the fields where withholding the validation answers below a threshold
    raises their micro F1, on the reports it was chosen on and in cross-validation, kept only if the whole procedure
    raises the held-out folds' micro F1 (that gain; None where no field had a threshold to check). golds: the
    records' gold fields; answers: the model's parsed answers ({} for one that did not parse); confidences:
    value_logprobs of each answer; stage_groups: as the answers are finished (derive_stage after abstaining);
    folds, repeats, seed: the cross-validation's (module docstring)."""
    if not len(golds) == len(answers) == len(confidences):
        raise ValueError(f"calibrate: {len(golds)} gold records, {len(answers)} answers, "
                         f"{len(confidences)} confidences")
    if folds < 2 or repeats < 1:
        raise ValueError(f"calibrate: folds must be at least 2 and repeats at least 1, got {folds} and {repeats}")

    def fit(golds, answers, confidences):
        return field_thresholds(golds, answers, confidences, stage_groups, min_answers, folds, repeats, seed)

    thresholds = fit(golds, answers, confidences)
    if not thresholds:
        return {}, None
    gain = held_out_gain(fit, golds, answers, confidences, stage_groups, folds, PROCEDURE_REPEATS, seed)
    return (thresholds if gain > 0 else {}), gain


# ---------------------------------------------------------------------------------------------- the file

def check_thresholds(thresholds, where: str) -> dict:
    if not isinstance(thresholds, dict):
        raise ValueError(f"{where}: abstain_below must be an object {{field: log-probability}}, "
                         f"got {type(thresholds).__name__}")
    for f, t in thresholds.items():
        if f not in FIELDS:
            raise ValueError(f"{where}: abstain_below names {f!r}, not a phenotype field ({', '.join(FIELDS)})")
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
            raise ValueError(f"{where}: abstain_below[{f!r}] must be a finite number, got {t!r}")
    return thresholds


def load_abstention(directory):
    """{field: threshold} from a checkpoint directory's abstention.json, or None without one."""
    path = Path(directory) / ABSTENTION_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(raw, dict) or "abstain_below" not in raw:
        raise ValueError(f"{path}: expected an object with the key abstain_below")
    return check_thresholds(raw["abstain_below"], str(path))


def save_abstention(directory, thresholds: dict, report: dict) -> Path:
    """Write abstention.json (the thresholds and how they were chosen) whole or not at all."""
    path = Path(directory) / ABSTENTION_FILE
    check_thresholds(thresholds, str(path))
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"abstain_below": thresholds, **report}, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def calibrate_checkpoint(checkpoint, data, split: str = "val", *, batch_size: int = 16, dtype=None,
                         min_answers: int = MIN_ANSWERS, verbose: bool = True) -> dict:
    """Decode the checkpoint's JSON answers on `data/phenotype-json/{split}.jsonl` (as the eval decodes them: the
    datasets' schema per cancer type and stage groups), choose the thresholds and write abstention.json into the
    checkpoint; returns the file's contents."""
    from ..eval import MAX_NEW_TOKENS, ModelSystem, checked_datasets, read_jsonl   # eval imports this module
    data, checkpoint = Path(data), Path(checkpoint)
    settings = checked_datasets(data, [checkpoint])
    path = data / "phenotype-json" / f"{split}.jsonl"
    records = read_jsonl(path) if path.is_file() else []
    if not records:
        raise ValueError(f"{path}: no examples to calibrate on")
    system = ModelSystem("model", checkpoint, "phenotype-json", batch_size, MAX_NEW_TOKENS["phenotype-json"],
                         settings.templates, decoding={"dtype": dtype}, recorded_fields=settings.recorded_fields,
                         stage_groups=settings.stage_groups, abstain=False)
    answers, confidences = system.answers_with_confidence(records)
    golds = [r["fields"] for r in records]
    thresholds, gain = calibrate(golds, answers, confidences, settings.stage_groups, min_answers)
    before, after = (finished_answers(answers, confidences, t, settings.stage_groups) for t in ({}, thresholds))
    report = {"split": split, "n_reports": len(records), "min_answers": min_answers,
              "micro_f1": {"answering_all": micro_f1(golds, before), "abstaining": micro_f1(golds, after)},
              "cross_validation": {"folds": FOLDS, "repeats": PROCEDURE_REPEATS, "held_out_micro_f1_gain": gain},
              "withheld": {f: sum(a.get(f) is not None and b.get(f) is None for a, b in zip(before, after))
                           for f in thresholds}}
    save_abstention(checkpoint, thresholds, report)
    if verbose:
        shown = ", ".join(f"{f} < {t:.2f} ({report['withheld'][f]} withheld)" for f, t in thresholds.items())
        checked = "" if gain is None else f", held-out gain {gain:+.4f} in {FOLDS}-fold cross-validation"
        print(f"{checkpoint / ABSTENTION_FILE}: {shown or 'no field gains by abstaining'}; {split} micro F1 "
              f"{report['micro_f1']['answering_all']:.3f} -> {report['micro_f1']['abstaining']:.3f}{checked}")
    return {"abstain_below": thresholds, **report}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="an exported checkpoint directory (gets abstention.json)")
    p.add_argument("--data", default="runs/tasks", help="the task datasets the checkpoint was tuned on")
    p.add_argument("--split", default="val", help="the split to calibrate on (default: val)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", default=None, help="decode in this dtype (e.g. bfloat16), as the eval will")
    p.add_argument("--min-answers", type=int, default=MIN_ANSWERS,
                   help=f"fewest answered values a field needs for a threshold (default {MIN_ANSWERS})")
    a = p.parse_args(argv)
    if a.batch_size < 1 or a.min_answers < 1:
        p.error("--batch-size and --min-answers must be at least 1")
    try:
        calibrate_checkpoint(a.checkpoint, a.data, a.split, batch_size=a.batch_size, dtype=a.dtype,
                             min_answers=a.min_answers)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"cancerllm.tasks.abstention: {e}")


if __name__ == "__main__":
    main()

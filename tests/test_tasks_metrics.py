import random

import numpy as np
import pytest

from cancerllm.tasks.fields import normalize_value
from cancerllm.tasks.metrics import (exact_match, field_counts, field_scores, instance_f1, paired_bootstrap,
                                     rouge1_match, rouge_l, text_scores, token_f1)


def test_exact_match_lowercases_strips_punctuation_and_stems():
    assert exact_match("Carcinomas.", "carcinoma") == 1.0
    assert exact_match("Infiltrating, ductal carcinoma", "infiltrating ductal carcinomas") == 1.0
    assert exact_match("ductal carcinoma", "lobular carcinoma") == 0.0


def test_rouge1_match_is_f_beta_1_2():
    assert rouge1_match("infiltrating ductal carcinoma", "invasive ductal carcinoma") == pytest.approx(2 / 3)
    # P = 1, R = 2/3: (1 + 1.44) * 1 * 2/3 / (1.44 * 1 + 2/3) = 4.88 / 6.32
    assert rouge1_match("ductal carcinoma", "invasive ductal carcinoma") == pytest.approx(4.88 / 6.32)
    assert rouge1_match("left", "right") == 0.0


def test_instance_f1_averages_set_scores_over_instances():
    preds = [["a", "b"], [], ["x"]]
    golds = [["a"], [], ["y"]]
    s = instance_f1(preds, golds, "exact")
    assert s["precision"] == pytest.approx(1.5 / 3)
    assert s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert s["n"] == 3
    with pytest.raises(ValueError, match="2 predictions for 3"):
        instance_f1(preds[:2], golds)


@pytest.mark.parametrize("field, a, b", [
    ("pT", "pT2a", "T2a"), ("pT", "ypT3", "T3"), ("pN", "pN0(i-)", "N0 (i-)"), ("pN", "N1", "pN1"),
    ("stage", "Stage IIA", "IIA"), ("stage", "stage 2A", "Stage IIA"), ("grade", "G2", "Grade 2"),
    ("grade", "moderately differentiated", "G2"), ("grade", "grade III", "G3"), ("grade", "High Grade", "high grade"),
    ("gleason", "3+4=7", "7"), ("gleason", "4 + 3", "7"),
    ("gleason", "7 (4+3)", "7"), ("gleason", "5+4 (9)", "9"), ("gleason", "Gleason score 8", "8"),
    ("ER", "positive (95%)", "Positive"),
    ("laterality", "Right lobe", "right"), ("cancer_type", "BRCA", "Breast invasive carcinoma"),
    ("histology", "Infiltrating ductal carcinomas", "infiltrating ductal carcinoma"),
])
def test_normalize_value_equates_spellings(field, a, b):
    assert normalize_value(field, a) == normalize_value(field, b) is not None


@pytest.mark.parametrize("field, a, b", [("pT", "T2", "T2a"), ("stage", "Stage II", "Stage III"),
                                         ("grade", "G1", "G2"), ("ER", "Positive", "Negative")])
def test_normalize_value_keeps_different_values_apart(field, a, b):
    assert normalize_value(field, a) != normalize_value(field, b)


def test_not_mentioned_is_null():
    assert normalize_value("pT", "not mentioned") is None
    assert normalize_value("pT", None) is None


def test_field_scores_hand_computed():
    preds = [{"pT": "pT2a", "stage": "IIB"}, {"pT": "not mentioned", "stage": "Stage I"}]
    golds = [{"pT": "T2a", "stage": "Stage IIA"}, {"pT": "T1", "stage": None}]
    s = field_scores(preds, golds, fields=("pT", "stage"))
    assert s["fields"]["pT"]["precision"] == 1.0 and s["fields"]["pT"]["recall"] == 0.5
    assert s["fields"]["pT"]["f1"] == pytest.approx(2 / 3)
    assert (s["fields"]["stage"]["tp"], s["fields"]["stage"]["fp"], s["fields"]["stage"]["fn"]) == (0, 2, 1)
    assert s["micro"]["f1"] == pytest.approx(1 / 3)
    assert s["macro"]["f1"] == pytest.approx(1 / 3)
    assert s["fields"]["pT"]["n_gold"] == 2 and s["fields"]["stage"]["n_gold"] == 1


def random_records(rng, n, fields=("pT", "stage", "ER")):
    values = {"pT": ["T1", "T2", "T3", None], "stage": ["Stage I", "Stage II", None], "ER": ["Positive", None]}
    return [{f: rng.choice(values[f]) for f in fields} for _ in range(n)]


def test_paired_bootstrap_matches_resampling_the_records_one_by_one():
    rng = random.Random(0)
    fields, n, samples = ("pT", "stage", "ER"), 17, 60
    golds, preds_a, preds_b = (random_records(rng, n) for _ in range(3))
    got = paired_bootstrap(field_counts(preds_a, golds, fields), field_counts(preds_b, golds, fields), fields,
                           samples=samples, seed=3)
    # The reference: the same draws (multinomial counts) expanded into record lists and scored by field_scores.
    draws = np.random.default_rng(3).multinomial(n, np.full(n, 1 / n), size=samples)
    deltas = {f: [] for f in (*fields, "micro")}
    for counts in [np.ones(n, int), *draws]:
        pick = lambda records: [r for r, k in zip(records, counts) for _ in range(k)]
        a, b = (field_scores(pick(p), pick(golds), fields) for p in (preds_a, preds_b))
        for f in fields:
            deltas[f].append(a["fields"][f]["f1"] - b["fields"][f]["f1"])
        deltas["micro"].append(a["micro"]["f1"] - b["micro"]["f1"])
    for f, d in deltas.items():
        assert got[f]["delta"] == pytest.approx(d[0], abs=1e-12)
        assert got[f]["ci95"] == pytest.approx(list(np.percentile(d[1:], [2.5, 97.5])), abs=1e-12)
        assert got[f]["wins"] == pytest.approx(np.mean(np.array(d[1:]) > 0), abs=1e-12)
    assert len({round(got[f]["wins"], 6) for f in deltas}) > 1          # the fields differ: the test can tell


def test_paired_bootstrap_of_a_perfect_system_against_one_always_wrong():
    golds = [{"pT": "T2"}, {"pT": "T3"}, {"pT": None}]
    perfect, wrong = field_counts(golds, golds, ("pT",)), field_counts([{"pT": "T4"}] * 3, golds, ("pT",))
    c = paired_bootstrap(perfect, wrong, ("pT",), samples=200)
    # a draw of only the null record leaves the perfect system nothing to score: F1 0, no win
    assert c["pT"]["delta"] == 1.0 and c["pT"]["ci95"][1] == 1.0 and 0.9 < c["pT"]["wins"] < 1.0
    same = paired_bootstrap(perfect, perfect, ("pT",), samples=50)["micro"]
    assert same == {"delta": 0.0, "ci95": [0.0, 0.0], "wins": 0.0}
    with pytest.raises(ValueError, match="shape"):
        paired_bootstrap(perfect, perfect[:2], ("pT",))


def test_diagnosis_text_scores_hand_computed():
    assert token_f1("left breast carcinoma", "carcinoma of left breast") == pytest.approx(6 / 7)
    assert rouge_l("left breast carcinoma", "carcinoma of left breast") == pytest.approx(4 / 7)
    s = text_scores(["a b", "c"], ["a b", "d"])
    assert s["token_f1"] == pytest.approx(0.5) and s["n"] == 2

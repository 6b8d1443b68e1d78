import pytest

from cancerllm.tasks.metrics import (exact_match, field_scores, instance_f1, normalize_value, rouge1_match, rouge_l,
                                     text_scores, token_f1)


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
    ("gleason", "7 (4+3)", "7"), ("gleason", "5+4 (9)", "9"), ("gleason", "Gleason score 8", "8"), ("ER", "positive (95%)", "Positive"),
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


def test_diagnosis_text_scores_hand_computed():
    assert token_f1("left breast carcinoma", "carcinoma of left breast") == pytest.approx(6 / 7)
    assert rouge_l("left breast carcinoma", "carcinoma of left breast") == pytest.approx(4 / 7)
    s = text_scores(["a b", "c"], ["a b", "d"])
    assert s["token_f1"] == pytest.approx(0.5) and s["n"] == 2

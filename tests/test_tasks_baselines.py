import re

import pytest

from cancerllm.tasks.baselines import majority_values, regex_extract
from cancerllm.tasks.fields import normalize_value
from cancerllm.tasks.perturb import counterfactual, counterfactual_all, misspell, ocr_noise


@pytest.mark.parametrize("snippet, expected", [
    ("Pathologic Staging (pTNM): pT1: Tumor 2 cm. pNX: Regional nodes. pMX: Distant.",
     {"pT": "T1", "pN": "NX", "pM": "MX"}),
    ("Pathologic stage: pT2aN1bM0.", {"pT": "T2a", "pN": "N1b", "pM": "M0"}),
    ("ypT3 N0 (0/12)", {"pT": "T3", "pN": "N0"}),
    ("Histologic Grade: G1: Well differentiated.", {"grade": "G1"}),
    ("Adenocarcinoma, moderately differentiated.", {"grade": "G2"}),
    ("Urothelial carcinoma, high grade.", {"grade": "High Grade"}),
    ("AJCC Stage IIIA.", {"stage": "Stage IIIA"}),
    ("Gleason score 3+4=7.", {"gleason": "7"}),
    ("Gleason grade: 4 + 5.", {"gleason": "9"}),
    ("GLEASON SCORE 7 (4+3) WITH TERTIARY GRADE 5.", {"gleason": "7"}),
    ("Gleason grade 5+4 (9).", {"gleason": "9"}),
    ("Gleason grade 4 in the apex.", {}),
    ("Estrogen receptor: positive (90%). Progesterone receptor: negative. HER2/neu: equivocal (2+).",
     {"ER": "Positive", "PR": "Negative", "HER2": "Equivocal"}),
    ("Left breast, lumpectomy. Left axilla. Right breast, biopsy.", {"laterality": "Left"}),
    ("MRI T2 weighted images; 3 cm mass.", {}),
])
def test_regex_extractor_on_crafted_snippets(snippet, expected):
    got = regex_extract(snippet)
    assert {f: v for f, v in got.items() if v is not None} == expected


def test_majority_value_ignores_nulls():
    rows = [{"pT": None, "grade": None}, {"pT": None, "grade": "G2"}, {"pT": "T2", "grade": "G3"},
            {"pT": "T2", "grade": "G2"}]
    rows = [{**dict.fromkeys(("cancer_type", "primary_site", "histology", "laterality", "pN", "pM", "stage", "ER",
                              "PR", "HER2", "gleason")), **r} for r in rows]
    m = majority_values(rows)
    assert m["pT"] == "T2" and m["grade"] == "G2" and m["stage"] is None


REPORT = "FINAL DIAGNOSIS: Left breast, invasive ductal carcinoma, grade 2. pT2 N0 MX. Stage IIA. ER: positive."


def test_perturbations_are_seeded_and_deterministic():
    for fn, rate in ((misspell, 0.5), (ocr_noise, 0.2)):
        a, b = fn(REPORT, rate, seed=3, key="P1"), fn(REPORT, rate, seed=3, key="P1")
        assert a == b != REPORT
        assert fn(REPORT, rate, seed=4, key="P1") != a
        assert fn(REPORT, 0.0, seed=3, key="P1") == REPORT
    with pytest.raises(ValueError, match="rate"):
        misspell(REPORT, 1.5)


def test_misspell_edits_words_but_not_values():
    out = misspell(REPORT, 1.0, seed=0, key="x")
    assert "pT2 N0 MX" in out and "IIA" in out
    assert sum(a != b for a, b in zip(REPORT.split(), out.split())) >= 8


def test_counterfactual_rewrites_the_text_and_the_gold_together():
    gold = {"laterality": "Left", "grade": "G2", "pT": "T2", "pN": "N0", "pM": "MX", "stage": "Stage IIA",
            "ER": "Positive", "PR": None, "HER2": None, "gleason": None}
    seen = set()
    for seed in range(20):
        report, fields, field = counterfactual(REPORT, gold, seed=seed, key="P1")
        assert report != REPORT and fields[field] != gold[field]
        assert all(fields[f] == gold[f] for f in gold if f != field)
        assert normalize_value(field, regex_extract(report)[field]) == normalize_value(field, fields[field])
        assert counterfactual(REPORT, gold, seed=seed, key="P1") == (report, fields, field)
        seen.add(field)
    assert len(seen) >= 3
    assert counterfactual("No tumor identified.", gold, seed=0) is None


def test_counterfactual_all_rewrites_every_stated_value_and_its_gold():
    gold = {"laterality": "Left", "grade": "G2", "pT": "T2", "pN": "N0", "pM": "MX", "stage": "Stage IIA",
            "ER": "Positive", "PR": None, "HER2": "Negative", "gleason": None}
    stated = {"laterality", "grade", "pT", "pN", "pM", "stage", "ER"}     # HER2's gold is not what the text says
    report, fields, edited = counterfactual_all(REPORT, gold, seed=1, key="P1")
    assert set(edited) == stated
    found = regex_extract(report)
    for f in gold:
        if f in stated:
            assert normalize_value(f, fields[f]) != normalize_value(f, gold[f])
            assert normalize_value(f, found[f]) == normalize_value(f, fields[f])
        else:
            assert fields[f] == gold[f]
    assert counterfactual_all(REPORT, gold, seed=1, key="P1") == (report, fields, edited)
    assert counterfactual_all(REPORT, gold, seed=2, key="P1")[0] != report
    assert counterfactual_all("No tumor identified.", gold, seed=0) is None


@pytest.mark.parametrize("stated, roles", [   # each number of the statement: a pattern (p) or the score (s)
    ("3+4=7", "pps"), ("4 + 5 = 9", "pps"), ("5+4 (9)", "pps"), ("3 + 4", "pp"), ("7 (4+3)", "spp"), ("8", "s")])
def test_counterfactual_rewrites_a_gleason_score_in_its_own_shape(stated, roles):
    head, tail = "Prostatic adenocarcinoma, Gleason score ", ". Margins free."
    gold = {**dict.fromkeys(("laterality", "grade", "pT", "pN", "pM", "stage", "ER", "PR", "HER2")),
            "gleason": normalize_value("gleason", stated)}
    scores = set()
    for seed in range(12):
        report, fields, field = counterfactual(head + stated + tail, gold, seed=seed, key="P1")
        new = report.removeprefix(head).removesuffix(tail)
        assert field == "gleason" and re.sub(r"\d+", "#", new) == re.sub(r"\d+", "#", stated)  # same shape
        numbers = [int(n) for n in re.findall(r"\d+", new)]
        patterns = [n for n, role in zip(numbers, roles) if role == "p"]
        score = next((n for n, role in zip(numbers, roles) if role == "s"), sum(patterns))
        assert not patterns or sum(patterns) == score              # the patterns add up to the stated score
        assert str(score) == fields["gleason"] != gold["gleason"] == normalize_value("gleason", stated)
        assert regex_extract(report)["gleason"] == fields["gleason"]
        scores.add(score)
    assert len(scores) >= 3

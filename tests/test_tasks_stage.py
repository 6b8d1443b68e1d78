"""The stage from T, N and M: the training registry's stage groups (fields.stage_groups) and the answer's stage
looked up in them (fields.derive_stage), as Generator.extract_phenotypes and the eval answer."""
import pytest

from cancerllm.tasks.fields import FIELDS, check_stage_groups, derive_stage, stage_groups

BREAST, LUNG = "Breast invasive carcinoma", "Lung adenocarcinoma"


def patient(cancer_type, pT, pN, pM, stage):
    return {**dict.fromkeys(FIELDS), "cancer_type": cancer_type, "pT": pT, "pN": pN, "pM": pM, "stage": stage}


ROWS = ([patient(BREAST, "T2", "N1a", "M0", "Stage IIB")] * 3 + [patient(BREAST, "T2", "N1", "M0", "Stage IIA")]
        + [patient(BREAST, "T1c", "N0 (i-)", "M0", "Stage IA"), patient(BREAST, "T1c", "N0", "M0", "Stage I")]
        + [patient(LUNG, "T1b", "N0", None, None)] * 2 + [patient(LUNG, "T1b", "N0", None, "Stage IA")]
        + [patient(None, "T2", "N0", "M0", "Stage IB")])


def test_groups_hold_each_combinations_most_frequent_stages_ties_in_stage_order():
    assert stage_groups(ROWS) == {
        BREAST: {"t2|n1a|m0": ["Stage IIB"], "t2|n1|m0": ["Stage IIA"],
                 "t1c|n0|m0": ["Stage I", "Stage IA"]},   # 'N0 (i-)' and 'N0' are one N; a tie keeps both
        LUNG: {"t1b|n0|": [None]}}                        # null is a stage too: 2 of 3 have none
    assert stage_groups([]) == {}


@pytest.mark.parametrize("answer, stage", [
    (patient(BREAST, "T2", "N1a", "M0", "Stage IIA"), "Stage IIB"),     # outside its group: the group's
    (patient(BREAST, "pT2", "N1a", "M0", None), "Stage IIB"),           # spelled otherwise, no stage
    (patient(BREAST, "T1c", "N0", "M0", "Stage IA"), "Stage IA"),       # one of a tie: kept
    (patient(BREAST, "T1c", "N0", "M0", "stage 2"), "Stage I"),         # else the tie's first
    (patient(BREAST, "T1c", "N0", "M0", "stage 1a"), "stage 1a"),       # the same stage in other words: kept
    (patient(BREAST, "T3", "N0", "M0", "Stage IIB"), "Stage IIB"),      # no patient in that group: the model's
    (patient(LUNG, "T1b", "N0", None, "Stage IA"), None),
    (patient(None, "T2", "N1a", "M0", "Stage IV"), "Stage IV"),
])
def test_the_answers_stage_is_its_groups_unless_it_is_one_of_them_or_there_is_none(answer, stage):
    before = dict(answer)
    assert derive_stage(answer, stage_groups(ROWS)) == {**answer, "stage": stage}
    assert answer == before   # a new answer; the model's is left as it was


@pytest.mark.parametrize("bad, message", [
    ([], "expected an object"),
    ({"Lymphoma": {}}, "unknown cancer type 'Lymphoma'"),
    ({BREAST: ["t2|n0|m0"]}, "expected an object"),
    ({BREAST: {"t2|n0": ["Stage IIA"]}}, r"'t2\|n0' is not 't\|n\|m'"),
    ({BREAST: {"T2|N0|M0": ["Stage IIA"]}}, r"'T2\|N0\|M0' is not 't\|n\|m' of allowed values, normalised"),
    ({BREAST: {"t9|n0|m0": ["Stage IIA"]}}, r"'t9\|n0\|m0' is not 't\|n\|m' of allowed values"),
    ({BREAST: {"t2|n0|m0": []}}, "non-empty list"),
    ({BREAST: {"t2|n0|m0": "Stage IIA"}}, "non-empty list"),
    ({BREAST: {"t2|n0|m0": ["Stage 2A"]}}, r"\['t2\|n0\|m0'\]: expected a non-empty list of allowed stages"),
])
def test_bad_stage_groups_are_refused_naming_the_entry(bad, message):
    with pytest.raises(ValueError, match=message):
        check_stage_groups(bad)
    check_stage_groups(stage_groups(ROWS))

"""The answer schema per cancer type: the fields the registry records for each type (fields.recorded_by_cancer_type),
and the JSON grammar that holds an answer to them once it has named the cancer type."""
import json

import pytest

from cancerllm.tasks.constrained import JsonSchemaProcessor
from cancerllm.tasks.fields import FIELDS, check_recorded_fields, json_schema, recorded_by_cancer_type
from cancerllm.tokenizer import Tokenizer, mistral_tokenizer_path

BREAST, PROSTATE = "Breast invasive carcinoma", "Prostate adenocarcinoma"


def labels(cancer_type, **values):
    return {**dict.fromkeys(FIELDS), "cancer_type": cancer_type, **values}


def test_recorded_fields_are_the_ones_each_type_states_required_where_nearly_all_do():
    rows = ([labels(BREAST, ER="Positive", HER2="Negative")] * 18 + [labels(BREAST, ER="Negative")] * 2
            + [labels(PROSTATE, gleason="7")] * 3 + [labels(None, grade="G2")])
    assert recorded_by_cancer_type(rows) == {BREAST: {"ER": "required", "HER2": "optional"},
                                             PROSTATE: {"gleason": "required"}}
    assert recorded_by_cancer_type(rows, required_share=1.0)[BREAST] == {"ER": "required", "HER2": "optional"}
    assert recorded_by_cancer_type(rows, required_share=0.9)[BREAST]["HER2"] == "required"   # 18 of 20
    assert recorded_by_cancer_type([]) == {}
    for share in (0, 1.5, True, "0.9"):
        with pytest.raises(ValueError, match=f"required_share={share!r}"):
            recorded_by_cancer_type(rows, required_share=share)


@pytest.mark.parametrize("bad, message", [
    ([], "expected an object"),
    ({"Lymphoma": {}}, "unknown cancer type 'Lymphoma'"),
    ({BREAST: ["ER"]}, "expected an object"),
    ({BREAST: {"Grade": "required"}}, "unknown field 'Grade'"),
    ({BREAST: {"cancer_type": "required"}}, "unknown field 'cancer_type'"),
    ({BREAST: {"ER": "always"}}, r"\['ER'\]: 'always'"),
])
def test_bad_recorded_fields_are_refused_naming_the_entry(bad, message):
    with pytest.raises(ValueError, match=message):
        check_recorded_fields(bad)


@pytest.fixture(scope="module")
def processors():
    """The open schema's and a per-type schema's processors over Mistral's real vocabulary."""
    tokenizer = Tokenizer(mistral_tokenizer_path())
    recorded = {BREAST: {"primary_site": "optional", "laterality": "optional", "ER": "required"},
                PROSTATE: {"gleason": "optional"}}
    return tokenizer, JsonSchemaProcessor(tokenizer), JsonSchemaProcessor(tokenizer, json_schema(recorded))


def accepts(tokenizer, processor, answer: dict) -> bool:
    """Whether the grammar takes the answer as SFT completions spell it, to its end."""
    processor.reset(1)
    matcher = processor.matchers[0]
    ids = tokenizer.encode(json.dumps(answer), bos=False)
    return all(matcher.accept_token(i) for i in ids) and matcher.accept_token(tokenizer.eos_id)


@pytest.mark.parametrize("answer, per_type", [
    (labels(BREAST, laterality="Left", ER="Positive"), True),
    (labels(BREAST, ER="Negative"), True),                             # optional fields may be null
    (labels(BREAST, laterality="Left"), False),                        # ER is required for breast
    (labels(BREAST, ER="Positive", gleason="7"), False),               # never recorded for breast
    (labels(BREAST, ER="Positive", grade="G2"), False),
    (labels(PROSTATE, gleason="7"), True),
    (labels(PROSTATE, ER="Positive"), False),
    (labels("Lung adenocarcinoma", grade="G2", ER="Positive"), True),  # a type it does not list: every field open
    (labels(None, gleason="7"), True),
])
def test_the_schema_holds_each_cancer_type_to_its_recorded_fields(processors, answer, per_type):
    tokenizer, open_schema, by_type = processors
    assert accepts(tokenizer, open_schema, answer)
    assert accepts(tokenizer, by_type, answer) == per_type


def test_without_recorded_fields_the_schema_is_the_open_one():
    assert json_schema(None) == json_schema({}) == json_schema()
    assert json_schema()["required"] == list(FIELDS)
    with pytest.raises(ValueError, match="unknown cancer type"):
        json_schema({"Lymphoma": {}})

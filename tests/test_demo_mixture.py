"""The SFT mixture (cancerllm.tasks.mixture, the demo's [sft_mixture] in configs/cpu-small-sft.toml): how
many times each training report's examples appear."""
import dataclasses
import json
from collections import Counter

import pytest

from cancerllm.tasks import mixture
from cancerllm.tasks.mixture import MixtureSpec, json_passes, read_spec, write_sft_mixture

DEMO = read_spec("configs/cpu-small-sft.toml")


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def example(pid, task, tag="plain", gleason=None):
    return {"patient_id": pid, "task": task, "prompt": f"{task} {pid} {tag}", "completion": tag,
            "fields": {"cancer_type": "c", "gleason": gleason}}


@pytest.fixture
def tasks_dir(tmp_path):
    """Training examples of two cleaned reports (C1 states an editable value: edited copies; C2 does not) and three
    extra reports (X1's copies exist, but extras take none)."""
    cleaned, extra = ["C1", "C2"], ["X1", "X2", "X3"]
    write_jsonl(tmp_path / "phenotype-json/train.jsonl", [example(p, "json") for p in cleaned + extra])
    write_jsonl(tmp_path / "phenotype-json/train-counterfactual.jsonl",
                [example(p, "json", f"edit{k}") for p in ("C1", "X1") for k in range(DEMO.counterfactual_copies)])
    write_jsonl(tmp_path / "diagnosis/train.jsonl", [example(p, "diagnosis") for p in cleaned + extra])
    write_jsonl(tmp_path / "phenotype-qa/train.jsonl", [example(p, "qa", f"q{k}") for p in cleaned for k in range(3)])
    manifest = {"extra_train_patients": extra, "counterfactual_train": {"copies": DEMO.counterfactual_copies}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path


def test_demo_spec_is_the_demos_mixture():
    assert DEMO == MixtureSpec(json_passes=4, counterfactual_copies=2, extra_json_passes=1, diagnosis_passes=1,
                               qa_examples=1500, seed=0)


def test_cleaned_reports_get_all_passes_and_copies_extra_reports_one(tasks_dir):
    rows = json_passes(tasks_dir, DEMO)
    per_patient = Counter(r["patient_id"] for r in rows)
    assert per_patient == {"C1": DEMO.json_passes, "C2": DEMO.json_passes, "X1": 1, "X2": 1, "X3": 1}
    c1 = Counter(r["completion"] for r in rows if r["patient_id"] == "C1")
    assert c1 == {"plain": DEMO.json_passes - DEMO.counterfactual_copies,
                  **{f"edit{k}": 1 for k in range(DEMO.counterfactual_copies)}}
    assert all(r["completion"] == "plain" for r in rows if r["patient_id"] != "C1")

    counts = write_sft_mixture(tasks_dir, tasks_dir / "sft.jsonl", DEMO)
    written = [json.loads(line) for line in open(tasks_dir / "sft.jsonl")]
    assert counts == {"phenotype-json": len(rows), "diagnosis": 5, "phenotype-qa": 6} and len(written) == len(rows) + 11
    assert set(written[0]) == {"patient_id", "prompt", "completion"}


def test_spec_counts_scale_each_part(tasks_dir):
    spec = MixtureSpec(json_passes=2, counterfactual_copies=1, extra_json_passes=3, diagnosis_passes=2,
                       qa_examples=4)
    counts = write_sft_mixture(tasks_dir, tasks_dir / "sft.jsonl", spec)
    assert counts == {"phenotype-json": 2 * 2 + 3 * 3, "diagnosis": 2 * 5, "phenotype-qa": 4}
    counts = write_sft_mixture(tasks_dir, tasks_dir / "sft.jsonl", MixtureSpec(counterfactual_copies=0,
                                                                              qa_examples="all"))
    assert counts["phenotype-qa"] == 6


def test_cli_reads_the_section_and_refuses_bad_specs(tasks_dir, tmp_path, capsys):
    config = tmp_path / "mix.toml"
    config.write_text("[sft_mixture]\njson_passes = 1\ncounterfactual_copies = 0\nqa_examples = 2\n")
    mixture.main(["--config", str(config), "--tasks", str(tasks_dir), "--out", str(tmp_path / "out.jsonl")])
    assert "5 phenotype-json, 5 diagnosis, 2 phenotype-qa" in capsys.readouterr().out
    config.write_text("[sft_mixture]\njson_passes = 1\ncopies = 2\n")
    with pytest.raises(SystemExit, match="unknown key.*copies"):
        mixture.main(["--config", str(config), "--tasks", str(tasks_dir), "--out", str(tmp_path / "out.jsonl")])
    with pytest.raises(ValueError, match="counterfactual_copies=3 is more than json_passes=2"):
        MixtureSpec(json_passes=2, counterfactual_copies=3)
    with pytest.raises(ValueError, match="holds 2 per report"):
        json_passes(tasks_dir, MixtureSpec(json_passes=4, counterfactual_copies=3))


def test_rare_field_passes_repeat_the_examples_that_state_a_rare_field(tasks_dir):
    """Gleason stated in 1 of 5 examples: rare at a share of 0.2, not at 0.1; cancer_type (5 of 5) never."""
    examples = [example(p, "json", gleason="7" if p == "X2" else None) for p in ("C1", "C2", "X1", "X2", "X3")]
    write_jsonl(tasks_dir / "phenotype-json/train.jsonl", examples)
    assert mixture.rare_fields(examples, 0.2) == ["gleason"] and mixture.rare_fields(examples, 0.1) == []
    plain = Counter(r["patient_id"] for r in json_passes(tasks_dir, DEMO))
    spec = dataclasses.replace(DEMO, rare_field_passes=3, rare_field_share=0.2)
    boosted = Counter(r["patient_id"] for r in json_passes(tasks_dir, spec))
    assert boosted - plain == {"X2": 3}
    spec = dataclasses.replace(DEMO, rare_field_passes=3, rare_field_share=0.1)
    assert Counter(r["patient_id"] for r in json_passes(tasks_dir, spec)) == plain
    for share in (0, 1, 1.5, "0.1", True):
        with pytest.raises(ValueError, match=f"rare_field_share={share!r}"):
            MixtureSpec(rare_field_share=share)
    with pytest.raises(ValueError, match="rare_field_passes=-1"):
        MixtureSpec(rare_field_passes=-1)


def test_field_passes_repeat_the_examples_that_state_the_named_field(tasks_dir):
    """Gleason stated in 2 of 5 examples: field_passes = {gleason = 2} adds two more of each; other fields' passes
    add those that state them; unknown fields and bad counts are refused naming the key."""
    examples = [example(p, "json", gleason="7" if p in ("C1", "X2") else None) for p in ("C1", "C2", "X1", "X2", "X3")]
    write_jsonl(tasks_dir / "phenotype-json/train.jsonl", examples)
    plain = Counter(r["patient_id"] for r in json_passes(tasks_dir, DEMO))
    boosted = Counter(r["patient_id"] for r in json_passes(tasks_dir, dataclasses.replace(DEMO,
                                                                                          field_passes={"gleason": 2})))
    assert boosted - plain == {"C1": 2, "X2": 2}
    both = Counter(r["patient_id"] for r in json_passes(tasks_dir, dataclasses.replace(
        DEMO, field_passes={"gleason": 1, "cancer_type": 1})))
    assert both - plain == {"C1": 2, "C2": 1, "X1": 1, "X2": 2, "X3": 1}
    with pytest.raises(ValueError, match="unknown field.*Grade"):
        MixtureSpec(field_passes={"Grade": 1})
    with pytest.raises(ValueError, match=r"field_passes.grade=-1"):
        MixtureSpec(field_passes={"grade": -1})
    with pytest.raises(ValueError, match="field_passes=2: a table"):
        MixtureSpec(field_passes=2)


def test_cli_reads_field_passes_as_a_table(tmp_path):
    config = tmp_path / "mix.toml"
    config.write_text("[sft_mixture]\nfield_passes = { grade = 1 }\n")
    assert read_spec(config).field_passes == {"grade": 1}


def test_demo_summary_names_the_field_passes():
    from cancerllm.demo import field_passes_note
    assert field_passes_note(MixtureSpec(field_passes={"grade": 2, "pM": 1})) == (
        ", those that state the grade 2 more times, those that state the pM 1 more times")
    assert field_passes_note(MixtureSpec()) == ""

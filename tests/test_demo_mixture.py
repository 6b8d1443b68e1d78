"""The demo's SFT mixture (cancerllm.demo): how many times each training report's examples appear."""
import json
from collections import Counter

from cancerllm import demo


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def example(pid, task, tag="plain"):
    return {"patient_id": pid, "task": task, "prompt": f"{task} {pid} {tag}", "completion": tag}


def test_cleaned_reports_get_all_passes_and_copies_extra_reports_one(tmp_path):
    cleaned, extra = ["C1", "C2"], ["X1", "X2", "X3"]
    write_jsonl(tmp_path / "phenotype-json/train.jsonl", [example(p, "json") for p in cleaned + extra])
    # C1 states an editable value (two edited copies); C2 does not; X1's copies exist but extras take none.
    write_jsonl(tmp_path / "phenotype-json/train-counterfactual.jsonl",
                [example(p, "json", f"edit{k}") for p in ("C1", "X1") for k in range(demo.COUNTERFACTUAL_COPIES)])
    write_jsonl(tmp_path / "diagnosis/train.jsonl", [example(p, "diagnosis") for p in cleaned + extra])
    write_jsonl(tmp_path / "phenotype-qa/train.jsonl", [example(p, "qa", f"q{k}") for p in cleaned for k in range(3)])

    rows = demo.json_passes(tmp_path, set(cleaned))
    per_patient = Counter(r["patient_id"] for r in rows)
    assert per_patient == {"C1": demo.JSON_PASSES, "C2": demo.JSON_PASSES, "X1": 1, "X2": 1, "X3": 1}
    c1 = Counter(r["completion"] for r in rows if r["patient_id"] == "C1")
    assert c1 == {"plain": demo.JSON_PASSES - demo.COUNTERFACTUAL_COPIES,
                  **{f"edit{k}": 1 for k in range(demo.COUNTERFACTUAL_COPIES)}}
    assert all(r["completion"] == "plain" for r in rows if r["patient_id"] != "C1")

    counts = demo.write_sft_mixture(tmp_path, set(cleaned), tmp_path / "sft.jsonl", seed=0)
    written = [json.loads(line) for line in open(tmp_path / "sft.jsonl")]
    assert counts == {"phenotype-json": len(rows), "diagnosis": 5, "phenotype-qa": 6} and len(written) == len(rows) + 11
    assert set(written[0]) == {"patient_id", "prompt", "completion"}

"""Constrained decoding and the eval CLI end to end, on a tiny random model with Mistral's real tokenizer."""
import json
import shutil

import pytest
import torch

from cancerllm.generate import Generator
from cancerllm.tasks.build import read_reports, task_examples
from cancerllm.tasks.prompts import load_prompt_settings, load_templates, task_prompt
from cancerllm.tasks.constrained import ChoiceProcessor, JsonSchemaProcessor
from cancerllm.tasks.fields import ALLOWED, FIELDS, json_schema
from cancerllm.tokenizer import Tokenizer
from cancerllm.tokenizer import train as train_tokenizer
from cancerllm import eval as cancer_eval
from cancerllm import fast_dtype
from tasks_util import first_reports_datasets, tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Datasets from the first 30 bundled reports (the test split then holds 3 patients)."""
    tmp = tmp_path_factory.mktemp("data")
    first_reports_datasets(tmp, 30)
    return tmp / "tasks"


def test_constrained_output_always_parses_with_exactly_the_keys(checkpoint):
    gen = Generator.from_pretrained(checkpoint)
    proc = JsonSchemaProcessor(gen.tokenizer, vocab_size=gen.args.vocab_size)
    for seed in range(2):
        results = gen.generate(["Report: left breast, pT2 N0.", "x", "Diagnosis:"], max_new_tokens=800,
                               temperature=1.0, seed=seed, logits_processor=proc)
        for r in results:
            assert r.finish_reason == "eos", r.text
            obj = json.loads(r.text)
            assert list(obj) == list(FIELDS)
            for f, v in obj.items():
                assert v is None or (v in ALLOWED[f] if f in ALLOWED else isinstance(v, str))
    unconstrained = gen.generate(["x"], max_new_tokens=40, temperature=1.0, seed=0)[0].text
    with pytest.raises(json.JSONDecodeError):
        json.loads(unconstrained)


def test_json_answers_hold_the_fields_recorded_for_the_type_they_name(checkpoint):
    gen = Generator.from_pretrained(checkpoint)
    recorded = {t: {"pT": "required", "ER": "optional"} for t in ALLOWED["cancer_type"]}
    proc = JsonSchemaProcessor(gen.tokenizer, json_schema(recorded), vocab_size=gen.args.vocab_size)
    named = 0
    for seed in range(2):
        for r in gen.generate(["Report: left breast, pT2 N0.", "x", "Diagnosis:"], max_new_tokens=800,
                              temperature=1.0, seed=seed, logits_processor=proc):
            obj = json.loads(r.text)
            if obj["cancer_type"] is None:           # no type named: the open schema
                continue
            named += 1
            assert obj["pT"] in ALLOWED["pT"], r.text
            assert all(v is None for f, v in obj.items() if f not in ("cancer_type", "pT", "ER")), r.text
    assert named


def test_choice_processor_allows_exactly_one_choice(checkpoint):
    gen = Generator.from_pretrained(checkpoint)
    choices = ALLOWED["pN"] + ["not mentioned"]
    proc = ChoiceProcessor(gen.tokenizer, choices, vocab_size=gen.args.vocab_size)
    seen = set()
    for seed in range(3):
        for r in gen.generate(["Report: pT2 N0.", "x", "Q:"], max_new_tokens=40, temperature=1.0, seed=seed,
                              logits_processor=proc):
            assert r.finish_reason == "eos" and r.text.strip() in choices, r.text
            seen.add(r.text.strip())
    assert len(seen) > 1                  # sampling explores the choices, the grammar still bounds them
    with pytest.raises(ValueError, match="at least one choice"):
        ChoiceProcessor(gen.tokenizer, [])


def test_eval_answers_each_question_from_its_fields_values(checkpoint, data):
    records = cancer_eval.read_jsonl(data / "phenotype-qa" / "test.jsonl")[:26]    # two reports, fields interleaved
    templates = load_templates()
    constrained = cancer_eval.ModelSystem("model", checkpoint, "phenotype-qa", 4, 40, templates)
    answers = constrained.answers(records)
    free = cancer_eval.ModelSystem("model", checkpoint, "phenotype-qa", 4, 40, templates, constrained=False)
    free_answers = free.answers(records)
    for r, a, f in zip(records, answers, free_answers):
        if r["field"] in ALLOWED:
            assert a in ALLOWED[r["field"]] + ["not mentioned"], (r["field"], a)
        else:                              # free text: the same answer as unconstrained, in the record's place
            assert a == f
    assert any(f not in ALLOWED.get(r["field"], [f]) + ["not mentioned"] for r, f in zip(records, free_answers))


def test_generator_task_helpers(checkpoint):
    gen = Generator.from_pretrained(checkpoint)
    fields = gen.extract_phenotypes("FINAL DIAGNOSIS: Left breast, invasive ductal carcinoma.", max_new_tokens=800)
    assert list(fields) == list(FIELDS)
    guided = gen.extract_phenotypes("Right lung, adenocarcinoma.", max_new_tokens=800, guidance_scale=2.0)
    assert list(guided) == list(FIELDS)     # guidance reshapes the scores, the schema still bounds the answer
    assert isinstance(gen.generate_diagnosis("Left breast mass.", max_new_tokens=8), str)
    assert isinstance(gen.generate_diagnosis("Left breast mass.", max_new_tokens=8, guidance_scale=1.5), str)
    with pytest.raises(ValueError, match="non-empty"):
        gen.extract_phenotypes("  ")


def test_eval_guides_each_question_against_its_prompt_without_the_report(checkpoint, data):
    records = cancer_eval.read_jsonl(data / "phenotype-qa" / "test.jsonl")[:4]
    templates = load_templates()
    system = cancer_eval.ModelSystem("model", checkpoint, "phenotype-qa", 8, 6, templates, constrained=False,
                                     guidance_scale=3.0)
    prompts = [r["prompt"] for r in records]
    negatives = [task_prompt(r["task"], "", templates, r["field"]) for r in records]
    options = dict(max_new_tokens=6, temperature=0.0, stop=templates["stop"])
    guided = [r.text.strip() for r in system.generator.generate(prompts, guidance_scale=3.0,
                                                                negative_prompts=negatives, **options)]
    unguided = [r.text.strip() for r in system.generator.generate(prompts, **options)]
    assert guided != unguided            # so the comparison below can tell the two apart
    assert system.answers(records) == guided


@pytest.mark.parametrize("task", ["phenotype-qa", "phenotype-json", "diagnosis"])
def test_eval_cli_end_to_end(task, checkpoint, data, tmp_path):
    cancer_eval.main(["--checkpoint", str(checkpoint), "--task", task, "--data", str(data), "--out", str(tmp_path),
                      "--limit", "2", "--max-new-tokens", "6", "--perturb", "misspell,ocr,counterfactual",
                      "--guidance-scale", "1.5"])
    result = json.loads((tmp_path / f"eval_{task}_test.json").read_text())
    assert result["guidance_scale"] == 1.5
    assert result["schema_per_cancer_type"] == (task == "phenotype-json")     # the datasets record the fields
    table = (tmp_path / f"eval_{task}_test.md").read_text()
    assert set(result["systems"]) == {"model", "majority", "regex"}
    assert result["n_reports"] == 2
    assert len(result["robustness"]) == 9
    for name, s in result["systems"].items():
        assert set(s["fields"]) >= {"pT", "stage"} and 0 <= s["micro"]["f1"] <= 1
        assert f"| {name} |" in table
    if task == "phenotype-json":      # 6 tokens cannot close the object: every answer is a counted failure
        assert result["systems"]["model"]["parse_failures"] == 2
    assert "Robustness" in table
    for row in result["robustness"]:   # counterfactual rows of the phenotype tasks count how answers follow the edit
        if row["perturbation"] == "counterfactual" and task != "diagnosis":
            edits = row["n"] // (len(FIELDS) if task == "phenotype-qa" else 1)
            assert sum(row["edited_field_answers"].values()) == edits and "Counterfactual edits" in table
        else:
            assert "edited_field_answers" not in row
    if task == "diagnosis":
        assert result["comparisons"] == {}
    else:                             # the model against each baseline, per field and micro
        assert set(result["comparisons"]) == {"majority", "regex"}
        for name, fields in result["comparisons"].items():
            assert set(fields) == {*result["systems"]["model"]["fields"], "micro"} and f"vs {name}" in table
            micro = result["systems"]["model"]["micro"]["f1"] - result["systems"][name]["micro"]["f1"]
            assert fields["micro"]["delta"] == pytest.approx(micro)
    rows = [json.loads(line) for line in open(tmp_path / f"eval_{task}_test_predictions.jsonl")]
    clean = [r for r in rows if r["perturbation"] is None]
    assert len(clean) == 3 * result["n_examples"] and {r["system"] for r in clean} == set(result["systems"])
    perturbed = {(r["perturbation"], r["system"]) for r in rows if r["perturbation"]}
    assert perturbed <= {(x["perturbation"], x["system"]) for x in result["robustness"] if x["n"]}
    assert all(isinstance(r["gold"], str) and isinstance(r["answer"], str) for r in rows)


def test_eval_refuses_a_checkpoint_with_another_tokenizer(checkpoint, data, tmp_path):
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["tokenizer"]["sha256"] = "0" * 64
    other = tmp_path / "tasks"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="not the tokenizer the datasets were built with"):
        cancer_eval.evaluate(checkpoint, "diagnosis", data=other, out=tmp_path, verbose=False)
    with pytest.raises(SystemExit, match="unknown"):
        cancer_eval.main(["--checkpoint", str(checkpoint), "--task", "diagnosis", "--data", str(data),
                          "--perturb", "typos"])


def test_zero_shot_baseline_from_a_transformers_checkpoint(checkpoint, data, tmp_path):
    """A checkpoint as transformers saves it, with a tokenizer of its own (not the datasets'), joins the table
    under its name: the manifest's tokenizer record binds the fine-tuned model only, and prompts are text."""
    pytest.importorskip("transformers")
    from hf_util import hf_model, tiny_args
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(r["report"] for r in cancer_eval.read_jsonl(data / "phenotype-json" / "train.jsonl")))
    own = train_tokenizer([corpus], tmp_path / "own", vocab_size=400)
    assert own.fingerprint() != Tokenizer(checkpoint / "tokenizer.model").fingerprint()
    baseline = tmp_path / "Mistral-tiny-random"
    hf_model(tiny_args(vocab_size=own.vocab_size, max_seq_len=2048)).save_pretrained(baseline)
    (baseline / "tokenizer.model").write_bytes(own.path.read_bytes())
    result = cancer_eval.evaluate(checkpoint, "phenotype-json", data=data, out=tmp_path, limit=2, max_new_tokens=6,
                                  baseline_checkpoint=baseline, verbose=False)
    assert set(result["systems"]) == {"model", "majority", "regex", "zero-shot Mistral-tiny-random"}
    assert result["systems"]["zero-shot Mistral-tiny-random"]["parse_failures"] == 2     # 6 tokens close nothing
    assert "| zero-shot Mistral-tiny-random |" in (tmp_path / "eval_phenotype-json_test.md").read_text()


@pytest.mark.parametrize("task", ["phenotype-qa", "phenotype-json", "diagnosis"])
def test_counterfactual_records_carry_the_edited_answer(task, data):
    """An edited report's record is rebuilt whole: prompt, fields and completion all say the new value."""
    templates = load_templates("cancerllm/tasks/templates.json")
    records = cancer_eval.read_jsonl(data / task / "train.jsonl")
    edited, skipped = cancer_eval.perturb_records(records, "counterfactual", templates, 0, 0.1, 0.05)
    assert edited and len(edited) + skipped == len(records)
    changed = 0
    for r in edited:
        (rebuilt,) = [e for e in task_examples(task, r["patient_id"], r["report"], r["fields"], templates)
                      if e.get("field") == r.get("field")]
        assert r["prompt"] == rebuilt["prompt"] and r["completion"] == rebuilt["completion"]
        original = next(o for o in records if o["patient_id"] == r["patient_id"] and o.get("field") == r.get("field"))
        changed += r["completion"] != original["completion"]
    assert changed > 0


@pytest.mark.parametrize("task", ["phenotype-qa", "phenotype-json"])
def test_edit_following_counts_new_original_and_other_answers(task, data):
    templates = load_templates("cancerllm/tasks/templates.json")
    records = cancer_eval.read_jsonl(data / task / "train.jsonl")
    edited, _ = cancer_eval.perturb_records(records, "counterfactual", templates, 0, 0.1, 0.05)
    original = {r["patient_id"]: r["fields"] for r in records}
    before = {(r["patient_id"], r.get("field")): r["completion"] for r in records}
    reports = len({r["patient_id"] for r in edited})       # one field edited per report
    follow = lambda answers: cancer_eval.edit_following(task, edited, answers, original)
    assert follow([r["completion"] for r in edited]) == {"new": reports, "original": 0, "other": 0}
    assert follow([before[r["patient_id"], r.get("field")] for r in edited]) == {"new": 0, "original": reports,
                                                                                 "other": 0}
    assert follow(["not mentioned" if task == "phenotype-qa" else "{}"] * len(edited)) == {
        "new": 0, "original": 0, "other": reports}


def test_eval_scores_an_ensemble_of_checkpoints(checkpoint, data, tmp_path):
    """Several --checkpoint directories are decoded as one ensemble: the same model twice scores as the model."""
    def model_scores(*checkpoints):
        out = tmp_path / str(len(checkpoints))
        cancer_eval.main(["--checkpoint", *map(str, checkpoints), "--task", "phenotype-qa", "--data", str(data),
                          "--out", str(out), "--limit", "1", "--max-new-tokens", "4"])
        result = json.loads((out / "eval_phenotype-qa_test.json").read_text())
        assert result["checkpoints"] == [str(c) for c in checkpoints]
        return result["systems"]["model"]
    assert model_scores(checkpoint, checkpoint) == model_scores(checkpoint)


def test_eval_decodes_every_checkpoint_as_asked_and_says_so(checkpoint, data, tmp_path, monkeypatch):
    """--dtype and --quantize reach Generator.from_pretrained for the model and its peers, and the report records
    them; an unknown quantize value is refused by name."""
    asked = []
    load = Generator.from_pretrained.__func__
    monkeypatch.setattr(Generator, "from_pretrained",
                        classmethod(lambda cls, path, **options: asked.append(options) or load(cls, path, **options)))
    cancer_eval.main(["--checkpoint", str(checkpoint), "--task", "phenotype-json", "--data", str(data),
                      "--out", str(tmp_path), "--limit", "1", "--max-new-tokens", "8", "--peer", f"twin={checkpoint}",
                      "--dtype", "bfloat16", "--quantize", "int8"])
    assert asked == [{"dtype": torch.bfloat16, "quantize": "int8"}] * 2
    result = json.loads((tmp_path / "eval_phenotype-json_test.json").read_text())
    assert result["decoding"] == {"dtype": "bfloat16", "quantize": "int8"}
    assert "decoded with dtype bfloat16, quantize int8" in (tmp_path / "eval_phenotype-json_test.md").read_text()
    # "fastest": measured once (here fp32 made the faster), the same type for every checkpoint, recorded as chosen
    monkeypatch.setenv("CANCERLLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(fast_dtype, "time_linears", lambda shapes, rows: {"bfloat16": 3.0, "float32": 1.0})
    asked.clear()
    cancer_eval.evaluate(checkpoint, "phenotype-json", data=data, out=tmp_path, limit=1, max_new_tokens=8,
                         peers={"twin": checkpoint}, dtype="fastest", verbose=False)
    assert asked == [{"dtype": torch.float32, "quantize": None}] * 2
    result = json.loads((tmp_path / "eval_phenotype-json_test.json").read_text())
    assert result["decoding"] == {"dtype": "float32", "quantize": None}
    with pytest.raises(ValueError, match="quantize"):
        cancer_eval.evaluate(checkpoint, "phenotype-json", data=data, out=tmp_path, limit=1, quantize="int4",
                             verbose=False)
    with pytest.raises(SystemExit):
        cancer_eval.main(["--checkpoint", str(checkpoint), "--task", "phenotype-json", "--data", str(data),
                          "--quantize", "int4"])


def test_eval_decodes_by_beam_search_when_asked(checkpoint, data, tmp_path):
    cancer_eval.main(["--checkpoint", str(checkpoint), "--task", "phenotype-qa", "--data", str(data), "--out",
                      str(tmp_path), "--limit", "1", "--num-beams", "3", "--length-penalty", "0"])
    result = json.loads((tmp_path / "eval_phenotype-qa_test.json").read_text())
    assert (result["num_beams"], result["length_penalty"]) == (3, 0.0)
    assert "beam search: 3 beams, length penalty 0.0" in (tmp_path / "eval_phenotype-qa_test.md").read_text()
    with pytest.raises(SystemExit):
        cancer_eval.main(["--checkpoint", str(checkpoint), "--task", "phenotype-qa", "--data", str(data),
                          "--num-beams", "0"])


def test_eval_open_schema_leaves_every_field_open(checkpoint, data, tmp_path):
    cancer_eval.main(["--checkpoint", str(checkpoint), "--task", "phenotype-json", "--data", str(data), "--out",
                      str(tmp_path), "--limit", "1", "--max-new-tokens", "4", "--open-schema"])
    assert json.loads((tmp_path / "eval_phenotype-json_test.json").read_text())["schema_per_cancer_type"] is False


@pytest.mark.parametrize("num_beams", [1, 2])
def test_the_helper_answers_each_report_alone_as_the_batched_eval_did(checkpoint, data, tmp_path, num_beams):
    """The held-out check's promise: Generator.extract_phenotypes on an export that carries its datasets' prompt
    settings (schema per cancer type, stage groups) gives the eval's answer, though the eval decoded the reports
    in one batch (batch-invariant decoding) and looked their stage up as the helper does; greedy or beam search
    alike."""
    export = tmp_path / "export"
    shutil.copytree(checkpoint, export)
    load_prompt_settings(data).save(export)
    result = cancer_eval.evaluate(export, "phenotype-json", data=data, out=tmp_path, batch_size=8,
                                  max_new_tokens=800, verbose=False, num_beams=num_beams)
    assert result["stage_from_tnm"] and result["schema_per_cancer_type"] and result["num_beams"] == num_beams
    rows = [json.loads(line) for line in (tmp_path / "eval_phenotype-json_test_predictions.jsonl").open()]
    records = cancer_eval.read_jsonl(data / "phenotype-json" / "test.jsonl")
    whole = {r["patient_id"]: r["text"] for r in read_reports("data/tcga/reports.csv")}   # the helper cuts them
    gen = Generator.from_pretrained(export)
    assert gen.batch_invariant and len(records) > 1
    for record, row in zip(records, [r for r in rows if r["system"] == "model"], strict=True):
        answer = gen.extract_phenotypes(whole[record["patient_id"]], max_new_tokens=800, num_beams=num_beams)
        assert answer == json.loads(row["answer"]), record["patient_id"]


def test_eval_model_stage_keeps_each_models_own_stage(checkpoint, data, tmp_path):
    system = cancer_eval.ModelSystem("model", checkpoint, "phenotype-json", 8, 4, load_templates(),
                                     stage_groups={"Lung adenocarcinoma": {"t1b|n0|": ["Stage IA"]}})
    answer = {**dict.fromkeys(FIELDS), "cancer_type": "Lung adenocarcinoma", "pT": "T1b", "pN": "N0"}
    assert json.loads(system.finish(json.dumps(answer)))["stage"] == "Stage IA"
    assert system.finish(json.dumps({**answer, "pT": "T2"})) == json.dumps({**answer, "pT": "T2"})
    assert system.finish('{"cancer_type": "Lung') == '{"cancer_type": "Lung'    # cut short: left as it is
    cancer_eval.main(["--checkpoint", str(checkpoint), "--task", "phenotype-json", "--data", str(data), "--out",
                      str(tmp_path), "--limit", "1", "--max-new-tokens", "4", "--model-stage"])
    assert json.loads((tmp_path / "eval_phenotype-json_test.json").read_text())["stage_from_tnm"] is False

"""The tasks package's layers, and prompts made one way for training and inference: prompt settings saved beside
the datasets and an export, read back by the Generator helpers."""
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from cancerllm.tasks.api import extract_phenotypes, generate_diagnosis
from cancerllm.tasks.build import read_jsonl
from cancerllm.tasks.fields import FIELDS
from cancerllm.tasks.prompts import SETTINGS_FILE, PromptSettings, load_prompt_settings, load_templates
from tasks_util import first_reports_datasets

# In data-flow order: a module may import the ones before it, never one after it.
LAYERS = ["fields", "mentions", "prompts", "perturb", "build", "baselines", "metrics"]
# The Generator helpers need the prompts and, lazily, the grammars; not the datasets, baselines or metrics.
NOT_FOR_API = ["perturb", "build", "baselines", "metrics", "constrained"]

IMPORTS = """
import importlib, json, sys
loaded = {}
for name in sys.argv[1:]:
    for m in [m for m in sys.modules if m.startswith("cancerllm.tasks.")]:
        del sys.modules[m]
    importlib.import_module("cancerllm.tasks." + name)
    loaded[name] = [m.rsplit(".", 1)[1] for m in sys.modules if m.startswith("cancerllm.tasks.")]
print(json.dumps(loaded))
"""


def test_no_layer_imports_a_later_one():
    out = subprocess.run([sys.executable, "-c", IMPORTS, *LAYERS, "api"], capture_output=True, text=True,
                         check=True).stdout
    loaded = json.loads(out)
    for i, name in enumerate(LAYERS):
        later = set(LAYERS[i + 1:]) & set(loaded[name])
        assert not later, f"cancerllm.tasks.{name} imports {sorted(later)}"
    assert not set(NOT_FOR_API) & set(loaded["api"]), loaded["api"]


class Recorder:
    """A stand-in Generator loaded from `directory`: records its prompts, answers an all-null object (but for the
    cancer type, when given)."""

    def __init__(self, directory, cancer_type=None):
        self.tokenizer = SimpleNamespace(path=directory / "tokenizer.model")
        self.prompt_settings = load_prompt_settings(directory)      # as Generator.from_pretrained reads them
        self.task_processors = SimpleNamespace(json=self.schema)      # no grammar to compile for a recorder
        self.prompts, self.schemas, self.cancer_type = [], [], cancer_type

    def schema(self, recorded_fields=None):
        self.schemas.append(recorded_fields)

    def generate(self, prompts, **options):
        self.prompts += prompts
        answer = {**dict.fromkeys(FIELDS), "cancer_type": self.cancer_type}
        return [SimpleNamespace(text=json.dumps(answer)) for _ in prompts]


@pytest.fixture(scope="module")
def small_tasks(tmp_path_factory):
    """Datasets of the first 12 bundled reports with a 600-character cut, and those reports whole."""
    tmp = tmp_path_factory.mktemp("prompts")
    reports = first_reports_datasets(tmp, 12, val_frac=0, test_frac=0, tokenizer=None)
    return tmp / "tasks", reports


def test_inference_prompts_are_the_training_prompts(small_tasks, tmp_path):
    tasks_dir, reports = small_tasks
    settings = load_prompt_settings(tasks_dir)
    assert settings.max_report_chars == 600 and settings.templates == load_templates()
    for task in ("phenotype-qa", "phenotype-json", "diagnosis"):
        for r in read_jsonl(tasks_dir / task / "train.jsonl"):
            assert settings.prompt(task, reports[r["patient_id"]], r.get("field")) == r["prompt"]
    export = tmp_path / "export"
    export.mkdir()
    settings.save(export)
    gen = Recorder(export)
    records = read_jsonl(tasks_dir / "phenotype-json" / "train.jsonl")
    for r in records:
        assert extract_phenotypes(gen, reports[r["patient_id"]]) == dict.fromkeys(FIELDS)
    assert gen.prompts == [r["prompt"] for r in records]
    diagnosis = read_jsonl(tasks_dir / "diagnosis" / "train.jsonl")[0]
    generate_diagnosis(gen, reports[diagnosis["patient_id"]])
    assert gen.prompts[-1] == diagnosis["prompt"]


def test_settings_round_trip_and_change_what_the_helpers_render(tmp_path):
    report = " ".join(f"Sentence {i} of the gross description, nothing staged." for i in range(80))
    templates = load_templates()
    templates["json_instruction"] = "List the phenotypes ({keys}) as JSON."
    settings = PromptSettings(templates, max_report_chars=900)
    settings.save(tmp_path)
    assert load_prompt_settings(tmp_path) == settings
    assert json.loads((tmp_path / SETTINGS_FILE).read_text())["chat_format"] == "plain"

    plain = Recorder(tmp_path / "no-settings")           # the fallback: packaged templates, a 2,000-character cut
    extract_phenotypes(plain, report)
    saved = Recorder(tmp_path)
    extract_phenotypes(saved, report)
    assert "List the phenotypes" in saved.prompts[0] and "List the phenotypes" not in plain.prompts[0]
    assert len(saved.prompts[0]) < len(plain.prompts[0])
    extract_phenotypes(saved, report, max_report_chars=None)                # an explicit cut wins
    assert report in saved.prompts[-1]
    extract_phenotypes(saved, report, prompt_settings=PromptSettings(load_templates(), 900))
    assert "List the phenotypes" not in saved.prompts[-1]
    assert saved.schemas == [None] * 3


def test_settings_carry_the_recorded_fields_to_the_answer_schema(tmp_path):
    recorded = {"Prostate adenocarcinoma": {"gleason": "required", "pT": "optional"}}
    settings = PromptSettings(load_templates(), 900, recorded_fields=recorded)
    settings.save(tmp_path)
    assert load_prompt_settings(tmp_path) == settings and settings.same_prompts(PromptSettings(load_templates(), 900))
    saved = Recorder(tmp_path)
    extract_phenotypes(saved, "Prostate, radical prostatectomy: adenocarcinoma, Gleason 3+4=7.")
    assert saved.schemas == [recorded]
    raw = json.loads((tmp_path / SETTINGS_FILE).read_text())
    (tmp_path / SETTINGS_FILE).write_text(json.dumps({**raw, "recorded_fields": {"Prostate adenocarcinoma":
                                                                                 {"gleason": "sometimes"}}}))
    with pytest.raises(ValueError, match=f"{SETTINGS_FILE}: recorded_fields.*'sometimes'"):
        load_prompt_settings(tmp_path)


def test_settings_carry_the_stage_groups_to_the_answers_stage(tmp_path):
    groups = {"Breast invasive carcinoma": {"||": ["Stage IIA"]}}   # the Recorder answers null T, N and M
    settings = PromptSettings(load_templates(), 900, stage_groups=groups)
    settings.save(tmp_path)
    assert load_prompt_settings(tmp_path) == settings and settings.same_prompts(PromptSettings(load_templates(), 900))
    saved = Recorder(tmp_path, cancer_type="Breast invasive carcinoma")
    assert extract_phenotypes(saved, "Left breast: invasive ductal carcinoma.")["stage"] == "Stage IIA"
    assert extract_phenotypes(saved, "Left breast: invasive ductal carcinoma.", stage_from_tnm=False)["stage"] is None
    raw = json.loads((tmp_path / SETTINGS_FILE).read_text())
    (tmp_path / SETTINGS_FILE).write_text(json.dumps({**raw, "stage_groups": {"Breast invasive carcinoma":
                                                                              {"||": ["Stage 2A"]}}}))
    with pytest.raises(ValueError, match=f"{SETTINGS_FILE}: stage_groups.*'Stage 2A'"):
        load_prompt_settings(tmp_path)


def test_bad_settings_name_the_file(tmp_path):
    (tmp_path / SETTINGS_FILE).write_text(json.dumps({"templates": load_templates(), "chat_format": "chatml"}))
    with pytest.raises(ValueError, match=f"{SETTINGS_FILE}: chat_format='chatml'"):
        load_prompt_settings(tmp_path)
    (tmp_path / SETTINGS_FILE).write_text(json.dumps({"templates": load_templates(), "max_report_chars": 100}))
    with pytest.raises(ValueError, match="max_report_chars=100"):
        load_prompt_settings(tmp_path)
    with pytest.raises(ValueError, match="non-empty"):
        extract_phenotypes(Recorder(tmp_path / "none"), "  ")


def test_sft_shards_record_and_eval_checks_the_prompt_settings(small_tasks, tmp_path):
    from cancerllm import eval as cancer_eval
    from cancerllm.data.prepare import main as prepare
    from cancerllm.tokenizer import mistral_tokenizer_path
    tasks_dir, _ = small_tasks
    manifest = prepare([str(tasks_dir / "diagnosis" / "train.jsonl"), "--sft", "--tokenizer",
                        str(mistral_tokenizer_path()), "--out", str(tmp_path / "shards"), "--quiet", "--workers", "1",
                        "--prompt-settings", str(tasks_dir / SETTINGS_FILE)])
    assert PromptSettings(**manifest["prompt_settings"]) == load_prompt_settings(tasks_dir)

    settings = load_prompt_settings(tasks_dir)
    export = tmp_path / "export"
    export.mkdir()
    cancer_eval.check_prompt_settings(export, settings, tasks_dir)          # records none: not held to any
    settings.save(export)
    cancer_eval.check_prompt_settings(export, settings, tasks_dir)
    PromptSettings(settings.templates, 1200).save(export)
    with pytest.raises(ValueError, match="differs from the prompt settings of the datasets"):
        cancer_eval.check_prompt_settings(export, settings, tasks_dir)

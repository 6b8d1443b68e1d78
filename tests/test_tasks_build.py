import csv
import gzip
import importlib.util
import itertools
import json
import re
from collections import Counter

import pytest

from cancerllm.tasks.build import build, split_patients, top_up
from cancerllm.tasks.fields import CANCER_TYPES, FIELDS, normalize_value, recorded_by_cancer_type, stage_groups
from cancerllm.tasks.mentions import find_mentions
from cancerllm.tasks.prompts import TASKS, find_diagnosis_section, load_templates, truncate_report

OCR_REPORTS = "data/tcga/ocr_reports.csv.gz"
LABEL_HEADER = open("data/tcga/patient_labels.csv").readline().strip().split(",")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("tasks")
    return out, build(out=out, max_report_chars=1500, counterfactual_copies=2, verbose=False)


def read(path):
    return [json.loads(line) for line in open(path)]


def test_patients_never_in_two_splits_and_counts_add_up(built):
    out, m = built
    assert m["reports_used"] + sum(v for k, v in m["failures"].items() if k.startswith(("empty", "report_"))) \
        == m["reports_read"]
    assert sum(m["patients"].values()) == m["reports_used"]
    for task in TASKS:
        owner = {}
        for split in ("train", "val", "test"):
            rows = read(out / task / f"{split}.jsonl")
            assert len(rows) == m["examples"][task][split]
            patients = {r["patient_id"] for r in rows}
            assert len(patients) == m["patients"][split]
            for p in patients:
                assert owner.setdefault(p, split) == split, f"{p} in {owner[p]} and {split}"
            if task == "phenotype-qa":
                assert len(rows) == len(FIELDS) * len(patients)


def test_records_hold_prompt_completion_and_truncated_reports(built):
    out, m = built
    qa = read(out / "phenotype-qa" / "val.jsonl")
    assert all(len(r["report"]) <= 1500 and r["report"] in r["prompt"] for r in qa)
    assert all(r["completion"] == (r["fields"][r["field"]] or "not mentioned") for r in qa)
    js = read(out / "phenotype-json" / "val.jsonl")
    assert all(list(json.loads(r["completion"])) == list(FIELDS) for r in js)
    dx = read(out / "diagnosis" / "val.jsonl")
    assert all(r["completion"].endswith(".") and "\n" not in r["completion"] for r in dx)
    assert 0.5 < m["diagnosis_section"]["fraction_found"] <= 1
    assert m["truncation"]["truncated_phenotype"] > 0


def test_counterfactual_copies_edit_training_reports_and_answers_together(built):
    out, m = built
    train = {r["patient_id"]: r for r in read(out / "phenotype-json" / "train.jsonl")}
    edited = read(out / "phenotype-json" / "train-counterfactual.jsonl")
    assert len(edited) == m["counterfactual_train"]["examples"]["phenotype-json"] > len(train) // 2
    assert len(read(out / "phenotype-qa" / "train-counterfactual.jsonl")) == len(FIELDS) * len(edited)
    assert sum(m["counterfactual_train"]["fields_edited"].values()) == sum(len(r["counterfactual"]) for r in edited)
    copies = {}
    for r in edited:
        original = train[r["patient_id"]]                      # training patients only
        copies[r["patient_id"]] = copies.get(r["patient_id"], 0) + 1
        assert r["report"] != original["report"] and r["report"] in r["prompt"]
        assert json.loads(r["completion"]) == r["fields"]
        for f in FIELDS:
            old, new = normalize_value(f, original["fields"][f]), normalize_value(f, r["fields"][f])
            assert (old != new) == (f in r["counterfactual"])
            if old != new:                                     # the text now states the new answer
                assert new in {normalize_value(f, m.value) for m in find_mentions(f, r["report"])}
    assert max(copies.values()) == 2
    for split in ("val", "test"):
        assert not any("counterfactual" in r for r in read(out / "phenotype-json" / f"{split}.jsonl"))


def test_templates_come_from_the_file(tmp_path):
    templates = load_templates()
    templates["questions"]["pT"] = "Which T category does the report give?"
    path = tmp_path / "t.json"
    path.write_text(json.dumps(templates))
    reports, labels = small_inputs(tmp_path, n=4)
    build(reports, labels, tmp_path / "out", templates=path, test_frac=0, val_frac=0, verbose=False)
    rows = read(tmp_path / "out" / "phenotype-qa" / "train.jsonl")
    assert sum("Which T category does the report give?" in r["prompt"] for r in rows) == 4


def small_inputs(tmp_path, n, edit=None):
    """The first n bundled reports and their registry rows, optionally edited by edit(report_rows, label_rows)."""
    with open("data/tcga/reports.csv", newline="") as f:
        reports = list(csv.DictReader(f))[:n]
    ids = {r["patient_id"] for r in reports}
    with open("data/tcga/patient_labels.csv", newline="") as f:
        labels = [r for r in csv.DictReader(f) if r["patient_id"] in ids]
    if edit:
        edit(reports, labels)
    return write_csv(tmp_path / "reports.csv", reports), write_csv(tmp_path / "labels.csv", labels)


def test_empty_reports_and_unlabelled_reports_are_counted(tmp_path):
    def edit(reports, labels):
        reports[0]["text"] = "   "
        labels.remove(next(l for l in labels if l["patient_id"] == reports[1]["patient_id"]))
    reports, labels = small_inputs(tmp_path, n=6, edit=edit)
    m = build(reports, labels, tmp_path / "out", verbose=False)
    assert m["failures"]["empty_report_text"] == 1
    assert m["failures"]["report_without_registry_row"] == 1
    assert m["reports_used"] == 4


def test_invalid_label_value_names_file_line_and_column(tmp_path):
    def edit(reports, labels):
        labels[2]["ajcc_pathologic_t"] = "T9"
    reports, labels = small_inputs(tmp_path, n=5, edit=edit)
    with pytest.raises(ValueError, match=r"labels.csv:4:ajcc_pathologic_t: 'T9' is not an allowed pT"):
        build(reports, labels, tmp_path / "out", verbose=False)


def test_missing_label_column_is_an_error(tmp_path):
    def edit(reports, labels):
        for row in labels:
            del row["grade"]
    reports, labels = small_inputs(tmp_path, n=3, edit=edit)
    with pytest.raises(ValueError, match="missing column.*grade"):
        build(reports, labels, tmp_path / "out", verbose=False)


def test_split_is_seeded():
    ids = [f"P{i}" for i in range(100)]
    a, b, c = split_patients(ids, 0, 0.1, 0.1), split_patients(ids, 0, 0.1, 0.1), split_patients(ids, 1, 0.1, 0.1)
    assert a == b and a != c
    assert sorted(a.values()).count("test") == 10


def test_diagnosis_section_rule():
    text = ("CLINICAL HISTORY. Mass. FROZEN SECTION DIAGNOSIS: benign. FINAL DIAGNOSIS: Breast, left: invasive "
            "ductal carcinoma, grade 2. COMMENT. See note.")
    start, end = find_diagnosis_section(text)
    assert text[start:end].startswith("FINAL DIAGNOSIS:") and text[end:].startswith("COMMENT.")
    assert find_diagnosis_section("Clinical diagnosis: mass. Gross: tan tissue.") is None


def test_truncation_keeps_head_evidence_and_key_section():
    filler = "Tan soft tissue. " * 60                       # 1,020 characters without a stated value
    text = ("Head of the report. " * 15 + filler + "Estrogen receptor: positive. " + filler
            + "SYNOPTIC DATA. Size 2 cm. Margins clear. " + filler + "Stage: pT2 pN1a. " + filler)
    cut, truncated, evidence = truncate_report(text, 600, text.index("SYNOPTIC"), " [...] ")
    assert truncated and evidence == 2 and len(cut) <= 600
    assert cut.startswith("Head of the report. " * 10)
    # the statements far from the key section survive, in text order, each set off by the marker
    assert cut.index(" [...] Estrogen receptor: positive. ") < cut.index(" [...] SYNOPTIC DATA. Size 2 cm.")
    assert cut.endswith(" [...] Stage: pT2 pN1a. ")
    assert truncate_report("short", 600, None, " [...] ") == ("short", False, 0)


def write_csv(path, rows):
    with (gzip.open(path, "wt", newline="") if path.suffix == ".gz" else open(path, "w", newline="")) as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def bundled_ocr_rows(n):
    with gzip.open(OCR_REPORTS, "rt", newline="") as f:
        return list(itertools.islice(csv.DictReader(f), n))


def labels_with(path, rows, tmp_path):
    """labels.csv at `path` plus the bundled registry rows of `rows`' patients."""
    ids = {r["patient_id"] for r in rows}
    with open(path, newline="") as f:
        labels = list(csv.DictReader(f))
    with open("data/tcga/patient_labels.csv", newline="") as f:
        labels += [r for r in csv.DictReader(f) if r["patient_id"] in ids]
    return write_csv(tmp_path / "all-labels.csv", labels)


def test_extra_training_reports_join_the_training_split_only(tmp_path):
    reports, labels = small_inputs(tmp_path, n=30)
    extra_rows = bundled_ocr_rows(6)
    extra_rows[0] = {**extra_rows[0], "text": " "}
    extra = write_csv(tmp_path / "extra.csv.gz", extra_rows)
    labels = labels_with(labels, extra_rows, tmp_path)
    alone = build(reports, labels, tmp_path / "alone", max_report_chars=800, verbose=False)
    m = build(reports, labels, tmp_path / "with", max_report_chars=800, extra_train_reports=extra, verbose=False)
    assert m["extra_train_reports_used"] == 5 and m["failures"]["empty_report_text"] == 1
    assert m["extra_train_patients"] == sorted(r["patient_id"] for r in extra_rows[1:])
    assert m["failures"]["registry_row_without_report"] == 0 < alone["failures"]["registry_row_without_report"]
    assert m["patients"] == {**alone["patients"], "train": alone["patients"]["train"] + 5}
    for task in TASKS:
        for split in ("val", "test"):
            with_extra, alone_rows = (read(tmp_path / d / task / f"{split}.jsonl") for d in ("with", "alone"))
            assert with_extra == alone_rows
        train = {r["patient_id"] for r in read(tmp_path / "with" / task / "train.jsonl")}
        assert {r["patient_id"] for r in extra_rows[1:]} <= train


def test_top_up_brings_each_cancer_type_to_the_floor_and_no_further():
    kinds = {"A": 5, "B": 1, "C": 0}                       # training patients per type before the extras
    extra = [{"patient_id": f"{t}{i}"} for t in "ABCD" for i in range(4)]
    registry = {r["patient_id"]: {"cancer_type": r["patient_id"][0]} for r in extra}
    train_types = [t for t, n in kinds.items() for _ in range(n)]

    def added(floor, seed=0):
        chosen = top_up(extra, train_types, floor, registry, seed)
        return Counter(registry[r["patient_id"]]["cancer_type"] for r in chosen)

    assert added(3) == {"B": 2, "C": 3, "D": 3}
    assert added("largest") == {"B": 4, "C": 4, "D": 4}    # the floor is 5 (A's count); the pool has only 4 each
    assert added(0) == {}
    picks = [{r["patient_id"] for r in top_up(extra, train_types, 2, registry, seed)} for seed in range(6)]
    assert picks[0] == {r["patient_id"] for r in top_up(extra[::-1], train_types, 2, registry, 0)}  # seeded
    assert len({frozenset(p) for p in picks}) > 1                                                     # by seed
    for bad in (-1, "most", 2.5, True):
        with pytest.raises(ValueError, match="extra_train_floor"):
            top_up(extra, train_types, bad, registry, 0)


def test_extra_train_floor_takes_only_the_topping_up_reports(tmp_path):
    reports, labels = small_inputs(tmp_path, n=30)
    extra_rows = bundled_ocr_rows(12)
    extra = write_csv(tmp_path / "extra.csv", extra_rows)
    labels = labels_with(labels, extra_rows, tmp_path)

    def training_types(floor):
        m = build(reports, labels, tmp_path / str(floor), max_report_chars=800, extra_train_reports=extra,
                  extra_train_floor=floor, verbose=False)
        rows = read(tmp_path / str(floor) / "phenotype-json" / "train.jsonl")
        return m, Counter(r["fields"]["cancer_type"] for r in rows)

    (none, cleaned), (_, everything), (some, topped) = map(training_types, (0, None, "largest"))
    assert none["extra_train_reports_used"] == 0 and none["extra_train_floor"] == 0
    largest = max(cleaned.values())
    assert topped == {t: max(cleaned[t], min(largest, n)) for t, n in everything.items()} != everything
    assert some["extra_train_reports_used"] == sum(topped.values()) - sum(cleaned.values()) > 0
    assert some["extra_train_reports_beyond_floor"] == sum(everything.values()) - sum(topped.values()) > 0
    assert none["extra_train_reports_beyond_floor"] == len(extra_rows) == 12


def test_an_extra_report_of_a_patient_with_a_report_is_an_error(tmp_path):
    reports, labels = small_inputs(tmp_path, n=4)
    with open(reports, newline="") as f:
        row = list(csv.DictReader(f))[2]
    extra = write_csv(tmp_path / "extra.csv", [{"patient_id": "TCGA-XX-0001", "text": "x"},
                                               {"patient_id": row["patient_id"], "text": "another report"}])
    with pytest.raises(ValueError, match=rf"extra.csv:3: patient {row['patient_id']} also has a report at "
                                         r".*reports.csv:4"):
        build(reports, labels, tmp_path / "out", extra_train_reports=extra, verbose=False)


def test_bundled_ocr_reports_are_other_patients_with_registry_rows_and_clean_text():
    with open("data/tcga/reports.csv", newline="") as f:
        cleaned = {r["patient_id"] for r in csv.DictReader(f)}
    with open("data/tcga/patient_labels.csv", newline="") as f:
        registry = {r["patient_id"]: r["project"] for r in csv.DictReader(f)}
    with gzip.open(OCR_REPORTS, "rt", newline="") as f:
        rows = list(csv.DictReader(f))
    ids = [r["patient_id"] for r in rows]
    assert len(ids) == len(set(ids)) > 3000 and not set(ids) & cleaned
    assert all(registry[r["patient_id"]] == "TCGA-" + r["cancer_type"] in {"TCGA-" + c for c in CANCER_TYPES}
               for r in rows)
    assert not any(re.search(r"UUID\s*:\s*[0-9A-F]{8}|TCGA-\w\w-\w{4}|\n|[Il1|]{6}", r["text"]) for r in rows)


def test_clean_ocr_drops_stamps_and_joins_printed_lines():
    spec = importlib.util.spec_from_file_location("bundle", "data/bundle_ocr_reports.py")
    bundle = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bundle)
    raw = ("UUID:4F76D253-8752-4787\nTCGA-DK-AA6L-01A -PR Redacted\nIIIII II I 1111111111111 VIII 11111\n"
           "SURGICAL PATHOLOGY REPORT\nPrimary Tumor Site Discrepancy\n,vos ?!. 9\nDIAGNOSIS:\n"
           "Prostate ,radical prostatectomy: adenocarcinoma, Gleason 4 + 5\n= 9. Page 2 of 3\n  \npT3b;\n")
    assert bundle.clean_ocr(raw) == ("SURGICAL PATHOLOGY REPORT. DIAGNOSIS: Prostate, radical prostatectomy: "
                                     "adenocarcinoma, Gleason 4 + 5. = 9. pT3b;")


def test_token_counts_are_stamped_apart_from_the_datasets(tmp_path):
    """The demo builds its datasets once, then trains a tokenizer on their training split and stamps it."""
    from cancerllm.tasks.build import stamp_tokenizer
    from cancerllm.tokenizer import Tokenizer, mistral_tokenizer_path
    reports, labels = small_inputs(tmp_path, n=6)
    unstamped = build(reports, labels, tmp_path / "out", tokenizer=None, verbose=False)
    assert "tokenizer" not in unstamped and "tokens_per_example" not in unstamped
    before = {t: read(tmp_path / "out" / t / "train.jsonl") for t in TASKS}
    stamped = stamp_tokenizer(tmp_path / "out", "mistral")
    assert stamped["tokenizer"]["sha256"] == Tokenizer(mistral_tokenizer_path()).fingerprint()
    assert set(stamped["tokens_per_example"]) == set(TASKS)
    assert stamped == {**unstamped, **stamped}
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == stamped
    assert before == {t: read(tmp_path / "out" / t / "train.jsonl") for t in TASKS}


def test_settings_record_the_fields_each_cancer_type_has_in_the_training_split(built):
    out, _ = built
    recorded = json.loads((out / "prompt_settings.json").read_text())["recorded_fields"]
    train = [r["fields"] for r in read(out / "phenotype-json" / "train.jsonl")]
    assert recorded == recorded_by_cancer_type(train)
    assert set(recorded) == {f["cancer_type"] for f in train}
    assert "gleason" in recorded["Prostate adenocarcinoma"] and "gleason" not in recorded["Breast invasive carcinoma"]


def test_settings_record_the_training_splits_stage_groups(built):
    out, _ = built
    groups = json.loads((out / "prompt_settings.json").read_text())["stage_groups"]
    train = [r["fields"] for r in read(out / "phenotype-json" / "train.jsonl")]
    assert groups == stage_groups(train) and set(groups) == {f["cancer_type"] for f in train}
    test = [r["fields"] for r in read(out / "phenotype-json" / "test.jsonl")]
    assert stage_groups(train + test) != groups       # the held-out patients' stages are not in it

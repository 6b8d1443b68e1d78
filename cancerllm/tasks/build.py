"""Build the task datasets from the bundled TCGA reports and registry labels (`python -m cancerllm.tasks.build`).

Three tasks, each written as prompt/completion JSONL per split (train/val/test), the format the SFT stage reads:
- phenotype-qa: one example per (report, field); the answer is the registry value or "not mentioned";
- phenotype-json: one example per report; the answer is a JSON object with every field, null when unknown;
- diagnosis: the report with its final-diagnosis section cut out (rule: `find_diagnosis_section`), the answer a
  one-line statement built from the registry fields (`diagnosis_statement`).
Splits are by patient and seeded. Prompts come from templates.json, rendered by prompts.py (as for inference), and
prompt_settings.json beside the datasets records the templates, the report cut and the fields the registry records
for each cancer type in the training split (`fields.recorded_by_cancer_type`: the JSON answer's schema per cancer
type, which decoding then follows) and the training registry's stages per cancer type, T, N and M
(`fields.stage_groups`, which the JSON answer's stage is looked up in). Every record also carries
`task`, `patient_id`, the (possibly truncated) `report` and the gold `fields`, which evaluation and perturbation
use. `python -m cancerllm.tasks.mixture` makes the SFT mixture of these files.

With --counterfactual-copies K, the training split of both phenotype tasks also gets
`train-counterfactual.jsonl`: K copies of each training report that states a field's value in a standard way,
every such value rewritten to another valid one and the answer with it (`perturb.counterfactual_all`). Mixed into
SFT, these examples reward reading the value off the text, which the registry's skewed values otherwise make a
model skip in favour of the most frequent answer. Validation and test are never edited, and the majority
baseline reads train.jsonl only.

Reports longer than --max-report-chars are cut to their head, every sentence that states a staging, grade, receptor
or Gleason value in a standard form, and as much of their key section as fits (`prompts.truncate_report`): the
synoptic/staging summary when the report has one, else the final-diagnosis section. Reports with empty text and
reports without a registry row are counted and reported as failures, never silently dropped; a registry value
that is not an allowed form of its field is an error naming the file, line and column. The CSV files are read by
the strict reader prepare uses (cancerllm/data/records.py): a malformed row (an unclosed quote, the wrong number
of fields, bytes that are not UTF-8) is an error naming the file and line, as are a file with no rows and reports
of which none is usable.
"""
import argparse
import hashlib
import json
import random
import statistics
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

from ..data.records import CsvReader, MalformedRow, json_object, open_csv
from .fields import CANCER_TYPES, FIELDS, check_value, json_schema, recorded_by_cancer_type, stage_groups
from .perturb import counterfactual_all
from .prompts import (DEFAULT_MAX_REPORT_CHARS, DIAGNOSIS_HEADING, PHENOTYPE_TASKS, TASKS, TEMPLATES_PATH,
                      PromptSettings, diagnosis_statement, find_diagnosis_section, json_answer, load_templates,
                      task_inputs, task_prompt)

SPLITS = ("train", "val", "test")

REPORT_COLUMNS = ("patient_id", "text")
# field -> registry columns, the first non-empty one wins (histology_other refines "Other, specify" rows).
LABEL_COLUMNS = {
    "cancer_type": ("project",), "primary_site": ("tumor_tissue_site",), "histology": ("histology_other", "histology"),
    "laterality": ("laterality",), "grade": ("grade",), "pT": ("ajcc_pathologic_t",), "pN": ("ajcc_pathologic_n",),
    "pM": ("ajcc_pathologic_m",), "stage": ("ajcc_pathologic_stage",), "ER": ("er_status_ihc",),
    "PR": ("pr_status_ihc",), "HER2": ("her2_status_ihc", "her2_fish_status"), "gleason": ("gleason_score",),
}
# HER2 IHC results that leave the status to FISH when FISH has one.
HER2_UNDECIDED = ("", "Equivocal", "Indeterminate")


# ---------------------------------------------------------------------------------------------- reading

def csv_rows(path, required) -> tuple[list, list]:
    """The header and the (line, row) pairs of a CSV file (gzipped when named .gz), read by the strict reader that
    prepare uses too. A malformed row is an error naming the file and line (skipping it would drop a patient
    silently), and so is a file without rows."""
    with open_csv(path) as f:
        reader = CsvReader(f, path, required)
        rows = []
        for line, row in reader:
            if isinstance(row, MalformedRow):
                raise row
            rows.append((line, row))
    if not rows:
        raise ValueError(f"{path}: no rows, only a header")
    return reader.fieldnames, rows


def read_reports(path) -> list[dict]:
    reports, seen = [], {}
    for line, row in csv_rows(path, REPORT_COLUMNS)[1]:
        pid = row["patient_id"].strip()
        if pid in seen:
            raise ValueError(f"{path}:{line}: patient {pid} already has a report (line {seen[pid]})")
        seen[pid] = line
        reports.append({"patient_id": pid, "text": row["text"].strip(), "where": f"{path}:{line}"})
    return reports


def registry_fields(row: dict, where: str) -> dict:
    """One registry row -> {field: value or None}, each value checked against its field's allowed forms."""
    out = {}
    for field, columns in LABEL_COLUMNS.items():
        values = [" ".join(row[c].split()) for c in columns]
        if field == "HER2":
            value = values[1] if values[0] in HER2_UNDECIDED and values[1] else values[0]
        else:
            value = next((v for v in values if v), "")
        if field == "cancer_type" and value:
            code = value.removeprefix("TCGA-")
            if code not in CANCER_TYPES:
                raise ValueError(f"{where}:project: unknown TCGA project {value!r}")
            value = CANCER_TYPES[code]
        if value:
            check_value(field, value, f"{where}:{'/'.join(columns)}")
        out[field] = value or None
    return out


def read_labels(path) -> tuple[dict, list[str]]:
    """-> ({patient_id: fields}, the registry columns no field uses)."""
    columns = sorted({c for cs in LABEL_COLUMNS.values() for c in cs})
    header, rows = csv_rows(path, ["patient_id", *columns])
    labels = {}
    for line, row in rows:
        pid, where = row["patient_id"].strip(), f"{path}:{line}"
        if pid in labels:
            raise ValueError(f"{where}: patient {pid} has a second registry row")
        labels[pid] = registry_fields(row, where)
    return labels, [c for c in header if c != "patient_id" and c not in columns]


def read_jsonl(path) -> list:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (build the datasets: python -m cancerllm.tasks.build)")
    with open(path, encoding="utf-8") as f:
        return [line_object(path, line, raw) for line, raw in enumerate(f, 1) if raw.strip()]


def line_object(path, line: int, raw: str) -> dict:
    try:
        return json_object(raw)
    except ValueError as e:
        raise ValueError(f"{path}:{line}: {e}") from None


# ---------------------------------------------------------------------------------------------- examples

def task_examples(task: str, patient_id: str, report: str, fields: dict, templates: dict) -> list[dict]:
    """The examples of one report for one task, each a complete JSONL record."""
    base = {"task": task, "patient_id": patient_id, "report": report, "fields": fields}
    if task == "phenotype-qa":
        return [{**base, "field": f, "prompt": task_prompt(task, report, templates, f),
                 "completion": fields[f] or templates["not_mentioned"]} for f in FIELDS]
    prompt = task_prompt(task, report, templates)
    completion = json_answer(fields) if task == "phenotype-json" else diagnosis_statement(fields, templates)
    return [{**base, "prompt": prompt, "completion": completion}]


def counterfactual_examples(records: list[dict], copies: int, seed: int, templates: dict):
    """`copies` edited versions of each report (records: one per report) that states an editable value, as examples
    of both phenotype tasks; seeded by patient and copy. -> ({task: examples}, Counter of the fields rewritten)."""
    out, edits = {task: [] for task in PHENOTYPE_TASKS}, Counter()
    for r in records:
        for copy in range(copies):
            edited = counterfactual_all(r["report"], r["fields"], seed, f"{r['patient_id']}:{copy}")
            if edited:
                report, fields, changed = edited
                edits.update(changed)
                for task in PHENOTYPE_TASKS:
                    out[task] += [{**e, "counterfactual": changed}
                                  for e in task_examples(task, r["patient_id"], report, fields, templates)]
    return out, edits


def split_patients(patient_ids, seed: int, val_frac: float, test_frac: float) -> dict:
    if not (0 <= val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
        raise ValueError(f"val_frac={val_frac} and test_frac={test_frac} must be in [0, 1) and sum below 1")
    ids = sorted(patient_ids)
    random.Random(seed).shuffle(ids)
    n_test, n_val = round(test_frac * len(ids)), round(val_frac * len(ids))
    split = {pid: "test" for pid in ids[:n_test]}
    split.update({pid: "val" for pid in ids[n_test:n_test + n_val]})
    split.update({pid: "train" for pid in ids[n_test + n_val:]})
    return split


def usable_reports(rows: list[dict], registry: dict, failures: Counter) -> list[dict]:
    """The rows with text and a registry row; the others counted in `failures`."""
    kept = []
    for r in rows:
        if not r["text"]:
            failures["empty_report_text"] += 1
        elif r["patient_id"] not in registry:
            failures["report_without_registry_row"] += 1
        else:
            kept.append(r)
    return kept


def top_up(extra: list[dict], train_types: list[str], floor, registry: dict, seed: int) -> list[dict]:
    """The extra reports that bring each cancer type up to `floor` training patients (an int, or "largest": the
    count of the most frequent type in `train_types`), chosen at random (seeded); types at or above it get none.
    Balancing by topping up keeps every original example and draws on the extra pool only where data is scarce."""
    have = Counter(train_types)
    if floor == "largest":
        floor = max(have.values(), default=0)
    if not isinstance(floor, int) or isinstance(floor, bool) or floor < 0:
        raise ValueError(f"extra_train_floor={floor!r}: a count >= 0 or 'largest'")
    pool = sorted(extra, key=lambda r: r["patient_id"])
    random.Random(seed).shuffle(pool)
    chosen = []
    for r in pool:
        cancer_type = registry[r["patient_id"]]["cancer_type"]
        if have[cancer_type] < floor:
            have[cancer_type] += 1
            chosen.append(r)
    return chosen


def build(reports="data/tcga/reports.csv", labels="data/tcga/patient_labels.csv", out="runs/tasks", *, seed=0,
          val_frac=0.1, test_frac=0.1, max_report_chars=DEFAULT_MAX_REPORT_CHARS, counterfactual_copies=0,
          extra_train_reports=None, extra_train_floor=None, templates=TEMPLATES_PATH, tokenizer="mistral",
          verbose=True) -> dict:
    """Write {out}/{task}/{split}.jsonl (and {task}/train-counterfactual.jsonl for the phenotype tasks when
    counterfactual_copies > 0), {out}/prompt_settings.json (the templates and the report cut the prompts were made
    with, the fields recorded per cancer type in the training split) and {out}/manifest.json; return the manifest
    (counts, failures, rules).

    `tokenizer` ("mistral": Mistral's v1, a tokenizer file or a checkpoint directory) adds its token counts to the
    manifest (`stamp_tokenizer`); None leaves that to a later stamp_tokenizer call, e.g. with a tokenizer trained on the
    training split these datasets define.

    `extra_train_reports` (a CSV, gzipped or not, with patient_id and text) adds reports whose patients go to the
    training split only: validation and test stay the split of `reports`, whatever the extra file holds. A patient
    in both files is an error. `extra_train_floor` (an int, or "largest" for the largest cancer type's training
    count) takes only as many of them as bring each cancer type up to that many training patients (`top_up`)."""
    if counterfactual_copies < 0:
        raise ValueError(f"counterfactual_copies={counterfactual_copies} must be >= 0")
    templates_path, templates = Path(templates), load_templates(templates)
    settings = PromptSettings(templates, max_report_chars)
    report_rows = read_reports(reports)
    extra_rows = read_reports(extra_train_reports) if extra_train_reports else []
    registry, unused_columns = read_labels(labels)
    report_at = {r["patient_id"]: r["where"] for r in report_rows}
    clash = next((r for r in extra_rows if r["patient_id"] in report_at), None)
    if clash:
        raise ValueError(f"{clash['where']}: patient {clash['patient_id']} also has a report at "
                         f"{report_at[clash['patient_id']]}; the extra training reports must be other patients")

    failures, stats = Counter(), Counter()
    kept = usable_reports(report_rows, registry, failures)
    if not kept:
        raise ValueError(f"{reports}: no usable report: {dict(failures)} (registry: {labels})")
    extra = usable_reports(extra_rows, registry, failures)
    failures["registry_row_without_report"] = len(registry.keys() - report_at.keys() -
                                                  {r["patient_id"] for r in extra_rows})
    split_of = split_patients([r["patient_id"] for r in kept], seed, val_frac, test_frac)
    usable_extra = len(extra)
    if extra_train_floor is not None:
        extra = top_up(extra, [registry[pid]["cancer_type"] for pid, s in split_of.items() if s == "train"],
                       extra_train_floor, registry, seed)
    split_of.update({r["patient_id"]: "train" for r in extra})
    train_labels = [registry[pid] for pid, split in split_of.items() if split == "train"]
    settings = replace(settings, recorded_fields=recorded_by_cancer_type(train_labels),
                       stage_groups=stage_groups(train_labels))

    records = {(t, s): [] for t in TASKS for s in SPLITS}
    for r in kept + extra:
        fields = registry[r["patient_id"]]
        for task, report in task_inputs(r["text"], max_report_chars, templates, stats).items():
            records[task, split_of[r["patient_id"]]] += task_examples(task, r["patient_id"], report, fields,
                                                                     templates)
    augmented, edits = {}, Counter()
    if counterfactual_copies:
        augmented, edits = counterfactual_examples(records["phenotype-json", "train"], counterfactual_copies, seed,
                                                   templates)
    out = Path(out)
    files = {**records, **{(task, "train-counterfactual"): rows for task, rows in augmented.items()}}
    for (task, name), rows in files.items():
        (out / task).mkdir(parents=True, exist_ok=True)
        with open(out / task / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    settings.save(out)

    manifest = {
        "sources": {"reports": str(reports), "extra_train_reports": extra_train_reports and str(extra_train_reports),
                    "labels": str(labels), "templates": str(templates_path),
                    "templates_sha256": hashlib.sha256(templates_path.read_bytes()).hexdigest()},
        "seed": seed, "fractions": {"val": val_frac, "test": test_frac}, "max_report_chars": max_report_chars,
        "reports_read": len(report_rows) + len(extra_rows), "reports_used": len(kept) + len(extra),
        "extra_train_reports_used": len(extra), "extra_train_floor": extra_train_floor,
        "extra_train_reports_beyond_floor": usable_extra - len(extra),
        "extra_train_patients": sorted(r["patient_id"] for r in extra),
        "patients": dict(Counter(split_of.values())),
        "failures": dict(failures), "unused_registry_columns": unused_columns,
        "diagnosis_section": {"rule": find_diagnosis_section.__doc__ + " Headings: " + DIAGNOSIS_HEADING.pattern,
                              "found": stats["diagnosis_section_found"],
                              "fraction_found": stats["diagnosis_section_found"] / max(len(kept) + len(extra), 1)},
        "truncation": {k: v for k, v in stats.items() if k.startswith("truncated")},
        "examples": {t: {s: len(records[t, s]) for s in SPLITS} for t in TASKS},
        "counterfactual_train": {"copies": counterfactual_copies,
                                 "examples": {t: len(rows) for t, rows in augmented.items()},
                                 "fields_edited": dict(edits)},
        "schema": json_schema(),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    if tokenizer is not None:
        manifest = stamp_tokenizer(out, tokenizer)
    if verbose:
        print_summary(manifest, out)
    return manifest


def token_stats(records, tokenizer) -> dict:
    lengths = [len(tokenizer.encode(r["prompt"] + r["completion"], bos=True, eos=True)) for r in records]
    if not lengths:
        return {}
    return {"median": statistics.median(lengths), "p95": sorted(lengths)[int(0.95 * (len(lengths) - 1))],
            "max": max(lengths)}


def stamp_tokenizer(tasks_dir, tokenizer="mistral") -> dict:
    """Record in {tasks_dir}/manifest.json the tokenizer ("mistral": Mistral's v1, a tokenizer file or a checkpoint
    directory) a model trained on these datasets reads them with (eval holds checkpoints to it) and each task's
    training examples' token counts under it; return the manifest."""
    from ..tokenizer import mistral_tokenizer_path, open_tokenizer
    tok = open_tokenizer(mistral_tokenizer_path() if tokenizer == "mistral" else tokenizer)
    path = Path(tasks_dir) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["tokenizer"] = {"path": str(tok.path), "sha256": tok.fingerprint()}
    manifest["tokens_per_example"] = {t: token_stats(read_jsonl(Path(tasks_dir) / t / "train.jsonl"), tok)
                                      for t in TASKS}
    path.write_text(json.dumps(manifest, indent=2))
    return manifest


def print_summary(m: dict, out: Path):
    print(f"reports: {m['reports_read']} read, {m['reports_used']} used; failures: {m['failures']}")
    floor = (f", {m['extra_train_reports_beyond_floor']} more left out by the floor {m['extra_train_floor']}"
             if m["extra_train_floor"] is not None else "")
    print(f"patients per split: {m['patients']} (training: {m['extra_train_reports_used']} from the extra "
          f"reports{floor})")
    ds = m["diagnosis_section"]
    print(f"final-diagnosis section found in {ds['found']}/{m['reports_used']} reports ({ds['fraction_found']:.1%})")
    print(f"truncation to {m['max_report_chars']} chars: {m['truncation']}")
    tokens = m.get("tokens_per_example", {})
    for task, counts in m["examples"].items():
        print(f"{task:15s} {counts}" + (f"  tokens/example (train) {tokens[task]}" if task in tokens else ""))
    cf = m["counterfactual_train"]
    if cf["copies"]:
        print(f"counterfactual training copies ({cf['copies']} per report): {cf['examples']}; "
              f"values rewritten: {cf['fields_edited']}")
    print(f"unused registry columns: {', '.join(m['unused_registry_columns'])}")
    print(f"wrote {out}/<task>/<split>.jsonl and {out}/manifest.json")


def count_or_largest(text: str):
    return text if text == "largest" else int(text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reports", default="data/tcga/reports.csv")
    p.add_argument("--extra-train-reports", default=None,
                   help="CSV (.gz allowed) of more reports, other patients, for the training split only "
                        "(e.g. data/tcga/ocr_reports.csv.gz)")
    p.add_argument("--extra-train-floor", default=None, type=count_or_largest,
                   help="take only the extra reports that bring each cancer type up to N training patients "
                        "('largest': the most frequent type's count)")
    p.add_argument("--labels", default="data/tcga/patient_labels.csv")
    p.add_argument("--out", default="runs/tasks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-frac", type=float, default=0.1)
    p.add_argument("--test-frac", type=float, default=0.1)
    p.add_argument("--max-report-chars", type=int, default=2000,
                   help="cut longer reports to head + sentences stating a value + synoptic/diagnosis section; "
                        "0 keeps them whole")
    p.add_argument("--counterfactual-copies", type=int, default=0,
                   help="also write K edited copies of each training report as train-counterfactual.jsonl")
    p.add_argument("--tokenizer", default="mistral",
                   help="sentencepiece model the token counts are made with ('mistral': Mistral's v1, the default)")
    p.add_argument("--templates", default=str(TEMPLATES_PATH))
    a = p.parse_args(argv)
    try:
        build(a.reports, a.labels, a.out, seed=a.seed, val_frac=a.val_frac, test_frac=a.test_frac,
              max_report_chars=a.max_report_chars or None, counterfactual_copies=a.counterfactual_copies,
              extra_train_reports=a.extra_train_reports, extra_train_floor=a.extra_train_floor,
              tokenizer=a.tokenizer, templates=a.templates)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"cancerllm.tasks.build: {e}")


if __name__ == "__main__":
    main()

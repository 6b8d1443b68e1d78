"""How data/tcga/ocr_reports.csv.gz and the extra rows of data/tcga/patient_labels.csv were made (run once, by hand).

    python data/bundle_ocr_reports.py --shared ../shared/data

It reads the shared raw-OCR TCGA reports (grasool/tcga-path-report) and the registry labels, keeps one report per
patient for the patients that are not in data/tcga/reports.csv (so no patient has two texts, and the cleaned
corpus's split is untouched) and whose TCGA project is one of the task's cancer types, cleans the OCR layout into
the cleaned corpus's one-line form (`clean_ocr`), and appends those patients' registry rows to patient_labels.csv.
Nothing in the package reads ../shared; this script only documents and reproduces the bundled files.
"""
import argparse
import csv
import gzip
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cancerllm.tasks.fields import CANCER_TYPES  # noqa: E402

HERE = Path(__file__).resolve().parent / "tcga"
# Lines that are not report text: the PDF's UUID and barcode stamp, OCR'd barcodes (runs of I, l, 1, |) and the
# TCGA quality-control checklist stamped on many first pages (diagnosis / site / HIPAA discrepancy, prior
# malignancy, dual primary, qualified or disqualified, reviewer initials).
STAMP = re.compile(r"^UUID|TCGA-\w\w-\w{4}|Redacted|discrep|hipaa|qualified|reviewer|synchronous|prior malig"
                   r"|criteria\s+yes", re.I)
BARCODE_CHARS = set("Il1|!^iIL[]")
# The same stamps where OCR ran them into a line of text.
INLINE_STAMP = re.compile(r"UUID\s*:\s*\w+(?:\s*[-•]\s*\w+){0,4}|\S*[Il1|!]{6,}\S*")
# Registry placeholders ("[Not Available]", "[Unknown]", ...) are empty values in the bundled labels.
PLACEHOLDER = re.compile(r"^\[.*\]$")
PAGE = re.compile(r"\bPage \d+ of \d+\b", re.I)


def is_noise(line: str) -> bool:
    chars = line.replace(" ", "")
    alnum = sum(c.isalnum() for c in chars)
    if STAMP.search(line) or not alnum:
        return True
    if len(chars) >= 8 and sum(c in BARCODE_CHARS for c in chars) / len(chars) > 0.6:
        return True
    return len(chars) >= 6 and alnum / len(chars) < 0.6      # OCR'd handwriting and smudges; keeps "= 9" and "2."


def clean_ocr(text: str) -> str:
    """Raw OCR (one line per printed line) -> one line, each printed line ended by '.' unless it ends in '.', ':' or
    ';' (the cleaned corpus's form), without stamps, barcodes, page headers and the space OCR puts before commas."""
    lines = []
    for line in text.splitlines():
        line = " ".join(INLINE_STAMP.sub(" ", PAGE.sub(" ", line)).split())
        line = re.sub(r" ,(?=\S)", ", ", line).replace(" ,", ",")
        if line and not is_noise(line):
            lines.append(line if line[-1] in ".:;" else line + ".")
    return " ".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shared", default="../shared/data", help="the shared data folder")
    a = p.parse_args()
    csv.field_size_limit(sys.maxsize)
    shared = Path(a.shared)
    with open(HERE / "reports.csv", newline="") as f:
        cleaned = {r["patient_id"] for r in csv.DictReader(f)}
    with open(shared / "tcga_clinical_labels" / "patient_labels.csv", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames
        registry = {r["patient_id"]: {k: "" if PLACEHOLDER.match(v) else v for k, v in r.items()} for r in reader}
    kept, skipped = {}, {"in cleaned corpus": 0, "no registry row": 0, "other cancer type": 0,
                         "second report of a patient": 0, "empty after cleaning": 0}
    with open(shared / "tcga_reports_ocr_grasool" / "reports.csv", newline="") as f:
        for row in csv.DictReader(f):
            pid = row["patient_id"]
            reason = ("in cleaned corpus" if pid in cleaned else "no registry row" if pid not in registry else
                      "other cancer type" if registry[pid]["project"].removeprefix("TCGA-") not in CANCER_TYPES
                      else "second report of a patient" if pid in kept else None)
            text = clean_ocr(row["ocr_text"]) if reason is None else ""
            if reason is None and not text:
                reason = "empty after cleaning"
            if reason:
                skipped[reason] += 1
            else:
                kept[pid] = {"patient_id": pid, "cancer_type": registry[pid]["project"].removeprefix("TCGA-"),
                             "source_pdf": row["source_pdf"], "text": text}
    with gzip.open(HERE / "ocr_reports.csv.gz", "wt", newline="", compresslevel=9) as f:
        w = csv.DictWriter(f, ["patient_id", "cancer_type", "source_pdf", "text"])
        w.writeheader()
        w.writerows(kept[pid] for pid in sorted(kept))
    with open(HERE / "patient_labels.csv", newline="") as f:
        labelled = {r["patient_id"] for r in csv.DictReader(f)}
    with open(HERE / "patient_labels.csv", "a", newline="") as f:
        w = csv.DictWriter(f, header)
        w.writerows(registry[pid] for pid in sorted(kept) if pid not in labelled)
    print(f"kept {len(kept)} OCR reports; skipped {skipped}")


if __name__ == "__main__":
    main()

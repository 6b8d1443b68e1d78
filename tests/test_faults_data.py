"""Bad data inputs are refused where they enter (issue 21), each with an error that names the file and line, or the
argument, at fault: malformed CSV rows, empty inputs, lone surrogates, truncated JSONL lines, a tokenizer other
than the shards', token ids outside the model's vocabulary, absurd batch sizes, and eval's flags."""
import csv
import gzip
import io
import json
from pathlib import Path

import pytest

from cancerllm.data.prepare import main as prepare
from cancerllm.data.records import CsvReader, MalformedRow, open_csv
from cancerllm.tasks.build import build, read_jsonl
from cancerllm.tokenizer import Tokenizer, train

DATA = Path(__file__).resolve().parents[1] / "data" / "tcga"
LABELS = DATA / "patient_labels.csv"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(f"report {i}: invasive ductal carcinoma, grade {i % 3 + 1}, margins clear."
                                for i in range(200)))
    return train([corpus], folder / "tok", vocab_size=300, num_threads=1)


def run_prepare(tokenizer, inputs, out, *extra):
    return prepare([*map(str, inputs), "--tokenizer", str(tokenizer.path), "--out", str(out), "--quiet", *extra])


def hundred_rows(path, broken_line=None):
    """A CSV of 100 patients' reports (one quoted with an embedded comma, quote and newline), the row on
    `broken_line` given an unclosed quote; returns the rows as written."""
    rows = [{"patient_id": f"P{i:03d}", "text": f"report {i} grade {i % 3 + 1}"} for i in range(100)]
    rows[10]["text"] = 'a "quoted" report,\nover two lines'
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, ["patient_id", "text"])
        w.writeheader()
        w.writerows(rows)
    if broken_line is not None:
        lines = path.read_text().splitlines(keepends=True)
        lines[broken_line - 1] = lines[broken_line - 1].replace(",", ',"', 1)
        path.write_text("".join(lines))
    return rows


# ---------------------------------------------------------------------------------------------- CSV rows

def read_all(path):
    with open_csv(path) as f:
        return list(CsvReader(f, path))


@pytest.mark.parametrize("name", ["reports.csv", "patient_labels.csv", "ocr_reports.csv.gz"])
def test_bundled_csv_files_read_as_the_lenient_reader_read_them(name):
    """The strict reader gives the bundled files' rows exactly as csv.DictReader did before it, none malformed."""
    path = DATA / name
    csv.field_size_limit(1 << 30)
    with (gzip.open if name.endswith(".gz") else open)(path, "rt", newline="", encoding="utf-8") as f:
        lenient = list(csv.DictReader(f))
    strict = read_all(path)
    assert [row for _, row in strict] == lenient
    assert not any(isinstance(row, MalformedRow) for _, row in strict)


def test_quoted_newlines_commas_and_quotes_parse(tmp_path):
    rows = hundred_rows(tmp_path / "r.csv")
    got = read_all(tmp_path / "r.csv")
    assert [row for _, row in got] == rows
    assert [line for line, _ in got[10:13]] == [12, 14, 15]       # the two-line record: lines 12 and 13


def test_an_unclosed_quote_costs_one_row_not_the_rest_of_the_file(tmp_path):
    path = tmp_path / "r.csv"
    rows = hundred_rows(path, broken_line=40)
    got = read_all(path)
    bad = [(line, row.reason) for line, row in got if isinstance(row, MalformedRow)]
    assert bad == [(40, "unclosed quote: the quoted field runs to the end of the file")]
    assert [row for _, row in got if not isinstance(row, MalformedRow)] == rows[:37] + rows[38:]


def test_a_quote_closed_rows_later_and_a_wrong_field_count_are_bad_rows(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text('patient_id,text\nP1,"first\nP2,"second"\nP3,third,extra\nP4,fourth\n')
    got = read_all(path)
    assert [(line, str(row)) for line, row in got if isinstance(row, MalformedRow)] == [
        (2, f"{path}:2: malformed CSV (',' expected after '\"')"), (4, f"{path}:4: 3 field(s), the header has 2")]
    assert [row["patient_id"] for _, row in got if not isinstance(row, MalformedRow)] == ["P2", "P4"]


def test_prepare_counts_every_bad_row_and_strict_stops_at_it(tmp_path, tokenizer):
    path = tmp_path / "r.csv"
    hundred_rows(path, broken_line=40)
    manifest = run_prepare(tokenizer, [path], tmp_path / "out", "--group-column", "patient_id", "--verify")
    assert manifest["sources"][str(path)]["documents"] == 99
    assert [(b["line"], b["reason"]) for b in manifest["bad_rows"]] == [
        (40, "unclosed quote: the quoted field runs to the end of the file")]
    with pytest.raises(SystemExit, match=f"{path}:40: unclosed quote"):
        run_prepare(tokenizer, [path], tmp_path / "strict", "--strict")


def write_reports(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, ["patient_id", "text"])
        w.writeheader()
        w.writerows(rows)


def labelled_patients(n):
    with open(LABELS, newline="") as f:
        return [row["patient_id"] for row, _ in zip(csv.DictReader(f), range(n))]


def test_tasks_build_refuses_a_malformed_row_with_its_line(tmp_path):
    """Before, the stray quote put the next patient's id and report inside this patient's text, and dropped him."""
    ids = labelled_patients(4)
    write_reports(tmp_path / "reports.csv", [{"patient_id": p, "text": f"report of {p}"} for p in ids])
    lines = (tmp_path / "reports.csv").read_text().splitlines(keepends=True)
    lines[2] = lines[2].replace(",", ',"', 1)
    (tmp_path / "reports.csv").write_text("".join(lines))
    with pytest.raises(MalformedRow, match="reports.csv:3: unclosed quote"):
        build(tmp_path / "reports.csv", LABELS, tmp_path / "out", tokenizer=None, verbose=False)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- empty inputs

def test_prepare_refuses_a_header_only_or_all_bad_input(tmp_path, tokenizer):
    header_only = tmp_path / "header.csv"
    header_only.write_text("patient_id,text\n")
    with pytest.raises(ValueError, match=rf"{header_only}: no usable row \(0 bad rows\)"):
        run_prepare(tokenizer, [header_only], tmp_path / "out1")
    all_bad = tmp_path / "bad.csv"
    all_bad.write_text('patient_id,text\nP1,""\nP2\n')
    with pytest.raises(ValueError, match=rf"{all_bad}: no usable row \(2 bad rows; the first, line 2: empty text\)"):
        run_prepare(tokenizer, [all_bad], tmp_path / "out2")
    assert not list((tmp_path / "out2").glob("*"))


def test_prepare_command_line_exits_nonzero_on_an_empty_input(tmp_path, tokenizer):
    import subprocess
    import sys
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    proc = subprocess.run([sys.executable, "-m", "cancerllm.data.prepare", str(empty), "--tokenizer",
                           str(tokenizer.path), "--out", str(tmp_path / "out"), "--quiet"], capture_output=True,
                          text=True)
    assert proc.returncode != 0 and f"{empty}: no usable row" in proc.stderr


def test_tasks_build_refuses_header_only_and_unusable_reports(tmp_path):
    header_only = tmp_path / "reports.csv"
    write_reports(header_only, [])
    with pytest.raises(ValueError, match=f"{header_only}: no rows, only a header"):
        build(header_only, LABELS, tmp_path / "out", tokenizer=None, verbose=False)
    unlabelled = tmp_path / "unlabelled.csv"
    write_reports(unlabelled, [{"patient_id": "NOT-A-PATIENT", "text": "a report"}, {"patient_id": "X", "text": ""}])
    with pytest.raises(ValueError, match=f"{unlabelled}: no usable report") as error:
        build(unlabelled, LABELS, tmp_path / "out", tokenizer=None, verbose=False)
    assert "'empty_report_text': 1" in str(error.value) and "'report_without_registry_row': 1" in str(error.value)
    assert not (tmp_path / "out").exists()


def test_tasks_build_command_line_exits_nonzero_naming_the_file(tmp_path):
    from cancerllm.tasks.build import main
    header_only = tmp_path / "reports.csv"
    write_reports(header_only, [])
    with pytest.raises(SystemExit, match=f"cancerllm.tasks.build: {header_only}: no rows, only a header"):
        main(["--reports", str(header_only), "--out", str(tmp_path / "out"), "--tokenizer", "mistral"])


# ---------------------------------------------------------------------------------------------- lone surrogates

def test_tokenizer_encode_names_a_lone_surrogate(tokenizer):
    with pytest.raises(ValueError, match=r"Tokenizer.encode: text holds a lone surrogate U\+D800 at character 7"):
        tokenizer.encode("report \ud800 text")
    assert tokenizer.encode("report text") == tokenizer.encode("report text")       # the tokenizer still works


def test_prepare_reports_a_lone_surrogate_with_its_line(tmp_path, tokenizer):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "a fine report"}\n{"text": "bad \\ud800 escape"}\n')
    manifest = run_prepare(tokenizer, [path], tmp_path / "out")
    assert [(b["line"], b["reason"]) for b in manifest["bad_rows"]] == [
        (2, "undecodable bytes or a lone surrogate in text (U+D800 at character 4)")]
    with pytest.raises(SystemExit, match=f"{path}:2: undecodable bytes or a lone surrogate in text"):
        run_prepare(tokenizer, [path], tmp_path / "strict", "--strict")


def test_undecodable_bytes_in_a_tasks_csv_name_the_line_and_column(tmp_path):
    path = tmp_path / "reports.csv"
    path.write_bytes(b"patient_id,text\nP1,caf\xe9 report\n")
    with pytest.raises(MalformedRow, match=f"{path}:2: undecodable bytes in text"):
        build(path, LABELS, tmp_path / "out", tokenizer=None, verbose=False)


# ---------------------------------------------------------------------------------------------- JSONL lines

def test_read_jsonl_names_the_file_and_line_of_a_truncated_line(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text('{"patient_id": "P1", "prompt": "a"}\n\n{"patient_id": "P2", "pro')
    with pytest.raises(ValueError, match=f"{path}:3: invalid JSON at column 22: Unterminated string"):
        read_jsonl(path)
    path.write_text('{"patient_id": "P1"}\n[1, 2]\n')
    with pytest.raises(ValueError, match=f"{path}:2: a JSON list, not an object"):
        read_jsonl(path)


def test_prepare_names_the_file_and_line_of_a_truncated_jsonl_line(tmp_path, tokenizer):
    path = tmp_path / "sft.jsonl"
    path.write_text('{"prompt": "Q: grade?", "completion": "2"}\n{"prompt": "Q: grade?", "compl')
    with pytest.raises(SystemExit, match=f"{path}:2: invalid JSON at column 25: Unterminated string"):
        run_prepare(tokenizer, [path], tmp_path / "out", "--sft", "--strict")


# ---------------------------------------------------------------------------------------------- eval's flags

@pytest.mark.parametrize("flag, value, message", [
    ("--batch-size", "0", "must be a positive integer, got 0"),
    ("--max-new-tokens", "0", "must be a positive integer, got 0"),      # was silently the task's default
    ("--limit", "-1", "must be a positive integer, got -1"),             # was silently "all but the last patient"
    ("--limit", "two", "expected a positive integer, got 'two'"),
])
def test_eval_refuses_counts_below_one_naming_the_flag(flag, value, message, capsys):
    from cancerllm.eval import main
    with pytest.raises(SystemExit) as exit_:
        main(["--checkpoint", "runs/none", "--task", "diagnosis", flag, value])
    assert exit_.value.code == 2 and f"argument {flag}: {message}" in capsys.readouterr().err


def test_eval_takes_positive_counts():
    from cancerllm.eval import positive_int
    assert positive_int("1") == 1 and positive_int("96") == 96

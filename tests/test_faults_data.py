"""Bad data inputs are refused where they enter (issue 21), each with an error that names the file and line, or the
argument, at fault: malformed CSV rows, empty inputs, lone surrogates, truncated JSONL lines, a tokenizer other
than the shards', token ids outside the model's vocabulary, absurd batch sizes, and eval's flags."""
import csv
import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cancerllm.data import PackedLoader, ShardError, write_shard
from cancerllm.data.loader import cpp_available
from cancerllm.data.prepare import main as prepare
from cancerllm.data.records import CsvReader, MalformedRow, open_csv
from cancerllm.eval import main as eval_main
from cancerllm.eval import positive_int
from cancerllm.tasks.build import build, read_jsonl
from cancerllm.tasks.build import main as tasks_build
from cancerllm.tokenizer import train
from cancerllm.train.build import check_data
from cancerllm.train.config import DataConfig

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
    header_only = tmp_path / "reports.csv"
    write_reports(header_only, [])
    with pytest.raises(SystemExit, match=f"cancerllm.tasks.build: {header_only}: no rows, only a header"):
        tasks_build(["--reports", str(header_only), "--out", str(tmp_path / "out"), "--tokenizer", "mistral"])


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
    with pytest.raises(SystemExit) as exit_:
        eval_main(["--checkpoint", "runs/none", "--task", "diagnosis", flag, value])
    assert exit_.value.code == 2 and f"argument {flag}: {message}" in capsys.readouterr().err


def test_eval_takes_positive_counts():
    assert positive_int("1") == 1 and positive_int("96") == 96


@pytest.mark.parametrize("name", ["batch_size", "max_new_tokens", "limit"])
def test_evaluate_refuses_counts_below_one_naming_the_argument(name):
    """The function too, not only its command line: max_new_tokens=0 used to mean the task's default."""
    from cancerllm.eval import evaluate
    with pytest.raises(ValueError, match=f"evaluate: {name} must be a positive int or None, got 0"):
        evaluate("runs/none", "diagnosis", **{name: 0})


# ---------------------------------------------------------------------------------------------- shards for training

ROOT = Path(__file__).resolve().parents[1]
RUN_CONFIG = """
[model]
preset = "tiny"
overrides = {{dim = 32, n_layers = 1, n_heads = 4, n_kv_heads = 2, head_dim = 8, hidden_dim = 64, vocab_size = 512}}
[data]
train = ["{shards}/train-*.bin"]
seq_len = 16
batch_size = 2
[train]
steps = 1
[checkpoint]
dir = "{run}"
"""


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tokenizer):
    """Shards of 100 reports made by prepare with `tokenizer` (its manifest records the tokenizer's sha256)."""
    folder = tmp_path_factory.mktemp("shards")
    hundred_rows(folder / "reports.csv")
    run_prepare(tokenizer, [folder / "reports.csv"], folder / "out", "--val-fraction", "0")
    return folder / "out"


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("other")
    (folder / "corpus.txt").write_text("\n".join(f"colon adenocarcinoma, stage {i % 4}" for i in range(200)))
    return train([folder / "corpus.txt"], folder / "other", vocab_size=280, num_threads=1)


def data_config(shards, tokenizer=None, **overrides):
    return DataConfig(train=[str(Path(shards) / "*.bin")], tokenizer=tokenizer and str(tokenizer), **overrides)


def run_train_py(tmp_path, shards, *overrides):
    """python train.py (one process) on the shards; returns the finished process."""
    config = tmp_path / "run.toml"
    config.write_text(RUN_CONFIG.format(shards=shards, run=tmp_path / "run"))
    args = [arg for o in overrides for arg in ("--set", o)]
    return subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(config), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_training_refuses_a_tokenizer_other_than_the_shards(shards, tokenizer, other_tokenizer):
    check_data(data_config(shards, tokenizer.path), 512)               # the shards' own tokenizer is fine
    with pytest.raises(ValueError, match=f"data.train: the shards in {shards} were made with the tokenizer "
                                         f"{tokenizer.path} .* not data.tokenizer = {other_tokenizer.path}"):
        check_data(data_config(shards, other_tokenizer.path), 512)


def test_train_py_refuses_the_wrong_tokenizer_before_exporting(tmp_path, shards, tokenizer, other_tokenizer):
    proc = run_train_py(tmp_path, shards, f'data.tokenizer="{other_tokenizer.path}"')
    assert proc.returncode != 0
    assert f"made with the tokenizer {tokenizer.path}" in proc.stderr and str(other_tokenizer.path) in proc.stderr
    assert not (tmp_path / "run" / "export").exists()


def test_shards_without_a_manifest_train_with_a_warning(tmp_path, shards, other_tokenizer):
    bare = tmp_path / "bare"
    shutil.copytree(shards, bare, ignore=shutil.ignore_patterns("manifest.json"))
    with pytest.warns(UserWarning, match=f"data.train: {bare} holds no manifest.json, so the tokenizer"):
        check_data(data_config(bare, other_tokenizer.path), 512)


def test_shards_made_with_two_tokenizers_are_refused(tmp_path, shards, other_tokenizer):
    hundred_rows(tmp_path / "reports.csv")
    run_prepare(other_tokenizer, [tmp_path / "reports.csv"], tmp_path / "other", "--val-fraction", "0")
    cfg = data_config(shards)
    cfg.train.append(str(tmp_path / "other" / "*.bin"))
    with pytest.raises(ValueError, match="data.train: the shards were made with different tokenizers"):
        check_data(cfg, 512)


def test_a_tokenizer_larger_than_the_model_is_refused_before_training(shards, tokenizer):
    with pytest.raises(ValueError, match=f"tokenizer {tokenizer.path} has 300 pieces but the model has vocab_size=299"):
        check_data(data_config(shards, tokenizer.path), 299)


def test_token_ids_beyond_the_model_vocabulary_name_the_shard(shards):
    with pytest.raises(ShardError, match=f"{shards}/train-00000.bin: made for a vocabulary of 300 ids, but the "
                                         "model's vocab_size is 256"):
        check_data(data_config(shards), 256)


def test_a_corrupt_token_id_names_the_shard(tmp_path, shards):
    path = write_shard(tmp_path / "train-00000.bin", [np.arange(1, 40), np.arange(2, 30)], vocab_size=300)
    raw = bytearray(path.read_bytes())
    raw[64 + 2 * 5: 64 + 2 * 6] = (40000).to_bytes(2, "little")         # token 5 flipped past the vocabulary
    path.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match=f"{path}: token id 40000 is not below the shard's vocab_size 300"):
        check_data(data_config(tmp_path), 512)


def test_train_py_names_the_shard_whose_ids_exceed_the_model(tmp_path, shards):
    proc = run_train_py(tmp_path, shards, "model.overrides.vocab_size=256")
    assert proc.returncode != 0 and "IndexError" not in proc.stderr
    assert f"{shards}/train-00000.bin: made for a vocabulary of 300 ids" in proc.stderr


# ---------------------------------------------------------------------------------------------- batch sizes

@pytest.mark.parametrize("backend", ["python", "cpp"])
def test_loader_refuses_a_batch_beyond_int32_tokens_naming_the_arguments(shards, backend):
    if backend == "cpp" and not cpp_available():
        pytest.skip("cancerllm._C is not built")
    paths = sorted(map(str, shards.glob("*.bin")))
    for batch_size in (2**60, 2**27 + 1):       # 2**60 * 16 wraps to 0 in 64 bits; 2**27 * 16 is 2**31
        with pytest.raises(ValueError, match=rf"PackedLoader: batch_size \* seq_len = {batch_size} \* 16 exceeds"):
            PackedLoader(paths, seq_len=16, batch_size=batch_size, backend=backend)
    PackedLoader(paths, seq_len=16, batch_size=4, backend=backend).close()


def test_cpp_loader_checks_its_size_products_itself(shards):
    """The extension called directly (no Python checks before it): an error, never a crash, for products that
    overflow 64 bits or int32. In a subprocess, so that a crash fails this test instead of killing pytest."""
    if not cpp_available():
        pytest.skip("cancerllm._C is not built")
    script = f"""
from cancerllm import _C
path = {str(next(shards.glob("*.bin")))!r}
for batch_size, seq_len, world_size in [(2**60, 16, 1), (2**27, 16, 1), (2**20, 2, 2**44), (1, 2**32, 1)]:
    try:
        loader = _C.Loader([path], seq_len, batch_size, 0, world_size, 0, False, 0, 1, 2)
        loader.start(0)
        print("built", batch_size, seq_len, world_size, loader.next()["tokens"].shape)
    except ValueError as e:
        print(e)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        f"PackedLoader: batch_size * seq_len ({2**60} * 16) exceeds 2^31 - 1 tokens: cu_seqlens are int32",
        f"PackedLoader: batch_size * seq_len ({2**27} * 16) exceeds 2^31 - 1 tokens: cu_seqlens are int32",
        f"PackedLoader: batch_size * world_size ({2**20} * {2**44}) overflows 64 bits",
        f"PackedLoader: seq_len must be in [1, 2^31 - 1], got {2**32}"]


@pytest.mark.parametrize("backend", ["python", "cpp"])
def test_train_py_refuses_an_absurd_batch_size_naming_it(tmp_path, shards, backend):
    proc = run_train_py(tmp_path, shards, f"data.batch_size={2**60}", f'data.backend="{backend}"')
    assert proc.returncode not in (0, -11)                              # -11: the segfault it was
    assert f"PackedLoader: batch_size * seq_len = {2**60} * 16 exceeds" in proc.stderr

"""The prepare command on the bundled TCGA reports: bad rows counted and reported with file and line, token
totals that add up, a patient-level split, identical output with 1 or 2 workers, and the SFT form."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cancerllm.data import read_shard
from cancerllm.data.loader import pack_rows
from cancerllm.data.prepare import main as prepare
from cancerllm.tokenizer import train

REPORTS = Path(__file__).resolve().parents[1] / "data" / "tcga" / "reports.csv"
csv.field_size_limit(1 << 30)


@pytest.fixture(scope="module")
def reports():
    with open(REPORTS, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, reports):
    folder = tmp_path_factory.mktemp("tokenizer")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(r["text"].replace("\n", " ") for r in reports[:300]))
    return train([corpus], folder / "tcga", vocab_size=1000, num_threads=1)


def run(tokenizer, inputs, out, *extra):
    return prepare([*map(str, inputs), "--tokenizer", str(tokenizer.path), "--out", str(out), "--quiet", *extra])


def shard_docs(out, manifest, split):
    return [doc for entry in manifest["splits"][split]["shards"] for doc in read_shard(out / entry["file"])]


def with_bad_rows(tmp_path):
    """reports.csv plus five unusable rows appended; returns the file and {line: reason}."""
    raw = REPORTS.read_bytes()
    line = raw.count(b"\n") + 1
    bad = [b'TCGA-XX-0001,f,BRCA,T1,T1,,,""\n',                  # empty text
           b"TCGA-XX-0002,f,BRCA\n",                               # row too short: no text column
           b'TCGA-XX-0003,f,BRCA,T1,T1,,,"caf\xe9 \xff report"\n',  # latin-1 bytes: not UTF-8
           b'TCGA-XX-0004,f,BRCA,T1,T1,,,"   "\n',                 # whitespace only
           b'"",f,BRCA,T1,T1,,,"a report without a patient"\n']   # no group
    reasons = ["empty text", "3 field(s), the header has 8", "undecodable bytes in text", "empty text",
               "missing patient_id"]
    path = tmp_path / "reports_bad.csv"
    path.write_bytes(raw + b"".join(bad))
    return path, {line + i: r for i, r in enumerate(reasons)}


def test_tcga_reports_with_bad_rows(tmp_path, tokenizer, reports, capsys):
    path, expected_bad = with_bad_rows(tmp_path)
    out = tmp_path / "out"
    manifest = run(tokenizer, [path], out, "--group-column", "patient_id", "--verify", "--shard-mb", "0.5")
    assert {(b["file"], b["line"], b["reason"]) for b in manifest["bad_rows"]} == \
        {(str(path), line, reason) for line, reason in expected_bad.items()}
    err = capsys.readouterr().err
    assert f"{path}:{min(expected_bad)}: skipped: empty text" in err
    # nothing silently lost: every good report is in a shard, with BOS/EOS, and the totals add up
    want_tokens = sum(len(tokenizer.encode(r["text"], bos=True, eos=True)) for r in reports)
    source = manifest["sources"][str(path)]
    assert (source["documents"], source["tokens"], source["bad_rows"]) == (len(reports), want_tokens, 5)
    splits = manifest["splits"]
    assert splits["train"]["documents"] + splits["val"]["documents"] == len(reports)
    assert splits["train"]["tokens"] + splits["val"]["tokens"] == want_tokens
    assert len(splits["train"]["shards"]) > 1, "--shard-mb should have cut several shards"
    docs = shard_docs(out, manifest, "train") + shard_docs(out, manifest, "val")
    assert sum(map(len, docs)) == want_tokens
    assert all(d[0] == tokenizer.bos_id and d[-1] == tokenizer.eos_id for d in docs)
    assert manifest["tokenizer"]["sha256"] == tokenizer.fingerprint()
    assert 0 < splits["val"]["documents"] < len(reports) * 0.15
    assert json.loads((out / "manifest.json").read_text()) == manifest


def test_strict_stops_at_the_first_bad_row(tmp_path, tokenizer):
    path, expected_bad = with_bad_rows(tmp_path)
    with pytest.raises(SystemExit, match=f"{path}:{min(expected_bad)}: empty text"):
        run(tokenizer, [path], tmp_path / "out", "--strict")


def test_group_never_on_both_sides(tmp_path, tokenizer, reports):
    rows = [(f"P{i % 40}", f"{r['text'][:300]} copy {i}") for i, r in enumerate(reports[:120])]
    path = tmp_path / "multi.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([("patient_id", "text"), *rows])
    out = tmp_path / "out"
    manifest = run(tokenizer, [path], out, "--group-column", "patient_id", "--val-fraction", "0.3")
    patient_of = {tuple(tokenizer.encode(text, bos=True, eos=True)): p for p, text in rows}
    sides = {split: {patient_of[tuple(d.tolist())] for d in shard_docs(out, manifest, split)}
             for split in ("train", "val")}
    assert sides["train"] and sides["val"] and not sides["train"] & sides["val"]
    assert manifest["split"]["by"] == "patient_id"


def test_one_and_two_workers_write_identical_shards(tmp_path, tokenizer, reports):
    path = tmp_path / "small.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(reports[0]))
        w.writeheader()
        w.writerows(reports[:200])
    outs = [tmp_path / f"w{n}" for n in (1, 2)]
    for n, out in zip((1, 2), outs):
        run(tokenizer, [path], out, "--workers", str(n))
    names = sorted(p.name for p in outs[0].glob("*.bin"))
    assert names == sorted(p.name for p in outs[1].glob("*.bin")) and names
    for name in names:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()


def test_jsonl_and_text_inputs(tmp_path, tokenizer):
    jsonl, text = tmp_path / "notes.jsonl", tmp_path / "notes.txt"
    jsonl.write_text('{"text": "Invasive ductal carcinoma."}\n{"body": "no text key"}\n[1, 2]\n{bad json\n')
    text.write_text("Adenocarcinoma of the colon.\n\nNo tumour seen.\n")
    manifest = run(tokenizer, [jsonl, text], tmp_path / "out", "--val-fraction", "0")
    reasons = [(Path(b["file"]).name, b["line"], b["reason"].split(" (")[0]) for b in manifest["bad_rows"]]
    assert reasons == [("notes.jsonl", 2, "missing text"), ("notes.jsonl", 3, "a JSON list, not an object"),
                       ("notes.jsonl", 4, "invalid JSON at column 2: Expecting property name enclosed in double "
                                          "quotes"),
                       ("notes.txt", 2, "empty text")]
    assert manifest["splits"]["train"]["documents"] == 3 and manifest["splits"]["val"]["documents"] == 0


def test_sft_masks_only_the_completion_and_eos(tmp_path, tokenizer):
    examples = [{"prompt": "Report: invasive ductal carcinoma, left breast.\nSite:", "completion": " breast"},
                {"prompt": "", "completion": "No tumour."}]
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(map(json.dumps, examples)) + '\n{"prompt": "no completion"}\n')
    out = tmp_path / "out"
    manifest = run(tokenizer, [path], out, "--sft", "--val-fraction", "0")
    assert manifest["kind"] == "sft" and [b["line"] for b in manifest["bad_rows"]] == [3]
    shard = read_shard(out / "train-00000.bin")
    for i, ex in enumerate(examples):
        prompt = tokenizer.encode(ex["prompt"], bos=True)
        completion = tokenizer.encode(ex["completion"], bos=False, eos=True)
        np.testing.assert_array_equal(shard.doc(i), prompt + completion)
        np.testing.assert_array_equal(shard.doc_mask(i), [0] * len(prompt) + [1] * len(completion))


def examples_in(out):
    pairs = []
    for path in sorted(out.glob("train-*.bin")):
        shard = read_shard(path)
        pairs += [(bytes(shard.doc(i)), bytes(shard.doc_mask(i))) for i in range(len(shard))]
    return sorted(pairs)


def greedy_rows(lengths, capacity):
    """Rows the loader packs these example lengths into."""
    return len(pack_rows(lengths, capacity)) - 1


def rows_bound(lengths, capacity):
    """A lower bound on the rows of any packing: total tokens over capacity."""
    return -(-sum(min(n, capacity) for n in lengths) // capacity)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_best_fit_order_gives_the_loader_full_rows(seed):
    from cancerllm.data.prepare import best_fit_order
    rng = np.random.default_rng(seed)
    capacity = 65
    lengths = list(rng.integers(2, 60, size=300)) + [90, 65, 64]          # too long, exactly a row, almost
    order, rows = best_fit_order(lengths, capacity)
    assert sorted(order) == list(range(len(lengths)))                        # every example once
    assert greedy_rows([lengths[i] for i in order], capacity) == rows        # the loader forms exactly those bins
    assert rows_bound(lengths, capacity) <= rows < greedy_rows(lengths, capacity)
    assert rows <= 1.1 * rows_bound(lengths, capacity) + 1


def test_pack_to_writes_the_same_examples_in_fewer_rows(tmp_path, tokenizer, reports):
    from cancerllm.data import PackedLoader
    rng = np.random.default_rng(0)
    examples = [{"prompt": r["text"][:int(rng.integers(20, 400))], "completion": r["cancer_type"]}
                for r in reports[:120]]
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(map(json.dumps, examples)) + "\n")
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    run(tokenizer, [path], plain, "--sft", "--val-fraction", "0")
    manifest = run(tokenizer, [path], packed, "--sft", "--val-fraction", "0", "--pack-to", "128", "--shard-mb",
                   "0.0005")                                               # several shards: packing spans them
    assert examples_in(plain) == examples_in(packed)                       # same examples and masks, reordered
    packing = manifest["splits"]["train"]["packing"]
    loaders = {name: PackedLoader(sorted(out.glob("train-*.bin")), seq_len=128, batch_size=1, backend="python")
               for name, out in (("plain", plain), ("packed", packed))}
    assert len(manifest["splits"]["train"]["shards"]) > 1
    assert loaders["packed"].num_samples == packing["rows"] < loaders["plain"].num_samples
    assert packing["fill"] > 0.9
    with pytest.raises(ValueError, match="--pack-to"):
        run(tokenizer, [path], tmp_path / "pretrain", "--format", "jsonl", "--text-column", "prompt", "--pack-to",
            "128")


def test_refuses_a_folder_with_shards_and_bad_arguments(tmp_path, tokenizer):
    text = tmp_path / "a.txt"
    text.write_text("Some report.\n")
    run(tokenizer, [text], tmp_path / "out")
    with pytest.raises(FileExistsError, match="already holds shards"):
        run(tokenizer, [text], tmp_path / "out")
    with pytest.raises(ValueError, match=r"reports.csv: missing column\(s\) 'patient'"):
        run(tokenizer, [REPORTS], tmp_path / "out2", "--group-column", "patient")
    markdown = tmp_path / "a.md"
    markdown.write_text("x")
    with pytest.raises(ValueError, match="a.md: unknown input format '.md'"):
        run(tokenizer, [markdown], tmp_path / "out3")
    with pytest.raises(SystemExit):
        run(tokenizer, [text], tmp_path / "out4", "--val-fraction", "1.5")


def test_command_line_entry_point(tmp_path, tokenizer):
    text = tmp_path / "a.txt"
    text.write_text("Squamous cell carcinoma.\nBenign.\n")
    done = subprocess.run([sys.executable, "-m", "cancerllm.data.prepare", str(text), "--tokenizer",
                           str(tokenizer.path), "--out", str(tmp_path / "out"), "--workers", "1", "--val-fraction", "0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "train: 2 documents" in done.stdout and (tmp_path / "out" / "manifest.json").is_file()

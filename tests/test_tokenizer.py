import csv
import sys

import pytest

from cancerllm import Tokenizer
from cancerllm.tokenizer import mistral_tokenizer_path, train

csv.field_size_limit(sys.maxsize)


def bundled_reports(n):
    with open("data/tcga/reports.csv", newline="") as f:
        return [row["text"] for _, row in zip(range(n), csv.DictReader(f))]


def test_mistral_v1_vocabulary():
    tok = Tokenizer(mistral_tokenizer_path())
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (32000, 1, 2)
    ids = tok.encode("Invasive ductal carcinoma, pT2 N0.", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2


def test_round_trip_on_bundled_reports():
    tok = Tokenizer(mistral_tokenizer_path())
    for text in bundled_reports(50):
        assert tok.decode(tok.encode(text)) == text


def test_train_a_domain_vocabulary(tmp_path):
    corpus = tmp_path / "reports.txt"
    corpus.write_text("\n".join(bundled_reports(200)))
    tok = train([corpus], tmp_path / "tcga", vocab_size=2000)
    assert tok.vocab_size == 2000 and (tok.bos_id, tok.eos_id) == (1, 2)
    text = "Gleason score 4+3=7; ER positive (95%), HER2 negative. Résumé ✓"
    assert tok.decode(tok.encode(text)) == text       # byte fallback: nothing unencodable
    tok.check_fits(2000)
    with pytest.raises(ValueError, match="2000 pieces but the model has vocab_size=1000"):
        tok.check_fits(1000)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.model"):
        Tokenizer(tmp_path / "missing.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.model"):
        Tokenizer(junk)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        train([tmp_path / "nope.txt"], tmp_path / "x")
    with pytest.raises(TypeError, match="text must be str"):
        Tokenizer(mistral_tokenizer_path()).encode(b"bytes")

"""Abstention (cancerllm/tasks/abstention.py): a JSON answer's per-value log-probabilities from its tokens, thresholds
chosen on validation answers, the abstention.json file, and the helpers and the eval withholding the same values."""
import json
import math
import random
import shutil

import pytest

from cancerllm import eval as cancer_eval
from cancerllm.generate import Generator
from cancerllm.tasks import abstention as A
from cancerllm.tasks.build import read_reports
from cancerllm.tasks.fields import FIELDS
from cancerllm.tasks.prompts import load_prompt_settings
from cancerllm.tokenizer import Tokenizer, mistral_tokenizer_path, open_tokenizer
from tasks_util import first_reports_datasets, tiny_checkpoint
from test_tokenizer_json import smollm_like, train_bpe

ANSWER = {**dict.fromkeys(FIELDS), "cancer_type": "Lung adenocarcinoma", "primary_site": "Lung", "pT": "T1a",
          "pN": "N0", "stage": "Stage IA", "gleason": "4+3=7"}


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bpe")
    smollm_like(folder, train_bpe())
    return open_tokenizer(folder)


def segments(space_after_colon: bool) -> list:
    """The answer as (text, field or None) pieces: each value with the delimiter after it, and the keys between."""
    out = []
    for i, f in enumerate(FIELDS):
        key = ("{" if i == 0 else " ") + json.dumps(f) + (": " if space_after_colon else ":")
        out += [(key, None), (json.dumps(ANSWER[f]) + ("}" if f == FIELDS[-1] else ","), f)]
    return out


@pytest.mark.parametrize("kind", ["byte-level BPE", "sentencepiece"])
def test_each_values_log_probability_sums_exactly_its_own_tokens(kind, byte_level):
    """Encoded piece by piece, so which tokens wrote which value is known: keys' tokens weigh -1000, each value's
    tokens fresh random log-probabilities whose sum is that value's."""
    rng = random.Random(0)
    if kind == "sentencepiece":      # its dummy prefix spaces each piece: keys then end at the colon
        tok = Tokenizer(mistral_tokenizer_path())
        pieces = [(tok.encode(text, bos=False), f) for text, f in segments(space_after_colon=False)]
    else:
        tok = byte_level
        pieces = [(tok.encode(text, bos=False), f) for text, f in segments(space_after_colon=True)]
        assert tok.decode([i for ids, _ in pieces for i in ids]) == "".join(t for t, _ in segments(True))
    token_ids, logprobs, expected = [], [], dict.fromkeys(FIELDS, 0.0)
    for ids, f in pieces:
        for i in ids:
            lp = -1000.0 if f is None else -rng.random()
            token_ids.append(i)
            logprobs.append(lp)
            if f is not None:
                expected[f] += lp
    assert json.loads(tok.decode(token_ids)) == ANSWER
    got = A.value_logprobs(tok, token_ids, logprobs)
    assert got.keys() == set(FIELDS)
    for f in FIELDS:
        assert got[f] == pytest.approx(expected[f], abs=1e-9), f


def test_a_cut_answer_gives_the_values_it_completed():
    text = json.dumps(ANSWER)
    cut = text[:text.index('"pN"') + 9]                  # inside pN's value
    assert list(A.value_spans(cut)) == list(FIELDS[:FIELDS.index("pN")])
    start, end = A.value_spans(text)["pT"]
    assert text[start:end] == '"T1a",'


def records(n_fields_right=40, n_low=30, low_right=0.2, seed=0):
    """Synthetic validation answers: every field right and sure (-0.05), except pT: sure and right on the first
    n_fields_right records, unsure (-2 .. -3) on n_low more, right on a share low_right of those."""
    rng = random.Random(seed)
    golds, answers, confs = [], [], []
    for i in range(n_fields_right + n_low):
        gold = {**ANSWER, "pT": rng.choice(["T1a", "T2", "T3"])}
        sure = i < n_fields_right
        right = sure or rng.random() < low_right
        answer = {**gold, "pT": gold["pT"] if right else {"T1a": "T2", "T2": "T3", "T3": "T1a"}[gold["pT"]]}
        golds.append(gold)
        answers.append(answer)
        confs.append({**dict.fromkeys(FIELDS, -0.05), "pT": -0.05 if sure else -2 - rng.random()})
    return golds, answers, confs


def test_calibration_withholds_the_guesses_and_raises_micro_f1():
    golds, answers, confs = records(low_right=0.2)
    thresholds, gain = A.calibrate(golds, answers, confs)
    assert list(thresholds) == ["pT"] and -2.0 < thresholds["pT"] < -0.05
    assert gain > 0                                      # held out, too
    finished = A.finished_answers(answers, confs, thresholds, None)
    assert all((a["pT"] is None) == (c["pT"] < -1) for a, c in zip(finished, confs))
    assert A.micro_f1(golds, finished) > A.micro_f1(golds, answers)


def test_calibration_keeps_answers_right_often_enough_and_fields_with_few_answers():
    golds, answers, confs = records(low_right=0.9)       # right 90% of the time: above micro F1 / 2
    assert A.calibrate(golds, answers, confs) == ({}, None)
    golds, answers, confs = records(n_fields_right=5, n_low=10, low_right=0.0)
    assert A.calibrate(golds, answers, confs) == ({}, None)      # 15 answers < MIN_ANSWERS
    assert "pT" in A.calibrate(golds, answers, confs, min_answers=10)[0]
    with pytest.raises(ValueError, match="2 gold records, 1 answers"):
        A.calibrate(golds[:2], answers[:1], confs[:1])
    with pytest.raises(ValueError, match="folds must be at least 2"):
        A.calibrate(golds, answers, confs, folds=1)


def noise_records(n=90, right=0.5, seed=0):
    """pT right with the same chance whatever its log-probability: no threshold tells guesses from readings."""
    rng = random.Random(seed)
    golds, answers, confs = [], [], []
    for _ in range(n):
        gold = {**ANSWER, "pT": rng.choice(["T1a", "T2", "T3"])}
        golds.append(gold)
        answers.append({**gold, "pT": gold["pT"] if rng.random() < right else "T4"})
        confs.append({**dict.fromkeys(FIELDS, -0.05), "pT": -3 * rng.random()})
    return golds, answers, confs


@pytest.mark.parametrize("seed", range(4))
def test_calibration_does_not_fit_thresholds_to_noise(seed):
    """The best threshold on the reports themselves beats answering all (by chance: the lowest few happen to be
    wrong), and cross-validation turns it down; the old rule (best on the reports) would have kept it."""
    golds, answers, confs = noise_records(seed=seed)
    levels = sorted({c["pT"] for c in confs})
    in_sample = max(A.micro_f1(golds, A.finished_answers(answers, confs, {"pT": t}, None)) for t in levels)
    assert in_sample > A.micro_f1(golds, answers)
    assert A.calibrate(golds, answers, confs)[0] == {}


def test_held_out_gain_scores_the_procedure_on_folds_it_was_not_fitted_on():
    golds, answers, confs = records(low_right=0.0)
    assert A.held_out_gain(lambda *_: {}, golds, answers, confs, None, 5, 2, 0) == 0
    assert A.held_out_gain(lambda *_: {"pT": -1.0}, golds, answers, confs, None, 5, 2, 0) == pytest.approx(
        A.micro_f1(golds, A.finished_answers(answers, confs, {"pT": -1.0}, None)) - A.micro_f1(golds, answers))
    fitted_sizes = []
    A.held_out_gain(lambda g, a, c: fitted_sizes.append(len(g)) or {}, golds, answers, confs, None, 5, 3, 0)
    assert len(fitted_sizes) == 15 and set(fitted_sizes) == {len(golds) * 4 // 5}


def test_abstention_file_round_trip_and_bad_files_named(tmp_path):
    assert A.load_abstention(tmp_path) is None
    A.save_abstention(tmp_path, {"pT": -1.5}, {"split": "val"})
    assert A.load_abstention(tmp_path) == {"pT": -1.5}
    path = tmp_path / A.ABSTENTION_FILE
    for raw, message in [("{", "not JSON"), ("[]", "abstain_below"), ('{"abstain_below": []}', "must be an object"),
                         ('{"abstain_below": {"size": -1}}', "'size', not a phenotype field"),
                         ('{"abstain_below": {"pT": true}}', r"abstain_below\['pT'\] must be a finite number"),
                         ('{"abstain_below": {"pT": NaN}}', "finite number")]:
        path.write_text(raw)
        with pytest.raises(ValueError, match=message) as e:
            A.load_abstention(tmp_path)
        assert str(path) in str(e.value)
    path.unlink()
    with pytest.raises(ValueError, match="finite number"):
        A.save_abstention(tmp_path, {"pT": math.inf}, {})
    assert list(tmp_path.iterdir()) == []               # nothing half-written


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A tiny random model exported with the datasets' prompt settings, and those datasets."""
    tmp = tmp_path_factory.mktemp("abstention")
    first_reports_datasets(tmp, 30)
    path = tiny_checkpoint(tmp / "export")
    load_prompt_settings(tmp / "tasks").save(path)
    return path, tmp / "tasks"


def test_the_helper_withholds_what_the_eval_withheld(export, tmp_path):
    """Thresholds at the median of the model's own value log-probabilities: the eval's batched answers and the helper's
    one-report answers withhold the same values, some but not all; abstain=False / --no-abstain give every value."""
    path, data = export
    ckpt = tmp_path / "ckpt"
    shutil.copytree(path, ckpt)
    system = cancer_eval.ModelSystem("model", ckpt, "phenotype-json", 8, 800, load_prompt_settings(data).templates)
    test = cancer_eval.read_jsonl(data / "phenotype-json" / "test.jsonl")
    _, confs = system.answers_with_confidence(test)
    thresholds = {f: sorted(c[f] for c in confs)[len(confs) // 2] for f in ("pT", "pN", "grade")}
    A.save_abstention(ckpt, thresholds, {})
    result = cancer_eval.evaluate(ckpt, "phenotype-json", data=data, out=tmp_path, batch_size=8, max_new_tokens=800,
                                  verbose=False)
    assert result["abstention"] == {"model": thresholds}
    rows = [json.loads(line) for line in (tmp_path / "eval_phenotype-json_test_predictions.jsonl").open()]
    whole = {r["patient_id"]: r["text"] for r in read_reports("data/tcga/reports.csv")}
    gen = Generator.from_pretrained(ckpt)
    assert gen.abstention == thresholds
    withheld = 0
    for record, row, conf in zip(test, [r for r in rows if r["system"] == "model"], confs, strict=True):
        answer = gen.extract_phenotypes(whole[record["patient_id"]], max_new_tokens=800)
        assert answer == json.loads(row["answer"]), record["patient_id"]
        every = gen.extract_phenotypes(whole[record["patient_id"]], max_new_tokens=800, abstain=False)
        for f in FIELDS:
            kept = f not in thresholds or conf[f] >= thresholds[f]
            assert answer[f] == (every[f] if kept else None) or f == "stage", (record["patient_id"], f)
            withheld += not kept
    assert 0 < withheld < 3 * len(test)
    plain = cancer_eval.evaluate(ckpt, "phenotype-json", data=data, out=tmp_path / "plain", batch_size=8,
                                 max_new_tokens=800, verbose=False, abstain=False)
    assert plain["abstention"] == {}


def test_calibrate_checkpoint_writes_thresholds_the_generator_reads(export, tmp_path, capsys):
    path, data = export
    ckpt = tmp_path / "ckpt"
    shutil.copytree(path, ckpt)
    A.main([str(ckpt), "--data", str(data), "--split", "val", "--min-answers", "1", "--batch-size", "4"])
    saved = json.loads((ckpt / A.ABSTENTION_FILE).read_text())
    assert saved["split"] == "val" and saved["n_reports"] >= 1 and saved["min_answers"] == 1
    assert saved["micro_f1"]["abstaining"] >= saved["micro_f1"]["answering_all"]
    assert saved["cross_validation"]["folds"] == A.FOLDS
    assert Generator.from_pretrained(ckpt).abstention == saved["abstain_below"]
    assert str(ckpt / A.ABSTENTION_FILE) in capsys.readouterr().out
    with pytest.raises(SystemExit, match="nonexistent.jsonl: no examples to calibrate on"):
        A.main([str(ckpt), "--data", str(data), "--split", "nonexistent"])

"""tokenizer.json checkpoints (JsonTokenizer, open_tokenizer) against transformers' tokenizer for the same directory.

The checkpoints are built here with the `tokenizers` library: a small byte-level BPE (SmolLM2's pre-tokenizer: digits
split, then GPT-2's byte-level regex) trained on the bundled reports, with <|im_start|> / <|im_end|> as special
tokens, in three set-ups of BOS. To compare a real checkpoint (e.g. SmolLM2-135M-Instruct's tokenizer as
`python -m cancerllm.convert gguf` writes it), add a builder to CHECKPOINTS that fills the folder with its files.
"""
import csv
import hashlib
import json
import shutil
import sys

import pytest
import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from cancerllm.data.prepare import main as prepare
from cancerllm.data.shards import read_shard
from cancerllm.tokenizer import JsonTokenizer, Tokenizer, open_tokenizer, train
from cancerllm.train.build import check_data, resolve_tokenizer
from cancerllm.train.config import DataConfig

csv.field_size_limit(sys.maxsize)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
EDGE_TEXTS = [
    "", " ", "a", "0", "1234567890", "pT2 N0 M0, Ki-67 35%, 12/03/2019, 3.14159", "Gleason 4+3=7",
    "café naïve Ünïcödé ß Æ ø", "肺腺癌，乳腺癌。", "😀👍🏽 ❤️ 🧬", "a" * 300,
    "x  y   z    w", "   leading", "trailing   ", "\t\ttabs\tand\nnewlines\n\n\r\n", " \n \t \n",
    "<|im_start|>user\nIs it malignant?<|im_end|>\n<|im_start|>assistant\n", "<|im_start|><|im_end|><|endoftext|>",
    "<|im_start", "im_end|>", "<|im_start|>x<|im_end", "<s></s><unk><|tool|>",
]


def bundled_reports(n=None):
    with open("data/tcga/reports.csv", newline="") as f:
        return [row["text"] for i, row in enumerate(csv.DictReader(f)) if n is None or i < n]


@pytest.fixture(scope="module")
def trained_bpe():
    return train_bpe()


def train_bpe():
    """A byte-level BPE of a few hundred merges, as tokenizer.json text."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(bundled_reports(300), trainer)
    assert tok.get_vocab_size() - 256 - len(SPECIALS) >= 400       # the merges this test is about
    return tok.to_str()


def smollm_like(folder, tokenizer_json):
    """SmolLM2's set-up: bos_token <|im_start|> named but never prepended."""
    (folder / "tokenizer.json").write_text(tokenizer_json)
    write_config(folder, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>",
                 pad_token="<|im_end|>")


def template_bos(folder, tokenizer_json):
    """Llama 3's set-up: the tokenizer.json's post-processor prepends <|endoftext|> as BOS."""
    tok = tokenizers.Tokenizer.from_str(tokenizer_json)
    tok.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", pair="<|endoftext|> $A $B",
                                                       special_tokens=[("<|endoftext|>", 0)])
    (folder / "tokenizer.json").write_text(tok.to_str())
    write_config(folder, bos_token="<|endoftext|>", eos_token="<|im_end|>")


def config_only_specials(folder, tokenizer_json):
    """Special tokens only tokenizer_config.json names (both sides add them to the vocabulary), and add_bos_token,
    which transformers ignores beside a tokenizer.json; the EOS comes from generation_config.json."""
    (folder / "tokenizer.json").write_text(tokenizer_json)
    write_config(folder, bos_token={"content": "<s>", "__type": "AddedToken"}, unk_token="<unk>", add_bos_token=True,
                 additional_special_tokens=["<|tool|>"])
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))


# name: (builder, the BOS transformers prepends or None, the EOS token)
CHECKPOINTS = {"smollm-like": (smollm_like, None, "<|im_end|>"),
               "template-bos": (template_bos, "<|endoftext|>", "<|im_end|>"),
               "config-only-specials": (config_only_specials, None, "<|im_end|>")}


def write_config(folder, **tokens):
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "chat_template": CHAT_TEMPLATE, **tokens}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def checkpoint(request, trained_bpe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoints") / request.param
    folder.mkdir()
    CHECKPOINTS[request.param][0](folder, trained_bpe)
    return folder


def test_open_tokenizer_picks_the_kind(checkpoint):
    tok = open_tokenizer(checkpoint)
    assert isinstance(tok, JsonTokenizer) and tok.path == checkpoint / "tokenizer.json"
    assert isinstance(open_tokenizer(checkpoint / "tokenizer.json"), JsonTokenizer)
    assert tok.fingerprint() == hashlib.sha256((checkpoint / "tokenizer.json").read_bytes()).hexdigest()


def test_special_ids_match_transformers(checkpoint):
    ours, theirs = open_tokenizer(checkpoint), transformers.AutoTokenizer.from_pretrained(checkpoint)
    assert ours.vocab_size == len(theirs)
    _, bos, eos = CHECKPOINTS[checkpoint.name]
    assert ours.bos_id == (None if bos is None else theirs.convert_tokens_to_ids(bos))
    assert ours.eos_id == theirs.convert_tokens_to_ids(eos)
    prefix = [] if ours.bos_id is None else [ours.bos_id]
    assert theirs.encode("x") == prefix + theirs.encode("x", add_special_tokens=False)
    assert [ours.id_to_piece(i) for i in range(ours.vocab_size)] == theirs.convert_ids_to_tokens(range(len(theirs)))


def test_same_ids_as_transformers_on_every_report(checkpoint):
    """All 912 bundled reports (3.2 MB): about 6 s per checkpoint on one free core."""
    ours, theirs = open_tokenizer(checkpoint), transformers.AutoTokenizer.from_pretrained(checkpoint)
    for text in EDGE_TEXTS + bundled_reports():
        assert ours.encode(text) == theirs.encode(text), text[:200]


@pytest.mark.parametrize("loader", ["AutoTokenizer", "PreTrainedTokenizerFast"])
def test_flags_and_decoding_match_transformers(checkpoint, loader):
    ours, theirs = open_tokenizer(checkpoint), getattr(transformers, loader).from_pretrained(checkpoint)
    for text in EDGE_TEXTS + bundled_reports(100):
        ids = ours.encode(text)
        assert ids == theirs.encode(text), text[:200]
        assert ours.encode(text, bos=False) == theirs.encode(text, add_special_tokens=False), text[:200]
        assert ours.encode(text, bos=False, eos=True)[-1] == ours.eos_id
        assert ours.decode(ids) == theirs.decode(ids), text[:200]
        assert ours.decode(ours.encode(text, bos=False)) == text, text[:200]


def test_special_tokens_in_text_are_single_ids(checkpoint):
    tok = open_tokenizer(checkpoint)
    start, end = (tok.backend.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>"))
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>", bos=False)
    assert ids[0] == start and ids[-1] == end and ids.count(start) == ids.count(end) == 1
    assert start not in tok.encode("<|im_start", bos=False)


def test_incremental_decoding_holds_back_unfinished_characters(checkpoint):
    """The Generator decodes the whole sequence at each token and holds back a trailing U+FFFD: the byte-level
    pieces of an emoji or CJK character, split over several tokens, must decode to U+FFFD until complete."""
    from cancerllm.generate import IncrementalText
    tok = open_tokenizer(checkpoint)
    text = "Résumé: 肺腺癌 😀👍🏽 done"
    ids = tok.encode(text, bos=False)
    partial = [tok.decode(ids[:k]) for k in range(len(ids) + 1)]
    assert any(p.endswith("\ufffd") for p in partial)             # some character spans several tokens
    assert all(text.startswith(p.rstrip("\ufffd")) for p in partial)
    stream = IncrementalText(tok, stop=())
    shown = []
    for i in ids:
        stream.push(i)
        shown.append(stream.take())
    assert "\ufffd" not in "".join(shown) and "".join(shown) + stream.take(final=True) == text


def test_prepare_writes_the_tokenizers_ids(checkpoint, tmp_path):
    reports = bundled_reports(20)
    source = tmp_path / "reports.csv"
    with open(source, "w", newline="") as f:
        csv.writer(f).writerows([["text"]] + [[r] for r in reports])
    manifest = prepare([str(source), "--tokenizer", str(checkpoint), "--out", str(tmp_path / "shards"),
                        "--val-fraction", "0", "--workers", "2", "--quiet"])
    tok = open_tokenizer(checkpoint)
    assert manifest["tokenizer"]["sha256"] == tok.fingerprint()
    assert (manifest["tokenizer"]["bos_id"], manifest["tokenizer"]["eos_id"]) == (tok.bos_id, tok.eos_id)
    docs = [shard.doc(i).tolist() for path in sorted((tmp_path / "shards").glob("train-*.bin"))
            for shard in [read_shard(path)] for i in range(len(shard))]
    assert docs == [tok.encode(r, bos=True, eos=True) for r in reports]
    # training (data.tokenizer = the checkpoint directory) holds the shards to the same tokenizer.json
    shards = [str(tmp_path / "shards" / "train-*.bin")]
    assert resolve_tokenizer(str(checkpoint)) == checkpoint / "tokenizer.json"
    check_data(DataConfig(train=shards, tokenizer=str(checkpoint)), tok.vocab_size)
    other = shutil.copytree(checkpoint, tmp_path / "other")
    with open(other / "tokenizer.json", "a") as f:
        f.write("\n")                                    # the same vocabulary in another file: another sha256
    with pytest.raises(ValueError, match=f"made with the tokenizer {checkpoint / 'tokenizer.json'}"):
        check_data(DataConfig(train=shards, tokenizer=str(other)), tok.vocab_size)


def test_a_directory_with_both_kinds_opens_its_sentencepiece_model(checkpoint, tmp_path):
    folder = tmp_path / "both"
    folder.mkdir()
    (folder / "tokenizer.json").write_text((checkpoint / "tokenizer.json").read_text())
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(bundled_reports(50)))
    train([corpus], folder / "tokenizer", vocab_size=500)
    assert isinstance(open_tokenizer(folder), Tokenizer)


def test_bad_files_are_named(trained_bpe, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: holds neither tokenizer.model nor tokenizer.json"):
        open_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        open_tokenizer(tmp_path / "missing.json")
    rejected = tmp_path / "tokenizer.json"
    rejected.write_text('{"model": {"type": "BPE", "vocab": 3}}')
    with pytest.raises(ValueError, match=f"{rejected}: not a tokenizer.json the tokenizers library can read"):
        open_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="tokenizer.json: not a sentencepiece model .*open_tokenizer"):
        Tokenizer(rejected)
    rejected.write_text(trained_bpe)
    with pytest.raises(ValueError, match=f"{rejected}: no EOS token"):
        open_tokenizer(rejected)
    config = tmp_path / "tokenizer_config.json"
    config.write_text("{not json")
    with pytest.raises(ValueError, match=f"{config}: not JSON"):
        open_tokenizer(rejected)
    config.write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<pad>"}))
    open_tokenizer(rejected)        # a named token outside the vocabulary is added, as transformers does
    config.write_text(json.dumps({"eos_token": "<|im_end|>", "bos_token": 7}))
    with pytest.raises(ValueError, match=f"{config}: bos_token 7 is not a token"):
        open_tokenizer(rejected)
    config.unlink()
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 5000}))
    with pytest.raises(ValueError, match=f"{tmp_path / 'config.json'}: eos_token_id 5000 is not a token id"):
        open_tokenizer(rejected)
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 2}))
    assert open_tokenizer(rejected).eos_id == 2
    with pytest.raises(ValueError, match="lone surrogate"):
        open_tokenizer(tmp_path).encode("bad \ud800")
    with pytest.raises(TypeError, match="JsonTokenizer.encode: text must be str"):
        open_tokenizer(tmp_path).encode(b"bytes")


def test_constrained_decoding_reads_a_byte_level_vocabulary(checkpoint):
    """The grammar engine is told the byte-level spelling: sampled answers under a choice grammar are exactly one of
    the choices (spaces, digits and letters spelt through GPT-2's byte alphabet), and JSON under the schema parses."""
    import torch
    from cancerllm import Generator, ModelArgs, Transformer
    from cancerllm.tasks.constrained import ChoiceProcessor, JsonSchemaProcessor
    from cancerllm.tasks.fields import ALLOWED, FIELDS
    tok = open_tokenizer(checkpoint)
    torch.manual_seed(0)
    model = Transformer(ModelArgs.preset("tiny", vocab_size=tok.vocab_size))
    gen = Generator(model, tok)
    choices = ALLOWED["pN"] + ["not mentioned"]
    proc = ChoiceProcessor(tok, choices)
    for seed in range(3):
        for r in gen.generate(["Report: pT2 N0.", "x"], max_new_tokens=40, temperature=1.0, seed=seed,
                              logits_processor=proc):
            assert r.finish_reason == "eos" and r.text.strip() in choices, r.text
    [r] = gen.generate(["Report:"], max_new_tokens=600, temperature=1.0, seed=0,
                       logits_processor=JsonSchemaProcessor(tok))
    assert r.finish_reason == "eos" and list(json.loads(r.text)) == list(FIELDS), r.text
    # deterministically: inside a free-text value, a raw control byte (GPT-2's "ė" spells 0x17) is refused
    proc = JsonSchemaProcessor(tok)
    proc.reset(1)
    for t in tok.encode('{"cancer_type": null, "primary_site": "ab', bos=False):
        proc.advance(0, t)
    assert not proc.matchers[0].accept_token(tok.backend.token_to_id("ė"))


def test_save_pretrained_carries_a_tokenizer_json_checkpoints_files(checkpoint, tmp_path):
    """A model saved with a tokenizer.json checkpoint's tokenizer ships that tokenizer byte for byte (its
    fingerprint, which shards and eval check, is the file's hash), with its tokenizer_config.json; a later save
    without a tokenizer is refused, as beside a tokenizer.model."""
    from cancerllm import Generator, ModelArgs, Transformer
    tok = open_tokenizer(checkpoint)
    model = Transformer(ModelArgs.preset("tiny", vocab_size=tok.vocab_size))
    model.save_pretrained(tmp_path / "out", tokenizer=checkpoint)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (checkpoint / name).read_bytes()
    assert not (tmp_path / "out" / "tokenizer.model").exists()
    gen = Generator.from_pretrained(tmp_path / "out")
    assert gen.tokenizer.fingerprint() == tok.fingerprint() and gen.tokenizer.eos_id == tok.eos_id
    with pytest.raises(ValueError, match="tokenizer.json is from an earlier save"):
        model.save_pretrained(tmp_path / "out")


def test_generation_stops_on_every_eos_id_the_checkpoint_lists(trained_bpe, tmp_path):
    """generation_config.json's eos_token_id list (Llama 3's instruct models: end of turn and end of text): the
    Generator stops on each, beams too, and a save keeps the list in config.json, so the reload stops on each."""
    from cancerllm import Generator, ModelArgs, Transformer
    from generation_util import AllowOnly
    smollm_like(tmp_path, trained_bpe)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))
    tok = open_tokenizer(tmp_path)
    assert (tok.eos_id, tok.stop_ids) == (2, (2, 1))        # <|im_end|> first: tokenizer_config.json's eos_token
    model = Transformer(ModelArgs.preset("tiny", vocab_size=tok.vocab_size)).eval()
    gen = Generator(model, tok)
    result = gen.generate(["pT2 N0"], max_new_tokens=3, logits_processor=AllowOnly([1]))[0]
    assert (result.token_ids, result.finish_reason) == ([1], "eos")
    result = gen.generate(["pT2 N0"], max_new_tokens=3, logits_processor=AllowOnly([1]), ignore_eos=True)[0]
    assert (result.token_ids, result.finish_reason) == ([1, 1, 1], "length")
    beams = gen.generate(["pT2 N0", "grade 3"], max_new_tokens=4, num_beams=2, logits_processor=AllowOnly([1, 7]))
    for result in beams:
        ends = [i for i, t in enumerate(result.token_ids) if t == 1]
        assert ends == ([len(result.token_ids) - 1] if ends else []), result.token_ids
        assert result.finish_reason == ("eos" if ends else "length")
    model.save_pretrained(tmp_path / "out", tokenizer=tmp_path)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["eos_token_id"] == [2, 1]
    assert Generator.from_pretrained(tmp_path / "out").tokenizer.stop_ids == (2, 1)

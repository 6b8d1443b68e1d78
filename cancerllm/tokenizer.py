"""Sentencepiece tokenizer: Mistral's v1 `tokenizer.model` or a domain vocabulary trained with `train`."""
import hashlib
import os
from pathlib import Path

import sentencepiece as spm


class Tokenizer:
    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {self.path}")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(self.path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{self.path}: not a sentencepiece model ({e})") from None

    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        """The model's pad id; Mistral has none, so -1 there (sentencepiece's "unset")."""
        return self.sp.pad_id()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode: text must be str, got {type(text).__name__}")
        try:
            ids = self.sp.EncodeAsIds(text)
        except RuntimeError:
            check_encodable(text)       # sentencepiece's own message ("Unable to cast ...") says nothing useful
            raise
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.IdToPiece(int(i))

    def fingerprint(self) -> str:
        """sha256 of the model file: identifies the vocabulary in manifests and checkpoints."""
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    def check_fits(self, vocab_size: int, what: str = "model"):
        if self.vocab_size > vocab_size:
            raise ValueError(
                f"tokenizer {self.path} has {self.vocab_size} pieces but the {what} has vocab_size={vocab_size}: "
                "token ids would index past the embedding")


def check_encodable(text: str):
    """Refuse a str that is not valid Unicode text: a lone surrogate (e.g. from a JSON "\\ud800" escape or bytes
    decoded with surrogateescape) has no UTF-8 form, so sentencepiece cannot take it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"Tokenizer.encode: text holds a lone surrogate U+{ord(text[e.start]):04X} at character "
                         f"{e.start}, which is not valid Unicode (bytes that were not UTF-8, read with "
                         "surrogateescape? a JSON \\ud800 escape?)") from None


def train(input_files, model_prefix, *, vocab_size=8000, model_type="bpe", character_coverage=0.9999,
          input_sentence_size=2_000_000, num_threads=None) -> Tokenizer:
    """Train a domain sentencepiece vocabulary on text files (one sentence or document per line), with
    Mistral's conventions: <unk>=0, <s>=1, </s>=2, no pad, byte fallback so no text is ever unencodable,
    digits split. Returns the loaded tokenizer; the model is written to `{model_prefix}.model`."""
    files = [str(f) for f in input_files]
    for f in files:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"tokenizer.train: input file not found: {f}")
    Path(model_prefix).parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.Train(
        input=",".join(files), model_prefix=str(model_prefix), vocab_size=vocab_size, model_type=model_type,
        character_coverage=character_coverage, byte_fallback=True, split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, input_sentence_size=input_sentence_size,
        # No sampling of the input: the same files always give the same vocabulary.
        shuffle_input_sentence=False, seed_sentencepiece_size=1_000_000,
        num_threads=num_threads or os.cpu_count(), minloglevel=2, max_sentence_length=1 << 16)
    return Tokenizer(f"{model_prefix}.model")


def mistral_tokenizer_path() -> Path:
    """Mistral's v1 tokenizer.model as shipped inside the mistral-common wheel (found without importing
    mistral_common, whose import would pull its own numpy pins)."""
    import importlib.util
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("mistral-common is not installed: `pip install --no-deps mistral-common` "
                                "provides Mistral's tokenizer.model.v1")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "tokenizer.model.v1"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed mistral-common")
    return path

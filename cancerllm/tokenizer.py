"""Tokenizers of two kinds, one interface (`encode`, `decode`, `bos_id`, `eos_id`, `stop_ids`, `pad_id`, `vocab_size`,
`id_to_piece`, `fingerprint`, `check_fits`, `path`):

- `Tokenizer`: sentencepiece, a `tokenizer.model` (Mistral's v1, or a domain vocabulary trained with `train`);
- `JsonTokenizer`: a Hugging Face `tokenizer.json` read by the `tokenizers` library (byte-level BPE such as
  SmolLM2's), with its special tokens and BOS/EOS set up from the JSON files beside it as transformers does.

`open_tokenizer(path)` opens either kind from the file or from a checkpoint directory.
"""
import hashlib
import json
import os
from pathlib import Path

import sentencepiece as spm
import tokenizers

SENTENCEPIECE_FILE = "tokenizer.model"
JSON_FILE = "tokenizer.json"


def open_tokenizer(path):
    """The tokenizer in `path`: a tokenizer file (`*.json`: a JsonTokenizer, anything else: sentencepiece), or a
    checkpoint directory. A directory's tokenizer.model wins over its tokenizer.json: Mistral's checkpoints ship
    both (the JSON a conversion of the sentencepiece model) and manifests and exports made so far record the
    tokenizer.model's sha256."""
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in (SENTENCEPIECE_FILE, JSON_FILE) if (path / name).is_file()]
        if not found:
            raise FileNotFoundError(f"{path}: holds neither {SENTENCEPIECE_FILE} nor {JSON_FILE}")
        path = found[0]
    return JsonTokenizer(path) if path.suffix == ".json" else Tokenizer(path)


class TokenizerBase:
    """What both kinds share; a subclass sets `path`, `bos_id`, `eos_id` and provides `text_ids`."""

    @property
    def stop_ids(self) -> tuple:
        """The tokens that end a generation: the EOS (a JsonTokenizer adds every eos_token_id its checkpoint's
        generation_config.json lists, as transformers' generate stops on each)."""
        return (self.eos_id,)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"{type(self).__name__}.encode: text must be str, got {type(text).__name__}")
        prefix = [self.bos_id] if bos and self.bos_id is not None else []
        return prefix + self.text_ids(text) + ([self.eos_id] if eos else [])

    def fingerprint(self) -> str:
        """sha256 of the tokenizer file (tokenizer.model or tokenizer.json): identifies the vocabulary in manifests
        and checkpoints. The BOS/EOS ids a tokenizer.json's neighbouring configs name are not part of it (prepare's
        manifest records them beside it)."""
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    def check_fits(self, vocab_size: int, what: str = "model"):
        if self.vocab_size > vocab_size:
            raise ValueError(
                f"tokenizer {self.path} has {self.vocab_size} pieces but the {what} has vocab_size={vocab_size}: "
                "token ids would index past the embedding")


class Tokenizer(TokenizerBase):
    """sentencepiece."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {self.path}")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(self.path))
        except (OSError, RuntimeError) as e:
            hint = "; a tokenizer.json opens with open_tokenizer" if self.path.suffix == ".json" else ""
            raise ValueError(f"{self.path}: not a sentencepiece model ({e}){hint}") from None

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

    def text_ids(self, text: str) -> list[int]:
        try:
            return self.sp.EncodeAsIds(text)
        except RuntimeError:
            check_encodable(text)       # sentencepiece's own message ("Unable to cast ...") says nothing useful
            raise

    def decode(self, ids) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.IdToPiece(int(i))


class JsonTokenizer(TokenizerBase):
    """A Hugging Face tokenizer.json (byte-level BPE such as SmolLM2's, or any model the `tokenizers` library reads),
    set up as transformers' fast tokenizer sets it up from the files beside it, so `encode(text)` gives the ids of
    transformers' `encode(text)`:

    - the special tokens tokenizer_config.json names (bos/eos/unk/pad_token, additional_special_tokens) become
      special added tokens, so they and the tokenizer.json's own added tokens (`<|im_start|>`, `<|im_end|>`) are
      single ids where they appear in text;
    - `bos_id` is the token transformers puts before a text, which is what the tokenizer.json's post-processor
      prepends (transformers ignores tokenizer_config.json's add_bos_token when there is a tokenizer.json). None
      when it prepends nothing (SmolLM2: its bos_token <|im_start|> is never added), and then `encode(bos=True)`
      adds nothing. An EOS is appended only when asked (`eos=True`), whatever the post-processor would append;
    - `eos_id`: tokenizer_config.json's eos_token, else generation_config.json's eos_token_id (the first of a list),
      else config.json's: the token that ends a completion, appended to SFT examples and stopping generation;
    - `stop_ids`: the EOS and every eos_token_id generation_config.json lists (else config.json's), on each of
      which the generator stops, as transformers' generate does;
    - `pad_id`: tokenizer_config.json's pad_token, None when it names none (sentencepiece says -1);
    - `decode` keeps special tokens (transformers' default) and never cleans up spaces, so decode(encode(text,
      bos=False)) == text. Decoding a byte-level sequence that ends inside a multi-byte character ends in U+FFFD
      until the character is complete, which the Generator's incremental text holds back.
    """

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer not found: {self.path}")
        try:
            self.backend = tokenizers.Tokenizer.from_file(str(self.path))
        except Exception as e:          # the library raises a bare Exception for a file it rejects
            raise ValueError(f"{self.path}: not a tokenizer.json the tokenizers library can read ({e})") from None
        folder = self.path.parent
        self.config_path = folder / "tokenizer_config.json"
        config = read_json(self.config_path)
        added = {t.content for t in self.backend.get_added_tokens_decoder().values()}
        self.backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                                         for t in self.named_special_tokens(config) if t not in added])
        self.bos_id = self.prepended_bos()
        config_eos = self.config_eos_ids(folder)
        self.eos_id = self.special_id(config, "eos_token")
        if self.eos_id is None and config_eos:
            self.eos_id = config_eos[0]
        if self.eos_id is None:
            raise ValueError(f"{self.path}: no EOS token: neither tokenizer_config.json (eos_token) nor "
                             f"generation_config.json or config.json (eos_token_id) in {folder} names one")
        self.generation_eos_ids = config_eos
        self.pad_id = self.special_id(config, "pad_token")

    @property
    def stop_ids(self) -> tuple:
        return tuple(dict.fromkeys([self.eos_id, *self.generation_eos_ids]))

    def prepended_bos(self):
        probe = self.backend.encode("a", add_special_tokens=True)
        prefix = probe.ids[:probe.sequence_ids.index(0)]
        if len(prefix) > 1:
            raise ValueError(f"{self.path}: its post-processor puts {len(prefix)} tokens before a text; only a "
                             "single BOS is supported")
        return prefix[0] if prefix else None

    def special_id(self, config: dict, key: str):
        """The id of the token tokenizer_config.json names under `key` (added to the vocabulary if it was not in it,
        as every named special token is); None when it names none."""
        token = self.token_text(config.get(key), key)
        return None if token is None else self.backend.token_to_id(token)

    def named_special_tokens(self, config: dict) -> list[str]:
        named = [self.token_text(config.get(k), k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")]
        named += [self.token_text(t, "additional_special_tokens") for t in config.get("additional_special_tokens", [])]
        return [t for t in named if t]

    def token_text(self, value, key: str):
        """A special token as tokenizer_config.json writes it: a string, or an AddedToken object with its content."""
        token = value.get("content") if isinstance(value, dict) else value
        if token is not None and not isinstance(token, str):
            raise ValueError(f"{self.config_path}: {key} {token!r} is not a token (a string)")
        return token

    def config_eos_ids(self, folder: Path) -> list[int]:
        """generation_config.json's eos_token_id (an id or a list: Llama 3's instruct models end a turn with one
        token and a text with another), else config.json's; [] when neither names one."""
        for path in (folder / "generation_config.json", folder / "config.json"):
            eos = read_json(path).get("eos_token_id")
            ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
            for token_id in ids:
                if isinstance(token_id, bool) or not isinstance(token_id, int) or \
                        not 0 <= token_id < self.vocab_size:
                    raise ValueError(f"{path}: eos_token_id {eos!r} is not a token id of {self.path}")
            if ids:
                return ids
        return []

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def text_ids(self, text: str) -> list[int]:
        try:
            return self.backend.encode(text, add_special_tokens=False).ids     # BOS/EOS: encode's flags alone
        except TypeError:
            check_encodable(text)
            raise

    def decode(self, ids) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_piece(self, i: int) -> str:
        return self.backend.id_to_token(int(i))


def read_json(path: Path) -> dict:
    """A checkpoint's JSON config as a dict; {} when the file does not exist."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: holds a JSON {type(value).__name__}, not an object")
    return value


def check_encodable(text: str):
    """Refuse a str that is not valid Unicode text: a lone surrogate (e.g. from a JSON "\\ud800" escape or bytes
    decoded with surrogateescape) has no UTF-8 form, so neither kind of tokenizer can take it."""
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

"""cancerllm: train and serve Mistral-architecture models for cancer phenotyping and diagnosis.

The public names import their module on first use (`_lazy.py`): `import cancerllm.data.shards` loads no torch."""
from typing import TYPE_CHECKING

from ._lazy import lazy_attributes

__all__ = ["ModelArgs", "Transformer", "Tokenizer", "Generator"]

__getattr__, __dir__ = lazy_attributes(__name__, {
    "ModelArgs": "model", "Transformer": "model", "Tokenizer": "tokenizer", "Generator": "generate"})

if TYPE_CHECKING:   # what type checkers and IDEs see
    from .generate import Generator
    from .model import ModelArgs, Transformer
    from .tokenizer import Tokenizer

"""cancerllm: train and serve Mistral-architecture models for cancer phenotyping and diagnosis."""
from .model import ModelArgs, Transformer
from .tokenizer import Tokenizer

__all__ = ["ModelArgs", "Transformer", "Tokenizer", "Generator"]


def __getattr__(name):
    # The generator pulls in sampling and streaming code that training never needs: import it on first use.
    if name == "Generator":
        from .generate import Generator
        return Generator
    raise AttributeError(f"module 'cancerllm' has no attribute {name!r}")

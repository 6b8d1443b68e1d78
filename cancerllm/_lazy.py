"""Public names that import their submodule on first use (PEP 562), shared by the package `__init__`s: a tool that
needs one part of the package (the data tools: shards, prepare, the loader) does not pay for torch, triton and the
model, and the loader stays free of the model it knows nothing about."""
import importlib
import sys


def lazy_attributes(package: str, sources: dict):
    """(__getattr__, __dir__) for `package`, whose public names `sources` maps to the submodule defining each."""
    def __getattr__(name):
        if name in sources:
            return getattr(importlib.import_module(f".{sources[name]}", package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted({*vars(sys.modules[package]), *sources})

    return __getattr__, __dir__

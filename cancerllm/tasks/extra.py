"""Checks, when imported, that pyproject.toml's `tasks` extra is installed, and otherwise fails naming what is
missing and the command that installs it. eval (and through it the demo) imports this before the task modules, so
a plain `pip install cancerllm` then `python -m cancerllm.eval` says `pip install 'cancerllm[tasks]'` instead of a
bare ModuleNotFoundError from inside a metric."""
from importlib.util import find_spec

# Import name -> distribution, as the `tasks` extra lists them (tests/test_packaging.py checks the two agree).
TASKS_EXTRA = {"nltk": "nltk", "rouge_score": "rouge-score", "xgrammar": "xgrammar", "matplotlib": "matplotlib"}


def check_installed() -> None:
    missing = [dist for module, dist in TASKS_EXTRA.items() if find_spec(module) is None]
    if missing:
        raise ModuleNotFoundError(f"cancerllm's task metrics, eval and demo need {', '.join(missing)}, from the "
                                  "`tasks` extra: pip install 'cancerllm[tasks]'")


check_installed()

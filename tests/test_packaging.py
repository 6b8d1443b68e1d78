"""Packaging: the data tools import no torch (the package `__init__`s are lazy), the public names still import, and
the tasks' entry points name the extra to install when it is missing."""
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_data_tools_import_no_torch_triton_or_model():
    code = ("import sys\n"
            "import cancerllm.data.shards, cancerllm.data.loader\n"
            "from cancerllm.data import PackedLoader, read_shard, write_shard\n"
            "print(sorted(m for m in ('torch', 'triton', 'cancerllm.model', 'cancerllm.kernels') if m in sys.modules))")
    proc = run_python(code)
    assert proc.returncode == 0 and proc.stdout.split() == ["[]"], proc.stdout + proc.stderr[-2000:]


def test_public_names_still_import():
    code = ("import cancerllm, cancerllm.data\n"
            "from cancerllm import Generator, ModelArgs, Transformer, Tokenizer\n"
            "from cancerllm.kernels import attention, set_backend\n"
            "assert {'ModelArgs', 'Transformer', 'Tokenizer', 'Generator'} <= set(dir(cancerllm))\n"
            "assert 'PackedLoader' in dir(cancerllm.data)\n"
            "try:\n"
            "    cancerllm.NoSuchName\n"
            "except AttributeError as e:\n"
            "    print(e)\n")
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "module 'cancerllm' has no attribute 'NoSuchName'" in proc.stdout


def test_the_tasks_extra_module_list_matches_pyproject():
    from cancerllm.tasks.extra import TASKS_EXTRA
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert sorted(pyproject["project"]["optional-dependencies"]["tasks"]) == sorted(TASKS_EXTRA.values())


def test_eval_without_the_tasks_extra_names_it():
    """As after a plain `pip install cancerllm`: rouge-score and xgrammar missing (None in sys.modules blocks them)."""
    code = ("import runpy, sys\n"
            "sys.modules['rouge_score'] = sys.modules['xgrammar'] = None\n"
            "sys.argv = ['cancerllm.eval', '--help']\n"
            "runpy.run_module('cancerllm.eval', run_name='__main__')\n")
    proc = run_python(code)
    assert proc.returncode != 0
    assert ("ModuleNotFoundError: cancerllm's task metrics, eval and demo need rouge-score, xgrammar, from the "
            "`tasks` extra: pip install 'cancerllm[tasks]'") in proc.stderr, proc.stderr[-2000:]

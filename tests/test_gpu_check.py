"""bench/gpu_check.py, the one-call GPU check, in its CPU dry run: every section leaves records in the JSONL, a
budget too small skips sections (saying why), a peer that is not installed is recorded as missing, and the check
runs from a copy of the tree where `cancerllm` is not installed (bench/repo_path.py's shim), as on the GPU machine."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ["env", "correctness", "attention", "memory_bound", "train", "decode", "kernel_tests"]


def run_check(out_dir: Path, *args, python=(sys.executable,), cwd=ROOT, script=ROOT / "bench" / "gpu_check.py",
              env=None) -> list[dict]:
    env = {**(os.environ if env is None else env), "OUT": str(out_dir), "TRITON_INTERPRET": "1"}
    env.pop("CANCERLLM_KERNELS", None)
    proc = subprocess.run([*python, str(script), "--dry-run", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for copy in out_dir.glob("gpu-*.json"):   # the check also leaves its summary in the tree's bench/results/
        (Path(script).parent / "results" / copy.name).unlink(missing_ok=True)
    lines = (out_dir / "gpu_check.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def sections(records):
    return {r["section"]: r for r in records if r["name"] == "section"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    return out, run_check(out)


def test_dry_run_records_every_section(dry_run):
    out, records = dry_run
    done = sections(records)
    assert {name: done[name]["status"] for name in SECTIONS} == {name: "done" for name in SECTIONS}
    for name in SECTIONS:
        assert any(r["section"] == name and r["name"] != "section" for r in records), f"{name}: no results"
    # every case compared and within tolerance: on the GPU a failing case is recorded rather than raised, so that
    # the rest still runs; here, under the interpreter, a failure is a defect of the kernels or of the check
    correctness = [r for r in records if r["section"] == "correctness" and r["name"] != "section"]
    assert len(correctness) >= 9, correctness
    assert [r for r in correctness if r["status"] != "ok"] == []
    assert all(r["max_abs"] >= 0 and r["rel"] >= 0 for r in correctness)
    ceilings = next(r for r in records if r["name"] == "ceilings")
    assert ceilings["matmul_tflops"] > 0 and ceilings["copy_gbps"] > 0
    assert any(r["section"] == "train" and r.get("tokens_per_s", 0) > 0 for r in records)
    assert any(r["section"] == "decode" and r.get("decode_tok_s", 0) > 0 for r in records)
    tests = next(r for r in records if r["section"] == "kernel_tests" and r["name"] == "pytest")
    assert tests["status"] == "ok" and tests.get("tests collected", 0) > 0, tests
    # the whole set is also written at the end, next to the live files
    summary = json.loads(next(out.glob("gpu-*.json")).read_text())
    assert len(summary["rows"]) == len(records)


def test_missing_peer_is_recorded_as_missing(dry_run):
    _, records = dry_run
    liger = [r for r in records if r.get("provider") == "liger"]
    assert liger, "no Liger rows at all"
    if importlib.util.find_spec("liger_kernel") is None:
        assert all(r["status"] == "missing" and "fwdbwd_ms" not in r and "ours/peer" not in r for r in liger)
    # a peer that cannot run here (SDPA's cuDNN kernel on CPU) is an error with its reason, never a zero or a win
    cudnn = [r for r in records if r.get("provider") == "sdpa-cudnn"]
    assert cudnn and all(r["status"] == "error" and r["error"] and "fwdbwd_ms" not in r for r in cudnn)


def test_tiny_budget_skips_sections_and_says_why(tmp_path):
    records = run_check(tmp_path, "--budget-s", "0", "--sections", "env,train,kernel_tests")
    done = sections(records)
    assert {name: r["status"] for name, r in done.items()} == dict.fromkeys(["env", "train", "kernel_tests"],
                                                                            "skipped")
    assert all("left of the 0 s budget" in r["reason"] for r in done.values())


def test_runs_where_cancerllm_is_not_installed(tmp_path):
    """A copy of the tree run with -S: no site processing, so the editable install's finder (installed by a .pth
    file) is absent, while torch stays importable from site-packages named on PYTHONPATH."""
    tree = tmp_path / "tree"
    ignore = shutil.ignore_patterns("*.so", "__pycache__", "results")
    for folder in ("bench", "cancerllm", "kernels", "tests"):
        shutil.copytree(ROOT / folder, tree / folder, ignore=ignore)
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": sysconfig.get_paths()["purelib"],
           "HOME": os.environ.get("HOME", str(tmp_path))}
    python = (sys.executable, "-S")
    # without the shim, this tree's cancerllm cannot import its kernels
    plain = subprocess.run([*python, "-c", "from cancerllm import Transformer"], cwd=tree, env=env,
                           capture_output=True, text=True)
    last = plain.stderr.strip().splitlines()[-1] if plain.stderr.strip() else ""
    assert plain.returncode != 0 and "kernels" in last and ("ImportError" in last or "ModuleNotFound" in last), last
    out = tmp_path / "out"
    records = run_check(out, "--sections", "env,kernel_tests", python=python, cwd=tree,
                        script=tree / "bench" / "gpu_check.py", env=env)
    machine = next(r for r in records if r["name"] == "machine")
    assert machine["kernels_via_repo_path_shim"] is True
    assert Path(machine["cancerllm_kernels"]).resolve() == (tree / "kernels" / "__init__.py").resolve()
    tests = next(r for r in records if r["section"] == "kernel_tests" and r["name"] == "pytest")
    assert tests["status"] == "ok" and tests.get("tests collected", 0) > 0, tests

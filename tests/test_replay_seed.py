"""conftest.py's seeds: a failing test prints the seed it ran with, and CANCERLLM_TEST_SEED=N or --seed N replays
its random draws exactly. Runs pytest in a subprocess on a tiny failing test beside a copy of this conftest."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

FAILING_TEST = '''
import torch

def test_draw():
    print("draw", repr(torch.rand(3).tolist()))
    assert False
'''


def run_failing_test(folder: Path, *args, seed_variable=None):
    env = {k: v for k, v in os.environ.items() if k != "CANCERLLM_TEST_SEED"}
    if seed_variable is not None:
        env["CANCERLLM_TEST_SEED"] = seed_variable
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_draw.py", *args],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    seed = re.search(r"replay with CANCERLLM_TEST_SEED=(\d+) pytest test_draw.py::test_draw", proc.stdout)
    draw = re.search(r"^draw (.*)$", proc.stdout, re.MULTILINE)
    assert seed and draw, proc.stdout[-3000:]
    return int(seed.group(1)), draw.group(1)


def test_a_failure_prints_a_seed_that_replays_it(tmp_path):
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_draw.py").write_text(FAILING_TEST)
    seed, draw = run_failing_test(tmp_path)
    assert run_failing_test(tmp_path, seed_variable=str(seed)) == (seed, draw)
    assert run_failing_test(tmp_path, "--seed", str(seed)) == (seed, draw)
    other_seed, other_draw = run_failing_test(tmp_path, "--seed", str(seed + 1))
    assert other_seed == seed + 1 and other_draw != draw

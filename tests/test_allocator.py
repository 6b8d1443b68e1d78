"""train/allocator.py: after keep_freed_memory(), freed blocks are re-used without faulting their pages in again.
Each case runs in a fresh interpreter, where glibc's thresholds start from their defaults."""
import subprocess
import sys

import pytest

from cancerllm.train.allocator import glibc_mallopt

# A step's pattern, in a fresh interpreter: ten 4 MB blocks allocated, all freed, again: the fewest page faults of
# 6 rounds (10,240 pages a round).
SCRIPT = """
import resource, sys, torch
from cancerllm.train.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def round_faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.empty(4 * 2**20, dtype=torch.uint8).fill_(1) for _ in range(10)]    # touch every page
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(min(round_faults() for _ in range(6)))
"""


def round_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True).stdout
    return int(out.strip().splitlines()[-1])


def test_freed_blocks_are_reused_without_page_faults():
    if glibc_mallopt() is None:
        pytest.skip("the C library is not glibc: no mallopt")
    assert all(round_faults("keep") < 100 for _ in range(2))
    # glibc's defaults trim the freed top of the heap and fault it in again, in most processes (not where the kernel
    # left the heap no room to grow in place: glibc then extends it by a mapping it never trims)
    assert any(round_faults("default") > 4000 for _ in range(4))

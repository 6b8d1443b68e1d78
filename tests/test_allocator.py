"""train/allocator.py: after keep_freed_memory(), freed blocks are re-used without faulting their pages in again.
Each case runs in a fresh interpreter, where glibc's thresholds start from their defaults."""
import subprocess
import sys

import pytest

from cancerllm.train.allocator import glibc_mallopt

# A step's pattern: blocks allocated, all freed, and allocated again. 40 MB blocks are past glibc's largest dynamic
# mmap threshold (32 MB): by default each is mapped and unmapped on its own and every round faults all 40,960 pages
# in again. Kept, the heap grows for a round or two until its free space fits the round, which then re-uses it.
# The fewest faults of 6 rounds.
SCRIPT = """
import resource, sys, torch
from cancerllm.train.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def round_faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.empty(40 * 2**20, dtype=torch.uint8).fill_(1) for _ in range(4)]    # touch every page
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(min(round_faults() for _ in range(6)))
"""


def round_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True).stdout
    return int(out.strip().splitlines()[-1])


def test_freed_blocks_are_reused_without_page_faults():
    if glibc_mallopt() is None:
        pytest.skip("the C library is not glibc: no mallopt")
    assert round_faults("default") > 40_000      # of 40,960 pages
    assert round_faults("keep") < 100            # kept: the same pages re-used

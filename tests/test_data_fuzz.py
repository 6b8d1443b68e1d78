"""Fuzzing the C++ shard reader: random files and shards with mutated headers, offsets and lengths must each be
rejected with a ValueError or read safely, never crash the process. The fuzz runs in a child process, so a
crash fails this test instead of killing pytest; the C++ and Python readers must also agree on every file."""
import struct
import subprocess
import sys

import numpy as np
import pytest

from cancerllm.data import write_shard
from cancerllm.data.loader import cpp_available

ITERATIONS = 2000
FIELDS = {8: "I", 12: "I", 16: "I", 20: "I", 24: "Q", 32: "Q", 40: "I"}     # header offset -> struct code
EXTREMES = [0, 1, 2, 3, 4, 7, 64, 255, 65535, 65536, 2**31, 2**32 - 1, 2**32, 2**63, 2**64 - 1]


def mutate(rng, valid: bytes) -> bytes:
    kind = rng.integers(6)
    raw = bytearray(valid)
    if kind == 0:                                           # random bytes, sometimes with the right magic
        raw = bytearray(rng.bytes(int(rng.integers(0, 300))))
        if rng.random() < 0.5 and len(raw) >= 8:
            raw[:8] = valid[:8]
    elif kind == 1:                                         # random bytes anywhere in the header
        for _ in range(int(rng.integers(1, 6))):
            raw[int(rng.integers(8, 64))] = int(rng.integers(256))
    elif kind == 2:                                         # a header field set to an extreme value
        offset, code = list(FIELDS.items())[int(rng.integers(len(FIELDS)))]
        value = EXTREMES[int(rng.integers(len(EXTREMES)))] % (1 << (8 * struct.calcsize(code)))
        raw[offset:offset + struct.calcsize(code)] = struct.pack("<" + code, value)
    elif kind == 3:                                         # truncated or extended
        raw = raw[:int(rng.integers(0, len(raw)))] if rng.random() < 0.7 else raw + rng.bytes(int(rng.integers(1, 64)))
    elif kind == 4:                                         # an offset (or anything after the tokens) overwritten
        at = int(rng.integers(64, len(raw) - 8))
        raw[at:at + 8] = struct.pack("<Q", EXTREMES[int(rng.integers(len(EXTREMES)))])
    else:                                                   # random bytes in the payload
        for _ in range(int(rng.integers(1, 10))):
            raw[int(rng.integers(64, len(raw)))] = int(rng.integers(256))
    return bytes(raw)


def fuzz(folder: str, iterations: int, seed: int):
    from pathlib import Path

    from cancerllm import _C
    from cancerllm.data import read_shard

    rng = np.random.default_rng(seed)
    folder = Path(folder)
    docs = [rng.integers(0, 300, size=int(rng.integers(1, 30))) for _ in range(12)]
    masks = [rng.integers(0, 2, size=len(d)) for d in docs]
    valid = [write_shard(folder / "p.bin", docs).read_bytes(),
             write_shard(folder / "s.bin", docs, loss_masks=masks, vocab_size=70000).read_bytes()]
    path = folder / "fuzz.bin"
    accepted = 0
    for i in range(iterations):
        path.write_bytes(mutate(rng, valid[i % 2]))
        verify = bool(rng.integers(2))
        try:
            _C.read_shard_info(str(path), verify)
            cpp_ok = True
        except ValueError:
            cpp_ok = False
        try:
            read_shard(path, verify=verify)
            py_ok = True
        except ValueError:
            py_ok = False
        if cpp_ok != py_ok:
            raise AssertionError(f"iteration {i}: C++ {'accepts' if cpp_ok else 'rejects'} a file that Python "
                                 f"{'accepts' if py_ok else 'rejects'}: {path.read_bytes()[:64].hex()}")
        if cpp_ok:
            accepted += 1
            try:
                loader = _C.Loader([str(path)], 8, 2, 0, 1, i, False, 0, 1, 2)
            except ValueError:                              # e.g. too few tokens for one row
                continue
            loader.start(0)
            for _ in range(3):
                loader.next()
            loader.stop()
    print(f"fuzzed {iterations} files, {accepted} accepted")


@pytest.mark.skipif(not cpp_available(), reason="cancerllm._C is not built")
def test_cpp_reader_never_crashes_on_garbage(tmp_path, fresh_seed):
    done = subprocess.run([sys.executable, __file__, str(tmp_path), str(ITERATIONS), str(fresh_seed)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"fuzz seed {fresh_seed}: exit code {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert f"fuzzed {ITERATIONS} files" in done.stdout


if __name__ == "__main__":
    fuzz(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))

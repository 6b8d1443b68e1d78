"""Which matmul each weight of the decoding form runs on, chosen by measuring on the machine that runs it.

A fast path picked once on one machine can be the slow one on another of the same kind: bench/generate.py measured
oneDNN's prepacked matmuls 3.18x transformers on one CPU and 1.16x on another, where plain F.linear was faster. So
when more than one path can multiply a weight (fp32 or bf16 on CPU: oneDNN prepacked or F.linear), the decoding
form times each on this machine on the weight's own shape and keeps the faster: at the batch sizes decoding runs
(1 and 8 rows), or, where our small-M kernel takes those (below), on a prefill chunk (PREFILL_ROWS); int8 weights
choose the same way between torch's int8 kernel and a bf16 GEMM on the weight widened per call. The answer
is cached in a JSON file keyed by the machine (CPU model and flags, threads, torch version), the dtype and the
weight's shape, so the measurement is made once per machine and shape (seconds for a 135M model) and a new machine
measures again.

Where our small-M kernel (cancerllm/gemv.py) can multiply the weight (bf16, or int8 when quantized), the rows up to
which it runs faster than the chosen path are measured too (choose_gemv_rows): decoding's batch sizes from 1 up,
each call timed with its weight out of the caches, as decoding reads it.

Cache file: $CANCERLLM_CACHE_DIR/decode-paths.json, else $XDG_CACHE_HOME/cancerllm/..., else ~/.cache/cancerllm/...
A cache that cannot be read is measured again and rewritten; one that cannot be written costs only the time to
measure at the next load.
"""
import contextlib
import fcntl
import hashlib
import json
import os
import platform
import time
import warnings
from pathlib import Path

import torch

CACHE_FILE = "decode-paths.json"
CALIBRATION_ROWS = (1, 8)   # batch sizes decoding runs most; each path is timed on both, their times summed
# Where our small-M kernel takes the decoding batches, the library path runs the prefill chunks: its candidates
# (oneDNN or F.linear; the two int8 paths) are timed on a chunk of this many rows (a short prompt's).
PREFILL_ROWS = (32,)
ROUNDS, CALLS = 3, 5        # paths alternate ROUNDS times, CALLS matmuls each; the fastest round counts
GEMV_ROWS = (1, 2, 4, 8, 16)   # row counts at which our small-M kernel is timed against the library path
# Read between the timed calls of that comparison: past the last-level cache (32 MiB on the CPUs measured), so that
# each call reads its weight from memory as decoding does (a model is larger than the caches); in cache, where no
# call waits for memory, the comparison could favour another kernel than the one decoding runs faster.
EVICT_BYTES = 64 * 2**20


def cache_path() -> Path:
    root = os.environ.get("CANCERLLM_CACHE_DIR")
    if root:
        return Path(root) / CACHE_FILE
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "cancerllm" / CACHE_FILE


def machine_key() -> str:
    """What makes one machine's measurement invalid on another: the CPU (model name and instruction-set flags; a
    virtual machine may name only the vendor), the threads torch uses and torch's version (its kernels)."""
    info = {}
    for line in cpuinfo_lines():
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())   # the first processor's lines
    model, flags = info.get("model name") or platform.processor() or platform.machine(), info.get("flags", "")
    flags_hash = hashlib.sha1(flags.encode()).hexdigest()[:8]
    return f"{model} flags:{flags_hash} threads:{torch.get_num_threads()} torch:{torch.__version__}"


def cpuinfo_lines() -> list:
    """/proc/cpuinfo's lines; none where there is no such file (not Linux: platform then names the CPU)."""
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def load_cache(path: Path) -> dict:
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def save_cache(path: Path, cache: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        staging.write_text(json.dumps(cache, indent=1, sort_keys=True))
        os.replace(staging, path)      # readers see the old file or the new one, never half of one
    except OSError as e:
        warnings.warn(f"{path}: the decode-path measurements were not saved ({e}); the next load measures again")


def best_times(runs: dict, before=None, rounds: int = ROUNDS, calls: int = CALLS) -> dict:
    """Each of `runs`' (name -> function of no arguments) best time in seconds over `rounds` rounds of `calls`
    calls: they alternate, so load from other processes hits each alike. `before` (untimed) runs before every
    timed call."""
    best = {name: float("inf") for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            run()   # warm: the first call may allocate or pick kernels
            spent = 0.0
            for _ in range(calls):
                if before is not None:
                    before()
                start = time.perf_counter()
                run()
                spent += time.perf_counter() - start
            best[name] = min(best[name], spent)
    return best


def fastest(runs: dict, before=None) -> str:
    """The name of the fastest of `runs` (best_times)."""
    best = best_times(runs, before)
    return min(best, key=best.get)


def remembered(key: str, allowed, measure):
    """The answer cached under `key` (which names the machine: machine_key()) when it is one of `allowed`, else
    measure()'s, saved under it. Every measured choice of the package goes through here (decoding paths, the
    compute dtype, the attention path), so they share one file and one way to keep it.

    The first answer saved wins: a process that measured while another saved an answer for the same key takes the
    saved one. The ranks of a training run measure at once, and timings differ; were each to keep its own, a run
    resumed from a checkpoint (which reads the file) could take another path than the rank did before it and lose
    bitwise reproducibility (the paths agree only to rounding)."""
    path = cache_path()
    value = load_cache(path).get(key)
    if value in allowed:
        return value
    measured = measure()
    with cache_lock(path):      # no other process between the re-read and the save
        cache = load_cache(path)
        if cache.get(key) in allowed:
            return cache[key]
        save_cache(path, {**cache, key: measured})
    return measured


@contextlib.contextmanager
def cache_lock(path: Path):
    """An exclusive lock on `path`'s lock file beside it, held for the block (none where it cannot be made: a
    read-only cache directory is save_cache's warning to give)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_name(f".{path.name}.lock"), "a")
    except OSError:
        yield
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)   # released when the file closes
        yield


def choose(weight: torch.Tensor, candidates: tuple, make, rows: tuple = CALIBRATION_ROWS) -> str:
    """The path (one of `candidates`) to multiply `weight` [out, in] on: the only one, or the one this machine ran
    fastest for a weight of this shape and dtype on inputs of `rows` rows (cached). `make(weight, path)` builds the
    linear to time."""
    if len(candidates) == 1:
        return candidates[0]
    key = f"{machine_key()} | {weight.dtype} {tuple(weight.shape)} | {'/'.join(candidates)}"
    if rows != CALIBRATION_ROWS:
        key += f" | rows {'/'.join(map(str, rows))}"

    def measure():
        inputs = [torch.randn(n, weight.shape[1], dtype=weight.dtype, device=weight.device) for n in rows]
        linears = {name: make(weight, name) for name in candidates}
        with torch.inference_mode():
            return fastest({name: (lambda f=linear: [f(x) for x in inputs]) for name, linear in linears.items()})
    return remembered(key, candidates, measure)


def choose_gemv_rows(weight: torch.Tensor, path: str, make) -> int:
    """Up to how many rows (one of GEMV_ROWS, or 0: none) our small-M kernel multiplies `weight` faster than `path`
    on this machine (cached): timed at each of GEMV_ROWS in turn, up to the first where it loses (its lead shrinks as
    the rows grow: bench/gemv.py). `make(weight, path, gemv_rows)` builds the linear to time."""
    from . import gemv
    key = f"{machine_key()} | {weight.dtype} {tuple(weight.shape)} | {path} | gemv rows, build {gemv.build_id()}"

    def measure():
        ours, library = make(weight, path, GEMV_ROWS[-1]), make(weight, path, 0)
        evict = torch.ones(EVICT_BYTES // 4)
        rows_won = 0
        with torch.inference_mode():
            for rows in GEMV_ROWS:
                x = torch.randn(rows, weight.shape[1], dtype=weight.dtype, device=weight.device)
                runs = {"gemv": lambda: ours(x), "library": lambda: library(x)}
                if fastest(runs, before=evict.sum) != "gemv":
                    break
                rows_won = rows
        return rows_won
    return remembered(key, (0,) + GEMV_ROWS, measure)

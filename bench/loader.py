"""Data-loader benchmark: tokens/s of the C++ PackedLoader against the pure-Python reference (same batches),
with 1 and 2 worker threads; next() as a fraction of a CPU training step of the `small` preset; and prepare
throughput (MB of text per second) with 1 and 2 tokenizer workers.

    .venv/bin/python bench/loader.py [--tokens 16e6] [--seq-len 4096] [--batch 8]

Targets (issue 4): C++ >= 10x the Python reference and >= 50M tokens/s on one thread; next() < 1% of a step.
"""
import argparse
import csv
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine, print_table, time_fn, write_results  # noqa: E402

import cancerllm  # noqa: E402
from cancerllm.data import PackedLoader, write_shard  # noqa: E402
from cancerllm.data.prepare import main as prepare  # noqa: E402
from cancerllm.tokenizer import Tokenizer, mistral_tokenizer_path, train  # noqa: E402

REPORTS = Path(__file__).resolve().parents[1] / "data" / "tcga" / "reports.csv"


def synthetic_shards(folder: Path, n_tokens: int, n_shards: int = 4, vocab: int = 32000):
    """Documents of 200..4000 tokens with BOS/EOS, as prepare writes them; content does not matter here."""
    rng = np.random.default_rng(0)
    paths = []
    for s in range(n_shards):
        docs, total = [], 0
        while total < n_tokens // n_shards:
            body = rng.integers(3, vocab, size=int(rng.integers(200, 4000)))
            docs.append(np.concatenate([[1], body, [2]]))
            total += len(docs[-1])
        paths.append(write_shard(folder / f"bench-{s}.bin", docs, vocab_size=vocab))
    return paths


def tokens_per_second(loader, n_batches: int) -> float:
    next(loader)                                   # warm: threads started, pages mapped
    start = time.perf_counter()
    for _ in range(n_batches):
        batch = next(loader)
    elapsed = time.perf_counter() - start
    return n_batches * batch["tokens"].size / elapsed


def same_batches(paths, n: int, **kw) -> bool:
    py, cpp = PackedLoader(paths, backend="python", **kw), PackedLoader(paths, backend="cpp", **kw)
    return all(all(np.array_equal(a[k], b[k]) for k in a) for a, b in zip((next(py) for _ in range(n)),
                                                                          (next(cpp) for _ in range(n))))


def loader_rows(paths, seq_len: int, batch: int):
    kw = dict(seq_len=seq_len, batch_size=batch, seed=0)
    python = tokens_per_second(PackedLoader(paths, backend="python", **kw), 20)
    rows = [{"case": "python reference", "threads": 1, "Mtok/s": python / 1e6, "ratio": 1.0}]
    for threads in (1, 2):
        cpp = tokens_per_second(PackedLoader(paths, backend="cpp", num_threads=threads, prefetch=8, **kw), 300)
        rows.append({"case": "cpp", "threads": threads, "Mtok/s": cpp / 1e6, "ratio": cpp / python})
    return rows


def step_fraction(paths, batch: int, seq_len: int):
    """Median next() of the C++ loader against a forward + backward of the `small` preset, same batch shape."""
    torch.manual_seed(0)
    model = cancerllm.Transformer(cancerllm.ModelArgs.preset("small"))
    loader = PackedLoader(paths, seq_len=seq_len, batch_size=batch, backend="cpp", num_threads=1)
    b = next(loader)

    def step():
        tokens, targets = torch.from_numpy(b["tokens"]), torch.from_numpy(b["targets"])
        targets = targets.masked_fill(~torch.from_numpy(b["loss_mask"]), cancerllm.kernels.IGNORE_INDEX)
        loss = model(tokens, positions=torch.from_numpy(b["positions"]),
                     cu_seqlens=torch.from_numpy(b["cu_seqlens"]), targets=targets)
        loss.backward()
        model.zero_grad(set_to_none=True)

    step_ms = time_fn(step, warmup=1, reps=3)
    next_ms = time_fn(lambda: next(loader), warmup=5, reps=200)
    return {"batch": batch, "seq_len": seq_len, "step_ms": step_ms, "next_ms": next_ms,
            "next/step %": 100 * next_ms / step_ms}


def prepare_rows(folder: Path, copies: int):
    """MB of CSV per second through prepare, the bundled reports repeated `copies` times."""
    source = folder / "reports.csv"
    with open(REPORTS, newline="") as f_in, open(source, "w", newline="") as f_out:
        csv.field_size_limit(1 << 30)
        rows = list(csv.reader(f_in))
        writer = csv.writer(f_out)
        writer.writerow(rows[0])
        for c in range(copies):
            writer.writerows([[f"{r[0]}-{c}", *r[1:]] for r in rows[1:]])
    try:
        tokenizer_path, name = mistral_tokenizer_path(), "mistral v1"
    except FileNotFoundError:
        corpus = folder / "corpus.txt"
        corpus.write_text("\n".join(r[-1].replace("\n", " ") for r in rows[1:]))
        tokenizer_path, name = train([corpus], folder / "tcga", vocab_size=4000).path, "tcga 4k"
    mb = source.stat().st_size / 1e6
    out_rows, base = [], None
    for workers in (1, 2):
        out = folder / f"prepared-{workers}"
        start = time.perf_counter()
        prepare([str(source), "--tokenizer", str(tokenizer_path), "--out", str(out), "--workers", str(workers),
                 "--group-column", "patient_id", "--quiet"])
        rate = mb / (time.perf_counter() - start)
        base = base or rate
        out_rows.append({"case": f"prepare ({name})", "threads": workers, "MB/s": rate, "ratio": rate / base})
        shutil.rmtree(out)
    return out_rows, mb


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=float, default=16e6, help="tokens in the synthetic shards")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--copies", type=int, default=4, help="copies of reports.csv fed to prepare")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = synthetic_shards(folder, int(args.tokens))
        identical = same_batches(paths, 5, seq_len=args.seq_len, batch_size=args.batch, seed=0)
        rows = loader_rows(paths, args.seq_len, args.batch)
        step = step_fraction(paths, batch=2, seq_len=512)
        prep, mb = prepare_rows(folder, args.copies)
    print(f"machine: {machine()}")
    print(f"\nloader, seq_len {args.seq_len}, batch {args.batch}, {args.tokens / 1e6:.0f}M tokens "
          f"(C++ and Python batches identical: {identical})")
    print_table(rows, ["case", "threads", "Mtok/s", "ratio"])
    print("\nnext() vs a CPU training step (forward + backward) of the `small` preset")
    print_table([step], list(step))
    print(f"\nprepare, {mb:.1f} MB of CSV")
    print_table(prep, ["case", "threads", "MB/s", "ratio"])
    path = write_results("loader", rows + prep, step=step, identical=identical, seq_len=args.seq_len,
                         batch=args.batch, tokens=args.tokens)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

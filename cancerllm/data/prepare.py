"""Tokenize text into train/validation shards: `python -m cancerllm.data.prepare INPUT ... --tokenizer T --out DIR`.

Inputs, chosen by extension or --format:
  .csv    one document per row, text in --text-column (default "text")
  .jsonl  one JSON object per line, text under the --text-column key; with --sft, {"prompt", "completion"}
  .txt    one document per line

Every document becomes BOS + tokens + EOS. An SFT example becomes BOS + prompt + completion + EOS with a loss
mask that is set on the completion tokens and EOS only. Rows that cannot be used (empty text, undecodable bytes or
a lone surrogate, a missing column, bad JSON, a malformed CSV record: an unclosed quote or the wrong number of
fields, read by the strict reader of cancerllm/data/records.py) are counted and reported with file and line, and
listed in the manifest; --strict makes the first one fatal. An input that gives no document at all (only a header,
or only bad rows) is an error naming it. Each document goes to train or validation by a hash of (seed, its group): the
--group-column value (e.g. patient_id, so one patient never lands on both sides), else the document itself.

SFT examples are packed whole into training rows by the loader, greedily in stream order (cancerllm/data/loader.py),
so a long example after a short one can leave most of a row as padding. --pack-to SEQ_LEN (the training seq_len)
writes each split's examples in best-fit-decreasing order instead: the loader's greedy packing then forms exactly
the best-fit bins (typically 95%+ of each row is tokens; in-order packing of the demo's mixture fills 76%). The
loader shuffles rows, so the stream's order is otherwise immaterial. It holds a split's examples in memory.

The output folder receives train-00000.bin, ..., val-00000.bin (format: cancerllm/data/shards.py) and
manifest.json: the tokenizer's sha256, per-source and per-split document and token totals, the bad rows, and
with --pack-to the rows and fill each split packs into. --prompt-settings FILE (the prompt_settings.json that
python -m cancerllm.tasks.build writes beside the task datasets) copies how the SFT prompts were made into the
manifest, under "prompt_settings", for the trainer to save beside the model it exports; when its chat_format is
"chat_template", each prompt is tokenized as the user turn of that chat template (tasks.prompts.PromptSettings.render),
as the generator will ask the exported model.
"""
import argparse
import bisect
import hashlib
import json
import os
import sys
import time
from collections import deque
from itertools import islice
import multiprocessing
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..tokenizer import open_tokenizer
from .records import CsvReader, MalformedRow, json_object, open_csv
from .shards import read_shard, token_dtype, write_shard

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".txt": "text"}
CHUNK = 64                    # documents per task sent to a tokenizer worker
MAX_REPORTED = 20             # bad rows printed; the manifest lists them all


class BadRow(Exception):
    """A row that cannot be used; the message says why."""


# ----------------------------------------------------------------------------------------------- reading

def check_text(value, what: str, allow_empty: bool = False) -> str:
    if value is None:
        raise BadRow(f"missing {what}")
    if not isinstance(value, str):
        raise BadRow(f"{what} is {type(value).__name__}, not a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:         # bytes that were not UTF-8, or a JSON "\ud800" escape
        raise BadRow(f"undecodable bytes or a lone surrogate in {what} (U+{ord(value[e.start]):04X} at character "
                     f"{e.start})") from None
    if not allow_empty and not value.strip():
        raise BadRow(f"empty {what}")
    return value


def csv_rows(path: Path, f, text_column: str, group_column):
    reader = CsvReader(f, path, required=list(filter(None, (text_column, group_column))))

    def fields(row):
        if isinstance(row, MalformedRow):
            raise BadRow(row.reason)
        return row[text_column], row[group_column] if group_column else None
    for line, row in reader:
        yield line, lambda row=row: fields(row)


def jsonl_rows(path: Path, f, text_column: str, group_column, sft: bool):
    def fields(raw):
        try:
            obj = json_object(raw)
        except ValueError as e:
            raise BadRow(str(e)) from None
        group = obj.get(group_column) if group_column else None
        group = None if group is None else str(group)
        if sft:
            return (obj.get("prompt"), obj.get("completion")), group
        return obj.get(text_column), group
    for line, raw in enumerate(f, 1):
        if raw.strip():
            yield line, lambda raw=raw: fields(raw)


def text_rows(path: Path, f):
    for line, raw in enumerate(f, 1):
        yield line, lambda raw=raw: (raw.rstrip("\n"), None)


def read_records(path: Path, fmt: str, args, bad: list):
    """Yield (source, line, text or (prompt, completion), group) of the usable rows of one file; append the
    others to `bad` as dicts (file, line, reason), or raise at the first one with args.strict."""
    # surrogateescape keeps undecodable bytes visible to the row checks instead of failing the whole file
    with open_csv(path) if fmt == "csv" else open(path, encoding="utf-8", errors="surrogateescape") as f:
        if fmt == "csv":
            rows = csv_rows(path, f, args.text_column, args.group_column)
        elif fmt == "jsonl":
            rows = jsonl_rows(path, f, args.text_column, args.group_column, args.sft)
        else:
            rows = text_rows(path, f)
        for line, parse in rows:
            try:
                value, group = parse()
                if args.sft:
                    value = (check_text(value[0], "prompt", allow_empty=True), check_text(value[1], "completion"))
                else:
                    value = check_text(value, args.text_column if fmt != "text" else "text")
                if args.group_column and (group is None or not str(group).strip()):
                    raise BadRow(f"missing {args.group_column}")
            except BadRow as e:
                if args.strict:
                    raise SystemExit(f"{path}:{line}: {e} (--strict)") from None
                bad.append({"file": str(path), "line": line, "reason": str(e)})
                continue
            yield str(path), line, value, group


# ----------------------------------------------------------------------------------------------- tokenizing

TOKENIZER = None


def init_worker(tokenizer_path: str):
    global TOKENIZER
    TOKENIZER = open_tokenizer(tokenizer_path)


def tokenize(chunk):
    """[(source, line, value, group)] -> [(source, line, group, tokens, loss mask or None)]."""
    out = []
    for source, line, value, group in chunk:
        if isinstance(value, tuple):            # SFT: loss on the completion and EOS only
            prompt = TOKENIZER.encode(value[0], bos=True, eos=False)
            completion = TOKENIZER.encode(value[1], bos=False, eos=True)
            tokens = np.asarray(prompt + completion, dtype=np.uint32)
            mask = np.concatenate([np.zeros(len(prompt), np.uint8), np.ones(len(completion), np.uint8)])
        else:
            tokens, mask = np.asarray(TOKENIZER.encode(value, bos=True, eos=True), dtype=np.uint32), None
        out.append((source, line, group, tokens, mask))
    return out


def tokenize_all(records, workers: int, tokenizer):
    """Tokenized chunks, in input order. Reading stays on this thread (not in a pool thread, as Pool.imap
    would do) so that a --strict error is raised here; at most 4 chunks per worker are in flight."""
    global TOKENIZER
    if workers == 1:
        TOKENIZER = tokenizer
        yield from map(tokenize, chunks(records, CHUNK))
        return
    with multiprocessing.Pool(workers, init_worker, (str(tokenizer.path),)) as pool:
        pending = deque()
        for chunk in chunks(records, CHUNK):
            pending.append(pool.apply_async(tokenize, (chunk,)))
            if len(pending) > 4 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def chunks(records, size: int):
    records = iter(records)
    while chunk := list(islice(records, size)):
        yield chunk


# ----------------------------------------------------------------------------------------------- writing

def in_validation(key: str, seed: int, fraction: float) -> bool:
    """Deterministic, order-independent split: a hash of (seed, group) mapped to [0, 1)."""
    h = hashlib.blake2b(f"{seed}\0{key}".encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < fraction


def best_fit_order(lengths, capacity: int) -> tuple[list, int]:
    """An order of the examples whose greedy in-order packing into rows of `capacity` tokens (the loader's rule)
    forms best-fit-decreasing bins, and the number of those rows.

    Longest first, each example goes to the open bin it fills most tightly, or opens a new one. The bins are
    emitted in the order they were opened, each longest example first. So the loader never pulls an example into
    the row before its own: it opened its bin because it fit in no earlier bin, and those only filled up since.
    An example longer than a row counts as a full row (the loader truncates it and gives it a row alone)."""
    sizes = [min(n, capacity) for n in lengths]
    bins, room = [], []                 # room: sorted (free tokens, bin index) of the bins that are not full
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        at = bisect.bisect_left(room, (sizes[i], -1))
        if at == len(room):
            bins.append([i])
            free, b = capacity - sizes[i], len(bins) - 1
        else:
            free, b = room.pop(at)
            bins[b].append(i)
            free -= sizes[i]
        if free > 0:
            bisect.insort(room, (free, b))
    return [i for b in bins for i in b], len(bins)


class ShardWriter:
    """Collects one split's documents and writes a shard each time they reach the target token count; with
    `pack_to`, holds them all and writes them in best_fit_order at the end."""

    def __init__(self, out: Path, split: str, shard_tokens: int, vocab_size: int, pack_to=None):
        self.out, self.split, self.shard_tokens, self.vocab_size = out, split, shard_tokens, vocab_size
        self.pack_to, self.held, self.packing = pack_to, [], None
        self.docs, self.masks, self.pending, self.shards = [], [], 0, []

    def add(self, tokens, mask):
        if self.pack_to is None:
            self.write(tokens, mask)
        else:
            self.held.append((tokens, mask))

    def write(self, tokens, mask):
        self.docs.append(tokens)
        self.masks.append(mask)
        self.pending += len(tokens)
        if self.pending >= self.shard_tokens:
            self.flush()

    def finish(self):
        if self.held:
            capacity = self.pack_to + 1                      # a row holds seq_len + 1 tokens
            order, rows = best_fit_order([len(tokens) for tokens, _ in self.held], capacity)
            used = sum(min(len(tokens), capacity) for tokens, _ in self.held)
            self.packing = {"seq_len": self.pack_to, "rows": rows, "fill": round(used / (rows * capacity), 4)}
            for i in order:
                self.write(*self.held[i])
            self.held = []
        self.flush()

    def flush(self):
        if not self.docs:
            return
        path = self.out / f"{self.split}-{len(self.shards):05d}.bin"
        masks = self.masks if self.masks[0] is not None else None
        write_shard(path, self.docs, loss_masks=masks, vocab_size=self.vocab_size)
        self.shards.append({"file": path.name, "documents": len(self.docs), "tokens": self.pending})
        self.docs, self.masks, self.pending = [], [], 0

    def summary(self) -> dict:
        out = {"shards": self.shards, "documents": sum(s["documents"] for s in self.shards),
               "tokens": sum(s["tokens"] for s in self.shards)}
        return {**out, "packing": self.packing} if self.packing else out


def input_format(path: Path, forced) -> str:
    if forced:
        return forced
    if path.suffix.lower() not in FORMATS:
        raise ValueError(f"{path}: unknown input format {path.suffix!r}; use --format csv|jsonl|text")
    return FORMATS[path.suffix.lower()]


def read_prompt_settings(path, sft: bool):
    """--prompt-settings as tasks.prompts.PromptSettings (checked: templates, cut, a chat template that renders),
    or None without the flag."""
    if path is None:
        return None
    if not sft:
        raise ValueError("--prompt-settings records how SFT prompts were made; add --sft or drop it")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompt-settings: {path} not found")
    from ..tasks.prompts import read_prompt_settings as read_settings_file
    try:
        return read_settings_file(path)
    except ValueError as e:
        raise ValueError(f"--prompt-settings: {e}") from None


def prepare(args) -> dict:
    """Run the whole command for parsed arguments; returns the manifest (also written to out/manifest.json)."""
    inputs = [Path(p) for p in args.inputs]
    for p in inputs:
        if not p.is_file():
            raise FileNotFoundError(f"input not found: {p}")
    formats = [input_format(p, args.format) for p in inputs]
    if args.sft and set(formats) != {"jsonl"}:
        raise ValueError("--sft reads JSONL of {\"prompt\", \"completion\"}; got " + ", ".join(map(str, inputs)))
    if args.pack_to is not None and not args.sft:
        raise ValueError("--pack-to orders SFT examples for packing; pretraining text is cut into rows, not packed "
                         "(add --sft or drop --pack-to)")
    prompt_settings = read_prompt_settings(args.prompt_settings, args.sft)
    out = Path(args.out)
    if out.is_dir() and any(out.glob("*.bin")):
        raise FileExistsError(f"{out} already holds shards; choose an empty output folder")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = open_tokenizer(args.tokenizer)
    shard_tokens = max(1, int(args.shard_mb * 2**20) // token_dtype(tokenizer.vocab_size).itemsize)
    writers = {s: ShardWriter(out, s, shard_tokens, tokenizer.vocab_size, args.pack_to) for s in ("train", "val")}
    sources = {str(p): {"documents": 0, "tokens": 0, "bad_rows": 0, "bytes": p.stat().st_size} for p in inputs}
    bad = []

    def records():
        for path, fmt in zip(inputs, formats):
            for source, line, value, group in read_records(path, fmt, args, bad):
                if prompt_settings is not None:         # the prompt as the model will be asked it
                    value = (prompt_settings.render(value[0]), value[1])
                yield source, line, value, group

    start = time.perf_counter()
    bar = tqdm(unit="doc", desc="tokenizing", disable=args.quiet, file=sys.stderr)
    for chunk in tokenize_all(records(), args.workers, tokenizer):
        for source, line, group, tokens, mask in chunk:
            key = group if group is not None else f"{source}:{line}"
            writers["val" if in_validation(key, args.seed, args.val_fraction) else "train"].add(tokens, mask)
            sources[source]["documents"] += 1
            sources[source]["tokens"] += len(tokens)
        bar.update(len(chunk))
    bar.close()
    for w in writers.values():
        w.finish()
    for row in bad:
        sources[row["file"]]["bad_rows"] += 1
    check_every_source_used(sources, bad)
    manifest = {
        "format": "cancerllm-shards", "version": 1, "kind": "sft" if args.sft else "pretrain",
        "tokenizer": {"path": str(tokenizer.path), "sha256": tokenizer.fingerprint(),
                      "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id},
        "split": {"by": args.group_column or "document", "val_fraction": args.val_fraction, "seed": args.seed},
        "sources": sources,
        "splits": {s: w.summary() for s, w in writers.items()},
        "bad_rows": bad,
        "seconds": round(time.perf_counter() - start, 3),
    }
    if prompt_settings is not None:
        manifest["prompt_settings"] = prompt_settings.to_json()
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    if args.verify:
        verify(out, manifest)
    report(manifest, args.quiet)
    return manifest


def check_every_source_used(sources: dict, bad: list):
    """An input that gave no document (only a header, or only bad rows) is a mistake, not an empty dataset."""
    for source, counts in sources.items():
        if counts["documents"] == 0:
            first = next((f"; the first, line {b['line']}: {b['reason']}" for b in bad if b["file"] == source), "")
            raise ValueError(f"{source}: no usable row ({counts['bad_rows']} bad rows{first})")


def verify(out: Path, manifest: dict):
    """Re-read every shard with its checksum and compare its counts with the manifest."""
    for split in manifest["splits"].values():
        for entry in split["shards"]:
            shard = read_shard(out / entry["file"], verify=True)
            if (len(shard), len(shard.tokens)) != (entry["documents"], entry["tokens"]):
                raise ValueError(f"{out / entry['file']}: holds {len(shard)} documents and {len(shard.tokens)} "
                                 f"tokens, the manifest says {entry['documents']} and {entry['tokens']}")


def report(manifest: dict, quiet: bool):
    bad = manifest["bad_rows"]
    for row in bad[:MAX_REPORTED]:
        print(f"{row['file']}:{row['line']}: skipped: {row['reason']}", file=sys.stderr)
    if len(bad) > MAX_REPORTED:
        print(f"... and {len(bad) - MAX_REPORTED} more bad rows (all listed in manifest.json)", file=sys.stderr)
    if quiet:
        return
    for name, split in manifest["splits"].items():
        packing = split.get("packing")
        packed = f"; {packing['rows']} rows of {packing['seq_len']}, {packing['fill']:.0%} full" if packing else ""
        print(f"{name}: {split['documents']} documents, {split['tokens']} tokens in {len(split['shards'])} shards"
              + packed)
    print(f"{len(bad)} bad rows; tokenizer sha256 {manifest['tokenizer']['sha256'][:12]}…; {manifest['seconds']} s")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m cancerllm.data.prepare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="CSV, JSONL or text files")
    p.add_argument("--tokenizer", required=True,
                   help="tokenizer.model (sentencepiece) or tokenizer.json, or a checkpoint directory holding one")
    p.add_argument("--out", required=True, help="output folder (must hold no shards yet)")
    p.add_argument("--format", choices=sorted(set(FORMATS.values())), help="override the format of every input")
    p.add_argument("--text-column", default="text", help="CSV column / JSON key holding the text (default text)")
    p.add_argument("--group-column", help="split by this column (e.g. patient_id) instead of by document")
    p.add_argument("--sft", action="store_true", help='JSONL of {"prompt", "completion"}: tokens + loss mask')
    p.add_argument("--pack-to", type=int, metavar="SEQ_LEN",
                   help="SFT: write examples in best-fit order for rows of SEQ_LEN (the training seq_len)")
    p.add_argument("--prompt-settings", metavar="FILE",
                   help="SFT: the datasets' prompt_settings.json, recorded in the manifest for the export")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of groups in validation (default 0.05)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/validation split")
    p.add_argument("--shard-mb", type=float, default=64.0, help="target shard size in MB of tokens (default 64)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes (default: cores)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad row")
    p.add_argument("--verify", action="store_true", help="re-read every shard and check its checksum and counts")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    args = p.parse_args(argv)
    if not 0.0 <= args.val_fraction < 1.0:
        p.error(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.workers < 1 or args.shard_mb <= 0 or (args.pack_to is not None and args.pack_to < 1):
        p.error("--workers, --shard-mb and --pack-to must be positive")
    return args


def main(argv=None) -> dict:
    return prepare(parse_args(argv))


if __name__ == "__main__":
    main()

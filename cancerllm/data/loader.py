"""PackedLoader: fixed-length training rows from token shards, the same batches from C++ or pure Python.

The contract (both backends; tests/test_data_loader.py holds them to it):

* Samples. The shards' documents, in the order of `paths`, form one token stream. A *sample* is one row of
  seq_len + 1 tokens; the row's first seq_len tokens are the inputs and its last seq_len the targets.
  - Pretraining shards: sample j is stream[j * seq_len : j * seq_len + seq_len + 1]. Rows overlap by one token,
    so every token but the first is a target exactly once; documents run across row boundaries; the stream's
    tail that does not fill a row is left out.
  - SFT shards (shards with a loss mask): examples are packed whole, in stream order, greedily into rows of
    seq_len + 1 tokens; an example never splits across rows; one longer than a row sits alone in its row and
    is truncated to seq_len + 1 tokens (counted in `truncated_examples`). The rest of a row is `pad_id`,
    which carries no loss and forms its own segment.
* Segments. A segment starts at each row start and at each document start. `positions` count from 0 within
  a segment; `cu_seqlens` (int32) are the segment starts over the flattened batch * seq_len tokens, then
  batch * seq_len: every multiple of seq_len is among them. This is what `Transformer.forward(cu_seqlens=...)`
  and `kernels.attention` take, and the positions are the ones the model would derive from them.
* Loss. `loss_mask[t]` is true when target t carries loss: the target is a real token of the same document
  as input t (never the first token of the next document, never padding) and, in an SFT shard, its mask bit
  is set (completion tokens and EOS). Masked targets keep their token id; use
  `targets.masked_fill(~loss_mask, IGNORE_INDEX)` (cancerllm.kernels) for `ignore_index`.
* Order. The loader is infinite. Global sample index g (over the whole job) is in epoch g // num_samples and
  reads sample perm_epoch(g % num_samples): a bijective shuffle keyed by (seed, epoch), so every epoch sees
  every sample once in a new order. Step k of rank r takes the batch_size samples starting at
  g0 + (k * world_size + r) * batch_size. `state_dict()` stores g0 of the next step: resuming with any
  world_size or batch_size continues the same global sequence, with no sample repeated or skipped.
* Arrays. tokens, targets, positions: int64 [batch, seq_len]; loss_mask: bool [batch, seq_len];
  cu_seqlens: int32 [n + 1]. The C++ backend hands over its buffers without copying (`torch.from_numpy`).
"""
from pathlib import Path

import numpy as np

from .shards import ShardError, read_shard

M64 = (1 << 64) - 1
MAX_BATCH_TOKENS = 2**31 - 1        # cu_seqlens are int32 offsets over a batch's batch_size * seq_len tokens
FEISTEL_ROUNDS = 4


def mix64(x: int) -> int:
    """splitmix64's finaliser: a 64-bit bijective hash (the C++ shuffler uses the same one)."""
    x = (x + 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


class Permutation:
    """A bijection of [0, n) keyed by (seed, epoch): a 4-round Feistel network on the smallest even-bit power
    of two >= n, cycle-walked back into range. O(1) memory and time per index; the C++ twin is csrc/shuffle.h."""

    def __init__(self, n: int, seed: int, epoch: int):
        self.n = n
        self.half_bits = max(1, ((n - 1).bit_length() + 1) // 2)
        self.half_mask = (1 << self.half_bits) - 1
        key = mix64(mix64(seed & M64) ^ (epoch & M64))
        self.keys = [mix64((key + r) & M64) for r in range(FEISTEL_ROUNDS)]

    def __call__(self, i: int) -> int:
        x = i
        while True:
            left, right = x >> self.half_bits, x & self.half_mask
            for k in self.keys:
                left, right = right, left ^ (mix64(right ^ k) & self.half_mask)
            x = (left << self.half_bits) | right
            if x < self.n:
                return x


def pack_rows(lengths, capacity: int) -> np.ndarray:
    """The SFT packing rule: row r holds documents rows[r] .. rows[r + 1] - 1, whole documents greedily in
    order while they fit in `capacity` tokens; a longer one sits alone (truncated)."""
    rows, used = [0], 0
    for d, n in enumerate(lengths):
        n = min(int(n), capacity)
        if used and used + n > capacity:
            rows.append(d)
            used = 0
        used += n
    rows.append(len(lengths))
    return np.asarray(rows, dtype=np.int64)


def check_args(paths, seq_len, batch_size, rank, world_size, seed):
    if isinstance(paths, (str, bytes)) or not len(paths):
        raise ValueError(f"PackedLoader: paths must be a non-empty list of shard files, got {paths!r}")
    for name, value, low in (("seq_len", seq_len, 1), ("batch_size", batch_size, 1), ("world_size", world_size, 1),
                             ("rank", rank, 0), ("seed", seed, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"PackedLoader: {name} must be an integer >= {low}, got {value!r}")
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"PackedLoader: shard not found: {p}")
    if rank >= world_size:
        raise ValueError(f"PackedLoader: rank {rank} is not below world_size {world_size}")
    if batch_size * seq_len > MAX_BATCH_TOKENS:
        raise ValueError(f"PackedLoader: batch_size * seq_len = {batch_size} * {seq_len} exceeds {MAX_BATCH_TOKENS} "
                         "tokens per batch (cu_seqlens are int32 offsets); lower batch_size")
    if seed > M64:
        raise ValueError(f"PackedLoader: seed must fit in 64 bits, got {seed}")


class PythonBackend:
    """The reference: plain NumPy, one batch at a time, on the caller's thread."""

    def __init__(self, paths, *, seq_len, batch_size, rank, world_size, seed, verify, pad_id):
        shards = [read_shard(p, verify=verify) for p in paths]
        kinds = {s.loss_mask is not None for s in shards}
        if len(kinds) > 1:
            raise ValueError("PackedLoader: mixing SFT shards (with a loss mask) and pretraining shards: "
                             + ", ".join(f"{s.path} ({'sft' if s.loss_mask is not None else 'pretrain'})"
                                         for s in shards))
        self.sft = kinds.pop()
        self.seq_len, self.batch_size, self.rank, self.world_size = seq_len, batch_size, rank, world_size
        self.seed, self.pad_id = seed, pad_id
        self.shards = shards
        self.bases = np.cumsum([0] + [len(s.tokens) for s in shards])
        n_tokens = int(self.bases[-1])
        self.doc_starts = np.concatenate([s.offsets[:-1].astype(np.int64) + b for s, b in zip(shards, self.bases)])
        self.doc_ends = np.append(self.doc_starts[1:], n_tokens)
        self.rows = pack_rows(self.doc_ends - self.doc_starts, seq_len + 1) if self.sft else None
        self.num_samples = len(self.rows) - 1 if self.sft else max(0, (n_tokens - 1) // seq_len)
        if self.num_samples == 0:
            raise ValueError(f"PackedLoader: {n_tokens} tokens in {list(map(str, paths))} do not fill one "
                             f"row of seq_len + 1 = {seq_len + 1}")
        self.truncated_examples = int(np.sum(self.doc_ends - self.doc_starts > seq_len + 1)) if self.sft else 0
        self.permutations = {}

    def gather(self, lo: int, hi: int, field: str) -> np.ndarray:
        """Tokens (int64) or loss-mask bits (bool) of global stream positions [lo, hi), across shards."""
        parts = []
        i = int(np.searchsorted(self.bases, lo, side="right")) - 1
        while lo < hi:
            a, b = lo - int(self.bases[i]), min(hi, int(self.bases[i + 1])) - int(self.bases[i])
            parts.append(getattr(self.shards[i], field)[a:b])
            lo, i = int(self.bases[i]) + b, i + 1
        return np.concatenate(parts).astype(np.int64 if field == "tokens" else bool)

    def sample_id(self, g: int) -> int:
        epoch = g // self.num_samples
        if epoch not in self.permutations:
            self.permutations = {epoch: Permutation(self.num_samples, self.seed, epoch)}
        return self.permutations[epoch](g % self.num_samples)

    def row(self, sample: int):
        """(tokens, doc start flags, loss bits) of one row of seq_len + 1."""
        n = self.seq_len + 1
        if not self.sft:
            lo = sample * self.seq_len
            starts = np.zeros(n, dtype=bool)
            inside = self.doc_starts[(self.doc_starts >= lo) & (self.doc_starts < lo + n)]
            starts[inside - lo] = True
            return self.gather(lo, lo + n, "tokens"), starts, np.ones(n, dtype=bool)
        tokens = np.full(n, self.pad_id, dtype=np.int64)
        starts, bits = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        at = 0
        for d in range(self.rows[sample], self.rows[sample + 1]):
            a, b = int(self.doc_starts[d]), int(self.doc_ends[d])
            b = min(b, a + n)
            tokens[at:at + b - a], bits[at:at + b - a] = self.gather(a, b, "tokens"), self.gather(a, b, "loss_mask")
            starts[at] = True
            at += b - a
        if at < n:
            starts[at] = True
        return tokens, starts, bits

    def batch(self, step: int, g0: int) -> dict:
        B, T = self.batch_size, self.seq_len
        first = g0 + (step * self.world_size + self.rank) * B
        out = {k: np.zeros((B, T), dtype=np.int64) for k in ("tokens", "targets", "positions")}
        out["loss_mask"] = np.zeros((B, T), dtype=bool)
        cu = []
        for b in range(B):
            tokens, starts, bits = self.row(self.sample_id(first + b))
            out["tokens"][b], out["targets"][b] = tokens[:-1], tokens[1:]
            out["loss_mask"][b] = bits[1:] & ~starts[1:]
            seg = np.flatnonzero(starts[:T])
            seg = seg if seg.size and seg[0] == 0 else np.concatenate([[0], seg])
            out["positions"][b] = np.arange(T) - seg[np.searchsorted(seg, np.arange(T), side="right") - 1]
            cu.append(seg + b * T)
        out["cu_seqlens"] = np.concatenate(cu + [[B * T]]).astype(np.int32)
        return out

    def start(self, g0: int):
        self.g0, self.step = g0, 0

    def next(self) -> dict:
        batch = self.batch(self.step, self.g0)
        self.step += 1
        return batch

    def close(self):
        """The Python backend holds no threads or mappings to release."""


class CppBackend:
    """cancerllm._C.Loader: memory-mapped shards, batches built ahead by background threads, GIL released."""

    def __init__(self, paths, *, seq_len, batch_size, rank, world_size, seed, verify, pad_id, num_threads, prefetch):
        from .. import _C
        try:
            self.impl = _C.Loader([str(p) for p in paths], seq_len, batch_size, rank, world_size, seed, verify,
                                  pad_id, num_threads, prefetch)
        except _C.ShardError as e:      # one exception type for a bad shard, whichever backend read it
            raise ShardError(str(e)) from None
        self.sft, self.num_samples = self.impl.sft, self.impl.num_samples
        self.truncated_examples = self.impl.truncated_examples

    def start(self, g0: int):
        self.impl.start(g0)

    def next(self) -> dict:
        return self.impl.next()

    def close(self):
        self.impl.stop()


def cpp_available() -> bool:
    try:
        from .. import _C  # noqa: F401
    except ImportError:
        return False
    return True


class PackedLoader:
    """An infinite iterator of training batches (see the module docstring for the exact contract).

    backend: "auto" (C++ when `cancerllm._C` is built, else Python), "cpp" (an error without the extension) or
    "python". num_threads / prefetch: C++ worker threads and batches built ahead; the Python backend ignores them.
    verify: check every shard's checksum and token ids on open (reads all of the data once).
    """

    def __init__(self, paths, *, seq_len, batch_size, rank=0, world_size=1, seed=0, backend="auto",
                 num_threads=1, prefetch=4, verify=False, pad_id=0):
        check_args(paths, seq_len, batch_size, rank, world_size, seed)
        if backend == "auto":
            backend = "cpp" if cpp_available() else "python"
        common = dict(seq_len=seq_len, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
                      verify=verify, pad_id=pad_id)
        if backend == "cpp":
            if not cpp_available():
                raise ImportError("PackedLoader(backend='cpp'): the extension cancerllm._C is not built; run "
                                  "`pip install --no-build-isolation -e .` or use backend='python'")
            self.impl = CppBackend(paths, **common, num_threads=num_threads, prefetch=prefetch)
        elif backend == "python":
            self.impl = PythonBackend(paths, **common)
        else:
            raise ValueError(f"PackedLoader: backend must be 'auto', 'cpp' or 'python', got {backend!r}")
        self.backend, self.seq_len, self.batch_size, self.world_size, self.seed = (
            backend, seq_len, batch_size, world_size, seed)
        self.sample_index = 0
        self.impl.start(0)

    @property
    def num_samples(self) -> int:
        """Rows per epoch."""
        return self.impl.num_samples

    @property
    def sft(self) -> bool:
        return self.impl.sft

    @property
    def truncated_examples(self) -> int:
        """SFT examples longer than a row (truncated to seq_len + 1 tokens)."""
        return self.impl.truncated_examples

    @property
    def epoch(self) -> int:
        """Epoch of the next batch's first sample."""
        return self.sample_index // self.num_samples

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = self.impl.next()
        self.sample_index += self.batch_size * self.world_size
        return batch

    def state_dict(self) -> dict:
        return {"sample_index": self.sample_index, "seed": self.seed, "seq_len": self.seq_len,
                "num_samples": self.num_samples}

    def load_state_dict(self, state: dict):
        """Continue from a saved global sample index; world_size and batch_size may differ from the saving run."""
        for key in ("seed", "seq_len", "num_samples"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"PackedLoader.load_state_dict: saved {key}={state.get(key)!r} but this loader has "
                                 f"{key}={getattr(self, key)!r}: resuming would not continue the same sequence")
        self.sample_index = int(state["sample_index"])
        self.impl.start(self.sample_index)

    def close(self):
        self.impl.close()

    def __del__(self):
        if hasattr(self, "impl"):
            self.impl.close()

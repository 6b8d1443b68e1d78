"""Token shards: many tokenized documents in one file that the loaders memory-map.

Layout (little-endian; csrc/README.md and data/README.md describe the same thing):

    offset  size  field
    0       8     magic  b"CLLMSHRD"
    8       4     version (1)
    12      4     flags: bit 0 = the shard carries a per-token loss mask (an SFT shard); other bits are 0
    16      4     token size in bytes: 2 (uint16) or 4 (uint32)
    20      4     vocab_size: every token id is below it
    24      8     n_tokens
    32      8     n_docs (>= 1)
    40      4     crc32 of everything after the header (tokens, padding, offsets, mask)
    44      20    zero
    64            tokens        n_tokens x token size
                  zero padding  up to a multiple of 8
                  offsets       (n_docs + 1) x uint64: 0 = offsets[0] < offsets[1] < ... < offsets[n_docs] = n_tokens
                  loss mask     n_tokens x uint8, 1 where the token is a prediction target that carries loss (flag bit 0)

Document i is tokens[offsets[i]:offsets[i + 1]]; documents are never empty. The file is exactly as long as the
header says. The tokens are stored as the model will read them: `prepare` has already added BOS/EOS.
"""
import os
import struct
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

MAGIC = b"CLLMSHRD"
VERSION = 1
HEADER = struct.Struct("<8sIIIIQQI20s")
HEADER_SIZE = 64
FLAG_LOSS_MASK = 1
assert HEADER.size == HEADER_SIZE


class ShardError(ValueError):
    """A shard file that is not what its header promises; the message names the file."""


@dataclass
class Shard:
    """A shard read from disk. The arrays are views of a read-only memory map: nothing is copied."""
    path: Path
    tokens: np.ndarray                  # uint16 or uint32, [n_tokens]
    offsets: np.ndarray                 # uint64, [n_docs + 1]
    loss_mask: Optional[np.ndarray]     # uint8, [n_tokens], or None for a pretraining shard
    vocab_size: int

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def doc(self, i: int) -> np.ndarray:
        return self.tokens[int(self.offsets[i]):int(self.offsets[i + 1])]

    def doc_mask(self, i: int) -> Optional[np.ndarray]:
        if self.loss_mask is None:
            return None
        return self.loss_mask[int(self.offsets[i]):int(self.offsets[i + 1])]

    def __iter__(self):
        return (self.doc(i) for i in range(len(self)))


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in it, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def layout(n_tokens: int, n_docs: int, token_size: int, has_mask: bool) -> tuple[int, int, int]:
    """(offsets start, mask start, file size) in bytes."""
    offsets_start = HEADER_SIZE + (n_tokens * token_size + 7) // 8 * 8
    mask_start = offsets_start + (n_docs + 1) * 8
    return offsets_start, mask_start, mask_start + (n_tokens if has_mask else 0)


def write_shard(path, docs, *, loss_masks=None, vocab_size: Optional[int] = None) -> Path:
    """Write documents (1-D arrays of non-negative token ids, none empty) to `path`, atomically: a temp file in
    the same folder is renamed over `path` only once complete, so a reader never sees half a shard.

    loss_masks: one 0/1 array per document, same lengths, for an SFT shard. vocab_size: the tokenizer's, which
    picks the token dtype (uint16 when it fits); defaults to the largest id + 1.
    """
    path = Path(path)
    docs = [np.asarray(d) for d in docs]
    if not docs:
        raise ValueError(f"write_shard({path}): no documents")
    for i, d in enumerate(docs):
        if d.ndim != 1 or d.size == 0 or not np.issubdtype(d.dtype, np.integer):
            raise ValueError(f"write_shard({path}): document {i} must be a non-empty 1-D integer array, "
                             f"got shape {d.shape} dtype {d.dtype}")
        if d.min() < 0:
            raise ValueError(f"write_shard({path}): document {i} has a negative token id {int(d.min())}")
    max_id = max(int(d.max()) for d in docs)
    vocab_size = max_id + 1 if vocab_size is None else int(vocab_size)
    if max_id >= vocab_size or vocab_size >= 1 << 32:
        raise ValueError(f"write_shard({path}): token id {max_id} does not fit vocab_size={vocab_size}")
    masks = None if loss_masks is None else [np.asarray(m) for m in loss_masks]
    if masks is not None:
        if len(masks) != len(docs):
            raise ValueError(f"write_shard({path}): {len(masks)} loss masks for {len(docs)} documents")
        for i, (d, m) in enumerate(zip(docs, masks)):
            if m.shape != d.shape or not np.isin(m, (0, 1)).all():
                raise ValueError(f"write_shard({path}): loss mask {i} must be 0/1 with shape {d.shape}, "
                                 f"got shape {m.shape}")

    dtype = token_dtype(vocab_size)
    tokens = np.concatenate(docs).astype(dtype)
    offsets = np.zeros(len(docs) + 1, dtype=np.uint64)
    np.cumsum([d.size for d in docs], out=offsets[1:])
    offsets_start, _, _ = layout(tokens.size, len(docs), dtype.itemsize, masks is not None)
    sections = [tokens.tobytes(), bytes(offsets_start - HEADER_SIZE - tokens.nbytes), offsets.tobytes()]
    if masks is not None:
        sections.append(np.concatenate(masks).astype(np.uint8).tobytes())
    crc = 0
    for s in sections:
        crc = zlib.crc32(s, crc)
    flags = FLAG_LOSS_MASK if masks is not None else 0
    header = HEADER.pack(MAGIC, VERSION, flags, dtype.itemsize, vocab_size, tokens.size, len(docs), crc, bytes(20))

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(header)
            for s in sections:
                f.write(s)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_header(path: Path, data) -> tuple[int, int, int, int, int, int]:
    """Validate the header against the file length; returns (flags, token size, vocab, n_tokens, n_docs, crc)."""
    if len(data) < HEADER_SIZE:
        raise ShardError(f"{path}: truncated: {len(data)} bytes is shorter than the {HEADER_SIZE}-byte header")
    magic, version, flags, token_size, vocab, n_tokens, n_docs, crc, reserved = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ShardError(f"{path}: not a cancerllm shard (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise ShardError(f"{path}: shard format version {version}, this reader knows version {VERSION}")
    if flags & ~FLAG_LOSS_MASK or any(reserved):
        raise ShardError(f"{path}: unknown header flags {flags:#x} or non-zero reserved bytes")
    if token_size not in (2, 4):
        raise ShardError(f"{path}: token size {token_size} bytes, expected 2 or 4")
    if vocab == 0 or vocab > 1 << (8 * token_size):
        raise ShardError(f"{path}: vocab_size {vocab} does not match {token_size}-byte tokens")
    if n_docs == 0 or n_docs > len(data) or n_tokens > len(data):
        raise ShardError(f"{path}: header claims {n_tokens} tokens in {n_docs} documents, impossible for a "
                         f"{len(data)}-byte file")
    expected = layout(n_tokens, n_docs, token_size, bool(flags & FLAG_LOSS_MASK))[2]
    if expected != len(data):
        raise ShardError(f"{path}: file is {len(data)} bytes but its header describes {expected} bytes "
                         f"({'truncated' if len(data) < expected else 'trailing data'})")
    return flags, token_size, vocab, n_tokens, n_docs, crc


def read_shard(path, *, verify: bool = True) -> Shard:
    """Memory-map and validate a shard: header, sizes against the file length, offsets monotone and in range;
    with verify=True also the payload checksum, token ids below vocab_size and a 0/1 loss mask."""
    path = Path(path)
    try:
        data = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
    except FileNotFoundError:
        raise FileNotFoundError(f"shard not found: {path}") from None
    flags, token_size, vocab, n_tokens, n_docs, crc = read_header(path, data)
    offsets_start, mask_start, _ = layout(n_tokens, n_docs, token_size, bool(flags & FLAG_LOSS_MASK))
    tokens = data[HEADER_SIZE:HEADER_SIZE + n_tokens * token_size].view(token_dtype(1 << (8 * token_size)))
    offsets = data[offsets_start:mask_start].view(np.uint64)
    mask = data[mask_start:] if flags & FLAG_LOSS_MASK else None
    if offsets[0] != 0 or offsets[-1] != n_tokens:
        raise ShardError(f"{path}: document offsets must run from 0 to {n_tokens}, "
                         f"got {int(offsets[0])} .. {int(offsets[-1])}")
    bad = np.flatnonzero(offsets[1:] <= offsets[:-1])
    if bad.size:
        i = int(bad[0])
        raise ShardError(f"{path}: document offsets not strictly increasing at document {i} "
                         f"({int(offsets[i])} -> {int(offsets[i + 1])})")
    if verify:
        actual = zlib.crc32(data[HEADER_SIZE:])
        if actual != crc:
            raise ShardError(f"{path}: checksum mismatch (header {crc:#010x}, payload {actual:#010x}): "
                             "the file is corrupt")
        if n_tokens and int(tokens.max()) >= vocab:
            raise ShardError(f"{path}: token id {int(tokens.max())} is not below vocab_size {vocab}")
        if mask is not None and mask.size and int(mask.max()) > 1:
            raise ShardError(f"{path}: loss mask holds values other than 0 and 1")
    return Shard(path, tokens, offsets, mask, vocab)

"""The shard format: round trips, atomic writes, and a clear error for every kind of corruption, from the
Python reader and the C++ one alike."""
import struct
import zlib

import numpy as np
import pytest

from cancerllm.data import ShardError, read_shard, write_shard
from cancerllm.data.loader import cpp_available
from cancerllm.data.shards import HEADER_SIZE, layout

needs_cpp = pytest.mark.skipif(not cpp_available(), reason="cancerllm._C is not built")


def random_docs(rng, n, vocab, max_len=50):
    return [rng.integers(0, vocab, size=int(rng.integers(1, max_len))) for _ in range(n)]


@pytest.mark.parametrize("vocab, dtype", [(32000, np.uint16), (1 << 16, np.uint16), (128256, np.uint32)])
def test_round_trip(tmp_path, vocab, dtype):
    rng = np.random.default_rng(0)
    docs = random_docs(rng, 40, vocab) + [np.array([vocab - 1])]
    path = write_shard(tmp_path / "s.bin", docs, vocab_size=vocab)
    shard = read_shard(path)
    assert shard.tokens.dtype == dtype and shard.vocab_size == vocab and shard.loss_mask is None
    assert len(shard) == len(docs)
    for want, got in zip(docs, shard):
        np.testing.assert_array_equal(got, want)
    assert path.stat().st_size == layout(sum(map(len, docs)), len(docs), np.dtype(dtype).itemsize, False)[2]


def test_round_trip_with_loss_mask(tmp_path):
    rng = np.random.default_rng(1)
    docs = random_docs(rng, 10, 500)
    masks = [rng.integers(0, 2, size=len(d)) for d in docs]
    shard = read_shard(write_shard(tmp_path / "sft.bin", docs, loss_masks=masks))
    assert shard.loss_mask is not None
    for i, m in enumerate(masks):
        np.testing.assert_array_equal(shard.doc_mask(i), m)


def test_vocab_defaults_to_largest_id(tmp_path):
    shard = read_shard(write_shard(tmp_path / "s.bin", [np.array([3, 70000])]))
    assert shard.vocab_size == 70001 and shard.tokens.dtype == np.uint32


@pytest.mark.parametrize("docs, kw, match", [
    ([], {}, "no documents"),
    ([np.array([1, 2]), np.array([], dtype=np.int64)], {}, "document 1 must be a non-empty"),
    ([np.array([[1, 2]])], {}, "document 0 must be a non-empty 1-D"),
    ([np.array([1.5])], {}, "integer"),
    ([np.array([1, -2])], {}, "negative token id"),
    ([np.array([1, 99])], {"vocab_size": 50}, "token id 99 does not fit vocab_size=50"),
    ([np.array([1, 2])], {"loss_masks": [np.array([1])]}, "loss mask 0"),
    ([np.array([1, 2])], {"loss_masks": [np.array([1, 2])]}, "loss mask 0 must be 0/1"),
])
def test_write_rejects_bad_input(tmp_path, docs, kw, match):
    with pytest.raises(ValueError, match=match):
        write_shard(tmp_path / "bad.bin", docs, **kw)
    assert not list(tmp_path.iterdir())


def test_write_is_atomic(tmp_path):
    path = write_shard(tmp_path / "s.bin", [np.array([1, 2, 3])])
    before = path.read_bytes()
    with pytest.raises(ValueError):
        write_shard(path, [np.array([1, 2]), np.array([-1])])
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.bin"], "a temp file was left behind"


def corrupt(path, offset, data):
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(data)] = data
    path.write_bytes(bytes(raw))


def offsets_start(path):
    shard = read_shard(path)
    return layout(len(shard.tokens), len(shard), shard.tokens.itemsize, shard.loss_mask is not None)[0]


def make(tmp_path):
    return write_shard(tmp_path / "s.bin", [np.arange(1, 11), np.arange(5, 25), np.arange(3, 6)], vocab_size=100)


CORRUPTIONS = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:-5]), "truncated"),
    "shorter than header": (lambda p: p.write_bytes(p.read_bytes()[:30]), "shorter than the 64-byte header"),
    "empty file": (lambda p: p.write_bytes(b""), "shorter than the 64-byte header"),
    "trailing data": (lambda p: p.write_bytes(p.read_bytes() + b"\0" * 8), "trailing data"),
    "wrong magic": (lambda p: corrupt(p, 0, b"NOTSHARD"), "magic"),
    "future version": (lambda p: corrupt(p, 8, struct.pack("<I", 7)), "version 7"),
    "unknown flag": (lambda p: corrupt(p, 12, struct.pack("<I", 6)), "flags"),
    "bad token size": (lambda p: corrupt(p, 16, struct.pack("<I", 3)), "token size 3"),
    "huge token count": (lambda p: corrupt(p, 24, struct.pack("<Q", 2**63)), "impossible"),
    "zero documents": (lambda p: corrupt(p, 32, struct.pack("<Q", 0)), "impossible"),
    "offset out of range": (lambda p: corrupt(p, offsets_start(p) + 8 * 3, struct.pack("<Q", 10**6)),
                            "offsets must run from 0 to 33"),
    "offsets not monotone": (lambda p: corrupt(p, offsets_start(p) + 8, struct.pack("<Q", 31)),
                             "not strictly increasing at document 1"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corruption_gives_a_clear_error(tmp_path, case):
    path = make(tmp_path)
    damage, match = CORRUPTIONS[case]
    damage(path)
    with pytest.raises(ShardError, match=match) as err:
        read_shard(path, verify=False)
    assert str(path) in str(err.value)


def test_flipped_payload_byte_fails_the_checksum(tmp_path):
    path = make(tmp_path)
    corrupt(path, HEADER_SIZE + 4, bytes([path.read_bytes()[HEADER_SIZE + 4] ^ 0x10]))
    read_shard(path, verify=False)        # the structure is intact: only the checksum can tell
    with pytest.raises(ShardError, match=f"{path}: checksum mismatch"):
        read_shard(path)


def test_token_beyond_vocab_is_caught_by_verify(tmp_path):
    path = make(tmp_path)
    corrupt(path, HEADER_SIZE, struct.pack("<H", 100))
    payload = path.read_bytes()[HEADER_SIZE:]
    corrupt(path, 40, struct.pack("<I", zlib.crc32(payload)))    # a consistent checksum: only the range check fails
    with pytest.raises(ShardError, match="token id 100 is not below vocab_size 100"):
        read_shard(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        read_shard(tmp_path / "missing.bin")


@needs_cpp
@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_cpp_reader_rejects_the_same_corruption(tmp_path, case):
    from cancerllm import _C
    path = make(tmp_path)
    CORRUPTIONS[case][0](path)
    with pytest.raises(ValueError, match=str(path)):
        _C.read_shard_info(str(path), False)


@needs_cpp
def test_cpp_reader_checks_checksum_and_agrees_on_counts(tmp_path):
    from cancerllm import _C
    path = make(tmp_path)
    assert _C.read_shard_info(str(path), True) == dict(n_tokens=33, n_docs=3, vocab_size=100, token_size=2, sft=False)
    corrupt(path, HEADER_SIZE + 4, b"\xff")
    _C.read_shard_info(str(path), False)
    with pytest.raises(ValueError, match="checksum mismatch"):
        _C.read_shard_info(str(path), True)


@needs_cpp
def test_cpp_crc32_matches_zlib():
    from cancerllm import _C
    data = np.random.default_rng(2).bytes(1000)
    assert _C.crc32(data) == zlib.crc32(data) and _C.crc32(b"") == 0

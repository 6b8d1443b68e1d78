"""PackedLoader's contract: identical batches from C++ and Python, per-document positions and boundaries that
match the model's, loss masks, epochs that are permutations, and exact resume, also on another world size."""
import numpy as np
import pytest
import torch

from cancerllm.data import PackedLoader, write_shard
from cancerllm.data.loader import Permutation, cpp_available
from cancerllm.model import positions_from_cu_seqlens

BACKENDS = ["python"] + (["cpp"] if cpp_available() else [])
needs_cpp = pytest.mark.skipif(not cpp_available(), reason="cancerllm._C is not built")
BOS, EOS = 1, 2


def make_docs(rng, n, vocab=1000, max_len=40):
    """Documents as prepare writes them: BOS + body + EOS, body ids >= 3 so document starts are recognisable."""
    return [np.concatenate([[BOS], rng.integers(3, vocab, size=int(rng.integers(1, max_len))), [EOS]])
            for _ in range(n)]


@pytest.fixture
def pretrain_shards(tmp_path):
    rng = np.random.default_rng(0)
    docs = make_docs(rng, 120)
    return [write_shard(tmp_path / f"p{i}.bin", docs[i::3], vocab_size=70000 if i == 1 else 1000) for i in range(3)]


@pytest.fixture
def sft_shards(tmp_path):
    rng = np.random.default_rng(1)
    docs = make_docs(rng, 60, max_len=20) + [np.concatenate([[BOS], np.full(50, 7), [EOS]])]   # longer than a row
    masks = [np.concatenate([np.zeros(len(d) // 2), np.ones(len(d) - len(d) // 2)]) for d in docs]
    return [write_shard(tmp_path / f"s{i}.bin", docs[i::2], loss_masks=masks[i::2]) for i in range(2)]


def take(loader, n):
    return [next(loader) for _ in range(n)]


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def sample_keys(batch):
    """A row identifies its sample: its tokens and targets together."""
    return [bytes(np.concatenate([t, g[-1:]]).astype(np.int64)) for t, g in zip(batch["tokens"], batch["targets"])]


@needs_cpp
@pytest.mark.parametrize("kind", ["pretrain", "sft"])
@pytest.mark.parametrize("rank, world_size, threads", [(0, 1, 1), (2, 3, 2)])
def test_cpp_and_python_give_identical_batches(request, kind, rank, world_size, threads):
    paths = request.getfixturevalue(f"{kind}_shards")
    kw = dict(seq_len=24, batch_size=3, rank=rank, world_size=world_size, seed=11)
    py_loader = PackedLoader(paths, backend="python", **kw)
    cpp_loader = PackedLoader(paths, backend="cpp", num_threads=threads, prefetch=3, **kw)
    assert py_loader.num_samples == cpp_loader.num_samples
    assert py_loader.truncated_examples == cpp_loader.truncated_examples == (kind == "sft")
    steps = 2 * py_loader.num_samples // (3 * world_size) + 2        # across at least two epoch boundaries
    for a, b in zip(take(py_loader, steps), take(cpp_loader, steps)):
        assert_same(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_layout_matches_the_model(pretrain_shards, backend):
    B, T = 4, 32
    batch = next(PackedLoader(pretrain_shards, seq_len=T, batch_size=B, backend=backend))
    for k in ("tokens", "targets", "positions"):
        assert batch[k].shape == (B, T) and batch[k].dtype == np.int64
    assert batch["loss_mask"].dtype == bool and batch["cu_seqlens"].dtype == np.int32
    cu = batch["cu_seqlens"]
    assert cu[0] == 0 and cu[-1] == B * T and np.all(np.diff(cu) > 0)
    assert set(range(0, B * T, T)) <= set(cu.tolist())
    # Segments start at row starts and at every BOS (a document start), nowhere else.
    flat = batch["tokens"].reshape(-1)
    bos = set(np.flatnonzero(flat == BOS).tolist())
    assert set(cu[:-1].tolist()) == bos | set(range(0, B * T, T))
    want = positions_from_cu_seqlens(torch.from_numpy(cu), B, T).numpy()
    np.testing.assert_array_equal(batch["positions"], want)
    # Targets are the next tokens; the only masked targets are the first tokens of the next document.
    np.testing.assert_array_equal(batch["tokens"][:, 1:], batch["targets"][:, :-1])
    np.testing.assert_array_equal(batch["loss_mask"], batch["targets"] != BOS)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pretrain_rows_cover_the_stream(pretrain_shards, backend):
    from cancerllm.data import read_shard
    stream = np.concatenate([read_shard(p).tokens for p in pretrain_shards]).astype(np.int64)
    T = 16
    loader = PackedLoader(pretrain_shards, seq_len=T, batch_size=1, backend=backend, seed=5)
    assert loader.num_samples == (len(stream) - 1) // T
    starts = set()
    for b in take(loader, loader.num_samples):
        row = np.concatenate([b["tokens"][0], b["targets"][0][-1:]])
        hits = [s for s in range(0, len(stream) - T, T) if np.array_equal(stream[s:s + T + 1], row)]
        assert hits, "a row that is not a window of the stream"
        starts.update(hits)
    assert starts == set(range(0, loader.num_samples * T, T)), "every window exactly once per epoch"


@pytest.mark.parametrize("backend", BACKENDS)
def test_sft_rows_pack_whole_examples(sft_shards, backend):
    from cancerllm.data import read_shard
    T = 24
    examples = [(s.doc(i).astype(np.int64), s.doc_mask(i).astype(bool)) for s in map(read_shard, sft_shards)
                for i in range(len(s))]
    loader = PackedLoader(sft_shards, seq_len=T, batch_size=1, backend=backend)
    seen = []
    for _ in range(loader.num_samples):
        b = next(loader)
        row = np.concatenate([b["tokens"][0], b["targets"][0][-1:]])
        starts = list(b["cu_seqlens"][:-1]) + [T + 1]
        for lo, hi in zip(starts[:-1], starts[1:]):
            piece = np.trim_zeros(row[lo:hi], "b")       # real tokens are >= 1; padding is pad_id 0
            if not piece.size:                                   # padding: no loss
                assert not b["loss_mask"][0][max(lo - 1, 0):].any()
                continue
            seen.append(tuple(piece))
            # loss on target t exactly when token t+1 is in the same example and carries the mask bit
            ex_tokens, ex_mask = next(e for e in examples if np.array_equal(e[0][:len(piece)], piece))
            np.testing.assert_array_equal(b["loss_mask"][0][lo:lo + len(piece) - 1], ex_mask[1:len(piece)])
            if lo > 0:
                assert not b["loss_mask"][0][lo - 1], "loss across an example boundary"
    want = sorted(tuple(e[0][:T + 1]) for e in examples)
    assert sorted(seen) == want, "every example in exactly one row, truncated only when longer than a row"
    assert loader.truncated_examples == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_epochs_are_reshuffled_permutations(pretrain_shards, backend):
    loader = PackedLoader(pretrain_shards, seq_len=20, batch_size=1, backend=backend, seed=3)
    n = loader.num_samples
    epochs = [[k for _ in range(n) for k in sample_keys(next(loader))] for _ in range(2)]
    assert loader.epoch == 2
    assert len(set(epochs[0])) == n and set(epochs[0]) == set(epochs[1]) and epochs[0] != epochs[1]


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 1000])
def test_permutation_is_a_bijection(n):
    for seed, epoch in [(0, 0), (7, 3)]:
        assert sorted(Permutation(n, seed, epoch)(i) for i in range(n)) == list(range(n))


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_mid_epoch_equals_uninterrupted_run(pretrain_shards, backend):
    kw = dict(seq_len=16, batch_size=4, seed=9, backend=backend)
    reference = take(PackedLoader(pretrain_shards, **kw), 12)
    first = PackedLoader(pretrain_shards, **kw)
    take(first, 5)
    state = first.state_dict()
    assert state["sample_index"] == 20
    resumed = PackedLoader(pretrain_shards, **kw)
    resumed.load_state_dict(state)
    for a, b in zip(reference[5:], take(resumed, 7)):
        assert_same(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_on_another_world_size_covers_every_sample_once(pretrain_shards, backend):
    """3 ranks train a while, then 2 ranks (and a bigger batch) resume: over one epoch every sample is seen by
    exactly one rank exactly once."""
    kw = dict(seq_len=16, seed=4, backend=backend)
    n = PackedLoader(pretrain_shards, batch_size=1, **kw).num_samples
    seen = []
    ranks = [PackedLoader(pretrain_shards, batch_size=2, rank=r, world_size=3, **kw) for r in range(3)]
    for _ in range(5):
        for loader in ranks:
            seen += sample_keys(next(loader))
    state = ranks[0].state_dict()
    assert all(r.state_dict() == state for r in ranks) and state["sample_index"] == 30
    ranks = [PackedLoader(pretrain_shards, batch_size=3, rank=r, world_size=2, **kw) for r in range(2)]
    for loader in ranks:
        loader.load_state_dict(state)
    while len(seen) < n:
        for loader in ranks:
            seen += sample_keys(next(loader))
    first_epoch = seen[:n]
    assert len(set(first_epoch)) == n, "a sample repeated or skipped within the epoch"
    everything = PackedLoader(pretrain_shards, batch_size=1, **kw)
    assert set(first_epoch) == {k for _ in range(n) for k in sample_keys(next(everything))}


def test_load_state_dict_rejects_another_dataset(pretrain_shards):
    state = PackedLoader(pretrain_shards, seq_len=16, batch_size=2, backend="python").state_dict()
    other = PackedLoader(pretrain_shards, seq_len=8, batch_size=2, backend="python")
    with pytest.raises(ValueError, match="seq_len=16"):
        other.load_state_dict(state)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_arguments_name_the_argument(pretrain_shards, sft_shards, tmp_path, backend):
    with pytest.raises(ValueError, match="rank 2 is not below world_size 2"):
        PackedLoader(pretrain_shards, seq_len=8, batch_size=1, rank=2, world_size=2, backend=backend)
    with pytest.raises(ValueError, match="seq_len must be an integer"):
        PackedLoader(pretrain_shards, seq_len=0, batch_size=1, backend=backend)
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        PackedLoader([tmp_path / "nope.bin"], seq_len=8, batch_size=1, backend=backend)
    with pytest.raises(ValueError, match="mixing SFT shards"):
        PackedLoader(pretrain_shards + sft_shards, seq_len=8, batch_size=1, backend=backend)
    with pytest.raises(ValueError, match="do not fill one row"):
        PackedLoader(pretrain_shards[:1], seq_len=100_000, batch_size=1, backend=backend)
    with pytest.raises(ValueError, match="backend must be"):
        PackedLoader(pretrain_shards, seq_len=8, batch_size=1, backend="rust")


@needs_cpp
def test_cpp_batches_are_zero_copy_and_outlive_the_loader(pretrain_shards):
    loader = PackedLoader(pretrain_shards, seq_len=16, batch_size=2, backend="cpp")
    batch = next(loader)
    tokens = torch.from_numpy(batch["tokens"])
    assert tokens.data_ptr() == batch["tokens"].ctypes.data
    expected = batch["tokens"].copy()
    loader.close()
    del loader
    np.testing.assert_array_equal(tokens.numpy(), expected)


def test_cpp_requested_without_extension_is_a_clear_error(pretrain_shards, monkeypatch):
    import cancerllm.data.loader as loader_module
    monkeypatch.setattr(loader_module, "cpp_available", lambda: False)
    with pytest.raises(ImportError, match="cancerllm._C is not built"):
        PackedLoader(pretrain_shards, seq_len=8, batch_size=1, backend="cpp")
    assert PackedLoader(pretrain_shards, seq_len=8, batch_size=1).backend == "python"

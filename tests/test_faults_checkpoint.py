"""Training checkpoints that are crafted, damaged, misplaced or from another run: resume executes nothing from the
checkpoint directory, falls back past damaged checkpoints with a warning, and refuses what it cannot use with an
error naming the file or the setting."""
import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

from cancerllm import ModelArgs, Transformer
from cancerllm.data import PackedLoader, write_shard
from cancerllm.train.checkpointing import (MANIFEST, CheckpointError, Checkpointer, file_digest, read_metadata,
                                           run_settings)
from cancerllm.train.config import LoraConfig, OptimConfig, ParallelConfig
from cancerllm.train.metrics import MetricsLogger
from cancerllm.train.optim import build_optimizer, build_scheduler, lr_factor
from cancerllm.train.parallel import Dist, build_mesh, parallelize
from cancerllm.train.step import NonFiniteGuard, to_device, train_step

CPU = torch.device("cpu")
ONE_RANK = Dist(rank=0, local_rank=0, world_size=1, device=CPU)
ARGS = ModelArgs.preset("tiny", dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=64,
                        vocab_size=256)


pytestmark = pytest.mark.usefixtures("one_rank_process_group")


class Run:
    """A one-rank training run's pieces, with `save` and `fresh` (the same pieces rebuilt, as a resumed run has)."""

    def __init__(self, tmp_path, lr=1e-2):
        rng = np.random.default_rng(0)
        self.shard = write_shard(tmp_path / "train-00000.bin", [rng.integers(3, 256, 40) for _ in range(20)],
                                 vocab_size=256)
        self.dir = tmp_path / "run"
        self.model, self.optimizer, self.scheduler, self.loader = self.pieces(lr)
        self.guard = NonFiniteGuard(3)
        self.checkpointer = Checkpointer(self.dir, ONE_RANK, keep=5, settings=run_settings(ARGS, LoraConfig()))
        self.step = 0

    def pieces(self, lr, seed=0):
        torch.manual_seed(seed)
        model = parallelize(Transformer(ARGS), build_mesh(ParallelConfig(), 1, CPU), ParallelConfig(), CPU)
        cfg = OptimConfig(lr=lr, warmup_steps=1)
        optimizer = build_optimizer(model, cfg)
        return model, optimizer, build_scheduler(optimizer, cfg, 10), PackedLoader([self.shard], seq_len=16,
                                                                                    batch_size=2, backend="python")

    def train_and_save(self, steps=2):
        for _ in range(steps):
            train_step(self.model, self.optimizer, [to_device(next(self.loader), CPU)], dp_size=1, max_norm=1.0,
                       device=CPU)
            self.scheduler.step()
            self.step += 1
        return self.checkpointer.save(self.step, self.model, self.optimizer, self.scheduler, self.loader,
                                      self.guard)

    def resume(self, path, lr=1e-2, checkpointer=None):
        model, optimizer, scheduler, loader = self.pieces(lr, seed=7)
        step = (checkpointer or self.checkpointer).load(path, model, optimizer, scheduler, loader,
                                                        NonFiniteGuard(3))
        return step, model, optimizer, scheduler


@pytest.fixture
def run(tmp_path):
    return Run(tmp_path)


def forge_manifest(checkpoint):
    """Make the manifest match the files as they are now: the case of a deliberately crafted checkpoint."""
    files = {p.name: file_digest(p) for p in checkpoint.iterdir() if p.name != MANIFEST}
    (checkpoint / MANIFEST).write_text(json.dumps({"files": files}))


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_crafted_metadata_pickle_is_refused_and_never_runs(run, tmp_path):
    checkpoint = run.train_and_save()
    marker = tmp_path / "pwned"
    payload = pickle.dumps(Payload(marker))
    pickle.loads(payload)                      # the payload is live: plain unpickling runs it
    assert marker.exists()
    marker.unlink()
    (checkpoint / ".metadata").write_bytes(payload)
    forge_manifest(checkpoint)
    with pytest.raises(CheckpointError, match=r"\.metadata: not the DCP metadata.*posix.system"):
        run.resume(checkpoint)
    with pytest.raises(CheckpointError, match="no intact checkpoint"), pytest.warns(UserWarning):
        run.checkpointer.latest()
    assert not marker.exists()


def test_pickled_object_entries_are_refused(run):
    """DCP stores a non-tensor value as a pickle that its planner reads with torch.load(weights_only=False)."""
    checkpoint = run.train_and_save()
    metadata = read_metadata(checkpoint)
    metadata.state_dict_metadata["progress"] = BytesStorageMetadata()
    (checkpoint / ".metadata").write_bytes(pickle.dumps(metadata))
    forge_manifest(checkpoint)
    with pytest.raises(CheckpointError, match="BytesStorageMetadata"):
        run.resume(checkpoint)


def test_storage_paths_outside_the_checkpoint_are_refused(run):
    checkpoint = run.train_and_save()
    metadata = read_metadata(checkpoint)
    info = next(iter(metadata.storage_data.values()))
    info.relative_path = "../../elsewhere.distcp"
    (checkpoint / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match="not a file of the checkpoint directory"):
        read_metadata(checkpoint)


def test_checkpoint_holds_only_tensors_and_json_and_loads_with_weights_only(run, monkeypatch):
    checkpoint = run.train_and_save()
    assert sorted(p.name for p in checkpoint.iterdir()) == [".metadata", "__0_0.distcp", "loader_rank0.json",
                                                            "manifest.json", "progress.json"]
    assert all(isinstance(m, TensorStorageMetadata) for m in read_metadata(checkpoint).state_dict_metadata.values())
    real_load = torch.load

    def load_weights_only(*args, **kwargs):
        assert kwargs.get("weights_only") is True, "torch.load without weights_only=True on the resume path"
        return real_load(*args, **kwargs)
    monkeypatch.setattr(torch, "load", load_weights_only)
    step, model, _, _ = run.resume(checkpoint)
    assert step == 2
    for (name, p), saved in zip(model.named_parameters(), run.model.parameters()):
        assert torch.equal(p, saved), name


@pytest.mark.parametrize("name", ["../../outside", "/tmp/outside", "step-00000002/../../outside", "step-2"])
def test_latest_must_name_a_checkpoint_of_this_run(run, tmp_path, name):
    run.train_and_save()
    (run.dir / "checkpoints/latest").write_text(name + "\n")
    with pytest.raises(CheckpointError, match=r"checkpoints/latest names .* not a checkpoint of this run"):
        run.checkpointer.latest()


def test_a_checkpoint_linked_from_elsewhere_is_skipped(run, tmp_path):
    run.train_and_save()
    newest = run.train_and_save()
    elsewhere = tmp_path / "elsewhere"
    newest.rename(elsewhere)
    newest.symlink_to(elsewhere)
    with pytest.warns(UserWarning, match="step-00000004 cannot be resumed from .not a directory of checkpoints"):
        assert run.checkpointer.latest().name == "step-00000002"


def truncate_data(checkpoint):
    data = checkpoint / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:100])


@pytest.mark.parametrize("damage, problem", [
    (truncate_data, r"__0_0.distcp: 100 bytes"),
    (lambda c: (c / ".metadata").write_bytes(b"\x80\x04garbage"), r"\.metadata: .* but the manifest says"),
    (lambda c: shutil.rmtree(c), "missing"),
    (lambda c: (c / MANIFEST).write_text('{"files": {'), "manifest.json: not valid JSON"),
    (lambda c: (c / "progress.json").unlink(), "progress.json: missing"),
])
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(run, damage, problem):
    run.train_and_save()
    newest = run.train_and_save()
    damage(newest)
    with pytest.warns(UserWarning, match=f"step-00000004 cannot be resumed from .*{problem}"):
        previous = run.checkpointer.latest()
    assert previous.name == "step-00000002"
    assert run.resume(previous)[0] == 2


def test_garbage_metadata_with_a_matching_manifest_is_a_named_error(run):
    checkpoint = run.train_and_save()
    (checkpoint / ".metadata").write_bytes(b"\x80\x04garbage")
    forge_manifest(checkpoint)
    with pytest.raises(CheckpointError, match=r"\.metadata: not the DCP metadata .*UnpicklingError"):
        run.resume(checkpoint)
    with pytest.raises(CheckpointError, match=r"no intact checkpoint to resume from \(step-00000002: .*\.metadata"), \
            pytest.warns(UserWarning, match="trying the one before it"):
        run.checkpointer.latest()


def test_non_finite_weights_never_become_a_checkpoint(run):
    run.train_and_save()
    with torch.no_grad():
        run.model.norm.weight[0] = float("nan")
    with pytest.raises(FloatingPointError, match="step 4: the model's weights are not finite"):
        run.train_and_save()
    assert (run.dir / "checkpoints/latest").read_text().strip() == "step-00000002"
    assert not (run.dir / "checkpoints/step-00000004").exists()


@pytest.mark.parametrize("args, lora, message", [
    (ARGS.to_dict() | {"dim": 64}, LoraConfig(), "model.dim = 32 there, 64 now"),
    (ARGS.to_dict(), LoraConfig(enabled=True, rank=4), "lora.enabled = False there, True now"),
])
def test_resume_with_other_model_or_lora_settings_names_the_setting(run, args, lora, message):
    checkpoint = run.train_and_save()
    other = Checkpointer(run.dir, ONE_RANK, keep=5, settings=run_settings(ModelArgs(**args), lora))
    with pytest.raises(CheckpointError, match=f"step-00000002 was written by a run with other settings .*{message}"):
        run.resume(checkpoint, checkpointer=other)


def test_a_changed_lr_applies_from_the_resumed_step_on(run, capsys):
    checkpoint = run.train_and_save()
    step, _, optimizer, scheduler = run.resume(checkpoint, lr=5e-3)
    expected = 5e-3 * lr_factor(2, warmup=1, total=10, floor=0.1)
    assert scheduler.get_last_lr() == [pytest.approx(expected, rel=1e-12)] * len(optimizer.param_groups)
    assert all(g["lr"] == pytest.approx(expected, rel=1e-12) for g in optimizer.param_groups)
    assert "optim.lr = 0.005 (it was 0.01 when step-00000002 was written)" in capsys.readouterr().out
    moments = [s["exp_avg"] for s in optimizer.state.values()]
    assert all(torch.equal(a, s["exp_avg"]) for a, s in zip(moments, run.optimizer.state.values()))
    _, _, _, same = run.resume(checkpoint)                       # unchanged lr: the trajectory's own lr
    assert same.get_last_lr() == run.scheduler.get_last_lr()


def test_partial_last_metrics_line_is_dropped_with_a_warning(tmp_path):
    log = MetricsLogger(tmp_path, is_main=True, every=1, flops_per_token=1.0, peak_tflops=1.0, device=CPU,
                        world_size=1)
    log.path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    with pytest.warns(UserWarning, match=r"metrics.jsonl:3: dropping a partial last line"):
        log.truncate_after(2)
    assert log.path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
    log.path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON record"):
        log.truncate_after(2)

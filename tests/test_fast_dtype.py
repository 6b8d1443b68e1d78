"""The compute dtype chosen by measurement (cancerllm/fast_dtype.py) and where it is asked for: train.py's
parallel.mixed_precision = "fastest" with checkpoint.export_dtype = "compute", and Generator.from_pretrained /
evaluate's dtype="fastest". The measurement itself is replaced by fixed times where a test needs a given answer."""
import json

import pytest
import torch

from cancerllm import ModelArgs, Transformer, decode_paths, fast_dtype
from cancerllm.generate import decoding_dtype
from cancerllm.train.build import export_dtype
from cancerllm.train.config import CheckpointConfig, Config, ConfigError, ParallelConfig, load_config
from cancerllm.train.parallel import Dist, param_dtype, resolve_mixed_precision

CPU = torch.device("cpu")
ARGS = ModelArgs.preset("tiny")


@pytest.fixture
def timed(monkeypatch, tmp_path):
    """Measurements replaced by `seconds` (set by the test), counted; a cache of the test's own."""
    monkeypatch.setenv("CANCERLLM_CACHE_DIR", str(tmp_path / "cache"))
    calls = []

    def fake(shapes, rows):
        calls.append((tuple(shapes), rows))
        return dict(timed.seconds)
    monkeypatch.setattr(fast_dtype, "time_linears", fake)
    timed.calls, timed.seconds = calls, {"bfloat16": 1.0, "float32": 1.0}
    return timed


@pytest.mark.parametrize("bf16, fp32, expected", [(0.1, 1.0, "bfloat16"), (0.79, 1.0, "bfloat16"),
                                                  (0.81, 1.0, "float32"), (1.0, 1.0, "float32"),
                                                  (4.0, 1.0, "float32")])
def test_bf16_only_when_clearly_faster(bf16, fp32, expected):
    # BF16_MARGIN = 1.25: a near tie keeps fp32 (more exact, and no flip between runs)
    assert fast_dtype.faster_of({"bfloat16": bf16, "float32": fp32}) == expected


def test_the_choice_is_measured_once_per_machine_shape_and_rows(timed, tmp_path):
    timed.seconds = {"bfloat16": 0.2, "float32": 1.0}
    assert fast_dtype.fastest_dtype(ARGS, 64) == torch.bfloat16
    assert timed.calls == [(tuple(ARGS.block_linear_shapes()), 64)]
    timed.seconds = {"bfloat16": 9.0, "float32": 1.0}          # cached: not measured again
    assert fast_dtype.fastest_dtype(ARGS, 64) == torch.bfloat16 and len(timed.calls) == 1
    assert fast_dtype.fastest_dtype(ARGS, 100_000) == torch.float32   # other rows: measured, capped at MAX_ROWS
    assert timed.calls[-1][1] == fast_dtype.MAX_ROWS
    other = ModelArgs.preset("tiny", hidden_dim=ARGS.hidden_dim + 16)
    assert fast_dtype.fastest_dtype(other, 64) == torch.float32 and len(timed.calls) == 3
    cache = json.loads((tmp_path / "cache" / decode_paths.CACHE_FILE).read_text())
    assert sorted(v for k, v in cache.items() if "compute dtype" in k) == ["bfloat16", "float32", "float32"]


def test_a_gpu_computes_in_bf16_without_measuring(timed):
    assert fast_dtype.fastest_dtype(ARGS, 64, device="cuda") == torch.bfloat16 and not timed.calls


def test_the_real_measurement_times_both_types_and_leaves_the_random_stream_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    seconds = fast_dtype.time_linears(ARGS.block_linear_shapes(), 8)
    assert torch.equal(torch.rand(3), expected)
    assert set(seconds) == {"bfloat16", "float32"} and all(0 < s < 60 for s in seconds.values())


def test_fastest_mixed_precision_is_resolved_for_the_model(timed):
    one = Dist(0, 0, 1, CPU)
    with pytest.raises(ValueError, match="'fastest' names no dtype"):
        param_dtype(ParallelConfig(mixed_precision="fastest"), CPU)
    timed.seconds = {"bfloat16": 0.2, "float32": 1.0}
    assert resolve_mixed_precision(ParallelConfig(mixed_precision="fastest"), ARGS, 512, one) == "bf16"
    assert resolve_mixed_precision(ParallelConfig(mixed_precision="fastest"), ARGS, 512,
                                   Dist(0, 0, 1, torch.device("cuda"))) == "bf16"
    for kept in ("auto", "fp32"):
        assert resolve_mixed_precision(ParallelConfig(mixed_precision=kept), ARGS, 512, one) == kept
    timed.seconds = {"bfloat16": 4.0, "float32": 1.0}
    assert resolve_mixed_precision(ParallelConfig(mixed_precision="fastest"), ARGS, 256, one) == "fp32"
    with pytest.warns(UserWarning, match="'bf16' on a CPU that multiplies the model's linears faster in fp32"):
        assert resolve_mixed_precision(ParallelConfig(mixed_precision="bf16"), ARGS, 256, one) == "bf16"


def test_export_dtype_compute_names_the_compute_dtype():
    for precision, name in (("bf16", "bfloat16"), ("fp32", "float32"), ("auto", "float32")):
        cfg = Config(parallel=ParallelConfig(mixed_precision=precision),
                     checkpoint=CheckpointConfig(export_dtype="compute"))
        assert export_dtype(cfg, CPU) == name
    assert export_dtype(Config(checkpoint=CheckpointConfig(export_dtype="float16")), CPU) == "float16"


def test_config_accepts_fastest_and_compute_and_names_a_bad_value(tmp_path):
    path = tmp_path / "run.toml"
    data = '[data]\ntrain = ["shards/*.bin"]\n'
    path.write_text(data + '[parallel]\nmixed_precision = "fastest"\n[checkpoint]\nexport_dtype = "compute"\n')
    cfg = load_config(path, [])
    assert (cfg.parallel.mixed_precision, cfg.checkpoint.export_dtype) == ("fastest", "compute")
    path.write_text(data + '[parallel]\nmixed_precision = "quickest"\n')
    with pytest.raises(ConfigError, match="parallel.mixed_precision"):
        load_config(path, [])


def test_generator_decodes_in_the_measured_dtype(timed, tmp_path):
    model = Transformer(ARGS)
    model.save_pretrained(tmp_path / "ckpt")
    timed.seconds = {"bfloat16": 0.2, "float32": 1.0}
    assert decoding_dtype("fastest", tmp_path / "ckpt") == torch.bfloat16
    assert decoding_dtype("float32", tmp_path / "ckpt") == torch.float32 and decoding_dtype(None, "unread") is None
    timed.seconds = {"bfloat16": 4.0, "float32": 1.0}
    assert decoding_dtype("fastest", tmp_path / "ckpt") == torch.bfloat16       # cached per machine and shape
    other = ModelArgs.preset("tiny", dim=ARGS.dim * 2)
    Transformer(other).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert decoding_dtype("fastest", tmp_path / "bf16") == torch.float32

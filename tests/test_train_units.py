"""The training pieces in one process (a one-rank gloo group; the model stays a plain module there, a bf16 one
cast per block by train/mixed_precision.py): config refusal, schedule and weight-decay groups, SFT loss masking,
gradient-accumulation weighting, non-finite steps, and a checkpoint interrupted while being written."""
import math

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor

from cancerllm import ModelArgs, Transformer
from cancerllm.data import PackedLoader, write_shard
from cancerllm.train.build import build_model
from cancerllm.train.checkpointing import Checkpointer
from cancerllm.train.config import (Config, ConfigError, DataConfig, LoraConfig, ModelConfig, OptimConfig,
                                    ParallelConfig, load_config)
from cancerllm.train.lora import LoRALinear, apply_lora, merge_state_dict
from cancerllm.train.nf4 import BLOCK_SIZE, check_shardable, dequantize, is_nf4, quantize
from cancerllm.train.optim import build_optimizer, build_scheduler, lr_factor
from cancerllm.train.parallel import Dist, build_mesh, full_tensor, parallelize
from cancerllm.kernels import IGNORE_INDEX
from cancerllm.train.step import NonFiniteGuard, example_weights, micro_batch_loss, to_device, train_step

ARGS = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=64, vocab_size=256)
CPU = torch.device("cpu")
ONE_RANK = Dist(rank=0, local_rank=0, world_size=1, device=CPU)


pytestmark = pytest.mark.usefixtures("one_rank_process_group")


def one_rank_model(seed=0, lora=None, parallel=ParallelConfig()):
    torch.manual_seed(seed)
    model = Transformer(ModelArgs.preset("tiny", **ARGS))
    if lora:
        apply_lora(model, lora)
    return parallelize(model, build_mesh(parallel, 1, CPU), parallel, CPU)


def test_one_cpu_rank_is_never_sharded():
    plain = one_rank_model(parallel=ParallelConfig(activation_checkpoint_every=1))
    assert not any(isinstance(p, DTensor) for p in plain.parameters())
    assert all(type(block).__name__ == "CheckpointWrapper" for block in plain.layers)
    assert full_tensor(plain.norm.weight) is plain.norm.weight
    # bf16 compute over fp32 parameters: cast per block by train/mixed_precision.py (tests/test_mixed_precision.py)
    bf16 = one_rank_model(parallel=ParallelConfig(mixed_precision="bf16"))
    assert not any(isinstance(p, DTensor) for p in bf16.parameters())
    assert all(p.dtype == torch.float32 for p in bf16.parameters())


@pytest.fixture
def sft_shard(tmp_path):
    """Prompt/completion examples: the mask marks the completion (and EOS) only."""
    rng = np.random.default_rng(1)
    docs, masks = [], []
    for _ in range(40):
        prompt, completion = rng.integers(3, 256, rng.integers(3, 12)), rng.integers(3, 256, rng.integers(2, 8))
        docs.append(np.concatenate([[1], prompt, completion, [2]]))
        masks.append(np.concatenate([np.zeros(1 + len(prompt)), np.ones(len(completion) + 1)]).astype(np.uint8))
    path = write_shard(tmp_path / "sft-00000.bin", docs, loss_masks=masks, vocab_size=256)
    return path, docs, masks


def write_config(tmp_path, text):
    path = tmp_path / "run.toml"
    path.write_text('[data]\ntrain = ["x.bin"]\n' + text)
    return path


# ---------------------------------------------------------------------------------------------- config

@pytest.mark.parametrize("text, overrides, message", [
    ("[train]\nstepz = 3\n", [], "unknown key train.stepz"),
    ("[trian]\nsteps = 3\n", [], "unknown section(s) trian"),
    ("[train]\nsteps = 2.5\n", [], "train.steps must be int, got 2.5"),
    ("[lora]\nenabled = 1\n", [], "lora.enabled must be bool, got 1"),
    ("", ["optim.betas=[0.9]"], "optim.betas must be two numbers"),
    ("", ["train.stage=rlhf"], "train.stage must be one of pretrain, sft"),
    ("", ["model.overrides.n_layer=2"], "unexpected keyword argument 'n_layer'"),
    ("", ["train.steps=0"], "train.steps must be positive"),
    ("", ["optim.lr=nan"], "optim.lr must be a finite number, got nan"),
    ("[optim]\nlr = inf\n", [], "optim.lr must be a finite number, got inf"),
    ("", ["optim.betas=[0.9, nan]"], "optim.betas must be a finite number, got nan"),
    ("", ["train.seed=1180591620717411303424"], "train.seed = 1180591620717411303424 does not fit in 64 bits"),
    ("", ["model.overrides.norm_eps=-1e-5"], "norm_eps must be a positive finite number"),
    ("", ["model.overrides.rope_theta=inf"], "model.overrides.rope_theta must be a finite number"),
    ("", ["lora.quantize_base=nf4"], "lora.quantize_base = 'nf4' needs lora.enabled = true"),
    ("", ["lora.enabled=true", "lora.quantize_base=int4"], "lora.quantize_base must be one of none, nf4"),
])
def test_bad_config_is_refused_naming_file_and_key(tmp_path, text, overrides, message):
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    assert message in str(e.value) and str(path) in str(e.value)


def test_malformed_override_names_the_argument(tmp_path):
    with pytest.raises(ConfigError, match="--set trainsteps=3: expected section.key=value"):
        load_config(write_config(tmp_path, ""), ["trainsteps=3"])


def test_overrides_are_typed_toml_values(tmp_path):
    cfg = load_config(write_config(tmp_path, "[optim]\nlr = 1\n"),
                      ["optim.betas=[0.8, 0.9]", "lora.enabled=true", "checkpoint.dir=runs/x", "model.overrides.dim=64"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == [0.8, 0.9] and cfg.lora.enabled is True
    assert cfg.checkpoint.dir == "runs/x" and cfg.model.overrides == {"dim": 64}


# ---------------------------------------------------------------------------------------------- optimizer

def test_schedule_warms_up_linearly_then_decays_to_the_floor():
    f = [lr_factor(s, warmup=4, total=20, floor=0.1) for s in range(20)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(f[4:], f[5:]))
    assert f[-1] == pytest.approx(0.1)
    assert f[12] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 8 / 15)))


def test_norms_and_embeddings_get_no_weight_decay():
    model = one_rank_model()
    optimizer = build_optimizer(model, OptimConfig(weight_decay=0.1))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert "embed_tokens.weight" in plain and "norm.weight" in plain
    assert all("layernorm" in n or n in ("embed_tokens.weight", "norm.weight") for n in plain)
    assert "lm_head.weight" in decayed and "layers.0.self_attn.q_proj.weight" in decayed


def test_lora_optimizer_holds_only_adapters_and_merge_adds_the_update():
    cfg = LoraConfig(rank=4, alpha=8.0)
    model = one_rank_model(lora=cfg)
    optimizer = build_optimizer(model, OptimConfig())
    names = {id(p): n for n, p in model.named_parameters()}
    in_optimizer = {names[id(p)] for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer and all(n.endswith(("lora_A", "lora_B")) for n in in_optimizer)
    assert len(in_optimizer) == 2 * 7 * 2
    state = {"w.weight": torch.randn(6, 5), "w.lora_A": torch.randn(4, 5), "w.lora_B": torch.randn(6, 4)}
    merged = merge_state_dict(state, cfg)
    assert merged.keys() == {"w.weight"}
    torch.testing.assert_close(merged["w.weight"], state["w.weight"] + 2.0 * state["w.lora_B"] @ state["w.lora_A"])
    # A bf16 base: the sum is taken in fp32 and rounded once, to the export's dtype, not to the base's.
    state["w.weight"] = state["w.weight"].bfloat16()
    merged = merge_state_dict(state, cfg, torch.float32)["w.weight"]
    assert merged.dtype == torch.float32
    torch.testing.assert_close(merged, state["w.weight"].float() + 2.0 * state["w.lora_B"] @ state["w.lora_A"])


def lora_run(mixed_precision: str, base_dtype: str = "auto", quantize_base: str = "none", args=ARGS):
    cfg = Config(model=ModelConfig(preset="tiny", overrides=args),
                 lora=LoraConfig(enabled=True, rank=4, alpha=8.0, dropout=0.0, base_dtype=base_dtype,
                                 quantize_base=quantize_base),
                 parallel=ParallelConfig(mixed_precision=mixed_precision))
    _, model = build_model(cfg, Dist(0, 0, 1, CPU), build_mesh(cfg.parallel, 1, CPU))
    return model


def random_batch(n_rows=2, seq_len=24):
    tokens = torch.randint(0, ARGS["vocab_size"], (n_rows, seq_len))
    cu_seqlens = torch.tensor([0, 7, 24, 40, 48], dtype=torch.int32)
    targets = tokens.roll(-1, dims=1).masked_fill(torch.rand(n_rows, seq_len) < 0.3, IGNORE_INDEX)
    return {"tokens": tokens, "positions": None, "cu_seqlens": cu_seqlens, "targets": targets}


def plain_reference(model, value):
    """Give `model`'s lora_B values (B = 0 would leave A's gradient zero), then return a plain (unsharded) LoRA model
    holding value(p) of each of its parameters."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.normal_(0.0, 0.05)
    reference = Transformer(ModelArgs.preset("tiny", **ARGS))
    apply_lora(reference, LoraConfig(rank=4, alpha=8.0, dropout=0.0))
    reference.load_state_dict({n: value(p) for n, p in model.named_parameters()})
    return reference


@pytest.mark.parametrize("mixed_precision, base_dtype", [("bf16", "auto"), ("fp32", "bfloat16")])
def test_lora_keeps_the_frozen_base_in_bf16_and_the_adapters_in_fp32(mixed_precision, base_dtype):
    model = lora_run(mixed_precision, base_dtype)
    dtypes = {name: full_tensor(p).dtype for name, p in model.named_parameters()}
    assert {dtypes[n] for n, p in model.named_parameters() if p.requires_grad} == {torch.float32}
    assert {dtypes[n] for n, p in model.named_parameters() if not p.requires_grad} == {torch.bfloat16}
    assert dtypes["layers.0.self_attn.q_proj.lora_B"] == torch.float32
    assert dtypes["layers.0.self_attn.q_proj.weight"] == dtypes["embed_tokens.weight"] == torch.bfloat16


def test_lora_step_on_a_bf16_base_matches_an_fp32_reference():
    """fp32 compute over a bf16-stored base (cast per block) takes the step of a plain fp32 model holding
    the same (bf16-representable) weights: the storage dtype changes nothing but the bytes."""
    model = lora_run("fp32", "bfloat16")
    reference = plain_reference(model, lambda p: full_tensor(p).float())
    batch = random_batch()
    losses = [train_step(m, torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1.0), [batch],
                         dp_size=1, max_norm=0.0, device=CPU).loss for m in (model, reference)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    updated = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        if p.requires_grad:
            error = torch.linalg.norm(full_tensor(p) - updated[name]) / torch.linalg.norm(updated[name])
            assert error < 1e-6 and (full_tensor(p) - updated[name]).abs().max() < 1e-6, name


@pytest.mark.parametrize("quantize_base", ["none", "nf4"])
def test_lora_on_a_bf16_base_with_bf16_compute_lowers_the_loss(quantize_base):
    model = lora_run("bf16", quantize_base=quantize_base)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2, weight_decay=0.0))
    batch = random_batch()
    losses = [train_step(model, optimizer, [batch], dp_size=1, max_norm=1.0, device=CPU).loss for _ in range(6)]
    assert losses[-1] < losses[0] - 0.05, losses


# ---------------------------------------------------------------------------------------------- QLoRA (NF4 base)

def nf4_levels_float64() -> torch.Tensor:
    """QLoRA's 16 NF4 levels from their definition (bitsandbytes' create_normal_map): 8 positive and 7 negative
    quantiles of N(0, 1), from the 0.5 quantile out to the 0.9677083 one, and an exact 0; scaled to [-1, 1]."""
    offset = 0.9677083
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    return levels / levels.max()


def float64_nf4_round_trip(w: torch.Tensor, levels: torch.Tensor):
    """Block-wise absmax NF4 in float64, with exact scales (no double quantization): each value -> nearest level."""
    blocks = w.double().reshape(-1, BLOCK_SIZE)
    absmax = blocks.abs().amax(1, keepdim=True)
    nearest = (blocks / absmax).unsqueeze(-1).sub(levels).abs().argmin(-1)
    return (levels[nearest] * absmax).reshape(w.shape), absmax.expand(-1, BLOCK_SIZE).reshape(w.shape)


@pytest.mark.parametrize("scale", [0.02, 1.0, 300.0])
def test_nf4_round_trip_matches_a_float64_reference_of_the_codebook(scale):
    levels = nf4_levels_float64()
    w = torch.randn(256, 512) * scale * torch.rand(256, 1)      # rows of different magnitudes: scales that differ
    nf4 = quantize(w, "w")
    assert (nf4.nf4.double() - levels).abs().max() <= 5.1e-5      # torchao's levels: these to 4 decimals
    ours = dequantize(nf4).double()
    reference, absmax = float64_nf4_round_trip(w, levels)
    w64 = w.double()
    error, reference_error = (float(torch.linalg.norm(x - w64) / torch.linalg.norm(w64)) for x in (ours, reference))
    assert 0.05 < reference_error < 0.15 and error <= 1.01 * reference_error
    assert torch.linalg.norm(ours - reference) / torch.linalg.norm(reference) < 0.01
    # Per value: a double-quantized scale is off by at most half an int8 step of the scales' spread around their
    # mean (1/256 of it), and a level by its rounding. Only values that close to a midpoint between two levels may
    # round to the other one.
    spread = (absmax - absmax.mean()).abs().max()
    bound = spread / 256 + (5.1e-5 + 1e-6) * absmax
    assert ((ours - reference).abs() > bound).double().mean() < 1e-3


def test_qlora_gradients_equal_float64_ones_on_the_dequantized_base():
    """The NF4 base (fp32 compute) gives the loss and adapter gradients of a float64 model holding its dequantized
    weights, backward included (LinearNF4 dequantizes again there)."""
    model = lora_run("fp32", quantize_base="nf4")
    assert sorted(n for n, p in model.named_parameters() if is_nf4(p)) == sorted(
        f"layers.{i}.{m}.weight" for i in range(2) for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                             "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                             "mlp.down_proj"))
    reference = plain_reference(model, lambda p: dequantize(p).double()).double()
    batch = random_batch()
    losses, grads = [], []
    for m in (model, reference):
        loss = micro_batch_loss(m, batch)
        loss.backward()
        losses.append(float(loss.detach()))
        grads.append({n: p.grad.double() for n, p in m.named_parameters() if p.requires_grad})
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 7 * 2
    for name, expected in grads[1].items():
        error = grads[0][name] - expected
        assert torch.linalg.norm(error) / torch.linalg.norm(expected) < 1e-5, name
        assert error.abs().max() < 1e-5 * expected.abs().max(), name


def test_qlora_refuses_weights_that_are_not_whole_nf4_blocks_or_shards():
    with pytest.raises(ValueError, match=r"layers.0.self_attn.q_proj.weight has shape \(32, 33\), whose 1,056 values "
                                         "are not a multiple of the NF4 block size 64"):
        lora_run("fp32", quantize_base="nf4", args=ARGS | {"dim": 33})
    model = lora_run("fp32", quantize_base="nf4")
    check_shardable(model, 1)
    with pytest.raises(ValueError, match=r"layers.0.self_attn.q_proj.weight \(32 rows, 1 groups of scales\) cannot "
                                         "be split evenly over 2 FSDP ranks"):
        check_shardable(model, 2)


def test_qlora_from_a_checkpoint_quantizes_each_weight_as_it_is_read(tmp_path, monkeypatch):
    """model.init_from: each adapted weight is quantized right after it is read, before the next one is read (so
    only one is ever held unquantized), to exactly what quantizing the stored weight gives; the rest is as stored."""
    from cancerllm import checkpoint
    from cancerllm.train import build
    torch.manual_seed(1)
    Transformer(ModelArgs.preset("tiny", **ARGS)).save_pretrained(tmp_path / "base", max_shard_size="40KB")
    events = []
    iter_tensors, quantize_weight = checkpoint.iter_tensors, build.quantize

    def reading(files):
        for item in iter_tensors(files):
            events.append(("read", item[1]))
            yield item

    def quantizing(weight, name):
        events.append(("quantize", "model." + name))
        return quantize_weight(weight, name)
    monkeypatch.setattr(checkpoint, "iter_tensors", reading)
    monkeypatch.setattr(build, "quantize", quantizing)
    cfg = Config(model=ModelConfig(init_from=str(tmp_path / "base")),
                 lora=LoraConfig(enabled=True, rank=4, quantize_base="nf4"),
                 parallel=ParallelConfig(mixed_precision="fp32"))
    _, model = build_model(cfg, ONE_RANK, build_mesh(cfg.parallel, 1, CPU))
    quantized = [i for i, (kind, _) in enumerate(events) if kind == "quantize"]
    assert len(quantized) == 2 * 7 and len(list((tmp_path / "base").glob("model-*.safetensors"))) > 3
    assert all(events[i - 1] == ("read", events[i][1]) for i in quantized)
    stored = Transformer.from_pretrained(tmp_path / "base").state_dict()
    for name, p in model.named_parameters():
        if is_nf4(p):
            assert torch.equal(dequantize(p), dequantize(quantize(stored[name], name))), name
        elif not p.requires_grad:
            assert torch.equal(p, stored[name]), name


# ---------------------------------------------------------------------------------------------- SFT and the loss

def test_sft_targets_carry_loss_on_completion_tokens_only(sft_shard):
    path, docs, masks = sft_shard
    loader = PackedLoader([path], seq_len=32, batch_size=4, backend="python")
    raw = next(loader)
    batch = to_device(raw, CPU)
    carried = batch["targets"] != IGNORE_INDEX
    assert carried.any() and not carried.all()
    # Every carried target is a completion token or EOS of some example; no prompt token ever is.
    completion_tokens = {int(t) for d, m in zip(docs, masks) for t in d[m.astype(bool)]}
    prompt_only = {int(t) for d, m in zip(docs, masks) for t in d[~m.astype(bool)]} - completion_tokens
    assert not prompt_only & set(batch["targets"][carried].tolist())
    # Changing what the prompt positions would predict does not change the loss.
    model = Transformer(ModelArgs.preset("tiny", **ARGS))
    inputs = dict(positions=batch["positions"], cu_seqlens=batch["cu_seqlens"])
    loss = model(batch["tokens"], targets=batch["targets"], **inputs)
    scrambled = dict(raw, targets=np.where(raw["loss_mask"], raw["targets"], (raw["targets"] + 7) % 256))
    assert torch.equal(model(batch["tokens"], targets=to_device(scrambled, CPU)["targets"], **inputs), loss)


@pytest.mark.parametrize("loss_weighting", ["token", "example"])
def test_accumulated_micro_batches_weigh_each_loss_token_equally(sft_shard, loss_weighting):
    """Two micro-batches of one row each (different numbers of loss tokens) give the step of one batch of both
    rows: the loss and, through SGD with lr 1, the gradient; per token or per example alike."""
    path, _, _ = sft_shard
    one = to_device(next(PackedLoader([path], seq_len=32, batch_size=2, backend="python")), CPU, loss_weighting)
    micro_loader = PackedLoader([path], seq_len=32, batch_size=1, backend="python")
    micro = [to_device(next(micro_loader), CPU, loss_weighting) for _ in range(2)]
    assert (micro[0]["targets"] != IGNORE_INDEX).sum() != (micro[1]["targets"] != IGNORE_INDEX).sum()
    results, weights = [], []
    for batches in ([one], micro):
        model = one_rank_model(seed=1)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        results.append(train_step(model, optimizer, batches, dp_size=1, max_norm=0.0, device=CPU))
        weights.append({n: full_tensor(p) for n, p in model.named_parameters()})
    assert results[0].loss == pytest.approx(results[1].loss, rel=1e-6)
    assert results[0].loss_tokens == results[1].loss_tokens
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=1e-5, atol=1e-6)


def test_example_weights_give_each_document_with_loss_a_total_of_one():
    loss_mask = torch.tensor([[0, 1, 1, 1, 0, 0, 1, 0],
                              [0, 0, 1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    cu_seqlens = torch.tensor([0, 4, 6, 8, 12, 16], dtype=torch.int32)   # documents 0-3, 4-5, 6-7 | 8-11, 12-15
    w = example_weights(loss_mask, cu_seqlens)
    third = 1 / 3
    assert torch.allclose(w, torch.tensor([[0, third, third, third, 0, 0, 1, 0], [0, 0, 1, 0, 0, 0, 0, 0]]))


def test_example_weighting_averages_each_examples_mean_loss(sft_shard):
    """The step's loss with loss_weighting="example" is the mean over the batch's documents (with loss tokens) of
    each one's mean token loss, recomputed here from the logits; per token it is the plain token mean."""
    path, _, _ = sft_shard
    raw = next(PackedLoader([path], seq_len=32, batch_size=2, backend="python"))
    model = one_rank_model(seed=2)
    with torch.no_grad():
        model.norm.weight.mul_(30.0)       # sharp logits: token losses far from uniform, so the two means differ
        inputs = to_device(raw, CPU)
        logits = model(inputs["tokens"], positions=inputs["positions"], cu_seqlens=inputs["cu_seqlens"])
    losses = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(),
                                               inputs["targets"].reshape(-1), reduction="none", ignore_index=-100)
    carried = (inputs["targets"] != IGNORE_INDEX).reshape(-1)
    bounds = inputs["cu_seqlens"].tolist()
    per_example = [losses[a:b][carried[a:b]].mean() for a, b in zip(bounds, bounds[1:]) if carried[a:b].any()]
    assert len(per_example) > 2 and len({int(carried[a:b].sum()) for a, b in zip(bounds, bounds[1:])}) > 2
    by_example, by_token = torch.stack(per_example).mean(), losses[carried].mean()
    assert abs(by_example - by_token) > 1e-3 * by_token
    for weighting, expected in [("example", by_example), ("token", by_token)]:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        result = train_step(model, optimizer, [to_device(raw, CPU, weighting)], dp_size=1, max_norm=0.0, device=CPU)
        assert result.loss == pytest.approx(float(expected), rel=2e-5)
    with pytest.raises(ValueError, match="loss_weighting must be 'token' or 'example'"):
        to_device(raw, CPU, "sequence")


# ---------------------------------------------------------------------------------------------- failures

def test_non_finite_step_is_skipped_counted_and_stops_the_run_when_repeated(sft_shard):
    path, _, _ = sft_shard
    batch = to_device(next(PackedLoader([path], seq_len=32, batch_size=2, backend="python")), CPU)
    model = one_rank_model()
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2))
    guard = NonFiniteGuard(limit=3)
    embed = model.embed_tokens.weight
    token = int(batch["tokens"][0, 0])
    with torch.no_grad():
        embed[token] = float("nan")          # inject: every step sees a NaN activation
    before = {n: full_tensor(p).clone() for n, p in model.named_parameters()}
    for step in (1, 2):
        result = train_step(model, optimizer, [batch], dp_size=1, max_norm=1.0, device=CPU)
        guard.update(step, result)
        assert result.skipped and math.isnan(result.loss)
    assert guard.skipped_total == 2 and guard.in_a_row == 2
    assert not optimizer.state                             # no optimizer step was taken
    for n, p in model.named_parameters():
        assert torch.equal(full_tensor(p), before[n]) or n == "embed_tokens.weight"
    with torch.no_grad():
        embed[token] = 0.0
    result = train_step(model, optimizer, [batch], dp_size=1, max_norm=1.0, device=CPU)
    guard.update(3, result)
    assert not result.skipped and guard.in_a_row == 0 and guard.skipped_total == 2
    with torch.no_grad():
        embed[token] = float("inf")
    with pytest.raises(FloatingPointError, match="3 steps in a row"):
        for step in (4, 5, 6):
            guard.update(step, train_step(model, optimizer, [batch], dp_size=1, max_norm=1.0, device=CPU))
    assert guard.skipped_total == 5


def test_checkpoint_interrupted_mid_write_leaves_the_previous_one_loadable(tmp_path, sft_shard, monkeypatch):
    path, _, _ = sft_shard
    cfg = OptimConfig(lr=1e-2, warmup_steps=1)
    model = one_rank_model()
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, 10)
    loader = PackedLoader([path], seq_len=32, batch_size=2, backend="python")
    guard = NonFiniteGuard(3)
    for _ in range(2):
        train_step(model, optimizer, [to_device(next(loader), CPU)], dp_size=1, max_norm=1.0, device=CPU)
        scheduler.step()
    checkpointer = Checkpointer(tmp_path, ONE_RANK, keep=2)
    checkpointer.save(2, model, optimizer, scheduler, loader, guard)
    saved = {n: full_tensor(p).clone() for n, p in model.named_parameters()}
    train_step(model, optimizer, [to_device(next(loader), CPU)], dp_size=1, max_norm=1.0, device=CPU)

    real_save = dcp.save

    def save_then_die(state, checkpoint_id):       # the data files land, then the process "dies"
        real_save({"model": state["model"]}, checkpoint_id=checkpoint_id)
        raise KeyboardInterrupt("killed while writing the checkpoint")
    monkeypatch.setattr(dcp, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save(3, model, optimizer, scheduler, loader, guard)
    monkeypatch.setattr(dcp, "save", real_save)
    assert (tmp_path / "checkpoints/step-00000003.tmp").is_dir()

    restarted = Checkpointer(tmp_path, ONE_RANK, keep=2)             # a new run cleans up and finds step 2
    assert not (tmp_path / "checkpoints/step-00000003.tmp").exists()
    assert restarted.latest().name == "step-00000002"
    fresh = one_rank_model(seed=5)
    fresh_optimizer = build_optimizer(fresh, cfg)
    fresh_scheduler = build_scheduler(fresh_optimizer, cfg, 10)
    fresh_loader = PackedLoader([path], seq_len=32, batch_size=2, backend="python")
    step = restarted.load(restarted.latest(), fresh, fresh_optimizer, fresh_scheduler, fresh_loader, NonFiniteGuard(3))
    assert step == 2 and fresh_scheduler.last_epoch == 2 and fresh_loader.state_dict()["sample_index"] == 4
    for n, p in fresh.named_parameters():
        assert torch.equal(full_tensor(p), saved[n]), n


@pytest.mark.parametrize("name", ["cpu-small", "cpu-small-sft", "smollm2-cpt", "smollm2-sft", "mistral-7b-pretrain",
                                  "mistral-7b-sft", "mistral-7b-lora-sft", "mistral-7b-qlora-sft"])
def test_shipped_configs_pass_the_schema(name):
    from pathlib import Path
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / f"{name}.toml")
    assert cfg.train.stage == ("sft" if "sft" in name else "pretrain")

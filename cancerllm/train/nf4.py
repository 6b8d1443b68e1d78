"""QLoRA's frozen base: each LoRA-adapted weight stored as 4-bit NormalFloat (NF4) with torchao's NF4Tensor.

NF4 (Dettmers et al., 2023) splits a weight into blocks of 64 values, scales each block by its absmax and rounds
every value to the nearest of 16 levels placed at quantiles of a standard normal; the block scales are themselves
quantized to int8 in groups (double quantization), about 4.13 bits per weight in all. The weight is dequantized to
its dtype inside each linear (forward and backward), so it is never trained: only the adapters beside it are.

torchao's NF4Tensor shards under FSDP2 (its fsdp_pre/post_all_gather hooks gather the packed codes and scales, not
a dequantized copy): tested here over gloo, and torchtune's QLoRA runs it over NCCL. Sharding splits the codes by
rows, so each rank's share must hold whole rows and whole groups of scales: `check_shardable` names the weight that
does not.
"""
import contextlib
import importlib
import logging
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor

BLOCK_SIZE = 64                # weights per absmax scale (QLoRA's)
SCALER_BLOCK_SIZE = 256        # scales per int8 group of the double quantization (QLoRA's); see scaler_block_size
NF4_MODULE = "torchao.quantization.quantize_.workflows.nf4.nf4_tensor"
TORCHAO_VERSION = "0.18.0"


def torchao_nf4():
    """torchao's NF4 module, imported on first use: only quantized runs need torchao."""
    # NF4Tensor is plain PyTorch; torchao's compiled extensions are CUDA kernels for other formats, which a CPU
    # build of torch cannot load (torchao logs a warning for each). Skip them unless the user says otherwise, and
    # keep the import's log lines (that skip, a deprecated enum registration) off the run's output.
    os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
    try:
        with quiet_loggers("torchao", "torch.utils._pytree"):
            return importlib.import_module(NF4_MODULE)
    except ImportError as e:
        raise ImportError(f"lora.quantize_base = 'nf4' needs torchao ({e}): pip install 'cancerllm[qlora]' "
                          f"(torchao=={TORCHAO_VERSION})") from None


@contextlib.contextmanager
def quiet_loggers(*names):
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def is_nf4(t) -> bool:
    """Whether `t` (a tensor, or a DTensor by its local shard) is an NF4Tensor. Without torchao imported, none is."""
    module = sys.modules.get(NF4_MODULE)
    return module is not None and isinstance(getattr(t, "_local_tensor", t), module.NF4Tensor)


def dequantize(t: torch.Tensor) -> torch.Tensor:
    """An NF4 weight as a plain tensor of its dtype; any other tensor as it is."""
    return t.get_original_weight() if is_nf4(t) else t


def gather_dequantized(t: torch.Tensor) -> torch.Tensor:
    """The whole of an NF4 weight, dequantized. An FSDP2 shard (a DTensor) is all-gathered first, as its packed codes
    and scales, through NF4Tensor's own FSDP2 hooks with plain synchronous all-gathers, as torchtune does: DTensor's
    full_tensor() leaves the collectives of an NF4 tensor's parts unwaited (torch warns of them at exit)."""
    if not isinstance(t, DTensor):
        return dequantize(t)
    local, mesh = t.to_local(), t.device_mesh
    shard_mesh = mesh if mesh.ndim == 1 else mesh["dp_shard"]
    parts, metadata = local.fsdp_pre_all_gather(shard_mesh)
    group = shard_mesh.get_group()
    gathered = []
    for part in parts:
        whole = part.new_empty((part.shape[0] * group.size(), *part.shape[1:]))
        dist.all_gather_single(whole, part.contiguous(), group=group)
        gathered.append(whole)
    full, _ = local.fsdp_post_all_gather(tuple(gathered), metadata, local.dtype)
    return dequantize(full)


def scaler_block_size(n_blocks: int) -> int:
    """QLoRA's 256 scales per int8 group, or the largest power of two below it that divides the weight's blocks:
    SmolLM2's 576-wide projections hold 5,184 blocks (81 x 64), which no group of 256 divides. Smaller groups only
    add one fp32 factor per group (0.008 bits per weight at 64)."""
    size = SCALER_BLOCK_SIZE
    while n_blocks % size:
        size //= 2
    return size


def quantize(weight: torch.Tensor, name: str) -> nn.Parameter:
    """A frozen NF4 Parameter holding `weight` (2-D, numel a multiple of BLOCK_SIZE), dequantizing to its dtype."""
    if weight.dim() != 2 or weight.numel() % BLOCK_SIZE:
        raise ValueError(f"lora.quantize_base = 'nf4': {name} has shape {tuple(weight.shape)}, whose "
                         f"{weight.numel():,} values are not a multiple of the NF4 block size {BLOCK_SIZE}")
    n_blocks = weight.numel() // BLOCK_SIZE
    nf4 = torchao_nf4().to_nf4(weight.detach().contiguous(), BLOCK_SIZE, scaler_block_size(n_blocks))
    return nn.Parameter(nf4, requires_grad=False)


def quantize_lora_bases(model: nn.Module) -> list[str]:
    """Store the frozen weight of every LoRALinear in NF4 (those already NF4 stay as they are); returns their names."""
    from .lora import LoRALinear
    names = []
    for path, module in model.named_modules():
        if isinstance(module, LoRALinear):
            if not is_nf4(module.weight):
                module.weight = quantize(module.weight, f"{path}.weight")
            names.append(f"{path}.weight")
    return names


def check_shardable(model: nn.Module, shards: int):
    """FSDP2 gives each of `shards` ranks an equal run of rows of every NF4 weight, with its codes and scale groups:
    the rows and the groups must divide evenly (NF4Tensor cannot be padded as plain tensors are)."""
    for name, p in model.named_parameters():
        if is_nf4(p):
            groups = p.quantization_factor.numel()
            if p.shape[0] % shards or groups % shards:
                raise ValueError(f"lora.quantize_base = 'nf4': {name} ({p.shape[0]} rows, {groups} groups of scales) "
                                 f"cannot be split evenly over {shards} FSDP ranks; use a shard count dividing both")

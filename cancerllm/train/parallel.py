"""Process group, device mesh and FSDP2: each transformer block and then the root are `fully_shard`ed over a
data-parallel mesh (HSDP when `parallel.replicate` > 1: replicate across groups, shard within one), with
optional activation checkpointing and `torch.compile` per block applied first. A one-rank mesh has nothing to shard
or reduce: its model stays a plain module, and on CPU its casts to the compute dtype are train/mixed_precision.py's
(no per-step buffers); one GPU, or compiled blocks, keep FSDP2 for the cast."""
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from .config import ParallelConfig
from .mixed_precision import cast_on_use
from .nf4 import is_nf4


@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        dist.barrier()


def init_distributed() -> Dist:
    """Join the torchrun job, or form a one-process group when started as a plain `python train.py`."""
    device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available()
              else torch.device("cpu"))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "RANK" in os.environ:
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return Dist(dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_world_size(), device)


def build_mesh(cfg: ParallelConfig, world_size: int, device: torch.device) -> DeviceMesh:
    """A 2-D (replicate, shard) mesh for HSDP, or a 1-D shard mesh; their product must be the world size."""
    shard = world_size // cfg.replicate if cfg.shard == -1 else cfg.shard
    if cfg.replicate * shard != world_size:
        raise ValueError(f"parallel.replicate={cfg.replicate} x parallel.shard={cfg.shard} does not match the "
                         f"world size {world_size}")
    if cfg.replicate == 1:
        return init_device_mesh(device.type, (shard,), mesh_dim_names=("dp_shard",))
    return init_device_mesh(device.type, (cfg.replicate, shard), mesh_dim_names=("dp_replicate", "dp_shard"))


def param_dtype(cfg: ParallelConfig, device: torch.device) -> torch.dtype:
    """Compute dtype of the sharded parameters: bf16 on GPU and fp32 on CPU unless configured ("fastest" must have
    been resolved for the model first: resolve_mixed_precision)."""
    if cfg.mixed_precision == "fastest":
        raise ValueError("parallel.mixed_precision = 'fastest' names no dtype until resolve_mixed_precision has "
                         "measured it for the model")
    if cfg.mixed_precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.float32 if cfg.mixed_precision == "fp32" else torch.bfloat16


def resolve_mixed_precision(cfg: ParallelConfig, args, rows: int, d: Dist) -> str:
    """cfg.mixed_precision with "fastest" made "bf16" or "fp32": the type that multiplies a model of `args` at
    `rows` rows faster on this machine (cancerllm/fast_dtype.py), measured by rank 0 and sent to the others, so
    every rank computes in the same one. An explicit "bf16" on a CPU that runs it slower than fp32 is kept, with a
    warning (oneDNN emulates bf16 on CPUs without AVX512-BF16 or AMX)."""
    from ..fast_dtype import fastest_dtype
    if cfg.mixed_precision not in ("fastest", "bf16") or d.device.type != "cpu":
        return "bf16" if cfg.mixed_precision == "fastest" else cfg.mixed_precision
    choice = [fastest_dtype(args, rows) == torch.bfloat16 if d.is_main else None]
    if d.world_size > 1:
        dist.broadcast_object_list(choice, src=0)
    if cfg.mixed_precision == "bf16":
        if not choice[0]:
            warnings.warn("parallel.mixed_precision = 'bf16' on a CPU that multiplies the model's linears faster in "
                          "fp32 (no native bf16: oneDNN emulates it); 'fastest' would choose fp32 here")
        return "bf16"
    return "bf16" if choice[0] else "fp32"


def apply_activation_checkpointing(model, every: int):
    """Recompute the activations of every `every`-th block in backward instead of storing them."""
    for i, block in enumerate(model.layers):
        if (i + 1) % every == 0:
            model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=True)


def parallelize(model, mesh: DeviceMesh, cfg: ParallelConfig, device: torch.device):
    """Activation checkpointing, then torch.compile, then FSDP2 per block and at the root (in that order, as
    torchtitan does: each block is one all-gather / reduce-scatter unit). Reductions are always fp32.

    FSDP2 is skipped on a one-rank mesh when the compute dtype is the parameters' dtype: it would only add its
    buffers and hooks (~100 MB peak on CPU for the `small` preset); and on one CPU rank whatever the dtypes, which
    cast_on_use casts instead. One GPU keeps FSDP2, which frees each block's compute-dtype weights between uses (a
    7B model's bf16 copy is 14.5 GB there), and so do compiled blocks (their hooks would be traced)."""
    if cfg.activation_checkpoint_every:
        apply_activation_checkpointing(model, cfg.activation_checkpoint_every)
    if cfg.compile:
        for i, block in enumerate(model.layers):
            model.layers[i] = torch.compile(block, fullgraph=False)
    compute_dtype = param_dtype(cfg, device)
    if mesh.size() == 1 and all(p.dtype == compute_dtype for p in model.parameters()):
        return model
    if mesh.size() == 1 and device.type == "cpu" and not cfg.compile:
        return cast_on_use(model, compute_dtype)
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    # NF4 weights dequantize to the compute dtype themselves, and on one rank there is nothing to shard: FSDP2 leaves
    # them alone there (its one-rank path copies only the first of the three tensors an NF4 weight gathers).
    ignored = {p for p in model.parameters() if is_nf4(p)} if mesh.size() == 1 else None
    for i, block in enumerate(model.layers):
        # The last block's parameters are needed again at once by the root's backward: keep them gathered.
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=i < len(model.layers) - 1,
                    ignored_params=ignored)
    # The root unit holds the embedding and the output head: tied embeddings (one Parameter under both names) stay
    # one sharded parameter there, gathered once and given to both modules, its gradients from both uses summed.
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=ignored)
    return model


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole of a parameter, gradient or norm: gathered from the ranks when FSDP sharded it (a DTensor),
    the tensor itself when the model is a plain module."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over all ranks in one collective (fp64, so token counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()

"""Mixed precision in one CPU process without FSDP2: the contract of FSDP2's MixedPrecisionPolicy(param_dtype,
reduce_dtype=fp32) on a one-rank mesh, without its per-step gather and reduce buffers.

The parameters stay what they are (fp32 masters: the optimizer, state dicts and checkpoints see them unchanged).
As a unit's forward begins (each block, then the root's own embedding, final norm and head), every parameter of
another dtype than the compute dtype is swapped for a copy in it, and swapped back when the forward ends. A copy is
made once and refreshed only when its parameter may have changed since: after any optimizer's step (fused AdamW
updates in place without bumping version counters), an in-place write (which bumps it: a checkpoint's load) or a
new tensor under the parameter (`.data =`); a write through `.data` alone is not seen. A forward after a step
casts each weight once; a second micro-batch or an activation-checkpointing recompute casts nothing. Autograd
accumulates each copy's gradient; a hook then adds it into its parameter's gradient, in the parameter's dtype, and
frees it: only the unit backward is in holds compute-dtype gradients.

Why not FSDP2 here: on one CPU rank its all-gather and reduce-scatter are copies into buffers allocated every
step, and its gathered weights and reduced gradients live beside the masters (docs/experiments.md, 2026-11-30: less
peak memory, the same speed within noise). The copies here are one compute-dtype tensor per cast parameter, held
for the whole run (half the fp32 parameters' bytes in bf16), made again only after a change.
"""
from functools import partial

import torch
import torch.nn as nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .nf4 import is_nf4

optimizer_steps = 0     # steps taken by any optimizer in this process: a copy made before the last one is stale


def count_optimizer_step(*_):
    global optimizer_steps
    optimizer_steps += 1


register_optimizer_step_post_hook(count_optimizer_step)


class CastOnUse:
    """The compute-dtype copies of one unit's parameters, swapped in for its forward."""

    def __init__(self, slots: list[tuple[nn.Module, str]], dtype: torch.dtype):
        self.slots = slots          # (module, parameter name): resolved at each forward, so a re-materialised
        self.dtype = dtype          # parameter (to_empty, load) is picked up
        self.copies = {}            # id(parameter) -> [parameter, its copy, the state it was copied in]

    def swap_in(self, *_):
        self.masters = [module._parameters[name] for module, name in self.slots]
        live = {id(m) for m in self.masters}
        self.copies = {key: held for key, held in self.copies.items() if key in live}   # replaced parameters go
        for (module, name), master in zip(self.slots, self.masters):
            if master is not None and master.dtype != self.dtype and not is_nf4(master):
                module._parameters[name] = self.copy_of(master)

    def swap_out(self, *_):
        for (module, name), master in zip(self.slots, self.masters):
            module._parameters[name] = master

    def copy_of(self, master: nn.Parameter) -> nn.Parameter:
        held = self.copies.get(id(master))
        if held is None or held[0] is not master or held[1].requires_grad != master.requires_grad:
            copy = nn.Parameter(torch.empty_like(master, dtype=self.dtype), requires_grad=master.requires_grad)
            if master.requires_grad:
                copy.register_post_accumulate_grad_hook(partial(accumulate_into, master))
            held = self.copies[id(master)] = [master, copy, None]
        _, copy, copied = held
        state = (master._version, master.data_ptr(), optimizer_steps)
        if copied != state:
            with torch.no_grad():
                copy.copy_(master)
            held[2] = state
        return copy


def accumulate_into(master: nn.Parameter, copy: nn.Parameter):
    """Add the copy's gradient into the master's, in the master's dtype (FSDP2's fp32 reduce_dtype), and free it."""
    grad, copy.grad = copy.grad, None
    if master.grad is None:
        master.grad = grad.to(master.dtype)
    else:
        master.grad.add_(grad)


def unit_module(layer: nn.Module) -> nn.Module:
    """The block inside an activation-checkpointing wrapper: its recompute in backward calls the block itself, and
    the block must see the same copies then."""
    return getattr(layer, "_checkpoint_wrapped_module", layer)


def cast_on_use(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Give each block of `model.layers` and the rest of the model (the root) a CastOnUse unit, hooked on the
    forward; a unit with nothing to cast is still hooked (its parameters' dtypes may change later, e.g. load)."""
    blocks = [unit_module(layer) for layer in model.layers]
    in_blocks = {id(m) for block in blocks for m in block.modules()}
    root_modules = [m for m in model.modules() if id(m) not in in_blocks]
    for unit, modules in [(block, list(block.modules())) for block in blocks] + [(model, root_modules)]:
        slots = [(m, name) for m in modules for name in m._parameters]
        cast = CastOnUse(slots, dtype)
        unit.register_forward_pre_hook(cast.swap_in)
        unit.register_forward_hook(cast.swap_out, always_call=True)
    return model

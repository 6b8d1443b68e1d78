"""A decode step's transformer block on CPU in one C++ call (csrc/decode_layer.cpp): RMSNorm, the q/k/v matmul,
the cached attention with its rotation and store, the o matmul and residual, RMSNorm, gate and up, SwiGLU, down
and residual: model.FusedBlock.forward at one token per row, from the same kernels, rounded where it rounds.
From Python the block cost ~12 calls per layer, each with its checks and allocations; at one token their fixed
costs were the largest share of a step after the matmuls (docs/experiments.md).

A FusedBlock runs its BlockStep when every matmul of the block sends decode-sized inputs to our small-M kernel
(fp32, bf16 or int8 weights), both norms run our norm kernel, and the cache takes attend_step; otherwise, and for
prefill, it runs op by op. `portable` runs the portable kernels, `amx=False` the AVX512 matmuls where AMX would run
(tests cover each on one machine).
"""
import math

import torch

from . import decode_attention, gemv
from .extension import FLOATS, check_cpu_tensor, native

OP = "decode_layer"


def available() -> bool:
    return native(OP) is not None


class BlockStep:
    """A FusedBlock's weights and norms as the kernel reads them, checked once; called with each step's x."""

    def __init__(self, block):
        linears = block.linears()
        # Batches up to this size run here: any, where every matmul sends decode steps to our kernel.
        self.rows = math.inf if all(l.decode_steps for l in linears) else min(l.gemv_rows for l in linears)
        self.weights = [(*linear.rows_matmul.weight_args, linear.rows_matmul.N, linear.rows_matmul.K)
                        for linear in linears]
        self.keep = [linear.rows_matmul for linear in linears]   # the kernel reads their memory
        self.input_norm, self.post_norm = block.input_layernorm.row_norm, block.post_attention_layernorm.row_norm
        self.layer_id = block.layer_id
        self.Hq, self.Hkv, self.D = block.n_heads, block.n_kv_heads, block.head_dim
        self.dim, self.hidden = self.input_norm.weight.shape[0], linears[2].rows_matmul.N

    @staticmethod
    def possible(block) -> bool:
        """Whether `block` (a FusedBlock) can run its decode steps here."""
        return (available() and all(linear.gemv_rows or linear.decode_steps for linear in block.linears())
                and block.input_layernorm.row_norm is not None and block.post_attention_layernorm.row_norm is not None
                and block.input_layernorm.eps == block.post_attention_layernorm.eps)

    def __call__(self, x, cos, sin, cache, *, portable: bool = False, amx: bool = True):
        """x [n, 1, dim] (fp32 or bf16): the block's input at each row's new position; cos, sin [n, 1, D/2]; the
        cache prepared by begin() for these n rows (the new keys and values are stored). The block's output."""
        check_cpu_tensor(OP, "x", x, dtypes=tuple(FLOATS))
        if x.dim() != 3 or x.shape[1:] != (1, self.dim) or x.shape[0] > self.rows:
            raise ValueError(f"{OP}: x must be [n <= {self.rows}, 1, {self.dim}], got {tuple(x.shape)}")
        n = x.shape[0]
        k_cache, v_cache = cache.k[self.layer_id, cache.rows], cache.v[self.layer_id, cache.rows]
        slot_pos = cache.slot_pos[cache.rows]
        cos, sin = cos.float(), sin.float()   # as KVCache.attend_step widens them
        decode_attention.check_step(OP, cos, sin, k_cache, v_cache, slot_pos, cache.positions, cache.window, n=n,
                                    D=self.D, dtype=x.dtype)
        if k_cache.shape[1] != self.Hkv:
            raise ValueError(f"{OP}: the cache holds {k_cache.shape[1]} KV heads, the block {self.Hkv}")
        out = torch.empty_like(x)
        native(OP).decode_layer(
            x.data_ptr(), out.data_ptr(), self.input_norm.weight.data_ptr(), self.post_norm.weight.data_ptr(),
            self.input_norm.eps, self.weights, cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(),
            v_cache.data_ptr(), slot_pos.data_ptr(), cache.positions.data_ptr(), FLOATS[x.dtype],
            n, self.Hq, self.Hkv, k_cache.shape[2], self.D, cache.window or 0, 1 / math.sqrt(self.D), self.dim,
            self.hidden, torch.get_num_threads(), gemv.kernel(portable, amx))
        return out

"""cancerllm.kernels: attention, RMSNorm, SwiGLU and cross-entropy ops (docs/design.md, "Public API").

Every op checks its inputs (`validate.py`, the same errors on every path), then runs the Triton kernel on CUDA
tensors and the plain-PyTorch reference (`reference.py`) elsewhere. `set_backend("triton"|"torch"|"auto")` (or
`using_backend` for a block) forces one path for the whole process; the CANCERLLM_KERNELS environment variable sets
the starting value, read once at import (Triton on CPU tensors needs TRITON_INTERPRET=1 set before triton is
imported). Attention can also run on xformers' memory-efficient kernel (`backend="xformers"`, CUDA only).
"""
import os
from contextlib import contextmanager

import torch

from . import reference
from .attention import attention as triton_attention
from .cross_entropy import cross_entropy as triton_cross_entropy
from .linear_cross_entropy import linear_cross_entropy as triton_linear_cross_entropy
from .reference import IGNORE_INDEX
from .rms_norm import rms_norm as triton_rms_norm
from .validate import (check_attention, check_cross_entropy, check_linear_cross_entropy, check_rms_norm)

__all__ = ["IGNORE_INDEX", "attention", "rms_norm", "swiglu", "cross_entropy", "linear_cross_entropy", "use_triton",
           "BACKENDS", "get_backend", "set_backend", "using_backend"]

BACKENDS = ("auto", "triton", "torch")


def _checked_backend(name: str, source: str) -> str:
    backend = str(name).strip().lower() or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be 'triton', 'torch', 'auto' or unset, got {name!r}")
    return backend


# The one process-wide setting every op consults. Read from the environment once: a variable re-read on every op
# call could change under a running model, and a lookup per kernel launch is wasted work.
_backend = _checked_backend(os.environ.get("CANCERLLM_KERNELS", ""), "CANCERLLM_KERNELS")


def get_backend() -> str:
    """The current kernel path: "auto" (Triton on CUDA tensors, the reference elsewhere), "triton" or "torch"."""
    return _backend


def set_backend(name: str) -> str:
    """Forces every op onto one path ("triton" or "torch"), or back to "auto"; returns the previous setting.
    Process-wide (all threads), like the CANCERLLM_KERNELS variable it overrides."""
    global _backend
    previous, _backend = _backend, _checked_backend(name, "set_backend")
    return previous


@contextmanager
def using_backend(name: str):
    """set_backend(name) inside the block, the previous setting restored after it (even on error)."""
    previous = set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def use_triton(tensor) -> bool:
    """Whether an op on `tensor` runs the Triton kernel: on CUDA, unless the backend (get_backend) forces a path."""
    if _backend == "auto":
        return tensor.is_cuda
    return _backend == "triton"


def attention(q, k, v, *, window=None, cu_seqlens=None, lse=False, backend="auto", check_values=True):
    """Causal grouped-query attention with an optional Mistral sliding window and packed documents.
    q [B, T, Hq, D], k and v [B, T, Hkv, D] -> [B, T, Hq, D] (and the log-sum-exp [B, Hq, T] with `lse=True`).
    backend: "auto" (Triton on CUDA, reference elsewhere) or "xformers" (needs xformers and CUDA tensors).
    check_values=False skips reading cu_seqlens' offsets back to check them (a host sync on CUDA), for a caller
    that checked them already: the model does once per forward instead of once per layer."""
    check_attention(q, k, v, window, cu_seqlens, check_values)
    if backend == "xformers":
        if lse:
            raise ValueError("attention: lse=True is not available with backend='xformers'")
        return xformers_attention(q, k, v, window=window, cu_seqlens=cu_seqlens)
    if backend != "auto":
        raise ValueError(f"attention: backend must be 'auto' or 'xformers', got {backend!r}")
    if use_triton(q):
        return triton_attention(q, k, v, window=window, cu_seqlens=cu_seqlens, lse=lse)
    from cancerllm import cpu_attention   # here: cancerllm imports this package (also importable as `kernels`) first
    # On CPU each document's softmax runs in C++ between matmuls at the machine's rate (torch's CPU flash kernel is
    # several times slower); compiled, the reference's SDPA is traced instead of a call on data pointers.
    if not lse and cpu_attention.usable(q, 0) and not torch.compiler.is_compiling():
        return cpu_attention.by_document(q, k, v, window=window, cu_seqlens=cu_seqlens)
    return reference.attention(q, k, v, window=window, cu_seqlens=cu_seqlens, lse=lse)


def xformers_attention(q, k, v, *, window=None, cu_seqlens=None):
    """The same attention on xformers: all B*T tokens as one block-diagonal sequence (rows or packed documents),
    K/V heads broadcast to their group through the 5-D [1, B*T, Hkv, G, D] layout, so nothing is copied."""
    try:
        import xformers.ops as xops
        from xformers.ops.fmha import attn_bias
    except ImportError as e:
        raise RuntimeError("attention: backend='xformers' needs the xformers package") from e
    if not q.is_cuda:
        raise ValueError(f"attention: backend='xformers' needs CUDA tensors, q is on {q.device}")
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    offsets = cu_seqlens.tolist() if cu_seqlens is not None else list(range(0, B * T + 1, T))
    seqlens = [end - start for start, end in zip(offsets, offsets[1:]) if end > start]
    if window is None:
        bias = attn_bias.BlockDiagonalCausalMask.from_seqlens(seqlens)
    else:   # xformers' local mask: key j visible to query i iff i - window < j <= i, as Mistral's
        bias = attn_bias.BlockDiagonalCausalLocalAttentionMask.from_seqlens(seqlens, window_size=window)
    out = xops.memory_efficient_attention(
        q.reshape(1, B * T, Hkv, G, D),
        k.reshape(1, B * T, Hkv, 1, D).expand(1, B * T, Hkv, G, D),
        v.reshape(1, B * T, Hkv, 1, D).expand(1, B * T, Hkv, G, D),
        attn_bias=bias,
    )
    return out.reshape(B, T, Hq, D)


def rms_norm(x, weight, eps=1e-5, residual=None):
    """y = x / rms(x) * weight over the last axis; with `residual`, (norm(x + residual), x + residual).
    Triton on CUDA; on CPU one C++ pass each way (cancerllm/cpu_rms_norm.py) when the extension is built, the
    plain PyTorch reference otherwise (and under torch.compile, which fuses the reference's ops itself)."""
    check_rms_norm(x, weight, eps, residual)
    from cancerllm import cpu_rms_norm   # here: cancerllm imports this package first
    if use_triton(x):
        impl = triton_rms_norm
    elif not torch.compiler.is_compiling() and cpu_rms_norm.usable(x, weight):
        impl = cpu_rms_norm.rms_norm
    else:
        impl = reference.rms_norm
    return impl(x, weight, eps, residual=residual)


def swiglu(gate, up):
    """silu(gate) * up for the feed-forward, saving only gate and up for backward. On CPU one C++ pass each way
    (cancerllm/cpu_swiglu.py: torch's backward is ~10 passes over fp32 temporaries); elsewhere plain PyTorch
    elementwise ops, which on a GPU are memory-bound next to the matmuls around them."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate and up must share shape and dtype, got {tuple(gate.shape)} {gate.dtype} "
                         f"and {tuple(up.shape)} {up.dtype}")
    from cancerllm import cpu_swiglu   # here: cancerllm imports this package (also importable as `kernels`) first
    # Compiled, the reference's ops fuse into one loop anyway, and a call on data pointers would break the graph.
    if not torch.compiler.is_compiling() and cpu_swiglu.usable(gate):
        return cpu_swiglu.swiglu(gate, up)
    return reference.swiglu(gate, up)


def cross_entropy(logits, targets, *, ignore_index=IGNORE_INDEX, reduction="mean", z_loss=0.0, inplace_backward=False):
    """Token cross-entropy over logits [N, V] in fp32; reduction "mean" (over non-ignored targets), "sum" or
    "none"; `z_loss` adds z_loss * logsumexp(logits)^2 per token. All targets ignored: loss 0, gradient 0.
    inplace_backward=True (Triton path; the reference allocates its gradient as usual) writes the gradient over the
    logits instead of a new [N, V] tensor: the logits must not be used after the call, and a backward that saved
    them (e.g. exp's) raises instead of reading gradients."""
    check_cross_entropy(logits, targets, ignore_index, reduction, z_loss)
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"cross_entropy: inplace_backward must be a bool, got {inplace_backward!r}")
    if use_triton(logits):
        return triton_cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction, z_loss=z_loss,
                                    inplace_backward=inplace_backward)
    return reference.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction, z_loss=z_loss)


def linear_cross_entropy(hidden, weight, targets, *, ignore_index=IGNORE_INDEX, reduction="mean", chunk_size=512,
                         token_weights=None):
    """cross_entropy(hidden @ weight.T, targets) a chunk of `chunk_size` tokens at a time, never holding the
    [N, V] logits. hidden [N, D], weight [V, D], targets [N]; reduction "mean" or "sum".
    token_weights [N] (float, finite, >= 0) weighs each token's loss: "sum" = sum(w * loss) and "mean" =
    sum(w * loss) / sum(w) over the non-ignored tokens, as torch's class-weighted cross-entropy averages.
    512 tokens: a 64 MB fp32 chunk at a 32k vocabulary; 1024 made the `small` CPU step's peak ~0.15 GiB higher
    for a few percent of speed.
    Rows whose target is ignored are dropped before the matmul: in SFT the prompt tokens carry no loss, and their
    logits would be most of the output head's work. Triton on CUDA; on CPU (fp32 or bf16) the head's matmuls in the
    inputs' dtype around one C++ softmax pass (cancerllm/cpu_linear_cross_entropy.py), else the reference."""
    check_linear_cross_entropy(hidden, weight, targets, ignore_index, reduction, chunk_size, token_weights)
    rows = (targets != ignore_index).nonzero().squeeze(1)     # the wrapper's one host sync: nonzero's size
    if rows.numel() < targets.numel():
        hidden, targets = hidden.index_select(0, rows), targets.index_select(0, rows)
        if token_weights is not None:
            token_weights = token_weights.index_select(0, rows)
    from cancerllm import cpu_linear_cross_entropy   # here: cancerllm imports this package first
    if use_triton(hidden):
        impl = triton_linear_cross_entropy
    elif not torch.compiler.is_compiling() and cpu_linear_cross_entropy.usable(hidden, weight):
        impl = cpu_linear_cross_entropy.linear_cross_entropy
    else:
        impl = reference.linear_cross_entropy
    return impl(hidden, weight, targets, ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size,
                token_weights=token_weights)

"""Mistral and Llama, written by hand: token embedding, pre-norm blocks of grouped-query attention (Mistral's with a
sliding window, Llama's without) with rotary embeddings and a SwiGLU feed-forward, a final RMSNorm and an output
head, its own weight or the embedding's (`tie_word_embeddings`).

Module and parameter names follow Hugging Face's MistralForCausalLM and LlamaForCausalLM (the same names), less
their `model.` prefix, so checkpoints map one to one. Attention, RMSNorm and the loss go through
`cancerllm.kernels`. `fuse_for_decoding` (at the end) makes the form the Generator decodes with: the same forward,
with fused matmuls on weights laid out once.
"""
import math
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import arena, cpu_rope, decode_rms_norm, gemv, kernels
from .decode_layer import BlockStep
from .decode_rms_norm import RowNorm
from .kernels.reference import IGNORE_INDEX, compute_dtype
from .kernels.validate import check_cu_seqlens, check_cu_seqlens_values


# The rotary tables are precomputed for max_seq_len positions; 1 GiB holds 2M positions at head_dim 128 (Mistral
# Nemo's 1,024,000 included) and refuses a config.json whose max_position_embeddings is a sentinel like 2**31 - 1.
MAX_ROPE_TABLE_BYTES = 2**30
FIELD_TYPES = {int: (int,), float: (int, float), str: (str,), bool: (bool,), Optional[int]: (int, type(None)),
               Optional[dict]: (dict, type(None))}
# Rotary scalings (Hugging Face's rope_type names) and the fields each takes; each rescales the rotary frequencies
# once (rope_frequencies), so every forward and decode path sees them through the model's cos/sin tables. "dynamic",
# "yarn" and "longrope" change with the sequence length or scale the attention: not represented.
ROPE_SCALING_FIELDS = {"linear": {"factor": float},
                       "llama3": {"factor": float, "low_freq_factor": float, "high_freq_factor": float,
                                  "original_max_position_embeddings": int}}
# The Hugging Face architecture a model is saved as (config.json's model_type); Llama is Mistral without the window.
FAMILIES = ("mistral", "llama")


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: int = 128
    hidden_dim: int = 14336
    vocab_size: int = 32000
    sliding_window: Optional[int] = 4096      # None: full causal attention
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    max_seq_len: int = 32768                  # length of the precomputed rotary table
    attn_backend: str = "auto"                # "auto" (kernels' dispatch) or "xformers" on CUDA
    tie_word_embeddings: bool = False         # the output head's weight is the embedding's (one tensor)
    family: str = "mistral"                   # "mistral" or "llama": what save_pretrained writes as model_type
    rope_scaling: Optional[dict] = None       # None, {"rope_type": "linear", "factor"} or Llama 3.1's "llama3"

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelArgs":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return cls(**{**PRESETS[name], **overrides})

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, FIELD_TYPES[f.type]) or (isinstance(value, bool) and f.type is not bool):
                raise TypeError(f"ModelArgs.{f.name} must be {f.type}, got {value!r}")
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "vocab_size",
                     "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelArgs.{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"ModelArgs.n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"ModelArgs.head_dim={self.head_dim} must be even for rotary embeddings")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"ModelArgs.sliding_window must be positive or None, got {self.sliding_window}")
        if self.family not in FAMILIES:
            raise ValueError(f"ModelArgs.family must be one of {', '.join(FAMILIES)}, got {self.family!r}")
        if self.family == "llama" and self.sliding_window is not None:
            raise ValueError(f"ModelArgs.sliding_window={self.sliding_window}: Llama attends without a window (set "
                             "sliding_window=None, or family='mistral' for a windowed model)")
        if self.attn_backend not in ("auto", "xformers"):
            raise ValueError(f"ModelArgs.attn_backend must be 'auto' or 'xformers', got {self.attn_backend!r}")
        for name in ("rope_theta", "norm_eps"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"ModelArgs.{name} must be a positive finite number, got {getattr(self, name)}")
        if self.rope_scaling is not None:
            self.rope_scaling = checked_rope_scaling(self.rope_scaling)
        table_bytes = 2 * self.max_seq_len * self.head_dim // 2 * 4          # cos and sin, fp32
        if table_bytes > MAX_ROPE_TABLE_BYTES:
            raise ValueError(f"ModelArgs.max_seq_len={self.max_seq_len}: its rotary tables would take "
                             f"{table_bytes / 2**30:.1f} GiB (at most {MAX_ROPE_TABLE_BYTES // 2**30} GiB, "
                             f"{MAX_ROPE_TABLE_BYTES // (4 * self.head_dim):,} positions at head_dim={self.head_dim})")

    def to_dict(self) -> dict:
        return asdict(self)

    def num_params(self, embedding: bool = True) -> int:
        """Distinct parameters; without `embedding`, those that multiply (the output head counts even when it is
        the embedding's tensor: it is a matmul's weight)."""
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        block = attn + 3 * self.dim * self.hidden_dim + 2 * self.dim
        n = self.n_layers * block + self.dim + self.vocab_size * self.dim    # + final norm, output head
        return n + self.vocab_size * self.dim if embedding and not self.tie_word_embeddings else n

    def block_linear_shapes(self) -> list[tuple[int, int]]:
        """(in_features, out_features) of one block's linears: q, k, v, o, gate, up, down."""
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        return [(self.dim, q), (self.dim, kv), (self.dim, kv), (q, self.dim), (self.dim, self.hidden_dim),
                (self.dim, self.hidden_dim), (self.hidden_dim, self.dim)]

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, PaLM convention: 6N for the weights (N without the embedding lookup) plus
        12·L·H·d·T_eff for attention, T_eff being the mean number of keys a query sees (causal, windowed)."""
        w = min(self.sliding_window or seq_len, seq_len)
        t_eff = (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len
        return 6 * self.num_params(embedding=False) + 12 * self.n_layers * self.n_heads * self.head_dim * t_eff


PRESETS = {
    # Mistral-7B-v0.1, exactly.
    "mistral-7b": dict(),
    # CPU sizes: ~1M parameters for tests; ~34M for CPU benchmarks (most of it the 32k-vocabulary embeddings),
    # which the CPU demo narrows to 7M (configs/cpu-small.toml).
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=176, vocab_size=8192,
                 sliding_window=32, max_seq_len=512),
    "small": dict(dim=384, n_layers=6, n_heads=6, n_kv_heads=2, head_dim=64, hidden_dim=1024, vocab_size=32000,
                  sliding_window=512, max_seq_len=2048),
    # A 1B-class shape for single-GPU benchmarks.
    "1b": dict(dim=2048, n_layers=16, n_heads=16, n_kv_heads=4, head_dim=128, hidden_dim=7168),
    # SmolLM2-135M's shape (a Llama with tied embeddings), random init, for benchmarks.
    "smollm2-135m": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, hidden_dim=1536,
                         vocab_size=49152, sliding_window=None, rope_theta=100000.0, norm_eps=1e-5, max_seq_len=8192,
                         tie_word_embeddings=True, family="llama"),
}


# ---------------------------------------------------------------------------------------------- rotary

def checked_rope_scaling(scaling: dict) -> dict:
    """ModelArgs.rope_scaling with exactly its type's fields, numbers as floats ("type" is transformers v4's older
    name of "rope_type"); a ValueError names the field at fault."""
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in ROPE_SCALING_FIELDS:
        raise ValueError(f"ModelArgs.rope_scaling: rope_type {kind!r} is not supported (supported: "
                         f"{', '.join(ROPE_SCALING_FIELDS)}; without scaling, None)")
    extra = set(scaling) - set(ROPE_SCALING_FIELDS[kind]) - {"rope_type", "type"}
    if extra:
        raise ValueError(f"ModelArgs.rope_scaling: {', '.join(sorted(extra))} is not a field of {kind!r} scaling")
    checked = {"rope_type": kind}
    for name, kind_of in ROPE_SCALING_FIELDS[kind].items():
        value = scaling.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind_of is float else int) \
                or not 0 < value < math.inf:
            raise ValueError(f"ModelArgs.rope_scaling: {kind} scaling needs {name}, a positive "
                             f"{'number' if kind_of is float else 'integer'}; got {value!r}")
        checked[name] = kind_of(value)
    if kind == "llama3" and checked["high_freq_factor"] <= checked["low_freq_factor"]:
        raise ValueError(f"ModelArgs.rope_scaling: high_freq_factor={checked['high_freq_factor']} must exceed "
                         f"low_freq_factor={checked['low_freq_factor']}")
    return checked


def rope_frequencies(head_dim: int, theta: float, scaling: dict = None, device=None) -> torch.Tensor:
    """The rotary inverse frequencies, [head_dim / 2] fp32, rescaled as `scaling` says. linear: every frequency
    divided by the factor (positions compressed). llama3 (Llama 3.1): frequencies whose wavelength exceeds the
    original context / low_freq_factor divided by the factor, those shorter than original context /
    high_freq_factor kept, those between blended linearly in original context / wavelength."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).float() / head_dim)
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    context, low, high = (scaling[k] for k in ("original_max_position_embeddings", "low_freq_factor",
                                                "high_freq_factor"))
    wavelength = 2 * math.pi / inv_freq
    blend = (context / wavelength - low) / (high - low)      # 0 at the long end of the band, 1 at the short end
    return torch.where(wavelength > context / low, inv_freq / factor,
                       torch.where(wavelength < context / high, inv_freq,
                                   (1 - blend) * inv_freq / factor + blend * inv_freq))


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device=None, scaling: dict = None):
    """cos and sin of position * inv_freq, [max_seq_len, head_dim / 2] in fp32, indexed by position so that
    packed documents can restart at 0; `scaling`: ModelArgs.rope_scaling."""
    inv_freq = rope_frequencies(head_dim, theta, scaling, device)
    angles = torch.arange(max_seq_len, device=device, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


class Rotary(torch.autograd.Function):
    """Rotary embedding that saves nothing but the cos/sin it was given (shared by every layer): its backward
    is the inverse rotation of the incoming gradient."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rotate(x, cos, sin, sign=1.0)

    @staticmethod
    def backward(ctx, grad_out):
        cos, sin = ctx.saved_tensors
        return rotate(grad_out, cos, sin, sign=-1.0), None, None


def rotate(x, cos, sin, sign: float):
    """Rotate the halves (x1, x2) of each head by sign * angle: (x1 cos - sign x2 sin, x2 cos + sign x1 sin),
    in fp32 (float64 stays float64); on CPU in one C++ pass (cancerllm/cpu_rope.py) when the extension has it."""
    if not torch.compiler.is_compiling() and cpu_rope.usable(x, cos):
        return cpu_rope.rotate(x, cos, sin, sign)
    return reference_rotate(x, cos, sin, sign)


def reference_rotate(x, cos, sin, sign: float):
    """rotate() in PyTorch ops: the path on GPU and under torch.compile, and what the C++ kernel is tested against."""
    dt = compute_dtype(x.dtype)
    x1, x2 = x.to(dt).chunk(2, dim=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    if torch.compiler.is_compiling():   # Dynamo cannot trace `out=` into a view; compiled, the products fuse anyway
        return torch.cat((x1 * cos - sign * x2 * sin, x2 * cos + sign * x1 * sin), dim=-1).to(x.dtype)
    out = torch.empty(x.shape, dtype=dt, device=x.device)
    out1, out2 = out.chunk(2, dim=-1)
    torch.mul(x1, cos, out=out1).addcmul_(x2, sin, value=-sign)
    torch.mul(x2, cos, out=out2).addcmul_(x1, sin, value=sign)
    return out.to(x.dtype)


def apply_rope(x, cos, sin):
    """Rotate the halves of each head (Hugging Face's layout): x [B, T, H, D], cos/sin [B, T, D/2]."""
    return Rotary.apply(x, cos, sin)


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
    """Positions [B, T] that restart at 0 at each document start."""
    from .kernels.reference import document_ids
    idx = torch.arange(batch * seq_len, device=cu_seqlens.device)
    starts = cu_seqlens.to(torch.int64)[document_ids(cu_seqlens, batch * seq_len)]
    return (idx - starts).view(batch, seq_len)


# ---------------------------------------------------------------------------------------------- layers

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x, residual=None):
        return kernels.rms_norm(x, self.weight, self.eps, residual=residual)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.window = args.sliding_window
        self.backend = args.attn_backend
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, cu_seqlens=None, cache=None):
        B, T, _ = x.shape
        q = apply_rope(self.q_proj(x).view(B, T, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if cache is not None:   # incremental decoding: the cache stores k, v and attends over what it holds
            out = cache.attend(self.layer_id, q, k, v)
        else:
            # Transformer.check_inputs read and checked cu_seqlens once for every layer.
            out = kernels.attention(q, k, v, window=self.window, cu_seqlens=cu_seqlens, backend=self.backend,
                                    check_values=False)
        return self.o_proj(out.reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.up_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.down_proj = nn.Linear(args.hidden_dim, args.dim, bias=False)

    def forward(self, x):
        return self.down_proj(kernels.swiglu(self.gate_proj(x), self.up_proj(x)))


class Block(nn.Module):
    # FusedBlock (below) is this block in decoding form, on the same norms, rotary embedding and cache attention:
    # a change to this forward needs its twin there (tests/test_decode_form.py compares them for every option).
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args, layer_id)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = FeedForward(args)

    def forward(self, x, cos, sin, cu_seqlens=None, cache=None):
        attn = self.self_attn(self.input_layernorm(x), cos, sin, cu_seqlens, cache)
        normed, h = self.post_attention_layernorm(attn, residual=x)   # h = x + attn, fused with the norm
        return h + self.mlp(normed)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.tie_weights()
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.init_rope()
        self.init_weights()

    def init_rope(self):
        """(Re)build the rotary tables, e.g. after the model was created on the meta device."""
        device = self.embed_tokens.weight.device
        device = None if device.type == "meta" else device
        self.rope_cos, self.rope_sin = rope_tables(self.args.head_dim, self.args.max_seq_len, self.args.rope_theta,
                                                   device=device, scaling=self.args.rope_scaling)

    def tie_weights(self):
        """Tied embeddings: make the output head's weight the embedding's own Parameter, so that parameters(), the
        optimizer, FSDP2 and the gradients see one tensor under two names."""
        self.lm_head.weight = self.embed_tokens.weight

    def _apply(self, fn, recurse=True):
        # nn.Module._apply converts each module's parameters separately and, when it cannot convert in place
        # (to_empty from the meta device), gives each module a new Parameter: the two names would part.
        module = super()._apply(fn, recurse)
        if self.args.tie_word_embeddings:
            self.tie_weights()
        return module

    @torch.no_grad()
    def init_weights(self, std: float = 0.02):
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)

    def forward(self, tokens, positions=None, cu_seqlens=None, cache=None, targets=None, ignore_index=IGNORE_INDEX,
                last_only=False, target_weights=None):
        """tokens [B, T] (int) -> logits [B, T, vocab]; with `targets` [B, T], the mean cross-entropy over
        non-ignored targets instead, computed without materialising the logits; with `target_weights` [B, T] too,
        their weighted mean sum(w * loss) / sum(w) (kernels.linear_cross_entropy's token_weights).

        positions [B, T] default to 0..T-1, or restart at each document start when `cu_seqlens` (int32, [n+1],
        offsets over the flattened B*T tokens) marks packed documents, which then never attend to each other.
        With a `cache` (cancerllm/cache.py, prepared by `cache.begin`) the tokens are new positions of the cached
        sequences: attention reads and extends the cache. `last_only` returns the logits of the last position only,
        [B, 1, vocab] (generation: every prefill chunk and decode step needs just the next token's).
        """
        B, T = self.check_inputs(tokens, positions, cu_seqlens, targets, cache)
        if positions is None:
            positions = (positions_from_cu_seqlens(cu_seqlens, B, T) if cu_seqlens is not None
                         else torch.arange(T, device=tokens.device).expand(B, T))
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        h = self.embed_tokens(tokens)
        for layer in self.layers:
            h = layer(h, cos, sin, cu_seqlens, cache)
        h = self.norm(h[:, -1:] if last_only else h)
        if targets is not None:
            weights = None if target_weights is None else target_weights.reshape(B * T)
            return kernels.linear_cross_entropy(h.reshape(B * T, -1), self.lm_head.weight, targets.reshape(B * T),
                                                ignore_index=ignore_index, token_weights=weights)
        return self.lm_head(h)

    def check_inputs(self, tokens, positions, cu_seqlens, targets, cache=None):
        """Shapes and dtypes, then the values that would index out of range (tokens, positions, cu_seqlens' offsets
        and document lengths) in one host read: the only device sync of a forward's checks, whatever the number of
        layers. A decode step (`cache`) skips the read: the generator bounds its tokens and positions per request."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
            raise ValueError(f"tokens must be a 2-D [batch, seq] tensor, got "
                             f"{tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__}")
        if tokens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"tokens must be int32 or int64, got {tokens.dtype}")
        B, T = tokens.shape
        if positions is not None and positions.shape != (B, T):
            raise ValueError(f"positions must have the tokens' shape {(B, T)}, got {tuple(positions.shape)}")
        if positions is None and cu_seqlens is None and T > self.args.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={self.args.max_seq_len}")
        if targets is not None and targets.shape != (B, T):
            raise ValueError(f"targets must have the tokens' shape {(B, T)}, got {tuple(targets.shape)}")
        if cu_seqlens is not None:
            check_cu_seqlens("Transformer", cu_seqlens, B, T, tokens.device, check_values=False)
        if cache is None and tokens.numel():
            self.check_index_values(tokens, positions, cu_seqlens)
        return B, T

    def check_index_values(self, tokens, positions, cu_seqlens):
        """Token ids, positions and document offsets index tables (embeddings, rotary, documents): read their
        ranges and the offsets to the host together, in one sync, and refuse what would index out of range."""
        ranges = [tokens] if positions is None else [tokens, positions]
        read = [torch.stack(torch.aminmax(t)).long() for t in ranges]
        values = torch.cat(read + ([] if cu_seqlens is None else [cu_seqlens.long()])).tolist()
        (low, high), values = values[:2], values[2:]
        if low < 0 or high >= self.args.vocab_size:
            raise ValueError(f"tokens must be in [0, vocab_size={self.args.vocab_size}), got values in [{low}, {high}]")
        if positions is not None:
            (low, high), values = values[:2], values[2:]
            if low < 0 or high >= self.args.max_seq_len:
                raise ValueError(f"positions must be in [0, max_seq_len={self.args.max_seq_len}), got values in "
                                 f"[{low}, {high}]")
        if cu_seqlens is not None:
            check_cu_seqlens_values("Transformer", values, *tokens.shape)
            longest = max(b - a for a, b in zip(values, values[1:]))
            if positions is None and longest > self.args.max_seq_len:
                raise ValueError(f"cu_seqlens holds a document of {longest} tokens, longer than max_seq_len="
                                 f"{self.args.max_seq_len}")

    @classmethod
    def from_pretrained(cls, path, *, device="cpu", dtype=None) -> "Transformer":
        from .checkpoint import load_pretrained
        return load_pretrained(path, device=device, dtype=dtype)

    def save_pretrained(self, path, *, tokenizer=None, max_shard_size="5GB", dtype=None):
        from .checkpoint import save_pretrained
        save_pretrained(self, path, tokenizer=tokenizer, max_shard_size=max_shard_size, dtype=dtype)


# ---------------------------------------------------------------------------------------------- decoding form

PACK_BATCH = 8   # the batch size oneDNN lays the weights out for; measured best at batch 1 and 8 alike
# How a DecodeLinear multiplies:
#   "onednn": oneDNN with the weight prepacked in its blocked layout, epilogues as post-ops (fp32, bf16 on CPU)
#   "aten":   F.linear on the weight as given
#   "int8":   int8 weight-only: the weight rounded per output row to int8 times a bf16 scale (symmetric), multiplied
#             by torch's _weight_int8pack_mm on bf16 activations (fp32 sums), whatever the model's dtype: its fp32
#             kernel ran 10-100x slower than its bf16 one on an AVX512-BF16 CPU (docs/experiments.md); a quarter of
#             fp32's bytes
#   "int8-bf16": the same int8 weight and scales, multiplied by widening the weight to bf16 (exactly) for each call
#             and running a bf16 GEMM, the scales applied to its bf16 result: for prefill-sized inputs, where that
#             ran 1.6-2.9x faster than _weight_int8pack_mm here (one more rounding to bf16: ~3e-3 relative)
# In front of any of them, for inputs of at most `gemv_rows` rows (decoding's batches; 0: never), our small-M
# kernel (cancerllm/gemv.py) on the same weight in its [out, in] layout (fp32, bf16 or int8), where it runs faster;
# with `decode_steps`, also for every input of one position per row (a decode step's, whatever its batch), which
# batch-invariant decoding needs: a row's sums in that kernel do not depend on how many rows share the call.
PATHS = ("onednn", "aten", "int8", "int8-bf16")
INT8_PATHS = ("int8", "int8-bf16")
QUANTIZE = (None, "int8")
INT8_BLOCK = 16  # _weight_int8pack_mm's CPU kernel reads bf16 inputs 16 at a time: other widths crash or err


def onednn_usable(weight: torch.Tensor) -> bool:
    """Whether oneDNN's fused linears can run on this weight: fp32 or bf16 on CPU."""
    return (weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def gemv_usable(weight: torch.Tensor, quantize) -> bool:
    """Whether our small-M kernel can multiply this weight: on CPU, fp32 or bf16 weights, or int8 ones."""
    return (weight.device.type == "cpu" and gemv.available()
            and (quantize == "int8" or weight.dtype in (torch.float32, torch.bfloat16)))


def check_quantize(quantize, weight: torch.Tensor, name: str) -> None:
    """ValueError naming what stops `quantize` on this weight (`name` says which); None when it can run."""
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {', '.join(map(repr, QUANTIZE))}, got {quantize!r}")
    if quantize is None:
        return
    if weight.device.type != "cpu":
        raise ValueError(f"quantize='int8' runs on CPU only (torch's _weight_int8pack_mm), the model is on "
                         f"{weight.device}")
    if weight.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"quantize='int8' runs fp32 or bf16 models, this one is {weight.dtype}")
    if weight.shape[1] % INT8_BLOCK:
        raise ValueError(f"quantize='int8' needs every matmul's input width to be a multiple of {INT8_BLOCK} "
                         f"(torch's int8 kernel reads {INT8_BLOCK} at a time), but {name} takes {weight.shape[1]}")


def quantize_int8(weight: torch.Tensor):
    """(int8 [out, in], bf16 scales [out]): each row divided by its largest magnitude / 127 and rounded. The scale
    is rounded to bf16 first, so int8 * scale is the nearest the kernel can represent."""
    w = weight.float()
    scales = (w.abs().amax(dim=1) / 127).clamp_(min=torch.finfo(torch.bfloat16).tiny).to(torch.bfloat16)
    q = torch.round(w / scales.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The weight an int8 DecodeLinear multiplies by, in fp32: what its results are tested against."""
    return q.float() * scales.float()[:, None]


class DecodeLinear(nn.Module):
    """x @ weight.T for inference on one of PATHS, with the epilogues decoding fuses into the matmul. "onednn"
    reorders the weight once into oneDNN's blocked layout (a copy) and calls oneDNN directly, the epilogue as a
    post-op; "aten" keeps the weight given (no copy) and runs the epilogue as a second op; "int8" keeps an int8
    copy and its scales. With `gemv_rows`, inputs of that many rows or fewer go to our small-M kernel on the weight
    in its [out, in] layout (the int8 copy, or the weight as given: for "onednn" a reference kept beside its
    copy), the epilogue as a second op; with `decode_steps`, so do inputs [B, 1, in] of any B (decode steps)."""

    def __init__(self, weight: torch.Tensor, path: str, gemv_rows: int = 0, decode_steps: bool = False):
        super().__init__()
        if path not in PATHS:
            raise ValueError(f"DecodeLinear path must be one of {', '.join(PATHS)}, got {path!r}")
        rows_kernel = bool(gemv_rows or decode_steps)
        if rows_kernel and not gemv_usable(weight, "int8" if path in INT8_PATHS else None):
            raise ValueError(f"DecodeLinear gemv_rows={gemv_rows}, decode_steps={decode_steps} needs a CPU weight "
                             "(fp32 or bf16 unless quantized) and cancerllm._C built with its kernels, got "
                             f"{weight.dtype} on {weight.device}")
        self.path, self.scales, self.gemv_rows, self.decode_steps = path, None, gemv_rows, decode_steps
        weight = weight.detach()
        if path == "onednn":
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH)
        elif path in INT8_PATHS:
            self.weight, self.scales = quantize_int8(weight)
        else:
            self.weight = weight
        # Our kernel reads the weight in its [out, in] layout: the int8 copy, or the weight as given (beside
        # oneDNN's copy for "onednn"), held only where the kernel runs.
        self.rows_weight = (self.weight if path in INT8_PATHS else weight) if rows_kernel else None
        self.rows_matmul = gemv.Multiplier(self.rows_weight, self.scales) if rows_kernel else None

    def streamed(self) -> list:
        """The tensors a decode step reads from memory for this matmul in their plain layout: the int8 weight and
        its scales, F.linear's weight, or the weight our kernel reads beside oneDNN's copy (none without it)."""
        if self.path in INT8_PATHS:
            return [self.weight, self.scales]
        if self.path == "aten":
            return [self.weight]
        return [self.rows_weight] if self.rows_matmul is not None else []

    def adopt(self, tensors: list) -> None:
        """Read copies of the streamed() tensors (equal values, in the same order) from now on."""
        if self.path in INT8_PATHS:
            self.weight, self.scales = tensors
        elif self.path == "aten":
            (self.weight,) = tensors
        if self.rows_matmul is not None:
            self.rows_weight = tensors[0]
            self.rows_matmul = gemv.Multiplier(self.rows_weight, self.scales)

    def small(self, x) -> bool:
        """Whether `x` goes to our small-M kernel."""
        return x.numel() <= self.gemv_rows * x.shape[-1] or (self.decode_steps and x.dim() == 3 and x.shape[1] == 1)

    def forward(self, x):
        if self.small(x):
            return self.rows_matmul(x.contiguous())
        rows = x.reshape(-1, x.shape[-1])
        if self.path == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, None, "none", [], "")
        if self.path == "int8":
            y = torch.ops.aten._weight_int8pack_mm(rows.to(torch.bfloat16), self.weight, self.scales)
            return y.to(x.dtype).view(*x.shape[:-1], -1)
        if self.path == "int8-bf16":   # |q| <= 127: widening to bf16 is exact
            y = F.linear(rows.to(torch.bfloat16), self.weight.to(torch.bfloat16)).mul_(self.scales)
            return y.to(x.dtype).view(*x.shape[:-1], -1)
        return F.linear(x, self.weight)

    def plus(self, x, residual):
        """residual + x @ weight.T"""
        if self.path == "onednn" and not self.small(x):
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.weight, None, "add")
        if self.path == "aten" and not self.small(x):
            return torch.addmm(residual.flatten(0, -2), x.flatten(0, -2), self.weight.t()).view(residual.shape)
        return self.forward(x).add_(residual)

    def silu(self, x):
        """silu(x @ weight.T)"""
        if self.path == "onednn" and not self.small(x):
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, None, "swish", [], "")
        return F.silu(self.forward(x))

    def times(self, x, other):
        """other * (x @ weight.T); overwrites `other` where no post-op does it"""
        if self.path == "onednn" and not self.small(x):
            return torch.ops.mkldnn._linear_pointwise.binary(x, other, self.weight, None, "mul")
        return other.mul_(self.forward(x))


def linear_path(weight: torch.Tensor, name: str, onednn, quantize) -> tuple:
    """(path, gemv_rows) of the DecodeLinear for `weight`. The path: when quantized, whichever of the int8 paths
    this machine runs faster at prefill sizes; otherwise oneDNN (onednn=True, where usable), F.linear (False), or
    (None) whichever this machine runs faster for this shape (at prefill sizes where our kernel takes the decoding
    batches, else at decoding's). With onednn=None or quantized, gemv_rows: up to how many rows our small-M kernel
    runs faster than that path here (decode_paths.py, all measured and cached)."""
    from .decode_paths import CALIBRATION_ROWS, PREFILL_ROWS, choose, choose_gemv_rows
    check_quantize(quantize, weight, name)
    if quantize == "int8":
        path = choose(weight, INT8_PATHS, DecodeLinear, rows=PREFILL_ROWS)
    elif not onednn_usable(weight) or onednn is False:
        return "aten", 0
    elif onednn is True:
        return "onednn", 0
    else:   # where our kernel takes the decoding batches, the library path runs the prefill chunks: timed on one
        rows = PREFILL_ROWS if gemv_usable(weight, quantize) else CALIBRATION_ROWS
        path = choose(weight, ("onednn", "aten"), DecodeLinear, rows=rows)
    return path, choose_gemv_rows(weight, path, DecodeLinear) if gemv_usable(weight, quantize) else 0


class DecodeRMSNorm(nn.Module):
    """An RMSNorm's weight and eps for decoding, the maths of kernels.rms_norm in fewer ops (at decode sizes per-op
    overhead dominates): on CPU in fp32 or bf16 our one-call kernel (decode_rms_norm.py), elsewhere torch's
    F.rms_norm (bit for bit kernels.reference.rms_norm's; tests/test_decode_form.py compares them)."""

    def __init__(self, norm: RMSNorm):
        super().__init__()
        self.weight, self.eps = norm.weight.detach(), norm.eps
        self.row_norm = RowNorm(self.weight, self.eps) if decode_rms_norm.usable(self.weight) else None

    def forward(self, x):
        if self.row_norm is not None and decode_rms_norm.usable(x):
            return self.row_norm(x)
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class FusedBlock(nn.Module):
    """A Block in decoding form: its norms' weights, the rotary embedding and the cache attention of Attention's
    cache path, with the matmuls fused: q, k and v projected by one matmul, SwiGLU by the gate and up matmuls, and
    each residual addition by the matmul that produces it (o, down). Block.forward's maths with a cache, in fewer
    ops."""

    def __init__(self, block: Block, linear):
        super().__init__()
        attn, mlp = block.self_attn, block.mlp
        self.input_layernorm = DecodeRMSNorm(block.input_layernorm)
        self.post_attention_layernorm = DecodeRMSNorm(block.post_attention_layernorm)
        self.layer_id, self.n_heads, self.n_kv_heads, self.head_dim = (attn.layer_id, attn.n_heads, attn.n_kv_heads,
                                                                       attn.head_dim)
        qkv = arena.concat_rows([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        self.qkv_proj, self.o_proj = linear(qkv, "qkv_proj"), linear(attn.o_proj.weight, "o_proj")
        self.gate_proj, self.up_proj, self.down_proj = (linear(m.weight, name) for m, name in (
            (mlp.gate_proj, "gate_proj"), (mlp.up_proj, "up_proj"), (mlp.down_proj, "down_proj")))
        self.step = None   # the whole block of a decode step in one call (decode_layer.py); set by fuse_for_decoding

    def linears(self) -> list:
        """The block's DecodeLinears in the order forward() runs them."""
        return [self.qkv_proj, self.o_proj, self.gate_proj, self.up_proj, self.down_proj]

    def forward(self, x, cos, sin, cu_seqlens, cache):
        if cache is None:
            raise ValueError("a model in decoding form (fuse_for_decoding) runs only with a cache")
        B, T, _ = x.shape
        if T == 1 and cache.step_kernel and self.step is not None and B <= self.step.rows:
            return self.step(x, cos, sin, cache)
        Hq, Hkv = self.n_heads, self.n_kv_heads
        qkv = self.qkv_proj(self.input_layernorm(x)).view(B, T, Hq + 2 * Hkv, self.head_dim)
        if T == 1 and cache.step_kernel:   # a decode step: rotation, store and attention in one C++ call
            out = cache.attend_step(self.layer_id, qkv, cos, sin)
        else:
            qk = rotate(qkv[:, :, :Hq + Hkv], cos, sin, sign=1.0)   # apply_rope's rotation, q and k in one pass
            out = cache.attend(self.layer_id, qk[:, :, :Hq], qk[:, :, Hq:], qkv[:, :, Hq + Hkv:])
        h = self.o_proj.plus(out.reshape(B, T, -1), residual=x)
        normed = self.post_attention_layernorm(h)
        return self.down_proj.plus(self.up_proj.times(normed, self.gate_proj.silu(normed)), residual=h)


def batch_invariance_blocker(model: Transformer, quantize=None) -> Optional[str]:
    """Why the model's decode steps cannot all run on kernels whose per-row results do not depend on the batch
    (our row kernels: gemv, the decode-step block and its attention and norms, on CPU), or None when they can."""
    from . import decode_attention, decode_layer
    weight = model.lm_head.weight
    if not gemv_usable(weight, quantize) or not decode_attention.usable(weight):
        return (f"its {weight.dtype} weights on {weight.device} (the row kernels run fp32 or bf16 weights, or int8 "
                "ones, on CPU, with cancerllm._C built)")
    if not (decode_layer.available() and decode_rms_norm.usable(weight)):
        return "cancerllm._C lacks the decode-step kernels (rebuild it: csrc/README.md)"
    return None


@torch.no_grad()
def fuse_for_decoding(model: Transformer, *, onednn=True, quantize=None, batch_invariant=False) -> Transformer:
    """The model in decoding form, made once per set of weights: a Transformer of the same args and forward (which
    needs a cache) whose embedding and rotary tables are the model's own and whose blocks, norms and output head
    run on weights laid out for generation (FusedBlock, DecodeRMSNorm, DecodeLinear). Each matmul's path (PATHS,
    linear_path): with quantize="int8" an int8 copy of every matmul weight; otherwise oneDNN's blocked layout (a
    copy; onednn=True, on fp32 or bf16 CPU weights), F.linear (onednn=False), or (onednn=None) per weight shape
    whichever this machine runs faster; with onednn=None or quantized, our small-M kernel in front for the decoding
    batches where it runs faster (fp32, bf16 and int8 weights), and then each block of a decode step in one C++ call
    (BlockStep). On CPU the weights a step streams lie in one allocation in reading order (pack_streamed: the
    model's own when pack_weights packed it, else copies). A snapshot: the model's weights replaced or changed later
    are not seen; the Generator rebuilds it when they change.

    batch_invariant: every decode step, of any batch size, on our row kernels (not on whichever path measured
    faster at that size), so that a row's logits do not depend on the rows decoded beside it; prefill keeps its
    paths (each prompt is prefilled on its own). ValueError where those kernels cannot run
    (batch_invariance_blocker)."""
    blocker = batch_invariant and batch_invariance_blocker(model, quantize)
    if blocker:
        raise ValueError(f"batch-invariant decoding cannot run this model: {blocker}")
    paths = {}   # weight shape -> (path, gemv_rows): equal shapes run alike, each checked or measured once

    def linear(weight, name):
        shape = tuple(weight.shape)
        if shape not in paths:
            paths[shape] = linear_path(weight, name, onednn, quantize)
        return DecodeLinear(weight, *paths[shape], decode_steps=batch_invariant)

    with torch.device("meta"):
        fused = Transformer(model.args)
    fused.embed_tokens, fused.norm = model.embed_tokens, DecodeRMSNorm(model.norm)
    fused.rope_cos, fused.rope_sin = model.rope_cos, model.rope_sin
    fused.layers = nn.ModuleList(FusedBlock(block, linear) for block in model.layers)
    fused.lm_head = linear(model.lm_head.weight, "lm_head")
    pack_streamed([m for block in fused.layers for m in block.linears()] + [fused.lm_head])
    for block in fused.layers:   # after packing: a BlockStep holds the addresses of the weights it reads
        block.step = BlockStep(block) if BlockStep.possible(block) else None
    return fused.eval()


def pack_streamed(linears: list) -> None:
    """Give the DecodeLinears, listed in the order a step runs them, copies of their streamed() tensors in one
    allocation in that order (arena.py: a step then reads one long stream, on huge pages where the OS has them),
    unless they already lie in one allocation in that order (a model packed by pack_weights: no copy). CPU only."""
    tensors = [t for linear in linears for t in linear.streamed()]
    if not tensors or tensors[0].device.type != "cpu" or arena.in_order(tensors):
        return
    copies = iter(arena.pack(tensors))
    for linear in linears:
        linear.adopt([next(copies) for _ in linear.streamed()])


@torch.no_grad()
def pack_weights(model: Transformer) -> None:
    """Move a CPU model's matmul weights into one allocation, in the order a forward pass reads them (each block's
    q, k, v, o, gate, up, down, then the output head, the embedding when tied): the same values, read faster by
    decoding (arena.py), whose q/k/v fusion then is a view rather than a copy. The Generator does it for the models
    it loads; a model it is handed is left alone (its decoding form packs copies instead)."""
    if model.lm_head.weight.device.type != "cpu":
        return
    params = [proj.weight for block in model.layers for proj in (
        block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj, block.self_attn.o_proj,
        block.mlp.gate_proj, block.mlp.up_proj, block.mlp.down_proj)] + [model.lm_head.weight]
    for param, view in zip(params, arena.pack([p.detach() for p in params])):
        param.data = view

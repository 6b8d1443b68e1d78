"""Input checks shared by every op and by both paths (Triton and reference): one place, one wording.

Each error names the op and the argument at fault. The Triton-only limits (storage dtypes, head dims) live here
too, so the kernels' files hold kernels and nothing else.
"""
import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor(op, name, t, *, dim=None, dtypes=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{op}: {name} must be {dim}-D, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must have dtype {names}; got {t.dtype}")


def check_same(op, attr, **tensors):
    """All tensors share `attr` ("device" or "dtype")."""
    values = {name: getattr(t, attr) for name, t in tensors.items()}
    if len(set(values.values())) > 1:
        got = ", ".join(f"{name}={value}" for name, value in values.items())
        raise ValueError(f"{op}: {', '.join(values)} must share one {attr}, got {got}")


def check_triton_dtype(op, name, t):
    check_tensor(op, name, t, dtypes=TRITON_DTYPES)


# ---------------------------------------------------------------------------------------------- attention

def check_window(op, window):
    if window is None:
        return
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"{op}: window must be a positive int or None, got {window!r}")
    if window <= 0:
        raise ValueError(f"{op}: window must be positive (a query sees i - window < j <= i), got {window}")


def check_cu_seqlens(op, cu_seqlens, B, T, device, *, check_values=True):
    """dtype, shape and device; then the offsets themselves unless `check_values=False`. Reading them is a host
    sync on CUDA, so the model reads them once per forward (check_cu_seqlens_values) and lets its layers skip it."""
    check_tensor(op, "cu_seqlens", cu_seqlens, dim=1, dtypes=INDEX_DTYPES)
    if cu_seqlens.device != device:
        raise ValueError(f"{op}: cu_seqlens is on {cu_seqlens.device} but the other inputs are on {device}")
    if check_values:
        check_cu_seqlens_values(op, cu_seqlens.tolist(), B, T)


def check_cu_seqlens_values(op, offsets: list[int], B, T):
    """The offsets (read to the host) run from 0 to B*T, never decrease, and start a document at every row."""
    where = f"{op}: cu_seqlens {offsets if len(offsets) <= 16 else str(offsets[:16])[:-1] + ', ...]'}"
    if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != B * T:
        raise ValueError(f"{where} must run from 0 to B*T={B * T} (document offsets over the flattened tokens)")
    if any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"{where} must be non-decreasing")
    missing = sorted(set(range(0, B * T + 1, T)) - set(offsets))
    if missing:
        raise ValueError(f"{where} must include every multiple of T={T} (documents never span two rows); "
                         f"missing {missing[:8]}")


def check_attention(q, k, v, window, cu_seqlens, check_values=True):
    op = "attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(op, name, t, dim=4, dtypes=FLOAT_DTYPES)
    check_same(op, "device", q=q, k=k, v=v)
    check_same(op, "dtype", q=q, k=k, v=v)
    B, T, Hq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"{op}: k and v must have one shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    Bk, Tk, Hkv, Dk = k.shape
    if (Bk, Tk, Dk) != (B, T, D):
        raise ValueError(f"{op}: k and v must be [B, T, Hkv, D] with q's B={B}, T={T}, D={D}; got {tuple(k.shape)}")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"{op}: q's {Hq} heads must be a multiple of k/v's {Hkv} heads (grouped-query attention)")
    check_window(op, window)
    if cu_seqlens is not None:
        check_cu_seqlens(op, cu_seqlens, B, T, q.device, check_values=check_values)


def check_triton_attention(q):
    op = "attention (Triton)"
    check_triton_dtype(op, "q", q)
    if not 16 <= q.shape[-1] <= 128:
        raise ValueError(f"{op}: head dim must be in 16..128, got {q.shape[-1]}")


# ---------------------------------------------------------------------------------------------- RMSNorm

def check_rms_norm(x, weight, eps, residual):
    op = "rms_norm"
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES)
    check_tensor(op, "weight", weight, dim=1, dtypes=FLOAT_DTYPES)
    if x.dim() == 0 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"{op}: weight {tuple(weight.shape)} must match x's last axis, x is {tuple(x.shape)}")
    tensors = dict(x=x, weight=weight)
    if residual is not None:
        check_tensor(op, "residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"{op}: residual {tuple(residual.shape)} must have x's shape {tuple(x.shape)}")
        check_same(op, "dtype", x=x, residual=residual)
        tensors["residual"] = residual
    check_same(op, "device", **tensors)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"{op}: eps must be a non-negative number, got {eps!r}")


# ---------------------------------------------------------------------------------------------- cross-entropy

def check_targets(op, targets, n_rows, n_classes, ignore_index):
    check_tensor(op, "targets", targets, dim=1, dtypes=INDEX_DTYPES)
    if targets.shape[0] != n_rows:
        raise ValueError(f"{op}: targets has {targets.shape[0]} entries but there are {n_rows} rows")
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= n_classes))
    if bad.any():
        index = int(bad.nonzero()[0, 0])
        raise ValueError(f"{op}: targets[{index}]={int(targets[index])} is outside [0, {n_classes}) "
                         f"and is not ignore_index={ignore_index}")


def check_reduction(op, reduction, allowed=("mean", "sum", "none")):
    if reduction not in allowed:
        raise ValueError(f"{op}: reduction must be one of {', '.join(map(repr, allowed))}, got {reduction!r}")


def check_cross_entropy(logits, targets, ignore_index, reduction, z_loss):
    op = "cross_entropy"
    check_tensor(op, "logits", logits, dim=2, dtypes=FLOAT_DTYPES)
    check_tensor(op, "targets", targets)
    check_same(op, "device", logits=logits, targets=targets)
    check_reduction(op, reduction)
    if isinstance(z_loss, bool) or not isinstance(z_loss, (int, float)) or z_loss < 0:
        raise ValueError(f"{op}: z_loss must be a non-negative number, got {z_loss!r}")
    check_targets(op, targets, logits.shape[0], logits.shape[1], ignore_index)


def check_linear_cross_entropy(hidden, weight, targets, ignore_index, reduction, chunk_size, token_weights=None):
    op = "linear_cross_entropy"
    check_tensor(op, "hidden", hidden, dim=2, dtypes=FLOAT_DTYPES)
    check_tensor(op, "weight", weight, dim=2, dtypes=FLOAT_DTYPES)
    check_tensor(op, "targets", targets)
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"{op}: weight must be [V, D] with hidden's D={hidden.shape[1]}, got {tuple(weight.shape)}")
    check_same(op, "device", hidden=hidden, weight=weight, targets=targets)
    check_same(op, "dtype", hidden=hidden, weight=weight)
    check_reduction(op, reduction, ("mean", "sum"))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"{op}: chunk_size must be a positive int, got {chunk_size!r}")
    check_targets(op, targets, hidden.shape[0], weight.shape[0], ignore_index)
    if token_weights is not None:
        check_tensor(op, "token_weights", token_weights, dim=1, dtypes=FLOAT_DTYPES)
        if token_weights.shape[0] != hidden.shape[0]:
            raise ValueError(f"{op}: token_weights must be [N] with hidden's N={hidden.shape[0]}, "
                             f"got {tuple(token_weights.shape)}")
        check_same(op, "device", hidden=hidden, token_weights=token_weights)
        if not bool(torch.isfinite(token_weights).all()) or bool((token_weights < 0).any()):
            raise ValueError(f"{op}: token_weights must be finite and >= 0")

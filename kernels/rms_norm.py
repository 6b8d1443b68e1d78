"""RMSNorm in Triton, forward and backward, optionally fused with the residual add before it.

Forward, one program per row: h = x + residual (rounded to the storage dtype, as the unfused add would be),
y = h * rstd * weight with rstd = 1 / sqrt(mean(h^2) + eps), saved per row for the backward.
Backward: dh = rstd * (dy * w - h_hat * mean(dy * w * h_hat)) (+ the gradient reaching h itself when h was
returned), with h_hat = h * rstd. dW = sum over rows of dy * h_hat: each of a few programs sums its rows into one
fp32 partial row, then one torch reduction adds the partials, so no [rows, N] intermediate exists.
"""
import torch
import triton
import triton.language as tl

from .triton_utils import INTERPRET, num_programs


@triton.jit
def _rms_norm_fwd(X, RES, W, Y, H, RSTD, N, eps, HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    h = tl.load(X + row * N + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        h = (h.to(tl.float32) + tl.load(RES + row * N + cols, mask=mask, other=0.0).to(tl.float32))
        h = h.to(H.dtype.element_ty)
        tl.store(H + row * N + cols, h, mask=mask)
    h = h.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, 0) / N + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * N + cols, (h * rstd * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_bwd(DY, DH_OUT, H, W, RSTD, DH, DW_PARTIAL, M, N,
                  HAS_DH_OUT: tl.constexpr, BLOCK_N: tl.constexpr):
    """Programs stride over the rows; each writes its fp32 share of dW to DW_PARTIAL[program]."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], tl.float32)
    for row in range(pid, M, tl.num_programs(0)):
        offs = tl.cast(row, tl.int64) * N + cols      # 64-bit: M * N may pass 2**31
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        h_hat = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32) * rstd
        dyw = dy * w
        dh = rstd * (dyw - h_hat * (tl.sum(dyw * h_hat, 0) / N))
        if HAS_DH_OUT:
            dh += tl.load(DH_OUT + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DH + offs, dh.to(DH.dtype.element_ty), mask=mask)
        dw += dy * h_hat
    tl.store(DW_PARTIAL + pid * N + cols, dw, mask=mask)


def _launch_options(N: int) -> dict:
    return dict(num_warps=1 if INTERPRET else min(16, max(1, triton.next_power_of_2(N) // 256)))


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, residual):
        shape = x.shape
        x = x.reshape(-1, shape[-1]).contiguous()
        M, N = x.shape
        has_residual = residual is not None
        residual = residual.reshape(M, N).contiguous() if has_residual else x
        h = torch.empty_like(x) if has_residual else x
        y = torch.empty_like(x)
        rstd = torch.empty(M, device=x.device, dtype=torch.float32)
        _rms_norm_fwd[(M,)](x, residual, weight.contiguous(), y, h, rstd, N, eps,
                            HAS_RESIDUAL=has_residual, BLOCK_N=triton.next_power_of_2(N), **_launch_options(N))
        ctx.save_for_backward(h, weight, rstd)
        ctx.has_residual = has_residual
        if has_residual:
            return y.view(shape), h.view(shape)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy, dh_out=None):
        h, weight, rstd = ctx.saved_tensors
        shape = dy.shape
        M, N = h.shape
        dy = dy.reshape(M, N).contiguous()
        has_dh_out = dh_out is not None
        dh_out = dh_out.reshape(M, N).contiguous() if has_dh_out else dy
        dh = torch.empty_like(h)
        programs = num_programs(h.device, M)
        dw_partial = torch.empty(programs, N, device=h.device, dtype=torch.float32)
        _rms_norm_bwd[(programs,)](dy, dh_out, h, weight.contiguous(), rstd, dh, dw_partial, M, N,
                                   HAS_DH_OUT=has_dh_out, BLOCK_N=triton.next_power_of_2(N),
                                   **_launch_options(N))
        dw = dw_partial.sum(0).to(weight.dtype)
        dh = dh.view(shape)
        return dh, dw, None, (dh if ctx.has_residual else None)


def rms_norm(x, weight, eps=1e-5, residual=None):
    """The Triton twin of `reference.rms_norm`: y, or (y, x + residual) with `residual`. Inputs already checked
    by `cancerllm.kernels.rms_norm`; non-contiguous ones are copied to contiguous ones."""
    return RMSNormFunction.apply(x, weight, eps, residual)

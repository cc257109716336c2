"""LayerNorm and RMSNorm over the last dimension, forward and backward, fp32 statistics.

One kernel pair serves both (RMSNorm is LayerNorm without centring and without bias). A
program holds BLOCK_M whole rows in registers (BLOCK_N = next power of two >= hidden, masked),
so any hidden size works, powers of two or not (1024, 1600, 2048, 4096, ...). The forward
saves the per-row mean and 1/std in fp32; the backward computes dx in one pass and the weight
and bias gradients as per-program partial sums over a persistent grid, which torch adds up.

`LayerNorm` and `RMSNorm` here subclass `nn.LayerNorm` and `nn.RMSNorm`: same parameters,
same state_dict keys, same `isinstance` answers, so checkpoints, weight mappings and
parallel plans (SequenceParallel hooks) see the module they expect.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rapidnlp.kernels.dispatch import (
    is_dtensor, launch, num_programs, num_warps_for, on_local_shards, rows_per_program, settled, tl, triton,
    use_triton,
)


def layer_norm_reference(x, weight, bias, eps: float) -> torch.Tensor:
    n = x.shape[-1]
    w = weight.float() if weight is not None else None
    b = bias.float() if bias is not None else None
    return F.layer_norm(x.float(), (n,), w, b, eps).to(x.dtype)


def rms_norm_reference(x, weight, eps: float) -> torch.Tensor:
    n = x.shape[-1]
    return F.rms_norm(x.float(), (n,), weight.float() if weight is not None else None, eps).to(x.dtype)


@triton.jit
def _norm_fwd(X, W, B, Y, MEAN, RSTD, M, N, eps, RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols[None, :] < N)
    offs = rows[:, None].to(tl.int64) * N + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if RMS:
        xc = x
    else:
        mean = tl.sum(x, axis=1) / N
        xc = tl.where(mask, x - mean[:, None], 0.0)
        tl.store(MEAN + rows, mean, mask=row_ok)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / N + eps)
    tl.store(RSTD + rows, rstd, mask=row_ok)
    y = xc * rstd[:, None]
    if HAS_W:
        y = y * tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd(DY, X, W, MEAN, RSTD, DX, DW_PARTIAL, DB_PARTIAL, M, N, RMS: tl.constexpr, HAS_W: tl.constexpr,
              HAS_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(pid * BLOCK_M, M, tl.num_programs(0) * BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        offs = rows[:, None].to(tl.int64) * N + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        if RMS:
            xhat = x * rstd[:, None]
        else:
            mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_W:
            wdy = dy * w[None, :]
        else:
            wdy = dy
        c1 = tl.sum(xhat * wdy, axis=1) / N
        if RMS:
            dx = (wdy - xhat * c1[:, None]) * rstd[:, None]
        else:
            c2 = tl.sum(wdy, axis=1) / N
            dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xhat, axis=0)
        db += tl.sum(dy, axis=0)
    if HAS_W:
        tl.store(DW_PARTIAL + pid * N + cols, dw, mask=col_ok)
    if HAS_B:
        tl.store(DB_PARTIAL + pid * N + cols, db, mask=col_ok)


class _Norm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, rms: bool):
        n = x.shape[-1]
        x2 = x.contiguous().view(-1, n)
        m = x2.shape[0]
        y = torch.empty_like(x2)
        mean = torch.empty(m, dtype=torch.float32, device=x.device)
        rstd = torch.empty(m, dtype=torch.float32, device=x.device)
        block_n = triton.next_power_of_2(n)
        block_m = rows_per_program(block_n, m)
        launch("rms_norm_fwd" if rms else "layer_norm_fwd", _norm_fwd, (triton.cdiv(m, block_m),),
               x2, weight if weight is not None else x2, bias if bias is not None else x2, y, mean, rstd,
               m, n, eps, RMS=rms, HAS_W=weight is not None, HAS_B=bias is not None,
               BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps_for(block_m * block_n))
        ctx.save_for_backward(x2, weight, bias, mean, rstd)
        ctx.rms = rms
        ctx.shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, bias, mean, rstd = ctx.saved_tensors
        m, n = x2.shape
        dy2 = dy.contiguous().view(m, n)
        dx = torch.empty_like(x2)
        block_n = triton.next_power_of_2(n)
        block_m = rows_per_program(block_n, m)
        programs = num_programs(triton.cdiv(m, block_m), x2.device)
        partial = lambda present: (  # noqa: E731
            torch.empty((programs, n), dtype=torch.float32, device=x2.device) if present else dx
        )
        dw_partial, db_partial = partial(weight is not None), partial(bias is not None)
        launch("rms_norm_bwd" if ctx.rms else "layer_norm_bwd", _norm_bwd, (programs,),
               dy2, x2, weight if weight is not None else x2, mean, rstd, dx, dw_partial, db_partial, m, n,
               RMS=ctx.rms, HAS_W=weight is not None, HAS_B=bias is not None,
               BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps_for(block_m * block_n))
        dw = dw_partial.sum(0).to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        db = db_partial.sum(0).to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        return dx.view(ctx.shape), dw, db, None, None


def _check(x, weight, bias):
    n = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.shape != (n,):
            raise ValueError(f"{name} shape {tuple(t.shape)} does not match the last dimension of x {tuple(x.shape)}")


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dimension; output in x's dtype, statistics in fp32."""
    _check(x, weight, bias)
    if is_dtensor(x):  # e.g. a sequence shard under sequence parallelism
        return on_local_shards(layer_norm, x, (weight, bias), eps, split_last=False)
    x = settled(x)
    if not use_triton(x, weight, bias):
        return layer_norm_reference(x, weight, bias, eps)
    return _Norm.apply(x, weight, bias, eps, False)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dimension: x / sqrt(mean(x^2) + eps) * weight."""
    _check(x, weight, None)
    if is_dtensor(x):
        return on_local_shards(rms_norm, x, (weight,), eps, split_last=False)
    x = settled(x)
    if not use_triton(x, weight):
        return rms_norm_reference(x, weight, eps)
    return _Norm.apply(x, weight, None, eps, True)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters and state_dict) that runs `layer_norm`; last dimension only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.normalized_shape) != 1:
            return super().forward(x)
        return layer_norm(x, self.weight, self.bias, self.eps)


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm (same parameters and state_dict) that runs `rms_norm`; last dimension only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.normalized_shape) != 1:
            return super().forward(x)
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        return rms_norm(x, self.weight, eps)

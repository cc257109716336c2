"""bias + GeLU in one pass: y = gelu(x + bias), erf or tanh form.

Worth fusing when the linear before it runs without its bias (F.linear(x, W)): eager PyTorch
then reads and writes the activation twice (add, gelu) and the backward three times; here the
forward reads x once and writes y once, and the backward recomputes x + bias (nothing but x is
saved) and produces dx and the bias gradient in the same pass. All arithmetic is fp32,
whatever the storage dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rapidnlp.kernels.dispatch import (
    is_dtensor, launch, num_programs, num_warps_for, on_local_shards, settled, tile_2d, tl, triton, use_triton,
)

SQRT_1_2 = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
TANH_K = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)
TANH_C = tl.constexpr(0.044715)


def bias_gelu_reference(x: torch.Tensor, bias: torch.Tensor | None, approximate: str = "none") -> torch.Tensor:
    return F.gelu(x if bias is None else x + bias.to(x.dtype), approximate=approximate)


@triton.jit
def _gelu(z, TANH: tl.constexpr):
    """(gelu(z), gelu'(z)) in fp32; the compiler drops the derivative where it is unused."""
    if TANH:
        u = TANH_K * (z + TANH_C * z * z * z)
        t = 2.0 * tl.sigmoid(2.0 * u) - 1.0  # tanh(u), stable at both ends
        y = 0.5 * z * (1.0 + t)
        dy = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * TANH_K * (1.0 + 3.0 * TANH_C * z * z)
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(z * SQRT_1_2))
        y = z * cdf
        dy = cdf + z * tl.exp(-0.5 * z * z) * INV_SQRT_2PI
    return y, dy


@triton.jit
def _bias_gelu_fwd(X, B, Y, M, N, HAS_BIAS: tl.constexpr, TANH: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    offs = rows[:, None].to(tl.int64) * N + cols[None, :]
    z = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    y, _ = _gelu(z, TANH)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd(DY, X, B, DX, DB_PARTIAL, M, N, HAS_BIAS: tl.constexpr, TANH: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # A persistent grid over rows: each program walks row blocks pid, pid + P, ... and keeps
    # its share of the bias gradient in registers; the P partial rows are summed by torch.
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if HAS_BIAS:
        b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(pid * BLOCK_M, M, tl.num_programs(0) * BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < M) & col_ok[None, :]
        offs = rows[:, None].to(tl.int64) * N + cols[None, :]
        z = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            z += b[None, :]
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        _, dgelu = _gelu(z, TANH)
        dz = dy * dgelu
        tl.store(DX + offs, dz.to(DX.dtype.element_ty), mask=mask)
        db += tl.sum(dz, axis=0)
    if HAS_BIAS:
        tl.store(DB_PARTIAL + pid * N + cols, db, mask=col_ok)


class BiasGeLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, approximate: str):
        n = x.shape[-1]
        x2 = x.contiguous().view(-1, n)
        m = x2.shape[0]
        y = torch.empty_like(x2)
        block_m, block_n = tile_2d(m, n)
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
        launch("bias_gelu_fwd", _bias_gelu_fwd, grid, x2, bias if bias is not None else x2, y, m, n,
               HAS_BIAS=bias is not None, TANH=approximate == "tanh", BLOCK_M=block_m, BLOCK_N=block_n,
               num_warps=num_warps_for(block_m * block_n))
        ctx.save_for_backward(x2, bias)
        ctx.approximate = approximate
        ctx.shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, bias = ctx.saved_tensors
        m, n = x2.shape
        dy2 = dy.contiguous().view(m, n)
        dx = torch.empty_like(x2)
        block_m, block_n = tile_2d(m, n)
        programs = num_programs(triton.cdiv(m, block_m), x2.device)
        partial = torch.empty((programs, n), dtype=torch.float32, device=x2.device) if bias is not None else dx
        launch("bias_gelu_bwd", _bias_gelu_bwd, (programs, triton.cdiv(n, block_n)),
               dy2, x2, bias if bias is not None else x2, dx, partial, m, n,
               HAS_BIAS=bias is not None, TANH=ctx.approximate == "tanh", BLOCK_M=block_m, BLOCK_N=block_n,
               num_warps=num_warps_for(block_m * block_n))
        dbias = partial.sum(0).to(bias.dtype) if bias is not None and ctx.needs_input_grad[1] else None
        return dx.view(ctx.shape), dbias, None


def bias_gelu(x: torch.Tensor, bias: torch.Tensor | None = None, approximate: str = "none") -> torch.Tensor:
    """gelu(x + bias) over the last dimension; `approximate` is "none" (erf) or "tanh", as F.gelu."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    if bias is not None and bias.shape != x.shape[-1:]:
        raise ValueError(f"bias shape {tuple(bias.shape)} does not match the last dimension of x {tuple(x.shape)}")
    if is_dtensor(x):  # e.g. a column-parallel fc1's output [.., ffn / tp] with its bias slice
        return on_local_shards(bias_gelu, x, (bias,), approximate, split_last=True)
    x = settled(x)
    if not use_triton(x, bias):
        return bias_gelu_reference(x, bias, approximate)
    return BiasGeLU.apply(x, bias, approximate)

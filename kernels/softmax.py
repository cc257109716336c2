"""Scaled, masked softmax over attention scores: y = softmax(scale * x, masked), last dimension.

For attention written out by hand (a custom score bias, a kernel SDPA does not cover); the
encoder itself uses SDPA. One pass forward (scale, mask, max, exp, sum, normalise, in fp32
registers) and one pass backward (dx = scale * y * (dy - sum(dy * y))), from the saved y.

The mask is boolean, True where a key may be attended (the convention of the encoder's
`attention_mask` and of SDPA's boolean `attn_mask`), and broadcastable to the scores, which
have at most 4 dimensions ([batch, heads, queries, keys]): a padding mask [b, 1, 1, s]
costs s bytes per sequence, not s * s * heads. It is read through its strides, never expanded.

A row whose keys are all masked (a query of an all-padding sequence) has no distribution; it
is defined to be all zeros, forward and backward, never NaN, so such rows contribute nothing
downstream. (torch.softmax over an all -inf row gives NaN.)
"""
from __future__ import annotations

import torch

from rapidnlp.kernels.dispatch import launch, num_warps_for, rows_per_program, tl, triton, use_triton


def scaled_masked_softmax_reference(x: torch.Tensor, mask: torch.Tensor | None, scale: float = 1.0) -> torch.Tensor:
    s = x.float() * scale
    if mask is None:
        return torch.softmax(s, -1).to(x.dtype)
    mask = mask.expand(x.shape)
    s = s.masked_fill(~mask, float("-inf"))
    attended = mask.any(-1, keepdim=True)
    s = s.masked_fill(~attended, 0.0)  # finite, so no NaN in forward or backward; zeroed below
    return (torch.softmax(s, -1) * attended).to(x.dtype)


@triton.jit
def _softmax_fwd(X, MASK, Y, R, N, H, SQ, smb, smh, smq, smk, scale, HAS_MASK: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    valid = (rows[:, None] < R) & (cols[None, :] < N)
    offs = rows[:, None].to(tl.int64) * N + cols[None, :]
    x = tl.load(X + offs, mask=valid, other=0.0).to(tl.float32) * scale
    if HAS_MASK:
        r64 = rows.to(tl.int64)
        row_off = (r64 // (SQ * H)) * smb + ((r64 // SQ) % H) * smh + (r64 % SQ) * smq
        keep = tl.load(MASK + row_off[:, None] + cols[None, :].to(tl.int64) * smk, mask=valid, other=0)
        valid = valid & (keep != 0)
    x = tl.where(valid, x, float("-inf"))
    row_max = tl.max(x, axis=1)
    row_max = tl.where(row_max == float("-inf"), 0.0, row_max)  # all masked: exp(-inf) = 0 below
    e = tl.exp(x - row_max[:, None])
    total = tl.sum(e, axis=1)
    y = e / tl.where(total == 0.0, 1.0, total)[:, None]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=(rows[:, None] < R) & (cols[None, :] < N))


@triton.jit
def _softmax_bwd(DY, Y, DX, R, N, scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < R) & (cols[None, :] < N)
    offs = rows[:, None].to(tl.int64) * N + cols[None, :]
    y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    dot = tl.sum(dy * y, axis=1)
    dx = scale * y * (dy - dot[:, None])
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


class ScaledMaskedSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mask, scale: float):
        n = x.shape[-1]
        x2 = x.contiguous().view(-1, n)
        r = x2.shape[0]
        y = torch.empty_like(x2)
        shape4 = (1,) * (4 - x.dim()) + tuple(x.shape)
        if mask is not None:
            m4 = mask.view((1,) * (4 - mask.dim()) + tuple(mask.shape)).expand(shape4)
            m4 = m4.view(torch.uint8)  # same storage and strides; Triton reads bytes
            strides = m4.stride()
        else:
            m4, strides = x2, (0, 0, 0, 0)
        block_n = triton.next_power_of_2(n)
        block_m = rows_per_program(block_n, r)
        launch("softmax_fwd", _softmax_fwd, (triton.cdiv(r, block_m),), x2, m4, y, r, n, shape4[1], shape4[2],
               *strides, scale, HAS_MASK=mask is not None, BLOCK_M=block_m, BLOCK_N=block_n,
               num_warps=num_warps_for(block_m * block_n))
        ctx.save_for_backward(y)
        ctx.scale = scale
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        r, n = y.shape
        dy2 = dy.contiguous().view(r, n)
        dx = torch.empty_like(y)
        block_n = triton.next_power_of_2(n)
        block_m = rows_per_program(block_n, r)
        launch("softmax_bwd", _softmax_bwd, (triton.cdiv(r, block_m),), dy2, y, dx, r, n, ctx.scale,
               BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps_for(block_m * block_n))
        return dx.view(dy.shape), None, None


def scaled_masked_softmax(x: torch.Tensor, mask: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
    """softmax(scale * x) over the last dimension where `mask` (bool, True = attend) allows;
    rows with nothing to attend are zeros. Output in x's dtype, arithmetic in fp32."""
    if x.dim() > 4:
        raise ValueError(f"scores must have at most 4 dimensions, got shape {tuple(x.shape)}")
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be boolean (True = attend), got {mask.dtype}")
        if mask.dim() > x.dim():
            raise ValueError(f"mask {tuple(mask.shape)} has more dimensions than the scores {tuple(x.shape)}")
        if torch.broadcast_shapes(mask.shape, x.shape) != x.shape:
            raise ValueError(f"mask {tuple(mask.shape)} does not broadcast to the scores {tuple(x.shape)}")
    if not use_triton(x, mask):
        return scaled_masked_softmax_reference(x, mask, scale)
    return ScaledMaskedSoftmax.apply(x, mask, scale)

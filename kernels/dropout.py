"""bias + dropout + residual add in one pass: out = residual + dropout(x + bias, p).

The dropout mask is a function of (seed, offset + element index) through Philox
(`tl.rand`, 10 rounds): the backward recomputes it instead of storing it (no mask tensor, no
extra read), and the same (seed, offset) gives the same mask on any GPU, in the interpreter, and
in the PyTorch reference, which implements the same Philox with int64 arithmetic. The seed is
drawn from torch's CPU generator when not given, so `torch.manual_seed` fixes it and activation
checkpointing, which restores the CPU RNG state before recomputing, redraws the same one.

The bias is optional: with bias=None this is dropout + residual add, for a linear whose bias
already rides in its GEMM (cuBLAS adds it in the epilogue for free). Element indices are int64,
so the mask does not repeat below 2^64 elements. The reference's Philox costs ~100 int64 torch
ops per element: a fused model with dropout on CPU is correct but slower than nn.Dropout.
"""
from __future__ import annotations

import torch

from rapidnlp.kernels.dispatch import launch, num_programs, num_warps_for, settled, tile_2d, tl, triton, use_triton

_M32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_UNIFORM_SCALE = 4.6566127342e-10  # 2^-31, as triton.language.random spells it


def draw_seed() -> int:
    """A Philox seed from torch's default CPU generator (so torch.manual_seed fixes it)."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


def _mulhilo(a: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a * x) >> 32 and (a * x) mod 2^32 for 32-bit a and x held in int64, without overflow."""
    low = a * (x & 0xFFFF)
    t = a * (x >> 16) + (low >> 16)
    return t >> 16, ((t & 0xFFFF) << 16) | (low & 0xFFFF)


def philox_uniform(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """`tl.rand(seed, offsets)` in PyTorch, bit for bit: fp32 uniforms in [0, 1) for int64 offsets."""
    offsets = offsets.to(torch.int64)
    c0, c1 = offsets & _M32, (offsets >> 32) & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    signed = torch.where(c0 >= 2**31, c0 - 2**32, c0)  # bitcast to int32
    signed = torch.where(signed < 0, -signed - 1, signed)
    return signed.to(torch.float32) * _UNIFORM_SCALE


def mask_rows(shape, shard: tuple[int, int]) -> tuple[int, int, int]:
    """(rows per slice, rows per whole, first row) of the mask's row numbering for an x of `shape`
    that is slice shard[0] of shard[1] equal slices of a whole tensor along dim -2: row r of x's
    [rows, last dim] view is row (r // per_slice) * per_whole + first + r % per_slice of the whole's."""
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard {shard}: expected (index, count) with 0 <= index < count")
    rows = 1
    for s in shape[:-1]:
        rows *= s
    if count == 1:
        return max(rows, 1), max(rows, 1), 0
    if len(shape) < 2:
        raise ValueError(f"a sharded dropout input needs a dimension to shard; got shape {tuple(shape)}")
    return shape[-2], shape[-2] * count, shape[-2] * index


def dropout_keep_mask(seed: int, offset: int, shape, p: float, device=None,
                      shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """The keep mask that `bias_dropout_add` uses for (seed, offset): uniform > p, element-wise;
    with `shard` (see `bias_dropout_add`) that slice of the whole tensor's mask."""
    numel = 1
    for s in shape:
        numel *= s
    if shard[1] == 1:
        index = torch.arange(numel, dtype=torch.int64, device=device) + offset
    else:
        per_slice, per_whole, first = mask_rows(shape, shard)
        n = shape[-1]
        outer = torch.arange(numel // (per_slice * n), dtype=torch.int64, device=device)[:, None, None]
        row = outer * per_whole + first + torch.arange(per_slice, dtype=torch.int64, device=device)[None, :, None]
        index = row * n + torch.arange(n, dtype=torch.int64, device=device) + offset
    return (philox_uniform(seed, index) > p).view(shape)


def _scale(p: float) -> float:
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def bias_dropout_add_reference(x, bias, residual, p: float, training: bool = True, seed: int = 0, offset: int = 0,
                               shard: tuple[int, int] = (0, 1)):
    """In fp32, rounded once to the output dtype, as the kernel does."""
    out_dtype = torch.promote_types(x.dtype, residual.dtype)
    z = x.float() if bias is None else x.float() + bias.float()
    if training and p > 0.0:
        keep = dropout_keep_mask(seed, offset, x.shape, p, device=x.device, shard=shard)
        z = z * (keep.to(torch.float32) * _scale(p))
    return (residual.float() + z).to(out_dtype)


@triton.jit
def _mask_offsets(rows, cols, N, offset, per_slice, per_whole, first):
    """Philox counters of a tile: the elements' indices in the whole (unsharded) tensor + offset."""
    whole_rows = (rows // per_slice).to(tl.int64) * per_whole + first + rows % per_slice
    return offset + whole_rows[:, None] * N + cols[None, :]


@triton.jit
def _bda_fwd(X, B, R, OUT, M, N, seed, offset, per_slice, per_whole, first, p, scale, HAS_BIAS: tl.constexpr,
             DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    offs = rows[:, None].to(tl.int64) * N + cols[None, :]
    z = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if DROPOUT:
        keep = tl.rand(seed, _mask_offsets(rows, cols, N, offset, per_slice, per_whole, first)) > p
        z = tl.where(keep, z * scale, 0.0)
    r = tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + offs, (r + z).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _bda_bwd(DY, DX, DB_PARTIAL, M, N, seed, offset, per_slice, per_whole, first, p, scale, HAS_BIAS: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # dx = dy * keep * scale with keep recomputed from (seed, offset); d(residual) is dy itself.
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(pid * BLOCK_M, M, tl.num_programs(0) * BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < M) & col_ok[None, :]
        offs = rows[:, None].to(tl.int64) * N + cols[None, :]
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        keep = tl.rand(seed, _mask_offsets(rows, cols, N, offset, per_slice, per_whole, first)) > p
        dx = tl.where(keep, dy * scale, 0.0)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        db += tl.sum(dx, axis=0)
    if HAS_BIAS:
        tl.store(DB_PARTIAL + pid * N + cols, db, mask=col_ok)


class BiasDropoutAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, residual, p: float, seed: int, offset: int, shard: tuple[int, int]):
        n = x.shape[-1]
        x2 = x.contiguous().view(-1, n)
        r2 = residual.contiguous().view(-1, n)
        m = x2.shape[0]
        out_dtype = torch.promote_types(x.dtype, residual.dtype)
        out = torch.empty((m, n), dtype=out_dtype, device=x.device)
        block_m, block_n = tile_2d(m, n)
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
        ctx.rows = mask_rows(x.shape, shard)
        launch("bias_dropout_add_fwd", _bda_fwd, grid, x2, bias if bias is not None else x2, r2, out, m, n,
               seed, offset, *ctx.rows, p, _scale(p), HAS_BIAS=bias is not None, DROPOUT=p > 0.0,
               BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps_for(block_m * block_n))
        ctx.p, ctx.seed, ctx.offset = p, seed, offset
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.x_meta = (x.shape, x.dtype)
        ctx.residual_dtype = residual.dtype
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        shape, x_dtype = ctx.x_meta
        n = shape[-1]
        dy2 = dy.contiguous().view(-1, n)
        m = dy2.shape[0]
        dresidual = dy.to(ctx.residual_dtype) if ctx.needs_input_grad[2] else None
        if ctx.p == 0.0:
            dx = dy2.to(x_dtype)
            dbias = dy2.float().sum(0).to(ctx.bias_dtype) if ctx.has_bias and ctx.needs_input_grad[1] else None
            return dx.view(shape), dbias, dresidual, None, None, None, None
        dx = torch.empty((m, n), dtype=x_dtype, device=dy.device)
        block_m, block_n = tile_2d(m, n)
        programs = num_programs(triton.cdiv(m, block_m), dy.device)
        partial = torch.empty((programs, n), dtype=torch.float32, device=dy.device) if ctx.has_bias else dx
        launch("bias_dropout_add_bwd", _bda_bwd, (programs, triton.cdiv(n, block_n)), dy2, dx, partial, m, n,
               ctx.seed, ctx.offset, *ctx.rows, ctx.p, _scale(ctx.p), HAS_BIAS=ctx.has_bias,
               BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps_for(block_m * block_n))
        dbias = partial.sum(0).to(ctx.bias_dtype) if ctx.has_bias and ctx.needs_input_grad[1] else None
        return dx.view(shape), dbias, dresidual, None, None, None, None


def bias_dropout_add(x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor, p: float,
                     training: bool = True, seed: int | None = None, offset: int = 0,
                     shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """residual + dropout(x + bias, p); the mask is Philox(seed, offset + index), see the module.

    With `training=False` or p=0 no mask is drawn (and no seed consumed). `shard = (i, n)`: x is
    slice i of n equal slices along dim -2 of a whole tensor (a sequence shard under sequence
    parallelism, every rank drawing the same seed); each element then uses its index in the whole
    tensor, so the n slices' masks together are the whole tensor's mask, bit for bit."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    if x.shape != residual.shape:
        raise ValueError(f"x {tuple(x.shape)} and residual {tuple(residual.shape)} must have one shape")
    if bias is not None and bias.shape != x.shape[-1:]:
        raise ValueError(f"bias shape {tuple(bias.shape)} does not match the last dimension of x {tuple(x.shape)}")
    x, bias, residual = settled(x), settled(bias), settled(residual)
    if not training:
        p = 0.0
    if p > 0.0 and seed is None:
        return _with_drawn_seed(x, bias, residual, p, offset, shard)
    seed = seed or 0
    if not use_triton(x, bias, residual):
        return bias_dropout_add_reference(x, bias, residual, p, True, seed, offset, shard)
    return BiasDropoutAdd.apply(x, bias, residual, p, seed, offset, shard)


@torch.compiler.disable
def _with_drawn_seed(x, bias, residual, p: float, offset: int, shard: tuple[int, int]) -> torch.Tensor:
    """bias_dropout_add with a seed drawn now, outside any compiled graph (train.compile): traced,
    each step's new seed (a Python int) would specialise the graph and recompile the block."""
    return bias_dropout_add(x, bias, residual, p, True, draw_seed(), offset, shard)


def dropout_add(x: torch.Tensor, residual: torch.Tensor, p: float, training: bool = True,
                seed: int | None = None, offset: int = 0, shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """residual + dropout(x, p): `bias_dropout_add` without a bias."""
    return bias_dropout_add(x, None, residual, p, training, seed, offset, shard)

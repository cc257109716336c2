"""MLM cross-entropy over the vocabulary, in chunks, never holding fp32 logits for all tokens.

Two entry points:

`cross_entropy(logits, labels)` takes logits in their own dtype (bf16 under autocast) and
walks each row's vocabulary in BLOCK_V chunks with an online max / sum-exp in fp32 registers:
no fp32 copy of the logits (eager `F.cross_entropy(logits.float(), ...)` makes one, and an fp32
gradient of the same size). The backward recomputes softmax from the saved per-row
log-sum-exp and writes the gradient in the logits' dtype.

`linear_cross_entropy(hidden, weight, bias, labels)` fuses the vocabulary projection in too:
tokens are processed `chunk_size` at a time (logits of one chunk, the loss, and the chunk's
gradients w.r.t. hidden, weight and bias, all in the forward), so not even the low-precision
logits exist for all tokens at once. Its backward only scales the stored gradients by the
incoming scalar, so it supports reduction "sum" and "mean" (what an MLM loss needs).

Labels equal to `ignore_index` (-100) contribute no loss and no gradient; "mean" divides by
the number of other labels (NaN when there are none, as F.cross_entropy).

Vocab-parallel (tp-sharded) heads: each rank holds logits (or decoder rows) for the vocabulary
slice [vocab_start, vocab_start + V_local). Both functions accept `vocab_start` and an
`all_reduce(tensor, op)` callable (op "max" or "sum", in place, over the tp group; e.g.
`lambda t, op: dist.all_reduce(t, MAX if op == "max" else SUM, group=tp_group)`). The kernel
returns per-row partials of the local slice (max, sum of exp relative to that max, and the
target logit if the label falls in the slice, else 0); three all-reduces of [tokens] fp32
vectors between the kernels combine them into the global log-sum-exp, Megatron's
vocab-parallel cross-entropy, and the backward kernel needs only that global log-sum-exp.
With `linear_cross_entropy` the hidden-state gradient, a partial sum over the vocabulary
slices, is all-reduced as well, so the returned gradients are complete on every rank. Under
DTensor `loss_parallel()` (logits arriving as a DTensor) `cross_entropy` falls back to
F.cross_entropy, which DTensor shards itself.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from rapidnlp.kernels.dispatch import launch, num_warps_for, tl, triton, use_triton, INTERPRET

AllReduce = Callable[[torch.Tensor, str], None]

_REFERENCE_ROWS = 1024  # row chunk of the torch path's fp32 temporaries


def cross_entropy_reference(logits, labels, ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=ignore_index, reduction=reduction)


def _blocks(v: int, t: int) -> tuple[int, int]:
    block_v = min(triton.next_power_of_2(v), 8192 if INTERPRET else 4096)
    budget = 1 << 15 if INTERPRET else 4096
    block_m = max(1, min(budget // block_v, triton.next_power_of_2(max(t, 1))))
    return block_m, block_v


@triton.jit
def _ce_stats(X, LABELS, MAX, SUMEXP, TARGET, T, V, vocab_start, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T
    local = tl.load(LABELS + rows, mask=row_ok, other=-1).to(tl.int64) - vocab_start
    row_base = rows.to(tl.int64) * V
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    target = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        x = tl.load(X + row_base[:, None] + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        x = tl.where(col_ok[None, :], x.to(tl.float32), float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        m = m_new
        target += tl.sum(tl.where(cols[None, :] == local[:, None], x, 0.0), axis=1)
    tl.store(MAX + rows, m, mask=row_ok)
    tl.store(SUMEXP + rows, s, mask=row_ok)
    tl.store(TARGET + rows, target, mask=row_ok)


@triton.jit
def _ce_grad(X, LABELS, LSE, G, DX, T, V, vocab_start, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr):
    # dx = g * (softmax(x) - onehot(label)); DX may be X itself (in place, chunk by chunk).
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T
    local = tl.load(LABELS + rows, mask=row_ok, other=-1).to(tl.int64) - vocab_start
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    g = tl.load(G + rows, mask=row_ok, other=0.0)
    row_base = rows.to(tl.int64) * V
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = row_ok[:, None] & (cols[None, :] < V)
        offs = row_base[:, None] + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp(x - lse[:, None])
        dx = g[:, None] * (p - tl.where(cols[None, :] == local[:, None], 1.0, 0.0))
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


def _stats(x: torch.Tensor, labels: torch.Tensor, vocab_start: int):
    """Per-row (max, sum of exp(x - max), target logit or 0) of a [T, V] slice, fp32 [T] each."""
    t, v = x.shape
    if use_triton(x):
        m, s, tgt = (torch.empty(t, dtype=torch.float32, device=x.device) for _ in range(3))
        block_m, block_v = _blocks(v, t)
        launch("cross_entropy_fwd", _ce_stats, (triton.cdiv(t, block_m),), x, labels, m, s, tgt, t, v, vocab_start,
               BLOCK_M=block_m, BLOCK_V=block_v, num_warps=num_warps_for(block_m * block_v))
        return m, s, tgt
    ms, ss, ts = [], [], []
    for i in range(0, t, _REFERENCE_ROWS):
        xf = x[i:i + _REFERENCE_ROWS].float()
        m = xf.amax(-1)
        ms.append(m)
        ss.append(torch.exp(xf - m[:, None]).sum(-1))
        local = labels[i:i + _REFERENCE_ROWS] - vocab_start
        inside = (local >= 0) & (local < v)
        ts.append(torch.where(inside, xf.gather(1, local.clamp(0, v - 1)[:, None])[:, 0], 0.0))
    return torch.cat(ms), torch.cat(ss), torch.cat(ts)


def _grad(x, labels, lse, g, vocab_start: int, out: torch.Tensor) -> torch.Tensor:
    """out = g * (softmax(x) - onehot(labels - vocab_start)), softmax from the given global lse."""
    t, v = x.shape
    if use_triton(x):
        block_m, block_v = _blocks(v, t)
        launch("cross_entropy_bwd", _ce_grad, (triton.cdiv(t, block_m),), x, labels, lse, g, out, t, v, vocab_start,
               BLOCK_M=block_m, BLOCK_V=block_v, num_warps=num_warps_for(block_m * block_v))
        return out
    for i in range(0, t, _REFERENCE_ROWS):
        rows = slice(i, i + _REFERENCE_ROWS)
        d = torch.exp(x[rows].float() - lse[rows, None])
        local = labels[rows] - vocab_start
        inside = (local >= 0) & (local < v)
        d[inside, local[inside]] -= 1.0
        out[rows] = (d * g[rows, None]).to(out.dtype)
    return out


def _global_lse(m, s, tgt, all_reduce: AllReduce | None):
    """Combine per-slice partials into the global log-sum-exp and target logit (in place)."""
    if all_reduce is not None:
        m_global = m.clone()
        all_reduce(m_global, "max")
        s = s * torch.exp(m - m_global)
        all_reduce(s, "sum")
        all_reduce(tgt, "sum")
        m = m_global
    return m + torch.log(s), tgt


def _row_weights(valid: torch.Tensor, reduction: str, count: torch.Tensor) -> torch.Tensor:
    w = valid.to(torch.float32)
    return w / count if reduction == "mean" else w


def _reduce(loss_rows: torch.Tensor, reduction: str, count: torch.Tensor) -> torch.Tensor:
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    return total / count if reduction == "mean" else total


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index: int, reduction: str, vocab_start: int, all_reduce):
        m, s, tgt = _stats(logits, labels, vocab_start)
        lse, tgt = _global_lse(m, s, tgt, all_reduce)
        valid = labels != ignore_index
        loss_rows = torch.where(valid, lse - tgt, 0.0)
        count = valid.sum().to(torch.float32)
        ctx.save_for_backward(logits, labels, lse, valid, count)
        ctx.reduction, ctx.vocab_start = reduction, vocab_start
        return _reduce(loss_rows, reduction, count)

    @staticmethod
    def backward(ctx, grad):
        logits, labels, lse, valid, count = ctx.saved_tensors
        g = _row_weights(valid, ctx.reduction, count) * grad.float()
        dx = _grad(logits, labels, lse, g.contiguous(), ctx.vocab_start, torch.empty_like(logits))
        return dx, None, None, None, None, None


def _check_reduction(reduction: str, allowed=("none", "sum", "mean")) -> None:
    if reduction not in allowed:
        raise ValueError(f"reduction must be one of {', '.join(allowed)}; got {reduction!r}")


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, reduction: str = "mean",
                  vocab_start: int = 0, all_reduce: AllReduce | None = None) -> torch.Tensor:
    """F.cross_entropy(logits.float(), labels, ignore_index, reduction) without the fp32 copy.

    logits [..., V] (any float dtype), labels [...]. The loss is fp32, as the reference's.
    For a vocab-sharded head pass `vocab_start` and `all_reduce` (see the module docstring)."""
    _check_reduction(reduction)
    if type(logits) not in (torch.Tensor, torch.nn.Parameter):  # DTensor under loss_parallel()
        if all_reduce is not None or vocab_start:
            raise ValueError("vocab_start/all_reduce work on local logits shards, not on a DTensor")
        return cross_entropy_reference(logits, labels, ignore_index, reduction)
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match logits {tuple(logits.shape)} without the vocabulary")
    out = _CrossEntropy.apply(logits.reshape(-1, logits.shape[-1]).contiguous(), labels.reshape(-1).contiguous(),
                              ignore_index, reduction, vocab_start, all_reduce)
    return out.view(labels.shape) if reduction == "none" else out


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index: int, reduction: str, chunk_size: int,
                vocab_start: int, all_reduce, needs_grad: bool):
        with torch.autocast(hidden.device.type, enabled=False):  # dtypes are chosen here, not by autocast
            return _LinearCrossEntropy._forward(ctx, hidden, weight, bias, labels, ignore_index, reduction,
                                                chunk_size, vocab_start, all_reduce, needs_grad)

    @staticmethod
    def _forward(ctx, hidden, weight, bias, labels, ignore_index, reduction, chunk_size, vocab_start, all_reduce,
                 needs_grad):
        t, h = hidden.shape
        dtype = hidden.dtype
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        valid = labels != ignore_index
        count = valid.sum().to(torch.float32)
        row_weights = _row_weights(valid, reduction, count)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        dh = torch.empty_like(hidden) if needs_grad else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if needs_grad and weight.requires_grad else None
        db = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) \
            if needs_grad and bias is not None else None
        for i in range(0, t, chunk_size):
            rows = slice(i, min(t, i + chunk_size))
            h_c, y_c = hidden[rows], labels[rows]
            logits = F.linear(h_c, w, b)  # [chunk, V_local], the only vocabulary-wide buffer
            m, s, tgt = _stats(logits, y_c, vocab_start)
            lse, tgt = _global_lse(m, s, tgt, all_reduce)
            loss += torch.where(valid[rows], lse - tgt, 0.0).sum()
            if not needs_grad:  # evaluation: the loss alone
                continue
            dlogits = _grad(logits, y_c, lse, row_weights[rows].contiguous(), vocab_start, out=logits)
            torch.mm(dlogits, w, out=dh[rows])
            if dw is not None and dw.dtype == dtype:
                dw.addmm_(dlogits.t(), h_c)
            elif dw is not None:  # low-precision GEMM, fp32 accumulation across chunks
                dw += (dlogits.t() @ h_c).float()
            if db is not None:
                db += dlogits.float().sum(0)
        if all_reduce is not None and needs_grad:
            all_reduce(dh, "sum")  # each vocabulary slice contributes to every hidden state
        ctx.save_for_backward(dh, dw, db)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return loss / count if reduction == "mean" else loss

    @staticmethod
    def backward(ctx, grad):
        dh, dw, db = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        g = grad.float()
        dh = (dh * g).to(dh.dtype)
        dw = (dw * g).to(w_dtype) if dw is not None else None
        db = (db * g).to(b_dtype) if db is not None else None
        return dh, dw, db, None, None, None, None, None, None, None


def default_chunk_size(tokens: int, hidden: int, vocab: int) -> int:
    """Tokens per chunk such that one chunk's logits are about as large as the hidden states."""
    return max(1, min(tokens, math.ceil(tokens / math.ceil(vocab / hidden))))


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                         ignore_index: int = -100, reduction: str = "mean", chunk_size: int | None = None,
                         vocab_start: int = 0, all_reduce: AllReduce | None = None) -> torch.Tensor:
    """cross_entropy(F.linear(hidden, weight, bias), labels) without the logits of all tokens.

    hidden [..., H], weight [V, H] (a decoder, possibly tied, possibly a vocabulary slice),
    labels [...]. Arithmetic runs in hidden's dtype (weight cast to it), the loss in fp32.
    `chunk_size` tokens per step (default: logits of a chunk ~ the size of `hidden`). Without
    autograd (evaluation, no_grad) only the loss is computed: no gradient buffers, one GEMM."""
    _check_reduction(reduction, ("sum", "mean"))
    h2 = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    y = labels.reshape(-1).contiguous()
    if y.shape[0] != h2.shape[0]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match hidden {tuple(hidden.shape)}")
    chunk = chunk_size or default_chunk_size(h2.shape[0], h2.shape[1], weight.shape[0])
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    return _LinearCrossEntropy.apply(h2, weight, bias, y, ignore_index, reduction, chunk, vocab_start, all_reduce,
                                     needs_grad)

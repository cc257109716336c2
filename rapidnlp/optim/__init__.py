"""Optimizers (AdamW, LAMB), the learning-rate schedule, and gradient clipping on full norms."""
from __future__ import annotations

import math

import torch
from torch import nn

from rapidnlp.config import TrainConfig
from rapidnlp.optim.lamb import Lamb


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and embeddings only; biases and LayerNorm weights are exempt (BERT)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainConfig, *, zero1_group=None) -> torch.optim.Optimizer:
    """AdamW or LAMB; with zero1_group (ZeRO stage 1) wrapped in torch's ZeroRedundancyOptimizer,
    which gives each dp rank the optimizer state of a 1/dp share of the parameters."""
    groups = param_groups(model, cfg.weight_decay)
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "lamb":
        cls, kwargs = Lamb, dict(lr=cfg.lr, betas=betas, eps=cfg.eps)
    else:
        fused = cfg.fused_adamw or next(model.parameters()).is_cuda
        cls, kwargs = torch.optim.AdamW, dict(lr=cfg.lr, betas=betas, eps=cfg.eps, fused=True if fused else None)
    if zero1_group is None:
        return cls(groups, **kwargs)
    from torch.distributed.optim import ZeroRedundancyOptimizer

    # LAMB's per-tensor trust ratios stay exact: ZeRO-1 partitions whole tensors, it does not split them.
    return ZeroRedundancyOptimizer(groups, optimizer_class=cls, process_group=zero1_group, **kwargs)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over warmup_steps, then linear or cosine decay to min_lr at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_decay == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, progress)
    if cfg.lr_decay == "cosine":
        factor = 0.5 * (1 + math.cos(math.pi * progress))
    else:
        factor = 1 - progress
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * factor

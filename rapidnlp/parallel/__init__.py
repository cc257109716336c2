"""Turns a plain model into a parallel one: tensor/sequence parallelism, then data parallelism.

The order matters (ARCHITECTURE.md): TP first (DTensors over the tp axis), then FSDP/replicate
over the dp axis, which composes with the tp DTensors into 2-D ones.
"""
from __future__ import annotations

from torch import nn

from rapidnlp.config import ParallelConfig
from rapidnlp.dist.mesh import ParallelDims
from rapidnlp.model.bert import BertForMLM
from rapidnlp.parallel.data_parallel import apply_ddp, apply_fsdp
from rapidnlp.parallel.tensor_parallel import apply_tensor_parallel


def parallelize(model: BertForMLM, dims: ParallelDims, cfg: ParallelConfig) -> nn.Module:
    if dims.tp_enabled:
        apply_tensor_parallel(
            model, dims.mesh["tp"], sequence_parallel=cfg.sequence_parallel, loss_parallel=cfg.loss_parallel
        )
    if dims.dp_enabled:
        if cfg.dp_mode == "fsdp":
            return apply_fsdp(model, dims.mesh["dp"])
        return apply_ddp(model, dims.mesh["dp"], has_dtensors=dims.tp_enabled)
    return model


def uses_loss_parallel(dims: ParallelDims, cfg: ParallelConfig) -> bool:
    return dims.tp_enabled and cfg.loss_parallel

"""Turns a plain model into a parallel one: tensor/sequence parallelism, activation
checkpointing, per-block compile, then data parallelism.

The order matters (ARCHITECTURE.md; torchtitan's): TP first (DTensors over the tp axis), then
FSDP/replicate over the dp axis, which composes with the tp DTensors into 2-D ones; blocks are
compiled after TP and checkpointing (which they trace) and before FSDP (whose hooks stay eager).
"""
from __future__ import annotations

import torch
from torch import nn

from rapidnlp.config import ParallelConfig, TrainConfig
from rapidnlp.distributed.mesh import ParallelDims
from rapidnlp.model.bert import BertForMLM
from rapidnlp.parallel.activation_checkpoint import apply_activation_checkpointing
from rapidnlp.parallel.compile import apply_compile, compile_enabled
from rapidnlp.parallel.data_parallel import apply_ddp, apply_fsdp
from rapidnlp.parallel.tensor_parallel import apply_tensor_parallel


def parallelize(model: BertForMLM, dims: ParallelDims, cfg: ParallelConfig, train: TrainConfig,
                source: BertForMLM | None = None) -> nn.Module:
    """TP, activation checkpointing, compile, then dp. Pieces built on the meta device (entity tables) get
    storage once they are sharded: after TP and FSDP, so a rank only ever holds its shard; before
    DDP/replicate, which hold whole replicas anyway. `source`: the whole model they initialise from
    (a pipeline stage's own model when None)."""
    if dims.tp_enabled:
        apply_tensor_parallel(
            model, dims.mesh["tp"], sequence_parallel=cfg.sequence_parallel, loss_parallel=cfg.loss_parallel
        )
    apply_activation_checkpointing(model, train.activation_checkpoint, train.activation_checkpoint_every)
    if compile_enabled(train, cfg, dims.device):
        apply_compile(model)
    if dims.dp_enabled or cfg.cpu_offload:
        reduce_dtype = torch.bfloat16 if train.grad_reduce_dtype == "bf16" else None  # None: the parameters' fp32
        if cfg.zero >= 2:
            sharded = apply_fsdp(model, dims.fsdp_mesh, reshard_after_forward=cfg.zero == 3,
                                 cpu_offload=cfg.cpu_offload, reduce_dtype=reduce_dtype)
            model.materialize_pieces(dims.device, source)
            return sharded
        model.materialize_pieces(dims.device, source)
        # Pipeline stages need the composable replicate too: DDP's reducer asserts under Interleaved1F1B.
        return apply_ddp(model, dims.mesh["dp"], has_dtensors=dims.tp_enabled or dims.pp_enabled,
                         reduce_dtype=reduce_dtype)
    model.materialize_pieces(dims.device, source)
    return model


def uses_loss_parallel(dims: ParallelDims, cfg: ParallelConfig) -> bool:
    return dims.tp_enabled and cfg.loss_parallel

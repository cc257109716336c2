"""Data parallelism over the mesh's dp axis: FSDP2 (`fully_shard`, ZeRO-3) or DDP.

DDP is classic `DistributedDataParallel` when the model holds no DTensors (tp = 1), and the
composable, FSDP-based `replicate` otherwise: classic DDP fails on DTensor parameters
(ARCHITECTURE.md).

Both average gradients over dp, as usual. The trainer's loss is already a mean over the whole
global batch, so it scales each rank's loss by dp to turn that average back into the sum
(a divide factor of 1 would need ReduceOp.PREMUL_SUM, which gloo lacks).
"""
from __future__ import annotations

from torch import nn
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from rapidnlp.model.bert import BertForMLM


def apply_fsdp(model: BertForMLM, dp_mesh: DeviceMesh) -> nn.Module:
    for block in model.layers.values():
        fully_shard(block, mesh=dp_mesh)
    # The root unit holds the embeddings and the MLM head: the tied weight lives in one unit.
    fully_shard(model, mesh=dp_mesh)
    return model


def apply_ddp(model: BertForMLM, dp_mesh: DeviceMesh, *, has_dtensors: bool) -> nn.Module:
    if has_dtensors:
        replicate(model, mesh=dp_mesh)
        return model
    return DistributedDataParallel(model, process_group=dp_mesh.get_group(), broadcast_buffers=False)

"""Data parallelism over the mesh's dp axis, by ZeRO stage (`parallel.zero`):

- 0: DDP, gradients all-reduced, everything replicated;
- 1: DDP + torch's ZeroRedundancyOptimizer (rapidnlp/optim): optimizer state partitioned over dp;
- 2: FSDP2 `fully_shard(reshard_after_forward=False)`: parameters stay whole between forward and
  backward, gradients are reduce-scattered and the optimizer steps on 1/dp shards;
- 3: FSDP2 `fully_shard`: parameters sharded too, gathered per block when used;
- HSDP: stage 2/3 over a 2-D (replicate, shard) mesh: shard within a group, all-reduce across;
- CPU offload (stage 3): FSDP2's CPUOffloadPolicy, pinned memory only where CUDA exists.

DDP is classic `DistributedDataParallel` when the model holds no DTensors (tp = 1), and the
composable, FSDP-based `replicate` otherwise: classic DDP fails on DTensor parameters
(ARCHITECTURE.md).

Both average gradients over dp, as usual. The trainer's loss is already a mean over the whole
global batch, so it scales each rank's loss by dp to turn that average back into the sum
(a divide factor of 1 would need ReduceOp.PREMUL_SUM, which gloo lacks).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from rapidnlp.model.bert import BertForMLM


def apply_fsdp(model: BertForMLM, mesh: DeviceMesh, *, reshard_after_forward: bool = True,
               cpu_offload: bool = False) -> nn.Module:
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    kwargs = dict(mesh=mesh, reshard_after_forward=reshard_after_forward, offload_policy=offload)
    for block in model.layers.values():
        fully_shard(block, **kwargs)
    # The root unit holds the embeddings and the MLM head: the tied weight lives in one unit.
    fully_shard(model, **kwargs)
    return model


def apply_ddp(model: BertForMLM, dp_mesh: DeviceMesh, *, has_dtensors: bool) -> nn.Module:
    if has_dtensors:
        replicate(model, mesh=dp_mesh)
        return model
    return DistributedDataParallel(model, process_group=dp_mesh.get_group(), broadcast_buffers=False)

"""Data parallelism over the mesh's dp axis, by ZeRO stage (`parallel.zero`):

- 0: DDP, gradients all-reduced, everything replicated;
- 1: DDP + torch's ZeroRedundancyOptimizer (rapidnlp/optim): optimizer state partitioned over dp;
- 2: FSDP2 `fully_shard(reshard_after_forward=False)`: parameters stay whole between forward and
  backward, gradients are reduce-scattered and the optimizer steps on 1/dp shards;
- 3: FSDP2 `fully_shard`: parameters sharded too, gathered per block when used;
- HSDP: stage 2/3 over a 2-D (replicate, shard) mesh: shard within a group, all-reduce across;
- CPU offload (stage 3): FSDP2's CPUOffloadPolicy, pinned memory only where CUDA exists.

Gradients are reduced in fp32 (the parameters are fp32 master weights; bf16/fp16 is autocast
compute) unless `train.grad_reduce_dtype = bf16`, which halves the reduction traffic: FSDP2 and
`replicate` take it as MixedPrecisionPolicy(reduce_dtype), classic DDP as its bf16 compression
hook (our own: torch's asks for NCCL); the reduced gradient is cast back to fp32 before the
optimizer sees it.

DDP is classic `DistributedDataParallel` when the model holds no DTensors (tp = 1), and the
composable, FSDP-based `replicate` otherwise: classic DDP fails on DTensor parameters
(ARCHITECTURE.md).

Both average gradients over dp, as usual. The trainer's loss is already a mean over the whole
global batch, so it scales each rank's loss by dp to turn that average back into the sum
(a divide factor of 1 would need ReduceOp.PREMUL_SUM, which gloo lacks).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from rapidnlp.errors import UserError
from rapidnlp.model.bert import BertForMLM


def apply_fsdp(model: BertForMLM, mesh: DeviceMesh, *, reshard_after_forward: bool = True,
               cpu_offload: bool = False, reduce_dtype: torch.dtype | None = None) -> nn.Module:
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    kwargs = dict(mesh=mesh, reshard_after_forward=reshard_after_forward, offload_policy=offload,
                  mp_policy=MixedPrecisionPolicy(reduce_dtype=reduce_dtype))
    for block in model.layers.values():
        fully_shard(block, **kwargs)
    for unit in piece_units(model):
        fully_shard(unit if len(unit) > 1 else unit[0], **kwargs)
    # The root unit holds the embeddings, the final norm and the other pieces (the MLM head:
    # the tied weight lives in one unit). It stays unsharded from forward to backward, as
    # torchtitan keeps its output layer (backward would gather it again at once), and so that the
    # fused MLM loss, which runs after the forward, reads the whole decoder (pretrain/mlm.py).
    fully_shard(model, **{**kwargs, "reshard_after_forward": False})
    return model


def piece_units(model: BertForMLM) -> list[list[nn.Module]]:
    """The pieces' own FSDP units (`Piece.fsdp_units`) present in this model (a pipeline stage may
    lack some): modules that share a parameter, such as the entity table that the fusion module
    and the SPO head both look up, are one unit (FSDP2 gathers it before the first of them runs
    and reshards it after the last; an FSDP parameter belongs to one unit only)."""
    units: list[list[nn.Module]] = []
    for piece in model.pieces.values():
        owner = getattr(model, piece.name)
        for name in piece.fsdp_units if owner is not None else ():
            module = owner.get_submodule(name)
            params = {id(p) for p in module.parameters()}
            unit = next((u for u in units if params & {id(p) for m in u for p in m.parameters()}), None)
            if unit is None:
                units.append([module])
            elif module not in unit:
                unit.append(module)
    return units


def apply_ddp(model: BertForMLM, dp_mesh: DeviceMesh, *, has_dtensors: bool,
              reduce_dtype: torch.dtype | None = None) -> nn.Module:
    if has_dtensors:
        _replicate()(model, mesh=dp_mesh, mp_policy=MixedPrecisionPolicy(reduce_dtype=reduce_dtype))
        return model
    ddp = DistributedDataParallel(model, process_group=dp_mesh.get_group(), broadcast_buffers=False)
    if reduce_dtype == torch.bfloat16:
        ddp.register_comm_hook(dp_mesh.get_group(), _bf16_allreduce)
    return ddp


def _replicate():
    """The composable, FSDP-based `replicate`. Private API (torch.distributed._composable); imported
    only when used, so the project imports and trains on torches that lack it (GPU machines' own)."""
    try:
        from torch.distributed._composable.replicate_with_fsdp import replicate
    except ImportError:
        raise UserError("parallel.zero = 0/1 with tensor or pipeline parallelism needs torch's FSDP-based "
                        f"replicate, which torch {torch.__version__} lacks; use parallel.zero = 2 or 3") from None
    return replicate


def _bf16_allreduce(group: dist.ProcessGroup, bucket):
    """DDP comm hook: average a gradient bucket (a dist.GradBucket; DDP refuses its annotations as
    strings) in bf16, on any backend. Returns a future of the averaged fp32 bucket."""
    compressed = bucket.buffer().to(torch.bfloat16).div_(group.size())
    future = dist.all_reduce(compressed, group=group, async_op=True).get_future()

    def decompress(fut: torch.futures.Future) -> torch.Tensor:
        return bucket.buffer().copy_(fut.value()[0])

    return future.then(decompress)

"""Global norms of tensors that may be DTensor shards: the one place that knows how.

Clipping and LAMB's trust ratios must see the norm of the full tensor, never of a local shard:
each rank sums the squares of its shard, and the sums are all-reduced over exactly the mesh
axes that shard the tensor (replicated axes already hold whole copies). Tensors are grouped by
(mesh, placements) so that a whole model costs a handful of collectives, not one per tensor.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def squared_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Squared L2 norm of each full tensor, in fp32, as one vector on the tensors' device."""
    if not tensors:
        return torch.zeros(0)
    out = [None] * len(tensors)
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        key = (t.device_mesh, tuple(t.placements)) if isinstance(t, DTensor) else None
        groups.setdefault(key, []).append(i)
    for key, members in groups.items():
        local = torch.stack([local_tensor(tensors[i]).float().pow(2).sum() for i in members])
        if key is not None:
            mesh, placements = key
            for dim, placement in enumerate(placements):
                if placement.is_partial():  # a bug: the caller must reduce partial sums first
                    raise RuntimeError("squared_norms needs Shard/Replicate tensors, got a Partial placement")
                if not placement.is_replicate():  # Shard, and FSDP's _StridedShard under TP
                    dist.all_reduce(local, group=mesh.get_group(dim))
        for j, i in enumerate(members):
            out[i] = local[j]
    return torch.stack(out)


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    return squared_norms(tensors).sum().sqrt()


def clip_grad_norm_(parameters, max_norm: float) -> float:
    """Scale gradients so that their global norm is at most max_norm (0: no clipping).

    Returns the norm before clipping.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    total = global_norm(grads)
    if max_norm > 0:
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            local_tensor(g).mul_(scale.to(g.dtype))
    return float(total)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The shard this rank holds (the tensor itself when it is not a DTensor)."""
    return t.to_local() if isinstance(t, DTensor) else t

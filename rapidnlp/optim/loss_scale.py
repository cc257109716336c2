"""Dynamic loss scaling for fp16: scale the loss up so that small gradients survive fp16, and
skip the step when that overflowed.

On inf/nan anywhere (any rank, any shard) the step is skipped and the scale halved; after
`growth_interval` clean steps in a row it doubles. Works on local shards with one all-reduce,
so it serves DTensor and FSDP gradients alike (torch's GradScaler does not see across shards).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from rapidnlp.optim.norms import local_tensor


class DynamicLossScaler:
    def __init__(self, init_scale: float = 2.0**16, growth_interval: int = 1000, *, backoff: float = 0.5,
                 growth: float = 2.0, min_scale: float = 1.0):
        self.scale = init_scale
        self.growth_interval = growth_interval
        self.backoff = backoff
        self.growth = growth
        self.min_scale = min_scale
        self.clean_steps = 0

    def unscale_and_check(self, grads: list[torch.Tensor]) -> bool:
        """Divide the gradients by the scale in place; True when any of them is inf/nan on any rank."""
        inv = 1.0 / self.scale
        found = torch.zeros((), dtype=torch.float32, device=grads[0].device if grads else "cpu")
        for g in grads:
            local = local_tensor(g)
            local.mul_(inv)
            found = torch.maximum(found, (~torch.isfinite(local)).any().float())
        if dist.is_initialized():
            dist.all_reduce(found, op=dist.ReduceOp.MAX)
        return bool(found)

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.scale = max(self.min_scale, self.scale * self.backoff)
            self.clean_steps = 0
            return
        self.clean_steps += 1
        if self.clean_steps % self.growth_interval == 0:
            self.scale *= self.growth

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.clean_steps = int(state["clean_steps"])

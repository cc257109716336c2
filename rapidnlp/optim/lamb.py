"""LAMB (You et al. 2019): Adam updates scaled per tensor by ||param|| / ||update||.

NVIDIA apex's FusedLAMB is not installable here; this one works on DTensor shards: the
elementwise math runs on local shards and the trust-ratio norms on full tensors
(rapidnlp/optim/norms.py), so every layout takes the single-process step.
"""
from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from rapidnlp.optim.norms import local_tensor as _local
from rapidnlp.optim.norms import squared_norms


class Lamb(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            params = [p for p in group["params"] if p.grad is not None]
            updates = []
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                step = float(state["step"])
                g, m, v = _local(p.grad), _local(state["exp_avg"]), _local(state["exp_avg_sq"])
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                m_hat = m / (1 - beta1**step)
                v_hat = v / (1 - beta2**step)
                update = m_hat / (v_hat.sqrt() + group["eps"])
                if group["weight_decay"]:
                    update.add_(_local(p), alpha=group["weight_decay"])
                updates.append(_like(p, update))
            if not params:
                continue
            param_norms = squared_norms(params).sqrt()
            update_norms = squared_norms(updates).sqrt()
            trust = torch.where(
                (param_norms > 0) & (update_norms > 0), param_norms / update_norms, torch.ones_like(param_norms)
            )
            for p, u, r in zip(params, updates, trust):
                _local(p).add_(_local(u), alpha=-group["lr"] * float(r))
        return None


def _like(p: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """Wrap a local update as a DTensor laid out like its parameter, so its norm is global."""
    if isinstance(p, DTensor):
        return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
    return local

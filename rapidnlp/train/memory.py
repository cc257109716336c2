"""Per-rank memory accounting: bytes of parameters, gradients, optimizer state and activations.

Parameters, gradients and optimizer state are the local shards this rank holds (DTensor shards
under TP/FSDP, ZeroRedundancyOptimizer's partition). Activations are the bytes autograd saves
for backward during one micro-batch's forward, excluding the parameters themselves (which are
saved by reference): on CPU the only way to see them, and the quantity activation
checkpointing reduces. On GPU, CUDA's max_allocated is reported beside it (metrics.py).
"""
from __future__ import annotations

import contextlib

import torch

from rapidnlp.optim.norms import local_tensor


def tensor_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        if t is not None:
            local = local_tensor(t)
            total += local.numel() * local.element_size()
    return total


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    inner = getattr(optimizer, "optim", optimizer)  # ZeroRedundancyOptimizer holds this rank's partition
    return tensor_bytes(v for state in inner.state.values() for v in state.values() if isinstance(v, torch.Tensor))


class ActivationCounter:
    """Counts the bytes saved for backward inside `track()`, each storage once.

    Parameters (leaves that require grad, also FSDP's unsharded ones) are saved by reference and
    not counted."""

    def __init__(self):
        self.bytes = 0
        self._seen: set[int] = set()

    def _pack(self, t: torch.Tensor):
        if isinstance(t, torch.Tensor) and not t.is_meta and not (t.is_leaf and t.requires_grad):
            local = local_tensor(t)
            storage = local.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self._seen:
                self._seen.add(ptr)
                self.bytes += storage.nbytes()
        return t

    @contextlib.contextmanager
    def track(self):
        self.bytes, self._seen = 0, set()
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield


def estimate_state_bytes(model_cfg, *, tp: int = 1, dp: int = 1, zero: int = 0, hsdp_shard: int = 0,
                         optimizer_slots: int = 2, bytes_per_value: int = 4) -> dict[str, int]:
    """Per-rank bytes of parameters, gradients and optimizer state held between steps, computed
    from the model on the meta device and the TP plan (no process group, no memory).

    Tied weights count once. AdamW and LAMB keep two fp32 slots per value. ZeRO divides by dp
    (by the shard group under HSDP): stage 1 the optimizer state, stage 2 also the gradients and,
    between steps, the parameters (FSDP2 reshards them after backward; stage 2 differs from 3 in
    keeping them whole from forward to the end of backward: + the full size at peak).
    """
    from rapidnlp.model.bert import BertForMLM
    from rapidnlp.parallel.tensor_parallel import is_tp_sharded

    with torch.device("meta"):
        model = BertForMLM(model_cfg)
    per_rank = sum(p.numel() / tp if is_tp_sharded(n) else p.numel() for n, p in model.named_parameters())
    shard = hsdp_shard or dp
    values = {
        "mem_params_bytes": per_rank / (shard if zero >= 2 else 1),
        "mem_grads_bytes": per_rank / (shard if zero >= 2 else 1),
        "mem_optimizer_bytes": optimizer_slots * per_rank / (shard if zero >= 1 else 1),
    }
    return {k: int(v * bytes_per_value) for k, v in values.items()}

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

"""Per-rank memory accounting: bytes of parameters, gradients, optimizer state and activations.

Parameters, gradients and optimizer state are the local shards this rank holds (DTensor shards
under TP/FSDP, ZeroRedundancyOptimizer's partition). Activations are the peak bytes autograd
holds saved for backward during a step, excluding the parameters themselves (which are saved by
reference): on CPU the only way to see them, and the quantity activation checkpointing and the
pipeline schedule change. On GPU, CUDA's max_allocated is reported beside it (metrics.py).
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
    """Peak bytes of the tensors saved for backward and still alive, over a `track()` block.

    Each storage counts once, from the forward that saves it until autograd frees it after the
    backward that used it. Over one training step this is one micro-batch's forward without
    pipelining (micro-batches run forward and backward one after the other), and with it the
    micro-batches a schedule keeps in flight on this rank (GPipe all of them, 1F1B at most
    pp - stage). Parameters and views of them (leaves that require grad, also FSDP's unsharded
    ones) are saved by reference and not counted."""

    def __init__(self):
        self.bytes = 0  # the peak of the last track()
        self._live = 0
        self._refs: dict[int, list[int]] = {}  # storage pointer -> [saved references, bytes]

    def _pack(self, t: torch.Tensor):
        if not isinstance(t, torch.Tensor) or t.is_meta or _is_parameter(t):
            return t
        storage = local_tensor(t).untyped_storage()
        ptr = storage.data_ptr()
        entry = self._refs.setdefault(ptr, [0, storage.nbytes()])
        if entry[0] == 0:
            self._live += entry[1]
            self.bytes = max(self.bytes, self._live)
        entry[0] += 1
        return _Saved(t, self, ptr)

    def _release(self, ptr: int) -> None:
        entry = self._refs.get(ptr)
        if entry is None:  # saved under an earlier track()
            return
        entry[0] -= 1
        if entry[0] == 0:
            self._live -= entry[1]
            del self._refs[ptr]

    @staticmethod
    def _unpack(saved):
        return saved.tensor if isinstance(saved, _Saved) else saved

    @contextlib.contextmanager
    def track(self):
        self.bytes, self._live, self._refs = 0, 0, {}
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield


def _is_parameter(t: torch.Tensor) -> bool:
    """A parameter or a view of one (Linear saves its weight transposed)."""
    base = t._base if t._base is not None else t
    return base.is_leaf and base.requires_grad


class _Saved:
    """A saved tensor as autograd holds it; dropping it (autograd frees the graph) releases it."""

    __slots__ = ("tensor", "_counter", "_ptr")

    def __init__(self, tensor: torch.Tensor, counter: ActivationCounter, ptr: int):
        self.tensor, self._counter, self._ptr = tensor, counter, ptr

    def __del__(self):
        # Compiled blocks (train.compile) may copy a saved tensor's box, and a copy has no slots set.
        if hasattr(self, "_counter"):
            self._counter._release(self._ptr)


def meta_model(config):
    """The whole model with its objectives' modules (entity tables too) on the meta device: no
    memory. Knowledge table sizes come from the config's knowledge.num_* fields."""
    from rapidnlp.pretrain.objective import build_model, build_objectives

    with torch.device("meta"):
        return build_model(config, build_objectives(config), materialize=False)


def estimate_state_bytes(config, *, tp: int = 1, dp: int = 1, zero: int = 0, hsdp_shard: int = 0,
                         optimizer_slots: int = 2, bytes_per_value: int = 4) -> dict[str, int]:
    """Per-rank bytes of parameters, gradients and optimizer state held between steps, computed
    from the model (a Config: with its objectives' modules; a ModelConfig: the plain masked LM)
    on the meta device and the TP plans (no process group, no memory).

    Tied weights count once. AdamW and LAMB keep two fp32 slots per value. ZeRO divides by dp
    (by the shard group under HSDP): stage 1 the optimizer state, stage 2 also the gradients and,
    between steps, the parameters (FSDP2 reshards them after backward; stage 2 differs from 3 in
    keeping them whole from forward to the end of backward: + the full size at peak).
    """
    from rapidnlp.config import Config, ModelConfig
    from rapidnlp.parallel.tensor_parallel import is_tp_sharded

    if isinstance(config, ModelConfig):
        config = Config(model=config)
    model = meta_model(config)
    per_rank = sum(p.numel() / tp if is_tp_sharded(n, model.pieces) else p.numel() for n, p in model.named_parameters())
    shard = hsdp_shard or dp
    values = {
        "mem_params_bytes": per_rank / (shard if zero >= 2 else 1),
        "mem_grads_bytes": per_rank / (shard if zero >= 2 else 1),
        "mem_optimizer_bytes": optimizer_slots * per_rank / (shard if zero >= 1 else 1),
    }
    return {k: int(v * bytes_per_value) for k, v in values.items()}

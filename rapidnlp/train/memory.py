"""Per-rank memory accounting: bytes of parameters, gradients, optimizer state and activations.

Parameters, gradients and optimizer state are the local shards this rank holds (DTensor shards
under TP/FSDP, ZeroRedundancyOptimizer's partition). Activations are the peak bytes autograd
holds saved for backward during a step, excluding the parameters themselves (which are saved by
reference): on CPU the only way to see them, and the quantity activation checkpointing and the
pipeline schedule change. On GPU, CUDA's max_allocated is reported beside it (metrics.py).
"""
from __future__ import annotations

import contextlib
import copy

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


class AllocationPeak:
    """Peak bytes of the tensors created inside a `track()` block and alive at once, on any device
    (CPU too, where no allocator keeps statistics): every storage an operator returns that the
    block had not seen before, from its creation until its last reference dies. Storages that
    existed before the block (parameters, inputs, operands of in-place ops) are not counted.
    A torch dispatch mode sees every operator, autograd's backward included; it is for
    benchmarks and tests (each operator pays a Python call), not for training steps."""

    def __init__(self):
        self.bytes = 0

    @contextlib.contextmanager
    def track(self):
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        created: dict[int, tuple] = {}  # StorageImpl pointer -> (weak reference, bytes)
        outside: dict[int, StorageWeakRef] = {}
        self.bytes = 0
        counter = self

        def storages(values):
            for t in tree_leaves(values):
                if isinstance(t, torch.Tensor) and not t.is_meta:
                    storage = local_tensor(t).untyped_storage()
                    yield StorageWeakRef(storage), storage.nbytes()

        def prune(table: dict, ref_of) -> None:
            for key in [k for k, v in table.items() if ref_of(v).expired()]:
                del table[key]  # freed: a later storage may reuse its address

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                for ref, _ in storages((args, kwargs)):
                    if ref.cdata not in created:
                        outside.setdefault(ref.cdata, ref)
                out = func(*args, **(kwargs or {}))
                prune(created, lambda v: v[0])
                prune(outside, lambda v: v)
                for ref, nbytes in storages(out):
                    if ref.cdata not in created and ref.cdata not in outside:
                        created[ref.cdata] = (ref, nbytes)
                counter.bytes = max(counter.bytes, sum(v[1] for v in created.values()))
                return out

        with Mode():
            yield self


def meta_model(config):
    """The whole model with its objectives' modules (entity tables too) on the meta device: no
    memory. Knowledge table sizes come from the config's knowledge.num_* fields."""
    from rapidnlp.pretrain.objective import build_model, build_objectives

    with torch.device("meta"):
        return build_model(config, build_objectives(config), materialize=False)


def rank_parameter_count(model, config, *, tp: int = 1, pp: int = 1, virtual: int = 1, schedule: str = "1f1b",
                         pp_rank: int | None = None) -> float:
    """Parameter values one rank holds before ZeRO sharding: its pipeline stages' parameters,
    the tp-sharded ones divided by tp, from a (meta) model. Stages follow parallel.pp_split or the
    FLOPs-balanced split and torch's stage placement; a tied copy on another stage than its
    original is a Parameter of its own there. pp_rank None: the rank that holds the most."""
    from rapidnlp.parallel.pipeline import SCHEDULES, layer_split, stage_placement
    from rapidnlp.parallel.tensor_parallel import is_tp_sharded

    def size(name, p):
        return p.numel() / tp if is_tp_sharded(name, model.pieces) else p.numel()

    if pp == 1:
        return float(sum(size(n, p) for n, p in model.named_parameters()))
    split_config = copy.deepcopy(config)
    split_config.parallel.pp, split_config.parallel.pp_virtual_stages = pp, virtual
    counts = layer_split(split_config, model)
    stages = len(counts)
    placement = stage_placement(pp, stages, SCHEDULES[schedule][1])
    layer_stage = {layer: s for s in range(stages) for layer in range(sum(counts[:s]), sum(counts[:s + 1]))}

    def stage_of(name):
        home = model.home_of(name)
        return {"first": 0, "last": stages - 1}[home] if isinstance(home, str) else layer_stage[home]

    per_rank = [0.0] * pp
    params = dict(model.named_parameters())
    for name, p in params.items():
        per_rank[placement[stage_of(name)]] += size(name, p)
    for copy_name, original in model.tied_parameters().items():
        if stage_of(copy_name) != stage_of(original):
            per_rank[placement[stage_of(copy_name)]] += size(copy_name, params[original])
    return per_rank[pp_rank] if pp_rank is not None else max(per_rank)


def state_bytes(per_rank: float, *, dp: int = 1, zero: int = 0, hsdp_shard: int = 0, optimizer_slots: int = 2,
                bytes_per_value: int = 4) -> dict[str, int]:
    """Per-rank bytes of parameters, gradients and optimizer state held between steps, for a rank
    that holds `per_rank` parameter values before ZeRO sharding.

    AdamW and LAMB keep two fp32 slots per value. ZeRO divides by dp (by the shard group under
    HSDP): stage 1 the optimizer state, stage 2 also the gradients and, between steps, the
    parameters (FSDP2 reshards them after backward; stage 2 differs from 3 in keeping them whole
    from forward to the end of backward: + the full size at peak)."""
    shard = hsdp_shard or dp
    values = {
        "mem_params_bytes": per_rank / (shard if zero >= 2 else 1),
        "mem_grads_bytes": per_rank / (shard if zero >= 2 else 1),
        "mem_optimizer_bytes": optimizer_slots * per_rank / (shard if zero >= 1 else 1),
    }
    return {k: int(v * bytes_per_value) for k, v in values.items()}


def estimate_state_bytes(config, *, tp: int = 1, pp: int = 1, dp: int = 1, zero: int = 0, hsdp_shard: int = 0,
                         virtual: int = 1, schedule: str = "1f1b", pp_rank: int | None = None,
                         optimizer_slots: int = 2, bytes_per_value: int = 4) -> dict[str, int]:
    """`state_bytes` of one rank, computed from the model (a Config: with its objectives' modules;
    a ModelConfig: the plain masked LM) on the meta device and the TP plans (no process group, no
    memory). Tied weights count once per stage that holds them. pp_rank None: the fullest rank."""
    from rapidnlp.config import Config, ModelConfig

    if isinstance(config, ModelConfig):
        config = Config(model=config)
    count = rank_parameter_count(meta_model(config), config, tp=tp, pp=pp, virtual=virtual, schedule=schedule,
                                 pp_rank=pp_rank)
    return state_bytes(count, dp=dp, zero=zero, hsdp_shard=hsdp_shard, optimizer_slots=optimizer_slots,
                       bytes_per_value=bytes_per_value)

"""Per-block torch.compile (torchtitan's pattern): each transformer block compiled on its own,
after tensor parallelism and activation checkpointing, before FSDP/replicate.

`Module.compile()` compiles the block in place, so parameter names (and checkpoints) stay what
they are eagerly. All blocks share one code object and Dynamo inlines modules, so the blocks
share their graphs: one per distinct mode a block runs in (training with grad, evaluation
without; a pipeline stage's first block, whose input needs no grad, is another), each compiled
once and reused (`dynamic=False`: every shape in training and evaluation is fixed).

What stays eager: the embeddings, the objectives' pieces and the loss (small, and shaped by the
objectives), and everything between the blocks: FSDP's gathers and the pipeline's sends.
"""
from __future__ import annotations

import torch

from rapidnlp.config import ZERO_BUBBLE, ParallelConfig, TrainConfig


def compile_enabled(train: TrainConfig, parallel: ParallelConfig, device: torch.device) -> bool:
    """train.compile: true, false, or auto: on CUDA devices, off on CPU (where inductor's C++
    code was measured slower than eager for this model: README, "torch.compile") and under the
    zero-bubble schedules (which split the backward; `true` is refused there, config.py)."""
    if train.compile == "auto":
        return device.type == "cuda" and not (parallel.pp > 1 and parallel.pp_schedule in ZERO_BUBBLE)
    return train.compile == "true"


def apply_compile(model) -> None:
    for block in model.layers.values():
        block.compile(dynamic=False)


def compile_seconds() -> float:
    """Seconds spent compiling so far in this process (Dynamo + inductor, forward and backward)."""
    from torch._dynamo.utils import compilation_time_metrics  # private; no public equivalent in torch 2.13

    return sum(sum(compilation_time_metrics.get(key, [])) for key in ("_compile.compile_inner", "backward._backward_impl"))


def compiled_graphs() -> int:
    """Graphs Dynamo has compiled so far in this process (a recompile adds one)."""
    from torch._dynamo.utils import counters  # private; torch._dynamo has no public counter in 2.13

    return int(counters["stats"]["unique_graphs"])

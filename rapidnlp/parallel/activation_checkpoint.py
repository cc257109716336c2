"""Activation checkpointing: keep fewer activations, recompute them in backward.

`full`: every k-th block keeps only its input. `selective`: only the attention core (the
s^2-sized scores and probabilities) is recomputed, as Megatron-LM's selective recompute.
`full` uses the composable `checkpoint` (non-reentrant), which leaves parameter names unchanged,
so checkpoints and conversions do not depend on this setting. `selective` calls
`torch.utils.checkpoint` inside the attention core's forward instead (the core has no parameters,
so no name changes): hooks on a submodule of a compiled block would not be traced into its graph,
and the recomputation would then run another graph than the forward did (train.compile).
Applied after TP, before compile and FSDP.
"""
from __future__ import annotations

import types

from torch.distributed._composable import checkpoint
from torch.utils.checkpoint import checkpoint as recompute

from rapidnlp.model.bert import BertForMLM


def _recomputed_forward(core_forward):
    def forward(self, *args):
        return recompute(core_forward, *args, use_reentrant=False)
    return forward


def apply_activation_checkpointing(model: BertForMLM, mode: str, every: int = 1) -> None:
    if mode == "none":
        return
    for i, block in enumerate(model.layers.values()):
        if mode == "full" and i % every == 0:
            checkpoint(block)
        elif mode == "selective":
            core = block.attention.core
            core.forward = types.MethodType(_recomputed_forward(core.forward), core)

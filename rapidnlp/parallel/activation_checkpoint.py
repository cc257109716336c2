"""Activation checkpointing: keep fewer activations, recompute them in backward.

`full`: every k-th block keeps only its input. `selective`: only the attention core (the
s^2-sized scores and probabilities) is recomputed, as Megatron-LM's selective recompute.
Uses the composable `checkpoint` (non-reentrant), which leaves parameter names unchanged, so
checkpoints and conversions do not depend on this setting. Applied after TP, before FSDP.
"""
from __future__ import annotations

from torch.distributed._composable import checkpoint

from rapidnlp.model.bert import BertForMLM


def apply_activation_checkpointing(model: BertForMLM, mode: str, every: int = 1) -> None:
    if mode == "none":
        return
    for i, block in enumerate(model.layers.values()):
        if mode == "full" and i % every == 0:
            checkpoint(block)
        elif mode == "selective":
            checkpoint(block.attention.core)

"""The plain masked-LM objective.

Returns the *sum* of token losses: the trainer divides by the masked-token count of the whole
global batch, so that micro-batching and data parallelism leave the loss unchanged. Under
tensor parallelism the logits arrive vocab-sharded and this runs inside `loss_parallel()`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rapidnlp.data.mlm import IGNORE_INDEX


def mlm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )

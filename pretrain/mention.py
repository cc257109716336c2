"""Mention detection: a token-tagging head (BIO x entity types, from the side-stream's tags) on
the sentence part of a knowledge sample. Loss: cross-entropy summed over tagged sentence tokens,
normalised by their count over the global batch. Evaluation: span-level F1 (a predicted span
counts when its start, end and type equal a gold span's), reported as 2 TP / (predicted + gold)
so that it sums over micro-batches, ranks and stages.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rapidnlp.model.bert import Piece
from rapidnlp.model.flops import dense_flops
from rapidnlp.pretrain.objective import Objective

IGNORE = -100


class TaggingHead(nn.Module):
    def __init__(self, hidden: int, tags: int):
        super().__init__()
        self.proj = nn.Linear(hidden, tags)

    def forward(self, hidden, key_mask, fields):
        return self.proj(hidden)


def spans(tags: torch.Tensor) -> set[tuple]:
    """(sample, start, end, type) of the BIO spans in tags [b, s] (1 + 2t = B-t, 2 + 2t = I-t)."""
    out, open_span = set(), None
    for b, row in enumerate(tags.tolist()):
        open_span = None
        for i, tag in enumerate(row + [0]):
            inside = tag > 0 and tag % 2 == 0 and open_span is not None and open_span[2] == (tag - 2) // 2
            if open_span is not None and not inside:
                out.add((b, open_span[0], i, open_span[2]))
                open_span = None
            if tag > 0 and tag % 2 == 1:
                open_span = (i, None, (tag - 1) // 2)
    return out


class Mention(Objective):
    name = "mention"
    metric_names = ("f1",)

    def pieces(self) -> list[Piece]:
        h, k = self.config.model.hidden_size, self.config.knowledge
        return [Piece("mention_head", "head", TaggingHead(h, k.num_tags), fields=(),
                      flops_per_sequence=dense_flops(h, k.num_tags, self.config.data.seq_len))]

    def loss_sum(self, outputs, batch):
        logits = outputs["mention_head"]
        return F.cross_entropy(logits.flatten(0, 1).float(), batch["mention_tags"].flatten(),
                               ignore_index=IGNORE, reduction="sum")

    def normaliser(self, batch):
        return (batch["mention_tags"] != IGNORE).sum()

    def metrics(self, outputs, batch):
        gold_tags = batch["mention_tags"]
        predicted_tags = torch.where(gold_tags == IGNORE, torch.zeros_like(gold_tags),
                                     outputs["mention_head"].argmax(-1))
        gold, predicted = spans(gold_tags.clamp(min=0)), spans(predicted_tags)
        return {"f1": (torch.tensor(2.0 * len(gold & predicted)), torch.tensor(float(len(gold) + len(predicted))))}


OBJECTIVE = Mention

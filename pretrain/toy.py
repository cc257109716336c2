"""A toy objective that uses every role of the objective seam (and tests it, written as one file
that touches neither the trainer nor rapidnlp/parallel/):

- a batch field of its own: a per-sequence random "topic" id, a pure function of the run's
  seed and the sample index (so every layout draws the same), plus per-token segment labels
  (0 for the first half of the sequence's real tokens, 1 for the second, -100 on padding);
- input side: the topic embedded and added to every token's embedding;
- after block 2 (layer index 1): a gated adapter over the whole sequence
  (h + sigmoid(W_g [h; mean(h)]) * tanh(W_u h)), which sees the sequence mean, so under
  sequence parallelism it must be fed the gathered sequence;
- head: a per-token segment classifier; loss summed over labelled tokens, normalised by their
  count over the global batch. Evaluation: segment accuracy.

Enable it with `[objectives] toy = 0.5` next to `mlm`.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rapidnlp.model.bert import Piece
from rapidnlp.model.flops import dense_flops
from rapidnlp.pretrain.objective import Objective

TOPICS = 8
IGNORE = -100


class TopicEmbedding(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.table = nn.Embedding(TOPICS, hidden)

    def forward(self, input_ids, key_mask, fields):
        return self.table(fields["topic_ids"])[:, None, :].expand(-1, input_ids.shape[1], -1)


class GatedAdapter(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.gate = nn.Linear(2 * hidden, hidden)
        self.up = nn.Linear(hidden, hidden)

    def forward(self, x, key_mask, fields):
        m = key_mask[..., None].to(x.dtype)
        mean = ((x * m).sum(1, keepdim=True) / m.sum(1, keepdim=True)).expand_as(x)
        return x + torch.sigmoid(self.gate(torch.cat([x, mean], -1))) * torch.tanh(self.up(x))


class SegmentHead(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.proj = nn.Linear(hidden, 2)

    def forward(self, hidden, key_mask, fields):
        return self.proj(hidden)


class Toy(Objective):
    name = "toy"
    metric_names = ("accuracy",)
    layer = 1

    def collate(self, indices, batch):
        seed = self.config.train.seed
        topics = [np.random.default_rng((seed, int(i), 17)).integers(TOPICS) for i in indices]
        mask = batch["attention_mask"]
        lengths = mask.sum(1, keepdim=True)
        positions = torch.arange(mask.shape[1])[None, :]
        segments = (2 * positions >= lengths).long()
        return {"topic_ids": torch.tensor(topics, dtype=torch.int64),
                "segment_labels": torch.where(mask.bool(), segments, torch.full_like(segments, IGNORE))}

    def pieces(self) -> list[Piece]:
        m, seq = self.config.model, self.config.data.seq_len
        h = m.hidden_size
        return [
            Piece("toy_topic", "input", TopicEmbedding(h), fields=("topic_ids",)),
            Piece("toy_adapter", "block", GatedAdapter(h), layer=min(self.layer, m.num_layers - 1),
                  flops_per_sequence=dense_flops(2 * h, h, seq) + dense_flops(h, h, seq)),
            Piece("toy_segment_head", "head", SegmentHead(h), flops_per_sequence=dense_flops(h, 2, seq)),
        ]

    def loss_sum(self, outputs, batch):
        logits = outputs["toy_segment_head"]
        return F.cross_entropy(logits.flatten(0, 1).float(), batch["segment_labels"].flatten(),
                               ignore_index=IGNORE, reduction="sum")

    def normaliser(self, batch):
        return (batch["segment_labels"] != IGNORE).sum()

    def metrics(self, outputs, batch):
        labels = batch["segment_labels"]
        real = labels != IGNORE
        correct = ((outputs["toy_segment_head"].argmax(-1) == labels) & real).sum()
        return {"accuracy": (correct.float(), real.sum().float())}


OBJECTIVE = Toy

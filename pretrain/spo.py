"""SPO margin magnify: the sentence is scored against its linked triples and their negatives.

A sentence vector (the [CLS] hidden state through a projection) and triple vectors from a KG
encoder (entity table, relation table: t = W [e_s; r_p; e_o], one function for positives and
negatives) are compared by cosine. For every packed positive and each of its k negatives (the
side-stream's corrupted-object or random-triple rule; a negative equal to a positive is never
used) the loss is max(0, m - score(pos) + score(neg)), summed, normalised by the number of such
pairs over the global batch. "Magnify": the margin grows linearly over training, from
knowledge.margin at the first step to margin x (1 + knowledge.margin_growth) at the last, so
that once the easy negatives are separated the ranking keeps being pushed apart.
Evaluation: ranking accuracy (the positive above all its negatives) and MRR.

The entity table is the fusion module's when that objective is on (one tied parameter).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rapidnlp.model.bert import Piece
from rapidnlp.model.flops import dense_flops
from rapidnlp.pretrain.fusion import entity_table_plan, init_entity_table
from rapidnlp.pretrain.objective import Objective


class SPOHead(nn.Module):
    def __init__(self, hidden: int, num_entities: int, num_relations: int, entity_tokens=None):
        super().__init__()
        self.sentence = nn.Linear(hidden, hidden)
        self.entities = nn.Embedding(num_entities, hidden, device="meta")  # as fusion's: materialised when sharded
        self.relations = nn.Embedding(num_relations, hidden)
        self.triple = nn.Linear(3 * hidden, hidden)
        self._entity_tokens = entity_tokens  # read by init_weights, not a parameter

    def init_weights(self, model) -> None:
        # Also when tied to fusion's table: a copy on another pipeline stage starts equal to it.
        init_entity_table(self.entities, model, self._entity_tokens)

    def sentence_vector(self, hidden: torch.Tensor) -> torch.Tensor:
        """Unit sentence vectors [b, h] from the final hidden states' [CLS]."""
        return F.normalize(self.sentence(hidden[:, 0]).float(), dim=-1)

    def triple_vector(self, triples: torch.Tensor) -> torch.Tensor:
        """Unit triple vectors [..., h] of (s, p, o) ids [..., 3] (no padding ids)."""
        s, p, o = triples.unbind(-1)
        # One lookup per table: the zero-bubble schedules' split backward cannot take a
        # parameter used twice in one stage.
        subject, obj = self.entities(torch.stack([s, o])).unbind(0)
        return F.normalize(self.triple(torch.cat([subject, self.relations(p), obj], -1)).float(), dim=-1)

    def forward(self, hidden, key_mask, fields):
        """Cosine scores [b, T, 1 + K]: the positive first, then its negatives (padding: any value)."""
        triples = torch.cat([fields["spo_pos"][:, :, None], fields["spo_neg"]], 2).clamp(min=0)
        return (self.triple_vector(triples) * self.sentence_vector(hidden)[:, None, None, :]).sum(-1)


class SPO(Objective):
    name = "spo"
    metric_names = ("rank_accuracy", "mrr")

    def pieces(self) -> list[Piece]:
        k, h = self.config.knowledge, self.config.model.hidden_size
        triples = k.max_triples * (1 + k.negatives)
        ties = {"entities.weight": "knowledge_fusion.entities.weight"} if "fusion" in self.config.objectives else {}
        tokens = None if self.data is None else self.data.entity_tokens
        return [Piece("spo_head", "head", SPOHead(h, k.num_entities, k.num_relations, tokens), fields=("spo_pos", "spo_neg"),
                      ties=ties, tp_plan=entity_table_plan, fsdp_units=("entities",),
                      flops_per_sequence=dense_flops(h, h, 1) + dense_flops(3 * h, h, triples))]

    def margin(self) -> float:
        k = self.config.knowledge
        return k.margin * (1.0 + k.margin_growth * self.progress)

    @staticmethod
    def _valid(batch):
        positive = batch["spo_pos"][..., 0] >= 0
        return positive, (batch["spo_neg"][..., 0] >= 0) & positive[..., None]

    def loss_sum(self, outputs, batch):
        scores = outputs["spo_head"]
        _, pairs = self._valid(batch)
        hinge = F.relu(self.margin() - scores[..., :1] + scores[..., 1:])
        return (hinge * pairs).sum()

    def normaliser(self, batch):
        return self._valid(batch)[1].sum()

    def metrics(self, outputs, batch):
        scores = outputs["spo_head"]
        positive, pairs = self._valid(batch)
        above = ((scores[..., 1:] >= scores[..., :1]) & pairs).sum(-1)  # negatives scored at least as high
        hits = ((above == 0) & positive).sum().float()
        reciprocal = ((1.0 / (1 + above).float()) * positive).sum()
        count = positive.sum().float()
        return {"rank_accuracy": (hits, count), "mrr": (reciprocal, count)}


OBJECTIVE = SPO

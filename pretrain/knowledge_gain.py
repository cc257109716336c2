"""Knowledge gain (optional: off unless `objectives.knowledge_gain` is set): the masked-entity MLM
loss with the fusion gate open must beat the same loss with the gate forced shut, by a margin.

With this objective the fusion module appends to the batch a twin of every sample with the gate
shut (its hidden states left as they came, pretrain/fusion.py), so the blocks after fusion and
the heads run on both. For every masked slot inside a linked entity (a mention of the sentence,
or a packed triple's subject or object: `entity_slots`), with l_open and l_shut the token's
cross-entropies in the sample and in its twin, the loss is

    sum over those slots of max(0, m + l_open - sg(l_shut)),   m = knowledge.gain_margin,

normalised by their count over the global batch. l_shut is held fixed (a stop-gradient): the term
makes fusion help the prediction; it can never pay off by making the unfused path worse. Its
weight 0 trains nothing but still reports the gain. Evaluation: `nats`, the mean of
l_shut - l_open over those slots (nats; positive when fusion helps).

Cost: the blocks after fusion and the heads run on twice the batch. It needs each token's loss,
so it is refused with model.fused_kernels (whose loss decodes sums, chunk by chunk).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from rapidnlp.data.mlm import IGNORE_INDEX
from rapidnlp.pretrain.objective import Objective, plain


def entity_slots(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[b, P] bool: the masked slots whose token lies inside a linked entity, in either segment."""
    spans = torch.cat([batch["mention_spans"], batch["spo_spans"].flatten(1, 2)], 1)  # [b, M + 2T, 2]; padding empty
    positions = torch.arange(batch["input_ids"].shape[1], device=spans.device)
    inside = ((positions >= spans[..., :1]) & (positions < spans[..., 1:])).any(1)  # [b, s]
    return torch.gather(inside, 1, batch["mlm_positions"]) & (batch["mlm_labels"] != IGNORE_INDEX)


def open_and_shut_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token cross-entropies [b, P] of the samples (rows :b of the logits) and of their gate-shut
    twins (rows b:); 0 where a slot is unused. Vocab-parallel logits under loss_parallel too."""
    ce = F.cross_entropy(logits.flatten(0, 1).float(), labels.repeat(2, 1).flatten(), ignore_index=IGNORE_INDEX,
                         reduction="none")
    return plain(ce).view(2, *labels.shape).unbind(0)


class KnowledgeGain(Objective):
    name = "knowledge_gain"
    metric_names = ("nats",)
    sees_twins = True

    def loss_sum(self, outputs, batch):
        opened, shut = open_and_shut_losses(outputs["lm_head"], batch["mlm_labels"])
        hinge = F.relu(self.config.knowledge.gain_margin + opened - shut.detach())
        return (hinge * entity_slots(batch)).sum()

    def normaliser(self, batch):
        return entity_slots(batch).sum()

    def metrics(self, outputs, batch):
        logits = outputs["lm_head"]  # evaluation's metrics run outside loss_parallel: whole logits
        opened, shut = open_and_shut_losses(logits.full_tensor() if isinstance(logits, DTensor) else logits,
                                            batch["mlm_labels"])
        slots = entity_slots(batch)
        return {"nats": (((shut - opened) * slots).sum(), slots.sum().float())}


OBJECTIVE = KnowledgeGain

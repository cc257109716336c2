"""`efl`: Entailment as Few-shot Learner (Wang et al. 2021).

Each example becomes one pair per label, `[CLS] text [SEP] description of the label [SEP]`; a
binary head on [CLS] says entailed or not (cross-entropy, the true label's pair positive). The
class scores are the pairs' entailment log-odds; the prediction is the highest. Descriptions come
from `descriptions` ("neg:这是差评|pos:这是好评" style, as the verbalizer), else the label names.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rapidnlp.errors import UserError
from rapidnlp.finetune.methods.base import Method
from rapidnlp.finetune.prompts import encode_pairs


def parse_descriptions(spec: str | None, labels: list[str]) -> list[str]:
    if not spec:
        return list(labels)
    found = {}
    for item in filter(None, spec.split("|")):
        label, sep, text = item.partition(":")
        if not sep or not text:
            raise UserError(f"descriptions '{spec}': expected LABEL:TEXT|LABEL:TEXT")
        found[label] = text
    missing = [lab for lab in labels if lab not in found]
    if missing:
        raise UserError(f"descriptions: none for label(s) {missing}")
    return [found[lab] for lab in labels]


class EFL(Method):
    name = "efl"

    def __init__(self, lm, tok, labels, options):
        super().__init__(lm, tok, labels, options)
        self.descriptions = parse_descriptions(options.get("descriptions"), self.labels)
        self.dropout = nn.Dropout(float(options.get("dropout", 0.1)))
        self.head = nn.Linear(lm.hidden_size, 2)

    def pair_logits(self, examples) -> torch.Tensor:
        """(B, C, 2): not-entailed / entailed logits of every (example, label description) pair."""
        firsts = [e.text for e in examples for _ in self.labels]
        seconds = [d for _ in examples for d in self.descriptions]
        enc = encode_pairs(self.tok, firsts, seconds, self.max_len)
        cls = self.lm.encode(enc.ids, enc.mask, enc.types)[:, 0]
        return self.head(self.dropout(cls)).view(len(examples), len(self.labels), 2)

    def logits(self, examples):
        pairs = self.pair_logits(examples)
        return pairs[..., 1] - pairs[..., 0]

    def loss(self, examples):
        pairs = self.pair_logits(examples)
        target = F.one_hot(self.label_tensor(examples), len(self.labels))
        return F.cross_entropy(pairs.reshape(-1, 2), target.reshape(-1))

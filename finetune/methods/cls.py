"""`cls`: the baseline, a linear head on the [CLS] hidden state (text, or text pair)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from rapidnlp.finetune.methods.base import Method
from rapidnlp.finetune.prompts import encode_pairs


class ClsMethod(Method):
    name = "cls"

    def __init__(self, lm, tok, labels, options):
        super().__init__(lm, tok, labels, options)
        self.dropout = nn.Dropout(float(options.get("dropout", 0.1)))
        self.classifier = nn.Linear(lm.hidden_size, len(labels))

    def encode(self, examples):
        return encode_pairs(self.tok, [e.text for e in examples], [e.text_b for e in examples], self.max_len)

    def forward_all(self, examples):
        """(logits, [CLS] state, every layer's hidden states, encoded input): what KD needs."""
        enc = self.encode(examples)
        last, layers = self.lm.encode(enc.ids, enc.mask, enc.types, all_layers=True)
        return self.classifier(self.dropout(last[:, 0])), last[:, 0], layers, enc

    def logits(self, examples):
        enc = self.encode(examples)
        return self.classifier(self.dropout(self.lm.encode(enc.ids, enc.mask, enc.types)[:, 0]))

    def loss(self, examples):
        return F.cross_entropy(self.logits(examples), self.label_tensor(examples))

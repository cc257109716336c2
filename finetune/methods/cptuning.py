"""`cptuning`: Contrastive Prompt Tuning (Xu et al. 2023, EasyNLP), verbalizer-free.

Input: the template (default "{text}{p}...{mask}") with a continuous prompt initialised from the
embeddings of a phrase (`prompt_phrase`; without one, 4 tokens from the mean word embedding).
Feature: the MLM head's transform output at [MASK] (before the decoder), L2-normalised. Loss:
the pair-wise cost-sensitive contrastive loss in circle-loss form (margin 0.4, scale 64) plus
`mlm_weight` (default 1) x the auxiliary MLM loss. Prediction: cosine to each class centroid of
the training features (probabilities softmax(cos / 0.1)), or the k nearest training features.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rapidnlp.finetune import losses
from rapidnlp.finetune.methods.base import Method
from rapidnlp.finetune.prompts import parse_template

TEMPERATURE = 0.1


class CPTuning(Method):
    name = "cptuning"

    def __init__(self, lm, tok, labels, options):
        super().__init__(lm, tok, labels, options)
        phrase = options.get("prompt_phrase")
        word_embeddings = lm.model.get_input_embeddings().weight.detach()
        if phrase:
            ids = tok(phrase, add_special_tokens=False)["input_ids"]
            init = word_embeddings[ids].clone()
        else:
            init = word_embeddings.mean(0, keepdim=True).repeat(4, 1)
        self.prompt = nn.Parameter(init)
        template = options.get("template") or "{text}{p}{mask}"
        self.parts = parse_template(template.replace("{p}", "{p}" * len(init), 1) if template.count("{p}") == 1
                                    else template)
        if self.parts.count("{p}") != len(init):
            self.parts = parse_template("{p}" * len(init) + template)  # a template without {p}: prompt first
        self.margin = float(options.get("margin", 0.4))
        self.gamma = float(options.get("gamma", 64.0))
        self.mlm_weight = float(options.get("mlm_weight", 1.0))
        self.knn = int(options.get("knn", 0))
        d = lm.hidden_size
        self.register_buffer("centroids", torch.zeros(len(labels), d))
        self.register_buffer("train_features", torch.zeros(0, d))
        self.register_buffer("train_labels", torch.zeros(0, dtype=torch.long))

    def features(self, examples) -> torch.Tensor:
        hidden, enc = self.prompt_hidden(self.parts, examples, 1, self.prompt)
        at_mask = hidden[torch.arange(len(examples)), enc.mask_pos[:, 0]]
        return F.normalize(self.lm.mlm_features(at_mask), dim=-1)

    def loss(self, examples):
        loss = losses.circle_loss(self.features(examples), self.label_tensor(examples), self.margin, self.gamma)
        if self.mlm_weight:
            loss = loss + self.mlm_weight * self.aux_mlm(examples)
        return loss

    @torch.no_grad()
    def after_fit(self, examples):
        feats = torch.cat([self.features(examples[i:i + 32]) for i in range(0, len(examples), 32)])
        labels = self.label_tensor(examples)
        self.train_features = feats
        self.train_labels = labels
        self.centroids = F.normalize(losses.domain_prototypes(feats, labels, len(self.labels)), dim=-1)

    def logits(self, examples):
        feats = self.features(examples)
        if self.knn and len(self.train_labels):
            sims = feats @ self.train_features.T
            top = sims.topk(min(self.knn, sims.shape[1]), dim=1).indices
            votes = F.one_hot(self.train_labels[top], len(self.labels)).float().mean(1)
            return torch.log(votes.clamp(min=1e-6))
        return feats @ self.centroids.T / TEMPERATURE

"""`pet` / `fuzzy-pet` (cloze templates with label words) and `ptuning` (plus continuous prompts).

PET (Schick & Schuetze 2021): the template is instantiated once per distinct label-word length n,
with n [MASK] slots; a word's score is the mean of its tokens' log-probabilities at the slots, a
label's score the log of the summed exp-scores of its words (one word: PET; several: Fuzzy-PET),
and the loss the cross-entropy over the labels' scores, plus `mlm_weight` x an auxiliary MLM loss.
P-tuning (Liu et al. 2021) adds {p} tokens whose embeddings come from a small bi-LSTM + MLP
over learned inputs, with anchor words (the template's own text) or without.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rapidnlp.errors import UserError
from rapidnlp.finetune import losses
from rapidnlp.finetune.methods.base import Method
from rapidnlp.finetune.prompts import Verbalizer, check_realisable, parse_template, parse_verbalizer


class PET(Method):
    name = "pet"
    default_template = "{text}{mask}"

    def __init__(self, lm, tok, labels, options):
        super().__init__(lm, tok, labels, options)
        if not options.get("verbalizer"):
            raise UserError(f"--method {options.get('method', self.name)} needs --verbalizer LABEL:WORD,...")
        self.parts = parse_template(self._template(options))
        self.verbalizer = Verbalizer.build(tok, parse_verbalizer(options["verbalizer"]), labels)
        if options.get("method") == "pet" and any(len(ws) > 1 for ws in parse_verbalizer(options["verbalizer"]).values()):
            raise UserError("--method pet takes one word per label; several words per label is --method fuzzy-pet")
        check_realisable(tok, self.parts, self.verbalizer)
        self.mlm_weight = float(options.get("mlm_weight", 0.0))
        self.soft_count = self.parts.count("{p}")

    def _template(self, options) -> str:
        return options.get("template") or self.default_template

    def soft_embeddings(self) -> torch.Tensor | None:
        """(P, H) embeddings of the {p} slots; None without continuous prompts."""
        return None

    def logits(self, examples) -> torch.Tensor:
        v = self.verbalizer
        scores = torch.empty(len(examples), len(v.words))
        for n, word_ids in v.word_ids.items():  # the template once per distinct word length
            hidden, enc = self.prompt_hidden(self.parts, examples, n, self.soft_embeddings())
            at_masks = hidden[torch.arange(len(examples))[:, None], enc.mask_pos]  # (B, n, H)
            log_probs = F.log_softmax(self.lm.mlm_logits(at_masks), dim=-1)
            scores[:, v.word_index[n]] = losses.word_scores(log_probs, word_ids)
        return losses.label_scores(scores, v.word_label, len(self.labels))

    def loss(self, examples) -> torch.Tensor:
        loss = F.cross_entropy(self.logits(examples), self.label_tensor(examples))
        if self.mlm_weight:
            loss = loss + self.mlm_weight * self.aux_mlm(examples)
        return loss


class PromptEncoder(nn.Module):
    """P-tuning's prompt encoder: P learned inputs -> bi-LSTM -> MLP -> P embeddings."""

    def __init__(self, count: int, hidden: int, kind: str = "lstm"):
        super().__init__()
        self.inputs = nn.Parameter(torch.randn(count, hidden) * 0.02)
        self.lstm = nn.LSTM(hidden, hidden // 2, num_layers=2, bidirectional=True, batch_first=True) \
            if kind == "lstm" else None
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden))

    def forward(self) -> torch.Tensor:
        x = self.inputs
        if self.lstm is not None:
            x = self.lstm(x.unsqueeze(0))[0].squeeze(0)
        return self.mlp(x)


class PTuning(PET):
    name = "ptuning"

    def _template(self, options) -> str:
        count = int(options.get("prompt_tokens", 4))
        template = options.get("template")
        if template is None:  # no anchors: prompts around the text, then the slot
            half = count // 2
            return "{p}" * half + "{text}" + "{p}" * (count - half) + "{mask}"
        return template if "{p}" in template else "{p}" * count + template

    def __init__(self, lm, tok, labels, options):
        super().__init__(lm, tok, labels, options)
        self.prompt_encoder = PromptEncoder(self.soft_count, lm.hidden_size, options.get("prompt_encoder", "lstm"))

    def soft_embeddings(self):
        return self.prompt_encoder()

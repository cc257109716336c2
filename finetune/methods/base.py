"""What every method shares: the LM it wraps, its labels and options, and the auxiliary MLM loss."""
from __future__ import annotations

import torch
from torch import nn

from rapidnlp.finetune import losses
from rapidnlp.finetune.model import MaskedLM


class Method(nn.Module):
    """A classifier over a MaskedLM. Subclasses define `loss` and `logits`; `options` are the
    JSON-able settings that rebuild the same method at predict time (saved in finetune.json)."""

    name = "base"

    def __init__(self, lm: MaskedLM, tok, labels: list[str], options: dict):
        super().__init__()
        self.lm, self.tok, self.labels, self.options = lm, tok, list(labels), dict(options)
        self.max_len = int(options.get("max_len", 128))

    def label_tensor(self, examples) -> torch.Tensor:
        return torch.tensor([self.labels.index(e.label) if e.label is not None else -1 for e in examples])

    def loss(self, examples) -> torch.Tensor:
        raise NotImplementedError

    def logits(self, examples) -> torch.Tensor:
        raise NotImplementedError

    def saved(self) -> "Method":
        """The method a finetuned folder keeps (a distiller keeps its student)."""
        return self

    def before_epoch(self, examples) -> None:
        """Called at the start of every training epoch (MetaKD's teacher refreshes its prototypes)."""

    def after_fit(self, examples) -> None:
        """Called once training ends, with the training examples (CP-Tuning keeps its centroids)."""

    def hidden_for_distillation(self, enc):
        """[CLS] state and every layer's hidden states of plain [CLS] text [SEP] inputs (KD, MetaKD)."""
        last, layers = self.lm.encode(enc.ids, enc.mask, enc.types, all_layers=True)
        return last[:, 0], layers

    def prompt_hidden(self, parts, examples, n_mask: int, soft: torch.Tensor | None):
        """Hidden states of the template filled with the examples, n [MASK] slots, and the (P, H)
        continuous-prompt embeddings `soft` put in at the {p} slots."""
        from rapidnlp.finetune.prompts import encode

        enc = encode(self.tok, parts, examples, n_mask, self.max_len)
        if soft is None:
            return self.lm.encode(enc.ids, enc.mask, enc.types), enc
        embeds = self.lm.embed(enc.ids).clone()
        embeds[torch.arange(len(examples))[:, None], enc.soft_pos] = soft.to(embeds.dtype)
        return self.lm.encode(None, enc.mask, enc.types, embeds=embeds), enc

    def aux_mlm(self, examples, prob: float = 0.15) -> torch.Tensor:
        """The auxiliary MLM loss on the examples' texts: 15% of the text tokens masked (never
        [CLS]/[SEP]/padding), predicted by the LM's own head."""
        from rapidnlp.finetune.prompts import encode_pairs

        enc = encode_pairs(self.tok, [e.text for e in examples], [None] * len(examples), self.max_len)
        special = (enc.ids == self.tok.cls_token_id) | (enc.ids == self.tok.sep_token_id) | (enc.mask == 0)
        pick = (torch.rand(enc.ids.shape) < prob) & ~special
        targets = torch.where(pick, enc.ids, torch.full_like(enc.ids, -100))
        ids = torch.where(pick, torch.full_like(enc.ids, self.tok.mask_token_id), enc.ids)
        hidden = self.lm.encode(ids, enc.mask, enc.types)
        return losses.mlm_loss(self.lm.mlm_logits(hidden[pick]), targets[pick])

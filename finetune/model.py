"""One local transformers masked-LM, loaded safely, with the pieces the methods need.

Loading reads safetensors only and never runs remote code: a folder with only pickled weights
(pytorch_model.bin) is refused with one line, as `rapidnlp convert --from hf` refuses it. The
wrapper exposes the encoder (`encode`, also from input embeddings for continuous prompts), the
MLM head (`mlm_logits`) and the head's transform output before the decoder (`mlm_features`).
It works for the BERT family (BertForMaskedLM, MegatronBertForMaskedLM, our exports: `cls`)
and RoBERTa-style heads (`lm_head`). Nothing here knows about prompts or losses.
"""
from __future__ import annotations

import glob
import os

import torch
from torch import nn

from rapidnlp.errors import UserError


def check_folder(path: str) -> None:
    if not os.path.isdir(path):
        raise UserError(f"{path}: no such model folder; give a transformers folder (config.json + model.safetensors)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"{path}: not a transformers folder (no config.json)")
    if not glob.glob(os.path.join(path, "*.safetensors")):
        pickled = [os.path.basename(p) for p in glob.glob(os.path.join(path, "*.bin"))]
        what = f"only pickled weights ({', '.join(pickled)})" if pickled else "no weights"
        raise UserError(f"{path}: {what}; only safetensors weights are read (pickles can run code): "
                        "re-save it with save_pretrained(safe_serialization=True)")


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers raises many kinds; all mean "this folder has no usable tokenizer"
        raise UserError(f"{path}: cannot load its tokenizer ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if tok.mask_token_id is None or tok.cls_token_id is None or tok.sep_token_id is None:
        raise UserError(f"{path}: the tokenizer lacks [MASK]/[CLS]/[SEP]; a masked-LM tokenizer is needed")
    return tok


def load_model(path: str) -> nn.Module:
    from transformers import AutoModelForMaskedLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    check_folder(path)
    try:
        model = AutoModelForMaskedLM.from_pretrained(path, local_files_only=True, trust_remote_code=False,
                                                     use_safetensors=True)
    except Exception as e:
        raise UserError(f"{path}: cannot load it as a masked LM ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]})") from None
    return model


class MaskedLM(nn.Module):
    """A transformers masked-LM split into encoder, MLM head, and the head's transform."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.head = getattr(model, "cls", None) or getattr(model, "lm_head", None)
        if self.head is None:
            raise UserError(f"{type(model).__name__}: unknown MLM head layout (expected `cls` or `lm_head`)")
        self._captured: list[torch.Tensor] = []
        # The decoder's input is the head's transform output (dense, activation, LayerNorm).
        model.get_output_embeddings().register_forward_pre_hook(lambda _m, args: self._captured.append(args[0]))

    @property
    def config(self):
        return self.model.config

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids)

    def encode(self, ids=None, mask=None, types=None, embeds=None, all_layers: bool = False):
        """Final hidden states (B, L, H); with all_layers, the tuple of every layer's output too."""
        out = self.model.base_model(input_ids=None if embeds is not None else ids, inputs_embeds=embeds,
                                    attention_mask=mask, token_type_ids=types, output_hidden_states=all_layers)
        return (out.last_hidden_state, out.hidden_states) if all_layers else out.last_hidden_state

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)

    def mlm_features(self, hidden: torch.Tensor) -> torch.Tensor:
        """The MLM head's transform output for `hidden` (before the decoder)."""
        self._captured.clear()
        self.head(hidden)
        feats = self._captured[-1]
        self._captured.clear()
        return feats

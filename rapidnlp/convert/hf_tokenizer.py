"""A sentencepiece unigram model as a transformers fast tokenizer (tokenizer.json).

Built directly with `tokenizers` from the model's protobuf: the same pieces and scores, byte
fallback on (transformers' own SpmConverter drops it and warns), sentencepiece's dummy "▁"
prefix and whitespace splitting, and [CLS] ... [SEP] added around each text as our samples
have them. The ids equal sentencepiece's (tests/test_convert.py checks real text).
"""
from __future__ import annotations

import os

from rapidnlp.errors import UserError

SPECIALS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
            "mask_token": "[MASK]"}


def build_fast_tokenizer(model_path: str):
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import PreTrainedTokenizerFast

    if not os.path.isfile(model_path):
        raise UserError(f"{model_path}: tokenizer model not found")
    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_path, "rb") as f:
        proto.ParseFromString(f.read())
    if proto.trainer_spec.model_type != 1:
        raise UserError(f"{model_path}: only unigram sentencepiece models convert (this one is type "
                        f"{proto.trainer_spec.model_type})")
    if proto.normalizer_spec.name not in ("identity", ""):
        raise UserError(f"{model_path}: normalizer '{proto.normalizer_spec.name}' is not supported; "
                        "RapidNLP trains with the identity normalizer")
    vocab = [(p.piece, p.score) for p in proto.pieces]
    tok = Tokenizer(Unigram(vocab, unk_id=proto.trainer_spec.unk_id, byte_fallback=proto.trainer_spec.byte_fallback))
    steps = [normalizers.Replace(" ", "▁")]
    if proto.normalizer_spec.add_dummy_prefix:
        steps.insert(0, normalizers.Prepend("▁"))
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="never", split=proto.trainer_spec.split_by_whitespace
    )
    tok.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)
    ])
    ids = {p.piece: i for i, p in enumerate(proto.pieces)}
    missing = [s for s in SPECIALS.values() if s not in ids]
    if missing:
        raise UserError(f"{model_path}: lacks the BERT special pieces {missing}")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])],
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=512, **SPECIALS)


def save_fast_tokenizer(model_path: str, out_dir: str) -> None:
    """tokenizer.json + tokenizer_config.json (and the sentencepiece model itself, for re-import)."""
    import shutil

    build_fast_tokenizer(model_path).save_pretrained(out_dir)
    shutil.copyfile(model_path, os.path.join(out_dir, "spiece.model"))

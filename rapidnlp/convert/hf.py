"""Weights between our `BertForMLM` and transformers' masked-LM classes, one to one:
`BertForMaskedLM` for the post-LayerNorm layout (`model.norm_position = "post"`, BERT's own),
`MegatronBertForMaskedLM` for the pre-LayerNorm one (Megatron's). `hf_class` names which.

The functions here work on plain, full (unsharded) tensors: gather a sharded checkpoint first.
They import nothing from torch.distributed and copy no tensors (the returned dicts share
storage with their input).

What transformers 5.23 does with these weights, and why the mapping is what it is:

- `MegatronBertSelfAttention` has only the eager path (softmax(QK^T/sqrt(d) + mask) V);
  asking for "sdpa" raises. `create_bidirectional_mask` turns the 0/1 padding mask into an
  additive float mask holding `finfo(dtype).min` at padded keys, so their softmax weight is
  exactly 0, as with our boolean SDPA mask: the two agree to float rounding.
- `cls.predictions.decoder.bias` is tied to `cls.predictions.bias` (`_tied_weights_keys`): they
  are one Parameter, and the decoder's Linear is what adds it in forward. `save_pretrained`
  writes only the tie's source, `cls.predictions.bias`, and `from_pretrained` re-ties from it.
  We therefore write our decoder bias under both names and read it from `cls.predictions.bias`.
- The decoder weight is tied to the word embedding as in our model (`tie_word_embeddings`).
- HF's word embedding has `padding_idx=pad_token_id`: the lookup sends no gradient to that row.
  Ours has none, which changes nothing in MLM training: padded positions are masked as keys
  and never predicted, so the gradient reaching their embeddings is exactly 0 anyway, and the
  pad row's gradient through the tied decoder is the same in both (tests/test_hf_reference.py).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from rapidnlp.config import ModelConfig
from rapidnlp.errors import UserError

if TYPE_CHECKING:  # transformers is imported lazily: importing it costs seconds
    from rapidnlp.model.bert import BertForMLM

# Per-layer names: ours (under layers.{i}.) -> transformers' (under bert.encoder.layer.{i}.).
_LAYER = (
    ("attention.query", "attention.self.query"),
    ("attention.key", "attention.self.key"),
    ("attention.value", "attention.self.value"),
    ("attention.dense", "attention.output.dense"),
    ("mlp.fc1", "intermediate.dense"),
    ("mlp.fc2", "output.dense"),
)
# The norms, by layout: MegatronBERT's before each branch and at the end; BERT's after each add
# and on the embeddings.
_NORMS = {
    "pre": {"layer": (("attention_norm", "attention.ln"), ("mlp_norm", "ln")),
            "outside": ("final_norm", "bert.encoder.ln")},
    "post": {"layer": (("attention_norm", "attention.output.LayerNorm"), ("mlp_norm", "output.LayerNorm")),
             "outside": ("embeddings.norm", "bert.embeddings.LayerNorm")},
}
_OUTSIDE = (
    ("embeddings.word_embeddings.weight", "bert.embeddings.word_embeddings.weight"),
    ("embeddings.position_embeddings.weight", "bert.embeddings.position_embeddings.weight"),
    ("embeddings.token_type_embeddings.weight", "bert.embeddings.token_type_embeddings.weight"),
    ("lm_head.dense.weight", "cls.predictions.transform.dense.weight"),
    ("lm_head.dense.bias", "cls.predictions.transform.dense.bias"),
    ("lm_head.norm.weight", "cls.predictions.transform.LayerNorm.weight"),
    ("lm_head.norm.bias", "cls.predictions.transform.LayerNorm.bias"),
    ("lm_head.decoder.bias", "cls.predictions.bias"),
)
# Tied copies: (copy, source it must equal), ours and transformers'.
_OUR_TIES = (("lm_head.decoder.weight", "embeddings.word_embeddings.weight"),)
_HF_TIES = (
    ("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight"),
    ("cls.predictions.decoder.bias", "cls.predictions.bias"),
)
# Old transformers versions saved this non-persistent buffer (an arange); it carries no weights.
_HF_IGNORED = ("bert.embeddings.position_ids",)


def _name_map(cfg: ModelConfig) -> dict[str, str]:
    """Our parameter name -> transformers' name, for every non-tied tensor of the model."""
    norms = _NORMS[cfg.norm_position]
    names = dict(_OUTSIDE)
    ours, theirs = norms["outside"]
    names.update({f"{ours}.{leaf}": f"{theirs}.{leaf}" for leaf in ("weight", "bias")})
    for i in range(cfg.num_layers):
        for ours, theirs in _LAYER + norms["layer"]:
            for leaf in ("weight", "bias"):
                names[f"layers.{i}.{ours}.{leaf}"] = f"bert.encoder.layer.{i}.{theirs}.{leaf}"
    return names


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    h, f, v = cfg.hidden_size, cfg.ffn_size, cfg.padded_vocab_size
    shapes = {
        "embeddings.word_embeddings.weight": (v, h),
        "embeddings.position_embeddings.weight": (cfg.max_position_embeddings, h),
        "embeddings.token_type_embeddings.weight": (cfg.type_vocab_size, h),
        "lm_head.dense.weight": (h, h), "lm_head.dense.bias": (h,),
        "lm_head.norm.weight": (h,), "lm_head.norm.bias": (h,),
        "lm_head.decoder.bias": (v,),
    }
    norm = _NORMS[cfg.norm_position]["outside"][0]
    shapes[norm + ".weight"] = shapes[norm + ".bias"] = (h,)
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        for norm in ("attention_norm", "mlp_norm"):
            shapes[p + norm + ".weight"] = shapes[p + norm + ".bias"] = (h,)
        for proj in ("query", "key", "value", "dense"):
            shapes[f"{p}attention.{proj}.weight"], shapes[f"{p}attention.{proj}.bias"] = (h, h), (h,)
        shapes[p + "mlp.fc1.weight"], shapes[p + "mlp.fc1.bias"] = (f, h), (f,)
        shapes[p + "mlp.fc2.weight"], shapes[p + "mlp.fc2.bias"] = (h, f), (h,)
    return shapes


def _first(names, n: int = 5) -> str:
    names = sorted(names)
    more = f" (and {len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def _check_keys(state: dict, required: set[str], optional: set[str], what: str) -> None:
    missing = required - state.keys()
    unexpected = state.keys() - required - optional
    problems = []
    if missing:
        problems.append(f"missing keys: {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_first(unexpected)}")
    if problems:
        raise UserError(f"{what}: {'; '.join(problems)}; is it a checkpoint of this model configuration?")


def _check_ties(state: dict, ties, what: str) -> None:
    for copy, source in ties:
        if copy in state and not torch.equal(state[copy], state[source]):
            raise UserError(f"{what}: '{copy}' differs from '{source}', but the two are tied in this model")


def _check_shapes(ours: dict, cfg: ModelConfig, name_of, what: str) -> None:
    for name, shape in _expected_shapes(cfg).items():
        got = tuple(ours[name].shape)
        if got != shape:
            raise UserError(f"{what}: '{name_of(name)}' has shape {list(got)}, the configuration expects {list(shape)}")


def hf_class(cfg: ModelConfig):
    """The transformers class of this layout: BertForMaskedLM (post-LN) or MegatronBertForMaskedLM (pre-LN)."""
    import transformers

    return transformers.BertForMaskedLM if cfg.norm_position == "post" else transformers.MegatronBertForMaskedLM


def hf_config(cfg: ModelConfig, *, pad_token_id: int = 0):
    """The transformers config of a model with this shape and layout (MegatronBERT: eager
    attention, the only one it has; BERT: transformers' default)."""
    cls = hf_class(cfg)
    return cls.config_class(
        vocab_size=cfg.padded_vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.ffn_size,
        hidden_act="gelu",  # exact (erf) GeLU, as F.gelu's default
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.attention_dropout,
        max_position_embeddings=cfg.max_position_embeddings,
        type_vocab_size=cfg.type_vocab_size,
        initializer_range=cfg.init_std,
        layer_norm_eps=cfg.layer_norm_eps,
        pad_token_id=pad_token_id,
        tie_word_embeddings=True,
        **({} if cfg.norm_position == "post" else {"attn_implementation": "eager"}),
        architectures=[cls.__name__],
    )


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> transformers' (`hf_class`), including both tied copies of the head."""
    names = _name_map(cfg)
    what = "RapidNLP state dict"
    _check_keys(state, set(names), {copy for copy, _ in _OUR_TIES}, what)
    _check_ties(state, _OUR_TIES, what)
    _check_shapes(state, cfg, lambda n: n, what)
    out = {theirs: state[ours] for ours, theirs in names.items()}
    for copy, source in _HF_TIES:
        out[copy] = out[source]
    return out


def from_hf_state_dict(hf_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """transformers' state dict (`hf_class`; tied copies optional) -> ours, tied copy included."""
    names = _name_map(cfg)
    what = f"{hf_class(cfg).__name__} state dict"
    _check_keys(hf_state, set(names.values()), {copy for copy, _ in _HF_TIES} | set(_HF_IGNORED), what)
    _check_ties(hf_state, _HF_TIES, what)
    out = {ours: hf_state[theirs] for ours, theirs in names.items()}
    _check_shapes(out, cfg, names.__getitem__, what)
    for copy, source in _OUR_TIES:
        out[copy] = out[source]
    return out


def load_into_hf(model: "BertForMLM"):
    """The transformers model (`hf_class`) holding a copy of an unsharded model's weights (same dtype, device, mode)."""
    state = model.state_dict()
    reference = state["embeddings.word_embeddings.weight"]
    hf = hf_class(model.cfg)(hf_config(model.cfg))
    hf.to(device=reference.device, dtype=reference.dtype)
    hf.load_state_dict(to_hf_state_dict(state, model.cfg), strict=True)
    return hf.train(model.training)

"""Checkpoint <-> HuggingFace folder conversion, in one process without a process group.

`export_hf` reads a sharded checkpoint of any layout (DCP reassembles the full tensors) and
writes a transformers folder: config.json + model.safetensors (BertForMaskedLM or
MegatronBertForMaskedLM, by the model's norm_position) and the tokenizer. `import_hf` turns such
a folder (ours, or any BERT or MegatronBERT masked-LM), and
`import_deepspeed` a DeepSpeed-backend checkpoint, into a weights-only native checkpoint that
`rapidnlp pretrain --resume` starts from at any layout. Each writes to a temporary folder and
renames it when complete.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings

import torch
import torch.distributed.checkpoint as dcp

from rapidnlp.config import REMOVED, Config, ModelConfig, apply
from rapidnlp.convert.hf import from_hf_state_dict, hf_class, hf_config, to_hf_state_dict
from rapidnlp.errors import UserError
from rapidnlp.io import write_json_atomic
from rapidnlp.model.bert import BertForMLM
from rapidnlp.train.checkpoint import DEEPSPEED_KIND, FORMAT_VERSION, check_shapes, manifest, verify
from rapidnlp.train.safe_dcp import SafeLoadPlanner, SafeReader, read_metadata

# Conversion runs in one process on purpose: DCP's reminder that there is no process group is noise.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


PRETRAINING_MODULES = "pretraining_modules.safetensors"


def load_config_json(path: str) -> Config:
    config = Config()
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read the checkpoint's config ({e})") from None
    for section, values in data.items():
        if section == "objectives":
            config.objectives = {}
        for key, value in values.items():
            if f"{section}.{key}" in REMOVED:
                continue  # written by an older version; its replacement has its own entry
            apply(config, section, key, value, path)
    return config


def read_native(path: str) -> tuple[Config, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The config, the full (unsharded) encoder weights, and any other model tensors of a native
    checkpoint (pretraining-only modules such as knowledge fusion), which no HF class holds."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    verify(path)
    config = load_config_json(os.path.join(path, "config.json"))
    with torch.device("meta"):
        shapes = BertForMLM(config.model).state_dict()
    check_shapes(path, {k: v.shape for k, v in shapes.items()})
    stored = {
        k[len("model."):]: v for k, v in read_metadata(path).state_dict_metadata.items()
        if k.startswith("model.") and isinstance(v, TensorStorageMetadata)
    }
    model = BertForMLM(config.model)
    state = {k: v for k, v in model.state_dict().items() if k in stored}
    extras = {k: torch.empty(md.size, dtype=md.properties.dtype) for k, md in stored.items() if k not in shapes}
    dcp.load({"model": {**state, **extras}}, storage_reader=SafeReader(path), planner=SafeLoadPlanner(), no_dist=True)
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return config, model.state_dict(), extras


def _fresh(out: str) -> str:
    if os.path.exists(out) and os.listdir(out):
        raise UserError(f"{out}: exists and is not empty; choose a new output folder")
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def _finish(tmp: str, out: str) -> None:
    if os.path.isdir(out):
        os.rmdir(out)  # empty, checked by _fresh
    os.replace(tmp, out)


def export_hf(ckpt: str, out: str) -> dict:
    from rapidnlp.convert.hf_tokenizer import save_fast_tokenizer

    config, state, extras = read_native(ckpt)
    tmp = _fresh(out)
    try:
        hf = hf_class(config.model)(hf_config(config.model))
        hf.load_state_dict(to_hf_state_dict(state, config.model), strict=True)
        hf.save_pretrained(tmp)
        tokenizer = os.path.join(ckpt, "tokenizer.model")
        if os.path.isfile(tokenizer):
            save_fast_tokenizer(tokenizer, tmp)
        with open(os.path.join(tmp, "rapidnlp_config.json"), "w") as f:
            f.write(config.to_json())
        if extras:  # kept beside the HF model, never dropped silently
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in extras.items()}, os.path.join(tmp, PRETRAINING_MODULES))
        _finish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"tensors": len(state), "extras": sorted(extras), "class": type(hf).__name__,
            "tokenizer": os.path.isfile(os.path.join(out, "tokenizer.json"))}


def _model_config_from_hf(hf_dir: str) -> ModelConfig:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"{hf_dir}: not a transformers folder (no config.json)")
    with open(path) as f:
        hf = json.load(f)
    layouts = {"bert": "post", "megatron-bert": "pre"}
    if hf.get("model_type") not in layouts:
        raise UserError(f"{path}: model_type '{hf.get('model_type')}' is neither bert nor megatron-bert "
                        "(RapidNLP's encoder has BERT's post-LayerNorm or MegatronBERT's pre-LayerNorm layout)")
    missing = [k for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
                           "vocab_size", "max_position_embeddings", "type_vocab_size") if k not in hf]
    if missing:
        raise UserError(f"{path}: no {', '.join(missing)} (a transformers {hf['model_type']} config has them)")
    return ModelConfig(
        norm_position=layouts[hf["model_type"]],
        num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"], num_heads=hf["num_attention_heads"],
        ffn_size=hf["intermediate_size"], vocab_size=hf["vocab_size"],
        max_position_embeddings=hf["max_position_embeddings"], type_vocab_size=hf["type_vocab_size"],
        dropout=hf.get("hidden_dropout_prob", 0.1), attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-12), init_std=hf.get("initializer_range", 0.02),
    )


def _pad_vocab(hf_state: dict, cfg: ModelConfig) -> dict:
    """A foreign vocabulary not a multiple of 128 gets zero rows (never predicted: labels stay below it)."""
    out = dict(hf_state)
    for name in ("bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight",
                 "cls.predictions.bias", "cls.predictions.decoder.bias"):
        t = out.get(name)
        if t is not None and t.shape[0] < cfg.padded_vocab_size:
            pad = torch.zeros((cfg.padded_vocab_size - t.shape[0], *t.shape[1:]), dtype=t.dtype)
            out[name] = torch.cat([t, pad])
    return out


def import_hf(hf_dir: str, out: str) -> dict:
    from safetensors.torch import load_file

    cfg = _model_config_from_hf(hf_dir)
    weights = os.path.join(hf_dir, "model.safetensors")
    if not os.path.isfile(weights):
        raise UserError(f"{hf_dir}: no model.safetensors (only safetensors weights are read: pickles can run code)")
    hf_state = _pad_vocab(load_file(weights), cfg)
    state = from_hf_state_dict(hf_state, cfg)
    config = Config(model=cfg)
    ours = os.path.join(hf_dir, "rapidnlp_config.json")
    if os.path.isfile(ours):  # our own export: keep the training settings and the true vocabulary size
        config = load_config_json(ours)
        cfg.vocab_size = config.model.vocab_size
        config.model = cfg
    return write_weights(state, config, os.path.join(hf_dir, "spiece.model"), hf_dir, out)


def import_deepspeed(ckpt: str, out: str) -> dict:
    """A train.backend = deepspeed checkpoint as a weights-only native checkpoint: its gathered fp32
    weights (DCP shards, as every native checkpoint holds them) with the objectives' modules;
    DeepSpeed's own pickled files are not read at all."""
    if verify(ckpt).get("kind") != DEEPSPEED_KIND:
        raise UserError(f"{ckpt}: not a train.backend = deepspeed checkpoint; native checkpoints resume as they are")
    config, state, extras = read_native(ckpt)
    return write_weights({**state, **extras}, config, os.path.join(ckpt, "tokenizer.model"), ckpt, out)


def write_weights(state: dict[str, torch.Tensor], config: Config, tokenizer: str, source: str, out: str) -> dict:
    """A weights-only native checkpoint (kind "weights"): `rapidnlp pretrain --resume` starts a
    fresh run from it at any layout."""
    tmp = _fresh(out)
    try:
        state = {k: v.contiguous() for k, v in state.items()}
        dcp.save({"model": state}, checkpoint_id=tmp, no_dist=True)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            f.write(config.to_json())
        if os.path.isfile(tokenizer):
            shutil.copyfile(tokenizer, os.path.join(tmp, "tokenizer.model"))
        meta = {"format": FORMAT_VERSION, "kind": "weights", "step": 0, "source": os.path.abspath(source),
                "layout": None, "files": manifest(tmp)}
        write_json_atomic(os.path.join(tmp, "meta.json"), meta)
        _finish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"tensors": len(state), "tokenizer": os.path.isfile(os.path.join(out, "tokenizer.model"))}


def info(ckpt: str) -> str:
    """What `rapidnlp ckpt info` prints."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = verify(ckpt)
    config = load_config_json(os.path.join(ckpt, "config.json"))
    tensors = {k: v for k, v in read_metadata(ckpt).state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
    by_part: dict[str, list[int]] = {}
    for name, md in tensors.items():
        part = name.split(".", 1)[0]
        n = 1
        for d in md.size:
            n *= d
        counts = by_part.setdefault(part, [0, 0])
        counts[0] += 1
        counts[1] += n * md.properties.dtype.itemsize
    m = config.model
    lines = [
        f"checkpoint: {os.path.abspath(ckpt)}",
        f"kind: {meta.get('kind', 'training')}, step {meta['step']}, "
        f"tokens {meta.get('nonpad_tokens', meta.get('consumed_tokens', 0)):,}, samples {meta.get('consumed_samples', 0):,}",
        f"layout: {json.dumps(meta['layout'])}",
        f"model: {m.num_layers} layers x {m.hidden_size} hidden x {m.num_heads} heads, ffn {m.ffn_size}, "
        f"vocab {m.vocab_size} (padded {m.padded_vocab_size}), seq_len {config.data.seq_len}",
    ]
    for part, (count, nbytes) in sorted(by_part.items()):
        lines.append(f"{part}: {count} tensors, {nbytes:,} bytes")
    files = sum(f["bytes"] for f in meta["files"].values())
    lines.append(f"files: {len(meta['files'])}, {files:,} bytes on disk")
    return "\n".join(lines)

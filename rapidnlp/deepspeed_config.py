"""The DeepSpeed backend's config rules, torch-free (rapidnlp.config validates with them before
any process starts; rapidnlp/train/deepspeed_backend.py builds the engine from them).

The generated DeepSpeed config comes from parallel.zero/cpu_offload and train.precision; a
user's JSON (train.deepspeed_config) is merged over it, so its ZeRO, offload and precision
settings win, while the batch sizes, clipping, optimizer and schedule stay train.*'s.
Must not import torch or deepspeed.
"""
from __future__ import annotations

import json
import math

from rapidnlp.errors import UserError


def _accumulation(config) -> int:
    t = config.train
    return t.global_batch // (t.micro_batch * config.parallel.dp)


# DeepSpeed config keys that train.* owns: a user's JSON may repeat them ("auto" or the same
# value) but not change them, since the loss normalisation and the schedule are ours.
OWNED = {
    "train_batch_size": "train.global_batch",
    "train_micro_batch_size_per_gpu": "train.micro_batch",
    "gradient_accumulation_steps": "train.global_batch / (train.micro_batch x dp)",
    "gradient_clipping": "train.clip_grad",
}
# Sections we refuse outright: AdamW's hyperparameters and the LR schedule are train.*'s.
REFUSED = {"optimizer": "train.lr, train.beta1/2, train.eps, train.weight_decay",
           "scheduler": "train.warmup_steps, train.lr_decay, train.min_lr"}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def deepspeed_config(config) -> dict:
    """The DeepSpeed config for a resolved Config: ours from parallel.zero/cpu_offload and
    train.precision, with train.deepspeed_config's JSON merged over it. Raises UserError for a
    JSON that contradicts train.*. Needs no deepspeed import (config validation can call it)."""
    p, t = config.parallel, config.train
    zero = {"stage": p.zero}
    if p.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu"}
        if p.zero == 3:
            zero["offload_param"] = {"device": "cpu"}
    ours = {
        "train_batch_size": t.global_batch,
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": _accumulation(config),
        "gradient_clipping": t.clip_grad,  # 0: no clipping, as ours
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0,  # 0: dynamic
                 "initial_scale_power": round(math.log2(t.loss_scale)), "loss_scale_window": t.loss_scale_window},
        "steps_per_print": 2**31 - 1,  # progress lines are ours
        "wall_clock_breakdown": False,
    }
    if not t.deepspeed_config:
        return ours
    path = t.deepspeed_config
    try:
        with open(path) as f:
            user = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"train.deepspeed_config: cannot read {path}: {e}") from None
    if not isinstance(user, dict):
        raise UserError(f"train.deepspeed_config: {path} must hold a JSON object")
    for key, owner in REFUSED.items():
        if key in user:
            raise UserError(f"train.deepspeed_config: {path} sets '{key}'; remove it, {owner} set that")
    for key, owner in OWNED.items():
        if key in user and user[key] != "auto" and user[key] != ours[key]:
            raise UserError(f"train.deepspeed_config: {path} sets {key} = {user[key]}, but {owner} gives "
                            f"{ours[key]}; remove it from the JSON or change the {owner.split()[0]} setting")
    user = {k: v for k, v in user.items() if k not in OWNED}
    if user.get("bf16", {}).get("enabled") or user.get("fp16", {}).get("enabled"):
        # The JSON's precision wins: drop ours, so that exactly one of the two is enabled.
        ours = {k: v for k, v in ours.items() if k not in ("bf16", "fp16")}
    return _merge(ours, user)



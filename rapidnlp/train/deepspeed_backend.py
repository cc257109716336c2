"""The optional DeepSpeed backend (`train.backend = "deepspeed"`, the `deepspeed` extra).

The same BertForMLM, data, sampler, loss normalisation and LR schedule as the torch backend, but
the model and optimizer go through `deepspeed.initialize`: ZeRO stage 0-3, `offload_optimizer`
(DeepSpeedCPUAdam) and bf16/fp16 come from a DeepSpeed config generated from ours
(`deepspeed_config`), over which a user's JSON (`train.deepspeed_config`) wins for ZeRO, offload
and precision. Data parallelism only: tensor and pipeline parallelism stay with the torch backend
(rapidnlp.config enforces it).

What it must not do: initialise the process group (rapidnlp.distributed.bootstrap did; DeepSpeed wraps
the existing one), import deepspeed at module level (the extra is optional; `deepspeed_config`
needs no deepspeed), or own the LR schedule and batch sizes (train.* does).

On CPU (DeepSpeed 0.19.8, torch 2.13):
- DeepSpeed picks its CPU accelerator, whose communication backend is gloo; we set
  DS_ACCELERATOR=cpu when no GPU is visible so that it does not probe for one.
- It reads RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* from the environment (init_distributed exports
  them); `dist_init_required=False` makes it adopt our gloo group instead of creating one or
  trying MPI discovery.
- Its C++ ops JIT-compile with ninja and g++ on first use: deepspeed_shm_comm whenever its
  communication backend starts (every run), cpu_adam for DeepSpeedCPUAdam; each takes one to three
  minutes on 2 cold cores. TORCH_EXTENSIONS_DIR defaults here to ~/.cache/rapidnlp/torch_extensions
  so that later runs load the built libraries in about 2 s.
- Its fp16 needs a CPU with fp16 support in oneDNN (AVX512-FP16/AMX); elsewhere DeepSpeed raises
  a ValueError deep in initialize, so we refuse fp16 first with one line.
- Without ZeRO and mixed precision it clips with a gradient norm it does not keep; we compute
  that norm from the reduced gradients for the metrics.
- Checkpoints are not written yet: the engine's own format is not our layout
  (rapidnlp.train.checkpoint), so checkpoint.enabled = true is refused with one line.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time

import torch

from rapidnlp.config import Config, accumulation_steps
from rapidnlp.distributed.mesh import ParallelDims
from rapidnlp.errors import UserError
from rapidnlp.model.bert import BertForMLM
from rapidnlp.optim import lr_at, param_groups
from rapidnlp.optim.norms import global_norm
from rapidnlp.train.memory import optimizer_state_bytes, tensor_bytes
from rapidnlp.train.trainer import Data, Trainer

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
NO_CHECKPOINTS = "train.backend = deepspeed does not write checkpoints yet; set checkpoint.enabled = false"


def default_extensions_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "rapidnlp", "torch_extensions")


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def deepspeed_config(config: Config) -> dict:
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
        "gradient_accumulation_steps": accumulation_steps(config),
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


def import_deepspeed():
    """deepspeed, set up for this machine; a missing extra is one line."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", default_extensions_dir())
    try:
        import deepspeed
    except ImportError:
        raise UserError('train.backend = deepspeed needs DeepSpeed: pip install --no-build-isolation "deepspeed==0.19.8" '
                        "(after torch; README.md, DeepSpeed backend)") from None
    return deepspeed


class DeepSpeedTrainer(Trainer):
    """Trainer whose model is a DeepSpeed engine. Evaluation and the fit loop are the Trainer's;
    the step differs: DeepSpeed accumulates, reduces, clips and steps."""

    def __init__(self, config: Config, dims: ParallelDims, *, data: Data | None = None, stream=None):
        if config.checkpoint.enabled:
            raise UserError(NO_CHECKPOINTS)
        self.ds_config = deepspeed_config(config)
        super().__init__(config, dims, data=data, stream=stream)

    def _build_model(self, injection) -> None:
        """BertForMLM and our AdamW (DeepSpeedCPUAdam under offload) wrapped by deepspeed.initialize."""
        deepspeed = import_deepspeed()
        t = self.config.train
        if self.ds_config.get("fp16", {}).get("enabled"):
            from deepspeed.accelerator import get_accelerator

            if not get_accelerator().is_fp16_supported():
                raise UserError(f"fp16 (train.precision or train.deepspeed_config): DeepSpeed's "
                                f"{get_accelerator().device_name()} accelerator does not support it here; use bf16 or fp32")
        model = BertForMLM(self.config.model).to(self.device)
        groups = param_groups(model, t.weight_decay)
        zero = self.ds_config.get("zero_optimization", {})
        offload = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
        if offload:  # DeepSpeed insists on its own CPU Adam for ZeRO-Offload
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            started = time.perf_counter()
            optimizer = DeepSpeedCPUAdam(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, adamw_mode=True)
            self.op_load_seconds = time.perf_counter() - started  # the cpu_adam JIT build, when cold
        else:
            optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps)
        self.model, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config, dist_init_required=False
        )
        self.base_optimizer = optimizer  # ours; DeepSpeed's wrapper steps it on flat partitions
        # Without ZeRO and mixed precision DeepSpeed clips with a norm it does not keep: we take
        # it from the dp-reduced gradients before its step.
        engine = self.model
        self._plain_fp32 = not (engine.zero_optimization() or engine.fp16_enabled() or engine.bfloat16_enabled())
        self.pipeline = None
        self.loss_parallel = False
        self.scaler = None  # DeepSpeed's fp16 optimizer scales the loss itself

    def _autocast(self):
        # DeepSpeed casts the module itself for bf16/fp16 (fp32 master weights in its optimizer).
        return contextlib.nullcontext()

    def train_step(self) -> dict:
        t = self.config.train
        engine = self.model
        started = time.perf_counter()
        lr = lr_at(self.step, t)
        for group in self.base_optimizer.param_groups:
            group["lr"] = lr
        batches = [self._batch(self.data.train, idx) for idx in self.sampler.next_step()]
        global_count = self._global_count(batches)
        # DeepSpeed divides the loss by gradient_accumulation_steps and averages gradients over
        # dp: scaling by both makes the gradient the global batch's mean token loss, as the
        # single process computes it.
        scale = self.dims.dp * engine.gradient_accumulation_steps() / global_count
        loss_total = torch.zeros((), device=self.device)
        skipped_before, norm = engine.skipped_steps, None
        fp16 = engine.fp16_enabled()
        loss_scale = float(engine.optimizer.loss_scale) if fp16 else None  # the scale this step runs with
        with self.activations.track():
            for i, batch in enumerate(batches):
                loss_sum = self._forward_loss(batch)
                engine.backward(loss_sum * scale)
                if i == len(batches) - 1 and self._plain_fp32:
                    norm = float(global_norm([p.grad for p in engine.module.parameters() if p.grad is not None]))
                engine.step()  # accumulates; reduces, clips and steps at the boundary
                loss_total += loss_sum.detach()
        overflow = engine.skipped_steps > skipped_before
        grad_norm = None if overflow else _float(engine.get_global_grad_norm() if norm is None else norm)
        params = list(engine.module.parameters())
        memory = {
            # ZeRO-3 keeps this rank's partition in ds_tensor and leaves an empty p.data between steps
            "mem_params_bytes": tensor_bytes(getattr(p, "ds_tensor", p) for p in params),
            "mem_grads_bytes": None,  # DeepSpeed frees its gradient buckets inside step()
            "mem_activation_bytes": self.activations.bytes,
            "mem_optimizer_bytes": optimizer_state_bytes(self.base_optimizer),
        }
        row = self._finish_step(loss_total, global_count, lr, grad_norm, started, memory)
        if fp16:
            row["loss_scale"], row["skipped_steps"] = loss_scale, engine.skipped_steps
        return row

    def fit(self, checkpointer=None, resume: str | None = None) -> list[dict]:
        if checkpointer is not None or resume:
            raise UserError(NO_CHECKPOINTS)
        return super().fit(None, None)


def _float(value) -> float | None:
    if value is None:
        return None
    return float(value.item() if isinstance(value, torch.Tensor) else value)

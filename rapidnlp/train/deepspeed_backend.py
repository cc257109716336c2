"""The optional DeepSpeed backend (`train.backend = "deepspeed"`, the `deepspeed` extra).

The same model (objectives' pieces included), data, sampler, forward, loss function (its
normalisation too) and LR schedule as the torch backend, but
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
- Checkpoints (rapidnlp.train.deepspeed_checkpoint) hold DeepSpeed's own files, which it reads
  back through our checkpoint engine (torch.load with weights_only=True, never a full unpickle),
  and the gathered fp32 weights in our DCP format for `rapidnlp convert`.
"""
from __future__ import annotations

import contextlib
import math
import os
import time

import torch

from rapidnlp.config import Config
from rapidnlp.deepspeed_config import deepspeed_config
from rapidnlp.distributed.mesh import ParallelDims
from rapidnlp.errors import UserError
from rapidnlp.optim import lr_at, param_groups
from rapidnlp.optim.norms import global_norm
from rapidnlp.train.deepspeed_checkpoint import install_safe_loading
from rapidnlp.train.memory import optimizer_state_bytes, tensor_bytes
from rapidnlp.train.trainer import Data, Trainer, reduce_dp

def default_extensions_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "rapidnlp", "torch_extensions")


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
        self.ds_config = deepspeed_config(config)
        super().__init__(config, dims, data=data, stream=stream)

    def _build_model(self, model) -> None:
        """The model (objectives' pieces included) and our AdamW (DeepSpeedCPUAdam under
        offload) wrapped by deepspeed.initialize."""
        deepspeed = import_deepspeed()
        t = self.config.train
        if self.ds_config.get("fp16", {}).get("enabled"):
            from deepspeed.accelerator import get_accelerator

            if not get_accelerator().is_fp16_supported():
                raise UserError(f"fp16 (train.precision or train.deepspeed_config): DeepSpeed's "
                                f"{get_accelerator().device_name()} accelerator does not support it here; use bf16 or fp32")
        model.materialize_pieces(self.device)  # DeepSpeed partitions the whole model itself
        model = model.to(self.device)
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
        install_safe_loading(self.model)
        self.base_optimizer = optimizer  # ours; DeepSpeed's wrapper steps it on flat partitions
        # Without ZeRO and mixed precision DeepSpeed clips with a norm it does not keep: we take
        # it from the dp-reduced gradients before its step.
        engine = self.model
        self._plain_fp32 = not (engine.zero_optimization() or engine.fp16_enabled() or engine.bfloat16_enabled())
        self.parts = None
        self.loss_parallel = False
        self.scaler = None  # DeepSpeed's fp16 optimizer scales the loss itself

    def _autocast(self):
        # DeepSpeed casts the module itself for bf16/fp16 (fp32 master weights in its optimizer).
        return contextlib.nullcontext()

    def _forward_only(self, inputs):
        return self.model(*inputs)

    def train_step(self) -> dict:
        t = self.config.train
        engine = self.model
        started = time.perf_counter()
        lr = lr_at(self.step, t)
        for group in self.base_optimizer.param_groups:
            group["lr"] = lr
        self._set_progress()
        batch, waited = self._next_batch()
        norms, tokens = self._counts(batch)
        # DeepSpeed divides the loss by gradient_accumulation_steps and averages gradients over
        # dp: scaling by both makes the gradient the global batch's weighted mean losses, as the
        # single process computes them. The forward and the loss are the torch backend's.
        n = engine.gradient_accumulation_steps()
        self.loss_fn.begin(batch, norms, self.dims.dp * n)
        skipped_before, norm = engine.skipped_steps, None
        fp16 = engine.fp16_enabled()
        loss_scale = float(engine.optimizer.loss_scale) if fp16 else None  # the scale this step runs with
        inputs = self._inputs(batch)
        with self.activations.track():
            for i, chunk in enumerate(torch.arange(inputs[0].shape[0], device=self.device).chunk(n)):
                engine.backward(self.loss_fn(engine(*(x[chunk] for x in inputs)), chunk))
                if i == n - 1 and self._plain_fp32:
                    norm = float(global_norm([p.grad for p in engine.module.parameters() if p.grad is not None]))
                engine.step()  # accumulates; reduces, clips and steps at the boundary
        sums = reduce_dp(self.loss_fn.recorded(n, self.device), self.dims)
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
        row = self._finish_step(sums, norms, tokens, lr, grad_norm, started, memory)
        row["data_wait_s"] = waited
        # DeepSpeed skips only fp16 overflows; in fp32/bf16 it applies a non-finite step, which
        # still counts towards train.max_skipped_steps (and non-finite weights are never saved).
        self._count_skip(row, overflow or not math.isfinite(row["loss"]))
        if fp16:
            row["loss_scale"] = loss_scale
        return row


def _float(value) -> float | None:
    if value is None:
        return None
    return float(value.item() if isinstance(value, torch.Tensor) else value)

"""The training loop: data -> model -> parallelize -> optimizer steps -> metrics.

It runs inside an initialised process group (rapidnlp.distributed.bootstrap) and sees the model only
after rapidnlp.parallel has made it parallel. One optimizer step consumes one global batch:
this rank's share of it in micro-batches, gradients accumulated, the loss normalised by the
masked-token count of the whole global batch (so the single process and every layout compute
the same loss and gradients), then clipping on full norms, the LR schedule and the step.
"""
from __future__ import annotations

import contextlib
import os
import random
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel
from torch.nn.parallel import DistributedDataParallel

from rapidnlp.config import Config, max_predictions
from rapidnlp.data.indexed import IndexedDataset
from rapidnlp.data.mlm import IGNORE_INDEX, MLMSampleBuilder, SpecialIds, build_sample_ranges
from rapidnlp.data.sampler import GlobalBatchSampler
from rapidnlp.data.tokenizer import Tokenizer
from rapidnlp.distributed.mesh import ParallelDims
from rapidnlp.errors import UserError
from rapidnlp.model.bert import BertForMLM
from rapidnlp.optim import build_optimizer, lr_at
from rapidnlp.optim.loss_scale import DynamicLossScaler
from rapidnlp.optim.norms import clip_grad_norm_
from rapidnlp.parallel import parallelize, uses_loss_parallel
from rapidnlp.parallel.pipeline import Injection, build_pipeline
from rapidnlp.parallel.tensor_parallel import reduce_partial_grads
from rapidnlp.pretrain.mlm import mlm_loss_sum
from rapidnlp.train.checkpoint import Checkpointer
from rapidnlp.train.flops import peak_flops, training_flops_per_sequence
from rapidnlp.train.memory import ActivationCounter, optimizer_state_bytes, tensor_bytes
from rapidnlp.train.metrics import MetricsWriter, peak_memory_bytes


# Our logits come out of a Linear as a view and are never modified in place, which is the case
# this FSDP2 warning is about.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Data:
    train: MLMSampleBuilder
    val: MLMSampleBuilder | None
    special: SpecialIds


def load_data(config: Config) -> Data:
    """Tokenizer + indexed dataset -> train/val MLM sample builders (val: the last samples)."""
    d = config.data
    if not d.path:
        raise UserError("data.path is not set: point it at a dataset prefix written by `rapidnlp prepare`")
    tokenizer = Tokenizer(d.tokenizer)
    dataset = IndexedDataset(d.path)
    ranges = build_sample_ranges(dataset.sequence_lengths, dataset.document_indices, d.seq_len - 2)
    if len(ranges) == 0:
        raise UserError(f"{d.path}: the dataset holds no tokens")
    n_val = int(len(ranges) * d.val_fraction) if config.train.eval_interval else 0
    special = SpecialIds(
        pad=tokenizer.pad_id, cls=tokenizer.cls_id, sep=tokenizer.sep_id, mask=tokenizer.mask_id,
        vocab_size=tokenizer.vocab_size,
    )
    common = dict(
        seq_len=d.seq_len, max_predictions=max_predictions(config), mask_prob=d.mask_prob, seed=config.train.seed,
        word_starts=tokenizer.word_start_mask() if d.whole_word_mask else None,
    )
    train = MLMSampleBuilder(dataset, ranges[: len(ranges) - n_val], special, **common)
    val = MLMSampleBuilder(dataset, ranges[len(ranges) - n_val :], special, **common) if n_val else None
    if config.model.vocab_size == 0:
        config.model.vocab_size = tokenizer.vocab_size
    elif config.model.vocab_size < tokenizer.vocab_size:
        raise UserError(
            f"model.vocab_size ({config.model.vocab_size}) is smaller than the tokenizer's "
            f"({tokenizer.vocab_size}, {d.tokenizer}); set it to 0 to follow the tokenizer"
        )
    return Data(train=train, val=val, special=special)


def _reduce_dp(t: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    if dims.dp_enabled:
        dist.all_reduce(t, group=dims.mesh["dp"].get_group())
    return t


def _scalar(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _gradient_sync(model, enabled: bool):
    """Skip the dp gradient reduction on all but the last micro-batch of a step."""
    if isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext() if enabled else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


class Trainer:
    def __init__(self, config: Config, dims: ParallelDims, *, data: Data | None = None, stream=None,
                 injection: Injection | None = None):
        self.config = config
        self.dims = dims
        self.device = dims.device
        self.data = data or load_data(config)
        t = config.train
        seed_everything(t.seed)  # identical initial weights on every rank
        self._build_model(injection)
        self.activations = ActivationCounter()
        self.sampler = GlobalBatchSampler(
            len(self.data.train), global_batch=t.global_batch, micro_batch=t.micro_batch,
            dp_rank=dims.dp_rank, dp_size=dims.dp, seed=t.seed,
        )
        self.step = 0
        self.stop_requested = False
        self.is_logger = dist.get_rank() == 0
        self.metrics = MetricsWriter(
            t.run_dir, t.steps, enabled=self.is_logger, tensorboard=t.tensorboard, stream=stream
        )
        self.peak = peak_flops(self.device, t.peak_tflops)
        self.flops_per_step = t.global_batch * training_flops_per_sequence(
            config.model, config.data.seq_len, max_predictions(config)
        )
        # Dropout masks differ per dp rank (different samples) but agree within a tp group,
        # whose ranks compute on the same replicated activations.
        torch.manual_seed(t.seed + 1 + dims.dp_rank)

    def _build_model(self, injection: Injection | None) -> None:
        """model, optimizer, pipeline, loss_parallel and scaler (what another backend replaces)."""
        config, dims, t = self.config, self.dims, self.config.train
        self.pipeline = None  # pp > 1 or knowledge injection: stages run by rapidnlp.parallel.pipeline
        if dims.pp_enabled or injection is not None:
            self.pipeline = build_pipeline(config, dims, self.device, injection, forward_context=self._autocast)
            self.model = self.pipeline.model
        else:
            model = BertForMLM(config.model).to(self.device)
            self.model = parallelize(model, dims, config.parallel, t)
        zero1 = dims.mesh["dp"].get_group() if config.parallel.zero == 1 and dims.dp_enabled else None
        self.optimizer = build_optimizer(self.model, t, zero1_group=zero1)
        self.loss_parallel = uses_loss_parallel(dims, config.parallel)
        self.scaler = DynamicLossScaler(t.loss_scale, t.loss_scale_window) if t.precision == "fp16" else None

    def _batch(self, builder: MLMSampleBuilder, indices) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in builder.collate(indices).items()}

    def _autocast(self):
        """bf16/fp16 compute under autocast; the parameters (the master weights) stay fp32."""
        dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
        if self.config.train.precision in dtypes:
            return torch.autocast(self.device.type, dtype=dtypes[self.config.train.precision])
        return contextlib.nullcontext()

    def _loss_context(self):
        return loss_parallel() if self.loss_parallel else contextlib.nullcontext()

    def _forward_loss(self, batch) -> torch.Tensor:
        with self._autocast():
            logits = self.model(
                batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], batch["mlm_positions"]
            )
        return mlm_loss_sum(logits, batch["mlm_labels"])

    def _global_count(self, batches) -> torch.Tensor:
        count = sum((b["mlm_labels"] != IGNORE_INDEX).sum() for b in batches).to(torch.float32)
        return _reduce_dp(count, self.dims)

    def _forward_backward(self, batches, global_count: torch.Tensor) -> torch.Tensor:
        """Forward and backward over this rank's micro-batches; returns their summed token loss."""
        # The loss is a mean over the global batch; dp wrappers average gradients over dp ranks,
        # so each rank's share is scaled by dp to make that average the sum.
        scale = self.dims.dp / global_count * (self.scaler.scale if self.scaler else 1.0)
        if self.pipeline is not None:  # auxiliary losses enter as a mean per sample
            aux_scale = scale * global_count / self.config.train.global_batch
            with self.activations.track():
                loss_total, self._aux_total = self.pipeline.forward_backward(batches, scale, aux_scale)
            return loss_total
        loss_total = torch.zeros((), device=self.device)
        with self.activations.track():
            for i, batch in enumerate(batches):
                with _gradient_sync(self.model, i == len(batches) - 1), self._loss_context():
                    loss_sum = self._forward_loss(batch)
                    (loss_sum * scale).backward()
                loss_total += _scalar(loss_sum).detach()
        return loss_total

    def train_step(self) -> dict:
        t = self.config.train
        started = time.perf_counter()
        lr = lr_at(self.step, t)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batches = [self._batch(self.data.train, idx) for idx in self.sampler.next_step()]
        global_count = self._global_count(batches)
        loss_total = self._forward_backward(batches, global_count)
        params = list(self.model.parameters())
        reduce_partial_grads(params)
        memory = {"mem_params_bytes": tensor_bytes(params), "mem_grads_bytes": tensor_bytes(p.grad for p in params),
                  "mem_activation_bytes": self.activations.bytes}
        overflow = self.scaler.unscale_and_check([p.grad for p in params if p.grad is not None]) if self.scaler else False
        clip = self.pipeline.clip_grad_norm_ if self.pipeline else lambda c: clip_grad_norm_(params, c)
        grad_norm = None if overflow else clip(t.clip_grad)
        if not overflow:  # fp16 overflow: skip the update, the scaler backs off
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        memory["mem_optimizer_bytes"] = optimizer_state_bytes(self.optimizer)
        row = self._finish_step(loss_total, global_count, lr, grad_norm, started, memory)
        if self.pipeline is not None and self.pipeline.aux_names:
            aux = _reduce_dp(self._aux_total.clone(), self.dims) / t.global_batch
            row.update({f"aux_{name}": float(v) for name, v in zip(self.pipeline.aux_names, aux)})
        if self.scaler:
            row["loss_scale"] = self.scaler.scale  # the scale this step ran with
            self.scaler.update(overflow)
            row["skipped_steps"] = self.scaler.skipped_steps
        return row

    def _finish_step(self, loss_total: torch.Tensor, global_count: torch.Tensor, lr: float, grad_norm,
                     started: float, memory: dict) -> dict:
        """Count the step and return its metrics row (every backend's common part)."""
        t = self.config.train
        loss = _reduce_dp(loss_total, self.dims) / global_count
        self.step += 1
        elapsed = time.perf_counter() - started
        tflops = self.flops_per_step / elapsed / dist.get_world_size() / 1e12
        return {
            "step": self.step,
            "loss": float(loss),
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": t.global_batch * self.config.data.seq_len / elapsed,
            "tflops_per_device": tflops,
            "mfu": tflops * 1e12 / self.peak if self.peak else None,
            "peak_mem_bytes": peak_memory_bytes(self.device),
            **memory,
        }

    @torch.no_grad()
    def evaluate(self) -> float:
        """Masked-LM loss on the first eval_batches global batches of the held-out split."""
        t = self.config.train
        builder = self.data.val
        sampler = GlobalBatchSampler(
            len(builder), global_batch=t.global_batch, micro_batch=t.micro_batch,
            dp_rank=self.dims.dp_rank, dp_size=self.dims.dp, seed=t.seed, shuffle=False,
        )
        self.model.eval()
        total, count = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        for _ in range(t.eval_batches):
            batches = [self._batch(builder, idx) for idx in sampler.next_step()]
            count += self._global_count(batches)
            if self.pipeline is not None:
                total += self.pipeline.evaluate(batches)
                continue
            for batch in batches:
                with self._loss_context():
                    total += _scalar(self._forward_loss(batch))
        self.model.train()
        return float(_reduce_dp(total, self.dims) / count)

    def request_stop(self, *_) -> None:
        """Signal handler (SIGTERM/SIGUSR1): finish the current step, save, stop."""
        self.stop_requested = True

    def _agree(self, save_due: bool) -> tuple[bool, bool]:
        """(stop, save) as every rank sees them, so that all ranks act on the same step."""
        flags = torch.tensor([float(self.stop_requested), float(save_due)], device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return bool(flags[0]), bool(flags[1])

    def fit(self, checkpointer: Checkpointer | None = None, resume: str | None = None) -> list[dict]:
        """Train to train.steps (or until a stop signal). Returns this call's metric rows."""
        t = self.config.train
        rows = []
        resumed_from = None
        if resume:
            resumed_from = checkpointer.load(self, resume)["step"]
        self.metrics.start(self.step)
        self.model.train()
        while self.step < t.steps:
            row = self.train_step()
            if t.eval_interval and self.data.val is not None and self.step % t.eval_interval == 0:
                row["val_loss"] = self.evaluate()
            if resumed_from is not None:
                row["resumed_from"], resumed_from = resumed_from, None
            rows.append(row)
            self.metrics.write(row)
            if self.step % t.log_interval == 0 or self.step == t.steps:
                self.metrics.progress(row)
            if checkpointer is not None:
                stop, save = self._agree(checkpointer.due(self.step))
                if save or stop or self.step == t.steps:
                    checkpointer.save(self)
                if stop:
                    break
        if checkpointer is not None:
            checkpointer.wait()  # an async save still writing
        self.metrics.close()
        return rows


def write_run_config(config: Config) -> None:
    if dist.get_rank() == 0:
        os.makedirs(config.train.run_dir, exist_ok=True)
        with open(os.path.join(config.train.run_dir, "config.json"), "w") as f:
            f.write(config.to_json())

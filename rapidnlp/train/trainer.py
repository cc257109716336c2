"""The training loop: data -> objectives -> model -> parallelize -> optimizer steps -> metrics.

It runs inside an initialised process group (rapidnlp.distributed.bootstrap) and sees the model
only after rapidnlp.parallel has made it parallel (`Stages`). One optimizer step consumes one
global batch: this rank's share of it, collated with every objective's fields, run through
`Stages.forward_backward` (a pipeline schedule or the stage itself) with the objectives' one loss
function, each objective's loss normalised over the whole global batch (so the single process
and every layout compute the same loss and gradients), then clipping on full norms, the LR
schedule and the step. Evaluation is one forward-only path for every layout.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor.parallel import loss_parallel
from torch.nn.parallel import DistributedDataParallel

from rapidnlp.config import Config, accumulation_steps, max_predictions
from rapidnlp.data.indexed import IndexedDataset
from rapidnlp.data.knowledge.build import knowledge_dir
from rapidnlp.data.knowledge.kg import KnowledgeGraph
from rapidnlp.data.knowledge.samples import KnowledgeSampleBuilder
from rapidnlp.data.knowledge.sidestreams import tag_names
from rapidnlp.data.mlm import MLMSampleBuilder, SpecialIds, build_sample_ranges
from rapidnlp.data.prefetch import Prefetcher
from rapidnlp.data.sampler import GlobalBatchSampler
from rapidnlp.data.tokenizer import Tokenizer
from rapidnlp.distributed.mesh import ParallelDims
from rapidnlp.errors import AgreedError, UserError
from rapidnlp.model.flops import training_flops_per_sequence
from rapidnlp.optim import build_optimizer, lr_at
from rapidnlp.optim.loss_scale import DynamicLossScaler
from rapidnlp.optim.norms import local_tensor
from rapidnlp.parallel import uses_loss_parallel
from rapidnlp.parallel.compile import compile_enabled, compile_seconds, compiled_graphs
from rapidnlp.parallel.pipeline import Stages
from rapidnlp.pretrain.objective import ObjectiveLoss, build_model, build_objectives, collate, normalisers, plain
from rapidnlp.train.checkpoint import Checkpointer, latest_checkpoint
from rapidnlp.train.flops import peak_flops
from rapidnlp.train.memory import ActivationCounter, optimizer_state_bytes, tensor_bytes
from rapidnlp.train.metrics import MetricsWriter, peak_memory_bytes


# Our logits come out of a Linear as a view and are never modified in place, which is the case
# this FSDP2 warning is about.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


class Diverged(AgreedError):
    """Training stopped on non-finite state (decided on values reduced over all ranks)."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Data:
    train: MLMSampleBuilder
    val: MLMSampleBuilder | None
    special: SpecialIds
    entity_tokens: IndexedDataset | None = None  # knowledge runs: each entity's surface-form tokens


def load_data(config: Config) -> Data:
    """Tokenizer + indexed dataset -> train/val sample builders (val: the last samples): plain MLM
    samples, or with knowledge.enabled the knowledge samples of PREFIX.knowledge/ (whose sizes fill
    the knowledge.num_* fields, as the tokenizer fills model.vocab_size)."""
    d, k = config.data, config.knowledge
    if not d.path:
        raise UserError("data.path is not set: point it at a dataset prefix written by `rapidnlp prepare`")
    tokenizer = Tokenizer(d.tokenizer)
    special = SpecialIds(
        pad=tokenizer.pad_id, cls=tokenizer.cls_id, sep=tokenizer.sep_id, mask=tokenizer.mask_id,
        vocab_size=tokenizer.vocab_size,
    )
    common = dict(seq_len=d.seq_len, max_predictions=max_predictions(config), mask_prob=d.mask_prob,
                  seed=config.train.seed, dynamic=d.dynamic_mask)
    entity_tokens = None
    if k.enabled:
        folder = knowledge_dir(d.path)
        kg = KnowledgeGraph.load(os.path.join(folder, "kg.npz"))
        dataset = IndexedDataset(os.path.join(folder, "tokens"))
        max_tokens = d.seq_len - 2 - k.triple_budget

        def builder(ranges):
            return KnowledgeSampleBuilder(folder, kg, ranges, special, k, **common)

        entity_tokens = IndexedDataset(os.path.join(folder, "entities"))
        k.num_entities, k.num_relations = kg.num_entities, len(kg.predicate_names)
        k.num_tags = len(tag_names(kg))
    else:
        dataset = IndexedDataset(d.path)
        max_tokens = d.seq_len - 2
        word_starts = tokenizer.word_start_mask() if d.whole_word_mask else None

        def builder(ranges):
            return MLMSampleBuilder(dataset, ranges, special, word_starts=word_starts, **common)

    # data.cross_documents: the whole corpus as one document, so samples pack across boundaries.
    documents = np.array([0, len(dataset.sequence_lengths)]) if d.cross_documents else dataset.document_indices
    ranges = build_sample_ranges(dataset.sequence_lengths, documents, max_tokens)
    if len(ranges) == 0:
        raise UserError(f"{d.path}: the dataset holds no tokens")
    n_val = int(len(ranges) * d.val_fraction) if config.train.eval_interval else 0
    train = builder(ranges[: len(ranges) - n_val])
    val = builder(ranges[len(ranges) - n_val:]) if n_val else None
    if config.model.vocab_size == 0:
        config.model.vocab_size = tokenizer.vocab_size
    elif config.model.vocab_size < tokenizer.vocab_size:
        raise UserError(
            f"model.vocab_size ({config.model.vocab_size}) is smaller than the tokenizer's "
            f"({tokenizer.vocab_size}, {d.tokenizer}); set it to 0 to follow the tokenizer"
        )
    return Data(train=train, val=val, special=special, entity_tokens=entity_tokens)


def _flat(micro_batches) -> list[int]:
    return [int(i) for micro in micro_batches for i in micro]


def reduce_dp(t: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    if dims.dp_enabled:
        dist.all_reduce(t, group=dims.mesh["dp"].get_group())
    return t


def _gradient_sync(model, enabled: bool):
    """Skip the dp gradient reduction on all but the last micro-batch of a step."""
    if isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext() if enabled else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


class Trainer:
    compiled = False  # blocks compiled (train.compile); another backend's _build_model leaves it off

    def __init__(self, config: Config, dims: ParallelDims, *, data: Data | None = None, stream=None):
        self.config = config
        self.dims = dims
        self.device = dims.device
        self.data = data or load_data(config)
        t = config.train
        self.objectives = build_objectives(config, self.data)
        seed_everything(t.seed)  # identical initial weights on every rank
        model = build_model(config, self.objectives, materialize=False)  # tables materialised when sharded
        self.head_names = model.head_names
        self.model_names = set(model.state_dict())  # the full model's, whatever this rank holds
        self.piece_names = set(model.pieces)
        self.field_names = model.field_names
        self.flops_per_step = t.global_batch * training_flops_per_sequence(
            config.model, config.data.seq_len, model.pieces.values())
        self.loss_fn = ObjectiveLoss(self.objectives, self.head_names)
        self._build_model(model)
        self.activations = ActivationCounter()
        self.sampler = GlobalBatchSampler(
            len(self.data.train), global_batch=t.global_batch, micro_batch=t.micro_batch,
            dp_rank=dims.dp_rank, dp_size=dims.dp, seed=t.seed,
        )
        # The next batches are collated in a background thread, from its own copy of the sampler
        # (step_at caches the epoch order), so the main thread's sampler only advances as batches
        # are consumed.
        ahead = copy.copy(self.sampler)
        self.prefetch = Prefetcher(lambda position: collate(self.data.train, self.objectives,
                                                            _flat(ahead.step_at(position)),
                                                            _flat(ahead.epochs_at(position))),
                                   stride=t.global_batch)
        self.step = 0
        self.consumed_tokens = 0  # non-padding tokens trained on
        self.skipped_steps = 0  # steps skipped for a non-finite loss or gradient (fp16: overflow)
        self.skipped_in_a_row = 0
        self.last_finite: tuple[int, float] | None = None  # (step, loss) of the last step taken
        self.stop_requested = False
        self.is_logger = dist.get_rank() == 0
        self.metrics = MetricsWriter(
            t.run_dir, t.steps, enabled=self.is_logger, tensorboard=t.tensorboard, stream=stream
        )
        self.peak = peak_flops(self.device, t.peak_tflops)
        # Dropout masks differ per dp rank (different samples) but agree within a tp group,
        # whose ranks compute on the same replicated activations.
        torch.manual_seed(t.seed + 1 + dims.dp_rank)

    def _build_model(self, model) -> None:
        """Stages (the parallel model), optimizer, loss_parallel and scaler: what another backend replaces."""
        config, dims, t = self.config, self.dims, self.config.train
        self.parts = Stages(model, config, dims, self.device)
        self.model = self.parts.model
        self.compiled = compile_enabled(t, config.parallel, self.device)
        self._compile_start = (compile_seconds(), compiled_graphs())  # this process's totals before this run
        zero1 = dims.mesh["dp"].get_group() if config.parallel.zero == 1 and dims.dp_enabled else None
        self.optimizer = build_optimizer(self.model, t, zero1_group=zero1)
        self.loss_parallel = uses_loss_parallel(dims, config.parallel)
        self.scaler = DynamicLossScaler(t.loss_scale, t.loss_scale_window) if t.precision == "fp16" else None

    def _batch(self, builder, micro_batches) -> dict[str, torch.Tensor]:
        """This rank's share of one global batch, micro-batches concatenated in order."""
        return {k: v.to(self.device) for k, v in collate(builder, self.objectives, _flat(micro_batches)).items()}

    def _next_batch(self) -> tuple[dict[str, torch.Tensor], float]:
        """The next training batch (built ahead by the prefetcher) and the seconds waited for it."""
        batch, waited = self.prefetch.get(self.sampler.consumed_samples)
        self.sampler.consumed_samples += self.config.train.global_batch
        return {k: v.to(self.device) for k, v in batch.items()}, waited

    def _inputs(self, batch) -> tuple[torch.Tensor, ...]:
        return (batch["input_ids"], batch["attention_mask"], *(batch[k] for k in self.field_names))

    def _autocast(self):
        """bf16/fp16 compute under autocast; the parameters (the master weights) stay fp32."""
        dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
        if self.config.train.precision in dtypes:
            return torch.autocast(self.device.type, dtype=dtypes[self.config.train.precision])
        return contextlib.nullcontext()

    def _loss_context(self):
        return loss_parallel() if self.loss_parallel else contextlib.nullcontext()

    def _counts(self, batch) -> tuple[torch.Tensor, float]:
        """Each objective's normaliser and the non-padding tokens, over the global batch (one all-reduce)."""
        local = torch.cat([normalisers(self.objectives, batch), batch["attention_mask"].sum().float()[None]])
        total = reduce_dp(local.to(self.device), self.dims)
        return total[:-1], float(total[-1])

    def _pipeline_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Values only the last stage computed, on every rank (summed over the pp group)."""
        if self.dims.pp_enabled:
            dist.all_reduce(t, group=self.dims.mesh["pp"].get_group())
        return t

    def _forward_backward(self, batch, norms: torch.Tensor) -> torch.Tensor:
        """Forward and backward over this rank's micro-batches; returns each objective's loss sum
        over the global batch. The loss is a mean over the global batch; dp wrappers average
        gradients over dp ranks, so each rank's share is scaled by dp to make that average the sum."""
        scale = self.dims.dp * (self.scaler.scale if self.scaler else 1.0)
        self.loss_fn.begin(batch, norms, scale)
        with self.activations.track(), self._autocast():
            self.parts.forward_backward(self._inputs(batch), self.loss_fn, self._loss_context, _gradient_sync)
        sums = self.loss_fn.recorded(self.parts.n_microbatches, self.device)
        return reduce_dp(self._pipeline_sum(sums), self.dims)

    def train_step(self) -> dict:
        t = self.config.train
        started = time.perf_counter()
        lr = lr_at(self.step, t)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._set_progress()
        batch, waited = self._next_batch()
        norms, tokens = self._counts(batch)
        sums = self._forward_backward(batch, norms)
        params = list(self.model.parameters())
        memory = {"mem_params_bytes": tensor_bytes(params), "mem_grads_bytes": tensor_bytes(p.grad for p in params),
                  "mem_activation_bytes": self.activations.bytes}
        overflow = self.scaler.unscale_and_check([p.grad for p in params if p.grad is not None]) if self.scaler else False
        grad_norm = None if overflow else self.parts.clip_grad_norm_(t.clip_grad)
        # A non-finite loss or gradient norm (fp16: an overflow, and the scaler backs off) skips
        # the update. Both are reduced over every rank, so every rank skips the same steps.
        skip = overflow or not (math.isfinite(grad_norm) and bool(torch.isfinite(sums).all()))
        if not skip:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        memory["mem_optimizer_bytes"] = optimizer_state_bytes(self.optimizer)
        row = self._finish_step(sums, norms, tokens, lr, None if skip else grad_norm, started, memory)
        row["data_wait_s"] = waited
        self._count_skip(row, skip)
        if self.scaler:
            row["loss_scale"] = self.scaler.scale  # the scale this step ran with
            self.scaler.update(overflow)
        return row

    def _count_skip(self, row: dict, skipped: bool) -> None:
        if skipped:
            self.skipped_steps += 1
            self.skipped_in_a_row += 1
        else:
            self.skipped_in_a_row = 0
            self.last_finite = (self.step, row["loss"])
        row["skipped_steps"] = self.skipped_steps

    def weights_finite(self) -> bool:
        """Whether every weight on every rank is finite (collective)."""
        bad = torch.zeros((), device=self.device)
        for p in self.model.parameters():
            bad = torch.maximum(bad, (~torch.isfinite(local_tensor(p.detach()))).any().float())
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return not bool(bad)

    def _save(self, checkpointer: Checkpointer) -> None:
        """Save, never from non-finite state: weights that just gave a non-finite loss or gradient
        (a skipped step) are not saved, and non-finite weights stop the run."""
        if self.skipped_in_a_row:
            if self.is_logger:
                print(f"note: step {self.step}: no checkpoint after a skipped step (non-finite loss or gradient)",
                      flush=True)
        elif not self.weights_finite():
            raise self._diverged("the weights are not finite", checkpointer)
        else:
            checkpointer.save(self)

    def _diverged(self, why: str, checkpointer: Checkpointer | None) -> Diverged:
        """The one line a diverged run stops with: the step, the last finite loss, the last good
        checkpoint (a save in flight, started from finite weights, is finished first)."""
        if checkpointer is not None:
            checkpointer.wait()
        last = latest_checkpoint(self.config.train.run_dir) if checkpointer is not None else None
        finite = f"last finite loss {self.last_finite[1]:.4f} at step {self.last_finite[0]}" if self.last_finite \
            else "no finite loss yet"
        resume = f"; resume from it with a lower train.lr: --resume {last}" if last else ""
        return Diverged(f"step {self.step}: {why}; {finite}; last good checkpoint: {last or 'none'}{resume}")

    def _set_progress(self) -> None:
        """Tell the objectives how far training is (a growing margin reads it)."""
        for o in self.objectives:
            o.progress = self.step / max(1, self.config.train.steps - 1)

    def _losses(self, sums: torch.Tensor, norms: torch.Tensor, prefix: str = "") -> dict:
        """{prefix}loss (the weighted total) and {prefix}loss_<objective> for each objective."""
        parts = sums / norms.clamp(min=1)
        row = {f"{prefix}loss": float(sum(o.weight * v for o, v in zip(self.objectives, parts)))}
        row.update({f"{prefix}loss_{o.name}": float(v) for o, v in zip(self.objectives, parts)})
        return row

    def _finish_step(self, sums: torch.Tensor, norms: torch.Tensor, tokens: float, lr: float, grad_norm,
                     started: float, memory: dict) -> dict:
        """Count the step and return its metrics row (every backend's common part). Tokens are the
        global batch's non-padding tokens: what throughput and the token budget count."""
        t = self.config.train
        self.step += 1
        self.consumed_tokens += int(tokens)
        elapsed = time.perf_counter() - started
        tflops = self.flops_per_step / elapsed / dist.get_world_size() / 1e12
        return {
            "step": self.step,
            **self._losses(sums, norms),
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": int(tokens),
            "consumed_tokens": self.consumed_tokens,
            "padding": 1.0 - tokens / (t.global_batch * self.config.data.seq_len),
            "tokens_per_s": tokens / elapsed,
            "tflops_per_device": tflops,
            "mfu": tflops * 1e12 / self.peak if self.peak else None,
            "peak_mem_bytes": peak_memory_bytes(self.device),
            **memory,
        }

    def _forward_only(self, inputs):
        return self.parts.forward_only(inputs, self._loss_context)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Every objective's loss (and their weighted total) and metrics on the first
        eval_batches global batches of the held-out split: {val_loss, val_loss_<o>, val_<o>_<metric>}."""
        t = self.config.train
        builder = self.data.val
        sampler = GlobalBatchSampler(
            len(builder), global_batch=t.global_batch, micro_batch=t.micro_batch,
            dp_rank=self.dims.dp_rank, dp_size=self.dims.dp, seed=t.seed, shuffle=False,
        )
        names = [(o, m) for o in self.objectives for m in o.metric_names]
        sums = torch.zeros(len(self.objectives), device=self.device)
        norms = torch.zeros(len(self.objectives), device=self.device)
        metrics = torch.zeros(len(names), 2, device=self.device)
        self.model.eval()
        for _ in range(t.eval_batches):
            batch = self._batch(builder, sampler.next_step())
            norms += self._counts(batch)[0]
            inputs = self._inputs(batch)
            for chunk in torch.arange(inputs[0].shape[0], device=self.device).chunk(accumulation_steps(self.config)):
                with self._autocast():
                    outputs = self._forward_only(tuple(x[chunk] for x in inputs))
                if outputs is None:
                    continue  # not the last pipeline stage
                views = self.loss_fn.views(outputs, len(chunk))
                micro = {k: v[chunk] for k, v in batch.items()}
                with self._loss_context():
                    sums += torch.stack([plain(o.loss_sum(named, micro)).float()
                                         for o, named in zip(self.objectives, views)])
                values = {(o.name, k): v for o, named in zip(self.objectives, views)
                          for k, v in o.metrics(named, micro).items()}
                for i, (o, m) in enumerate(names):
                    metrics[i] += torch.stack([torch.as_tensor(x, dtype=torch.float32) for x in values[(o.name, m)]])
        self.model.train()
        sums = reduce_dp(self._pipeline_sum(sums), self.dims)
        metrics = reduce_dp(self._pipeline_sum(metrics), self.dims)
        row = self._losses(sums, norms, prefix="val_")
        row.update({f"val_{o.name}_{m}": float(metrics[i, 0] / metrics[i, 1].clamp(min=1))
                    for i, (o, m) in enumerate(names)})
        return row

    def _compile_report(self, row: dict, first: bool) -> None:
        """compile_s and compiled_graphs (this run's totals so far) in every row, so that a
        recompile shows; one line after the first step, which compiled the training graphs."""
        seconds, graphs = self._compile_start
        row.update(compile_s=compile_seconds() - seconds, compiled_graphs=compiled_graphs() - graphs)
        if first and self.is_logger:
            print(f"compile: {row['compiled_graphs']} graph(s) in {row['compile_s']:.1f} s (the first step; "
                  "evaluation compiles its own once)", file=self.metrics.stream, flush=True)

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
        rows = []
        resumed_from = None
        if resume:
            resumed_from = checkpointer.load(self, resume)["step"]
        self.metrics.start(self.step)
        self.model.train()
        try:
            self._loop(checkpointer, rows, resumed_from)
        finally:
            self.metrics.close()
            self.prefetch.close()
        return rows

    def _loop(self, checkpointer: Checkpointer | None, rows: list[dict], resumed_from: int | None) -> None:
        t = self.config.train
        while self.step < t.steps:
            row = self.train_step()
            if t.eval_interval and self.data.val is not None and self.step % t.eval_interval == 0:
                row.update(self.evaluate())
            if self.compiled:
                self._compile_report(row, first=not rows)
            if resumed_from is not None:
                row["resumed_from"], resumed_from = resumed_from, None
            rows.append(row)
            self.metrics.write(row)
            if self.step % t.log_interval == 0 or self.step == t.steps:
                self.metrics.progress(row)
            if self.skipped_in_a_row > t.max_skipped_steps:
                raise self._diverged(f"{self.skipped_in_a_row} steps in a row had a non-finite loss or gradient "
                                     f"(train.max_skipped_steps = {t.max_skipped_steps})", checkpointer)
            if checkpointer is not None:
                stop, save = self._agree(checkpointer.due(self.step))
                if save or stop or self.step == t.steps:
                    self._save(checkpointer)
                if stop:
                    break
        if checkpointer is not None:
            checkpointer.wait()  # an async save still writing


def write_run_config(config: Config) -> None:
    if dist.get_rank() == 0:
        os.makedirs(config.train.run_dir, exist_ok=True)
        with open(os.path.join(config.train.run_dir, "config.json"), "w") as f:
            f.write(config.to_json())

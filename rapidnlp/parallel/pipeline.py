"""Pipeline parallelism: BertForMLM split into stages, run by torch.distributed.pipelining.

The split. Stages hold contiguous runs of blocks: embeddings on the first stage, the final norm,
the MLM head and the loss on the last. Each rank builds the full BertForMLM with the run's seed
(so the tied word embedding / decoder weight starts identical on the first and last stage, and
every weight equals the single process's), then keeps only what its stages own. Parameter names
stay those of the full model (`layers` is keyed by layer number), so checkpoints can map across
layouts. The layer counts come from `parallel.pp_split` or, by default, from a split that
minimises the most expensive stage under the FLOPs estimate of rapidnlp.train.flops (the MLM
head's cost counts against the last stage).

What crosses a stage boundary has fixed shapes: the hidden states [micro_batch, seq (/ tp under
sequence parallelism), hidden], the padding mask [micro_batch, seq], the masked positions
[micro_batch, max_predictions] and the knowledge side tensors, each [micro_batch, ...]. The
token types are used by the embeddings only and do not travel. The labels go to the loss.
Shapes are given to PipelineStage up front (static metadata): the dynamic inference would run
the later stages on uninitialised buffers, and an uninitialised position or entity id is an
out-of-range index.

Order (ARCHITECTURE.md): split -> TP on each stage (rapidnlp.parallel.parallelize, the same plan
as without pipelining) -> fully_shard blocks, then the stage root, over dp (or the composable
replicate) -> PipelineStage(..., group=pp). Classic DDP cannot wrap a stage (its reducer asserts
under Interleaved1F1B); parallelize() gives stages `replicate` instead.

The loss. Each micro-batch's loss is its masked-token loss sum x `scale` (the trainer's
dp / global masked-token count), and the schedule's own gradient scaling is off
(scale_grads=False), so the gradients equal the single process's. With loss_parallel the whole
schedule step runs inside `loss_parallel()`.

The tied weight. The word embedding (first stage) and the decoder (last stage) are two copies of
one parameter: after the backward their gradients are summed between the ranks that hold them
(Megatron's embedding group: same dp and tp coordinate), so both copies take the same optimizer
step and stay equal. The gradient norm counts the copy on the first stage only and sums the
squared norms of all stages over the pp group.

Knowledge injection (`Injection`): extra per-sample tensors named by batch key ride along with
the mask through every stage; a mid-stack module at a configured layer sees the full-sequence
hidden states (gathered under sequence parallelism) and those tensors; auxiliary heads on the
last stage return loss sums that are added to the MLM loss. The same stage module with one
stage (pp = 1) runs these without a schedule, which gives the single-process reference.

This module must not own the trainer loop, the optimizer or the data: it turns a config into
stages and runs one step's forward and backward over this rank's micro-batches.
"""
from __future__ import annotations

import contextlib
import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import loss_parallel

from rapidnlp.config import Config, ModelConfig, accumulation_steps, max_predictions, pp_split_counts
from rapidnlp.distributed.mesh import ParallelDims
from rapidnlp.model.bert import BertForMLM
from rapidnlp.optim.norms import local_tensor, squared_norms
from rapidnlp.parallel import parallelize, uses_loss_parallel
from rapidnlp.parallel.tensor_parallel import reduce_partial_grads
from rapidnlp.pretrain.mlm import mlm_loss_sum
from rapidnlp.train.flops import training_flops_per_sequence

# schedule name -> (torch class name, stage placement over pp ranks)
SCHEDULES = {
    "gpipe": ("ScheduleGPipe", "loop"),
    "1f1b": ("Schedule1F1B", "loop"),
    "interleaved1f1b": ("ScheduleInterleaved1F1B", "loop"),
    "zero_bubble": ("ScheduleInterleavedZeroBubble", "loop"),
    "zbv": ("ScheduleZBVZeroBubble", "v"),
}


# ----------------------------------------------------------------------------- knowledge hooks

@dataclass
class Injection:
    """Interfaces for knowledge-injected pretraining, carried through the pipeline.

    extras: batch keys of per-sample tensors ([batch, ...], fixed shape) that every stage receives
        and passes on, e.g. mention tags, linked-triple ids, sub-graph indices.
    mid_stack: layer -> factory(ModelConfig) of a module run right after that block:
        `module(hidden [b, s, h], key_mask [b, s] bool, extras: dict) -> hidden [b, s, h]`.
        It sees the whole sequence (gathered under sequence parallelism) and its parameters stay
        whole (not tensor-parallel); it lives on the stage that owns the layer.
    aux_heads: name -> factory(ModelConfig) of a module on the last stage:
        `module(hidden [b, s, h] final-normed, key_mask, extras) -> loss summed over the
        micro-batch's samples`. Its loss enters training as sum / global batch size (a mean per
        sample) added to the MLM loss, and is reported as metric `aux_<name>`.

    Factories run on every rank in a fixed order after the model is built with the run's seed,
    so their initial weights agree on every rank and layout.
    """

    extras: tuple[str, ...] = ()
    mid_stack: dict[int, Callable[[ModelConfig], nn.Module]] = field(default_factory=dict)
    aux_heads: dict[str, Callable[[ModelConfig], nn.Module]] = field(default_factory=dict)


def _gather_sequence(x: torch.Tensor, mesh) -> torch.Tensor:
    """Local sequence shard [b, s/tp, h] -> the whole sequence on every tp rank (differentiable)."""
    return DTensor.from_local(x, mesh, [Shard(1)], run_check=False).redistribute(placements=[Replicate()]).to_local()


def _scatter_sequence(x: torch.Tensor, mesh) -> torch.Tensor:
    """Whole sequence computed alike on every tp rank -> this rank's shard (differentiable)."""
    return DTensor.from_local(x, mesh, [Replicate()], run_check=False).redistribute(placements=[Shard(1)]).to_local()


# ----------------------------------------------------------------------------- stages

class StageModule(nn.Module):
    """A contiguous piece of BertForMLM, with the full model's attribute (and parameter) names.

    First stage inputs: input_ids, token_type_ids, attention_mask, mlm_positions, *extras.
    Later stage inputs: hidden, attention_mask, mlm_positions, *extras.
    Outputs: the same minus the token ids, or on the last stage the logits [b, P, V]
    (and the auxiliary loss sums [n_aux] when there are auxiliary heads).
    """

    def __init__(self, model: BertForMLM, layer_ids: list[int], *, first: bool, last: bool,
                 extras: tuple[str, ...] = (), mid_stack: dict[int, nn.Module] | None = None,
                 aux_heads: dict[str, nn.Module] | None = None):
        super().__init__()
        self.is_first, self.is_last, self.extra_names = first, last, tuple(extras)
        if first:
            self.embeddings = model.embeddings
        self.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in layer_ids})
        hooks = {str(i): m for i, m in (mid_stack or {}).items() if i in layer_ids}
        self.mid_stack = nn.ModuleDict(hooks) if hooks else None
        if last:
            self.final_norm = model.final_norm
            self.lm_head = model.lm_head
            if not first:  # the decoder's own copy of the tied weight
                self.lm_head.decoder.weight = nn.Parameter(model.lm_head.decoder.weight.detach().clone())
            self.aux_heads = nn.ModuleDict(aux_heads) if aux_heads else None
        self.sequence_mesh = None  # the tp mesh when the residual stream is sequence-sharded
        self.forward_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext

    def tie_weights(self) -> None:
        """Re-tie after tensor parallelism, when this stage holds both ends (pp = 1)."""
        if self.is_first and self.is_last:
            self.lm_head.decoder.weight = self.embeddings.word_embeddings.weight

    def forward(self, *inputs: torch.Tensor):
        with self.forward_context():
            return self._forward(*inputs)

    def _forward(self, *inputs: torch.Tensor):
        if self.is_first:
            input_ids, token_type_ids, attention_mask, positions, *extras = inputs
            x = self.embeddings(input_ids, token_type_ids)
        else:
            x, attention_mask, positions, *extras = inputs
        key_mask = attention_mask.bool()
        named = dict(zip(self.extra_names, extras))
        for i, block in self.layers.items():
            x = block(x, key_mask)
            if self.mid_stack is not None and i in self.mid_stack:
                x = self._mid_stack(self.mid_stack[i], x, key_mask, named)
        if not self.is_last:
            return (x, attention_mask, positions, *extras)
        hidden = self.final_norm(x)
        logits = self.lm_head(hidden, positions)
        if self.aux_heads is None:
            return logits
        if isinstance(hidden, DTensor):  # sequence-sharded: the heads see the whole sequence
            hidden = hidden.redistribute(placements=[Replicate()] * hidden.device_mesh.ndim).to_local()
        aux = torch.stack([head(hidden, key_mask, named) for head in self.aux_heads.values()])
        return logits, aux

    def _mid_stack(self, module: nn.Module, x, key_mask, extras):
        if self.sequence_mesh is None:
            return module(x, key_mask, extras)
        full = module(_gather_sequence(x, self.sequence_mesh), key_mask, extras)
        return _scatter_sequence(full, self.sequence_mesh)


class PipelineModel(nn.Module):
    """This rank's stages seen as one module whose parameter names are the full model's
    (embeddings.*, layers.N.*, final_norm.*, lm_head.*, mid_stack.N.*, aux_heads.NAME.*): what the
    optimizer, checkpoints and train/eval switches see. It shares the stages' submodules; the
    stages (the FSDP roots) are what the schedule runs."""

    def __init__(self, stages: list[StageModule]):
        super().__init__()
        for stage in stages:
            for name, child in stage.named_children():
                if isinstance(child, nn.ModuleDict):
                    if not hasattr(self, name):
                        setattr(self, name, nn.ModuleDict())
                    getattr(self, name).update(child)
                else:
                    setattr(self, name, child)


def stage_costs(cfg: ModelConfig, seq_len: int, predictions: int) -> tuple[float, float, float]:
    """(per block, first-stage extra, last-stage extra) training FLOPs per sequence.

    From the one FLOPs formula: a block is one layer's share; the last stage adds the MLM head.
    Embedding lookups cost no matmul FLOPs, so the first stage adds nothing.
    """
    block = training_flops_per_sequence(dataclasses.replace(cfg, num_layers=1), seq_len, 0)
    head = training_flops_per_sequence(dataclasses.replace(cfg, num_layers=0), seq_len, predictions)
    return block, 0.0, head


def balanced_split(num_layers: int, num_stages: int, block: float, first: float, last: float) -> list[int]:
    """Layer counts (each >= 1) that minimise the most expensive stage; ties go to the most even."""
    def cost(stage: int, n: int) -> float:
        return n * block + (first if stage == 0 else 0.0) + (last if stage == num_stages - 1 else 0.0)

    # best[k][n]: (max cost, sum of squares, counts) over the first k stages holding n layers
    best: list[dict[int, tuple]] = [{0: (0.0, 0, [])}]
    for k in range(num_stages):
        row: dict[int, tuple] = {}
        for used, (worst, squares, counts) in best[k].items():
            for n in range(1, num_layers - used - (num_stages - k - 1) + 1):
                cand = (max(worst, cost(k, n)), squares + n * n, counts + [n])
                if used + n not in row or cand[:2] < row[used + n][:2]:
                    row[used + n] = cand
        best.append(row)
    return best[num_stages][num_layers][2]


def layer_split(config: Config) -> list[int]:
    """Layers per stage (pp x virtual stages entries), explicit or balanced."""
    p, m = config.parallel, config.model
    explicit = pp_split_counts(p)
    if explicit:
        return explicit
    block, first, last = stage_costs(m, config.data.seq_len, max_predictions(config))
    return balanced_split(m.num_layers, p.pp * p.pp_virtual_stages, block, first, last)


def stage_placement(pp: int, num_stages: int, style: str) -> dict[int, int]:
    """stage index -> pp rank, as torch.distributed.pipelining places them."""
    from torch.distributed.pipelining._utils import generate_stage_to_rank_mapping

    return generate_stage_to_rank_mapping(pp, num_stages, style=style)


def build_full_model(config: Config, injection: Injection | None) -> tuple[BertForMLM, dict, dict]:
    """The whole model and every injection module, in a fixed order (same weights on every rank).
    Call after seeding."""
    model = BertForMLM(config.model)
    inj = injection or Injection()
    mid = {layer: inj.mid_stack[layer](config.model) for layer in sorted(inj.mid_stack)}
    aux = {name: factory(config.model) for name, factory in inj.aux_heads.items()}
    return model, mid, aux


# ----------------------------------------------------------------------------- the runner

class Pipeline:
    """This rank's stages, their schedule, and the tied-weight and norm bookkeeping.

    `model` (a PipelineModel over the local stages) is what the optimizer, memory accounting,
    checkpoints and train/eval switches see. One call of `forward_backward` runs one optimizer step's micro-batches.
    """

    def __init__(self, config: Config, dims: ParallelDims, device: torch.device,
                 injection: Injection | None = None, forward_context=contextlib.nullcontext):
        p = config.parallel
        self.config, self.dims, self.device = config, dims, device
        self.injection = injection or Injection()
        self.n_microbatches = accumulation_steps(config)
        self.loss_parallel = uses_loss_parallel(dims, p)
        self.schedule_name = p.pp_schedule if dims.pp_enabled else "single"
        style = SCHEDULES[p.pp_schedule][1] if dims.pp_enabled else "loop"
        counts = layer_split(config) if dims.pp_enabled else [config.model.num_layers]
        self.num_stages = len(counts)
        self.placement = stage_placement(dims.pp, self.num_stages, style)
        self.pp_rank = dims.mesh["pp"].get_local_rank()
        self.pp_group = dims.mesh["pp"].get_group()
        self.stage_ids = [s for s in range(self.num_stages) if self.placement[s] == self.pp_rank]
        starts = [sum(counts[:s]) for s in range(self.num_stages)]

        model, mid, aux = build_full_model(config, self.injection)
        self.stages: list[StageModule] = []
        sp_mesh = dims.mesh["tp"] if dims.tp_enabled and p.sequence_parallel else None
        for s in self.stage_ids:
            stage = StageModule(
                model, list(range(starts[s], starts[s] + counts[s])), first=s == 0, last=s == self.num_stages - 1,
                extras=self.injection.extras, mid_stack=mid, aux_heads=aux,
            ).to(device)
            stage.sequence_mesh = sp_mesh
            stage.forward_context = forward_context
            with warnings.catch_warnings():  # the TP plan names modules that other stages hold
                warnings.filterwarnings("ignore", message=r"Parallelize plan key .* could not be resolved")
                self.stages.append(parallelize(stage, dims, p, config.train))
        del model
        self.model = PipelineModel(self.stages)
        self.first = next((st for st in self.stages if st.is_first), None)
        self.last = next((st for st in self.stages if st.is_last), None)
        self.aux_names = list(self.injection.aux_heads)
        self._tied, self._tied_group = self._tied_setup()
        # Counted once in the global norm: the decoder's copy of the tied weight is left out.
        skip = {id(self.last.lm_head.decoder.weight)} if self.last is not None and not self.last.is_first else set()
        self._norm_params = [q for q in self.model.parameters() if id(q) not in skip]
        self._schedule = None
        self._scale = 1.0
        self._aux_scale = 0.0
        self._records: list[torch.Tensor] = []

    # -- set-up ----------------------------------------------------------------------------

    def _tied_setup(self):
        """The local copies of the tied weight and the group that sums their gradients."""
        copies = []
        if self.first is not None:
            copies.append(self.first.embeddings.word_embeddings.weight)
        if self.last is not None and not self.last.is_first:
            copies.append(self.last.lm_head.decoder.weight)
        first_rank, last_rank = self.placement[0], self.placement[self.num_stages - 1]
        if first_rank == last_rank:
            return copies, None  # both ends on one rank (pp = 1, or the V placement): a local sum
        if self.dims.pp == 2:
            return copies, self.pp_group
        # One group per (dp, tp) coordinate; every rank must take part in creating all of them.
        columns = self.dims.mesh.mesh.reshape(self.dims.pp, -1).T.tolist()
        mine, _ = dist.new_subgroups_by_enumeration([[c[first_rank], c[last_rank]] for c in columns])
        return copies, mine if copies else None

    def _input_metas(self, batches) -> tuple[tuple, ...]:
        """Static (shape, dtype) metadata of each stage's inputs and outputs, on the meta device."""
        p, m = self.config.parallel, self.config.model
        b = batches[0]
        mb, seq = b["input_ids"].shape
        seq_local = seq // self.dims.tp if self.dims.tp_enabled and p.sequence_parallel else seq

        def meta(t: torch.Tensor) -> torch.Tensor:
            return torch.empty(t.shape, dtype=t.dtype, device="meta")

        side = (meta(b["attention_mask"]), meta(b["mlm_positions"]), *(meta(b[k]) for k in self.injection.extras))
        hidden = torch.empty(mb, seq_local, m.hidden_size, device="meta", requires_grad=True)
        first_in = (meta(b["input_ids"]), meta(b["token_type_ids"]), *side)
        between = (hidden, *side)
        vocab = m.padded_vocab_size // (self.dims.tp if self.loss_parallel else 1)
        logits = torch.empty(mb, b["mlm_positions"].shape[1], vocab, device="meta", requires_grad=True)
        last_out = (logits, torch.empty(len(self.aux_names), device="meta", requires_grad=True)) \
            if self.aux_names else (logits,)
        return first_in, between, last_out

    def _build_schedule(self, batches):
        from torch.distributed import pipelining

        first_in, between, last_out = self._input_metas(batches)
        stages = []
        for sid, module in zip(self.stage_ids, self.stages):
            stages.append(pipelining.PipelineStage(
                module, sid, self.num_stages, self.device,
                input_args=first_in if sid == 0 else between,
                output_args=last_out if sid == self.num_stages - 1 else between,
                group=self.pp_group,
            ))
        cls = getattr(pipelining, SCHEDULES[self.schedule_name][0])
        single = self.schedule_name in ("gpipe", "1f1b")
        return cls(stages[0] if single else stages, self.n_microbatches, loss_fn=self._loss_fn, scale_grads=False)

    # -- one step --------------------------------------------------------------------------

    def _loss_fn(self, output, labels):
        logits, aux = output if self.aux_names else (output, None)
        mlm = mlm_loss_sum(logits, labels)
        if isinstance(mlm, DTensor):  # loss_parallel: a replicated DTensor; plain, so aux losses add to it
            mlm = mlm.full_tensor()
        loss = mlm * self._scale
        values = [mlm]
        if aux is not None:
            loss = loss + aux.sum() * self._aux_scale
            values.extend(aux)
        self._records.append(torch.stack([v.detach().float() for v in values]))
        return loss

    def _loss_context(self):
        return loss_parallel() if self.loss_parallel else contextlib.nullcontext()

    def _inputs(self, batches):
        keys = ("input_ids", "token_type_ids", "attention_mask", "mlm_positions", *self.injection.extras)
        args = tuple(torch.cat([b[k] for b in batches]) for k in keys)
        return args, torch.cat([b["mlm_labels"] for b in batches])

    def forward_backward(self, batches: list[dict], scale, aux_scale: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward over this rank's micro-batches (one optimizer step's share).

        Each micro-batch contributes mlm_loss_sum x scale + sum(aux losses) x aux_scale. Returns
        (summed masked-token loss, summed aux losses per head) as every rank of the pp group sees
        them. Gradients are final afterwards: dp-reduced, partial sums resolved, tied copies summed.
        """
        if len(batches) != self.n_microbatches:
            raise ValueError(f"expected {self.n_microbatches} micro-batches, got {len(batches)}")
        self._scale, self._aux_scale = scale, aux_scale
        self._records.clear()
        if self.dims.pp_enabled:
            if self._schedule is None:
                self._schedule = self._build_schedule(batches)
            args, labels = self._inputs(batches)
            with self._loss_context():
                self._schedule.step(*args, target=labels)
        else:
            self._single_stage(batches)
        sums = self._gather_records()
        self._finish_grads()
        return sums[0], sums[1:]

    @torch.no_grad()
    def evaluate(self, batches: list[dict]) -> torch.Tensor:
        """Summed masked-token loss of these micro-batches, forward only.

        Not through the schedule: torch 2.13's `schedule.eval()` still runs the backward actions of
        V-placed schedules (zbv: "can't steal_bwd_input if this stage doesn't have backward") and
        re-initialises every stage on each train/eval switch. Evaluation passes each micro-batch
        down the stages in order, with blocking sends between ranks.
        """
        self._scale, self._aux_scale = 1.0, 0.0
        self._records.clear()
        first_in, between, _ = self._input_metas(batches)
        last = self.num_stages - 1
        with self._loss_context():
            for batch in batches:
                args, labels = self._inputs([batch])
                x = args
                for sid, module in zip(self.stage_ids, self.stages):
                    if sid > 0 and self.placement[sid - 1] != self.pp_rank:
                        x = tuple(torch.empty(t.shape, dtype=t.dtype, device=self.device) for t in between)
                        for t in x:
                            dist.recv(t, group_src=self.placement[sid - 1], group=self.pp_group)
                    x = module(*x)
                    if sid == last:
                        self._loss_fn(x, labels)
                    elif self.placement[sid + 1] != self.pp_rank:
                        for t in x:
                            dist.send(t.contiguous(), group_dst=self.placement[sid + 1], group=self.pp_group)
        return self._gather_records()[0]

    def _single_stage(self, batches) -> None:
        """pp = 1: the same stage module and loss, micro-batch after micro-batch."""
        (stage,) = self.stages
        for i, batch in enumerate(batches):
            if hasattr(stage, "set_requires_gradient_sync"):
                stage.set_requires_gradient_sync(i == len(batches) - 1)
            args, labels = self._inputs([batch])
            with self._loss_context():
                self._loss_fn(stage(*args), labels).backward()

    def _gather_records(self) -> torch.Tensor:
        """The last stage's per-micro-batch values, summed, on every rank of the pp group."""
        sums = torch.zeros(1 + len(self.aux_names), device=self.device)
        if self.last is not None:
            # Metadata set-up may call the loss once more; the schedule's micro-batches come last.
            sums += torch.stack(self._records[-self.n_microbatches:]).sum(0)
        if self.dims.pp_enabled:
            dist.all_reduce(sums, group=self.pp_group)
        return sums

    def _finish_grads(self) -> None:
        params = list(self.model.parameters())
        reduce_partial_grads(params)
        copies = [q for q in self._tied if q.grad is not None]
        if not copies:
            return
        for q in copies:
            # Under TP the embedding's gradient arrives replicated, the decoder's sharded like the
            # weight: bring both to the weight's layout (a local slice) so the shards line up.
            if isinstance(q.grad, DTensor) and q.grad.placements != q.placements:
                q.grad = q.grad.redistribute(placements=q.placements)
        total = local_tensor(copies[0].grad).clone()
        for q in copies[1:]:
            total += local_tensor(q.grad)
        if self._tied_group is not None:
            dist.all_reduce(total, group=self._tied_group)
        for q in copies:
            local_tensor(q.grad).copy_(total)

    # -- after the backward ------------------------------------------------------------------

    def grad_norm_squared(self) -> torch.Tensor:
        """This rank's share of the squared global gradient norm (every parameter counted once
        over the whole pipeline; dp/tp shards already summed by squared_norms)."""
        grads = [q.grad for q in self._norm_params if q.grad is not None]
        return squared_norms(grads).sum().to(self.device) if grads else torch.zeros((), device=self.device)

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Global norm over all stages; scale every gradient (both tied copies) to at most max_norm."""
        total = self.grad_norm_squared()
        if self.dims.pp_enabled:
            dist.all_reduce(total, group=self.pp_group)
        total = total.sqrt()
        if max_norm > 0:
            factor = torch.clamp(max_norm / (total + 1e-6), max=1.0)
            for q in self.model.parameters():
                if q.grad is not None:
                    local_tensor(q.grad).mul_(factor.to(q.grad.dtype))
        return float(total)


def build_pipeline(config: Config, dims: ParallelDims, device: torch.device, injection: Injection | None = None,
                   forward_context=contextlib.nullcontext) -> Pipeline:
    """Split, parallelize and stage the model for this rank. Call after seeding (same weights everywhere)."""
    return Pipeline(config, dims, device, injection, forward_context)

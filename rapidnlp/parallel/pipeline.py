"""The model as this rank's pipeline stages, and the one thing that runs them: a schedule when
pp > 1, the stage itself (micro-batch after micro-batch) when pp = 1; evaluation is one
forward-only loop over the stages for every layout.

The split. Stages hold contiguous runs of blocks; the model places the rest (the embeddings and
input pieces on the first stage, block pieces with their block, the final norm and heads on the
last: `BertForMLM.stage_view`). Each rank builds the full model with the run's seed (so every
weight, tied copies included, equals the single process's), then keeps only its stages'
views. Parameter names stay the full model's, so checkpoints map across layouts. Layer counts
come from `parallel.pp_split` or from a split that minimises the most expensive stage under the
model's FLOPs (rapidnlp.model.flops; pieces count on the stage that holds them).

What crosses a stage boundary has fixed shapes: the hidden states [micro_batch, seq (/ tp under
sequence parallelism), hidden] (2 x micro_batch rows after a piece that appends twins,
`Piece.twins`), the padding mask and the model's fields (`field_names`), each
[micro_batch, ...]. Labels do not travel: the schedule's target is each sample's index into the
step's local batch, from which the loss function takes the labels. Shapes are given to
PipelineStage up front (static metadata); the last stage's output metadata is read off one
forward of that stage on a zero hidden state and the first micro-batch's fields.

Order (ARCHITECTURE.md): split -> TP on each stage -> fully_shard blocks, then the stage root,
over dp (or the composable replicate) -> PipelineStage(..., group=pp). The schedule's own
gradient scaling is off (scale_grads=False): the loss function already scales.

Tied parameters (any pair the model declares: the word embedding and the MLM decoder, ...):
where the two ends sit on different stages each holds its own copy; after the backward their
gradients are summed between the ranks that hold them (same dp and tp coordinate), so both take
the same optimizer step and stay equal. The gradient norm counts each tied pair once.

This module must not own the trainer loop, the optimizer, the data or the objectives.
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from rapidnlp.config import Config, accumulation_steps, pp_split_counts
from rapidnlp.distributed.mesh import ParallelDims
from rapidnlp.model.bert import BertForMLM
from rapidnlp.model.flops import encoder_flops_per_sequence
from rapidnlp.optim.norms import local_tensor, squared_norms
from rapidnlp.parallel import parallelize
from rapidnlp.parallel.tensor_parallel import reduce_partial_grads

# schedule name -> (torch class name, stage placement over pp ranks)
SCHEDULES = {
    "gpipe": ("ScheduleGPipe", "loop"),
    "1f1b": ("Schedule1F1B", "loop"),
    "interleaved1f1b": ("ScheduleInterleaved1F1B", "loop"),
    "zero_bubble": ("ScheduleInterleavedZeroBubble", "loop"),
    "zbv": ("ScheduleZBVZeroBubble", "v"),
}


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


def layer_split(config: Config, model: BertForMLM) -> list[int]:
    """Layers per stage (pp x virtual stages entries), explicit or balanced by FLOPs."""
    p, m, seq = config.parallel, config.model, config.data.seq_len
    explicit = pp_split_counts(p)
    if explicit:
        return explicit
    block = encoder_flops_per_sequence(m, seq, num_layers=1)
    first = sum(q.flops_per_sequence for q in model.pieces.values() if q.role == "input")
    last = sum(q.flops_per_sequence for q in model.pieces.values() if q.role in ("head", "block"))
    return balanced_split(m.num_layers, p.pp * p.pp_virtual_stages, block, first, last)


def stage_placement(pp: int, num_stages: int, style: str) -> dict[int, int]:
    """stage index -> pp rank, as torch.distributed.pipelining places them."""
    # Private API (torch.distributed.pipelining._utils); move to a public one when torch has it.
    from torch.distributed.pipelining._utils import generate_stage_to_rank_mapping

    return generate_stage_to_rank_mapping(pp, num_stages, style=style)


class PipelineModel(nn.Module):
    """This rank's stages seen as one module whose parameter names are the full model's: what
    the optimizer, checkpoints and train/eval switches see. It shares the stages' submodules."""

    def __init__(self, stages: list[BertForMLM], tied: dict[str, str]):
        super().__init__()
        self._tied = tied
        for stage in stages:
            for name, child in stage.named_children():
                if child is None:
                    continue
                if isinstance(child, nn.ModuleDict):
                    if not hasattr(self, name):
                        setattr(self, name, nn.ModuleDict())
                    getattr(self, name).update(child)
                else:
                    setattr(self, name, child)

    def tied_parameters(self) -> dict[str, str]:
        return self._tied


def to_device(module: nn.Module, device: torch.device) -> nn.Module:
    """module.to(device), leaving meta tensors (tables materialised after sharding) where they are."""
    return module._apply(lambda t: t if t.is_meta else t.to(device))


class Stages:
    """This rank's share of the model, and how one step's forward and backward run over it.

    `model` is what the optimizer, memory accounting and checkpoints see; `stages` are what
    runs (one module when pp = 1: the whole parallelized model)."""

    def __init__(self, model: BertForMLM, config: Config, dims: ParallelDims, device: torch.device):
        p = config.parallel
        self.config, self.dims, self.device = config, dims, device
        self.pipelined = dims.pp_enabled
        self.n_microbatches = accumulation_steps(config)
        self.tied = model.tied_parameters()
        if not self.pipelined:
            self.num_stages, self.stage_ids, self.placement, self.pp_rank = 1, [0], {0: 0}, 0
            self.stages = [parallelize(to_device(model, device), dims, p, config.train)]
            self.model = self.stages[0]
            self._tied_pairs = []
            self._norm_params = list(self.model.parameters())
            self._schedule = None
            return
        counts = layer_split(config, model)
        self.num_stages = len(counts)
        self.placement = stage_placement(dims.pp, self.num_stages, SCHEDULES[p.pp_schedule][1])
        self.pp_rank = dims.mesh["pp"].get_local_rank()
        self.pp_group = dims.mesh["pp"].get_group()
        self.stage_ids = [s for s in range(self.num_stages) if self.placement[s] == self.pp_rank]
        starts = [sum(counts[:s]) for s in range(self.num_stages)]
        self._layer_stage = {layer: s for s in range(self.num_stages) for layer in range(starts[s], starts[s] + counts[s])}
        # stages after this one receive twice the micro-batch's rows of hidden states (Piece.twins)
        self._twin_stage = min((self._layer_stage[p.layer] for p in model.pieces.values() if p.twins),
                               default=self.num_stages)
        self.stages = []
        for s in self.stage_ids:
            view = to_device(model.stage_view(list(range(starts[s], starts[s] + counts[s])), first=s == 0,
                                              last=s == self.num_stages - 1), device)
            with warnings.catch_warnings():  # plans name modules that other stages hold
                warnings.filterwarnings("ignore", message=r"Parallelize plan key .* could not be resolved")
                # The stage's meta tables (entity tables) are initialised from the whole model's
                # weights (this rank built all of them; other stages' embeddings included).
                self.stages.append(parallelize(view, dims, p, config.train, source=model))
        self.model = PipelineModel(self.stages, self.tied)
        self._tied_pairs = self._tied_setup(model)
        skip = {id(copy) for copy, _, _ in self._tied_pairs if copy is not None}
        self._norm_params = [q for q in self.model.parameters() if id(q) not in skip]
        self._schedule = None

    # -- set-up ----------------------------------------------------------------------------

    def _stage_of(self, model: BertForMLM, name: str) -> int:
        """The stage that holds parameter `name` of the full model (the model says where it lives)."""
        home = model.home_of(name)
        return {"first": 0, "last": self.num_stages - 1}[home] if isinstance(home, str) else self._layer_stage[home]

    def _tied_setup(self, model: BertForMLM) -> list[tuple]:
        """[(local copy or None, local original or None, group)] for each tied pair whose ends sit
        on different stages; group sums their gradients (None: both ends on this rank)."""
        params = dict(self.model.named_parameters())
        out = []
        for copy, original in self.tied.items():
            s_copy, s_orig = self._stage_of(model, copy), self._stage_of(model, original)
            if s_copy == s_orig:
                continue  # one Parameter on one stage
            r_copy, r_orig = self.placement[s_copy], self.placement[s_orig]
            if r_copy == r_orig:
                group = None  # the V placement puts both ends on one rank: a local sum
            elif self.dims.pp == 2:
                group = self.pp_group
            else:
                # One group per (dp, tp) coordinate; every rank takes part in creating all of them.
                columns = self.dims.mesh.mesh.reshape(self.dims.pp, -1).T.tolist()
                group, _ = dist.new_subgroups_by_enumeration([[c[r_orig], c[r_copy]] for c in columns])
            if copy in params or original in params:
                out.append((params.get(copy), params.get(original), group))
        return out

    def _metas(self, inputs: tuple, mb: int, loss_context=None):
        """Static (shape, dtype) metadata of micro-batches of mb samples: first-stage inputs, the
        tensors entering stage s (`into(s)`, s > 0), and (given loss_context) the last stage's
        outputs, from one forward of that stage on zeros and the first micro-batch's fields."""
        m, p = self.config.model, self.config.parallel
        seq = inputs[0].shape[1]
        seq_local = seq // self.dims.tp if self.dims.tp_enabled and p.sequence_parallel else seq

        def meta(t: torch.Tensor) -> torch.Tensor:
            return torch.empty((mb, *t.shape[1:]), dtype=t.dtype, device="meta")

        def rows(stage: int) -> int:
            return 2 * mb if stage > self._twin_stage else mb

        def into(stage: int) -> tuple:
            hidden = torch.empty(rows(stage), seq_local, m.hidden_size, device="meta", requires_grad=True)
            return (hidden, *side)

        side = tuple(meta(t) for t in inputs[1:])
        first_in = (meta(inputs[0]), *side)
        last_out = None
        if loss_context is not None and self.holds_last():
            last = self.stages[self.stage_ids.index(self.num_stages - 1)]
            probe = (torch.zeros(rows(self.num_stages - 1), seq_local, m.hidden_size, device=self.device),
                     *(t[:mb] for t in inputs[1:]))
            with torch.no_grad(), loss_context():
                outputs = last(*probe)
            last_out = tuple(torch.empty(local_tensor(o).shape, dtype=o.dtype, device="meta", requires_grad=True)
                             for o in outputs)
        return first_in, into, last_out

    def _build_schedule(self, inputs: tuple, loss_fn, loss_context):
        from torch.distributed import pipelining

        first_in, into, last_out = self._metas(inputs, inputs[0].shape[0] // self.n_microbatches, loss_context)
        stages = []
        for sid, module in zip(self.stage_ids, self.stages):
            stages.append(pipelining.PipelineStage(
                module, sid, self.num_stages, self.device,
                input_args=first_in if sid == 0 else into(sid),
                output_args=last_out if sid == self.num_stages - 1 else into(sid + 1),
                group=self.pp_group,
            ))
        name = self.config.parallel.pp_schedule
        cls = getattr(pipelining, SCHEDULES[name][0])
        single = name in ("gpipe", "1f1b")
        return cls(stages[0] if single else stages, self.n_microbatches, loss_fn=loss_fn, scale_grads=False)

    # -- running ---------------------------------------------------------------------------

    def holds_last(self) -> bool:
        return self.num_stages - 1 in self.stage_ids

    def forward_backward(self, inputs: tuple, loss_fn, loss_context, gradient_sync) -> None:
        """One optimizer step's forward and backward over this rank's micro-batches. `inputs`
        are the model's inputs for the whole local batch; `loss_fn(outputs, index)` takes the
        micro-batch's sample indices. Gradients are final afterwards (dp-reduced, partial sums
        resolved, tied copies summed)."""
        n = self.n_microbatches
        index = torch.arange(inputs[0].shape[0], device=self.device)
        if self.pipelined:
            if self._schedule is None:
                self._schedule = self._build_schedule(inputs, loss_fn, loss_context)
            with loss_context():
                self._schedule.step(*inputs, target=index)
        else:
            (stage,) = self.stages
            for i, chunk in enumerate(index.chunk(n)):
                with gradient_sync(stage, i == n - 1), loss_context():
                    loss_fn(stage(*(t[chunk] for t in inputs)), chunk).backward()
        self._finish_grads()

    @torch.no_grad()
    def forward_only(self, inputs: tuple, loss_context):
        """The last stage's outputs for one micro-batch (None on ranks without the last stage).

        Not through the schedule: torch 2.13's `schedule.eval()` still runs the backward actions
        of V-placed schedules and re-initialises every stage on each train/eval switch. Each
        micro-batch passes down the stages in order, with blocking sends between ranks."""
        into = self._metas(inputs, inputs[0].shape[0])[1] if self.pipelined else None
        x = inputs
        with loss_context():
            for sid, module in zip(self.stage_ids, self.stages):
                if sid > 0 and self.placement[sid - 1] != self.pp_rank:
                    x = tuple(torch.empty(t.shape, dtype=t.dtype, device=self.device) for t in into(sid))
                    for t in x:
                        dist.recv(t, group_src=self.placement[sid - 1], group=self.pp_group)
                x = module(*x)
                if sid < self.num_stages - 1 and self.placement[sid + 1] != self.pp_rank:
                    for t in x:
                        dist.send(t.contiguous(), group_dst=self.placement[sid + 1], group=self.pp_group)
        return x if self.holds_last() else None

    def _finish_grads(self) -> None:
        reduce_partial_grads(list(self.model.parameters()))
        for copy, original, group in self._tied_pairs:
            ends = [q for q in (copy, original) if q is not None and q.grad is not None]
            for q in ends:
                # Under TP one end's gradient may arrive replicated, the other's sharded like the
                # weight: bring both to the weight's layout (a local slice) so the shards line up.
                if isinstance(q.grad, DTensor) and q.grad.placements != q.placements:
                    q.grad = q.grad.redistribute(placements=q.placements)
            if not ends:
                continue
            total = local_tensor(ends[0].grad).clone()
            for q in ends[1:]:
                total += local_tensor(q.grad)
            if group is not None:
                dist.all_reduce(total, group=group)
            for q in ends:
                local_tensor(q.grad).copy_(total)

    # -- after the backward ------------------------------------------------------------------

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Global norm over all stages (each tied pair once); scale every gradient to at most max_norm."""
        grads = [q.grad for q in self._norm_params if q.grad is not None]
        total = squared_norms(grads).sum().to(self.device) if grads else torch.zeros((), device=self.device)
        if self.pipelined:
            dist.all_reduce(total, group=self.pp_group)
        total = total.sqrt()
        if max_norm > 0:
            factor = torch.clamp(max_norm / (total + 1e-6), max=1.0)
            for q in self.model.parameters():
                if q.grad is not None:
                    local_tensor(q.grad).mul_(factor.to(q.grad.dtype))
        return float(total)

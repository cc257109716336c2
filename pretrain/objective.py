"""What a pretraining objective is, and the one loss function that combines them.

An objective (a subclass of `Objective`, in a module of rapidnlp.pretrain named as its config
key, exported as `OBJECTIVE`) declares:
- `collate(indices, batch)`: the batch fields it adds, with fixed shapes (every cap comes from
  the config), so that pipelining and compile see static shapes;
- `pieces()`: the modules it adds to the model, placed by role (rapidnlp.model.bert.Piece):
  input side, after block l, or head on the final hidden states; with their TP plan and FSDP
  unit when the default (replicated over tp, fed the whole sequence) does not fit;
- `loss_sum(outputs, batch)` and `normaliser(batch)`: its loss as a sum over the micro-batch and
  the count it is divided by, taken over the whole global batch, so micro-batching, dp and pp
  leave the loss unchanged;
- `metrics(outputs, batch)`: evaluation sums and counts ({name: (sum, count)}).
`outputs` holds one row per sample; where a piece appended twins (Piece.twins: the fusion gate
shut), only an objective with `sees_twins` gets them, as rows b..2b-1 of every head output.

The config picks objectives and weights (`[objectives] mlm = 1.0`). This module must not know
the trainer or the parallel layout: `ObjectiveLoss` is the `loss_fn(outputs, index)` that every
layout's step calls, the pipeline schedule's too.
"""
from __future__ import annotations

import importlib

import torch
from torch.distributed.tensor import DTensor

from rapidnlp.config import Config
from rapidnlp.model.bert import BertForMLM, Piece


class Objective:
    """One pretraining objective. Subclasses set `name` and override what they use."""

    name = ""
    metric_names: tuple[str, ...] = ()  # the keys `metrics` returns
    sees_twins = False  # whether its outputs keep the twins a piece appended (Piece.twins)

    def __init__(self, config: Config, weight: float, data=None):
        self.config = config
        self.weight = weight
        self.data = data  # the run's rapidnlp.train.trainer.Data (sizes, entity tokens), when given
        self.progress = 0.0  # share of training done at the current step (set by the trainer)

    def collate(self, indices, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Extra batch fields for these samples ([batch, ...], fixed shape)."""
        return {}

    def pieces(self) -> list[Piece]:
        return []

    def loss_sum(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def normaliser(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """What the loss sum is divided by, for these samples (summed over the global batch)."""
        raise NotImplementedError

    def metrics(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, tuple]:
        """Evaluation: {metric: (sum, count)} for these samples; reported as sum / count."""
        return {}


def objective_class(name: str) -> type[Objective]:
    module = importlib.import_module(f"rapidnlp.pretrain.{name}")
    return module.OBJECTIVE


def build_objectives(config: Config, data=None) -> list[Objective]:
    """The configured objectives, in config order (validated by rapidnlp.config)."""
    return [objective_class(name)(config, weight, data) for name, weight in config.objectives.items()]


def build_model(config: Config, objectives: list[Objective], *, materialize: bool = True) -> BertForMLM:
    """The whole model with every objective's pieces (call after seeding: same weights everywhere).
    Pieces may build large tables on the meta device; `materialize=False` leaves them there, for
    the parallel layer to materialise shard by shard after sharding (rapidnlp.parallel.parallelize)."""
    model = BertForMLM(config.model, [piece for o in objectives for piece in o.pieces()])
    if materialize:
        model.materialize_pieces(torch.device("cpu"))
    return model


def collate(builder, objectives: list[Objective], indices, epochs=None) -> dict[str, torch.Tensor]:
    """The sample builder's fields plus every objective's (`epochs`: each sample's, for dynamic masking)."""
    batch = builder.collate(indices, epochs)
    for o in objectives:
        batch.update(o.collate(indices, batch))
    return batch


def plain(t: torch.Tensor) -> torch.Tensor:
    # Under loss_parallel a vocab-parallel loss is a replicated DTensor: plain, so parts add up.
    return t.full_tensor() if isinstance(t, DTensor) else t


class ObjectiveLoss:
    """`loss_fn(outputs, index)` for one optimizer step: sum over objectives of
    weight x loss_sum / global normaliser, times `scale` (dp, to undo the dp average, and the
    fp16 loss scale). `index` selects the micro-batch's samples from the step's local batch,
    so the labels never travel through the pipeline. Records each objective's loss sum."""

    def __init__(self, objectives: list[Objective], head_names: list[str]):
        self.objectives = objectives
        self.head_names = head_names
        self.batch: dict[str, torch.Tensor] = {}
        self.norms = torch.ones(len(objectives))
        self.scale = 1.0
        self.records: list[torch.Tensor] = []

    def begin(self, batch: dict[str, torch.Tensor], norms: torch.Tensor, scale: float | torch.Tensor) -> None:
        self.batch, self.norms, self.scale = batch, norms, scale
        self.records.clear()

    def named(self, outputs) -> dict[str, torch.Tensor]:
        return dict(zip(self.head_names, outputs if isinstance(outputs, tuple) else (outputs,)))

    def views(self, outputs, samples: int) -> list[dict[str, torch.Tensor]]:
        """Each objective's named head outputs for a micro-batch of `samples` samples: without the
        twins a piece appended (Piece.twins), unless the objective `sees_twins`."""
        named = self.named(outputs)
        own = {k: v[:samples] if v.shape[0] != samples else v for k, v in named.items()}
        return [named if o.sees_twins else own for o in self.objectives]

    def __call__(self, outputs, index: torch.Tensor) -> torch.Tensor:
        batch = {k: v[index] for k, v in self.batch.items()}
        sums = [plain(o.loss_sum(named, batch)) for o, named in zip(self.objectives, self.views(outputs, len(index)))]
        self.records.append(torch.stack([s.detach().float() for s in sums]))
        # A global batch without anything to count (no linked triple, say) adds nothing, not 0/0.
        total = sum(o.weight * s / n.clamp(min=1) for o, s, n in zip(self.objectives, sums, self.norms))
        return total * self.scale

    def recorded(self, n: int, device) -> torch.Tensor:
        """The loss sums of the last n micro-batches (metadata set-up may call the loss first)."""
        if not self.records:
            return torch.zeros(len(self.objectives), device=device)
        return torch.stack(self.records[-n:]).sum(0)


def normalisers(objectives: list[Objective], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.stack([torch.as_tensor(o.normaliser(batch), dtype=torch.float32) for o in objectives])


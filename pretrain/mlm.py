"""The plain masked-LM objective: the first objective in the component form.

Its fields come from the sample builder (rapidnlp.data.mlm: mlm_positions, mlm_labels); its
piece is the model's MLM head (rapidnlp.model.bert.mlm_piece), whose decoder is tied to the word
embedding. Under tensor parallelism the decoder is vocab-parallel (Megatron's layout) and, with
loss_parallel, its logits stay sharded for the vocab-parallel cross-entropy. The loss is the
*sum* of token losses; its normaliser the masked-token count of the whole global batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel

from rapidnlp.config import max_predictions
from rapidnlp.data.mlm import IGNORE_INDEX
from rapidnlp.model.bert import Piece, mlm_piece
from rapidnlp.pretrain.objective import Objective


def mlm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def mlm_tp_plan(sequence_parallel: bool, loss_parallel: bool) -> dict:
    return {"decoder": ColwiseParallel(output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                       use_local_output=not loss_parallel)}


class MLM(Objective):
    name = "mlm"
    metric_names = ("accuracy",)

    def pieces(self) -> list[Piece]:
        piece = mlm_piece(self.config.model, max_predictions(self.config))
        piece.tp_plan = mlm_tp_plan
        return [piece]

    def loss_sum(self, outputs, batch) -> torch.Tensor:
        return mlm_loss_sum(outputs["lm_head"], batch["mlm_labels"])

    def normaliser(self, batch) -> torch.Tensor:
        return (batch["mlm_labels"] != IGNORE_INDEX).sum()

    def metrics(self, outputs, batch) -> dict[str, tuple]:
        logits, labels = outputs["lm_head"], batch["mlm_labels"]
        if hasattr(logits, "full_tensor"):
            logits = logits.full_tensor()
        real = labels != IGNORE_INDEX
        correct = ((logits.argmax(-1) == labels) & real).sum()
        return {"accuracy": (correct.float(), real.sum().float())}


OBJECTIVE = MLM

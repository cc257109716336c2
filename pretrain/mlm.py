"""The plain masked-LM objective: the first objective in the component form.

Its fields come from the sample builder (rapidnlp.data.mlm: mlm_positions, mlm_labels); its
piece is the model's MLM head (rapidnlp.model.bert.mlm_piece), whose decoder is tied to the word
embedding. Under tensor parallelism the decoder is vocab-parallel (Megatron's layout) and, with
loss_parallel, its logits stay sharded for the vocab-parallel cross-entropy. The loss is the
*sum* of token losses; its normaliser the masked-token count of the whole global batch.

With `model.fused_kernels` the head hands over its transformed states [b, P, h] instead of logits,
and the loss applies the decoder itself, chunk by chunk (`kernels.linear_cross_entropy`): the
logits of all masked tokens never exist at once, and under tensor parallelism each rank decodes
its vocabulary slice, combined by the kernel's vocab-parallel all-reduces (always, whatever
`parallel.loss_parallel` says: nothing vocabulary-wide is gathered). The decoder is read from the
head module at loss time: the head sits in the root FSDP unit, which FSDP does not reshard
between forward and backward, and on the last pipeline stage, where the loss runs.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel

from rapidnlp import kernels
from rapidnlp.config import max_predictions
from rapidnlp.data.mlm import IGNORE_INDEX
from rapidnlp.kernels.losses import default_chunk_size
from rapidnlp.model.bert import Piece, mlm_piece
from rapidnlp.pretrain.objective import Objective

_OPS = {"max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN, "sum": dist.ReduceOp.SUM}


def mlm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def mlm_tp_plan(sequence_parallel: bool, loss_parallel: bool) -> dict:
    return {"decoder": ColwiseParallel(output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                       use_local_output=not loss_parallel)}


def decoder_shard(decoder: nn.Linear):
    """(weight, bias, vocab_start, all_reduce): the decoder rows this rank holds, the vocabulary
    index of the first, and an all-reduce over the ranks holding the other rows (None: all here).
    Under TP the weight is a DTensor sharded over vocabulary rows (Shard(0), torch.chunk's split,
    on the tp mesh); its local rows keep the autograd link, so their gradient arrives sharded alike."""
    weight, bias = decoder.weight, decoder.bias
    if not isinstance(weight, DTensor):
        return weight, bias, 0, None
    mesh = weight.device_mesh
    # A bug, not a user error: only tp may shard the decoder while the loss runs (not FSDP's dp).
    assert mesh.mesh_dim_names in (None, ("tp",)) and tuple(weight.placements) == (Shard(0),), \
        (mesh, weight.placements)
    group = mesh.get_group()

    def all_reduce(t: torch.Tensor, op: str) -> None:
        dist.all_reduce(t, op=_OPS[op], group=group)

    start = mesh.get_local_rank() * -(-weight.shape[0] // mesh.size())
    return weight.to_local(), bias.to_local() if bias is not None else None, start, all_reduce


def _compute_dtype(features: torch.Tensor) -> torch.Tensor:
    """The features in the dtype autocast would run the decoder in (its GEMM is ours here)."""
    device = features.device.type
    return features.to(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else features


def decoder_loss_sum(features: torch.Tensor, decoder: nn.Linear, labels: torch.Tensor) -> torch.Tensor:
    """mlm_loss_sum(decoder(features), labels) without the logits of all tokens at once."""
    weight, bias, start, all_reduce = decoder_shard(decoder)
    return kernels.linear_cross_entropy(_compute_dtype(features), weight, bias, labels, ignore_index=IGNORE_INDEX,
                                        reduction="sum", vocab_start=start, all_reduce=all_reduce)


@torch.no_grad()
def decoder_predictions(features: torch.Tensor, decoder: nn.Linear) -> torch.Tensor:
    """decoder(features).argmax(-1) (the first of equal maxima), decoded chunk by chunk; under TP
    each rank's slice votes with its best logit and index."""
    weight, bias, start, all_reduce = decoder_shard(decoder)
    h = _compute_dtype(features).flatten(0, -2)
    rows = default_chunk_size(h.shape[0], h.shape[1], weight.shape[0])
    best, index = zip(*(F.linear(chunk, weight.to(chunk.dtype), None if bias is None else bias.to(chunk.dtype))
                        .float().max(-1) for chunk in h.split(rows)))
    best, index = torch.cat(best), torch.cat(index) + start
    if all_reduce is not None:
        top = best.clone()
        all_reduce(top, "max")
        index = torch.where(best == top, index, torch.iinfo(index.dtype).max)
        all_reduce(index, "min")
    return index.view(features.shape[:-1])


class MLM(Objective):
    name = "mlm"
    metric_names = ("accuracy",)

    def pieces(self) -> list[Piece]:
        piece = mlm_piece(self.config.model, max_predictions(self.config))
        piece.tp_plan = mlm_tp_plan
        self.head = piece.module  # the fused loss decodes with its decoder (the last model built)
        return [piece]

    @property
    def fused(self) -> bool:
        return self.config.model.fused_kernels

    def loss_sum(self, outputs, batch) -> torch.Tensor:
        if self.fused:
            return decoder_loss_sum(outputs["lm_head"], self.head.decoder, batch["mlm_labels"])
        return mlm_loss_sum(outputs["lm_head"], batch["mlm_labels"])

    def normaliser(self, batch) -> torch.Tensor:
        return (batch["mlm_labels"] != IGNORE_INDEX).sum()

    def metrics(self, outputs, batch) -> dict[str, tuple]:
        labels = batch["mlm_labels"]
        if self.fused:
            predicted = decoder_predictions(outputs["lm_head"], self.head.decoder)
        else:
            logits = outputs["lm_head"]
            if hasattr(logits, "full_tensor"):
                logits = logits.full_tensor()
            predicted = logits.argmax(-1)
        real = labels != IGNORE_INDEX
        correct = ((predicted == labels) & real).sum()
        return {"accuracy": (correct.float(), real.sum().float())}


OBJECTIVE = MLM

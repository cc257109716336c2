"""Tensor and sequence parallelism for the encoder, as DTensor `parallelize_module` plans.

Megatron's layout: column-parallel query/key/value and fc1, row-parallel attention output and
fc2, a vocab-parallel word embedding, and a vocab-parallel decoder whose logits stay sharded
for `loss_parallel` cross-entropy. With sequence parallelism the residual stream between blocks
is sharded along the sequence (Shard(1)), LayerNorms run on their sequence shard (post-LN's
embedding norm runs on the whole sequence inside the embeddings, as the position embeddings
do), and the
blocks all-gather before attention/MLP and reduce-scatter after them.

With `model.fused_kernels` the kernels run on the local shards (rapidnlp.kernels.dispatch): the
norms on DTensor sequence shards, bias-GeLU on fc1's column shard with its bias slice, and the
residual dropout-add on each rank's sequence slice, drawing that slice of the whole sequence's
mask (`Block.sequence_shard`), so that a tp run draws the masks of the single process.

The word embedding and the decoder (the MLM objective's plan, pretrain/mlm.py) are one
tied parameter, sharded the same way (Shard(0) over vocabulary rows) by both plans;
`parallelize_module` replaces each module's parameter by its own DTensor, so the model restores
its ties afterwards. The encoder's plan applies to whatever a pipeline stage holds (absent parts
are None).
"""
from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from rapidnlp.model.bert import BertForMLM


def apply_tensor_parallel(model: BertForMLM, tp_mesh: DeviceMesh, *, sequence_parallel: bool, loss_parallel: bool) -> None:
    """The encoder's plan, then each present objective piece's: its own plan if it declares one,
    and under sequence parallelism the whole sequence gathered into it (block and head pieces)
    and a block's or input piece's output scattered back to this rank's sequence shard."""
    residual = Shard(1) if sequence_parallel else Replicate()
    root_plan = {}
    if model.embeddings is not None:
        root_plan["embeddings.word_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    if sequence_parallel:
        if model.embeddings is not None:
            # Position and token-type embeddings are added on the whole sequence, then each rank
            # keeps its sequence shard (a local slice, no communication).
            root_plan["embeddings"] = PrepareModuleOutput(
                output_layouts=Replicate(), desired_output_layouts=Shard(1), use_local_output=True
            )
        if isinstance(model.final_norm, nn.LayerNorm):  # pre-LN's (post-LN has an Identity)
            root_plan["final_norm"] = SequenceParallel()
    if root_plan:
        parallelize_module(model, tp_mesh, root_plan)

    # Post-LN's norms end a block's halves: their output is the residual stream, a local shard
    # like the block's input; pre-LN's feed a branch, which takes their DTensor as it is.
    post = model.cfg.norm_position == "post"
    for block in model.layers.values():
        plan = {
            "attention.query": ColwiseParallel(),
            "attention.key": ColwiseParallel(),
            "attention.value": ColwiseParallel(),
            "attention.dense": RowwiseParallel(output_layouts=residual),
            # Fused: fc1's output stays a DTensor for bias-GeLU to pair its shard with the bias's.
            "mlp.fc1": ColwiseParallel(use_local_output=not model.cfg.fused_kernels),
            "mlp.fc2": RowwiseParallel(output_layouts=residual),
        }
        if sequence_parallel:
            plan.update({
                "attention_norm": SequenceParallel(use_local_output=post),
                "attention": PrepareModuleInput(
                    input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None)
                ),
                "mlp_norm": SequenceParallel(use_local_output=post),
                "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            })
        parallelize_module(block, tp_mesh, plan)
        if sequence_parallel:
            block.sequence_shard = (tp_mesh.get_local_rank(), tp_mesh.size())

    for piece in model.pieces.values():
        module = getattr(model, piece.name)
        if module is None:
            continue
        if piece.tp_plan is not None:
            parallelize_module(module, tp_mesh, piece.tp_plan(sequence_parallel, loss_parallel))
        if sequence_parallel:
            _sequence_parallel_piece(module, piece.role, tp_mesh)

    model.tie_weights()


def _sequence_parallel_piece(module, role: str, tp_mesh: DeviceMesh) -> None:
    """Block and head pieces see the whole sequence (gathered from the shards; its gradient is
    sliced back); block and input pieces hand back this rank's shard of what they computed alike
    on every tp rank (a local slice; its gradient is gathered)."""
    if role in ("block", "head"):
        parallelize_module(module, tp_mesh, PrepareModuleInput(
            input_layouts=(Shard(1), None, None), desired_input_layouts=(Replicate(), None, None),
            use_local_output=True))
    if role in ("block", "input"):
        parallelize_module(module, tp_mesh, PrepareModuleOutput(
            output_layouts=Replicate(), desired_output_layouts=Shard(1), use_local_output=True))


def reduce_partial_grads(parameters) -> None:
    """Turn Partial(sum) gradients into Replicate ones, in place.

    Replicated parameters used on sequence shards (the LayerNorms under sequence parallelism)
    get gradients that are per-rank partial sums. DTensor would reduce them lazily inside the
    optimizer's ops, but clipping and LAMB work on local shards and must see the full gradient.
    """
    for p in parameters:
        g = p.grad
        if isinstance(g, DTensor) and any(pl.is_partial() for pl in g.placements):
            placements = [Replicate() if pl.is_partial() else pl for pl in g.placements]
            p.grad = g.redistribute(placements=placements)


# Which encoder parameters the plan above shards over tp (the rest are replicated): for memory
# estimates made without a process group. tests/test_layouts.py checks real shard shapes against it.
_SHARDED = (
    "attention.query.", "attention.key.", "attention.value.", "mlp.fc1.",  # column-parallel: weight and bias
    "attention.dense.weight", "mlp.fc2.weight",  # row-parallel: weight only (the bias is added once)
    "embeddings.word_embeddings.weight",  # vocab-parallel
)


def is_tp_sharded(name: str, pieces: dict) -> bool:
    """Whether parameter `name` is sharded over tp: the encoder's plan above, or for an objective
    piece (`pieces`: the model's) the submodules its own plan names (the MLM decoder, an entity table)."""
    top, _, rest = name.partition(".")
    if top in pieces:
        plan = pieces[top].tp_plan(True, True) if pieces[top].tp_plan else {}
        return any(rest.startswith(key + ".") for key in plan)
    return any(key in name for key in _SHARDED)

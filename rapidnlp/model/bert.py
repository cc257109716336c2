"""A BERT-style masked-LM encoder, its LayerNorms after the residual adds (BERT) or before the
branches (Megatron's BERT), as `model.norm_position` says.

post (BERT, transformers' `BertForMaskedLM`): embeddings (word + position + token type) and a
LayerNorm, N blocks each `x = norm(x + branch(x))` for attention and MLP, no final norm.
pre (Megatron, `MegatronBertForMaskedLM`): embeddings without LayerNorm, N blocks each
`x = x + branch(norm(x))`, a final LayerNorm. Pre-LN is what keeps 1.5B-parameter BERTs
trainable (Megatron-LM, Shoeybi et al. 2019); at 4 x 256 on a character vocabulary it learns
far slower per token than post-LN at the same learning rate (docs/results.md, learning parity).
Both have the MLM head (dense, GeLU, LayerNorm, decoder tied to the word embedding), and the
same parameter names and count: a block's `attention_norm`/`mlp_norm` sit after the add in
post, before the branch in pre; post's embedding norm takes the place of pre's final norm.
See rapidnlp/convert/hf.py for the transformers names.

The MLM head runs only at the masked positions (a fixed number per sequence, padded with
label -100), as NVIDIA's BERT does: the vocabulary projection is the largest matmul of a
small BERT and most of its rows would be thrown away.

With `model.fused_kernels = true` (rapidnlp/kernels): LayerNorms run the fused LayerNorm, the
MLP's fc1 bias rides in the bias-GeLU kernel, and each residual branch's dropout and add are
one kernel (the branches then skip their own dropout), and the MLM head returns its transformed
states for the loss to decode in chunks (the fused linear cross-entropy). Parameters and
state_dict keys are the same either way. Attention stays on SDPA.

This module knows nothing of parallelism: it imports nothing from torch.distributed.
Attention reshapes with -1 heads so that column-parallel q/k/v (rapidnlp/parallel/) simply see
fewer heads; tied parameters (the embedding/decoder pair, and any a piece declares) are restored
after sharding by `tie_weights()`.

Objectives (pretrain/) add `Piece`s: modules placed on the input side, after a block,
or as heads on the final hidden states. The MLM head is the first such piece.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from rapidnlp import kernels
from rapidnlp.config import ModelConfig


def layer_norm(cfg: ModelConfig) -> nn.LayerNorm:
    return (kernels.LayerNorm if cfg.fused_kernels else nn.LayerNorm)(cfg.hidden_size, eps=cfg.layer_norm_eps)


def branch_dropout(cfg: ModelConfig) -> nn.Module:
    # Fused: Block applies the residual dropout, in one kernel with the residual add.
    return nn.Identity() if cfg.fused_kernels else nn.Dropout(cfg.dropout)


class Embeddings(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.padded_vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        # post-LN (BERT) normalises the embeddings' sum; pre-LN leaves that to the first block.
        self.norm = layer_norm(cfg) if cfg.norm_position == "post" else None
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(positions)
        if self.norm is not None:
            x = self.norm(x)
        return self.dropout(x)


class AttentionCore(nn.Module):
    """softmax(q k^T / sqrt(d) + mask) v, through SDPA. A module of its own, without parameters,
    so that selective activation checkpointing can recompute just this (Megatron's choice: the
    attention core's activations grow with s^2 and cost the fewest FLOPs to redo)."""

    def __init__(self, dropout: float):
        super().__init__()
        self.dropout = dropout

    def forward(self, q, k, v, key_mask: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=key_mask[:, None, None, :], dropout_p=self.dropout if self.training else 0.0
        )


class Attention(nn.Module):
    """Self-attention through SDPA; returns the projected output, without the residual."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.core = AttentionCore(cfg.attention_dropout)
        self.dropout = branch_dropout(cfg)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, s, -1, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        out = self.core(q, k, v, key_mask).transpose(1, 2).reshape(b, s, -1)
        return self.dropout(self.dense(out))


class BiasLaterLinear(nn.Linear):
    """nn.Linear (same parameters, state_dict and tensor-parallel plans) whose forward leaves the
    bias out, for the fused kernel after it to add."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc1 = (BiasLaterLinear if cfg.fused_kernels else nn.Linear)(cfg.hidden_size, cfg.ffn_size)
        self.fc2 = nn.Linear(cfg.ffn_size, cfg.hidden_size)
        self.dropout = branch_dropout(cfg)
        self.fused = cfg.fused_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:  # fc1's bias rides in the bias-GeLU kernel
            return self.dropout(self.fc2(kernels.bias_gelu(self.fc1(x), self.fc1.bias)))
        return self.dropout(self.fc2(F.gelu(self.fc1(x))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = layer_norm(cfg)
        self.attention = Attention(cfg)
        self.mlp_norm = layer_norm(cfg)
        self.mlp = MLP(cfg)
        self.fused = cfg.fused_kernels
        self.post_norm = cfg.norm_position == "post"
        self.residual_dropout = cfg.dropout
        # (i, n): x is slice i of n equal slices of the sequence (sequence parallelism sets it), so
        # that the fused dropout draws that slice of the whole sequence's mask.
        self.sequence_shard = (0, 1)

    def _add(self, branch: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x + the branch's output, through its residual dropout (one kernel when fused)."""
        if self.fused:
            return kernels.dropout_add(branch, x, self.residual_dropout, self.training, shard=self.sequence_shard)
        return x + branch

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        if self.post_norm:
            x = self.attention_norm(self._add(self.attention(x, key_mask), x))
            return self.mlp_norm(self._add(self.mlp(x), x))
        x = self._add(self.attention(self.attention_norm(x), key_mask), x)
        return self._add(self.mlp(self.mlp_norm(x)), x)


class MLMHead(nn.Module):
    """Gathers the hidden states at the masked positions, then transform + vocabulary decoder.
    A head piece: `(hidden, key_mask, fields) -> logits [b, P, V]`, reading fields["mlm_positions"].

    Fused (`model.fused_kernels`): the head returns the transformed hidden states [b, P, h] and the
    MLM loss applies `decoder` to them chunk by chunk (rapidnlp.pretrain.mlm), so that the logits
    of all masked tokens never exist at once. `logits()` gives them either way."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = layer_norm(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.padded_vocab_size)
        self.fused = cfg.fused_kernels

    def transform(self, hidden: torch.Tensor, fields: dict) -> torch.Tensor:
        positions = fields["mlm_positions"]
        index = positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        x = torch.gather(hidden, 1, index)
        return self.norm(F.gelu(self.dense(x)))

    def logits(self, hidden: torch.Tensor, key_mask: torch.Tensor, fields: dict) -> torch.Tensor:
        return self.decoder(self.transform(hidden, fields))

    def forward(self, hidden: torch.Tensor, key_mask: torch.Tensor, fields: dict) -> torch.Tensor:
        return self.transform(hidden, fields) if self.fused else self.logits(hidden, key_mask, fields)


@dataclass
class Piece:
    """A module an objective adds to the model, placed by role (pretrain/objective.py).

    role "input": `module(input_ids, key_mask, fields) -> [b, s, h]`, added to the embeddings;
    role "block": `module(hidden, key_mask, fields) -> hidden`, right after block `layer`;
    role "head":  `module(final_hidden, key_mask, fields) -> output`, one model output per head.
    `fields` are the batch fields the model carries (`BertForMLM.field_names`). `name` is the
    model attribute (and parameter prefix). `ties` maps a parameter of the piece to the model
    parameter it shares (relative name -> full name). `tp_plan(sequence_parallel, loss_parallel)`
    gives the piece's own tensor-parallel plan; None: replicated over tp and fed the whole
    sequence. `fsdp_units`: submodules (relative names, "" for the whole piece) sharded each as
    an FSDP unit of its own, gathered only while used; modules of several pieces that share a
    parameter (a tied pair on one stage) form one unit. `flops_per_sequence`: its training
    FLOPs for one sequence (counted in MFU and in the pipeline split). `twins`: a block piece that
    returns [2b, s, h], each sample followed in the batch by a twin (the fusion module's
    gate-shut twin, for the knowledge-gain term): the mask and fields are repeated for the
    blocks and heads after it, and every head's output has 2b rows, the twins last.
    """

    name: str
    role: str
    module: nn.Module
    layer: int = -1
    fields: tuple[str, ...] = ()
    ties: dict[str, str] = dataclass_field(default_factory=dict)
    tp_plan: Callable | None = None
    fsdp_units: tuple[str, ...] = ()
    twins: bool = False
    flops_per_sequence: float = 0.0


def mlm_piece(cfg: ModelConfig, predictions: int = 0) -> Piece:
    """The masked-LM head, its decoder tied to the word embedding (one parameter, two uses)."""
    return Piece(
        name="lm_head", role="head", module=MLMHead(cfg), fields=("mlm_positions",),
        ties={"decoder.weight": "embeddings.word_embeddings.weight"},
        flops_per_sequence=6.0 * (cfg.hidden_size ** 2 + cfg.hidden_size * cfg.padded_vocab_size) * predictions,
    )


class BertForMLM(nn.Module):
    """embeddings -> blocks -> final norm -> heads, with the objectives' pieces in their places.

    forward(x, attention_mask, *fields): x is input_ids [b, s] where the model has embeddings,
    else the hidden state [b, s, h] from the previous pipeline stage; `fields` are the batch
    fields named by `field_names`, in that order. Returns the head outputs (one per head piece,
    in order) where the model has its final norm; else (hidden, attention_mask, *fields) for
    the next stage. A pipeline stage is this same class with the pieces it does not own absent
    (None), as torchtitan's models do (`stage_view`).
    """

    def __init__(self, cfg: ModelConfig, pieces: list[Piece] | None = None):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        # A dict keyed by layer number keeps parameter names stable when a pipeline stage
        # drops the layers it does not own.
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.num_layers)})
        # post-LN's blocks end normalised: an Identity stands in (a pipeline stage's `final_norm`
        # is None exactly when it is not the last).
        self.final_norm = layer_norm(cfg) if cfg.norm_position == "pre" else nn.Identity()
        pieces = [mlm_piece(cfg)] if pieces is None else pieces
        for piece in pieces:
            if hasattr(self, piece.name):
                raise ValueError(f"objective module name '{piece.name}' is taken")
            setattr(self, piece.name, piece.module)
        self.pieces = {piece.name: piece for piece in pieces}
        fields = ["token_type_ids"] + [f for piece in pieces for f in piece.fields]
        self.field_names = tuple(dict.fromkeys(fields))
        self.init_weights()
        self.tie_weights()

    def _of_role(self, role: str, layer: int = -1) -> list[nn.Module]:
        return [getattr(self, p.name) for p in self.pieces.values()
                if p.role == role and p.layer == layer and getattr(self, p.name) is not None]

    @property
    def head_names(self) -> list[str]:
        return [p.name for p in self.pieces.values() if p.role == "head"]

    def tied_parameters(self) -> dict[str, str]:
        """{copy's full parameter name: original's}: the model's tied pairs, read from its pieces."""
        return {f"{p.name}.{rel}": full for p in self.pieces.values() for rel, full in p.ties.items()}

    def tie_weights(self) -> None:
        """Make every tied copy the original's Parameter (after init, and after TP replaced them).
        Only where this model holds both ends (a pipeline stage may hold one)."""
        for copy, original in self.tied_parameters().items():
            owner, _, attr = copy.rpartition(".")
            try:
                target = self.get_parameter(original)
                module = self.get_submodule(owner)
            except AttributeError:
                continue
            setattr(module, attr, target)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) weights; pre-LN's residual output projections scaled by
        1/sqrt(2 * layers) (Megatron; post-LN keeps BERT's plain init); pieces too, then a piece
        module's own `init_weights()` where it has one (a gate that starts shut, a table
        initialised from the word embedding). Tied copies are replaced by their originals
        afterwards (`tie_weights`)."""
        std = self.cfg.init_std
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                scaled = self.cfg.norm_position == "pre" and (name.endswith("attention.dense")
                                                              or name.endswith("mlp.fc2"))
                module.weight.normal_(0.0, std / math.sqrt(2 * self.cfg.num_layers) if scaled else std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
        for piece in self.pieces.values():
            if hasattr(piece.module, "init_weights"):
                piece.module.init_weights(self)

    def materialize_pieces(self, device: torch.device, source: nn.Module | None = None) -> None:
        """Pieces whose parameters were built on the meta device (an entity table too large for
        one rank) get storage now, after sharding only their shards, and initialise themselves
        from `source` (the whole model, for weights they derive from, e.g. the word embedding).
        Every rank calls it (initialising may gather a sharded source)."""
        waiting = []
        for piece in self.pieces.values():
            module = getattr(self, piece.name, None)
            if module is not None and any(p.is_meta for p in module.parameters()):
                waiting.append(module)
        for module in waiting:
            for sub in module.modules():
                if any(p.is_meta for p in sub.parameters(recurse=False)):
                    sub.to_empty(device=device, recurse=False)  # new Parameter objects:
        self.tie_weights()  # so the ties are made again (FSDP re-reads its parameters at lazy init)
        for module in waiting:
            if hasattr(module, "init_weights"):
                module.init_weights(source if source is not None else self)

    def home_of(self, name: str) -> int | str:
        """Where parameter `name` lives when the model is split into pipeline stages: a layer
        index (with that block), "first" (with the embeddings) or "last" (with the final norm)."""
        top = name.split(".")[0]
        if top == "layers":
            return int(name.split(".")[1])
        if top in self.pieces:
            piece = self.pieces[top]
            return {"input": "first", "head": "last", "block": piece.layer}[piece.role]
        return "first" if top == "embeddings" else "last"

    def stage_view(self, layer_ids: list[int], *, first: bool, last: bool) -> "BertForMLM":
        """A pipeline stage: the same submodules (shared, not copied) for the layers in
        `layer_ids`, the embeddings and input pieces if `first`, the final norm and heads if
        `last`, every other piece absent. A tied copy whose original is on another stage gets a
        Parameter of its own (same values), whose gradient the pipeline sums with the original's."""
        view = BertForMLM.__new__(BertForMLM)
        nn.Module.__init__(view)
        view.cfg, view.pieces, view.field_names = self.cfg, self.pieces, self.field_names
        view.embeddings = self.embeddings if first else None
        view.layers = nn.ModuleDict({str(i): self.layers[str(i)] for i in layer_ids})
        view.final_norm = self.final_norm if last else None
        for piece in self.pieces.values():
            keep = {"input": first, "head": last, "block": piece.layer in layer_ids}[piece.role]
            setattr(view, piece.name, getattr(self, piece.name) if keep else None)
        for copy, original in self.tied_parameters().items():
            owner, _, attr = copy.rpartition(".")
            if not _holds(view, owner) or _holds(view, original):
                continue
            module = view.get_submodule(owner)
            setattr(module, attr, nn.Parameter(getattr(module, attr).detach().clone()))
        return view

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor, *fields: torch.Tensor):
        named = dict(zip(self.field_names, fields))
        key_mask = attention_mask.bool()
        if self.embeddings is not None:
            input_ids = x
            x = self.embeddings(input_ids, named["token_type_ids"])
            for piece in self._of_role("input"):
                x = x + piece(input_ids, key_mask, named)
        key_mask, named = _twinned(x, key_mask, named)  # a pipeline stage after a twinning piece
        for i, block in self.layers.items():
            x = block(x, key_mask)
            for piece in self._of_role("block", int(i)):
                x = piece(x, key_mask, named)
                key_mask, named = _twinned(x, key_mask, named)
        if self.final_norm is None:
            return (x, attention_mask, *fields)
        hidden = self.final_norm(x)
        return tuple(head(hidden, key_mask, named) for head in self._of_role("head"))

    def encode(self, input_ids, token_type_ids, attention_mask) -> torch.Tensor:
        """The encoder alone (whole model): final-normed hidden states [b, s, h]."""
        key_mask = attention_mask.bool()
        x = self.embeddings(input_ids, token_type_ids)
        for block in self.layers.values():
            x = block(x, key_mask)
        return self.final_norm(x)

    def mlm_logits(self, input_ids, token_type_ids, attention_mask, mlm_positions) -> torch.Tensor:
        """The MLM head's logits [b, P, V] of the whole model (conversion and reference checks)."""
        fields = {"token_type_ids": token_type_ids, "mlm_positions": mlm_positions}
        hidden = self.encode(input_ids, token_type_ids, attention_mask)
        return self.lm_head.logits(hidden, attention_mask.bool(), fields)


def _twinned(x: torch.Tensor, key_mask: torch.Tensor, named: dict) -> tuple[torch.Tensor, dict]:
    """The mask and fields for hidden states x whose batch a piece doubled with twins (Piece.twins)."""
    if x.shape[0] == key_mask.shape[0]:
        return key_mask, named
    return key_mask.repeat(2, 1), {k: v.repeat(2, *[1] * (v.dim() - 1)) for k, v in named.items()}


def _holds(model: nn.Module, name: str) -> bool:
    """Whether `name` (a submodule or parameter) is present in this (possibly partial) model."""
    node = model
    for part in name.split("."):
        node = getattr(node, part, None) if not isinstance(node, nn.ModuleDict) else node[part] if part in node else None
        if node is None:
            return False
    return True


def count_parameters(model: BertForMLM) -> dict[str, int]:
    """Parameter counts of a model (build it on the meta device: no memory is allocated).
    `knowledge` counts the objectives' pieces other than the MLM head (entity tables and all)."""
    total = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    embedding = sum(p.numel() for p in model.embeddings.parameters())
    blocks = sum(p.numel() for p in model.layers.parameters())
    pieces = {id(p) for name in model.pieces if name != "lm_head" for p in getattr(model, name).parameters()}
    return {"total": total, "embedding": embedding, "blocks": blocks, "non_embedding": total - embedding,
            "objective_modules": sum(p.numel() for p in model.parameters() if id(p) in pieces)}

"""Gated GCN knowledge fusion: after block l_f (knowledge.fusion_layer) the sample's linked
entities and their 1-hop sub-graph (rapidnlp/data/knowledge/samples.py) are encoded and fused
into the mention tokens.

1. Each linked node starts from its entity-table row plus a projection of its mentions' pooled
   hidden state (the sentence is encoded first, then the sub-graph is aggregated); neighbours
   start from their table rows.
2. No leakage, per entity: a node whose entity has any mention masked for MLM (in either
   segment) starts from zero, so no token receives that entity's identity; its vector comes
   from its neighbours only.
3. A relational GCN runs knowledge.gcn_layers layers: u <- u + relu(W_s u + mean over incident
   edges of W_m (u_nb +- r)), the layer's relation vector added along the edge, subtracted
   against it.
4. Each mention token takes h <- h + g * W_u u_e with the gate g = sigmoid(W_g [h; u_e]).
5. With the knowledge-gain term (pretrain/knowledge_gain.py) each sample gets a twin with the gate
   forced shut (h unchanged), appended to the batch: the blocks after fusion and the heads see both.

The entity table is shared with the SPO head (pretrain/spo.py), vocab-parallel under
tensor parallelism like the word embedding, an FSDP unit of its own (one with the SPO head's
use of it; gathered only from its first use to its last), and initialised from the mean of the
word-embedding rows of each entity's surface-form tokens. Its loss is the MLM loss it helps; it adds none itself.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import RowwiseParallel

from rapidnlp.config import fusion_layer
from rapidnlp.model.bert import Piece
from rapidnlp.model.flops import dense_flops
from rapidnlp.pretrain.objective import Objective

FIELDS = ("mention_spans", "mention_node", "token_node", "graph_nodes", "graph_edges", "node_masked")


def entity_table_plan(sequence_parallel: bool, loss_parallel: bool) -> dict:
    """The entity table sharded over its rows, as the word embedding (lookups all-reduced)."""
    return {"entities": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())}


class GCNLayer(nn.Module):
    """One relational GCN layer with relation vectors of its own. (Each layer looks its relations
    up itself: one lookup feeding two layers breaks the zero-bubble schedules' split backward.)"""

    def __init__(self, hidden: int, num_relations: int):
        super().__init__()
        self.relations = nn.Embedding(num_relations, hidden)
        self.self_loop = nn.Linear(hidden, hidden)
        self.message = nn.Linear(hidden, hidden)

    def forward(self, u: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        """u [b, N, h]; edges [b, E, 3] (source, relation, target; -1 padding)."""
        b, n, h = u.shape
        relations = self.relations(edges[..., 1].clamp(min=0))
        valid = (edges[..., 0] >= 0).to(u.dtype)[..., None]
        offset = (torch.arange(b, device=u.device) * n)[:, None]
        src, dst = edges[..., 0].clamp(min=0) + offset, edges[..., 2].clamp(min=0) + offset
        flat = u.reshape(b * n, h)
        # One call of `message` for both directions (a parameter used twice in one stage breaks the
        # zero-bubble schedules' split backward).
        forward, backward = (self.message(torch.stack([flat[src] + relations, flat[dst] - relations])) * valid).unbind(0)
        total = torch.zeros_like(flat).index_add(0, dst.reshape(-1), forward.reshape(-1, h))
        total = total.index_add(0, src.reshape(-1), backward.reshape(-1, h))
        degree = torch.zeros(b * n, device=u.device, dtype=u.dtype)
        degree = degree.index_add(0, dst.reshape(-1), valid.reshape(-1)).index_add(0, src.reshape(-1), valid.reshape(-1))
        mean = (total / degree.clamp(min=1)[:, None]).reshape(b, n, h)
        return u + F.relu(self.self_loop(u) + mean)


class GatedGCNFusion(nn.Module):
    def __init__(self, hidden: int, num_entities: int, num_relations: int, layers: int, entity_tokens=None,
                 shut_twin: bool = False):
        super().__init__()
        self.shut_twin = shut_twin
        # Built on the meta device: it gets storage, shard by shard, once the model is sharded.
        self.entities = nn.Embedding(num_entities, hidden, device="meta")
        self.mention = nn.Linear(hidden, hidden)
        self.gcn = nn.ModuleList(GCNLayer(hidden, num_relations) for _ in range(layers))
        self.up = nn.Linear(hidden, hidden)
        self.gate = nn.Linear(2 * hidden, hidden)
        self._entity_tokens = entity_tokens  # read once by init_weights, not a parameter

    def init_weights(self, model) -> None:
        init_entity_table(self.entities, model, self._entity_tokens)

    def node_states(self, x: torch.Tensor, fields: dict) -> torch.Tensor:
        """The sub-graph node vectors after the GCN [b, N, h] (zero for padding nodes)."""
        nodes, masked = fields["graph_nodes"], fields["node_masked"].bool()
        spans, mention_node = fields["mention_spans"], fields["mention_node"]
        b, s, h = x.shape
        n = nodes.shape[1]
        positions = torch.arange(s, device=x.device)
        in_span = (positions >= spans[..., :1]) & (positions < spans[..., 1:]) & (mention_node >= 0)[..., None]
        weights = in_span.to(x.dtype)
        pooled = weights @ x / weights.sum(-1, keepdim=True).clamp(min=1)  # [b, M, h]
        slot_of_node = ((mention_node[..., None] == torch.arange(n, device=x.device)) &
                        (mention_node >= 0)[..., None]).to(x.dtype)  # [b, M, N]
        count = slot_of_node.sum(1)[..., None]
        node_mentions = slot_of_node.transpose(1, 2) @ pooled / count.clamp(min=1)
        keep = ((nodes >= 0) & ~masked).to(x.dtype)[..., None]
        u = (self.entities(nodes.clamp(min=0)) + self.mention(node_mentions) * (count > 0)) * keep
        alive = (nodes >= 0).to(x.dtype)[..., None]
        for layer in self.gcn:
            u = layer(u, fields["graph_edges"]) * alive
        return u

    def forward(self, x, key_mask, fields):
        u = self.node_states(x, fields)
        token_node = fields["token_node"]
        mentioned = (token_node >= 0).to(x.dtype)[..., None]
        ue = torch.gather(u, 1, token_node.clamp(min=0)[..., None].expand(-1, -1, u.shape[-1])) * mentioned
        gate = torch.sigmoid(self.gate(torch.cat([x, ue], -1)))
        fused = x + mentioned * gate * self.up(ue)
        return torch.cat([fused, x]) if self.shut_twin else fused


@torch.no_grad()
def init_entity_table(table: nn.Embedding, model, entity_tokens) -> None:
    """Entity rows = the mean of the word-embedding rows of each entity's surface-form tokens: at
    model init, and again when a knowledge run starts from a plain-MLM checkpoint (its table
    is new; the word embedding is the loaded one). Works on sharded tables and embeddings
    (DTensors: the word embedding is gathered, the rows redistributed); a pipeline stage without
    the word embedding keeps its initialisation."""
    embeddings = getattr(model, "embeddings", None)
    weight = table.weight
    if entity_tokens is None or embeddings is None or weight.is_meta:
        return  # a meta table is initialised when it is materialised (BertForMLM.materialize_pieces)
    word = embeddings.word_embeddings.weight
    if isinstance(word, DTensor):
        # Once, at start: torch logs on every rank that gathering FSDP-over-TP shards takes two
        # all-gathers; that is expected here.
        log = logging.getLogger("torch.distributed.tensor._redistribute")
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            word = word.full_tensor()
        finally:
            log.setLevel(level)
    if isinstance(weight, DTensor):  # only this rank's rows are computed: no rank holds the whole table
        first, count = local_rows(weight)
        weight.to_local().copy_(entity_rows_from_words(word, entity_tokens, first + count, first).to(weight.dtype))
    else:
        weight.copy_(entity_rows_from_words(word, entity_tokens, table.num_embeddings))


def local_rows(weight: DTensor) -> tuple[int, int]:
    """(first global row, row count) of this rank's shard of a row-sharded DTensor."""
    # Private API (torch.distributed.tensor._utils); move to a public one when torch has it.
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(weight.shape, weight.device_mesh, weight.placements)
    return offset[0], shape[0]


def entity_rows_from_words(word_weight: torch.Tensor, entity_tokens, end: int, start: int = 0) -> torch.Tensor:
    """[end - start, h]: entities start..end-1, each the mean word-embedding row over its tokens
    (an IndexedDataset, one sequence per entity)."""
    count = max(0, end - start)
    lengths = torch.as_tensor(entity_tokens.sequence_lengths[start:end].astype("int64"))
    tokens = torch.cat([torch.as_tensor(entity_tokens[i].astype("int64")) for i in range(start, end)] or
                       [torch.zeros(0, dtype=torch.long)])
    owner = torch.repeat_interleave(torch.arange(count), lengths)
    rows = torch.zeros(count, word_weight.shape[1], dtype=word_weight.dtype)
    rows.index_add_(0, owner, word_weight.detach().cpu()[tokens])
    return (rows / lengths.clamp(min=1)[:, None].to(rows.dtype)).to(word_weight.device)


class Fusion(Objective):
    name = "fusion"

    def pieces(self) -> list[Piece]:
        m, k, seq = self.config.model, self.config.knowledge, self.config.data.seq_len
        h = m.hidden_size
        tokens = self.data.entity_tokens if self.data is not None else None
        twins = "knowledge_gain" in self.config.objectives
        module = GatedGCNFusion(h, k.num_entities, k.num_relations, k.gcn_layers, tokens, shut_twin=twins)
        n, e, mentions = k.subgraph_nodes, k.subgraph_edges, k.max_mentions
        flops = (dense_flops(h, h, mentions) + k.gcn_layers * (dense_flops(h, h, n) + 2 * dense_flops(h, h, e))
                 + dense_flops(h, h, seq) + dense_flops(2 * h, h, seq))
        return [Piece("knowledge_fusion", "block", module, layer=fusion_layer(self.config), fields=FIELDS,
                      tp_plan=entity_table_plan, fsdp_units=("entities",), twins=twins, flops_per_sequence=flops)]

    def loss_sum(self, outputs, batch):
        return torch.zeros((), device=batch["input_ids"].device)

    def normaliser(self, batch):
        return torch.ones(())


OBJECTIVE = Fusion

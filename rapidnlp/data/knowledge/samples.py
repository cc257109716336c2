"""Knowledge-injected masked-LM samples with fixed shapes, for the knowledge objectives.

A sample is `[CLS] sentence [SEP] s1 p1 o1 [SEP] s2 p2 o2 [SEP] ...`: the sentence from the
mention-aligned token stream (PREFIX.knowledge/tokens, at most seq_len - 2 - triple_budget
tokens), then as many of its linked positive triples as fit `knowledge.triple_budget` tokens,
token type 0 for the sentence and 1 for the triples. An entity the sentence mentions is written
in the triples with that mention's tokens, so it has the same tokens in both segments; others
by their surface form (triples.bin: no disambiguation suffix, tokenized as mentions are).

Masking (knowledge.joint_mask): linked entities of the sentence are masked as wholes, up to half
of the masked-slot budget: with probability q_joint an entity that also appears in a packed
triple is masked in both segments at once (neither side can be copied from the other),
otherwise on one side; ordinary token masking fills the rest (all of it without joint_mask).
80/10/10 replacement, as the plain MLM builder.

Fields (every cap from the config: static shapes), besides the MLM ones:
  mention_tags  [S]      BIO x entity-type tag per sentence token, -100 elsewhere
  mention_spans [M, 2]   token span of each linked mention slot (0, 0 padding)
  mention_node  [M]      its entity's index among the sub-graph nodes (-1 padding)
  token_node    [S]      the sub-graph node of the mention a sentence token belongs to (-1 none)
  graph_nodes   [N]      entity ids: the linked entities first, then their neighbours (-1 padding)
  graph_edges   [E, 3]   (source node, relation, target node) of the 1-hop triples among the nodes
  node_masked   [N]      1 where any mention of the node's entity is masked (either segment)
  spo_pos       [T, 3]   the packed positive triples (s, p, o) (-1 padding)
  spo_neg       [T, K, 3] their negatives; a negative equal to a positive is dropped (-1)
  spo_spans     [T, 2, 2] token spans of each packed triple's subject and object (-1 padding)
Everything is a pure function of (seed, sample index); with `dynamic` the masks are drawn by
(seed, sample index, epoch) (data.dynamic_mask), the triples and negatives still by the index.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from rapidnlp.data.indexed import IndexedDataset
from rapidnlp.data.knowledge.kg import KnowledgeGraph
from rapidnlp.data.knowledge.sidestreams import IGNORE_TAG, KnowledgeSamples
from rapidnlp.data.mlm import IGNORE_INDEX, SpecialIds


class KnowledgeSampleBuilder:
    def __init__(self, folder: str, kg: KnowledgeGraph, ranges: np.ndarray, special: SpecialIds, cfg, *,
                 seq_len: int, max_predictions: int, mask_prob: float, seed: int, dynamic: bool = False):
        self.side = KnowledgeSamples(
            folder, kg, seq_len=seq_len - cfg.triple_budget, max_triples=cfg.max_triples,
            max_subgraph=cfg.subgraph_edges, negatives=cfg.negatives,
            corrupt_object_prob=cfg.corrupt_object_prob, seed=seed,
        )
        self.triple_tokens = IndexedDataset(os.path.join(folder, "triples"))
        self.kg, self.ranges, self.special, self.cfg = kg, ranges, special, cfg
        self.seq_len, self.max_predictions, self.mask_prob, self.seed = seq_len, max_predictions, mask_prob, seed
        self.dynamic = dynamic

    def __len__(self) -> int:
        return len(self.ranges)

    def build(self, index: int, epoch: int = 0) -> dict[str, np.ndarray]:
        cfg, sp, S = self.cfg, self.special, self.seq_len
        first, end = self.ranges[index]
        side = self.side.sample(index, int(first), int(end))
        body = side["input_ids_body"]
        n = len(body)
        ids = np.full(S, sp.pad, dtype=np.int64)
        ids[0], ids[1:n + 1], ids[n + 1] = sp.cls, body, sp.sep
        types = np.zeros(S, dtype=np.int64)
        # The triple segment: whole triples while they fit the budget. An entity the sentence
        # mentions is written with that mention's tokens (the same tokens in both segments);
        # others with their surface form's (triples.bin).
        mentioned = {}
        for a, b, e in side["mention_spans"].tolist():
            mentioned.setdefault(e, ids[a:b].copy())
        pos, limit = n + 2, n + 2 + cfg.triple_budget
        triple_spans, packed, predicate_tokens = [], [], []
        for i, (t, (s, p, o)) in enumerate(zip(side["positive_ids"].tolist(), side["positive_triples"].tolist())):
            parts = [mentioned.get(e, np.asarray(self.triple_tokens[3 * t + j], dtype=np.int64))
                     for j, e in enumerate((s, None, o))]
            need = sum(len(x) for x in parts) + 1
            if pos + need > limit:
                break
            starts = np.cumsum([pos] + [len(x) for x in parts])
            ids[pos:pos + need - 1] = np.concatenate(parts)
            ids[pos + need - 1] = sp.sep
            types[pos:pos + need] = 1
            triple_spans += [(starts[0], starts[1], s), (starts[2], starts[3], o)]
            predicate_tokens.extend(range(starts[1], starts[2]))
            packed.append(i)
            pos += need
        length = pos
        rng = np.random.default_rng((self.seed, int(index), 1, epoch) if self.dynamic else (self.seed, int(index), 1))
        sentence_spans = [tuple(int(x) for x in row) for row in side["mention_spans"]]
        positions = self._mask_positions(rng, n, sentence_spans, triple_spans, predicate_tokens)
        labels = ids[positions].copy()
        action = rng.random(len(positions))
        random_ids = rng.integers(sp.first_normal, sp.vocab_size, size=len(positions))
        ids[positions] = np.where(action < 0.8, sp.mask, np.where(action < 0.9, random_ids, labels))
        P = self.max_predictions
        mlm_positions, mlm_labels = np.zeros(P, np.int64), np.full(P, IGNORE_INDEX, np.int64)
        mlm_positions[:len(positions)], mlm_labels[:len(positions)] = positions, labels
        masked = set(positions.tolist())
        masked_entities = {e for a, b, e in sentence_spans + triple_spans if masked & set(range(a, b))}

        attention = np.zeros(S, dtype=np.int64)
        attention[:length] = 1
        tags = np.full(S, IGNORE_TAG, dtype=np.int64)
        tags[:len(side["mention_tags"])] = side["mention_tags"]
        out = {"input_ids": ids, "token_type_ids": types, "attention_mask": attention,
               "mlm_positions": mlm_positions, "mlm_labels": mlm_labels, "mention_tags": tags}
        out.update(self._graph(side, sentence_spans, masked_entities))
        out.update(self._spo(side, packed, triple_spans))
        return out

    def _mask_positions(self, rng, n, sentence_spans, triple_spans, predicate_tokens) -> np.ndarray:
        """Sorted positions to mask: whole linked entities (jointly or on one side) up to half the
        budget, then ordinary tokens up to mask_prob of the sample's tokens."""
        cfg = self.cfg
        candidates = list(range(1, n + 1)) + [p for a, b, _ in triple_spans for p in range(a, b)] + predicate_tokens
        target = min(self.max_predictions, max(1, int(round(len(candidates) * self.mask_prob))))
        chosen: set[int] = set()
        if cfg.joint_mask and sentence_spans:
            in_sentence: dict[int, list[int]] = {}
            in_triples: dict[int, list[int]] = {}
            for a, b, e in sentence_spans:
                in_sentence.setdefault(e, []).extend(range(a, b))
            for a, b, e in triple_spans:
                in_triples.setdefault(e, []).extend(range(a, b))
            entities = sorted(in_sentence)
            for k in rng.permutation(len(entities)):
                e = entities[k]
                sent, trip = in_sentence[e], in_triples.get(e, [])
                if trip and rng.random() < cfg.q_joint:
                    group = sent + trip
                else:
                    group = trip if trip and rng.random() < 0.5 else sent
                if len(chosen) + len(group) <= max(1, target // 2):
                    chosen.update(group)
        rest = np.array(sorted(set(candidates) - chosen), dtype=np.int64)
        extra = max(0, target - len(chosen))
        chosen.update(rng.permutation(rest)[:extra].tolist())
        return np.array(sorted(chosen), dtype=np.int64)

    def _graph(self, side, sentence_spans, masked_entities) -> dict[str, np.ndarray]:
        cfg, S = self.cfg, self.seq_len
        M, N, E = cfg.max_mentions, cfg.subgraph_nodes, cfg.subgraph_edges
        slots = sorted(sentence_spans)[:M]
        nodes: list[int] = []
        for _, _, e in slots:
            if e not in nodes and len(nodes) < N:
                nodes.append(e)
        edges = []
        rows = self.kg.triples
        for t in side["subgraph_triples"].tolist():
            s, p, o = (int(x) for x in rows[t])
            if s not in nodes and o not in nodes:
                continue
            for e in (s, o):
                if e not in nodes and len(nodes) < N:
                    nodes.append(e)
            if s in nodes and o in nodes and len(edges) < E:
                edges.append((nodes.index(s), p, nodes.index(o)))
        node_of = {e: i for i, e in enumerate(nodes)}
        spans = np.zeros((M, 2), np.int64)
        mention_node = np.full(M, -1, np.int64)
        token_node = np.full(S, -1, np.int64)
        for k, (a, b, e) in enumerate(slots):
            spans[k] = (a, b)
            mention_node[k] = node_of.get(e, -1)
            token_node[a:b] = node_of.get(e, -1)
        graph_nodes = np.full(N, -1, np.int64)
        graph_nodes[:len(nodes)] = nodes
        graph_edges = np.full((E, 3), -1, np.int64)
        if edges:
            graph_edges[:len(edges)] = edges
        node_masked = np.zeros(N, np.int64)
        node_masked[:len(nodes)] = [int(e in masked_entities) for e in nodes]
        return {"mention_spans": spans, "mention_node": mention_node, "token_node": token_node,
                "graph_nodes": graph_nodes, "graph_edges": graph_edges, "node_masked": node_masked}

    def _spo(self, side, packed: list[int], triple_spans: list[tuple]) -> dict[str, np.ndarray]:
        T, K = self.cfg.max_triples, self.cfg.negatives
        pos = np.full((T, 3), -1, np.int64)
        neg = np.full((T, K, 3), -1, np.int64)
        spans = np.full((T, 2, 2), -1, np.int64)
        if triple_spans:
            spans[:len(packed)] = np.asarray([(a, b) for a, b, _ in triple_spans]).reshape(-1, 2, 2)
        positives = side["positive_triples"][packed]
        pos[:len(packed)] = positives
        known = {tuple(row) for row in positives.tolist()}
        for i, k in enumerate(packed):
            for j, row in enumerate(side["negative_triples"][k].tolist()):
                if tuple(row) not in known:
                    neg[i, j] = row
        return {"spo_pos": pos, "spo_neg": neg, "spo_spans": spans}

    def collate(self, indices, epochs=None) -> dict[str, torch.Tensor]:
        """The samples `indices` stacked; `epochs` (None: all 0) picks their masks when dynamic."""
        epochs = [0] * len(indices) if epochs is None else epochs
        samples = [self.build(int(i), int(e)) for i, e in zip(indices, epochs)]
        return {k: torch.from_numpy(np.stack([s[k] for s in samples])) for k in samples[0]}

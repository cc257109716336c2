"""Knowledge side-streams aligned with the token stream, and the train-time view of them.

`build_sidestreams` links every sentence of a corpus and tokenizes it so that mention boundaries
are token boundaries: the sentence is cut at its mentions and each piece is encoded on its own
(the first with sentencepiece's dummy-prefix '▁', the others without), so a mention's tokens
decode to exactly its characters.  A sentence without mentions gets exactly the tokens
`rapidnlp prepare` gives it.  It writes into one folder:

  tokens.bin/.idx    the token stream (Megatron format; documents and sentences as in prepare)
  tags.bin/.idx      one mention tag per token, same shape: 0 = O, 1 + 2t = B-type t, 2 + 2t = I-type t
  mentions.npz       per sentence (CSR over sequences): mentions (tok_start, tok_end, char_start,
                     char_end, entity) and the linked positive triples, plus the tag names

`KnowledgeSamples` serves a training sample: the body tokens, its tags, the linked entity ids and
positive triples, the 1-hop sub-graph around the linked entities, and negatives drawn at train
time (corrupted object of the same predicate, or a random triple), a pure function of
(seed, sample index).

This module does not build the knowledge graph or the linker (kg.py, linker.py).
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable

import numpy as np
import sentencepiece as spm

from rapidnlp.data.corpus import CorpusReader, document_batches
from rapidnlp.data.indexed import IndexedDataset, IndexedDatasetWriter, dtype_for_vocab
from rapidnlp.data.knowledge.kg import KnowledgeGraph
from rapidnlp.data.knowledge.linker import EntityLinker
from rapidnlp.data.tokenizer import Tokenizer
from rapidnlp.errors import UserError
from rapidnlp.io import atomic_open

IGNORE_TAG = -100
_BATCH_SENTENCES = 8192
_WORD_START = "\u2581"


# -- sentencepiece without the dummy prefix -------------------------------------------------

def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _put_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        out.append(b | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _fields(buf: bytes):
    """(field number, wire type, raw bytes of the whole field) of a protobuf message."""
    i = 0
    while i < len(buf):
        start = i
        tag, i = _varint(buf, i)
        wire = tag & 7
        if wire == 0:
            _, i = _varint(buf, i)
        elif wire == 1:
            i += 8
        elif wire == 2:
            n, i = _varint(buf, i)
            i += n
        elif wire == 5:
            i += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield tag >> 3, wire, buf[start:i]


def without_dummy_prefix(model_proto: bytes) -> bytes:
    """The model with normalizer_spec.add_dummy_prefix = false (ModelProto field 3, its field 3).

    sentencepiece has no per-call switch for the dummy prefix, and protobuf is not a dependency,
    so the two fields are rewritten on the wire; everything else is kept byte for byte.
    """
    out = bytearray()
    for num, wire, raw in _fields(model_proto):
        if num == 3 and wire == 2:
            _, i = _varint(raw, 0)
            n, i = _varint(raw, i)
            spec = b"".join(r for f, _, r in _fields(raw[i:i + n]) if f != 3) + b"\x18\x00"
            raw = b"\x1a" + _put_varint(len(spec)) + spec
        out += raw
    return bytes(out)


class AlignedEncoder:
    """Encodes sentences cut at mention boundaries: mention tokens cover exactly the mention."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        with open(tokenizer.model_path, "rb") as f:
            proto = f.read()
        self._plain = spm.SentencePieceProcessor(model_proto=proto)
        self._no_prefix = spm.SentencePieceProcessor(model_proto=without_dummy_prefix(proto))
        self._lone_prefix = self._plain.piece_to_id(_WORD_START)
        if self._plain.id_to_piece(self._lone_prefix) != _WORD_START:
            self._lone_prefix = -1

    def encode_surface(self, texts: list[str]) -> list[list[int]]:
        """Tokens of entity or predicate names as a mention inside a sentence gets them (no
        sentence-start '▁')."""
        return self._no_prefix.encode(texts) if texts else []

    def encode(self, sentences: list[str], spans: list[np.ndarray],
               num_threads: int = 1) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """For each sentence and its mention char spans [m, 2] (sorted, non-overlapping):
        its token ids and each mention's (tok_start, tok_end)."""
        first, rest, plan = [], [], []
        for text, sp in zip(sentences, spans):
            cuts = sorted({0, len(text), *map(int, sp.reshape(-1))})
            pieces = [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
            plan.append((pieces, {(int(a), int(b)) for a, b in sp.reshape(-1, 2)}))
            for k, (a, b) in enumerate(pieces):
                (first if k == 0 else rest).append(text[a:b])
        first_ids = self._plain.encode(first, num_threads=num_threads) if first else []
        rest_ids = self._no_prefix.encode(rest, num_threads=num_threads) if rest else []
        out = []
        fi = ri = 0
        for pieces, mention_set in plan:
            ids: list[int] = []
            token_spans = []
            for k, (a, b) in enumerate(pieces):
                if k == 0:
                    seg = first_ids[fi]
                    fi += 1
                else:
                    seg = rest_ids[ri]
                    ri += 1
                start = len(ids)
                ids.extend(seg)
                if (a, b) in mention_set:
                    # A lone dummy '▁' before a sentence-initial mention covers no character.
                    if k == 0 and len(seg) > 1 and seg[0] == self._lone_prefix:
                        start += 1
                    token_spans.append((start, len(ids)))
            out.append((ids, token_spans))
        return out


# -- building the side-streams ------------------------------------------------------------

def tag_names(kg: KnowledgeGraph) -> list[str]:
    names = ["O"]
    for t in kg.type_names:
        names += [f"B-{t}", f"I-{t}"]
    return names


def linked_triples(kg: KnowledgeGraph, entities: np.ndarray, cap: int) -> np.ndarray:
    """Positive triples of a sentence: first those joining two linked entities, then those whose
    subject is linked, in triple-id order, at most cap."""
    if not len(entities) or cap <= 0:
        return np.zeros(0, dtype=np.int32)
    # Plain Python sets: a sentence links a handful of entities, where NumPy calls cost more.
    ents = set(entities.tolist())
    incident = set()
    for e in ents:
        incident.update(kg.incident_triples(e).tolist())
    rows = kg.triple_rows()
    both, subject = [], []
    for t in sorted(incident):
        s, _, o = rows[t]
        if s in ents and o in ents:
            both.append(t)
        elif s in ents:
            subject.append(t)
    return np.asarray((both + subject)[:cap], dtype=np.int32)


class SidestreamWriter:
    """Links and tokenizes batches of documents into the side-stream files of out_dir (see the
    module doc); `finalize` commits them, the token stream's .idx last."""

    def __init__(self, out_dir: str, kg: KnowledgeGraph, linker: EntityLinker, tokenizer: Tokenizer, *,
                 workers: int = 1, max_triples: int = 16):
        if 1 + 2 * len(kg.type_names) > 255:
            raise UserError(f"{len(kg.type_names)} entity types; at most 127 fit one tag byte")
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.kg, self.linker = out_dir, kg, linker
        self.workers, self.max_triples = workers, max_triples
        self.encoder = AlignedEncoder(tokenizer)
        self.etype = kg.entity_type.astype(np.int64)
        self.tokens_w = IndexedDatasetWriter(os.path.join(out_dir, "tokens"), dtype_for_vocab(tokenizer.vocab_size))
        self.tags_w = IndexedDatasetWriter(os.path.join(out_dir, "tags"), np.uint8)
        self.seq_ptr, self.mention_rows, self.trip_ptr, self.trip_ids = [0], [], [0], []
        self.stats = {"sentences": 0, "tokens": 0, "mentions": 0, "mention_tokens": 0, "linked_triples": 0}

    def add(self, batch: list[list[str]]) -> None:
        stats, etype = self.stats, self.etype
        sentences = [s for doc in batch for s in doc]
        offsets, matches = self.linker.link_batch(sentences, workers=self.workers)
        per = [matches[offsets[i]:offsets[i + 1]] for i in range(len(sentences))]
        encoded = self.encoder.encode(sentences, [m[:, :2] for m in per], num_threads=max(self.workers, 1))
        k = 0
        for doc in batch:
            seqs, tags = [], []
            for _ in doc:
                ids, tok_spans = encoded[k]
                m = per[k]
                k += 1
                if not ids:
                    continue
                tag = np.zeros(len(ids), dtype=np.uint8)
                for (a, b), ent in zip(tok_spans, m[:, 3]):
                    t = etype[ent]
                    tag[a] = 1 + 2 * t
                    tag[a + 1:b] = 2 + 2 * t
                    stats["mention_tokens"] += b - a
                seqs.append(ids)
                tags.append(tag)
                rows = np.zeros((len(m), 5), dtype=np.int64)
                if len(m):
                    rows[:, 0:2] = tok_spans
                    rows[:, 2:4] = m[:, 0:2]
                    rows[:, 4] = m[:, 3]
                self.mention_rows.append(rows)
                self.seq_ptr.append(self.seq_ptr[-1] + len(m))
                trips = linked_triples(self.kg, m[:, 3], self.max_triples)
                self.trip_ids.append(trips)
                self.trip_ptr.append(self.trip_ptr[-1] + len(trips))
                stats["sentences"] += 1
                stats["tokens"] += len(ids)
                stats["mentions"] += len(m)
                stats["linked_triples"] += len(trips)
            if seqs:
                self.tokens_w.add_document(seqs)
                self.tags_w.add_document(tags)

    def finalize(self) -> dict:
        try:
            mentions = np.concatenate(self.mention_rows) if self.mention_rows else np.zeros((0, 5), np.int64)
            save_mentions(os.path.join(self.out_dir, "mentions.npz"), np.asarray(self.seq_ptr, np.int64), mentions,
                          np.asarray(self.trip_ptr, np.int64),
                          np.concatenate(self.trip_ids) if self.trip_ids else np.zeros(0, np.int32),
                          tag_names(self.kg))
            self.tags_w.finalize()
            self.tokens_w.finalize()  # the token stream's .idx last: it is what marks the folder complete
        except BaseException:
            self.abort()
            raise
        return self.stats

    def abort(self) -> None:
        self.tokens_w.abort()
        self.tags_w.abort()


def save_mentions(path: str, seq_ptr: np.ndarray, mentions: np.ndarray, triple_ptr: np.ndarray,
                  triples: np.ndarray, names: list[str]) -> None:
    """mentions.npz (the layout KnowledgeSamples reads), atomically; numpy writes the same bytes
    for the same arrays (fixed zip timestamps), so prepares can be compared byte for byte."""
    with atomic_open(path, "wb") as f:
        np.savez(f, seq_ptr=seq_ptr, mentions=mentions, triple_ptr=triple_ptr, triples=triples,
                 tag_names=np.array(names))


def build_sidestreams(corpus_path: str, out_dir: str, kg: KnowledgeGraph, linker: EntityLinker,
                      tokenizer: Tokenizer, *, workers: int = 1, max_triples: int = 16,
                      strict_utf8: bool = False, log: Callable[[str], None] = print) -> dict:
    """Link, tokenize and write the side-streams of one corpus file into out_dir, in this process."""
    start = time.perf_counter()
    reader = CorpusReader(corpus_path, strict_utf8=strict_utf8)
    writer = SidestreamWriter(out_dir, kg, linker, tokenizer, workers=workers, max_triples=max_triples)
    try:
        for batch in document_batches(reader, _BATCH_SENTENCES):
            writer.add(batch)
    except BaseException:
        writer.abort()
        raise
    stats = writer.finalize()
    stats["skipped_lines"] = reader.num_skipped
    stats["seconds"] = round(time.perf_counter() - start, 3)
    with open(os.path.join(out_dir, "sidestreams.json"), "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=1)
    if reader.num_skipped:
        log(reader.skipped_summary())
    return stats


# -- train time ---------------------------------------------------------------------------

class KnowledgeSamples:
    """The side-streams of the samples of a knowledge folder, laid out like MLM samples:
    position 0 is [CLS], the body (the sample's tokens, truncated to seq_len - 2) follows."""

    def __init__(self, folder: str, kg: KnowledgeGraph, *, seq_len: int, max_triples: int = 16,
                 max_subgraph: int = 64, negatives: int = 1, corrupt_object_prob: float = 0.5,
                 seed: int = 0):
        self.tokens = IndexedDataset(os.path.join(folder, "tokens"))
        self.tags = IndexedDataset(os.path.join(folder, "tags"))
        path = os.path.join(folder, "mentions.npz")
        if not os.path.isfile(path):
            raise UserError(f"{path}: not found; build the folder with `rapidnlp prepare --knowledge`")
        with np.load(path, allow_pickle=False) as z:
            self.seq_ptr, self.mentions = z["seq_ptr"], z["mentions"]
            self.triple_ptr, self.seq_triples = z["triple_ptr"], z["triples"]
            self.tag_names = [str(t) for t in z["tag_names"]]
        if (len(self.seq_ptr) != len(self.tokens) + 1 or len(self.tags) != len(self.tokens)
                or not np.array_equal(self.tags.sequence_lengths, self.tokens.sequence_lengths)):
            raise UserError(f"{folder}: side-streams do not match the token stream; rebuild with "
                            f"`rapidnlp prepare --knowledge`")
        self.kg = kg
        self.seq_len = seq_len
        self.max_triples = max_triples
        self.max_subgraph = max_subgraph
        self.negatives = negatives
        self.corrupt_object_prob = corrupt_object_prob
        self.seed = seed

    def sample(self, index: int, first: int, end: int) -> dict[str, np.ndarray]:
        """Side-streams of sample `index` made of sequences [first, end)."""
        body_len = self.seq_len - 2
        toks = np.concatenate([np.asarray(self.tokens[s], np.int64) for s in range(first, end)])[:body_len]
        tags = np.concatenate([np.asarray(self.tags[s], np.int64) for s in range(first, end)])[:body_len]
        n = len(toks)
        mention_tags = np.full(self.seq_len, IGNORE_TAG, dtype=np.int64)
        mention_tags[1:n + 1] = tags
        # Mentions (token spans shifted past [CLS]) wholly inside the truncated body.
        rows, base = [], 0
        for s in range(first, end):
            m = self.mentions[self.seq_ptr[s]:self.seq_ptr[s + 1]]
            rows.append(np.stack([m[:, 0] + base + 1, m[:, 1] + base + 1, m[:, 4]], axis=1))
            base += len(self.tokens[s])
        spans = np.concatenate(rows) if rows else np.zeros((0, 3), np.int64)
        spans = spans[spans[:, 1] <= n + 1]
        entities = np.unique(spans[:, 2])
        pos = [self.seq_triples[self.triple_ptr[s]:self.triple_ptr[s + 1]] for s in range(first, end)]
        pos = np.concatenate(pos) if pos else np.zeros(0, np.int32)
        if len(pos):  # first occurrence order, then only triples about a kept entity
            _, keep = np.unique(pos, return_index=True)
            pos = pos[np.sort(keep)]
            pos = pos[np.isin(self.kg.triples[pos, 0], entities) | np.isin(self.kg.triples[pos, 2], entities)]
        pos = pos[: self.max_triples].astype(np.int64)
        rng = np.random.default_rng((self.seed, int(index)))
        return {
            "input_ids_body": toks,
            "mention_tags": mention_tags,
            "mention_spans": spans,
            "entities": entities,
            "positive_triples": self.kg.triples[pos].astype(np.int64),
            "positive_ids": pos,
            "negative_triples": self._negatives(rng, pos),
            "subgraph_triples": self._subgraph(rng, entities),
        }

    def _subgraph(self, rng: np.random.Generator, entities: np.ndarray) -> np.ndarray:
        """Ids of the triples around the linked entities (1 hop), a seeded subset if too many."""
        if not len(entities):
            return np.zeros(0, dtype=np.int64)
        ids = np.unique(np.concatenate([self.kg.incident_triples(int(e)) for e in entities]))
        if len(ids) > self.max_subgraph:
            ids = np.sort(rng.choice(ids, self.max_subgraph, replace=False))
        return ids.astype(np.int64)

    def _negatives(self, rng: np.random.Generator, positives: np.ndarray) -> np.ndarray:
        """[len(positives), negatives, 3]: per positive (s, p, o), with corrupt_object_prob a
        corrupted object of the same predicate that makes a false triple, otherwise a random KG
        triple that is not a positive of this sample."""
        kg = self.kg
        out = np.zeros((len(positives), self.negatives, 3), dtype=np.int64)
        pos_set = set(int(t) for t in positives)
        for i, t in enumerate(positives):
            s, p, _ = (int(x) for x in kg.triples[t])
            objects = kg.objects_of(p)
            for j in range(self.negatives):
                out[i, j] = self._one_negative(rng, s, p, objects, pos_set)
        return out

    def _one_negative(self, rng, s, p, objects, pos_set):
        kg = self.kg
        if len(objects) > 1 and rng.random() < self.corrupt_object_prob:
            for _ in range(8):
                cand = (s, p, int(objects[rng.integers(len(objects))]))
                if not kg.has_triple(*cand):
                    return cand
        for _ in range(8):
            t = int(rng.integers(kg.num_triples))
            if t not in pos_set:
                return kg.triples[t]
        return kg.triples[int(rng.integers(kg.num_triples))]  # the sample is linked to every triple

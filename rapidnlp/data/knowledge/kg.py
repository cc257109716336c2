"""The knowledge graph: TSV ingestion with validation, id-mapped arrays, CSR adjacency, storage.

Input files (UTF-8, one record per line; blank lines and lines starting with '#' are skipped):
  triples  `subject<TAB>predicate<TAB>object`
  aliases  `entity<TAB>alias[<TAB>alias ...]`  (extra names an entity is mentioned by)
  types    `entity<TAB>type`                    (optional; entities without one get DEFAULT_TYPE)
Every entity's own name is also one of its aliases.  Fields are stripped of surrounding spaces.

Bad lines (wrong field count, an empty field, not UTF-8) and duplicated triples are skipped and
counted with their line numbers in an IngestReport; `strict=True` turns the first one into a
UserError naming file and line.  Nothing is dropped without being counted.

In memory and on disk (`save`/`load`, PREFIX/kg.npz, read with allow_pickle=False) the graph is:
entity/predicate/type names as UTF-8 blobs with offsets; triples int32 [T, 3] (s, p, o); each
entity's type; a CSR over entities of their incident triples (as subject or object: the 1-hop
sub-graph) and, per predicate, the distinct objects (to corrupt a triple's object).
`write_triple_dataset` stores each triple's tokens as an indexed dataset: one document per triple,
its three sequences the tokens of s, p and o (entities by their surface forms, `surface_forms`);
`write_entity_dataset` each entity's tokens.

This module knows nothing of linking (linker.py) nor of corpora (sidestreams.py).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Callable
from typing import Iterable, Iterator

import numpy as np

from rapidnlp.errors import UserError
from rapidnlp.io import atomic_open

DEFAULT_TYPE = "ENT"
_KINDS = ("wrong_fields", "empty_field", "not_utf8", "duplicate")


@dataclass
class IngestReport:
    """Counts of what ingestion read, kept and skipped, with the first line numbers of each."""

    lines: int = 0
    triples: int = 0
    alias_pairs: int = 0
    wrong_fields: int = 0
    empty_field: int = 0
    not_utf8: int = 0
    duplicate: int = 0
    examples: dict = field(default_factory=lambda: {k: [] for k in _KINDS})  # kind -> [(path, line)]
    max_reported: int = 10

    @property
    def skipped(self) -> int:
        return sum(getattr(self, k) for k in _KINDS)

    def add(self, kind: str, path: str, lineno: int) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.examples[kind]) < self.max_reported:
            self.examples[kind].append((path, lineno))

    def summary(self) -> str:
        read = f"{self.lines} lines read, " if self.lines else ""
        s = (f"knowledge graph: {read}{self.triples} triples, {self.alias_pairs} "
             f"alias pairs; skipped {self.wrong_fields} with a wrong field count, {self.empty_field} "
             f"with an empty field, {self.not_utf8} not UTF-8, {self.duplicate} duplicate triples")
        for kind in _KINDS:
            if self.examples[kind]:
                where = ", ".join(f"{os.path.basename(p)}:{n}" for p, n in self.examples[kind])
                more = ", ..." if getattr(self, kind) > len(self.examples[kind]) else ""
                s += f"; {kind.replace('_', ' ')} at {where}{more}"
        return s


def _tsv_records(path: str, fields: tuple[int, int | None], report: IngestReport,
                 strict: bool, what: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, stripped fields) of each good line; bad ones are reported and skipped."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{path}: {what} file not found; fix the path")
    lo, hi = fields
    expect = f"{lo}" if hi == lo else f"at least {lo}" if hi is None else f"{lo} to {hi}"
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            report.lines += 1
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                if strict:
                    raise UserError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start}); convert the "
                                    f"file (e.g. `iconv -f GBK -t UTF-8`)") from None
                report.add("not_utf8", path, lineno)
                continue
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = [p.strip() for p in line.split("\t")]
            if len(parts) < lo or (hi is not None and len(parts) > hi):
                if strict:
                    raise UserError(f"{path}:{lineno}: {len(parts)} tab-separated fields, expected "
                                    f"{expect} ({what}); fix or remove the line")
                report.add("wrong_fields", path, lineno)
                continue
            if not all(parts):
                if strict:
                    raise UserError(f"{path}:{lineno}: field {parts.index('') + 1} is empty ({what}); "
                                    f"fix or remove the line")
                report.add("empty_field", path, lineno)
                continue
            yield lineno, parts


def _blob(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    encoded = [n.encode("utf-8") for n in names]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    if encoded:
        np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), offsets


def _unblob(blob: np.ndarray, offsets: np.ndarray) -> list[str]:
    data = blob.tobytes()
    return [data[offsets[i]:offsets[i + 1]].decode("utf-8") for i in range(len(offsets) - 1)]


def _csr(keys: np.ndarray, values: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((values, keys))
    ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(keys, minlength=n), out=ptr[1:])
    return ptr, values[order]


class KnowledgeGraph:
    """Id-mapped triples with adjacency; build with `read_tsv` or `from_records`."""

    def __init__(self, entity_names: list[str], predicate_names: list[str], type_names: list[str],
                 triples: np.ndarray, entity_type: np.ndarray, alias_text: list[str],
                 alias_entity: np.ndarray, report: IngestReport | None = None):
        self.entity_names = entity_names
        self.predicate_names = predicate_names
        self.type_names = type_names
        self.triples = np.asarray(triples, dtype=np.int32).reshape(-1, 3)
        self.entity_type = np.asarray(entity_type, dtype=np.int16)
        self.alias_text = alias_text
        self.alias_entity = np.asarray(alias_entity, dtype=np.int64)
        self.report = report or IngestReport(triples=len(self.triples), alias_pairs=len(alias_text))
        E, T = self.num_entities, len(self.triples)
        tid = np.arange(T, dtype=np.int32)
        # 1-hop adjacency: every triple under its subject and under its object (once if s == o).
        s, o = self.triples[:, 0], self.triples[:, 2]
        keys = np.concatenate([s, o[o != s]])
        vals = np.concatenate([tid, tid[o != s]])
        self.adj_ptr, self.adj_triples = _csr(keys.astype(np.int64), vals, E)
        # Distinct objects per predicate, for corrupting a triple's object.
        po = np.unique(self.triples[:, 1:3].astype(np.int64), axis=0) if T else np.zeros((0, 2), np.int64)
        self.pred_obj_ptr, self.pred_objects = _csr(po[:, 0], po[:, 1].astype(np.int32),
                                                    len(predicate_names))
        self._triple_set = None

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_records(cls, triples: Iterable[tuple[str, str, str]],
                     aliases: Iterable[tuple[str, str]] = (),
                     types: dict[str, str] | None = None,
                     report: IngestReport | None = None,
                     _lines: Iterable | None = None) -> "KnowledgeGraph":
        """From (s, p, o) name triples, (entity, alias) pairs and an entity -> type map.

        Entity ids follow first appearance (triples first, then aliases, then types), so the same
        input always gives the same ids.  Duplicate triples are counted in the report and dropped.
        """
        report = report or IngestReport()
        ent: dict[str, int] = {}
        pred: dict[str, int] = {}
        rows: list[tuple[int, int, int]] = []
        seen: set = set()
        for rec in triples:
            (s, p, o), where = (rec[:3], rec[3]) if len(rec) == 4 else (rec, None)
            key = (ent.setdefault(s, len(ent)), pred.setdefault(p, len(pred)), ent.setdefault(o, len(ent)))
            if key in seen:
                if where is not None:
                    report.add("duplicate", *where)
                else:
                    report.duplicate += 1
                continue
            seen.add(key)
            rows.append(key)
        pairs = []
        for e, a in aliases:
            pairs.append((ent.setdefault(e, len(ent)), a))
        types = types or {}
        for e in types:
            ent.setdefault(e, len(ent))
        type_names = [DEFAULT_TYPE] + sorted({t for t in types.values() if t != DEFAULT_TYPE})
        type_id = {t: i for i, t in enumerate(type_names)}
        names = list(ent)
        entity_type = np.array([type_id[types.get(n, DEFAULT_TYPE)] for n in names], dtype=np.int16)
        # Every entity is mentioned by its own name; explicit aliases follow.
        alias_text = names + [a for _, a in pairs]
        alias_entity = np.concatenate([np.arange(len(names), dtype=np.int64),
                                       np.array([e for e, _ in pairs], dtype=np.int64)])
        report.triples = len(rows)
        report.alias_pairs = len(pairs)
        return cls(names, list(pred), type_names, np.array(rows, dtype=np.int32).reshape(-1, 3),
                   entity_type, alias_text, alias_entity, report)

    @classmethod
    def read_tsv(cls, triples_path: str, aliases_path: str | None = None,
                 types_path: str | None = None, *, strict: bool = False,
                 max_reported: int = 10) -> "KnowledgeGraph":
        """Ingest the TSV files (see the module docstring); bad lines are counted in `.report`."""
        report = IngestReport(max_reported=max_reported)
        tpath = os.fspath(triples_path)
        triples = [(*parts, (tpath, n)) for n, parts in _tsv_records(tpath, (3, 3), report, strict, "triples")]
        seen: set = set()
        for s, p, o, (path, n) in triples:  # strict mode names the first duplicate's line
            if strict and (s, p, o) in seen:
                raise UserError(f"{path}:{n}: duplicate triple ({s}, {p}, {o}); remove the line")
            seen.add((s, p, o))
        aliases = []
        if aliases_path is not None:
            for _, parts in _tsv_records(aliases_path, (2, None), report, strict, "aliases"):
                aliases.extend((parts[0], a) for a in parts[1:])
        types = {}
        if types_path is not None:
            for _, (e, t) in _tsv_records(types_path, (2, 2), report, strict, "entity types"):
                types[e] = t
        kg = cls.from_records(triples, aliases, types, report)
        if not len(kg.triples):
            raise UserError(f"{tpath}: no valid triple ({report.summary()}); each line must be "
                            f"subject<TAB>predicate<TAB>object")
        return kg

    # -- queries ------------------------------------------------------------------------------

    @property
    def num_entities(self) -> int:
        return len(self.entity_names)

    @property
    def num_triples(self) -> int:
        return len(self.triples)

    def incident_triples(self, entity: int) -> np.ndarray:
        """Ids of the triples in which the entity is subject or object (its 1-hop sub-graph)."""
        return self.adj_triples[self.adj_ptr[entity]:self.adj_ptr[entity + 1]]

    def objects_of(self, predicate: int) -> np.ndarray:
        return self.pred_objects[self.pred_obj_ptr[predicate]:self.pred_obj_ptr[predicate + 1]]

    def has_triple(self, s: int, p: int, o: int) -> bool:
        if self._triple_set is None:
            self._triple_set = set(map(tuple, self.triples.tolist()))
        return (s, p, o) in self._triple_set

    def triple_rows(self) -> list:
        """The triples as a list of (s, p, o) lists, for per-sentence loops in Python."""
        if getattr(self, "_rows", None) is None:
            self._rows = self.triples.tolist()
        return self._rows

    def triple_text(self, t: int) -> tuple[str, str, str]:
        s, p, o = self.triples[t]
        return self.entity_names[s], self.predicate_names[p], self.entity_names[o]

    # -- storage ------------------------------------------------------------------------------

    def save(self, path: str) -> None:
        """Write PATH (an .npz of plain arrays: loads with allow_pickle=False), atomically."""
        arrays = {"triples": self.triples, "entity_type": self.entity_type,
                  "alias_entity": self.alias_entity}
        for key, names in (("entity", self.entity_names), ("predicate", self.predicate_names),
                           ("type", self.type_names), ("alias", self.alias_text)):
            arrays[f"{key}_blob"], arrays[f"{key}_offsets"] = _blob(names)
        with atomic_open(path, "wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: str) -> "KnowledgeGraph":
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise UserError(f"{path}: knowledge graph not found; build it with `rapidnlp prepare --knowledge`")
        try:
            with np.load(path, allow_pickle=False) as z:
                names = {k: _unblob(z[f"{k}_blob"], z[f"{k}_offsets"])
                         for k in ("entity", "predicate", "type", "alias")}
                triples, etype, aent = z["triples"], z["entity_type"], z["alias_entity"]
        except (OSError, KeyError, ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not a RapidNLP knowledge graph ({e}); rebuild it with "
                            f"`rapidnlp prepare --knowledge`") from None
        E, P = len(names["entity"]), len(names["predicate"])
        ok = (triples.ndim == 2 and triples.shape[1] == 3 and len(etype) == E
              and len(aent) == len(names["alias"])
              and (not triples.size or (triples.min() >= 0 and triples[:, [0, 2]].max() < E
                                        and triples[:, 1].max() < P))
              and (not len(aent) or (aent.min() >= 0 and aent.max() < E))
              and (not E or (etype.min() >= 0 and etype.max() < len(names["type"]))))
        if not ok:
            raise UserError(f"{path}: knowledge graph arrays are inconsistent (ids out of range); "
                            f"rebuild it with `rapidnlp prepare --knowledge`")
        return cls(names["entity"], names["predicate"], names["type"], triples, etype,
                   names["alias"], aent)

    def __repr__(self) -> str:
        return (f"KnowledgeGraph({self.num_entities} entities, {len(self.predicate_names)} predicates, "
                f"{self.num_triples} triples, {len(self.alias_text)} aliases)")


def surface_forms(kg: KnowledgeGraph) -> list[str]:
    """How each entity is written in text: its name, less a disambiguation suffix (`朝阳区@北京市`,
    `word#PER`) when the part before it is one of the entity's aliases."""
    aliases: dict[int, set[str]] = {}
    for text, e in zip(kg.alias_text, kg.alias_entity.tolist()):
        aliases.setdefault(e, set()).add(text)
    out = []
    for e, name in enumerate(kg.entity_names):
        head = re.split(r"[@#]", name, maxsplit=1)[0]
        out.append(head if head != name and head in aliases.get(e, ()) else name)
    return out


def write_triple_dataset(kg: KnowledgeGraph, encode: Callable[[list[str]], list[list[int]]], prefix: str,
                         vocab_size: int) -> dict:
    """Each triple's tokens as an indexed dataset: document t = [tokens(s), tokens(p), tokens(o)],
    entities by their surface forms. `encode` must tokenize as the mention encoder does (no
    sentence-start '▁'), so an entity has the same tokens in a sentence and in a triple.

    A training sample can then append "s p o" text for its linked triples by triple id.
    """
    from rapidnlp.data.indexed import IndexedDatasetWriter, dtype_for_vocab

    ent_ids = encode(surface_forms(kg))
    pred_ids = encode(kg.predicate_names)
    tokens = 0
    with IndexedDatasetWriter(prefix, dtype_for_vocab(vocab_size)) as w:
        for s, p, o in kg.triples.tolist():
            w.add_document([ent_ids[s], pred_ids[p], ent_ids[o]])
            tokens += len(ent_ids[s]) + len(pred_ids[p]) + len(ent_ids[o])
    return {"triples": kg.num_triples, "tokens": tokens}


def write_entity_dataset(kg: KnowledgeGraph, encode: Callable[[list[str]], list[list[int]]], prefix: str,
                         vocab_size: int) -> dict:
    """Each entity's surface-form tokens (one sequence per entity, encoded as `write_triple_dataset`
    does): what initialises an entity's embedding row (the mean of its tokens' word embeddings)."""
    from rapidnlp.data.indexed import IndexedDatasetWriter, dtype_for_vocab

    ids = encode(surface_forms(kg))
    with IndexedDatasetWriter(prefix, dtype_for_vocab(vocab_size)) as w:
        w.add_document([seq or [0] for seq in ids])
    return {"entities": kg.num_entities, "tokens": sum(len(x) for x in ids)}

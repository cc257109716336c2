"""Entity linking: an alias table compiled into our own Aho-Corasick automaton (C++, pybind11).

Matching is leftmost-longest and non-overlapping: scanning left to right, at the first position
where any alias starts, the longest alias starting there is taken, and scanning resumes after it.
Spans are in characters (Unicode code points, the indices of a Python str), end exclusive.
Text may be str (scanned in its own storage, no encoding; a lone surrogate simply never matches)
or UTF-8 bytes (bytes that are not valid UTF-8 raise ValueError naming the byte).
The scan releases the GIL, and `link_batch(..., workers=N)` runs N native threads.

An alias may name several entities (an ambiguous place name): a match reports the alias id and
the first entity given for it; `entities(alias_id)` lists them all.  The compiled automaton is
saved in a flat, bounds-checked binary format (`save`/`load`, `to_bytes`/`from_bytes`); pickling
a linker goes through the same bytes, so no pickled internals are ever loaded.

This module does not read knowledge-graph files (kg.py) nor tokenize (sidestreams.py).  It must
not import pyahocorasick: that package is only the benchmark's peer.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from rapidnlp.errors import UserError
from rapidnlp.io import atomic_write

try:
    from rapidnlp.data.knowledge import _native
except ImportError as e:  # pragma: no cover - only on a broken install
    raise ImportError(f"rapidnlp's C++ knowledge extension is not built ({e}); reinstall with "
                      f"`pip install -e .` (needs a C++17 compiler; pybind11 comes with the build)") from e

MAX_ALIAS_CHARS = int(_native.MAX_ALIAS_CHARS)  # the automaton's hard limit (depth in one byte)
DEFAULT_MAX_ALIAS_CHARS = 64
# Columns of the match arrays returned by link() and link_batch().
START, END, ALIAS, ENTITY = 0, 1, 2, 3


@dataclass
class AliasReport:
    """What building a linker kept and dropped; nothing is dropped without being counted here."""

    given: int = 0
    kept: int = 0  # (alias, entity) pairs compiled
    unique_aliases: int = 0
    duplicates: int = 0  # the same (alias, entity) pair given again
    empty: int = 0
    too_long: int = 0
    invalid: int = 0  # not a str, or a str that is not encodable as UTF-8
    examples: list = field(default_factory=list)  # (index, reason) of the first few rejected
    seconds: float = 0.0

    @property
    def rejected(self) -> int:
        return self.empty + self.too_long + self.invalid

    def summary(self) -> str:
        s = (f"aliases: {self.given} given, {self.kept} kept ({self.unique_aliases} distinct strings), "
             f"{self.duplicates} duplicate pairs, {self.empty} empty, {self.too_long} too long, "
             f"{self.invalid} invalid; built in {self.seconds:.2f} s")
        if self.examples:
            s += "; first rejected: " + ", ".join(f"#{i} ({why})" for i, why in self.examples)
        return s


class EntityLinker:
    """A compiled alias table. Build with `EntityLinker.build(aliases, entities)`."""

    def __init__(self, automaton, report: AliasReport | None = None):
        self._ac = automaton
        self.report = report or AliasReport(unique_aliases=automaton.num_aliases)

    @classmethod
    def build(cls, aliases: Sequence[str], entities: Iterable[int], *,
              max_alias_chars: int = DEFAULT_MAX_ALIAS_CHARS, strict: bool = False,
              max_reported: int = 10) -> "EntityLinker":
        """Compile (alias, entity id) pairs.  Aliases are matched exactly as given (case, width).

        Empty aliases, aliases longer than max_alias_chars and non-strings are rejected and
        counted in `.report`; with strict=True the first one raises UserError instead.
        """
        start = time.perf_counter()
        if not 1 <= max_alias_chars <= MAX_ALIAS_CHARS:
            raise UserError(f"max_alias_chars is {max_alias_chars}; it must be 1 to {MAX_ALIAS_CHARS}")
        aliases = list(aliases)
        ents = np.asarray(list(entities) if not isinstance(entities, np.ndarray) else entities)
        if ents.ndim != 1 or len(ents) != len(aliases):
            raise ValueError(f"{len(aliases)} aliases but {ents.size} entity ids: give one id per alias")
        if ents.size and ents.dtype.kind not in "iu":
            raise ValueError(f"entity ids must be integers, got {ents.dtype}")
        ents = ents.astype(np.int64, copy=False)
        report = AliasReport(given=len(aliases))

        # The common case, all aliases good, is checked with C-level passes; only a table with
        # bad entries takes the per-alias loop that says which and why.
        all_str = set(map(type, aliases)) <= {str}
        if all_str:
            lengths = np.fromiter(map(len, aliases), dtype=np.int64, count=len(aliases))
            try:
                "".join(aliases).encode("utf-8")
                encodable = True
            except UnicodeEncodeError:
                encodable = False
        if all_str and encodable and not ((lengths == 0) | (lengths > max_alias_chars)).any():
            keep_alias, keep_ent = aliases, ents
        else:
            keep = np.ones(len(aliases), dtype=bool)
            for i, alias in enumerate(aliases):
                why = _rejection(alias, max_alias_chars)
                if why is None:
                    continue
                kind, why = why
                if strict:
                    raise UserError(f"alias #{i} ({alias!r:.60}) rejected: {why}; fix the alias "
                                    f"table or build without strict")
                setattr(report, kind, getattr(report, kind) + 1)
                if len(report.examples) < max_reported:
                    report.examples.append((i, why))
                keep[i] = False
            keep_alias = [a for a, k in zip(aliases, keep.tolist()) if k]
            keep_ent = ents[keep]
        automaton = _native.Automaton.build(keep_alias, np.ascontiguousarray(keep_ent, dtype=np.int64))
        report.duplicates = automaton.num_duplicates
        report.kept = len(keep_alias) - report.duplicates
        report.unique_aliases = automaton.num_aliases
        report.seconds = time.perf_counter() - start
        return cls(automaton, report)

    # -- linking ------------------------------------------------------------------------------

    def link(self, text: str | bytes) -> np.ndarray:
        """Matches in one text: int64 [m, 4] rows of (start, end, alias id, entity id)."""
        return self._ac.link(text)

    def link_batch(self, texts: Sequence[str | bytes], workers: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Matches of many texts on `workers` native threads (0: all cores).

        Returns (offsets [n + 1], matches [M, 4]): text i's matches are matches[offsets[i]:offsets[i+1]].
        """
        if not isinstance(texts, (list, tuple)):
            texts = list(texts)
        return self._ac.link_batch(texts, workers)

    def mentions(self, text: str) -> list[tuple[int, int, str, int]]:
        """(start, end, surface, entity id) of each match: a readable view for users and tests."""
        return [(int(s), int(e), text[s:e], int(ent)) for s, e, _, ent in self.link(text)]

    # -- the table ----------------------------------------------------------------------------

    @property
    def num_aliases(self) -> int:
        return self._ac.num_aliases

    @property
    def num_nodes(self) -> int:
        return self._ac.num_nodes

    def alias(self, alias_id: int) -> str:
        return self._ac.alias(int(alias_id))

    def entities(self, alias_id: int) -> np.ndarray:
        """Every entity the alias names, in the order they were given."""
        return self._ac.entities(int(alias_id))

    # -- persistence --------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        return self._ac.to_bytes()

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str = "linker bytes") -> "EntityLinker":
        try:
            return cls(_native.Automaton.from_bytes(bytes(data)))
        except ValueError as e:
            raise UserError(f"{source}: not a valid RapidNLP linker ({e}); rebuild it with "
                            f"`rapidnlp prepare --knowledge`") from None

    def save(self, path: str) -> None:
        """Write the automaton atomically (a temporary file renamed into place)."""
        atomic_write(path, self.to_bytes())

    @classmethod
    def load(cls, path: str) -> "EntityLinker":
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise UserError(f"{path}: linker file not found; build it with `rapidnlp prepare --knowledge`")
        with open(path, "rb") as f:
            return cls.from_bytes(f.read(), source=path)

    def __reduce__(self):
        return (EntityLinker.from_bytes, (self.to_bytes(),))

    def __repr__(self) -> str:
        return f"EntityLinker({self.num_aliases} aliases, {self.num_nodes} automaton states)"


def _rejection(alias, max_alias_chars: int) -> tuple[str, str] | None:
    """(report field, reason) why an alias cannot be compiled, or None."""
    if not isinstance(alias, str):
        return "invalid", f"not a string: {type(alias).__name__}"
    if not alias:
        return "empty", "empty"
    if len(alias) > max_alias_chars:
        return "too_long", f"{len(alias)} characters > {max_alias_chars}"
    try:
        alias.encode("utf-8")
    except UnicodeEncodeError:
        return "invalid", "lone surrogate, not encodable as UTF-8"
    return None


def link_reference(text: str, table: dict[str, int]) -> list[tuple[int, int, int]]:
    """The slow, obviously correct definition: (start, end, entity) by leftmost-longest greedy.

    `table` maps each alias to its (first) entity.  Only for tests and the benchmark.
    """
    if not table:
        return []
    longest = max(map(len, table))
    out = []
    i = 0
    while i < len(text):
        for n in range(min(longest, len(text) - i), 0, -1):
            ent = table.get(text[i:i + n])
            if ent is not None:
                out.append((i, i + n, ent))
                i += n
                break
        else:
            i += 1
    return out

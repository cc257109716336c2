"""`rapidnlp prepare --knowledge`: a corpus + a knowledge graph -> the knowledge folder.

PREFIX.knowledge/ (next to the text dataset PREFIX.{model,bin,idx} that `prepare` writes):
  kg.npz                    the knowledge graph (kg.py)
  linker.bin                the compiled alias automaton (linker.py)
  triples.bin/.idx          each triple's s/p/o tokens (one document per triple; surface forms,
                            tokenized as mentions are)
  entities.bin/.idx         each entity's surface-form tokens (initialises its embedding row)
  tokens, tags, mentions    the mention-aligned token stream and its side-streams (sidestreams.py)
  report.json               ingestion, alias and linking counts (and, for the demo, place P/R)

The folder is built under a temporary name and renamed into place at the end, so a failed run
never leaves a folder that looks complete.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import Callable

from rapidnlp.data.knowledge.kg import KnowledgeGraph, write_entity_dataset, write_triple_dataset
from rapidnlp.data.knowledge.linker import EntityLinker
from rapidnlp.data.knowledge.sidestreams import AlignedEncoder, build_sidestreams
from rapidnlp.data.tokenizer import Tokenizer
from rapidnlp.io import atomic_folder


def knowledge_dir(prefix: str) -> str:
    return os.fspath(prefix) + ".knowledge"


def check_knowledge_folder(prefix: str) -> None:
    """What a knowledge run needs of PREFIX.knowledge/, checked before any process starts: every
    file, and a knowledge graph that agrees with the side-streams (entity ids, triple count).
    Raises UserError (one line)."""
    import numpy as np

    from rapidnlp.data.indexed import IndexedDataset
    from rapidnlp.errors import UserError

    folder = knowledge_dir(prefix)
    for name in ("kg.npz", "mentions.npz", "tokens.idx", "tags.idx", "triples.idx", "entities.idx"):
        if not os.path.isfile(os.path.join(folder, name)):
            raise UserError(f"{os.path.join(folder, name)}: not found (knowledge.enabled = true needs the "
                            f"knowledge folder); run `rapidnlp prepare --knowledge` (--demo or --kg) for {prefix}")
    kg = KnowledgeGraph.load(os.path.join(folder, "kg.npz"))
    with np.load(os.path.join(folder, "mentions.npz"), allow_pickle=False) as z:
        mentions, triples = z["mentions"], z["triples"]
    entities = len(IndexedDataset(os.path.join(folder, "entities")))
    linked = int(mentions[:, 4].max()) + 1 if len(mentions) else 0
    if entities != kg.num_entities or linked > kg.num_entities or len(IndexedDataset(os.path.join(folder, "triples"))) \
            != 3 * kg.num_triples or (len(triples) and int(triples.max()) >= kg.num_triples):
        raise UserError(f"{folder}: the knowledge graph ({kg.num_entities} entities, {kg.num_triples} triples) "
                        f"does not match the side-streams ({entities} entity token rows, entity ids up to "
                        f"{linked - 1}); rebuild the folder with `rapidnlp prepare --knowledge`")


# Files that depend only on the knowledge graph and the tokenizer: equal in every shard.
KG_FILES = ("kg.npz", "linker.bin", "triples.bin", "triples.idx", "entities.bin", "entities.idx")


def build_kg_files(folder: str, kg: KnowledgeGraph, tok: Tokenizer,
                   log: Callable[[str], None] = print) -> tuple[EntityLinker, dict]:
    """The corpus-independent part of a knowledge folder (KG_FILES); returns the linker and the
    report's KG entries."""
    log(kg.report.summary())
    linker = EntityLinker.build(kg.alias_text, kg.alias_entity)
    log(linker.report.summary())
    kg.save(os.path.join(folder, "kg.npz"))
    linker.save(os.path.join(folder, "linker.bin"))
    encode = AlignedEncoder(tok).encode_surface
    triple_stats = write_triple_dataset(kg, encode, os.path.join(folder, "triples"), tok.vocab_size)
    write_entity_dataset(kg, encode, os.path.join(folder, "entities"), tok.vocab_size)
    return linker, {
        "kg": {"entities": kg.num_entities, "predicates": len(kg.predicate_names),
               "triples": kg.num_triples, "types": kg.type_names,
               "skipped_lines": kg.report.skipped, "summary": kg.report.summary()},
        "aliases": {"given": linker.report.given, "kept": linker.report.kept,
                    "distinct": linker.report.unique_aliases, "rejected": linker.report.rejected,
                    "duplicates": linker.report.duplicates,
                    "build_seconds": round(linker.report.seconds, 3)},
        "triple_tokens": triple_stats,
    }


def sum_stats(parts: list[dict]) -> dict:
    """Counts of several side-stream builds added up (their keys are all counts or seconds)."""
    out: dict = {}
    for part in parts:
        for key, value in part.items():
            out[key] = round(out.get(key, 0) + value, 3)
    return out


def same_files(paths: list[str], what: str, fix: str) -> None:
    """Refuse (one line) files that differ from the first of `paths`, or exist where it does not."""
    import filecmp

    from rapidnlp.errors import UserError

    for path in paths[1:]:
        if os.path.exists(paths[0]) != os.path.exists(path) or (
                os.path.exists(path) and not filecmp.cmp(paths[0], path, shallow=False)):
            raise UserError(f"{path} differs from {paths[0]}: {what}; {fix}")


def same_kg_files(folders: list[str]) -> None:
    for name in KG_FILES:
        same_files([os.path.join(f, name) for f in folders], "the parts were prepared with different "
                   "knowledge graphs or tokenizers", "prepare every part with the same --kg files and --tokenizer")


def merge_knowledge(folders: list[str], out: str, *, move: bool = False, kg_files: str | None = None) -> dict:
    """Concatenate knowledge folders (the shards of one corpus, in order) into `out`: the token
    and tag streams and the per-sentence mentions and triples in order, the KG files (equal in
    every shard, else UserError) once, or from the folder `kg_files` (chunks of one prepare).
    Returns the summed side-stream counts."""
    import numpy as np

    from rapidnlp.data.indexed import merge_indexed
    from rapidnlp.data.knowledge.sidestreams import save_mentions

    if kg_files is None:
        kg_files = folders[0]
        same_kg_files(folders)
    os.makedirs(out, exist_ok=True)
    for name in KG_FILES:
        (os.replace if move else shutil.copyfile)(os.path.join(kg_files, name), os.path.join(out, name))
    seq_ptr, mentions, trip_ptr, triples = [np.zeros(1, np.int64)], [], [np.zeros(1, np.int64)], []
    names = None
    for folder in folders:
        with np.load(os.path.join(folder, "mentions.npz"), allow_pickle=False) as z:
            seq_ptr.append(z["seq_ptr"][1:] + seq_ptr[-1][-1])
            trip_ptr.append(z["triple_ptr"][1:] + trip_ptr[-1][-1])
            mentions.append(z["mentions"])
            triples.append(z["triples"])
            names = [str(t) for t in z["tag_names"]]
    save_mentions(os.path.join(out, "mentions.npz"), np.concatenate(seq_ptr), np.concatenate(mentions),
                  np.concatenate(trip_ptr), np.concatenate(triples), names)
    merge_indexed([os.path.join(f, "tags") for f in folders], os.path.join(out, "tags"), move=move)
    merge_indexed([os.path.join(f, "tokens") for f in folders], os.path.join(out, "tokens"), move=move)
    stats = []
    for folder in folders:
        with open(os.path.join(folder, "sidestreams.json"), encoding="utf-8") as f:
            stats.append(json.load(f))
    side = sum_stats(stats)
    with open(os.path.join(out, "sidestreams.json"), "w", encoding="utf-8") as f:
        json.dump(side, f, indent=1)
    return side


def prepare_knowledge(corpus_path: str, prefix: str, kg: KnowledgeGraph, *, tokenizer_path: str,
                      workers: int = 1, max_triples: int = 16, strict_utf8: bool = False,
                      evaluate_demo: bool = False, log: Callable[[str], None] = print) -> dict:
    """Build PREFIX.knowledge/ for a corpus and a knowledge graph; returns the report."""
    start = time.perf_counter()
    final = knowledge_dir(prefix)
    with atomic_folder(final) as tmp:
        os.makedirs(tmp)
        tok = Tokenizer(tokenizer_path)
        linker, report = build_kg_files(tmp, kg, tok, log)
        side = build_sidestreams(corpus_path, tmp, kg, linker, tok, workers=workers,
                                 max_triples=max_triples, strict_utf8=strict_utf8, log=log)
        report["sidestreams"] = side
        if evaluate_demo:
            from rapidnlp.data.knowledge.demo import evaluate_places

            report["places_vs_peoples_daily_ns"] = evaluate_places(linker, kg, workers=workers)
        write_report(tmp, report, start)
    log_summary(final, report, log)
    return report


def write_report(folder: str, report: dict, start: float) -> None:
    """report.json of a knowledge folder, with the seconds since `start`."""
    report["seconds"] = round(time.perf_counter() - start, 3)
    with open(os.path.join(folder, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, ensure_ascii=False, indent=1)


def log_summary(folder: str, report: dict, log: Callable[[str], None]) -> None:
    side, kg = report["sidestreams"], report["kg"]
    log(f"knowledge: {folder}/ {side['sentences']} sentences, {side['tokens']} tokens, "
        f"{side['mentions']} mentions, {side['linked_triples']} linked triples; "
        f"KG {kg['entities']} entities, {kg['triples']} triples; {report['seconds']:.1f} s")
    if "places_vs_peoples_daily_ns" in report:
        ev = report["places_vs_peoples_daily_ns"]
        log(f"place linking vs People's Daily /ns tags: precision {ev['precision']:.3f}, "
            f"recall {ev['recall']:.3f}, F1 {ev['f1']:.3f} ({ev['correct']} of {ev['predicted']} "
            f"predicted, {ev['gold']} gold)")

"""`rapidnlp merge PREFIX_0 ... PREFIX_{n-1} --output PREFIX`: join datasets in the order given.

The parts of a `prepare --shard i/n` run merge into the bytes a single prepare of the whole corpus
writes (PREFIX.bin/.idx, PREFIX.model, PREFIX.knowledge/); any Megatron indexed datasets merge as
Megatron's merge_datasets.py joins them (documents and sequences appended in order).  Parts with
a different token dtype, tokenizer or knowledge graph are refused, one line, before anything is
written.  The outputs appear as prepare's do: the knowledge folder and the model first, the .bin,
then the .idx last.
"""
from __future__ import annotations

import os
import shutil

from rapidnlp.data.indexed import merge_indexed, open_same_dtype
from rapidnlp.data.knowledge.build import knowledge_dir, merge_knowledge, same_files, same_kg_files
from rapidnlp.errors import UserError
from rapidnlp.io import atomic_folder, atomic_path, remove_quietly


def merge(prefixes: list[str], output: str) -> dict:
    """Merge the datasets at `prefixes` into `output`; returns documents, sequences, dtype, knowledge."""
    prefixes = [os.fspath(p) for p in prefixes]
    output = os.fspath(output)
    if os.path.abspath(output) in {os.path.abspath(p) for p in prefixes}:
        raise UserError(f"merge: --output {output} is one of the inputs; write the merge to a new prefix")
    open_same_dtype(prefixes)  # every refusal comes before anything is written
    if any(os.path.isfile(p + ".model") for p in prefixes):
        same_files([p + ".model" for p in prefixes], "the parts were tokenized with different tokenizers",
                   "prepare every part with the same --tokenizer")
    folders = [knowledge_dir(p) for p in prefixes]
    has_knowledge = [os.path.isdir(f) for f in folders]
    if any(has_knowledge) and not all(has_knowledge):
        missing = folders[has_knowledge.index(False)]
        raise UserError(f"{missing}: not found, but other parts have a knowledge folder; prepare every "
                        f"part with the same --kg, or none")
    if all(has_knowledge):
        same_kg_files(folders)

    remove_quietly(output + ".idx")  # an old index never pairs with the new files
    if all(has_knowledge):
        with atomic_folder(knowledge_dir(output)) as tmp:
            side = merge_knowledge(folders, tmp)
            _merge_report(folders, tmp, side)
    if os.path.isfile(prefixes[0] + ".model"):
        with atomic_path(output + ".model") as tmp:
            shutil.copyfile(prefixes[0] + ".model", tmp)
    stats = merge_indexed(prefixes, output)
    stats["knowledge"] = all(has_knowledge)
    return stats


def _merge_report(folders: list[str], out: str, side: dict) -> None:
    """report.json of the merge: the first part's, with the side-stream counts of all parts."""
    import json

    path = os.path.join(folders[0], "report.json")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        report = json.load(f)
    report["sidestreams"] = side
    report["merged_from"] = folders
    with open(os.path.join(out, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, ensure_ascii=False, indent=1)

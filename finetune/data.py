"""Labelled and unlabelled examples from JSONL or CSV files.

Each row has `text`, optionally `text_b`, `label` (training and dev files) and `domain` (MetaKD).
A bad row (not JSON, missing or empty text, missing label, a label outside the given set) is
reported with its file and line number; nothing is dropped silently.
"""
from __future__ import annotations

import csv
import json
import os
import random
from dataclasses import dataclass

from rapidnlp.errors import UserError


@dataclass
class Example:
    text: str
    text_b: str | None = None
    label: str | None = None
    domain: str | None = None


def _rows(path: str):
    """(line number, dict) pairs of a .jsonl or .csv file."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: data file not found")
    with open(path, encoding="utf-8", newline="") as f:
        if path.endswith(".csv"):
            reader = csv.DictReader(f)
            for row in reader:
                yield reader.line_num, {k: v for k, v in row.items() if v not in (None, "")}
            return
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not a JSON object ({e.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{n}: not a JSON object")
            yield n, row


def read_examples(path: str, labels: list[str] | None = None, need_label: bool = True) -> list[Example]:
    """Examples of a file; with `labels`, a label outside them is an error naming the line."""
    out = []
    for n, row in _rows(path):
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{path}:{n}: missing or empty 'text'")
        label = row.get("label")
        if label is not None:
            label = str(label)
        if need_label and label is None:
            raise UserError(f"{path}:{n}: missing 'label'")
        if need_label and labels is not None and label not in labels:
            raise UserError(f"{path}:{n}: label '{label}' is not one of {labels} (the verbalizer's or the "
                            "training data's labels)")
        text_b = row.get("text_b")
        out.append(Example(text.strip(), text_b.strip() if isinstance(text_b, str) else None, label,
                           str(row["domain"]) if row.get("domain") is not None else None))
    if not out:
        raise UserError(f"{path}: no examples")
    return out


def label_set(examples: list[Example]) -> list[str]:
    return sorted({e.label for e in examples if e.label is not None})


def k_shot(examples: list[Example], k: int, seed: int) -> list[Example]:
    """k examples per label (all of a label with fewer), drawn with `seed`, order shuffled."""
    rng = random.Random(seed)
    out = []
    for label in label_set(examples):
        rows = [e for e in examples if e.label == label]
        out += rng.sample(rows, min(k, len(rows)))
    rng.shuffle(out)
    return out


def write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

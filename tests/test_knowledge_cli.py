"""`rapidnlp prepare` with a knowledge graph: the user's TSV files, the demo, bad options."""
import json
import os

import numpy as np
import pytest

from conftest import run_cli
from rapidnlp.data.indexed import IndexedDataset
from rapidnlp.data.knowledge.kg import KnowledgeGraph
from rapidnlp.data.knowledge.linker import EntityLinker


def test_user_kg_builds_the_knowledge_folder(tmp_path, pd_dataset):
    corpus = tmp_path / "c.txt"
    corpus.write_text("我去北京市朝阳区。上海很美！\n" * 3 + "没有实体的一句话。\n", encoding="utf-8")
    kg = tmp_path / "kg.tsv"
    kg.write_text("朝阳区\t位于\t北京市\n北京市\t位于\t中国\n上海市\t位于\t中国\nbad line\n", encoding="utf-8")
    aliases = tmp_path / "aliases.tsv"
    aliases.write_text("上海市\t上海\t沪\n北京市\t北京\n", encoding="utf-8")
    prefix = str(tmp_path / "out" / "c")
    r = run_cli("prepare", "--input", str(corpus), "--output", prefix, "--tokenizer",
                pd_dataset + ".model", "--kg", str(kg), "--kg-aliases", str(aliases), "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert "1 with a wrong field count" in r.stdout and "kg.tsv:4" in r.stdout
    folder = prefix + ".knowledge"
    report = json.load(open(os.path.join(folder, "report.json"), encoding="utf-8"))
    assert report["sidestreams"]["mentions"] == 9 and report["kg"]["skipped_lines"] == 1
    tokens = IndexedDataset(os.path.join(folder, "tokens"))
    text = IndexedDataset(prefix)
    assert tokens.num_documents == text.num_documents and len(tokens) == len(text)
    np.testing.assert_array_equal(tokens[len(tokens) - 1], text[len(text) - 1])  # no mention: same tokens
    linker = EntityLinker.load(os.path.join(folder, "linker.bin"))
    graph = KnowledgeGraph.load(os.path.join(folder, "kg.npz"))
    assert [graph.entity_names[e] for *_, e in linker.mentions("沪和北京")] == ["上海市", "北京市"]
    assert IndexedDataset(os.path.join(folder, "triples")).num_documents == 3


def test_bad_options_fail_before_any_work(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("一句话。\n", encoding="utf-8")
    prefix = str(tmp_path / "c")
    r = run_cli("prepare", "--input", str(corpus), "--output", prefix, "--knowledge")
    assert r.returncode == 2 and "give --kg" in r.stderr
    r = run_cli("prepare", "--input", str(corpus), "--output", prefix, "--kg", str(tmp_path / "no.tsv"))
    assert r.returncode == 2 and "no.tsv: triples file not found" in r.stderr
    r = run_cli("prepare", "--input", str(corpus), "--output", prefix, "--kg-types", "t.tsv", "--knowledge",
                "--demo")
    assert r.returncode == 2 and "need --kg" in r.stderr
    assert not os.path.exists(prefix + ".bin") and not os.path.exists(prefix + ".knowledge")


@pytest.mark.slow
def test_demo_build_in_minutes_with_place_precision_recall(tmp_path, pd_dataset):
    # The demo corpus with an existing tokenizer: the knowledge build itself is what is timed.
    prefix = str(tmp_path / "pd")
    r = run_cli("prepare", "--demo", "--output", prefix, "--tokenizer", pd_dataset + ".model",
                "--workers", "2", timeout=600)
    assert r.returncode == 0, r.stderr
    report = json.load(open(prefix + ".knowledge/report.json", encoding="utf-8"))
    ev = report["places_vs_peoples_daily_ns"]
    assert ev["gold"] > 25_000 and ev["precision"] > 0.6 and ev["recall"] > 0.6
    assert report["sidestreams"]["sentences"] > 45_000 and report["seconds"] < 300
    assert "place linking vs People's Daily /ns tags: precision" in r.stdout

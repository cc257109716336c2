"""Knowledge-graph ingestion: validation with line numbers, id-mapped arrays, CSR, storage."""
import numpy as np
import pytest

from rapidnlp.data.indexed import IndexedDataset
from rapidnlp.data.knowledge.kg import KnowledgeGraph, surface_forms, write_triple_dataset
from rapidnlp.data.tokenizer import Tokenizer
from rapidnlp.errors import UserError

TRIPLES = (
    "# a comment\n"
    "朝阳区\t位于\t北京市\n"          # 2
    "北京市\t位于\t中国\n"            # 3
    "\n"
    "朝阳区\t位于\n"                  # 5: two fields
    "海淀区\t位于\t北京市\textra\n"   # 6: four fields
    "  \t位于\t北京市\n"              # 7: empty subject
    "北京市\t位于\t中国\n"            # 8: duplicate of 3
).encode() + b"\xb1\xb1\xbe\xa9\t\xce\xbb\xd3\xda\t\xd6\xd0\xb9\xfa\n" + \
    "中国\t包含\t北京市\r\n".encode()    # 9: GBK, 10: CRLF


def _write(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(path)


def test_ingestion_counts_and_line_numbers(tmp_path):
    t = _write(tmp_path, "t.tsv", TRIPLES)
    a = _write(tmp_path, "a.tsv", "北京市\t北京\t京\n中国\n上海市\t上海\n")
    ty = _write(tmp_path, "ty.tsv", "北京市\tLOC\n中国\tLOC\n")
    kg = KnowledgeGraph.read_tsv(t, a, ty)
    r = kg.report
    assert (r.triples, r.wrong_fields, r.empty_field, r.not_utf8, r.duplicate) == (3, 3, 1, 1, 1)
    assert [n for _, n in r.examples["wrong_fields"]] == [5, 6, 2]  # a.tsv:2 has one field
    assert [n for _, n in r.examples["empty_field"]] == [7]
    assert [n for _, n in r.examples["not_utf8"]] == [9]
    assert [n for _, n in r.examples["duplicate"]] == [8]
    assert "t.tsv:5, t.tsv:6, a.tsv:2" in r.summary()
    assert kg.entity_names == ["朝阳区", "北京市", "中国", "上海市"]
    assert kg.predicate_names == ["位于", "包含"]
    np.testing.assert_array_equal(kg.triples, [[0, 0, 1], [1, 0, 2], [2, 1, 1]])
    assert [kg.type_names[t] for t in kg.entity_type] == ["ENT", "LOC", "LOC", "ENT"]
    # Own names first, then the alias file's names.
    assert list(zip(kg.alias_text[4:], kg.alias_entity[4:])) == [("北京", 1), ("京", 1), ("上海", 3)]
    assert kg.incident_triples(1).tolist() == [0, 1, 2]
    assert kg.incident_triples(3).tolist() == []
    assert kg.objects_of(0).tolist() == [1, 2]
    assert kg.has_triple(1, 0, 2) and not kg.has_triple(2, 0, 1)


def test_strict_mode_names_the_line(tmp_path):
    t = _write(tmp_path, "t.tsv", TRIPLES)
    with pytest.raises(UserError, match=r"t.tsv:5: 2 tab-separated fields, expected 3"):
        KnowledgeGraph.read_tsv(t, strict=True)
    t2 = _write(tmp_path, "t2.tsv", "a\tb\tc\na\tb\tc\n")
    with pytest.raises(UserError, match=r"t2.tsv:2: duplicate triple"):
        KnowledgeGraph.read_tsv(t2, strict=True)
    t3 = _write(tmp_path, "t3.tsv", b"a\tb\tc\n\xff\tb\tc\n")
    with pytest.raises(UserError, match=r"t3.tsv:2: not valid UTF-8"):
        KnowledgeGraph.read_tsv(t3, strict=True)
    with pytest.raises(UserError, match="no valid triple"):
        KnowledgeGraph.read_tsv(_write(tmp_path, "bad.tsv", "x\ty\n"))
    with pytest.raises(UserError, match="not found"):
        KnowledgeGraph.read_tsv(str(tmp_path / "missing.tsv"))


def test_save_load_round_trip_and_corrupt_file(tmp_path):
    kg = KnowledgeGraph.read_tsv(_write(tmp_path, "t.tsv", TRIPLES))
    kg.save(tmp_path / "kg.npz")
    back = KnowledgeGraph.load(tmp_path / "kg.npz")
    assert back.entity_names == kg.entity_names and back.alias_text == kg.alias_text
    np.testing.assert_array_equal(back.triples, kg.triples)
    np.testing.assert_array_equal(back.adj_ptr, kg.adj_ptr)
    np.testing.assert_array_equal(back.adj_triples, kg.adj_triples)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a RapidNLP knowledge graph"):
        KnowledgeGraph.load(tmp_path / "bad.npz")
    arrays = dict(np.load(tmp_path / "kg.npz"))
    arrays["triples"] = arrays["triples"] + 100
    np.savez(tmp_path / "ids.npz", **arrays)
    with pytest.raises(UserError, match="inconsistent"):
        KnowledgeGraph.load(tmp_path / "ids.npz")


def test_csr_adjacency_matches_brute_force():
    rng = np.random.default_rng(0)
    triples = {(f"e{rng.integers(50)}", f"p{rng.integers(4)}", f"e{rng.integers(50)}") for _ in range(400)}
    kg = KnowledgeGraph.from_records(sorted(triples))
    for e in range(kg.num_entities):
        expected = [t for t, (s, _, o) in enumerate(kg.triples.tolist()) if e in (s, o)]
        assert kg.incident_triples(e).tolist() == expected
    for p in range(len(kg.predicate_names)):
        assert kg.objects_of(p).tolist() == sorted({o for _, q, o in kg.triples.tolist() if q == p})


def test_triple_tokens_as_indexed_dataset(tmp_path, pd_dataset):
    """Entities by their surface forms (no disambiguation suffix), tokenized as a mention inside a
    sentence is: the tokens of 朝阳区 in a triple are the tokens the side-stream gives the mention."""
    from rapidnlp.data.knowledge.sidestreams import AlignedEncoder

    tok = Tokenizer(pd_dataset + ".model")
    kg = KnowledgeGraph.from_records([("朝阳区@北京市", "位于", "北京市"), ("北京市", "位于", "中国")],
                                     aliases=[("朝阳区@北京市", "朝阳区")])
    assert surface_forms(kg) == ["朝阳区", "北京市", "中国"]
    encoder = AlignedEncoder(tok)
    stats = write_triple_dataset(kg, encoder.encode_surface, str(tmp_path / "triples"), tok.vocab_size)
    ds = IndexedDataset(str(tmp_path / "triples"))
    assert ds.num_documents == 2 and len(ds) == 6 and stats["tokens"] == ds.num_tokens
    assert [tok.decode(seq) for seq in ds.document(0)] == ["朝阳区", "位于", "北京市"]
    sentence = "我们在朝阳区工作"
    (ids, spans), = encoder.encode([sentence], [np.array([[3, 6]])])
    a, b = spans[0]
    assert ids[a:b] == ds.document(0)[0].tolist()

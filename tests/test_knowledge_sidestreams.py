"""Side-streams aligned with tokens: a mention's tokens cover exactly its characters."""
import numpy as np
import pytest

from rapidnlp.data.corpus import CorpusReader
from rapidnlp.data.demo import people_daily_lines
from rapidnlp.data.indexed import IndexedDataset
from rapidnlp.data.knowledge.demo import demo_knowledge_graph
from rapidnlp.data.knowledge.linker import EntityLinker
from rapidnlp.data.knowledge.sample_index import build_sample_index
from rapidnlp.data.knowledge.sidestreams import (IGNORE_TAG, AlignedEncoder, KnowledgeSamples,
                                                 build_sidestreams)
from rapidnlp.data.mlm import MLMSampleBuilder, SpecialIds
from rapidnlp.data.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def built(tmp_path_factory, pd_dataset):
    root = tmp_path_factory.mktemp("kn")
    corpus = root / "pd.txt"
    with open(corpus, "w", encoding="utf-8") as f:
        for i, line in enumerate(people_daily_lines()):
            if i == 300:
                break
            f.write(line + "\n")
    kg = demo_knowledge_graph()
    linker = EntityLinker.build(kg.alias_text, kg.alias_entity)
    tok = Tokenizer(pd_dataset + ".model")
    out = root / "knowledge"
    stats = build_sidestreams(str(corpus), str(out), kg, linker, tok, workers=2, log=lambda *_: None)
    sentences = [s for doc in CorpusReader(str(corpus)) for s in doc]
    return kg, linker, tok, str(out), stats, sentences


def test_mention_tokens_cover_exactly_their_characters(built):
    kg, linker, tok, out, stats, sentences = built
    tokens, tags = IndexedDataset(out + "/tokens"), IndexedDataset(out + "/tags")
    z = np.load(out + "/mentions.npz")
    seq_ptr, mentions = z["seq_ptr"], z["mentions"]
    assert len(tokens) == len(sentences) == len(tags) == stats["sentences"]
    assert stats["mentions"] > 500
    unchanged = 0
    for i, text in enumerate(sentences):
        ids, tag = tokens[i].tolist(), tags[i]
        assert tok.decode(ids) == text
        m = mentions[seq_ptr[i]:seq_ptr[i + 1]]
        np.testing.assert_array_equal(m[:, 2:5], linker.link(text)[:, [0, 1, 3]].reshape(-1, 3))
        expected_tags = np.zeros(len(ids), dtype=np.uint8)
        for a, b, cs, ce, ent in m.tolist():
            assert 0 <= a < b <= len(ids)
            assert tok.decode(ids[a:b]) == text[cs:ce]
            # Exactly: one token fewer on either side no longer decodes to the mention.
            assert tok.decode(ids[a + 1:b]) != text[cs:ce] and tok.decode(ids[a:b - 1]) != text[cs:ce]
            t = int(kg.entity_type[ent])
            expected_tags[a], expected_tags[a + 1:b] = 1 + 2 * t, 2 + 2 * t
        np.testing.assert_array_equal(tag, expected_tags)
        if not len(m):
            assert ids == tok.encode(text)  # no mention: the tokens `prepare` writes
            unchanged += 1
    assert 0 < unchanged < len(sentences)


def test_encoder_without_dummy_prefix(built):
    _, _, tok, *_ = built
    enc = AlignedEncoder(tok)
    text = "北京和上海"
    ((ids, spans),) = enc.encode([text], [np.array([[0, 2], [3, 5]])])
    assert spans[0][0] == 0 or tok.id_to_piece(ids[0]) == "\u2581"
    assert [tok.decode(ids[a:b]) for a, b in spans] == ["北京", "上海"]
    assert not tok.id_to_piece(ids[spans[1][0]]).startswith("\u2581")
    assert enc.encode([text], [np.zeros((0, 2), np.int64)])[0][0] == tok.encode(text)


def test_samples_side_streams_and_negatives(built):
    kg, _, tok, out, _, _ = built
    tokens = IndexedDataset(out + "/tokens")
    index = build_sample_index(tokens.sequence_lengths, tokens.document_indices, 62, seed=1)
    ks = KnowledgeSamples(out, kg, seq_len=64, negatives=3, seed=5)
    mlm = MLMSampleBuilder(tokens, index, SpecialIds(pad=0, cls=2, sep=3, mask=4, vocab_size=tok.vocab_size),
                           seq_len=64, max_predictions=10)
    n_pos = n_corrupt = 0
    for k in range(0, len(index), 7):
        first, end = index[k]
        s = ks.sample(k, first, end)
        body = s["input_ids_body"]
        n = len(body)
        tags = s["mention_tags"]
        assert tags[0] == IGNORE_TAG and (tags[n + 1:] == IGNORE_TAG).all() and (tags[1:n + 1] >= 0).all()
        for a, b, ent in s["mention_spans"].tolist():
            assert tags[a] % 2 == 1 and (tags[a + 1:b] % 2 == 0).all() and (tags[a + 1:b] > 0).all()
            assert b <= n + 1
        ents = set(s["entities"].tolist())
        for (sub, p, obj), negs in zip(s["positive_triples"].tolist(), s["negative_triples"].tolist()):
            assert sub in ents or obj in ents
            n_pos += 1
            for ns, np_, no in negs:
                if (ns, np_) == (sub, p):
                    assert not kg.has_triple(ns, np_, no)  # a corrupted object is a false triple
                    n_corrupt += 1
                else:
                    assert kg.has_triple(ns, np_, no)  # a random real triple, not a positive
        sub = s["subgraph_triples"]
        assert len(sub) <= 64
        if len(sub) < 64:
            assert set(s["positive_ids"].tolist()) <= set(sub.tolist())
        for t in sub.tolist():
            assert kg.triples[t, 0] in ents or kg.triples[t, 2] in ents
        np.testing.assert_array_equal(body, mlm.tokens(k))  # the same body as the MLM sample
        again = ks.sample(k, first, end)
        for key in s:
            np.testing.assert_array_equal(s[key], again[key])
    assert n_pos > 20 and n_corrupt > 10
    other = KnowledgeSamples(out, kg, seq_len=64, negatives=3, seed=6)
    diffs = [not np.array_equal(ks.sample(k, *index[k])["negative_triples"],
                                other.sample(k, *index[k])["negative_triples"]) for k in range(0, len(index), 7)]
    assert any(diffs)

"""Corpus reading, the People's Daily demo corpus, and `prepare` end to end."""
import json
import os
import random

import pytest

from rapidnlp.data import prepare as prepare_mod
from rapidnlp.data.corpus import CorpusReader, iter_documents, split_sentences
from rapidnlp.data.demo import people_daily_lines, untag_line
from rapidnlp.data.indexed import IndexedDataset
from rapidnlp.data.prepare import prepare
from rapidnlp.data.tokenizer import Tokenizer
from rapidnlp.errors import UserError


# --- corpus -------------------------------------------------------------------------------

def test_split_sentences():
    assert split_sentences("今天天气好。我们去公园吧！好吗？走；Yes! No? a; Dr. Who 3.14 end.") == [
        "今天天气好。", "我们去公园吧！", "好吗？", "走；", "Yes!", "No?", "a;", "Dr.", "Who 3.14 end."]
    assert split_sentences("他说：“好。”然后走了。\n\n第二段") == ["他说：“好。”", "然后走了。", "第二段"]
    assert split_sentences("  。。  ") == ["。。"]
    assert split_sentences("   ") == []


def test_plain_text(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("第一句。第二句！\n\n   \nsecond doc. two\r\nthird\n", encoding="utf-8")
    r = CorpusReader(str(p))
    assert list(r) == [["第一句。", "第二句！"], ["second doc.", "two"], ["third"]]
    assert (r.num_documents, r.num_sentences, r.num_skipped) == (3, 5, 0)
    assert list(iter_documents(str(p)))[2] == ["third"]


def test_jsonl(tmp_path):
    p = tmp_path / "c.jsonl"
    rows = [{"text": "一。二。", "id": 1}, {"text": ""}, {"text": "段落一\n段落二"}]
    p.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n",
                 encoding="utf-8")
    assert list(CorpusReader(str(p))) == [["一。", "二。"], ["段落一", "段落二"]]
    q = tmp_path / "c.json"
    q.write_text('{"body": "x"}\n', encoding="utf-8")
    assert list(iter_documents(str(q), text_key="body")) == [["x"]]


@pytest.mark.parametrize("line, msg", [
    ('{"text": "ok"', r"c\.jsonl:2: malformed JSON"),
    ('["text"]', r"c\.jsonl:2: expected a JSON object"),
    ('{"body": "x"}', r'c\.jsonl:2: no "text" field \(fields: body\)'),
    ('{"text": 3}', r'c\.jsonl:2: field "text" is int'),
])
def test_jsonl_errors_name_file_and_line(tmp_path, line, msg):
    p = tmp_path / "c.jsonl"
    p.write_text('{"text": "fine"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=msg):
        list(CorpusReader(str(p)))


def _with_bad_lines(tmp_path):
    p = tmp_path / "mixed.txt"
    p.write_bytes("好的。\n".encode() + "坏的".encode("gbk") + b"\n" + b"ok\n"
                  + b"ab\xff\n" + "最后。\n".encode())
    return p


def test_non_utf8_lines_skipped_and_reported(tmp_path):
    r = CorpusReader(str(_with_bad_lines(tmp_path)))
    assert list(r) == [["好的。"], ["ok"], ["最后。"]]
    assert r.num_skipped == 2 and r.skipped_lines == [2, 4]
    assert "skipped 2 line(s)" in r.skipped_summary() and "line 2, 4" in r.skipped_summary()


def test_strict_utf8_raises_with_line(tmp_path):
    p = _with_bad_lines(tmp_path)
    with pytest.raises(UserError, match=r"mixed\.txt:2: not valid UTF-8 \(byte offset 0"):
        list(CorpusReader(str(p), strict_utf8=True))


def test_empty_and_missing_corpus(tmp_path):
    p = tmp_path / "empty.txt"
    p.write_text("\n  \n\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"empty\.txt: corpus is empty"):
        list(CorpusReader(str(p)))
    p.write_bytes(b"\xff\xfe\n")
    with pytest.raises(UserError, match=r"corpus is empty \(1 line\(s\) skipped"):
        list(CorpusReader(str(p)))
    with pytest.raises(UserError, match=r"nope\.txt: corpus file not found"):
        CorpusReader(str(tmp_path / "nope.txt"))


# --- demo corpus -----------------------------------------------------------------------------

def test_untag_line():
    line = "19980101-01-001-001/m  迈向/v  [中国/ns  政府/n]nt  Windows/nx  95/m  ，/w"
    assert untag_line(line) == "迈向中国政府Windows 95，"


def test_people_daily_lines():
    lines = list(people_daily_lines())
    assert len(lines) > 15000
    assert lines[0] == "迈向充满希望的新世纪——一九九八年新年讲话（附图片１张）"
    assert not any("/" in line for line in lines[:1000])
    assert any("中国" in line for line in lines[:100])


# --- prepare ---------------------------------------------------------------------------------

def _small_corpus(path, n=600):
    rng = random.Random(0)
    chars = [chr(0x4E00 + i) for i in range(200)]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            sents = ["".join(rng.choices(chars, k=rng.randint(3, 15))) + rng.choice("。！？")
                     for _ in range(rng.randint(1, 4))]
            f.write("".join(sents) + f" doc {i}.\n")
    return path


def test_prepare_end_to_end(tmp_path):
    src = _small_corpus(tmp_path / "c.txt")
    logs = []
    stats = prepare(str(src), str(tmp_path / "out" / "ds"), vocab_size=600, log=logs.append)
    prefix = tmp_path / "out" / "ds"
    assert sorted(os.listdir(tmp_path / "out")) == ["ds.bin", "ds.idx", "ds.model"]
    docs = list(CorpusReader(str(src)))
    tok = Tokenizer(str(prefix) + ".model")
    ds = IndexedDataset(str(prefix))
    assert stats["documents"] == ds.num_documents == len(docs) == 600
    assert stats["sentences"] == len(ds) == sum(len(d) for d in docs)
    assert stats["vocab_size"] == tok.vocab_size == 600
    assert stats["dtype"] == "uint16" and ds.dtype == "uint16"
    expected = [[tok.encode(s) for s in doc] for doc in docs]
    assert stats["tokens"] == ds.num_tokens == sum(len(s) for d in expected for s in d)
    for d in (0, 1, 299, 599):
        assert [seq.tolist() for seq in ds.document(d)] == expected[d]
    assert stats["skipped_lines"] == 0 and stats["seconds"] > 0
    assert "600 documents" in logs[-1]


def test_prepare_with_given_tokenizer_and_skipped_lines(tmp_path):
    src = _small_corpus(tmp_path / "c.txt", n=100)
    first = prepare(str(src), str(tmp_path / "a"), vocab_size=500, log=lambda m: None)
    with open(src, "ab") as f:
        f.write(b"\xff\xfe bad\n")
    logs = []
    stats = prepare(str(src), str(tmp_path / "b"), tokenizer_path=first["model"], log=logs.append)
    assert (tmp_path / "b.model").read_bytes() == (tmp_path / "a.model").read_bytes()
    assert stats["tokens"] == first["tokens"]
    assert stats["skipped_lines"] == 1 and stats["skipped_at"] == [f"{src}:101"]
    assert any("skipped 1 line(s)" in m for m in logs)
    with pytest.raises(UserError, match="not a sentencepiece model"):
        prepare(str(src), str(tmp_path / "bad"), tokenizer_path=str(src), log=lambda m: None)
    assert not any(n.startswith("bad.") for n in os.listdir(tmp_path))


def test_prepare_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    src = _small_corpus(tmp_path / "c.txt", n=100)

    def failing_add(self, docs):
        real_add(self, docs[:50])  # half of the documents are written, then the disk fills
        raise RuntimeError("disk full")

    real_add = prepare_mod.IndexedDatasetWriter.add_documents
    monkeypatch.setattr(prepare_mod.IndexedDatasetWriter, "add_documents", failing_add)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare(str(src), str(tmp_path / "out" / "ds"), vocab_size=500, log=lambda m: None)
    assert os.listdir(tmp_path / "out") == []


def test_prepare_bad_corpus_line_is_user_error(tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text('{"text": "好。"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(UserError, match=r"c\.jsonl:2: malformed JSON"):
        prepare(str(src), str(tmp_path / "ds"), vocab_size=500, log=lambda m: None)
    assert sorted(os.listdir(tmp_path)) == ["c.jsonl"]

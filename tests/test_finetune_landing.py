"""The landing recipe's pieces: `prepare --char-level` (one piece per character, HF tokenizer with the
same ids) and the review splits (47 shared lines dropped, no test or pool text in the unlabelled)."""
from rapidnlp.finetune import reviews


def test_char_level_tokenizer_one_piece_per_character_and_hf_ids_equal(tmp_path):
    from rapidnlp.convert.hf_tokenizer import build_fast_tokenizer
    from rapidnlp.data.prepare import prepare

    corpus = tmp_path / "c.txt"
    texts = [r["text"] for r in reviews.splits()["unlabelled"][:400]]
    corpus.write_text("\n".join(texts) + "\n", encoding="utf-8")
    stats = prepare(str(corpus), str(tmp_path / "c"), vocab_size=2000, char_level=True, log=lambda *_: None)
    from rapidnlp.data.tokenizer import Tokenizer

    sp = Tokenizer(stats["model"])
    pieces = [sp.id_to_piece(i) for i in range(5 + 256, sp.vocab_size)]
    assert pieces and all(len(p) == 1 for p in pieces)
    hf = build_fast_tokenizer(stats["model"])
    for t in texts[:100] + ["很好，hello 我们", "罕见字：龘"]:
        assert hf(t)["input_ids"] == [sp.cls_id, *sp.encode(t), sp.sep_id]
    # no '▁' prefix: a character's id does not depend on where it stands
    assert sp.encode("好")[0] == sp.encode("很好")[1]


def test_review_splits_are_disjoint_and_deduplicated():
    u = reviews.unique_reviews()
    assert len(u["positive"]) == 8379 - 47 and len(u["negative"]) == 9078 - 47
    s = reviews.splits()
    assert len(s["test"]) == 1200 and len(s["pool"]) == 2000
    held = {r["text"] for r in s["test"] + s["pool"]}
    assert not held & {r["text"] for r in s["unlabelled"]}
    assert not any(t in r["text"] for r in s["unlabelled"][:500] for t in held if len(t) >= 20)
    train, dev = reviews.few_shot(s["pool"], 16, seed=3)
    assert len(train) == len(dev) == 32 and not {r["text"] for r in train} & {r["text"] for r in dev}
    assert reviews.domain_of("这本书的作者") == "book" and reviews.domain_of("酒店房间很大") == "hotel"

"""sentencepiece tokenizer: special ids, lossless round trip, determinism, any vocab size works."""
import random

import numpy as np
import pytest

from rapidnlp.data.tokenizer import MIN_VOCAB_SIZE, Tokenizer, train_tokenizer
from rapidnlp.errors import UserError


def _corpus(n=2000, n_chars=300, seed=0):
    """Chinese characters with Zipf-like frequencies mixed with ASCII words and numbers."""
    rng = random.Random(seed)
    chars = [chr(0x4E00 + i) for i in range(n_chars)]
    weights = [1.0 / (i + 1) for i in range(n_chars)]
    words = ["hello", "world", "BERT", "model", "data", "GPU"]
    out = []
    for i in range(n):
        zh = "".join(rng.choices(chars, weights, k=rng.randint(4, 20)))
        out.append(f"{zh}，{rng.choice(words)} {rng.choice(words)} {i}。")
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    sents = _corpus()
    return train_tokenizer(sents, str(d / "t"), 1000, log=lambda m: None), sents, d


def test_specials_and_sizes(trained):
    tok, _, d = trained
    assert tok.vocab_size == 1000
    assert tok.model_path == str(d / "t.model")
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert [tok.id_to_piece(i) for i in range(5)] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert tok.id_to_piece(5) == "<0x00>" and tok.id_to_piece(260) == "<0xFF>"


def test_round_trip_and_no_accidental_specials(trained):
    tok, sents, d = trained
    loaded = Tokenizer(str(d / "t.model"))
    tricky = ["  two  spaces ", "[MASK] [CLS] [SEP] [PAD] [UNK]", "😀 丂 unseen ｆｕｌｌ（）", "\ttab"]
    for s in sents[:300] + tricky:
        ids = loaded.encode(s)
        assert ids == tok.encode(s)
        assert loaded.decode(ids) == s
        assert min(ids) >= 5, s  # text never yields a special id, not even the literal "[MASK]"
    assert loaded.encode_batch(sents[:50]) == [loaded.encode(s) for s in sents[:50]]


def test_word_start_mask(trained):
    tok, _, _ = trained
    m = tok.word_start_mask()
    assert m.dtype == np.bool_ and m.shape == (1000,)
    assert m[:5].all()
    # bytes: ASCII and UTF-8 lead bytes start a character, continuation bytes 0x80-0xBF do not
    assert m[5 + 0x41] and m[5 + 0xE4] and not m[5 + 0x80] and not m[5 + 0xBF]
    assert m[5:261].sum() == 256 - 64
    for i in range(261, 1000):
        assert m[i] == tok.id_to_piece(i).startswith("\u2581")
    ids = tok.encode("hello world")
    assert [bool(m[i]) for i in ids].count(True) == 2


def test_training_is_deterministic(tmp_path):
    sents = _corpus(n=1500, seed=1)
    a = train_tokenizer(sents, str(tmp_path / "a"), 600, log=lambda m: None)
    b = train_tokenizer(iter(sents), str(tmp_path / "b"), 600, log=lambda m: None)
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    assert a.encode(sents[0]) == b.encode(sents[0])


def test_vocab_bigger_than_corpus_supports(tmp_path):
    logs = []
    tok = train_tokenizer(_corpus(n=300, n_chars=50), str(tmp_path / "big"), 30_000,
                          log=logs.append)
    assert MIN_VOCAB_SIZE < tok.vocab_size < 30_000
    assert f"vocab size {tok.vocab_size} (asked for 30000" in logs[0]
    assert "character coverage 0.9995" in logs[0]


def test_small_vocab_lowers_coverage_then_restricts_alphabet(tmp_path):
    sents = _corpus(n=1000, n_chars=300)
    logs = []
    tok = train_tokenizer(sents, str(tmp_path / "small"), MIN_VOCAB_SIZE, log=logs.append)
    assert tok.vocab_size == MIN_VOCAB_SIZE
    assert "most frequent characters" in logs[0]
    for s in sents[:50]:
        assert tok.decode(tok.encode(s)) == s  # everything else falls back to bytes
    tok = train_tokenizer(sents, str(tmp_path / "mid"), 540, log=logs.append)
    assert tok.vocab_size == 540
    assert "character coverage 0.99," in logs[1]


def test_too_small_vocab_is_user_error(tmp_path):
    with pytest.raises(UserError, match=f"at least {MIN_VOCAB_SIZE}"):
        train_tokenizer(_corpus(n=10), str(tmp_path / "t"), MIN_VOCAB_SIZE - 1)
    assert not (tmp_path / "t.model").exists()


def test_no_text_is_user_error(tmp_path):
    with pytest.raises(UserError, match="no text"):
        train_tokenizer(["", "   "], str(tmp_path / "t"), 1000)


def test_bad_model_files(tmp_path):
    with pytest.raises(UserError, match=r"missing\.model: tokenizer model not found"):
        Tokenizer(str(tmp_path / "missing.model"))
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(UserError, match=r"junk\.model: not a sentencepiece model"):
        Tokenizer(str(tmp_path / "junk.model"))

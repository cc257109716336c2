"""The C++ Aho-Corasick linker against the slow pure-Python definition, and its bad inputs."""
import pickle
import random
import threading

import numpy as np
import pytest

from rapidnlp.data.knowledge.linker import EntityLinker, link_reference
from rapidnlp.errors import UserError

# ASCII, 2-byte, 3-byte (CJK) and 4-byte (emoji, CJK ext. B) characters.
ALPHABET = "ab" + "éß" + "北京市长江大" + "\U0001F600\U00020000"


def _random_case(rng: random.Random):
    n_alias = rng.randint(1, 12)
    aliases = {}
    for _ in range(n_alias):
        if aliases and rng.random() < 0.4:
            # Nested or overlapping with an existing alias: a prefix, a suffix or an extension.
            base = rng.choice(list(aliases))
            r = rng.random()
            alias = base[: rng.randint(1, len(base))] if r < 0.3 else \
                base[rng.randint(0, len(base) - 1):] if r < 0.6 else base + rng.choice(ALPHABET)
        else:
            alias = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 4)))
        aliases.setdefault(alias, len(aliases) + 100)
    pieces = []
    for _ in range(rng.randint(0, 10)):
        pieces.append(rng.choice(list(aliases)) if rng.random() < 0.5 else
                      "".join(rng.choice(ALPHABET + "xyz中") for _ in range(rng.randint(1, 3))))
    return aliases, "".join(pieces)


def _as_tuples(matches: np.ndarray):
    return [(int(s), int(e), int(ent)) for s, e, _, ent in matches]


def test_matches_reference_on_random_texts():
    rng = random.Random(0)
    for _ in range(400):
        aliases, text = _random_case(rng)
        linker = EntityLinker.build(list(aliases), list(aliases.values()))
        expected = link_reference(text, aliases)
        assert _as_tuples(linker.link(text)) == expected, (aliases, text)
        assert _as_tuples(linker.link(text.encode("utf-8"))) == expected
        for s, e, alias_id, _ in linker.link(text):
            assert linker.alias(alias_id) == text[s:e]


def test_batch_on_threads_equals_single_texts():
    rng = random.Random(1)
    aliases, _ = _random_case(rng)
    linker = EntityLinker.build(list(aliases), list(aliases.values()))
    texts = [_random_case(random.Random(i))[1] + "".join(aliases) for i in range(300)] + [""]
    expected = [linker.link(t) for t in texts]
    for workers in (1, 2, 3):
        offsets, matches = linker.link_batch(texts, workers=workers)
        assert offsets[0] == 0 and offsets[-1] == len(matches)
        for i, exp in enumerate(expected):
            np.testing.assert_array_equal(matches[offsets[i]:offsets[i + 1]], exp.reshape(-1, 4))


def test_python_threads_share_one_linker():
    linker = EntityLinker.build(["北京", "北京市", "长江"], [1, 2, 3])
    text = "北京市和长江" * 2000
    expected = linker.link(text)
    errors = []

    def work():
        for _ in range(5):
            if not np.array_equal(linker.link(text), expected):
                errors.append("mismatch")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(expected) == 4000


def test_boundaries_nesting_and_ambiguity():
    linker = EntityLinker.build(["北京", "北京市", "市长", "长江大桥", "江", "北京"], [1, 2, 3, 4, 5, 6])
    # Leftmost-longest: 北京市 (not 北京) at 0, then 长江大桥 at 3; 市长 overlaps and 江 is nested.
    assert linker.mentions("北京市长江大桥") == [(0, 3, "北京市", 2), (3, 7, "长江大桥", 4)]
    assert linker.mentions("市长江") == [(0, 2, "市长", 3), (2, 3, "江", 5)]
    assert linker.mentions("北京") == [(0, 2, "北京", 1)]  # the whole text, both boundaries
    assert linker.mentions("") == []
    alias_id = int(linker.link("北京")[0, 2])
    assert linker.entities(alias_id).tolist() == [1, 6]  # ambiguous: every entity, in input order
    assert linker.report.unique_aliases == 5 and linker.report.kept == 6


def test_serialisation_round_trip_and_pickle(tmp_path):
    rng = random.Random(2)
    aliases, text = _random_case(rng)
    linker = EntityLinker.build(list(aliases), list(aliases.values()))
    path = tmp_path / "linker.bin"
    linker.save(path)
    loaded = EntityLinker.load(path)
    assert loaded.to_bytes() == linker.to_bytes()
    np.testing.assert_array_equal(loaded.link(text), linker.link(text))
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(linker)).link(text), linker.link(text))


def test_corrupt_linker_files_raise_never_crash(tmp_path):
    linker = EntityLinker.build(["北京", "北京市", "ab", "b"], [1, 2, 3, 4])
    data = linker.to_bytes()
    with pytest.raises(UserError, match="bad magic"):
        EntityLinker.from_bytes(b"garbage" + data)
    for cut in (10, len(data) // 2, len(data) - 1):
        with pytest.raises(UserError, match="not a valid RapidNLP linker"):
            EntityLinker.from_bytes(data[:cut])
    rng = random.Random(3)
    for _ in range(300):
        bad = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            bad[rng.randrange(8, len(bad))] = rng.randrange(256)
        try:
            other = EntityLinker.from_bytes(bytes(bad))
        except UserError:
            continue
        other.link("北京市ab")  # accepted files are consistent: linking must not crash
    path = tmp_path / "missing.bin"
    with pytest.raises(UserError, match="not found"):
        EntityLinker.load(path)


def test_bad_aliases_are_counted_not_lost():
    aliases = ["北京", "", "x" * 65, 42, "ok\ud800", "北京", "北京", "上海"]
    entities = [1, 2, 3, 4, 5, 1, 7, 8]
    linker = EntityLinker.build(aliases, entities)
    r = linker.report
    assert (r.given, r.kept, r.empty, r.too_long, r.invalid, r.duplicates) == (8, 3, 1, 1, 2, 1)
    assert [i for i, _ in r.examples] == [1, 2, 3, 4]
    assert "1 empty" in r.summary() and "1 too long" in r.summary()
    with pytest.raises(UserError, match="alias #1"):
        EntityLinker.build(aliases, entities, strict=True)
    with pytest.raises(UserError, match="max_alias_chars"):
        EntityLinker.build(["a"], [1], max_alias_chars=300)
    with pytest.raises(ValueError, match="one id per alias"):
        EntityLinker.build(["a", "b"], [1])


def test_invalid_text_raises_with_position():
    linker = EntityLinker.build(["北京"], [1])
    with pytest.raises(ValueError, match="not valid UTF-8 at byte 6"):
        linker.link("北京".encode() + b"\xff")
    with pytest.raises(ValueError, match="text 1 is not valid UTF-8 at byte 0"):
        linker.link_batch(["北京", b"\xc3\x28", "x"], workers=2)
    # A str with a lone surrogate has no UTF-8 form, but it is still text: it never matches.
    assert linker.mentions("\udc80北京\ud800") == [(1, 3, "北京", 1)]
    with pytest.raises(TypeError, match="expected str or bytes"):
        linker.link_batch(["a", 3])
    # Overlong encodings and surrogates in bytes are invalid UTF-8, as Python says too.
    for raw in (b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe4\xba"):
        with pytest.raises(ValueError, match="not valid UTF-8"):
            linker.link(raw)


@pytest.mark.slow
def test_a_million_aliases():
    """Results only: the build time is scripts/bench_data.py's (tests assert no timings)."""
    rng = np.random.default_rng(0)
    # 10^6 random 2-6 character CJK strings.
    n = 1_000_000
    lengths = rng.integers(2, 7, size=n)
    codes = rng.integers(0x4E00, 0x4E00 + 3000, size=int(lengths.sum()), dtype=np.int32)
    blob = codes.astype("<u4").tobytes().decode("utf-32-le")
    ends = np.cumsum(lengths)
    aliases = [blob[e - k:e] for e, k in zip(ends.tolist(), lengths.tolist())]
    linker = EntityLinker.build(aliases, np.arange(n))
    assert linker.report.kept == n - linker.report.duplicates
    text = "".join(aliases[:1000])
    assert len(linker.link(text)) >= 900

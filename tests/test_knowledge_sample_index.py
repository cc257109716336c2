"""The C++ sample index against its NumPy reference and the core engine's packing."""

import numpy as np
import pytest

from rapidnlp.data.knowledge.sample_index import (build_sample_index, build_sample_index_numpy,
                                                  epoch_permutation, pack_ranges_numpy)
from rapidnlp.data.mlm import build_sample_ranges


def _random_corpus(rng, docs, max_sents=12, max_len=40):
    counts = rng.integers(0, max_sents, size=docs)
    counts[0] = max(counts[0], 1)
    di = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    lengths = rng.integers(0, max_len, size=int(di[-1])).astype(np.int32)
    return lengths, di


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_equals_numpy_reference_and_core_packing(seed):
    rng = np.random.default_rng(seed)
    lengths, di = _random_corpus(rng, 500)
    for max_tokens in (1, 17, 64, 1000):
        ranges = build_sample_ranges(lengths, di, max_tokens)
        np.testing.assert_array_equal(pack_ranges_numpy(lengths, di, max_tokens), ranges)
        plain = build_sample_index(lengths, di, max_tokens, shuffle=False)
        np.testing.assert_array_equal(plain, ranges)
        for epochs in (1, 3):
            got = build_sample_index(lengths, di, max_tokens, num_epochs=epochs, seed=seed + 7)
            ref = build_sample_index_numpy(lengths, di, max_tokens, num_epochs=epochs, seed=seed + 7)
            np.testing.assert_array_equal(got, ref)
            # Each epoch holds every sample exactly once.
            for e in range(epochs):
                part = got[e * len(ranges):(e + 1) * len(ranges)]
                np.testing.assert_array_equal(part[np.argsort(part[:, 0])], ranges)


def test_deterministic_for_a_seed_and_different_across_seeds_and_epochs():
    lengths, di = _random_corpus(np.random.default_rng(5), 2000)
    a = build_sample_index(lengths, di, 64, num_epochs=2, seed=11)
    b = build_sample_index(lengths, di, 64, num_epochs=2, seed=11)
    c = build_sample_index(lengths, di, 64, num_epochs=2, seed=12)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    half = len(a) // 2
    assert not np.array_equal(a[:half], a[half:])
    # The hash sort is a permutation and looks uniform: position of sample 0 over many seeds.
    firsts = [int(np.flatnonzero(epoch_permutation(10, s, 0) == 0)[0]) for s in range(2000)]
    counts = np.bincount(firsts, minlength=10)
    assert counts.min() > 150 and counts.max() < 250


def test_edge_cases_and_bad_input():
    # Empty dataset, a document of empty sentences, a sentence longer than max_tokens.
    assert build_sample_index(np.zeros(0, np.int32), np.array([0]), 8).shape == (0, 2)
    lengths = np.array([0, 0, 50, 3, 3], np.int32)
    di = np.array([0, 2, 5])
    np.testing.assert_array_equal(build_sample_index(lengths, di, 8, shuffle=False), [[2, 3], [3, 5]])
    np.testing.assert_array_equal(build_sample_index_numpy(lengths, di, 8, shuffle=False), [[2, 3], [3, 5]])
    with pytest.raises(ValueError, match="max_tokens"):
        build_sample_index(lengths, di, 0)
    with pytest.raises(ValueError, match="num_epochs"):
        build_sample_index(lengths, di, 8, num_epochs=0)
    with pytest.raises(ValueError, match="run from 0"):
        build_sample_index(lengths, np.array([0, 2, 9]), 8)
    with pytest.raises(ValueError, match="not decrease"):
        build_sample_index(lengths, np.array([0, 3, 2, 5]), 8)


def test_a_million_documents():
    """Results only: the build time is scripts/bench_data.py's (tests assert no timings)."""
    lengths, di = _random_corpus(np.random.default_rng(0), 1_000_000, max_sents=4)
    idx = build_sample_index(lengths, di, 64, num_epochs=2, seed=3)
    assert len(idx) > 1_000_000
    assert (idx[:, 1] > idx[:, 0]).all() and idx.min() >= 0 and idx.max() <= len(lengths)

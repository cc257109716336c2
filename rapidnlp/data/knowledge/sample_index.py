"""The shuffled sample index, built in C++ the way Megatron's helpers build theirs.

A sample is a run of consecutive sentences (dataset sequences) of one document holding at most
max_tokens tokens (a longer sentence is a sample of its own, truncated when the sample is built):
the packing of rapidnlp.data.mlm.build_sample_ranges.  The index lists every sample once per
epoch, for num_epochs epochs, each epoch in its own seeded order, as int64 rows
(first sequence, end sequence).  Row k is the k-th sample of the training stream.

The order of epoch e is the permutation that sorts the keys splitmix64(K_e ^ i) (ties by i), with
K_e = splitmix64(splitmix64(seed) ^ e): a hash sort, so that NumPy reproduces it bit for bit
(`build_sample_index_numpy`, the reference the C++ is tested against), unlike a Fisher-Yates
shuffle driven by a C++ RNG.  Nothing here depends on the rank, the layout or the thread count.
"""
from __future__ import annotations

import numpy as np

from rapidnlp.data.knowledge import _native

_U64 = np.uint64


def build_sample_index(sequence_lengths: np.ndarray, document_indices: np.ndarray, max_tokens: int,
                       *, num_epochs: int = 1, seed: int = 0, shuffle: bool = True) -> np.ndarray:
    """int64 [num_epochs * R, 2] of (first sequence, end sequence); C++, GIL released."""
    return _native.build_sample_index(np.ascontiguousarray(sequence_lengths, dtype=np.int32),
                                      np.ascontiguousarray(document_indices, dtype=np.int64),
                                      int(max_tokens), int(num_epochs), int(seed) & (2**64 - 1),
                                      bool(shuffle))


def splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 on uint64 arrays (wrapping arithmetic), as in the C++."""
    x = np.asarray(x, dtype=_U64)
    with np.errstate(over="ignore"):
        x = x + _U64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The order of one epoch (see the module docstring)."""
    seed_key = splitmix64(np.array([int(seed) & (2**64 - 1)], dtype=_U64))
    epoch_key = splitmix64(seed_key ^ _U64(epoch))[0]
    idx = np.arange(num_samples, dtype=np.int64)
    keys = splitmix64(idx.astype(_U64) ^ epoch_key)
    return np.lexsort((idx, keys))


def pack_ranges_numpy(sequence_lengths: np.ndarray, document_indices: np.ndarray,
                      max_tokens: int) -> np.ndarray:
    """The packing, vectorised over documents: one NumPy pass per sentence position."""
    lengths = np.asarray(sequence_lengths, dtype=np.int64)
    di = np.asarray(document_indices, dtype=np.int64)
    start, count = di[:-1], np.diff(di)
    by_count = np.argsort(-count, kind="stable")  # the documents still active at position k lead
    sorted_count = count[by_count]
    first = start.copy()
    tokens = np.zeros(len(start), dtype=np.int64)
    firsts, ends = [], []
    for k in range(int(count.max()) if len(count) else 0):
        active = by_count[: np.searchsorted(-sorted_count, -k, side="left")]
        s = start[active] + k
        n = lengths[s]
        cut = (s > first[active]) & (tokens[active] + n > max_tokens)
        docs = active[cut]
        firsts.append(first[docs])
        ends.append(s[cut])
        first[docs] = s[cut]
        tokens[docs] = 0
        tokens[active] += n
    last = (count > 0) & (tokens > 0)
    firsts.append(first[last])
    ends.append(di[1:][last])
    f, e = np.concatenate(firsts), np.concatenate(ends)
    order = np.argsort(f, kind="stable")  # every range starts at its own sequence
    return np.stack([f[order], e[order]], axis=1).astype(np.int64).reshape(-1, 2)


def build_sample_index_numpy(sequence_lengths: np.ndarray, document_indices: np.ndarray,
                             max_tokens: int, *, num_epochs: int = 1, seed: int = 0,
                             shuffle: bool = True) -> np.ndarray:
    """The NumPy reference of build_sample_index: same rows, same order."""
    ranges = pack_ranges_numpy(sequence_lengths, document_indices, max_tokens)
    out = []
    for e in range(num_epochs):
        perm = epoch_permutation(len(ranges), seed, e) if shuffle else np.arange(len(ranges))
        out.append(ranges[perm])
    return np.concatenate(out).reshape(-1, 2)

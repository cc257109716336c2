"""Masked-LM samples from an indexed dataset.

A sample is a run of consecutive sentences of one document, packed up to seq_len - 2 tokens,
wrapped as [CLS] ... [SEP] and padded. Masking (15%, 80% [MASK] / 10% random / 10% kept,
optionally whole words) is a pure function of (seed, sample index), or with `dynamic` of
(seed, epoch, sample index) so that each pass over the data masks other positions (RoBERTa),
never of the rank or the layout: every parallel layout sees the masked tokens of the single
process, and a resumed run those of the uninterrupted one.

The masked positions come as a fixed number per sequence (max_predictions, padded with label
-100) so that the model computes its MLM head only there and batches keep fixed shapes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = -100


def build_sample_ranges(sequence_lengths: np.ndarray, document_indices: np.ndarray, max_tokens: int) -> np.ndarray:
    """Pack consecutive sentences of each document into samples of at most max_tokens tokens.

    Returns an int64 array [num_samples, 2] of (first sequence, end sequence). A sentence longer
    than max_tokens forms a sample of its own and is truncated when the sample is built.
    """
    ranges = []
    for d in range(len(document_indices) - 1):
        start, end = int(document_indices[d]), int(document_indices[d + 1])
        first, tokens = start, 0
        for s in range(start, end):
            n = int(sequence_lengths[s])
            if s > first and tokens + n > max_tokens:
                ranges.append((first, s))
                first, tokens = s, 0
            tokens += n
        if end > first and tokens > 0:
            ranges.append((first, end))
    return np.asarray(ranges, dtype=np.int64).reshape(-1, 2)


@dataclass
class SpecialIds:
    pad: int
    cls: int
    sep: int
    mask: int
    vocab_size: int  # real (unpadded) vocabulary: random replacements are drawn below it
    first_normal: int = 5  # ids below this are specials, never drawn as random replacements


class MLMSampleBuilder:
    def __init__(
        self,
        dataset,
        ranges: np.ndarray,
        special: SpecialIds,
        *,
        seq_len: int,
        max_predictions: int,
        mask_prob: float = 0.15,
        seed: int = 0,
        word_starts: np.ndarray | None = None,
        dynamic: bool = False,
    ):
        self.dataset = dataset
        self.ranges = ranges
        self.special = special
        self.seq_len = seq_len
        self.max_predictions = max_predictions
        self.mask_prob = mask_prob
        self.seed = seed
        self.word_starts = word_starts  # bool per vocabulary id; None: mask single tokens
        self.dynamic = dynamic

    def __len__(self) -> int:
        return len(self.ranges)

    def tokens(self, index: int) -> np.ndarray:
        first, end = self.ranges[index]
        toks = np.concatenate([np.asarray(self.dataset[s], dtype=np.int64) for s in range(first, end)])
        return toks[: self.seq_len - 2]

    def build(self, index: int, epoch: int = 0) -> dict[str, np.ndarray]:
        sp = self.special
        rng = np.random.default_rng((self.seed, epoch, index) if self.dynamic else (self.seed, index))
        body = self.tokens(index)
        n = len(body)
        input_ids = np.full(self.seq_len, sp.pad, dtype=np.int64)
        input_ids[0], input_ids[1 : n + 1], input_ids[n + 1] = sp.cls, body, sp.sep

        target = min(self.max_predictions, max(1, int(round(n * self.mask_prob))))
        positions = self._choose(rng, body, target) + 1  # +1: past [CLS]
        labels = input_ids[positions].copy()
        action = rng.random(len(positions))
        random_ids = rng.integers(sp.first_normal, sp.vocab_size, size=len(positions))
        input_ids[positions] = np.where(action < 0.8, sp.mask, np.where(action < 0.9, random_ids, labels))

        mlm_positions = np.zeros(self.max_predictions, dtype=np.int64)
        mlm_labels = np.full(self.max_predictions, IGNORE_INDEX, dtype=np.int64)
        mlm_positions[: len(positions)] = positions
        mlm_labels[: len(positions)] = labels
        attention_mask = np.zeros(self.seq_len, dtype=np.int64)
        attention_mask[: n + 2] = 1
        return {
            "input_ids": input_ids,
            "token_type_ids": np.zeros(self.seq_len, dtype=np.int64),
            "attention_mask": attention_mask,
            "mlm_positions": mlm_positions,
            "mlm_labels": mlm_labels,
        }

    def _choose(self, rng: np.random.Generator, body: np.ndarray, target: int) -> np.ndarray:
        """Indices into body to mask: single tokens, or whole words up to the target count."""
        if self.word_starts is None:
            return np.sort(rng.permutation(len(body))[:target])
        starts = np.flatnonzero(self.word_starts[body])
        if len(starts) == 0 or starts[0] != 0:
            starts = np.concatenate([[0], starts])
        words = np.split(np.arange(len(body)), starts[1:])
        chosen: list[int] = []
        for w in rng.permutation(len(words)):
            # The first word may overshoot the 15% target (up to max_predictions), so that a
            # short sample of long words still gets one whole word masked.
            budget = target if chosen else self.max_predictions
            if len(chosen) + len(words[w]) > budget:
                continue
            chosen.extend(words[w])
            if len(chosen) >= target:
                break
        if not chosen:  # every word is longer than max_predictions: mask the start of one
            chosen = list(words[rng.integers(len(words))][:target])
        return np.sort(np.asarray(chosen, dtype=np.int64))

    def collate(self, indices, epochs=None) -> dict[str, torch.Tensor]:
        """The samples `indices` stacked; `epochs` (one per index; None: all 0) picks their masks
        when masking is dynamic."""
        epochs = [0] * len(indices) if epochs is None else epochs
        samples = [self.build(int(i), int(e)) for i, e in zip(indices, epochs)]
        return {k: torch.from_numpy(np.stack([s[k] for s in samples])) for k in samples[0]}

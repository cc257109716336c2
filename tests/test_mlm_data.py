"""MLM samples and the distributed sampler: masking is a function of (seed, sample index)."""
import numpy as np
import pytest

from rapidnlp.data.mlm import IGNORE_INDEX, MLMSampleBuilder, SpecialIds, build_sample_ranges
from rapidnlp.data.sampler import GlobalBatchSampler

SPECIAL = SpecialIds(pad=0, cls=2, sep=3, mask=4, vocab_size=1000)


def make_builder(seed=1, seq_len=64, max_pred=12, word_starts=None, n_docs=50):
    rng = np.random.default_rng(0)
    seqs, lengths, docs = [], [], [0]
    for _ in range(n_docs):
        for _ in range(rng.integers(1, 4)):
            s = rng.integers(5, 1000, size=rng.integers(3, 40))
            seqs.append(s)
            lengths.append(len(s))
        docs.append(len(seqs))
    ranges = build_sample_ranges(np.array(lengths), np.array(docs), seq_len - 2)
    return MLMSampleBuilder(seqs, ranges, SPECIAL, seq_len=seq_len, max_predictions=max_pred, seed=seed,
                            word_starts=word_starts), seqs, lengths, docs


def test_sample_ranges_pack_within_documents():
    lengths = np.array([10, 20, 30, 5, 70, 3])
    docs = np.array([0, 3, 6])
    ranges = build_sample_ranges(lengths, docs, 40)
    assert ranges.tolist() == [[0, 2], [2, 3], [3, 4], [4, 5], [5, 6]]


def test_sample_layout():
    builder, *_ = make_builder()
    s = builder.build(3)
    body = builder.tokens(3)
    n = len(body)
    assert s["input_ids"][0] == SPECIAL.cls and s["input_ids"][n + 1] == SPECIAL.sep
    assert (s["input_ids"][n + 2:] == SPECIAL.pad).all()
    assert s["attention_mask"].sum() == n + 2
    real = s["mlm_labels"] != IGNORE_INDEX
    pos = s["mlm_positions"][real]
    assert (pos >= 1).all() and (pos <= n).all() and len(set(pos)) == len(pos)
    assert (s["mlm_labels"][real] == body[pos - 1]).all()  # labels are the original tokens


def test_masking_is_a_function_of_seed_and_index():
    a, *_ = make_builder(seed=1)
    b, *_ = make_builder(seed=1)
    c, *_ = make_builder(seed=2)
    for i in (0, 5, 17):
        for key in ("input_ids", "mlm_positions"):
            assert (a.build(i)[key] == b.build(i)[key]).all()
    assert any((a.build(i)["mlm_positions"] != c.build(i)["mlm_positions"]).any() for i in range(5))
    # building in another order (another rank, another layout) changes nothing
    assert (a.build(7)["input_ids"] == make_builder(seed=1)[0].build(7)["input_ids"]).all()


def test_80_10_10():
    builder, *_ = make_builder(seq_len=128, max_pred=40, n_docs=800)
    masked = random = kept = 0
    for i in range(len(builder)):
        s = builder.build(i)
        real = s["mlm_labels"] != IGNORE_INDEX
        got = s["input_ids"][s["mlm_positions"][real]]
        orig = s["mlm_labels"][real]
        masked += (got == SPECIAL.mask).sum()
        kept += (got == orig).sum()
        random += ((got != SPECIAL.mask) & (got != orig)).sum()
    total = masked + random + kept
    assert total > 3000
    assert abs(masked / total - 0.8) < 0.03
    assert abs(random / total - 0.1) < 0.02  # a random draw equal to the original counts as kept
    assert abs(kept / total - 0.1) < 0.02


def test_mask_fraction_is_15_percent():
    builder, *_ = make_builder(seq_len=128, max_pred=40, n_docs=300)
    n_masked = sum((builder.build(i)["mlm_labels"] != IGNORE_INDEX).sum() for i in range(len(builder)))
    n_tokens = sum(len(builder.tokens(i)) for i in range(len(builder)))
    assert abs(n_masked / n_tokens - 0.15) < 0.01


def test_whole_word_masking_masks_whole_words():
    word_starts = np.zeros(1000, dtype=bool)
    word_starts[::3] = True  # ids divisible by 3 begin a word
    builder, *_ = make_builder(word_starts=word_starts, seq_len=128, max_pred=40)
    for i in range(20):
        s = builder.build(i)
        body = builder.tokens(i)
        starts = np.flatnonzero(word_starts[body])
        bounds = np.concatenate([[0], starts[starts > 0], [len(body)]])
        chosen = set((s["mlm_positions"][s["mlm_labels"] != IGNORE_INDEX] - 1).tolist())
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            word = set(range(lo, hi))
            assert not (word & chosen) or word <= chosen, (i, lo, hi)


def test_sampler_splits_global_batches_over_dp():
    full = GlobalBatchSampler(100, global_batch=8, micro_batch=2, dp_rank=0, dp_size=1, seed=3)
    ranks = [GlobalBatchSampler(100, global_batch=8, micro_batch=2, dp_rank=r, dp_size=2, seed=3) for r in range(2)]
    for _ in range(30):  # crosses epoch boundaries
        whole = np.concatenate(full.next_step())
        parts = [np.concatenate(r.next_step()) for r in ranks]
        assert (np.concatenate(parts) == whole).all()
    first_epoch = full.global_indices(0, 100)
    assert sorted(first_epoch.tolist()) == list(range(100))


def test_sampler_state_round_trip():
    a = GlobalBatchSampler(50, global_batch=4, micro_batch=2, dp_rank=1, dp_size=2, seed=9)
    for _ in range(7):
        a.next_step()
    b = GlobalBatchSampler(50, global_batch=4, micro_batch=2, dp_rank=1, dp_size=2, seed=9)
    b.load_state_dict(a.state_dict())
    for _ in range(20):
        assert all((x == y).all() for x, y in zip(a.next_step(), b.next_step()))
    with pytest.raises(ValueError, match="seed"):
        GlobalBatchSampler(50, global_batch=4, micro_batch=2, dp_rank=0, dp_size=1, seed=1).load_state_dict(a.state_dict())


def test_dynamic_masks_are_a_function_of_seed_epoch_and_index():
    """data.dynamic_mask: each epoch masks other positions, and the same (seed, epoch, index)
    always the same ones; static masking ignores the epoch (BERT's, the old behaviour)."""
    static, *_ = make_builder(seed=1)
    dynamic, *_ = make_builder(seed=1)
    dynamic.dynamic = True
    for i in (0, 5, 17):
        assert (static.build(i, 0)["mlm_positions"] == static.build(i, 3)["mlm_positions"]).all()
        assert (dynamic.build(i, 2)["input_ids"] == dynamic.build(i, 2)["input_ids"]).all()
        assert (dynamic.build(i, 0)["attention_mask"] == dynamic.build(i, 1)["attention_mask"]).all()
    assert sum((dynamic.build(i, 0)["mlm_positions"] != dynamic.build(i, 1)["mlm_positions"]).any()
               for i in range(20)) >= 15
    batch = dynamic.collate([3, 3], [0, 1])
    assert (batch["mlm_positions"][0] != batch["mlm_positions"][1]).any()


def test_sampler_epochs_follow_the_stream():
    s = GlobalBatchSampler(10, global_batch=4, micro_batch=2, dp_rank=1, dp_size=2, seed=0)
    # positions 8..11 of the stream: this rank's share is positions 10, 11, both of epoch 1
    assert [e.tolist() for e in s.epochs_at(8)] == [[1, 1]]
    assert [e.tolist() for e in s.epochs_at(6)] == [[0, 0]]  # positions 8, 9
    s.dp_rank = 0
    assert [e.tolist() for e in s.epochs_at(8)] == [[0, 0]]


def test_cross_document_packing_leaves_less_padding():
    """data.cross_documents: the corpus as one document (the trainer passes [0, n]); samples then
    fill up to seq_len - 2 whatever the documents."""
    lengths = np.array([10, 20, 30, 5, 70, 3])
    within = build_sample_ranges(lengths, np.array([0, 3, 6]), 40)
    across = build_sample_ranges(lengths, np.array([0, 6]), 40)
    assert across.tolist() == [[0, 2], [2, 4], [4, 5], [5, 6]]
    assert len(across) < len(within)

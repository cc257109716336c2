"""The batch prefetcher: the batches it builds ahead are the ones built on the spot, in order,
also after a jump (a resume); its wait is measured."""
import numpy as np

from rapidnlp.data.prefetch import Prefetcher
from rapidnlp.data.sampler import GlobalBatchSampler


def test_prefetched_batches_equal_direct_ones_also_after_a_jump():
    sampler = GlobalBatchSampler(100, global_batch=8, micro_batch=2, dp_rank=1, dp_size=2, seed=3)
    ahead = GlobalBatchSampler(100, global_batch=8, micro_batch=2, dp_rank=1, dp_size=2, seed=3)
    built = []

    def build(position):
        built.append(position)
        return np.concatenate(ahead.step_at(position)) * 10

    prefetch = Prefetcher(build, stride=8, depth=2)
    for position in (0, 8, 16, 96, 104):  # 96: a resume from another checkpoint
        batch, waited = prefetch.get(position)
        np.testing.assert_array_equal(batch, np.concatenate(sampler.step_at(position)) * 10)
        assert waited >= 0.0
    prefetch.close()
    assert built[:3] == [0, 8, 16] and 96 in built and built.count(96) == 1


def test_next_step_is_step_at_the_consumed_position():
    a = GlobalBatchSampler(37, global_batch=6, micro_batch=3, dp_rank=0, dp_size=2, seed=1)
    b = GlobalBatchSampler(37, global_batch=6, micro_batch=3, dp_rank=0, dp_size=2, seed=1)
    for step in range(10):  # crosses epochs
        got = a.next_step()
        want = b.step_at(6 * step)
        assert all(np.array_equal(x, y) for x, y in zip(got, want))

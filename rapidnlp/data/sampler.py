"""The distributed sampler: which sample indices each dp rank trains on at each step.

The global order is a seeded permutation per epoch over an endless stream of epochs; step k
covers stream positions [k * global_batch, (k + 1) * global_batch). A dp rank takes its
contiguous share of those, split into micro-batches. The single process walks the same
global batches, so every layout trains on the same samples. The position (consumed samples)
is the whole state: saving and restoring it gives the same next batches.
"""
from __future__ import annotations

import numpy as np


class GlobalBatchSampler:
    def __init__(self, num_samples: int, *, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int,
                 seed: int, shuffle: bool = True):
        if num_samples < 1:
            raise ValueError("GlobalBatchSampler needs at least one sample")
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.shuffle = shuffle
        self.consumed_samples = 0
        self._epoch, self._order = -1, None

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            if self.shuffle:
                self._order = np.random.default_rng((self.seed, epoch)).permutation(self.num_samples)
            else:
                self._order = np.arange(self.num_samples)
            self._epoch = epoch
        return self._order

    def global_indices(self, start: int, count: int) -> np.ndarray:
        """Sample indices at stream positions [start, start + count), crossing epochs as needed."""
        out = []
        pos = start
        while pos < start + count:
            epoch, offset = divmod(pos, self.num_samples)
            take = min(self.num_samples - offset, start + count - pos)
            out.append(self._epoch_order(epoch)[offset : offset + take])
            pos += take
        return np.concatenate(out)

    def _mine(self, batch: np.ndarray) -> list[np.ndarray]:
        """This rank's share of a global batch's values, split into micro-batches."""
        per_rank = self.global_batch // self.dp_size
        mine = batch[self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank]
        return [mine[i : i + self.micro_batch] for i in range(0, per_rank, self.micro_batch)]

    def step_at(self, position: int) -> list[np.ndarray]:
        """This rank's micro-batches of the global batch that starts at stream position `position`."""
        return self._mine(self.global_indices(position, self.global_batch))

    def epochs_at(self, position: int) -> list[np.ndarray]:
        """The epoch of each sample of `step_at(position)` (dynamic masking draws by it)."""
        return self._mine(np.arange(position, position + self.global_batch) // self.num_samples)

    def next_step(self) -> list[np.ndarray]:
        """This rank's micro-batches for the next optimizer step."""
        step = self.step_at(self.consumed_samples)
        self.consumed_samples += self.global_batch
        return step

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "seed": self.seed, "num_samples": self.num_samples}

    def load_state_dict(self, state: dict) -> None:
        if state["num_samples"] != self.num_samples or state["seed"] != self.seed:
            raise ValueError(
                f"sampler state is for {state['num_samples']} samples with seed {state['seed']}, "
                f"this run has {self.num_samples} samples with seed {self.seed}"
            )
        self.consumed_samples = int(state["consumed_samples"])

"""Batches built ahead of the step: a background thread collates the next global batches while
the current step computes (the knowledge samples' packing, masking and sub-graphs are Python
work). A bounded queue (`depth` batches ahead) keeps memory flat. Batches are keyed by the
sampler position they start at, so a resume or a jump simply drops what was built for other
positions. The consumer measures how long it waited (`data_wait_s` in metrics.jsonl).

Must not touch the device: tensors come back on the CPU; the trainer moves them.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable


class Prefetcher:
    def __init__(self, build: Callable[[int], object], stride: int, depth: int = 2):
        self.build, self.stride, self.depth = build, stride, depth
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rapidnlp-batches")
        self._ahead: dict[int, Future] = {}

    def get(self, position: int) -> tuple[object, float]:
        """The batch at sampler position `position` and the seconds spent waiting for it; schedules
        the next `depth` batches."""
        for stale in [p for p in self._ahead if not position <= p < position + (self.depth + 1) * self.stride]:
            self._ahead.pop(stale).cancel()
        for k in range(self.depth + 1):
            p = position + k * self.stride
            if p not in self._ahead:
                self._ahead[p] = self._pool.submit(self.build, p)
        started = time.perf_counter()
        batch = self._ahead.pop(position).result()
        return batch, time.perf_counter() - started

    def close(self) -> None:
        for future in self._ahead.values():
            future.cancel()
        self._ahead.clear()
        self._pool.shutdown(wait=True)

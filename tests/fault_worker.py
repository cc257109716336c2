"""A worker for the save-failure tests: each run trains with a Checkpointer whose storage fills up
(ENOSPC after a few bytes) on one rank at one step.

    python tests/fault_worker.py SPEC.json OUT.json

SPEC: tests/train_worker.py's; a run adds {"fail_save_at": step, "fail_rank": rank}. Rank 0
writes OUT: {name: {"rows", "error", "checkpoints", "latest"}}.
"""
import contextlib
import errno
import os
import warnings

import torch.distributed as dist

from rapidnlp.config import Config
from rapidnlp.distributed.mesh import ParallelDims
from rapidnlp.errors import UserError
from rapidnlp.train.checkpoint import Checkpointer, ShardFileSystem, checkpoints_root, storage_writer
from train_worker import run_layouts

warnings.filterwarnings("ignore")


class FullDisk(ShardFileSystem):
    """A file system with `room` bytes left: the write that passes it raises ENOSPC."""

    def __init__(self, room: int):
        super().__init__()
        self.room = room

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        with super().create_stream(path, mode) as stream:
            disk = self

            class Stream:
                def __getattr__(self, name):
                    return getattr(stream, name)

                def write(self, data):
                    if len(data) > disk.room:
                        stream.write(bytes(data)[: disk.room])
                        disk.room = 0
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
                    disk.room -= len(data)
                    return stream.write(data)

            yield Stream()


def failing_writer(trainer, step: int, rank: int):
    def writer(path):
        out = storage_writer(path)
        if trainer.step == step and dist.get_rank() == rank:
            out.fs = FullDisk(room=1000)
        return out
    return writer


def save_fault_run(run: dict, config: Config) -> dict:
    from rapidnlp.train.trainer import Trainer

    c = config.checkpoint
    trainer = Trainer(config, ParallelDims.from_config(config.parallel), stream=open(os.devnull, "w"))
    checkpointer = Checkpointer(config.train.run_dir, interval=c.interval, async_save=c.async_save,
                                continue_on_error=c.continue_on_error)
    checkpointer.writer = failing_writer(trainer, run["fail_save_at"], run["fail_rank"])
    error = None
    try:
        trainer.fit(checkpointer)
    except UserError as e:
        error = str(e)
    root = checkpoints_root(config.train.run_dir)
    with open(os.path.join(config.train.run_dir, "metrics.jsonl")) as f:
        steps = len(f.read().splitlines())
    latest = os.path.join(root, "latest")
    return {"steps": steps, "error": error, "checkpoints": sorted(os.listdir(root)),
            "latest": open(latest).read() if os.path.exists(latest) else None}


if __name__ == "__main__":
    run_layouts(save_fault_run)

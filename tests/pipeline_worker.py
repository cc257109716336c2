"""A worker for the pipeline-parallel tests: one launched world runs several layouts.

    python tests/pipeline_worker.py SPEC.json OUT.json

SPEC: tests/train_worker.py's. Rank 0 writes OUT: {name: {"rows": [metric rows], "seconds": wall
time}}. The loop over runs, the configs and the ending through shutdown() are
train_worker.run_layouts'.
"""
import time
import warnings

from rapidnlp.config import Config
from train_worker import run_layouts, train_run

warnings.filterwarnings("ignore")


def pipeline_run(run: dict, config: Config) -> dict:
    started = time.perf_counter()
    rows = train_run(run, config)
    return {"rows": rows, "seconds": time.perf_counter() - started}


if __name__ == "__main__":
    run_layouts(pipeline_run, timeout_s=300)

"""Checkpoint save/load time and bytes per rank (a benchmark script, not a test).

    python scripts/bench_checkpoint.py --data data/demo/pd [--nproc 2] [--config configs/base.toml]

Builds the config's model on N local ranks (dp = N, FSDP), takes one optimizer step so the
optimizer state exists, then times RapidNLP's Checkpointer: saves (DCP shards + manifest +
atomic rename) and a load back into the model. Prints one row per rank and the totals.
Asynchronous saving is not implemented yet (every save is synchronous).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from rapidnlp.config import load_config, resolve_layout
    from rapidnlp.dist.bootstrap import init_distributed, shutdown
    from rapidnlp.dist.mesh import ParallelDims
    from rapidnlp.train.checkpoint import Checkpointer
    from rapidnlp.train.trainer import Trainer

    env = init_distributed()
    overrides = ["--data.path", args.data, "--train.run_dir", args.run_dir, "--train.steps", "1",
                 "--train.global_batch", str(env.world_size), "--train.micro_batch", "1",
                 "--data.seq_len", "128", "--train.eval_interval", "0", "--train.precision", "fp32"]
    config = load_config(args.config, overrides)
    resolve_layout(config, env.world_size)
    p = config.parallel
    trainer = Trainer(config, ParallelDims.from_config(p), stream=open(os.devnull, "w"))
    trainer.train_step()
    ckpt = Checkpointer(args.run_dir, keep_last=1, tokenizer=config.data.tokenizer)
    saves = []
    for _ in range(args.repeat):
        dist.barrier()
        t0 = time.perf_counter()
        path = ckpt.save(trainer)
        saves.append(time.perf_counter() - t0)
    dist.barrier()
    t0 = time.perf_counter()
    ckpt.load(trainer, path)
    dist.barrier()
    load_s = time.perf_counter() - t0
    shard = os.path.join(path, f"__{env.rank}_0.distcp")
    row = {"rank": env.rank, "save_s": min(saves), "load_s": load_s, "bytes": os.path.getsize(shard)}
    rows = [None] * env.world_size
    dist.all_gather_object(rows, row)
    if env.rank == 0:
        print(f"config {args.config}: {config.model.num_layers} x {config.model.hidden_size}, "
              f"{env.world_size} ranks (fsdp), fp32 weights + AdamW state, torch {torch.__version__}")
        print(f"{'rank':>4} {'save s':>8} {'load s':>8} {'bytes':>14} {'MB/s save':>10}")
        for r in rows:
            print(f"{r['rank']:>4} {r['save_s']:>8.2f} {r['load_s']:>8.2f} {r['bytes']:>14,} "
                  f"{r['bytes'] / r['save_s'] / 1e6:>10.1f}")
        total = sum(r["bytes"] for r in rows)
        print(f"total {total:,} bytes; checkpoint folder {sum(f['bytes'] for f in json.load(open(os.path.join(path, 'meta.json')))['files'].values()):,} bytes; "
              f"save {max(r['save_s'] for r in rows):.2f} s, load {max(r['load_s'] for r in rows):.2f} s")
        print("async save: not implemented (synchronous only)")
    shutdown(0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/demo/pd")
    ap.add_argument("--config", default="configs/base.toml")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--run-dir", default=None)
    args = ap.parse_args()
    if "RANK" in os.environ:
        worker(args)
    from rapidnlp.dist.launch import spawn_local

    run_dir = args.run_dir or tempfile.mkdtemp(prefix="bench_ckpt_")
    argv = ["--data", args.data, "--config", args.config, "--repeat", str(args.repeat), "--run-dir", run_dir]
    return spawn_local(args.nproc, argv, script=os.path.abspath(__file__))


if __name__ == "__main__":
    sys.exit(main())

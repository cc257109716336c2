"""Checkpoint save/load time and bytes per rank (a benchmark script, not a test).

    python scripts/bench_checkpoint.py --data data/demo/pd [--nproc 2] [--config configs/base.toml]

Builds the config's model on N local ranks (dp = N, FSDP), takes one optimizer step so the
optimizer state exists, then times RapidNLP's Checkpointer: synchronous saves (DCP shards +
manifest + atomic rename), asynchronous saves (`checkpoint.async_save`: the time training is
blocked, i.e. the copy to CPU memory, and the time until the checkpoint is complete), and a load
back into the model. Prints one row per rank and the totals, best of --repeat.
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
    from rapidnlp.distributed.bootstrap import init_distributed, shutdown
    from rapidnlp.distributed.mesh import ParallelDims
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

    def timed_saves(ckpt: Checkpointer) -> tuple[float, float, str]:
        blocked, total = [], []
        for _ in range(args.repeat):
            dist.barrier()
            t0 = time.perf_counter()
            path = ckpt.save(trainer)
            blocked.append(time.perf_counter() - t0)
            ckpt.wait()
            total.append(time.perf_counter() - t0)
        return min(blocked), min(total), path

    sync_s, _, path = timed_saves(Checkpointer(args.run_dir, keep_last=1, tokenizer=config.data.tokenizer))
    async_blocked_s, async_total_s, _ = timed_saves(
        Checkpointer(args.run_dir, keep_last=1, tokenizer=config.data.tokenizer, async_save=True))
    dist.barrier()
    t0 = time.perf_counter()
    Checkpointer(args.run_dir).load(trainer, path)
    dist.barrier()
    load_s = time.perf_counter() - t0
    shard = os.path.join(path, f"__{env.rank}_0.distcp")
    row = {"rank": env.rank, "save_s": sync_s, "async_blocked_s": async_blocked_s, "async_total_s": async_total_s,
           "load_s": load_s, "bytes": os.path.getsize(shard)}
    rows = [None] * env.world_size
    dist.all_gather_object(rows, row)
    if env.rank == 0:
        print(f"config {args.config}: {config.model.num_layers} x {config.model.hidden_size}, "
              f"{env.world_size} ranks (fsdp), fp32 weights + AdamW state, torch {torch.__version__}")
        print(f"{'rank':>4} {'bytes':>14} {'sync save s':>12} {'async blocked s':>16} {'async total s':>14} "
              f"{'load s':>8} {'MB/s sync':>10}")
        for r in rows:
            print(f"{r['rank']:>4} {r['bytes']:>14,} {r['save_s']:>12.2f} {r['async_blocked_s']:>16.2f} "
                  f"{r['async_total_s']:>14.2f} {r['load_s']:>8.2f} {r['bytes'] / r['save_s'] / 1e6:>10.1f}")
        total = sum(r["bytes"] for r in rows)
        sync, blocked = max(r["save_s"] for r in rows), max(r["async_blocked_s"] for r in rows)
        print(f"total {total:,} bytes; checkpoint folder {sum(f['bytes'] for f in json.load(open(os.path.join(path, 'meta.json')))['files'].values()):,} bytes; "
              f"save {sync:.2f} s sync, async blocks training {blocked:.2f} s ({sync / blocked:.1f}x less); "
              f"load {max(r['load_s'] for r in rows):.2f} s")
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
    from rapidnlp.distributed.launch import spawn_local

    run_dir = args.run_dir or tempfile.mkdtemp(prefix="bench_ckpt_")
    argv = ["--data", args.data, "--config", args.config, "--repeat", str(args.repeat), "--run-dir", run_dir]
    return spawn_local(args.nproc, argv, script=os.path.abspath(__file__))


if __name__ == "__main__":
    sys.exit(main())

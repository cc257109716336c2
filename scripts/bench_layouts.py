"""Layouts on this machine: step time, tokens/s and per-rank memory (a benchmark, not a test).

    python scripts/bench_layouts.py --data data/demo/pd [--config configs/base.toml] [--steps 4]

Part 1 trains the config (at a CPU-sized batch: micro 1, seq 128 unless overridden) for a few
steps under each layout, 1, 2 and 4 local ranks over gloo (nccl on GPU), and prints, per layout,
the median step time, tokens/s, and rank 0's measured parameter/gradient/optimizer/activation
bytes and peak memory (CUDA max_allocated on GPU, per layout; on CPU the process's peak RSS,
which only grows over the layouts one world runs in turn, so only its first row is that layout's
own). Part 2 prints what the larger
configs need per rank at common GPU layouts, from the same accounting
(rapidnlp.train.memory.estimate_state_bytes, checked against measurement in tests/test_zero.py),
with activations extrapolated from Part 1's measured bytes per token x hidden x layer.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

LAYOUTS = {
    1: [("single", {}), ("single, AC full", {"train.activation_checkpoint": "full"}),
        ("single, AC selective", {"train.activation_checkpoint": "selective"})],
    2: [("dp2 zero0", {"parallel.zero": 0}), ("dp2 zero1", {"parallel.zero": 1}),
        ("dp2 zero2", {"parallel.zero": 2}), ("dp2 zero3", {"parallel.zero": 3}), ("tp2", {"parallel.tp": 2}),
        ("pp2 gpipe", {"parallel.pp": 2, "parallel.pp_schedule": "gpipe"}), ("pp2 1f1b", {"parallel.pp": 2})],
    4: [("tp2 x dp2 zero3", {"parallel.tp": 2, "parallel.zero": 3}), ("dp4 hsdp2", {"parallel.zero": 3, "parallel.hsdp_shard": 2}),
        ("pp2 x dp2 1f1b zero2", {"parallel.pp": 2, "parallel.zero": 2}), ("pp2 x tp2 1f1b", {"parallel.pp": 2, "parallel.tp": 2})],
}
BIG = [("300m", "tp=1,dp=8,zero=3"), ("300m", "tp=2,dp=4,zero=2"), ("1.5b", "tp=8,dp=8,zero=1"),
       ("1.5b", "tp=8,dp=8,zero=3"), ("1.5b", "tp=4,dp=16,zero=3,hsdp_shard=8")]


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from rapidnlp.config import apply, load_config, resolve_layout
    from rapidnlp.distributed.bootstrap import init_distributed, shutdown
    from rapidnlp.distributed.mesh import ParallelDims
    from rapidnlp.train.trainer import Trainer

    env = init_distributed()
    results = []
    for name, overrides in LAYOUTS[env.world_size]:
        config = load_config(args.config, ["--data.path", args.data, "--train.run_dir", args.run_dir,
                                           "--train.steps", str(args.steps), "--data.seq_len", str(args.seq_len),
                                           "--train.micro_batch", "1", "--train.global_batch", str(args.global_batch),
                                           "--train.eval_interval", "0", "--checkpoint.enabled", "false",
                                           "--train.precision", args.precision])
        for key, value in overrides.items():
            section, field = key.split(".")
            apply(config, section, field, value, "bench")
        resolve_layout(config, env.world_size)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()  # per layout (on CPU the peak RSS only grows)
        trainer = Trainer(config, ParallelDims.from_config(config.parallel), stream=open(os.devnull, "w"))
        rows = trainer.fit()[1:]  # the first step pays for start-up
        results.append({"layout": name, "ranks": env.world_size, "step_s": statistics.median(
            config.train.global_batch * config.data.seq_len / r["tokens_per_s"] for r in rows),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows), **{k: v for k, v in rows[-1].items()
                                                                                 if k.startswith(("mem_", "peak"))}})
        dist.barrier()
    if env.rank == 0:
        with open(args.out, "w") as f:
            json.dump(results, f)
    shutdown(0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/demo/pd")
    ap.add_argument("--config", default="configs/base.toml")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--global-batch", type=int, default=4)
    # bf16 matmuls on a CPU without bf16 instructions run ~66x slower than fp32 (measured on this
    # project's 2-core AMD EPYC machines: 512x768 @ 768x3072 in 7.4 s vs 0.11 s).
    ap.add_argument("--precision", default=None, help="default: fp32 on CPU, the config's on GPU")
    ap.add_argument("--run-dir", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if "RANK" in os.environ:
        worker(args)  # launched below, always with --precision
    import torch

    from rapidnlp.config import load_config
    from rapidnlp.distributed.launch import spawn_local
    from rapidnlp.train.memory import estimate_state_bytes

    if args.precision is None:
        args.precision = load_config(args.config).train.precision if torch.cuda.is_available() else "fp32"
    tmp = tempfile.mkdtemp(prefix="bench_layouts_")
    rows = []
    for nproc in LAYOUTS:
        out = os.path.join(tmp, f"{nproc}.json")
        argv = ["--data", args.data, "--config", args.config, "--steps", str(args.steps), "--seq-len", str(args.seq_len),
                "--global-batch", str(args.global_batch), "--run-dir", os.path.join(tmp, "run"), "--out", out,
                "--precision", args.precision]
        if spawn_local(nproc, argv, script=os.path.abspath(__file__)) != 0:
            print(f"the {nproc}-rank layouts failed", file=sys.stderr)
            return 1
        rows += json.load(open(out))

    mib = 2**20
    print(f"Part 1: {args.config}, global batch {args.global_batch} x seq {args.seq_len}, {args.precision}, "
          "rank 0's memory in MiB")
    print(f"{'layout':<22}{'ranks':>6}{'step s':>9}{'tok/s':>9}{'params':>9}{'grads':>9}{'optim':>9}{'activ.':>9}{'peak':>9}")
    for r in rows:
        print(f"{r['layout']:<22}{r['ranks']:>6}{r['step_s']:>9.2f}{r['tokens_per_s']:>9.0f}"
              + "".join(f"{r[k] / mib:>9.1f}" for k in ("mem_params_bytes", "mem_grads_bytes", "mem_optimizer_bytes",
                                                       "mem_activation_bytes", "peak_mem_bytes")))
    base = load_config(args.config).model
    single = rows[0]
    per_unit = single["mem_activation_bytes"] / (args.seq_len * base.hidden_size * base.num_layers)
    print(f"\nPart 2: per-rank GiB for the large configs (fp32 master weights + AdamW; activations for one "
          f"sequence of 512 tokens, bf16 = half of the {per_unit:.1f} fp32 bytes per token x hidden x layer measured "
          "above, divided by tp under sequence parallelism)")
    print(f"{'config':<8}{'layout':<32}{'params':>8}{'grads':>8}{'optim':>8}{'activ.':>8}{'total':>8}")
    for name, layout in BIG:
        m = load_config(f"configs/{name}.toml").model
        m.vocab_size = 30522
        kv = {k: int(v) for k, v in (item.split("=") for item in layout.split(","))}
        est = estimate_state_bytes(m, **kv)
        act = per_unit / 2 * 512 * m.hidden_size * m.num_layers / kv["tp"]
        vals = [est["mem_params_bytes"], est["mem_grads_bytes"], est["mem_optimizer_bytes"], act]
        print(f"{name:<8}{layout:<32}" + "".join(f"{v / 2**30:>8.2f}" for v in vals) + f"{sum(vals) / 2**30:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

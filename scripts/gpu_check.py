#!/usr/bin/env python
"""The GPU check's stages (scripts/gpu_check.sh runs this with the project on PYTHONPATH).

Each stage runs in a subprocess under its own time limit, so that one that fails or hangs costs
only its own minutes and the others still report; every stage writes a markdown table to the
output folder, and summary.md says which stages passed, in how many seconds.

  env          versions (python, torch, CUDA, triton, transformers), the device, what imports
  kernels      scripts/bench_kernels.py: GB/s, % of HBM peak, x eager, x compile per fused kernel
  train        the Trainer on the GPU (nccl, bf16 autocast, fused kernels, train.compile = true vs
               false) on synthetic MLM samples: loss falls, compiled equals eager to bf16's
               tolerance, evaluation does not recompile
  throughput   scripts/bench_throughput.py: `300m` at seq 512, bf16, eager vs compiled (and
               transformers'), MFU against the datasheet peak and the GEMM rate measured then

--dry-run runs the same stages on the CPU at toy sizes (no compile, which takes minutes there),
so that a CPU test keeps the script from rotting.

    python scripts/gpu_check.py --out DIR [--dry-run]          # all stages
    python scripts/gpu_check.py --out DIR --stage train         # one stage, in this process
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# Seconds per stage on the GPU: together under the 8 minutes a lent machine's session can spare
# (gpu_check.sh's own set-up takes well under a minute).
LIMITS = {"env": 30, "kernels": 140, "train": 120, "throughput": 160}
STAGES = tuple(LIMITS)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the tables (created)")
    p.add_argument("--dry-run", action="store_true", help="CPU, toy sizes: the tables' form, not their numbers")
    p.add_argument("--stage", choices=STAGES, help="run one stage in this process (the driver runs each so)")
    return p.parse_args(argv)


def write(out: str, name: str, lines: list[str]) -> None:
    with open(os.path.join(out, name), "w") as f:
        f.write("\n".join(lines) + "\n")


# -- stages ----------------------------------------------------------------------------------------

def stage_env(args) -> bool:
    import platform

    import torch

    rows = [("python", platform.python_version()), ("torch", torch.__version__),
            ("cuda (torch built with)", str(torch.version.cuda))]
    for module in ("triton", "transformers", "numpy", "sentencepiece", "safetensors"):
        try:
            rows.append((module, __import__(module).__version__))
        except ImportError:
            rows.append((module, "not installed"))
    ok = True
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        rows += [("device", f"{props.name}, {props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}, "
                            f"{props.multi_processor_count} SMs"),
                 ("nccl", ".".join(map(str, torch.cuda.nccl.version())))]
    else:
        rows.append(("device", "no CUDA device" + (" (dry run: CPU)" if args.dry_run else "")))
        ok = args.dry_run
    for module in ("rapidnlp.kernels", "rapidnlp.model.bert", "rapidnlp.parallel", "rapidnlp.train.trainer",
                   "rapidnlp.convert.hf", "rapidnlp.data.knowledge.sample_index"):
        try:
            __import__(module)
            rows.append((f"import {module}", "ok"))
        except Exception as e:  # a row of the table, not a crash: the other stages still run
            rows.append((f"import {module}", f"FAIL: {type(e).__name__}: {e}".splitlines()[0]))
            ok = ok and module.endswith("sample_index")  # the knowledge C++ extension is optional here
    from rapidnlp import kernels

    rows.append(("Triton kernels", "available" if kernels.HAVE_TRITON else "triton missing: reference paths"))
    write(args.out, "env.md", ["| what | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])
    print("\n".join(f"{k}: {v}" for k, v in rows))
    return ok


def stage_kernels(args) -> bool:
    """bench_kernels.py's table, each row written to kernels.md as it comes (a stage stopped by its
    time limit keeps the rows it finished)."""
    shape = ["--tokens", "512", "--hidden", "64"] if args.dry_run else ["--tokens", "65536", "--hidden", "1024"]
    cmd = [sys.executable, os.path.join(HERE, "bench_kernels.py"), *shape, "--dtype", "bf16"]
    rows = 0
    with open(os.path.join(args.out, "kernels.md"), "w") as table:
        table.write("# Fused kernels, forward + backward, bf16\n\n")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        for line in proc.stdout:
            print(line, end="", flush=True)
            table.write(line if line.startswith("|") else f"{line.rstrip()}\n\n" if line.strip() else "")
            table.flush()
            rows += line.startswith("|")
    return proc.wait() == 0 and rows > 2


def train_config(args, compiled: bool):
    from rapidnlp.config import Config, resolve_layout

    config = Config()
    m, t = config.model, config.train
    if args.dry_run:
        m.num_layers, m.hidden_size, m.num_heads, m.ffn_size = 2, 64, 2, 128
        t.steps, t.eval_interval, t.global_batch, t.micro_batch = 4, 2, 4, 2
        config.data.seq_len = 64
    else:
        m.num_layers, m.hidden_size, m.num_heads, m.ffn_size = 4, 512, 8, 2048
        t.steps, t.eval_interval, t.global_batch, t.micro_batch = 30, 10, 32, 16
        config.data.seq_len = 256
        m.fused_kernels, m.dropout = True, 0.1  # the fused dropout-add draws its seeds outside the graphs
    m.vocab_size, m.max_position_embeddings = 8000, config.data.seq_len
    t.precision = "fp32" if args.dry_run else "bf16"
    # The dry run trains eagerly twice: compiling takes minutes on a CPU.
    t.compile = "true" if compiled and not args.dry_run else "false"
    t.lr, t.warmup_steps, t.eval_batches, t.log_interval = 1e-3, 3, 1, 10
    t.run_dir = os.path.join(args.out, "train_run_" + ("compiled" if compiled else "eager"))
    config.checkpoint.enabled = False
    resolve_layout(config, 1)
    return config


def stage_train(args) -> bool:
    """Eager then compiled: the same seed, data and steps; the first through bootstrap (nccl)."""
    import numpy as np
    import torch

    from bench_throughput import synthetic_samples
    from rapidnlp.config import max_predictions
    from rapidnlp.distributed.bootstrap import init_distributed, shutdown
    from rapidnlp.distributed.mesh import ParallelDims
    from rapidnlp.train.trainer import Data, Trainer

    init_distributed(timeout_s=60)
    import torch.distributed as dist

    rows, lines, ok = {}, [], True
    try:
        for compiled in (False, True):
            config = train_config(args, compiled)
            c, predictions = config.data, max_predictions(config)
            samples = synthetic_samples(c.seq_len, 4000, config.model.vocab_size, predictions, seed=0)
            n_val = len(samples.ranges) // 20

            def split(ranges):
                return type(samples)(samples.dataset, ranges, samples.special, seq_len=c.seq_len,
                                     max_predictions=predictions, seed=0)

            data = Data(train=split(samples.ranges[:-n_val]), val=split(samples.ranges[-n_val:]), special=samples.special)
            dims = ParallelDims.from_config(config.parallel)
            rows[compiled] = Trainer(config, dims, data=data).fit()
        eager, comp = rows[False], rows[True]
        loss_e, loss_c = np.array([r["loss"] for r in eager]), np.array([r["loss"] for r in comp])
        graphs = [r.get("compiled_graphs", 0) for r in comp]
        first_eval = next(i for i, r in enumerate(comp) if "val_loss" in r)
        checks = {
            f"backend {dist.get_backend()}": dist.get_backend() == ("gloo" if args.dry_run else "nccl"),
            "loss falls (eager: the last 3 steps' mean below the first 3's)":
                loss_e[-3:].mean() < loss_e[:3].mean() - (0.0 if args.dry_run else 0.5),
            f"compiled vs eager loss: max rel diff {np.max(np.abs(loss_c - loss_e) / loss_e):.1e} "
            "(bf16 tolerance 2e-2)": np.allclose(loss_c, loss_e, rtol=2e-2),
            f"no recompiles after the first evaluation: graphs per step {graphs}":
                graphs[first_eval:] == [graphs[first_eval]] * (len(graphs) - first_eval),
        }
        if args.dry_run:  # the dry run trains eagerly: its table's form only
            checks = {k: v for k, v in checks.items() if not k.startswith(("compiled", "no recompiles"))}
        m, t = config.model, config.train
        lines += [f"# Trainer on {dims.device}: {m.num_layers} x {m.hidden_size}, seq {config.data.seq_len}, "
                  f"batch {t.global_batch}, {t.precision}, fused_kernels {m.fused_kernels}, {t.steps} steps, "
                  f"torch {torch.__version__}", "",
                  "| step | loss eager | loss compiled | tokens/s eager | tokens/s compiled | compile s | graphs |",
                  "|---|---|---|---|---|---|---|"]
        for e, k in zip(eager, comp):
            lines.append(f"| {e['step']} | {e['loss']:.4f} | {k['loss']:.4f} | {e['tokens_per_s']:,.0f} | "
                         f"{k['tokens_per_s']:,.0f} | {k.get('compile_s', 0):.1f} | {k.get('compiled_graphs', '-')} |")
        lines += ["", *(f"- {k}: {'ok' if v else 'FAIL'}" for k, v in checks.items())]
        ok = all(checks.values())
    except Exception as e:
        import traceback

        traceback.print_exc()
        lines.append(f"FAIL: {type(e).__name__}: {e}".splitlines()[0])
        ok = False
    write(args.out, "train.md", lines)
    print("\n".join(lines), flush=True)
    shutdown(0 if ok else 1)  # never returns: ends the process (ARCHITECTURE.md, gloo's exit abort)


def stage_throughput(args) -> bool:
    import bench_throughput

    if args.dry_run:
        bench = ["--layers", "2", "--hidden", "32", "--heads", "2", "--ffn", "64", "--seq-len", "32", "--batch", "2",
                 "--vocab", "300", "--steps", "2", "--warmup", "1", "--impls", "ours", "hf", "--precision", "fp32",
                 "--device", "cpu"]
    else:
        bench = ["--config", os.path.join(ROOT, "configs", "300m.toml"), "--seq-len", "512", "--batch", "16",
                 "--vocab", "30522", "--steps", "10", "--warmup", "3", "--precision", "bf16", "--device", "cuda"]
    return bench_throughput.main([*bench, "--out", os.path.join(args.out, "throughput_300m.md")]) == 0


# -- driver ----------------------------------------------------------------------------------------

def run_stage(args, stage: str) -> tuple[str, float]:
    cmd = [sys.executable, os.path.abspath(__file__), "--out", args.out, "--stage", stage]
    cmd += ["--dry-run"] if args.dry_run else []
    # Not under any launcher: the train stage's bootstrap takes the single-process path.
    env = {k: v for k, v in os.environ.items() if k not in (
        "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
        "OMPI_COMM_WORLD_RANK", "PMI_RANK")}
    started = time.perf_counter()
    print(f"== {stage} (limit {LIMITS[stage]} s)", flush=True)
    # A session of its own, so that a stage over its limit is stopped with its children (the
    # kernel benchmark runs in one) and frees the GPU for the next.
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        code = proc.wait(timeout=LIMITS[stage])
        status = "ok" if code == 0 else f"FAIL (exit {code})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        status = f"TIMEOUT after {LIMITS[stage]} s"
    return status, time.perf_counter() - started


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.stage:
        return 0 if globals()[f"stage_{args.stage}"](args) else 1
    results = {stage: run_stage(args, stage) for stage in STAGES}
    lines = ["| stage | status | seconds | table |", "|---|---|---|---|"]
    tables = {"env": "env.md", "kernels": "kernels.md", "train": "train.md", "throughput": "throughput_300m.md"}
    for stage, (status, seconds) in results.items():
        lines.append(f"| {stage} | {status} | {seconds:.0f} | {tables[stage]} |")
    write(args.out, "summary.md", [f"# gpu_check{' (dry run, CPU)' if args.dry_run else ''}", "", *lines])
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({stage: {"status": s, "seconds": round(t, 1)} for stage, (s, t) in results.items()}, f, indent=1)
    print("\n".join(lines))
    return 0 if all(s == "ok" for s, _ in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

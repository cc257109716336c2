#!/usr/bin/env python
"""Training throughput of RapidNLP's BertForMLM, eager and compiled, against transformers'
MegatronBertForMaskedLM, eager and compiled, and against the GEMM rate of the model's shapes
measured in the same run.

Single process, same shape, same weights (rapidnlp.convert.hf), same MLM batches, same AdamW.
Four implementations, timed step by step in turn (the order rotating every step) so that load
from other processes falls on all alike; warm-up steps (compilation among them) are not timed:

  ours         BertForMLM as `rapidnlp pretrain` runs it (train.compile = false)
  ours+compile each block torch.compile'd, as train.compile = true does (rapidnlp.parallel.compile)
  hf           transformers' MegatronBertForMaskedLM (its default attention implementation)
  hf+compile   the same with each of its encoder layers torch.compile'd

Two measurements:

  whole    forward + backward + AdamW step. RapidNLP runs its MLM head at the masked
           positions only, transformers at every position: that is the design, and counted.
  encoder  forward + backward of the encoder alone (our `encode`, HF's `model.bert`), with a
           dummy loss (mean square of the last hidden state) on both.

Model FLOPs (rapidnlp/model/flops.py; the same count for all four) per second are compared with
the GEMM peak: the FLOP rate of the model's own Linear GEMMs (forward and both backward products
of each, at this batch's token count) run back to back on the same device, in the same precision,
with the same threads, timed in turn with the implementations (one round per step). On CUDA also
against the device's datasheet peak (MFU).

Precisions: fp32, and bf16 (autocast over fp32 weights, as train.precision = bf16) where bf16 is
fast: on a CPU only when a short probe finds bf16 GEMMs faster than fp32 ones (with AMX or
AVX512-BF16; without them they run tens of times slower).

tokens/s counts every position of every sequence (padding included), as metrics.jsonl does.
The shape is configs/base.toml's unless overridden; a 2-core CPU needs smaller ones, e.g.

    python scripts/bench_throughput.py --layers 4 --seq-len 128 --batch 8 --steps 20 --warmup 3 --threads 1
    python scripts/bench_throughput.py --config configs/300m.toml --seq-len 512 --batch 16 --precision bf16  # a GPU
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from rapidnlp.config import load_config
from rapidnlp.convert.hf import load_into_hf
from rapidnlp.data.mlm import IGNORE_INDEX, MLMSampleBuilder, SpecialIds, build_sample_ranges
from rapidnlp.model.bert import BertForMLM, mlm_piece
from rapidnlp.model.flops import encoder_flops_per_sequence, training_flops_per_sequence
from rapidnlp.optim import param_groups
from rapidnlp.parallel.compile import apply_compile
from rapidnlp.pretrain.mlm import mlm_loss_sum
from rapidnlp.train.flops import cpu_low_precision_speedup, peak_flops

IMPLS = ("ours", "ours+compile", "hf", "hf+compile")
GEMM = "gemm"  # the GEMM peak's turn in the rotation
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# The targets: ours >= 1.05x transformers eager, and >= 85% of the GEMM peak in model FLOPs.
TARGET_VS_HF, TARGET_OF_GEMM = 1.05, 0.85


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "base.toml"))
    p.add_argument("--layers", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--ffn", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--batch", type=int, help="sequences per step (default: the config's micro_batch)")
    p.add_argument("--vocab", type=int, default=5000, help="real vocabulary (padded to a multiple of 128)")
    p.add_argument("--dropout", type=float, help="hidden and attention dropout (default: the config's)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per implementation and measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before them (compilation happens here)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--only", choices=("whole", "encoder"), help="run one measurement only")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS), help="implementations to time")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: fp32, plus bf16 where bf16 GEMMs are fast (CUDA: bf16 only)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--out", help="also write the tables (markdown) to this file")
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args(argv)


def synthetic_samples(seq_len: int, samples: int, vocab: int, max_pred: int, seed: int) -> MLMSampleBuilder:
    """Real MLM samples (masking, packing, padding as in training) over synthetic documents:
    sentences of 8..40 tokens drawn from a Zipf law (as words are, so that a model learns
    something: the loss falls), 1..11 sentences per document, packed to seq_len."""
    rng = np.random.default_rng(seed)
    sentences, doc_index = [], [0]
    while len(sentences) < samples * (seq_len // 16 + 1):
        for _ in range(rng.integers(1, 12)):
            sentences.append(5 + (rng.zipf(1.2, size=int(rng.integers(8, 41))) - 1) % (vocab - 5))
        doc_index.append(len(sentences))
    ranges = build_sample_ranges(np.array([len(s) for s in sentences]), np.array(doc_index), seq_len - 2)
    special = SpecialIds(pad=0, cls=2, sep=3, mask=4, vocab_size=vocab)
    return MLMSampleBuilder(sentences, ranges, special, seq_len=seq_len, max_predictions=max_pred, seed=seed)


def make_batches(seq_len: int, batch: int, count: int, vocab: int, max_pred: int, seed: int) -> list[dict]:
    builder = synthetic_samples(seq_len, count * batch, vocab, max_pred, seed)
    return [builder.collate(range(i * batch, (i + 1) * batch)) for i in range(count)]


def hf_labels(b: dict) -> torch.Tensor:
    labels = torch.full_like(b["input_ids"], IGNORE_INDEX)
    rows, slots = torch.nonzero(b["mlm_labels"] != IGNORE_INDEX, as_tuple=True)
    labels[rows, b["mlm_positions"][rows, slots]] = b["mlm_labels"][rows, slots]
    return labels


def whole_ours(model, opt):
    def step(b):
        logits = model.mlm_logits(b["input_ids"], b["token_type_ids"], b["attention_mask"], b["mlm_positions"])
        loss = mlm_loss_sum(logits, b["mlm_labels"]) / (b["mlm_labels"] != IGNORE_INDEX).sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def whole_hf(hf, opt):
    def step(b):
        hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"],
           labels=b["hf_labels"]).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def encoder_ours(model):
    def step(b):
        model.encode(b["input_ids"], b["token_type_ids"], b["attention_mask"]).float().pow(2).mean().backward()
        model.zero_grad(set_to_none=True)
    return step


def encoder_hf(hf):
    def step(b):
        out = hf.bert(input_ids=b["input_ids"], attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"])
        out.last_hidden_state.float().pow(2).mean().backward()
        hf.zero_grad(set_to_none=True)
    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fns: dict, batches: list[dict], warmup: int, steps: int, device: torch.device, autocast) -> dict:
    """Per-step wall seconds of each implementation, taking turns; the order rotates every step.
    Also the seconds of each one's first step (compilation included)."""
    names = list(fns)
    times = {name: [] for name in names}
    first = {}
    for i in range(warmup + steps):
        b = batches[i % len(batches)]
        for name in names[i % len(names):] + names[: i % len(names)]:
            sync(device)
            start = time.perf_counter()
            with autocast():
                fns[name](b)
            sync(device)
            if i == 0:
                first[name] = time.perf_counter() - start
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {"median": {k: statistics.median(v) for k, v in times.items()}, "first": first}


def linear_gemms(m, tokens: int) -> list[tuple[int, int, int]]:
    """The (m, k, n) GEMMs of one block's Linears in training: y = x W^T, dx = dy W, dW = dy^T x."""
    out = []
    for fan_in, fan_out in ((m.hidden_size, 3 * m.hidden_size), (m.hidden_size, m.hidden_size),
                            (m.hidden_size, m.ffn_size), (m.ffn_size, m.hidden_size)):
        out += [(tokens, fan_in, fan_out), (tokens, fan_out, fan_in), (fan_out, tokens, fan_in)]
    return out


def precisions(args, device: torch.device) -> tuple[list[str], str]:
    """The precisions to run, and a line saying why."""
    if args.precision != "auto":
        return [args.precision], f"precision: {args.precision} (as asked)"
    if device.type == "cuda":
        return ["bf16"], "precision: bf16 (the GPU's tensor cores; fp32 rows are not the target there)"
    speedup = cpu_low_precision_speedup(torch.bfloat16)
    if speedup >= 1.0:
        return ["fp32", "bf16"], f"precision: fp32 and bf16 (a bf16 GEMM probe ran {speedup:.1f}x fp32's rate here)"
    return ["fp32"], (f"precision: fp32 only (bf16 GEMMs ran at {speedup:.3f}x fp32's rate on this CPU: no bf16 "
                      "units; bf16 rows would measure the emulation)")


class Table:
    """Lines printed as they come and, given a path (--out), written there as they come too (a
    run stopped early keeps its finished rows)."""

    def __init__(self, path: str | None = None):
        self.file = None
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.file = open(path, "w")

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        if self.file:
            self.file.write(line + "\n")
            self.file.flush()


def run_precision(name: str, args, m, models, batches, device, seq_len, batch, max_pred, config, out: Table) -> dict:
    dtype = DTYPES[name]
    tokens = batch * seq_len
    shapes = linear_gemms(m, tokens)
    operands = [(torch.randn(i, k, device=device).to(dtype), torch.randn(k, j, device=device).to(dtype))
                for i, k, j in shapes]
    gemm_flops = sum(2.0 * i * k * j for i, k, j in shapes)
    datasheet = peak_flops(device) if device.type == "cuda" else None
    flops = {"whole": batch * training_flops_per_sequence(m, seq_len, [mlm_piece(m, max_pred)]),
             "encoder": batch * encoder_flops_per_sequence(m, seq_len)}

    def autocast():
        if name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    def opt(module):
        groups = param_groups(module, config.train.weight_decay)
        return torch.optim.AdamW(groups, lr=1e-4, betas=(config.train.beta1, config.train.beta2), eps=config.train.eps)

    builders = {
        "whole": lambda impl, mod: (whole_ours if impl.startswith("ours") else whole_hf)(mod, opt(mod)),
        "encoder": lambda impl, mod: (encoder_ours if impl.startswith("ours") else encoder_hf)(mod),
    }
    out()
    sheet = f"; datasheet peak {datasheet / 1e12:.0f} TFLOP/s" if datasheet else ""
    out(f"### {name}{sheet}")
    out()
    header = "| measurement | implementation | tokens/s | ms/step | model GFLOP/s | % of GEMM peak |"
    header += " MFU (datasheet) |" if datasheet else ""
    header += " x hf eager | first step s |"
    out(header)
    out("|" + "---|" * (header.count("|") - 1))
    results = {}
    for what in (args.only,) if args.only else ("whole", "encoder"):
        fns = {impl: builders[what](impl, models[impl]) for impl in args.impls}
        # The GEMM peak takes its turn with the implementations, so that load from other
        # processes falls on it alike: one round of the model's Linear GEMMs per step.
        fns[GEMM] = lambda b: [x @ w for x, w in operands]
        timed = measure(fns, batches, args.warmup, args.steps, device, autocast)
        gemm = gemm_flops / timed["median"].pop(GEMM)
        out(f"| {what} | GEMM peak: {len(shapes)} Linear GEMMs of a block at {tokens} tokens | | | "
            f"{gemm / 1e9:,.1f} | 100% |" + (f" {100 * gemm / datasheet:.1f}% |" if datasheet else "") + " | |")
        for impl in args.impls:
            sec = timed["median"][impl]
            rate = flops[what] / sec
            vs_hf = timed["median"]["hf"] / sec if "hf" in timed["median"] else None
            results[(what, impl)] = {"tokens_per_s": tokens / sec, "of_gemm": rate / gemm, "vs_hf": vs_hf,
                                     "mfu": rate / datasheet if datasheet else None}
            row = (f"| {what} | {impl} | {tokens / sec:,.0f} | {sec * 1e3:,.1f} | {rate / 1e9:,.1f} "
                   f"| {100 * rate / gemm:.0f}% |")
            row += f" {100 * rate / datasheet:.1f}% |" if datasheet else ""
            row += f" {vs_hf:.3f}x |" if vs_hf else " n/a |"
            row += f" {timed['first'][impl]:.1f} |"
            out(row)
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          args.device if args.device != "auto" else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_throughput: --device cuda, but torch sees no CUDA device")
    torch.set_num_threads(args.threads)
    config = load_config(args.config)
    m = config.model
    for field, value in (("num_layers", args.layers), ("hidden_size", args.hidden), ("num_heads", args.heads),
                         ("ffn_size", args.ffn)):
        if value is not None:
            setattr(m, field, value)
    if args.dropout is not None:
        m.dropout = m.attention_dropout = args.dropout
    m.vocab_size = args.vocab
    seq_len = args.seq_len or config.data.seq_len
    batch = args.batch or config.train.micro_batch
    max_pred = math.ceil(config.data.mask_prob * seq_len) + 2
    m.max_position_embeddings = max(m.max_position_embeddings, seq_len)
    if m.hidden_size % m.num_heads:
        sys.exit(f"--hidden ({m.hidden_size}) is not divisible by --heads ({m.num_heads})")

    torch.manual_seed(args.seed)
    ours = BertForMLM(m).train()
    models = {"ours": ours, "ours+compile": copy.deepcopy(ours), "hf": load_into_hf(ours).train(),
              "hf+compile": load_into_hf(ours).train()}
    models = {k: v.to(device) for k, v in models.items() if k in args.impls}
    if "ours+compile" in models:
        apply_compile(models["ours+compile"])
    if "hf+compile" in models:
        for layer in models["hf+compile"].bert.encoder.layer:
            layer.compile(dynamic=False)
    n_params = sum(p.numel() for p in ours.parameters())
    batches = make_batches(seq_len, batch, 8, args.vocab, max_pred, args.seed)
    for b in batches:
        b["hf_labels"] = hf_labels(b)
    pad_share = float(sum((b["attention_mask"] == 0).float().mean() for b in batches) / len(batches))
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    chosen, why = precisions(args, device)

    out = Table(args.out)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    out(f"## bench_throughput: {where}; torch {torch.__version__}")
    out()
    out(f"- config: {os.path.normpath(args.config)} with overrides; single process")
    out(f"- shape: layers={m.num_layers} hidden={m.hidden_size} heads={m.num_heads} ffn={m.ffn_size} "
        f"vocab={m.padded_vocab_size} (padded from {args.vocab}) seq_len={seq_len} batch={batch} "
        f"max_predictions={max_pred} dropout={m.dropout}/{m.attention_dropout} params={n_params / 1e6:.1f}M "
        f"padding={pad_share:.1%}")
    out(f"- {why}")
    out(f"- timing: {args.steps} steps after {args.warmup} warm-up (compilation included there), "
        f"implementations in turn, order rotating; medians")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if device.type == "cpu" and load > 0.5 * (os.cpu_count() or 1):
        # OpenMP regions wait for their slowest thread: on a busy machine every thread that
        # gets descheduled stalls the step, and fewer threads measure more steadily.
        out(f"- note: load average {load:.1f} on {os.cpu_count()} cpus before starting; other processes compete "
            "for the cores (all implementations alike, in turn); --threads 1 is steadier then")
    summary = []
    for name in chosen:
        results = run_precision(name, args, m, models, batches, device, seq_len, batch, max_pred, config, out)
        for (what, impl), r in results.items():
            if impl not in ("ours", "ours+compile"):
                continue
            checks = [f"{100 * r['of_gemm']:.0f}% of GEMM peak (target {100 * TARGET_OF_GEMM:.0f}%)"]
            if r["vs_hf"] is not None:
                checks.append(f"{r['vs_hf']:.2f}x hf eager (target {TARGET_VS_HF:.2f}x)")
            if r["mfu"] is not None:
                checks.append(f"MFU {100 * r['mfu']:.1f}% of datasheet")
            met = r["of_gemm"] >= TARGET_OF_GEMM and (r["vs_hf"] is None or r["vs_hf"] >= TARGET_VS_HF)
            summary.append(f"- {name} {what} {impl}: {', '.join(checks)}: {'met' if met else 'MISS'}")
    out()
    for line in summary:
        out(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Training throughput of RapidNLP's BertForMLM against transformers' MegatronBertForMaskedLM.

Single process, same shape, same weights (rapidnlp.convert.hf), same MLM batches, same AdamW.
Two measurements, each interleaved step by step (the order alternating) so that load from
other processes falls on both alike; warm-up steps are not timed:

  whole    forward + backward + AdamW step. RapidNLP runs its MLM head at the masked
           positions only, transformers at every position: that is the design, and counted.
  encoder  forward + backward of the encoder alone (our `encode`, HF's `model.bert`), with a
           dummy loss (mean square of the last hidden state) on both.

tokens/s counts every position of every sequence (padding included), as metrics.jsonl does.
The shape is configs/base.toml's unless overridden; a 2-core CPU needs smaller ones, e.g.

    python scripts/bench_throughput.py --layers 4 --seq-len 128 --batch 8 --steps 20 --warmup 3
"""
from __future__ import annotations

import argparse
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
from rapidnlp.model.bert import BertForMLM
from rapidnlp.optim import param_groups
from rapidnlp.pretrain.mlm import mlm_loss_sum


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
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--only", choices=("whole", "encoder"), help="run one measurement only")
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args(argv)


def make_batches(seq_len: int, batch: int, count: int, vocab: int, max_pred: int, seed: int) -> list[dict]:
    """Real MLM batches over synthetic documents: sentences of 8..40 tokens packed to seq_len."""
    rng = np.random.default_rng(seed)
    sentences, doc_index = [], [0]
    while len(sentences) < count * batch * (seq_len // 16 + 1):
        for _ in range(rng.integers(1, 12)):
            sentences.append(rng.integers(5, vocab, size=int(rng.integers(8, 41))))
        doc_index.append(len(sentences))
    ranges = build_sample_ranges(np.array([len(s) for s in sentences]), np.array(doc_index), seq_len - 2)
    special = SpecialIds(pad=0, cls=2, sep=3, mask=4, vocab_size=vocab)
    builder = MLMSampleBuilder(sentences, ranges, special, seq_len=seq_len, max_predictions=max_pred, seed=seed)
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


def measure(ours, theirs, batches: list[dict], warmup: int, steps: int) -> dict[str, list[tuple[float, float]]]:
    """Per-step (wall, process CPU) seconds of both, interleaved; who goes first alternates every step.

    CPU time is the steadier number on a shared machine (it leaves out time spent descheduled);
    wall time is the throughput a user sees.
    """
    times = {"ours": [], "hf": []}
    for i in range(warmup + steps):
        b = batches[i % len(batches)]
        order = (("ours", ours), ("hf", theirs)) if i % 2 == 0 else (("hf", theirs), ("ours", ours))
        for name, fn in order:
            wall, cpu = time.perf_counter(), time.process_time()
            fn(b)
            if i >= warmup:
                times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return times


def main(argv=None) -> int:
    args = parse_args(argv)
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
    model = BertForMLM(m).train()
    hf = load_into_hf(model).train()
    n_params = sum(p.numel() for p in model.parameters())
    batches = make_batches(seq_len, batch, 8, args.vocab, max_pred, args.seed)
    for b in batches:
        b["hf_labels"] = hf_labels(b)
    pad_share = float(sum((b["attention_mask"] == 0).float().mean() for b in batches) / len(batches))

    print(f"config: {os.path.normpath(args.config)} with overrides; fp32, single process, "
          f"HF attn_implementation={hf.config._attn_implementation}")
    print(f"shape: layers={m.num_layers} hidden={m.hidden_size} heads={m.num_heads} ffn={m.ffn_size} "
          f"vocab={m.padded_vocab_size} (padded from {args.vocab}) seq_len={seq_len} batch={batch} "
          f"max_predictions={max_pred} dropout={m.dropout}/{m.attention_dropout} params={n_params / 1e6:.1f}M "
          f"padding={pad_share:.1%}")
    print(f"threads: torch.get_num_threads()={torch.get_num_threads()} "
          f"interop={torch.get_num_interop_threads()} (cpus={os.cpu_count()})")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > 0.5 * (os.cpu_count() or 1):
        # OpenMP regions wait for their slowest thread: on a busy machine every thread that
        # gets descheduled stalls the step, and fewer threads measure more steadily.
        print(f"note: load average {load:.1f} on {os.cpu_count()} cpus before starting; other processes compete "
              f"for the cores (both implementations alike, interleaved); --threads 1 is steadier then")
    print(f"timing: {args.steps} steps after {args.warmup} warm-up, interleaved per step, order alternating; "
          f"torch {torch.__version__}")

    def opt(module):
        groups = param_groups(module, config.train.weight_decay)
        return torch.optim.AdamW(groups, lr=1e-4, betas=(config.train.beta1, config.train.beta2), eps=config.train.eps)

    tokens = batch * seq_len
    runs = {
        "whole": lambda: (whole_ours(model, opt(model)), whole_hf(hf, opt(hf))),
        "encoder": lambda: (encoder_ours(model), encoder_hf(hf)),
    }
    ratios = {}
    print()
    print(f"{'measurement':<11}{'rapidnlp tok/s':>15}{'hf tok/s':>10}{'ratio':>8}{'rapidnlp ms':>13}{'hf ms':>9}"
          f"{'cpu-time ratio':>16}")
    for name in (args.only,) if args.only else runs:
        times = measure(*runs[name](), batches, args.warmup, args.steps)
        wall = {k: statistics.median(w for w, _ in v) for k, v in times.items()}
        cpu = {k: statistics.median(c for _, c in v) for k, v in times.items()}
        ratios[name] = wall["hf"] / wall["ours"]
        print(f"{name:<11}{tokens / wall['ours']:>15.0f}{tokens / wall['hf']:>10.0f}{ratios[name]:>7.3f}x"
              f"{wall['ours'] * 1e3:>13.0f}{wall['hf'] * 1e3:>9.0f}{cpu['hf'] / cpu['ours']:>15.3f}x", flush=True)
    print("(medians over the timed steps; ratio = rapidnlp tok/s / hf tok/s, above 1 is faster)")
    print()
    if "whole" in ratios:
        print(f"whole_model_ratio: {ratios['whole']:.3f}")
    if "encoder" in ratios:
        print(f"encoder_ratio: {ratios['encoder']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

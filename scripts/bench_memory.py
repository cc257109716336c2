#!/usr/bin/env python
"""Peak activation memory: the MLM loss, fused and unfused, and one training step of `base`.

Two tables, both measured on the spot (any device; on CPU through the kernels' reference paths):

1. The loss alone (issue 16, part 3): the MLM loss over `--tokens` masked positions, vocabulary
   `--vocab`, hidden `--hidden`, forward + backward, unfused (decoder GEMM, then
   F.cross_entropy on fp32 logits: what `model.fused_kernels = false` trains with) against the
   fused linear cross-entropy (`pretrain.mlm.decoder_loss_sum`, chunked: what
   `model.fused_kernels = true` trains with). Target: fused peak <= 1/4 of unfused, same loss to 1e-5.
2. One step of `base` (12 x 768) at seq 512 (issue 16, part 4): forward + backward of the MLM
   objective, `model.fused_kernels` off and on, for each activation-checkpointing mode.

Columns:
  peak alloc   the most bytes of tensors created during forward + backward alive at once
               (rapidnlp.train.memory.AllocationPeak: every operator's new storages, parameters
               and inputs excluded; on CPU no allocator keeps statistics)
  saved        peak bytes saved for backward (ActivationCounter: the trainer's mem_activation_bytes)

    python scripts/bench_memory.py                      # both tables, the issue's sizes
    python scripts/bench_memory.py --only loss --tokens 2048 --vocab 8192
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from rapidnlp.config import Config, load_config, max_predictions
from rapidnlp.model.bert import BertForMLM
from rapidnlp.parallel.activation_checkpoint import apply_activation_checkpointing
from rapidnlp.pretrain.mlm import MLM, decoder_loss_sum, mlm_loss_sum
from rapidnlp.train.memory import ActivationCounter, AllocationPeak

REPO = Path(__file__).resolve().parents[1]
TARGET_RATIO, TARGET_LOSS_RTOL = 0.25, 1e-5
MIB = 2**20


def measure(run) -> dict:
    """Peak allocated and peak saved bytes of run() (forward + backward), its result, its seconds."""
    alloc, saved = AllocationPeak(), ActivationCounter()
    started = time.perf_counter()
    with alloc.track(), saved.track():
        value = run()
    return {"alloc": alloc.bytes, "saved": saved.bytes, "value": value, "s": time.perf_counter() - started}


def loss_table(tokens: int, vocab: int, hidden: int) -> bool:
    g = torch.Generator().manual_seed(0)
    decoder = torch.nn.Linear(hidden, vocab)
    features = torch.randn(1, tokens, hidden, generator=g).requires_grad_()
    labels = torch.randint(0, vocab, (1, tokens), generator=g)

    def unfused():
        loss = mlm_loss_sum(decoder(features), labels)
        loss.backward()
        return loss.item()

    def fused():
        loss = decoder_loss_sum(features, decoder, labels)
        loss.backward()
        return loss.item()

    rows = {"unfused": measure(unfused), "fused": measure(fused)}
    print(f"\nMLM loss, forward + backward: {tokens} masked positions x vocabulary {vocab} x hidden {hidden}, fp32 "
          f"(logits alone: {tokens * vocab * 4 / MIB:.0f} MiB)")
    print(f"{'loss':<10}{'peak alloc MiB':>16}{'saved MiB':>12}{'seconds':>10}{'loss value':>18}")
    for name, r in rows.items():
        print(f"{name:<10}{r['alloc'] / MIB:>16.1f}{r['saved'] / MIB:>12.1f}{r['s']:>10.2f}{r['value']:>18.6f}")
    ratio = rows["fused"]["alloc"] / rows["unfused"]["alloc"]
    rel = abs(rows["fused"]["value"] - rows["unfused"]["value"]) / abs(rows["unfused"]["value"])
    ok = ratio <= TARGET_RATIO and rel <= TARGET_LOSS_RTOL
    print(f"fused / unfused peak: {ratio:.3f} (target <= {TARGET_RATIO}); loss relative difference {rel:.1e} "
          f"(target <= {TARGET_LOSS_RTOL:g}): {'met' if ok else 'NOT met'}")
    return ok


def step_table(config_path: str, batch: int, seq: int, vocab: int) -> None:
    config = load_config(config_path)
    config.model.vocab_size, config.data.seq_len = vocab, seq
    predictions = max_predictions(config)
    g = torch.Generator().manual_seed(1)
    data = {
        "input_ids": torch.randint(5, vocab, (batch, seq), generator=g),
        "token_type_ids": torch.zeros(batch, seq, dtype=torch.long),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
        "mlm_positions": torch.stack([torch.randperm(seq, generator=g)[:predictions] for _ in range(batch)]),
        "mlm_labels": torch.randint(5, vocab, (batch, predictions), generator=g),
    }
    m = config.model
    print(f"\nOne forward + backward of {Path(config_path).stem} ({m.num_layers} x {m.hidden_size}, dropout {m.dropout}), "
          f"batch {batch} x seq {seq}, {predictions} predictions per sequence, vocabulary {vocab}, fp32")
    print(f"{'fused_kernels':<15}{'checkpointing':<15}{'peak alloc MiB':>16}{'saved MiB':>12}{'seconds':>10}{'loss':>10}")
    for fused in (False, True):
        for mode in ("none", "selective", "full"):
            config.model.fused_kernels = fused
            objective = MLM(Config(model=config.model, data=config.data), 1.0)
            torch.manual_seed(0)
            model = BertForMLM(config.model, objective.pieces())
            apply_activation_checkpointing(model, mode)
            inputs = (data["input_ids"], data["attention_mask"], *(data[k] for k in model.field_names))

            def step():
                torch.manual_seed(2)  # the same dropout draws for every row
                loss = objective.loss_sum({"lm_head": model(*inputs)[0]}, data) / objective.normaliser(data)
                loss.backward()
                return loss.item()

            r = measure(step)
            print(f"{str(fused).lower():<15}{mode:<15}{r['alloc'] / MIB:>16.1f}{r['saved'] / MIB:>12.1f}"
                  f"{r['s']:>10.2f}{r['value']:>10.4f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=("loss", "step"), help="one table")
    ap.add_argument("--tokens", type=int, default=10240, help="masked positions of the loss table")
    ap.add_argument("--vocab", type=int, default=30592, help="vocabulary rows (both tables)")
    ap.add_argument("--hidden", type=int, default=768, help="hidden size of the loss table")
    ap.add_argument("--config", default=str(REPO / "configs" / "base.toml"), help="model of the step table")
    ap.add_argument("--batch", type=int, default=2, help="sequences of the step table")
    ap.add_argument("--seq", type=int, default=512, help="sequence length of the step table")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ok = True
    if args.only in (None, "loss"):
        ok = loss_table(args.tokens, args.vocab, args.hidden)
    if args.only in (None, "step"):
        step_table(args.config, args.batch, args.seq, args.vocab)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

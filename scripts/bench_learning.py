"""Learning parity: the engine against a plain transformers BertForMaskedLM loop, per token.

Both train on the same prepared data (`rapidnlp prepare` output) with the same hyperparameters
(AdamW 0.9/0.999/eps 1e-6, weight decay 0.01 on matrices only, linear warmup then linear decay,
clip 1.0, dropout 0), and both are scored through their transformers folders by one evaluator on
held-out text no run trained on (the 1,200 test reviews), with the same fixed masks.

  engine     `rapidnlp pretrain` (configs/tiny.toml plus the recipe's overrides) in a subprocess,
             then `rapidnlp convert --to hf`
  reference  a transformers BertForMaskedLM in a plain loop written here: its own packing (the
             sentences of a document concatenated up to seq_len - 2), its own 80/10/10 masking
             drawn afresh each step, BERT's own init (transformers' _init_weights);
             with --same-batches it trains on the engine's own batches instead (its sample
             builder and sampler, seeded by the reference seed), which splits data from model

It prints a table (held-out loss and accuracy per seed, mean, std and range per system, and the
excursions: steps whose train loss exceeds the previous 20 steps' mean by 0.5 nats, or whose
gradient norm exceeds 10x the running median) and writes results.json and loss.png (train loss
vs non-padding tokens) under --out.

  python scripts/bench_learning.py --data landing/data --steps 400 --engine-seeds 1234,99,7 \\
      --reference-seeds 0,1,2 --out bench/learning_400
  # the diagnosis: Megatron's pre-LN engine vs BERT on the very same batches (seed 1234 both)
  python scripts/bench_learning.py --data landing/data --steps 400 --engine-seeds 1234 \\
      --reference-seeds 1234 --same-batches --engine-args "--model.norm_position pre --data.dynamic_mask false"
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F

IGNORE = -100
EXCURSION_NATS, EXCURSION_GRAD = 0.5, 10.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="a prepared dataset prefix (PREFIX.bin/.idx/.model)")
    p.add_argument("--out", default="bench/learning")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq", type=int, default=96)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--engine-seeds", default="1234,99,7")
    p.add_argument("--reference-seeds", default="0,1,2")
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1)))
    p.add_argument("--eval-texts", type=int, default=1200, help="held-out test reviews scored")
    p.add_argument("--engine-args", default="", help="extra --section.field value overrides for the engine")
    p.add_argument("--same-batches", action="store_true", help="the reference trains on the engine's batches")
    return p.parse_args(argv)


def _seeds(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s.strip()]


# -- the engine ---------------------------------------------------------------------------------

def engine_overrides(args, seed: int, run_dir: str) -> list[str]:
    """The recipe as `rapidnlp pretrain` overrides of configs/tiny.toml."""
    return ["--data.path", args.data, "--model.num_layers", str(args.layers), "--model.hidden_size", str(args.hidden),
            "--model.num_heads", "4", "--model.ffn_size", str(4 * args.hidden),
            "--model.max_position_embeddings", "128", "--data.seq_len", str(args.seq),
            "--train.global_batch", str(args.batch), "--train.micro_batch", str(args.batch),
            "--train.steps", str(args.steps), "--train.lr", str(args.lr), "--train.warmup_steps", str(args.warmup),
            "--train.lr_decay", "linear", "--train.seed", str(seed), "--train.precision", args.precision,
            "--train.eval_interval", "0", "--train.log_interval", "50", "--train.run_dir", run_dir,
            "--checkpoint.keep_last", "1", *args.engine_args.split()]


def run_engine(args, seed: int, folder: str) -> list[dict]:
    """`rapidnlp pretrain` with the recipe, then its HF export in folder/hf; returns metrics rows."""
    run = os.path.join(folder, "run")
    cmd = [sys.executable, "-m", "rapidnlp.cli", "pretrain", "--config", "configs/tiny.toml",
           *engine_overrides(args, seed, run)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    subprocess.run(cmd, check=True, env=env)
    ckpt = os.path.join(run, "checkpoints", open(os.path.join(run, "checkpoints", "latest")).read().strip())
    subprocess.run([sys.executable, "-m", "rapidnlp.cli", "convert", "--to", "hf", ckpt, os.path.join(folder, "hf")],
                   check=True, env=env)
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


# -- the reference ------------------------------------------------------------------------------

def reference_samples(data: str, seq: int) -> list[np.ndarray]:
    """Each document's sentences concatenated and cut into pieces of at most seq - 2 tokens."""
    from rapidnlp.data.indexed import IndexedDataset

    ds = IndexedDataset(data)
    docs = ds.document_indices
    out = []
    for d in range(len(docs) - 1):
        tokens = np.concatenate([np.asarray(ds[s], dtype=np.int64) for s in range(int(docs[d]), int(docs[d + 1]))])
        out += [tokens[i:i + seq - 2] for i in range(0, len(tokens), seq - 2) if len(tokens[i:i + seq - 2])]
    return out


def mask_batch(samples: list[np.ndarray], seq: int, special: dict, vocab: int, gen: torch.Generator,
               mask_all: bool = False) -> dict[str, torch.Tensor]:
    """[CLS] tokens [SEP] + padding; 15% of the tokens masked (80% [MASK], 10% random, 10% kept;
    mask_all: all [MASK], for scoring). Labels -100 elsewhere."""
    ids = torch.full((len(samples), seq), special["pad"], dtype=torch.long)
    attn = torch.zeros_like(ids)
    for r, s in enumerate(samples):
        ids[r, 0], ids[r, 1:len(s) + 1], ids[r, len(s) + 1] = special["cls"], torch.from_numpy(s), special["sep"]
        attn[r, :len(s) + 2] = 1
    body = attn.bool()
    body[:, 0] = False
    body[torch.arange(len(samples)), attn.sum(1) - 1] = False
    chosen = (torch.rand(ids.shape, generator=gen) < 0.15) & body
    for r in range(len(samples)):  # at least one masked token per sample
        if not chosen[r].any() and body[r].any():
            chosen[r, torch.nonzero(body[r])[0]] = True
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE))
    action = torch.rand(ids.shape, generator=gen)
    rand_ids = torch.randint(5, vocab, ids.shape, generator=gen)
    masked = ids.clone()
    if mask_all:
        masked[chosen] = special["mask"]
    else:
        masked = torch.where(chosen & (action < 0.8), special["mask"], masked)
        masked = torch.where(chosen & (action >= 0.8) & (action < 0.9), rand_ids, masked)
    return {"input_ids": masked, "attention_mask": attn, "labels": labels}


def hf_bert(args, vocab: int):
    import transformers

    config = transformers.BertConfig(
        vocab_size=-(-vocab // 128) * 128, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=4, intermediate_size=4 * args.hidden, max_position_embeddings=128,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=1e-12)
    return transformers.BertForMaskedLM(config)


def engine_batches(args, seed: int):
    """step -> the engine's own batch for that step (its sample builder and sampler), as
    BertForMaskedLM inputs with labels at every position."""
    from rapidnlp.config import load_config
    from rapidnlp.data.sampler import GlobalBatchSampler
    from rapidnlp.train.trainer import load_data

    config = load_config("configs/tiny.toml", engine_overrides(args, seed, os.devnull))
    data = load_data(config)
    sampler = GlobalBatchSampler(len(data.train), global_batch=args.batch, micro_batch=args.batch,
                                 dp_rank=0, dp_size=1, seed=seed)

    def batch(step: int) -> dict[str, torch.Tensor]:
        position = step * args.batch
        b = data.train.collate(sampler.step_at(position)[0], sampler.epochs_at(position)[0])
        labels = torch.full_like(b["input_ids"], IGNORE)
        rows, slots = torch.nonzero(b["mlm_labels"] != IGNORE, as_tuple=True)
        labels[rows, b["mlm_positions"][rows, slots]] = b["mlm_labels"][rows, slots]
        return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "labels": labels}

    return batch


def run_reference(args, seed: int, folder: str, samples: list[np.ndarray], special: dict, vocab: int) -> list[dict]:
    same = engine_batches(args, seed) if args.same_batches else None
    torch.manual_seed(seed)
    model = hf_bert(args, vocab)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.999), eps=1e-6)
    gen = torch.Generator().manual_seed(seed)
    order = np.random.default_rng(seed).permutation(len(samples))
    rows, pos, tokens, started = [], 0, 0, time.perf_counter()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")
    for step in range(args.steps):
        lr = args.lr * min((step + 1) / args.warmup, max(0.0, (args.steps - step) / max(1, args.steps - args.warmup)))
        for g in opt.param_groups:
            g["lr"] = lr
        if same is not None:
            batch = same(step)
        else:
            if pos + args.batch > len(order):
                order, pos = np.random.default_rng((seed, step)).permutation(len(samples)), 0
            batch = mask_batch([samples[i] for i in order[pos:pos + args.batch]], args.seq, special, vocab, gen)
            pos += args.batch
        with autocast:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
        rows.append({"step": step + 1, "loss": float(loss.detach()), "grad_norm": grad_norm, "consumed_tokens": tokens})
        if (step + 1) % 50 == 0:
            print(f"reference seed {seed} step {step + 1}: loss {rows[-1]['loss']:.4f} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    model.save_pretrained(os.path.join(folder, "hf"))
    return rows


# -- the evaluator ------------------------------------------------------------------------------

@torch.no_grad()
def score(folder: str, texts: list[str], tokenizer_path: str, seq: int) -> dict:
    """Masked-token loss and accuracy of a transformers folder on `texts`, masks fixed by seed 0
    (15% of each text's tokens, all [MASK]): the same positions for every folder scored."""
    from transformers import AutoModelForMaskedLM

    from rapidnlp.data.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_path)
    special = {"pad": tok.pad_id, "cls": tok.cls_id, "sep": tok.sep_id, "mask": tok.mask_id}
    model = AutoModelForMaskedLM.from_pretrained(folder).eval()
    samples = [np.asarray(tok.encode(t)[:seq - 2], dtype=np.int64) for t in texts]
    samples = [s for s in samples if len(s)]
    gen = torch.Generator().manual_seed(0)
    total, right, count = 0.0, 0, 0
    for i in range(0, len(samples), 64):
        batch = mask_batch(samples[i:i + 64], seq, special, tok.vocab_size, gen, mask_all=True)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       token_type_ids=torch.zeros_like(batch["input_ids"])).logits.float()
        labels = batch["labels"]
        total += float(F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum"))
        real = labels != IGNORE
        right += int(((logits.argmax(-1) == labels) & real).sum())
        count += int(real.sum())
    return {"heldout_loss": total / count, "heldout_accuracy": right / count, "scored_tokens": count}


def excursions(rows: list[dict]) -> list[int]:
    """Steps whose loss exceeds the previous 20 steps' mean by EXCURSION_NATS, or whose gradient
    norm exceeds EXCURSION_GRAD x the running median."""
    out, norms = [], []
    for i, r in enumerate(rows):
        window = [x["loss"] for x in rows[max(0, i - 20):i]]
        if len(window) == 20 and r["loss"] > statistics.fmean(window) + EXCURSION_NATS:
            out.append(r["step"])
        elif r.get("grad_norm") is not None and norms and r["grad_norm"] > EXCURSION_GRAD * statistics.median(norms):
            out.append(r["step"])
        if r.get("grad_norm") is not None:
            norms.append(r["grad_norm"])
    return out


def summary(results: list[dict], system: str) -> dict:
    losses = [r["heldout_loss"] for r in results if r["system"] == system]
    if not losses:
        return {}
    return {"mean": statistics.fmean(losses), "std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
            "range": max(losses) - min(losses), "n": len(losses)}


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        xs = [row["consumed_tokens"] / 1e6 for row in r["curve"]]
        ys = [row["loss"] for row in r["curve"]]
        ax.plot(xs, ys, color="tab:blue" if r["system"] == "engine" else "tab:orange", alpha=0.6, lw=0.8,
                label=f"{r['system']} {r['seed']}")
    ax.set_xlabel("non-padding tokens (M)")
    ax.set_ylabel("train MLM loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from rapidnlp.data.tokenizer import Tokenizer
    from rapidnlp.finetune.reviews import splits

    os.makedirs(args.out, exist_ok=True)
    tokenizer = args.data + ".model"
    tok = Tokenizer(tokenizer)
    special = {"pad": tok.pad_id, "cls": tok.cls_id, "sep": tok.sep_id, "mask": tok.mask_id}
    texts = [r["text"] for r in splits()["test"]][:args.eval_texts]
    samples = reference_samples(args.data, args.seq) if _seeds(args.reference_seeds) and not args.same_batches else []
    results = []
    for system, seeds in (("engine", _seeds(args.engine_seeds)), ("reference", _seeds(args.reference_seeds))):
        for seed in seeds:
            folder = os.path.join(args.out, f"{system}_{seed}")
            os.makedirs(folder, exist_ok=True)
            curve = (run_engine(args, seed, folder) if system == "engine"
                     else run_reference(args, seed, folder, samples, special, tok.vocab_size))
            scored = score(os.path.join(folder, "hf"), texts, tokenizer, args.seq)
            results.append({"system": system, "seed": seed, **scored, "excursions": excursions(curve),
                            "final_train_loss": curve[-1]["loss"], "tokens": curve[-1].get("consumed_tokens"),
                            "curve": [{k: r.get(k) for k in ("step", "loss", "grad_norm", "consumed_tokens")}
                                      for r in curve]})
            print(f"{system} seed {seed}: held-out {scored['heldout_loss']:.4f}, "
                  f"accuracy {scored['heldout_accuracy']:.3f}, excursions {results[-1]['excursions']}", flush=True)
            with open(os.path.join(args.out, "results.json"), "w") as f:
                json.dump({"args": vars(args), "results": results}, f)
    print(f"\n{args.steps} steps, {args.precision}, lr {args.lr}, batch {args.batch} x seq {args.seq}, "
          f"{args.layers} x {args.hidden}")
    print(f"{'system':<10}{'seed':>6}{'held-out':>10}{'acc':>7}{'tokens':>12}  excursions")
    for r in results:
        print(f"{r['system']:<10}{r['seed']:>6}{r['heldout_loss']:>10.4f}{r['heldout_accuracy']:>7.3f}"
              f"{r['tokens'] or 0:>12,}  {r['excursions'] or '-'}")
    stats = {s: summary(results, s) for s in ("engine", "reference")}
    for s, v in stats.items():
        if v:
            print(f"{s:<10} mean {v['mean']:.4f}  std {v['std']:.4f}  range {v['range']:.4f}  (n = {v['n']})")
    if stats["engine"] and stats["reference"]:
        gap = stats["engine"]["mean"] - stats["reference"]["mean"]
        print(f"engine - reference: {gap:+.4f} nats (goal <= +0.02); seed range {stats['engine']['range']:.4f} "
              f"vs max(2 x {stats['reference']['range']:.4f}, 0.03)")
    plot(results, os.path.join(args.out, "loss.png"))
    print(f"wrote {args.out}/results.json, {args.out}/loss.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

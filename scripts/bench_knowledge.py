"""What the knowledge objectives cost and what they buy (a benchmark, not a test).

    python scripts/bench_knowledge.py --data data/demo/pd --part speed
    python scripts/bench_knowledge.py --data data/demo/pd --part probe [--steps 300 --seeds 3]
      (the README's table: --data data/demo_char/pd --steps 3000 --probe-batch 32 --seq-len 64 --lr 1e-3)
    python scripts/bench_knowledge.py --data data/demo/pd --part denoise [--steps 300 --noise 0.3]

speed: at `base` width (configs/base.toml: 12 x 768), seq 128, one process, fp32, the median step
time of plain MLM (plain samples) and of all knowledge objectives (knowledge samples) at equal
batch, their ratio (target <= 1.3x), and the share of step time spent waiting for data
(data_wait_s; target <= 5%).

probe: the `tiny` model on the demo data, the same packed inputs for every variant (the triple
segment is present throughout), same seeds, data and token budget: (a) plain MLM, (b) + joint
mask, (c) + mention detection, (d) + SPO margin, (e) + GCN fusion, (f) all, (g) all with the
optional knowledge-gain term (weight 0.5); each seed trains, then
is measured on the held-out documents (the validation split) with one masking for all variants:
  - MLM loss on non-entity tokens (ordinary token masking; masked tokens outside every entity);
  - masked-entity exact match on plain sentences ([CLS] sentence [SEP], no triple segment; every
    linked mention masked as a whole, right when all its tokens are), and its per-token accuracy;
  - triple completion ([CLS] sentence [SEP] s p [MASK ...] [SEP]: the first packed triple's
    object masked; exact match, and per token);
  - mention F1 and SPO ranking accuracy, for the variants that train those heads.
Prints a table of mean +- std over the seeds.

denoise: trains the tiny model with all objectives, then replaces --noise of the (sentence,
triple) pairs of the side-stream with random triples (3 seeds) and reports precision and recall
of the pairs the filter removes against the planted ones: the SPO head with the cue (threshold
0.25, `rapidnlp knowledge denoise`'s default), the cue alone (threshold 0.25), and the head alone
(removing the lowest-scored share equal to the planted share).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

VARIANTS = {
    "(a) plain MLM": ({}, False),
    "(b) + joint mask": ({}, True),
    "(c) + mention": ({"mention": 0.5}, False),
    "(d) + SPO margin": ({"spo": 0.5}, False),
    "(e) + GCN fusion": ({"fusion": 1.0}, False),
    "(f) all": ({"mention": 0.5, "spo": 0.5, "fusion": 1.0}, True),
    "(g) all + knowledge gain": ({"mention": 0.5, "spo": 0.5, "fusion": 1.0, "knowledge_gain": 0.5}, True),
}
KNOWLEDGE = ["--knowledge.enabled", "true", "--knowledge.triple_budget", "32"]


def _knowledge(args) -> list[str]:
    """The knowledge options at the probe's sequence length (a quarter of it for the triples)."""
    return ["--knowledge.enabled", "true", "--knowledge.triple_budget", str(max(8, args.seq_len // 4))]


def _config(args, extra: list[str], objectives: dict, joint: bool, seed: int = 1234):
    from rapidnlp.config import load_config, resolve_layout

    overrides = ["--data.path", args.data, "--train.run_dir", args.run_dir, "--checkpoint.enabled", "false",
                 "--train.precision", "fp32", "--train.seed", str(seed), "--knowledge.joint_mask", str(joint).lower(),
                 *extra]
    for name, weight in objectives.items():
        overrides += [f"--objectives.{name}", str(weight)]
    config = load_config(None, overrides)
    resolve_layout(config, 1)
    return config


def speed(args) -> dict:
    from rapidnlp.config import load_config
    from rapidnlp.distributed.mesh import ParallelDims
    from rapidnlp.train.trainer import Trainer

    base = load_config("configs/base.toml")
    common = ["--model.num_layers", str(base.model.num_layers), "--model.hidden_size", str(base.model.hidden_size),
              "--model.num_heads", str(base.model.num_heads), "--model.ffn_size", str(base.model.ffn_size),
              "--data.seq_len", "128", "--train.global_batch", str(args.batch), "--train.micro_batch", str(args.batch),
              "--train.steps", str(args.speed_steps), "--train.eval_interval", "0"]
    out = {}
    for name, extra, objectives, joint in (
            ("plain MLM", [], {}, False),
            ("all knowledge objectives", KNOWLEDGE, VARIANTS["(f) all"][0], True)):
        config = _config(args, common + extra, objectives, joint)
        trainer = Trainer(config, ParallelDims.from_config(config.parallel), stream=open(os.devnull, "w"))
        rows = trainer.fit()[1:]  # the first step pays for start-up
        steps = [config.train.global_batch * config.data.seq_len / r["tokens_per_s"] for r in rows]
        out[name] = {"step_s": statistics.median(steps), "wait_share": sum(r["data_wait_s"] for r in rows) / sum(steps)}
    return out


def _restore(batch):
    """The unmasked input ids of a collated batch."""
    ids = batch["input_ids"].clone()
    real = batch["mlm_labels"] != -100
    ids[real.nonzero(as_tuple=True)[0], batch["mlm_positions"][real]] = batch["mlm_labels"][real]
    return ids


@__import__("torch").no_grad()
def probe_metrics(model, batches, special) -> dict:
    """The held-out measurements of one trained model (see the module doc)."""
    import torch
    import torch.nn.functional as F

    from rapidnlp.pretrain.knowledge_gain import entity_slots
    from rapidnlp.pretrain.mention import spans as bio_spans

    heads = model.head_names
    sums = {k: [0.0, 0.0] for k in ("non_entity_loss", "entity_exact", "entity_token", "triple_exact", "triple_token",
                                     "mention_f1", "spo_rank")}

    def run(batch):
        inputs = (batch["input_ids"], batch["attention_mask"], *(batch[k] for k in model.field_names))
        samples = len(batch["input_ids"])  # without the gate-shut twins of (g)
        return {name: out[:samples] for name, out in zip(heads, model(*inputs))}

    for batch in batches:
        out = run(batch)
        # non-entity MLM loss under ordinary masking
        labels = batch["mlm_labels"].clone()
        labels[entity_slots(batch)] = -100
        ce = F.cross_entropy(out["lm_head"].flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
        sums["non_entity_loss"][0] += float(ce)
        sums["non_entity_loss"][1] += float((labels != -100).sum())
        if "mention_head" in out:
            gold = bio_spans(batch["mention_tags"].clamp(min=0))
            pred_tags = torch.where(batch["mention_tags"] == -100, 0, out["mention_head"].argmax(-1))
            pred = bio_spans(pred_tags)
            sums["mention_f1"][0] += 2 * len(gold & pred)
            sums["mention_f1"][1] += len(gold) + len(pred)
        if "spo_head" in out:
            scores = out["spo_head"]
            positive = batch["spo_pos"][..., 0] >= 0
            pairs = (batch["spo_neg"][..., 0] >= 0) & positive[..., None]
            above = ((scores[..., 1:] >= scores[..., :1]) & pairs).sum(-1)
            sums["spo_rank"][0] += float(((above == 0) & positive).sum())
            sums["spo_rank"][1] += float(positive.sum())
        ids = _restore(batch)
        for name, counts in (("entity", _entity_exact(model, batch, ids, special, run)),
                             ("triple", _triple_exact(model, batch, ids, special, run))):
            for kind, (right, total) in zip(("exact", "token"), counts):
                sums[f"{name}_{kind}"][0] += right
                sums[f"{name}_{kind}"][1] += total
    return {k: (s / c if c else None) for k, (s, c) in sums.items()}


def _masked_copy(batch, ids, keep_until, masked_spans, special):
    """A copy of the batch: ids truncated at keep_until[b] (padding after), the spans masked with
    [MASK], MLM positions and labels on them, their sub-graph nodes marked masked (no leakage)."""
    import torch

    b_size, seq = ids.shape
    P = batch["mlm_positions"].shape[1]
    new = {k: v.clone() for k, v in batch.items()}
    positions = torch.zeros(b_size, P, dtype=torch.long)
    labels = torch.full((b_size, P), -100, dtype=torch.long)
    for b in range(b_size):
        row = ids[b].clone()
        end = int(keep_until[b])
        row[end:] = special.pad
        new["attention_mask"][b] = (torch.arange(seq) < end).long()
        new["token_type_ids"][b, end:] = 0
        slots = [p for a, e in masked_spans[b] for p in range(a, e)][:P]
        positions[b, :len(slots)] = torch.tensor(slots, dtype=torch.long)
        labels[b, :len(slots)] = row[slots]
        row[slots] = special.mask
        new["input_ids"][b] = row
        new["token_node"][b, end:] = -1
        for node in {int(new["token_node"][b, p]) for p in slots} - {-1}:
            new["node_masked"][b, node] = 1
    new["mlm_positions"], new["mlm_labels"] = positions, labels
    return new, masked_spans


def _exact(out, new, masked_spans) -> tuple[tuple[float, float], tuple[float, float]]:
    """((entities right, entities), (tokens right, tokens)) over the masked spans: an entity is
    right when all its tokens are."""
    right, total, tokens_right, tokens = 0.0, 0.0, 0.0, 0.0
    predicted = out["lm_head"].argmax(-1)
    for b, spans in enumerate(masked_spans):
        k = 0
        for a, e in spans:
            n = e - a
            if k + n > predicted.shape[1]:
                break
            hits = predicted[b, k:k + n] == new["mlm_labels"][b, k:k + n]
            right += bool(hits.all())
            total += 1
            tokens_right += float(hits.sum())
            tokens += n
            k += n
    return (right, total), (tokens_right, tokens)


def _entity_exact(model, batch, ids, special, run):
    """Every linked mention of the sentence masked, no triple segment."""
    sentence_end = [int((batch["token_type_ids"][b] == 0).logical_and(batch["attention_mask"][b] == 1).sum())
                    for b in range(len(ids))]
    spans = [[(a, e) for a, e in row if e > a] for row in batch["mention_spans"].tolist()]
    new, spans = _masked_copy(batch, ids, sentence_end, spans, special)
    return _exact(run(new), new, spans)


def _triple_completion_inputs(batch, ids, special):
    import torch

    ends, spans = [], []
    for b in range(len(ids)):
        (s_a, s_e), (o_a, o_e) = batch["spo_spans"][b, 0].tolist()
        if s_a < 0:
            ends.append(int(batch["attention_mask"][b].sum()))
            spans.append([])
            continue
        ids[b, o_e] = special.sep  # the segment ends after the first triple's object
        ends.append(o_e + 1)
        spans.append([(o_a, o_e)])
    return torch.tensor(ends), spans


def _triple_exact(model, batch, ids, special, run):
    ends, spans = _triple_completion_inputs(batch, ids, special)
    new, spans = _masked_copy(batch, ids, ends, spans, special)
    return _exact(run(new), new, spans)


def probe(args) -> dict:
    from rapidnlp.distributed.mesh import ParallelDims
    from rapidnlp.train.trainer import Trainer, load_data

    common = ["--data.seq_len", str(args.seq_len), "--train.global_batch", str(args.probe_batch), "--train.micro_batch",
              str(args.probe_batch), "--train.steps", str(args.steps), "--train.eval_interval", "1000000",
              "--train.lr", str(args.lr), "--train.warmup_steps", "20", "--data.val_fraction", "0.05",
              *_knowledge(args)]
    results = {}
    for name, (objectives, joint) in VARIANTS.items():
        if args.variants and name[1] not in args.variants:
            continue
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            config = _config(args, common, objectives, joint, seed=1000 + seed)
            trainer = Trainer(config, ParallelDims.from_config(config.parallel), stream=open(os.devnull, "w"))
            trainer.fit()
            # One evaluation masking for every variant: ordinary token masking, no joint mask.
            eval_config = _config(args, common, objectives, False, seed=99)
            data = load_data(eval_config)
            model = trainer.parts.model.eval()
            batches = [data.val.collate(range(i, min(i + 32, len(data.val)))) for i in range(0, len(data.val), 32)]
            results.setdefault(name, []).append(probe_metrics(model, batches, data.special))
            print(f"{name} seed {seed}: {results[name][-1]}", file=sys.stderr, flush=True)
    return results


def denoise_bench(args) -> dict:
    import numpy as np

    from rapidnlp.data.knowledge.build import knowledge_dir
    from rapidnlp.data.knowledge.kg import KnowledgeGraph
    from rapidnlp.distributed.mesh import ParallelDims
    from rapidnlp.pretrain.denoise import filter_quality, plant_noise, score_pairs
    from rapidnlp.train.trainer import Trainer

    common = ["--data.seq_len", str(args.seq_len), "--train.global_batch", str(args.probe_batch), "--train.micro_batch",
              str(args.probe_batch), "--train.steps", str(args.steps), "--train.eval_interval", "0",
              "--train.lr", str(args.lr), "--train.warmup_steps", "20", *_knowledge(args)]
    config = _config(args, common, VARIANTS["(f) all"][0], True)
    trainer = Trainer(config, ParallelDims.from_config(config.parallel), stream=open(os.devnull, "w"))
    trainer.fit()
    model = trainer.parts.model.eval()
    folder = knowledge_dir(args.data)
    kg = KnowledgeGraph.load(os.path.join(folder, "kg.npz"))
    with np.load(os.path.join(folder, "mentions.npz")) as z:
        triple_ptr, triples, seq_ptr, mentions = z["triple_ptr"], z["triples"], z["seq_ptr"], z["mentions"]
    out = {"head + cue": [], "cue alone": [], "head alone": []}
    for seed in range(args.seeds):
        noisy, planted = plant_noise(triple_ptr, triples, kg.num_triples, args.noise, seed)

        def scores(head, cue):
            return score_pairs(model, trainer.data.special, trainer.data.train.side.tokens, (triple_ptr, noisy),
                               (seq_ptr, mentions), kg.triples, seq_len=args.seq_len, cue_weight=cue, head_weight=head)

        out["head + cue"].append(filter_quality(scores(1.0, 1.0) >= 0.25, planted))
        out["cue alone"].append(filter_quality(scores(0.0, 1.0) >= 0.25, planted))
        head = scores(1.0, 0.0)
        out["head alone"].append(filter_quality(head > np.quantile(head, planted.mean()), planted))
    return out


def worker(args) -> None:
    from rapidnlp.distributed.bootstrap import init_distributed, shutdown

    init_distributed()
    out = {"speed": speed, "probe": probe, "denoise": denoise_bench}[args.part](args)
    with open(args.out, "w") as f:
        json.dump(out, f)
    shutdown(0)


def _fmt(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.4f} ± {std:.4f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/demo/pd")
    ap.add_argument("--part", choices=("speed", "probe", "denoise"), default="speed")
    ap.add_argument("--noise", type=float, default=0.3, help="denoise: share of pairs replaced by random triples")
    ap.add_argument("--batch", type=int, default=8, help="speed: global batch (one micro-batch)")
    ap.add_argument("--speed-steps", type=int, default=6)
    ap.add_argument("--steps", type=int, default=300, help="probe: training steps per run")
    ap.add_argument("--probe-batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128, help="probe/denoise: sequence length")
    ap.add_argument("--lr", type=float, default=2e-3, help="probe/denoise: peak learning rate")
    ap.add_argument("--variants", default="", help="probe: a subset by letter, e.g. af (default: all six)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0, help="probe: seeds first..first+seeds-1 (to split a table)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--run-dir", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if "RANK" in os.environ:
        worker(args)
    from rapidnlp.distributed.launch import spawn_local

    tmp = tempfile.mkdtemp(prefix="bench_knowledge_")
    out = os.path.join(tmp, "out.json")
    argv = sys.argv[1:] + ["--run-dir", os.path.join(tmp, "run"), "--out", out]
    code = spawn_local(1, argv, script=os.path.abspath(__file__), env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if code:
        return code
    with open(out) as f:
        res = json.load(f)
    if args.part == "speed":
        plain, knowledge = res["plain MLM"], res["all knowledge objectives"]
        print("| run | step s | data wait share |\n|---|---|---|")
        for name, r in res.items():
            print(f"| {name} | {r['step_s']:.3f} | {100 * r['wait_share']:.2f}% |")
        print(f"\nall objectives / plain MLM step time: {knowledge['step_s'] / plain['step_s']:.2f}x (target <= 1.3x)")
        return 0
    if args.part == "denoise":
        print(f"planted noise {args.noise:.0%}, {args.seeds} seeds, after {args.steps} steps of training")
        print("| filter | precision | recall |\n|---|---|---|")
        for name, runs in res.items():
            print(f"| {name} | {_fmt([r['precision'] for r in runs])} | {_fmt([r['recall'] for r in runs])} |")
        return 0
    cols = ["non_entity_loss", "entity_exact", "entity_token", "triple_exact", "triple_token", "mention_f1", "spo_rank"]
    print("| variant | non-entity MLM loss | masked-entity exact match | (per token) | triple completion | (per token) "
          "| mention F1 | SPO rank acc |")
    print("|---|---|---|---|---|---|---|---|")
    for name, runs in res.items():
        print(f"| {name} | " + " | ".join(_fmt([r[c] for r in runs]) for c in cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

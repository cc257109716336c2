"""The one training loop for every method, evaluation, and the finetuned folder (save and load).

A finetuned folder is a transformers folder (config.json, model.safetensors, tokenizer) plus
`finetune_head.safetensors` (the method's own tensors: heads, prompts, centroids) and
`finetune.json` (method, labels, options such as template and verbalizer, metrics). `load`
rebuilds the same method from it; `rapidnlp predict` uses nothing else.
"""
from __future__ import annotations

import copy
import json
import os
import random
import shutil
import time

import torch

from rapidnlp.errors import UserError

HEAD_FILE = "finetune_head.safetensors"
META_FILE = "finetune.json"


def batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


@torch.no_grad()
def predict_logits(method, examples, batch_size: int = 32, timings: list | None = None) -> torch.Tensor:
    method.eval()
    out = []
    for batch in batches(examples, batch_size):
        start = time.perf_counter()
        out.append(method.logits(batch))
        if timings is not None:
            timings.append(time.perf_counter() - start)
    return torch.cat(out)


def accuracy(method, examples, batch_size: int = 32) -> float:
    pred = predict_logits(method, examples, batch_size).argmax(-1)
    gold = torch.tensor([method.labels.index(e.label) for e in examples])
    return (pred == gold).float().mean().item()


def fit(method, train, dev=None, *, epochs: int = 20, batch_size: int = 8, lr: float = 1e-4, seed: int = 0,
        weight_decay: float = 0.01, log=print) -> dict:
    """AdamW with linear decay; with dev data, the epoch of best dev accuracy is kept."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    params = [p for p in method.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    total = epochs * ((len(train) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: max(0.0, 1 - step / max(total, 1)))
    curve, best, best_state = [], -1.0, None
    order = list(train)
    for epoch in range(epochs):
        method.before_epoch(train)
        method.train()
        rng.shuffle(order)
        epoch_loss = []
        for batch in batches(order, batch_size):
            loss = method.loss(batch)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            epoch_loss.append(loss.item())
        curve.append(sum(epoch_loss) / len(epoch_loss))
        if dev:
            method.eval()
            method.after_fit(train)
            acc = accuracy(method, dev)
            if acc > best:
                best, best_state = acc, copy.deepcopy(method.state_dict())
            log(f"epoch {epoch + 1}/{epochs}: loss {curve[-1]:.4f}, dev accuracy {acc:.4f}")
        else:
            log(f"epoch {epoch + 1}/{epochs}: loss {curve[-1]:.4f}")
    if best_state is not None:
        method.load_state_dict(best_state)
    method.eval()
    method.after_fit(train)
    metrics = {"loss_curve": [round(x, 6) for x in curve], "epochs": epochs}
    if dev:
        metrics["dev_accuracy"] = best
    return metrics


def save(method, out: str, metrics: dict, extra_meta: dict | None = None) -> None:
    from safetensors.torch import save_file

    method = method.saved()
    if os.path.exists(out) and os.listdir(out):
        raise UserError(f"{out}: exists and is not empty; choose a new output folder")
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    method.lm.model.save_pretrained(tmp)
    method.tok.save_pretrained(tmp)
    head = {k: v.detach().contiguous() for k, v in method.state_dict().items() if not k.startswith("lm.")}
    save_file(head, os.path.join(tmp, HEAD_FILE))
    meta = {"method": method.options.get("method", method.name), "labels": method.labels,
            "template": method.options.get("template"), "verbalizer": method.options.get("verbalizer"),
            "options": method.options, "metrics": metrics, **(extra_meta or {})}
    with open(os.path.join(tmp, META_FILE), "w", encoding="utf-8") as f:
        json.dump(meta, f, ensure_ascii=False, indent=1)
    if os.path.isdir(out):
        os.rmdir(out)
    os.replace(tmp, out)


def build(name: str, model_dir: str, labels: list[str], options: dict):
    """A fresh method `name` over the masked LM in model_dir."""
    from rapidnlp.finetune.methods import METHODS
    from rapidnlp.finetune.model import MaskedLM, load_model, load_tokenizer

    if name not in METHODS:
        raise UserError(f"unknown method '{name}' (known: {', '.join(sorted(METHODS))})")
    tok = load_tokenizer(model_dir) if os.path.isdir(model_dir) else None
    lm = MaskedLM(load_model(model_dir))
    return METHODS[name](lm, tok, labels, {**options, "method": name})


def load(out: str):
    """The method saved in a finetuned folder, in eval mode."""
    from safetensors.torch import load_file

    path = os.path.join(out, META_FILE)
    if not os.path.isfile(path):
        raise UserError(f"{out}: not a finetuned folder (no {META_FILE}); train one with `rapidnlp finetune`")
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    method = build(meta["method"], out, meta["labels"], meta["options"])
    state = load_file(os.path.join(out, HEAD_FILE))
    for name, value in state.items():  # buffers sized by the training data (centroids, features)
        owner, _, attr = name.rpartition(".")
        module = method.get_submodule(owner) if owner else method
        if attr in module._buffers:
            module._buffers[attr] = value
    missing, unexpected = method.load_state_dict(state, strict=False)
    own_missing = [k for k in missing if not k.startswith("lm.")]
    if own_missing or unexpected:
        raise UserError(f"{out}: {HEAD_FILE} does not match method '{meta['method']}' "
                        f"(missing {own_missing[:3]}, unexpected {unexpected[:3]})")
    method.meta = meta
    return method.eval()

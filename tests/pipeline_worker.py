"""A worker for the pipeline-parallel tests: one launched world runs several layouts.

    python tests/pipeline_worker.py SPEC.json OUT.json

SPEC: {"data": PREFIX, "base": {"section.field": value, ...},
       "runs": [{"name": ..., "overrides": {...}, "knowledge": bool}, ...]}
A run with "knowledge" trains with the dummy knowledge injection below (a side tensor per
sample, a mid-stack module after layer 1, an auxiliary tagging loss). Rank 0 writes OUT:
{name: {"rows": [metric rows], "seconds": wall time}}. The loop over runs, the configs and the
ending through shutdown() are train_worker.run_layouts'.
"""
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from rapidnlp.config import Config
from rapidnlp.distributed.mesh import ParallelDims
from train_worker import run_layouts

warnings.filterwarnings("ignore")

ENTITIES = 7  # dummy entity vocabulary
TAGS = 3


class DummyFusion(nn.Module):
    """x + tanh(gate(x + sequence mean)) * entity(entity_ids): uses a side tensor and the whole
    sequence (the masked mean), as a knowledge-fusion module would."""

    def __init__(self, cfg):
        super().__init__()
        self.entity = nn.Embedding(ENTITIES, cfg.hidden_size)
        self.gate = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        nn.init.normal_(self.entity.weight, std=0.02)

    def forward(self, x, key_mask, extras):
        m = key_mask[..., None].to(x.dtype)
        mean = (x * m).sum(1, keepdim=True) / m.sum(1, keepdim=True)
        return x + torch.tanh(self.gate(x + mean)) * self.entity(extras["entity_ids"])


class DummyTagger(nn.Module):
    """Per-token tagging over the final hidden states; per sample the mean over its tagged tokens,
    summed over the micro-batch."""

    def __init__(self, cfg):
        super().__init__()
        self.proj = nn.Linear(cfg.hidden_size, TAGS)

    def forward(self, hidden, key_mask, extras):
        tags = extras["tags"]
        ce = F.cross_entropy(self.proj(hidden).flatten(0, 1).float(), tags.flatten(), ignore_index=-100,
                             reduction="none").view(tags.shape)
        return (ce.sum(1) / (tags != -100).sum(1).clamp(min=1)).sum()


class WithExtras:
    """A sample builder whose batches also carry the dummy side tensors (pure functions of the tokens)."""

    def __init__(self, builder):
        self.builder = builder

    def __len__(self):
        return len(self.builder)

    def collate(self, indices):
        batch = self.builder.collate(indices)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        batch["entity_ids"] = ids % ENTITIES
        batch["tags"] = torch.where(mask.bool(), ids % TAGS, torch.full_like(ids, -100))
        return batch


def dummy_injection():
    from rapidnlp.parallel.pipeline import Injection

    return Injection(extras=("entity_ids", "tags"), mid_stack={1: DummyFusion}, aux_heads={"tagging": DummyTagger})


def pipeline_run(run: dict, config: Config) -> dict:
    from rapidnlp.train.trainer import Data, Trainer, load_data

    started = time.perf_counter()
    data = load_data(config)
    injection = None
    if run.get("knowledge"):
        data = Data(train=WithExtras(data.train), val=WithExtras(data.val) if data.val is not None else None, special=data.special)
        injection = dummy_injection()
    trainer = Trainer(config, ParallelDims.from_config(config.parallel), data=data, injection=injection,
                      stream=open("/dev/null", "w"))
    rows = trainer.fit()
    return {"rows": rows, "seconds": time.perf_counter() - started}


if __name__ == "__main__":
    run_layouts(pipeline_run, timeout_s=300)

"""Activation accounting on the `base` config (12 x 768): activation checkpointing lowers the
measured peak of saved activations, and the counter releases what backward frees."""
import torch

from conftest import REPO
from rapidnlp.config import load_config
from rapidnlp.model.bert import BertForMLM
from rapidnlp.parallel.activation_checkpoint import apply_activation_checkpointing
from rapidnlp.train.memory import ActivationCounter


def _peak_bytes(mode: str, steps: int = 1) -> int:
    cfg = load_config(str(REPO / "configs" / "base.toml")).model
    cfg.vocab_size = 1024
    torch.manual_seed(0)
    model = BertForMLM(cfg)
    apply_activation_checkpointing(model, mode)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 1024, (2, 128), generator=g)
    mask = torch.ones(2, 128, dtype=torch.long)
    positions = torch.randint(0, 128, (2, 20), generator=g)
    counter = ActivationCounter()
    with counter.track():
        for _ in range(steps):  # micro-batches one after another: the peak is one micro-batch's
            model.mlm_logits(ids, torch.zeros_like(ids), mask, positions).float().pow(2).mean().backward()
    assert counter._live == 0  # everything saved was released by the backward
    return counter.bytes


def test_activation_checkpointing_lowers_the_base_peak():
    none, selective, full = (_peak_bytes(mode) for mode in ("none", "selective", "full"))
    # full keeps each block's input (2 x 128 x 768 fp32 = 768 KiB) out of the ~ 20 block tensors
    assert full < 0.15 * none, (full, none)
    # selective drops the attention probabilities (2 x 12 x 128 x 128 per block, dropout mask too)
    assert selective < 0.9 * none, (selective, none)
    assert _peak_bytes("none", steps=2) == none


def test_memory_bench_script_runs():
    """scripts/bench_memory.py at small sizes: both tables print, the loss target is met (exit 0);
    it runs the reference paths (no interpreter) as on any CPU."""
    import os
    import subprocess
    import sys

    from conftest import clean_env

    env = clean_env()
    env.pop("TRITON_INTERPRET", None)
    args = ["--tokens", "512", "--vocab", "2048", "--hidden", "64",
            "--config", str(REPO / "configs" / "tiny.toml"), "--batch", "2", "--seq", "64"]
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_memory.py"), *args],
                          capture_output=True, text=True, env=env, timeout=300, cwd=os.getcwd())
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "fused / unfused peak" in done.stdout and ": met" in done.stdout
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith(("false ", "true "))]
    assert [(r[0], r[1]) for r in rows] == [(f, m) for f in ("false", "true") for m in ("none", "selective", "full")]
    peak = {(r[0], r[1]): float(r[3]) for r in rows}  # saved for backward, MiB
    assert peak[("false", "full")] < peak[("false", "selective")] <= peak[("false", "none")]

"""What rank 0 reports: one JSON object per optimizer step in <run_dir>/metrics.jsonl, a progress
line on stdout, and optionally TensorBoard scalars.

metrics.jsonl is only ever appended to: a resumed run continues the same file.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time

import torch


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA's max allocated bytes on GPU; the process's peak resident set on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class MetricsWriter:
    def __init__(self, run_dir: str, total_steps: int, *, enabled: bool, tensorboard: bool = False, stream=None):
        self.enabled = enabled
        self.total_steps = total_steps
        self.stream = stream or sys.stdout
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.started = time.perf_counter()
        self.first_step = 0  # the step the clock started at (a resumed run starts late)
        self.tb = None
        if enabled:
            os.makedirs(run_dir, exist_ok=True)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter  # optional dependency

                self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def start(self, step: int) -> None:
        """Start the ETA clock at this step (training is about to begin)."""
        self.first_step, self.started = step, time.perf_counter()

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, row["step"])

    def progress(self, row: dict) -> None:
        if not self.enabled:
            return
        step = row["step"]
        per_step = (time.perf_counter() - self.started) / (step - self.first_step)
        eta = _duration(per_step * (self.total_steps - step))
        val = f" | val {row['val_loss']:.4f}" if "val_loss" in row else ""
        parts = {k[len("loss_"):]: v for k, v in row.items() if k.startswith("loss_") and k != "loss_scale"}
        each = f" ({', '.join(f'{k} {v:.4f}' for k, v in parts.items())})" if len(parts) > 1 else ""
        print(
            f"step {step}/{self.total_steps} | loss {row['loss']:.4f}{each}{val} | lr {row['lr']:.2e} | "
            f"grad_norm {_num(row['grad_norm'])} | {row['tokens_per_s']:,.0f} tok/s | ETA {eta}",
            file=self.stream, flush=True,
        )

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _num(value) -> str:
    return "skipped" if value is None else f"{value:.3f}"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s"

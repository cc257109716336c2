"""Device peak FLOPs, from the GPU table (rapidnlp/plan/hardware.py). MFU = achieved model FLOPs
(rapidnlp/model/flops.py) / peak.
"""
from __future__ import annotations

import torch

from rapidnlp.plan.hardware import GPUS


# Dense bf16 tensor-core peaks per device (no sparsity), in FLOP/s: the GPU table's.
PEAK_BF16_FLOPS = {g.name: g.peak_flops for g in GPUS.values()}


def peak_flops(device: torch.device, configured_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of one device: the configured value if given, else the table; None if unknown."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if key in name:
            return PEAK_BF16_FLOPS[key]
    return None

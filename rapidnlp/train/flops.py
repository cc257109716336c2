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


def gemm_rate(shapes: list[tuple[int, int, int]], dtype: torch.dtype, device: torch.device,
              seconds: float = 0.5) -> float:
    """FLOP/s of the GEMMs (m, k, n) run back to back on this device in `dtype`, measured now.
    The median over rounds of the whole set, repeated for about `seconds` after one warm-up
    round (a median, as the benchmarks take of their steps, so a busy machine slows both alike)."""
    import statistics
    import time

    pairs = [(torch.randn(m, k, device=device).to(dtype), torch.randn(k, n, device=device).to(dtype))
             for m, k, n in shapes]
    flops = sum(2.0 * m * k * n for m, k, n in shapes)

    def one_round() -> float:
        _sync(device)
        start = time.perf_counter()
        for a, b in pairs:
            a @ b
        _sync(device)
        return time.perf_counter() - start

    first = one_round()
    repeats = max(3, min(1000, int(seconds / max(first, 1e-6))))
    return flops / statistics.median(one_round() for _ in range(repeats))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_bf16_units() -> str | None:
    """The bf16 matrix units this CPU has (AMX or AVX-512 bf16, from /proc/cpuinfo), or None."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return None
    return "AMX" if "amx_bf16" in flags else "AVX-512 bf16" if "avx512_bf16" in flags else None


def auto_precision(device: torch.device) -> tuple[str, str]:
    """train.precision = auto: (precision, why). bf16 autocast where the device has bf16 units
    (a CUDA GPU that supports it; a CPU with AMX or AVX-512 bf16), fp32 elsewhere."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ("bf16", "this GPU supports bf16") if ok else ("fp32", "this GPU has no bf16")
    units = cpu_bf16_units()
    return ("bf16", f"this CPU has {units}") if units else ("fp32", "this CPU has no bf16 units")


def cpu_low_precision_speedup(dtype: torch.dtype, size: int = 384, trials: int = 5) -> float:
    """How much faster a `dtype` (bf16, fp16) GEMM runs than an fp32 one on this CPU, from a
    short probe (0.1-1 s): the best of a few alternating trials of each, so that another process
    taking the core slows neither side's best. CPUs differ: with AMX or AVX512-BF16 bf16 ran 4x
    faster than fp32 on the project's machines, without them 66x slower."""
    shape, cpu = [(size, size, size)], torch.device("cpu")
    best = {dtype: 0.0, torch.float32: 0.0}
    for _ in range(trials):
        for d in best:
            best[d] = max(best[d], gemm_rate(shape, d, cpu, seconds=0.005))
    return best[dtype] / best[torch.float32]

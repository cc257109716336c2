"""The GPU table: the one place device figures live (datasheet peaks, measured GEMM ceilings,
HBM, collective bandwidths). `rapidnlp.train.flops` reads its peaks from here.

Every figure is a datasheet value or a published micro-benchmark, never a number fitted to the
training results the planner is validated against (README, "How the planner is validated").
Sources:
- peak_flops, hbm_gib, hbm_gbps: NVIDIA datasheets (A100 SXM4 40/80 GB; H100 SXM5 80 GB; H100
  PCIe; H200 SXM 141 GB), dense bf16 tensor-core rate without sparsity.
- gemm_flops: the maximum achievable matmul FLOP/s (bf16, the best over shapes, torch.mm through
  cuBLAS) of Stas Bekman's "Machine Learning Engineering" MAMF table: A100 SXM 267.9 TFLOP/s
  (85.9% of peak), H100 SXM 792.1 (80.1%); H200 has H100's SMs and clocks: the same ceiling;
  H100 PCIe scaled by its peak.
- stream_fraction: achievable/datasheet HBM bandwidth of a streaming copy (BabelStream on A100 and
  H100: ~90%).
- intra_busbw: nccl-tests all_reduce_perf bus bandwidth inside one NVSwitch node at large
  messages (DGX A100: ~230 GB/s of NVLink3's 300 GB/s per direction; DGX H100: ~370 GB/s without
  NVLS, of NVLink4's 450 GB/s).
- inter_busbw: nccl-tests bus bandwidth per GPU across nodes with one NIC per GPU (DGX A100:
  8 x HDR 200 Gb/s = 25 GB/s line rate per GPU, ~23 GB/s measured; DGX H100: 8 x NDR 400 Gb/s =
  50 GB/s, ~45 GB/s measured).
- latency_s: one collective's or p2p's fixed cost (nccl-tests small-message times: ~10 us inside
  a node, ~20 us across nodes).
"""
from __future__ import annotations

from dataclasses import dataclass

from rapidnlp.errors import UserError


@dataclass(frozen=True)
class GPU:
    name: str  # what torch.cuda.get_device_name contains
    peak_flops: float  # dense bf16, FLOP/s
    gemm_flops: float  # achievable large-GEMM bf16 rate, FLOP/s
    hbm_gib: float
    hbm_gbps: float  # datasheet HBM bandwidth, GB/s
    intra_busbw: float  # GB/s, all-reduce bus bandwidth inside a node
    inter_busbw: float  # GB/s per GPU, across nodes
    stream_fraction: float = 0.9
    intra_latency_s: float = 10e-6
    inter_latency_s: float = 20e-6

    @property
    def hbm_bytes_per_s(self) -> float:
        return self.hbm_gbps * 1e9 * self.stream_fraction


GPUS = {
    "a100-40g": GPU("A100", 312e12, 267.9e12, 40, 1555, 230, 23),
    "a100-80g": GPU("A100", 312e12, 267.9e12, 80, 2039, 230, 23),
    "h100-pcie": GPU("H100 PCIe", 756e12, 756e12 * 0.801, 80, 2000, 230, 45),
    "h100": GPU("H100", 989e12, 792.1e12, 80, 3350, 370, 45),
    "h200": GPU("H200", 989e12, 792.1e12, 141, 4800, 370, 45),
}


def gpu(key: str) -> GPU:
    if key not in GPUS:
        raise UserError(f"--gpu {key}: unknown; choose one of {', '.join(GPUS)}")
    return GPUS[key]

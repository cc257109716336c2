"""Model FLOPs and device peak FLOPs: the one place each is defined.

MFU = achieved model FLOPs / peak. Model FLOPs count what the model needs, not what the
implementation does (activation recomputation does not raise them), as in Megatron-LM and
torchtitan.
"""
from __future__ import annotations

import torch

from rapidnlp.config import ModelConfig

# Dense bf16 tensor-core peaks per device (no sparsity), in FLOP/s.
PEAK_BF16_FLOPS = {
    "A100": 312e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM
    "H200": 989e12,
}


def training_flops_per_sequence(cfg: ModelConfig, seq_len: int, predictions: int) -> float:
    """Forward + backward FLOPs for one sequence of seq_len tokens with `predictions` MLM positions.

    Matmuls cost 2 FLOPs per multiply-add forward and twice that backward: 6 x matmul parameters
    per token. Per layer: q, k, v, output (4 h^2) and the MLP (2 h f). Attention scores and the
    weighted sum add 2 x 2 s h per token forward (12 s h per token for training). The MLM head
    (dense h^2 and decoder h V) runs only at the predicted positions. Embedding lookups, norms and
    element-wise work are not counted.
    """
    h, f, layers, vocab = cfg.hidden_size, cfg.ffn_size, cfg.num_layers, cfg.padded_vocab_size
    per_token = 6 * layers * (4 * h * h + 2 * h * f) + 12 * layers * seq_len * h
    head = 6 * (h * h + h * vocab) * predictions
    return float(per_token * seq_len + head)


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

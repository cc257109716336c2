"""Model FLOPs: the one place they are defined (MFU, the pipeline split and the planner use it).

Model FLOPs count what the model needs, not what the implementation does (activation
recomputation does not raise them), as in Megatron-LM and torchtitan.
"""
from __future__ import annotations

from rapidnlp.config import ModelConfig


def encoder_flops_per_sequence(cfg: ModelConfig, seq_len: int, num_layers: int | None = None) -> float:
    """Forward + backward FLOPs of the encoder blocks for one sequence of seq_len tokens.

    Matmuls cost 2 FLOPs per multiply-add forward and twice that backward: 6 x matmul parameters
    per token. Per layer: q, k, v, output (4 h^2) and the MLP (2 h f). Attention scores and the
    weighted sum add 2 x 2 s h per token forward (12 s h per token for training). Embedding
    lookups, norms and element-wise work are not counted.
    """
    h, f = cfg.hidden_size, cfg.ffn_size
    layers = cfg.num_layers if num_layers is None else num_layers
    per_token = 6 * layers * (4 * h * h + 2 * h * f) + 12 * layers * seq_len * h
    return float(per_token * seq_len)


def training_flops_per_sequence(cfg: ModelConfig, seq_len: int, pieces=()) -> float:
    """The encoder plus every module the objectives add (each `Piece` states its own FLOPs;
    the MLM head's are 6 (h^2 + h V) per masked position)."""
    return encoder_flops_per_sequence(cfg, seq_len) + sum(p.flops_per_sequence for p in pieces)


def dense_flops(in_features: int, out_features: int, tokens: int) -> float:
    """Training FLOPs of a Linear applied to `tokens` vectors (forward 2, backward 4 per MAC)."""
    return 6.0 * in_features * out_features * tokens

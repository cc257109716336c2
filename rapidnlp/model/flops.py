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
    layers = cfg.num_layers if num_layers is None else num_layers
    return layers * layer_flops_per_sequence(cfg.hidden_size, cfg.ffn_size, seq_len)


def layer_flops_per_sequence(h: int, f: int, seq_len: int) -> float:
    """One encoder block, forward + backward, one sequence (see encoder_flops_per_sequence)."""
    return float((6 * (4 * h * h + 2 * h * f) + 12 * seq_len * h) * seq_len)


def recompute_flops_per_sequence(layers: int, h: int, f: int, seq_len: int, mode: str) -> float:
    """What activation checkpointing adds (hardware FLOPs, not model FLOPs): `full` runs each
    block's forward again (a third of its training FLOPs), `selective` the attention core's
    (scores and weighted sum: 4 s^2 h per block). With full recomputation the encoder and the
    logits give Megatron-LM's count, 96 B s l h^2 (1 + s / 6h + V / 16 l h) (Narayanan et al. 2021)."""
    if mode == "full":
        return layers * layer_flops_per_sequence(h, f, seq_len) / 3
    if mode == "selective":
        return layers * 4.0 * seq_len * seq_len * h
    return 0.0


def training_flops_per_sequence(cfg: ModelConfig, seq_len: int, pieces=()) -> float:
    """The encoder plus every module the objectives add (each `Piece` states its own FLOPs;
    the MLM head's are 6 (h^2 + h V) per masked position)."""
    return encoder_flops_per_sequence(cfg, seq_len) + sum(p.flops_per_sequence for p in pieces)


def dense_flops(in_features: int, out_features: int, tokens: int) -> float:
    """Training FLOPs of a Linear applied to `tokens` vectors (forward 2, backward 4 per MAC)."""
    return 6.0 * in_features * out_features * tokens

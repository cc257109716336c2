"""A BERT-style masked-LM encoder with pre-LayerNorm blocks (Megatron's BERT).

Weights map one to one onto transformers' `MegatronBertForMaskedLM` (see rapidnlp/convert/hf.py):
embeddings (word + position + token type, no LayerNorm), N pre-LN blocks, a final LayerNorm,
and the MLM head (dense, GeLU, LayerNorm, decoder tied to the word embedding). Pre-LN is what
keeps 1.5B-parameter BERTs trainable (Megatron-LM, Shoeybi et al. 2019).

The MLM head runs only at the masked positions (a fixed number per sequence, padded with
label -100), as NVIDIA's BERT does: the vocabulary projection is the largest matmul of a
small BERT and most of its rows would be thrown away.

With `model.fused_kernels = true` (rapidnlp/kernels): LayerNorms run the fused LayerNorm, the
MLP's fc1 bias rides in the bias-GeLU kernel, and each residual branch's dropout and add are
one kernel (the branches then skip their own dropout). Parameters and state_dict keys are the
same either way. Attention stays on SDPA.

This module knows nothing of parallelism: it imports nothing from torch.distributed.
Attention reshapes with -1 heads so that column-parallel q/k/v (rapidnlp/parallel/) simply see
fewer heads; the embedding/decoder tie is restored after sharding by `tie_weights()`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rapidnlp import kernels
from rapidnlp.config import ModelConfig


def layer_norm(cfg: ModelConfig) -> nn.LayerNorm:
    return (kernels.LayerNorm if cfg.fused_kernels else nn.LayerNorm)(cfg.hidden_size, eps=cfg.layer_norm_eps)


def branch_dropout(cfg: ModelConfig) -> nn.Module:
    # Fused: Block applies the residual dropout, in one kernel with the residual add.
    return nn.Identity() if cfg.fused_kernels else nn.Dropout(cfg.dropout)


class Embeddings(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.padded_vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(positions)
        return self.dropout(x)


class AttentionCore(nn.Module):
    """softmax(q k^T / sqrt(d) + mask) v, through SDPA. A module of its own, without parameters,
    so that selective activation checkpointing can recompute just this (Megatron's choice: the
    attention core's activations grow with s^2 and cost the fewest FLOPs to redo)."""

    def __init__(self, dropout: float):
        super().__init__()
        self.dropout = dropout

    def forward(self, q, k, v, key_mask: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=key_mask[:, None, None, :], dropout_p=self.dropout if self.training else 0.0
        )


class Attention(nn.Module):
    """Self-attention through SDPA; returns the projected output, without the residual."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.core = AttentionCore(cfg.attention_dropout)
        self.dropout = branch_dropout(cfg)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, s, -1, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        out = self.core(q, k, v, key_mask).transpose(1, 2).reshape(b, s, -1)
        return self.dropout(self.dense(out))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.ffn_size)
        self.fc2 = nn.Linear(cfg.ffn_size, cfg.hidden_size)
        self.dropout = branch_dropout(cfg)
        self.fused = cfg.fused_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A tp-sharded fc1 (its weight a DTensor) keeps its own forward, where its sharding hooks run.
        if self.fused and type(self.fc1.weight) is nn.Parameter:
            return self.dropout(self.fc2(kernels.bias_gelu(F.linear(x, self.fc1.weight), self.fc1.bias)))
        return self.dropout(self.fc2(F.gelu(self.fc1(x))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = layer_norm(cfg)
        self.attention = Attention(cfg)
        self.mlp_norm = layer_norm(cfg)
        self.mlp = MLP(cfg)
        self.fused = cfg.fused_kernels
        self.residual_dropout = cfg.dropout

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        if self.fused:
            p = self.residual_dropout
            x = kernels.dropout_add(self.attention(self.attention_norm(x), key_mask), x, p, self.training)
            return kernels.dropout_add(self.mlp(self.mlp_norm(x)), x, p, self.training)
        x = x + self.attention(self.attention_norm(x), key_mask)
        return x + self.mlp(self.mlp_norm(x))


class MLMHead(nn.Module):
    """Gathers the hidden states at the masked positions, then transform + vocabulary decoder."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = layer_norm(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.padded_vocab_size)

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        index = positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        x = torch.gather(hidden, 1, index)
        return self.decoder(self.norm(F.gelu(self.dense(x))))


class BertForMLM(nn.Module):
    """embeddings -> blocks -> final norm -> MLM head at masked positions -> logits [b, P, V]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        # A dict keyed by layer number keeps parameter names stable when a pipeline stage
        # drops the layers it does not own.
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.num_layers)})
        self.final_norm = layer_norm(cfg)
        self.lm_head = MLMHead(cfg)
        self.tie_weights()
        self.init_weights()

    def tie_weights(self) -> None:
        self.lm_head.decoder.weight = self.embeddings.word_embeddings.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) weights; residual output projections scaled by 1/sqrt(2 * layers)."""
        std = self.cfg.init_std
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                scaled = name.endswith("attention.dense") or name.endswith("mlp.fc2")
                if not name.endswith("lm_head.decoder"):  # tied: initialised as the embedding
                    module.weight.normal_(0.0, std / math.sqrt(2 * self.cfg.num_layers) if scaled else std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()

    def encode(self, input_ids, token_type_ids, attention_mask) -> torch.Tensor:
        """The encoder alone: final-normed hidden states [b, s, h]."""
        key_mask = attention_mask.bool()
        x = self.embeddings(input_ids, token_type_ids)
        for block in self.layers.values():
            x = block(x, key_mask)
        return self.final_norm(x)

    def forward(self, input_ids, token_type_ids, attention_mask, mlm_positions) -> torch.Tensor:
        return self.lm_head(self.encode(input_ids, token_type_ids, attention_mask), mlm_positions)


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts of a model built on the meta device (no memory is allocated)."""
    with torch.device("meta"):
        model = BertForMLM(cfg)
    total = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    embedding = sum(p.numel() for p in model.embeddings.parameters())
    blocks = sum(p.numel() for p in model.layers.parameters())
    return {"total": total, "embedding": embedding, "blocks": blocks, "non_embedding": total - embedding}

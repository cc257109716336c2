"""Triton-fused kernels (installed as rapidnlp.kernels), each beside its PyTorch reference.

| function | fuses | module |
|---|---|---|
| `bias_gelu(x, bias, approximate)` | x + bias, GeLU (erf or tanh); backward: dx and dbias in one pass | `gelu` |
| `bias_dropout_add(x, bias, residual, p)` | x + bias, Philox dropout, + residual; mask recomputed in backward | `dropout` |
| `layer_norm`, `rms_norm`, `LayerNorm`, `RMSNorm` | statistics in fp32, any hidden size | `norms` |
| `scaled_masked_softmax(x, mask, scale)` | scale, boolean mask, softmax; all-masked rows are zeros | `softmax` |
| `cross_entropy`, `linear_cross_entropy` | vocabulary-chunked MLM loss, ignore_index -100, vocab-parallel partials | `losses` |

Every function takes the Triton path for CUDA tensors (and for CPU tensors when the kernels
were imported under TRITON_INTERPRET=1) and the PyTorch reference otherwise; see
`dispatch.py`. `launch_counts()` says how often each Triton kernel ran.

Names are resolved lazily (PEP 562): importing this package (the encoder does) imports neither
triton nor a kernel module; the first use of a kernel does. The package works without triton.
"""
from __future__ import annotations

import importlib

# Module names differ from function names: importing a submodule binds its name on the package.
_WHERE = {
    "bias_gelu": "gelu",
    "bias_dropout_add": "dropout", "dropout_add": "dropout", "dropout_keep_mask": "dropout",
    "layer_norm": "norms", "rms_norm": "norms", "LayerNorm": "norms", "RMSNorm": "norms",
    "scaled_masked_softmax": "softmax",
    "cross_entropy": "losses", "linear_cross_entropy": "losses",
    "HAVE_TRITON": "dispatch", "INTERPRET": "dispatch", "launch_counts": "dispatch",
    "reset_launch_counts": "dispatch", "use_triton": "dispatch", "reference_only": "dispatch",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'rapidnlp.kernels' has no attribute {name!r}")
    return getattr(importlib.import_module(f"rapidnlp.kernels.{_WHERE[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))

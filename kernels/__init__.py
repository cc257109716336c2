"""Triton-fused kernels (installed as rapidnlp.kernels), each beside its PyTorch reference."""

"""Triton kernels and their plain-PyTorch references (installed as dar_fast.kernels)."""

"""Triton flash attention kernels (installed as ``flashattn_py.kernels``).

``flash_fwd`` / ``flash_bwd`` are plain launchers over tensors (q (B, Sq, H, D),
k (B, Sk, Hk, D), v (B, Sk, Hk, Dv), any strides); the API layer validates input.
"""
from .bwd import flash_bwd
from .fwd import flash_fwd

__all__ = ["flash_fwd", "flash_bwd"]

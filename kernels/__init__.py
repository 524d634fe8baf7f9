"""Triton flash attention kernels (installed as ``flashattn_py.kernels``).

``flash_fwd`` / ``flash_bwd`` are plain launchers over tensors (q (B, Sq, H, D),
k (B, Sk, Hk, D), v (B, Sk, Hk, Dv), any strides); the API layer validates input.
Packed sequences (``cu_seqlens_q`` / ``cu_seqlens_k``, ``seqused_k``) and paged K/V
(``block_table``, forward only) run in the same single launch, dense being the case
without them; per-sequence addressing is ``common.seq_info`` (csrc/flash_params.h seq_view).
KV-cache decoding (``kv_batch_idx``, ``leftpad_k``, forward only) goes through the same
view; calls with few query rows (Sq <= 8, or ``num_splits`` > 1) run the split-KV decode
kernel (``fwd._decode_kernel``: all query heads of a KV head per program, GQA packing;
key splits merged by ``fwd._combine_kernel``).
Optional attention bias / bool mask (B, H, Sq, Sk) read through its strides, and
Philox dropout keyed by ``rng_state`` = [seed, offset]; ``dropout_mask`` returns the keep
mask the kernels draw for a given ``rng_state`` (test hook).
"""
from .bwd import flash_bwd
from .common import dropout_mask
from .fwd import flash_fwd

__all__ = ["flash_fwd", "flash_bwd", "dropout_mask"]

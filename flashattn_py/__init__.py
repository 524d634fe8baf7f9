"""flashattn_py: fused (flash) attention for PyTorch on CPU (C++), Triton and CUDA.

Public names only; see README.md for the API and docs/design.md for the semantics.
"""
import warnings as _warnings

from .api import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    scaled_dot_product_attention,
    varlen_attn,
    varlen_attn_out,
)
from . import nn
from .kvcache import flash_attn_with_kvcache
from .rotary import apply_rotary_emb
from .partial import attention_backward, attention_forward, merge_attention
from .backends import available_backends, compiled_ops_error as _compiled_ops_error, empty_cpu_cache, use_backend
from .errors import ArgumentError
from .patch import patch_sdpa, unpatch_sdpa
from .alias import install_as_flash_attn

if _compiled_ops_error():
    _warnings.warn(
        f"flashattn_py: {_compiled_ops_error()}; CPU calls fall back to the reference "
        "(O(N^2) memory) and CUDA calls to triton. Build it with "
        "`pip install --no-build-isolation -e .`.",
        stacklevel=2,
    )

__all__ = [
    "ArgumentError",
    "apply_rotary_emb",
    "attention_backward",
    "attention_forward",
    "available_backends",
    "empty_cpu_cache",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
    "install_as_flash_attn",
    "merge_attention",
    "nn",
    "patch_sdpa",
    "scaled_dot_product_attention",
    "unpatch_sdpa",
    "use_backend",
    "varlen_attn",
    "varlen_attn_out",
]
__version__ = "0.1.0"

"""A Hugging Face transformers attention backend: ``attn_implementation="fattn_py"``.

    from flashattn_py.integrations.transformers import register
    register()                   # returns the name, "fattn_py"
    model = AutoModelForCausalLM.from_config(config, attn_implementation="fattn_py")
    # or, for a loaded model: model.set_attn_implementation("fattn_py")

The name has no "flash" in it on purpose: transformers treats every implementation whose
name contains "flash" as a flash-attn kernel (``is_flash_attention_requested``): it tries to
import it as one and builds 2-D (unpadded) masks for it. Ours takes SDPA's inputs instead.

``register()`` adds the attention function to transformers' ``AttentionInterface`` and,
when the installed transformers has ``AttentionMaskInterface``, registers its SDPA mask
builder under the same name, so models build the same masks they build for ``"sdpa"``
(None when a pure causal mask can be expressed as ``is_causal``, else a 4-D bool mask with
True = attend, covering padding, sliding windows and packed sequences).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import api
from ..errors import ArgumentError

NAME = "fattn_py"

__all__ = ["NAME", "register", "flashattn_attention_forward"]


def flashattn_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Optional[Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    is_causal: Optional[bool] = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers' attention-function signature.

    Args:
        module: the calling attention module (``is_causal``, ``num_key_value_groups`` read).
        query: (B, H, Sq, D); key, value: (B, Hk, Sk, D) with H % Hk == 0 (GQA).
        attention_mask: None, or 4-D (B or 1, 1 or H, Sq, Sk) bool (True = attend) or
            float (added to the scores).
        scaling: softmax scale, default 1/sqrt(D); dropout: probability (the model passes
            0 outside training). ``is_causal`` overrides ``module.is_causal``.

    Returns:
        ``(attn_output (B, Sq, H, D), None)``: attention weights are never materialised.
    """
    if kwargs.get("softcap") is not None:
        raise ArgumentError("softcap: not supported by the flashattn_py transformers backend (use eager)")
    if kwargs.get("position_bias") is not None:
        raise ArgumentError("position_bias: not supported by the flashattn_py transformers backend (use sdpa or eager)")
    q_len = query.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # As transformers' sdpa: the kernel's causal flag only when there is no mask and more than
    # one query (a single decoding query sees every cached key). Shape check first so that
    # compiled graphs with dynamic shapes keep a plain bool.
    causal = bool(q_len > 1 and attention_mask is None and causal)
    if causal and key.shape[2] > q_len:
        # Prefill into an empty static cache: keys past q_len are unused slots (top-left causal).
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    mask = attention_mask
    if mask is not None and mask.dtype != torch.bool and mask.dtype != query.dtype:
        mask = mask.to(query.dtype)
    out = api.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=float(dropout), is_causal=causal, scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


def register(name: str = NAME) -> str:
    """Register the backend with transformers under ``name``; returns the name.

    Idempotent. Raises ImportError when transformers is not installed, ValueError for a
    name containing "flash" (transformers would treat it as a flash-attn kernel).
    """
    if "flash" in name:
        raise ArgumentError(f"name: must not contain 'flash' (transformers reserves it for flash-attn kernels), "
                         f"got {name!r}")
    from transformers import AttentionInterface

    AttentionInterface.register(name, flashattn_attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # older transformers: masks are built by each model from the sdpa path
        return name
    AttentionMaskInterface.register(name, sdpa_mask)
    return name

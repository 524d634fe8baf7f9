"""A Hugging Face transformers attention backend: ``attn_implementation="fattn_py"``.

    from flashattn_py.integrations.transformers import register
    register()                   # returns the name, "fattn_py"
    model = AutoModelForCausalLM.from_config(config, attn_implementation="fattn_py")
    # or, for a loaded model: model.set_attn_implementation("fattn_py")

The name has no "flash" in it on purpose: transformers treats every implementation whose
name contains "flash" as a flash-attn kernel (``is_flash_attention_requested``): it tries to
import it as one and builds 2-D (unpadded) masks for it. Ours takes SDPA's inputs instead.

``register()`` adds the attention function to transformers' ``AttentionInterface`` and,
when the installed transformers has ``AttentionMaskInterface``, a mask builder under the
same name: transformers' SDPA one (None when a pure causal mask can be expressed as
``is_causal``, else a 4-D bool mask with True = attend, covering padding, sliding windows
and packed sequences), deferred for one-row batches without a padding mask.

Padding-free training (``DataCollatorWithFlattening``: documents packed into one row,
``position_ids`` restarting at each): the attention function finds the documents from
``position_ids`` and runs them through the packed-sequence kernels
(``flash_attn_varlen_func``), one launch, no mask. The deferred mask is built only when a
layer needs it (no packing, or a sliding window).
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
    if isinstance(attention_mask, DeferredMask):
        packed = _packed_documents(kwargs.get("position_ids"), query, module, dict(kwargs, key_len=key.shape[2]))
        if packed is not None:
            return _packed_attention(query, key, value, packed, scaling, dropout, causal), None
        attention_mask = attention_mask.build()
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


class DeferredMask:
    """The mask transformers' SDPA builder would give, built on first use (then kept: the
    layers of one forward share it). Given to models for one-row batches without a padding
    mask, where packed documents need no mask at all (``flashattn_attention_forward``)."""

    def __init__(self, builder, kwargs: dict):
        self._builder, self._kwargs = builder, kwargs
        self._built = False
        self._mask = None

    def build(self) -> Optional[Tensor]:
        if not self._built:
            self._mask, self._built = self._builder(**self._kwargs), True
        return self._mask


def _packed_documents(position_ids: Optional[Tensor], query: Tensor, module, kwargs):
    """(cu_seqlens (docs + 1,) int32, longest) when one row holds several documents
    (``position_ids`` restarting), the layer has no sliding window, and no cache is in use;
    else None. Reads position_ids on the host (as transformers' flash path does)."""
    q_len = query.shape[2]
    if position_ids is None or query.shape[0] != 1 or q_len < 2 or position_ids.shape[-1] != q_len or \
            kwargs.get("key_len", q_len) != q_len:
        return None
    if kwargs.get("sliding_window") is not None or getattr(module, "sliding_window", None) is not None:
        return None
    positions = position_ids.reshape(-1)
    starts = (positions == positions.min()).nonzero().view(-1)
    if starts.numel() < 2:
        return None  # one document: the plain causal call (the deferred mask is None then)
    total = torch.tensor([positions.numel()], device=starts.device)
    cu_seqlens = torch.cat([starts, total]).to(torch.int32)
    return cu_seqlens, int(cu_seqlens.diff().max())


def _packed_attention(query: Tensor, key: Tensor, value: Tensor, packed, scaling, dropout, causal) -> Tensor:
    """The documents of a one-row batch, each attending within itself: (1, S, H, D) out."""
    cu_seqlens, longest = packed
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (S, H, D) views
    out = api.flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, longest, longest, dropout_p=float(dropout),
                                     softmax_scale=scaling, causal=bool(causal))
    return out.unsqueeze(0)


def _deferred_sdpa_mask(batch_size: int, *args, attention_mask: Optional[Tensor] = None, **kwargs):
    """transformers' sdpa_mask, deferred (DeferredMask) for one row without a padding mask."""
    from transformers.masking_utils import sdpa_mask

    if batch_size == 1 and attention_mask is None and not args:
        return DeferredMask(sdpa_mask, dict(kwargs, batch_size=batch_size, attention_mask=None))
    return sdpa_mask(batch_size, *args, attention_mask=attention_mask, **kwargs)


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
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:  # older transformers: masks are built by each model from the sdpa path
        return name
    AttentionMaskInterface.register(name, _deferred_sdpa_mask)
    return name

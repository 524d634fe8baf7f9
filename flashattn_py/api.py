"""Public attention functions: validate, normalise the layout, call ``ops.attention``.

Two conventions, one computation (DESIGN.md "Semantics"):
- ``flash_attn_func``: flash-attn 2's signature, (B, S, H, D), causal aligned bottom-right.
- ``scaled_dot_product_attention``: ``torch.nn.functional``'s exact signature,
  (..., H, S, D), causal aligned top-left.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import backends, ops
from .reference import attention_ref

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, names: tuple[str, str, str], heads_dim: int, seq_dim: int) -> None:
    """Shape, dtype and device checks shared by both conventions (4-D tensors)."""
    nq, nk, nv = names
    for name, t in zip(names, (q, k, v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor, got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name}: dtype must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{nq}, {nk}, {nv}: dtypes must match, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{nq}, {nk}, {nv}: must be on one device, got {q.device}, {k.device}, {v.device}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"{nq}, {nk}, {nv}: batch sizes differ: {q.shape[0]}, {k.shape[0]}, {v.shape[0]}")
    if k.shape[seq_dim] != v.shape[seq_dim]:
        raise ValueError(f"{nk}, {nv}: sequence lengths differ: {k.shape[seq_dim]} vs {v.shape[seq_dim]}")
    if k.shape[heads_dim] != v.shape[heads_dim]:
        raise ValueError(f"{nk}, {nv}: head counts differ: {k.shape[heads_dim]} vs {v.shape[heads_dim]}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{nq}, {nk}: head dims differ: {q.shape[-1]} vs {k.shape[-1]}")
    for name, t in ((nq, q), (nv, v)):
        if not 1 <= t.shape[-1] <= backends.MAX_HEAD_DIM:
            raise ValueError(f"{name}: head dim must be in 1..{backends.MAX_HEAD_DIM}, got {t.shape[-1]}")
    h, hk = q.shape[heads_dim], k.shape[heads_dim]
    if hk == 0 or h % hk != 0:
        raise ValueError(f"{nq}, {nk}: number of query heads ({h}) must be a multiple of key/value heads ({hk})")


def _check_dropout(dropout_p: float) -> None:
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: must be in [0, 1), got {dropout_p}")


def flash_attn_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    backend: str = "auto",
):
    """flash-attn 2's ``flash_attn_func``.

    Args:
        q: (B, Sq, H, D); k: (B, Sk, Hk, D); v: (B, Sk, Hk, Dv); H % Hk == 0 (MQA/GQA),
            D and Dv in 1..256, one floating dtype and device.
        dropout_p: dropout probability on the attention weights (0 at inference).
        softmax_scale: multiplies q.k; default 1/sqrt(D).
        causal: mask keys after the query, the diagonal aligned bottom-right
            (query i sees keys j <= i + Sk - Sq).
        window_size: (left, right) sliding window around that diagonal, -1 = unbounded.
        softcap: > 0 caps scores with ``softcap * tanh(s / softcap)``.
        alibi_slopes: (H,) or (B, H) float32; adds ``-slope * |i + Sk - Sq - j|``.
        deterministic: reproducible backward (the CPU kernel always is).
        return_attn_probs: also return the softmax lse (B, H, Sq) and the attention
            probabilities (B, H, Sq, Sk), the latter from the reference formula (debugging only).
        backend: "auto", "cpu", "triton", "cuda" or "reference".

    Returns:
        out (B, Sq, H, Dv), or ``(out, softmax_lse, probs)`` with ``return_attn_probs``.
    """
    backends.check_backend_name(backend)
    _check_qkv(q, k, v, ("q", "k", "v"), heads_dim=2, seq_dim=1)
    _check_dropout(dropout_p)
    if len(window_size) != 2 or any(int(w) < -1 for w in window_size):
        raise ValueError(f"window_size: expected (left, right) with each >= -1, got {tuple(window_size)}")
    if softcap < 0:
        raise ValueError(f"softcap: must be >= 0, got {softcap}")
    seqlen_q, num_heads, head_dim = q.shape[1], q.shape[2], q.shape[3]
    if alibi_slopes is not None:
        if alibi_slopes.dtype != torch.float32 or alibi_slopes.device != q.device:
            raise ValueError(
                f"alibi_slopes: must be float32 on {q.device}, got {alibi_slopes.dtype} on {alibi_slopes.device}"
            )
        if tuple(alibi_slopes.shape) not in ((num_heads,), (q.shape[0], num_heads)):
            raise ValueError(
                f"alibi_slopes: expected shape ({num_heads},) or ({q.shape[0]}, {num_heads}), "
                f"got {tuple(alibi_slopes.shape)}"
            )
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)
    window_left, window_right = int(window_size[0]), int(window_size[1])
    if causal:
        window_right = 0
    diag_offset = k.shape[1] - seqlen_q
    out, lse = ops.attention(
        q, k, v, scale=scale, softcap=float(softcap), alibi_slopes=alibi_slopes, window_left=window_left,
        window_right=window_right, diag_offset=diag_offset, dropout_p=float(dropout_p),
        deterministic=deterministic, backend=backend,
    )
    if not return_attn_probs:
        return out
    with torch.no_grad():
        _, _, probs = attention_ref(
            q, k, v, scale=scale, softcap=float(softcap), alibi_slopes=alibi_slopes, window_left=window_left,
            window_right=window_right, diag_offset=diag_offset, return_probs=True,
        )
    return out, lse, probs


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` with torch's semantics.

    Args:
        query: (..., H, L, E); key: (..., Hk, S, E); value: (..., Hk, S, Ev). 3-D inputs
            are one head; extra leading dims are flattened into the batch.
        attn_mask: broadcastable to (..., H, L, S); bool (True = attend) or float (added).
        dropout_p: dropout probability, applied whenever > 0 (as torch does).
        is_causal: query i sees keys j <= i (top-left aligned); exclusive with attn_mask.
        scale: default 1/sqrt(E).
        enable_gqa: allow H to be a multiple of Hk.

    Returns:
        (..., H, L, Ev). A query that sees no key gives zeros (torch's math path gives NaN).
    """
    names = ("query", "key", "value")
    for name, t in zip(names, (query, key, value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 3:
            raise ValueError(f"{name}: expected at least 3 dims (..., L, E), got shape {tuple(t.shape)}")
    if not (query.dim() == key.dim() == value.dim()):
        raise ValueError(f"query, key, value: ranks differ: {query.dim()}, {key.dim()}, {value.dim()}")
    if attn_mask is not None and is_causal:
        raise ValueError("attn_mask: must be None when is_causal=True (as in torch)")
    _check_dropout(dropout_p)
    lead = query.shape[:-3] if query.dim() > 3 else ()
    if query.dim() == 3:
        q4, k4, v4 = (t.unsqueeze(1) for t in (query, key, value))
    else:
        if key.shape[:-3] != lead or value.shape[:-3] != lead:
            raise ValueError(
                f"query, key, value: batch dims differ: {tuple(lead)}, {tuple(key.shape[:-3])}, "
                f"{tuple(value.shape[:-3])}"
            )
        q4, k4, v4 = (t.reshape(-1, *t.shape[-3:]) if t.dim() > 4 else t for t in (query, key, value))
    _check_qkv(q4, k4, v4, names, heads_dim=1, seq_dim=2)
    num_heads, seqlen_q, seqlen_k = q4.shape[1], q4.shape[2], k4.shape[2]
    if num_heads != k4.shape[1] and not enable_gqa:
        raise ValueError(
            f"query, key: head counts differ ({num_heads} vs {k4.shape[1]}); pass enable_gqa=True for GQA"
        )
    mask4 = None
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
            raise ValueError(f"attn_mask: dtype must be bool or {query.dtype}, got {attn_mask.dtype}")
        if attn_mask.device != query.device:
            raise ValueError(f"attn_mask: must be on {query.device}, got {attn_mask.device}")
        full = (*lead, num_heads, seqlen_q, seqlen_k) if query.dim() > 3 else (query.shape[0], seqlen_q, seqlen_k)
        try:
            mask_full = attn_mask.expand(full)
        except RuntimeError:
            raise ValueError(
                f"attn_mask: shape {tuple(attn_mask.shape)} is not broadcastable to {tuple(full)}"
            ) from None
        mask4 = mask_full.unsqueeze(1) if query.dim() == 3 else mask_full.reshape(-1, num_heads, seqlen_q, seqlen_k)
    head_dim = q4.shape[-1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    out, _ = ops.attention(
        q4.transpose(1, 2), k4.transpose(1, 2), v4.transpose(1, 2), scale=scale, attn_mask=mask4,
        window_left=-1, window_right=0 if is_causal else -1, diag_offset=0, dropout_p=float(dropout_p),
    )
    out = out.transpose(1, 2)  # (B, H, L, Ev)
    if query.dim() == 3:
        return out.squeeze(1)
    return out.reshape(*lead, *out.shape[1:]) if query.dim() > 4 else out

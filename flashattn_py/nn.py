"""Drop-in attention modules.

- ``MultiheadAttention``: ``torch.nn.MultiheadAttention``'s constructor, forward signature,
  parameter names and ``state_dict`` keys, computed by ``flashattn_py``'s
  ``scaled_dot_product_attention``. A torch MHA's ``state_dict`` loads as is.
- ``FlashSelfAttention`` / ``FlashCrossAttention``: flash-attn's
  ``flash_attn.modules.mha`` modules on packed (B, S, 3, H, D) / (B, S, 2, H, D) inputs.

Masks follow ``torch.nn.MultiheadAttention``: a bool ``attn_mask`` / ``key_padding_mask``
marks with True the positions that may NOT be attended (the opposite of SDPA's bool mask);
a float mask is added to the scores. They are converted to an SDPA mask here.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from . import api
from .errors import ArgumentError
from .reference import attention_ref

__all__ = ["MultiheadAttention", "FlashSelfAttention", "FlashCrossAttention"]

_warned_need_weights = False


def _warn_need_weights_once() -> None:
    global _warned_need_weights
    if not _warned_need_weights and not torch.compiler.is_compiling():  # (Dynamo cannot trace warn)
        _warned_need_weights = True
        warnings.warn(
            "flashattn_py.nn.MultiheadAttention: need_weights=True (torch's default) computes attention with the "
            "O(N^2) reference formula to return the weights; pass need_weights=False for the fused kernel.",
            stacklevel=3,
        )


def _sdpa_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """One torch-MHA mask (bool True = masked out, or float additive) as an SDPA mask
    (bool True = attend, or float additive in ``dtype``; a float32 one stays float32 with
    16-bit inputs, as torch's module passes it to SDPA, which adds it in float32)."""
    if mask.dtype == torch.bool:
        return ~mask
    if not mask.is_floating_point():
        raise ArgumentError(f"attn_mask / key_padding_mask: expected bool or floating dtype, got {mask.dtype}")
    return api.sdpa_mask_dtype(mask, dtype)


def _as_float(mask: Tensor, dtype: torch.dtype) -> Tensor:
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def _merge(a: Optional[Tensor], b: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """Combine two SDPA masks: both bool -> and; otherwise float sum."""
    if a is None:
        return b
    if b is None:
        return a
    if a.dtype == torch.bool and b.dtype == torch.bool:
        return a & b
    return _as_float(a, dtype) + _as_float(b, dtype)


def _pad_keys(mask: Optional[Tensor], extra: int) -> Optional[Tensor]:
    """Append ``extra`` always-visible key columns to an SDPA mask."""
    if mask is None or extra == 0:
        return mask
    fill = torch.ones if mask.dtype == torch.bool else torch.zeros
    pad = fill((*mask.shape[:-1], extra), dtype=mask.dtype, device=mask.device)
    return torch.cat([mask, pad], dim=-1)


class MultiheadAttention(nn.Module):
    """``torch.nn.MultiheadAttention`` on the fused attention kernels.

    Same arguments, parameters and ``state_dict`` keys as torch's (``in_proj_weight`` or
    ``q/k/v_proj_weight`` when kdim/vdim differ from embed_dim, ``in_proj_bias``,
    ``out_proj.weight/bias``, ``bias_k/bias_v``), so weights load both ways.

    Args:
        embed_dim: E, the model width; num_heads: H, with E % H == 0.
        dropout: dropout probability on the attention weights, applied only in training.
        bias: biases in the input/output projections.
        add_bias_kv: learned key/value appended to the key sequence.
        add_zero_attn: a zero key/value appended to the key sequence.
        kdim, vdim: widths of key and value inputs (default E).
        batch_first: inputs/outputs are (N, L, E) instead of (L, N, E).

    ``forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False)`` as torch's. ``need_weights=True`` (torch's
    default) returns the weights computed by the reference formula (O(L*S) memory, a one-time
    warning); ``need_weights=False`` is the fused path and returns ``(out, None)``.
    Masks: bool True means "not allowed" (torch MHA convention), float is added.
    ``is_causal=True`` without ``attn_mask`` applies the top-left causal mask (torch requires
    the mask as a hint; here it is optional), beside a ``key_padding_mask`` too, with the
    extra keys of ``add_bias_kv`` / ``add_zero_attn`` visible to every query (as the causal
    mask given explicitly). With ``need_weights=True``, ``add_bias_kv`` / ``add_zero_attn`` or a
    ``key_padding_mask`` the hint is not used: the given ``attn_mask`` applies, the extra
    keys visible to every query, as in torch's ``need_weights=True`` path (its
    ``need_weights=False`` path hides the extra keys from early queries instead).
    """

    __constants__ = ["batch_first"]

    # nn.TransformerEncoderLayer's fast path (eval, no grad, batch_first, ...) calls this
    # before running torch's own fused encoder kernel (as it does around torch's MHA).
    merge_masks = nn.MultiheadAttention.merge_masks

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: Optional[int] = None,
        vdim: Optional[int] = None,
        batch_first: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        if embed_dim <= 0 or num_heads <= 0:
            raise ArgumentError(f"embed_dim, num_heads: must be > 0, got {embed_dim}, {num_heads}")
        if embed_dim % num_heads != 0:
            raise ArgumentError(f"embed_dim: must be divisible by num_heads ({num_heads}), got {embed_dim}")
        if not 0.0 <= dropout < 1.0:
            raise ArgumentError(f"dropout: must be in [0, 1), got {dropout}")
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty((3 * embed_dim, embed_dim), **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty((embed_dim, embed_dim), **factory))
            self.k_proj_weight = nn.Parameter(torch.empty((embed_dim, self.kdim), **factory))
            self.v_proj_weight = nn.Parameter(torch.empty((embed_dim, self.vdim), **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        # (torch's class, which quantisation tooling tells apart from a plain Linear)
        self.out_proj = NonDynamicallyQuantizableLinear(embed_dim, embed_dim, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty((1, 1, embed_dim), **factory))
            self.bias_v = nn.Parameter(torch.empty((1, 1, embed_dim), **factory))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """torch's initialisation: xavier-uniform projections, zero biases, xavier-normal bias_k/v."""
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            for w in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
                nn.init.xavier_uniform_(w)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)

    def _projections(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        e = self.embed_dim
        if self._qkv_same_embed_dim:
            wq, wk, wv = self.in_proj_weight[:e], self.in_proj_weight[e:2 * e], self.in_proj_weight[2 * e:]
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        if self.in_proj_bias is not None:
            bq, bk, bv = self.in_proj_bias[:e], self.in_proj_bias[e:2 * e], self.in_proj_bias[2 * e:]
        else:
            bq = bk = bv = None
        return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Optional[Tensor]]:
        """Shapes (E = embed_dim, H = num_heads):

        query (L, N, E), key (S, N, kdim), value (S, N, vdim); (N, L, E) etc. with
        batch_first; unbatched (L, E), (S, kdim), (S, vdim) also accepted.
        key_padding_mask (N, S) or (S,) unbatched; attn_mask (L, S) or (N * H, L, S).

        Returns ``(attn_output, attn_weights)``: attn_output like query; attn_weights
        (N, L, S) averaged over heads, (N, H, L, S) with ``average_attn_weights=False``
        (no batch dim when unbatched), or None when ``need_weights=False``.
        """
        if query.dim() not in (2, 3):
            raise ArgumentError(f"query: expected a 2-D (unbatched) or 3-D tensor, got shape {tuple(query.shape)}")
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ArgumentError(
                f"query, key, value: ranks differ: {query.dim()}, {key.dim()}, {value.dim()}"
            )
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        # Now (N, L, E), (N, S, kdim), (N, S, vdim).
        n, tgt_len, e = query.shape
        src_len = key.shape[1]
        h, hd = self.num_heads, self.head_dim
        if e != self.embed_dim:
            raise ArgumentError(f"query: expected last dim embed_dim={self.embed_dim}, got {e}")
        if key.shape[:2] != value.shape[:2] or key.shape[0] != n:
            raise ArgumentError(
                f"key, value: expected matching (batch, length) {n} x S, got {tuple(key.shape)} and {tuple(value.shape)}"
            )
        if key.shape[-1] != self.kdim or value.shape[-1] != self.vdim:
            raise ArgumentError(
                f"key, value: expected last dims kdim={self.kdim}, vdim={self.vdim}, got {key.shape[-1]}, {value.shape[-1]}"
            )

        # SDPA masks broadcastable to (N, H, L, S): bool True = attend, float added.
        mask = None
        if attn_mask is not None:
            if attn_mask.dim() == 2 and tuple(attn_mask.shape) == (tgt_len, src_len):
                am = attn_mask.view(1, 1, tgt_len, src_len)
            elif attn_mask.dim() == 3 and tuple(attn_mask.shape) == (n * h, tgt_len, src_len):
                am = attn_mask.view(n, h, tgt_len, src_len)
            elif unbatched and attn_mask.dim() == 3 and tuple(attn_mask.shape) == (h, tgt_len, src_len):
                am = attn_mask.view(1, h, tgt_len, src_len)
            else:
                raise ArgumentError(
                    f"attn_mask: expected shape ({tgt_len}, {src_len}) or ({n * h}, {tgt_len}, {src_len}), "
                    f"got {tuple(attn_mask.shape)}"
                )
            mask = _sdpa_mask(am, query.dtype)
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (n, src_len):
                raise ArgumentError(
                    f"key_padding_mask: expected shape ({n}, {src_len}), got {tuple(key_padding_mask.shape)}"
                )
            mask = _merge(mask, _sdpa_mask(key_padding_mask.view(n, 1, 1, src_len), query.dtype), query.dtype)

        q, k, v = self._projections(query, key, value)
        extra = 0
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(n, 1, e)], dim=1)
            v = torch.cat([v, self.bias_v.expand(n, 1, e)], dim=1)
            extra += 1
        q = q.view(n, tgt_len, h, hd).transpose(1, 2)  # (N, H, L, hd)
        k = k.view(n, k.shape[1], h, hd).transpose(1, 2)
        v = v.view(n, v.shape[1], h, hd).transpose(1, 2)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros((n, h, 1, hd))], dim=2)
            v = torch.cat([v, v.new_zeros((n, h, 1, hd))], dim=2)
            extra += 1
        causal = False
        if is_causal and attn_mask is None:
            if extra == 0:
                causal = True  # (with a padding mask too: SDPA applies the mask and the diagonal both)
            else:
                # the extra key is visible to every query, as with the causal mask given: the
                # top-left causal mask spelled out over the real keys (the flag would hide the
                # extra key from the first queries)
                tril = torch.ones(tgt_len, src_len, dtype=torch.bool, device=query.device).tril()
                mask = _merge(tril.view(1, 1, tgt_len, src_len), mask, query.dtype)
        elif is_causal and key_padding_mask is None and extra == 0 and not need_weights:
            # torch's hint: attn_mask is the causal mask; use the kernel's own (top-left, as torch's
            # fused path; its need_weights path applies the attn_mask given, as ours does).
            causal, mask = True, None
        mask = _pad_keys(mask, extra)
        dropout_p = self.dropout if self.training else 0.0

        weights = None
        if need_weights:
            _warn_need_weights_once()
            out, weights = self._reference(q, k, v, mask, causal, dropout_p)
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            out = api.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal)
        out = self.out_proj(out.transpose(1, 2).reshape(n, tgt_len, e))
        if unbatched:
            return out.squeeze(0), (weights.squeeze(0) if weights is not None else None)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    @staticmethod
    def _reference(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], causal: bool, dropout_p: float):
        """(out (N, H, L, hd), weights (N, H, L, S) after dropout) by the naive formula."""
        qs, ks, vs = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (N, S, H, D)
        keep = None
        if dropout_p > 0:
            keep = torch.rand((q.shape[0], q.shape[1], q.shape[2], k.shape[2]), device=q.device) >= dropout_p
        out, _, probs = attention_ref(
            qs, ks, vs, scale=1.0 / math.sqrt(q.shape[-1]), attn_bias=mask, window_left=-1,
            window_right=0 if causal else -1, diag_offset=0, dropout_p=dropout_p, dropout_mask=keep,
            return_probs=True,
        )
        if keep is not None:
            probs = probs * keep / (1.0 - dropout_p)
        return out.transpose(1, 2), probs


class _FlashModule(nn.Module):
    """The constructor and per-call settings flash-attn's two modules share."""

    def __init__(self, causal: bool = False, softmax_scale: Optional[float] = None, attention_dropout: float = 0.0,
                 window_size: tuple[int, int] = (-1, -1), alibi_slopes: Optional[Tensor] = None,
                 deterministic: bool = False) -> None:
        super().__init__()
        self.causal = causal
        self.softmax_scale = softmax_scale
        self.drop = nn.Dropout(attention_dropout)  # holds p, as flash-attn's module does
        self.window_size = window_size
        self.register_buffer("alibi_slopes", alibi_slopes, persistent=False)
        self.deterministic = deterministic

    def _call_settings(self, causal: Optional[bool]) -> tuple[bool, float]:
        """(causal, dropout_p) of one forward: ``causal`` overrides the constructor's;
        dropout only in training."""
        return (self.causal if causal is None else causal), (self.drop.p if self.training else 0.0)

    def _slopes(self) -> Optional[Tensor]:
        """alibi_slopes as the kernels take them, float32 (as flash-attn's modules: a model
        cast to bf16 / fp16 casts the buffer too)."""
        return None if self.alibi_slopes is None else self.alibi_slopes.to(torch.float32)


class FlashSelfAttention(_FlashModule):
    """flash-attn's ``FlashSelfAttention``: attention on packed qkv.

    Args:
        causal: mask future keys (bottom-right aligned; Sq == Sk here).
        softmax_scale: default 1/sqrt(D).
        attention_dropout: dropout on the attention weights, applied only in training.
        window_size, alibi_slopes, deterministic: as ``flash_attn_func``.

    ``forward(qkv, causal=None, cu_seqlens=None, max_seqlen=None)``: qkv (B, S, 3, H, D) ->
    (B, S, H, D); or with ``cu_seqlens`` (B + 1,) int32 and ``max_seqlen``, packed
    (total, 3, H, D) -> (total, H, D). ``causal`` overrides the constructor's.
    """

    def forward(self, qkv: Tensor, causal: Optional[bool] = None, cu_seqlens: Optional[Tensor] = None,
                max_seqlen: Optional[int] = None) -> Tensor:
        causal, dropout_p = self._call_settings(causal)
        if cu_seqlens is not None:
            if max_seqlen is None:
                raise ArgumentError("max_seqlen: required with cu_seqlens")
            return api.flash_attn_varlen_qkvpacked_func(
                qkv, cu_seqlens, max_seqlen, dropout_p, self.softmax_scale, causal, self.window_size,
                alibi_slopes=self._slopes(), deterministic=self.deterministic,
            )
        return api.flash_attn_qkvpacked_func(
            qkv, dropout_p, self.softmax_scale, causal, self.window_size, alibi_slopes=self._slopes(),
            deterministic=self.deterministic,
        )


class FlashCrossAttention(_FlashModule):
    """flash-attn's ``FlashCrossAttention``: q (B, Sq, H, D), kv (B, Sk, 2, Hk, D) -> (B, Sq, H, D).

    The arguments of ``FlashSelfAttention`` in flash-attn's order for this module
    (``alibi_slopes`` before ``window_size``); causal is aligned bottom-right (flash-attn's
    convention). Varlen: ``forward(q, kv, causal, cu_seqlens, max_seqlen, cu_seqlens_k,
    max_seqlen_k)`` with q (total_q, H, D), kv (total_k, 2, Hk, D).
    """

    def __init__(self, causal: bool = False, softmax_scale: Optional[float] = None, attention_dropout: float = 0.0,
                 alibi_slopes: Optional[Tensor] = None, window_size: tuple[int, int] = (-1, -1),
                 deterministic: bool = False) -> None:
        super().__init__(causal, softmax_scale, attention_dropout, window_size, alibi_slopes, deterministic)

    def forward(self, q: Tensor, kv: Tensor, causal: Optional[bool] = None, cu_seqlens: Optional[Tensor] = None,
                max_seqlen: Optional[int] = None, cu_seqlens_k: Optional[Tensor] = None,
                max_seqlen_k: Optional[int] = None) -> Tensor:
        causal, dropout_p = self._call_settings(causal)
        if cu_seqlens is not None:
            if cu_seqlens_k is None or max_seqlen is None or max_seqlen_k is None:
                raise ArgumentError("cu_seqlens_k, max_seqlen, max_seqlen_k: required with cu_seqlens")
            return api.flash_attn_varlen_kvpacked_func(
                q, kv, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k, dropout_p, self.softmax_scale, causal,
                self.window_size, alibi_slopes=self._slopes(), deterministic=self.deterministic,
            )
        return api.flash_attn_kvpacked_func(
            q, kv, dropout_p, self.softmax_scale, causal, self.window_size, alibi_slopes=self._slopes(),
            deterministic=self.deterministic,
        )

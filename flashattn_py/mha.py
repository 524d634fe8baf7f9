"""flash-attn's ``flash_attn.modules.mha`` on this package's kernels: the ``MHA`` block
(input projections, optional depthwise convolution and rotary embedding, attention, output
projection; a KV cache for generation through ``InferenceParams``), its attention modules
(``FlashSelfAttention`` / ``FlashCrossAttention`` from ``flashattn_py.nn``; ``SelfAttention``
/ ``CrossAttention``, its key-padding-mask forms) and ``get_alibi_slopes``. Parameter names
and shapes are flash-attn's (``Wqkv``, or ``Wq`` / ``Wkv`` for cross-attention; ``out_proj``;
``dwconv_*``), so its checkpoints load. ``InferenceParams`` is
``flash_attn.utils.generation``'s dataclass.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from . import api
from .errors import ArgumentError
from .kvcache import flash_attn_with_kvcache
from .nn import FlashCrossAttention, FlashSelfAttention
from .rotary import RotaryEmbedding

__all__ = ["CrossAttention", "FlashCrossAttention", "FlashSelfAttention", "InferenceParams", "MHA", "SelfAttention",
           "get_alibi_slopes"]


def get_alibi_slopes(nheads: int) -> list[float]:
    """ALiBi's per-head slopes (Press et al.): for n a power of two, 2^(-8 (i + 1) / n); else
    those of the power of two below n, then every other slope of the next power of two."""
    def powers_of_two(n: int) -> list[float]:
        first = 2.0 ** (-8.0 / n)
        return [first ** (i + 1) for i in range(n)]

    if nheads < 1:
        raise ArgumentError(f"nheads: expected an int >= 1, got {nheads}")
    below = 2 ** int(math.floor(math.log2(nheads)))
    if below == nheads:
        return powers_of_two(nheads)
    return powers_of_two(below) + powers_of_two(2 * below)[0::2][:nheads - below]


@dataclass
class InferenceParams:
    """flash-attn's generation state (``flash_attn.utils.generation.InferenceParams``): the
    caches' sizes, the position of this step's first token (``seqlen_offset``; or per
    sequence, ``lengths_per_sample`` (B,) int32), the batch rows this call serves from
    ``batch_size_offset``, and each layer's KV cache (B_max, S_max, 2, Hk, D) by layer_idx."""

    max_seqlen: int
    max_batch_size: int
    seqlen_offset: int = 0
    batch_size_offset: int = 0
    key_value_memory_dict: dict = field(default_factory=dict)
    lengths_per_sample: Optional[Tensor] = None

    def reset(self, max_seqlen: int, max_batch_size: int) -> None:
        self.max_seqlen = max_seqlen
        self.max_batch_size = max_batch_size
        self.seqlen_offset = 0
        if self.lengths_per_sample is not None:
            self.lengths_per_sample.zero_()


def _padded_mask(key_padding_mask: Tensor, causal: bool, batch: int, seqlen_q: int, seqlen_k: int,
                 device: torch.device, align_to_kept: bool) -> Tensor:
    """The bool mask (B, 1, Sq, Sk) (True: attend) of flash-attn's reference modules: keys
    ``key_padding_mask`` keeps, and with ``causal`` keys up to row i + n_b - Sq, where n_b is
    the number of keys sequence b keeps (``align_to_kept``: CrossAttention's diagonal, at
    the end of its kept keys, padding on the right) or Sk (SelfAttention's)."""
    if not isinstance(key_padding_mask, Tensor) or tuple(key_padding_mask.shape) != (batch, seqlen_k):
        raise ArgumentError(f"key_padding_mask: expected (B, Sk) = ({batch}, {seqlen_k}), got "
                            f"{tuple(getattr(key_padding_mask, 'shape', ())) or type(key_padding_mask).__name__}")
    keep = key_padding_mask.to(device=device, dtype=torch.bool)
    mask = keep[:, None, None, :]
    if causal:
        kept = keep.sum(-1).view(batch, 1, 1, 1) if align_to_kept else seqlen_k
        rows = torch.arange(seqlen_q, device=device).view(1, 1, seqlen_q, 1)
        cols = torch.arange(seqlen_k, device=device).view(1, 1, 1, seqlen_k)
        mask = mask & (cols <= rows + kept - seqlen_q)
    return mask


class CrossAttention(nn.Module):
    """flash-attn's ``CrossAttention`` (its reference form, the one that takes a key padding
    mask), through the fused kernels: q (B, Sq, H, D), kv (B, Sk, 2, Hk, D) -> (B, Sq, H, D).

    ``forward(q, kv, causal=None, key_padding_mask=None)``: ``key_padding_mask`` (B, Sk) bool,
    True = keep; causal aligns the diagonal with each sequence's last kept key. Dropout only
    in training. A row that sees no key gives zeros (flash-attn's, which masks with -10000,
    averages the masked keys' values there).
    """

    def __init__(self, causal: bool = False, softmax_scale: Optional[float] = None,
                 attention_dropout: float = 0.0) -> None:
        super().__init__()
        self.causal = causal
        self.softmax_scale = softmax_scale
        self.drop = nn.Dropout(attention_dropout)

    def forward(self, q: Tensor, kv: Tensor, causal: Optional[bool] = None,
                key_padding_mask: Optional[Tensor] = None) -> Tensor:
        return self._attend(q, kv, causal, key_padding_mask, True)

    def _attend(self, q: Tensor, kv: Tensor, causal: Optional[bool], key_padding_mask: Optional[Tensor],
                align_to_kept: bool) -> Tensor:
        causal = self.causal if causal is None else causal
        if not isinstance(kv, Tensor) or kv.dim() != 5 or kv.shape[2] != 2:
            raise ArgumentError(f"kv: expected shape (B, Sk, 2, Hk, D), got {tuple(getattr(kv, 'shape', ()))}")
        dropout_p = self.drop.p if self.training else 0.0
        if key_padding_mask is None:  # (bottom-right causal either way: the kernels' own mask, no tensor)
            return api.flash_attn_kvpacked_func(q, kv, dropout_p, self.softmax_scale, causal)
        batch, seqlen_q, seqlen_k = q.shape[0], q.shape[1], kv.shape[1]
        mask = _padded_mask(key_padding_mask, causal, batch, seqlen_q, seqlen_k, q.device, align_to_kept)
        k, v = kv.unbind(2)
        out = api.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
            dropout_p=dropout_p, scale=self.softmax_scale,
            enable_gqa=q.shape[2] != k.shape[2])
        return out.transpose(1, 2)


class SelfAttention(CrossAttention):
    """flash-attn's ``SelfAttention`` (its reference form): qkv (B, S, 3, H, D) -> (B, S, H, D);
    ``forward(qkv, causal=None, key_padding_mask=None)``, as ``CrossAttention``'s but with
    the causal diagonal from the first key, whatever the padding."""

    def forward(self, qkv: Tensor, causal: Optional[bool] = None,  # type: ignore[override]
                key_padding_mask: Optional[Tensor] = None) -> Tensor:
        if not isinstance(qkv, Tensor) or qkv.dim() != 5 or qkv.shape[2] != 3:
            raise ArgumentError(f"qkv: expected shape (B, S, 3, H, D), got {tuple(getattr(qkv, 'shape', ()))}")
        return self._attend(qkv[:, :, 0], qkv[:, :, 1:], causal, key_padding_mask, False)


def _update_kv_cache(kv: Tensor, inference_params: InferenceParams, layer_idx: int) -> Tensor:
    """Write this step's kv (B, S_new, 2, Hk, D) into the layer's cache (made on first use,
    (max_batch_size, max_seqlen, 2, Hk, D)) at rows batch_size_offset.. and positions
    seqlen_offset..; returns the cache's rows of this batch up to the new positions' end."""
    cache = inference_params.key_value_memory_dict.get(layer_idx)
    if cache is None:
        cache = kv.new_empty((inference_params.max_batch_size, inference_params.max_seqlen, *kv.shape[2:]))
        inference_params.key_value_memory_dict[layer_idx] = cache
    batch_start, seq_start = inference_params.batch_size_offset, inference_params.seqlen_offset
    batch_end, seq_end = batch_start + kv.shape[0], seq_start + kv.shape[1]
    if batch_end > cache.shape[0] or seq_end > cache.shape[1]:
        raise ArgumentError(f"inference_params: rows {batch_start}..{batch_end} and positions {seq_start}..{seq_end} "
                            f"do not fit layer {layer_idx}'s cache of {tuple(cache.shape[:2])}")
    cache[batch_start:batch_end, seq_start:seq_end] = kv
    return cache[batch_start:batch_end, :seq_end]


class MHA(nn.Module):
    """flash-attn's ``MHA``: multi-head self- or cross-attention with its projections.

    Args (flash-attn's):
        embed_dim, num_heads: the model width and query heads (head dim embed_dim / num_heads).
        num_heads_kv: key / value heads (MQA / GQA); None: num_heads.
        cross_attn: queries from ``x``, keys / values from ``x_kv`` (projections ``Wq``, ``Wkv``).
        qkv_proj_bias, out_proj_bias: biases of the projections.
        dropout: on the attention weights, in training. softmax_scale: default 1/sqrt(head dim).
        causal: bottom-right aligned (flash-attn's convention). layer_idx: the layer's key in
            ``InferenceParams.key_value_memory_dict`` (needed for generation).
        dwconv: a causal depthwise convolution (kernel 3) over the projections (not with
            packed sequences or generation).
        rotary_emb_dim, rotary_emb_base, rotary_emb_scale_base, rotary_emb_interleaved:
            rotary embedding of the first rotary_emb_dim features of q and k (self-attention).
        use_alibi: ALiBi with ``get_alibi_slopes(num_heads)``; window_size: sliding window
            (both need use_flash_attn, as in flash-attn).
        fused_bias_fc: flash-attn's fused CUDA linear layers; here plain ``nn.Linear`` (the
            same parameters and result).
        use_flash_attn: attention by ``FlashSelfAttention`` / ``FlashCrossAttention`` (packed
            sequences through ``cu_seqlens``); else ``SelfAttention`` / ``CrossAttention``
            (a ``key_padding_mask``). Both run on the fused kernels here.
        return_residual: also return x. checkpointing: recompute the attention in the backward.
        device, dtype: of the parameters.

    ``forward(x, x_kv=None, key_padding_mask=None, cu_seqlens=None, max_seqlen=None,
    mixer_subset=None, inference_params=None)``: x (B, S, embed_dim), or packed (total,
    embed_dim) with ``cu_seqlens`` / ``max_seqlen``; returns (B, S, embed_dim) (and x with
    return_residual). With ``inference_params`` (generation, under ``torch.no_grad()`` or
    inference mode with use_flash_attn: the cache steps have no backward): this step's keys /
    values go into the layer's cache, the first step (seqlen_offset 0) attending over itself,
    later ones over the cache through ``flash_attn_with_kvcache`` (which also applies the
    sliding window there; flash-attn's MHA leaves it out of its cached steps).
    """

    def __init__(self, embed_dim: int, num_heads: int, num_heads_kv: Optional[int] = None, cross_attn: bool = False,
                 qkv_proj_bias: bool = True, out_proj_bias: bool = True, dropout: float = 0.0,
                 softmax_scale: Optional[float] = None, causal: bool = False, layer_idx: Optional[int] = None,
                 dwconv: bool = False, rotary_emb_dim: int = 0, rotary_emb_base: float = 10000.0,
                 rotary_emb_scale_base: Optional[float] = None, rotary_emb_interleaved: bool = False,
                 use_alibi: bool = False, window_size: tuple[int, int] = (-1, -1), fused_bias_fc: bool = False,
                 use_flash_attn: bool = False, return_residual: bool = False, checkpointing: bool = False,
                 device=None, dtype=None) -> None:
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        num_heads_kv = num_heads if num_heads_kv is None else num_heads_kv
        if num_heads < 1 or num_heads_kv < 1 or num_heads % num_heads_kv:
            raise ArgumentError(f"num_heads, num_heads_kv: num_heads ({num_heads}) must be a multiple of "
                                f"num_heads_kv ({num_heads_kv})")
        if embed_dim % num_heads:
            raise ArgumentError(f"embed_dim: must be divisible by num_heads ({num_heads}), got {embed_dim}")
        if use_alibi and not use_flash_attn:
            raise ArgumentError("use_alibi: needs use_flash_attn=True (as flash-attn's MHA)")
        if tuple(window_size) != (-1, -1) and not use_flash_attn:
            raise ArgumentError("window_size: needs use_flash_attn=True (as flash-attn's MHA)")
        if rotary_emb_dim > 0 and cross_attn:
            raise ArgumentError("rotary_emb_dim: not supported with cross_attn (as flash-attn's MHA)")
        # (else a longer one failed only at the first forward; an odd one rotates one feature
        # more, as flash-attn's RotaryEmbedding: flashattn_py.rotary)
        if rotary_emb_dim < 0 or rotary_emb_dim + rotary_emb_dim % 2 > embed_dim // num_heads:
            raise ArgumentError(f"rotary_emb_dim: must be in 0..{embed_dim // num_heads} (the head dim; an odd one "
                                f"rotates one more feature), got {rotary_emb_dim}")
        self.embed_dim, self.num_heads, self.num_heads_kv = embed_dim, num_heads, num_heads_kv
        self.head_dim = embed_dim // num_heads
        self.cross_attn, self.causal, self.layer_idx, self.dwconv = cross_attn, causal, layer_idx, dwconv
        self.rotary_emb_dim, self.use_flash_attn = rotary_emb_dim, use_flash_attn
        self.return_residual, self.checkpointing = return_residual, checkpointing
        qkv_dim = self.head_dim * (num_heads + 2 * num_heads_kv)
        kv_dim = 2 * self.head_dim * num_heads_kv
        if rotary_emb_dim > 0:
            self.rotary_emb = RotaryEmbedding(rotary_emb_dim, base=rotary_emb_base, scale_base=rotary_emb_scale_base,
                                              interleaved=rotary_emb_interleaved, device=device)
        if cross_attn:
            self.Wq = nn.Linear(embed_dim, embed_dim, bias=qkv_proj_bias, **factory)
            self.Wkv = nn.Linear(embed_dim, kv_dim, bias=qkv_proj_bias, **factory)
        else:
            self.Wqkv = nn.Linear(embed_dim, qkv_dim, bias=qkv_proj_bias, **factory)
        if dwconv:
            # (cross-attention convolves q and kv apart: flash-attn's makes dwconv_qkv there when
            # the head counts match, which its forward cannot use)
            if num_heads_kv == num_heads and not cross_attn:
                self.dwconv_qkv = nn.Conv1d(qkv_dim, qkv_dim, kernel_size=3, padding=2, groups=qkv_dim, **factory)
            else:
                self.dwconv_q = nn.Conv1d(embed_dim, embed_dim, kernel_size=3, padding=2, groups=embed_dim, **factory)
                self.dwconv_kv = nn.Conv1d(kv_dim, kv_dim, kernel_size=3, padding=2, groups=kv_dim, **factory)
        if use_flash_attn:
            slopes = torch.tensor(get_alibi_slopes(num_heads), device=device) if use_alibi else None
            self.inner_attn = FlashSelfAttention(causal=causal, softmax_scale=softmax_scale,
                                                 attention_dropout=dropout, window_size=window_size,
                                                 alibi_slopes=slopes)
            self.inner_cross_attn = FlashCrossAttention(causal=causal, softmax_scale=softmax_scale,
                                                        attention_dropout=dropout, alibi_slopes=slopes,
                                                        window_size=window_size)
        else:
            self.inner_attn = SelfAttention(causal=causal, softmax_scale=softmax_scale, attention_dropout=dropout)
            self.inner_cross_attn = CrossAttention(causal=causal, softmax_scale=softmax_scale,
                                                   attention_dropout=dropout)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=out_proj_bias, **factory)

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype=None) -> Tensor:
        """An empty KV cache (batch_size, max_seqlen, 2, num_heads_kv, head_dim) for this layer."""
        weight = self.out_proj.weight
        return torch.empty(batch_size, max_seqlen, 2, self.num_heads_kv, self.head_dim,
                           dtype=weight.dtype if dtype is None else dtype, device=weight.device)

    def _conv(self, conv: nn.Conv1d, t: Tensor) -> Tensor:
        """The causal depthwise convolution over (B, S, C) (its last 2 outputs are the padding's)."""
        return conv(t.transpose(1, 2))[..., :-2].transpose(1, 2).contiguous()

    def _attend(self, q: Tensor, kv: Tensor, qkv: Optional[Tensor], inference_params: Optional[InferenceParams],
                seqlen_offset: Union[int, Tensor], attn_kwargs: dict) -> Tensor:
        """Rotary, then attention: of qkv (B, S, 3, H, D) where given, else of q with kv;
        generation steps after the first read the cache through flash_attn_with_kvcache."""
        decoding = inference_params is not None and inference_params.seqlen_offset > 0 and self.use_flash_attn
        # (flash-attn's choice: rotary inside the cache call for rotary dims that are multiples
        # of 16 (it rotates a non-causal call's queries all at the cache length), else the module
        # rotates q and k at their positions first; xPos only through the module)
        if decoding and (self.rotary_emb_dim == 0
                         or (self.rotary_emb_dim % 16 == 0 and self.rotary_emb.scale is None)):
            return self._decode(q, kv, inference_params)  # (rotary, append and attention in one call)
        if self.rotary_emb_dim > 0:
            max_seqlen = inference_params.max_seqlen if inference_params is not None else None
            if qkv is not None:
                qkv = self.rotary_emb(qkv, seqlen_offset=seqlen_offset, max_seqlen=max_seqlen)
                q, kv = qkv[:, :, 0], qkv[:, :, 1:]
            else:
                q, kv = self.rotary_emb(q, kv, seqlen_offset=seqlen_offset, max_seqlen=max_seqlen)
        if inference_params is not None:
            if decoding:
                return self._decode(q, kv, inference_params, rotary=False)
            return self.inner_cross_attn(q, self._cache(kv, inference_params))
        if qkv is not None:
            attend, inputs = self.inner_attn, (qkv,)
        else:
            attend, inputs = self.inner_cross_attn, (q, kv)
        if self.checkpointing:
            return torch.utils.checkpoint.checkpoint(attend, *inputs, use_reentrant=False, **attn_kwargs)
        return attend(*inputs, **attn_kwargs)

    def _layer(self) -> int:
        """This layer's key in InferenceParams.key_value_memory_dict."""
        if self.layer_idx is None:
            raise ArgumentError("inference_params: generation needs the layer_idx given to MHA")
        return self.layer_idx

    def _cache(self, kv: Tensor, inference_params: InferenceParams) -> Tensor:
        return _update_kv_cache(kv, inference_params, self._layer())

    def _decode(self, q: Tensor, kv: Tensor, inference_params: InferenceParams, rotary: bool = True) -> Tensor:
        """A generation step after the first: this step's kv appended to the layer's cache and
        attended with it (rotary tables applied to q and the new keys at their positions)."""
        layer = self._layer()
        full = inference_params.key_value_memory_dict.get(layer)
        if full is None:
            raise ArgumentError(f"inference_params: layer {layer} has no KV cache yet (run the first step with "
                                f"seqlen_offset 0, or allocate_inference_cache)")
        # (this call's rows of the cache, from batch_size_offset, as the first step wrote them;
        # flash-attn's reads from row 0 here)
        rows = slice(inference_params.batch_size_offset, inference_params.batch_size_offset + q.shape[0])
        cache = full[rows]
        if cache.shape[0] != q.shape[0]:
            raise ArgumentError(f"inference_params: batch_size_offset {rows.start} + {q.shape[0]} rows pass layer "
                                f"{layer}'s cache of {full.shape[0]}")
        lengths = inference_params.lengths_per_sample
        cache_seqlens = lengths[rows] if lengths is not None else inference_params.seqlen_offset
        cos = sin = None
        if rotary and self.rotary_emb_dim > 0:
            self.rotary_emb._update_cos_sin_cache(inference_params.max_seqlen, device=q.device, dtype=q.dtype)
            cos, sin = self.rotary_emb._cos_cached, self.rotary_emb._sin_cached
        attention = self.inner_cross_attn
        return flash_attn_with_kvcache(
            q, cache[:, :, 0], cache[:, :, 1], kv[:, :, 0], kv[:, :, 1], rotary_cos=cos, rotary_sin=sin,
            cache_seqlens=cache_seqlens, softmax_scale=attention.softmax_scale, causal=attention.causal,
            window_size=attention.window_size, rotary_interleaved=self.rotary_emb.interleaved if cos is not None
            else False, alibi_slopes=attention._slopes())

    def forward(self, x: Tensor, x_kv: Optional[Tensor] = None, key_padding_mask: Optional[Tensor] = None,
                cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None, mixer_subset=None,
                inference_params: Optional[InferenceParams] = None, **kwargs):
        if cu_seqlens is not None:
            if max_seqlen is None:
                raise ArgumentError("max_seqlen: required with cu_seqlens")
            for name, bad in (("key_padding_mask", key_padding_mask is not None),
                              ("use_flash_attn", not self.use_flash_attn), ("dwconv", self.dwconv),
                              ("rotary_emb_dim", self.rotary_emb_dim > 0)):
                if bad:
                    raise ArgumentError(f"cu_seqlens: packed sequences not supported with {name} (as flash-attn's MHA)")
        if key_padding_mask is not None and self.use_flash_attn:
            raise ArgumentError("key_padding_mask: needs use_flash_attn=False (as flash-attn's MHA; or pass packed "
                                "sequences with cu_seqlens)")
        if inference_params is not None and (key_padding_mask is not None or cu_seqlens is not None or self.dwconv):
            raise ArgumentError("inference_params: not supported with key_padding_mask, cu_seqlens or dwconv")
        if (x_kv is not None or mixer_subset is not None) and not self.cross_attn:
            raise ArgumentError("x_kv, mixer_subset: only for cross_attn=True")
        attn_kwargs = ({"cu_seqlens": cu_seqlens, "max_seqlen": max_seqlen, **kwargs} if self.use_flash_attn
                       else {"key_padding_mask": key_padding_mask, **kwargs})
        if cu_seqlens is not None and not self.cross_attn and self.num_heads_kv != self.num_heads:
            # (GQA self-attention goes through FlashCrossAttention: the keys' offsets are the
            # queries'; flash-attn's MHA leaves them out and fails there)
            attn_kwargs.setdefault("cu_seqlens_k", cu_seqlens)
            attn_kwargs.setdefault("max_seqlen_k", max_seqlen)
        seqlen_offset: Union[int, Tensor] = 0
        if inference_params is not None:
            lengths = inference_params.lengths_per_sample
            seqlen_offset = lengths if lengths is not None else inference_params.seqlen_offset
        qkv = None
        if self.cross_attn:
            q = self.Wq(x if mixer_subset is None else x[:, mixer_subset])
            kv = self.Wkv(x_kv if x_kv is not None else x)
        else:
            projected = self.Wqkv(x)
            if self.num_heads_kv == self.num_heads:
                if self.dwconv:
                    projected = self._conv(self.dwconv_qkv, projected)
                qkv = projected.unflatten(-1, (3, self.num_heads, self.head_dim))
            split = self.num_heads * self.head_dim
            q, kv = projected[..., :split], projected[..., split:]
        if qkv is None:
            if self.dwconv:
                q, kv = self._conv(self.dwconv_q, q), self._conv(self.dwconv_kv, kv)
            q = q.unflatten(-1, (self.num_heads, self.head_dim))
            kv = kv.unflatten(-1, (2, self.num_heads_kv, self.head_dim))
        else:
            q, kv = qkv[..., 0, :, :], qkv[..., 1:, :, :]
        context = self._attend(q, kv, qkv, inference_params, seqlen_offset, attn_kwargs)
        out = self.out_proj(context.flatten(-2))
        return (out, x) if self.return_residual else out

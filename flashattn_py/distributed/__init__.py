"""Context parallelism: attention over a sequence sharded across the ranks of a
torch.distributed process group (NCCL on GPUs, gloo on CPUs), forward and backward, on
whichever backend flashattn_py selects for the local blocks (cpu, triton, cuda).

- Ring (``ring_flash_attn_*``): rank r holds the r-th contiguous chunk of the sequence; K/V
  blocks travel around the ring while each rank computes against the block in hand.
- Zigzag ring (``zigzag_ring_flash_attn_*``): rank r holds chunks r and 2*world-1-r of
  2*world, which gives every rank the same causal work.
- Stripe ring (``stripe_flash_attn_*``): rank r holds rows r, r + world, r + 2 world, ...
  (stripe attention: the same causal work on every rank, one call per step).
- Ulysses (``ulysses_flash_attn_*``): all-to-all from sequence shards to head shards, local
  attention over the whole sequence, all-to-all back (H and Hk divisible by the world size).
- USP (``usp_flash_attn_*``, dense and packed documents): Ulysses inside the groups of a
  2-D mesh of ranks, a ring (ring, zigzag or stripe) across them (yunchang's
  LongContextAttention); ``usp_shard`` cuts a rank's rows.
- Llama 3 (``llama3_flash_attn_varlen_*``, packed documents): every rank gathers all K/V
  rows and attends its own contiguous rows in one local call; key / value gradients are
  summed back to their owners (reduce-scatter). Offsets from
  ``llama3_flash_attn_prepare_cu_seqlens``. ``substitute_hf_flash_attn`` /
  ``update_ring_flash_attn_params`` run it in every layer of a transformers model on our
  backend (hf_adapter.py).

The signatures are ring-flash-attention's (plus ``softcap``, keyword-only): q (B, S_local, H,
D), k / v (B, S_local, Hk, D) this rank's shard (``shard`` cuts one); the output is the
rank's shard of attention over the whole sequence, with global positions for causal,
windows and ALiBi. The varlen forms take packed rows and the GLOBAL ``cu_seqlens``
(ring-flash-attention's take the local ones). Values of ``cu_seqlens`` are checked for CPU
tensors; on GPUs only with FLASHATTN_CHECK_INPUTS=1 (as every varlen call: no host reads).
Dropout is not supported (a rank's mask would depend on the sharding). Bad or mismatched
arguments raise on every rank of the group (the check is collective: one small all_gather
of shapes and options per call, read back to the host; an error inside the local kernels,
e.g. out of memory, or a backward run on some ranks only, still leaves the other ranks
waiting until the group's timeout).
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..errors import ArgumentError
from .checks import Unsplit
from .hf_adapter import substitute_hf_flash_attn, update_ring_flash_attn_params, use_ring_attn
from .layout import local_rows, shard, unshard
from .llama3 import llama3_attention, llama3_flash_attn_prepare_cu_seqlens
from .ring import ring_attention
from .ulysses import ulysses_attention
from .usp import usp_attention, usp_shard

__all__ = [
    "all_gather_shards",
    "llama3_flash_attn_prepare_cu_seqlens",
    "llama3_flash_attn_varlen_func",
    "llama3_flash_attn_varlen_kvpacked_func",
    "llama3_flash_attn_varlen_qkvpacked_func",
    "local_rows",
    "ring_flash_attn_func",
    "ring_flash_attn_kvpacked_func",
    "ring_flash_attn_qkvpacked_func",
    "ring_flash_attn_varlen_func",
    "ring_flash_attn_varlen_kvpacked_func",
    "ring_flash_attn_varlen_qkvpacked_func",
    "shard",
    "stripe_flash_attn_func",
    "stripe_flash_attn_kvpacked_func",
    "stripe_flash_attn_qkvpacked_func",
    "substitute_hf_flash_attn",
    "update_ring_flash_attn_params",
    "use_ring_attn",
    "usp_flash_attn_func",
    "usp_flash_attn_kvpacked_func",
    "usp_flash_attn_qkvpacked_func",
    "usp_flash_attn_varlen_func",
    "usp_flash_attn_varlen_kvpacked_func",
    "usp_flash_attn_varlen_qkvpacked_func",
    "usp_shard",
    "ulysses_flash_attn_func",
    "ulysses_flash_attn_varlen_func",
    "unshard",
    "zigzag_ring_flash_attn_func",
    "zigzag_ring_flash_attn_kvpacked_func",
    "zigzag_ring_flash_attn_qkvpacked_func",
    "zigzag_ring_flash_attn_varlen_func",
    "zigzag_ring_flash_attn_varlen_kvpacked_func",
    "zigzag_ring_flash_attn_varlen_qkvpacked_func",
]


def ring_flash_attn_func(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0,
                         softmax_scale: Optional[float] = None, causal: bool = False,
                         window_size: tuple[int, int] = (-1, -1), alibi_slopes: Optional[Tensor] = None,
                         deterministic: bool = False, return_attn_probs: bool = False, group=None, *,
                         softcap: float = 0.0):
    """Ring attention. q (B, S_local, H, D), k / v (B, S_local, Hk, D / Dv): rank r's rows
    [r S_local, (r + 1) S_local) of the global sequence (layout "ring").

    Returns out (B, S_local, H, Dv); with ``return_attn_probs``, (out, lse, None), lse (B, H,
    S_local) over the whole sequence, float32 (float64 for float64 inputs). Differentiable in q, k, v (the backward is a
    ring too; ``deterministic``: bitwise reproducible for a fixed world size)."""
    return ring_attention("ring", q, k, v, None, 0, dropout_p, softmax_scale, causal, window_size, alibi_slopes,
                          deterministic, return_attn_probs, group, softcap)


def zigzag_ring_flash_attn_func(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0,
                                softmax_scale: Optional[float] = None, causal: bool = False,
                                window_size: tuple[int, int] = (-1, -1), alibi_slopes: Optional[Tensor] = None,
                                deterministic: bool = False, return_attn_probs: bool = False, group=None, *,
                                softcap: float = 0.0):
    """Zigzag ring attention: as ``ring_flash_attn_func`` with layout "zigzag" (the sequence
    in 2*world chunks, rank r holding chunks r and 2*world-1-r: S_local even)."""
    return ring_attention("zigzag", q, k, v, None, 0, dropout_p, softmax_scale, causal, window_size, alibi_slopes,
                          deterministic, return_attn_probs, group, softcap)


def stripe_flash_attn_func(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0,
                           softmax_scale: Optional[float] = None, causal: bool = False,
                           window_size: tuple[int, int] = (-1, -1), alibi_slopes: Optional[Tensor] = None,
                           deterministic: bool = False, return_attn_probs: bool = False, group=None, *,
                           softcap: float = 0.0):
    """Stripe attention: as ``ring_flash_attn_func`` with layout "stripe" (rank r holds global
    rows r, r + world, r + 2 world, ...: ``shard(x, "stripe", rank, world)``), which gives
    every rank the same causal work. Windows are applied in global rows (ring-flash-attention
    passes them to each step unchanged); ALiBi is not supported (a distance to another
    rank's key is not a whole number of local rows)."""
    return ring_attention("stripe", q, k, v, None, 0, dropout_p, softmax_scale, causal, window_size, alibi_slopes,
                          deterministic, return_attn_probs, group, softcap)


def ulysses_flash_attn_func(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0,
                            softmax_scale: Optional[float] = None, causal: bool = False,
                            window_size: tuple[int, int] = (-1, -1), alibi_slopes: Optional[Tensor] = None,
                            deterministic: bool = False, return_attn_probs: bool = False, group=None, *,
                            softcap: float = 0.0):
    """Ulysses attention, shards as ``ring_flash_attn_func`` (layout "ulysses" = "ring");
    H and Hk must be divisible by the world size. Causal is aligned bottom-right over the
    whole sequence (top-left too when q and k/v have the same length)."""
    return ulysses_attention(q, k, v, None, 0, dropout_p, softmax_scale, causal, window_size, alibi_slopes,
                             deterministic, return_attn_probs, group, softcap)


def usp_flash_attn_func(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                        causal: bool = False, window_size: tuple[int, int] = (-1, -1),
                        alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
                        return_attn_probs: bool = False, *, ulysses_group, ring_group, ring_layout: str = "zigzag",
                        softcap: float = 0.0):
    """USP attention (unified sequence parallelism) over a mesh of U x R ranks: this
    process is rank u of ``ulysses_group`` (U ranks) and rank r of ``ring_group`` (R ranks),
    two groups that share only it. q (B, S_local, H, D), k / v (B, S_local, Hk, D / Dv):
    ``usp_shard(x, ring_layout, r, R, u, U)``, the u-th of U contiguous pieces of ring rank
    r's rows in ``ring_layout`` ("ring", "zigzag" (the default: the same causal work on every
    ring rank) or "stripe"). H and Hk must be divisible by U. Features as the ring layout's
    (stripe: no ALiBi); returns as ``ring_flash_attn_func``, differentiable in q, k, v."""
    return usp_attention(q, k, v, None, 0, dropout_p, softmax_scale, causal, window_size, alibi_slopes, deterministic,
                         return_attn_probs, ulysses_group, ring_group, softcap, ring_layout)


def usp_flash_attn_varlen_func(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                               dropout_p: float = 0.0, softmax_scale: Optional[float] = None, causal: bool = False,
                               window_size: tuple[int, int] = (-1, -1), alibi_slopes: Optional[Tensor] = None,
                               deterministic: bool = False, return_attn_probs: bool = False, *, ulysses_group,
                               ring_group, ring_layout: str = "zigzag", softcap: float = 0.0):
    """USP attention over packed documents: q (T_local, H, D) is
    ``usp_shard(x, ring_layout, r, R, u, U, dim=0, cu_seqlens=cu_seqlens)`` (ring rank r's
    pieces of every document, as ``ring_flash_attn_varlen_func`` cuts them, then cut into U
    contiguous pieces), ``cu_seqlens`` the GLOBAL offsets. ring_layout "ring" or "zigzag";
    as the ring's packed forms, causal or not, no windows or ALiBi."""
    return usp_attention(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal, window_size,
                         alibi_slopes, deterministic, return_attn_probs, ulysses_group, ring_group, softcap,
                         ring_layout)


def ring_flash_attn_varlen_func(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                                dropout_p: float = 0.0, softmax_scale: Optional[float] = None, causal: bool = False,
                                window_size: tuple[int, int] = (-1, -1), alibi_slopes: Optional[Tensor] = None,
                                deterministic: bool = False, return_attn_probs: bool = False, group=None, *,
                                softcap: float = 0.0):
    """Ring attention over packed documents. ``cu_seqlens`` (B + 1,) int32: the GLOBAL
    packed sequence's offsets (the same on every rank; ring-flash-attention takes the local
    ones, global // world: pass the global ones here), every document's length divisible
    by the world size; ``max_seqlen`` its longest document (0: not given). Rank r holds piece
    r of every document (layout "ring" with cu_seqlens): q (total / world, H, D), k / v
    (total / world, Hk, D).

    Returns out (total / world, H, Dv), with ``return_attn_probs`` (out, lse (H, total /
    world), None). ``window_size`` and ``alibi_slopes`` are not supported here (each
    document's pieces would need their own offsets): ``ulysses_flash_attn_varlen_func``
    has them."""
    return ring_attention("ring", q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal, window_size,
                          alibi_slopes, deterministic, return_attn_probs, group, softcap)


def zigzag_ring_flash_attn_varlen_func(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                                       dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                                       causal: bool = False, window_size: tuple[int, int] = (-1, -1),
                                       alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
                                       return_attn_probs: bool = False, group=None, *, softcap: float = 0.0):
    """As ``ring_flash_attn_varlen_func`` with every document cut into 2*world pieces, rank r
    holding pieces r and 2*world-1-r of each (layout "zigzag" with cu_seqlens): document
    lengths divisible by 2*world."""
    return ring_attention("zigzag", q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal, window_size,
                          alibi_slopes, deterministic, return_attn_probs, group, softcap)


def ulysses_flash_attn_varlen_func(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                                   dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                                   causal: bool = False, window_size: tuple[int, int] = (-1, -1),
                                   alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
                                   return_attn_probs: bool = False, group=None, *, softcap: float = 0.0):
    """Ulysses attention over packed documents: q (total / world, H, D) is rank r's
    contiguous rows of the packed sequence (layout "ulysses"; documents may straddle
    ranks), ``cu_seqlens`` the global offsets. Every feature of ``flash_attn_varlen_func``
    except dropout (windows and ALiBi included)."""
    return ulysses_attention(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal, window_size,
                             alibi_slopes, deterministic, return_attn_probs, group, softcap)


def llama3_flash_attn_varlen_func(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                                  max_seqlen_q: int, max_seqlen_k: int, heads_k_stride: int, local_k_slice: slice,
                                  dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                                  causal: bool = False, window_size: tuple[int, int] = (-1, -1),
                                  alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
                                  return_attn_probs: bool = False, group=None, *, softcap: float = 0.0):
    """Llama 3's context parallelism over packed documents (ring-flash-attention's signature,
    plus ``softcap``). q (T, H, D), k / v (T, Hk, D): rank r's rows [r T, (r + 1) T) of the
    global packed sequence (layout "llama3": contiguous, documents may straddle ranks).
    ``cu_seqlens_q``, ``cu_seqlens_k``, ``max_seqlen_q``, ``max_seqlen_k`` and
    ``local_k_slice`` are this rank's, from ``llama3_flash_attn_prepare_cu_seqlens(cu_seqlens,
    causal, rank, world_size)``; ``heads_k_stride`` KV heads are gathered at a time (a
    divisor of Hk: fewer heads, less memory for the gathered rows).

    Causal, windows, ALiBi ((H,) slopes), softcap and GQA with global positions; no
    dropout, and no non-causal window or ALiBi over a document that continues on the next
    rank (raises). Prepare with the call's ``causal``: on offsets prepared with
    ``causal=True`` a non-causal call raises where a document continues on the next rank (its
    keys there would be missing); on offsets prepared with ``causal=False`` a causal call
    cuts the keys past its rows.

    Returns out (T, H, Dv); with ``return_attn_probs``, (out, lse (H, T) float32 (float64 for
    float64 inputs), None). Differentiable in q, k, v."""
    return llama3_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, heads_k_stride,
                            local_k_slice, dropout_p, softmax_scale, causal, window_size, alibi_slopes,
                            deterministic, return_attn_probs, group, softcap)


def _split(packed: Tensor, count: int, name: str) -> tuple:
    """packed (..., count, H, D) (3-D rows packed, 4-D dense, + the packing dim) as ``count``
    tensors; anything else as a placeholder the collective check rejects on every rank (an
    error raised here, on one rank only, would leave the others waiting in the check)."""
    if isinstance(packed, Tensor) and packed.dim() in (4, 5) and packed.shape[-3] == count:
        return packed.unbind(dim=-3)
    return (Unsplit(name, packed, count),) * count


def _kv(kv: Tensor) -> tuple:
    return _split(kv, 2, "kv")


def ring_flash_attn_kvpacked_func(q: Tensor, kv: Tensor, *args, **kwargs):
    """``ring_flash_attn_func`` with kv (B, S_local, 2, Hk, D)."""
    return ring_flash_attn_func(q, *_kv(kv), *args, **kwargs)


def ring_flash_attn_qkvpacked_func(qkv: Tensor, *args, **kwargs):
    """``ring_flash_attn_func`` with qkv (B, S_local, 3, H, D)."""
    return ring_flash_attn_func(*_split(qkv, 3, "qkv"), *args, **kwargs)


def zigzag_ring_flash_attn_kvpacked_func(q: Tensor, kv: Tensor, *args, **kwargs):
    """``zigzag_ring_flash_attn_func`` with kv (B, S_local, 2, Hk, D)."""
    return zigzag_ring_flash_attn_func(q, *_kv(kv), *args, **kwargs)


def zigzag_ring_flash_attn_qkvpacked_func(qkv: Tensor, *args, **kwargs):
    """``zigzag_ring_flash_attn_func`` with qkv (B, S_local, 3, H, D)."""
    return zigzag_ring_flash_attn_func(*_split(qkv, 3, "qkv"), *args, **kwargs)


def stripe_flash_attn_kvpacked_func(q: Tensor, kv: Tensor, *args, **kwargs):
    """``stripe_flash_attn_func`` with kv (B, S_local, 2, Hk, D)."""
    return stripe_flash_attn_func(q, *_kv(kv), *args, **kwargs)


def stripe_flash_attn_qkvpacked_func(qkv: Tensor, *args, **kwargs):
    """``stripe_flash_attn_func`` with qkv (B, S_local, 3, H, D)."""
    return stripe_flash_attn_func(*_split(qkv, 3, "qkv"), *args, **kwargs)


def usp_flash_attn_kvpacked_func(q: Tensor, kv: Tensor, *args, **kwargs):
    """``usp_flash_attn_func`` with kv (B, S_local, 2, Hk, D)."""
    return usp_flash_attn_func(q, *_kv(kv), *args, **kwargs)


def usp_flash_attn_qkvpacked_func(qkv: Tensor, *args, **kwargs):
    """``usp_flash_attn_func`` with qkv (B, S_local, 3, H, D)."""
    return usp_flash_attn_func(*_split(qkv, 3, "qkv"), *args, **kwargs)


def usp_flash_attn_varlen_kvpacked_func(q: Tensor, kv: Tensor, cu_seqlens: Tensor, max_seqlen: int, *args, **kwargs):
    """``usp_flash_attn_varlen_func`` with kv (T_local, 2, Hk, D)."""
    return usp_flash_attn_varlen_func(q, *_kv(kv), cu_seqlens, max_seqlen, *args, **kwargs)


def usp_flash_attn_varlen_qkvpacked_func(qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, *args, **kwargs):
    """``usp_flash_attn_varlen_func`` with qkv (T_local, 3, H, D)."""
    return usp_flash_attn_varlen_func(*_split(qkv, 3, "qkv"), cu_seqlens, max_seqlen, *args, **kwargs)


def ring_flash_attn_varlen_kvpacked_func(q: Tensor, kv: Tensor, cu_seqlens: Tensor, max_seqlen: int, *args, **kwargs):
    """``ring_flash_attn_varlen_func`` with kv (total / world, 2, Hk, D)."""
    return ring_flash_attn_varlen_func(q, *_kv(kv), cu_seqlens, max_seqlen, *args, **kwargs)


def ring_flash_attn_varlen_qkvpacked_func(qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, *args, **kwargs):
    """``ring_flash_attn_varlen_func`` with qkv (total / world, 3, H, D)."""
    return ring_flash_attn_varlen_func(*_split(qkv, 3, "qkv"), cu_seqlens, max_seqlen, *args, **kwargs)


def zigzag_ring_flash_attn_varlen_kvpacked_func(q: Tensor, kv: Tensor, cu_seqlens: Tensor, max_seqlen: int, *args,
                                                **kwargs):
    """``zigzag_ring_flash_attn_varlen_func`` with kv (total / world, 2, Hk, D)."""
    return zigzag_ring_flash_attn_varlen_func(q, *_kv(kv), cu_seqlens, max_seqlen, *args, **kwargs)


def zigzag_ring_flash_attn_varlen_qkvpacked_func(qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, *args, **kwargs):
    """``zigzag_ring_flash_attn_varlen_func`` with qkv (total / world, 3, H, D)."""
    return zigzag_ring_flash_attn_varlen_func(*_split(qkv, 3, "qkv"), cu_seqlens, max_seqlen, *args, **kwargs)


def llama3_flash_attn_varlen_kvpacked_func(q: Tensor, kv: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                                           max_seqlen_q: int, max_seqlen_k: int, heads_k_stride: int,
                                           local_k_slice: slice, *args, **kwargs):
    """``llama3_flash_attn_varlen_func`` with kv (T, 2, Hk, D)."""
    return llama3_flash_attn_varlen_func(q, *_kv(kv), cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                         heads_k_stride, local_k_slice, *args, **kwargs)


def llama3_flash_attn_varlen_qkvpacked_func(qkv: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                                            max_seqlen_q: int, max_seqlen_k: int, heads_k_stride: int,
                                            local_k_slice: slice, *args, **kwargs):
    """``llama3_flash_attn_varlen_func`` with qkv (T, 3, H, D)."""
    return llama3_flash_attn_varlen_func(*_split(qkv, 3, "qkv"), cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                         max_seqlen_k, heads_k_stride, local_k_slice, *args, **kwargs)


def all_gather_shards(x: Tensor, layout: str, *, dim: int = 1, cu_seqlens=None, group=None) -> Tensor:
    """The full tensor from every rank's shard ``x`` (all_gather, then ``unshard``); not
    differentiable. Every rank's shard must have the same shape and dtype: checked on every
    rank first (an ArgumentError everywhere; gloo aborted a process on a size mismatch, and
    equal sizes of other shapes were gathered as the wrong rows)."""
    import torch
    import torch.distributed as dist

    from . import comm
    from .checks import fingerprint
    from .layout import LAYOUTS, _offsets

    ring = comm.Group(group)
    # (every dtype torch has, by name: the group's backend refuses what it cannot gather)
    dtypes = sorted({str(t) for t in vars(torch).values() if isinstance(t, torch.dtype)})

    def validate() -> list[tuple]:
        if not isinstance(x, Tensor):
            raise ArgumentError(f"x: expected a tensor, got {type(x).__name__}")
        if x.dim() > 8:
            raise ArgumentError(f"x: expected at most 8 dims, got shape {tuple(x.shape)}")
        ring.check_device(x.device)
        if layout not in LAYOUTS:
            raise ArgumentError(f"layout: expected one of {list(LAYOUTS)}, got {layout!r}")
        if not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
            raise ArgumentError(f"dim: expected an int in [-{x.dim()}, {x.dim()}), got {dim!r}")
        fields = [("x", list(x.shape)), ("x.dtype", [dtypes.index(str(x.dtype))], dtypes),
                  ("layout", [LAYOUTS.index(layout)], list(LAYOUTS)), ("dim", [dim % x.dim()])]
        # (always a field, so that offsets on some ranks only are named as such)
        fields.append(("cu_seqlens", [-1.0] if cu_seqlens is None else
                       fingerprint(torch.tensor(_offsets(cu_seqlens), dtype=torch.int64))))
        return fields

    comm.check_collectively(ring, validate)
    pieces = [torch.empty_like(x) for _ in range(ring.world_size)]
    dist.all_gather(pieces, x.contiguous(), group=group)
    return unshard(pieces, layout, dim=dim, cu_seqlens=cu_seqlens)

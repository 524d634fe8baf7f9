"""Inference from a KV cache: flash-attn 2's ``flash_attn_with_kvcache``.

One call appends the step's new keys / values to the cache in place (rotary embedding
applied to the keys first), then attends over the cache through the fused forward, whose
per-sequence view reads each batch entry's cache row (``kv_batch_idx``), skips its left
padding (``leftpad_k``) and follows its pages (``block_table``); ``seqused_k`` = cache
length + new keys. Nothing is read back to the host on GPUs: the append computes its
indices on the device; traced (torch.compile, make_fx) it is one custom op that mutates the
caches: the compiled ``flashattn::kvcache_write`` (CPU; CUDA where built), elsewhere
``flashattn::kvcache_append`` (torch index ops; plain eager calls run them directly).
"""
from __future__ import annotations

import operator
from typing import Optional, Union

import torch
from torch import Tensor

from . import backends, ops
from .api import (_check_flash_options, _check_qkv, _check_values, _index_tensor, check_used_pages, elements_overlap,
                  expanded, flash_right_side, index_values_readable, shares_memory, softmax_scale_of,
                  unbounded_past)
from .errors import ArgumentError
from .rotary import check_tables, rotate_at

__all__ = ["flash_attn_with_kvcache"]


def _write_new_keys(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, cache_seqlens: Tensor,
                    cache_batch_idx: Optional[Tensor], block_table: Optional[Tensor]) -> None:
    """Write k, v (B, S_new, Hk, D) into the caches at slots cache_seqlens[b] + i of batch
    entry b's row (``cache_batch_idx[b]``, dense caches) or pages (``block_table[b]``).
    Slots are clamped into the caches (callers check the values where they can read them),
    so no value writes out of bounds."""
    batch, new = k.shape[0], k.shape[1]
    capacity = block_table.shape[1] * k_cache.shape[1] if block_table is not None else k_cache.shape[1]
    if batch * new == 0 or capacity == 0 or k_cache.shape[0] == 0:
        return  # nothing to write, or nowhere (callers reject the latter where they can see it)
    slots = cache_seqlens.long().unsqueeze(1) + torch.arange(new, device=k.device)  # (B, S_new)
    if block_table is not None:
        page_size = k_cache.shape[1]
        slots = slots.clamp(0, capacity - 1)
        pages = block_table.long().gather(1, slots // page_size).clamp(0, k_cache.shape[0] - 1)
        index = (pages.flatten(), (slots % page_size).flatten())
    else:
        rows = cache_batch_idx.long() if cache_batch_idx is not None else torch.arange(batch, device=k.device)
        rows = rows.clamp(0, k_cache.shape[0] - 1).unsqueeze(1).expand(batch, new)
        index = (rows.flatten(), slots.clamp(0, k_cache.shape[1] - 1).flatten())
    k_cache.index_put_(index, k.flatten(0, 1))
    v_cache.index_put_(index, v.flatten(0, 1))


@torch.library.custom_op("flashattn::kvcache_append", mutates_args=("k_cache", "v_cache"))
def kvcache_append(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, cache_seqlens: Tensor,
                   cache_batch_idx: Optional[Tensor], block_table: Optional[Tensor]) -> None:
    """The append as an op that mutates the caches, for torch.compile, tracing and dispatch
    modes. Plain eager calls skip it (``_append``): torch.library.custom_op's Python layers
    cost more than the write itself."""
    _write_new_keys(k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table)


@kvcache_append.register_fake
def _kvcache_append_fake(k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table) -> None:
    return None


def _compiled_write(device: torch.device) -> bool:
    """Whether the compiled op ``flashattn::kvcache_write`` writes caches on ``device``: the
    CPU, and sm80+ GPUs (the CUDA builds' targets) where flashattn_py._C has its CUDA kernels,
    whatever backend attends."""
    if device.type == "cpu":
        return backends.compiled_ops_error() is None
    return (device.type == "cuda" and backends.cuda_kernels_error() is None
            and backends.cuda_device_props(device.index)[0] >= 8)


def _apart_from_caches(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """New keys and values, each copied where it shares memory with a cache (e.g.
    ``k=k_cache[:, 3:6]``): the append reads them while writing the cache, and would read
    slots it has already overwritten (torch's copy_ raises for such overlaps). Where memory
    cannot be compared (a trace's fake tensors, tensor subclasses, a dispatch mode) always
    copies: a step's new keys are small."""
    if not (type(k) is Tensor and type(v) is Tensor and type(k_cache) is Tensor and type(v_cache) is Tensor
            and ops.unobserved_eager()):
        return k.clone(), v.clone()
    return tuple(t.clone() if shares_memory(t, k_cache, v_cache) else t for t in (k, v))


def _append(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, cache_seqlens: Tensor,
            cache_batch_idx: Optional[Tensor], block_table: Optional[Tensor]) -> None:
    """The append. Where compiled: the op ``flashattn::kvcache_write`` (one dispatcher call
    and, on a GPU, one launch; eager or traced). Elsewhere torch index ops: directly on plain
    eager tensors, else through ``kvcache_append`` (so a trace records one mutating node).
    New keys in the caches' memory: the CPU op reads them from a copy it takes itself
    (also where a compiler drops a copy made here); elsewhere they are copied here.
    (Spelled out rather than looped: this runs on every decode step.)"""
    if _compiled_write(k_cache.device):
        if k_cache.device.type != "cpu":
            k, v = _apart_from_caches(k_cache, v_cache, k, v)
        torch.ops.flashattn.kvcache_write.default(k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table)
        if not torch.compiler.is_compiling():  # (the dispatcher leaves a C++ op's mutated version counters)
            torch.autograd.graph.increment_version((k_cache, v_cache))
        return
    k, v = _apart_from_caches(k_cache, v_cache, k, v)
    if (type(k_cache) is Tensor and type(v_cache) is Tensor and type(k) is Tensor and type(v) is Tensor
            and type(cache_seqlens) is Tensor and ops.unobserved_eager() and ops.outside_dispatcher_ok()):
        _write_new_keys(k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table)
    else:
        kvcache_append(k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table)


def _check_kvcache_values(k_cache: Tensor, cache_seqlens: Tensor, new: int, cache_batch_idx: Optional[Tensor],
                          cache_leftpad: Optional[Tensor], block_table: Optional[Tensor],
                          seqlen_ro: Optional[int], causal_positions: bool, seqlen_q: int) -> None:
    """The values of the index tensors (ValueError naming the argument, before the cache is
    touched): read on the host for CPU tensors, for GPU tensors only with
    FLASHATTN_CHECK_INPUTS=1 (that syncs). While torch.compile traces, where the compiled
    graph runs (``_checked_kvcache_seqlens``)."""
    if not index_values_readable(cache_seqlens.device):
        return
    paged = block_table is not None
    capacity = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
    lengths = cache_seqlens.tolist()
    for b, n in enumerate(lengths):
        if n < 0:
            raise ArgumentError(f"cache_seqlens: entry {b} is negative ({n})")
        if n + new >= 2**31:  # (a paged table can reach that many slots by reusing pages)
            raise ArgumentError(f"cache_seqlens: entry {b} holds {n} keys; with {new} new ones more than 2**31 - 1")
        if n + new > capacity:
            what = f"{block_table.shape[1]} pages of {k_cache.shape[1]} slots" if paged else f"{capacity} slots"
            raise ArgumentError(f"cache_seqlens: entry {b} holds {n} keys; {new} new ones exceed its capacity ({what})")
    if cache_batch_idx is not None and cache_batch_idx.numel():
        rows = cache_batch_idx.tolist()
        if min(rows) < 0 or max(rows) >= k_cache.shape[0]:
            raise ArgumentError(f"cache_batch_idx: rows must be in [0, {k_cache.shape[0]}), got "
                                f"[{min(rows)}, {max(rows)}]")
        if new and len(set(rows)) < len(rows):  # (two entries' new keys into one row: one would be lost)
            raise ArgumentError(f"cache_batch_idx: entries appending new keys must have rows of their own, got "
                                f"{rows}")
    if cache_leftpad is not None:
        for b, (pad, n) in enumerate(zip(cache_leftpad.tolist(), lengths)):
            if pad < 0 or pad > n + new:
                raise ArgumentError(f"cache_leftpad: entry {b} ({pad}) is outside [0, {n + new}]")
    if paged:
        check_used_pages(block_table, [n + new for n in lengths], k_cache.shape[1], k_cache.shape[0], "block_table",
                         "entry")
    if seqlen_ro is not None:
        last = max(lengths) + max(new, seqlen_q if causal_positions else 1) - 1 if lengths else -1
        if last >= seqlen_ro:
            raise ArgumentError(f"rotary_cos: {seqlen_ro} positions, but position {last} is needed")


def _checked_kvcache_seqlens(k_cache: Tensor, cache_seqlens: Tensor, new: int, cache_batch_idx: Optional[Tensor],
                             cache_leftpad: Optional[Tensor], block_table: Optional[Tensor],
                             seqlen_ro: Optional[int], causal_positions: bool, seqlen_q: int) -> Tensor:
    """_check_kvcache_values now, or, while torch.compile traces (the values unknown), in
    the compiled graph before the cache is written: the op ``flashattn::check_kvcache``,
    whose output, a copy of ``cache_seqlens``, the call then uses (so no compiler drops
    the check). Returns the cache_seqlens to use."""
    if _check_values():
        _check_kvcache_values(k_cache, cache_seqlens, new, cache_batch_idx, cache_leftpad, block_table, seqlen_ro,
                              causal_positions, seqlen_q)
        return cache_seqlens
    if not index_values_readable(cache_seqlens.device):
        return cache_seqlens
    return _check_kvcache_op(k_cache, cache_seqlens, new, cache_batch_idx, cache_leftpad, block_table,
                             -1 if seqlen_ro is None else seqlen_ro, causal_positions, seqlen_q)


@torch.library.custom_op("flashattn::check_kvcache", mutates_args=())
def _check_kvcache_op(k_cache: Tensor, cache_seqlens: Tensor, new: int, cache_batch_idx: Optional[Tensor],
                      cache_leftpad: Optional[Tensor], block_table: Optional[Tensor], seqlen_ro: int,
                      causal_positions: bool, seqlen_q: int) -> Tensor:
    """_checked_kvcache_seqlens' check in a compiled graph (seqlen_ro -1: no rotary):
    cache_seqlens' copy once the values pass."""
    _check_kvcache_values(k_cache, cache_seqlens, new, cache_batch_idx, cache_leftpad, block_table,
                          None if seqlen_ro < 0 else seqlen_ro, causal_positions, seqlen_q)
    return cache_seqlens.clone()


@_check_kvcache_op.register_fake
def _check_kvcache_fake(k_cache: Tensor, cache_seqlens: Tensor, *args) -> Tensor:
    return torch.empty_like(cache_seqlens)


def flash_attn_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Optional[Tensor] = None,
    v: Optional[Tensor] = None,
    rotary_cos: Optional[Tensor] = None,
    rotary_sin: Optional[Tensor] = None,
    cache_seqlens: Optional[Union[int, Tensor]] = None,
    cache_batch_idx: Optional[Tensor] = None,
    cache_leftpad: Optional[Tensor] = None,
    block_table: Optional[Tensor] = None,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: Optional[Tensor] = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
    *,
    backend: str = "auto",
):
    """flash-attn 2's ``flash_attn_with_kvcache``: append to a KV cache and attend over it.

    Args:
        q: (B, Sq, H, D).
        k_cache, v_cache: (B_cache, S_cache, Hk, D) caches, or with ``block_table`` paged
            pools (num_pages, page_size, Hk, D) of any page size >= 1.
        k, v: None, or the step's new keys / values (B, S_new, Hk, D): written IN PLACE into
            the caches at slots ``cache_seqlens[b] .. + S_new`` (through the block table when
            paged), then attended.
        rotary_cos, rotary_sin: None, or (seqlen_ro, rotary_dim / 2) in q's dtype
            (rotary_dim even, <= D; only with k and v): the new keys are rotated at their slots, q at
            ``cache_seqlens[b] + i`` when causal or windowed, else every query at
            ``cache_seqlens[b]``. ``rotary_interleaved``: pairs (0, 1), (2, 3), ... (GPT-J) or
            (i, i + rotary_dim / 2) (GPT-NeoX).
        cache_seqlens: int or int32 (B,): keys already in each entry's cache (default: full).
        cache_batch_idx: int32 (B,): the cache row of each batch entry (dense caches).
        cache_leftpad: int32 (B,): the cache slot where each entry's keys start (the slots
            before are not attended; the diagonal and ALiBi distances count from there,
            rotary positions stay the slots').
        block_table: int32 (B, max_blocks): the pages of each entry.
        causal / window_size / softcap / alibi_slopes: as flash_attn_func, the diagonal
            aligned bottom-right on the keys each entry attends.
        num_splits: key splits per query block (flash-decoding): 0 = heuristic (on CPU: split
            while there are fewer than two tasks per thread; GPUs: as the kernel decides), 1 =
            none, n = n. Results agree within rounding for every value.
        return_softmax_lse: also return lse (B, H, Sq) float32 (float64 for float64 inputs).

    Inference only: there is no backward (a call that would need a gradient raises).
    Values of the index tensors are checked (ValueError naming the argument, the cache left
    untouched) for CPU tensors; for GPU tensors with FLASHATTN_CHECK_INPUTS=1, else they
    are clamped into the tensors' bounds on the device.
    """
    paged = block_table is not None
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) and (t is not None or name in ("q", "k_cache", "v_cache")):
            raise ArgumentError(f"{name}: expected a tensor, got {type(t).__name__}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dim() != 4:
            raise ArgumentError(f"{name}: expected a 4-D tensor, got shape {tuple(t.shape)}")
    if (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, k_cache, v_cache))):
        raise ArgumentError("q: flash_attn_with_kvcache has no backward (inference); call it under torch.no_grad()")
    if (k is None) != (v is None):
        raise ArgumentError("k, v: pass both new keys and new values, or neither")
    _check_qkv(q, k_cache, v_cache, ("q", "k_cache", "v_cache"), heads_dim=2, seq_dim=1, paged=True)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ArgumentError(f"{name}: must have a contiguous last dimension (stride 1, got {t.stride(-1)}): the "
                                f"kernels {'write and ' if k is not None else ''}read its rows in place")

    batch, seqlen_q, num_heads, head_dim = q.shape
    # (with cache_batch_idx any row may serve any entry, but there must be one: its values
    # are clamped into the rows on GPUs)
    if not paged and k_cache.shape[0] < (batch if cache_batch_idx is None else min(batch, 1)):
        raise ArgumentError(f"k_cache: {k_cache.shape[0]} cache rows for a batch of {batch}")
    device = q.device
    if block_table is not None:
        block_table = _index_tensor("block_table", block_table, device, 2)
        if block_table.shape[0] != batch:
            raise ArgumentError(f"block_table: expected one row per batch entry ({batch}), got {block_table.shape[0]}")
        if cache_batch_idx is not None:
            raise ArgumentError("cache_batch_idx: not supported with a paged cache (block_table picks the pages)")
        if k_cache.shape[0] == 0 and block_table.numel() > 0:  # (its entries could only point outside it)
            raise ArgumentError("k_cache: an empty page pool (0 pages) with block_table entries")
    capacity = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
    if cache_seqlens is None:
        if k is not None:
            raise ArgumentError("cache_seqlens: required with new keys (where do they go?)")
        cache_seqlens = capacity
    if not isinstance(cache_seqlens, Tensor):  # an int (a NumPy integer too)
        # (under torch.compile a decode loop's int is symbolic: comparing it would guard on
        # each value; its values are checked in the graph, _checked_kvcache_seqlens)
        if not torch.compiler.is_compiling():
            try:
                cache_seqlens = operator.index(cache_seqlens)
            except TypeError:
                raise ArgumentError(f"cache_seqlens: expected an int or an int32 (B,) tensor, got "
                                    f"{type(cache_seqlens).__name__}") from None
            if not -2**31 <= cache_seqlens < 2**31:
                raise ArgumentError(f"cache_seqlens: {cache_seqlens} does not fit in int32")
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=device)
    cache_seqlens = _index_tensor("cache_seqlens", cache_seqlens, device, 1)
    if cache_seqlens.shape[0] != batch:
        raise ArgumentError(f"cache_seqlens: expected one length per batch entry ({batch}), got {cache_seqlens.shape[0]}")
    if cache_batch_idx is None and not paged and k_cache.shape[0] > batch:
        # (a cache with more rows than the batch: entry b reads row b, as in flash-attn)
        cache_batch_idx = torch.arange(batch, dtype=torch.int32, device=device)
    if cache_batch_idx is not None:
        cache_batch_idx = _index_tensor("cache_batch_idx", cache_batch_idx, device, 1)
        if cache_batch_idx.shape[0] != batch:
            raise ArgumentError(f"cache_batch_idx: expected {batch} entries, got {cache_batch_idx.shape[0]}")
    if cache_leftpad is not None:
        cache_leftpad = _index_tensor("cache_leftpad", cache_leftpad, device, 1)
        if cache_leftpad.shape[0] != batch:
            raise ArgumentError(f"cache_leftpad: expected {batch} entries, got {cache_leftpad.shape[0]}")
    new = 0
    if k is not None:
        for name, t, cache in (("k", k, k_cache), ("v", v, v_cache)):
            if t.dim() != 4 or t.shape[0] != batch or t.shape[2:] != cache.shape[2:]:
                raise ArgumentError(f"{name}: expected (B, S_new, Hk, D) = ({batch}, S_new, {cache.shape[2]}, "
                                    f"{cache.shape[3]}), got {tuple(getattr(t, 'shape', ()))}")
            if t.dtype != cache.dtype or t.device != cache.device:
                raise ArgumentError(f"{name}: must match the cache's dtype and device ({cache.dtype}, {cache.device}), "
                                    f"got {t.dtype}, {t.device}")
        if k.shape[1] != v.shape[1]:
            raise ArgumentError(f"k, v: new lengths differ: {k.shape[1]} vs {v.shape[1]}")
        # (caches that are read only may share memory; written ones may not)
        for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
            if expanded(cache):
                raise ArgumentError(f"{name}: an expanded tensor (stride 0) cannot be written in place: several "
                                    f"entries would share one slot's memory")
        if k_cache is v_cache or (type(k_cache) is Tensor and type(v_cache) is Tensor
                                  and not torch.compiler.is_compiling() and not k_cache.is_meta
                                  and elements_overlap(k_cache, v_cache)):
            raise ArgumentError("k_cache, v_cache: the same memory; the values would overwrite the keys")
        new = k.shape[1]
    if (rotary_cos is None) != (rotary_sin is None):
        raise ArgumentError("rotary_cos, rotary_sin: pass both or neither")
    left, right = _check_flash_options(q, 0.0, window_size, softcap, alibi_slopes, batch)
    # (a window side at least as long as the cache is no bound: that also decides how q is
    # rotated below)
    window = (unbounded_past(left, capacity), 0 if causal else flash_right_side(left, right, seqlen_q, capacity))
    seqlen_ro = None
    if rotary_cos is not None:
        if k is None:
            raise ArgumentError("rotary_cos: rotary embedding needs new keys (k, v)")
        # (as flash-attn: the tables in the query's dtype)
        check_tables(rotary_cos, rotary_sin, ("rotary_cos", "rotary_sin"), device, head_dim, q.dtype, "q's ")
        seqlen_ro = rotary_cos.shape[0]
    if not isinstance(num_splits, int) or not 0 <= num_splits < 2**31:
        raise ArgumentError(f"num_splits: expected an int in [0, 2**31), got {num_splits!r}")
    scale = softmax_scale_of("softmax_scale", softmax_scale, head_dim)  # (checked before the cache is written)
    causal_positions = causal or window != (-1, -1)
    cache_seqlens = _checked_kvcache_seqlens(k_cache, cache_seqlens, new, cache_batch_idx, cache_leftpad, block_table,
                                             seqlen_ro, causal_positions, seqlen_q)

    # The backend is chosen (and a forced one that can't serve the call refused) before the
    # caches are written.
    backend = backends.select(ops.problem(q, k_cache, v_cache, None, 0.0, alibi_slopes=alibi_slopes,
                                          cu_seqlens=cache_seqlens, block_table=block_table), backend)
    if k is not None:
        if rotary_cos is not None:
            positions = cache_seqlens.long().unsqueeze(1) + torch.arange(new, device=device)
            k = rotate_at(k, rotary_cos, rotary_sin, positions.clamp(0, seqlen_ro - 1), rotary_interleaved)
        # (unobserved_eager first: torch.compile cannot trace is_inference)
        if ops.unobserved_eager() and not torch.is_inference_mode_enabled():
            for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
                if cache.is_inference():
                    raise ArgumentError(f"{name}: Inplace update to inference tensor outside InferenceMode is not "
                                        f"allowed (as torch's in-place ops; create the caches outside "
                                        f"inference_mode or call under it)")
        _append(k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table)
    if rotary_cos is not None:
        offsets = torch.arange(seqlen_q, device=device) if causal_positions else torch.zeros(seqlen_q, dtype=torch.long,
                                                                                             device=device)
        positions = (cache_seqlens.long().unsqueeze(1) + offsets).clamp(0, seqlen_ro - 1)
        q = rotate_at(q, rotary_cos, rotary_sin, positions, rotary_interleaved)
    seqused_k = cache_seqlens + new if new else cache_seqlens  # (int32: the check above keeps it from wrapping)
    out, lse = ops.attention(
        q, k_cache, v_cache, scale=scale, softcap=float(softcap), alibi_slopes=alibi_slopes, window_left=window[0],
        window_right=window[1], diag_offset=0, backend=backend, seqused_k=seqused_k, block_table=block_table,
        max_seqlen_q=seqlen_q, max_seqlen_k=capacity, bottom_right=True, kv_batch_idx=cache_batch_idx,
        leftpad_k=cache_leftpad, num_splits=num_splits, selected=True, forward_only=True,
    )
    return (out, lse) if return_softmax_lse else out

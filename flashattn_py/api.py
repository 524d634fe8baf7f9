"""Public attention functions: validate, normalise the layout, call ``ops.attention``.

Two conventions, one computation (docs/design.md, "What every backend computes"):
- ``flash_attn_func``: flash-attn 2's signature, (B, S, H, D), causal aligned bottom-right.
- ``scaled_dot_product_attention``: ``torch.nn.functional``'s exact signature,
  (..., H, S, D), causal aligned top-left.
"""
from __future__ import annotations

import contextlib
import math
import operator
import os
import sys
from typing import Optional

import torch
from torch import Tensor

from . import backends, ops
from .errors import ArgumentError
from .reference import attention_ref, sequence_keys


def _check_tensors(names: tuple[str, ...], *tensors) -> None:
    for name, t in zip(names, tensors):
        # isinstance(t, Tensor) runs torch's metaclass __instancecheck__ (thousands of
        # instructions): the exact type first, which every call on plain tensors has.
        if type(t) is not Tensor and not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")


def _autocast(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor]):
    """Under ``torch.autocast`` on the inputs' device, the floating-point tensors other than
    float64 in the autocast dtype, as torch's SDPA gets them (it is on autocast's
    lower-precision list for CPU and CUDA); otherwise the tensors unchanged."""
    device = query.device.type
    # (meta and other devices without autocast: asking would raise)
    if device not in ("cpu", "cuda") and not torch.amp.is_autocast_available(device):
        return query, key, value, attn_mask
    if not torch.is_autocast_enabled(device):
        return query, key, value, attn_mask
    dtype = torch.get_autocast_dtype(device)

    def cast(t: Optional[Tensor]) -> Optional[Tensor]:
        if t is None or not t.is_floating_point() or t.dtype == torch.float64 or t.dtype == dtype:
            return t
        return t.to(dtype)

    return cast(query), cast(key), cast(value), cast(attn_mask)


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, names: tuple[str, str, str], heads_dim: int, seq_dim: int,
               min_head_dim: int = 1, paged: bool = False, no_heads_ok: bool = False) -> None:
    """Shape, dtype and device checks shared by both conventions (tensors, 4-D expected;
    ``paged``: k / v are page pools, whose first dim counts pages, not sequences;
    ``no_heads_ok``: zero heads allowed (SDPA, which returns an empty output as torch's)).
    (Each attribute is read once: this runs on every call, and decode-sized calls feel it.)"""
    nq, nk, nv = names
    qs, ks, vs = q.shape, k.shape, v.shape
    for name, shape in zip(names, (qs, ks, vs)):
        if len(shape) != 4:
            raise ArgumentError(f"{name}: expected a 4-D tensor, got shape {tuple(shape)}")
    dtype = q.dtype
    if dtype not in backends.FLOAT_DTYPES or k.dtype != dtype or v.dtype != dtype:
        for name, t in zip(names, (q, k, v)):
            if t.dtype not in backends.FLOAT_DTYPES:
                raise ArgumentError(f"{name}: dtype must be float16, bfloat16, float32 or float64, got {t.dtype}")
        raise ArgumentError(f"{nq}, {nk}, {nv}: Expected query, key, and value to have the same dtype, but got "
                            f"{nq}.dtype: {q.dtype} {nk}.dtype: {k.dtype} and {nv}.dtype: {v.dtype} instead.")
    device = q.device
    if k.device != device or v.device != device:
        raise ArgumentError(f"{nq}, {nk}, {nv}: Expected query, key, and value to be on the same device, but got "
                            f"{nq}.device: {q.device} {nk}.device: {k.device} and {nv}.device: {v.device} instead.")
    if not (ks[0] == vs[0] and (paged or qs[0] == ks[0])):
        raise ArgumentError(f"{nq}, {nk}, {nv}: batch sizes differ: {qs[0]}, {ks[0]}, {vs[0]}")
    if ks[seq_dim] != vs[seq_dim]:
        raise ArgumentError(f"{nk}, {nv}: sequence lengths differ: {ks[seq_dim]} vs {vs[seq_dim]}")
    if ks[heads_dim] != vs[heads_dim]:
        raise ArgumentError(f"{nk}, {nv}: head counts differ: {ks[heads_dim]} vs {vs[heads_dim]}")
    if qs[3] != ks[3]:
        raise ArgumentError(f"{nq}, {nk}: head dims differ: {qs[3]} vs {ks[3]}")
    for name, shape in ((nq, qs), (nv, vs)):
        if not min_head_dim <= shape[3] <= backends.MAX_HEAD_DIM:
            raise ArgumentError(f"{name}: head dim must be in {min_head_dim}..{backends.MAX_HEAD_DIM}, got {shape[3]}")
    h, hk = qs[heads_dim], ks[heads_dim]
    if hk == 0 and not no_heads_ok:
        raise ArgumentError(f"{nk}: needs at least one key/value head, got {hk}")
    if (hk == 0 and h != 0) or (hk != 0 and h % hk != 0):
        raise ArgumentError(f"{nq}, {nk}: number of query heads ({h}) must be a multiple of key/value heads ({hk})")


def _check_dropout(dropout_p: float, one_allowed: bool = False) -> None:
    """dropout_p in [0, 1) (flash-attn), or [0, 1] with one_allowed (torch's SDPA)."""
    p = _number(dropout_p)
    if not (0.0 <= p <= 1.0 if one_allowed else 0.0 <= p < 1.0):  # (NaN fails too)
        raise ArgumentError(f"dropout_p: dropout probability has to be in [0, 1{']' if one_allowed else ')'}, "
                            f"but got {dropout_p!r}")


def _number(value) -> float:
    """value as a float (NumPy scalars, one-element tensors too), NaN for what is not a number
    (so that the caller's range check refuses it with the argument's name)."""
    if type(value) is float or type(value) is int:  # (the common call, without a conversion)
        return value
    if isinstance(value, (str, bytes)):  # (float("0.1") would take a string: torch refuses one)
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        return math.nan


# The largest float32: a scale or softcap beyond it is inf in the kernels.
FLOAT32_MAX = 3.4028234663852886e38


def softmax_scale_of(name: str, scale, head_dim) -> float:
    """The softmax scale as a float: 1/sqrt(head_dim) when None (1 for a head dim of 0),
    else a finite number (NaN or inf would give every output NaN)."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim) if head_dim else 1.0
    if isinstance(scale, (str, bytes)):  # (float() would take "0.1"; torch refuses a string)
        raise ArgumentError(f"{name}: expected a number, got {scale!r}")
    try:
        value = float(scale)
    except (TypeError, ValueError, RuntimeError):
        raise ArgumentError(f"{name}: expected a number, got {scale!r}") from None
    if not abs(value) <= FLOAT32_MAX:
        raise ArgumentError(f"{name}: expected a finite number, got {scale!r}")
    return value


def check_softcap(softcap) -> None:
    """softcap: a number >= 0, finite (0: none)."""
    if not 0.0 <= _number(softcap) <= FLOAT32_MAX:
        raise ArgumentError(f"softcap: must be a finite number >= 0, got {softcap!r}")


def check_window_size(window_size) -> tuple[int, int]:
    """``window_size`` (left, right) as two ints, each >= -1 (-1: unbounded); anything else
    (a float side, which int() would truncate, None, a third side) an ArgumentError."""
    try:
        left, right = window_size
        # (plain ints, the common case, without a call per side: this runs on every call)
        if type(left) is not int and not isinstance(left, torch.SymInt):
            left = operator.index(left)
        if type(right) is not int and not isinstance(right, torch.SymInt):
            right = operator.index(right)
    except (TypeError, ValueError):
        raise ArgumentError(f"window_size: expected (left, right) ints, each >= -1, got {window_size!r}") from None
    if left < -1 or right < -1:
        raise ArgumentError(f"window_size: expected (left, right) with each >= -1, got {(left, right)}")
    return left, right


def unbounded_past(side: int, seqlen_k) -> int:
    """flash-attn's first step (flash_api.cpp: dense, varlen and KV-cache calls alike): a
    window side at least ``seqlen_k`` long (the keys; varlen: max_seqlen_k; a KV cache: its
    capacity) is no bound, -1. Sides of 0 or less are not compared; a larger one is compared
    with a symbolic seqlen_k too (torch.compile guards on it, recompiling where Sk crosses
    the side; torch.export with a dynamic Sk refuses it), never taken literally where eager
    would not."""
    return -1 if side > 0 and side >= seqlen_k else side


def flash_right_side(left: int, right: int, seqlen_q, seqlen_k) -> int:
    """The right window side flash-attn's kernels apply (flash_api.cpp: unbounded_past on
    both sides, then set_params_fprop: where one side is bounded and the other is not, the
    other becomes seqlen_k; torch's varlen_attn runs the same code), for a non-causal call
    of the ``flash_attn_*`` functions. Only the right side changes results by this: a left
    side of Sk or more never binds, and a right side of Sk binds only where Sq > Sk + 1
    (rows i < Sq - Sk - 1 see keys up to i + 2 Sk - Sq, short of the last), so with a
    bounded left side an unbounded right one is Sk there and stays -1 elsewhere (Sq and
    Sk compared only then: under torch.compile a guard, and Sk then a constant)."""
    right = unbounded_past(right, seqlen_k)
    if right < 0 and unbounded_past(left, seqlen_k) >= 0 and seqlen_q > seqlen_k + 1:
        return seqlen_k
    return right


def _check_flash_options(q: Tensor, dropout_p, window_size, softcap, alibi_slopes, batch: int) -> tuple[int, int]:
    """The options flash-attn's functions share; returns window_size's sides (check_window_size)."""
    _check_dropout(dropout_p)
    window = check_window_size(window_size)
    check_softcap(softcap)
    num_heads = q.shape[-2]
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, Tensor):
            raise ArgumentError(f"alibi_slopes: expected a float32 tensor, got {type(alibi_slopes).__name__}")
        if alibi_slopes.dtype != torch.float32 or alibi_slopes.device != q.device:
            raise ArgumentError(
                f"alibi_slopes: must be float32 on {q.device}, got {alibi_slopes.dtype} on {alibi_slopes.device}"
            )
        shape = alibi_slopes.shape  # (compared element by element: `in` misjudges symbolic sizes)
        if not ((len(shape) == 1 and shape[0] == num_heads)
                or (len(shape) == 2 and shape[0] == batch and shape[1] == num_heads)):
            raise ArgumentError(
                f"alibi_slopes: expected shape ({num_heads},) or ({batch}, {num_heads}), "
                f"got {tuple(alibi_slopes.shape)}"
            )
    return window


def _flash(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
           return_attn_probs, backend):
    """flash_attn_func on validated (B, S, H, D) inputs."""
    seqlen_q, head_dim = q.shape[1], q.shape[3]
    scale = softmax_scale_of("softmax_scale", softmax_scale, head_dim)
    window_left, window_right = window_size  # (checked: _check_flash_options)
    window_right = 0 if causal else flash_right_side(window_left, window_right, seqlen_q, k.shape[1])
    diag_offset = k.shape[1] - seqlen_q
    out, lse = ops.attention(
        q, k, v, scale=scale, softcap=float(softcap), alibi_slopes=alibi_slopes, window_left=window_left,
        window_right=window_right, diag_offset=diag_offset, dropout_p=float(dropout_p),
        deterministic=deterministic, backend=backend,
    )
    if not return_attn_probs:
        return out
    if not dropout_p:
        return out, lse, q.new_empty(0)  # (as flash-attn: probabilities only with dropout, no N^2 tensor)
    return out, lse, dense_probs(q, k, v, scale, softcap, alibi_slopes, window_left, window_right, diag_offset)


def dense_probs(q: Tensor, k: Tensor, v: Tensor, scale: float, softcap: float, alibi_slopes: Optional[Tensor],
                window_left: int, window_right: int, diag_offset: int) -> Tensor:
    """The attention probabilities (B, H, Sq, Sk) of a dense call the kernels ran with these
    options, from the reference (debugging: O(Sq * Sk) memory)."""
    with torch.no_grad(), ops.formula_dtype(q.device):
        return attention_ref(q, k, v, scale=scale, softcap=float(softcap), alibi_slopes=alibi_slopes,
                             window_left=window_left, window_right=window_right, diag_offset=diag_offset,
                             return_probs=True)[2]


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
        dropout_p: dropout probability on the attention weights (0 at inference); the
            mask is drawn from torch's default generator (``torch.manual_seed`` fixes it).
        softmax_scale: multiplies q.k; default 1/sqrt(D).
        causal: mask keys after the query, the diagonal aligned bottom-right
            (query i sees keys j <= i + Sk - Sq).
        window_size: (left, right) sliding window around that diagonal, -1 = unbounded.
        softcap: > 0 caps scores with ``softcap * tanh(s / softcap)``.
        alibi_slopes: (H,) or (B, H) float32; adds ``-slope * |i + Sk - Sq - j|``.
        deterministic: reproducible backward (the CPU kernel always is).
        return_attn_probs: also return the softmax lse (B, H, Sq) and, with dropout_p > 0,
            the attention probabilities (B, H, Sq, Sk) before dropout, from the reference
            formula (debugging; O(Sq * Sk) memory); without dropout an empty tensor, as
            flash-attn.
        backend: "auto", "cpu", "triton", "cuda" or "reference".

    Returns:
        out (B, Sq, H, Dv), or ``(out, softmax_lse, probs)`` with ``return_attn_probs``.
    """
    backends.check_backend_name(backend)
    _check_tensors(("q", "k", "v"), q, k, v)
    _check_qkv(q, k, v, ("q", "k", "v"), heads_dim=2, seq_dim=1)
    window = _check_flash_options(q, dropout_p, window_size, softcap, alibi_slopes, q.shape[0])
    return _flash(q, k, v, dropout_p, softmax_scale, causal, window, softcap, alibi_slopes, deterministic,
                  return_attn_probs, backend)


def flash_attn_qkvpacked_func(qkv: Tensor, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                              backend: str = "auto"):
    """flash-attn's packed form: qkv (B, S, 3, H, D) -> out (B, S, H, D)."""
    if not isinstance(qkv, Tensor) or qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ArgumentError(f"qkv: expected shape (B, S, 3, H, D), got {tuple(getattr(qkv, 'shape', ()))}")
    q, k, v = qkv.unbind(2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs, backend=backend)


def flash_attn_kvpacked_func(q: Tensor, kv: Tensor, dropout_p=0.0, softmax_scale=None, causal=False,
                             window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                             return_attn_probs=False, *, backend: str = "auto"):
    """flash-attn's packed form: q (B, Sq, H, D), kv (B, Sk, 2, Hk, D) -> out (B, Sq, H, D)."""
    if not isinstance(kv, Tensor) or kv.dim() != 5 or kv.shape[2] != 2:
        raise ArgumentError(f"kv: expected shape (B, Sk, 2, Hk, D), got {tuple(getattr(kv, 'shape', ()))}")
    k, v = kv.unbind(2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs, backend=backend)


def _index_tensor(name: str, t, device: torch.device, dim: int) -> Tensor:
    """An int32 index tensor (offsets, lengths, pages) on ``device``: int64 is narrowed."""
    if not isinstance(t, Tensor) or t.dim() != dim or t.dtype not in (torch.int32, torch.int64):
        raise ArgumentError(f"{name}: expected a {dim}-D int32 tensor, got {getattr(t, 'dtype', type(t).__name__)} "
                            f"of shape {tuple(getattr(t, 'shape', ()))}")
    if t.device != device:
        raise ArgumentError(f"{name}: must be on {device} (q's device), got {t.device}")
    if t.dtype == torch.int64:
        # (checked before the values are: 2**32 + 5 would pass every later check as 5;
        # while torch.compile traces, by an op of the graph, as checked_packed's)
        t = _narrowed(t, name) if _check_values() or not index_values_readable(device) else _narrow_op(t, name)
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _narrowed(t: Tensor, name: str) -> Tensor:
    """int64 ``t`` as int32, an ArgumentError if a value does not fit (when values may be read)."""
    narrowed = t.int()
    if t.numel() and index_values_readable(t.device) and not torch.equal(narrowed, t):
        lo, hi = torch.stack(torch.aminmax(t)).tolist()
        raise ArgumentError(f"{name}: values must fit in int32, got {hi if hi >= 2**31 else lo}")
    return narrowed


@torch.library.custom_op("flashattn::narrow_index", mutates_args=())
def _narrow_op(t: Tensor, name: str) -> Tensor:
    """_narrowed in a compiled graph."""
    return _narrowed(t, name)


@_narrow_op.register_fake
def _narrow_fake(t: Tensor, name: str) -> Tensor:
    return torch.empty_like(t, dtype=torch.int32)


def index_values_readable(device: torch.device) -> bool:
    """Whether index tensors (offsets, lengths, pages) on ``device`` are read back for value
    checks: CPU tensors always; GPU tensors only with FLASHATTN_CHECK_INPUTS=1 (a host sync),
    and not while a CUDA graph is being captured (a sync there fails the capture)."""
    if device.type == "cpu":
        return True
    # (while torch.compile traces, the capture is asked about where the check runs: its op)
    return (os.environ.get("FLASHATTN_CHECK_INPUTS", "0") not in ("", "0")
            and (torch.compiler.is_compiling()
                 or not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())))


def _check_values() -> bool:
    """Whether index tensors' values may be read for checks now: not while torch.compile
    traces or a dispatch mode records (make_fx, FakeTensorMode: the values may not be
    known), nor under torch.jit.trace (a check run now would not be in the trace); the
    checks become ops of the graph, checked_packed. _check_packed says which devices'
    values are read."""
    return ops.unobserved_eager() and not torch.jit.is_tracing()


# The packed-sequence arguments under flash-attn's names, and under torch's varlen_attn's:
# errors name the argument the caller passed.
FLASH_NAMES = {n: n for n in ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k",
                              "seqused_k", "block_table", "softmax_scale")}
TORCH_VARLEN_NAMES = dict(FLASH_NAMES, q="query", k="key", v="value", cu_seqlens_q="cu_seq_q",
                          cu_seqlens_k="cu_seq_k", max_seqlen_q="max_q", max_seqlen_k="max_k",
                          softmax_scale="scale")


def _check_packed(cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], max_seqlen_q: int,
                  max_seqlen_k: int, total_q: int, total_k: Optional[int], seqused_k: Optional[Tensor],
                  block_table: Optional[Tensor], page_size: int, num_pages: int, names: dict) -> None:
    """Value checks of packed-sequence and paged-K/V arguments (ValueError naming the
    argument). Read on the host: CPU tensors always, GPU tensors only when asked
    (``FLASHATTN_CHECK_INPUTS=1``); without them the kernels clamp every value into the
    tensors' bounds (no out-of-bounds access, but a wrong value gives a wrong answer)."""
    device = next(t for t in (cu_seqlens_q, cu_seqlens_k, seqused_k, block_table) if t is not None).device
    if not index_values_readable(device):
        return
    lengths_k = None
    for arg, cu, total, longest, max_arg in (("cu_seqlens_q", cu_seqlens_q, total_q, max_seqlen_q, "max_seqlen_q"),
                                             ("cu_seqlens_k", cu_seqlens_k, total_k, max_seqlen_k, "max_seqlen_k")):
        if cu is None:
            continue
        offsets = cu.tolist()
        if offsets[0] != 0 or any(b < a for a, b in zip(offsets, offsets[1:])) or (
                total is not None and offsets[-1] != total):
            where = f"to the total length {total}" if total is not None else "(non-decreasing)"
            raise ArgumentError(f"{names[arg]}: must rise from 0 {where}, got {offsets}")
        lengths = [b - a for a, b in zip(offsets, offsets[1:])]
        if lengths and longest > 0 and max(lengths) > longest:  # (0: not given)
            raise ArgumentError(f"{names[max_arg]}: {longest} is below the longest sequence ({max(lengths)})")
        if arg == "cu_seqlens_k":
            lengths_k = lengths
    capacity = block_table.shape[1] * page_size if block_table is not None else None
    if seqused_k is not None:
        # the keys a sequence has: its cu_seqlens_k length, the longest allowed (its pages below)
        limits = []
        for b in range(seqused_k.shape[0]):
            bounds = [x for x in (lengths_k[b] if lengths_k else None, max_seqlen_k or None) if x is not None]
            limits.append(min(bounds) if bounds else None)
        for b, (used, limit) in enumerate(zip(seqused_k.tolist(), limits)):
            if used < 0 or (limit is not None and used > limit):
                raise ArgumentError(f"{names['seqused_k']}: sequence {b} uses {used} keys, outside [0, {limit}]")
            if capacity is not None and used > capacity:  # (within its other limits: the pages are short)
                raise ArgumentError(f"{names['block_table']}: {block_table.shape[1]} pages of {page_size} keys per "
                                    f"sequence hold fewer than the {used} keys sequence {b} uses "
                                    f"({names['seqused_k']})")
    if block_table is not None:
        used = seqused_k.tolist() if seqused_k is not None else (lengths_k or [capacity] * block_table.shape[0])
        check_used_pages(block_table, [min(n, capacity) for n in used], page_size, num_pages, names["block_table"],
                         "sequence")
        if lengths_k and max(lengths_k) > capacity:
            raise ArgumentError(f"{names['block_table']}: {block_table.shape[1]} pages of {page_size} keys per "
                                f"sequence hold fewer than its longest sequence ({max(lengths_k)} keys)")


def checked_packed(cu_seqlens_q: Tensor, cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int,
                   total_q: int, total_k: Optional[int], seqused_k: Optional[Tensor], block_table: Optional[Tensor],
                   page_size: int, num_pages: int, names: dict) -> Tensor:
    """_check_packed now, or, while torch.compile traces (the values unknown), where the
    compiled graph runs: through the op ``flashattn::check_packed``, whose output, a copy
    of ``cu_seqlens_q``, the call then uses (so no compiler drops the check). Returns the
    cu_seqlens_q to use."""
    if _check_values():
        _check_packed(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, total_q, total_k, seqused_k,
                      block_table, page_size, num_pages, names)
        return cu_seqlens_q
    if not index_values_readable(cu_seqlens_q.device):
        return cu_seqlens_q
    return _check_packed_op(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, total_q,
                            -1 if total_k is None else total_k, seqused_k, block_table, page_size, num_pages,
                            ",".join(names[n] for n in FLASH_NAMES))


@torch.library.custom_op("flashattn::check_packed", mutates_args=())
def _check_packed_op(cu_seqlens_q: Tensor, cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int,
                     total_q: int, total_k: int, seqused_k: Optional[Tensor], block_table: Optional[Tensor],
                     page_size: int, num_pages: int, names: str) -> Tensor:
    """checked_packed's check in a compiled graph (total_k -1: paged; names: the arguments'
    names in FLASH_NAMES' order, comma-separated): cu_seqlens_q's copy once the values pass."""
    _check_packed(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, total_q, None if total_k < 0 else total_k,
                  seqused_k, block_table, page_size, num_pages, dict(zip(FLASH_NAMES, names.split(","))))
    return cu_seqlens_q.clone()


@_check_packed_op.register_fake
def _check_packed_fake(cu_seqlens_q: Tensor, *args) -> Tensor:
    return torch.empty_like(cu_seqlens_q)


def check_used_pages(block_table: Tensor, keys: list[int], page_size: int, num_pages: int, name: str,
                     entry: str) -> None:
    """ValueError unless the pages each row of ``block_table`` uses (enough for its ``keys``)
    are in [0, num_pages); entries past them are never read (allocators pad them, e.g. -1)."""
    # First the columns any row uses, as one min / max (a decode step's check: a few
    # microseconds); only where that finds a value out of range (a bad page, or a shorter
    # row's padding) is each row held to its own pages.
    widest = (max(keys, default=0) + page_size - 1) // page_size
    used = block_table[:, :max(0, widest)]
    if used.numel() == 0:
        return
    low, high = torch.stack(torch.aminmax(used)).tolist()  # (one read back)
    if low >= 0 and high < num_pages:
        return
    pages_used = torch.tensor([(n + page_size - 1) // page_size for n in keys], device=block_table.device)
    in_use = torch.arange(block_table.shape[1], device=block_table.device) < pages_used.unsqueeze(1)
    bad = in_use & ((block_table < 0) | (block_table >= num_pages))
    if bad.any():
        b = int(bad.any(1).nonzero()[0])
        raise ArgumentError(f"{name}: {entry} {b}'s pages must be in [0, {num_pages}), got "
                            f"{block_table[b, :int(pages_used[b])].tolist()}")


def _length(name: str, value) -> int:
    """A length argument as an int >= 0: an int, a SymInt, or what torch's int arguments
    also take (a NumPy integer, a one-element integer tensor)."""
    if not isinstance(value, (int, torch.SymInt)):
        try:
            value = operator.index(value)
        except TypeError:
            raise ArgumentError(f"{name}: expected an int >= 0, got {value!r}") from None
    if value < 0:
        raise ArgumentError(f"{name}: expected an int >= 0, got {value!r}")
    return value


def sdpa_mask_dtype(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A float mask as scaled_dot_product_attention takes it beside inputs of ``dtype``:
    float32 (read as float32, as torch does) or ``dtype`` as it is, another float cast to
    ``dtype``; a bool one as it is."""
    if mask.dtype in (torch.bool, torch.float32, dtype):
        return mask
    return mask.to(dtype)


def shares_memory(t: Tensor, *others: Tensor) -> bool:
    """Whether t's storage overlaps one of others' in memory (views, from_numpy views of one
    buffer). Plain eager tensors only: the caller asks where their memory is known."""
    storage = t.untyped_storage()
    start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    for other in others:
        o = other.untyped_storage()
        if start < o.data_ptr() + o.nbytes() and o.data_ptr() < end:
            return True
    return False


def elements_overlap(a: Tensor, b: Tensor) -> bool:
    """Whether a and b (plain eager tensors, one device) have an element at one address.
    Views with the same element size, shape and strides (two caches cut from one buffer, side
    by side or interleaved, or one buffer seen through two storages): whether the distance
    between their first elements is a sum of steps t_d * stride_d with |t_d| < size_d,
    searched down the strides, largest first, each dim trying only the steps that leave the
    rest reachable by the smaller ones (a few per dim; past a budget it answers yes).
    Views with other strides: whether they start at one address."""
    if not a.numel() or not b.numel() or a.device != b.device:
        return False
    # (first: whether their byte ranges meet at all, the common case of two allocations)
    a_start, b_start = a.data_ptr(), b.data_ptr()
    a_end = a_start + (sum((n - 1) * s for n, s in zip(a.shape, a.stride())) + 1) * a.element_size()
    b_end = b_start + (sum((n - 1) * s for n, s in zip(b.shape, b.stride())) + 1) * b.element_size()
    if a_end <= b_start or b_end <= a_start:
        return False
    if a.element_size() != b.element_size() or a.shape != b.shape or a.stride() != b.stride():
        return a_start == b_start
    item = a.element_size()
    dims = sorted(((n - 1, s) for n, s in zip(a.shape, a.stride()) if n > 1 and s > 0), key=lambda d: -d[1])
    reach = [0] * (len(dims) + 1)  # reach[i]: the farthest dims i.. can step
    for i in range(len(dims) - 1, -1, -1):
        reach[i] = reach[i + 1] + dims[i][0] * dims[i][1]
    distance = b_start - a_start
    if distance % item:  # (elements that straddle each other's: whether the byte spans meet)
        return abs(distance) < (reach[0] + 1) * item
    budget = [10_000]

    def reachable(i: int, rest: int) -> bool:
        if rest == 0:
            return True
        if i == len(dims) or budget[0] <= 0:
            return i < len(dims)
        budget[0] -= 1
        steps, stride = dims[i]
        lo = max(-steps, -((reach[i + 1] - rest) // stride))  # ceil((rest - reach) / stride)
        hi = min(steps, (rest + reach[i + 1]) // stride)
        return any(reachable(i + 1, rest - t * stride) for t in range(lo, hi + 1))

    return reachable(0, distance // item)


def expanded(t: Tensor) -> bool:
    """Whether several of t's elements are one memory location (a stride 0 over a size > 1):
    such a tensor cannot be written in place."""
    strides = t.stride()
    return 0 in strides and any(stride == 0 and size > 1 for size, stride in zip(t.shape, strides))


def at_most(length, bound):
    """min(length, bound) for plain ints; a symbolic one unchanged (no guard)."""
    return min(length, bound) if isinstance(length, int) and isinstance(bound, int) else length


def _packed_keys(k: Tensor, block_table: Optional[Tensor]) -> int:
    """The most keys a packed call's sequence can have: k's rows, or a block table's pages."""
    return block_table.shape[1] * k.shape[1] if block_table is not None else k.shape[0]


def _varlen_right_side(window: tuple[int, int], max_seqlen_q, max_seqlen_k, q: Tensor, k: Tensor,
                       block_table: Optional[Tensor]) -> int:
    """The right window side of a packed call: flash_right_side on the maxima, a maximum of
    0 (not given) being the packed total (_packed_keys), as for the kernels."""
    return flash_right_side(window[0], window[1], max_seqlen_q or q.shape[0],
                            max_seqlen_k or _packed_keys(k, block_table))


def _varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Optional[Tensor],
            max_seqlen_q: int, max_seqlen_k: int, *, seqused_k: Optional[Tensor], block_table: Optional[Tensor],
            dropout_p: float, scale: Optional[float], window: tuple[int, int], softcap: float,
            alibi_slopes: Optional[Tensor], deterministic: bool, backend: str,
            bottom_right: bool = True, names: dict = FLASH_NAMES,
            rng_state: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Packed sequences in one call: q (total_q, H, D), k / v (total_k, Hk, D) or a page
    pool (num_pages, page_size, Hk, D) with ``block_table``; validates (errors use
    ``names`` for the arguments), then runs the kernels on (1, total, H, D) views. Returns
    out (total_q, H, Dv) and lse (H, total_q). ``rng_state``: ops.attention's."""
    backends.check_backend_name(backend)
    n = names
    paged = block_table is not None
    k_dims = 4 if paged else 3
    for arg, t, dims in (("q", q, 3), ("k", k, k_dims), ("v", v, k_dims)):
        if not isinstance(t, Tensor) or t.dim() != dims:
            shape = "(num_pages, page_size, Hk, D)" if dims == 4 else "(total, H, D)"
            raise ArgumentError(f"{n[arg]}: expected a {dims}-D {shape} tensor, got shape "
                                f"{tuple(getattr(t, 'shape', ()))}")
    if k.shape[:-1] != v.shape[:-1]:
        raise ArgumentError(f"{n['k']}, {n['v']}: shapes differ before the head dim: {tuple(k.shape)} vs "
                            f"{tuple(v.shape)}")
    q4 = q.unsqueeze(0)
    k4, v4 = (k, v) if paged else (k.unsqueeze(0), v.unsqueeze(0))
    _check_qkv(q4, k4, v4, (n["q"], n["k"], n["v"]), heads_dim=2, seq_dim=1, paged=paged)
    cu_seqlens_q = _index_tensor(n["cu_seqlens_q"], cu_seqlens_q, q.device, 1)
    batch = cu_seqlens_q.shape[0] - 1
    if batch < 0:
        raise ArgumentError(f"{n['cu_seqlens_q']}: expected B + 1 offsets, got none")
    if cu_seqlens_k is not None:
        cu_seqlens_k = _index_tensor(n["cu_seqlens_k"], cu_seqlens_k, q.device, 1)
        if cu_seqlens_k.shape[0] != batch + 1:
            raise ArgumentError(f"{n['cu_seqlens_q']}, {n['cu_seqlens_k']}: batch sizes differ: {batch} vs "
                                f"{cu_seqlens_k.shape[0] - 1}")
    elif not paged:
        raise ArgumentError(f"{n['cu_seqlens_k']}: required unless K/V are paged (block_table)")
    if seqused_k is not None:
        seqused_k = _index_tensor(n["seqused_k"], seqused_k, q.device, 1)
        if seqused_k.shape[0] != batch:
            raise ArgumentError(f"{n['seqused_k']}: expected one length per sequence ({batch}), got "
                                f"{seqused_k.shape[0]}")
    page_size = num_pages = 0
    if paged:
        block_table = _index_tensor(n["block_table"], block_table, q.device, 2)
        if block_table.shape[0] != batch:
            raise ArgumentError(f"{n['block_table']}: expected one row per sequence ({batch}), got "
                                f"{block_table.shape[0]}")
        num_pages, page_size = k.shape[0], k.shape[1]
        if page_size < 1:
            raise ArgumentError(f"{n['k']}: pages must hold at least one key (page_size >= 1)")
        if num_pages == 0 and block_table.numel() > 0:  # (its entries could only point outside it)
            raise ArgumentError(f"{n['k']}: an empty page pool (0 pages) with {n['block_table']} entries")
        if cu_seqlens_k is None and seqused_k is None:
            raise ArgumentError(f"{n['seqused_k']}: paged K/V (block_table) needs the keys per sequence: "
                                f"{n['seqused_k']} or {n['cu_seqlens_k']}")
    max_seqlen_q, max_seqlen_k = (_length(n[arg], value) for arg, value in (("max_seqlen_q", max_seqlen_q),
                                                                            ("max_seqlen_k", max_seqlen_k)))
    window = _check_flash_options(q, dropout_p, window, softcap, alibi_slopes, batch)
    window = (window[0], _varlen_right_side(window, max_seqlen_q, max_seqlen_k, q, k, block_table))
    scale = softmax_scale_of(n["softmax_scale"], scale, q.shape[-1])
    cu_seqlens_q = checked_packed(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q.shape[0],
                                  None if paged else k.shape[0], seqused_k, block_table, page_size, num_pages, n)
    # (no sequence is longer than the packed total, or a block table's pages: a larger max
    # only sized buffers, to crashes at 2**62; the dropout stream's rows are this long)
    max_seqlen_q = at_most(max_seqlen_q, q.shape[0])
    max_seqlen_k = at_most(max_seqlen_k, _packed_keys(k, block_table))
    # Paged K/V has no backward. torch's varlen_attn refuses such a call with inputs that need
    # a gradient; flash-attn's varlen function computes it and fails in the backward (code
    # run for inference outside no_grad works): so do the flash-attn forms here.
    no_backward = paged and (q.requires_grad or k.requires_grad or v.requires_grad) and torch.is_grad_enabled()
    message = (f"{n['block_table']}: paged K/V is forward-only (inference); call it under torch.no_grad() or "
               f"with tensors that do not require grad")
    if no_backward and (names is TORCH_VARLEN_NAMES or torch.compiler.is_compiling()):
        raise ArgumentError(message)  # (compiled: the backward's raise would be traced now)
    with torch.no_grad() if no_backward else contextlib.nullcontext():
        out, lse = ops.attention(
            q4, k4, v4, scale=scale, softcap=float(softcap),
            alibi_slopes=alibi_slopes, window_left=window[0], window_right=window[1], diag_offset=0,
            dropout_p=float(dropout_p), deterministic=deterministic, backend=backend, cu_seqlens_q=cu_seqlens_q,
            cu_seqlens_k=cu_seqlens_k, seqused_k=seqused_k, block_table=block_table, max_seqlen_q=max_seqlen_q,
            max_seqlen_k=max_seqlen_k, bottom_right=bottom_right, rng_state=rng_state,
        )
    if no_backward:
        out = _NoBackward.apply(message, [out], q, k, v)
    return out.squeeze(0), lse.squeeze(0)  # (views: no select_backward copying the packed gradient)


class _NoBackward(torch.autograd.Function):
    """``box[0]`` (an output computed without a graph) in the graph of ``inputs``, whose
    backward raises ``message``: a call with no backward that fails where its gradient is
    asked for. (The output comes in a list: given as an input, it would come back as a view,
    which refuses in-place changes.)"""

    @staticmethod
    def forward(message, box, *inputs):
        return box[0]

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.message = inputs[0]

    @staticmethod
    def backward(ctx, grad_out):
        raise ArgumentError(ctx.message)


def _jagged_parts(name: str, t: Tensor) -> tuple[Tensor, Tensor, int]:
    """A jagged nested tensor (B, H, j, D) (torch's SDPA layout: the ragged dim third) as
    packed rows (total, H, D), its int32 offsets (B + 1,) and its longest sequence."""
    if not t.is_nested or t.layout != torch.jagged or t.dim() != 4 or t._ragged_idx != 2:
        raise ArgumentError(f"{name}: expected a jagged nested tensor (B, H, j, D) (torch.jagged layout, ragged "
                            f"dim 2, as torch's SDPA takes them), got "
                            f"{'a nested' if t.is_nested else 'a dense'} tensor of {t.dim()} dims")
    rows = t.transpose(1, 2)  # (B, j, H, D): its values are the packed (total, H, D) rows
    if rows.lengths() is not None:  # (offsets then mark where each sequence starts, not where it ends)
        raise ArgumentError(f"{name}: a jagged nested tensor with holes (lengths set, e.g. from torch.nested.narrow) "
                            f"is not supported, as in torch's CPU SDPA; pass "
                            f"{name}.transpose(1, 2).contiguous().transpose(1, 2)")
    values = rows.values()
    if values.shape[0] >= 2**31:  # (the kernels' offsets are int32, as cu_seqlens)
        raise ArgumentError(f"{name}: {values.shape[0]} rows in all; at most 2**31 - 1")
    return values, rows.offsets().to(torch.int32), rows._get_max_seqlen()


def _nested_sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask, dropout_p: float, is_causal: bool,
                 scale: Optional[float], enable_gqa: bool) -> Tensor:
    """scaled_dot_product_attention on jagged nested tensors (B, H, j, D), as torch's SDPA
    takes them: every sequence in one launch of the packed-sequence kernels, offsets from the
    nested tensors; causal aligned top-left per sequence (torch's convention). Returns a
    jagged nested tensor (B, H, j_q, Dv)."""
    if attn_mask is not None:
        raise ArgumentError("attn_mask: not supported with nested (jagged) inputs (as in torch's fused kernels)")
    q, cu_q, max_q = _jagged_parts("query", query)
    k, cu_k, max_k = _jagged_parts("key", key)
    v, cu_v, _ = _jagged_parts("value", value)
    if cu_q.shape != cu_k.shape or cu_k.shape != cu_v.shape:
        raise ArgumentError(f"query, key, value: batch sizes differ: {cu_q.shape[0] - 1}, {cu_k.shape[0] - 1}, "
                            f"{cu_v.shape[0] - 1}")
    # (compared on the host for CPU tensors only: on GPUs that would sync every call)
    same_offsets = key.transpose(1, 2).offsets() is value.transpose(1, 2).offsets()
    if not same_offsets and cu_k.device.type == "cpu" and not torch.equal(cu_k, cu_v):
        raise ArgumentError("key, value: sequence lengths differ")
    if q.shape[1] != k.shape[1] and not enable_gqa:
        raise ArgumentError(f"query, key: head counts differ ({q.shape[1]} vs {k.shape[1]}); pass enable_gqa=True "
                            f"for GQA")
    q, k, v, _ = _autocast(q, k, v, None)
    _check_dropout(dropout_p, one_allowed=True)
    if dropout_p == 1.0:  # every weight dropped: zeros with zero gradients, as torch (and the dense path)
        _check_qkv(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), ("query", "key", "value"), heads_dim=2, seq_dim=1)
        empty = _NoOutputSeesAKey if torch.compiler.is_compiling() else _NoOutputSeesAKeyForwardAD
        out = empty.apply((q.shape[0], q.shape[1], v.shape[-1]), q, k, v, None)
    else:
        out, _ = _varlen(q, k, v, cu_q, cu_k, max_q, max_k, seqused_k=None, block_table=None, dropout_p=dropout_p,
                         scale=scale, window=(-1, 0) if is_causal else (-1, -1), softcap=0.0, alibi_slopes=None,
                         deterministic=False, backend="auto", bottom_right=False, names=TORCH_VARLEN_NAMES)
    nested = torch.nested.nested_tensor_from_jagged(out, query.transpose(1, 2).offsets(), min_seqlen=None,
                                                    max_seqlen=max_q)
    return nested.transpose(1, 2)


def flash_attn_varlen_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: Optional[Tensor] = None,
    *,
    backend: str = "auto",
):
    """flash-attn 2's ``flash_attn_varlen_func``: packed sequences, all in one kernel launch.

    Args:
        q: (total_q, H, D); k: (total_k, Hk, D); v: (total_k, Hk, Dv); or, with
            ``block_table``, k / v paged: (num_pages, page_size, Hk, D), any page size.
        cu_seqlens_q, cu_seqlens_k: (B + 1,) int32 offsets on q's device; sequence b is rows
            ``cu[b]:cu[b+1]`` (with paged K/V, cu_seqlens_k gives the key counts only).
            Sequences of length 0 are allowed (no key: out 0).
        max_seqlen_q, max_seqlen_k: the longest sequences (the kernels' grids are sized by
            them; checked on CPU tensors, see below); 0 stands for the packed totals (a
            block table's pages). flash-attn's window rule reads them: a right side of at
            least max_seqlen_k is -1, and -1 beside a bounded left side is max_seqlen_k.
        block_table: (B, max_blocks) int32: key j of sequence b is row j % page_size of page
            ``block_table[b, j // page_size]``. Forward only (inference).
        Other arguments as ``flash_attn_func``, per sequence (causal aligned bottom-right
        within each sequence; alibi_slopes (B, H) row b for sequence b).

    Returns:
        out (total_q, H, Dv); with ``return_attn_probs`` also lse (H, total_q) float32 (float64
        for float64 inputs) and, with dropout_p > 0, the probabilities before dropout
        (B, H, max_seqlen_q, max_seqlen_k) from the reference, sequence b's in
        [b, :, :Sq_b, :Sk_b], zeros past them (flash-attn's shape but for its rounding of the
        lengths up to 128; debugging only); without dropout an empty tensor, as flash-attn.

    Values of cu_seqlens / block_table are checked (ValueError) for CPU tensors; for GPU
    tensors only with ``FLASHATTN_CHECK_INPUTS=1`` (that reads them back to the host), the
    kernels otherwise clamp every offset and page index into bounds.
    """
    window = _causal_window(window_size, causal)
    out, lse = _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k=None,
                       block_table=block_table, dropout_p=dropout_p, scale=softmax_scale, window=window,
                       softcap=softcap, alibi_slopes=alibi_slopes, deterministic=deterministic, backend=backend)
    if not return_attn_probs:
        return out
    if not dropout_p:
        return out, lse, q.new_empty(0)  # (as flash-attn: probabilities only with dropout)
    return out, lse, varlen_probs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                                  window, softcap, alibi_slopes, block_table)


def varlen_probs(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Optional[Tensor],
                 max_seqlen_q: int, max_seqlen_k: int, softmax_scale: Optional[float], window: tuple[int, int],
                 softcap: float, alibi_slopes: Optional[Tensor], block_table: Optional[Tensor]) -> Tensor:
    """The attention probabilities of a packed call the kernels ran (its arguments, checked;
    ``window`` before the right-side rule) from the reference, flash-attn's padded layout
    (B, H, max_seqlen_q, max_seqlen_k), zeros past each sequence (debugging: reads the
    offsets on the host)."""
    # (the window the kernels applied)
    window = (window[0], _varlen_right_side(window, _length("max_seqlen_q", max_seqlen_q),
                                            _length("max_seqlen_k", max_seqlen_k), q, k, block_table))
    parts = []
    with torch.no_grad(), ops.formula_dtype(q.device):
        for b in range(cu_seqlens_q.shape[0] - 1):
            q0, q1 = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
            kb = sequence_keys(k if block_table is not None else k.unsqueeze(0), b, cu_seqlens_k, None, block_table)
            vb = sequence_keys(v if block_table is not None else v.unsqueeze(0), b, cu_seqlens_k, None, block_table)
            slopes = alibi_slopes[b] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
            _, _, pb = attention_ref(q[q0:q1].unsqueeze(0), kb.unsqueeze(0), vb.unsqueeze(0), scale=softmax_scale,
                                     softcap=float(softcap), alibi_slopes=slopes, window_left=window[0],
                                     window_right=window[1], bottom_right=True, return_probs=True)
            parts.append(pb[0])
    # (max_seqlen_q / _k within the packed totals, as for the kernels, and at least the
    # longest sequences: they may be 0, not given)
    rows = max([at_most(_length("max_seqlen_q", max_seqlen_q), q.shape[0]), *(p.shape[1] for p in parts)])
    cols = max([at_most(_length("max_seqlen_k", max_seqlen_k), _packed_keys(k, block_table)),
                *(p.shape[2] for p in parts)])
    probs = q.new_zeros((len(parts), q.shape[1], rows, cols))
    for b, part in enumerate(parts):
        probs[b, :, :part.shape[1], :part.shape[2]] = part
    return probs


def _causal_window(window_size, causal: bool) -> tuple[int, int]:
    """flash-attn's (window_size, causal) as one window: causal is a right bound of 0."""
    left, right = check_window_size(window_size)
    return (left, 0) if causal else (left, right)


def varlen_attn(query: Tensor, key: Tensor, value: Tensor, cu_seq_q: Tensor, cu_seq_k: Optional[Tensor], max_q: int,
                max_k: int, *, return_aux=None, scale: Optional[float] = None,
                window_size: tuple[int, int] = (-1, -1), enable_gqa: bool = False,
                seqused_k: Optional[Tensor] = None, block_table: Optional[Tensor] = None,
                num_splits: Optional[int] = None, backend: str = "auto"):
    """``torch.nn.attention.varlen.varlen_attn`` (torch 2.13), on CPU and GPU, with gradients.

    query (T_q, H, D); key / value (T_k, Hk, D), or page pools (num_pages, page_size, Hk,
    D) with ``block_table`` (N, max_pages) int32 (needs ``seqused_k``); cu_seq_q / cu_seq_k
    (N + 1,) int32 offsets; max_q / max_k the longest sequences; window_size (left, right)
    around each sequence's bottom-right diagonal ((-1, 0) is causal); enable_gqa allows
    fewer K/V heads (H % Hk == 0). seqused_k (N,): keys used per sequence. With
    ``return_aux`` asking for lse, returns ``(out, lse)``, lse (H, T_q) float32 (float64 for
    float64 inputs).
    num_splits (split-KV on GPUs; 1 = none) does not change results beyond rounding here
    and is accepted for compatibility. Unlike torch's, gradients flow with seqused_k too;
    paged K/V is forward-only, as in torch.
    """
    _check_tensors(("query", "key", "value"), query, key, value)
    k_dims = 3 if block_table is None else 4  # (page pools: (num_pages, page_size, Hk, D))
    for name, t, dims in (("query", query, 3), ("key", key, k_dims), ("value", value, k_dims)):
        if t.dim() != dims:
            raise ArgumentError(f"{name}: expected a {dims}-D tensor, got shape {tuple(t.shape)}")
    num_heads_k = key.size(-2)
    if num_heads_k == 0:
        raise ArgumentError("key: needs at least one key/value head, got 0")
    if not enable_gqa and query.size(1) != num_heads_k:
        raise ArgumentError(f"Expect query and key/value to have the same number of heads but got "
                            f"Hq={query.size(1)} and Hkv={num_heads_k}. Try setting enable_gqa=True for GQA.")
    if enable_gqa and query.size(1) % num_heads_k != 0:
        raise ArgumentError(f"Expect number of query heads to be a multiple of kv heads for GQA but got "
                            f"Hq={query.size(1)} and Hkv={num_heads_k}.")
    if block_table is not None and seqused_k is None:
        raise ArgumentError("seqused_k: block_table requires seqused_k (keys used per sequence)")
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 0):
        raise ArgumentError(f"num_splits: expected None or an int >= 0, got {num_splits!r}")
    window = check_window_size(window_size) if window_size is not None else (-1, -1)
    out, lse = _varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, seqused_k=seqused_k,
                       block_table=block_table, dropout_p=0.0, scale=scale, window=window, softcap=0.0,
                       alibi_slopes=None, deterministic=False, backend=backend, names=TORCH_VARLEN_NAMES)
    if return_aux is not None and getattr(return_aux, "lse", False):
        return out, lse
    return out


def varlen_attn_out(out: Tensor, query: Tensor, key: Tensor, value: Tensor, cu_seq_q: Tensor,
                    cu_seq_k: Optional[Tensor], max_q: int, max_k: int, *, return_aux=None,
                    scale: Optional[float] = None, window_size: tuple[int, int] = (-1, -1), enable_gqa: bool = False,
                    seqused_k: Optional[Tensor] = None, block_table: Optional[Tensor] = None,
                    num_splits: Optional[int] = None, backend: str = "auto"):
    """``torch.nn.attention.varlen.varlen_attn_out`` (torch 2.13): ``varlen_attn`` writing its
    output into ``out`` (T_q, H, Dv), of query's dtype and device; returns ``out`` (with
    ``return_aux`` asking for lse, ``(out, lse)``). ``out`` is checked before anything runs
    and written only once the attention is computed (so it may alias the inputs); gradients
    flow through ``out`` as through ``varlen_attn``'s result."""
    if not isinstance(out, Tensor):
        raise ArgumentError(f"out: expected a tensor, got {type(out).__name__}")
    _check_tensors(("query", "value"), query, value)
    for name, t in (("query", query), ("value", value)):
        if t.dim() not in (3, 4):  # (value: 4-D as a page pool)
            raise ArgumentError(f"{name}: expected (T, H, D){' or a page pool' if name == 'value' else ''}, got "
                                f"shape {tuple(t.shape)}")
    expected = (query.shape[0], query.shape[1], value.shape[-1])
    if tuple(out.shape) != expected or out.dtype != query.dtype or out.device != query.device:
        raise ArgumentError(f"out: expected shape {expected}, dtype {query.dtype} on {query.device} (query's), got "
                            f"shape {tuple(out.shape)}, dtype {out.dtype} on {out.device}")
    if expanded(out):  # (torch's copy_ into it would refuse only after the attention ran)
        raise ArgumentError("out: an expanded tensor (stride 0) cannot hold the output: several rows would share "
                            "one element's memory")
    result = varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, return_aux=return_aux, scale=scale,
                         window_size=window_size, enable_gqa=enable_gqa, seqused_k=seqused_k,
                         block_table=block_table, num_splits=num_splits, backend=backend)
    if isinstance(result, tuple):
        out.copy_(result[0])
        return out, result[1]
    out.copy_(result)
    return out


def flash_attn_varlen_qkvpacked_func(qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, dropout_p=0.0,
                                     softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                     alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                                     backend: str = "auto"):
    """Packed variable-length form: qkv (total, 3, H, D) -> out (total, H, D)."""
    if not isinstance(qkv, Tensor) or qkv.dim() != 4 or qkv.shape[1] != 3:
        raise ArgumentError(f"qkv: expected shape (total, 3, H, D), got {tuple(getattr(qkv, 'shape', ()))}")
    q, k, v = qkv.unbind(1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale,
                                  causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs,
                                  backend=backend)


def flash_attn_varlen_kvpacked_func(q: Tensor, kv: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                                    max_seqlen_q: int, max_seqlen_k: int, dropout_p=0.0, softmax_scale=None,
                                    causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                                    deterministic=False, return_attn_probs=False, *, backend: str = "auto"):
    """Packed variable-length form: q (total_q, H, D), kv (total_k, 2, Hk, D)."""
    if not isinstance(kv, Tensor) or kv.dim() != 4 or kv.shape[1] != 2:
        raise ArgumentError(f"kv: expected shape (total_k, 2, Hk, D), got {tuple(getattr(kv, 'shape', ()))}")
    k, v = kv.unbind(1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs, backend=backend)


def causal_bias(attn_mask) -> Optional[Tensor]:
    """``attn_mask`` when it is torch's ``CausalBias`` (``causal_upper_left`` /
    ``causal_lower_right``), else None. torch.nn.attention.bias imports torch._dynamo (seconds
    and 150 MB), so it is looked up, not imported: a CausalBias exists only once it was."""
    if attn_mask is None or type(attn_mask) is Tensor:
        return None
    bias_module = sys.modules.get("torch.nn.attention.bias")
    if bias_module is not None and isinstance(attn_mask, bias_module.CausalBias):
        return attn_mask
    return None


def _causal_bias_offset(bias, seqlen_q: int, seqlen_k: int) -> int:
    """The diagonal offset of a ``CausalBias``: 0 for upper-left (query i sees keys j <= i),
    Sk - Sq for lower-right (j <= i + Sk - Sq, flash-attn's alignment)."""
    if (bias.seq_len_q, bias.seq_len_kv) != (seqlen_q, seqlen_k):
        raise ArgumentError(
            f"attn_mask: CausalBias of sizes ({bias.seq_len_q}, {bias.seq_len_kv}) does not match query and key "
            f"sequence lengths ({seqlen_q}, {seqlen_k})"
        )
    variants = sys.modules["torch.nn.attention.bias"].CausalVariant
    if bias.variant == variants.UPPER_LEFT:
        return 0
    if bias.variant == variants.LOWER_RIGHT:
        return seqlen_k - seqlen_q
    raise ArgumentError(f"attn_mask: CausalBias.variant must be a CausalVariant type, but found: {bias.variant}")


def _sdpa_leading_dims(query: Tensor, key: Tensor, value: Tensor, enable_gqa: bool):
    """query, key, value with common leading dims, and those dims of the output. torch
    broadcasts the dims before (L, E) as matmul does (expanding makes stride-0 views); under
    GQA the head dims -3 differ, only the dims before them broadcast, and key and value
    heads that differ from each other are repeated to the query heads as torch does."""
    qs, ks, vs = query.shape, key.shape, value.shape
    lead_q, lead_k, lead_v = qs[:-2], ks[:-2], vs[:-2]
    if lead_q == lead_k == lead_v:
        return query, key, value, tuple(lead_q)
    gqa = enable_gqa and min(len(qs), len(ks), len(vs)) >= 3 and (qs[-3] != ks[-3] or qs[-3] != vs[-3])
    try:
        if gqa:
            heads = qs[-3]
            for name, t in (("key", key), ("value", value)):
                if t.shape[-3] == 0 or heads % t.shape[-3] != 0:
                    raise ArgumentError(f"query, {name}: number of query heads ({heads}) must be a multiple of "
                                        f"{name} heads ({t.shape[-3]})")
            if ks[-3] != vs[-3]:  # no common K/V head layout: repeat both to the query heads
                key = key.repeat_interleave(heads // ks[-3], dim=-3)
                value = value.repeat_interleave(heads // vs[-3], dim=-3)
                ks, vs = key.shape, value.shape
            batch = torch.broadcast_shapes(qs[:-3], ks[:-3], vs[:-3])
            lead, lead_kv = (*batch, heads), (*batch, ks[-3])
        else:
            lead = lead_kv = torch.broadcast_shapes(lead_q, lead_k, lead_v)
    except RuntimeError as e:
        if isinstance(e, ArgumentError):
            raise
        raise ArgumentError(
            f"query, key, value: the dims before (L, E) must broadcast, got {tuple(lead_q)}, {tuple(lead_k)}, "
            f"{tuple(lead_v)}" + ("" if enable_gqa else " (pass enable_gqa=True for GQA)")
        ) from None
    return (query.expand(*lead, *qs[-2:]), key.expand(*lead_kv, *ks[-2:]), value.expand(*lead_kv, *vs[-2:]),
            tuple(lead))


def _as_4d(t: Tensor) -> Tensor:
    """(..., S, E) -> (B, H, S, E): 2-D is one batch and one head, 3-D one batch of heads
    (torch reads dim -3 as heads under GQA), more leading dims fold into the batch."""
    rank = t.dim()
    if rank == 4:
        return t
    if rank == 2:
        return t.unsqueeze(0).unsqueeze(0)
    if rank == 3:
        return t.unsqueeze(0)
    return t.reshape(math.prod(t.shape[:-3]), *t.shape[-3:])  # (not -1: sizes may be 0)


def _merges_leading_dims(t: Tensor) -> bool:
    """Whether _as_4d folds t's dims before its last three into one without a copy: each
    leading dim of size > 1 steps over whole runs of the ones after it. (From the strides,
    not by trying the view: under torch.compile a failed fake view is an error, not a
    RuntimeError to catch.)"""
    lead = [(n, s) for n, s in zip(t.shape[:-3], t.stride()[:-3]) if n != 1]
    return all(s == inner_s * inner_n for (n, s), (inner_n, inner_s) in zip(lead, lead[1:]))


class _NoOutputSeesAKey(torch.autograd.Function):
    """SDPA where no output element sees a key (an empty output, no keys, or dropout_p = 1):
    zeros (torch's result), and zero derivatives for every input. (setup_context and a vmap
    rule: torch.func transforms take part only in Functions of that form.) Traced by
    torch.compile as it is; eager calls take _NoOutputSeesAKeyForwardAD, which Dynamo
    refuses (a custom jvp)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(out_shape, query, key, value, attn_mask):
        return query.new_zeros(out_shape)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.out_shape, ctx.out_dtype, ctx.out_device = inputs[0], output.dtype, output.device
        ctx.inputs = [(t.shape, t.dtype, t.device) if t is not None and t.is_floating_point() else None
                      for t in inputs[1:]]

    @staticmethod
    def backward(ctx, grad_out):
        grads = [None if meta is None else torch.zeros(meta[0], dtype=meta[1], device=meta[2]) for meta in ctx.inputs]
        return (None, *grads)


class _NoOutputSeesAKeyForwardAD(_NoOutputSeesAKey):
    """_NoOutputSeesAKey with its forward-mode derivative (zeros) for dual tensors and
    torch.func.jvp."""

    @staticmethod
    def jvp(ctx, *tangents):
        return torch.zeros(ctx.out_shape, dtype=ctx.out_dtype, device=ctx.out_device)


def _check_bool(name: str, value) -> bool:
    """``value`` of a bool argument, else TypeError naming it, as torch's argument parser
    raises (for NumPy bools too): truthiness would read "False" as True."""
    if type(value) is bool:
        return value
    kind = type(value)
    kind_name = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    raise TypeError(f"{name}: must be bool, not {kind_name}")


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
        query: (..., H, L, E); key: (..., Hk, S, E); value: (..., Hk, S, Ev). 2-D inputs
            are one batch and head, 3-D ones (H, L, E); the dims before (L, E) broadcast as
            in torch; extra leading dims are flattened into the batch. Any size may be 0
            (E = 0: every score is 0, uniform weights over the visible keys).
        attn_mask: broadcastable to (..., H, L, S); bool (True = attend) or float (added;
            the query's dtype, or float32 with any float query, read and added in float32
            as torch does); or torch's ``CausalBias`` (``causal_upper_left`` /
            ``causal_lower_right`` of (L, S)), served as causal attention with that diagonal.
        dropout_p: dropout probability, applied whenever > 0 (as torch does); 1 gives zeros.
        is_causal: query i sees keys j <= i (top-left aligned); with attn_mask both apply
            (as torch's CPU kernel; torch's docs and math backend refuse the pair).
        scale: default 1/sqrt(E).
        enable_gqa: allow H to be a multiple of Hk.

    Returns:
        (..., H, L, Ev). A query that sees no key gives zeros (as torch 2.13's SDPA; its older math path gave NaN).
        Under ``torch.autocast`` the inputs are cast to the autocast dtype first, as torch
        does (float64 stays float64). Invalid arguments raise ``ArgumentError``, both a
        ValueError and (as torch's errors) a RuntimeError.
    """
    return sdpa_with_softcap(query, key, value, attn_mask, dropout_p, _check_bool("is_causal", is_causal), scale,
                             _check_bool("enable_gqa", enable_gqa))


def sdpa_with_softcap(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                      dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                      enable_gqa: bool = False, softcap: float = 0.0) -> Tensor:
    """scaled_dot_product_attention (its arguments, torch's semantics) with flash-attn's
    logit softcap (``softcap * tanh(scores / softcap)`` after the scale, before the mask;
    0: none), for integrations whose models have one (transformers' Gemma 2)."""
    names = ("query", "key", "value")
    _check_tensors(names, query, key, value)
    if attn_mask is not None:
        _check_tensors(("attn_mask",), attn_mask)
    if query.is_nested or key.is_nested or value.is_nested:
        if softcap:
            raise ArgumentError("softcap: not supported with nested tensors")
        return _nested_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if query.dim() < 2 or key.dim() < 2 or value.dim() < 2:
        raise ArgumentError(
            f"query, key, value: Expected query, key, and value to all be at least 2 dimensional, but got "
            f"query.dim: {query.dim()} key.dim: {key.dim()} and value.dim: {value.dim()} instead."
        )
    diag_offset = 0
    bias = None if attn_mask is None else causal_bias(attn_mask)
    if bias is not None:
        if is_causal:
            raise ArgumentError("attn_mask: CausalBias should not be used with causal=True (as in torch)")
        diag_offset = _causal_bias_offset(bias, query.shape[-2], key.shape[-2])
        attn_mask, is_causal = None, True
    # (attn_mask with is_causal: both apply, as torch's CPU kernel does; its docs and math
    # backend refuse the pair, which no caller needs)
    query, key, value, attn_mask = _autocast(query, key, value, attn_mask)
    # dropout_p = 1 drops every weight: zeros, as torch (flash_attn_func keeps [0, 1))
    _check_dropout(dropout_p, one_allowed=True)
    every_weight_dropped = dropout_p == 1.0
    check_softcap(softcap)
    qs, ks, vs = query.shape, key.shape, value.shape
    if (len(qs) == len(ks) == len(vs) == 4 and qs[0] == ks[0] == vs[0] and ks[1] == vs[1]
            and (qs[1] == ks[1] or enable_gqa)):
        q4, k4, v4, lead = query, key, value, None  # the common call, without building shapes
    else:
        query, key, value, lead = _sdpa_leading_dims(query, key, value, enable_gqa)
        q4, k4, v4 = _as_4d(query), _as_4d(key), _as_4d(value)
    _check_qkv(q4, k4, v4, names, heads_dim=1, seq_dim=2, min_head_dim=0, no_heads_ok=True)
    (batch, num_heads, seqlen_q, head_dim), num_heads_k, seqlen_k = q4.shape, k4.shape[1], k4.shape[2]
    head_dim_v = v4.shape[3]
    scale = softmax_scale_of("scale", scale, head_dim)
    if num_heads != num_heads_k and not enable_gqa:
        raise ArgumentError(
            f"query, key: head counts differ ({num_heads} vs {num_heads_k}); pass enable_gqa=True for GQA"
        )
    mask4 = None
    if attn_mask is not None:
        # (torch takes float32 masks with any float query: the kernels read them as float32
        # with 16-bit inputs, as torch does; float64 inputs get them widened, exactly)
        if attn_mask.dtype == torch.float32 and query.dtype == torch.float64:
            attn_mask = attn_mask.to(query.dtype)
        if attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
            raise ArgumentError(
                f"attn_mask: Expected attn_mask dtype to be bool or float or to match query dtype, but got "
                f"attn_mask.dtype: {attn_mask.dtype} and query.dtype: {query.dtype} instead."
            )
        if attn_mask.device != query.device:
            raise ArgumentError(f"attn_mask: must be on {query.device}, got {attn_mask.device}")
        full = ((batch, num_heads) if lead is None else tuple(lead)) + (seqlen_q, seqlen_k)
        try:
            mask_full = attn_mask.expand(full)
        except RuntimeError:
            raise ArgumentError(
                f"attn_mask: shape {tuple(attn_mask.shape)} is not broadcastable to {tuple(full)}"
            ) from None
        if mask_full.dim() > 4 and mask_full.numel() and not _merges_leading_dims(mask_full):
            # (e.g. a (A, 1, 1, L, S) mask over (A, C, H, L, E) inputs: folding its leading
            # dims into one batch would copy it at the full (A * C, H, L, S) size) One call
            # per index of the first leading dim, each on a view.
            return torch.stack([sdpa_with_softcap(q, k, v, m, dropout_p, is_causal, scale, enable_gqa, softcap)
                                for q, k, v, m in zip(query, key, value, mask_full)])
        mask4 = _as_4d(mask_full)
    if batch * num_heads * seqlen_q * head_dim_v == 0 or seqlen_k == 0 or every_weight_dropped:
        empty = _NoOutputSeesAKey if torch.compiler.is_compiling() else _NoOutputSeesAKeyForwardAD
        out = empty.apply((batch, num_heads, seqlen_q, head_dim_v), q4, k4, v4, mask4)
    else:
        if head_dim == 0:  # every score is 0; the empty sums (exact zeros) keep q and k in the graph
            q4, k4 = q4.sum(-1, keepdim=True), k4.sum(-1, keepdim=True)
        out, _ = ops.attention(
            q4, k4, v4, scale=scale, softcap=float(softcap), attn_mask=mask4, window_left=-1,
            window_right=0 if is_causal else -1, diag_offset=diag_offset, dropout_p=float(dropout_p), heads_first=True,
        )  # (B, H, L, Ev)
    return out if lead is None or len(lead) == 2 else out.reshape(*lead, seqlen_q, head_dim_v)

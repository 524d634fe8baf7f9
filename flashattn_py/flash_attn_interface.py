"""flash-attn 2's ``flash_attn_interface`` module: its public functions, and the private
forward / backward primitives that libraries built on flash-attn call directly
(ring-flash-attention's ring, zigzag, stripe and llama3 functions, ...), with flash-attn
2.8's signatures and return values, on every backend.

``_flash_attn_forward`` returns ``(out, softmax_lse, S_dmask, rng_state)`` without autograd;
``_flash_attn_backward`` writes the gradients into the ``dq`` / ``dk`` / ``dv`` it is given
and returns ``softmax_d``, the rows' ``sum(dout * out)``. Like ``attention_backward`` the
backward takes the ``out`` / ``softmax_lse`` of the whole attention the call is part of,
which is what lets ring attention merge blocks. Differences from flash-attn: ``S_dmask``
(``return_softmax``, dropout only; else an empty tensor, as flash-attn's) holds the
probabilities before dropout, from the reference, without flash-attn's negative marks on
dropped entries or its padding of the lengths to multiples of 128; ``softmax_d`` has no
padding rows either ((B, H, Sq), varlen (H, total_q)); a row that sees no key has lse -inf
(flash-attn writes +inf; both merge to the same result); float64 inputs on the cpu backend
give a float64 lse; ``rng_state`` is this package's [seed, offset] (int64 (2,)), which
only its own backward reads. ``install_as_flash_attn()`` (flashattn_py.alias) makes this
module importable as ``flash_attn.flash_attn_interface``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import api, backends, ops, partial
from .api import (flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func, flash_attn_varlen_func,
                  flash_attn_varlen_kvpacked_func, flash_attn_varlen_qkvpacked_func)
from .errors import ArgumentError
from .kvcache import flash_attn_with_kvcache

__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
]


def _block_options(q: Tensor, k: Tensor, v: Tensor, dropout_p: float, softmax_scale: Optional[float], causal: bool,
                   window_size_left: int, window_size_right: int, softcap: float, alibi_slopes: Optional[Tensor],
                   deterministic: bool, cu_seqlens_q: Optional[Tensor] = None, cu_seqlens_k: Optional[Tensor] = None,
                   max_seqlen_q: int = 0, max_seqlen_k: int = 0) -> partial.BlockOptions:
    """The kernels' options of one private call, checked (errors name the argument), with
    flash-attn's window rule (``flash_right_side``: what flash_attn_func applies) and its
    diagonal (bottom-right: Sk - Sq dense, per sequence packed); no rng_state yet."""
    api._check_dropout(dropout_p)
    window = api._causal_window((window_size_left, window_size_right), causal)  # (causal: right side 0)
    api._check_tensors(("q", "k"), q, k)
    if cu_seqlens_q is not None:
        right = api._varlen_right_side(window, api._length("max_seqlen_q", max_seqlen_q),
                                       api._length("max_seqlen_k", max_seqlen_k), q, k, None)
    elif q.dim() == 4 and k.dim() == 4:  # (other shapes: _check_block refuses them)
        right = api.flash_right_side(window[0], window[1], q.shape[1], k.shape[1])
    else:
        right = window[1]
    o = partial._check_block(q, k, v, softmax_scale, False, (window[0], right), None, softcap, alibi_slopes,
                             cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, deterministic)
    return o._replace(dropout_p=float(dropout_p))


def _with_rng_state(o: partial.BlockOptions, rng_state) -> partial.BlockOptions:
    """A backward's options with the forward's ``rng_state`` (checked where dropout reads it)."""
    if o.dropout_p == 0:
        return o
    if rng_state is None:
        raise ArgumentError("rng_state: required with dropout_p > 0 (the forward's fourth return value)")
    if not isinstance(rng_state, Tensor) or rng_state.dtype != torch.int64 or tuple(rng_state.shape) != (2,):
        raise ArgumentError(f"rng_state: expected the forward's int64 (2,) tensor, got "
                            f"{getattr(rng_state, 'dtype', type(rng_state).__name__)} "
                            f"{tuple(getattr(rng_state, 'shape', ()))}")
    return o._replace(rng_state=rng_state)


def _select(q: Tensor, k: Tensor, v: Tensor, o: partial.BlockOptions, backend: str) -> str:
    """The backend of a private call: the one a backward would use. A dropout mask is the
    backend's own, so with dropout the forward and the backward must agree whatever the
    backward's ``deterministic`` (which can change the choice on some GPUs): both choose as
    for a deterministic backward. Dropout needs a fused backend."""
    backends.check_backend_name(backend)
    deterministic = True if o.dropout_p > 0 else o.deterministic
    name = partial.select_backend(q, k, v, True, deterministic, o.alibi_slopes, o.cu_seqlens_q, backend)
    if o.dropout_p > 0 and not backends.BACKENDS[name].fused:
        raise ArgumentError(f"dropout_p: the {name} backend cannot replay a dropout mask in a separate backward; "
                            f"build the compiled ops or pass dropout_p=0")
    return name


def _rng_state(q: Tensor, dropout_p: float) -> Tensor:
    """The forward's rng_state (dropout_p checked): a dropout stream drawn from torch's
    generator (as the public functions draw theirs), or, without dropout, zeros (flash-attn
    returns a tensor either way; torch's generator is not advanced)."""
    device = q.device if isinstance(q, Tensor) else torch.device("cpu")
    if dropout_p > 0:
        return ops.dropout_rng_state(device)
    return torch.zeros(2, dtype=torch.int64, device=device)


def _check_return_softmax(return_softmax: bool, dropout_p: float) -> None:
    if return_softmax and not dropout_p > 0:
        raise ArgumentError("return_softmax: only supported with dropout_p > 0 (as flash-attn)")


def _flash_attn_forward(q: Tensor, k: Tensor, v: Tensor, dropout_p: float, softmax_scale: Optional[float],
                        causal: bool, window_size_left: int, window_size_right: int, softcap: float,
                        alibi_slopes: Optional[Tensor], return_softmax: bool, *,
                        backend: str = "auto") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """flash-attn's private dense forward: q (B, Sq, H, D), k / v (B, Sk, Hk, D) ->
    ``(out (B, Sq, H, Dv), softmax_lse (B, H, Sq) float32 (float64 for float64 inputs on
    the cpu backend), S_dmask, rng_state)``. No autograd (``_flash_attn_backward`` is its
    backward)."""
    _check_return_softmax(return_softmax, dropout_p)
    o = _block_options(q, k, v, dropout_p, softmax_scale, causal, window_size_left, window_size_right, softcap,
                       alibi_slopes, False)
    name = _select(q, k, v, o, backend)
    rng_state = _rng_state(q, dropout_p)
    out, lse = partial.forward(q, k, v, o._replace(rng_state=rng_state if dropout_p > 0 else None), name)
    probs = q.new_empty(0)
    if return_softmax:
        probs = api.dense_probs(q, k, v, o.scale, o.softcap, alibi_slopes, o.window_left, o.window_right,
                                o.diag_offset)
    return out, lse, probs, rng_state


def _softmax_d(dout: Tensor, out: Tensor, dropout_p: float) -> Tensor:
    """flash-attn's ``softmax_d``: each row's sum(dout * out) times the keep probability
    1 - dropout_p, float32, (B, H, Sq) dense, (H, total_q) packed (without flash-attn's
    padding rows)."""
    d = (dout.float() * out.float()).sum(-1)  # (B, Sq, H) / (total, H)
    if dropout_p > 0:
        d = d * (1.0 - dropout_p)
    return d.transpose(-1, -2).contiguous()


def _write_grads(grads: tuple[Tensor, Tensor, Tensor], dq: Optional[Tensor], dk: Optional[Tensor],
                 dv: Optional[Tensor]) -> None:
    """The gradients into the buffers given (``_check_into`` checked them), outside autograd
    as flash-attn's kernels write them (a buffer may be a leaf that requires grad)."""
    with torch.no_grad():
        for grad, into in zip(grads, (dq, dk, dv)):
            if into is not None:
                into.copy_(grad)


def _check_into(q: Tensor, k: Tensor, v: Tensor, dq, dk, dv) -> None:
    """dq / dk / dv: None, or tensors of q's / k's / v's shape, dtype and device, not expanded
    (checked before any work, so a refusal writes nothing; other overlaps are the caller's)."""
    for name, into, like in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        if into is None:
            continue
        if (not isinstance(into, Tensor) or into.shape != like.shape or into.dtype != like.dtype
                or into.device != like.device):
            raise ArgumentError(f"{name}: expected None or a {like.dtype} tensor of shape {tuple(like.shape)} on "
                                f"{like.device}, got {getattr(into, 'dtype', type(into).__name__)} "
                                f"{tuple(getattr(into, 'shape', ()))} on {getattr(into, 'device', None)}")
        if api.expanded(into):
            raise ArgumentError(f"{name}: an expanded tensor (stride 0) cannot hold a gradient")


def _backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, softmax_lse: Tensor, dq, dk, dv,
              o: partial.BlockOptions, backend: str) -> Tensor:
    """Both private backwards once their options are checked: the gradients into dq / dk / dv,
    ``softmax_d`` returned (errors name flash-attn's arguments)."""
    api._check_tensors(("dout", "out", "softmax_lse"), dout, out, softmax_lse)
    _check_into(q, k, v, dq, dk, dv)
    try:
        grads = partial.checked_backward(dout, q, k, v, out, softmax_lse, o, _select(q, k, v, o, backend))
    except ArgumentError as error:  # (partial.py's name for it)
        if str(error).startswith("lse:"):
            raise ArgumentError("softmax_lse:" + str(error)[len("lse:"):]) from None
        raise
    _write_grads(grads, dq, dk, dv)
    return _softmax_d(dout, out, o.dropout_p)


def _flash_attn_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, softmax_lse: Tensor,
                         dq: Optional[Tensor], dk: Optional[Tensor], dv: Optional[Tensor], dropout_p: float,
                         softmax_scale: Optional[float], causal: bool, window_size_left: int,
                         window_size_right: int, softcap: float, alibi_slopes: Optional[Tensor],
                         deterministic: bool, rng_state: Optional[Tensor] = None, *,
                         backend: str = "auto") -> Tensor:
    """flash-attn's private dense backward: the gradients of ``_flash_attn_forward``'s call
    written into ``dq`` / ``dk`` / ``dv`` (each None or of q's / k's / v's shape), given
    ``dout`` and the ``out`` / ``softmax_lse`` of the whole attention (the call's own, or
    its blocks merged). Returns ``softmax_d`` (B, H, Sq) float32."""
    o = _with_rng_state(_block_options(q, k, v, dropout_p, softmax_scale, causal, window_size_left,
                                       window_size_right, softcap, alibi_slopes, deterministic), rng_state)
    return _backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, o, backend)


def _flash_attn_varlen_forward(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                               max_seqlen_q: int, max_seqlen_k: int, dropout_p: float,
                               softmax_scale: Optional[float], causal: bool, window_size_left: int = -1,
                               window_size_right: int = -1, softcap: float = 0.0,
                               alibi_slopes: Optional[Tensor] = None, return_softmax: bool = False,
                               block_table: Optional[Tensor] = None, leftpad_k: Optional[Tensor] = None,
                               seqused_k: Optional[Tensor] = None, zero_tensors: bool = False, num_splits: int = 0,
                               *, backend: str = "auto") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """flash-attn's private packed forward: q (total_q, H, D), k / v (total_k, Hk, D), or a
    page pool with ``block_table``; ``seqused_k`` as flash_attn_varlen_func's. Returns
    ``(out (total_q, H, Dv), softmax_lse (H, total_q), S_dmask, rng_state)``.
    ``zero_tensors`` and ``num_splits`` change nothing in the results (every row is
    written; splits agree within rounding) and are accepted as flash-attn's; ``leftpad_k``
    is refused (``flash_attn_with_kvcache``'s ``cache_leftpad`` serves left-padded caches)."""
    _check_return_softmax(return_softmax, dropout_p)
    if leftpad_k is not None:
        raise ArgumentError("leftpad_k: not supported here; flash_attn_with_kvcache(cache_leftpad=) serves "
                            "left-padded caches")
    if not isinstance(num_splits, int) or num_splits < 0:
        raise ArgumentError(f"num_splits: expected an int >= 0, got {num_splits!r}")
    if return_softmax and seqused_k is not None:
        raise ArgumentError("return_softmax: not supported with seqused_k")
    if block_table is not None or seqused_k is not None:  # (forward only: flash_attn_varlen_func's path)
        api._check_dropout(dropout_p)
        window = api._causal_window((window_size_left, window_size_right), causal)
        rng_state = _rng_state(q, dropout_p)
        with torch.no_grad():
            out, lse = api._varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                   seqused_k=seqused_k, block_table=block_table, dropout_p=dropout_p,
                                   scale=softmax_scale, window=window, softcap=softcap, alibi_slopes=alibi_slopes,
                                   deterministic=False, backend=backend, rng_state=rng_state)
    else:
        o = _block_options(q, k, v, dropout_p, softmax_scale, causal, window_size_left, window_size_right, softcap,
                           alibi_slopes, False, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        name = _select(q, k, v, o, backend)
        rng_state = _rng_state(q, dropout_p)
        out, lse = partial.forward(q, k, v, o._replace(rng_state=rng_state if dropout_p > 0 else None), name)
    probs = q.new_empty(0)
    if return_softmax:
        probs = api.varlen_probs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                                 api._causal_window((window_size_left, window_size_right), causal), softcap,
                                 alibi_slopes, block_table)
    return out, lse, probs, rng_state


def _flash_attn_varlen_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, softmax_lse: Tensor,
                                dq: Optional[Tensor], dk: Optional[Tensor], dv: Optional[Tensor],
                                cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                                dropout_p: float, softmax_scale: Optional[float], causal: bool,
                                window_size_left: int, window_size_right: int, softcap: float,
                                alibi_slopes: Optional[Tensor], deterministic: bool,
                                rng_state: Optional[Tensor] = None, zero_tensors: bool = False, *,
                                backend: str = "auto") -> Tensor:
    """flash-attn's private packed backward (``_flash_attn_backward`` per sequence, packed
    layouts as ``_flash_attn_varlen_forward``'s). Returns ``softmax_d`` (H, total_q)."""
    o = _with_rng_state(_block_options(q, k, v, dropout_p, softmax_scale, causal, window_size_left,
                                       window_size_right, softcap, alibi_slopes, deterministic, cu_seqlens_q,
                                       cu_seqlens_k, max_seqlen_q, max_seqlen_k), rng_state)
    return _backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, o, backend)

"""Attention over one block of keys, as a building block: ``(out, lse)`` without autograd, its
backward given the merged ``out`` / ``lse`` of all blocks, and the merge itself.

Attention over keys split into blocks K_1..K_n is the lse-weighted sum of the blocks'
attentions: ``lse = log Σ_b exp(lse_b)``, ``out = Σ_b exp(lse_b - lse) out_b``
(``merge_attention``). The gradient of the whole is the sum of each block's backward run
with the MERGED out and lse (P_b = exp(S_b - lse) is then block b's part of the global
softmax, and D = rowsum(dout * out) the global one): ``attention_backward``. Ring attention
(flashattn_py.distributed) is these three functions around a ring of processes; split-KV
decoding is the same algebra inside the kernels.

Positions: a block's keys are addressed by ``diag_offset`` (query row i's diagonal is key
``i + diag_offset``), so causal masks, windows and ALiBi distances of a block cut out of a
longer sequence stay those of the whole sequence.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import api, backends, ops
from .errors import ArgumentError
from .reference import attention_ref


class BlockOptions(NamedTuple):
    """One block call's options in the kernels' terms (see ``attention_forward``)."""

    scale: float
    window_left: int = -1
    window_right: int = -1
    diag_offset: int = 0
    softcap: float = 0.0
    alibi_slopes: Optional[Tensor] = None
    cu_seqlens_q: Optional[Tensor] = None
    cu_seqlens_k: Optional[Tensor] = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    deterministic: bool = False
    # (flash-attn's private forward / backward take dropout: the forward's stream, rng_state,
    # is the backward's; attention_forward has none, a block's mask would depend on the cut)
    dropout_p: float = 0.0
    rng_state: Optional[Tensor] = None


def select_backend(q: Tensor, k: Tensor, v: Tensor, backward: bool, deterministic: bool = False,
                   alibi_slopes: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None,
                   backend: str = "auto") -> str:
    """The backend a block computation on these tensors runs on (the selection of every
    other call: ``backend=`` > ``use_backend`` > FLASHATTN_BACKEND > auto). ``backward``:
    gradients will be asked for, so the backend must serve the backward too."""
    problem = ops.problem(q, k, v, None, 0.0, ops.deterministic_wanted(deterministic), alibi_slopes, cu_seqlens)
    if problem.backward != backward:
        problem = problem._replace(backward=backward)
    return backends.select(problem, backend)


def forward(q: Tensor, k: Tensor, v: Tensor, o: BlockOptions, backend: str) -> tuple[Tensor, Tensor]:
    """``attention_forward`` on validated inputs, dense (B, S, H, D) or packed (total, H, D)
    with ``o.cu_seqlens_q``, on ``backend`` (a name ``select_backend`` gave)."""
    packed = o.cu_seqlens_q is not None
    if packed:
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    dtype = q.dtype
    if not backends.BACKENDS[backend].fused:  # the formula in float32 at least (see _reference_leaves)
        q, k, v = _reference_leaves((q, k, v))
    with torch.no_grad():
        out, lse = ops.attention(
            q, k, v, scale=o.scale, softcap=o.softcap, alibi_slopes=o.alibi_slopes, window_left=o.window_left,
            window_right=o.window_right, diag_offset=o.diag_offset, deterministic=o.deterministic, backend=backend,
            cu_seqlens_q=o.cu_seqlens_q, cu_seqlens_k=o.cu_seqlens_k, max_seqlen_q=o.max_seqlen_q,
            max_seqlen_k=o.max_seqlen_k, bottom_right=packed, forward_only=False, dropout_p=o.dropout_p,
            rng_state=o.rng_state)
    out = out.to(dtype)
    return (out[0], lse[0]) if packed else (out, lse)


def _reference_leaves(tensors: tuple) -> list[Tensor]:
    """Detached copies for the reference formula: 16-bit ones in float32, so that a block's
    lse is float32 as the kernels' (in 16 bits its rounding, through the merge weights,
    would cost the merged result more than the formula's own rounding)."""
    return [t.detach().float() if t.dtype in (torch.float16, torch.bfloat16) else t.detach() for t in tensors]


def backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, o: BlockOptions,
             backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """``attention_backward`` on validated inputs (layouts as ``forward``)."""
    packed = o.cu_seqlens_q is not None
    if packed:
        dout, q, k, v, out, lse = (t.unsqueeze(0) for t in (dout, q, k, v, out, lse))
    impl = backends.BACKENDS[backend]
    if impl.fused:
        dout, q, k, v, out = (ops.kernel_rows(t, 1) for t in (dout, q, k, v, out))
        alibi = o.alibi_slopes.contiguous() if o.alibi_slopes is not None else None
        # (as the forward's ops.attention: a window longer than the call is no bound)
        left, right = ops.bounded_windows(q, k, o.window_left, o.window_right, o.diag_offset, False, None)
        with torch.no_grad():
            dq, dk, dv, _ = ops.attn_bwd(*ops.bwd_args(
                dout, q, k, v, out, lse.contiguous(), alibi_slopes=alibi, attn_bias=None, scale=o.scale,
                softcap=o.softcap, window_left=left, window_right=right,
                diag_offset=o.diag_offset, cu_seqlens_q=o.cu_seqlens_q, cu_seqlens_k=o.cu_seqlens_k,
                max_seqlen_q=o.max_seqlen_q, max_seqlen_k=o.max_seqlen_k, bottom_right=packed,
                deterministic=o.deterministic, dropout_p=o.dropout_p, rng_state=o.rng_state, backend=backend))
    else:
        dq, dk, dv = _reference_backward(dout, q, k, v, out, lse, o, packed)
    return (dq[0], dk[0], dv[0]) if packed else (dq, dk, dv)


def _reference_backward(dout, q, k, v, out, lse, o: BlockOptions, packed: bool):
    """The reference has no backward kernel: autograd through its formula. The merged out
    depends on this block through its own (out_b, lse_b) as
    ``d out = w (d out_b + (out_b - out) d lse_b)`` with ``w = exp(lse_b - lse)``, so the
    block's gradient is the formula's backward with those two incoming gradients."""
    with torch.enable_grad():
        leaves = [t.requires_grad_() for t in _reference_leaves((q, k, v))]
        block_out, block_lse = attention_ref(
            *leaves, scale=o.scale, softcap=o.softcap, alibi_slopes=o.alibi_slopes, window_left=o.window_left,
            window_right=o.window_right, diag_offset=o.diag_offset, cu_seqlens_q=o.cu_seqlens_q,
            cu_seqlens_k=o.cu_seqlens_k, bottom_right=packed)
        lse64 = lse.to(block_lse.dtype)
        weight = torch.exp(block_lse - torch.where(torch.isinf(lse64), torch.zeros_like(lse64), lse64))
        weight = torch.where(torch.isinf(block_lse), torch.zeros_like(weight), weight)  # (B, H, Sq)
        row_weight = weight.transpose(1, 2).unsqueeze(-1)  # (B, Sq, H, 1)
        d_block_out = (row_weight * dout.to(block_out.dtype)).detach()
        d_block_lse = (weight * ((block_out - out.to(block_out.dtype)) * dout.to(block_out.dtype))
                       .sum(-1).transpose(1, 2)).detach()
        # (a block no row sees a key of has outputs that do not depend on the leaves)
        pairs = [(t, g) for t, g in ((block_out, d_block_out), (block_lse, d_block_lse)) if t.requires_grad]
        grads = torch.autograd.grad([t for t, _ in pairs], leaves, [g for _, g in pairs],
                                    allow_unused=True) if pairs else (None, None, None)
    return tuple(torch.zeros_like(t) if g is None else g.to(t.dtype) for g, t in zip(grads, (q, k, v)))


def merge(out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor) -> None:
    """``merge_attention`` in place, without checks. ``out`` (..., S, H, D) accumulates
    ``block_out`` of the same shape; ``lse`` (..., H, S) ``block_lse``."""
    # The lse algebra in float64 (lse is small beside out; MPS has no float64): float32's
    # logaddexp and exps lose several ulps of lse a merge, which every merged block's
    # recomputed P = exp(s - lse) then carries into the backward (float32 gradients of 5
    # blocks were 3-4x the test rule's bound; rounding only the stored lse keeps them in it).
    wide = torch.float64 if lse.device.type != "mps" else lse.dtype
    old_lse, block_lse = lse.to(wide), block_lse.to(wide)
    new_lse = torch.logaddexp(old_lse, block_lse)
    # (-inf - -inf is NaN: rows no block has seen keep out 0, lse -inf)
    finite = torch.where(torch.isinf(new_lse), torch.zeros_like(new_lse), new_lse)
    old_weight = torch.exp(old_lse - finite).to(out.dtype).transpose(-1, -2).unsqueeze(-1)
    new_weight = torch.exp(block_lse - finite).to(out.dtype).transpose(-1, -2).unsqueeze(-1)
    out.mul_(old_weight).add_(block_out.to(out.dtype) * new_weight)
    lse.copy_(new_lse)


def _check_block(q: Tensor, k: Tensor, v: Tensor, softmax_scale, causal: bool, window_size, diag_offset,
                 softcap: float, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                 deterministic: bool) -> BlockOptions:
    """Validate a primitive's inputs (errors name the argument); the kernels' options."""
    api._check_tensors(("q", "k", "v"), q, k, v)
    packed = cu_seqlens_q is not None
    if packed:
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.dim() != 3:
                raise ArgumentError(f"{name}: expected a 3-D (total, H, D) tensor with cu_seqlens_q, got shape "
                                    f"{tuple(t.shape)}")
        if cu_seqlens_k is None:
            raise ArgumentError("cu_seqlens_k: required with cu_seqlens_q")
        q4, k4, v4 = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    else:
        if cu_seqlens_k is not None:
            raise ArgumentError("cu_seqlens_q: required with cu_seqlens_k")
        q4, k4, v4 = q, k, v
    api._check_qkv(q4, k4, v4, ("q", "k", "v"), heads_dim=2, seq_dim=1)
    max_seqlen_q, max_seqlen_k = api._length("max_seqlen_q", max_seqlen_q), api._length("max_seqlen_k", max_seqlen_k)
    if packed:
        cu_seqlens_q = api._index_tensor("cu_seqlens_q", cu_seqlens_q, q.device, 1)
        cu_seqlens_k = api._index_tensor("cu_seqlens_k", cu_seqlens_k, q.device, 1)
        if cu_seqlens_q.shape[0] != cu_seqlens_k.shape[0] or cu_seqlens_q.shape[0] < 1:
            raise ArgumentError(f"cu_seqlens_q, cu_seqlens_k: expected B + 1 offsets each, got "
                                f"{cu_seqlens_q.shape[0]} and {cu_seqlens_k.shape[0]}")
        cu_seqlens_q = api.checked_packed(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q.shape[0],
                                          k.shape[0], None, None, 0, 0, api.FLASH_NAMES)
        # (no sequence is longer than the packed total: a larger max only sized buffers)
        max_seqlen_q, max_seqlen_k = api.at_most(max_seqlen_q, q.shape[0]), api.at_most(max_seqlen_k, k.shape[0])
    batch = cu_seqlens_q.shape[0] - 1 if packed else q.shape[0]
    window = api._check_flash_options(q, 0.0, api._causal_window(window_size, causal), softcap, alibi_slopes, batch)
    if diag_offset is None:
        diag_offset = 0 if packed else k.shape[1] - q.shape[1]  # (symbolic when the sizes are)
    elif isinstance(diag_offset, torch.SymInt):
        pass  # (make_fx / export with symbolic sizes: comparing it would add a guard)
    elif not isinstance(diag_offset, int):
        raise ArgumentError(f"diag_offset: expected an int or None, got {type(diag_offset).__name__}")
    elif not -2**30 < diag_offset < 2**30:  # (the GPU kernels add it to positions in 32 bits)
        raise ArgumentError(f"diag_offset: must be within +-2**30, got {diag_offset}")
    scale = api.softmax_scale_of("softmax_scale", softmax_scale, q.shape[-1])
    return BlockOptions(scale, window[0], window[1], diag_offset, float(softcap), alibi_slopes, cu_seqlens_q,
                        cu_seqlens_k, max_seqlen_q, max_seqlen_k, ops.deterministic_wanted(deterministic))


def attention_forward(q: Tensor, k: Tensor, v: Tensor, *, softmax_scale: Optional[float] = None,
                      causal: bool = False, window_size: tuple[int, int] = (-1, -1),
                      diag_offset: Optional[int] = None, softcap: float = 0.0,
                      alibi_slopes: Optional[Tensor] = None, cu_seqlens_q: Optional[Tensor] = None,
                      cu_seqlens_k: Optional[Tensor] = None, max_seqlen_q: int = 0, max_seqlen_k: int = 0,
                      deterministic: bool = False, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Attention of q over one block of keys, returning ``(out, lse)``; not differentiable
    (``attention_backward`` is its backward).

    Args:
        q: (B, Sq, H, D); k: (B, Sk, Hk, D); v: (B, Sk, Hk, Dv). Packed sequences: q
            (total_q, H, D), k / v (total_k, Hk, D) with ``cu_seqlens_q`` / ``cu_seqlens_k``
            (B + 1,) int32 and the longest lengths ``max_seqlen_q`` / ``max_seqlen_k``.
        diag_offset: query row i's diagonal is key ``i + diag_offset``: causal keeps keys
            j <= i + diag_offset, ``window_size`` (left, right) keeps
            i + diag_offset - left <= j <= i + diag_offset + right, and ALiBi's distance is
            |i + diag_offset - j|. None: Sk - Sq (bottom-right, as ``flash_attn_func``).
            Packed sequences are aligned bottom-right each, plus ``diag_offset`` (None: 0).
        Other arguments as ``flash_attn_func`` (no dropout: a block's mask would depend on
        how the keys are cut), except that window sides are taken as given: flash_attn_func
        treats a side of at least Sk as no bound (flash-attn's rule), which for a block of a
        longer sequence would depend on how the keys are cut.

    Returns:
        out (B, Sq, H, Dv) in q's dtype ((total_q, H, Dv) packed) and lse (B, H, Sq)
        ((H, total_q) packed), natural log, float32 (float64 for float64 inputs on the cpu
        backend); a row that sees no key has out 0 and lse -inf.
    """
    o = _check_block(q, k, v, softmax_scale, causal, window_size, diag_offset, softcap, alibi_slopes, cu_seqlens_q,
                     cu_seqlens_k, max_seqlen_q, max_seqlen_k, deterministic)
    backends.check_backend_name(backend)
    name = select_backend(q, k, v, False, o.deterministic, alibi_slopes, o.cu_seqlens_q, backend)
    return forward(q, k, v, o, name)


def attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, *,
                       softmax_scale: Optional[float] = None, causal: bool = False,
                       window_size: tuple[int, int] = (-1, -1), diag_offset: Optional[int] = None,
                       softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None,
                       cu_seqlens_q: Optional[Tensor] = None, cu_seqlens_k: Optional[Tensor] = None,
                       max_seqlen_q: int = 0, max_seqlen_k: int = 0, deterministic: bool = False,
                       backend: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """The gradients (dq, dk, dv) of a block computed by ``attention_forward`` (same
    arguments), given ``dout`` and the output ``out`` / ``lse`` of the WHOLE attention this
    block is part of (its blocks merged by ``merge_attention``; for a single block, its own).
    The whole attention's gradients are the sum over blocks (dk / dv: each block's keys).
    Shapes: dout and out as attention_forward's out, lse as its lse."""
    o = _check_block(q, k, v, softmax_scale, causal, window_size, diag_offset, softcap, alibi_slopes, cu_seqlens_q,
                     cu_seqlens_k, max_seqlen_q, max_seqlen_k, deterministic)
    return checked_backward(dout, q, k, v, out, lse, o, backend)


def checked_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, o: BlockOptions,
                     backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """``attention_backward`` once ``_check_block`` gave ``o``: checks dout, out and lse,
    picks the backend (``backend``: a name or "auto"), runs ``backward``."""
    api._check_tensors(("dout", "out", "lse"), dout, out, lse)
    out_shape = (*q.shape[:-1], v.shape[-1])
    for name, t in (("dout", dout), ("out", out)):
        if tuple(t.shape) != out_shape:
            raise ArgumentError(f"{name}: expected shape {out_shape} (q's rows and heads, v's head dim), got "
                                f"{tuple(t.shape)}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ArgumentError(f"{name}: expected {q.dtype} on {q.device}, got {t.dtype} on {t.device}")
    lse_shape = (q.shape[1], q.shape[0]) if o.cu_seqlens_q is not None else (q.shape[0], q.shape[2], q.shape[1])
    # (a 16-bit lse, rounded, would put percent-level errors into every gradient)
    if tuple(lse.shape) != lse_shape or lse.dtype not in (torch.float32, torch.float64) or lse.device != q.device:
        raise ArgumentError(f"lse: expected a float32 (or float64) tensor of shape {lse_shape} on {q.device}, got "
                            f"{lse.dtype} {tuple(lse.shape)} on {lse.device}")
    backends.check_backend_name(backend)
    name = select_backend(q, k, v, True, o.deterministic, o.alibi_slopes, o.cu_seqlens_q, backend)
    if backends.BACKENDS[name].fused:  # (the reference takes either)
        lse = lse.to(backends.BACKENDS[name].lse_dtype(q.dtype))
    return backward(dout, q, k, v, out, lse, o, name)


def merge_attention(out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor) -> tuple[Tensor, Tensor]:
    """Merge one more block's ``(block_out, block_lse)`` into the running ``(out, lse)``, in
    place, and return them: ``lse <- log(exp(lse) + exp(block_lse))``,
    ``out <- exp(lse_old - lse) out + exp(block_lse - lse) block_out``.

    out: a float32 (or float64) accumulator shaped like block_out, (B, S, H, Dv) or
    (total, H, Dv), zeros to start; lse: shaped like block_lse, (B, H, S) or (H, total),
    float32/64, -inf to start. Rows no block has seen stay out 0, lse -inf (never NaN).
    """
    api._check_tensors(("out", "lse", "block_out", "block_lse"), out, lse, block_out, block_lse)
    if out.dim() not in (3, 4):
        raise ArgumentError(f"out: expected (B, S, H, Dv) or (total, H, Dv), got shape {tuple(out.shape)}")
    for name, t in (("lse", lse), ("block_out", block_out), ("block_lse", block_lse)):
        if t.device != out.device:
            raise ArgumentError(f"{name}: expected a tensor on out's device {out.device}, got {t.device}")
    if not block_out.is_floating_point():
        raise ArgumentError(f"block_out: expected a floating-point tensor, got {block_out.dtype}")
    if block_lse.dtype not in (torch.float32, torch.float64):
        raise ArgumentError(f"block_lse: expected float32 or float64, got {block_lse.dtype}")
    if out.shape != block_out.shape:
        raise ArgumentError(f"out: expected block_out's shape {tuple(block_out.shape)}, got {tuple(out.shape)}")
    if lse.shape != block_lse.shape:
        raise ArgumentError(f"lse: expected block_lse's shape {tuple(block_lse.shape)}, got {tuple(lse.shape)}")
    if out.dtype not in (torch.float32, torch.float64) or lse.dtype not in (torch.float32, torch.float64):
        raise ArgumentError(f"out, lse: expected float32 or float64 accumulators, got {out.dtype} and {lse.dtype}")
    rows_heads = tuple(out.shape[:-1])
    if out.dim() != lse.dim() + 1 or rows_heads[:-2] + rows_heads[-1:] + rows_heads[-2:-1] != tuple(lse.shape):
        raise ArgumentError(f"lse: expected (..., H, S) matching out (..., S, H, D) {tuple(out.shape)}, got "
                            f"{tuple(lse.shape)}")
    for name, t in (("out", out), ("lse", lse)):
        if api.expanded(t):
            raise ArgumentError(f"{name}: an expanded tensor (stride 0) cannot accumulate in place")
    # (a block in the accumulators' own memory, e.g. merge_attention(out, lse, out, lse), would
    # be read after it is overwritten: merged from a copy; where memory cannot be compared, a
    # torch.compile trace or a dispatch mode, always)
    if not ops.unobserved_eager():
        block_out, block_lse = block_out.clone(), block_lse.clone()
    else:
        if type(out) is Tensor and type(block_out) is Tensor and api.shares_memory(block_out, out, lse):
            block_out = block_out.clone()
        if type(lse) is Tensor and type(block_lse) is Tensor and api.shares_memory(block_lse, out, lse):
            block_lse = block_lse.clone()
    merge(out, lse, block_out, block_lse)
    return out, lse


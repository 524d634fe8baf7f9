"""Rotary position embedding, as flash-attn's ``flash_attn.layers.rotary.apply_rotary_emb``.

``apply_rotary`` is the formula ``flash_attn_with_kvcache`` applies to new keys and
queries; ``apply_rotary_emb`` is the public form, for q / k before ``flash_attn_func`` or
``flash_attn_varlen_func``. Plain torch ops in float32, differentiable.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .errors import ArgumentError

__all__ = ["apply_rotary_emb"]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, interleaved: bool) -> Tensor:
    """Rotary embedding of x (B, S, H, D) at ``positions`` (B, S) (rows of cos / sin,
    (seqlen_ro, rotary_dim / 2)): the first rotary_dim features rotate in pairs, (0, 1),
    (2, 3), ... when ``interleaved`` (GPT-J), (i, i + rotary_dim / 2) otherwise (GPT-NeoX);
    the rest pass through. Computed in float32 (float64 for float64 x), returned in x's dtype."""
    half = cos.shape[-1]
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    c = cos[positions].to(work).unsqueeze(2)  # (B, S, 1, rotary_dim / 2)
    s = sin[positions].to(work).unsqueeze(2)
    rot = x[..., :2 * half].to(work)
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = rot[..., :half], rot[..., half:]
        rotated = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return torch.cat((rotated.to(x.dtype), x[..., 2 * half:]), dim=-1)


def _position_bounds(positions: Tensor, seqlen_offsets, x: Tensor, packed: bool,
                     max_seqlen: Optional[int]) -> Optional[tuple[int, int]]:
    """(lowest, highest) position the call needs, where known without reading a GPU tensor
    back: from the values on the CPU; from the shapes (packed: max_seqlen) and an int
    offset elsewhere; else None."""
    if positions.numel() == 0:
        return None
    if positions.device.type == "cpu":
        return int(positions.min()), int(positions.max())
    if isinstance(seqlen_offsets, Tensor):
        return None
    longest = (max_seqlen if max_seqlen else None) if packed else x.shape[1]
    return None if longest is None else (int(seqlen_offsets), int(seqlen_offsets) + longest - 1)


def apply_rotary_emb(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False, inplace: bool = False,
                     seqlen_offsets: Union[int, Tensor] = 0, cu_seqlens: Optional[Tensor] = None,
                     max_seqlen: Optional[int] = None) -> Tensor:
    """Rotary embedding of the first rotary_dim features of every head.

    Args:
        x: (B, S, H, D), or packed (total, H, D) with ``cu_seqlens`` (B + 1,) int32 offsets.
        cos, sin: (seqlen_ro, rotary_dim / 2); rotary_dim <= D. Token i of sequence b is
            rotated by row ``i + seqlen_offsets[b]``.
        interleaved: rotate pairs (0, 1), (2, 3), ... (GPT-J) instead of (i, i + rotary_dim / 2)
            (GPT-NeoX, the default).
        inplace: write the result into x (and return it).
        seqlen_offsets: an int or a (B,) integer tensor (e.g. the tokens already in a KV cache).
        max_seqlen: accepted for flash-attn's signature (the packed lengths come from cu_seqlens).

    Returns the rotated x, same shape and dtype. Positions past ``seqlen_ro`` raise an
    ArgumentError where they can be read (an int offset, or CPU tensors); on GPUs they are
    clamped to the last row (nothing is read back to the host).
    """
    packed = cu_seqlens is not None
    if x.dim() != (3 if packed else 4):
        raise ArgumentError(f"x: expected {'(total, H, D) with cu_seqlens' if packed else '(B, S, H, D)'}, got shape "
                            f"{tuple(x.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, Tensor) or t.dim() != 2 or t.shape != cos.shape or t.device != x.device:
            raise ArgumentError(f"{name}: expected (seqlen_ro, rotary_dim / 2) on {x.device}, both the same shape, "
                                f"got {tuple(getattr(t, 'shape', ()))}")
    if not 0 < 2 * cos.shape[1] <= x.shape[-1]:
        raise ArgumentError(f"cos: rotary_dim = 2 * {cos.shape[1]} must be in 1..{x.shape[-1]} (the head dim)")
    seqlen_ro = cos.shape[0]
    device = x.device
    if packed:
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ArgumentError(f"cu_seqlens: expected a (B + 1,) int32 tensor, got {cu_seqlens.dtype} "
                                f"{tuple(cu_seqlens.shape)}")
        batch, total = cu_seqlens.shape[0] - 1, x.shape[0]
        if cu_seqlens.device.type == "cpu" and (int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != total):
            raise ArgumentError(f"cu_seqlens: expected offsets from 0 to x's {total} rows, got "
                                f"{int(cu_seqlens[0])}..{int(cu_seqlens[-1])}")
        rows = torch.arange(total, device=device)
        starts = cu_seqlens.to(device=device, dtype=torch.long)
        seq = torch.searchsorted(starts[1:], rows, right=True).clamp(max=max(batch - 1, 0))  # (each row's)
        positions = rows - starts[seq] if batch > 0 else rows
    else:
        batch, seqlen = x.shape[0], x.shape[1]
        positions = torch.arange(seqlen, device=device).expand(batch, seqlen)
    if isinstance(seqlen_offsets, Tensor):
        if seqlen_offsets.shape != (batch,) or seqlen_offsets.is_floating_point():
            raise ArgumentError(f"seqlen_offsets: expected an int or a ({batch},) integer tensor, got "
                                f"{seqlen_offsets.dtype} {tuple(seqlen_offsets.shape)}")
        offsets = seqlen_offsets.to(device=device, dtype=torch.long)
        if not packed:
            positions = positions + offsets.unsqueeze(1)
        elif batch > 0:
            positions = positions + offsets[seq]
    else:
        positions = positions + int(seqlen_offsets)
    bounds = _position_bounds(positions, seqlen_offsets, x, packed, max_seqlen)
    if bounds is not None and (bounds[0] < 0 or bounds[1] >= seqlen_ro):
        raise ArgumentError(f"cos: {seqlen_ro} positions (rows), but positions {bounds[0]}..{bounds[1]} are needed")
    positions = positions.clamp(0, seqlen_ro - 1)
    if packed:
        out = apply_rotary(x.unsqueeze(0), cos, sin, positions.unsqueeze(0), interleaved)[0]
    else:
        out = apply_rotary(x, cos, sin, positions, interleaved)
    if inplace:
        return x.copy_(out)
    return out

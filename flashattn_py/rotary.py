"""Rotary position embedding, as flash-attn's ``flash_attn.layers.rotary.apply_rotary_emb``.

``apply_rotary`` is the formula ``flash_attn_with_kvcache`` applies to new keys and
queries; ``apply_rotary_emb`` is the public form, for q / k before ``flash_attn_func`` or
``flash_attn_varlen_func``. Plain torch ops in float32 (float64 for float64 inputs),
differentiable.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .api import _index_tensor
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


def check_tables(cos: Tensor, sin: Tensor, names: tuple[str, str], device: torch.device, head_dim: int,
                 dtype: Optional[torch.dtype] = None, dtype_of: str = "") -> None:
    """cos / sin (seqlen_ro, rotary_dim / 2), the same shape, on ``device``, rotary_dim in
    1..head_dim (and of ``dtype``, ``dtype_of``'s, when given); ArgumentError naming the table."""
    for name, t in zip(names, (cos, sin)):
        if not isinstance(t, Tensor) or t.dim() != 2 or t.shape != cos.shape or t.device != device:
            raise ArgumentError(f"{name}: expected (seqlen_ro, rotary_dim / 2) on {device}, both the same shape, "
                                f"got {tuple(getattr(t, 'shape', ()))}")
        if dtype is not None and t.dtype != dtype:
            raise ArgumentError(f"{name}: expected {dtype_of}dtype {dtype}, got {t.dtype}")
    if not 0 < 2 * cos.shape[1] <= head_dim:
        raise ArgumentError(f"{names[0]}: rotary_dim = 2 * {cos.shape[1]} must be in 1..{head_dim} (the head dim)")


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
    longest = int(max_seqlen) if packed else x.shape[1]
    return int(seqlen_offsets), int(seqlen_offsets) + longest - 1


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
        max_seqlen: with cu_seqlens, the longest sequence (required, as flash-attn's).

    Returns the rotated x, same shape and dtype. Positions outside the tables raise an
    ArgumentError where they are known on the host (CPU tensors; an int offset with the
    lengths); a GPU offsets tensor's are clamped to the tables' rows (nothing is read back;
    flash-attn's kernel leaves such positions unrotated).
    """
    packed = cu_seqlens is not None
    if x.dim() != (3 if packed else 4):
        raise ArgumentError(f"x: expected {'(total, H, D) with cu_seqlens' if packed else '(B, S, H, D)'}, got shape "
                            f"{tuple(x.shape)}")
    check_tables(cos, sin, ("cos", "sin"), x.device, x.shape[-1])
    seqlen_ro = cos.shape[0]
    device = x.device
    if packed:
        cu_seqlens = _index_tensor("cu_seqlens", cu_seqlens, device, 1)
        if cu_seqlens.numel() < 1:
            raise ArgumentError("cu_seqlens: expected B + 1 >= 1 offsets, got none")
        if max_seqlen is None:  # (as flash-attn: it bounds the positions on GPUs)
            raise ArgumentError("max_seqlen: required with cu_seqlens (the longest sequence)")
        batch, total = cu_seqlens.shape[0] - 1, x.shape[0]
        if cu_seqlens.device.type == "cpu":
            offsets = cu_seqlens.tolist()
            if offsets[0] != 0 or offsets[-1] != total or any(b < a for a, b in zip(offsets, offsets[1:])):
                raise ArgumentError(f"cu_seqlens: expected offsets rising from 0 to x's {total} rows, got {offsets}")
        rows = torch.arange(total, device=device)
        starts = cu_seqlens.long()
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
    # (in place, x is overwritten after the rotation reads it: a copy where autograd keeps x
    # for the tables' gradient, which a float32 x would otherwise alias)
    source = x.clone() if inplace and torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad) else x
    if packed:
        out = apply_rotary(source.unsqueeze(0), cos, sin, positions.unsqueeze(0), interleaved)[0]
    else:
        out = apply_rotary(source, cos, sin, positions, interleaved)
    if inplace:
        return x.copy_(out)
    return out

"""How a sequence is cut over the ranks of a group (pure functions, no communication).

- ``"ring"``: rank r holds the r-th of ``world`` equal contiguous chunks.
- ``"zigzag"``: the sequence is cut into ``2 * world`` chunks; rank r holds chunks r and
  ``2 * world - 1 - r``, in that order, so that under a causal mask every rank has the same
  work (one early chunk, one late one).
- ``"ulysses"``: like ring, contiguous chunks (Ulysses redistributes heads, not rows).
- ``"llama3"``: the same contiguous chunks (the llama3 form gathers every rank's K/V).
- ``"stripe"``: rank r holds rows r, r + world, r + 2 world, ... (stripe attention: under a
  causal mask every rank has the same work; dense sequences only).

Packed sequences (``cu_seqlens`` given, rows on ``dim``): ring and zigzag cut EVERY
document that way (each rank holds its pieces of all documents, in document order), so
every rank gets the same share of each document; ulysses and llama3 cut the packed rows
contiguously (documents may straddle ranks).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ..errors import ArgumentError

LAYOUTS = ("ring", "zigzag", "ulysses", "llama3", "stripe")
RING_LAYOUTS = ("ring", "zigzag", "stripe")  # the ring's (ring.py), and USP's ring across its groups


def chunks_per_rank(layout: str) -> int:
    return 2 if layout == "zigzag" else 1


def rank_chunks(layout: str, rank: int, world_size: int) -> list[int]:
    """The global chunk indices rank ``rank`` holds, in its local order (chunks of
    ``world_size * chunks_per_rank(layout)`` equal chunks)."""
    if layout == "zigzag":
        return [rank, 2 * world_size - 1 - rank]
    return [rank]


def _check(layout: str, world_size: int, rank: Optional[int] = None) -> None:
    if layout not in LAYOUTS:
        raise ArgumentError(f"layout: expected one of {list(LAYOUTS)}, got {layout!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ArgumentError(f"world_size: expected an int >= 1, got {world_size!r}")
    if rank is not None and not (isinstance(rank, int) and 0 <= rank < world_size):
        raise ArgumentError(f"rank: expected an int in [0, {world_size}), got {rank!r}")


def _offsets(cu_seqlens: Union[Tensor, Sequence[int]]) -> list[int]:
    offsets = cu_seqlens.tolist() if isinstance(cu_seqlens, Tensor) else [int(x) for x in cu_seqlens]
    if not offsets or offsets[0] != 0 or any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ArgumentError(f"cu_seqlens: must rise from 0, got {offsets}")
    return offsets


def _stripe_rows(rank: int, world_size: int, length: int, cu_seqlens) -> Tensor:
    """The stripe layout's rows of rank ``rank``: rank, rank + world, ..."""
    if cu_seqlens is not None:
        raise ArgumentError("cu_seqlens: the stripe layout has no packed form")
    _pieces(length, world_size, "sequence")
    return torch.arange(rank, length, world_size) if length else torch.zeros(0, dtype=torch.long)


def _pieces(length: int, count: int, what: str) -> int:
    if length % count:
        raise ArgumentError(f"{what}: length {length} is not divisible by {count} (the pieces of the layout)")
    return length // count


def _segments(layout: str, rank: int, world_size: int, length: int,
              cu_seqlens: Optional[Union[Tensor, Sequence[int]]]) -> list[tuple[int, int]]:
    """(start, end) row ranges of the full sequence that rank holds, in its local order."""
    if cu_seqlens is None or layout in ("ulysses", "llama3"):
        documents = [(0, length)]
        if cu_seqlens is not None and _offsets(cu_seqlens)[-1] != length:
            raise ArgumentError(f"cu_seqlens: the last offset must be the total length {length}")
    else:
        offsets = _offsets(cu_seqlens)
        if offsets[-1] != length:
            raise ArgumentError(f"cu_seqlens: the last offset {offsets[-1]} must be the total length {length}")
        documents = list(zip(offsets, offsets[1:]))
    count = world_size * chunks_per_rank(layout)
    segments = []
    for d, (start, end) in enumerate(documents):
        piece = _pieces(end - start, count, f"document {d}" if len(documents) > 1 else "sequence")
        segments += [(start + c * piece, start + (c + 1) * piece) for c in rank_chunks(layout, rank, world_size)]
    return segments


def shard(x: Tensor, layout: str, rank: int, world_size: int, *, dim: int = 1,
          cu_seqlens: Optional[Union[Tensor, Sequence[int]]] = None) -> Tensor:
    """Rank ``rank``'s piece of the full tensor ``x`` (sequence on ``dim``: 1 for (B, S, H, D),
    0 for packed (total, H, D) rows with ``cu_seqlens``), a new contiguous tensor."""
    _check(layout, world_size, rank)
    if layout == "stripe":
        return x.index_select(dim, _stripe_rows(rank, world_size, x.shape[dim], cu_seqlens).to(x.device))
    segments = _segments(layout, rank, world_size, x.shape[dim], cu_seqlens)
    return torch.cat([x.narrow(dim, a, b - a) for a, b in segments], dim=dim).contiguous()


def unshard(pieces: Sequence[Tensor], layout: str, *, dim: int = 1,
            cu_seqlens: Optional[Union[Tensor, Sequence[int]]] = None) -> Tensor:
    """The full tensor from every rank's piece (``pieces[r]`` from rank r): ``shard``'s inverse."""
    world_size = len(pieces)
    _check(layout, world_size)
    length = sum(p.shape[dim] for p in pieces)
    first = pieces[0]
    axis = dim % first.dim()
    for rank, piece in enumerate(pieces):
        if (piece.dtype != first.dtype or piece.device != first.device or piece.dim() != first.dim()
                or piece.shape[:axis] != first.shape[:axis] or piece.shape[axis + 1:] != first.shape[axis + 1:]):
            raise ArgumentError(f"pieces: rank {rank}'s piece ({piece.dtype} {tuple(piece.shape)} on "
                                f"{piece.device}) differs from rank 0's ({first.dtype} {tuple(first.shape)} on "
                                f"{first.device}) other than in its rows on dim {dim}")
    if layout == "stripe":
        full = first.new_empty((*first.shape[:axis], length, *first.shape[axis + 1:]))
        for rank, piece in enumerate(pieces):
            rows = _stripe_rows(rank, world_size, length, cu_seqlens)
            if rows.numel() != piece.shape[dim]:
                raise ArgumentError(f"pieces: rank {rank}'s piece has {piece.shape[dim]} rows on dim {dim}, the "
                                    f"layout gives it {rows.numel()}")
            full.index_copy_(dim, rows.to(full.device), piece)
        return full
    rows: list[tuple[int, int, int, int]] = []  # (global start, rank, local start, length)
    for rank, piece in enumerate(pieces):
        local = 0
        for a, b in _segments(layout, rank, world_size, length, cu_seqlens):
            rows.append((a, rank, local, b - a))
            local += b - a
        if local != piece.shape[dim]:
            raise ArgumentError(f"pieces: rank {rank}'s piece has {piece.shape[dim]} rows on dim {dim}, the layout "
                                f"gives it {local}")
    rows.sort()
    return torch.cat([pieces[r].narrow(dim, local, n) for _, r, local, n in rows], dim=dim)


def local_rows(layout: str, rank: int, world_size: int, length: int,
               cu_seqlens: Optional[Union[Tensor, Sequence[int]]] = None) -> Tensor:
    """int64 global row index of each of the rank's local rows (e.g. its positions for
    rotary or position embeddings)."""
    _check(layout, world_size, rank)
    if layout == "stripe":
        return _stripe_rows(rank, world_size, length, cu_seqlens)
    return torch.cat([torch.arange(a, b) for a, b in _segments(layout, rank, world_size, length, cu_seqlens)])

"""USP (unified sequence parallelism, as yunchang's LongContextAttention): Ulysses inside
each group of a 2-D mesh of ranks, a ring across them. Rank (u, r) of a mesh of U x R ranks
(u: its rank in ``ulysses_group``, r: its rank in ``ring_group``) holds the u-th of U equal
contiguous pieces of the rows that ring rank r holds in the ring layout (``ring``,
``zigzag`` or ``stripe`` over R ranks): ``usp_shard``. An all-to-all in the Ulysses group
gives every rank the ring rank's whole share for H / U heads, ring attention over the ring
group computes those heads over the whole sequence, and an all-to-all turns the output
back into the rank's rows of every head. The ring then passes K/V blocks of H / U heads
(a ring of all U x R ranks would pass every head, U times as often), and the all-to-alls
stay inside the Ulysses groups (e.g. the GPUs of one node)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .. import api, ops
from ..errors import ArgumentError
from . import checks, comm, ring, ulysses
from .layout import RING_LAYOUTS, shard


def _position(group, name: str) -> tuple[int, int]:
    """(rank, size) of this process in ``group`` (None: the default group)."""
    rank = dist.get_rank(group)
    if rank < 0:
        raise ArgumentError(f"{name}: this process is not a member of the group")
    return rank, dist.get_world_size(group)


def _check_ring_layout(ring_layout: str) -> None:
    if ring_layout not in RING_LAYOUTS:
        raise ArgumentError(f"ring_layout: expected one of {list(RING_LAYOUTS)}, got {ring_layout!r}")


def usp_shard(x: Tensor, ring_layout: str, ring_rank: int, ring_size: int, ulysses_rank: int, ulysses_size: int, *,
              dim: int = 1, cu_seqlens=None) -> Tensor:
    """Rank (ulysses_rank, ring_rank)'s rows of ``x`` (rows on ``dim``): the ring layout's
    rows of ring_rank (packed documents with ``cu_seqlens``: its pieces of every document),
    cut into ulysses_size contiguous pieces, the ulysses_rank-th."""
    _check_ring_layout(ring_layout)
    for name, rank, size in (("ring", ring_rank, ring_size), ("ulysses", ulysses_rank, ulysses_size)):
        if not isinstance(size, int) or size < 1:
            raise ArgumentError(f"{name}_size: expected a positive int, got {size!r}")
        if not isinstance(rank, int) or not 0 <= rank < size:
            raise ArgumentError(f"{name}_rank: expected an int in [0, {size}), got {rank!r}")
    ring_rows = shard(x, ring_layout, ring_rank, ring_size, dim=dim, cu_seqlens=cu_seqlens)
    if ring_rows.shape[dim] % ulysses_size:
        raise ArgumentError(f"ulysses_size: ring rank {ring_rank}'s {ring_rows.shape[dim]} rows do not split into "
                            f"{ulysses_size} equal pieces")
    return shard(ring_rows, "ring", ulysses_rank, ulysses_size, dim=dim)


def _members_of(group, over: comm.Group) -> set[int]:
    """The union of ``group``'s members as each rank of ``over`` has them (one all_gather of
    world-size rows of ranks, -1 padded)."""
    ranks = sorted(_members(group))
    row = torch.full((dist.get_world_size(),), -1, dtype=torch.int64)
    row[:len(ranks)] = torch.tensor(ranks, dtype=torch.int64)
    row = row.to(over.device)
    rows = [torch.empty_like(row) for _ in range(over.world_size)]
    dist.all_gather(rows, row, group=over.group)
    return {r for r in torch.stack(rows).flatten().tolist() if r >= 0}


def _check_mesh(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal, window_size, alibi_slopes,
                deterministic, return_attn_probs, ulysses_group, ring_group, softcap, ring_layout):
    """The collective argument check, before any data moves, in three rounds: over the
    Ulysses group, over the ring group carrying the first round's failure, and over the
    Ulysses group again carrying the second's (when the first passed). In a mesh a ring
    group holds one rank of every Ulysses group, so a refusal anywhere reaches every rank,
    and the call's shapes and options (the ring's own checks included, on the gathered rows)
    agree over the whole mesh. Each round compares its number (a rank at another step of the
    check, e.g. ranks of one group that gave it different roles, is refused, not paired; a
    cycle of swapped roles, where every rank's first group is another's second, waits in the
    first round like a rank passing a group it is not in) and every rank's position along the
    other axis. After the first and second rounds, the ranks of the ring groups of this
    rank's Ulysses group and those of the Ulysses groups of its ring group are gathered: in a
    mesh both are the whole mesh (a cycle of pairs passes the positions).
    Returns the Ulysses group and the first round's Checked."""

    def layout_check(carried: Optional[Exception], step: int):
        def check(q4: Tensor, k4: Tensor, cu: Optional[Tensor], world: int, _max_seqlen: int) -> list[tuple]:
            if carried is not None:
                raise carried
            _check_ring_layout(ring_layout)
            if cu is not None and ring_layout == "stripe":
                raise ArgumentError("ring_layout: the stripe layout has no packed form (use ring or zigzag)")
            (u, u_size), (r, r_size) = _position(ulysses_group, "ulysses_group"), _position(ring_group, "ring_group")
            shared = _members(ulysses_group) & _members(ring_group)
            if shared != {dist.get_rank()}:
                raise ArgumentError(f"ulysses_group, ring_group: two axes of one mesh, which share only this rank "
                                    f"({dist.get_rank()}); these share ranks {sorted(shared)}")
            checks.check_same_rows(q4, k4)
            ulysses.check_heads(q4, k4, u_size)
            rows = q4.shape[1] * u_size  # a ring rank's, after the Ulysses exchange
            if ring_layout == "zigzag" and cu is None and rows % 2:
                raise ArgumentError(f"q: the zigzag ring holds two equal chunks per ring rank, so the {u_size} "
                                    f"ranks of ulysses_group x {q4.shape[1]} rows must be even")
            fields = [ulysses.scheme_field(f"usp ({ring_layout})"), ("USP check round", [step]),
                      ("return_attn_probs", [float(bool(return_attn_probs))]),
                      ("ulysses_group: rank, size", [u, u_size]) if step == 2 else
                      ("ring_group: rank, size", [r, r_size])]
            length = 0
            if cu is not None:  # (the whole sequence's bound: the check's own is the group's rows)
                length = api.at_most(api._length("max_seqlen", max_seqlen), rows * r_size)
                fields.append(("max_seqlen", [length]))
            ring.check_ring_rows(ring_layout, rows, cu, r_size, length, causal, window_size, alibi_slopes)
            return fields
        return check

    args = (q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
            deterministic)
    error: Optional[Exception] = None
    group = checked = mesh = None
    try:
        group, checked = checks.check_call(ulysses_group, "ulysses", *args, layout_check(None, 1))
        mesh = _members_of(ring_group, group)
    except Exception as e:  # noqa: BLE001  (carried by the next rounds, raised after the last)
        error = e
    try:
        ring_comm, _ = checks.check_call(ring_group, "ulysses", *args, layout_check(error, 2))
        across = _members_of(ulysses_group, ring_comm)
        if across != mesh:
            raise ArgumentError(f"ulysses_group, ring_group: not the two axes of one mesh: the ring groups of this "
                                f"rank's Ulysses group hold ranks {_few(mesh)}, the Ulysses groups of its ring group "
                                f"ranks {_few(across)}")
    except Exception as e:  # noqa: BLE001
        error = error or e
    if group is not None:  # (a first-round failure is known to the whole Ulysses group: all raise, none
        # runs this round, which a plain Ulysses call beside a USP one would not pair with)
        try:
            checks.check_call(ulysses_group, "ulysses", *args, layout_check(error, 3))
        except Exception as e:  # noqa: BLE001
            error = error or e
    if error is not None:
        raise error
    return group, checked


def _few(ranks: set[int]) -> str:
    listed = sorted(ranks)
    return str(listed) if len(listed) <= 16 else f"{listed[:16]}... ({len(listed)})"


def _members(group) -> set[int]:
    return set(range(dist.get_world_size())) if group is None else set(dist.get_process_group_ranks(group))


# (collectives and the host-side argument check: run eagerly under torch.compile, a graph
# break; Dynamo cannot trace the process group object)
@torch.compiler.disable
def usp_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Optional[Tensor], max_seqlen: int, dropout_p: float,
                  softmax_scale: Optional[float], causal: bool, window_size, alibi_slopes: Optional[Tensor],
                  deterministic: bool, return_attn_probs: bool, ulysses_group, ring_group, softcap: float,
                  ring_layout: str):
    """The USP functions' body: q (B, S_local, H, D), k / v (B, S_local, Hk, D); packed:
    (T_local, H, D) rows and the global ``cu_seqlens``."""
    packed = cu_seqlens is not None
    deterministic = ops.deterministic_wanted(deterministic)
    group, checked = _check_mesh(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal, window_size,
                                 alibi_slopes, deterministic, return_attn_probs, ulysses_group, ring_group, softcap,
                                 ring_layout)
    q4, k4, v4 = (q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)) if packed else (q, k, v)
    heads = ulysses._QKVToHeads.apply(q4, k4, v4, group)
    if packed:
        heads = tuple(t[0] for t in heads)
    slopes = ulysses.head_slopes(alibi_slopes, q4.shape[2], group)
    # (the offsets and max_seqlen as given: checked.max_seqlen is bounded by the Ulysses
    # group's rows, not the whole sequence's)
    res = ring.ring_attention(ring_layout, *heads, cu_seqlens, max_seqlen, 0.0, checked.scale, causal, window_size,
                              slopes, deterministic, return_attn_probs, ring_group, softcap)
    out = res[0] if return_attn_probs else res
    out = ulysses._HeadsToSeq.apply(out.unsqueeze(0) if packed else out, group)
    out = out[0] if packed else out
    if not return_attn_probs:
        return out
    lse = ulysses.lse_to_seq(res[1].unsqueeze(0) if packed else res[1], group)
    return out, (lse[0] if packed else lse).contiguous(), None

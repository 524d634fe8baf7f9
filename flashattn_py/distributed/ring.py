"""Ring attention (plain, zigzag and stripe): each rank keeps its queries and passes its keys and
values around the ring; every step computes the rank's queries against the block that has
just arrived, while the next block is already in flight, and merges the partial results by
their log-sum-exp (flashattn_py.partial). The backward passes the key / value blocks around
again, each with its float32 gradient accumulators, recomputing each block from the saved
global lse.

Positions are global: a step's block is called with the diagonal offset between the
query chunk and the key chunk (``partial``'s ``diag_offset``), so causal masks, windows and
ALiBi see the whole sequence. A step is cut into as few kernel calls as the mask allows
(``plan_step``): a key chunk every query of a chunk sees in full is one unmasked call with
its neighbours; a chunk on the diagonal is one masked call; an invisible chunk is skipped.
The stripe layout (rank r holds rows r, r + P, ...) makes one call per step, its mask in
local rows (``plan_stripe_step``).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from .. import api, ops, partial
from ..errors import ArgumentError
from . import checks, comm
from .layout import chunks_per_rank, rank_chunks

_NONE, _FULL, _PARTIAL = 0, 1, 2


class Call(NamedTuple):
    """One kernel call of a ring step: local query chunks [q[0], q[1]) against the arrived
    block's chunks [k[0], k[1]); ``masked``: the window applies, the query chunk's diagonal
    being ``chunk_offset`` chunks after the key chunk's (else every key is visible), or,
    where ``local_window`` is given, that window and diagonal in local rows instead."""

    q: tuple[int, int]
    k: tuple[int, int]
    masked: bool
    chunk_offset: int = 0
    # (left, right, diag_offset) in local rows, where a step's mask is not the global window
    # moved by whole chunks (the stripe layout)
    local_window: Optional[tuple[int, int, int]] = None


def _visibility(q_chunk: int, k_chunk: int, chunk_len: Optional[int], left: int, right: int) -> int:
    """Whether the rows of global chunk ``q_chunk`` see none, all or part of the keys of
    ``k_chunk`` (chunks of ``chunk_len`` rows; None: packed documents, whose pieces differ
    in length, allowed only without windows)."""
    if chunk_len is None:
        if right < 0 or q_chunk > k_chunk:
            return _FULL
        return _PARTIAL if q_chunk == k_chunk else _NONE
    off, last = (q_chunk - k_chunk) * chunk_len, chunk_len - 1
    if (right >= 0 and off + right < -last) or (left >= 0 and off - left > last):
        return _NONE
    if (right < 0 or off + right >= last) and (left < 0 or off - left <= -last):
        return _FULL
    return _PARTIAL


def plan_stripe_step(rank: int, source: int, world: int, rows: int, left: int, right: int) -> list[Call]:
    """The call of one stripe step: local row i of this rank is global row i P + rank, local
    key j of ``source``'s block global row j P + source (``rows`` of each). A window (left,
    right) (-1: unbounded) keeps global distances -right <= (i - j) P + rank - source <= left,
    that is lo <= j - i <= hi in local rows, the same bounds for every row: one call with the
    diagonal at hi (or lo), or none when no key is seen. A bound past every row's keys
    (|j - i| <= rows - 1) is none, so the diagonal stays within the block."""
    shift, last = rank - source, rows - 1
    hi = None if right < 0 else (right + shift) // world  # (floor division: shift may be negative)
    lo = None if left < 0 else -((left - shift) // world)
    if (hi is not None and hi < -last) or (lo is not None and lo > last):
        return []
    hi = None if hi is not None and hi >= last else hi
    lo = None if lo is not None and lo <= -last else lo
    if hi is None and lo is None:
        return [Call((0, 1), (0, 1), False)]
    if hi is None:
        return [Call((0, 1), (0, 1), True, local_window=(0, -1, lo))]
    if lo is None:
        return [Call((0, 1), (0, 1), True, local_window=(-1, 0, hi))]
    return [Call((0, 1), (0, 1), True, local_window=(hi - lo, 0, hi))] if lo <= hi else []


def plan_step(q_chunks: list[int], k_chunks: list[int], chunk_len: Optional[int], left: int, right: int,
              alibi: bool) -> list[Call]:
    """The calls of one ring step: the rank's global chunks ``q_chunks`` (local order)
    against an arrived block holding ``k_chunks``."""
    n = len(q_chunks)
    if q_chunks == k_chunks and q_chunks == list(range(q_chunks[0], q_chunks[0] + n)):
        # the rank's own rows, consecutive in the sequence: local positions are global ones
        # shifted alike, so one call with every mask and distance is exact (a ring's step 0)
        return [Call((0, n), (0, n), True)]
    if q_chunks == k_chunks and q_chunks == sorted(q_chunks) and not alibi and left < 0 and right in (-1, 0):
        # Causal (or no mask) over rows whose local order is their global order: one call,
        # aligned on the local diagonal (the zigzag rank's own chunks are r < 2w-1-r).
        return [Call((0, n), (0, n), right == 0)]
    rows = []
    for q_chunk in q_chunks:
        calls, b = [], 0
        while b < len(k_chunks):
            seen = _visibility(q_chunk, k_chunks[b], chunk_len, left, right)
            if seen == _FULL and not alibi:
                end = b + 1
                while end < len(k_chunks) and _visibility(q_chunk, k_chunks[end], chunk_len, left, right) == _FULL:
                    end += 1
                calls.append(((b, end), False, 0))
                b = end
                continue
            if seen != _NONE:  # (ALiBi needs each chunk's distance even where nothing is masked)
                calls.append(((b, b + 1), True, q_chunk - k_chunks[b]))
            b += 1
        rows.append(calls)
    plan, a = [], 0
    while a < len(q_chunks):  # query chunks with the same unmasked calls share them
        end = a + 1
        if all(not masked for _, masked, _ in rows[a]):
            while end < len(q_chunks) and rows[end] == rows[a]:
                end += 1
        plan += [Call((a, end), k, masked, offset) for k, masked, offset in rows[a]]
        a = end
    return plan


class DenseRows:
    """Local rows of (B, S, H, D) tensors (lse (B, H, S)) as chunks of ``chunk_len``."""

    dim = 1

    def __init__(self, chunk_len: int):
        self.chunk_len = chunk_len

    def get(self, t: Tensor, chunks: tuple[int, int], dim: int = 1) -> Tensor:
        return t.narrow(dim, chunks[0] * self.chunk_len, (chunks[1] - chunks[0]) * self.chunk_len)

    def add(self, acc: Tensor, chunks: tuple[int, int], value: Tensor) -> None:
        self.get(acc, chunks).add_(value)

    def merge(self, out: Tensor, lse: Tensor, chunks: tuple[int, int], block_out: Tensor, block_lse: Tensor) -> None:
        partial.merge(self.get(out, chunks), self.get(lse, chunks, 2), block_out, block_lse)

    def options(self, call: Call, base: partial.BlockOptions) -> partial.BlockOptions:
        if not call.masked:
            return base._replace(window_left=-1, window_right=-1, diag_offset=0)
        if call.local_window is not None:
            left, right, diag = call.local_window
            return base._replace(window_left=left, window_right=right, diag_offset=diag)
        return base._replace(diag_offset=call.chunk_offset * self.chunk_len)


class PackedRows:
    """Local rows of packed (T, H, D) tensors (lse (H, T)) holding every document's pieces:
    one piece per document (ring) or two (zigzag: the front piece, then the back piece).
    Chunk range (0, n) is all local rows; a single zigzag chunk (0, 1) / (1, 2) is the front
    / back pieces of all documents, gathered by index (computed on the device: no host
    read of cu_seqlens)."""

    dim = 0

    def __init__(self, cu_seqlens: Tensor, max_seqlen: int, world_size: int, per_rank: int, total_local: int):
        self.per_rank = per_rank
        self.cu_local = (cu_seqlens // world_size).int()
        self.max_local = max_seqlen // world_size
        self.index: list[Tensor] = []
        if per_rank == 2:
            self.cu_half = (cu_seqlens // (2 * world_size)).int()
            self.max_half = max_seqlen // (2 * world_size)
            rows = torch.arange(total_local // 2, device=cu_seqlens.device, dtype=torch.int64)
            half, local = self.cu_half.long(), self.cu_local.long()
            doc = torch.searchsorted(half[1:], rows, right=True)
            front = local[doc] + (rows - half[doc])
            self.index = [front, front + (half[doc + 1] - half[doc])]

    def _whole(self, chunks: tuple[int, int]) -> bool:
        return chunks == (0, self.per_rank)

    def get(self, t: Tensor, chunks: tuple[int, int], dim: int = 0) -> Tensor:
        return t if self._whole(chunks) else t.index_select(dim, self.index[chunks[0]])

    def add(self, acc: Tensor, chunks: tuple[int, int], value: Tensor) -> None:
        if self._whole(chunks):
            acc.add_(value)
        else:
            acc.index_add_(0, self.index[chunks[0]], value.to(acc.dtype))

    def merge(self, out: Tensor, lse: Tensor, chunks: tuple[int, int], block_out: Tensor, block_lse: Tensor) -> None:
        if self._whole(chunks):
            partial.merge(out, lse, block_out, block_lse)
            return
        index = self.index[chunks[0]]
        rows_out, rows_lse = out.index_select(0, index), lse.index_select(1, index)
        partial.merge(rows_out, rows_lse, block_out, block_lse)
        out.index_copy_(0, index, rows_out)
        lse.index_copy_(1, index, rows_lse)

    def _cu(self, chunks: tuple[int, int]) -> tuple[Tensor, int]:
        return (self.cu_local, self.max_local) if self._whole(chunks) else (self.cu_half, self.max_half)

    def options(self, call: Call, base: partial.BlockOptions) -> partial.BlockOptions:
        (cu_q, max_q), (cu_k, max_k) = self._cu(call.q), self._cu(call.k)
        window = (base.window_left, base.window_right) if call.masked else (-1, -1)
        # (masked calls are the diagonal ones: each document's query and key pieces are the
        # same rows, aligned bottom-right with no extra offset)
        return base._replace(window_left=window[0], window_right=window[1], diag_offset=0, cu_seqlens_q=cu_q,
                             cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k)


class RingSetup(NamedTuple):
    group: comm.Group
    rows: Union[DenseRows, PackedRows]
    plans: list[list[Call]]  # per step: the calls against the block of rank (rank - step)
    options: partial.BlockOptions
    backend: str


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def ring_forward(q: Tensor, k: Tensor, v: Tensor, setup: RingSetup) -> tuple[Tensor, Tensor]:
    """out (q's rows, H, Dv) in q's dtype and the global lse, merged over the ring."""
    group, rows = setup.group, setup.rows
    acc = _accumulator_dtype(q.dtype)
    out = q.new_zeros((*q.shape[:-1], v.shape[-1]), dtype=acc)
    heads, seq = q.shape[-2], q.shape[rows.dim]
    lse = q.new_full((q.shape[0], heads, seq) if rows.dim == 1 else (heads, seq), float("-inf"), dtype=acc)
    block = [k.contiguous(), v.contiguous()]
    exchange = comm.RingExchange(group, tag=_KV_TAG)
    for step in range(group.world_size):
        last = step + 1 == group.world_size
        incoming = None if last else exchange.start(block)
        for call in setup.plans[step]:
            block_out, block_lse = partial.forward(rows.get(q, call.q), rows.get(block[0], call.k),
                                                   rows.get(block[1], call.k), setup.rows.options(call, setup.options),
                                                   setup.backend)
            rows.merge(out, lse, call.q, block_out, block_lse)
        if not last:
            exchange.wait()
            block = incoming
    return out.to(q.dtype), lse


def ring_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, setup: RingSetup,
                  kv_grads: bool = True) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """dq, dk, dv: each block's gradients recomputed from the global out / lse. The key /
    value gradients are summed in float32 accumulators that travel with their block and
    arrive home after the last step (each block's contribution comes from the kernel in the
    input dtype); without ``kv_grads`` (k and v need none) they are neither summed nor sent."""
    group, rows = setup.group, setup.rows
    acc = _accumulator_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    block = [k.contiguous(), v.contiguous()]
    kv_exchange = comm.RingExchange(group, tag=_KV_TAG)
    grad_exchange = comm.RingExchange(group, tag=_GRAD_TAG)
    grads: Optional[list[Tensor]] = None  # the accumulators of the block in hand
    for step in range(group.world_size):
        last = step + 1 == group.world_size
        incoming = None if last else kv_exchange.start(block)
        block_grads = [torch.zeros(t.shape, dtype=acc, device=q.device) for t in block] if kv_grads else []
        for call in setup.plans[step]:
            dq_b, dk_b, dv_b = partial.backward(
                rows.get(dout, call.q), rows.get(q, call.q), rows.get(block[0], call.k), rows.get(block[1], call.k),
                rows.get(out, call.q), rows.get(lse, call.q, rows.dim + 1), setup.rows.options(call, setup.options),
                setup.backend)
            rows.add(dq, call.q, dq_b)
            if kv_grads:
                rows.add(block_grads[0], call.k, dk_b)
                rows.add(block_grads[1], call.k, dv_b)
        if kv_grads:
            if grads is None:
                grads = block_grads
            else:
                grad_exchange.wait()  # the previous rank's accumulators for this block
                grads[0].add_(block_grads[0])
                grads[1].add_(block_grads[1])
            if group.world_size > 1:
                grads = grad_exchange.start(grads)
        if not last:
            kv_exchange.wait()
            block = incoming
    if not kv_grads:
        return dq.to(q.dtype), None, None
    if group.world_size > 1:
        grad_exchange.wait()  # our own block's accumulators, home from the last rank
    return dq.to(q.dtype), grads[0].to(k.dtype), grads[1].to(v.dtype)


_KV_TAG, _GRAD_TAG = 17, 18


class SchemeAttention(torch.autograd.Function):
    """A context-parallel scheme's (out, lse) as one autograd node: ``forward(q, k, v, setup)``
    and ``backward(dout, q, k, v, out, lse, setup, kv_grads)`` are the scheme's own (the ring
    here, llama3.py's gather); ``kv_grads``: k or v needs a gradient."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, forward, backward, setup):
        out, lse = forward(q, k, v, setup)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scheme_backward, ctx.setup = backward, setup
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout: Tensor, _dlse: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.scheme_backward(dout, q, k, v, out, lse, ctx.setup,
                                         kv_grads=ctx.needs_input_grad[1] or ctx.needs_input_grad[2])
        return (*ops.not_twice_differentiable((dq, dk, dv), (q, k, v)), None, None, None)


def check_ring_rows(layout: str, rows: int, cu: Optional[Tensor], world: int, max_seqlen: int, causal: bool,
                    window_size, alibi_slopes: Optional[Tensor]) -> None:
    """The ring layouts' own checks of a call whose ranks each hold ``rows`` rows (packed:
    ``cu`` the global int32 offsets, ``max_seqlen`` as bounded by the total): ArgumentError
    naming the argument. (USP runs them for its ring before any data moves.)"""
    per_rank = chunks_per_rank(layout)
    if layout == "stripe" and alibi_slopes is not None:
        raise ArgumentError("alibi_slopes: not supported by the stripe layout (a query's distance to a key of "
                            "another rank is not a whole number of local rows)")
    if cu is None:
        if rows % per_rank:
            raise ArgumentError(f"q: the zigzag layout holds two equal chunks per rank, so the local sequence "
                                f"length must be even, got {rows}")
        return
    if api._causal_window(window_size, causal) not in ((-1, -1), (-1, 0)) or alibi_slopes is not None:
        raise ArgumentError("window_size, alibi_slopes: not supported by the varlen ring forms (every "
                            "document's pieces would need their own position offset); use "
                            "ulysses_flash_attn_varlen_func or the dense forms")
    if api.index_values_readable(cu.device):
        offsets, pieces, total = cu.tolist(), world * per_rank, rows * world
        if offsets[0] != 0 or offsets[-1] != total or any(b < a for a, b in zip(offsets, offsets[1:])):
            raise ArgumentError(f"cu_seqlens: the global offsets must rise from 0 to {total} (this rank's "
                                f"{rows} rows x {world} ranks), got {offsets}")
        lengths = [b - a for a, b in zip(offsets, offsets[1:])]
        bad = next((d for d, n in enumerate(lengths) if n % pieces), None)
        if bad is not None:
            raise ArgumentError(f"cu_seqlens: document {bad} has {lengths[bad]} tokens, not divisible by "
                                f"{pieces} (the {layout} layout cuts every document into {pieces} pieces)")
        if max_seqlen and max(lengths) > max_seqlen:
            raise ArgumentError(f"max_seqlen: {max_seqlen} is below the longest document ({max(lengths)})")


# (collectives and the host-side argument check: run eagerly under torch.compile, a graph
# break; Dynamo cannot trace the process group object)
@torch.compiler.disable
def ring_attention(layout: str, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Optional[Tensor], max_seqlen: int,
                   dropout_p: float, softmax_scale: Optional[float], causal: bool, window_size,
                   alibi_slopes: Optional[Tensor], deterministic: bool, return_attn_probs: bool, group,
                   softcap: float):
    """The ring / zigzag / stripe functions' common body (layouts in layout.py)."""
    per_rank = chunks_per_rank(layout)
    deterministic = ops.deterministic_wanted(deterministic)

    def layout_check(q4: Tensor, k4: Tensor, cu: Optional[Tensor], world: int, max_seqlen: int) -> list[tuple]:
        checks.check_same_rows(q4, k4)
        check_ring_rows(layout, q4.shape[1], cu, world, max_seqlen, causal, window_size, alibi_slopes)
        return []

    ring, checked = checks.check_call(group, layout, q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale,
                                      causal, window_size, softcap, alibi_slopes, deterministic, layout_check)
    world, (left, right) = ring.world_size, checked.window
    if cu_seqlens is not None:
        rows, chunk_len = PackedRows(checked.cu_seqlens, checked.max_seqlen, world, per_rank, q.shape[0]), None
    else:
        chunk_len = q.shape[1] // per_rank
        rows = DenseRows(chunk_len)
    if layout == "stripe":
        plans = [plan_stripe_step(ring.rank, (ring.rank - step) % world, world, chunk_len, left, right)
                 for step in range(world)]
    else:
        my_chunks = rank_chunks(layout, ring.rank, world)
        plans = [plan_step(my_chunks, rank_chunks(layout, (ring.rank - step) % world, world), chunk_len, left,
                           right, alibi_slopes is not None) for step in range(world)]
    options = partial.BlockOptions(checked.scale, left, right, 0, float(softcap), alibi_slopes, None, None, 0, 0,
                                   deterministic)
    out, lse = SchemeAttention.apply(q, k, v, ring_forward, ring_backward,
                                     RingSetup(ring, rows, plans, options, checked.backend))
    return (out, lse, None) if return_attn_probs else out


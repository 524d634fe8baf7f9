"""Context parallelism as in the Llama 3 report, over packed documents (ring-flash-attention's
``llama3_flash_attn_varlen_func``): every rank holds contiguous rows of the packed sequence
(documents may straddle ranks), gathers every rank's K/V rows (``heads_k_stride`` KV heads
at a time, the next heads' gather in flight while the current ones are computed), and
attends its own queries over the keys its documents need, in ONE local packed call per
group of heads. The backward gathers K/V again, computes the local gradients and sums each
rank's key / value gradients back to their owner (reduce-scatter, in float32 for 16-bit
inputs). Not a ring: each rank's output is final after one local call, so there is no
merging (and the arithmetic is exactly a packed call's).

``llama3_flash_attn_prepare_cu_seqlens`` turns the global offsets into each rank's local
ones: ``cu_seqlens_q`` over its rows, ``cu_seqlens_k`` over ``local_k_slice`` of the gathered
rows (from the start of its first document to the end of its rows when causal, or to the
end of its last document when not).
"""
from __future__ import annotations

import math
import operator
from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor

from .. import api, ops, partial
from ..errors import ArgumentError
from . import checks, comm
from .layout import _offsets
from .ring import SchemeAttention

# (torch 2.13 renamed the tensor collectives; the old names remain, deprecated)
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def llama3_flash_attn_prepare_cu_seqlens(cu_seqlens: Union[Tensor, Sequence[int]], causal: bool, rank: int,
                                         world_size: int):
    """This rank's local offsets for ``llama3_flash_attn_varlen_func`` (ring-flash-attention's
    function of the same name). Reads the offsets on the host (a sync for GPU tensors: call
    it once per batch, not per layer).

    Args:
        cu_seqlens: the GLOBAL packed sequence's offsets (B + 1,), rising from 0; the total
            divisible by ``world_size`` (rank r holds rows [r T, (r + 1) T), T = total / world).
        causal: whether the attention will be causal (the keys then end at the rank's last
            row; otherwise at the end of its last document).

    Returns:
        ``(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, local_k_slice)``: the
        local offsets (cu_seqlens' dtype and device; at least one sequence), their longest
        lengths (ints) and the slice of the gathered K/V rows they index.
    """
    if isinstance(cu_seqlens, Tensor) and (cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point()
                                           or cu_seqlens.is_complex() or cu_seqlens.dtype == torch.bool):
        raise ArgumentError(f"cu_seqlens: expected a 1-D integer tensor, got {cu_seqlens.dtype} of shape "
                            f"{tuple(cu_seqlens.shape)}")
    if not isinstance(cu_seqlens, Tensor) and any(_index_or_none(x) is None for x in cu_seqlens):
        raise ArgumentError(f"cu_seqlens: expected integer offsets, got {list(cu_seqlens)}")
    offsets = _offsets(cu_seqlens)
    world, index = _index_or_none(world_size), _index_or_none(rank)  # (NumPy integers too, not bools)
    if world is None or world < 1:
        raise ArgumentError(f"world_size: expected an int >= 1, got {world_size!r}")
    if index is None or not 0 <= index < world:
        raise ArgumentError(f"rank: expected an int in [0, {world}), got {rank!r}")
    rank, world_size = index, world
    total = offsets[-1]
    if total % world_size:
        raise ArgumentError(f"cu_seqlens: the total length {total} is not divisible by world_size {world_size} "
                            f"(every rank holds the same number of rows)")
    rows = total // world_size
    start, end = rank * rows, (rank + 1) * rows
    # The documents the rank's rows [start, end) meet: from the last one starting at or
    # before `start` (a document straddling in) to the first one ending at or after `end`.
    first = next(d for d in range(len(offsets)) if offsets[d] >= start)
    if offsets[first] != start:
        first -= 1
    last = next(d for d in range(len(offsets)) if offsets[d] >= end)
    bounds = offsets[first:last + 1]
    if len(bounds) == 1:  # (no rows: one empty sequence)
        bounds = bounds * 2
    local_q = [0] + [b - start for b in bounds[1:-1]] + [rows]
    key_start, key_end = bounds[0], (end if causal else bounds[-1])
    local_k = [b - key_start for b in bounds[:-1]] + [key_end - key_start]
    like = cu_seqlens if isinstance(cu_seqlens, Tensor) else None
    dtype = like.dtype if like is not None else torch.int32
    device = like.device if like is not None else None
    cu_q = torch.tensor(local_q, dtype=dtype, device=device)
    cu_k = torch.tensor(local_k, dtype=dtype, device=device)
    max_q = max(b - a for a, b in zip(local_q, local_q[1:]))
    max_k = max(b - a for a, b in zip(local_k, local_k[1:]))
    return cu_q, cu_k, max_q, max_k, slice(key_start, key_end)


def _index_or_none(value) -> Optional[int]:
    """An int (NumPy integers too, not bools), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _check_boundaries(keys_by_rank: list, rows: int, window: tuple[int, int]) -> None:
    """Offsets that cannot all come from one global cu_seqlens, or were prepared causal for a
    non-causal call, from every rank's (first key row, last key row + 1, start of its last
    document, end of its first sequence's queries; NaN: not read): the same table on every
    rank, so every rank raises alike. Each rank's key slice starts at its first document's
    start, so rank r + 1's first document continues rank r's last one exactly when it starts
    before rank r + 1's rows; offsets prepared non-causal end rank r's keys at that
    document's end: where rank r + 1's first sequence ends if it ends before rank r + 1's
    rows do, else rank r + 1's own key end where that runs past its rows, else at least
    there."""
    for r in range(len(keys_by_rank) - 1):
        _, stop, last_document, _ = keys_by_rank[r]
        next_start, next_stop, _, next_first_end = keys_by_rank[r + 1]
        boundary, next_end = (r + 1) * rows, (r + 2) * rows
        continues = next_start < boundary
        document_end_differs = False
        if continues and stop > boundary and not math.isnan(next_first_end):
            if next_first_end < next_end:
                document_end_differs = stop != next_first_end
            else:
                document_end_differs = stop != next_stop if next_stop > next_end else stop < next_end
        if ((continues and not math.isnan(last_document) and last_document != next_start)
                or (not continues and stop > boundary) or document_end_differs):
            raise ArgumentError(f"cu_seqlens_q, cu_seqlens_k: ranks {r} and {r + 1} disagree on the document at "
                                f"global row {boundary} (offsets prepared from different global cu_seqlens?)")
        if continues and stop == boundary and window[1] != 0:
            raise ArgumentError(f"causal: a non-causal call on offsets prepared with causal=True: rank {r}'s keys "
                                f"end at its last row, but its last document continues on rank {r + 1} (prepare "
                                f"with causal=False)")


class _Setup(NamedTuple):
    group: comm.Group
    stride: int  # KV heads per gather
    keys: slice  # the gathered rows the local keys are (trimmed, see llama3_attention)
    options: partial.BlockOptions
    backend: str


def _gather_rows(x: Tensor, group: comm.Group) -> tuple[Tensor, object]:
    """Start gathering every rank's ``x`` (rows, heads, D) into (world * rows, heads, D) in
    rank order; returns the buffer and the request to wait on. 16-bit floats travel as
    bytes (gloo has no 16-bit types)."""
    x = x.contiguous()
    out = x.new_empty((group.world_size * x.shape[0], *x.shape[1:]))
    raw = (lambda t: t.view(torch.uint8)) if x.dtype in (torch.bfloat16, torch.float16) else (lambda t: t)
    request = _all_gather(raw(out), raw(x), group=group.group, async_op=True)
    return out, request


class _Gathers:
    """The KV-head groups' gathers, one group ahead: ``next()`` waits for the current
    group's K and V (all rows) and starts the following group's."""

    def __init__(self, k: Tensor, v: Tensor, setup: _Setup):
        self.k, self.v, self.setup = k, v, setup
        self.head = 0
        self.pending = self._start(0)

    def _start(self, head: int):
        if head >= self.k.shape[1]:
            return None
        heads = slice(head, head + self.setup.stride)
        return [_gather_rows(t[:, heads], self.setup.group) for t in (self.k, self.v)]

    def next(self) -> tuple[Tensor, Tensor]:
        current = self.pending
        for _, request in current:
            request.wait()
        self.head += self.setup.stride
        self.pending = self._start(self.head)
        return current[0][0], current[1][0]


def _query_heads(q: Tensor, k: Tensor, head: int, stride: int) -> slice:
    group = q.shape[1] // k.shape[1]
    return slice(head * group, (head + stride) * group)


def _options(setup: _Setup, heads: slice) -> partial.BlockOptions:
    slopes = setup.options.alibi_slopes
    return setup.options if slopes is None else setup.options._replace(alibi_slopes=slopes[heads].contiguous())


def llama3_forward(q: Tensor, k: Tensor, v: Tensor, setup: _Setup) -> tuple[Tensor, Tensor]:
    """out (rows, H, Dv) in q's dtype and lse (H, rows)."""
    outs, lses = [], []
    gathers = _Gathers(k, v, setup)
    for head in range(0, k.shape[1], setup.stride):
        k_all, v_all = gathers.next()
        heads = _query_heads(q, k, head, setup.stride)
        out, lse = partial.forward(q[:, heads], k_all[setup.keys], v_all[setup.keys], _options(setup, heads),
                                   setup.backend)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, dim=1), torch.cat(lses, dim=0)


def llama3_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, setup: _Setup,
                    kv_grads: bool) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """dq, and (``kv_grads``) dk, dv: each rank's share of every rank's key / value
    gradients, summed by a reduce-scatter in float32 (float64 for float64 inputs)."""
    group, stride = setup.group, setup.stride
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dq = torch.empty_like(q)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device) if kv_grads else None
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device) if kv_grads else None
    in_flight = None  # the previous head group's reduce-scatter, waited for after this group's products
    gathers = _Gathers(k, v, setup)
    for head in range(0, k.shape[1], stride):
        k_all, v_all = gathers.next()
        heads = _query_heads(q, k, head, stride)
        dq_h, dk_h, dv_h = partial.backward(dout[:, heads], q[:, heads], k_all[setup.keys], v_all[setup.keys],
                                            out[:, heads], lse[heads], _options(setup, heads), setup.backend)
        dq[:, heads] = dq_h
        if not kv_grads:
            continue
        _land(in_flight)
        in_flight = []
        for grad, local in ((dk_h, dk), (dv_h, dv)):
            full = grad.new_zeros((k_all.shape[0], *grad.shape[1:]), dtype=acc)
            full[setup.keys] = grad
            mine = torch.empty((k.shape[0], *grad.shape[1:]), dtype=acc, device=k.device)
            request = _reduce_scatter(mine, full, group=group.group, async_op=True)
            in_flight.append((request, local[:, head:head + stride], mine, full))
    _land(in_flight)
    return dq, dk, dv


def _land(reductions) -> None:
    """Wait for a head group's reduce-scatters and store each rank's share (in k's dtype)."""
    for request, target, mine, _full in reductions or ():
        request.wait()
        target.copy_(mine)


# (collectives and the host-side argument check: run eagerly under torch.compile, a graph
# break; Dynamo cannot trace the process group object)
@torch.compiler.disable
def llama3_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                     max_seqlen_q: int, max_seqlen_k: int, heads_k_stride: int, local_k_slice: slice,
                     dropout_p: float, softmax_scale: Optional[float], causal: bool, window_size,
                     alibi_slopes: Optional[Tensor], deterministic: bool, return_attn_probs: bool, group,
                     softcap: float):
    """``llama3_flash_attn_varlen_func``'s body (see its docstring)."""
    deterministic = ops.deterministic_wanted(deterministic)
    local: dict = {}

    def layout_check(q4: Tensor, k4: Tensor, cu_q: Tensor, world: int, max_q: int) -> list[tuple]:
        rows, heads_k = q4.shape[1], k4.shape[2]
        checks.check_same_rows(q4, k4)
        stride = _index_or_none(heads_k_stride)
        if stride is None or not 1 <= stride <= heads_k or heads_k % stride:
            raise ArgumentError(f"heads_k_stride: expected an int dividing the {heads_k} key/value heads, got "
                                f"{heads_k_stride!r}")
        if alibi_slopes is not None and alibi_slopes.dim() != 1:
            raise ArgumentError(f"alibi_slopes: expected (H,) slopes (a (B, H) table's B would count each rank's "
                                f"own sequences), got shape {tuple(alibi_slopes.shape)}")
        bounds = ((_index_or_none(local_k_slice.start), _index_or_none(local_k_slice.stop))
                  if isinstance(local_k_slice, slice) and local_k_slice.step in (None, 1) else (None, None))
        if None in bounds or not 0 <= bounds[0] <= bounds[1] <= world * rows:
            raise ArgumentError(f"local_k_slice: expected a slice(start, stop) of the {world * rows} gathered rows "
                                f"(llama3_flash_attn_prepare_cu_seqlens gives it), got {local_k_slice!r}")
        start, stop = bounds
        my_end = (dist.get_rank(group) + 1) * rows  # (this rank's rows end there)
        if stop < my_end:
            raise ArgumentError(f"local_k_slice: the keys end at gathered row {stop}, before this rank's last row "
                                f"{my_end - 1}")
        cu_k = api._index_tensor("cu_seqlens_k", cu_seqlens_k, q4.device, 1)
        if cu_k.shape[0] != cu_q.shape[0]:
            raise ArgumentError(f"cu_seqlens_q, cu_seqlens_k: expected B + 1 offsets each, got {cu_q.shape[0]} and "
                                f"{cu_k.shape[0]}")
        max_k = api.at_most(api._length("max_seqlen_k", max_seqlen_k), stop - start)
        api._check_packed(cu_q, cu_k, max_q, max_k, rows, stop - start, None, None, 0, 0, api.FLASH_NAMES)
        # (for the checks across ranks, in global rows: where the last document starts, and
        # where the first local sequence's queries end: its document's end when another
        # follows, else this rank's end)
        last_document = first_end = math.nan
        if api.index_values_readable(cu_q.device):
            # Bottom-right alignment of each sequence is its global positions only when its
            # queries and keys end on the same global row (the last one may end past them).
            q_ends = [my_end - rows + x for x in cu_q.tolist()[1:-1]]
            k_offsets = cu_k.tolist()
            k_ends = [start + x for x in k_offsets[1:-1]]
            last_document = start + k_offsets[-2]
            first_end = my_end - rows + cu_q[1].item()
            bad = next((d for d, (a, b) in enumerate(zip(q_ends, k_ends)) if a != b), None)
            if bad is not None:
                raise ArgumentError(f"cu_seqlens_q, cu_seqlens_k: sequence {bad}'s queries end at global row "
                                    f"{q_ends[bad]} but its keys at {k_ends[bad]} (pass the offsets "
                                    f"llama3_flash_attn_prepare_cu_seqlens gives)")
        # Keys past this rank's rows (the offsets of a non-causal preparation): a causal call
        # never sees them, so they are cut (which aligns the last sequence); where windows or
        # ALiBi would count positions from a misaligned diagonal, refused.
        past = stop - my_end
        window = api._causal_window(window_size, causal)
        if past and window[1] == 0:
            cu_k = cu_k.clone()
            cu_k[-1] -= past
            stop -= past
        elif past and (window != (-1, -1) or alibi_slopes is not None):
            raise ArgumentError(f"local_k_slice: keys end {past} rows past this rank's rows (its last document "
                                f"continues on the next rank); non-causal windows and ALiBi over such a document "
                                f"are not supported here (its diagonal is not bottom-right): "
                                f"ulysses_flash_attn_varlen_func has them")
        local.update(cu_k=cu_k, max_k=max_k, keys=slice(start, stop), stride=stride)
        return [("heads_k_stride", [stride]), ("~keys", [start, bounds[1], last_document, first_end])]

    ring, checked = checks.check_call(group, "llama3", q, k, v, cu_seqlens_q, max_seqlen_q, dropout_p,
                                      softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                      layout_check, local_offsets=True)
    _check_boundaries(checked.per_rank["keys"], q.shape[0], checked.window)
    left, right = checked.window
    options = partial.BlockOptions(checked.scale, left, right, 0, float(softcap), alibi_slopes, checked.cu_seqlens,
                                   local["cu_k"], checked.max_seqlen, local["max_k"], deterministic)
    setup = _Setup(ring, local["stride"], local["keys"], options, checked.backend)
    out, lse = SchemeAttention.apply(q, k, v, llama3_forward, llama3_backward, setup)
    return (out, lse, None) if return_attn_probs else out

"""Ulysses attention (DeepSpeed-Ulysses): an all-to-all turns each rank's sequence shard of
all heads into the whole sequence of H / world heads, attention runs locally over the
whole sequence (any feature: causal, windows, ALiBi, softcap, packed documents), and an
all-to-all turns the output back into sequence shards. The backward is the same
all-to-alls in reverse around the local attention's own backward."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import api, ops
from ..errors import ArgumentError
from . import checks, comm
from .layout import RING_LAYOUTS


def _exchange(x: Tensor, group: comm.Group) -> Tensor:
    """all_to_all of (world, ...) blocks; 16-bit floats travel as bytes (gloo has no 16-bit types)."""
    if x.dtype in (torch.bfloat16, torch.float16):
        return comm.all_to_all(x.view(torch.uint8), group).view(x.dtype)
    return comm.all_to_all(x, group)


def seq_to_heads(x: Tensor, group: comm.Group) -> Tensor:
    """(B, S_local, H, D) sequence shards of all heads -> (B, world * S_local, H / world, D):
    the whole sequence of this rank's heads (rank r: heads [r H / world, (r + 1) H / world))."""
    world = group.world_size
    b, s, h, d = x.shape
    blocks = x.reshape(b, s, world, h // world, d).permute(2, 0, 1, 3, 4).contiguous()
    return _exchange(blocks, group).permute(1, 0, 2, 3, 4).reshape(b, world * s, h // world, d)


def heads_to_seq(y: Tensor, group: comm.Group) -> Tensor:
    """``seq_to_heads``' inverse: (B, world * S_local, H / world, D) -> (B, S_local, H, D)."""
    world = group.world_size
    b, s_all, h_local, d = y.shape
    s = s_all // world
    blocks = y.reshape(b, world, s, h_local, d).permute(1, 0, 2, 3, 4).contiguous()
    return _exchange(blocks, group).permute(1, 2, 0, 3, 4).reshape(b, s, world * h_local, d)


class _HeadsToSeq(torch.autograd.Function):
    """``heads_to_seq`` of the output; the backward is ``seq_to_heads``."""

    @staticmethod
    def forward(ctx, x: Tensor, group: comm.Group) -> Tensor:
        ctx.group = group
        return heads_to_seq(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        # (under create_graph the exchange, which has no history, is tied to what it took:
        # a second backward raises as the local attention's does, not a silent zero)
        return ops.not_twice_differentiable((seq_to_heads(grad.contiguous(), ctx.group),), (grad,))[0], None


class _QKVToHeads(torch.autograd.Function):
    """``seq_to_heads`` of q, k and v as ONE autograd node, whose backward exchanges the
    gradient of every input that needs one on every rank: with a node per tensor, a rank
    asking autograd for fewer inputs (``torch.autograd.grad(out, [q])`` beside ``[q, k, v]``
    on another) skipped exchanges the others made, and the ranks' all_to_alls paired
    different tensors (a wrong dq, then a hang). Which inputs need a gradient is fixed at the
    forward and compared across ranks, so every rank makes the same exchanges."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, group: comm.Group):
        ctx.group = group
        heads = tuple(seq_to_heads(t, group) for t in (q, k, v))
        # (an input without a gradient gives an output without one: the attention after it,
        # USP's ring in particular, then computes and passes no gradient for it)
        ctx.mark_non_differentiable(*(t for t, needed in zip(heads, ctx.needs_input_grad) if not needed))
        return heads

    @staticmethod
    def backward(ctx, *grads):
        result = tuple(heads_to_seq(g.contiguous(), ctx.group) if needed else None
                       for g, needed in zip(grads, ctx.needs_input_grad))
        return (*ops.not_twice_differentiable(result, grads), None)


# What runs over the Ulysses group after the check (plain Ulysses, or USP's ring across such
# groups): compared across the group, since the two make different collectives.
SCHEMES = ("ulysses",) + tuple(f"usp ({layout})" for layout in RING_LAYOUTS)


def scheme_field(scheme: str) -> tuple:
    """The collective check's field naming ``scheme`` (one of SCHEMES)."""
    return ("context-parallel scheme", [SCHEMES.index(scheme)], list(SCHEMES))


def check_heads(q4: Tensor, k4: Tensor, world: int) -> None:
    """ArgumentError unless q's and k's head counts split evenly over ``world`` ranks."""
    for name, heads in (("q", q4.shape[2]), ("k", k4.shape[2])):
        if heads % world:
            raise ArgumentError(f"{name}: Ulysses gives every rank H / world heads: {heads} heads are not "
                                f"divisible by the group's {world} ranks")


def head_slopes(alibi_slopes: Optional[Tensor], heads: int, group: comm.Group) -> Optional[Tensor]:
    """The ALiBi slopes of this rank's heads after ``seq_to_heads`` (``heads``: all of them)."""
    if alibi_slopes is None:
        return None
    per_rank = heads // group.world_size
    return alibi_slopes[..., group.rank * per_rank:(group.rank + 1) * per_rank].contiguous()


def lse_to_seq(lse: Tensor, group: comm.Group) -> Tensor:
    """lse (B, H / world, S) of this rank's heads over the gathered rows -> (B, H, S_local),
    this rank's rows of every head (no autograd)."""
    with torch.no_grad():
        return heads_to_seq(lse.transpose(1, 2).unsqueeze(-1).contiguous(), group).squeeze(-1).transpose(1, 2)


# (collectives and the host-side argument check: run eagerly under torch.compile, a graph
# break; Dynamo cannot trace the process group object)
@torch.compiler.disable
def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Optional[Tensor], max_seqlen: int,
                      dropout_p: float, softmax_scale: Optional[float], causal: bool, window_size,
                      alibi_slopes: Optional[Tensor], deterministic: bool, return_attn_probs: bool, group,
                      softcap: float):
    """The Ulysses functions' common body: q (B, S_local, H, D) (packed: (T_local, H, D),
    contiguous rows of the global packed sequence)."""
    packed = cu_seqlens is not None
    deterministic = ops.deterministic_wanted(deterministic)

    def layout_check(q4: Tensor, k4: Tensor, cu: Optional[Tensor], world: int, max_seqlen: int) -> list[tuple]:
        check_heads(q4, k4, world)
        if cu is not None:
            checks.check_same_rows(q4, k4)
            if api.index_values_readable(cu.device):
                total = q4.shape[1] * world
                api._check_packed(cu, cu, max_seqlen, max_seqlen, total, total, None, None, 0, 0,
                                  dict(api.FLASH_NAMES, cu_seqlens_q="cu_seqlens", cu_seqlens_k="cu_seqlens",
                                       max_seqlen_q="max_seqlen", max_seqlen_k="max_seqlen"))
        # (return_attn_probs adds an exchange of lse)
        return [scheme_field("ulysses"), ("return_attn_probs", [float(bool(return_attn_probs))])]

    ring, checked = checks.check_call(group, "ulysses", q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale,
                                      causal, window_size, softcap, alibi_slopes, deterministic, layout_check)
    window, scale = checked.window, checked.scale
    q4, k4, v4 = (q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)) if packed else (q, k, v)
    q_heads, k_heads, v_heads = _QKVToHeads.apply(q4, k4, v4, ring)
    slopes = head_slopes(alibi_slopes, q4.shape[2], ring)
    if packed:
        out, lse = api._varlen(q_heads[0], k_heads[0], v_heads[0], checked.cu_seqlens, checked.cu_seqlens,
                               checked.max_seqlen, checked.max_seqlen, seqused_k=None, block_table=None, dropout_p=0.0, scale=scale,
                               window=window, softcap=float(softcap), alibi_slopes=slopes,
                               deterministic=deterministic, backend=checked.backend)
        out, lse = out.unsqueeze(0), lse.unsqueeze(0)
    else:
        # (the gathered sequences: flash-attn's window rule on their lengths, as flash_attn_func)
        right = api.flash_right_side(window[0], window[1], q_heads.shape[1], k_heads.shape[1])
        out, lse = ops.attention(q_heads, k_heads, v_heads, scale=scale, softcap=float(softcap), alibi_slopes=slopes,
                                 window_left=window[0], window_right=right,
                                 diag_offset=k_heads.shape[1] - q_heads.shape[1], deterministic=deterministic,
                                 backend=checked.backend)
    out = _HeadsToSeq.apply(out, ring)
    if packed:
        out = out[0]
    if not return_attn_probs:
        return out
    lse = lse_to_seq(lse, ring)
    return out, (lse[0] if packed else lse).contiguous(), None

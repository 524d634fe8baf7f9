"""The argument check every context-parallel call starts with: local checks, then one
collective comparison (comm.check_collectively), so that bad or mismatched input raises on
every rank of the group instead of leaving the others waiting in a ring or an all-to-all."""
from __future__ import annotations

import hashlib
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from .. import api, backends, partial
from ..errors import ArgumentError
from . import comm
from .layout import LAYOUTS

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class Checked(NamedTuple):
    """A validated call: its window (causal folded in), scale, int32 cu_seqlens and
    max_seqlen as an int (packed calls; 0 otherwise), the backend every rank runs its local
    blocks on, whether a backward follows, and the layout check's per-rank fields (every
    rank's numbers: comm.check_collectively)."""

    window: tuple[int, int]
    scale: float
    cu_seqlens: Optional[Tensor]
    max_seqlen: int
    backend: str
    backward: bool
    per_rank: dict


def fingerprint(t: Tensor) -> list[float]:
    """Two numbers equal on two ranks when their tensors hold the same values (else with
    odds of 2**-48): the element count and 48 bits of a hash of the bytes (exact in a
    float64; NaN and inf included). (Sums of the values, even weighted by the index, let
    some different offsets pass: (..., 1, -2, 1, ...) steps.)"""
    data = bytes(t.detach().cpu().contiguous().flatten().view(torch.uint8).tolist())
    return [float(t.numel()), float(int.from_bytes(hashlib.blake2b(data, digest_size=6).digest(), "little"))]


def offsets_fields(cu: Tensor) -> list[tuple]:
    """cu_seqlens must be the same on every rank: its length, and (when its values may be read)
    their fingerprint."""
    if not api.index_values_readable(cu.device):
        return [("cu_seqlens", [cu.shape[0], float("nan")])]
    return [("cu_seqlens", fingerprint(cu))]


class Refusal:
    """What a caller passes on in place of a tensor when it found the call bad before the
    collective check: ``check_call`` raises ``message`` on this rank and an error naming it
    on every other rank (raising at once would leave the others waiting in the check)."""

    def __init__(self, message: str):
        self.message = message


class Unsplit(Refusal):
    """A packed form's (``kv`` / ``qkv``) placeholder for tensors it could not split."""

    def __init__(self, name: str, packed, count: int):
        super().__init__(f"{name}: expected a (..., {count}, H, D) tensor, got "
                         f"{tuple(packed.shape) if isinstance(packed, Tensor) else type(packed).__name__}")


def check_same_rows(q4: Tensor, k4: Tensor) -> None:
    """ArgumentError unless q and k/v (B, S, H, D) views hold the same number of rows."""
    if q4.shape[1] != k4.shape[1]:
        raise ArgumentError(f"q, k: each rank holds the same rows of q and k/v; got {q4.shape[1]} and {k4.shape[1]} "
                            f"rows")


def check_call(group, layout: str, q, k, v, cu_seqlens, max_seqlen, dropout_p: float, softmax_scale, causal: bool,
               window_size, softcap: float, alibi_slopes, deterministic: bool,
               layout_check: Callable[[Tensor, Tensor, Optional[Tensor], int, int], list[tuple]],
               local_offsets: bool = False) -> tuple[comm.Group, Checked]:
    """Validate a context-parallel call (``layout``: layout.LAYOUTS) on every rank of
    ``group`` (see the module docstring).
    ``layout_check(q4, k4, cu, world, max_seqlen)`` adds the layout's own checks (q4, k4:
    (B, S, H, D) views; cu: int32 offsets or None; max_seqlen an int) and returns more fields
    every rank must agree on. ``local_offsets``: ``cu_seqlens`` / ``max_seqlen`` are this
    rank's own ``cu_seqlens_q`` / ``max_seqlen_q`` (offsets of its local rows, which differ
    between ranks: not compared), not the global sequence's."""
    ring = comm.Group(group)
    packed = cu_seqlens is not None
    checked: dict = {}

    def validate() -> list[tuple]:
        for t in (q, k, v):
            if isinstance(t, Refusal):
                raise ArgumentError(t.message)
        if local_offsets and cu_seqlens is None:
            raise ArgumentError("cu_seqlens_q: required (this rank's offsets: "
                                "llama3_flash_attn_prepare_cu_seqlens gives them)")
        api._check_tensors(("q", "k", "v"), q, k, v)
        ring.check_device(q.device)
        api._check_dropout(dropout_p)
        if dropout_p > 0:
            raise ArgumentError(f"dropout_p: context-parallel attention has no dropout (each rank's mask would "
                                f"depend on how the sequence is sharded), got {dropout_p}")
        window = api._causal_window(window_size, causal)
        dims = 3 if packed else 4
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.dim() != dims:
                shape = "(total_local, H, D)" if packed else "(B, S_local, H, D)"
                raise ArgumentError(f"{name}: expected a {dims}-D {shape} tensor, got shape {tuple(t.shape)}")
        q4, k4, v4 = (q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)) if packed else (q, k, v)
        api._check_qkv(q4, k4, v4, ("q", "k", "v"), heads_dim=2, seq_dim=1)
        batch, cu, length, fields = q.shape[0], None, 0, []
        if packed:
            suffix = "_q" if local_offsets else ""
            cu = api._index_tensor("cu_seqlens" + suffix, cu_seqlens, q.device, 1)
            batch = cu.shape[0] - 1
            if batch < 1:
                raise ArgumentError(f"cu_seqlens{suffix}: expected B + 1 >= 2 offsets of the "
                                    f"{'local' if local_offsets else 'global'} packed sequence")
            length = api._length("max_seqlen" + suffix, max_seqlen)  # (NumPy ints, 1-element tensors: as torch's)
            # (the packed total bounds it: sizes only)
            length = api.at_most(length, q.shape[0] * (1 if local_offsets else ring.world_size))
            if not local_offsets:
                fields += offsets_fields(cu) + [("max_seqlen", [length])]
        fields += layout_check(q4, k4, cu, ring.world_size, length)
        api._check_flash_options(q, 0.0, window, softcap, alibi_slopes, batch)
        scale = api.softmax_scale_of("softmax_scale", softmax_scale, q.shape[-1])
        grads = [torch.is_grad_enabled() and t.requires_grad for t in (q, k, v)]
        backward = any(grads)
        backend = partial.select_backend(q, k, v, backward, deterministic, alibi_slopes, cu)
        checked.update(window=window, scale=scale, cu_seqlens=cu, max_seqlen=length, backend=backend,
                       backward=backward)
        return [("q", list(q.shape)), ("k", list(k.shape)), ("v", list(v.shape)),
                ("q.dtype", [_DTYPES.index(q.dtype)], [str(d).replace("torch.", "") for d in _DTYPES]),
                ("softmax_scale", [scale]), ("window_size, causal", list(window)), ("softcap", [float(softcap)]),
                ("alibi_slopes", [-1.0] if alibi_slopes is None else list(alibi_slopes.shape)
                 + fingerprint(alibi_slopes)[1:]),
                ("context-parallel layout", [LAYOUTS.index(layout)], list(LAYOUTS)),
                ("deterministic", [float(deterministic)]),
                ("requires_grad (under grad mode) of q, k, v", [float(g) for g in grads]),
                ("backend", [backends.BACKEND_NAMES.index(backend)], list(backends.BACKEND_NAMES))] + fields

    checked["per_rank"] = comm.check_collectively(ring, validate)
    return ring, Checked(**checked)

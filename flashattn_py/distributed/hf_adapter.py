"""Context parallelism for Hugging Face transformers models: ring-flash-attention's adapter
(``substitute_hf_flash_attn``, ``update_ring_flash_attn_params``) on our transformers backend.

    substitute_hf_flash_attn(group, heads_k_stride=1)    # once
    model = AutoModelForCausalLM.from_config(config, attn_implementation="fattn_py")
    update_ring_flash_attn_params(cu_seqlens, group)     # every batch: the GLOBAL offsets
    out = model(input_ids=local_ids, position_ids=local_positions)  # this rank's contiguous rows

Every attention layer of a model on the "fattn_py" backend then computes
``llama3_flash_attn_varlen_func`` over the documents of ``cu_seqlens``: one packed row
(batch 1) cut into equal contiguous chunks, rank r holding chunk r. As in
ring-flash-attention, the mask transformers builds from the local rows is not read (the
documents come from ``cu_seqlens``; a padded batch cannot be expressed), and a layer's
``sliding_window`` is a window of that many keys back. ``use_ring_attn(False)`` switches back
to plain attention over the local rows (e.g. for evaluation without sharding).
"""
from __future__ import annotations

import sys
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .. import api
from ..errors import ArgumentError
from . import comm
from .checks import Refusal, offsets_fields
from .layout import _offsets
from .llama3 import llama3_attention, llama3_flash_attn_prepare_cu_seqlens


class _State:
    group = None  # substitute_hf_flash_attn's: the layers' group
    heads_k_stride: Optional[int] = None  # None: substitute_hf_flash_attn not called
    prepared: Optional[dict] = None  # causal -> llama3_flash_attn_prepare_cu_seqlens' result for this rank
    on = True


def substitute_hf_flash_attn(process_group: Optional[dist.ProcessGroup], heads_k_stride: int) -> None:
    """Make every attention layer of models on flashattn_py's transformers backend
    (``attn_implementation="fattn_py"``, registered here) context-parallel over
    ``process_group`` (None: the default group), gathering ``heads_k_stride`` KV heads at a time.
    Offsets per batch: ``update_ring_flash_attn_params``."""
    if type(heads_k_stride) is not int or heads_k_stride < 1:
        raise ArgumentError(f"heads_k_stride: expected an int >= 1, got {heads_k_stride!r}")
    from ..integrations import transformers as backend

    backend.register()
    _State.group, _State.heads_k_stride, _State.on = process_group, heads_k_stride, True
    backend.context_parallel = sys.modules[__name__]


def update_ring_flash_attn_params(cu_seqlens: Tensor, process_group: Optional[dist.ProcessGroup]) -> None:
    """The documents of the next forward: ``cu_seqlens`` (B + 1,) int32, the GLOBAL packed
    row's offsets (the same on every rank, the total divisible by the group's size), this
    rank's place in them taken from ``process_group`` (the layers' group is
    ``substitute_hf_flash_attn``'s, as in ring-flash-attention). Read on the host now (a sync
    for GPU tensors; later changes to ``cu_seqlens`` do not count), once per batch. Collective
    over ``process_group`` (every rank calls it): offsets that are bad on a rank, or differ
    between ranks, raise on every rank; after an error no offsets are set (the layers refuse
    until the next update)."""
    _State.prepared = None
    group = comm.Group(process_group)
    prepared: dict = {}

    def validate() -> list[tuple]:
        for causal in (True, False):
            prepared[causal] = llama3_flash_attn_prepare_cu_seqlens(cu_seqlens, causal, group.rank,
                                                                     group.world_size)
        return offsets_fields(torch.tensor(_offsets(cu_seqlens), dtype=torch.int64))

    comm.check_collectively(group, validate)
    _State.prepared = prepared


def use_ring_attn(flag: bool) -> None:
    """Switch the substituted layers between context-parallel attention (True, the default
    after ``substitute_hf_flash_attn``) and plain attention over the local rows (False)."""
    _State.on = bool(flag)


def active() -> bool:
    """Whether the transformers backend's layers run context-parallel now."""
    return _State.heads_k_stride is not None and _State.on


def attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, scaling: Optional[float],
                      dropout: float, is_causal: Optional[bool], kwargs: dict) -> Tensor:
    """One layer's context-parallel attention (transformers' (B, H, S, D) inputs): (1, S, H, D).
    What it refuses is refused through the call's collective check, on every rank."""
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    sliding = kwargs.get("sliding_window")
    if sliding is None:
        sliding = getattr(module, "sliding_window", None)
    window = (sliding - 1, sliding - 1) if sliding else (-1, -1)  # (transformers': that many keys back)
    refusal = None
    if _State.prepared is None:
        refusal = ("cu_seqlens: call update_ring_flash_attn_params(cu_seqlens, group) with the batch's global "
                   "offsets before the forward")
    elif query.shape[0] != 1:
        refusal = f"query: context parallelism takes one packed row (batch 1), got a batch of {query.shape[0]}"
    elif key.shape[2] != query.shape[2]:
        refusal = (f"key: {key.shape[2]} keys for {query.shape[2]} local rows: context parallelism takes no KV "
                   f"cache (use_ring_attn(False) for generation)")
    if refusal is not None:
        q = k = v = Refusal(refusal)
        prepared = (None, None, 0, 0, slice(0, 0))
    else:
        query, key, value, _ = api._autocast(query, key, value, None)
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (S, H, D) views
        prepared = _State.prepared[causal]
    out = llama3_attention(q, k, v, *prepared[:4], _State.heads_k_stride, prepared[4], float(dropout), scaling,
                           causal, window, None, False, False, _State.group, float(kwargs.get("softcap") or 0.0))
    return out.unsqueeze(0)

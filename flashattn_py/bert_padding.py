"""Padding helpers for the packed-sequence functions, as flash-attn's ``flash_attn.bert_padding``.

A padded batch (B, S, ...) with a (B, S) mask of real tokens becomes packed rows
(total, ...) plus what ``flash_attn_varlen_func`` needs (``unpad_input``), and packed
outputs go back to the padded layout (``pad_input``):

    x, indices, cu_seqlens, max_seqlen, _ = unpad_input(hidden_states, attention_mask)
    out = flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)
    out = pad_input(out, indices, batch, seqlen)

Plain torch indexing, differentiable (gradients flow back through both).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .errors import ArgumentError

__all__ = ["IndexFirstAxis", "IndexFirstAxisResidual", "IndexPutFirstAxis", "index_first_axis",
           "index_first_axis_residual", "index_put_first_axis", "pad_input", "unpad_input",
           "unpad_input_for_concatenated_sequences"]


def index_first_axis(x: Tensor, indices: Tensor) -> Tensor:
    """Rows ``indices`` of x along its first axis: (len(indices), ...)."""
    return x.index_select(0, indices)


def index_put_first_axis(values: Tensor, indices: Tensor, first_axis_dim: int) -> Tensor:
    """A (first_axis_dim, ...) tensor of zeros with row ``indices[i]`` set to ``values[i]``."""
    if values.shape[0] != indices.shape[0]:
        raise ArgumentError(f"values: expected one row per index ({indices.shape[0]}), got {values.shape[0]}")
    out = values.new_zeros((first_axis_dim, *values.shape[1:]))
    return out.index_put((indices,), values)


class IndexFirstAxis(torch.autograd.Function):
    """flash-attn's autograd form of ``index_first_axis`` (``IndexFirstAxis.apply(x, indices)``);
    the plain function above is the same computation through torch's own autograd."""

    @staticmethod
    def forward(ctx, x: Tensor, indices: Tensor) -> Tensor:
        ctx.save_for_backward(indices)
        ctx.first_axis_dim = x.shape[0]
        return index_first_axis(x, indices)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (indices,) = ctx.saved_tensors
        return index_put_first_axis(grad, indices, ctx.first_axis_dim), None


class IndexPutFirstAxis(torch.autograd.Function):
    """flash-attn's autograd form of ``index_put_first_axis``
    (``IndexPutFirstAxis.apply(values, indices, first_axis_dim)``)."""

    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, first_axis_dim: int) -> Tensor:
        ctx.save_for_backward(indices)
        return index_put_first_axis(values, indices, first_axis_dim)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (indices,) = ctx.saved_tensors
        return index_first_axis(grad, indices), None, None


class IndexFirstAxisResidual(torch.autograd.Function):
    """flash-attn's ``index_first_axis_residual``: ``(x[indices], x)`` where the second output,
    x itself (detached), carries a residual gradient into x beside the selected rows'."""

    @staticmethod
    def forward(ctx, x: Tensor, indices: Tensor):
        ctx.save_for_backward(indices)
        return index_first_axis(x, indices), x.detach()

    @staticmethod
    def backward(ctx, grad: Tensor, grad_residual: Tensor):
        (indices,) = ctx.saved_tensors
        return grad_residual.index_add(0, indices, grad), None


index_first_axis_residual = IndexFirstAxisResidual.apply


def unpad_input(hidden_states: Tensor, attention_mask: Tensor, unused_mask: Optional[Tensor] = None):
    """Packed rows of the tokens a mask keeps.

    Args:
        hidden_states: (B, S, ...).
        attention_mask: (B, S) bool or integer, nonzero for a real token.
        unused_mask: None, or (B, S): tokens that are kept in the packed rows (and counted
            in cu_seqlens) but not used (``used_seqlens`` leaves them out; e.g. slots
            allocated for later tokens).

    Returns:
        ``(rows (total, ...), indices (total,) int64 into the flattened B * S positions,
        cu_seqlens (B + 1,) int32, max_seqlen (int), used_seqlens (B,) int32)``. Each
        sequence's kept tokens stay in their order; one host read (the longest length).
    """
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != tuple(hidden_states.shape[:2]):
        raise ArgumentError(f"attention_mask: expected (B, S) = {tuple(hidden_states.shape[:2])}, got "
                            f"{tuple(attention_mask.shape)}")
    kept = attention_mask.bool()
    if unused_mask is not None:
        if tuple(unused_mask.shape) != tuple(attention_mask.shape):
            raise ArgumentError(f"unused_mask: expected attention_mask's shape {tuple(attention_mask.shape)}, got "
                                f"{tuple(unused_mask.shape)}")
        kept = kept | unused_mask.bool()
    used_seqlens = attention_mask.bool().sum(dim=-1, dtype=torch.int32)
    return (*_packed(hidden_states, kept, kept.sum(dim=-1, dtype=torch.int32)), used_seqlens)


def _packed(hidden_states: Tensor, kept: Tensor, seqlens: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
    """The rows of ``hidden_states`` (B, S, ...) where ``kept`` (B, S) is True, their indices,
    and the offsets and longest of the sequences ``seqlens`` (int32) they make, in order."""
    indices = kept.flatten().nonzero().flatten()
    cu_seqlens = torch.zeros(seqlens.shape[0] + 1, dtype=torch.int32, device=seqlens.device)
    cu_seqlens[1:] = seqlens.cumsum(0)
    max_seqlen = int(seqlens.max().item()) if seqlens.numel() else 0
    return index_first_axis(hidden_states.flatten(0, 1), indices), indices, cu_seqlens, max_seqlen


def unpad_input_for_concatenated_sequences(hidden_states: Tensor, attention_mask_in_length: Tensor):
    """Packed rows of a batch whose rows each hold several documents back to back (packed
    fine-tuning samples), each document its own sequence.

    Args:
        hidden_states: (B, S, ...).
        attention_mask_in_length: (B, S) integer: row b's documents' lengths in order, the
            rest of the row 0 (e.g. ``[2, 3, 0, 0, 0, 0]``: tokens 0-1 and 2-4 are two
            documents, token 5 padding). Each row's lengths sum to at most S.

    Returns:
        ``(rows (total, ...), indices (total,) int64 into the flattened B * S positions,
        cu_seqlens (D + 1,) int32 over the D documents of every row in order, max_seqlen
        (int))``, as flash-attn's function of that name. It reads the lengths on the host
        (syncs on GPUs, as flash-attn's); they are checked on CPU tensors.
    """
    lengths = attention_mask_in_length
    if not isinstance(lengths, Tensor) or lengths.dim() != 2 or tuple(lengths.shape) != tuple(hidden_states.shape[:2]):
        raise ArgumentError(f"attention_mask_in_length: expected (B, S) = {tuple(hidden_states.shape[:2])}, got "
                            f"{tuple(getattr(lengths, 'shape', ())) or type(lengths).__name__}")
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise ArgumentError(f"attention_mask_in_length: expected an integer tensor, got {lengths.dtype}")
    seqlen = lengths.shape[1]
    per_row = lengths.sum(dim=-1)
    if lengths.device.type == "cpu" and lengths.numel():
        if bool((lengths < 0).any()):
            raise ArgumentError("attention_mask_in_length: lengths must be >= 0")
        if bool((per_row > seqlen).any()):
            row = int((per_row > seqlen).nonzero()[0])
            raise ArgumentError(f"attention_mask_in_length: row {row}'s documents hold {int(per_row[row])} tokens, "
                                f"more than its {seqlen} positions")
    kept = torch.arange(seqlen, device=lengths.device) < per_row.unsqueeze(1)  # (a row's documents come first)
    flat = lengths.flatten()
    return _packed(hidden_states, kept, flat[flat != 0].to(torch.int32))


def pad_input(hidden_states: Tensor, indices: Tensor, batch: int, seqlen: int) -> Tensor:
    """Packed rows (total, ...) back to (batch, seqlen, ...), zeros where no row goes
    (``indices`` as ``unpad_input`` returns them)."""
    out = index_put_first_axis(hidden_states, indices, batch * seqlen)
    return out.view(batch, seqlen, *hidden_states.shape[1:])

"""Rotary position embedding, as flash-attn's ``flash_attn.layers.rotary.apply_rotary_emb``.

``rotate_at`` is the formula ``flash_attn_with_kvcache`` applies to new keys and
queries; ``apply_rotary_emb`` is the public form, for q / k before ``flash_attn_func`` or
``flash_attn_varlen_func``. Plain torch ops in float32 (float64 for float64 inputs),
differentiable.
"""
from __future__ import annotations

import operator
from typing import Optional, Union

import torch
from torch import Tensor

from .api import _index_tensor, _length
from .errors import ArgumentError

__all__ = [
    "RotaryEmbedding", "apply_rotary_emb", "apply_rotary_emb_func", "apply_rotary_emb_kv_", "apply_rotary_emb_qkv_",
    "apply_rotary_emb_torch", "apply_rotary_raw", "rotate_half",
]


def rotate_half(x: Tensor, interleaved: bool = False) -> Tensor:
    """flash-attn's ``rotate_half``: each feature pair (a, b) of x's last dim becomes (-b, a);
    pairs are (i, i + D / 2) (GPT-NeoX) or, ``interleaved``, (2i, 2i + 1) (GPT-J)."""
    if interleaved:
        pairs = x.unflatten(-1, (-1, 2))
        return torch.stack((-pairs[..., 1], pairs[..., 0]), -1).flatten(-2)
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary_emb_torch(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False) -> Tensor:
    """flash-attn's plain-torch rotary (its tests' reference): x (B, S, H, D), cos / sin
    (S, rotary_dim / 2) or (B, S, rotary_dim / 2); the first rotary_dim features rotated by
    row s, the rest unchanged; computed in the dtype torch promotes x and the tables to
    (``apply_rotary_emb`` computes in float32 and returns x's)."""
    rotary_dim = cos.shape[-1] * 2
    if rotary_dim > x.shape[-1]:
        raise ArgumentError(f"cos: rotary_dim = 2 * {cos.shape[-1]} exceeds the head dim {x.shape[-1]}")
    # (each table value serves both features of its pair, in the pairs' layout; a heads axis)
    def spread(t: Tensor) -> Tensor:
        t = t.repeat_interleave(2, -1) if interleaved else torch.cat((t, t), -1)
        return t.unsqueeze(-2)

    rotated = x[..., :rotary_dim]
    rotated = rotated * spread(cos) + rotate_half(rotated, interleaved) * spread(sin)
    return torch.cat((rotated, x[..., rotary_dim:]), -1)


def rotate_at(x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, interleaved: bool,
              valid: Optional[Tensor] = None) -> Tensor:
    """Rotary embedding of x (B, S, H, D) at ``positions`` (B, S) (rows of cos / sin,
    (seqlen_ro, rotary_dim / 2)): the first rotary_dim features rotate in pairs, (0, 1),
    (2, 3), ... when ``interleaved`` (GPT-J), (i, i + rotary_dim / 2) otherwise (GPT-NeoX);
    the rest pass through; tokens where ``valid`` (B, S) is False are not rotated. Computed
    in float32 (float64 for float64 x), returned in x's dtype."""
    half = cos.shape[-1]
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    c = cos[positions].to(work)  # (B, S, rotary_dim / 2)
    s = sin[positions].to(work)
    if valid is not None:
        c = torch.where(valid.unsqueeze(-1), c, 1.0)
        s = torch.where(valid.unsqueeze(-1), s, 0.0)
    c, s = c.unsqueeze(2), s.unsqueeze(2)  # (B, S, 1, rotary_dim / 2)
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


def _host_reads() -> bool:
    """Whether CPU tensors' values may be read here: not while torch.compile traces (a read
    would break the graph)."""
    return not torch.compiler.is_compiling()


def _position_bounds(positions: Tensor, seqlen_offsets, x: Tensor, packed: bool,
                     max_seqlen: Optional[int]) -> Optional[tuple[int, int]]:
    """(lowest, highest) position the call needs, where known without reading a GPU tensor
    back: from the values on the CPU (eager); from the shapes (packed: max_seqlen) and an
    int offset elsewhere; else None."""
    if positions.numel() == 0:
        return None
    if positions.device.type == "cpu" and _host_reads():
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
        inplace: write the result into x and return x (as flash-attn's; for a leaf that
            needs a gradient x holds the result and the returned tensor, in the graph, is a
            copy). The result is computed aside first: no memory is saved.
        seqlen_offsets: an int or a (B,) integer tensor (e.g. the tokens already in a KV cache).
        max_seqlen: with cu_seqlens, the longest sequence (required, as flash-attn's).

    Returns the rotated x, same shape and dtype. Positions outside the tables raise an
    ArgumentError where they are known on the host (CPU tensors in eager mode; an int
    offset with the lengths); elsewhere (a GPU or compiled call's offsets tensor) such
    tokens are left unrotated, as flash-attn's kernel leaves them (nothing is read back).
    """
    packed = cu_seqlens is not None
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ArgumentError(f"x: expected a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
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
        max_seqlen = _length("max_seqlen", max_seqlen)
        batch, total = cu_seqlens.shape[0] - 1, x.shape[0]
        if cu_seqlens.device.type == "cpu" and _host_reads():
            offsets = cu_seqlens.tolist()
            if offsets[0] != 0 or offsets[-1] != total or any(b < a for a, b in zip(offsets, offsets[1:])):
                raise ArgumentError(f"cu_seqlens: expected offsets rising from 0 to x's {total} rows, got {offsets}")
            longest = max((b - a for a, b in zip(offsets, offsets[1:])), default=0)
            if longest > max_seqlen:
                raise ArgumentError(f"max_seqlen: {max_seqlen}, but cu_seqlens holds a sequence of {longest}")
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
        if not isinstance(seqlen_offsets, (int, torch.SymInt)):  # (a NumPy integer too; not a float)
            try:
                seqlen_offsets = operator.index(seqlen_offsets)
            except TypeError:
                raise ArgumentError(f"seqlen_offsets: expected an int or a ({batch},) integer tensor, got "
                                    f"{seqlen_offsets!r}") from None
        positions = positions + seqlen_offsets
    bounds = _position_bounds(positions, seqlen_offsets, x, packed, max_seqlen)
    valid = None
    if bounds is not None:
        if bounds[0] < 0 or bounds[1] >= seqlen_ro:
            raise ArgumentError(f"cos: {seqlen_ro} positions (rows), but positions {bounds[0]}..{bounds[1]} are "
                                f"needed")
    elif positions.numel():
        valid = (positions >= 0) & (positions < seqlen_ro)
    positions = positions.clamp(0, seqlen_ro - 1)
    # (in place, x is overwritten after the rotation reads it: a copy where autograd keeps x
    # for the tables' gradient, which a float32 x would otherwise alias)
    source = x.clone() if inplace and torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad) else x
    if packed:  # (one sequence of all the rows)
        valid = None if valid is None else valid.unsqueeze(0)
        out = rotate_at(source.unsqueeze(0), cos, sin, positions.unsqueeze(0), interleaved, valid)[0]
    else:
        out = rotate_at(source, cos, sin, positions, interleaved, valid)
    if not inplace:
        return out
    return _write_in_place(x, out, cos.requires_grad or sin.requires_grad)


def _write_in_place(x: Tensor, result: Tensor, tables_grad: bool = False, siblings_done: bool = False) -> Tensor:
    """``inplace=True``: result (computed out of place from x) written into x. As autograd
    records in-place ops where it allows one; where it refuses (a leaf that needs a
    gradient, a view of one: flash-attn's kernel writes those unseen by autograd, and its
    tests train through that), x holds the result, written outside autograd (its version
    counter still moves: a tensor saved from x before raises in the backward, never a wrong
    gradient), and the result is returned: the tensor in the graph (a copy of x's new
    values, not x's memory). A view from split / unbind / chunk: autograd would then refuse
    its siblings, so only where the caller computed theirs first (``siblings_done``:
    RotaryEmbedding's q and kv), else an ArgumentError."""
    if not (torch.is_grad_enabled() and (x.requires_grad or result.requires_grad)):
        return x.copy_(result)
    if torch.compiler.is_compiling():  # (no try: a refusal would end the trace)
        if siblings_done:  # (x's autograd state is not even read: a sibling may be written already)
            return _written_outside_autograd(x, result)
        leaf = x.is_leaf and x.requires_grad
        if leaf and tables_grad:  # (compiled, torch takes the written x for the tables' gradient: wrong values)
            raise ArgumentError("x: inplace=True on a leaf that needs a gradient, with cos / sin that need one "
                                "too, is not supported under torch.compile: pass inplace=False")
        if not leaf:
            return x.copy_(result)
    else:
        try:
            return x.copy_(result)
        except RuntimeError as error:  # (autograd's refusal comes before anything is written)
            message = str(error)
            if "multiple views" in message:
                if not siblings_done:
                    raise ArgumentError("x: a view from split / unbind / chunk that needs a gradient cannot be "
                                        "rotated in place (autograd refuses, and once x is written its sibling "
                                        "views could not be used): pass inplace=False") from None
            elif "leaf Variable" not in message:  # (only the leaf's refusals; any other is raised)
                raise
    return _written_outside_autograd(x, result)


def _written_outside_autograd(x: Tensor, result: Tensor) -> Tensor:
    with torch.no_grad():
        x.copy_(result)
    return result


# flash-attn's name for the same function (flash_attn.layers.rotary.apply_rotary_emb_func).
apply_rotary_emb_func = apply_rotary_emb


def apply_rotary_raw(x: Tensor, cos: Tensor, sin: Tensor, seqlen_offsets: Union[int, Tensor] = 0,
                     cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None, interleaved: bool = False,
                     inplace: bool = False, conjugate: bool = False) -> Tensor:
    """flash-attn's ``flash_attn.ops.triton.rotary.apply_rotary`` (``install_as_flash_attn``
    serves it under that name): ``apply_rotary_emb``'s rotation without autograd, for code
    that writes its own autograd.Function around it (ModernBERT's); ``conjugate`` rotates
    by minus the angles (that function's backward). x (B, S, H, D), or packed (total, H, D)
    with ``cu_seqlens`` and ``max_seqlen``; the other arguments as ``apply_rotary_emb``'s."""
    with torch.no_grad():
        return apply_rotary_emb(x, cos, -sin if conjugate else sin, interleaved=interleaved, inplace=inplace,
                                seqlen_offsets=seqlen_offsets, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)


# (flash-attn's layers.rotary imports ops.triton.rotary's apply_rotary into its namespace:
# code may take it from there, flash_attn.layers.rotary being this module once aliased)
apply_rotary = apply_rotary_raw


def apply_rotary_emb_qkv_(qkv: Tensor, cos: Tensor, sin: Tensor, cos_k: Optional[Tensor] = None,
                          sin_k: Optional[Tensor] = None, interleaved: bool = False,
                          seqlen_offsets: Union[int, Tensor] = 0, num_heads_q: Optional[int] = None) -> Tensor:
    """flash-attn's ``apply_rotary_emb_qkv_``: q's and k's first rotary_dim features of qkv
    rotated in place (``apply_rotary_emb``); returns qkv.

    qkv: (B, S, 3, H, D), or (B, S, Hq + 2 * Hk, D) with ``num_heads_q`` = Hq (GQA / MQA).
    cos_k, sin_k: k's tables (default: cos, sin). Under autograd, for a leaf qkv that needs
    a gradient qkv holds the result and the returned tensor, in the graph, is a copy (as
    apply_rotary_emb's ``inplace``); a view from split / unbind is refused."""
    if not isinstance(qkv, Tensor):
        raise ArgumentError(f"qkv: expected a tensor, got {type(qkv).__name__}")
    if qkv.dim() == 5:  # (num_heads_q ignored, as flash-attn does)
        if qkv.shape[2] != 3:
            raise ArgumentError(f"qkv: expected (B, S, 3, H, D), got shape {tuple(qkv.shape)}")
        q_part, k_part = (lambda t: t[:, :, 0]), (lambda t: t[:, :, 1])
    elif qkv.dim() == 4 and num_heads_q is not None:
        heads_k = (qkv.shape[2] - num_heads_q) // 2
        if num_heads_q < 1 or heads_k < 1 or num_heads_q + 2 * heads_k != qkv.shape[2]:
            raise ArgumentError(f"num_heads_q: {num_heads_q} query heads do not leave two equal K and V head "
                                f"counts of qkv's {qkv.shape[2]}")
        q_part, k_part = (lambda t: t[:, :, :num_heads_q]), (lambda t: t[:, :, num_heads_q:num_heads_q + heads_k])
    else:
        raise ArgumentError(f"qkv: expected (B, S, 3, H, D), or (B, S, Hq + 2 * Hk, D) with num_heads_q, got shape "
                            f"{tuple(qkv.shape)} and num_heads_q={num_heads_q}")
    if (cos_k is None) != (sin_k is None):
        raise ArgumentError("cos_k, sin_k: pass both or neither")
    # (under autograd the parts rotate in a copy, written back as apply_rotary_emb's inplace)
    target = qkv.clone() if torch.is_grad_enabled() and qkv.requires_grad else qkv
    apply_rotary_emb(q_part(target), cos, sin, interleaved, True, seqlen_offsets)
    apply_rotary_emb(k_part(target), cos if cos_k is None else cos_k, sin if sin_k is None else sin_k, interleaved,
                     True, seqlen_offsets)
    tables_grad = any(t is not None and t.requires_grad for t in (cos, sin, cos_k, sin_k))
    return _write_in_place(qkv, target, tables_grad) if target is not qkv else qkv


def apply_rotary_emb_kv_(kv: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False,
                         seqlen_offsets: Union[int, Tensor] = 0) -> Tensor:
    """flash-attn's ``apply_rotary_emb_kv_``: k's first rotary_dim features of kv (B, S, 2,
    Hk, D) rotated in place; returns kv (in place as ``apply_rotary_emb_qkv_``)."""
    if not isinstance(kv, Tensor) or kv.dim() != 5 or kv.shape[2] != 2:
        raise ArgumentError(f"kv: expected (B, S, 2, Hk, D), got shape {tuple(getattr(kv, 'shape', ()))}")
    target = kv.clone() if torch.is_grad_enabled() and kv.requires_grad else kv
    apply_rotary_emb(target[:, :, 0], cos, sin, interleaved, True, seqlen_offsets)
    return _write_in_place(kv, target, cos.requires_grad or sin.requires_grad) if target is not kv else kv


class RotaryEmbedding(torch.nn.Module):
    """flash-attn's ``flash_attn.layers.rotary.RotaryEmbedding``: cos / sin tables of
    position x frequency (frequencies ``base ** (-2i / dim)``, computed in float32), kept
    for the longest sequence seen so far, applied in place to q and k.

    Args:
        dim: rotary_dim (the first ``dim`` features of each head rotate; an odd one rounds up,
            as flash-attn's).
        base: the frequencies' base.
        interleaved: GPT-J pairs (0, 1), (2, 3), ... instead of GPT-NeoX halves.
        scale_base: None, or XPos (Sun et al. 2022): q's tables times
            ``((2i + 0.4 dim) / (1.4 dim)) ** ((pos - S // 2) / scale_base)``, k's divided
            by it (S the tables' length).
        device: where the frequencies are made.
    """

    def __init__(self, dim: int, base: float = 10000.0, interleaved: bool = False,
                 scale_base: Optional[float] = None, device=None):
        super().__init__()
        dim = _length("dim", dim)
        if dim < 1:
            raise ArgumentError(f"dim: expected an int >= 1 (rotary_dim), got {dim}")
        self.dim, self.base, self.interleaved, self.scale_base = dim, float(base), interleaved, scale_base
        self.register_buffer("inv_freq", self._compute_inv_freq(device), persistent=False)
        self.register_buffer("scale", None if scale_base is None else self._xpos_scale(device), persistent=False)
        self._seq_len_cached = 0
        self._cos_cached = self._sin_cached = self._cos_k_cached = self._sin_k_cached = None
        self._cache_inference = False  # (the tables were made in inference mode)

    def _compute_inv_freq(self, device=None) -> Tensor:
        """The inverse frequencies (float32): flash-attn's hook, which subclasses override
        (position interpolation, NTK scaling)."""
        return 1.0 / self.base ** (torch.arange(0, self.dim, 2, device=device, dtype=torch.float32) / self.dim)

    def _xpos_scale(self, device=None) -> Tensor:
        return (torch.arange(0, self.dim, 2, device=device, dtype=torch.float32) + 0.4 * self.dim) / (1.4 * self.dim)

    def _update_cos_sin_cache(self, seqlen: int, device=None, dtype=None) -> None:
        """Tables for positions 0 .. seqlen - 1 (at least), remade when longer ones are needed,
        on another device or dtype, or in training after inference-mode ones."""
        cached = self._cos_cached
        if (cached is not None and seqlen <= self._seq_len_cached and cached.device == device and cached.dtype == dtype
                and not (self.training and self._cache_inference)):
            return
        # (a flag, not cached.is_inference(): torch.compile cannot trace that)
        self._seq_len_cached = seqlen
        self._cache_inference = not torch.compiler.is_compiling() and torch.is_inference_mode_enabled()
        # (float32 throughout: a model loaded in bf16 has bf16 buffers, and positions times
        # frequencies lose too much there)
        inv_freq = self.inv_freq if self.inv_freq.dtype == torch.float32 else self._compute_inv_freq(device)
        angles = torch.outer(torch.arange(seqlen, device=device, dtype=torch.float32), inv_freq.to(device))
        cos, sin = angles.cos(), angles.sin()
        if self.scale is None:
            self._cos_cached, self._sin_cached = cos.to(dtype), sin.to(dtype)
            return
        # (float32 as the frequencies: flash-attn's powers the buffer in the module's dtype)
        xpos = self.scale if self.scale.dtype == torch.float32 else self._xpos_scale(device)
        power = (torch.arange(seqlen, device=device, dtype=torch.float32) - seqlen // 2) / self.scale_base
        scale = xpos.to(device) ** power.unsqueeze(1)
        self._cos_cached, self._sin_cached = (cos * scale).to(dtype), (sin * scale).to(dtype)
        self._cos_k_cached, self._sin_k_cached = (cos / scale).to(dtype), (sin / scale).to(dtype)

    def forward(self, qkv: Tensor, kv: Optional[Tensor] = None, seqlen_offset: Union[int, Tensor] = 0,
                max_seqlen: Optional[int] = None, num_heads_q: Optional[int] = None):
        """Rotates in place, returns as flash-attn's module.

        qkv: (B, S, 3, H, D), or (B, S, Hq + 2 * Hk, D) with ``num_heads_q``; with ``kv``
            (B, S, 2, Hk, D), q (B, S, H, D). seqlen_offset: int or (B,) tensor (tokens before
            these, e.g. in a KV cache); with a tensor pass ``max_seqlen`` (the tables' length).
        Returns qkv, or (q, kv)."""
        if max_seqlen is not None:
            self._update_cos_sin_cache(max_seqlen, device=qkv.device, dtype=qkv.dtype)
        elif isinstance(seqlen_offset, int):
            self._update_cos_sin_cache(qkv.shape[1] + seqlen_offset, device=qkv.device, dtype=qkv.dtype)
        elif self._cos_cached is None:
            raise ArgumentError("max_seqlen: required with a seqlen_offset tensor before any tables were made")
        # (k's tables: XPos divides where q's multiply)
        cos_k, sin_k = ((self._cos_k_cached, self._sin_k_cached) if self.scale is not None
                        else (self._cos_cached, self._sin_cached))
        if kv is None:
            return apply_rotary_emb_qkv_(qkv, self._cos_cached, self._sin_cached, cos_k, sin_k,
                                         interleaved=self.interleaved, seqlen_offsets=seqlen_offset,
                                         num_heads_q=num_heads_q)
        # Both results first, then the writes: q and kv may be views of one projection
        # (mamba_ssm's MHA splits it), which autograd refuses to use once a sibling was written
        # outside it (_write_in_place; without gradients both are written in place as they are).
        q_out = apply_rotary_emb(qkv, self._cos_cached, self._sin_cached, interleaved=self.interleaved,
                                 seqlen_offsets=seqlen_offset)
        k_out = apply_rotary_emb(kv[:, :, 0], cos_k, sin_k, interleaved=self.interleaved,
                                 seqlen_offsets=seqlen_offset)
        kv_out = torch.stack([k_out, kv[:, :, 1]], 2)
        return _write_in_place(qkv, q_out, siblings_done=True), _write_in_place(kv, kv_out, siblings_done=True)

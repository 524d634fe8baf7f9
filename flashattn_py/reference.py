"""The naive attention formula with every feature of docs/design.md ("What every backend computes").

This is the definition every kernel is tested against (run in float64), and the
``reference`` backend (autograd through plain PyTorch ops, O(N^2) memory).
It generalises the seed's ``softmax(Q K^T / sqrt(d_k)) V``, which returned
``(output, p_attn)``: ``attention_ref(..., return_probs=True)`` still gives p_attn.

Layout is flash-attn's: q (B, Sq, H, D), k (B, Sk, Hk, D), v (B, Sk, Hk, Dv).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def visibility_mask(
    seqlen_q: int,
    seqlen_k: int,
    window_left: int,
    window_right: int,
    diag_offset: int,
    device: torch.device | str = "cpu",
) -> Tensor:
    """(Sq, Sk) bool: True where key j is visible to query i.

    Visible iff ``i + diag_offset - window_left <= j <= i + diag_offset + window_right``,
    a bound of -1 being unbounded. Causal is ``window_right == 0``.
    """
    i = torch.arange(seqlen_q, device=device).unsqueeze(1) + diag_offset
    j = torch.arange(seqlen_k, device=device).unsqueeze(0)
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if window_left >= 0:
        visible &= j >= i - window_left
    if window_right >= 0:
        visible &= j <= i + window_right
    return visible


def attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float | None = None,
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    attn_bias: Tensor | None = None,
    window_left: int = -1,
    window_right: int = -1,
    diag_offset: int = 0,
    dropout_p: float = 0.0,
    dropout_mask: Tensor | None = None,
    return_probs: bool = False,
    cu_seqlens_q: Tensor | None = None,
    cu_seqlens_k: Tensor | None = None,
    seqused_k: Tensor | None = None,
    block_table: Tensor | None = None,
    bottom_right: bool = False,
    kv_batch_idx: Tensor | None = None,
    leftpad_k: Tensor | None = None,
):
    """Attention by the naive formula, computed in the dtype of ``q`` (the scores and softmax
    in float32 where a float32 ``attn_bias`` meets 16-bit inputs, as torch does).

    Args:
        q: (B, Sq, H, D); k: (B, Sk, Hk, D); v: (B, Sk, Hk, Dv); H % Hk == 0.
        scale: multiplies q.k; default 1/sqrt(D).
        softcap: > 0 applies ``softcap * tanh(s / softcap)``.
        alibi_slopes: (H,) or (B, H); subtracts ``slope * |i + diag_offset - j|``.
        attn_bias: broadcastable to (B, H, Sq, Sk); float is added, bool False removes.
        window_left, window_right, diag_offset: visibility (see ``visibility_mask``).
        dropout_p: drop probability; kept probabilities are scaled by 1/(1-p).
        dropout_mask: bool keep-mask broadcastable to (B, H, Sq, Sk); drawn with
            torch's RNG when ``dropout_p > 0`` and none is given.
        return_probs: also return the softmax probabilities (B, H, Sq, Sk), before dropout,
            in q's dtype.
        cu_seqlens_q, cu_seqlens_k, seqused_k, block_table, bottom_right, kv_batch_idx,
            leftpad_k: packed sequences, paged K/V and KV caches, computed sequence by
            sequence (``attention_varlen_ref``).

    Returns:
        ``(out, lse)`` or ``(out, lse, probs)``: out (B, Sq, H, Dv) in q's dtype,
        lse (B, H, Sq) = log sum_j exp(s_ij), float32 for 16-bit inputs. A query row with no
        visible key gives out = 0 and lse = -inf (never NaN, gradients zero).
    """
    if any(t is not None for t in (cu_seqlens_q, cu_seqlens_k, seqused_k, block_table, kv_batch_idx, leftpad_k)):
        if attn_bias is not None or return_probs:
            raise ValueError("attn_bias, return_probs: not available with packed sequences or paged K/V")
        return attention_varlen_ref(
            q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k=seqused_k, block_table=block_table,
            kv_batch_idx=kv_batch_idx, leftpad_k=leftpad_k,
            bottom_right=bottom_right, scale=scale, softcap=softcap, alibi_slopes=alibi_slopes,
            window_left=window_left, window_right=window_right, diag_offset=diag_offset, dropout_p=dropout_p,
            dropout_mask=dropout_mask)
    batch, seqlen_q, num_heads, head_dim = q.shape
    seqlen_k, num_heads_k = k.shape[1], k.shape[2]
    if bottom_right:
        diag_offset += seqlen_k - seqlen_q
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    group = num_heads // num_heads_k
    if seqlen_k == 0:  # no key at all: every row is empty
        # (products over the empty key axis: zeros that stay in the autograd graph of q, k and
        # v, with zero gradients, as the kernels' outputs do; no 0 * inf where inputs are inf)
        probs = q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2).repeat_interleave(group, dim=1)
        out = (probs @ v.transpose(1, 2).repeat_interleave(group, dim=1)).transpose(1, 2)
        lse = q.new_full((batch, num_heads, seqlen_q), float("-inf"),
                         dtype=torch.promote_types(q.dtype, torch.float32))  # (float32 for 16-bit inputs)
        return (out, lse, probs) if return_probs else (out, lse)
    qh = q.transpose(1, 2)  # (B, H, Sq, D)
    kh = k.transpose(1, 2).repeat_interleave(group, dim=1)
    vh = v.transpose(1, 2).repeat_interleave(group, dim=1)

    s = torch.matmul(qh, kh.transpose(-2, -1)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        rows = torch.arange(seqlen_q, device=q.device).unsqueeze(1) + diag_offset
        cols = torch.arange(seqlen_k, device=q.device).unsqueeze(0)
        distance = (rows - cols).abs().to(s.dtype)
        slopes = alibi_slopes.to(s.dtype)
        slopes = slopes.view(1, num_heads, 1, 1) if slopes.dim() == 1 else slopes.view(batch, num_heads, 1, 1)
        s = s - slopes * distance
    visible = visibility_mask(seqlen_q, seqlen_k, window_left, window_right, diag_offset, q.device)
    if attn_bias is not None:
        if attn_bias.dtype == torch.bool:
            visible = visible & attn_bias
        else:
            if attn_bias.dtype == torch.float32 and s.dtype in (torch.float16, torch.bfloat16):
                # (a float32 mask with 16-bit inputs is added in float32, as torch does: the
                # scores and softmax go on in float32, P back in the inputs' dtype for P V)
                s = s.float()
            s = s + attn_bias.to(s.dtype)
    s = s.masked_fill(~visible, float("-inf"))

    # Shift by the row max (detached: softmax and lse are shift invariant), guarding
    # rows with no visible key so they give p = 0 and lse = -inf, not NaN.
    row_max = s.detach().amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    e = torch.exp(s - row_max)
    denom = e.sum(dim=-1, keepdim=True)
    if s.dtype in (torch.float16, torch.bfloat16):
        # (lse of 16-bit scores in float32, as the fused kernels return it: a 16-bit log of a
        # 16-bit sum would be off by up to 2^-8 relative, merged partial results with it)
        lse = torch.logsumexp(s.float(), dim=-1)
    else:
        lse = (torch.log(denom) + row_max).squeeze(-1)
    probs = e / torch.where(denom == 0, torch.ones_like(denom), denom)

    p = probs
    if dropout_p > 0:
        if dropout_mask is None:
            dropout_mask = torch.rand_like(probs) >= dropout_p
        p = probs * dropout_mask / (1.0 - dropout_p)
    out = torch.matmul(p.to(vh.dtype), vh).transpose(1, 2)  # (B, Sq, H, Dv)
    if return_probs:
        return out, lse, probs.to(q.dtype)
    return out, lse


def sequence_keys(k: Tensor, b: int, cu_seqlens_k: Tensor | None, seqused_k: Tensor | None,
                  block_table: Tensor | None, kv_batch_idx: Tensor | None = None,
                  leftpad_k: Tensor | None = None) -> Tensor:
    """Sequence b's rows of k (or v), (Sk_b, Hk, D), as the kernels address them
    (csrc/flash_params.h seq_view): packed rows ``cu_seqlens_k[b]:cu_seqlens_k[b+1]``, row b
    (or ``kv_batch_idx[b]``) of a dense batch, or pages ``block_table[b]`` of a paged pool
    (num_pages, page_size, Hk, D); the first ``seqused_k[b]`` of them when given, less the
    first ``leftpad_k[b]``."""
    if block_table is not None:
        page_size = k.shape[1]
        if seqused_k is not None:
            n = int(seqused_k[b])
        elif cu_seqlens_k is not None:
            n = int(cu_seqlens_k[b + 1] - cu_seqlens_k[b])
        else:
            n = block_table.shape[1] * page_size
        pages = block_table[b, :(n + page_size - 1) // page_size].long()
        rows = k[pages].reshape(-1, *k.shape[2:])[:n]
    else:
        if cu_seqlens_k is not None:
            rows = k[0, int(cu_seqlens_k[b]):int(cu_seqlens_k[b + 1])]
        else:
            rows = k[int(kv_batch_idx[b]) if kv_batch_idx is not None else b]
        rows = rows[:int(seqused_k[b])] if seqused_k is not None else rows
    return rows[int(leftpad_k[b]):] if leftpad_k is not None else rows


def attention_varlen_ref(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor | None, cu_seqlens_k: Tensor | None,
                         *, seqused_k: Tensor | None = None, block_table: Tensor | None = None,
                         kv_batch_idx: Tensor | None = None, leftpad_k: Tensor | None = None,
                         bottom_right: bool = True, diag_offset: int = 0, alibi_slopes: Tensor | None = None,
                         dropout_mask: Tensor | None = None, **options):
    """Packed sequences (and paged K/V) by the naive formula, one sequence at a time: the
    definition the single-launch kernels are tested against.

    q (1, total_q, H, D) with ``cu_seqlens_q`` (B + 1,) offsets, or a dense (B, Sq, H, D);
    k, v (1, total_k, Hk, D) with ``cu_seqlens_k``, dense (B, Sk, Hk, D) (rows picked by
    ``kv_batch_idx``), or a page pool with ``block_table`` (B, max_blocks); ``leftpad_k``
    skips each sequence's first key slots (``sequence_keys``). Each sequence's diagonal is
    ``diag_offset`` plus, with ``bottom_right``, its Sk - Sq. alibi_slopes (B, H) row b for
    sequence b. dropout_mask: the keep mask as (1, H, total_q, max Sk) (packed q) or
    (B, H, Sq, max Sk), sequence b's part read from its rows and first Sk_b columns.
    ``options``: the rest of ``attention_ref``'s arguments.

    Returns out like q's rows (1, total_q, H, Dv) and lse (1, H, total_q) (packed q; rows
    in no sequence: out 0, lse -inf), or (B, Sq, H, Dv) and (B, H, Sq).
    """
    packed = cu_seqlens_q is not None
    batch = cu_seqlens_q.numel() - 1 if packed else q.shape[0]
    num_heads = q.shape[2]
    out = q.new_zeros((*q.shape[:3], v.shape[-1]))
    lse = q.new_full((q.shape[0], num_heads, q.shape[1]), float("-inf"),
                     dtype=torch.promote_types(q.dtype, torch.float32))  # (float32 for 16-bit inputs)
    for b in range(batch):
        q0, q1 = (int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])) if packed else (0, q.shape[1])
        qb = q[0, q0:q1] if packed else q[b]
        kb = sequence_keys(k, b, cu_seqlens_k, seqused_k, block_table, kv_batch_idx, leftpad_k)
        vb = sequence_keys(v, b, cu_seqlens_k, seqused_k, block_table, kv_batch_idx, leftpad_k)
        diag = diag_offset + (kb.shape[0] - qb.shape[0] if bottom_right else 0)
        slopes = alibi_slopes[b] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
        mask = None
        if dropout_mask is not None:
            mask = (dropout_mask[0, :, q0:q1] if packed else dropout_mask[b])[..., :kb.shape[0]].unsqueeze(0)
        ob, lb = attention_ref(qb.unsqueeze(0), kb.unsqueeze(0), vb.unsqueeze(0), alibi_slopes=slopes,
                               diag_offset=diag, dropout_mask=mask, **options)
        if packed:
            out[0, q0:q1] = ob[0]
            lse[0, :, q0:q1] = lb[0]
        else:
            out[b] = ob[0]
            lse[b] = lb[0]
    return out, lse


def attention(query: Tensor, key: Tensor, value: Tensor, dropout=None):
    """The seed formula in (..., S, D) layout: returns ``(softmax(QK^T/sqrt(d)) V, p_attn)``."""
    d_k = query.size(-1)
    scores = torch.matmul(query, key.transpose(-2, -1)) / math.sqrt(d_k)
    p_attn = scores.softmax(dim=-1)
    if dropout is not None:
        p_attn = dropout(p_attn)
    return torch.matmul(p_attn, value), p_attn


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, positions: list[int], interleaved: bool) -> Tensor:
    """x (S, H, D) rotated at the given positions, feature pair by feature pair."""
    out = x.clone()
    half = cos.shape[-1]
    for row, pos in enumerate(positions):
        for f in range(half):
            a, b = (2 * f, 2 * f + 1) if interleaved else (f, f + half)
            c, s = cos[pos, f].to(x.dtype), sin[pos, f].to(x.dtype)
            out[row, :, a] = x[row, :, a] * c - x[row, :, b] * s
            out[row, :, b] = x[row, :, a] * s + x[row, :, b] * c
    return out


def attention_kvcache_ref(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Tensor | None = None,
                          v: Tensor | None = None, *, rotary_cos: Tensor | None = None,
                          rotary_sin: Tensor | None = None, cache_seqlens: Tensor, cache_batch_idx: Tensor | None = None,
                          cache_leftpad: Tensor | None = None, block_table: Tensor | None = None,
                          rotary_interleaved: bool = True, causal: bool = False, window_left: int = -1,
                          window_right: int = -1, **options):
    """flash_attn_with_kvcache by the formula, without touching its arguments: returns
    (out, lse, k_cache', v_cache'), the caches as the call leaves them. Each batch entry b:
    its cache row ``cache_batch_idx[b]`` (or pages ``block_table[b]``) gets the new k
    (rotated at slots cache_seqlens[b] + i) and v at those slots; q is rotated at
    cache_seqlens[b] + i (causal or windowed) or at cache_seqlens[b]; then attention over
    slots [cache_leftpad[b], cache_seqlens[b] + S_new), the diagonal bottom-right. As in
    flash-attn, a window side at least as long as the cache (its capacity) is no bound, so
    it does not make the call windowed either; and with one side bounded, an unbounded other
    side is the capacity (which binds only the right side, for rows i < S_q - capacity - 1:
    they see keys up to the capacity past their diagonal).
    ``options``: attention_ref's (scale, softcap, alibi_slopes)."""
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    batch, seqlen_q = q.shape[:2]
    new = 0 if k is None else k.shape[1]
    paged = block_table is not None
    page_size = k_cache.shape[1]
    capacity = block_table.shape[1] * page_size if paged else k_cache.shape[1]
    window_left, window_right = (-1 if w >= capacity else w for w in (window_left, window_right))
    if window_left >= 0 and window_right < 0:
        window_right = capacity
    elif window_right >= 0 and window_left < 0:
        window_left = capacity
    window_right = 0 if causal else window_right
    positional = causal or window_left >= 0 or window_right >= 0
    outs, lses = [], []
    for b in range(batch):
        start = int(cache_seqlens[b])

        def slot_index(slot):  # (page or row, position in it) of the entry's cache slot
            if paged:
                return int(block_table[b, slot // page_size]), slot % page_size
            return (int(cache_batch_idx[b]) if cache_batch_idx is not None else b), slot

        qb = q[b]
        if k is not None:
            kb = k[b]
            if rotary_cos is not None:
                kb = _rotate(kb, rotary_cos, rotary_sin, [start + i for i in range(new)], rotary_interleaved)
            for i in range(new):
                row, col = slot_index(start + i)
                k_cache[row, col] = kb[i]
                v_cache[row, col] = v[b, i]
        if rotary_cos is not None:
            qb = _rotate(qb, rotary_cos, rotary_sin, [start + (i if positional else 0) for i in range(seqlen_q)],
                         rotary_interleaved)
        first = int(cache_leftpad[b]) if cache_leftpad is not None else 0
        slots = range(first, start + new)
        keys = torch.stack([k_cache[slot_index(j)] for j in slots]) if len(slots) else k_cache.new_zeros(
            (0, *k_cache.shape[2:]))
        values = torch.stack([v_cache[slot_index(j)] for j in slots]) if len(slots) else v_cache.new_zeros(
            (0, *v_cache.shape[2:]))
        slopes = options.get("alibi_slopes")
        kw = dict(options, alibi_slopes=slopes[b] if slopes is not None and slopes.dim() == 2 else slopes)
        out, lse = attention_ref(qb.unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0), window_left=window_left,
                                 window_right=window_right, diag_offset=len(slots) - seqlen_q, **kw)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses), k_cache, v_cache

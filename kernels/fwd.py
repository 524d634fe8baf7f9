"""Triton flash attention forward (FA2 style).

One program per (query block, batch * head). The Q tile stays in registers, K/V tiles
stream through; online softmax in base 2 (log2(e) folded into the score scale), the
1/rowsum normalisation deferred to the end. Key blocks outside the causal / sliding
window band are never visited; the element mask is applied only on the boundary blocks.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    LOG2E,
    Launcher,
    bias_args,
    device_ctx,
    dropout_state,
    dropout_keep,
    dot_precision,
    kv_block_range,
    last_unit,
    load_tile,
    pad_dim,
    page_rows,
    seq_args,
    seq_bucket,
    seq_info,
    tanh_f32,
    visible,
)


@triton.jit
def _fwd_blocks(
    acc, l_i, m_i, q, K_base, V_base, stride_kb, stride_ks, stride_vb, stride_vs,
    BlockTableRow, page_size, num_pages,
    start_n, end_n, rows, offs_n, offs_d, offs_dv,
    seqlen_q, seqlen_k, head_dim, head_dim_v,
    qk_scale2, softcap_in, softcap2, slope2, diag, left, right,
    bias_rows, stride_bn, seed, drop_rows, p_drop,
    MASK: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_BIAS: tl.constexpr, BIAS_IS_BOOL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    PAGED: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr,
):
    for n0 in range(start_n, end_n, BLOCK_N):
        cols = n0 + offs_n
        cols64 = cols.to(tl.int64)  # offsets in int64: row * stride passes 2^31 at long context
        if PAGED:
            page, slot = page_rows(cols, BlockTableRow, page_size, num_pages, seqlen_k)
            k_rows = page * stride_kb + slot * stride_ks
            v_rows = page * stride_vb + slot * stride_vs
        else:
            k_rows = cols64 * stride_ks
            v_rows = cols64 * stride_vs
        k = load_tile(K_base + k_rows[:, None] + offs_d[None, :], cols, seqlen_k, offs_d, head_dim,
                      MASK, not EVEN_D)
        v = load_tile(V_base + v_rows[:, None] + offs_dv[None, :], cols, seqlen_k, offs_dv, head_dim_v,
                      MASK, not EVEN_DV)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC)
        # s is the score in log2 units: log2(e) * (softcapped, alibi-shifted) score
        if HAS_SOFTCAP:
            s = softcap2 * tanh_f32(qk * softcap_in)
        else:
            s = qk * qk_scale2
        if HAS_ALIBI:
            s = s - slope2 * tl.abs(rows[:, None] + diag - cols[None, :]).to(tl.float32)
        if HAS_BIAS:
            # bias_rows: (BLOCK_M, 1) row pointers of this (b, h); bounds always checked
            # (interior blocks may still hold query rows past seqlen_q)
            in_bounds = (rows[:, None] < seqlen_q) & (cols[None, :] < seqlen_k)
            if BIAS_IS_BOOL:
                keep_b = tl.load(bias_rows + cols64[None, :] * stride_bn, mask=in_bounds, other=0)
                s = tl.where(keep_b != 0, s, float("-inf"))
            else:
                bias = tl.load(bias_rows + cols64[None, :] * stride_bn, mask=in_bounds, other=0.0)
                s = s + bias.to(tl.float32) * 1.4426950408889634
        if MASK:
            vis = visible(rows, cols, seqlen_q, seqlen_k, diag, left, right, HAS_LEFT, HAS_RIGHT)
            s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASK or HAS_BIAS:
            # a row may have seen no visible key yet: shift by 0, not by -inf
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if HAS_DROPOUT:
            # l_i above sums the undropped p; 1/(1-p) is applied once at the end
            keep = dropout_keep(seed, drop_rows[:, None] + cols[None, :], p_drop)
            p = tl.where(keep, p, 0.0)
        acc += tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q, K, V, Out, Lse, Alibi, Bias, CuSeqQ, CuSeqK, SeqUsedK, BlockTable,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_ab,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_tb, page_size, num_pages,
    num_heads, group, seqlen_q, seqlen_k, total_q, total_k, head_dim, head_dim_v,
    qk_scale2, softcap_in, softcap2, diag, left, right,
    Rng, p_drop, inv_keep,
    seq_key,  # autotune key only (sequence length bucket)
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_BIAS: tl.constexpr, BIAS_IS_BOOL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    VARLEN_Q: tl.constexpr, VARLEN_K: tl.constexpr, HAS_SEQUSED: tl.constexpr,
    PAGED: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # 1-D grid (no 65535 limit on batch * heads), query blocks of one head adjacent so
    # they share K/V in L2. seqlen_q / seqlen_k are the call's (max_seqlen with packed
    # sequences); the grid covers the longest sequence.
    n_mblk = (seqlen_q + BLOCK_M - 1) // BLOCK_M
    pid = tl.program_id(0)
    pid_bh = pid // n_mblk
    pid_m = pid % n_mblk
    if HAS_RIGHT:
        # causal-like: the last query blocks have the most work, schedule them first
        pid_m = n_mblk - 1 - pid_m
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    hk = h // group
    m0 = pid_m * BLOCK_M
    q_start, k_start, seqlen_q_b, seqlen_k_b, diag = seq_info(
        b, CuSeqQ, CuSeqK, SeqUsedK, seqlen_q, seqlen_k, total_q, total_k, diag,
        VARLEN_Q, VARLEN_K, HAS_SEQUSED, PAGED, BOTTOM_RIGHT)
    if VARLEN_Q:
        # the grid is sized for the longest sequence: nothing to do past this one's end
        if m0 >= seqlen_q_b:
            return

    seed = 0
    rng_offset = 0
    if HAS_DROPOUT:
        # [seed, offset] read from device memory when the kernel runs, not baked into the
        # launch: a CUDA graph replays launches as captured (common.dropout_state)
        seed = tl.load(Rng)
        rng_offset = tl.load(Rng + 1)
    rows = m0 + tl.arange(0, BLOCK_M)
    rows64 = rows.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    # row 0 of this sequence in q / out: packed queries have batch strides 0 (launcher)
    Q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    O_base = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    if VARLEN_Q:
        Q_base += q_start.to(tl.int64) * stride_qs
        O_base += q_start.to(tl.int64) * stride_os
        # lse (1, H, total_q): (b, h, i) at h * total_q + q_start + i
        lse_rows = h.to(tl.int64) * total_q + q_start + rows
    else:
        lse_rows = pid_bh.to(tl.int64) * seqlen_q + rows
    if PAGED:
        # keys addressed page by page (page_rows); the page stride is stride_kb
        K_base = K + hk.to(tl.int64) * stride_kh
        V_base = V + hk.to(tl.int64) * stride_vh
        BlockTableRow = BlockTable + b.to(tl.int64) * stride_tb
    else:
        K_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
        V_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
        if VARLEN_K:
            K_base += k_start.to(tl.int64) * stride_ks
            V_base += k_start.to(tl.int64) * stride_vs
        BlockTableRow = BlockTable
    q = load_tile(Q_base + rows64[:, None] * stride_qs + offs_d[None, :], rows, seqlen_q_b, offs_d, head_dim,
                  True, not EVEN_D)

    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(Alibi + b * stride_ab + h).to(tl.float32) * 1.4426950408889634
    if HAS_BIAS:
        bias_rows = (Bias + b.to(tl.int64) * stride_bb + h.to(tl.int64) * stride_bh
                     + rows64[:, None] * stride_bm)
    else:
        bias_rows = Bias
    if HAS_DROPOUT:
        # int64 Philox offset of element (i, 0): offset + lse index * seqlen_k, i.e.
        # offset + ((b*H + h)*Sq + i)*Sk dense, offset + (h*total_q + q_start + i)*Sk packed
        drop_rows = rng_offset + lse_rows * seqlen_k
    else:
        drop_rows = rows

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")

    lo, a, bb, end = kv_block_range(m0, seqlen_q_b, seqlen_k_b, diag, left, right,
                                    BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    # leading boundary (sliding window left edge; empty without one)
    if HAS_LEFT:
        acc, l_i, m_i = _fwd_blocks(
            acc, l_i, m_i, q, K_base, V_base, stride_kb, stride_ks, stride_vb, stride_vs,
            BlockTableRow, page_size, num_pages, lo, a, rows, offs_n, offs_d, offs_dv,
            seqlen_q_b, seqlen_k_b, head_dim, head_dim_v, qk_scale2, softcap_in, softcap2, slope2, diag, left, right,
            bias_rows, stride_bn, seed, drop_rows, p_drop,
            True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS, BIAS_IS_BOOL, HAS_DROPOUT, PAGED,
            EVEN_D, EVEN_DV, PREC, BLOCK_N)
    # interior: every key visible to every row, no mask
    acc, l_i, m_i = _fwd_blocks(
        acc, l_i, m_i, q, K_base, V_base, stride_kb, stride_ks, stride_vb, stride_vs,
        BlockTableRow, page_size, num_pages, a, bb, rows, offs_n, offs_d, offs_dv,
        seqlen_q_b, seqlen_k_b, head_dim, head_dim_v, qk_scale2, softcap_in, softcap2, slope2, diag, left, right,
        bias_rows, stride_bn, seed, drop_rows, p_drop,
        False, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS, BIAS_IS_BOOL, HAS_DROPOUT, PAGED,
        EVEN_D, EVEN_DV, PREC, BLOCK_N)
    # trailing boundary (diagonal / right window edge / seqlen_k tail)
    acc, l_i, m_i = _fwd_blocks(
        acc, l_i, m_i, q, K_base, V_base, stride_kb, stride_ks, stride_vb, stride_vs,
        BlockTableRow, page_size, num_pages, bb, end, rows, offs_n, offs_d, offs_dv,
        seqlen_q_b, seqlen_k_b, head_dim, head_dim_v, qk_scale2, softcap_in, softcap2, slope2, diag, left, right,
        bias_rows, stride_bn, seed, drop_rows, p_drop,
        True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS, BIAS_IS_BOOL, HAS_DROPOUT, PAGED,
        EVEN_D, EVEN_DV, PREC, BLOCK_N)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    if HAS_DROPOUT:
        out = out * inv_keep
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)

    o_ptrs = O_base + rows64[:, None] * stride_os + offs_dv[None, :]
    if EVEN_DV:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=rows[:, None] < seqlen_q_b)
    else:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty),
                 mask=(rows[:, None] < seqlen_q_b) & (offs_dv[None, :] < head_dim_v))
    tl.store(Lse + lse_rows, lse, mask=rows < seqlen_q_b)


_KEY = ["BLOCK_D", "BLOCK_DV", "HAS_LEFT", "HAS_RIGHT", "HAS_SOFTCAP", "HAS_ALIBI",
        "HAS_BIAS", "BIAS_IS_BOOL", "HAS_DROPOUT", "VARLEN_Q", "VARLEN_K", "PAGED", "seq_key"]


_launch_fwd = Launcher("fwd", _fwd_kernel, _KEY)


def score_params(scale: float, softcap: float):
    """(qk_scale2, softcap_in, softcap2): the score scalings in log2 units."""
    if softcap > 0:
        return scale * LOG2E, scale / softcap, softcap * LOG2E
    return scale * LOG2E, 0.0, 0.0


def alibi_args(alibi_slopes, q):
    """(pointer tensor, batch stride) for the slopes; q as a dummy pointer when absent."""
    if alibi_slopes is None:
        return q, 0
    slopes = alibi_slopes.contiguous()
    if slopes.dim() == 1:
        return slopes, 0
    return slopes, slopes.stride(0)


def flash_fwd(q, k, v, alibi_slopes, scale: float, softcap: float,
              window_left: int, window_right: int, diag_offset: int,
              attn_bias=None, dropout_p: float = 0.0, rng_state=None,
              cu_seqlens_q=None, cu_seqlens_k=None, seqused_k=None, block_table=None,
              max_seqlen_q: int = 0, max_seqlen_k: int = 0, bottom_right: bool = False):
    """Flash attention forward.

    Args:
        q: (B, Sq, H, D); k: (B, Sk, Hk, D); v: (B, Sk, Hk, Dv), any strides, H % Hk == 0.
        alibi_slopes: None or float32 (H,) / (B, H) (B: number of sequences).
        scale, softcap (<= 0: off), window_left / window_right (-1: unbounded),
        diag_offset: see docs/design.md, "What every backend computes".
        attn_bias: None, or a tensor of shape exactly (B, H, Sq, Sk), usually an
            ``expand()``ed view (stride 0 on broadcast dims; read through its strides).
            bool: False removes the key; float (any float dtype, normally q's): added to
            the logits after softcap and ALiBi, before the window mask. Dense calls only.
        dropout_p: probability of dropping each softmax probability (kept ones scaled by
            1/(1-p)); lse stays the undropped normaliser.
        rng_state: int64 tensor [seed, offset], on the CPU or on q's device (needed when
            dropout_p > 0; read by the kernels when they run, CUDA-graph safe); the keep
            mask is ``common.dropout_mask(rng_state, B, H, Sq, Sk, dropout_p, device)``
            (packed queries: ``dropout_mask(rng_state, 1, H, total_q, max_seqlen_k, ...)``,
            element (b, h, i, j) at [0, h, cu_seqlens_q[b] + i, j]).
        cu_seqlens_q: None, or int32 (B + 1,): packed queries, q (1, total_q, H, D),
            sequence b = rows [cu_seqlens_q[b], cu_seqlens_q[b + 1]).
        cu_seqlens_k: None, or int32 (B + 1,): packed keys, k / v (1, total_k, Hk, D), or
            with ``block_table`` only the key counts of the sequences.
        seqused_k: None, or int32 (B,): sequence b attends its first seqused_k[b] keys.
        block_table: None, or int32 (B, max_blocks): paged K/V, k / v (num_pages,
            page_size, Hk, D), any page_size; key j of sequence b is row j % page_size of
            page block_table[b, j // page_size]. Forward only.
        max_seqlen_q, max_seqlen_k: the longest sequence (grid and dropout sizes; <= 0:
            total_q / total_k, max_blocks * page_size when paged). Sequences longer are
            clamped; values of the int32 tensors are never read on the host.
        bottom_right: the diagonal of sequence b is diag_offset + its seqlen_k - seqlen_q.

    Returns:
        (out (B, Sq, H, Dv) contiguous in q's dtype, lse (B, H, Sq) float32, natural log);
        packed queries: out (1, total_q, H, Dv), lse (1, H, total_q), rows in no sequence
        left unwritten.
    """
    sa = seq_args(q, k, cu_seqlens_q, cu_seqlens_k, seqused_k, block_table, max_seqlen_q, max_seqlen_k,
                  bottom_right)
    if attn_bias is not None and (sa.flags["VARLEN_Q"] or sa.flags["VARLEN_K"] or sa.flags["PAGED"]):
        raise ValueError("attn_bias is not supported with cu_seqlens / block_table")
    batch, seqlen_q, seqlen_k = sa.batch, sa.seqlen_q, sa.seqlen_k
    num_heads, head_dim = q.shape[2], q.shape[3]
    num_heads_k = k.shape[2]
    head_dim_v = v.shape[-1]
    out = torch.empty((q.shape[0], q.shape[1], num_heads, head_dim_v), dtype=q.dtype, device=q.device)
    lse = torch.empty((q.shape[0], num_heads, q.shape[1]), dtype=torch.float32, device=q.device)
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    if seqlen_k == 0 or batch * num_heads * seqlen_q == 0:
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    q, k, v = last_unit(q), last_unit(k), last_unit(v)
    block_d, block_dv = pad_dim(head_dim), pad_dim(head_dim_v)
    qk_scale2, softcap_in, softcap2 = score_params(float(scale), float(softcap))
    slopes, stride_ab = alibi_args(alibi_slopes, q)
    bias, bias_strides, bias_bool = bias_args(attn_bias, q, (batch, num_heads, seqlen_q, seqlen_k))
    has_drop, rng, p_drop = dropout_state(dropout_p, rng_state, q.device)
    left, right = int(window_left), int(window_right)
    # packed rows are addressed from each sequence's start row: no batch strides
    q_sb = 0 if sa.flags["VARLEN_Q"] else q.stride(0)
    k_sb = 0 if sa.flags["VARLEN_K"] and not sa.flags["PAGED"] else k.stride(0)
    v_sb = 0 if sa.flags["VARLEN_K"] and not sa.flags["PAGED"] else v.stride(0)
    o_sb = 0 if sa.flags["VARLEN_Q"] else out.stride(0)
    args = (
        q, k, v, out, lse, slopes, bias, *sa.ptrs,
        q_sb, q.stride(1), q.stride(2),
        k_sb, k.stride(1), k.stride(2),
        v_sb, v.stride(1), v.stride(2),
        o_sb, out.stride(1), out.stride(2),
        stride_ab,
        *bias_strides,
        *sa.page,
        num_heads, num_heads // num_heads_k, seqlen_q, seqlen_k, sa.total_q, sa.total_k, head_dim, head_dim_v,
        qk_scale2, softcap_in, softcap2, int(diag_offset), left, right,
        rng if has_drop else lse, p_drop, 1.0 / (1.0 - p_drop) if p_drop < 1.0 else 0.0,
        seq_bucket(max(seqlen_q, seqlen_k)),
    )
    kwargs = dict(
        HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0,
        HAS_SOFTCAP=softcap > 0, HAS_ALIBI=alibi_slopes is not None,
        HAS_BIAS=attn_bias is not None, BIAS_IS_BOOL=bias_bool, HAS_DROPOUT=has_drop,
        **sa.flags,
        BLOCK_D=block_d, BLOCK_DV=block_dv,
        EVEN_D=block_d == head_dim, EVEN_DV=block_dv == head_dim_v,
        PREC=dot_precision(q.dtype),
    )
    grid = lambda meta: (triton.cdiv(seqlen_q, meta["BLOCK_M"]) * batch * num_heads,)  # noqa: E731
    with device_ctx(q):
        _launch_fwd(grid, args, kwargs, max(block_d, block_dv), q.element_size())
    return out, lse

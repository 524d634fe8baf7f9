"""Triton flash attention forward (FA2 style).

One program per (query block, batch * head). The Q tile stays in registers, K/V tiles
stream through; online softmax in base 2 (log2(e) folded into the score scale), the
1/rowsum normalisation deferred to the end. Key blocks outside the causal / sliding
window band are never visited; the element mask is applied only on the boundary blocks.

Decoding (few query rows: Sq <= 8, or num_splits > 1): ``_decode_kernel``, one program per
(sequence, KV head, block of group * Sq packed query rows, key split), so K/V tiles are
loaded once for all query heads of a KV head; with several splits each writes a partial
(O unnormalised, m, l; fp32) and ``_combine_kernel`` merges them in split order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    LOG2E,
    Launcher,
    add_bias_terms,
    bias_args,
    block_run,
    cdiv,
    clamp_len,
    device_ctx,
    dropout_keep,
    dropout_state,
    head_base,
    head_bias_terms,
    interpreting,
    key_span,
    kv_bases,
    kv_block_range,
    last_unit,
    load_rows,
    load_tile,
    next_pow2,
    pad_dim,
    page_rows,
    query_block_program,
    query_block_rows,
    scaled_scores,
    seq_args,
    seq_bucket,
    seq_info,
    tile_flags,
    visible,
    window_sides,
)


@triton.jit
def _fwd_blocks(
    acc, l_i, m_i, q, K_base, V_base, stride_kb, stride_ks, stride_vb, stride_vs,
    BlockTableRow, page_size, num_pages, k_first,
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
            page, slot = page_rows(cols, k_first, BlockTableRow, page_size, num_pages, seqlen_k)
            k_rows = page * stride_kb + slot * stride_ks
            v_rows = page * stride_vb + slot * stride_vs
        else:
            k_rows = cols64 * stride_ks
            v_rows = cols64 * stride_vs
        k = load_rows(K_base, k_rows, cols, seqlen_k, offs_d, head_dim, MASK, not EVEN_D)
        v = load_rows(V_base, v_rows, cols, seqlen_k, offs_dv, head_dim_v, MASK, not EVEN_DV)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC)
        s, _ = scaled_scores(qk, qk_scale2, softcap_in, softcap2, HAS_SOFTCAP)
        s = add_bias_terms(s, rows, cols, seqlen_q, seqlen_k, slope2, diag, bias_rows, stride_bn,
                           HAS_ALIBI, HAS_BIAS, BIAS_IS_BOOL)
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
    Q, K, V, Out, Lse, Alibi, Bias, CuSeqQ, CuSeqK, SeqUsedK, BlockTable, KvBatchIdx, LeftpadK,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_ab,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_tb, page_size, num_pages,
    num_heads, group, seqlen_q, seqlen_k, total_q, total_k, kv_batch, head_dim, head_dim_v,
    qk_scale2, softcap_in, softcap2, diag, left, right,
    Rng, p_drop, inv_keep,
    seq_key,  # autotune key only (sequence length bucket)
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_BIAS: tl.constexpr, BIAS_IS_BOOL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    VARLEN_Q: tl.constexpr, VARLEN_K: tl.constexpr, HAS_SEQUSED: tl.constexpr,
    PAGED: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
    HAS_KV_BATCH_IDX: tl.constexpr, HAS_LEFTPAD: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh, b, h, hk, m0 = query_block_program(seqlen_q, num_heads, group, BLOCK_M, HAS_RIGHT)
    q_start, k_start, seqlen_q_b, seqlen_k_b, diag, kv_row = seq_info(
        b, CuSeqQ, CuSeqK, SeqUsedK, KvBatchIdx, LeftpadK, seqlen_q, seqlen_k, total_q, total_k, kv_batch, diag,
        VARLEN_Q, VARLEN_K, HAS_SEQUSED, PAGED, BOTTOM_RIGHT, HAS_KV_BATCH_IDX, HAS_LEFTPAD)
    if VARLEN_Q:
        # the grid is sized for the longest sequence: nothing to do past this one's end
        if m0 >= seqlen_q_b:
            return

    rows, rows64, lse_rows, seed, drop_rows = query_block_rows(Rng, pid_bh, h, m0, q_start, seqlen_q, seqlen_k,
                                                                total_q, BLOCK_M, VARLEN_Q, HAS_DROPOUT)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    Q_base = head_base(Q, b, h, q_start, stride_qb, stride_qh, stride_qs, VARLEN_Q)
    O_base = head_base(Out, b, h, q_start, stride_ob, stride_oh, stride_os, VARLEN_Q)
    K_base, V_base, BlockTableRow = kv_bases(K, V, BlockTable, b, hk, kv_row, k_start, stride_kb, stride_kh, stride_ks,
                                             stride_vb, stride_vh, stride_vs, stride_tb, PAGED)
    q = load_rows(Q_base, rows64 * stride_qs, rows, seqlen_q_b, offs_d, head_dim, True, not EVEN_D)

    slope2, bias_rows = head_bias_terms(Alibi, Bias, b, h, rows64, stride_ab, stride_bb, stride_bh, stride_bm,
                                        HAS_ALIBI, HAS_BIAS)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")

    lo, a, bb, end = kv_block_range(m0, seqlen_q_b, seqlen_k_b, diag, left, right,
                                    BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    # the key blocks in three runs (unrolled): the leading boundary (sliding window left
    # edge; empty without one, then not compiled), the interior (every key visible to every
    # row: no mask), the trailing boundary (diagonal / right window edge / seqlen_k tail)
    for run in tl.static_range(3):
        if run > 0 or HAS_LEFT:
            start, stop = block_run(run, lo, a, bb, end)
            acc, l_i, m_i = _fwd_blocks(
                acc, l_i, m_i, q, K_base, V_base, stride_kb, stride_ks, stride_vb, stride_vs,
                BlockTableRow, page_size, num_pages, k_start, start, stop, rows, offs_n, offs_d, offs_dv,
                seqlen_q_b, seqlen_k_b, head_dim, head_dim_v, qk_scale2, softcap_in, softcap2, slope2,
                diag, left, right, bias_rows, stride_bn, seed, drop_rows, p_drop,
                run != 1, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS, BIAS_IS_BOOL, HAS_DROPOUT, PAGED,
                EVEN_D, EVEN_DV, PREC, BLOCK_N)

    # (A row that sees no key is 0, not acc: that may hold 0 x an infinite V that other rows see.)
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = tl.where(empty[:, None], 0.0, acc / l_safe[:, None])
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


# ----------------------------------------------------------------------------- decoding
# Split-KV decoding (flash-decoding) with GQA packing, for calls with few query rows.
# One program per (sequence b, KV head hk, block of packed query rows, key split): its
# BLOCK_M rows are the pairs (query i, head hk * group + g) of one KV head, packed as row
# r = i * group + g, so every K/V tile is loaded once for the whole group of query heads.
# With num_splits > 1 each program handles one range of key blocks and writes its partial
# result (O unnormalised, fp32; m, l in log2 units) to fp32 workspaces; _combine_kernel
# merges the splits in split order into out / lse. With one split the decode program writes
# out / lse itself.


@triton.jit
def _decode_program(seqlen_q, num_heads_k, group, num_splits, BLOCK_M: tl.constexpr):
    """(b, hk, r0, split) of this program of the decode grid: sequence b, KV head hk, the
    block of packed query rows from row r0, key split (fastest). _combine_kernel's grid is
    the same with one split."""
    n_rblk = (tl.cast(group, tl.int64) * seqlen_q + BLOCK_M - 1) // BLOCK_M  # (rows past 2**31: int64)
    pid = tl.program_id(0)
    split = pid % num_splits
    rest = pid // num_splits
    pid_r = rest % n_rblk
    rest = rest // n_rblk
    return rest // num_heads_k, rest % num_heads_k, pid_r * BLOCK_M, split


@triton.jit
def _decode_kernel(
    Q, K, V, Out, Lse, OPart, MPart, LPart, Alibi,
    CuSeqQ, CuSeqK, SeqUsedK, BlockTable, KvBatchIdx, LeftpadK,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_ab,
    stride_tb, page_size, num_pages,
    num_heads, num_heads_k, group, seqlen_q, seqlen_k, total_q, total_k, kv_batch, head_dim, head_dim_v,
    n_qrows, num_splits,
    qk_scale2, softcap_in, softcap2, diag, left, right,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    VARLEN_Q: tl.constexpr, VARLEN_K: tl.constexpr, HAS_SEQUSED: tl.constexpr,
    PAGED: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
    HAS_KV_BATCH_IDX: tl.constexpr, HAS_LEFTPAD: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b, hk, r0, split = _decode_program(seqlen_q, num_heads_k, group, num_splits, BLOCK_M)
    q_start, k_start, seqlen_q_b, seqlen_k_b, diag, kv_row = seq_info(
        b, CuSeqQ, CuSeqK, SeqUsedK, KvBatchIdx, LeftpadK, seqlen_q, seqlen_k, total_q, total_k, kv_batch, diag,
        VARLEN_Q, VARLEN_K, HAS_SEQUSED, PAGED, BOTTOM_RIGHT, HAS_KV_BATCH_IDX, HAS_LEFTPAD)
    if VARLEN_Q:
        # the grid is sized for the longest sequence: nothing to do past this one's end
        if r0 // group >= seqlen_q_b:
            return

    r = r0 + tl.arange(0, BLOCK_M)
    qi = r // group  # query position (>= seqlen_q_b on padding rows: masked)
    h = hk * group + r % group  # query head
    row_ok = qi < seqlen_q_b
    qi64 = qi.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    Q_base = Q + b.to(tl.int64) * stride_qb
    O_base = Out + b.to(tl.int64) * stride_ob
    if VARLEN_Q:
        Q_base += q_start.to(tl.int64) * stride_qs
        O_base += q_start.to(tl.int64) * stride_os
        qrow = q_start.to(tl.int64) + qi64  # row in the workspaces: q row
        lse_idx = h64 * total_q + qrow
    else:
        qrow = b.to(tl.int64) * seqlen_q + qi64
        lse_idx = (b.to(tl.int64) * num_heads + h64) * seqlen_q + qi64
    K_base, V_base, BlockTableRow = kv_bases(K, V, BlockTable, b, hk, kv_row, k_start, stride_kb, stride_kh, stride_ks,
                                             stride_vb, stride_vh, stride_vs, stride_tb, PAGED)
    q_ptrs = Q_base + qi64[:, None] * stride_qs + h64[:, None] * stride_qh + offs_d[None, :]
    q = load_tile(q_ptrs, qi, seqlen_q_b, offs_d, head_dim, True, not EVEN_D)

    slope2 = tl.zeros([BLOCK_M, 1], dtype=tl.float32)
    if HAS_ALIBI:
        slope2 = (tl.load(Alibi + b * stride_ab + h).to(tl.float32) * 1.4426950408889634)[:, None]

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")

    # key blocks of the query positions [i_first, i_last] of this row block, then this
    # split's share of them (contiguous, in order; possibly none)
    i_first = r0 // group
    i_last = tl.minimum((r0 + BLOCK_M - 1) // group, seqlen_q_b - 1)
    lo, hi = key_span(i_first, i_last, seqlen_k_b, diag, left, right, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    n_blk = (tl.maximum(hi - lo, 0) + BLOCK_N - 1) // BLOCK_N
    per = (n_blk + num_splits - 1) // num_splits
    start = lo + tl.minimum(split * per, n_blk) * BLOCK_N
    stop = lo + tl.minimum((split + 1) * per, n_blk) * BLOCK_N
    acc, l_i, m_i = _fwd_blocks(
        acc, l_i, m_i, q, K_base, V_base, stride_kb, stride_ks, stride_vb, stride_vs,
        BlockTableRow, page_size, num_pages, k_start, start, stop, qi, offs_n, offs_d, offs_dv,
        seqlen_q_b, seqlen_k_b, head_dim, head_dim_v, qk_scale2, softcap_in, softcap2, slope2, diag, left, right,
        Q, 0, 0, qi, 0.0,
        True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, False, False, False, PAGED,
        EVEN_D, EVEN_DV, PREC, BLOCK_N)

    if SPLIT:
        # workspaces (num_splits, n_qrows, H, Dv) / (num_splits, n_qrows, H), fp32
        ws = (split.to(tl.int64) * n_qrows + qrow) * num_heads + h64
        p_ptrs = OPart + ws[:, None] * head_dim_v + offs_dv[None, :]
        if EVEN_DV:
            tl.store(p_ptrs, acc, mask=row_ok[:, None])
        else:
            tl.store(p_ptrs, acc, mask=row_ok[:, None] & (offs_dv[None, :] < head_dim_v))
        tl.store(MPart + ws, m_i, mask=row_ok)
        tl.store(LPart + ws, l_i, mask=row_ok)
    else:
        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        out = tl.where(empty[:, None], 0.0, acc / l_safe[:, None])
        lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
        o_ptrs = O_base + qi64[:, None] * stride_os + h64[:, None] * stride_oh + offs_dv[None, :]
        if EVEN_DV:
            tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])
        else:
            tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < head_dim_v))
        tl.store(Lse + lse_idx, lse, mask=row_ok)


@triton.jit
def _combine_kernel(
    Out, Lse, OPart, MPart, LPart, CuSeqQ,
    stride_ob, stride_os, stride_oh,
    num_heads, num_heads_k, group, seqlen_q, total_q, head_dim_v, n_qrows, num_splits,
    VARLEN_Q: tl.constexpr, EVEN_DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Merge the key splits of _decode_kernel, in split order, into out / lse."""
    b, hk, r0, _ = _decode_program(seqlen_q, num_heads_k, group, 1, BLOCK_M)
    q_start = b * 0
    seqlen_q_b = seqlen_q
    if VARLEN_Q:
        # the same clamps as seq_info (the decode programs wrote exactly these rows)
        q_start = clamp_len(tl.load(CuSeqQ + b), total_q)
        seqlen_q_b = clamp_len(clamp_len(tl.load(CuSeqQ + b + 1), total_q) - q_start, seqlen_q)
        if r0 // group >= seqlen_q_b:
            return
    r = r0 + tl.arange(0, BLOCK_M)
    qi = r // group
    h = hk * group + r % group
    row_ok = qi < seqlen_q_b
    qi64 = qi.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_dv = tl.arange(0, BLOCK_DV)
    O_base = Out + b.to(tl.int64) * stride_ob
    if VARLEN_Q:
        O_base += q_start.to(tl.int64) * stride_os
        qrow = q_start.to(tl.int64) + qi64
        lse_idx = h64 * total_q + qrow
    else:
        qrow = b.to(tl.int64) * seqlen_q + qi64
        lse_idx = (b.to(tl.int64) * num_heads + h64) * seqlen_q + qi64
    if EVEN_DV:
        dmask = row_ok[:, None]
    else:
        dmask = row_ok[:, None] & (offs_dv[None, :] < head_dim_v)

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    for s in range(0, num_splits):
        ws = (tl.cast(s, tl.int64) * n_qrows + qrow) * num_heads + h64
        m_s = tl.load(MPart + ws, mask=row_ok, other=float("-inf"))
        l_s = tl.load(LPart + ws, mask=row_ok, other=0.0)
        o_s = tl.load(OPart + ws[:, None] * head_dim_v + offs_dv[None, :], mask=dmask, other=0.0)
        m_new = tl.maximum(m_i, m_s)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        w = tl.exp2(m_s - m_use)
        l_i = l_i * alpha + l_s * w
        acc = acc * alpha[:, None] + o_s * w[:, None]
        m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = tl.where(empty[:, None], 0.0, acc / l_safe[:, None])
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    o_ptrs = O_base + qi64[:, None] * stride_os + h64[:, None] * stride_oh + offs_dv[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=dmask)
    tl.store(Lse + lse_idx, lse, mask=row_ok)


DECODE_MAX_SEQLEN_Q = 8  # GQA-packed decode kernel by default for Sq up to this
_NUM_SMS: dict = {}


def _num_sms(device) -> int:
    """Streaming multiprocessors of ``device`` (a fixed 132, an H100's, under the interpreter
    so the heuristic depends on shapes only)."""
    if interpreting() or device.type != "cuda":
        return 132
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _NUM_SMS:
        _NUM_SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _NUM_SMS[idx]


def decode_blocks(rows: int, block_d: int, elem_bytes: int) -> tuple:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the decode kernel for ``rows`` packed
    query rows (group * Sq) per KV head. BLOCK_M >= 16 (tl.dot)."""
    if interpreting():
        return min(max(16, next_pow2(rows)), 32), 16, 4, 1
    bm = min(max(16, next_pow2(rows)), 64)
    # from ptxas on sm90 and sm86 (python -m kernels.compile_check --spills decode): fp32
    # (IEEE dot) spills from 32 rows at D 128, so 16 rows; 16-bit: spill-free on sm90 and
    # within 99 KB of shared memory (sm86 / sm89 / sm120: no autotuning here) -- 3 stages
    # of a dense cache at 64 rows x D 128 take 112 KB, hence 2 stages and 8 warps from 32 rows
    if elem_bytes >= 4:
        return 16, 32 if block_d <= 128 else 16, 8, 2
    if block_d <= 64:
        return bm, 64, 4, 3
    if block_d <= 128:
        return (bm, 64, 4, 3) if bm <= 16 else (bm, 64, 8, 2)
    return bm, 32, 8 if bm >= 64 else 4, 2


def num_splits_heuristic(programs: int, key_blocks: int, sms: int) -> int:
    """Key splits for ``programs`` decode programs over ``key_blocks`` key blocks (both from
    shapes: the call's max_seqlen_k) on ``sms`` multiprocessors: none when the programs
    already fill most of the GPU or the keys are short (< 4 blocks), else enough splits to
    fill one wave, each split keeping at least 2 key blocks, at most 64."""
    if programs * 5 >= sms * 4 or key_blocks < 4:
        return 1
    return max(1, min(cdiv(sms, programs), key_blocks // 2, 64))


_KEY = ["BLOCK_D", "BLOCK_DV", "HAS_LEFT", "HAS_RIGHT", "HAS_SOFTCAP", "HAS_ALIBI",
        "HAS_BIAS", "BIAS_IS_BOOL", "HAS_DROPOUT", "VARLEN_Q", "VARLEN_K", "PAGED", "HAS_KV_BATCH_IDX",
        "HAS_LEFTPAD", "seq_key"]


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
              max_seqlen_q: int = 0, max_seqlen_k: int = 0, bottom_right: bool = False,
              kv_batch_idx=None, leftpad_k=None, num_splits: int = 0):
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
        kv_batch_idx: None, or int32 (B,): KV cache rows, sequence b reads batch row
            kv_batch_idx[b] (clamped to [0, B_cache - 1]) of a dense k / v (B_cache, S_cache,
            Hk, D). Not with block_table / cu_seqlens_k. Forward only.
        leftpad_k: None, or int32 (B,): the first leftpad_k[b] key slots of sequence b are
            not its keys (its keys are slots [leftpad, seqlen_k_b); paged: slot s is row
            s % page_size of page block_table[b, s // page_size]); positions (bottom_right
            diagonal, ALiBi) count from its first real key. Forward only.
        num_splits: key splits per query block (flash-decoding, ``_decode_kernel`` +
            ``_combine_kernel``): 0 = heuristic (``num_splits_heuristic``; the split-KV
            decode kernel for Sq <= 8), 1 = none, n = exactly n (capped by the number of
            key blocks of max_seqlen_k). Calls with attn_bias or dropout always take the
            one-pass kernel. Results equal within rounding for every value.

    Returns:
        (out (B, Sq, H, Dv) contiguous in q's dtype, lse (B, H, Sq) float32, natural log);
        packed queries: out (1, total_q, H, Dv), lse (1, H, total_q), rows in no sequence
        out 0, lse -inf.
    """
    sa = seq_args(q, k, cu_seqlens_q, cu_seqlens_k, seqused_k, block_table, max_seqlen_q, max_seqlen_k,
                  bottom_right, kv_batch_idx, leftpad_k)
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
    if seqlen_k == 0 or batch * num_heads * seqlen_q == 0 or cu_seqlens_q is not None:
        # (packed queries: rows in no sequence are never written, and are defined as out 0,
        # lse -inf, as on every backend)
        out.zero_()
        lse.fill_(float("-inf"))
        if cu_seqlens_q is None:
            return out, lse
    q, k, v = last_unit(q), last_unit(k), last_unit(v)
    block_d, block_dv = pad_dim(head_dim), pad_dim(head_dim_v)
    qk_scale2, softcap_in, softcap2 = score_params(float(scale), float(softcap))
    slopes, stride_ab = alibi_args(alibi_slopes, q)
    bias, bias_strides, bias_bool = bias_args(attn_bias, q, (batch, num_heads, seqlen_q, seqlen_k))
    has_drop, rng, p_drop = dropout_state(dropout_p, rng_state, q.device)
    left, right = window_sides(window_left, window_right, q, k, diag_offset, block_table)
    num_splits = int(num_splits)
    if attn_bias is None and not has_drop and (num_splits > 1 or seqlen_q <= DECODE_MAX_SEQLEN_Q):
        _launch_decode(q, k, v, out, lse, sa, slopes, stride_ab, num_heads, num_heads_k, head_dim, head_dim_v,
                       block_d, block_dv, qk_scale2, softcap_in, softcap2, int(diag_offset), left, right,
                       softcap > 0, alibi_slopes is not None, num_splits)
        return out, lse
    # packed rows are addressed from each sequence's start row: no batch strides
    q_sb = 0 if sa.flags["VARLEN_Q"] else q.stride(0)
    k_sb = 0 if sa.flags["VARLEN_K"] and not sa.flags["PAGED"] else k.stride(0)
    v_sb = 0 if sa.flags["VARLEN_K"] and not sa.flags["PAGED"] else v.stride(0)
    o_sb = 0 if sa.flags["VARLEN_Q"] else out.stride(0)
    args = (
        q, k, v, out, lse, slopes, bias, *sa.ptrs, *sa.cache_ptrs,
        q_sb, q.stride(1), q.stride(2),
        k_sb, k.stride(1), k.stride(2),
        v_sb, v.stride(1), v.stride(2),
        o_sb, out.stride(1), out.stride(2),
        stride_ab,
        *bias_strides,
        *sa.page,
        num_heads, num_heads // num_heads_k, seqlen_q, seqlen_k, sa.total_q, sa.total_k, sa.kv_batch,
        head_dim, head_dim_v,
        qk_scale2, softcap_in, softcap2, int(diag_offset), left, right,
        rng if has_drop else lse, p_drop, 1.0 / (1.0 - p_drop) if p_drop < 1.0 else 0.0,
        seq_bucket(max(seqlen_q, seqlen_k)),
    )
    kwargs = dict(
        HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0,
        HAS_SOFTCAP=softcap > 0, HAS_ALIBI=alibi_slopes is not None,
        HAS_BIAS=attn_bias is not None, BIAS_IS_BOOL=bias_bool, HAS_DROPOUT=has_drop,
        **sa.flags, **sa.cache_flags, **tile_flags(q, block_d, block_dv, head_dim, head_dim_v),
    )
    grid = lambda meta: (cdiv(seqlen_q, meta["BLOCK_M"]) * batch * num_heads,)  # noqa: E731
    with device_ctx(q):
        _launch_fwd(grid, args, kwargs, max(block_d, block_dv), q.element_size())
    return out, lse


def _launch_decode(q, k, v, out, lse, sa, slopes, stride_ab, num_heads, num_heads_k, head_dim, head_dim_v,
                   block_d, block_dv, qk_scale2, softcap_in, softcap2, diag, left, right, has_softcap, has_alibi,
                   num_splits):
    """The split-KV, GQA-packed decode kernel (+ the combine kernel with several splits).
    Grid and split count from shapes only (sa: the call's lengths, never tensor values)."""
    batch, seqlen_q, seqlen_k = sa.batch, sa.seqlen_q, sa.seqlen_k
    group = num_heads // num_heads_k
    bm, bn, warps, stages = decode_blocks(group * seqlen_q, max(block_d, block_dv), q.element_size())
    n_rblk = cdiv(group * seqlen_q, bm)
    programs = batch * num_heads_k * n_rblk
    key_blocks = cdiv(seqlen_k, bn)
    if num_splits <= 0:
        num_splits = num_splits_heuristic(programs, key_blocks, _num_sms(q.device))
    num_splits = max(1, min(num_splits, key_blocks))
    split = num_splits > 1
    n_qrows = sa.total_q if sa.flags["VARLEN_Q"] else batch * seqlen_q
    if split:
        o_part = torch.empty((num_splits, n_qrows, num_heads, head_dim_v), dtype=torch.float32, device=q.device)
        m_part = torch.empty((num_splits, n_qrows, num_heads), dtype=torch.float32, device=q.device)
        l_part = torch.empty((num_splits, n_qrows, num_heads), dtype=torch.float32, device=q.device)
    else:
        o_part = m_part = l_part = lse  # dummies
    varlen_q = sa.flags["VARLEN_Q"]
    varlen_k_rows = sa.flags["VARLEN_K"] and not sa.flags["PAGED"]
    args = (
        q, k, v, out, lse, o_part, m_part, l_part, slopes, *sa.ptrs, *sa.cache_ptrs,
        0 if varlen_q else q.stride(0), q.stride(1), q.stride(2),
        0 if varlen_k_rows else k.stride(0), k.stride(1), k.stride(2),
        0 if varlen_k_rows else v.stride(0), v.stride(1), v.stride(2),
        0 if varlen_q else out.stride(0), out.stride(1), out.stride(2),
        stride_ab,
        *sa.page,
        num_heads, num_heads_k, group, seqlen_q, seqlen_k, sa.total_q, sa.total_k, sa.kv_batch, head_dim, head_dim_v,
        n_qrows, num_splits,
        qk_scale2, softcap_in, softcap2, diag, left, right,
    )
    meta = dict(
        HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0, HAS_SOFTCAP=has_softcap, HAS_ALIBI=has_alibi,
        **sa.flags, **sa.cache_flags, SPLIT=split,
        **tile_flags(q, block_d, block_dv, head_dim, head_dim_v), BLOCK_M=bm, BLOCK_N=bn,
    )
    launch = {} if interpreting() else dict(num_warps=warps, num_stages=stages)
    with device_ctx(q):
        _decode_kernel[(programs * num_splits,)](*args, **meta, **launch)
        if split:
            _combine_kernel[(programs,)](
                out, lse, o_part, m_part, l_part, sa.ptrs[0],
                0 if varlen_q else out.stride(0), out.stride(1), out.stride(2),
                num_heads, num_heads_k, group, seqlen_q, sa.total_q, head_dim_v, n_qrows, num_splits,
                VARLEN_Q=varlen_q, EVEN_DV=block_dv == head_dim_v, BLOCK_DV=block_dv, BLOCK_M=bm,
                **({} if interpreting() else dict(num_warps=4, num_stages=1)))

"""Triton flash attention backward (FA2 style), recomputing P from the saved lse.

Three kernels:
  * ``_delta_kernel``: delta_i = sum_d dout_id * out_id (float32, (B, H, Sq)).
  * ``_dkdv_kernel``: one program per (key block, batch * kv head). K/V tiles stay in
    registers, Q/dO blocks stream through, and the loop also runs over the query heads of
    the GQA group, so dK/dV are reduced over the group in registers (no atomics).
  * ``_dq_kernel``: one program per (query block, batch * head), K/V streaming.
Both passes visit only the blocks inside the causal / window band and mask only the
boundary blocks. No atomics anywhere: the backward is always deterministic, so the
``deterministic`` flag needs no separate path.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    Launcher,
    add_bias_terms,
    bias_args,
    bias_log2,
    block_run,
    cdiv,
    device_ctx,
    dropout_keep,
    dropout_seed,
    dropout_state,
    head_base,
    head_bias_terms,
    kv_block_range,
    last_unit,
    load_rows,
    load_tile,
    pad_dim,
    q_block_range,
    query_block_program,
    query_block_rows,
    scaled_scores,
    seq_args,
    seq_bucket,
    seq_info,
    tile_flags,
    visible,
    visible_t,
    window_sides,
)
from .fwd import alibi_args, score_params


@triton.jit
def _delta_kernel(
    Out, DO, Delta,
    stride_ob, stride_os, stride_oh,
    stride_db, stride_ds, stride_dh,
    num_heads, seqlen_q, head_dim_v,
    BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh, b, h, _, m0 = query_block_program(seqlen_q, num_heads, 1, BLOCK_M, False)
    rows = m0 + tl.arange(0, BLOCK_M)
    rows64 = rows.to(tl.int64)  # offsets in int64: row * stride passes 2^31 at long context
    offs_dv = tl.arange(0, BLOCK_DV)
    o = load_tile(Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
                  + rows64[:, None] * stride_os + offs_dv[None, :], rows, seqlen_q, offs_dv, head_dim_v, True, True)
    do = load_tile(DO + b.to(tl.int64) * stride_db + h.to(tl.int64) * stride_dh
                   + rows64[:, None] * stride_ds + offs_dv[None, :], rows, seqlen_q, offs_dv, head_dim_v, True, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + pid_bh.to(tl.int64) * seqlen_q + rows, delta, mask=rows < seqlen_q)


@triton.jit
def _dkdv_blocks(
    dk, dv, k, v, Q_base, DO_base, Lse_base, Delta_base, stride_qs, stride_dos,
    start_m, end_m, cols, offs_m, offs_d, offs_dv,
    seqlen_q, seqlen_k, head_dim, head_dim_v,
    qk_scale2, softcap_in, softcap2, slope2, diag, left, right,
    Bias_base, stride_bm, stride_bn, seed, drop_base, seqlen_k_max, p_drop, inv_keep,
    MASK: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_BIAS: tl.constexpr, BIAS_IS_BOOL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
):
    for m0 in range(start_m, end_m, BLOCK_M):
        rows = m0 + offs_m
        rows64 = rows.to(tl.int64)
        q = load_rows(Q_base, rows64 * stride_qs, rows, seqlen_q, offs_d, head_dim, MASK, not EVEN_D)
        do = load_rows(DO_base, rows64 * stride_dos, rows, seqlen_q, offs_dv, head_dim_v, MASK, not EVEN_DV)
        if MASK or HAS_BIAS:
            # (a bias / bool mask can empty a row inside an interior block too)
            lse = tl.load(Lse_base + rows, mask=rows < seqlen_q, other=0.0)
            delta = tl.load(Delta_base + rows, mask=rows < seqlen_q, other=0.0)
            # rows with no visible key have lse = -inf; their p is masked to 0 below
            lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
        else:
            lse2 = tl.load(Lse_base + rows) * 1.4426950408889634
            delta = tl.load(Delta_base + rows)
        # transposed scores: (BLOCK_N keys, BLOCK_M queries)
        qkT = tl.dot(k, tl.trans(q), input_precision=PREC)
        sT, tT = scaled_scores(qkT, qk_scale2, softcap_in, softcap2, HAS_SOFTCAP)
        if HAS_ALIBI:
            sT = sT - slope2 * tl.abs(rows[None, :] + diag - cols[:, None]).to(tl.float32)
        if HAS_BIAS:
            in_bounds = (rows[None, :] < seqlen_q) & (cols[:, None] < seqlen_k)
            b_ptrs = Bias_base + rows64[None, :] * stride_bm + cols.to(tl.int64)[:, None] * stride_bn
            if BIAS_IS_BOOL:
                keep_b = tl.load(b_ptrs, mask=in_bounds, other=0)
                sT = tl.where(keep_b != 0, sT, float("-inf"))
            else:
                sT = sT + bias_log2(tl.load(b_ptrs, mask=in_bounds, other=0.0))
        pT = tl.exp2(sT - lse2[None, :])
        if MASK:
            visT = visible_t(rows, cols, seqlen_q, seqlen_k, diag, left, right, HAS_LEFT, HAS_RIGHT)
            pT = tl.where(visT, pT, 0.0)
        if HAS_DROPOUT:
            # same offsets as the forward: offset + (lse index of row i)*Sk + j, transposed
            # (Sk: the call's seqlen_k, max_seqlen_k with packed sequences)
            keepT = dropout_keep(seed, drop_base + rows64[None, :] * seqlen_k_max + cols[:, None], p_drop)
            dv += tl.dot(tl.where(keepT, pT, 0.0).to(do.dtype), do, input_precision=PREC)  # * inv_keep at the end
        else:
            dv += tl.dot(pT.to(do.dtype), do, input_precision=PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
        if HAS_DROPOUT:
            dpT = tl.where(keepT, dpT * inv_keep, 0.0)
        dsT = pT * (dpT - delta[None, :])
        if MASK or HAS_BIAS:
            # dS 0 where P is 0 (a key the row does not see; every key of a row that sees
            # none, or past the last row), not 0 x the dP of an infinite V. (Tested on P, not
            # on an empty-row vector: that one kept more registers live and spilled.)
            dsT = tl.where(pT == 0.0, 0.0, dsT)
        if HAS_SOFTCAP:
            dsT = dsT * (1.0 - tT * tT)
        dk += tl.dot(dsT.to(q.dtype), q, input_precision=PREC)
    return dk, dv


@triton.jit
def _dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV, Alibi, Bias, CuSeqQ, CuSeqK, SeqUsedK,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dkb, stride_dks, stride_dkh,
    stride_dvb, stride_dvs, stride_dvh,
    stride_ab,
    stride_bb, stride_bh, stride_bm, stride_bn,
    num_heads, num_heads_k, group, nsplit, seqlen_q, seqlen_k, total_q, total_k, head_dim, head_dim_v,
    scale, qk_scale2, softcap_in, softcap2, diag, left, right,
    Rng, p_drop, inv_keep,
    seq_key,  # autotune key only
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_BIAS: tl.constexpr, BIAS_IS_BOOL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    VARLEN_Q: tl.constexpr, VARLEN_K: tl.constexpr, HAS_SEQUSED: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # program axis 1 = (batch, kv head, split): each program reduces group // nsplit query
    # heads; with nsplit > 1 DK/DV are (B, Sk, Hk * nsplit, D) partial sums. seqlen_q /
    # seqlen_k are the call's (max_seqlen with packed sequences).
    n_nblk = (seqlen_k + BLOCK_N - 1) // BLOCK_N
    pid = tl.program_id(0)
    pid_bhk = pid // n_nblk
    pid_n = pid % n_nblk
    b = pid_bhk // (num_heads_k * nsplit)
    hs = pid_bhk % (num_heads_k * nsplit)
    hk = hs // nsplit
    split = hs % nsplit
    heads_per_prog = group // nsplit
    n0 = pid_n * BLOCK_N
    # (no KV-cache rows / left padding in the backward: those arguments are dummies)
    q_start, k_start, seqlen_q_b, seqlen_k_b, diag, _ = seq_info(
        b, CuSeqQ, CuSeqK, SeqUsedK, CuSeqK, CuSeqK, seqlen_q, seqlen_k, total_q, total_k, 1, diag,
        VARLEN_Q, VARLEN_K, HAS_SEQUSED, False, BOTTOM_RIGHT, False, False)
    if VARLEN_K or HAS_SEQUSED:
        # the grid is sized for the longest sequence: nothing to do past this one's keys
        # (their dK / dV rows were zeroed by the launcher)
        if n0 >= seqlen_k_b:
            return
    seed, rng_offset = dropout_seed(Rng, HAS_DROPOUT)
    cols = n0 + tl.arange(0, BLOCK_N)
    cols64 = cols.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    K_base = head_base(K, b, hk, k_start, stride_kb, stride_kh, stride_ks, VARLEN_K)
    V_base = head_base(V, b, hk, k_start, stride_vb, stride_vh, stride_vs, VARLEN_K)
    k = load_rows(K_base, cols64 * stride_ks, cols, seqlen_k_b, offs_d, head_dim, True, not EVEN_D)
    v = load_rows(V_base, cols64 * stride_vs, cols, seqlen_k_b, offs_dv, head_dim_v, True, not EVEN_DV)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    lo, a, bb, end = q_block_range(n0, seqlen_q_b, seqlen_k_b, diag, left, right,
                                   BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    for g in range(0, heads_per_prog):
        h = hk * group + split * heads_per_prog + g
        Q_base = head_base(Q, b, h, q_start, stride_qb, stride_qh, stride_qs, VARLEN_Q)
        DO_base = head_base(DO, b, h, q_start, stride_dob, stride_doh, stride_dos, VARLEN_Q)
        # index in lse / delta of (b, h, row 0): (1, H, total_q) with packed queries
        if VARLEN_Q:
            row0 = h.to(tl.int64) * total_q + q_start
        else:
            row0 = (b * num_heads + h).to(tl.int64) * seqlen_q
        Lse_base = Lse + row0
        Delta_base = Delta + row0
        slope2 = 0.0
        if HAS_ALIBI:
            slope2 = tl.load(Alibi + b * stride_ab + h).to(tl.float32) * 1.4426950408889634
        if HAS_BIAS:
            Bias_base = Bias + b.to(tl.int64) * stride_bb + h.to(tl.int64) * stride_bh
        else:
            Bias_base = Bias
        if HAS_DROPOUT:
            drop_base = rng_offset + row0 * seqlen_k
        else:
            drop_base = row0
        # the query blocks in three runs (unrolled): the boundary ones, first and last,
        # need the element mask, the interior ones do not
        for run in tl.static_range(3):
            start, stop = block_run(run, lo, a, bb, end)
            dk, dv = _dkdv_blocks(
                dk, dv, k, v, Q_base, DO_base, Lse_base, Delta_base, stride_qs, stride_dos,
                start, stop, cols, offs_m, offs_d, offs_dv, seqlen_q_b, seqlen_k_b, head_dim, head_dim_v,
                qk_scale2, softcap_in, softcap2, slope2, diag, left, right,
                Bias_base, stride_bm, stride_bn, seed, drop_base, seqlen_k, p_drop, inv_keep,
                run != 1, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS, BIAS_IS_BOOL, HAS_DROPOUT,
                EVEN_D, EVEN_DV, PREC, BLOCK_M)

    dk = dk * scale
    if HAS_DROPOUT:
        dv = dv * inv_keep
    DK_base = head_base(DK, b, hs, k_start, stride_dkb, stride_dkh, stride_dks, VARLEN_K)
    DV_base = head_base(DV, b, hs, k_start, stride_dvb, stride_dvh, stride_dvs, VARLEN_K)
    dk_ptrs = DK_base + cols64[:, None] * stride_dks + offs_d[None, :]
    dv_ptrs = DV_base + cols64[:, None] * stride_dvs + offs_dv[None, :]
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=(cols[:, None] < seqlen_k_b) & (offs_d[None, :] < head_dim))
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=(cols[:, None] < seqlen_k_b) & (offs_dv[None, :] < head_dim_v))


@triton.jit
def _dq_blocks(
    dq, q, do, lse2, delta, K_base, V_base, stride_ks, stride_vs,
    start_n, end_n, rows, offs_n, offs_d, offs_dv,
    seqlen_q, seqlen_k, head_dim, head_dim_v,
    qk_scale2, softcap_in, softcap2, slope2, diag, left, right,
    bias_rows, stride_bn, db_rows, seed, drop_rows, p_drop, inv_keep,
    MASK: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_BIAS: tl.constexpr, BIAS_IS_BOOL: tl.constexpr, HAS_DROPOUT: tl.constexpr, BIAS_GRAD: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr,
):
    for n0 in range(start_n, end_n, BLOCK_N):
        cols = n0 + offs_n
        k = load_rows(K_base, cols.to(tl.int64) * stride_ks, cols, seqlen_k, offs_d, head_dim, MASK, not EVEN_D)
        v = load_rows(V_base, cols.to(tl.int64) * stride_vs, cols, seqlen_k, offs_dv, head_dim_v, MASK, not EVEN_DV)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC)
        s, t = scaled_scores(qk, qk_scale2, softcap_in, softcap2, HAS_SOFTCAP)
        s = add_bias_terms(s, rows, cols, seqlen_q, seqlen_k, slope2, diag, bias_rows, stride_bn,
                           HAS_ALIBI, HAS_BIAS, BIAS_IS_BOOL)
        p = tl.exp2(s - lse2[:, None])
        if MASK:
            vis = visible(rows, cols, seqlen_q, seqlen_k, diag, left, right, HAS_LEFT, HAS_RIGHT)
            p = tl.where(vis, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, drop_rows[:, None] + cols[None, :], p_drop)
            dp = tl.where(keep, dp * inv_keep, 0.0)
        ds = p * (dp - delta[:, None])
        if BIAS_GRAD:
            # the bias gradient is 0 where P is 0, not 0 x an infinite dP (dq of a row that
            # sees no key is zeroed once, at the end)
            ds = tl.where(p == 0.0, 0.0, ds)
            # dL/d(final logit), before the softcap derivative; 0 where not visible
            tl.store(db_rows + cols[None, :], ds, mask=(rows[:, None] < seqlen_q) & (cols[None, :] < seqlen_k))
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    return dq


@triton.jit
def _dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ, Alibi, Bias, DBias, CuSeqQ, CuSeqK, SeqUsedK,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dqb, stride_dqs, stride_dqh,
    stride_ab,
    stride_bb, stride_bh, stride_bm, stride_bn,
    num_heads, group, seqlen_q, seqlen_k, total_q, total_k, head_dim, head_dim_v,
    scale, qk_scale2, softcap_in, softcap2, diag, left, right,
    Rng, p_drop, inv_keep,
    seq_key,  # autotune key only
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_BIAS: tl.constexpr, BIAS_IS_BOOL: tl.constexpr, HAS_DROPOUT: tl.constexpr, BIAS_GRAD: tl.constexpr,
    VARLEN_Q: tl.constexpr, VARLEN_K: tl.constexpr, HAS_SEQUSED: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh, b, h, hk, m0 = query_block_program(seqlen_q, num_heads, group, BLOCK_M, HAS_RIGHT)
    # seqlen_q / seqlen_k are the call's (max_seqlen with packed sequences)
    # (no KV-cache rows / left padding in the backward: those arguments are dummies)
    q_start, k_start, seqlen_q_b, seqlen_k_b, diag, _ = seq_info(
        b, CuSeqQ, CuSeqK, SeqUsedK, CuSeqK, CuSeqK, seqlen_q, seqlen_k, total_q, total_k, 1, diag,
        VARLEN_Q, VARLEN_K, HAS_SEQUSED, False, BOTTOM_RIGHT, False, False)
    if VARLEN_Q:
        # the grid is sized for the longest sequence: nothing to do past this one's end
        # (those dQ rows were zeroed by the launcher)
        if m0 >= seqlen_q_b:
            return
    rows, rows64, lse_rows, seed, drop_rows = query_block_rows(Rng, pid_bh, h, m0, q_start, seqlen_q, seqlen_k,
                                                                total_q, BLOCK_M, VARLEN_Q, HAS_DROPOUT)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    Q_base = head_base(Q, b, h, q_start, stride_qb, stride_qh, stride_qs, VARLEN_Q)
    DO_base = head_base(DO, b, h, q_start, stride_dob, stride_doh, stride_dos, VARLEN_Q)
    DQ_base = head_base(DQ, b, h, q_start, stride_dqb, stride_dqh, stride_dqs, VARLEN_Q)
    q = load_rows(Q_base, rows64 * stride_qs, rows, seqlen_q_b, offs_d, head_dim, True, not EVEN_D)
    do = load_rows(DO_base, rows64 * stride_dos, rows, seqlen_q_b, offs_dv, head_dim_v, True, not EVEN_DV)
    lse = tl.load(Lse + lse_rows, mask=rows < seqlen_q_b, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
    delta = tl.load(Delta + lse_rows, mask=rows < seqlen_q_b, other=0.0)
    slope2, bias_rows = head_bias_terms(Alibi, Bias, b, h, rows64, stride_ab, stride_bb, stride_bh, stride_bm,
                                        HAS_ALIBI, HAS_BIAS)
    if BIAS_GRAD:
        # DBias: float32 (B, H, Sq, Sk) contiguous
        db_rows = DBias + (lse_rows * seqlen_k)[:, None]
    else:
        db_rows = DBias

    K_base = head_base(K, b, hk, k_start, stride_kb, stride_kh, stride_ks, VARLEN_K)
    V_base = head_base(V, b, hk, k_start, stride_vb, stride_vh, stride_vs, VARLEN_K)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, a, bb, end = kv_block_range(m0, seqlen_q_b, seqlen_k_b, diag, left, right,
                                    BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    # the key blocks in three runs (unrolled): the boundary ones, first and last, need
    # the element mask, the interior ones do not
    for run in tl.static_range(3):
        start, stop = block_run(run, lo, a, bb, end)
        dq = _dq_blocks(dq, q, do, lse2, delta, K_base, V_base, stride_ks, stride_vs,
                        start, stop, rows, offs_n, offs_d, offs_dv, seqlen_q_b, seqlen_k_b, head_dim, head_dim_v,
                        qk_scale2, softcap_in, softcap2, slope2, diag, left, right,
                        bias_rows, stride_bn, db_rows, seed, drop_rows, p_drop, inv_keep,
                        run != 1, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS, BIAS_IS_BOOL, HAS_DROPOUT,
                        BIAS_GRAD, EVEN_D, EVEN_DV, PREC, BLOCK_N)
    # A row that sees no key gets dq 0 (its p is 0, but 0 x the dp of an infinite V is NaN).
    dq = tl.where((lse == float("-inf"))[:, None], 0.0, dq * scale)
    dq_ptrs = DQ_base + rows64[:, None] * stride_dqs + offs_d[None, :]
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=(rows[:, None] < seqlen_q_b) & (offs_d[None, :] < head_dim))


_KEY = ["BLOCK_D", "BLOCK_DV", "HAS_LEFT", "HAS_RIGHT", "HAS_SOFTCAP", "HAS_ALIBI",
        "HAS_BIAS", "BIAS_IS_BOOL", "HAS_DROPOUT", "VARLEN_Q", "VARLEN_K", "seq_key"]
_launch_dkdv = Launcher("dkdv", _dkdv_kernel, _KEY)
_launch_dq = Launcher("dq", _dq_kernel, _KEY + ["BIAS_GRAD"])
_DELTA_BLOCK_M = 64

# Force the GQA split of the dK/dV pass (tests); None: choose from the GPU's SM count.
DKDV_SPLIT: int | None = None


def _dkdv_split(batch: int, num_heads_k: int, group: int, seqlen_k: int, device: torch.device) -> int:
    """How many programs share one kv head's GQA group in the dK/dV pass.

    One program per (key block, kv head) reduces the whole group in registers; with few
    kv heads (MQA) that leaves most SMs idle, so the group is split and the partial
    sums reduced afterwards (deterministically, by torch.sum).
    """
    if DKDV_SPLIT is not None:
        assert group % DKDV_SPLIT == 0
        return DKDV_SPLIT
    if group == 1 or device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    progs = batch * num_heads_k * cdiv(seqlen_k, 64)
    n = 1
    while progs * n < 2 * sms and n < group:
        n = next(c for c in range(n + 1, group + 1) if group % c == 0)
    return n


def flash_bwd(dout, q, k, v, out, lse, alibi_slopes, scale: float, softcap: float,
              window_left: int, window_right: int, diag_offset: int, deterministic: bool = False,
              attn_bias=None, dropout_p: float = 0.0, rng_state=None, bias_requires_grad: bool = False,
              cu_seqlens_q=None, cu_seqlens_k=None, seqused_k=None, block_table=None,
              max_seqlen_q: int = 0, max_seqlen_k: int = 0, bottom_right: bool = False,
              kv_batch_idx=None, leftpad_k=None, num_splits: int = 0):
    """Flash attention backward.

    Args:
        dout, out: (B, Sq, H, Dv); q: (B, Sq, H, D); k: (B, Sk, Hk, D); v: (B, Sk, Hk, Dv);
        lse: (B, H, Sq) float32 from ``flash_fwd``; the rest as in ``flash_fwd``.
        deterministic: accepted for the API; this backward never uses atomics and is
            always deterministic.
        attn_bias, dropout_p, rng_state: exactly as given to ``flash_fwd`` (the same
            rng_state regenerates the same dropout mask).
        bias_requires_grad: also return the bias gradient (float bias only).
        cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, bottom_right:
            as given to ``flash_fwd`` (packed: dout / out (1, total_q, H, Dv), lse
            (1, H, total_q)). block_table: paged K/V has no backward (ValueError).
        kv_batch_idx, leftpad_k: KV-cache decoding is forward-only (ValueError when
            given). num_splits: accepted for the API, ignored.

    Returns:
        (dq, dk, dv, dbias): dq / dk / dv contiguous, with the shapes and dtypes of q, k, v
        (dk / dv summed over the query heads of each GQA group; 0 in rows of keys that no
        sequence attends, dq 0 in rows of no sequence); dbias is None unless
        ``bias_requires_grad``, else float32 (B, H, Sq, Sk) contiguous, the gradient of
        the final logits (before the softcap derivative; 0 where not visible). The caller
        sums it over the bias's broadcast dims.
    """
    if block_table is not None:
        raise ValueError("block_table: paged K/V is forward-only")
    for name, t in (("kv_batch_idx", kv_batch_idx), ("leftpad_k", leftpad_k)):
        if t is not None:
            raise ValueError(f"{name}: KV-cache decoding is forward-only (no backward)")
    sa = seq_args(q, k, cu_seqlens_q, cu_seqlens_k, seqused_k, None, max_seqlen_q, max_seqlen_k, bottom_right)
    varlen_q, varlen_k = sa.flags["VARLEN_Q"], sa.flags["VARLEN_K"]
    if attn_bias is not None and (varlen_q or varlen_k):
        raise ValueError("attn_bias is not supported with cu_seqlens / block_table")
    flags = {name: on for name, on in sa.flags.items() if name != "PAGED"}  # no paged backward kernels
    batch, seqlen_q, seqlen_k = sa.batch, sa.seqlen_q, sa.seqlen_k
    num_heads, head_dim = q.shape[2], q.shape[3]
    num_heads_k = k.shape[2]
    head_dim_v = v.shape[-1]
    # rows the kernels do not write (in no sequence, keys past seqused_k) must read 0
    zero_q = varlen_q
    zero_k = varlen_k or flags["HAS_SEQUSED"]
    dq = (torch.zeros if zero_q else torch.empty)(q.shape, dtype=q.dtype, device=q.device)
    dk = (torch.zeros if zero_k else torch.empty)(k.shape, dtype=k.dtype, device=k.device)
    dv = (torch.zeros if zero_k else torch.empty)(v.shape, dtype=v.dtype, device=v.device)
    bias_grad = bool(bias_requires_grad)
    if bias_grad:
        assert attn_bias is not None and attn_bias.dtype != torch.bool, \
            "bias_requires_grad needs a float attn_bias"
        # zeros: blocks outside the causal / window band are never visited
        dbias = torch.zeros((batch, num_heads, seqlen_q, seqlen_k), dtype=torch.float32, device=q.device)
    else:
        dbias = None
    if batch * num_heads == 0 or seqlen_q == 0 or seqlen_k == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), dbias
    dout, q, k, v, out = last_unit(dout), last_unit(q), last_unit(k), last_unit(v), last_unit(out)
    lse = lse.contiguous()
    block_d, block_dv = pad_dim(head_dim), pad_dim(head_dim_v)
    qk_scale2, softcap_in, softcap2 = score_params(float(scale), float(softcap))
    slopes, stride_ab = alibi_args(alibi_slopes, q)
    bias, bias_strides, bias_bool = bias_args(attn_bias, q, (batch, num_heads, seqlen_q, seqlen_k))
    has_drop, rng, p_drop = dropout_state(dropout_p, rng_state, q.device)
    inv_keep = 1.0 / (1.0 - p_drop) if p_drop < 1.0 else 0.0
    drop_args = (rng if has_drop else lse, p_drop, inv_keep)
    left, right = window_sides(window_left, window_right, q, k, diag_offset)
    group = num_heads // num_heads_k
    bucket = seq_bucket(max(seqlen_q, seqlen_k))
    kwargs = dict(
        HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0,
        HAS_SOFTCAP=softcap > 0, HAS_ALIBI=alibi_slopes is not None,
        HAS_BIAS=attn_bias is not None, BIAS_IS_BOOL=bias_bool, HAS_DROPOUT=has_drop,
        **flags, **tile_flags(q, block_d, block_dv, head_dim, head_dim_v),
    )
    size_cls = (max(block_d, block_dv), q.element_size())
    seq_ptrs = sa.ptrs[:3]
    sizes = (seqlen_q, seqlen_k, sa.total_q, sa.total_k)

    # packed rows are addressed from each sequence's start row: no batch strides
    def sb(t, packed):
        return 0 if packed else t.stride(0)

    with device_ctx(q):
        # delta over every row of out (packed: (1, H, total_q), laid out like lse)
        rows_b, rows_s = out.shape[0], out.shape[1]
        delta = torch.empty((rows_b, num_heads, rows_s), dtype=torch.float32, device=q.device)
        _delta_kernel[(cdiv(rows_s, _DELTA_BLOCK_M) * rows_b * num_heads,)](
            out, dout, delta,
            out.stride(0), out.stride(1), out.stride(2),
            dout.stride(0), dout.stride(1), dout.stride(2),
            num_heads, rows_s, head_dim_v,
            BLOCK_DV=block_dv, BLOCK_M=_DELTA_BLOCK_M, BLOCK_N=0,
        )
        common = (
            sb(q, varlen_q), q.stride(1), q.stride(2),
            sb(k, varlen_k), k.stride(1), k.stride(2),
            sb(v, varlen_k), v.stride(1), v.stride(2),
            sb(dout, varlen_q), dout.stride(1), dout.stride(2),
        )
        nsplit = _dkdv_split(batch, num_heads_k, group, seqlen_k, q.device)
        if nsplit == 1:
            dk_buf, dv_buf = dk, dv
        else:
            alloc = torch.zeros if zero_k else torch.empty
            dk_buf = alloc((k.shape[0], k.shape[1], num_heads_k * nsplit, head_dim), dtype=torch.float32,
                           device=q.device)
            dv_buf = alloc((v.shape[0], v.shape[1], num_heads_k * nsplit, head_dim_v), dtype=torch.float32,
                           device=q.device)
        dkdv_args = (
            q, k, v, dout, lse, delta, dk_buf, dv_buf, slopes, bias, *seq_ptrs, *common,
            sb(dk_buf, varlen_k), dk_buf.stride(1), dk_buf.stride(2),
            sb(dv_buf, varlen_k), dv_buf.stride(1), dv_buf.stride(2),
            stride_ab, *bias_strides,
            num_heads, num_heads_k, group, nsplit, *sizes, head_dim, head_dim_v,
            float(scale), qk_scale2, softcap_in, softcap2, int(diag_offset), left, right, *drop_args, bucket,
        )
        _launch_dkdv(lambda meta: (cdiv(seqlen_k, meta["BLOCK_N"]) * batch * num_heads_k * nsplit,),
                     dkdv_args, kwargs, *size_cls)
        if nsplit > 1:
            dk.copy_(dk_buf.view(k.shape[0], k.shape[1], num_heads_k, nsplit, head_dim).sum(3))
            dv.copy_(dv_buf.view(v.shape[0], v.shape[1], num_heads_k, nsplit, head_dim_v).sum(3))
        dq_args = (
            q, k, v, dout, lse, delta, dq, slopes, bias, dbias if bias_grad else lse, *seq_ptrs, *common,
            sb(dq, varlen_q), dq.stride(1), dq.stride(2),
            stride_ab, *bias_strides,
            num_heads, group, *sizes, head_dim, head_dim_v,
            float(scale), qk_scale2, softcap_in, softcap2, int(diag_offset), left, right, *drop_args, bucket,
        )
        _launch_dq(lambda meta: (cdiv(seqlen_q, meta["BLOCK_M"]) * batch * num_heads,),
                   dq_args, dict(kwargs, BIAS_GRAD=bias_grad), *size_cls)
    return dq, dk, dv, dbias

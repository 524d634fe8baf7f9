"""Shared pieces of the Triton attention kernels: constants, jit helpers, configs.

Everything here is internal to ``flashattn_py.kernels``. The jit helpers are written
with long-standing Triton APIs only (plain pointer arithmetic, ``tl.dot``, ``tl.exp2``,
``tl.where``) so the same source compiles on Triton 3.6 and later and runs under
``TRITON_INTERPRET=1`` on CPU tensors.
"""
from __future__ import annotations

import dataclasses
import os

import torch
import triton
import triton.language as tl
from triton.language.random import philox as _philox
from triton.language.random import uint_to_uniform_float as _uint_to_uniform

LOG2E = 1.4426950408889634  # log2(e)
LN2 = 0.6931471805599453  # ln(2)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host-side sizes. (Recent Triton makes triton.cdiv and
    triton.next_power_of_2 constexpr functions: from host code about 7 us a call on the
    development VM, and a decode launch made five.)"""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1), for host-side sizes."""
    return 1 << (n - 1).bit_length()


def pad_dim(d: int) -> int:
    """Head dims are padded (inside the kernel, by masks) to a power of two >= 16."""
    return max(16, next_pow2(int(d)))


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for ``tl.dot``: IEEE fp32 unless TF32 matmuls are allowed."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def seq_bucket(n: int) -> int:
    """Autotune key bucket for a sequence length (powers of two from 128 to 16384)."""
    return min(max(next_pow2(max(int(n), 1)), 128), 16384)


def last_unit(t: torch.Tensor) -> torch.Tensor:
    """The kernels assume unit stride on the last dim; copy only when that is not so."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def device_ctx(t: torch.Tensor):
    """Make ``t``'s GPU current while launching (no-op on CPU / interpreter)."""
    if t.is_cuda:
        return torch.cuda.device(t.device)
    import contextlib

    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- configs
# Each family of kernels gets one triton.autotune wrapper per "size class" (padded head
# dim, 4-byte or 2-byte elements): large head dims / fp32 need smaller tiles to fit in
# shared memory, and keeping the lists per class keeps autotuning short.
# Under the interpreter exactly one small config is used and autotune is bypassed.

INTERP_BLOCKS = {
    "fwd": (32, 16),  # (BLOCK_M queries, BLOCK_N keys)
    "dq": (32, 16),
    "dkdv": (16, 32),
    "delta": (32, 0),
}


def _cfg(bm: int, bn: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


# (BLOCK_M, BLOCK_N, num_warps, num_stages); the first entry of each list is the default
# (FLASHATTN_TRITON_AUTOTUNE=0). Chosen from ptxas register / spill counts on sm90 with
# the JIT's specialisation (python -m kernels.compile_check --configs; the numbers and
# what was dropped: benchmarks/RESULTS.md, issue 19): defaults are spill-free and fit
# 99 KB of shared memory per block (sm86 / sm89 / sm120 launch them with autotuning off),
# other candidates spill at most a few bytes (64 in all); the autotuner skips a candidate
# that does not fit the device.
_CONFIGS_16BIT = {
    "fwd": {
        64: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4), (128, 32, 4, 4)],
        128: [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 64, 4, 2)],
        256: [(64, 32, 4, 2), (64, 64, 8, 2), (128, 64, 8, 2)],
    },
    "dq": {
        64: [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 4)],
        128: [(128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)],
        256: [(32, 32, 4, 2), (64, 64, 8, 2), (64, 32, 8, 2)],
    },
    "dkdv": {
        64: [(64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 4)],
        128: [(32, 64, 4, 3), (32, 128, 8, 3), (64, 128, 8, 3)],
        256: [(32, 32, 8, 2), (16, 32, 4, 2), (32, 16, 4, 2)],
    },
}
# fp32: with IEEE precision tl.dot has no tensor-core path and holds much more per thread:
# only small tiles stay out of heavy spills (hundreds of bytes to tens of KB otherwise)
_CONFIGS_FP32 = {
    "fwd": {
        64: [(32, 32, 4, 2), (32, 32, 8, 2), (32, 64, 4, 2)],
        128: [(32, 16, 4, 2), (16, 16, 4, 2)],
        256: [(32, 16, 4, 2), (16, 16, 4, 2), (32, 32, 8, 2)],
    },
    "dq": {
        64: [(32, 32, 4, 2), (32, 32, 8, 2)],
        128: [(32, 32, 8, 2), (32, 16, 4, 2), (16, 32, 4, 2), (16, 16, 4, 2)],
        256: [(32, 16, 4, 2), (16, 16, 4, 2), (32, 32, 8, 2)],
    },
    "dkdv": {
        64: [(64, 64, 8, 2), (16, 32, 4, 2)],
        128: [(16, 64, 8, 2), (16, 32, 4, 2)],
        256: [(16, 16, 4, 2), (16, 32, 4, 2)],
    },
}


def gpu_configs(kind: str, block_d: int, elem_bytes: int) -> list:
    """Candidate autotune configs for H100-class GPUs by padded head dim and element size."""
    table = (_CONFIGS_FP32 if elem_bytes >= 4 else _CONFIGS_16BIT)[kind]
    cls = 64 if block_d <= 64 else (128 if block_d <= 128 else 256)
    return [_cfg(*x) for x in table[cls]]


def tile_flags(q: torch.Tensor, block_d: int, block_dv: int, head_dim: int, head_dim_v: int) -> dict:
    """The attention kernels' head-dim constexprs: padded head dims (pad_dim), whether
    they need no column mask, and the tl.dot precision."""
    return dict(BLOCK_D=block_d, BLOCK_DV=block_dv, EVEN_D=block_d == head_dim, EVEN_DV=block_dv == head_dim_v,
                PREC=dot_precision(q.dtype))


class Launcher:
    """Launch a raw jit kernel: fixed blocks under the interpreter, autotuned on GPU."""

    def __init__(self, kind: str, kernel, key: list):
        self.kind = kind
        self.kernel = kernel
        self.key = key
        self._tuned: dict = {}

    def __call__(self, grid, args: tuple, kwargs: dict, block_d: int, elem_bytes: int):
        """``grid(meta) -> tuple``; ``kwargs`` are the constexprs other than the blocks."""
        if interpreting():
            bm, bn = INTERP_BLOCKS[self.kind]
            meta = dict(kwargs, BLOCK_M=bm, BLOCK_N=bn)
            self.kernel[grid(meta)](*args, **meta)
            return
        full = os.environ.get("FLASHATTN_TRITON_AUTOTUNE", "1") not in ("0", "")
        cls = (block_d, elem_bytes, full)
        tuned = self._tuned.get(cls)
        if tuned is None:
            configs = gpu_configs(self.kind, block_d, elem_bytes)
            # FLASHATTN_TRITON_AUTOTUNE=0: first (default) config only, no benchmarking
            # (GPU tests: every config would be compiled for every feature combination)
            tuned = triton.autotune(configs=configs if full else configs[:1], key=self.key)(self.kernel)
            self._tuned[cls] = tuned
        tuned[grid](*args, **kwargs)


# ----------------------------------------------------------------------------- jit helpers


@triton.jit
def tanh_f32(x):
    """tanh for the softcap, as the CUDA kernels' softcap_tanh (csrc/cuda/flash_common.cuh;
    tl.tanh is not available on every Triton): |x| >= 0.6: 1 - 2/(e^{2|x|}+1) with x's
    sign, which saturates to 1 (e -> inf), never NaN for finite x; |x| < 0.6, where that
    formula cancels (an absolute error of an ulp of 1, which softcap * tanh turned into
    scores several times rougher than without a softcap): x + x^3 P(x^2), P a degree-4
    least-squares fit of (tanh x - x) / x^3 on [0, 0.6] (relative error below 1.2e-7).
    """
    ax = tl.abs(x)
    e = tl.exp2(ax * 2.8853900817779268)  # 2 * log2(e)
    big = 1.0 - 2.0 / (e + 1.0)
    t = x * x
    q = -5.98496059e-3 * t + 2.08681487e-2
    q = q * t - 5.38035668e-2
    q = q * t + 1.33321330e-1
    q = q * t - 3.33333045e-1
    small = x + (x * t) * q
    return tl.where(ax < 0.6, small, tl.where(x < 0, -big, big))


@triton.jit
def load_tile(ptrs, rows, nrows, cols, ncols, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """Load a 2-D tile with row and/or column bound masks (0 outside)."""
    if CHECK_ROWS:
        if CHECK_COLS:
            x = tl.load(ptrs, mask=(rows[:, None] < nrows) & (cols[None, :] < ncols), other=0.0)
        else:
            x = tl.load(ptrs, mask=rows[:, None] < nrows, other=0.0)
    else:
        if CHECK_COLS:
            x = tl.load(ptrs, mask=cols[None, :] < ncols, other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def load_rows(Base, row_offs, rows, nrows, cols, ncols, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """load_tile of rows ``rows`` x columns ``cols`` of a row-major tensor from Base, the
    rows at element offsets row_offs (int64: row * stride passes 2^31 at long context)."""
    return load_tile(Base + row_offs[:, None] + cols[None, :], rows, nrows, cols, ncols, CHECK_ROWS, CHECK_COLS)


@triton.jit
def scaled_scores(qk, qk_scale2, softcap_in, softcap2, HAS_SOFTCAP: tl.constexpr):
    """(s, t): the scores q.k in log2 units, log2(e) * scale * qk or, softcapped,
    log2(e) * softcap * tanh(scale * qk / softcap); t is that tanh, for the softcap's
    derivative 1 - t^2 in the backward (qk without softcap: unused)."""
    if HAS_SOFTCAP:
        t = tanh_f32(qk * softcap_in)
        s = softcap2 * t
    else:
        t = qk
        s = qk * qk_scale2
    return s, t


@triton.jit
def bias_log2(bias):
    """A float bias in the scores' log2 domain (times log2 e), finite where it is finite and
    at most 2**126 in size: a mask of the dtype's minimum (transformers' masks) would
    overflow to -inf, emptying a fully masked row that torch's SDPA averages uniformly, and
    the lse of such a row (natural log) must come back to log2 in the backward. (Finite
    biases beyond 2**126 / log2 e, about 5.9e37, count as that: only a row whose keys all
    lie beyond it at different biases comes out otherwise than torch's.)"""
    b = bias.to(tl.float32)
    finite = tl.abs(b) < float("inf")  # (not NaN or +-inf, which go through as they are)
    bound = 5.896282e37  # 2**126 / log2 e
    return tl.where(finite, tl.minimum(tl.maximum(b, -bound), bound), b) * 1.4426950408889634


@triton.jit
def clamp_len(x, hi):
    """x clamped into [0, hi] (csrc/flash_params.h clamp_len)."""
    return tl.minimum(tl.maximum(x, 0), hi)


@triton.jit
def seq_info(b, CuSeqQ, CuSeqK, SeqUsedK, KvBatchIdx, LeftpadK, seqlen_q, seqlen_k, total_q, total_k, kv_batch,
             diag,
             VARLEN_Q: tl.constexpr, VARLEN_K: tl.constexpr, HAS_SEQUSED: tl.constexpr,
             PAGED: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
             HAS_KV_BATCH_IDX: tl.constexpr, HAS_LEFTPAD: tl.constexpr):
    """Sequence b of a call: (q_start, k_start, seqlen_q_b, seqlen_k_b, diag_b, kv_row).

    The Triton spelling of ``seq_view`` in csrc/flash_params.h (flash-attn's BlockInfo):
    q_start is its first row in q (out, lse), k_start its first key: a row of k / v
    (packed keys, or a dense cache row with leftpad) or, paged, its first key slot (key j
    is slot k_start + j, ``page_rows``); seqlen_q_b / seqlen_k_b its lengths (keys
    attended), diag_b its diagonal, kv_row the batch row of a dense k / v it reads
    (``kv_batch_idx[b]`` clamped to [0, kv_batch - 1], else b). A dense call (no flag
    set) is starts 0 and the call's lengths. cu_seqlens / seqused_k / kv_batch_idx /
    leftpad_k come from device memory unchecked, so every value is clamped into the
    tensors' bounds (seqlen_q / seqlen_k are the call's max_seqlen) and no input can make
    a kernel address out of bounds.

    leftpad_k: the first leftpad_k[b] key slots (clamped to the slots the sequence has)
    are not its keys: k_start moves past them and seqlen_k_b counts the keys after, so
    positions (the diagonal with bottom_right, ALiBi) count from the first real key.
    """
    q_start = b * 0
    k_start = b * 0
    seqlen_q_b = seqlen_q
    seqlen_k_b = seqlen_k
    if VARLEN_Q:
        q_start = clamp_len(tl.load(CuSeqQ + b), total_q)
        seqlen_q_b = clamp_len(clamp_len(tl.load(CuSeqQ + b + 1), total_q) - q_start, seqlen_q)
    if VARLEN_K:
        if PAGED:
            # paged: cu_seqlens_k gives lengths only; int64 so no difference overflows
            k_len = tl.load(CuSeqK + b + 1).to(tl.int64) - tl.load(CuSeqK + b).to(tl.int64)
            seqlen_k_b = clamp_len(k_len, seqlen_k).to(tl.int32)
        else:
            k_start = clamp_len(tl.load(CuSeqK + b), total_k)
            seqlen_k_b = clamp_len(clamp_len(tl.load(CuSeqK + b + 1), total_k) - k_start, seqlen_k)
    if HAS_SEQUSED:
        seqlen_k_b = clamp_len(tl.load(SeqUsedK + b), seqlen_k_b)
    if HAS_LEFTPAD:
        pad = clamp_len(tl.load(LeftpadK + b), seqlen_k_b)
        k_start = k_start + pad
        seqlen_k_b = seqlen_k_b - pad
    kv_row = b
    if HAS_KV_BATCH_IDX:
        kv_row = clamp_len(tl.load(KvBatchIdx + b), kv_batch - 1)
    if BOTTOM_RIGHT:
        diag = diag + (seqlen_k_b - seqlen_q_b)
    return q_start, k_start, seqlen_q_b, seqlen_k_b, diag, kv_row


@triton.jit
def query_block_program(seqlen_q, num_heads, group, BLOCK_M: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """(bh, b, h, hk, m0) of this program of a 1-D grid (no 65535 limit on batch * heads)
    over (sequence b, head h, query block from row m0), the query blocks of one head
    adjacent so they share K/V in L2; hk is h's kv head. seqlen_q is the call's (the
    longest sequence's with packed sequences): the grid covers the longest sequence. With
    HAS_RIGHT (causal-like) the last query blocks, which have the most work, come first."""
    n_mblk = (seqlen_q + BLOCK_M - 1) // BLOCK_M
    pid = tl.program_id(0)
    bh = pid // n_mblk
    pid_m = pid % n_mblk
    if HAS_RIGHT:
        pid_m = n_mblk - 1 - pid_m
    h = bh % num_heads
    return bh, bh // num_heads, h, h // group, pid_m * BLOCK_M


@triton.jit
def kv_bases(K, V, BlockTable, b, hk, kv_row, k_start, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh,
             stride_vs, stride_tb, PAGED: tl.constexpr):
    """(K_base, V_base, BlockTableRow): where kv head hk of sequence b starts (seq_info's
    kv_row and k_start). Paged, the keys are addressed page by page from the head's base
    (page_rows; the page stride is stride_kb) through sequence b's row of the block table;
    else from the sequence's first key (k_start is 0 unless its keys are packed or
    left-padded)."""
    if PAGED:
        K_base = K + hk.to(tl.int64) * stride_kh
        V_base = V + hk.to(tl.int64) * stride_vh
        BlockTableRow = BlockTable + b.to(tl.int64) * stride_tb
    else:
        K_base = K + kv_row.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh + k_start.to(tl.int64) * stride_ks
        V_base = V + kv_row.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh + k_start.to(tl.int64) * stride_vs
        BlockTableRow = BlockTable
    return K_base, V_base, BlockTableRow


@triton.jit
def dropout_seed(Rng, HAS_DROPOUT: tl.constexpr):
    """(seed, offset) of the call's dropout, read from device memory when the kernel runs,
    not baked into the launch: a CUDA graph replays launches as captured (dropout_state)."""
    seed = 0
    rng_offset = 0
    if HAS_DROPOUT:
        seed = tl.load(Rng)
        rng_offset = tl.load(Rng + 1)
    return seed, rng_offset


@triton.jit
def page_rows(cols, k_first, BlockTableRow, page_size, num_pages, seqlen_k):
    """Paged K/V: (page, row in page), int64, of keys ``cols`` of one sequence.

    Key j is slot s = k_first + j (k_first: seq_info's k_start, leftpad_k), row
    s % page_size of page BlockTableRow[s // page_size]; computed per key, so any page
    size works (a key block may span pages). Page indices come from device memory
    unchecked: clamped into [0, num_pages) like key_offset in csrc/flash_params.h. Keys
    past seqlen_k read no table entry (page 0; their scores are masked).
    """
    slots = k_first + cols
    page = tl.load(BlockTableRow + slots // page_size, mask=cols < seqlen_k, other=0)
    page = clamp_len(page, num_pages - 1).to(tl.int64)
    return page, (slots % page_size).to(tl.int64)


@triton.jit
def visible(rows, cols, seqlen_q, seqlen_k, diag, left, right,
            HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """(len(rows), len(cols)) bool: in bounds and inside the visibility window."""
    vis = (rows[:, None] < seqlen_q) & (cols[None, :] < seqlen_k)
    if HAS_LEFT:
        vis = vis & (cols[None, :] >= rows[:, None] + diag - left)
    if HAS_RIGHT:
        vis = vis & (cols[None, :] <= rows[:, None] + diag + right)
    return vis


@triton.jit
def visible_t(rows, cols, seqlen_q, seqlen_k, diag, left, right,
              HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Transposed ``visible``: (len(cols), len(rows)) bool."""
    vis = (rows[None, :] < seqlen_q) & (cols[:, None] < seqlen_k)
    if HAS_LEFT:
        vis = vis & (cols[:, None] >= rows[None, :] + diag - left)
    if HAS_RIGHT:
        vis = vis & (cols[:, None] <= rows[None, :] + diag + right)
    return vis


@triton.jit
def key_span(i_first, i_last, seqlen_k, diag, left, right,
             BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """(lo, hi): the keys [lo, hi) that query positions i_first..i_last may see, lo
    rounded down to a multiple of BLOCK_N (hi <= lo: none)."""
    lo = i_first * 0
    hi = i_first * 0 + seqlen_k
    if HAS_LEFT:
        lo = tl.maximum(i_first + diag - left, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
    if HAS_RIGHT:
        hi = tl.minimum(i_last + diag + right + 1, seqlen_k)
    return lo, hi


@triton.jit
def kv_block_range(m0, seqlen_q, seqlen_k, diag, left, right,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Key blocks a query block [m0, m0+BLOCK_M) must visit, split for masking.

    Returns (lo, a, b, end), multiples of BLOCK_N apart from lo: blocks in [lo, a) and
    [b, end) need the element mask, blocks in [a, b) are fully visible to every valid
    row of the query block and fully inside seqlen_k.
    """
    m_last = tl.minimum(m0 + BLOCK_M, seqlen_q) - 1
    lo, hi = key_span(m0, m_last, seqlen_k, diag, left, right, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    span = tl.maximum(hi - lo, 0)
    end = lo + ((span + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    a = lo
    if HAS_LEFT:
        need = tl.maximum(m_last + diag - left - lo, 0)
        a = tl.minimum(lo + ((need + BLOCK_N - 1) // BLOCK_N) * BLOCK_N, end)
    limit = m0 * 0 + seqlen_k
    if HAS_RIGHT:
        limit = tl.minimum(limit, m0 + diag + right + 1)
    nfull = tl.maximum(limit - a, 0) // BLOCK_N
    b = tl.minimum(a + nfull * BLOCK_N, end)
    return lo, a, b, end


@triton.jit
def q_block_range(n0, seqlen_q, seqlen_k, diag, left, right,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Query blocks that can see key block [n0, n0+BLOCK_N), split for masking.

    Returns (lo, a, b, end), multiples of BLOCK_M apart from lo: blocks in [a, b) are
    fully inside seqlen_q and every valid key of the block is visible to all their rows.
    """
    n_last = tl.minimum(n0 + BLOCK_N, seqlen_k) - 1
    lo = n0 * 0
    hi = n0 * 0 + seqlen_q
    if HAS_RIGHT:
        lo = tl.maximum(n0 - diag - right, 0)
        lo = (lo // BLOCK_M) * BLOCK_M
    if HAS_LEFT:
        hi = tl.minimum(n_last - diag + left + 1, seqlen_q)
    span = tl.maximum(hi - lo, 0)
    end = lo + ((span + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    a = lo
    if HAS_RIGHT:
        need = tl.maximum(n_last - diag - right - lo, 0)
        a = tl.minimum(lo + ((need + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, end)
    limit = n0 * 0 + seqlen_q
    if HAS_LEFT:
        limit = tl.minimum(limit, n0 - diag + left + 1)
    nfull = tl.maximum(limit - a, 0) // BLOCK_M
    b = tl.minimum(a + nfull * BLOCK_M, end)
    return lo, a, b, end


@triton.jit
def block_run(run: tl.constexpr, lo, a, b, end):
    """(start, stop) of run ``run`` (0, 1, 2) of a split from kv_block_range /
    q_block_range: [lo, a), [a, b) (the blocks without the element mask), [b, end)."""
    start = lo
    stop = a
    if run == 1:
        start = a
        stop = b
    if run == 2:
        start = b
        stop = end
    return start, stop


@triton.jit
def query_block_rows(Rng, pid_bh, h, m0, q_start, seqlen_q, seqlen_k, total_q, BLOCK_M: tl.constexpr,
                     VARLEN_Q: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    """(rows, rows64, lse_rows, seed, drop_rows) of the query block from row m0 of
    (sequence b, head h) (query_block_program's pid_bh = b * H + h): its rows in the
    sequence, in int32 and in int64 (row * stride passes 2^31 at long context), their index
    in lse / delta, (B, H, Sq), or (1, H, total_q) with packed queries (sequence b from row
    q_start); the dropout seed and each row's int64 Philox offset of key 0, offset + lse
    index * seqlen_k, i.e. offset + ((b*H + h)*Sq + i)*Sk dense, offset + (h*total_q +
    q_start + i)*Sk packed (the rows themselves without dropout)."""
    rows = m0 + tl.arange(0, BLOCK_M)
    if VARLEN_Q:
        lse_rows = h.to(tl.int64) * total_q + q_start + rows
    else:
        lse_rows = pid_bh.to(tl.int64) * seqlen_q + rows
    seed, rng_offset = dropout_seed(Rng, HAS_DROPOUT)
    if HAS_DROPOUT:
        drop_rows = rng_offset + lse_rows * seqlen_k
    else:
        drop_rows = rows
    return rows, rows.to(tl.int64), lse_rows, seed, drop_rows


@triton.jit
def head_base(X, b, h, start, stride_b, stride_h, stride_s, PACKED: tl.constexpr):
    """Where head h of sequence b starts in X (B, S, H, D); packed (1, total, H, D), the
    launcher passes batch stride 0: from its first row ``start`` (seq_info)."""
    base = X + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
    if PACKED:
        base += start.to(tl.int64) * stride_s
    return base


@triton.jit
def head_bias_terms(Alibi, Bias, b, h, rows64, stride_ab, stride_bb, stride_bh, stride_bm,
                    HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr):
    """(slope2, bias_rows) of head h of sequence b: its ALiBi slope in log2 units (0.0
    without) and the (len(rows64), 1) pointers to the bias rows of query rows ``rows64``
    (Bias without)."""
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(Alibi + b * stride_ab + h).to(tl.float32) * 1.4426950408889634
    if HAS_BIAS:
        bias_rows = (Bias + b.to(tl.int64) * stride_bb + h.to(tl.int64) * stride_bh
                     + rows64[:, None] * stride_bm)
    else:
        bias_rows = Bias
    return slope2, bias_rows


@triton.jit
def add_bias_terms(s, rows, cols, seqlen_q, seqlen_k, slope2, diag, bias_rows, stride_bn,
                   HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_IS_BOOL: tl.constexpr):
    """Scores s (log2 units) of query rows x key cols with the ALiBi and bias terms of
    head_bias_terms added (a bool mask's False: -inf). The bias bounds are always checked:
    interior blocks may still hold query rows past seqlen_q."""
    if HAS_ALIBI:
        s = s - slope2 * tl.abs(rows[:, None] + diag - cols[None, :]).to(tl.float32)
    if HAS_BIAS:
        in_bounds = (rows[:, None] < seqlen_q) & (cols[None, :] < seqlen_k)
        bias_ptrs = bias_rows + cols.to(tl.int64)[None, :] * stride_bn
        if BIAS_IS_BOOL:
            keep_b = tl.load(bias_ptrs, mask=in_bounds, other=0)
            s = tl.where(keep_b != 0, s, float("-inf"))
        else:
            bias = tl.load(bias_ptrs, mask=in_bounds, other=0.0)
            s = s + bias_log2(bias)
    return s


# ----------------------------------------------------------------------------- sequences


@dataclasses.dataclass
class SeqArgs:
    """How a call's sequences are laid out, for the launchers (the host side of seq_info).

    batch: number of sequences; seqlen_q / seqlen_k: the call's lengths (max_seqlen with
    packed sequences: grids and dropout streams are sized by them); total_q / total_k: rows
    of q and k; ptrs: (cu_seqlens_q, cu_seqlens_k, seqused_k, block_table), a dummy
    pointer for each one absent; page: (block table row stride, page size, page count);
    flags: the kernels' VARLEN_Q / VARLEN_K / HAS_SEQUSED / PAGED / BOTTOM_RIGHT.
    KV caches (forward only): cache_ptrs (kv_batch_idx, leftpad_k), a dummy pointer for
    each one absent; kv_batch: batch rows of a dense k / v; cache_flags: HAS_KV_BATCH_IDX /
    HAS_LEFTPAD.
    """

    batch: int
    seqlen_q: int
    seqlen_k: int
    total_q: int
    total_k: int
    ptrs: tuple
    page: tuple
    flags: dict
    cache_ptrs: tuple = ()
    kv_batch: int = 1
    cache_flags: dict = dataclasses.field(default_factory=dict)


def _int32_arg(name, t, dim):
    if t is not None and (t.dtype != torch.int32 or t.dim() != dim):
        raise ValueError(f"{name}: expected a {dim}-D int32 tensor, got {t.dtype} of shape {tuple(t.shape)}")


def seq_args(q, k, cu_seqlens_q, cu_seqlens_k, seqused_k, block_table, max_seqlen_q, max_seqlen_k,
             bottom_right, kv_batch_idx=None, leftpad_k=None) -> SeqArgs:
    """SeqArgs of a call from shapes only: cu_seqlens / seqused_k / block_table /
    kv_batch_idx / leftpad_k values stay on the device (the kernels clamp them, seq_info /
    page_rows)."""
    _int32_arg("kv_batch_idx", kv_batch_idx, 1)
    _int32_arg("leftpad_k", leftpad_k, 1)
    if kv_batch_idx is not None and (block_table is not None or cu_seqlens_k is not None):
        raise ValueError("kv_batch_idx: selects rows of a dense k / v; not with block_table or cu_seqlens_k")
    _int32_arg("cu_seqlens_q", cu_seqlens_q, 1)
    _int32_arg("cu_seqlens_k", cu_seqlens_k, 1)
    _int32_arg("seqused_k", seqused_k, 1)
    _int32_arg("block_table", block_table, 2)
    varlen_q, varlen_k = cu_seqlens_q is not None, cu_seqlens_k is not None
    paged = block_table is not None
    if varlen_q:
        if q.shape[0] != 1:
            raise ValueError(f"cu_seqlens_q: q must be (1, total_q, H, D), got {tuple(q.shape)}")
        batch, total_q = cu_seqlens_q.numel() - 1, q.shape[1]
        seqlen_q = int(max_seqlen_q) if max_seqlen_q > 0 else total_q
    else:
        batch, seqlen_q = q.shape[0], q.shape[1]
        total_q = seqlen_q
    if paged:
        page_size, num_pages = k.shape[1], k.shape[0]
        if block_table.shape[0] != batch:
            raise ValueError(f"block_table: expected {batch} rows (one per sequence), got {block_table.shape[0]}")
        # (entries are clamped into the pool: an empty one has no page to clamp to)
        if (num_pages == 0 or page_size == 0) and block_table.numel() > 0:
            raise ValueError(f"k: an empty page pool ({num_pages} pages of {page_size}) with block_table entries")
        # a sequence holds at most max_blocks pages: keys past that have no table entry
        total_k = block_table.shape[1] * page_size
        seqlen_k = min(int(max_seqlen_k), total_k) if max_seqlen_k > 0 else total_k
        page = (block_table.stride(0), page_size, num_pages)
    else:
        if varlen_k and k.shape[0] != 1:
            raise ValueError(f"cu_seqlens_k: k must be (1, total_k, Hk, D), got {tuple(k.shape)}")
        total_k = k.shape[1]
        seqlen_k = int(max_seqlen_k) if varlen_k and max_seqlen_k > 0 else total_k
        page = (0, 1, 1)
    for name, t, n in (("cu_seqlens_k", cu_seqlens_k, batch + 1), ("seqused_k", seqused_k, batch),
                       ("kv_batch_idx", kv_batch_idx, batch), ("leftpad_k", leftpad_k, batch)):
        if t is not None and t.numel() != n:
            raise ValueError(f"{name}: expected {n} entries for {batch} sequences, got {t.numel()}")
    if kv_batch_idx is not None and batch > 0 and k.shape[0] == 0:  # (clamped into k's rows: it has none)
        raise ValueError("kv_batch_idx: k / v have no row to select")
    dummy = q
    ptrs = tuple(dummy if t is None else t for t in (cu_seqlens_q, cu_seqlens_k, seqused_k, block_table))
    flags = dict(VARLEN_Q=varlen_q, VARLEN_K=varlen_k, HAS_SEQUSED=seqused_k is not None, PAGED=paged,
                 BOTTOM_RIGHT=bool(bottom_right))
    cache_ptrs = tuple(dummy if t is None else t for t in (kv_batch_idx, leftpad_k))
    cache_flags = dict(HAS_KV_BATCH_IDX=kv_batch_idx is not None, HAS_LEFTPAD=leftpad_k is not None)
    return SeqArgs(batch, seqlen_q, seqlen_k, total_q, total_k, ptrs, page, flags, cache_ptrs, max(int(k.shape[0]), 1),
                   cache_flags)


# ----------------------------------------------------------------------------- bias, dropout


def window_sides(window_left: int, window_right: int, q: torch.Tensor, k: torch.Tensor,
                 diag_offset: int, block_table: torch.Tensor | None = None) -> tuple[int, int]:
    """(left, right) as the kernels take them: a side at least as long as every query and
    key row of the tensors (plus |diag_offset|) as -1, which removes the same keys (the
    kernels add the sides to positions in 32 bits, where a side near 2**31 would wrap).
    Paged K/V: a sequence's keys are its block table's slots (pages may repeat), not the
    pool's."""
    keys = block_table.shape[1] * k.shape[1] if block_table is not None else k.shape[0] * k.shape[1]
    limit = q.shape[0] * q.shape[1] + keys + abs(int(diag_offset))
    return tuple(-1 if int(w) >= limit else int(w) for w in (window_left, window_right))


def bias_args(attn_bias, q, shape):
    """(pointer tensor, 4 strides, is_bool) for an attention bias / bool mask.

    ``attn_bias`` has exactly ``shape`` = (B, H, Sq, Sk), usually an ``expand()``ed view
    with stride 0 on the broadcast dims: it is read through its strides, never copied.
    A bool mask is reinterpreted as uint8 (same strides, no copy). q is a dummy pointer
    when there is no bias.
    """
    if attn_bias is None:
        return q, (0, 0, 0, 0), False
    assert tuple(attn_bias.shape) == tuple(shape), f"attn_bias: expected shape {tuple(shape)}, got {tuple(attn_bias.shape)}"
    if attn_bias.dtype == torch.bool:
        return attn_bias.view(torch.uint8), tuple(attn_bias.stride()), True
    return attn_bias, tuple(attn_bias.stride()), False


def dropout_args(dropout_p: float, rng_state):
    """(has_dropout, seed, offset, p) from an int64 CPU tensor ``rng_state`` = [seed, offset].

    The seed is passed as an unsigned 64-bit value (both 32-bit halves key Philox); the
    offset is the int64 counter base the per-element offsets are added to.
    """
    p = float(dropout_p)
    if p <= 0.0:
        return False, 0, 0, 0.0
    assert rng_state is not None, "dropout_p > 0 needs rng_state = int64 tensor [seed, offset]"
    seed, offset = (int(x) for x in rng_state.tolist()[:2])
    return True, seed % (1 << 64), offset, p


def dropout_state(dropout_p: float, rng_state, device):
    """(has_dropout, state, p) for the attention kernels: ``state`` is the int64 [seed,
    offset] on ``device``, read by the kernels when they run (``tl.load``) rather than
    passed as launch arguments. A GPU ``rng_state`` (ops.dropout_rng_state: drawn on the
    GPU, so redrawn by every CUDA-graph replay) is used as it is; a CPU one is copied over.
    """
    p = float(dropout_p)
    if p <= 0.0:
        return False, None, 0.0
    assert rng_state is not None, "dropout_p > 0 needs rng_state = int64 tensor [seed, offset]"
    assert rng_state.dtype == torch.int64 and rng_state.numel() == 2, \
        f"rng_state: expected an int64 [seed, offset], got {rng_state.dtype} of shape {tuple(rng_state.shape)}"
    return True, rng_state.reshape(2).to(device).contiguous(), p


@triton.jit
def dropout_keep(seed, offs, p_drop):
    """Keep decisions (bool, the shape of ``offs``) of the attention dropout.

    One Philox4x32-10 draw per element: counter (lo32(offs), hi32(offs), 0, 0), key
    (lo32(seed), hi32(seed)); its first word to a uniform float in [0, 1) exactly as
    ``tl.rand`` does; kept when ``u >= p_drop`` (probability 1 - p). ``offs`` is the
    int64 per-element offset ``offset + ((b*H + h)*Sq + i)*Sk + j``. This is what
    ``tl.rand(seed, offs)`` computes on Triton 3.8 for int64 offsets, but spelled out
    with ``philox`` so it is the same stream on every Triton version (older ``tl.rand``
    switches to a 64-bit Philox for 64-bit offsets) and under the interpreter.
    """
    lo = offs.to(tl.uint32)
    hi = (offs >> 32).to(tl.uint32)
    zero = lo * 0
    r, _, _, _ = _philox(seed, lo, hi, zero, zero)
    return _uint_to_uniform(r) >= p_drop


@triton.jit
def _dropout_mask_kernel(Out, seed, rng_offset, p_drop, seqlen_q, seqlen_k,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    n_mblk = (seqlen_q + BLOCK_M - 1) // BLOCK_M
    n_nblk = (seqlen_k + BLOCK_N - 1) // BLOCK_N
    pid = tl.program_id(0)
    pid_bh = pid // (n_mblk * n_nblk)
    rest = pid % (n_mblk * n_nblk)
    rows = (rest // n_nblk) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (rest % n_nblk) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_off = (pid_bh.to(tl.int64) * seqlen_q + rows) * seqlen_k
    offs = row_off[:, None] + cols[None, :]
    keep = dropout_keep(seed, rng_offset + offs, p_drop)
    tl.store(Out + offs, keep.to(tl.uint8), mask=(rows[:, None] < seqlen_q) & (cols[None, :] < seqlen_k))


def dropout_mask(rng_state, batch: int, num_heads: int, seqlen_q: int, seqlen_k: int, dropout_p: float,
                 device) -> torch.Tensor:
    """The keep mask (bool (B, H, Sq, Sk)) the attention kernels use for ``rng_state``.

    Test hook: the same ``dropout_keep`` helper and the same per-element offsets as the
    forward / backward kernels. Kept elements are scaled by 1 / (1 - dropout_p) there.
    """
    out = torch.empty((batch, num_heads, seqlen_q, seqlen_k), dtype=torch.uint8, device=device)
    has, seed, offset, p = dropout_args(dropout_p, rng_state)
    if not has:
        return out.fill_(1).bool()
    if out.numel() == 0:
        return out.bool()
    bm, bn = 64, 64
    grid = (batch * num_heads * cdiv(seqlen_q, bm) * cdiv(seqlen_k, bn),)
    with device_ctx(out):
        _dropout_mask_kernel[grid](out, seed, offset, p, seqlen_q, seqlen_k, BLOCK_M=bm, BLOCK_N=bn)
    return out.bool()

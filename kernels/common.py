"""Shared pieces of the Triton attention kernels: constants, jit helpers, configs.

Everything here is internal to ``flashattn_py.kernels``. The jit helpers are written
with long-standing Triton APIs only (plain pointer arithmetic, ``tl.dot``, ``tl.exp2``,
``tl.where``) so the same source compiles on Triton 3.6 and later and runs under
``TRITON_INTERPRET=1`` on CPU tensors.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # log2(e)
LN2 = 0.6931471805599453  # ln(2)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def pad_dim(d: int) -> int:
    """Head dims are padded (inside the kernel, by masks) to a power of two >= 16."""
    return max(16, triton.next_power_of_2(int(d)))


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for ``tl.dot``: IEEE fp32 unless TF32 matmuls are allowed."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def seq_bucket(n: int) -> int:
    """Autotune key bucket for a sequence length (powers of two from 128 to 16384)."""
    return min(max(triton.next_power_of_2(max(int(n), 1)), 128), 16384)


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
# (FLASHATTN_TRITON_AUTOTUNE=0) and was picked for few ptxas register spills on sm90.
_CONFIGS_16BIT = {
    "fwd": {
        64: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4), (128, 32, 4, 4)],
        128: [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3)],
        256: [(64, 64, 8, 2), (64, 32, 4, 2), (128, 64, 8, 2), (64, 64, 4, 2)],
    },
    "dq": {
        64: [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 4)],
        128: [(128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)],
        256: [(32, 32, 4, 2), (64, 32, 4, 2), (64, 64, 8, 2), (64, 32, 8, 2)],
    },
    "dkdv": {
        64: [(32, 128, 4, 3), (64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 4)],
        128: [(32, 64, 4, 3), (64, 128, 8, 3), (32, 128, 8, 3), (64, 64, 4, 3)],
        256: [(32, 32, 4, 2), (32, 64, 8, 2), (64, 64, 8, 2), (16, 64, 4, 2)],
    },
}
# fp32: with IEEE precision tl.dot has no tensor-core path, so keep tiles small
_CONFIGS_FP32 = {
    "fwd": {
        64: [(64, 32, 4, 2), (64, 64, 8, 2), (32, 32, 4, 2)],
        128: [(32, 32, 4, 2), (64, 32, 8, 2), (64, 64, 8, 2)],
        256: [(32, 16, 4, 2), (16, 16, 4, 2), (32, 32, 8, 2)],
    },
    "dkdv": {
        64: [(32, 64, 4, 2), (32, 32, 4, 2), (64, 64, 8, 2)],
        128: [(32, 32, 4, 2), (16, 32, 4, 2), (32, 64, 8, 2)],
        256: [(16, 32, 4, 2), (16, 16, 4, 2)],
    },
}
_CONFIGS_FP32["dq"] = _CONFIGS_FP32["fwd"]


def gpu_configs(kind: str, block_d: int, elem_bytes: int) -> list:
    """Candidate autotune configs for H100-class GPUs by padded head dim and element size."""
    table = (_CONFIGS_FP32 if elem_bytes >= 4 else _CONFIGS_16BIT)[kind]
    cls = 64 if block_d <= 64 else (128 if block_d <= 128 else 256)
    return [_cfg(*x) for x in table[cls]]


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
    """tanh via exp2 (tl.tanh is not available on every Triton): 1 - 2/(e^{2x}+1).

    Saturates correctly: e -> inf gives 1, e -> 0 gives -1; never NaN for finite x.
    """
    e = tl.exp2(x * 2.8853900817779268)  # 2 * log2(e)
    return 1.0 - 2.0 / (e + 1.0)


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
def kv_block_range(m0, seqlen_q, seqlen_k, diag, left, right,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Key blocks a query block [m0, m0+BLOCK_M) must visit, split for masking.

    Returns (lo, a, b, end), multiples of BLOCK_N apart from lo: blocks in [lo, a) and
    [b, end) need the element mask, blocks in [a, b) are fully visible to every valid
    row of the query block and fully inside seqlen_k.
    """
    m_last = tl.minimum(m0 + BLOCK_M, seqlen_q) - 1
    lo = m0 * 0
    hi = m0 * 0 + seqlen_k
    if HAS_LEFT:
        lo = tl.maximum(m0 + diag - left, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
    if HAS_RIGHT:
        hi = tl.minimum(m_last + diag + right + 1, seqlen_k)
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

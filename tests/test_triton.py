"""Triton backend kernels (kernels/), held to the DESIGN.md rule.

CPU tests run the kernels in Triton's interpreter (``TRITON_INTERPRET=1``, set before
triton is imported) in fp32 / fp16; ``-m gpu`` tests run them compiled on CUDA.
"""
from __future__ import annotations

import os

if "TRITON_INTERPRET" not in os.environ:
    try:
        import torch as _torch

        _gpu = _torch.cuda.is_available()
    except Exception:  # pragma: no cover
        _gpu = False
    if not _gpu:
        os.environ["TRITON_INTERPRET"] = "1"
# GPU tests: one config per kernel instead of autotuning every feature combination
os.environ.setdefault("FLASHATTN_TRITON_AUTOTUNE", "0")

import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rule import check_attention, random_qkv  # noqa: E402

try:
    from flashattn_py.kernels import flash_bwd, flash_fwd
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from kernels import flash_bwd, flash_fwd  # noqa: E402

INTERP = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
CPU_DEVICE = "cpu"
needs_interp = pytest.mark.skipif(not INTERP, reason="CPU tests run under TRITON_INTERPRET=1")


class _TritonAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, alibi, scale, softcap, left, right, diag, deterministic):
        out, lse = flash_fwd(q, k, v, alibi, scale, softcap, left, right, diag)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.alibi = alibi
        ctx.args = (scale, softcap, left, right, diag, deterministic)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        scale, softcap, left, right, diag, det = ctx.args
        dq, dk, dv = flash_bwd(dout, q, k, v, out, lse, ctx.alibi, scale, softcap, left, right, diag, det)
        return dq, dk, dv, None, None, None, None, None, None, None


def make_run(scale=None, softcap=0.0, alibi_slopes=None, window_left=-1, window_right=-1, diag_offset=0,
             deterministic=False):
    def run(q, k, v):
        s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        return _TritonAttn.apply(q, k, v, alibi_slopes, s, softcap, window_left, window_right, diag_offset,
                                 deterministic)

    return run


def _case(batch, sq, sk, h, hk, d, dtype, device, seed, layout="bshd", dv=None, grad=True, **kw):
    q, k, v = random_qkv(batch, sq, sk, h, hk, d, dv, dtype=dtype, device=device, seed=seed, layout=layout)
    check_attention(make_run(**kw), q, k, v, grad=grad, seed=seed, **kw)


# ------------------------------------------------------------------ CPU (interpreter)

# (batch, Sq, Sk, H, Hk, D, dtype, layout)
SHAPES = [
    (1, 1, 1, 1, 1, 16, torch.float32, "bshd"),
    (2, 17, 17, 2, 1, 40, torch.float32, "bhsd"),
    (1, 97, 130, 4, 2, 64, torch.float16, "bshd"),
    (1, 130, 97, 4, 1, 96, torch.float32, "strided"),
    (1, 17, 97, 2, 2, 128, torch.float16, "strided"),
    (1, 1, 130, 2, 1, 24, torch.float32, "bshd"),
]


@needs_interp
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}_q{}_k{}_h{}x{}_d{}_{}_{}".format(*s[:6], str(s[6])[6:], s[7]))
def test_dense(shape):
    batch, sq, sk, h, hk, d, dtype, layout = shape
    _case(batch, sq, sk, h, hk, d, dtype, CPU_DEVICE, seed=sq * 7 + d, layout=layout)


# causal both alignments, Sq < Sk and Sq > Sk; bottom-right causal with Sq > Sk leaves
# the first Sq - Sk rows with no visible key (out 0, lse -inf, zero grads).
CAUSAL = [
    (97, 130, "bottom_right"),
    (97, 130, "top_left"),
    (130, 97, "bottom_right"),
    (130, 97, "top_left"),
    (17, 17, "bottom_right"),
]


@needs_interp
@pytest.mark.parametrize("sq,sk,align", CAUSAL)
def test_causal(sq, sk, align):
    diag = sk - sq if align == "bottom_right" else 0
    dtype = torch.float16 if sq == 130 else torch.float32
    _case(1, sq, sk, 4, 2, 40, dtype, CPU_DEVICE, seed=sq + sk, window_right=0, diag_offset=diag)


WINDOWS = [
    # (Sq, Sk, left, right, diag, extras)
    (97, 97, 16, 0, 0, {}),                     # local causal
    (97, 130, 7, 20, 33, {}),                   # two-sided band, bottom-right
    (130, 97, 2, 0, -40, {}),                   # narrow band, empty rows at the top
    (64, 64, 40, -1, 0, {}),                    # left-only window
    (97, 97, 5, 3, 100, {}),                    # band entirely past Sk: every row empty
]


@needs_interp
@pytest.mark.parametrize("sq,sk,left,right,diag,extra", WINDOWS)
def test_window(sq, sk, left, right, diag, extra):
    _case(1, sq, sk, 2, 1, 32, torch.float32, CPU_DEVICE, seed=left * 3 + sq,
          window_left=left, window_right=right, diag_offset=diag, **extra)


@needs_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_softcap(dtype):
    _case(1, 97, 75, 2, 1, 64, dtype, CPU_DEVICE, seed=5, softcap=1.5, scale=0.4)


@needs_interp
@pytest.mark.parametrize("per_batch", [False, True], ids=["slopes_h", "slopes_bh"])
def test_alibi(per_batch):
    batch, h = 2, 4
    gen = torch.Generator().manual_seed(3)
    shape = (batch, h) if per_batch else (h,)
    slopes = (torch.rand(shape, generator=gen) * 0.5 + 0.05).float()
    _case(batch, 50, 70, h, 2, 16, torch.float32, CPU_DEVICE, seed=11, alibi_slopes=slopes,
          window_right=0, diag_offset=20)


@needs_interp
def test_softcap_alibi_window_fp16():
    slopes = torch.tensor([0.3, 0.1], dtype=torch.float32)
    _case(1, 70, 90, 2, 2, 48, torch.float16, CPU_DEVICE, seed=21, softcap=3.0, alibi_slopes=slopes,
          window_left=24, window_right=0, diag_offset=20)


@needs_interp
@pytest.mark.parametrize("split", [2, 4])
def test_gqa_split_dkdv(monkeypatch, split):
    """dK/dV pass with the GQA group split over programs (partial sums reduced after)."""
    monkeypatch.setattr(sys.modules[flash_bwd.__module__], "DKDV_SPLIT", split)
    _case(1, 40, 50, 4, 1, 16, torch.float32, CPU_DEVICE, seed=31 + split, window_right=0, diag_offset=10)


@needs_interp
def test_head_dim_v_differs():
    _case(1, 33, 45, 2, 1, 32, torch.float32, CPU_DEVICE, seed=8, dv=48)


@needs_interp
def test_empty_rows_exact():
    """Rows with no visible key: out exactly 0, lse -inf, grads exactly 0; no NaN."""
    q, k, v = random_qkv(1, 40, 20, 2, 1, 16, seed=4)
    run = make_run(window_right=0, diag_offset=-20)  # bottom-right causal, Sq > Sk
    out, lse = flash_fwd(q.detach(), k.detach(), v.detach(), None, 0.25, 0.0, -1, 0, -20)
    assert torch.all(out[:, :20] == 0) and torch.isneginf(lse[:, :, :20]).all()
    assert torch.isfinite(lse[:, :, 20:]).all()
    o = run(q, k, v)
    o.sum().backward()
    assert torch.all(q.grad[:, :20] == 0)
    for t in (q.grad, k.grad, v.grad):
        assert not torch.isnan(t).any()


@needs_interp
def test_deterministic_bitwise():
    q, k, v = random_qkv(1, 50, 60, 4, 1, 32, seed=9)
    grads = []
    for _ in range(2):
        qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
        make_run(window_right=0, diag_offset=10, deterministic=True)(qq, kk, vv).sum().backward()
        grads.append((qq.grad, kk.grad, vv.grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@needs_interp
def test_lse_matches_reference():
    from flashattn_py.reference import attention_ref

    q, k, v = random_qkv(1, 45, 33, 2, 2, 16, seed=12)
    out, lse = flash_fwd(q.detach(), k.detach(), v.detach(), None, 0.3, 0.0, 10, 0, 5)
    _, ref = attention_ref(q.double(), k.double(), v.double(), scale=0.3, window_left=10, window_right=0,
                           diag_offset=5)
    assert lse.shape == (1, 2, 45) and lse.dtype == torch.float32 and lse.is_contiguous()
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(lse), fin)
    assert (lse.double() - ref)[fin].abs().max() < 1e-5


# ------------------------------------------------------------------ GPU (compiled)

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(INTERP or not torch.cuda.is_available(), reason="needs CUDA (not the interpreter)")

# (dtype, batch, Sq, Sk, H, Hk, D, layout, kwargs). A hand-picked set rather than a full
# product: every distinct feature set / head dim / dtype is a fresh compile of three kernels.
BR = "bottom_right"
GPU_CASES = [
    ("bf16_d128_dense", torch.bfloat16, 2, 1024, 1024, 4, 4, 128, "bshd", {}),
    ("bf16_d128_causal_br", torch.bfloat16, 2, 1000, 1024, 4, 4, 128, "bshd", dict(window_right=0, diag_offset=24)),
    ("fp16_d64_window", torch.float16, 1, 2048, 2048, 4, 2, 64, "bshd", dict(window_left=256, window_right=64)),
    ("bf16_d256_causal_gqa", torch.bfloat16, 2, 2048, 1537, 8, 2, 256, "bshd", dict(window_right=0)),
    ("fp16_d256_dense", torch.float16, 1, 1024, 1024, 4, 4, 256, "strided", {}),
    ("fp16_d80_padded", torch.float16, 2, 1025, 2048, 4, 1, 80, "bhsd", {}),
    ("bf16_d128_mqa_causal", torch.bfloat16, 1, 2048, 2048, 8, 1, 128, "bshd", dict(window_right=0)),
    ("fp32_d64_causal_tl", torch.float32, 1, 1024, 777, 4, 2, 64, "bshd", dict(window_right=0)),
    ("bf16_d128_empty_rows", torch.bfloat16, 1, 1024, 512, 2, 1, 128, "bshd", dict(window_right=0, diag_offset=-512)),
]


@gpu
@needs_cuda
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c[0])
def test_gpu(case):
    _, dtype, batch, sq, sk, h, hk, d, layout, kw = case
    _case(batch, sq, sk, h, hk, d, dtype, "cuda", seed=d + sq, layout=layout, **kw)


@gpu
@needs_cuda
def test_gpu_features():
    slopes = torch.rand(2, 8, device="cuda") * 0.1
    _case(2, 1025, 2048, 8, 4, 96, torch.bfloat16, "cuda", seed=77, softcap=20.0, alibi_slopes=slopes,
          window_left=300, window_right=0, diag_offset=2048 - 1025, layout="bhsd")


@gpu
@needs_cuda
def test_gpu_long_forward():
    """bf16 D=128 at 8192 (the benchmark shape), forward only against float64."""
    _case(1, 8192, 8192, 2, 2, 128, torch.bfloat16, "cuda", seed=8192, grad=False, window_right=0)

"""GPU tests of the hand-written CUDA kernels (csrc/cuda), through torch.ops.flashattn.

Calls ``torch.ops.flashattn.fwd`` / ``bwd`` directly (a small autograd.Function glues
them), and holds outputs and gradients to the float64 reference by the rule in
tests/rule.py. Run on the device machine: ``pytest -m gpu tests/test_cuda.py``.
"""
from __future__ import annotations

import math

import pytest
import torch

from rule import check_attention, random_qkv

pytestmark = pytest.mark.gpu


def _has_cuda_kernel() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import flashattn_py._C  # noqa: F401  (loads the library, registers the ops)
    except Exception:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("flashattn::fwd", "CUDA")
    except Exception:
        return False


if not _has_cuda_kernel():
    pytest.skip("needs a CUDA GPU and the compiled CUDA ops", allow_module_level=True)

DEV = "cuda"


class _FlashCuda(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, alibi, scale, softcap, wl, wr, off, deterministic):
        out, lse = torch.ops.flashattn.fwd(q, k, v, alibi, scale, softcap, wl, wr, off)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.alibi = alibi
        ctx.args = (scale, softcap, wl, wr, off, deterministic)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        scale, softcap, wl, wr, off, det = ctx.args
        if dout.stride(-1) != 1:
            dout = dout.contiguous()
        dq, dk, dv = torch.ops.flashattn.bwd(dout, q, k, v, out, lse, ctx.alibi, scale, softcap, wl, wr, off, det)
        return dq, dk, dv, None, None, None, None, None, None, None


def _runner(scale, softcap=0.0, alibi=None, wl=-1, wr=-1, off=0, deterministic=False):
    def run(q, k, v):
        return _FlashCuda.apply(q, k, v, alibi, scale, softcap, wl, wr, off, deterministic)

    return run


def _case(b, sq, sk, h, hk, d, dtype, *, seed, dv=None, softcap=0.0, alibi=False, wl=-1, wr=-1, off=0,
          layout="bshd", deterministic=False, grad=True):
    q, k, v = random_qkv(b, sq, sk, h, hk, d, dv, dtype=dtype, device=DEV, seed=seed, layout=layout)
    scale = 1.0 / math.sqrt(d)
    slopes = None
    if alibi:
        slopes = torch.rand(h, generator=torch.Generator().manual_seed(seed)).to(DEV) * 0.3
    run = _runner(scale, softcap, slopes, wl, wr, off, deterministic)
    check_attention(run, q, k, v, grad=grad, seed=seed, scale=scale, softcap=softcap, alibi_slopes=slopes,
                    window_left=wl, window_right=wr, diag_offset=off)


DTYPES = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [32, 64, 80, 96, 128, 256])
@pytest.mark.parametrize("s", [1, 17, 128, 1025])
def test_dense(dtype, d, s):
    _case(1, s, s, 2, 2, d, dtype, seed=1000 + d + s)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("sq,sk", [(17, 128), (128, 17), (1025, 128), (97, 1025), (128, 128)])
@pytest.mark.parametrize("align", ["bottom_right", "top_left"])
def test_causal(dtype, d, sq, sk, align):
    off = sk - sq if align == "bottom_right" else 0
    _case(2, sq, sk, 2, 1, d, dtype, seed=2000 + sq + sk + d, wr=0, off=off)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("wl,wr", [(16, 0), (32, 8), (0, 0), (5, -1), (-1, 40), (200, 3)])
@pytest.mark.parametrize("sq,sk", [(128, 128), (300, 257), (65, 513)])
def test_window(dtype, wl, wr, sq, sk):
    _case(1, sq, sk, 2, 2, 64, dtype, seed=3000 + wl + wr + sq, wl=wl, wr=wr, off=sk - sq)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hk", [1, 2, 3])
def test_gqa(dtype, hk):
    _case(2, 130, 200, 6, hk, 64, dtype, seed=4000 + hk)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("softcap,alibi", [(30.0, False), (0.0, True), (5.0, True)])
@pytest.mark.parametrize("d", [64, 128])
def test_alibi_softcap(dtype, softcap, alibi, d):
    _case(1, 200, 333, 4, 2, d, dtype, seed=5000 + d, softcap=softcap, alibi=alibi, wr=0, off=133)


@pytest.mark.parametrize("layout", ["bhsd", "strided"])
@pytest.mark.parametrize("d", [64, 80])
def test_layouts(layout, d):
    _case(2, 77, 130, 4, 2, d, torch.bfloat16, seed=6000 + d, layout=layout)


@pytest.mark.parametrize("d,dv", [(64, 32), (40, 128), (128, 64)])
def test_head_dim_v(d, dv):
    _case(1, 100, 150, 2, 1, d, torch.float16, seed=7000 + d + dv, dv=dv, wr=0, off=50)


@pytest.mark.parametrize("d", [64, 128, 256])
def test_deterministic(d):
    _case(1, 257, 300, 4, 2, d, torch.bfloat16, seed=8000 + d, deterministic=True, wl=100, wr=0, off=43)
    q, k, v = random_qkv(1, 257, 300, 4, 2, d, dtype=torch.bfloat16, device=DEV, seed=8100 + d)
    run = _runner(1.0 / math.sqrt(d), deterministic=True)
    grads = []
    for _ in range(2):
        qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
        out = run(qq, kk, vv)
        out.backward(torch.ones_like(out))
        grads.append((qq.grad, kk.grad, vv.grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b), "deterministic backward differs between runs"


def test_empty_rows_and_no_keys():
    # Bottom-right causal with Sq > Sk: the first Sq - Sk rows see nothing.
    q, k, v = random_qkv(1, 70, 10, 2, 2, 64, dtype=torch.float16, device=DEV, seed=9000)
    out, lse = torch.ops.flashattn.fwd(q.detach(), k.detach(), v.detach(), None, 0.125, 0.0, -1, 0, -60)
    assert torch.all(out[:, :60] == 0) and torch.all(torch.isneginf(lse[:, :, :60]))
    assert not torch.isnan(out).any()
    _case(1, 70, 10, 2, 2, 64, torch.float16, seed=9001, wr=0, off=-60)

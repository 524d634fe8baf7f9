"""Triton backend kernels (kernels/), held to the project's rule (docs/design.md).

CPU tests run the kernels in Triton's interpreter (``TRITON_INTERPRET=1``, set before
triton is imported) in fp32 / fp16; ``-m gpu`` tests run them compiled on CUDA.
"""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from devices import triton_kernels  # noqa: E402
from rule import GRAD_FACTOR, assert_rule, check_attention, random_qkv  # noqa: E402

_kernels = triton_kernels()
flash_bwd, flash_fwd, dropout_mask = _kernels.flash_bwd, _kernels.flash_fwd, _kernels.common.dropout_mask

INTERP = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
CPU_DEVICE = "cpu"
needs_interp = pytest.mark.skipif(not INTERP, reason="CPU tests run under TRITON_INTERPRET=1")
# Tests that run here under the interpreter and, `-m gpu` (benchmarks/gpu_check.sh), on a GPU.
HERE_AND_GPU = [
    pytest.param("cpu", marks=needs_interp),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(INTERP or not torch.cuda.is_available(),
                                                                    reason="needs CUDA (not the interpreter)")]),
]


@triton.jit
def _rand_kernel(Out, seed, offset, N: tl.constexpr):
    """``tl.rand(seed, offset + i)`` for i < N: Triton's own stream, which the dropout
    mask must equal (32-bit offsets, where every Triton agrees)."""
    offs = tl.arange(0, N)
    tl.store(Out + offs, tl.rand(seed, offset + offs))


class _TritonAttn(torch.autograd.Function):
    """``bias``: None or the (B, H, Sq, Sk) (expanded) bias / mask; its gradient flows back
    through the expand, so autograd sums it over the broadcast dims like the caller must."""

    @staticmethod
    def forward(ctx, q, k, v, bias, alibi, scale, softcap, left, right, diag, deterministic, dropout_p, rng_state):
        out, lse = flash_fwd(q, k, v, alibi, scale, softcap, left, right, diag,
                             attn_bias=bias, dropout_p=dropout_p, rng_state=rng_state)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.alibi, ctx.bias = alibi, bias
        ctx.args = (scale, softcap, left, right, diag, deterministic)
        ctx.drop = (dropout_p, rng_state)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        scale, softcap, left, right, diag, det = ctx.args
        bias = ctx.bias
        bias_grad = bias is not None and bias.dtype != torch.bool and ctx.needs_input_grad[3]
        dq, dk, dv, dbias = flash_bwd(dout, q, k, v, out, lse, ctx.alibi, scale, softcap, left, right, diag, det,
                                      attn_bias=bias, dropout_p=ctx.drop[0], rng_state=ctx.drop[1],
                                      bias_requires_grad=bias_grad)
        if bias_grad:
            assert dbias.dtype == torch.float32 and dbias.is_contiguous() and dbias.shape == bias.shape
            dbias = dbias.to(bias.dtype)
        return dq, dk, dv, dbias, None, None, None, None, None, None, None, None, None


def make_run(scale=None, softcap=0.0, alibi_slopes=None, window_left=-1, window_right=-1, diag_offset=0,
             deterministic=False, attn_bias=None, dropout_p=0.0, rng_state=None):
    def run(q, k, v):
        s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        bias = attn_bias
        if bias is not None:
            bias = bias.expand(q.shape[0], q.shape[2], q.shape[1], k.shape[1])
        return _TritonAttn.apply(q, k, v, bias, alibi_slopes, s, softcap, window_left, window_right, diag_offset,
                                 deterministic, dropout_p, rng_state)

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


@pytest.mark.parametrize("machine", ["here", pytest.param("gpu", marks=pytest.mark.gpu)])
def test_host_size_helpers_match_triton(machine):
    # kernels.common.cdiv / next_pow2 replace triton.cdiv / triton.next_power_of_2 in the
    # launchers' host code (constexpr functions on recent Triton, slow to call from Python):
    # same values, on this machine's Triton and (`-m gpu`) on the GPU machine's.
    common = _kernels.common
    assert all(common.next_pow2(n) == triton.next_power_of_2(n) for n in range(1, 5000))
    assert all(common.cdiv(a, b) == triton.cdiv(a, b) for a in range(0, 700) for b in (1, 3, 16, 64, 128))


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


@pytest.mark.parametrize("device", HERE_AND_GPU)
def test_rows_that_see_no_key_are_zero_beside_an_infinite_value(device):
    # As on the CPU (test_cpu.py): causal, bottom-right, 150 queries over 100 keys, so the
    # first 50 rows see no key while their blocks share products with rows that see key
    # 0, whose V is infinite: those rows are 0 with lse -inf, and so is their dq.
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, s, 2, 32, generator=gen).to(device) for s in (150, 100, 100))
    v[0, 0] = float("inf")
    q.requires_grad_()
    out = make_run(window_right=0, diag_offset=-50)(q, k, v)
    assert torch.equal(out[0, :50].detach(), torch.zeros_like(out[0, :50]))
    assert out[0, 50:].isinf().any() or out[0, 50:].isnan().any()  # (rows that see key 0)
    out.backward(torch.randn(out.shape, generator=gen).to(device))
    assert torch.equal(q.grad[0, :50], torch.zeros_like(q.grad[0, :50]))


@pytest.mark.parametrize("device", HERE_AND_GPU)
@pytest.mark.parametrize("mask", ["float bias + causal", "bool mask"])
def test_rows_that_see_no_key_get_zero_bias_gradient_beside_an_infinite_value(mask, device):
    # Rows emptied by the causal band (the first 50 of 150 x 100, bottom-right) or by a bool
    # mask (rows 0-9), sharing blocks with rows that see key 0, whose V is infinite: out,
    # dq and the bias gradient of those rows are 0, not 0 x the infinite dP of key 0.
    gen = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(1, s, 2, 32, generator=gen).to(device) for s in (150, 100, 100))
    v[0, 0] = float("inf")
    if mask == "bool mask":
        bias = torch.ones(1, 1, 150, 100, dtype=torch.bool)
        bias[..., :10, :] = False
        run, empty = make_run(attn_bias=bias.to(device)), 10
    else:
        bias = torch.randn(1, 2, 150, 100, generator=gen).to(device).requires_grad_()
        run, empty = make_run(window_right=0, diag_offset=-50, attn_bias=bias), 50
    q.requires_grad_()
    out = run(q, k, v)
    assert torch.equal(out[0, :empty].detach(), torch.zeros_like(out[0, :empty]))
    out.backward(torch.randn(out.shape, generator=gen).to(device))
    assert torch.equal(q.grad[0, :empty], torch.zeros_like(q.grad[0, :empty]))
    if bias.requires_grad:
        assert torch.equal(bias.grad[..., :empty, :], torch.zeros_like(bias.grad[..., :empty, :]))


@pytest.mark.parametrize("device", HERE_AND_GPU)
def test_window_sides_near_int32_max_are_no_bound(device):
    # Called on the kernels directly (no ops.attention in between): a side near 2**31 is
    # the unbounded call (it wrapped in the kernels' 32-bit positions: every row empty; a
    # left side with Sq > Sk loaded keys from about -2**31).
    gen = torch.Generator().manual_seed(15)
    q, k, v = (torch.randn(1, s, 2, 16, generator=gen).to(device) for s in (40, 30, 30))
    for sq in (40, 3):  # the block kernel and the decode kernel
        want = flash_fwd(q[:, :sq], k, v, None, 0.25, 0.0, -1, -1, 30 - sq)
        for window in ((2**31 - 1, -1), (-1, 2**31 - 1), (2**31 - 40, 2**31 - 40)):
            got = flash_fwd(q[:, :sq], k, v, None, 0.25, 0.0, *window, 30 - sq)
            assert all(torch.equal(a, b) for a, b in zip(want[:2], got[:2]))
    out, lse = flash_fwd(q, k, v, None, 0.25, 0.0, -1, -1, -10)[:2]
    dout = torch.randn(out.shape, generator=gen).to(device)
    want = flash_bwd(dout, q, k, v, out, lse, None, 0.25, 0.0, -1, -1, -10)
    got = flash_bwd(dout, q, k, v, out, lse, None, 0.25, 0.0, 2**31 - 1, 2**31 - 1, -10)
    assert all(torch.equal(a, b) for a, b in zip(want[:3], got[:3]))


@pytest.mark.parametrize("device", HERE_AND_GPU)
def test_a_head_that_sees_no_key_gets_zero_gradients_beside_an_infinite_value(device):
    # Head 0 sees no key (a bool mask), its key 0 has an infinite V, and 150 queries leave
    # padding rows in the last query block: every gradient of head 0 is 0 (dk took
    # 0 x inf = NaN from its rows, and from the padding rows), head 1 is untouched.
    gen = torch.Generator().manual_seed(14)
    q, k, v = (torch.randn(1, s, 2, 32, generator=gen).to(device) for s in (150, 100, 100))
    v[0, 0, 0] = float("inf")
    mask = torch.ones(1, 2, 150, 100, dtype=torch.bool)
    mask[:, 0] = False
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    out = make_run(attn_bias=mask.to(device))(q, k, v)
    out.backward(torch.randn(out.shape, generator=gen).to(device))
    for t in (out, q.grad, k.grad, v.grad):
        assert torch.equal(t[:, :, 0], torch.zeros_like(t[:, :, 0]))
        assert torch.isfinite(t[:, :, 1]).all()


@pytest.mark.parametrize("device", HERE_AND_GPU)
@pytest.mark.parametrize("num_splits", [1, 2])
def test_decode_rows_that_see_no_key_are_zero_beside_an_infinite_value(num_splits, device, monkeypatch):
    # The same through the decode kernel (few query rows per KV head) and, split, its
    # combine: 6 queries over 130 keys (more than two key blocks of any config, so that 2
    # splits do split), the diagonal at -2, so the first 2 rows see no key (in no split).
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 6, 4, 32, generator=gen).to(device)
    k, v = (torch.randn(1, 130, 2, 32, generator=gen).to(device) for _ in range(2))
    v[0, 0] = float("inf")
    combines = []
    combine = _kernels.fwd._combine_kernel

    class Counted:  # (the launcher indexes the kernel with its grid)
        def __getitem__(self, grid):
            combines.append(grid)
            return combine[grid]

    monkeypatch.setattr(_kernels.fwd, "_combine_kernel", Counted())
    out, lse = flash_fwd(q, k, v, None, 0.2, 0.0, -1, 0, -2, num_splits=num_splits)[:2]
    assert len(combines) == (num_splits > 1)
    assert torch.equal(out[0, :2], torch.zeros_like(out[0, :2]))
    assert torch.isneginf(lse[0, :, :2]).all()


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


@triton.jit
def _tanh_kernel(X, Out, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(Out + offs, _kernels.common.tanh_f32(tl.load(X + offs)))


@pytest.mark.parametrize("device", HERE_AND_GPU)
def test_softcap_tanh_is_accurate_near_zero(device):
    # The softcap's tanh(s / softcap) is near 0 for most scores when the softcap is large
    # (25-50 in Gemma-style models): 1 - 2 / (e^2x + 1) alone cancels there (relative error
    # up to 1e-4 at |x| = 1e-3), and softcap * tanh carried an ulp of 1 into every score.
    # On the GPU the compiled helper's exp2 and division may be the 2-ulp approximations
    # (about 3e-7 relative past |x| = 0.6): bound 1e-6 there, still far below the
    # cancellation's error.
    x = torch.cat([torch.linspace(-3, 3, 3072), torch.logspace(-6, 0, 512), -torch.logspace(-6, 0, 512)]).float()
    x = x.to(device)
    out = torch.empty_like(x)
    _tanh_kernel[(1,)](x, out, N=x.numel())
    exact = torch.tanh(x.double())
    rel = (out.double() - exact).abs() / exact.abs()
    assert rel.max().item() < (4e-7 if device == "cpu" else 1e-6), \
        f"max relative error {rel.max().item():.2e} at x = {x[rel.argmax()].item()}"


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


# ------------------------------------------------------------------ bias, masks, dropout

def _bias_case(batch, sq, sk, h, hk, d, dtype, device, seed, bias_shape=None, mask=None, neg_inf_rows=(),
               dropout_p=0.0, rng_offset=0, layout="bshd", **kw):
    """check_attention with an attention bias (float, ``bias_shape`` broadcast to (B, H, Sq, Sk)
    and expanded, its gradient checked too) or a bool ``mask``, and/or dropout with the
    kernels' own keep mask (the ``dropout_mask`` hook) given to the reference."""
    q, k, v = random_qkv(batch, sq, sk, h, hk, d, dtype=dtype, device=device, seed=seed, layout=layout)
    run_kw, ref_kw = dict(kw), dict(kw)
    bias = None
    if bias_shape is not None:
        gen = torch.Generator().manual_seed(seed + 100)
        base = torch.randn(bias_shape, generator=gen, dtype=torch.float64) * 2.0
        for r in neg_inf_rows:  # float -inf bias: rows with no usable key
            base[..., r, :] = float("-inf")
        bias = base.to(device=device, dtype=dtype).requires_grad_()
        run_kw["attn_bias"], ref_kw["attn_bias"] = bias, bias.detach().double()
    elif mask is not None:
        run_kw["attn_bias"] = ref_kw["attn_bias"] = mask.to(device)
    if dropout_p > 0:
        rng = torch.tensor([seed, rng_offset], dtype=torch.int64)
        keep = dropout_mask(rng, batch, h, sq, sk, dropout_p, device)
        assert keep.dtype == torch.bool and keep.shape == (batch, h, sq, sk)
        run_kw.update(dropout_p=dropout_p, rng_state=rng)
        ref_kw.update(dropout_p=dropout_p, dropout_mask=keep)
    check_attention(make_run(**run_kw), q, k, v, seed=seed, **ref_kw)
    if bias is None:
        return
    # bias gradient (summed over the broadcast dims by the expand's backward) against the
    # reference's gradient of a float64 leaf bias, for check_attention's upstream gradient
    ref_kw.pop("attn_bias")
    b64 = bias.detach().double().requires_grad_()
    blow = bias.detach().clone().requires_grad_()
    from flashattn_py.reference import attention_ref

    ref, _ = attention_ref(q.detach().double(), k.detach().double(), v.detach().double(), attn_bias=b64, **ref_kw)
    naive, _ = attention_ref(q.detach(), k.detach(), v.detach(), attn_bias=blow, **ref_kw)
    gen = torch.Generator().manual_seed(seed + 1)
    dout = torch.randn(ref.shape, generator=gen, dtype=torch.float64).to(device)
    ref.backward(dout)
    naive.backward(dout.to(naive.dtype))
    assert bias.grad is not None and bias.grad.shape == bias.shape
    assert_rule("dbias", bias.grad, b64.grad, blow.grad, GRAD_FACTOR, seed, 1e-6 * max(1.0, b64.grad.abs().max().item()))
    for r in neg_inf_rows:
        assert torch.all(bias.grad[..., r, :] == 0)


BIAS_SHAPES = [
    ("full", lambda b, h, sq, sk: (b, h, sq, sk), torch.float32),
    ("bcast_qk", lambda b, h, sq, sk: (1, 1, sq, sk), torch.float16),
    ("key_padding", lambda b, h, sq, sk: (b, 1, 1, sk), torch.float32),
    ("per_head_row", lambda b, h, sq, sk: (1, h, sq, 1), torch.float16),
]


@needs_interp
@pytest.mark.parametrize("name,shape_fn,dtype", BIAS_SHAPES, ids=[c[0] for c in BIAS_SHAPES])
def test_bias(name, shape_fn, dtype):
    _bias_case(2, 33, 40, 2, 1, 16, dtype, CPU_DEVICE, seed=41 + len(name), bias_shape=shape_fn(2, 2, 33, 40))


@needs_interp
def test_bias_causal_gqa_fp16():
    _bias_case(1, 40, 50, 4, 1, 16, torch.float16, CPU_DEVICE, seed=43, bias_shape=(1, 4, 40, 50),
               window_right=0, diag_offset=10)


@needs_interp
def test_bias_softcap_alibi_window():
    """dbias is the gradient of the final logits (before the softcap derivative)."""
    slopes = torch.tensor([0.2, 0.05], dtype=torch.float32)
    _bias_case(1, 40, 50, 2, 1, 16, torch.float32, CPU_DEVICE, seed=44, bias_shape=(1, 2, 40, 50), softcap=2.0,
               alibi_slopes=slopes, window_left=20, window_right=5, diag_offset=10)


@needs_interp
def test_bias_neg_inf_rows():
    """A float bias of -inf on whole rows: out 0, lse -inf, zero grads (dbias too), no NaN."""
    _bias_case(1, 40, 33, 2, 2, 16, torch.float32, CPU_DEVICE, seed=45, bias_shape=(1, 2, 40, 33),
               neg_inf_rows=(0, 17, 39))
    q, k, v = random_qkv(1, 40, 33, 2, 2, 16, seed=46)
    bias = torch.randn(1, 2, 40, 33)
    bias[:, :, 5] = float("-inf")
    out, lse = flash_fwd(q.detach(), k.detach(), v.detach(), None, 0.25, 0.0, -1, -1, 0, attn_bias=bias)
    assert torch.all(out[:, 5] == 0) and torch.isneginf(lse[:, :, 5]).all()
    assert torch.isfinite(lse[:, :, :5]).all() and not torch.isnan(out).any()


def _bool_masks(kind, b, h, sq, sk, seed):
    gen = torch.Generator().manual_seed(seed)
    if kind == "random":  # (B, 1, Sq, Sk) with some rows fully masked
        m = torch.rand(b, 1, sq, sk, generator=gen) > 0.6
        m[:, :, [0, 7, sq - 1]] = False
        return m.expand(b, h, sq, sk)
    if kind == "key_padding":  # (B, 1, 1, Sk): batch 0 keeps its first 23 keys, batch 1 none
        lengths = torch.tensor([23, 0])
        m = torch.arange(sk)[None, :] < lengths[:, None]
        return m.view(b, 1, 1, sk).expand(b, h, sq, sk)
    raise ValueError(kind)


@needs_interp
@pytest.mark.parametrize("kind,dtype", [("random", torch.float32), ("key_padding", torch.float16)],
                         ids=["random_fp32", "key_padding_fp16"])
def test_bool_mask(kind, dtype):
    mask = _bool_masks(kind, 2, 2, 33, 40, seed=50)
    _bias_case(2, 33, 40, 2, 1, 16, dtype, CPU_DEVICE, seed=51, mask=mask)
    q, k, v = random_qkv(2, 33, 40, 2, 1, 16, dtype=dtype, seed=52)
    out, lse = flash_fwd(q.detach(), k.detach(), v.detach(), None, 0.2, 0.0, -1, -1, 0, attn_bias=mask)
    empty = ~mask.any(-1)  # (B, H, Sq)
    assert empty.any()
    assert torch.isneginf(lse[empty]).all() and torch.isfinite(lse[~empty]).all()
    assert torch.all(out.transpose(1, 2)[empty] == 0) and not torch.isnan(out).any()


@needs_interp
def test_bool_mask_causal_gqa():
    mask = _bool_masks("random", 1, 4, 40, 33, seed=53)[:1]
    _bias_case(1, 40, 33, 4, 1, 16, torch.float16, CPU_DEVICE, seed=54, mask=mask, window_right=0, diag_offset=-10)


@needs_interp
@pytest.mark.parametrize("dtype,rng_offset", [(torch.float32, 2**32 - 1000), (torch.float16, 0)],
                         ids=["fp32_offset_past_2^32", "fp16"])
def test_dropout(dtype, rng_offset):
    _bias_case(2, 33, 40, 2, 1, 16, dtype, CPU_DEVICE, seed=61, dropout_p=0.17, rng_offset=rng_offset)


@needs_interp
def test_dropout_causal_bias_gqa():
    _bias_case(1, 40, 50, 2, 1, 16, torch.float32, CPU_DEVICE, seed=62, bias_shape=(1, 1, 40, 50),
               dropout_p=0.3, rng_offset=12345, window_right=0, diag_offset=10)


@needs_interp
def test_dropout_reproducible():
    """The same rng_state gives bitwise identical output and gradients; another seed does not."""
    q, k, v = random_qkv(1, 20, 24, 2, 1, 16, seed=63)
    results = []
    for seed in (7, 7, 8):
        qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
        out = make_run(dropout_p=0.25, rng_state=torch.tensor([seed, 99]))(qq, kk, vv)
        out.sum().backward()
        results.append((out.detach(), qq.grad, kk.grad, vv.grad))
    for a, b in zip(results[0], results[1]):
        assert torch.equal(a, b)
    assert not torch.equal(results[0][0], results[2][0])


@needs_interp
def test_dropout_mask_statistics():
    """Kept fraction ~ 1 - p; heads and rows draw different numbers; offsets are per element."""
    p = 0.3
    keep = dropout_mask(torch.tensor([2024, 0]), 1, 2, 256, 256, p, CPU_DEVICE)  # 131072 draws
    assert keep.shape == (1, 2, 256, 256) and keep.dtype == torch.bool
    assert abs(keep.float().mean().item() - (1 - p)) < 0.01
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0, 0], keep[0, 0, 1])
    # element (b, h, i, j) uses offset + ((b*H + h)*Sq + i)*Sk + j: shifting the offset by
    # one row (Sk) shifts the mask by one row
    shifted = dropout_mask(torch.tensor([2024, 16]), 1, 1, 8, 16, p, CPU_DEVICE)
    assert torch.equal(shifted[0, 0, :7], dropout_mask(torch.tensor([2024, 0]), 1, 1, 8, 16, p, CPU_DEVICE)[0, 0, 1:])


@needs_interp
def test_dropout_stream_is_tl_rand():
    """The keep mask is ``tl.rand(seed, offset) >= p`` (32-bit offsets, where every Triton agrees)."""
    u = torch.empty(512)
    _rand_kernel[(1,)](u, 77, 1000, N=512)
    keep = dropout_mask(torch.tensor([77, 1000]), 1, 2, 16, 16, 0.4, CPU_DEVICE)
    assert torch.equal(keep.flatten(), u >= 0.4)


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
    # fp32 with a Gemma-sized softcap: most s / softcap near 0, where tanh_f32 once cancelled
    ("fp32_d64_softcap25", torch.float32, 1, 512, 700, 4, 2, 64, "bshd", dict(softcap=25.0, scale=0.3)),
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


@gpu
@needs_cuda
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_fp32_gradients_at_larger_logits(causal):
    """fp32 with q and k 3x the usual (scores of std about 9): the backward recomputes the
    scores as K Q^T, which must be bitwise the forward's Q K^T for exp(S - lse) to hold the
    gradients to the rule (an ulp of S at |S| ~ 35 is what the gradients amplify). The fp32
    dots ("ieee") are FMA chains over the head dim in either orientation; under the
    interpreter numpy sums the transposed product in another order, and dK / dV miss the
    rule in 5-20 % of such cases (README 'Limits')."""
    for seed in range(8):
        q, k, v = random_qkv(1, 300, 300, 2, 1, 64, dtype=torch.float32, device="cuda", seed=seed)
        q, k = q * 3, k * 3
        kw = dict(window_right=0) if causal else {}
        check_attention(make_run(**kw), q, k, v, seed=seed, **kw)


# (name, dtype, batch, Sq, Sk, H, Hk, D, _bias_case kwargs); bf16 bias / mask / dropout
GPU_BIAS_CASES = [
    ("bf16_bias_full_causal_gqa", torch.bfloat16, 2, 1000, 1024, 4, 2, 128,
     dict(bias_shape=(2, 4, 1000, 1024), window_right=0, diag_offset=24)),
    ("bf16_bias_key_padding", torch.bfloat16, 2, 512, 777, 4, 4, 64, dict(bias_shape=(2, 1, 1, 777))),
    ("fp16_bias_bcast_window", torch.float16, 1, 1024, 1024, 4, 1, 64,
     dict(bias_shape=(1, 1, 1024, 1024), window_left=128, window_right=32)),
    ("bf16_dropout", torch.bfloat16, 2, 1024, 1024, 4, 2, 128, dict(dropout_p=0.1, rng_offset=2**32 - 4096)),
    ("bf16_dropout_bias_causal", torch.bfloat16, 1, 777, 1025, 4, 1, 96,
     dict(dropout_p=0.2, bias_shape=(1, 4, 777, 1025), window_right=0, diag_offset=248)),
]


@gpu
@needs_cuda
@pytest.mark.parametrize("case", GPU_BIAS_CASES, ids=lambda c: c[0])
def test_gpu_bias_dropout(case):
    _, dtype, batch, sq, sk, h, hk, d, kw = case
    _bias_case(batch, sq, sk, h, hk, d, dtype, "cuda", seed=d + sq, **kw)


@gpu
@needs_cuda
@pytest.mark.parametrize("kind", ["random", "key_padding"])
def test_gpu_bool_mask(kind):
    sq, sk = 333, 512
    mask = _bool_masks(kind, 2, 4, sq, sk, seed=5).cuda()
    _bias_case(2, sq, sk, 4, 2, 128, torch.bfloat16, "cuda", seed=6, mask=mask, window_right=0, diag_offset=sk - sq)


@gpu
@needs_cuda
def test_gpu_dropout_mask_statistics():
    """Compiled, the mask is still ``tl.rand(seed, offset + ((b*H + h)*Sq + i)*Sk + j) >= p``
    (what test_dropout_stream_is_tl_rand checks under the interpreter) and a problem's first
    rows are a smaller problem's with the same Sk (the offsets depend on Sk, not on Sq)."""
    keep = dropout_mask(torch.tensor([3, 5]), 2, 8, 1024, 1024, 0.25, "cuda")
    assert abs(keep.float().mean().item() - 0.75) < 0.002
    first_rows = dropout_mask(torch.tensor([3, 5]), 1, 1, 64, 1024, 0.25, "cuda")
    assert torch.equal(first_rows, keep[:1, :1, :64])
    u = torch.empty(4096, device="cuda")
    _rand_kernel[(1,)](u, 3, 5, N=4096)
    assert torch.equal(keep.flatten()[:4096], u >= 0.25)


@pytest.mark.parametrize("device", HERE_AND_GPU)
def test_float32_mask_with_fp16_inputs(device):
    # A float32 mask is read as float32 (as torch's SDPA and the CPU kernels do), not
    # rounded to fp16: a bias near 200 keeps its differences (fp16 steps by 0.125 there).
    # Triton here and on a GPU, and there the CUDA backend too where it is built.
    import flashattn_py
    from devices import has_cuda_kernels
    from flashattn_py.reference import attention_ref
    backends = ["triton"] + (["cuda"] if device == "cuda" and has_cuda_kernels() else [])
    gen = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(2, 2, 21, 16, generator=gen).half() for _ in range(3))
    mask = torch.randn(2, 1, 21, 21, generator=gen) * 0.05 + 200
    exact = [t.double().requires_grad_() for t in (q, k, v, mask)]
    naive = [t.clone().requires_grad_() for t in (q, k, v, mask)]
    want = torch.nn.functional.scaled_dot_product_attention(*exact[:3], attn_mask=exact[3])
    low_out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # torch's own fp16 (CPU)
    # gradients against the naive formula in fp16 (the mask added in float32, as torch does)
    low = attention_ref(*(t.transpose(1, 2) for t in naive[:3]), attn_bias=naive[3].expand(2, 2, 21, 21))[0]
    dout = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    for out in (want, low.transpose(1, 2)):
        out.backward(dout.to(out.dtype))
    for backend in backends:
        mine = [t.detach().clone().to(device).requires_grad_() for t in (q, k, v, mask)]
        with flashattn_py.use_backend(backend):
            got = flashattn_py.scaled_dot_product_attention(*mine[:3], attn_mask=mine[3])
        assert_rule(f"{backend} out", got.cpu(), want, low_out, 2)
        got.backward(dout.to(device=device, dtype=got.dtype))
        assert mine[3].grad.dtype == torch.float32
        for name, a, b, c in zip(("dq", "dk", "dv", "dmask"), mine, exact, naive):
            assert_rule(f"{backend} {name}", a.grad.cpu(), b.grad, c.grad, 3)


@pytest.mark.parametrize("device", HERE_AND_GPU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rows_masked_with_the_float_minimum_average_as_torch(device, dtype):
    # transformers' masks put torch.finfo(float32).min where a key is hidden: a row hidden
    # everywhere (left padding) is torch's uniform average of V, not an empty row. Triton's
    # and CUDA's log2 scaling of the bias overflowed that minimum to -inf: zeros, and zero
    # gradients (1.08 off). Each fused backend of the device, against torch in float64.
    import flashattn_py
    from devices import has_cuda_kernels
    backends = ["triton", "cpu"] if device == "cpu" else ["triton"] + (
        ["cuda"] if has_cuda_kernels() and dtype != torch.float32 else [])
    gen = torch.Generator().manual_seed(13)
    q, k, v = (torch.randn(2, 2, 9, 16, generator=gen).to(dtype) for _ in range(3))
    lowest = torch.finfo(torch.float32).min
    mask = torch.zeros(2, 1, 9, 9).masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), lowest)
    mask[1, :, :, :3] = lowest  # sequence 1 left-padded by 3: its rows 0-2 see nothing
    exact = [t.double().requires_grad_() for t in (q, k, v)]
    naive = [t.clone().requires_grad_() for t in (q, k, v)]
    want = torch.nn.functional.scaled_dot_product_attention(*exact, attn_mask=mask.double())
    low = torch.nn.functional.scaled_dot_product_attention(*naive, attn_mask=mask)  # torch in dtype (CPU)
    dout = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    want.backward(dout)
    low.backward(dout.to(dtype))
    for backend in backends:
        leaves = [t.detach().clone().to(device).requires_grad_() for t in (q, k, v)]
        with flashattn_py.use_backend(backend):
            got = flashattn_py.scaled_dot_product_attention(*leaves, attn_mask=mask.to(device))
        assert_rule(f"{backend} out", got.cpu(), want, low, 2)
        got.backward(dout.to(device=device, dtype=dtype))
        for name, a, b, c in zip("qkv", leaves, exact, naive):
            assert_rule(f"{backend} d{name}", a.grad.cpu(), b.grad, c.grad, 3)

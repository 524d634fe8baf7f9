"""GPU tests of the hand-written CUDA kernels (csrc/cuda), through torch.ops.flashattn.

Calls ``torch.ops.flashattn.fwd`` / ``bwd`` directly (a small autograd.Function glues
them), and holds outputs and gradients to the float64 reference by the rule in
tests/rule.py. Run on the device machine: ``pytest -m gpu tests/test_cuda.py``.
"""
from __future__ import annotations

import math

import pytest
import torch

from flashattn_py.reference import attention_ref
from devices import has_cuda_kernels
from op_args import dense_tail
from rule import assert_rule, check_attention, random_qkv

pytestmark = pytest.mark.gpu


if not has_cuda_kernels():
    pytest.skip("needs a CUDA GPU and the compiled CUDA ops", allow_module_level=True)

# The compiled ops' arguments after rng_state (packed sequences, pages, KV cache, splits, the
# CPU path) in a dense call.
DENSE = dense_tail()
DEV = "cuda"


def _expand_bias(bias, b, h, sq, sk):
    """A bias / mask broadcastable to (B, H, Sq, Sk) as the ops take it: an expanded view."""
    if bias is None:
        return None
    while bias.dim() < 4:
        bias = bias.unsqueeze(0)
    return bias.expand(b, h, sq, sk)


class _FlashCuda(torch.autograd.Function):
    """torch.ops.flashattn.fwd / bwd on CUDA; `bias` (broadcastable to (B, H, Sq, Sk)) gets
    its gradient summed back to its own shape when it requires grad."""

    @staticmethod
    def forward(ctx, q, k, v, bias, alibi, scale, softcap, wl, wr, off, deterministic, dropout_p, rng_state):
        b, sq, h, _ = q.shape
        sk = k.shape[1]
        bias4 = _expand_bias(bias, b, h, sq, sk)
        out, lse = torch.ops.flashattn.fwd(q, k, v, alibi, bias4, scale, softcap, wl, wr, off, dropout_p, rng_state,
                                           *DENSE)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.alibi, ctx.bias4, ctx.rng_state = alibi, bias4, rng_state
        ctx.bias_shape = None if bias is None else bias.shape
        ctx.args = (scale, softcap, wl, wr, off, dropout_p, deterministic)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        scale, softcap, wl, wr, off, dropout_p, det = ctx.args
        if dout.stride(-1) != 1:
            dout = dout.contiguous()
        bias_grad = ctx.bias_shape is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dbias = torch.ops.flashattn.bwd(dout, q, k, v, out, lse, ctx.alibi, ctx.bias4, scale, softcap, wl,
                                                    wr, off, dropout_p, ctx.rng_state, *DENSE, det, bias_grad)
        db = None
        if bias_grad:
            assert dbias.shape == ctx.bias4.shape and dbias.dtype == torch.float32
            db = dbias
            shape = (1,) * (4 - len(ctx.bias_shape)) + tuple(ctx.bias_shape)
            dims = [i for i in range(4) if shape[i] == 1 and db.shape[i] != 1]
            if dims:
                db = db.sum(dims, keepdim=True)
            db = db.reshape(ctx.bias_shape).to(ctx.bias4.dtype)
        return dq, dk, dv, db, None, None, None, None, None, None, None, None, None


def _runner(scale, softcap=0.0, alibi=None, wl=-1, wr=-1, off=0, deterministic=False, bias=None, dropout_p=0.0,
            rng_state=None):
    def run(q, k, v):
        return _FlashCuda.apply(q, k, v, bias, alibi, scale, softcap, wl, wr, off, deterministic, dropout_p,
                                rng_state)

    return run


def _fwd(q, k, v, scale, *, bias=None, wl=-1, wr=-1, off=0, dropout_p=0.0, rng_state=None):
    """(out, lse) straight from torch.ops.flashattn.fwd."""
    b, sq, h, _ = q.shape
    return torch.ops.flashattn.fwd(q.detach(), k.detach(), v.detach(), None,
                                   _expand_bias(bias, b, h, sq, k.shape[1]), scale, 0.0, wl, wr, off, dropout_p,
                                   rng_state, *DENSE)


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
@pytest.mark.parametrize("wl,wr,off", [(63, 0, 0), (64, 0, 0), (0, 63, 0), (127, 128, -1), (5, 5, -130),
                                       (-1, 0, -200), (0, -1, 200), (16, 16, 129)])
@pytest.mark.parametrize("sq,sk", [(128, 129), (129, 128), (64, 256)])
def test_window_edges_on_block_boundaries(dtype, wl, wr, off, sq, sk):
    # The half-open key / query ranges (flash_common.cuh Window, block_range) where a window
    # edge, the sequence end or an empty range falls on or next to a 64- / 128-row block
    # boundary, forward and backward; rows that see no key (large offsets) too.
    _case(1, sq, sk, 2, 1, 64, dtype, seed=3500 + wl + wr + off + sq, wl=wl, wr=wr, off=off)


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


def test_cpu_path_is_ignored_through_the_spec():
    # The ops' cpu_path (ops.py FWD; FlashParams grew by it) is the CPU kernels' own: the
    # CUDA entries, reached through the spec as every call reaches them, give bitwise the
    # same out, lse and (deterministic) gradients whatever its value, and those are the
    # reference's by the rule.
    from flashattn_py import ops

    q, k, v = (t.detach() for t in random_qkv(2, 97, 130, 4, 2, 64, dtype=torch.float16, device=DEV, seed=8300))
    dout = torch.randn_like(q)
    results = []
    for path in (0, 3, 8):
        options = dict(scale=0.125, window_right=0, diag_offset=33, cpu_path=path, deterministic=True,
                       backend="cuda")
        out, lse = ops.attn_fwd(*ops.fwd_args(q, k, v, **options))
        grads = ops.attn_bwd(*ops.bwd_args(dout, q, k, v, out, lse, **options))[:3]
        results.append((out, lse, *grads))
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))
    check_attention(_runner(0.125, wr=0, off=33, deterministic=True), *random_qkv(
        2, 97, 130, 4, 2, 64, dtype=torch.float16, device=DEV, seed=8300), seed=8300, scale=0.125, window_right=0,
        diag_offset=33)


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
    out, lse = _fwd(q, k, v, 0.125, wr=0, off=-60)
    assert torch.all(out[:, :60] == 0) and torch.all(torch.isneginf(lse[:, :, :60]))
    assert not torch.isnan(out).any()
    _case(1, 70, 10, 2, 2, 64, torch.float16, seed=9001, wr=0, off=-60)


# ---------------------------------------------------------------------------------
# Attention bias / bool masks (read through strides, broadcast dims with stride 0) and
# dropout (Philox draws identical to the CPU kernel's, so torch.ops.flashattn.dropout_mask
# on the CPU gives the kernel's keep-mask).


def _bias(shape, dtype, seed, requires_grad=False):
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(DEV, dtype)
    return t.requires_grad_(requires_grad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ["full", "bcast_batch_head", "key_padding", "per_head_row", "query_key"])
@pytest.mark.parametrize("d", [64, 128])
def test_float_bias(dtype, shape, d):
    b, sq, sk, h, hk = 2, 97, 200, 4, 2
    shapes = {"full": (b, h, sq, sk), "bcast_batch_head": (1, 1, sq, sk), "key_padding": (b, 1, 1, sk),
              "per_head_row": (1, h, sq, 1), "query_key": (sq, sk)}
    q, k, v = random_qkv(b, sq, sk, h, hk, d, dtype=dtype, device=DEV, seed=10000 + d)
    bias = _bias(shapes[shape], dtype, 10001 + d)
    scale = 1.0 / math.sqrt(d)
    check_attention(_runner(scale, bias=bias), q, k, v, seed=10000 + d, scale=scale, attn_bias=bias)


@pytest.mark.parametrize("d", [32, 96, 256])
def test_float_bias_head_dims_causal(d):
    q, k, v = random_qkv(1, 130, 77, 2, 1, d, dtype=torch.float16, device=DEV, seed=10100 + d)
    bias = _bias((1, 2, 130, 77), torch.float16, 10101 + d)
    scale = 1.0 / math.sqrt(d)
    check_attention(_runner(scale, bias=bias, wr=0, off=-53), q, k, v, seed=10100 + d, scale=scale, attn_bias=bias,
                    window_right=0, diag_offset=-53)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ["full", "key_padding", "query_key"])
@pytest.mark.parametrize("causal", [False, True])
def test_bool_mask_with_fully_masked_rows(dtype, shape, causal):
    b, sq, sk, h = 2, 70, 150, 4
    shapes = {"full": (b, h, sq, sk), "key_padding": (b, 1, 1, sk), "query_key": (sq, sk)}
    gen = torch.Generator().manual_seed(11000)
    mask = torch.rand(shapes[shape], generator=gen) > 0.4
    if shape != "key_padding":
        mask[..., 3, :] = False      # a fully masked query row
        mask[..., 40:45, :] = False
    else:
        mask[1] = False               # batch 1 sees nothing
    mask = mask.to(DEV)
    q, k, v = random_qkv(b, sq, sk, h, 2, 64, dtype=dtype, device=DEV, seed=11001)
    wr, off = (0, sk - sq) if causal else (-1, 0)
    check_attention(_runner(0.125, bias=mask, wr=wr, off=off), q, k, v, seed=11001, scale=0.125, attn_bias=mask,
                    window_right=wr, diag_offset=off)
    out, lse = _fwd(q, k, v, 0.125, bias=mask, wr=wr, off=off)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    if shape != "key_padding":
        assert torch.all(out[:, 3] == 0) and torch.all(torch.isneginf(lse[:, :, 3]))
        assert torch.all(out[:, 40:45] == 0)
    else:
        assert torch.all(out[1] == 0) and torch.all(torch.isneginf(lse[1]))


def test_key_padding_long_keys_and_neg_inf_float_bias():
    # Whole key blocks masked (keys >= 100 of batch 0), and a float bias of -inf that
    # empties rows (online softmax with a row max of -inf).
    b, sq, sk, h = 2, 33, 600, 2
    keep = torch.ones(b, 1, 1, sk, dtype=torch.bool)
    keep[0, ..., 100:] = False
    keep = keep.to(DEV)
    q, k, v = random_qkv(b, sq, sk, h, h, 64, dtype=torch.bfloat16, device=DEV, seed=11100)
    check_attention(_runner(0.125, bias=keep), q, k, v, seed=11100, scale=0.125, attn_bias=keep)
    bias = _bias((b, h, sq, sk), torch.float16, 11101)
    bias[:, :, 5] = float("-inf")
    bias[0, :, 7, 300:] = float("-inf")
    q, k, v = random_qkv(b, sq, sk, h, h, 64, dtype=torch.float16, device=DEV, seed=11102)
    check_attention(_runner(0.125, bias=bias), q, k, v, seed=11102, scale=0.125, attn_bias=bias)
    out, lse = _fwd(q, k, v, 0.125, bias=bias)
    assert torch.all(out[:, 5] == 0) and torch.all(torch.isneginf(lse[:, :, 5]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask", ["causal", "float bias + causal", "bool mask"])
def test_rows_that_see_no_key_are_zero_beside_an_infinite_value(dtype, mask):
    # Rows that see no key (the first 50 of a bottom-right causal 150 x 100, or rows 0-9 of
    # a bool mask) share tiles with rows that see key 0, whose V is infinite: out, dq and
    # the bias gradient of those rows are 0 (not 0 x inf = NaN), lse -inf.
    gen = torch.Generator().manual_seed(13)
    q, k, v = (torch.randn(1, s, 2, 64, generator=gen).to(DEV, dtype) for s in (150, 100, 100))
    v[0, 0] = float("inf")
    bias, wr, off, empty = None, 0, -50, 50
    if mask == "bool mask":
        bias = torch.ones(1, 1, 150, 100, dtype=torch.bool, device=DEV)
        bias[..., :10, :] = False
        wr, off, empty = -1, 0, 10
    elif mask == "float bias + causal":
        bias = torch.randn(1, 2, 150, 100, generator=gen).to(DEV, dtype).requires_grad_()
    out, lse = _fwd(q, k, v, 0.125, bias=bias, wr=wr, off=off)
    assert torch.equal(out[0, :empty], torch.zeros_like(out[0, :empty]))
    assert torch.isneginf(lse[0, :, :empty]).all()
    q.requires_grad_()
    out = _runner(0.125, bias=bias, wr=wr, off=off)(q, k, v)
    out.backward(torch.randn(out.shape, generator=gen).to(DEV, dtype))
    assert torch.equal(q.grad[0, :empty], torch.zeros_like(q.grad[0, :empty]))
    if bias is not None and bias.requires_grad:
        assert torch.equal(bias.grad[..., :empty, :], torch.zeros_like(bias.grad[..., :empty, :]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_head_that_sees_no_key_gets_zero_gradients_beside_an_infinite_value(dtype):
    # Head 0 sees no key (a bool mask) and its key 0 has an infinite V; 150 queries leave
    # rows past the last one in the last query block: every output and gradient of head 0
    # is 0, head 1 is finite.
    gen = torch.Generator().manual_seed(14)
    q, k, v = (torch.randn(1, s, 2, 64, generator=gen).to(DEV, dtype) for s in (150, 100, 100))
    v[0, 0, 0] = float("inf")
    mask = torch.ones(1, 2, 150, 100, dtype=torch.bool, device=DEV)
    mask[:, 0] = False
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    out = _runner(0.125, bias=mask)(q, k, v)
    out.backward(torch.randn(out.shape, generator=gen).to(DEV, dtype))
    for t in (out, q.grad, k.grad, v.grad):
        assert torch.equal(t[:, :, 0], torch.zeros_like(t[:, :, 0]))
        assert torch.isfinite(t[:, :, 1]).all()


def _check_bias_grad(bias_shape, dtype, d, seed, deterministic=False, **kw):
    b, sq, sk, h, hk = 2, 77, 130, 4, 2
    q, k, v = random_qkv(b, sq, sk, h, hk, d, dtype=dtype, device=DEV, seed=seed)
    bias = _bias(bias_shape, dtype, seed + 1, requires_grad=True)
    scale = 1.0 / math.sqrt(d)
    ref_kw = dict(scale=scale, softcap=kw.get("softcap", 0.0), alibi_slopes=kw.get("alibi"),
                  window_left=kw.get("wl", -1), window_right=kw.get("wr", -1), diag_offset=kw.get("off", 0))
    run = _runner(scale, kw.get("softcap", 0.0), kw.get("alibi"), kw.get("wl", -1), kw.get("wr", -1),
                  kw.get("off", 0), deterministic, bias=bias)
    out = run(q.detach(), k.detach(), v.detach())
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64).to(DEV)
    out.backward(dout.to(dtype))
    b64 = bias.detach().double().requires_grad_()
    ref, _ = attention_ref(q.detach().double(), k.detach().double(), v.detach().double(), attn_bias=b64, **ref_kw)
    ref.backward(dout)
    bl = bias.detach().clone().requires_grad_()
    naive, _ = attention_ref(q.detach(), k.detach(), v.detach(), attn_bias=bl, **ref_kw)
    naive.backward(dout.to(dtype))
    assert bias.grad is not None and bias.grad.shape == bias.shape
    assert_rule("dbias", bias.grad, b64.grad, bl.grad, 3.0, seed, atol=1e-6 * max(1.0, b64.grad.abs().max().item()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias_shape", [(2, 4, 77, 130), (1, 4, 77, 130), (77, 130), (2, 1, 1, 130)])
def test_bias_grad(dtype, bias_shape):
    _check_bias_grad(bias_shape, dtype, 64, 12000 + len(bias_shape))


@pytest.mark.parametrize("d", [32, 128, 256])
@pytest.mark.parametrize("deterministic", [False, True])
def test_bias_grad_softcap_alibi_window(d, deterministic):
    alibi = torch.rand(4, generator=torch.Generator().manual_seed(12100)).to(DEV) * 0.2
    _check_bias_grad((2, 4, 77, 130), torch.bfloat16, d, 12100 + d, deterministic, softcap=5.0, alibi=alibi, wl=40,
                     wr=3, off=53)


def _rng(seed, offset=0):
    return torch.tensor([seed, offset], dtype=torch.int64)


def _keep_mask(rng_state, b, h, sq, sk, p):
    return torch.ops.flashattn.dropout_mask(rng_state, b, h, sq, sk, p).to(DEV)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_dropout_matches_reference_with_the_mask(dtype, d, causal):
    b, sq, sk, h, hk, p = 2, 97, 131, 4, 2, 0.3
    rng = _rng(1234 + d, 7)
    keep = _keep_mask(rng, b, h, sq, sk, p)
    q, k, v = random_qkv(b, sq, sk, h, hk, d, dtype=dtype, device=DEV, seed=13000 + d)
    scale = 1.0 / math.sqrt(d)
    wr, off = (0, sk - sq) if causal else (-1, 0)
    check_attention(_runner(scale, wr=wr, off=off, dropout_p=p, rng_state=rng), q, k, v, seed=13000 + d, scale=scale,
                    window_right=wr, diag_offset=off, dropout_p=p, dropout_mask=keep)


@pytest.mark.parametrize("deterministic", [False, True])
def test_dropout_with_bias_and_bias_grad(deterministic):
    b, sq, sk, h, p = 1, 65, 257, 2, 0.2
    rng = _rng(99, 3)
    keep = _keep_mask(rng, b, h, sq, sk, p)
    q, k, v = random_qkv(b, sq, sk, h, h, 64, dtype=torch.float16, device=DEV, seed=13100)
    bias = _bias((1, h, sq, sk), torch.float16, 13101)
    check_attention(_runner(0.125, bias=bias, dropout_p=p, rng_state=rng, deterministic=deterministic), q, k, v,
                    seed=13100, scale=0.125, attn_bias=bias, dropout_p=p, dropout_mask=keep)
    # dbias with dropout.
    bias_g = bias.detach().clone().requires_grad_()
    out = _runner(0.125, bias=bias_g, dropout_p=p, rng_state=rng, deterministic=deterministic)(
        q.detach(), k.detach(), v.detach())
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(13102), dtype=torch.float64).to(DEV)
    out.backward(dout.half())
    b64 = bias.detach().double().requires_grad_()
    ref, _ = attention_ref(q.detach().double(), k.detach().double(), v.detach().double(), scale=0.125, attn_bias=b64,
                           dropout_p=p, dropout_mask=keep)
    ref.backward(dout)
    bl = bias.detach().clone().requires_grad_()
    naive, _ = attention_ref(q.detach(), k.detach(), v.detach(), scale=0.125, attn_bias=bl, dropout_p=p,
                             dropout_mask=keep)
    naive.backward(dout.half())
    assert_rule("dbias", bias_g.grad, b64.grad, bl.grad, 3.0, 13100, atol=1e-6 * max(1.0, b64.grad.abs().max().item()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [32, 256])
def test_deterministic_dropout_bias_both_dtypes(dtype, d):
    # The kernels' shared prologue / epilogue helpers (flash_common.cuh: head_view,
    # bwd_rows, seq_window, block_range, Dropout::factor_of) changed the code of every
    # kernel; the dQ kernel with bias and dropout (kExt) changed most at these head dims,
    # in both dtypes: outputs and gradients against the reference with the kernel's mask.
    b, sq, sk, h, hk, p = 1, 70, 190, 4, 2, 0.2
    rng = _rng(77 + d, 1)
    keep = _keep_mask(rng, b, h, sq, sk, p)
    q, k, v = random_qkv(b, sq, sk, h, hk, d, dtype=dtype, device=DEV, seed=13300 + d)
    bias = _bias((1, h, sq, sk), dtype, 13301 + d)
    scale = d ** -0.5
    check_attention(_runner(scale, bias=bias, dropout_p=p, rng_state=rng, deterministic=True), q, k, v,
                    seed=13300 + d, scale=scale, attn_bias=bias, dropout_p=p, dropout_mask=keep)


def test_dropout_same_rng_same_output_and_matches_cpu():
    b, sq, sk, h, p = 2, 64, 100, 2, 0.5
    q, k, v = random_qkv(b, sq, sk, h, h, 64, dtype=torch.float16, device=DEV, seed=13200)
    a, _ = _fwd(q, k, v, 0.125, dropout_p=p, rng_state=_rng(5, 1))
    a2, _ = _fwd(q, k, v, 0.125, dropout_p=p, rng_state=_rng(5, 1))
    c, _ = _fwd(q, k, v, 0.125, dropout_p=p, rng_state=_rng(5, 2))
    assert torch.equal(a, a2) and not torch.equal(a, c)
    # The CPU kernel (same Philox stream) on the same inputs: the same dropped pattern.
    cpu, _ = torch.ops.flashattn.fwd(q.detach().float().cpu(), k.detach().float().cpu(), v.detach().float().cpu(),
                                     None, None, 0.125, 0.0, -1, -1, 0, p, _rng(5, 1), *DENSE)
    assert torch.allclose(a.float().cpu(), cpu, atol=2e-2, rtol=2e-2)
    # Backward twice with the same rng state: bitwise identical (deterministic mode).
    grads = []
    for _ in range(2):
        qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
        out = _runner(0.125, dropout_p=p, rng_state=_rng(5, 1), deterministic=True)(qq, kk, vv)
        out.backward(torch.ones_like(out))
        grads.append((qq.grad, kk.grad, vv.grad))
    for x, y in zip(*grads):
        assert torch.equal(x, y)
    keep = _keep_mask(_rng(1, 0), 2, 8, 512, 512, 0.1)
    assert abs(keep.float().mean().item() - 0.9) < 0.01

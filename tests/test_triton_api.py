"""The triton backend through the public API and custom ops (interpreter on CPU)."""
import os

import pytest
import torch

import flashattn_py
from flashattn_py import backends, ops

from flashattn_py.reference import attention_ref
from rule import assert_rule, check_attention, random_qkv

pytestmark = [
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU runs need TRITON_INTERPRET=1"),
    pytest.mark.skipif(backends.triton_error() is not None, reason="triton not available"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_flash_attn_func_triton(dtype):
    q, k, v = random_qkv(1, 37, 50, 4, 2, 32, dtype=dtype, seed=2)
    slopes = torch.rand(4) * 0.2
    run = lambda q, k, v: flashattn_py.flash_attn_func(  # noqa: E731
        q, k, v, causal=True, softcap=4.0, alibi_slopes=slopes, backend="triton")
    check_attention(run, q, k, v, seed=2, softcap=4.0, alibi_slopes=slopes, window_right=0, diag_offset=13)


def test_sdpa_layout_triton():
    q, k, v = random_qkv(2, 29, 29, 2, 2, 16, layout="bhsd", seed=4)
    with flashattn_py.use_backend("triton"):
        run = lambda q, k, v: flashattn_py.scaled_dot_product_attention(  # noqa: E731
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True).transpose(1, 2)
        check_attention(run, q, k, v, seed=4, window_right=0, diag_offset=0)


def test_opcheck_triton_fwd():
    q, k, v = random_qkv(1, 17, 17, 2, 1, 16, seed=6)
    torch.library.opcheck(ops.attn_fwd, ops.fwd_args(q, k, v, scale=0.25, window_right=0, backend="triton"),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))



@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_windows_longer_than_the_call_are_no_bound(backend):
    # A window side near 2**31 is the same call as an unbounded one, forward and backward,
    # dense, packed and through the block primitives (the Triton kernels add it to
    # positions in 32 bits: it wrapped, emptying every row, and a left side with Sq > Sk
    # read keys out of bounds).
    big = 2**31 - 1
    q, k, v = (t.requires_grad_() for t in random_qkv(1, 40, 30, 2, 2, 16, seed=8))
    results = []
    for window in ((-1, -1), (big, big), (big, -1), (-1, big)):
        out = flashattn_py.flash_attn_func(q, k, v, window_size=window, backend=backend)
        results.append((out, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out))))
    cu_q, cu_k = torch.tensor([0, 13, 40], dtype=torch.int32), torch.tensor([0, 10, 30], dtype=torch.int32)
    packed = [flashattn_py.flash_attn_varlen_func(q[0], k[0], v[0], cu_q, cu_k, 27, 20, window_size=window,
                                                  backend=backend) for window in ((-1, -1), (big, big))]
    q0, k0, v0 = q.detach(), k.detach(), v.detach()
    blocks = []
    for window in ((-1, -1), (big, big)):
        out, lse = flashattn_py.attention_forward(q0, k0, v0, window_size=window, backend=backend)
        blocks.append((out, lse, *flashattn_py.attention_backward(torch.ones_like(out), q0, k0, v0, out, lse,
                                                                  window_size=window, backend=backend)))
    for first, *rest in (results, packed, blocks):
        for other in rest:
            for a, b in zip(first if isinstance(first, tuple) else (first,),
                            other if isinstance(other, tuple) else (other,)):
                assert torch.equal(a, b)


def test_torch_func_and_vmap_triton():
    # Batched tensors have no storage for the launchers: under torch.func transforms the
    # call goes through the op (torch's per-entry fallback), with its gradient.
    import warnings

    q, k, v = random_qkv(3, 9, 9, 2, 2, 16, seed=8)
    q.requires_grad_()
    run = lambda b: lambda x: flashattn_py.flash_attn_func(x, k[:1], v[:1], causal=True, backend=b)  # noqa: E731
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*batching rule.*")
        batched = torch.vmap(run("triton"))(q[:, None]).squeeze(1)
        got, = torch.autograd.grad(batched.square().sum(), q)
        grad = torch.func.grad(lambda x: run("triton")(x).square().sum())(q[:1])
    expected = torch.cat([run("reference")(x[None]) for x in q])
    want, = torch.autograd.grad(expected.square().sum(), q)
    torch.testing.assert_close(batched, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad, want[:1], rtol=1e-4, atol=1e-5)


def test_float32_mask_with_fp16_inputs_triton():
    # A float32 mask is read as float32 (as torch's SDPA and the CPU kernels do), not
    # rounded to fp16: a bias near 200 keeps its differences (fp16 steps by 0.125 there).
    gen = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(2, 2, 21, 16, generator=gen).half() for _ in range(3))
    mask = torch.randn(2, 1, 21, 21, generator=gen) * 0.05 + 200
    exact = [t.double().requires_grad_() for t in (q, k, v, mask)]
    mine = [t.clone().requires_grad_() for t in (q, k, v, mask)]
    naive = [t.clone().requires_grad_() for t in (q, k, v, mask)]
    want = torch.nn.functional.scaled_dot_product_attention(*exact[:3], attn_mask=exact[3])
    with flashattn_py.use_backend("triton"):
        got = flashattn_py.scaled_dot_product_attention(*mine[:3], attn_mask=mine[3])
    low = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # torch's own fp16 call
    assert_rule("out", got, want, low, 2)
    # gradients against the naive formula in fp16 (the mask added in float32, as torch does)
    low = attention_ref(*(t.transpose(1, 2) for t in naive[:3]), attn_bias=naive[3].expand(2, 2, 21, 21))[0]
    dout = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    for out in (got, want, low.transpose(1, 2)):
        out.backward(dout.to(out.dtype))
    assert mine[3].grad.dtype == torch.float32
    for name, a, b, c in zip(("dq", "dk", "dv", "dmask"), mine, exact, naive):
        assert_rule(name, a.grad, b.grad, c.grad, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_rows_masked_with_the_float_minimum_average_as_torch(dtype, backend):
    # transformers' masks put torch.finfo(float32).min where a key is hidden: a row hidden
    # everywhere (left padding) is torch's uniform average of V, not an empty row. Triton's
    # log2 scaling of the bias overflowed that minimum to -inf: zeros, and zero gradients.
    gen = torch.Generator().manual_seed(13)
    q, k, v = (torch.randn(2, 2, 9, 16, generator=gen).to(dtype) for _ in range(3))
    lowest = torch.finfo(torch.float32).min
    mask = torch.zeros(2, 1, 9, 9).masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), lowest)
    mask[1, :, :, :3] = lowest  # sequence 1 left-padded by 3: its rows 0-2 see nothing
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    exact = [t.double().requires_grad_() for t in (q, k, v)]
    with flashattn_py.use_backend(backend):
        got = flashattn_py.scaled_dot_product_attention(*leaves, attn_mask=mask)
    want = torch.nn.functional.scaled_dot_product_attention(*exact, attn_mask=mask.double())
    assert (got.double() - want).abs().max() < (2e-3 if dtype == torch.float16 else 1e-5)
    dout = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    got.backward(dout.to(dtype))
    want.backward(dout)
    for a, b in zip(leaves, exact):
        assert (a.grad.double() - b.grad).abs().max() < (1e-2 if dtype == torch.float16 else 1e-5)

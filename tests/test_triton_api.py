"""The triton backend through the public API and custom ops (interpreter on CPU)."""
import os

import pytest
import torch

import flashattn_py
from flashattn_py import backends, ops

from rule import check_attention, random_qkv

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

"""The ops' fake impls give the strides the real kernels return, for every backend.

inductor checks each custom-op output against the fake's sizes *and strides*
(``assert_size_stride``); a fake that returns ``empty_like(q)`` while the kernel allocates
contiguous gradients fails there as soon as q is a transposed (SDPA layout) or packed
view. CPU tests run the Triton backend under ``TRITON_INTERPRET=1``; the cuda case needs
a GPU (``-m gpu``).
"""
from __future__ import annotations

import os

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import flashattn_py
from flashattn_py import backends, ops

INTERP = os.environ.get("TRITON_INTERPRET") == "1"


def _layouts(device, dtype):
    """(name, q, k, v) in (B, S, H, D) with non-contiguous strides."""
    g = torch.Generator().manual_seed(0)
    B, S, H, D = 2, 19, 3, 16
    bhsd = [torch.randn(B, H, S, D, generator=g).to(device, dtype).transpose(1, 2) for _ in range(3)]
    qkv = torch.randn(B, S, 3, H, D, generator=g).to(device, dtype)
    gqa_k = torch.randn(B, 1, S, D, generator=g).to(device, dtype).transpose(1, 2)
    # q, k, v split off one (B, H, S, 3D) projection, heads first: non-dense in that order
    fused = torch.randn(B, H, S, 3 * D, generator=g).to(device, dtype)
    sliced = [fused[..., i * D:(i + 1) * D].transpose(1, 2) for i in range(3)]
    return [
        ("sdpa_transposed", *bhsd),
        ("packed_qkv", qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]),
        ("gqa_transposed", bhsd[0], gqa_k, gqa_k),
        ("sdpa_sliced", *sliced),
    ]


def _strides(t):
    return tuple(st for st, n in zip(t.stride(), t.shape) if n > 1)


def _backend_params():
    params = [pytest.param("cpu", "cpu", torch.float32,
                           marks=pytest.mark.skipif(backends.compiled_ops_error() is not None,
                                                    reason="compiled CPU ops not built"))]
    params.append(pytest.param("triton", "cpu", torch.float32,
                               marks=pytest.mark.skipif(not INTERP or backends.triton_error() is not None,
                                                        reason="needs TRITON_INTERPRET=1 and triton")))
    params.append(pytest.param("triton", "cuda", torch.float16, marks=pytest.mark.gpu, id="triton-gpu"))
    params.append(pytest.param("cuda", "cuda", torch.float16, marks=pytest.mark.gpu, id="cuda-gpu"))
    return params


@pytest.mark.parametrize("backend,device,dtype", _backend_params())
@pytest.mark.parametrize("bias_grad", [False, True])
def test_fake_strides_match_the_kernels(backend, device, dtype, bias_grad):
    if device == "cuda" and (not torch.cuda.is_available() or backends.SUPPORTS[backend](
            backends.Problem("cuda", dtype))):
        pytest.skip(f"{backend} does not run here")
    for name, q, k, v in _layouts(device, dtype):
        B, S, H, _ = q.shape
        bias = torch.randn(1, H, S, S, dtype=dtype, device=device).expand(B, H, S, S) if bias_grad else None
        fwd_args = ops.fwd_args(q, k, v, attn_bias=bias, scale=0.25, window_right=0, backend=backend)
        out, lse = ops.attn_fwd(*fwd_args)
        dout = torch.randn_like(out)
        bwd_args = ops.bwd_args(dout, q, k, v, out, lse, attn_bias=bias, scale=0.25, window_right=0,
                                bias_requires_grad=bias_grad, backend=backend)
        real = (out, lse, *ops.attn_bwd(*bwd_args))
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake_fwd = ops.attn_fwd(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in fwd_args])
            fake_bwd = ops.attn_bwd(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in bwd_args])
        fake = (*fake_fwd, *fake_bwd)
        for what, r, f in zip(("out", "lse", "dq", "dk", "dv", "dbias"), real, fake):
            # Strides of size-1 dims mean nothing (inductor's assert_size_stride skips them,
            # and empty_like itself picks them differently for fake and real tensors).
            assert (r.shape, _strides(r), r.dtype) == (f.shape, _strides(f), f.dtype), (
                f"{backend} {name} {what}: kernel {tuple(r.shape)} {r.stride()} {r.dtype}, "
                f"fake {tuple(f.shape)} {f.stride()} {f.dtype}")


@pytest.mark.skipif(not INTERP or backends.triton_error() is not None, reason="needs TRITON_INTERPRET=1 and triton")
@pytest.mark.parametrize("layout", ["sdpa_transposed", "packed_qkv"])
def test_inductor_compile_and_backward_triton_noncontiguous(layout):
    # The failure this guards against is inductor's assert_size_stride on attn_bwd's outputs.
    from torch._inductor.utils import fresh_inductor_cache

    g = torch.Generator().manual_seed(1)
    B, S, H, D = 1, 17, 2, 16
    if layout == "sdpa_transposed":
        leaves = [torch.randn(B, H, S, D, generator=g, requires_grad=True) for _ in range(3)]

        def fn(q, k, v):
            return flashattn_py.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        leaves = [torch.randn(B, S, 3, H, D, generator=g, requires_grad=True)]

        def fn(qkv):
            return flashattn_py.flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=True)

    with flashattn_py.use_backend("triton"):
        expected = fn(*leaves)
        want = torch.autograd.grad(expected.square().sum(), leaves)
        with fresh_inductor_cache():  # a cached graph would hide a changed fake
            got = torch.compile(fn, fullgraph=True, backend="inductor")(*leaves)
            grads = torch.autograd.grad(got.square().sum(), leaves)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

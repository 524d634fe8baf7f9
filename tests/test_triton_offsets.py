"""Triton kernels address rows with 64-bit offsets.

``row * row_stride`` passes 2^31 elements at long context (the (B, S, H, D) layout with
H * D = 16384 wraps at S = 131073). Under ``TRITON_INTERPRET=1`` a view with a huge row
stride reproduces that on a few MB: the storage is reserved (about 8 GiB of fp16 per view,
virtual memory, never touched) but only the rows the kernel reads are written. With int32
offsets the kernel reads row i * stride mod 2^32 and the result is wrong. The same check
runs compiled on a GPU (``-m gpu``).
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from flashattn_py import backends
from flashattn_py.reference import attention_ref

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
ROW_STRIDE = 1 << 20  # elements: row 2048 starts at 2^31
LONG = 2049 + 7


def _big_stride_view(n_rows: int, d: int, device: str, generator: torch.Generator) -> torch.Tensor:
    """(1, n_rows, 1, d) fp16 with row stride 2^20, rows filled with random values.

    The view starts 2^31 elements into its storage, so a wrapped (negative) int32 offset
    still reads inside it (zeros: a wrong result, not a crash)."""
    lead = 1 << 31
    base = torch.empty(lead + (n_rows - 1) * ROW_STRIDE + d, dtype=torch.float16, device=device)
    view = base.as_strided((1, n_rows, 1, d), (0, ROW_STRIDE, d, 1), lead)
    view.copy_(torch.randn(1, n_rows, 1, d, generator=generator).to(device, torch.float16))
    return view


def _devices():
    return [
        pytest.param("cpu", marks=pytest.mark.skipif(not INTERP, reason="CPU runs need TRITON_INTERPRET=1")),
        pytest.param("cuda", marks=[pytest.mark.gpu,
                                    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"),
                                    # two views of about 8 GiB each, allocated on a GPU
                                    pytest.mark.skipif(torch.cuda.is_available() and
                                                       torch.cuda.get_device_properties(0).total_memory < 24 << 30,
                                                       reason="needs 24 GiB of GPU memory")]),
    ]


@pytest.mark.skipif(backends.triton_error() is not None, reason="triton not available")
@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("long_side", ["queries", "keys"])
def test_rows_past_2_31_elements(device, long_side):
    from flashattn_py.kernels import flash_bwd, flash_fwd

    g = torch.Generator().manual_seed(3)
    d = 16
    if long_side == "queries":
        q = _big_stride_view(LONG, d, device, g)
        dout = _big_stride_view(LONG, d, device, g)
        k, v = (torch.randn(1, 16, 1, d, generator=g).to(device, torch.float16) for _ in range(2))
    else:
        q = torch.randn(1, 16, 1, d, generator=g).to(device, torch.float16)
        dout = torch.randn(1, 16, 1, d, generator=g).to(device, torch.float16)
        k, v = (_big_stride_view(LONG, d, device, g) for _ in range(2))
    scale = 1 / math.sqrt(d)
    out, lse = flash_fwd(q, k, v, None, scale, 0.0, -1, -1, 0)
    dq, dk, dv, _ = flash_bwd(dout, q, k, v, out, lse, None, scale, 0.0, -1, -1, 0)

    q64, k64, v64 = (t.double().contiguous().requires_grad_() for t in (q, k, v))
    ref, ref_lse = attention_ref(q64, k64, v64, scale=scale)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double().contiguous())
    # fp16 inputs, fp32 accumulation: a wrapped offset reads some other row (error O(1)).
    torch.testing.assert_close(out.double(), ref, atol=2e-3, rtol=0)
    torch.testing.assert_close(lse.double(), ref_lse.double(), atol=1e-3, rtol=0)
    for name, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads):
        torch.testing.assert_close(got.double(), want, atol=5e-3, rtol=0, msg=lambda m: f"{name}: {m}")

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

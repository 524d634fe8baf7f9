"""Sizes past 32-bit integers: strides, cache lengths and row counts of 2**31 and more.

The tensors are views over lazily allocated storage (a few pages touched) or expanded
ones, so nothing here holds gigabytes."""
import pytest
import torch
import torch.nn.functional as F

import flashattn_py as fa
from flashattn_py.errors import ArgumentError


def _kv_rows_far_apart(kk: torch.Tensor, vv: torch.Tensor, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V rows (2, D) as (1, 2, 1, D) views whose rows are ``stride`` elements apart,
    side by side in one uninitialised storage of which only the rows' pages are touched."""
    S, D = kk.shape
    assert S == 2
    try:  # (address space only: a few pages are touched; a machine that refuses it skips)
        big = torch.empty(stride + 2 * D, dtype=kk.dtype)
    except RuntimeError as e:
        pytest.skip(f"cannot reserve {(stride + 2 * D) * kk.element_size() / 2**30:.0f} GiB of address space: {e}")
    k = big.as_strided((1, S, 1, D), (0, stride, D, 1))
    v = big.as_strided((1, S, 1, D), (0, stride, D, 1), D)
    k.copy_(kk.view(1, S, 1, D))
    v.copy_(vv.view(1, S, 1, D))
    return k, v


@pytest.mark.parametrize("dtype, sq", [(torch.float32, 12), (torch.float64, 5)])
def test_key_rows_more_than_int_max_apart(dtype, sq):
    # K and V read in place by the BLAS products (float64; float32 with 5-15 queries), whose
    # leading dimensions are ints: a row stride past INT_MAX wrapped (MKL refused the
    # product and left the scores unwritten, or read other rows).
    g = torch.Generator().manual_seed(3)
    D, sk = 16, 2
    kk, vv = (torch.randn(sk, D, generator=g, dtype=dtype) for _ in range(2))
    k, v = _kv_rows_far_apart(kk, vv, 2**31 + 16)
    assert k.stride(1) > torch.iinfo(torch.int32).max
    q = torch.randn(1, sq, 1, D, generator=g, dtype=dtype, requires_grad=True)
    out = fa.flash_attn_func(q, k, v, backend="cpu")
    q_ref = q.detach().clone().requires_grad_(True)
    ref = F.scaled_dot_product_attention(q_ref.transpose(1, 2), kk.view(1, 1, sk, D), vv.view(1, 1, sk, D))
    ref = ref.transpose(1, 2)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out, ref, atol=tol, rtol=0)
    dout = torch.randn(out.shape, generator=g, dtype=dtype)
    (dq,) = torch.autograd.grad(out, q, dout)
    (dq_ref,) = torch.autograd.grad(ref, q_ref, dout)
    torch.testing.assert_close(dq, dq_ref, atol=tol, rtol=0)


def test_kvcache_lengths_past_int32_refused_before_the_write():
    # A paged table reusing one page holds more than 2**31 slots; an entry of 2**31 - 1 keys
    # plus one new key passed every check, and the int32 key count wrapped negative: the
    # call attended over nothing (out 0, lse -inf). Refused now, the cache untouched.
    page, D = 2**16, 8
    table = torch.zeros(1, 2**31 // page + 1, dtype=torch.int32)  # every page is page 0
    k_cache, v_cache = torch.randn(1, page, 1, D), torch.randn(1, page, 1, D)
    before = k_cache.clone(), v_cache.clone()
    q, k, v = torch.randn(1, 1, 1, D), torch.randn(1, 1, 1, D), torch.randn(1, 1, 1, D)
    with pytest.raises(ArgumentError, match="cache_seqlens"):
        fa.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, block_table=table,
                                   cache_seqlens=torch.tensor([2**31 - 1], dtype=torch.int32))
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


def test_nested_rows_past_int32_refused():
    # The packed-sequence kernels take int32 offsets: a jagged batch of 2**31 rows (an
    # expanded one here) is refused by the name of the argument the user passed.
    rows = torch.zeros(1, 1, 8).expand(2**31, 1, 8)
    nested = torch.nested.nested_tensor_from_jagged(rows, torch.tensor([0, 2**31])).transpose(1, 2)
    with pytest.raises(ArgumentError, match="query: 2147483648 rows"):
        fa.scaled_dot_product_attention(nested, nested, nested)

"""GPU tests of the CUDA forward on KV caches (flash_attn_with_kvcache): contiguous and paged
caches, cache_batch_idx, cache_leftpad, new keys appended at cache_seqlens, and split-KV
(num_splits 1, 0 = the heuristic, 3) with its combine kernel; Sq = 1 with GQA also takes
the packed-heads path (csrc/cuda/flash_fwd.cu gqa_decode_view).

Each result is held to reference.attention_varlen_ref in float64 on the updated cache by
the rule in tests/rule.py. Run on the device machine: ``pytest -m gpu tests/test_cuda_kvcache.py``.
"""
from __future__ import annotations

import pytest
import torch

import flashattn_py
from flashattn_py.reference import attention_varlen_ref
from devices import has_cuda_kernels
from rule import OUT_FACTOR, assert_rule

pytestmark = pytest.mark.gpu


if not has_cuda_kernels():
    pytest.skip("needs a CUDA GPU and the compiled CUDA ops", allow_module_level=True)

DEV = "cuda"
B, H, HK = 3, 8, 2
CAPACITY = 300  # key slots per sequence: several key blocks, so splits have work


@pytest.fixture(autouse=True)
def _cuda_backend(monkeypatch):
    monkeypatch.setenv("FLASHATTN_BACKEND", "cuda")


def _randn(gen, *shape, dtype):
    return torch.randn(*shape, generator=gen).to(device=DEV, dtype=dtype)


def _ints(values):
    return torch.tensor(values, dtype=torch.int32, device=DEV)


def _make_cache(gen, dtype, d, paged, page_size):
    """k / v caches and what addresses them: (k_cache, v_cache, block_table, cache_batch_idx)."""
    if paged:
        max_blocks = (CAPACITY + page_size - 1) // page_size
        num_pages = B * max_blocks + 5
        k_cache = _randn(gen, num_pages, page_size, HK, d, dtype=dtype)
        v_cache = _randn(gen, num_pages, page_size, HK, d, dtype=dtype)
        perm = torch.randperm(num_pages, generator=gen)[:B * max_blocks]
        block_table = perm.view(B, max_blocks).to(device=DEV, dtype=torch.int32)
        return k_cache, v_cache, block_table, None
    b_cache = B + 2
    k_cache = _randn(gen, b_cache, CAPACITY, HK, d, dtype=dtype)
    v_cache = _randn(gen, b_cache, CAPACITY, HK, d, dtype=dtype)
    batch_idx = _ints([4, 0, 2])  # rows of the cache out of order, some unused
    return k_cache, v_cache, None, batch_idx


def _expected_cache(cache, new, cache_seqlens, block_table, batch_idx):
    """cache with new (B, S_new, Hk, D) written at slots cache_seqlens[b] + i."""
    out = cache.clone()
    for b in range(B):
        for i in range(new.shape[1]):
            slot = int(cache_seqlens[b]) + i
            if block_table is not None:
                page_size = cache.shape[1]
                out[int(block_table[b, slot // page_size]), slot % page_size] = new[b, i]
            else:
                out[int(batch_idx[b]), slot] = new[b, i]
    return out


def _run_and_check(*, dtype, paged, num_splits, sq, s_new, d=64, causal=True, window=(-1, -1), softcap=0.0,
                   alibi=False, leftpad=False, seed=0, page_size=16):
    gen = torch.Generator().manual_seed(seed)
    k_cache, v_cache, block_table, batch_idx = _make_cache(gen, dtype, d, paged, page_size)
    q = _randn(gen, B, sq, H, d, dtype=dtype)
    k_new = _randn(gen, B, s_new, HK, d, dtype=dtype) if s_new else None
    v_new = _randn(gen, B, s_new, HK, d, dtype=dtype) if s_new else None
    # One short sequence (fewer keys than splits' blocks), one that fills the cache, one
    # without cached keys.
    cache_seqlens = _ints([37, CAPACITY - s_new, 0])
    cache_leftpad = _ints([5, 130, 0]) if leftpad else None
    slopes = (torch.rand(H, generator=gen) * 0.3).to(DEV) if alibi else None
    k_before, v_before = k_cache.clone(), v_cache.clone()

    out, lse = flashattn_py.flash_attn_with_kvcache(
        q, k_cache, v_cache, k=k_new, v=v_new, cache_seqlens=cache_seqlens, cache_batch_idx=batch_idx,
        cache_leftpad=cache_leftpad, block_table=block_table, causal=causal, window_size=window, softcap=softcap,
        alibi_slopes=slopes, num_splits=num_splits, return_softmax_lse=True)
    torch.cuda.synchronize()

    if s_new:  # the new keys went into the caches, nothing else changed
        assert torch.equal(k_cache, _expected_cache(k_before, k_new, cache_seqlens, block_table, batch_idx))
        assert torch.equal(v_cache, _expected_cache(v_before, v_new, cache_seqlens, block_table, batch_idx))
    else:
        assert torch.equal(k_cache, k_before) and torch.equal(v_cache, v_before)

    kw = dict(seqused_k=cache_seqlens + s_new, block_table=block_table, kv_batch_idx=batch_idx,
              leftpad_k=cache_leftpad, bottom_right=True, window_left=window[0],
              window_right=0 if causal else window[1], softcap=softcap, alibi_slopes=slopes)
    ref, ref_lse = attention_varlen_ref(q.double(), k_cache.double(), v_cache.double(), None, None, **kw)
    naive, _ = attention_varlen_ref(q, k_cache, v_cache, None, None, **kw)
    name = f"{dtype} paged={paged} splits={num_splits} sq={sq}"
    assert_rule(f"out[{name}]", out, ref, naive, OUT_FACTOR, seed=seed)
    assert lse.shape == (B, H, sq) and lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), ref_lse.double(), atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("num_splits", [1, 0, 3])
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode(dtype, paged, num_splits):
    # One new token per sequence, causal: the decode step (GQA heads packed per KV head).
    _run_and_check(dtype=dtype, paged=paged, num_splits=num_splits, sq=1, s_new=1)


@pytest.mark.parametrize("num_splits", [1, 0, 3])
@pytest.mark.parametrize("page_size", [1, 7, 256])
def test_decode_page_sizes(page_size, num_splits):
    # The decode shape (GQA 4, head dim 128: the split kernel's 128-key tiles) on pages
    # smaller than a key row group, not dividing a tile, and larger than a tile.
    _run_and_check(dtype=torch.bfloat16, paged=True, num_splits=num_splits, sq=1, s_new=1, d=128,
                   page_size=page_size, seed=page_size)


@pytest.mark.parametrize("d", [64, 128])
def test_paged_splits_over_many_key_blocks(d):
    # Every split runs several key blocks of a paged cache (the split kernel looks up the next
    # block's pages while the softmax runs), GQA packed heads, one query per sequence.
    gen = torch.Generator().manual_seed(d)
    page, keys, b, h, hk = 16, 2000, 2, 8, 2
    pages = b * keys // page
    k_cache, v_cache = (_randn(gen, pages + 3, page, hk, d, dtype=torch.bfloat16) for _ in range(2))
    block_table = torch.randperm(pages + 3, generator=gen)[:pages].view(b, -1).to(device=DEV, dtype=torch.int32)
    q = _randn(gen, b, 1, h, d, dtype=torch.bfloat16)
    lengths = _ints([keys, keys - 300])
    for num_splits in (2, 0):
        out, lse = flashattn_py.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths,
                                                        block_table=block_table, num_splits=num_splits,
                                                        return_softmax_lse=True)
        kw = dict(seqused_k=lengths, block_table=block_table, bottom_right=True)
        ref, ref_lse = attention_varlen_ref(q.double(), k_cache.double(), v_cache.double(), None, None, **kw)
        naive, _ = attention_varlen_ref(q, k_cache, v_cache, None, None, **kw)
        assert_rule(f"out[paged splits={num_splits} d={d}]", out, ref, naive, OUT_FACTOR, seed=d)
        torch.testing.assert_close(lse.double(), ref_lse.double(), atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("paged", [False, True])
def test_features(paged, num_splits):
    # Several queries (no head packing), left padding, a window, softcap and ALiBi.
    _run_and_check(dtype=torch.float16, paged=paged, num_splits=num_splits, sq=3, s_new=3, d=128,
                   window=(70, 0), softcap=8.0, alibi=True, leftpad=True, seed=1)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_without_new_keys(num_splits):
    # k = v = None: attend the cache as it is (head dim 96 bucket, no causal).
    _run_and_check(dtype=torch.bfloat16, paged=False, num_splits=num_splits, sq=1, s_new=0, d=80, causal=False,
                   leftpad=True, seed=2)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_a_nan_query_row_stays_nan(num_splits):
    # A NaN in one query head (NaN scores over every key): that row's out and lse are NaN,
    # split or not (the max skips NaN: the row's lse was -inf, and the split combine then
    # wrote 0), the other heads finite.
    gen = torch.Generator().manual_seed(5)
    q = _randn(gen, 1, 1, H, 64, dtype=torch.bfloat16)
    q[0, 0, 3, 0] = float("nan")
    k_cache, v_cache = (_randn(gen, 1, CAPACITY, HK, 64, dtype=torch.bfloat16) for _ in range(2))
    out, lse = flashattn_py.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=CAPACITY, num_splits=num_splits,
                                                    return_softmax_lse=True)
    others = [h for h in range(H) if h != 3]
    assert torch.isnan(out[0, 0, 3]).all() and torch.isnan(lse[0, 3, 0])
    assert torch.isfinite(out[0, 0, others]).all() and torch.isfinite(lse[0, others]).all()


def test_new_keys_from_the_cache_itself():
    # k = k_cache[:, 3:6] appended at slot 5: flash_attn_with_kvcache copies such rows (the
    # CUDA op refuses them: its launch's rows would race with their own writes).
    gen = torch.Generator().manual_seed(2)
    kv = _randn(gen, 2, 1, 40, 2, 64, dtype=torch.bfloat16)
    q = _randn(gen, 1, 3, 2, 64, dtype=torch.bfloat16)
    want_k, want_v = kv[0].clone(), kv[1].clone()
    want_k[:, 5:8], want_v[:, 5:8] = kv[0, :, 3:6], kv[0, :, 20:23]
    flashattn_py.flash_attn_with_kvcache(q, kv[0], kv[1], kv[0, :, 3:6], kv[0, :, 20:23], cache_seqlens=5,
                                         causal=True)
    torch.cuda.synchronize()
    assert torch.equal(kv[0], want_k) and torch.equal(kv[1], want_v)
    with pytest.raises(RuntimeError, match="share memory with the caches"):
        torch.ops.flashattn.kvcache_write.default(kv[0], kv[1], kv[0, :, 3:6], kv[0, :, 20:23], _ints([5]), None,
                                                  None)

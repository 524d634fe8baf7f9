"""Packed sequences (varlen) and paged K/V in one call, against the per-sequence reference.

The kernels run every sequence in one launch (one task table on the CPU); the reference
(``reference.attention_varlen_ref``) computes each sequence on its own by the naive
formula. CPU backend (and the reference backend) here; Triton in test_triton_varlen.py,
CUDA in test_cuda_varlen.py.
"""
import numpy as np
import pytest
import torch

import flashattn_py
from flashattn_py import api, ops
from flashattn_py.errors import ArgumentError
from flashattn_py.reference import attention_varlen_ref
from cpu_paths import BF16_PATHS, bf16_path
from rule import check_attention
from torch.nn.attention.varlen import AuxRequest

LENS_Q = [5, 0, 17, 97, 1, 300, 33]
LENS_K = [7, 3, 17, 60, 4, 300, 0]


def offsets(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def packed_qkv(lens_q, lens_k, heads, heads_k, head_dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)

    def make(n, h):
        return torch.randn(1, n, h, head_dim, generator=gen).to(dtype)

    return make(sum(lens_q), heads), make(sum(lens_k), heads_k), make(sum(lens_k), heads_k)


def varlen_call(cu_q, cu_k, lens_q, lens_k, **kwargs):
    """run(q, k, v) for check_attention: (1, total, H, D) in and out."""
    def run(q, k, v):
        return flashattn_py.flash_attn_varlen_func(q[0], k[0], v[0], cu_q, cu_k, max(lens_q), max(lens_k),
                                                   **kwargs)[None]
    return run


FEATURES = {
    "plain": ({}, {}),
    "causal": ({"causal": True}, {"window_right": 0}),
    "window": ({"window_size": (9, 3)}, {"window_left": 9, "window_right": 3}),
    "causal_window": ({"causal": True, "window_size": (20, -1)}, {"window_left": 20, "window_right": 0}),
    "softcap_alibi": ({"softcap": 5.0, "alibi": True}, {"softcap": 5.0, "alibi": True}),
}


@pytest.mark.parametrize("path", sorted(BF16_PATHS))
@pytest.mark.parametrize("feature", ["causal", "window"])
def test_varlen_bf16_product_paths(path, feature, cpu_switch):
    # Packed sequences on each bf16 product path (csrc/cpu/switches.h), gradients too:
    # every path addresses sequences the same way.
    bf16_path(cpu_switch, path)
    heads, heads_k, head_dim = 4, 2, 40
    api_kw, ref_kw = (dict(x) for x in FEATURES[feature])
    cu_q, cu_k = offsets(LENS_Q), offsets(LENS_K)
    q, k, v = packed_qkv(LENS_Q, LENS_K, heads, heads_k, head_dim, torch.bfloat16, 31)
    check_attention(varlen_call(cu_q, cu_k, LENS_Q, LENS_K, **api_kw), q, k, v, seed=31, cu_seqlens_q=cu_q,
                    cu_seqlens_k=cu_k, bottom_right=True, **ref_kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("feature", list(FEATURES))
def test_varlen_matches_reference_per_sequence(dtype, feature):
    heads, heads_k, head_dim = 4, 2, 40
    api_kw, ref_kw = (dict(x) for x in FEATURES[feature])
    seed = hash((str(dtype), feature)) % 1000
    if api_kw.pop("alibi", False):
        slopes = torch.rand(len(LENS_Q), heads, generator=torch.Generator().manual_seed(seed))
        api_kw["alibi_slopes"] = ref_kw["alibi_slopes"] = slopes
        del ref_kw["alibi"]
    cu_q, cu_k = offsets(LENS_Q), offsets(LENS_K)
    q, k, v = packed_qkv(LENS_Q, LENS_K, heads, heads_k, head_dim, dtype, seed)
    check_attention(varlen_call(cu_q, cu_k, LENS_Q, LENS_K, **api_kw), q, k, v, seed=seed, cu_seqlens_q=cu_q,
                    cu_seqlens_k=cu_k, bottom_right=True, **ref_kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("feature", ["causal", "window", "softcap_alibi"])
def test_varlen_decode_sized_sequences(dtype, feature):
    # At most 8 queries per sequence: the row path, where one task does every head of its
    # sequence (6 query heads over 2 KV heads), key block by key block; sequences without
    # queries or keys, and hundreds of keys (many blocks). Outputs and gradients.
    lens_q, lens_k = [1, 0, 8, 3, 1, 2], [700, 5, 300, 0, 33, 1]
    heads, heads_k, head_dim = 6, 2, 72
    api_kw, ref_kw = (dict(x) for x in FEATURES[feature])
    seed = 17 + len(feature)
    if api_kw.pop("alibi", False):
        slopes = torch.rand(len(lens_q), heads, generator=torch.Generator().manual_seed(seed)) * 0.1
        api_kw["alibi_slopes"] = ref_kw["alibi_slopes"] = slopes
        del ref_kw["alibi"]
    cu_q, cu_k = offsets(lens_q), offsets(lens_k)
    q, k, v = packed_qkv(lens_q, lens_k, heads, heads_k, head_dim, dtype, seed)
    check_attention(varlen_call(cu_q, cu_k, lens_q, lens_k, **api_kw), q, k, v, seed=seed, cu_seqlens_q=cu_q,
                    cu_seqlens_k=cu_k, bottom_right=True, **ref_kw)


MANY_SHORT = [(torch.float32, "fp32"), (torch.float16, "fp32"), *((torch.bfloat16, p) for p in sorted(BF16_PATHS))]
OP_FEATURES = {"causal": {"window_right": 0}, "window": {"window_left": 9, "window_right": 3},
               "softcap_alibi": {"softcap": 5.0, "alibi": True}}


def op_call(q, k, v, cu_q, cu_k, max_q, max_k, alibi=None, **kw):
    """(out, lse) of the CPU op on packed sequences, flash-attn's bottom-right diagonal."""
    return ops.attention(q, k, v, scale=q.shape[-1] ** -0.5, alibi_slopes=alibi, cu_seqlens_q=cu_q,
                         cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k, bottom_right=True, **kw)


@pytest.mark.parametrize("dtype,path", MANY_SHORT, ids=[f"{str(d)[6:]}-{p}" for d, p in MANY_SHORT])
@pytest.mark.parametrize("feature", list(OP_FEATURES))
@pytest.mark.parametrize("heads,heads_k", [(6, 2), (12, 12), (4, 1)])
def test_many_short_sequences_equal_one_call_each(dtype, path, feature, heads, heads_k, cpu_switch):
    # Enough short sequences (at most 240 queries and 256 keys: one query and one key
    # block) that a task does several heads of a sequence, packed a row group / key panel
    # of every head in turn (csrc/cpu/flash_fwd.cpp pack_heads; V wider than K; up to 60
    # more keys than queries, so a window's first key block starts past key 0): out and
    # lse bitwise those of each sequence in a call of its own (one head per task) on the
    # same path and block sizes (the same maximum lengths), and the outputs within the rule
    # of the reference. With 16 sequences per thread (whatever the thread count) the gate
    # takes 6 of 6 heads over 2 KV heads, 6 of 12 (the panels' byte budget) and 4 of 4
    # over one (MQA) per task (checked against a model of the gate for 1-128 threads).
    if dtype == torch.bfloat16:
        bf16_path(cpu_switch, path)
    gen = torch.Generator().manual_seed(61 + len(feature) + heads_k)
    count = 16 * torch.get_num_threads() + 5
    lens_q = torch.randint(0, 131, (count,), generator=gen).tolist()
    lens_k = [max(1, n + int(torch.randint(-7, 61, (), generator=gen))) for n in lens_q]
    lens_q[3] = 0
    lens_k[4] = 0
    head_dim, head_dim_v = 40, 56
    kw = dict(OP_FEATURES[feature])
    slopes = torch.rand(count, heads, generator=gen) * 0.2 if kw.pop("alibi", False) else None
    cu_q, cu_k = offsets(lens_q), offsets(lens_k)
    q, k, _ = packed_qkv(lens_q, lens_k, heads, heads_k, head_dim, dtype, 62)
    v = torch.randn(1, sum(lens_k), heads_k, head_dim_v, generator=gen).to(dtype)
    out, lse = op_call(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), slopes, **kw)
    for i in range(count):
        qs, ks = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
        one_out, one_lse = op_call(q[:, qs], k[:, ks], v[:, ks], offsets(lens_q[i : i + 1]),
                                   offsets(lens_k[i : i + 1]), max(lens_q), max(lens_k),
                                   None if slopes is None else slopes[i : i + 1], **kw)
        assert torch.equal(out[:, qs], one_out) and torch.equal(lse[:, :, qs], one_lse), f"sequence {i}"
    ref_kw = dict(kw, alibi_slopes=slopes) if slopes is not None else kw
    check_attention(lambda q, k, v: op_call(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), slopes, **kw)[0],
                    q, k, v, grad=False, seed=62, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, bottom_right=True, **ref_kw)


def test_many_short_dense_sequences_equal_one_call_each():
    # A dense batch of short sequences takes the same path (pack_heads): each batch row
    # bitwise as called alone, lse too.
    gen = torch.Generator().manual_seed(63)
    batch = 8 * torch.get_num_threads() + 3
    q = torch.randn(batch, 37, 4, 24, generator=gen)
    k, v = (torch.randn(batch, 50, 2, 24, generator=gen) for _ in range(2))
    out, lse = ops.attention(q, k, v, scale=0.2, window_right=0, bottom_right=True)
    for b in range(batch):
        one_out, one_lse = ops.attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], scale=0.2, window_right=0,
                                         bottom_right=True)
        assert torch.equal(out[b : b + 1], one_out) and torch.equal(lse[b : b + 1], one_lse)


@pytest.mark.parametrize("seed", range(6))
def test_varlen_one_query_beside_a_block_keeps_its_accuracy(seed):
    # One query (120 keys, 16 query heads over 2 KV heads) packed beside a sequence of 40
    # queries and no keys, whose rows put the call on the float tiles: with a large
    # scale the scores' rounding is carried into P by exp(), and the one row is the
    # call's whole error (found by fuzzing: 4-6 seeds in 10 up to 5x the naive error
    # while the tiles summed each score in one chain of FMAs; csrc/cpu/tiles.h SUM_RUN).
    lens_q, lens_k = [1, 40], [120, 0]
    scale = 0.4 + 0.05 * seed
    cu_q, cu_k = offsets(lens_q), offsets(lens_k)
    q, k, v = packed_qkv(lens_q, lens_k, 16, 2, 128, torch.float32, 500 + seed)
    check_attention(varlen_call(cu_q, cu_k, lens_q, lens_k, softmax_scale=scale), q, k, v, grad=False,
                    seed=500 + seed, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, bottom_right=True, scale=scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_varlen_reference_backend_and_float64(dtype):
    cu_q, cu_k = offsets([3, 8, 0]), offsets([4, 8, 2])
    q, k, v = packed_qkv([3, 8, 0], [4, 8, 2], 2, 1, 16, dtype, 3)
    for backend in ("cpu", "reference"):
        check_attention(varlen_call(cu_q, cu_k, [3, 8, 0], [4, 8, 2], causal=True, backend=backend), q, k, v,
                        cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, bottom_right=True, window_right=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_varlen_with_every_key_sequence_empty(dtype):
    # No row sees a key: zeros, zero gradients (the rule's helper took max|k| of no keys).
    lens_q, lens_k = [3, 0, 5], [0, 0, 0]
    cu_q, cu_k = offsets(lens_q), offsets(lens_k)
    q, k, v = packed_qkv(lens_q, lens_k, 4, 2, 16, dtype, 5)
    run = varlen_call(cu_q, cu_k, lens_q, lens_k, causal=True)
    check_attention(run, q, k, v, seed=5, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, bottom_right=True, window_right=0)
    q = q.clone().requires_grad_()
    out = run(q, k, v)
    (dq,) = torch.autograd.grad(out, q, torch.randn_like(out))
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(dq, torch.zeros_like(dq))


def test_varlen_dropout_uses_the_kernels_mask():
    lens_q, lens_k = [6, 19, 0, 40], [9, 19, 5, 33]
    cu_q, cu_k = offsets(lens_q), offsets(lens_k)
    q, k, v = packed_qkv(lens_q, lens_k, 2, 2, 24, torch.float32, 11)
    p = 0.3
    torch.manual_seed(5)
    # The packed call's mask is the dense one of a (1, H, total_q, max_seqlen_k) problem
    # (csrc/flash_params.h): sequence b's rows cu_q[b]:cu_q[b+1], its first Sk_b columns.
    mask = ops.dropout_keep_mask(ops.dropout_rng_state(), 1, 2, sum(lens_q), max(lens_k), p)

    def run(q, k, v):
        torch.manual_seed(5)
        return flashattn_py.flash_attn_varlen_func(q[0], k[0], v[0], cu_q, cu_k, max(lens_q), max(lens_k),
                                                   dropout_p=p, causal=True)[None]
    check_attention(run, q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, bottom_right=True, window_right=0,
                    dropout_p=p, dropout_mask=mask)


def test_varlen_seqused_k_and_lse():
    lens_q, lens_k, used = [4, 7, 2], [10, 7, 9], [3, 7, 0]
    cu_q, cu_k = offsets(lens_q), offsets(lens_k)
    q, k, v = packed_qkv(lens_q, lens_k, 3, 3, 16, torch.float32, 4)
    seqused = torch.tensor(used, dtype=torch.int32)

    def run(q, k, v):
        return flashattn_py.varlen_attn(q[0], k[0], v[0], cu_q, cu_k, max(lens_q), max(lens_k), seqused_k=seqused,
                                        window_size=(-1, 0))[None]
    check_attention(run, q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, seqused_k=seqused, bottom_right=True,
                    window_right=0)
    out, lse = flashattn_py.varlen_attn(q[0], k[0], v[0], cu_q, cu_k, 7, 10, seqused_k=seqused,
                                        return_aux=AuxRequest(lse=True))
    ref_out, ref_lse = attention_varlen_ref(q.double(), k.double(), v.double(), cu_q, cu_k, seqused_k=seqused)
    assert lse.shape == (3, 13) and lse.dtype == torch.float32
    torch.testing.assert_close(lse, ref_lse[0].float())
    assert torch.isinf(lse[:, 11:]).all()  # the last sequence uses no key: lse -inf, out 0
    assert torch.equal(out[11:], torch.zeros_like(out[11:]))


def test_varlen_attn_out_writes_into_out():
    # torch 2.13's varlen_attn_out: varlen_attn's result in a preallocated out, the same
    # keywords; a wrong out is refused before anything is written.
    import inspect
    from torch.nn.attention import varlen as torch_varlen
    theirs = inspect.signature(torch_varlen.varlen_attn_out).parameters
    ours = inspect.signature(flashattn_py.varlen_attn_out).parameters
    assert list(ours)[:len(theirs)] == list(theirs)
    lens_q, lens_k = [4, 7, 2], [10, 7, 9]
    cu_q, cu_k = offsets(lens_q), offsets(lens_k)
    q, k, v = (t[0] for t in packed_qkv(lens_q, lens_k, 4, 2, 16, torch.float32, 6))
    kwargs = dict(window_size=(-1, 0), enable_gqa=True)
    want, want_lse = flashattn_py.varlen_attn(q, k, v, cu_q, cu_k, 7, 10, return_aux=AuxRequest(lse=True), **kwargs)
    out = torch.full_like(want, float("nan"))
    got = flashattn_py.varlen_attn_out(out, q, k, v, cu_q, cu_k, 7, 10, **kwargs)
    assert got is out and torch.equal(out, want)
    out.fill_(float("nan"))
    got, lse = flashattn_py.varlen_attn_out(out, q, k, v, cu_q, cu_k, 7, 10, return_aux=AuxRequest(lse=True),
                                            **kwargs)
    assert got is out and torch.equal(out, want) and torch.equal(lse, want_lse)
    with pytest.raises(ValueError, match="query: expected"):
        flashattn_py.varlen_attn_out(out, q[:, 0, 0], k, v, cu_q, cu_k, 7, 10, **kwargs)
    for bad in (torch.empty(13, 4, 8), torch.empty(13, 4, 16, dtype=torch.float64), torch.empty(12, 4, 16)):
        bad.fill_(7.0)
        with pytest.raises(ValueError, match="out: expected shape"):
            flashattn_py.varlen_attn_out(bad, q, k, v, cu_q, cu_k, 7, 10, **kwargs)
        assert (bad == 7.0).all()
    with pytest.raises(ValueError, match="out: an expanded tensor"):  # (was torch's copy_ error, after the call)
        flashattn_py.varlen_attn_out(torch.zeros(1, 4, 16).expand(13, 4, 16), q, k, v, cu_q, cu_k, 7, 10, **kwargs)
    # gradients flow through out, as through varlen_attn's result
    q.requires_grad_()
    out = torch.empty_like(want)
    flashattn_py.varlen_attn_out(out, q, k, v, cu_q, cu_k, 7, 10, **kwargs).sum().backward()
    want_grad, = torch.autograd.grad(flashattn_py.varlen_attn(q, k, v, cu_q, cu_k, 7, 10, **kwargs).sum(), q)
    torch.testing.assert_close(q.grad, want_grad)


@pytest.mark.parametrize("page_size", [1, 3, 16, 64, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_kv_any_page_size(page_size, dtype):
    lens_q, lens_k = [3, 1, 20, 0], [50, 9, 300, 4]
    heads, heads_k, head_dim = 4, 2, 32
    cu_q = offsets(lens_q)
    q, k, v = packed_qkv(lens_q, lens_k, heads, heads_k, head_dim, dtype, page_size)
    # The pool holds every sequence's pages in a shuffled order, plus unused ones.
    pages_per_seq = [(n + page_size - 1) // page_size for n in lens_k]
    max_blocks = max(pages_per_seq)
    num_pages = sum(pages_per_seq) + 3
    perm = torch.randperm(num_pages, generator=torch.Generator().manual_seed(page_size))
    block_table = torch.zeros(len(lens_k), max_blocks, dtype=torch.int32)
    pool_k = torch.randn(num_pages, page_size, heads_k, head_dim).to(dtype)
    pool_v = torch.randn(num_pages, page_size, heads_k, head_dim).to(dtype)
    cu_k = offsets(lens_k)
    used = 0
    for b, n in enumerate(lens_k):
        for blk in range(pages_per_seq[b]):
            page = int(perm[used])
            used += 1
            block_table[b, blk] = page
            rows = slice(int(cu_k[b]) + blk * page_size, min(int(cu_k[b]) + (blk + 1) * page_size, int(cu_k[b + 1])))
            n_rows = rows.stop - rows.start
            pool_k[page, :n_rows] = k[0, rows]
            pool_v[page, :n_rows] = v[0, rows]
    seqused = torch.tensor(lens_k, dtype=torch.int32)
    with torch.no_grad():
        out = flashattn_py.varlen_attn(q[0], pool_k, pool_v, cu_q, None, max(lens_q), max(lens_k), seqused_k=seqused,
                                       block_table=block_table, window_size=(-1, 0), enable_gqa=True)
        # the same through flash-attn's form (key counts from cu_seqlens_k)
        out_fa = flashattn_py.flash_attn_varlen_func(q[0], pool_k, pool_v, cu_q, cu_k, max(lens_q), max(lens_k),
                                                     causal=True, block_table=block_table)
        dense = flashattn_py.flash_attn_varlen_func(q[0], k[0], v[0], cu_q, cu_k, max(lens_q), max(lens_k),
                                                    causal=True)
    ref, _ = attention_varlen_ref(q.double(), k.double(), v.double(), cu_q, cu_k, window_right=0)
    paged_ref, _ = attention_varlen_ref(q.double(), pool_k.double(), pool_v.double(), cu_q, None, seqused_k=seqused,
                                        block_table=block_table, window_right=0)
    torch.testing.assert_close(paged_ref, ref)  # the reference's paging agrees with the packed rows
    naive, _ = attention_varlen_ref(q, k, v, cu_q, cu_k, window_right=0)
    bound = 2 * (naive.double() - ref).abs().max().item() + 1e-6
    for got in (out, out_fa):
        assert (got[None].double() - ref).abs().max().item() <= bound
    # Paged K/V is read as the packed rows are: the same kernels, the same blocks.
    assert (out_fa.double() - dense.double()).abs().max().item() <= bound


@pytest.mark.parametrize("path", sorted(BF16_PATHS))
def test_paged_kv_bf16_product_paths(path, cpu_switch):
    bf16_path(cpu_switch, path)
    test_paged_kv_any_page_size(16, torch.bfloat16)


def test_dense_q_with_paged_cache_and_seqused_k():
    # KV-cache decoding shape: dense q (B, Sq) over a paged cache, keys per row in seqused_k.
    page_size, heads, head_dim = 5, 2, 16
    q = torch.randn(3, 2, heads, head_dim)
    pool_k, pool_v = torch.randn(12, page_size, heads, head_dim), torch.randn(12, page_size, heads, head_dim)
    block_table = torch.tensor([[3, 7, 1], [0, 2, 11], [5, 4, 6]], dtype=torch.int32)
    seqused = torch.tensor([11, 2, 15], dtype=torch.int32)
    out, _ = ops.attention(q, pool_k, pool_v, scale=0.25, window_right=0, block_table=block_table,
                           seqused_k=seqused, max_seqlen_q=2, max_seqlen_k=15, bottom_right=True)
    ref, _ = attention_varlen_ref(q.double(), pool_k.double(), pool_v.double(), None, None, seqused_k=seqused,
                                  block_table=block_table, scale=0.25, window_right=0)
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5)


def test_paged_backward_is_refused():
    # flash-attn's paged varlen function runs the forward of inputs that need a gradient (a
    # model run for inference outside no_grad) and fails in the backward; torch's
    # varlen_attn refuses the call itself.
    q = torch.randn(4, 2, 8, requires_grad=True)
    pool = torch.randn(3, 2, 2, 8)
    table = torch.tensor([[0, 2, 1]], dtype=torch.int32)
    out = flashattn_py.flash_attn_varlen_func(q, pool, pool, offsets([4]), offsets([5]), 4, 5, block_table=table)
    with torch.no_grad():
        want = flashattn_py.flash_attn_varlen_func(q, pool, pool, offsets([4]), offsets([5]), 4, 5,
                                                   block_table=table)
    assert torch.equal(out, want) and out.requires_grad
    out.mul_(1.0)  # (an output that can be changed in place, as any other)
    with pytest.raises(ValueError, match="block_table: paged K/V is forward-only"):
        out.sum().backward()
    assert q.grad is None
    with pytest.raises(ValueError, match="block_table: paged K/V is forward-only"):
        torch.func.grad(lambda q: flashattn_py.flash_attn_varlen_func(q, pool, pool, offsets([4]), offsets([5]), 4, 5,
                                                                       block_table=table).sum())(q)
    # compiled, the call itself raises (the backward's raise would be traced with it)
    compiled = torch.compile(lambda q: flashattn_py.flash_attn_varlen_func(q, pool, pool, offsets([4]), offsets([5]),
                                                                           4, 5, block_table=table), backend="eager",
                             fullgraph=True)
    with pytest.raises(Exception, match="paged K/V is forward-only"):
        compiled(q)
    with pytest.raises(ValueError, match="block_table: paged K/V is forward-only"):
        flashattn_py.varlen_attn(q, pool, pool, offsets([4]), None, 4, 5, seqused_k=torch.tensor([5], dtype=torch.int32),
                                 block_table=table)


def test_one_kernel_call_for_many_sequences():
    # 32 sequences record as many flashattn kernel ops as one, forward and backward.
    def count(lengths):
        cu = offsets(lengths)
        q = torch.randn(sum(lengths), 2, 16, requires_grad=True)
        with torch.profiler.profile() as prof:
            out = flashattn_py.flash_attn_varlen_func(q, q, q, cu, cu, max(lengths), max(lengths), causal=True)
            out.sum().backward()
        return sum(1 for e in prof.events() if e.name.startswith("flashattn::"))

    many = count([int(x) for x in torch.randint(1, 40, (32,), generator=torch.Generator().manual_seed(0))])
    assert many == count([17]) and many > 0


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(cu_q=[0, 3, 2]), r"cu_seq_q: must rise from 0"),
        (dict(cu_q=[0, 3, 4]), r"cu_seq_q: must rise from 0 to the total length 5"),
        (dict(max_q=2), r"max_q: 2 is below the longest sequence \(3\)"),
        (dict(cu_q=torch.tensor([0, 3, 5.0])), r"cu_seq_q: expected a 1-D int32"),
        (dict(cu_q=[0, 5]), r"cu_seq_q, cu_seq_k: batch sizes differ"),
        (dict(cu_k=[1, 2, 5]), r"cu_seq_k: must rise from 0"),
        (dict(seqused=[2, 9]), r"seqused_k: sequence 1 uses 9 keys"),
        # int64 values past int32 are refused, not narrowed (2**32 + 2 would read as 2)
        (dict(cu_k=torch.tensor([0, 2**32 + 2, 5])), r"cu_seq_k: values must fit in int32, got 4294967298"),
        (dict(cu_q=torch.tensor([0, 3, -2**32 + 5])), r"cu_seq_q: values must fit in int32, got -4294967291"),
        (dict(window=(-2, 0)), r"window_size"),
        (dict(window=(0.5, 0)), r"window_size: expected \(left, right\) ints"),
        (dict(max_q=3.0), r"max_q: expected an int >= 0, got 3.0"),
        (dict(max_q=-1), r"max_q: expected an int >= 0, got -1"),
    ],
)
def test_varlen_rejects_bad_input_naming_the_argument(change, match):
    q = torch.randn(5, 2, 8)
    k = torch.randn(5, 2, 8)

    def idx(x):
        return x if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=torch.int32)

    cu_q, cu_k = idx(change.get("cu_q", [0, 3, 5])), idx(change.get("cu_k", [0, 2, 5]))
    seqused = idx(change["seqused"]) if "seqused" in change else None
    with pytest.raises(ValueError, match=match):
        flashattn_py.varlen_attn(q, k, k, cu_q, cu_k, change.get("max_q", 3), 3, seqused_k=seqused,
                                 window_size=change.get("window", (-1, -1)))


def test_paged_rejects_bad_pages():
    q = torch.randn(4, 2, 8)
    pool = torch.randn(3, 2, 2, 8)
    cu = offsets([4])
    for table, seqused, max_k, match in (
            ([[0, 3]], [4], 4, r"block_table: sequence 0's pages must be in \[0, 3\)"),
            ([[0, 1]], [5], 4, r"seqused_k: sequence 0 uses 5 keys, outside \[0, 4\]"),
            ([[0, 1]], [5], 8,
             r"block_table: 2 pages of 2 keys per sequence hold fewer than the 5 keys sequence 0 uses"),
            ([[0, 2**32 + 1]], [4], 4, r"block_table: values must fit in int32, got 4294967297")):
        dtype = torch.int64 if max(table[0]) >= 2**31 else torch.int32
        with pytest.raises(ValueError, match=match):
            flashattn_py.varlen_attn(q, pool, pool, cu, None, 4, max_k,
                                     seqused_k=torch.tensor(seqused, dtype=torch.int32),
                                     block_table=torch.tensor(table, dtype=dtype))
    # an empty pool: its entries could only point outside it (refused from the shapes, for GPUs)
    with pytest.raises(ValueError, match=r"key: an empty page pool \(0 pages\) with block_table entries"):
        flashattn_py.varlen_attn(q, pool[:0], pool[:0], cu, None, 4, 4, seqused_k=torch.tensor([4], dtype=torch.int32),
                                 block_table=torch.tensor([[0, 1]], dtype=torch.int32))


def test_varlen_lse_and_packed_forms():
    lens = [4, 11, 6]
    cu = offsets(lens)
    qkv = torch.randn(sum(lens), 3, 2, 8)
    out, lse, probs = flashattn_py.flash_attn_varlen_qkvpacked_func(qkv, cu, 11, causal=True, return_attn_probs=True)
    assert out.shape == (21, 2, 8) and lse.shape == (2, 21) and probs.shape == (0,)  # (empty without dropout)
    probs = flashattn_py.flash_attn_varlen_qkvpacked_func(qkv, cu, 11, dropout_p=0.5, causal=True,
                                                          return_attn_probs=True)[2]
    # (flash-attn's one padded tensor (B, H, max_q, max_k): sequence b's in [b, :, :Sq_b, :Sk_b])
    assert probs.shape == (3, 2, 11, 11)
    q, k, v = qkv.unbind(1)
    expected = flashattn_py.flash_attn_varlen_func(q, k, v, cu, cu, 11, 11, causal=True)
    torch.testing.assert_close(out, expected)
    for b, (start, n) in enumerate(zip(cu.tolist(), lens)):
        p = probs[b, :, :n, :n]
        torch.testing.assert_close(torch.einsum("hqk,khd->qhd", p, v[start:start + n]), out[start:start + n])
        assert (probs[b, :, n:] == 0).all() and (probs[b, :, :, n:] == 0).all()  # zeros past the sequence
        assert (p.tril() == p).all()
    # max_seqlen 0 (not given): sized from the sequences; a larger one within the totals
    for given in (0, 10**9):
        assert flashattn_py.flash_attn_varlen_func(q, k, v, cu, cu, given, given, dropout_p=0.5, causal=True,
                                                   return_attn_probs=True)[2].shape == (3, 2, 11 if not given else 21,
                                                                                       11 if not given else 21)
    out_kv = flashattn_py.flash_attn_varlen_kvpacked_func(q, torch.stack([k, v], 1), cu, cu, 11, 11, causal=True)
    torch.testing.assert_close(out_kv, expected)
    batch = torch.randn(2, 9, 3, 2, 8)
    dense = flashattn_py.flash_attn_qkvpacked_func(batch, causal=True)
    torch.testing.assert_close(dense, flashattn_py.flash_attn_func(*batch.unbind(2), causal=True))
    torch.testing.assert_close(flashattn_py.flash_attn_kvpacked_func(batch[:, :, 0], batch[:, :, 1:]),
                               flashattn_py.flash_attn_func(*batch.unbind(2)))


def test_compile_fullgraph_dynamic_without_recompiles(compiled_graphs):
    @torch.compile(backend=compiled_graphs.backend, fullgraph=True, dynamic=True)
    def step(q, k, v, cu, max_len):
        return flashattn_py.flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=True).sum() + \
            flashattn_py.varlen_attn(q, k, v, cu, cu, max_len, max_len, window_size=(-1, 0)).sum()

    q = torch.randn(40, 2, 16)
    for lengths in ([10, 30], [25, 15], [1, 39], [20, 5, 15]):
        cu = offsets(lengths)
        got = step(q, q, q, cu, max(lengths))
        want = 2 * flashattn_py.flash_attn_varlen_func(q, q, q, cu, cu, max(lengths), max(lengths), causal=True).sum()
        torch.testing.assert_close(got, want)
    # (a new batch size may compile once more)
    assert len(compiled_graphs) <= 2, f"recompiled {len(compiled_graphs)} times"


def test_lengths_and_windows_as_numpy_integers_or_tensors():
    # What torch's int arguments take: NumPy integers, one-element integer tensors (e.g.
    # cu_seqlens.diff().max()).
    q = torch.randn(9, 2, 16)
    cu = offsets([4, 5])
    want = flashattn_py.flash_attn_varlen_func(q, q, q, cu, cu, 5, 5, window_size=(2, 1))
    for length, window in ((np.int64(5), (np.int32(2), np.int64(1))), (cu.diff().max(), torch.tensor([2, 1]))):
        got = flashattn_py.flash_attn_varlen_func(q, q, q, cu, cu, length, length, window_size=window)
        assert torch.equal(got, want)


def test_compiled_calls_check_the_values_when_they_run():
    # Traced, the offsets' values are unknown: the compiled graph checks them as it runs
    # (flashattn::check_packed), so a bad value still raises instead of being clamped into
    # a wrong answer.
    torch._dynamo.reset()

    @torch.compile(backend="aot_eager", fullgraph=True, dynamic=True)
    def step(q, cu, max_q, max_k):
        return flashattn_py.flash_attn_varlen_func(q, q, q, cu, cu, max_q, max_k, causal=True)

    q = torch.randn(9, 2, 16)
    cu = offsets([4, 5])
    torch.testing.assert_close(step(q, cu, 5, 5), flashattn_py.flash_attn_varlen_func(q, q, q, cu, cu, 5, 5,
                                                                                       causal=True))
    with pytest.raises(ValueError, match="max_seqlen_k: 2 is below the longest sequence"):
        step(q, cu, 5, 2)
    with pytest.raises(ValueError, match="max_seqlen_q: 3 is below the longest sequence"):
        step(q, cu, 3, 5)
    with pytest.raises(ValueError, match="cu_seqlens_q: must rise from 0 to the total length 9"):
        step(q, offsets([4, 4]), 5, 5)
    with pytest.raises(ValueError, match="cu_seqlens_q: values must fit in int32, got 4294967300"):
        step(q, torch.tensor([0, 2**32 + 4, 9]), 5, 5)  # (narrowed unchecked, it would read as 4)
    names = ",".join(api.FLASH_NAMES.values())
    torch.library.opcheck(torch.ops.flashattn.check_packed.default, (cu, cu, 5, 5, 9, 9, None, None, 0, 0, names))


def _jagged(lengths, heads, head_dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    parts = [torch.randn(n, heads, head_dim, generator=gen).to(dtype) for n in lengths]
    return torch.nested.nested_tensor(parts, layout=torch.jagged, requires_grad=True).transpose(1, 2)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("patched", [False, True])
def test_nested_jagged_sdpa(causal, patched):
    # torch's SDPA layout for nested inputs: (B, H, j, D), jagged. Served by the packed
    # kernels (torch's own CPU SDPA refuses is_causal with nested inputs).
    lengths = [3, 10, 1, 7, 0]
    q, k, v = (_jagged(lengths, 2, 16, torch.float32, s) for s in (1, 2, 3))
    if patched:
        flashattn_py.patch_sdpa()
        try:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        finally:
            flashattn_py.unpatch_sdpa()
    else:
        out = flashattn_py.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert out.is_nested and out.shape[:2] == (5, 2) and out.shape[3] == 16
    cu = offsets(lengths)
    rows = [t.transpose(1, 2).values()[None] for t in (q, k, v)]
    ref, _ = attention_varlen_ref(*(r.detach().double() for r in rows), cu, cu, window_right=0 if causal else -1,
                                  bottom_right=False)
    got = out.transpose(1, 2).values()
    torch.testing.assert_close(got.double(), ref[0], atol=2e-6, rtol=1e-5)
    if not causal:  # torch's own (math on nested) agrees
        torch.testing.assert_close(got, torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)
                                   .values())


def test_nested_sdpa_gradients_match_reference():
    lengths = [4, 9, 2]
    cu = offsets(lengths)
    gen = torch.Generator().manual_seed(7)
    values = [torch.randn(sum(lengths), 2, 8, generator=gen, requires_grad=True) for _ in range(3)]
    q, k, v = (torch.nested.nested_tensor_from_jagged(x, cu.long()).transpose(1, 2) for x in values)
    out = flashattn_py.scaled_dot_product_attention(q, k, v, is_causal=True)
    dout = torch.randn(sum(lengths), 2, 8, generator=gen)
    (out.transpose(1, 2).values() * dout).sum().backward()
    leaves = [x.detach().double().requires_grad_() for x in values]
    ref, _ = attention_varlen_ref(*(x[None] for x in leaves), cu, cu, window_right=0, bottom_right=False)
    (ref[0] * dout.double()).sum().backward()
    for name, x, leaf in zip("qkv", values, leaves):
        torch.testing.assert_close(x.grad.double(), leaf.grad, atol=1e-5, rtol=1e-5, msg=name)


def test_nested_sdpa_with_every_weight_dropped_gives_zeros():
    # dropout_p = 1: zeros and zero gradients, as torch and the dense path (was refused:
    # the packed kernels take [0, 1)).
    cu = offsets([3, 5])
    values = [torch.randn(8, 2, 8, requires_grad=True) for _ in range(3)]
    q, k, v = (torch.nested.nested_tensor_from_jagged(x, cu.long()).transpose(1, 2) for x in values)
    out = flashattn_py.scaled_dot_product_attention(q, k, v, dropout_p=1.0)
    assert out.is_nested and out.shape[:2] == (2, 2) and out.shape[-1] == 8
    assert torch.equal(out.transpose(1, 2).values(), torch.zeros(8, 2, 8))
    out.transpose(1, 2).values().sum().backward()
    assert all(torch.equal(x.grad, torch.zeros_like(x)) for x in values)


@pytest.mark.parametrize("change,kwargs,match", [
    ("key_dim", {}, "^query, key: head dims differ"),
    ("key_dtype", {}, "^query, key, value: "),
    ("", {"scale": float("nan")}, "^scale: expected a finite number"),
    ("", {"dropout_p": 1.5}, r"^dropout_p: dropout probability has to be in \[0, 1\]"),  # (SDPA's range)
    # (offsets then mark where each sequence starts only: refused as torch's CPU SDPA does,
    # not read as sequences of the offsets' spacing)
    ("key_holes", {}, r"^key: a jagged nested tensor with holes .* pass key.transpose\(1, 2\).contiguous\(\)"),
])
def test_nested_sdpa_errors_name_sdpa_arguments(change, kwargs, match):
    # Nested inputs go through the packed-sequence checks, under SDPA's argument names (they
    # named flash-attn's q, k and softmax_scale).
    def nested(dim, dtype=torch.float32):
        return torch.nested.nested_tensor_from_jagged(torch.randn(8, 2, dim).to(dtype), offsets([3, 5]).long()
                                                      ).transpose(1, 2)

    def with_holes():  # sequences of 2 and 4 rows at offsets 0 and 3 of 8 rows
        rows = torch.nested.nested_tensor_from_jagged(torch.randn(8, 2, 8), offsets([3, 5]).long(),
                                                      lengths=torch.tensor([2, 4]))
        return rows.transpose(1, 2)

    q = nested(8)
    k = {"key_dim": nested(4), "key_dtype": nested(8, torch.float16), "key_holes": with_holes()}.get(change, nested(8))
    with pytest.raises(ArgumentError, match=match):
        flashattn_py.scaled_dot_product_attention(q, k, nested(8), **kwargs)


@pytest.mark.skipif(flashattn_py.backends.triton_error() is not None or
                    not flashattn_py.backends.triton_interpreted(), reason="needs the Triton interpreter")
def test_varlen_through_the_op_on_triton():
    # The op binds the packed-sequence values to the Triton launchers by name (fwd and bwd).
    lens_q, lens_k = [5, 0, 17], [7, 3, 12]
    cu_q, cu_k = offsets(lens_q), offsets(lens_k)
    q, k, v = packed_qkv(lens_q, lens_k, 2, 1, 16, torch.float32, 9)
    check_attention(varlen_call(cu_q, cu_k, lens_q, lens_k, causal=True, backend="triton"), q, k, v,
                    cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, bottom_right=True, window_right=0)


def test_op_level_packed_calls_are_defined():
    # max_seqlen 0 means "not given" (the totals bound the sequences); rows of q in no
    # sequence come back as out 0, lse -inf; packed q over dense k needs one k row per
    # sequence (else the kernels would read past k).
    cu = offsets([3, 5])
    q = torch.randn(1, 10, 2, 16)  # rows 8, 9 are in no sequence
    k = torch.randn(1, 8, 2, 16)
    out, lse = ops.attention(q, k, k, scale=0.25, cu_seqlens_q=cu, cu_seqlens_k=cu, bottom_right=True,
                             window_right=0)
    ref, ref_lse = attention_varlen_ref(q.double(), k.double(), k.double(), cu, cu, window_right=0, scale=0.25)
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5)
    assert torch.equal(out[0, 8:], torch.zeros_like(out[0, 8:])) and torch.isinf(lse[0, :, 8:]).all()
    torch.testing.assert_close(lse[0, :, :8].double(), ref_lse[0, :, :8], atol=2e-6, rtol=1e-5)
    with pytest.raises(RuntimeError, match="one batch row per sequence"):
        ops.attention(q, torch.randn(1, 5, 2, 16), torch.randn(1, 5, 2, 16), scale=0.25, cu_seqlens_q=cu,
                      max_seqlen_q=5)


def test_op_level_rows_without_a_task_are_cleared():
    # The CPU op clears only the rows after the last sequence when cu_seqlens_q rises from
    # 0 in steps of at most max_seqlen_q; other values (the op called directly, unchecked)
    # clear everything first. Memory of out's size filled with NaN and freed just before
    # the call is what the allocator most likely hands back: no row may keep it.
    q = torch.randn(1, 10, 2, 16)
    k = torch.randn(1, 10, 2, 16)
    for cu_list, max_q, written in (([0, 3, 8], 0, 8), ([0, 5, 3], 0, None), ([0, 6, 10], 4, None),
                                    ([2, 5, 9], 0, None)):
        cu = torch.tensor(cu_list, dtype=torch.int32)
        del_me = torch.full((1, 10, 2, 16), float("nan")), torch.full((1, 2, 10), float("nan"))
        del del_me
        out, lse = ops.attention(q, k, k, scale=0.25, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_q)
        assert not out.isnan().any() and not lse.isnan().any(), cu_list
        if written is not None:
            assert torch.equal(out[0, written:], torch.zeros_like(out[0, written:]))
            assert (lse[0, :, written:] == float("-inf")).all()
            ref, _ = attention_varlen_ref(q.double()[:, :written], k.double(), k.double(), cu, cu, scale=0.25)
            torch.testing.assert_close(out[:, :written].double(), ref, atol=2e-6, rtol=1e-5)


def test_varlen_gqa_backward_many_short_sequences_and_one_long():
    # The GQA backward's per-head scratch follows k's rows (total_k), not sequences x longest.
    lens = [1] * 60 + [700]
    cu = offsets(lens)
    q, k, v = packed_qkv(lens, lens, 4, 1, 16, torch.float32, 21)
    check_attention(varlen_call(cu, cu, lens, lens, causal=True), q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu,
                    bottom_right=True, window_right=0)


@pytest.mark.parametrize("max_seqlen_q", [4, 0])
def test_varlen_call_with_gradients_runs_the_inference_path(max_seqlen_q):
    # A call with gradients is given its CPU path from q's longest sequence (ops._with_cpu_path),
    # as the kernels choose it without one (fill_params' seqlen_q: max_seqlen_q, or the total
    # when 0): 5 sequences of 4 queries go row by row, 20 would go on the tiles. The two
    # forwards run the same path: bitwise equal outputs.
    from flashattn_py import _C

    if "avx2-tiles" not in _C.CPU_KERNELS:
        pytest.skip(f"this build's CPU kernels are {_C.CPU_KERNELS!r}: one path only")
    cu = offsets([4] * 5)
    q, k, v = packed_qkv([4] * 5, [4] * 5, 2, 2, 64, torch.float32, seed=9)

    def run(q, k, v):
        return ops.attention(q, k, v, scale=0.125, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_seqlen_q,
                             max_seqlen_k=max_seqlen_q, bottom_right=True, backend="cpu")[0]

    with torch.no_grad():
        inference = run(q, k, v)
    trained = run(*(t.clone().requires_grad_() for t in (q, k, v)))
    assert torch.equal(trained.detach(), inference)


def test_max_seqlen_beyond_the_total_is_the_total():
    # (2**62 sized the backward's buffers: a crash; 0 for max_seqlen_k, "not given", made every
    # right window side unbounded)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(8, 2, 8, generator=gen).requires_grad_() for _ in range(3))
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    want = flashattn_py.flash_attn_varlen_func(q, k, v, cu, cu, 5, 5, causal=True)
    got = flashattn_py.flash_attn_varlen_func(q, k, v, cu, cu, 2**62, 2**62, causal=True)
    assert torch.equal(got, want)
    grads = torch.autograd.grad(got, (q, k, v), torch.ones_like(got))
    assert all(torch.equal(a, b) for a, b in zip(grads, torch.autograd.grad(want, (q, k, v), torch.ones_like(want))))
    with torch.no_grad():
        windowed = flashattn_py.flash_attn_varlen_func(q, k, v, cu, cu, 5, 5, window_size=(2, 1))
        assert torch.equal(flashattn_py.flash_attn_varlen_func(q, k, v, cu, cu, 5, 0, window_size=(2, 1)), windowed)


def test_a_block_table_may_list_a_page_twice():
    # A sequence holds more keys than the pool when its table repeats a page: max_seqlen_k is
    # bounded by the table's keys, not the pool's.
    gen = torch.Generator().manual_seed(4)
    pool_k, pool_v = torch.randn(2, 4, 2, 8, generator=gen), torch.randn(2, 4, 2, 8, generator=gen)
    q = torch.randn(3, 2, 8, generator=gen)
    table = torch.tensor([[0, 1, 0]], dtype=torch.int32)
    used = torch.tensor([12], dtype=torch.int32)
    cu_q = torch.tensor([0, 3], dtype=torch.int32)
    with torch.no_grad():
        got = flashattn_py.varlen_attn(q, pool_k, pool_v, cu_q, None, 3, 12, seqused_k=used, block_table=table)
    keys, values = (torch.cat([pool[0], pool[1], pool[0]]) for pool in (pool_k, pool_v))
    want = flashattn_py.flash_attn_varlen_func(q, keys, values, cu_q, torch.tensor([0, 12], dtype=torch.int32), 3, 12)
    torch.testing.assert_close(got, want)

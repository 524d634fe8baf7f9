"""flash_attn_with_kvcache on the CPU backend against reference.attention_kvcache_ref.

The reference updates a copy of the caches, rotates by the formula and attends per batch
entry in float64; ours must match it by the project's rule (tests/rule.py), and leave the
caches holding exactly the reference's (the new k rotated and rounded as ours rounds it).
"""
import contextlib
import itertools
import math
from unittest import mock

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import flashattn_py
from flashattn_py import kvcache
from flashattn_py.reference import attention_kvcache_ref
from cpu_paths import amx_runs, bf16_path
from devices import BACKENDS_ON_THEIR_DEVICE, has_cuda_kernels
from rule import OUT_FACTOR, assert_rule


def _rotary(seqlen_ro, rotary_dim, dtype, gen):
    angle = torch.rand(seqlen_ro, rotary_dim // 2, generator=gen, dtype=torch.float64) * 2 * math.pi
    return torch.cos(angle).to(dtype), torch.sin(angle).to(dtype)


def _paged(k_cache, v_cache, page_size, gen):
    """The dense caches (B, S, Hk, D) as shuffled pages: (pool_k, pool_v, block_table)."""
    batch, seqlen = k_cache.shape[:2]
    blocks = -(-seqlen // page_size)
    num_pages = batch * blocks + 2
    perm = torch.randperm(num_pages, generator=gen)[:batch * blocks].view(batch, blocks)
    pool_k = torch.randn(num_pages, page_size, *k_cache.shape[2:], generator=gen).to(k_cache.dtype)
    pool_v = torch.randn(num_pages, page_size, *v_cache.shape[2:], generator=gen).to(v_cache.dtype)
    for b, blk in itertools.product(range(batch), range(blocks)):
        rows = slice(blk * page_size, min(seqlen, (blk + 1) * page_size))
        pool_k[perm[b, blk], :rows.stop - rows.start] = k_cache[b, rows]
        pool_v[perm[b, blk], :rows.stop - rows.start] = v_cache[b, rows]
    return pool_k, pool_v, perm.to(torch.int32)


def run_case(dtype=torch.float32, batch=3, seqlen_q=1, heads=8, heads_k=2, head_dim=64, seqlen_cache=40, new=1,
             lengths=None, page_size=None, batch_idx=False, leftpad=False, rotary_dim=0, interleaved=True,
             causal=True, window=(-1, -1), softcap=0.0, alibi=False, num_splits=0, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    rows = batch * 2 if batch_idx else batch
    q = randn(batch, seqlen_q, heads, head_dim)
    k_cache, v_cache = randn(rows, seqlen_cache, heads_k, head_dim), randn(rows, seqlen_cache, heads_k, head_dim)
    k = randn(batch, new, heads_k, head_dim) if new else None
    v = randn(batch, new, heads_k, head_dim) if new else None
    if lengths is None:
        lengths = torch.randint(0, seqlen_cache - new + 1, (batch,), generator=gen).tolist()
    cache_seqlens = torch.tensor(lengths, dtype=torch.int32)
    cache_batch_idx = torch.randperm(rows, generator=gen)[:batch].to(torch.int32) if batch_idx else None
    cache_leftpad = None
    if leftpad:
        cache_leftpad = torch.tensor([int(torch.randint(0, n + 1, (1,), generator=gen)) for n in lengths],
                                     dtype=torch.int32)
    cos = sin = None
    if rotary_dim:
        cos, sin = _rotary(seqlen_cache + seqlen_q, rotary_dim, dtype, gen)
    slopes = torch.rand(batch, heads, generator=gen) * 0.3 if alibi else None
    block_table = None
    call_k, call_v = k_cache.clone(), v_cache.clone()
    ref_k_cache, ref_v_cache = k_cache, v_cache
    if page_size is not None:
        call_k, call_v, block_table = _paged(k_cache, v_cache, page_size, gen)
        # (the reference's caches as long as the call's capacity, blocks x page size: window
        # sides compare with it; the slots past seqlen_cache are never read)
        pad = block_table.shape[1] * page_size - seqlen_cache
        ref_k_cache, ref_v_cache = (torch.nn.functional.pad(t, (0, 0, 0, 0, 0, pad)) for t in (k_cache, v_cache))
    kw = dict(rotary_cos=cos, rotary_sin=sin, cache_seqlens=cache_seqlens, cache_batch_idx=cache_batch_idx,
              cache_leftpad=cache_leftpad, rotary_interleaved=interleaved)
    with torch.no_grad():
        out, lse = flashattn_py.flash_attn_with_kvcache(
            q, call_k, call_v, k, v, block_table=block_table, causal=causal, window_size=window, softcap=softcap,
            alibi_slopes=slopes, num_splits=num_splits, return_softmax_lse=True, backend="cpu", **kw)
    ref_kw = dict(kw, causal=causal, window_left=window[0], window_right=window[1], softcap=softcap,
                  alibi_slopes=slopes)
    as64 = (lambda t: None if t is None else t.double())
    ref, ref_lse, ref_k, ref_v = attention_kvcache_ref(
        q.double(), ref_k_cache.double(), ref_v_cache.double(), as64(k), as64(v),
        **{**ref_kw, "rotary_cos": as64(cos), "rotary_sin": as64(sin)})
    naive, _, _, _ = attention_kvcache_ref(q, ref_k_cache, ref_v_cache, k, v, **ref_kw)
    assert_rule("out", out, ref, naive, OUT_FACTOR)
    assert_rule("lse", lse, ref_lse, ref_lse.to(dtype), OUT_FACTOR, atol=1e-5)
    # The caches: exactly the new values at the new slots (rotated keys within rounding of
    # the input dtype), untouched elsewhere.
    if page_size is not None:
        got_k = torch.stack([call_k[block_table[b].long()].flatten(0, 1)[:seqlen_cache] for b in range(batch)])
        got_v = torch.stack([call_v[block_table[b].long()].flatten(0, 1)[:seqlen_cache] for b in range(batch)])
        ref_k, ref_v = ref_k[:batch, :seqlen_cache], ref_v[:batch, :seqlen_cache]
    else:
        got_k, got_v = call_k, call_v
    assert torch.equal(got_v, ref_v.to(dtype))
    if rotary_dim:
        torch.testing.assert_close(got_k.double(), ref_k, atol=4 * torch.finfo(dtype).eps * 8, rtol=0)
    else:
        assert torch.equal(got_k, ref_k.to(dtype))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seqlen_q", [1, 3, 7])
def test_decode_steps(dtype, seqlen_q):
    run_case(dtype, seqlen_q=seqlen_q, new=seqlen_q, seed=seqlen_q)


@pytest.mark.parametrize("heads,heads_k,head_dim", [(8, 8, 64), (8, 2, 80), (32, 8, 128)])
def test_gqa_and_head_dims(heads, heads_k, head_dim):
    run_case(heads=heads, heads_k=heads_k, head_dim=head_dim, seqlen_q=2, new=2, seed=heads + head_dim)


@pytest.mark.parametrize("page_size", [1, 7, 16, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seqlen_q", [2, 3])
def test_paged_cache(page_size, dtype, seqlen_q):
    # (3 queries x 4 heads: 12 GQA-packed rows, column scores on the CPU, keys gathered across pages)
    run_case(dtype, page_size=page_size, seqlen_q=seqlen_q, new=seqlen_q, seqlen_cache=50, seed=page_size)


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_rotary(interleaved, causal):
    run_case(rotary_dim=32, interleaved=interleaved, causal=causal, seqlen_q=3, new=3, seed=int(interleaved))
    run_case(rotary_dim=64, interleaved=interleaved, causal=causal, page_size=7, seqlen_q=2, new=2, seed=5)


def test_window_as_long_as_the_cache_is_no_window():
    # As in flash-attn, a window side at least as long as the cache bounds nothing, so q is
    # rotated as without a window (every query at cache_seqlens), not position by position.
    run_case(rotary_dim=32, causal=False, window=(40, 40), seqlen_q=3, new=3, seqlen_cache=40, seed=9)
    run_case(rotary_dim=32, causal=False, window=(60, 45), seqlen_q=2, new=2, seqlen_cache=40, seed=10)


def test_bounded_left_side_bounds_the_right_at_the_capacity():
    # As in flash-attn (set_params_fprop), a bounded left side makes an unbounded right
    # side the cache's capacity: with more queries than the capacity + 1 the first rows
    # see only keys up to the capacity past their diagonal (here 6 queries over a cache of
    # 3: rows 0 and 1 lose the last keys). Contiguous and paged (capacity 2 pages of 3:
    # 9 queries, rows 0 and 1 clipped).
    run_case(causal=False, window=(1, -1), seqlen_q=6, new=0, seqlen_cache=3, lengths=[3, 3, 2], seed=11)
    run_case(causal=False, window=(2, -1), seqlen_q=9, new=2, seqlen_cache=4, lengths=[2, 1, 0], page_size=3, seed=12)


def test_cache_rows_leftpad_and_empty_caches():
    run_case(batch_idx=True, seqlen_q=2, new=2, lengths=[0, 13, 38], seed=1)
    run_case(leftpad=True, seqlen_q=2, new=2, seed=2)
    run_case(leftpad=True, page_size=7, seqlen_q=1, new=1, seed=3)
    run_case(new=0, lengths=[1, 40, 17], seqlen_q=1, causal=False, seed=4)  # attend only


@pytest.mark.parametrize("feature", ["softcap", "window", "alibi"])
def test_softcap_window_alibi(feature):
    kw = {"softcap": dict(softcap=4.0), "window": dict(window=(6, 0)), "alibi": dict(alibi=True)}[feature]
    run_case(seqlen_q=3, new=3, **kw)
    run_case(seqlen_q=1, new=1, page_size=16, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,heads_k,head_dim,seqlen_q", [(5, 5, 80, 1), (8, 2, 136, 1), (6, 3, 17, 3),
                                                             (4, 1, 96, 8), (8, 2, 64, 3), (16, 1, 40, 1)])
def test_long_caches_every_head_in_one_task(dtype, heads, heads_k, head_dim, seqlen_q):
    # Over 512 keys a decoding task does every head of its sequence, 32 keys of all heads at
    # a time (bf16 on the dot products: 16; float: 16 keys of each head in turn, P V into
    # running sums; paged: page run by page run, 16-bit rows prefetching the next run's
    # first rows): caches of many blocks with a partial last one, head dims with
    # vector tails (the 16-lane scores and the masked P V strips), GQA rows packed or not
    # (ALiBi's per-head slopes keep the heads apart; 12 and 16 packed rows: column scores),
    # 1-8 query rows, paged with pages of 1, 3 and 16 keys, and several num_splits.
    cases = [dict(), dict(num_splits=3), dict(page_size=1), dict(page_size=3, num_splits=1),
             dict(page_size=16, num_splits=5), dict(alibi=True), dict(page_size=16, window=(100, 0), softcap=5.0),
             dict(window=(300, 0)), dict(page_size=7, leftpad=True, num_splits=2)]
    for i, kw in enumerate(cases):
        run_case(dtype, batch=2, seqlen_q=seqlen_q, heads=heads, heads_k=heads_k, head_dim=head_dim,
                 seqlen_cache=700, lengths=[690 - seqlen_q, 411], new=seqlen_q, seed=100 * head_dim + i, **kw)


@pytest.mark.parametrize("heads,heads_k,head_dim,seqlen_q", [(32, 8, 128, 1), (4, 4, 80, 1), (32, 8, 128, 3)])
def test_float_blocks_across_heads_paged_equals_contiguous(heads, heads_k, head_dim, seqlen_q):
    # With the register tiles a float decoding task that does every head reads each 32-key block 16
    # keys of every head at a time and adds the block's P V to O once (csrc/cpu/flash_fwd.cpp
    # run_fwd): a paged cache, whose pages split the blocks into runs, then gives the
    # contiguous call's out and lse bitwise (head by head each run is added to O apart).
    from flashattn_py import _C
    if _C.CPU_ISA not in ("avx2", "avx512", "avx512bf16"):
        pytest.skip("blocks go across heads with the register tiles' kernels only (AVX2 and up)")
    gen = torch.Generator().manual_seed(11)
    # (3 queries x 4 heads: column scores; not causal, so every block's rows see it whole)
    q = torch.randn(2, seqlen_q, heads, head_dim, generator=gen)
    k_cache, v_cache = (torch.randn(2, 1000, heads_k, head_dim, generator=gen) for _ in range(2))
    lens = torch.tensor([1000, 613], dtype=torch.int32)
    # (Key splits: each a run of blocks, whose last prefetches no next block; pages of 1 to
    # 256 keys, a block's next rows taken across them.)
    for num_splits in (0, 1, 3, 7):
        outs = []
        for page_size in (None, 1, 7, 16, 256):
            kc, vc = k_cache, v_cache
            kw = dict(cache_seqlens=lens, causal=seqlen_q == 1, return_softmax_lse=True, num_splits=num_splits)
            if page_size:
                kc, vc, kw["block_table"] = _paged(k_cache, v_cache, page_size, torch.Generator().manual_seed(page_size))
            outs.append(flashattn_py.flash_attn_with_kvcache(q, kc, vc, **kw))
        for out, lse in outs[1:]:
            assert torch.equal(out, outs[0][0]) and torch.equal(lse, outs[0][1]), num_splits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("page_size", [None, 7])
@pytest.mark.parametrize("seqlen_q", [2, 3])
def test_gqa_rows_packed_per_sequence(dtype, page_size, seqlen_q):
    # With GQA the CPU row path computes a KV head's query heads at every query position
    # as one row block (up to 16 rows: here 2 or 3 queries x 4 heads), the causal diagonal
    # taken per sequence from its own cache length (bottom-right, after its left padding).
    # Out and lse are bitwise the call with K / V repeated per query head (no packing;
    # under 512 keys one head per task either way, one key split) up to 8 rows; 12 rows
    # take column scores in the tile kernels (csrc/cpu/tiles.h column_scores),
    # which sum each score in another order: there the two agree within rounding.
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(3, seqlen_q, 8, 40, generator=gen).to(dtype)
    k_cache, v_cache = (torch.randn(3, 300, 2, 40, generator=gen).to(dtype) for _ in range(2))
    lens = torch.tensor([299, 40, 171], dtype=torch.int32)
    leftpad = torch.tensor([0, 13, 100], dtype=torch.int32)
    outs = []
    for kc, vc in ((k_cache, v_cache), (k_cache.repeat_interleave(4, 2), v_cache.repeat_interleave(4, 2))):
        kw = dict(cache_seqlens=lens, cache_leftpad=leftpad, causal=True, num_splits=1, return_softmax_lse=True)
        if page_size:
            kc, vc, table = _paged(kc, vc, page_size, torch.Generator().manual_seed(0))
            kw["block_table"] = table
        with torch.no_grad():
            outs.append(flashattn_py.flash_attn_with_kvcache(q, kc, vc, **kw))
    # (column scores: float wherever the tiles run, bf16 in the AVX2 kernels; bf16 at head
    # dim 40 in the AVX-512 kernels: the row path)
    kernels = flashattn_py._C.CPU_KERNELS
    columns = "avx2-tiles" in kernels and (dtype == torch.float32 or "avx512-exp" not in kernels)
    if seqlen_q * 4 > 8 and columns:
        assert not torch.equal(outs[0][1], outs[1][1])  # (the packed call took column scores)
    else:
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    ref_kw = dict(cache_seqlens=lens, cache_leftpad=leftpad, causal=True)
    ref, ref_lse, _, _ = attention_kvcache_ref(q.double(), k_cache.double(), v_cache.double(), **ref_kw)
    naive, _, _, _ = attention_kvcache_ref(q, k_cache, v_cache, **ref_kw)
    for out, lse in outs:
        assert_rule("out", out, ref, naive, OUT_FACTOR)
        assert_rule("lse", lse, ref_lse, ref_lse.to(dtype), OUT_FACTOR, atol=1e-5)


@pytest.mark.parametrize("seqlen_q,heads,heads_k,head_dim", [(4, 32, 8, 128), (1, 16, 4, 64), (2, 8, 2, 96),
                                                             (5, 4, 4, 64)])
def test_bf16_rows_on_amx(seqlen_q, heads, heads_k, head_dim, cpu_switch):
    # bf16 calls that no backward follows with at least 4 query rows per task (here a KV
    # head's query heads x positions, GQA-packed, or 5 queries of one head) and head dims of
    # whole 32-element tiles go on AMX where the CPU has it (csrc/cpu/tiles_amx.h rows):
    # S^T = K Q^T with the cache's K rows read in place (a run's last keys under 16 from a
    # zero-padded copy), P V with P rounded to bf16, V rows paired. Against the
    # reference: caches of 0-3 keys (capacity of at most 16 keys: P in float off AMX,
    # flash_fwd.cpp rows_may_keep_few_keys), a few dozen (chunks of 1-7 keys: padded K,
    # odd V pairs), over 512 (every head in one task), pages of 1, 7 and 16 keys, a window
    # with softcap, key splits; and the path is taken (results differ from the row path's).
    if not amx_runs(cpu_switch):
        pytest.skip("no AMX tiles on this CPU or in this build")
    long = dict(batch=2, seqlen_cache=700, lengths=[690 - seqlen_q, 411])
    cases = [dict(seqlen_cache=8, lengths=[0, 1, 3]), dict(seqlen_cache=40), dict(seqlen_cache=50, page_size=7),
             long, dict(long, page_size=1), dict(long, page_size=16, window=(100, 0), softcap=5.0, num_splits=3)]
    differ = False
    for i, kw in enumerate(cases):
        args = dict(seqlen_q=seqlen_q, new=seqlen_q, heads=heads, heads_k=heads_k, head_dim=head_dim, seed=40 + i, **kw)
        out = run_case(torch.bfloat16, **args)
        cpu_switch("FLASHATTN_CPU_AMX", "0")
        differ |= not torch.equal(out, run_case(torch.bfloat16, **args))
        cpu_switch("FLASHATTN_CPU_AMX", "1")
    assert differ


@pytest.mark.parametrize("seqlen_q,heads,heads_k,head_dim", [(1, 32, 8, 128), (4, 32, 8, 128), (1, 16, 4, 64),
                                                             (2, 8, 2, 96), (5, 4, 4, 64), (3, 6, 3, 32),
                                                             (2, 12, 2, 64), (1, 16, 1, 32)])
def test_bf16_rows_on_dot_products(seqlen_q, heads, heads_k, head_dim, cpu_switch):
    # bf16 calls that no backward follows, with head dims of whole 32-element vectors, take
    # the row path's products on vdpbf16ps where the AVX512-BF16 products are chosen (AMD's
    # CPUs by default; csrc/cpu/tiles_bf16.h rows): Q kept in bf16, P rounded to bf16 for
    # P V against V rows interleaved per key pair. Against the reference: caches of 0-3 keys
    # (an odd key's zero partner), a few dozen, over 512 (every head in one task), pages of
    # 1, 7 and 16 keys (runs of odd length), a window with softcap, key splits, GQA rows
    # packed or not; and the path is taken (results differ from the fp32 row path's). With
    # 9-16 packed rows (4 x 4, 2 x 6, 1 x 16 here) whole blocks go in columns
    # (DotRowOperands::column_block): also a window without softcap, whose 16-key blocks
    # some rows see in part or not at all, and key splits there.
    bf16_path(cpu_switch, "dot")
    long = dict(batch=2, seqlen_cache=700, lengths=[690 - seqlen_q, 411])
    cases = [dict(seqlen_cache=8, lengths=[0, 1, 3]), dict(seqlen_cache=40), dict(seqlen_cache=50, page_size=7),
             long, dict(long, page_size=1), dict(long, page_size=16, window=(100, 0), softcap=5.0, num_splits=3),
             dict(long, page_size=7, alibi=True), dict(long, page_size=7, window=(21, 0)),
             dict(long, window=(21, 0), num_splits=3)]
    differ = False
    for i, kw in enumerate(cases):
        args = dict(seqlen_q=seqlen_q, new=seqlen_q, heads=heads, heads_k=heads_k, head_dim=head_dim, seed=70 + i, **kw)
        out = run_case(torch.bfloat16, **args)
        bf16_path(cpu_switch, "fp32")
        differ |= not torch.equal(out, run_case(torch.bfloat16, **args))
        bf16_path(cpu_switch, "dot")
    assert differ


@pytest.mark.parametrize("dtype,path", [(torch.float32, None), (torch.bfloat16, "dot")])
@pytest.mark.parametrize("nan_key", [696, 697])
def test_nan_key_under_key_splits(dtype, path, nan_key, cpu_switch):
    # A NaN K row among a cache's keys: the rows that see it come out NaN (out and lse), the
    # others by the rule, for every num_splits. Four queries of a group of four (16 packed
    # rows: bf16 blocks in columns, whose max leaves a NaN score out, as the row path's may);
    # key 696 is the first position's last visible one, so in its block the keys after it
    # are masked for that position: a split's part must still say NaN, not "no key seen"
    # (the column softmax lost it there once).
    if path:
        bf16_path(cpu_switch, path)
    gen = torch.Generator().manual_seed(nan_key)
    q = torch.randn(1, 4, 4, 64, generator=gen).to(dtype)
    k_cache, v_cache = (torch.randn(1, 700, 1, 64, generator=gen).to(dtype) for _ in range(2))
    k_cache[0, nan_key] = float("nan")
    lens = torch.tensor([700], dtype=torch.int32)
    ref, ref_lse, _, _ = attention_kvcache_ref(q.double(), k_cache.double(), v_cache.double(), cache_seqlens=lens,
                                               causal=True)
    naive, _, _, _ = attention_kvcache_ref(q, k_cache, v_cache, cache_seqlens=lens, causal=True)
    nan_rows = torch.isnan(ref)
    # (key 697: the first position does not see it; key 696: every position does)
    assert (nan_rows.any() and not nan_rows.all()) if nan_key == 697 else nan_rows.all()
    for splits in (0, 1, 2, 3):
        with torch.no_grad():
            out, lse = flashattn_py.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, causal=True,
                                                            num_splits=splits, return_softmax_lse=True, backend="cpu")
        assert torch.equal(torch.isnan(out), nan_rows), f"num_splits={splits}"
        assert torch.equal(torch.isnan(lse), torch.isnan(ref_lse)), f"num_splits={splits}"
        keep = ~nan_rows
        if keep.any():
            assert_rule("out", out[keep], ref[keep], naive[keep], OUT_FACTOR)


def test_every_num_splits_agrees():
    outs = [run_case(batch=1, heads=4, heads_k=4, seqlen_cache=3000, lengths=[2900], num_splits=n, seed=9)
            for n in (0, 1, 2, 5)]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], atol=1e-6, rtol=1e-5)


def _bad_calls():
    q = torch.randn(2, 1, 4, 16)
    cache = torch.randn(2, 8, 2, 16)
    new = torch.randn(2, 1, 2, 16)
    lens = torch.tensor([3, 8], dtype=torch.int32)  # entry 1 is full: no room for a new key
    cos = torch.randn(16, 9)  # rotary_dim 18 > head dim 16
    return [
        (dict(k=new, v=new, cache_seqlens=lens), r"cache_seqlens: entry 1 holds 8 keys"),
        (dict(k=new, v=None, cache_seqlens=3), r"k, v: pass both"),
        (dict(k=new, v=new, cache_seqlens=2, rotary_cos=cos, rotary_sin=cos), r"rotary_dim = 2 \* 9 must be in 1..16"),
        (dict(k=new, v=new, cache_seqlens=2, rotary_cos=cos[:, :4], rotary_sin=cos), r"rotary_sin: expected"),
        (dict(k=new, v=new, cache_seqlens=2, rotary_cos=cos[:, :4].double(), rotary_sin=cos[:, :4]),
         r"rotary_cos: expected q's dtype torch.float32, got torch.float64"),
        (dict(k=new, v=new, cache_seqlens=2, rotary_cos=cos[:, :4], rotary_sin=cos[:, :4] > 0),
         r"rotary_sin: expected q's dtype torch.float32, got torch.bool"),
        (dict(k=new.half(), v=new.half(), cache_seqlens=2), r"k: must match the cache's dtype"),
        (dict(cache_seqlens=2**31), r"cache_seqlens: 2147483648 does not fit in int32"),
        (dict(k=torch.randn(2, 1, 3, 16), v=new, cache_seqlens=2), r"k: expected \(B, S_new, Hk, D\)"),
        (dict(k=new, v=new, cache_seqlens=2, block_table=torch.tensor([[0], [5]], dtype=torch.int32)),
         r"block_table: entry 1's pages must be in"),
        (dict(k=new, v=new, cache_seqlens=2, cache_batch_idx=torch.tensor([0, 2], dtype=torch.int32)),
         r"cache_batch_idx: rows must be in"),
        (dict(q=torch.randn(2, 1, 3, 16)), r"number of query heads \(3\) must be a multiple"),
        # (converted or bounded only after the append, these left the new keys written)
        (dict(k=new, v=new, cache_seqlens=2, softmax_scale="a"), r"softmax_scale: expected a number"),
        (dict(k=new, v=new, cache_seqlens=2, softmax_scale=float("nan")), r"softmax_scale: expected a finite"),
        (dict(k=new, v=new, cache_seqlens=2, num_splits=2**63), r"num_splits: expected an int in"),
        (dict(k=new, v=new, cache_seqlens=2, cache_batch_idx=torch.tensor([1, 1], dtype=torch.int32)),
         r"cache_batch_idx: entries appending new keys must have rows of their own"),
        # (indices into an empty cache or pool: on GPUs, where values are not read back,
        # the kernels would clamp them to nothing)
        (dict(k_cache=torch.zeros(0, 8, 2, 16), cache_batch_idx=torch.tensor([0, 0], dtype=torch.int32)),
         r"k_cache: 0 cache rows for a batch of 2"),
        (dict(k_cache=torch.zeros(0, 4, 2, 16), block_table=torch.zeros(2, 2, dtype=torch.int32)),
         r"k_cache: an empty page pool"),
        # (an AttributeError on .requires_grad before, not naming the argument)
        (dict(q=[[0.0]]), r"q: expected a tensor, got list"),
        (dict(k=new.numpy(), v=new, cache_seqlens=2), r"k: expected a tensor, got ndarray"),
    ]


@pytest.mark.parametrize("call,match", _bad_calls())
def test_bad_input_names_the_argument_and_leaves_the_cache(call, match):
    q = call.pop("q", torch.randn(2, 1, 4, 16))
    k_cache = call.pop("k_cache", torch.randn(2, 8, 2, 16))
    v_cache = torch.randn_like(k_cache)
    before = k_cache.clone(), v_cache.clone()
    with pytest.raises(ValueError, match=match), torch.no_grad():
        flashattn_py.flash_attn_with_kvcache(q, k_cache, v_cache, **call)
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


def test_an_empty_batch_over_an_empty_pool_or_cache_is_served():
    # (the refusals of empty pools and caches count table entries and batch entries: an
    # empty batch reads nothing)
    q = torch.randn(0, 1, 4, 16)
    with torch.no_grad():
        out = flashattn_py.flash_attn_with_kvcache(q, torch.zeros(0, 4, 2, 16), torch.zeros(0, 4, 2, 16),
                                                   cache_seqlens=torch.zeros(0, dtype=torch.int32),
                                                   block_table=torch.zeros(0, 2, dtype=torch.int32))
        dense = flashattn_py.flash_attn_with_kvcache(q, torch.zeros(0, 8, 2, 16), torch.zeros(0, 8, 2, 16),
                                                     cache_seqlens=torch.zeros(0, dtype=torch.int32),
                                                     cache_batch_idx=torch.zeros(0, dtype=torch.int32))
    assert out.shape == dense.shape == (0, 1, 4, 16)


def test_no_backward():
    q = torch.randn(1, 1, 2, 8, requires_grad=True)
    cache = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="no backward"):
        flashattn_py.flash_attn_with_kvcache(q, cache, cache, cache_seqlens=2)


def _compiled_decode_step():
    """A causal decode step with new keys, compiled (fullgraph, aot_eager) afresh."""
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(q, k_cache, v_cache, k, v, lens):
        return flashattn_py.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lens, causal=True)

    return step


def test_compiled_decode_step_mutates_the_cache():
    # The append is an op with mutated arguments: torch.compile(fullgraph=True) keeps it.
    step = _compiled_decode_step()
    q, k, v = torch.randn(2, 1, 4, 16), torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16)
    k_cache, v_cache = torch.zeros(2, 8, 2, 16), torch.zeros(2, 8, 2, 16)
    lens = torch.tensor([0, 5], dtype=torch.int32)
    with torch.no_grad():
        out = step(q, k_cache, v_cache, k, v, lens)
        k_cache2, v_cache2 = torch.zeros(2, 8, 2, 16), torch.zeros(2, 8, 2, 16)
        want = flashattn_py.flash_attn_with_kvcache(q, k_cache2, v_cache2, k, v, cache_seqlens=lens, causal=True)
    torch.testing.assert_close(out, want)
    assert torch.equal(k_cache, k_cache2) and torch.equal(k_cache[1, 5], k[1, 0])


def test_compiled_decode_step_checks_the_values_before_writing():
    # Traced, cache_seqlens' values are unknown: the compiled graph checks them before the
    # write (flashattn::check_kvcache), so a full cache raises and stays untouched.
    step = _compiled_decode_step()
    q, k, v = torch.randn(2, 1, 4, 16), torch.randn(2, 2, 2, 16), torch.randn(2, 2, 2, 16)
    k_cache, v_cache = torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16)
    before = k_cache.clone(), v_cache.clone()
    with torch.no_grad():
        step(q, k_cache.clone(), v_cache.clone(), k, v, torch.tensor([0, 6], dtype=torch.int32))
        with pytest.raises(ValueError, match="cache_seqlens: entry 1 holds 7 keys; 2 new ones exceed its capacity"):
            step(q, k_cache, v_cache, k, v, torch.tensor([0, 7], dtype=torch.int32))
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])
    torch.library.opcheck(torch.ops.flashattn.check_kvcache.default,
                          (k_cache, torch.tensor([0, 6], dtype=torch.int32), 2, None, None, None, -1, True, 1))


@pytest.mark.parametrize("compiled_write", [True, False], ids=["kvcache_write", "index-ops"])
def test_append_is_one_op_in_traces_and_one_write_in_eager(compiled_write):
    # CPU caches: the compiled op flashattn::kvcache_write, eager and traced. Elsewhere (here
    # forced on the CPU) torch index ops: directly in eager calls on plain tensors
    # (torch.library.custom_op's wrapper costs more than the write), and in a trace
    # (torch.compile's graph, make_fx) the one mutating op kvcache_append, never the index
    # arithmetic behind it. Either way eager writes bump the caches' version counters.
    q, k, v = torch.randn(2, 1, 4, 16), torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16)
    lens = torch.tensor([0, 5], dtype=torch.int32)

    def step(q, k_cache, v_cache, k, v, lens):
        return flashattn_py.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lens)

    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    op = torch.ops.flashattn.kvcache_write.default if compiled_write else torch.ops.flashattn.kvcache_append.default
    with torch.no_grad(), mock.patch.object(kvcache, "_compiled_write", lambda device: compiled_write):
        k_cache, v_cache = torch.zeros(2, 8, 2, 16), torch.zeros(2, 8, 2, 16)
        before = k_cache._version, v_cache._version
        with mock.patch.object(kvcache, "kvcache_append", side_effect=AssertionError("eager went through the op")):
            with torch.profiler.profile() as prof:
                step(q, k_cache, v_cache, k, v, lens)
        assert k_cache._version > before[0] and v_cache._version > before[1]
        assert torch.equal(k_cache[1, 5], k[1, 0]) and torch.equal(v_cache[0, 0], v[0, 0])
        events = [e.name for e in prof.events()]
        assert ("flashattn::kvcache_write" in events) == compiled_write
        torch.compile(step, fullgraph=True, backend=record)(q, torch.zeros(2, 8, 2, 16), torch.zeros(2, 8, 2, 16),
                                                             k, v, lens)
        traced = make_fx(step)(q, torch.zeros(2, 8, 2, 16), torch.zeros(2, 8, 2, 16), k, v, lens)
    for gm in (*graphs, traced):
        calls = [node.target for node in gm.graph.nodes if node.op in ("call_function", "call_method")]
        assert calls.count(op) == 1
        assert not any("index_put" in str(target) for target in calls)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not has_cuda_kernels(), reason="needs an sm80+ CUDA GPU and the compiled CUDA ops")])])
@pytest.mark.parametrize("layout", ["dense", "dense-rows", "paged"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_kvcache_write_matches_the_index_ops(layout, dtype, device):
    # The compiled append (CPU; CUDA: one launch) against the torch index ops it replaces
    # (kvcache._write_new_keys), bitwise, on values that are not all in range (both clamp
    # every index into the caches): strided new keys, strided and mixed int32 / int64
    # index tensors, a transposed block table padded with -1, repeated cache rows, Dv != D.
    # Rows that clamp onto one slot carry equal values, so the order of the writes does
    # not matter.
    gen = torch.Generator().manual_seed(3)
    batch, new, heads = 3, 5, 2
    paged = layout == "paged"
    entries, slots = (7, 3) if paged else (4, 9)
    k_cache = torch.randn(entries, slots, heads, 16, generator=gen).to(device=device, dtype=dtype)
    v_cache = torch.randn(entries, slots, heads, 8, generator=gen).to(device=device, dtype=dtype)
    k = torch.randn(batch, heads, new, 16, generator=gen).to(device=device, dtype=dtype).transpose(1, 2)  # strided
    v = torch.randn(batch, new, heads, 8, generator=gen).to(device=device, dtype=dtype)
    for t in (k, v):  # the rows that clamp onto one slot (entry 1's last, entry 2's first)
        t[1, 2:] = t[1, 1]
        t[2, 1:4] = t[2, 0]
    for lens_dtype, index_dtype in ((torch.int32, torch.int64), (torch.int64, torch.int32)):
        # (capacity 9 dense, 12 paged: entry 1 runs past it, entry 2 starts before slot 0;
        # every other element of a longer tensor: strided)
        lens = torch.tensor([0, -1, 10 if paged else 7, -1, -3, -1], dtype=lens_dtype, device=device)[::2]
        rows = torch.tensor([2, -1, 9], dtype=index_dtype, device=device) if layout == "dense-rows" else None
        table = None
        if paged:  # (B, 4), column-major, -1 where no page is reached; pages 0, 2, 3, 6 written
            table = torch.tensor([[2, -5, 1, -1], [0, 4, 5, 40], [3, 6, 4, -1]], dtype=index_dtype,
                                 device=device).t().contiguous().t()
        want_k, want_v = k_cache.clone(), v_cache.clone()
        kvcache._write_new_keys(want_k, want_v, k, v, lens, rows, table)
        got_k, got_v = k_cache.clone(), v_cache.clone()
        torch.ops.flashattn.kvcache_write(got_k, got_v, k, v, lens, rows, table)
        assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
        assert not torch.equal(got_k, k_cache)


def test_compiled_write_gating():
    # The compiled append serves CPU caches and CUDA caches of sm80+ GPUs where the CUDA ops
    # are built; everything else keeps the index ops.
    from flashattn_py import backends
    cuda0 = torch.device("cuda", 0)
    assert kvcache._compiled_write(torch.device("cpu")) == (backends.compiled_ops_error() is None)
    assert not kvcache._compiled_write(torch.device("meta"))
    with mock.patch.object(backends, "cuda_kernels_error", lambda: None):
        for major, want in ((7, False), (8, True), (9, True)):
            with mock.patch.object(backends, "cuda_device_props", lambda index: (major, 0, 0)):
                assert kvcache._compiled_write(cuda0) == want
    with mock.patch.object(backends, "cuda_kernels_error", lambda: "built without CUDA kernels"), \
            mock.patch.object(backends, "cuda_device_props", lambda index: (9, 0, 0)):
        assert not kvcache._compiled_write(cuda0)


def test_append_bumps_versions_under_a_dispatch_mode():
    # A dispatch mode that only watches (FlopCounterMode, say) still sees a mutation.
    class Watch(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    q, new = torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8)
    k_cache, v_cache = torch.zeros(1, 4, 2, 8), torch.zeros(1, 4, 2, 8)
    before = k_cache._version, v_cache._version
    with torch.no_grad(), Watch():
        flashattn_py.flash_attn_with_kvcache(q, k_cache, v_cache, new, new, cache_seqlens=1)
    assert k_cache._version > before[0] and v_cache._version > before[1]
    assert torch.equal(k_cache[0, 1], new[0, 0])


def test_opcheck_kvcache_write():
    k_cache, v_cache = torch.zeros(2, 8, 2, 16), torch.zeros(2, 8, 2, 16)
    k, v = torch.randn(2, 3, 2, 16), torch.randn(2, 3, 2, 16)
    lens = torch.tensor([0, 5], dtype=torch.int32)
    torch.library.opcheck(torch.ops.flashattn.kvcache_write.default, (k_cache, v_cache, k, v, lens, None, None))
    table = torch.tensor([[1], [0]], dtype=torch.int32)
    torch.library.opcheck(torch.ops.flashattn.kvcache_write.default,
                          (torch.zeros(2, 8, 2, 16), torch.zeros(2, 8, 2, 16), k, v, lens, None, table))


def test_padded_block_tables_and_larger_caches_are_accepted():
    # Block table entries past an entry's pages are never read (allocators pad them with -1),
    # and a dense cache may have more rows than the batch (entry b reads row b), as in
    # flash-attn.
    q = torch.randn(2, 1, 4, 16)
    pool = torch.randn(6, 4, 2, 16)
    table = torch.tensor([[3, 1, -1], [0, -1, -1]], dtype=torch.int32)
    lens = torch.tensor([6, 2], dtype=torch.int32)
    with torch.no_grad():
        out = flashattn_py.flash_attn_with_kvcache(q, pool, pool.clone(), cache_seqlens=lens, block_table=table)
        ref, _, _, _ = attention_kvcache_ref(q.double(), pool.double(), pool.double(), cache_seqlens=lens,
                                             block_table=table)
        torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=1e-5)
        cache = torch.randn(5, 8, 2, 16)
        out = flashattn_py.flash_attn_with_kvcache(q, cache, cache, cache_seqlens=3)
        ref, _, _, _ = attention_kvcache_ref(q.double(), cache[:2].double(), cache[:2].double(),
                                             cache_seqlens=torch.tensor([3, 3]))
        torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=1e-5)


def test_a_refused_backend_leaves_the_cache():
    q, new = torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8)
    k_cache, v_cache = torch.zeros(1, 4, 2, 8), torch.zeros(1, 4, 2, 8)
    with pytest.raises(ValueError, match="backend 'cuda' can't serve"), torch.no_grad():
        flashattn_py.flash_attn_with_kvcache(q, k_cache, v_cache, new, new, cache_seqlens=1, backend="cuda")
    assert not k_cache.any() and not v_cache.any()


def _self_append_case():
    # k = k_cache[:, 3:6] appended at slot 5: slots 5..7 get the old rows 3..5 (the append
    # read row 5 after writing it: slot 7 held row 3), and v from k_cache's memory too.
    gen = torch.Generator().manual_seed(2)
    kv = torch.randn(2, 1, 40, 2, 8, generator=gen)  # (k_cache and v_cache in one tensor)
    q = torch.randn(1, 3, 2, 8, generator=gen)
    want_k, want_v = kv[0].clone(), kv[1].clone()
    want_k[:, 5:8], want_v[:, 5:8] = kv[0, :, 3:6], kv[0, :, 20:23]
    want = flashattn_py.flash_attn_with_kvcache(q, want_k.clone(), want_v.clone(), cache_seqlens=8, causal=True)
    return kv, q, want_k, want_v, want


def _self_append(q, k_cache, v_cache):
    return flashattn_py.flash_attn_with_kvcache(q, k_cache, v_cache, k_cache[:, 3:6], k_cache[:, 20:23],
                                                cache_seqlens=5, causal=True)


@pytest.mark.parametrize("how", ["compiled op", "index ops", "dispatch mode", "numpy views"])
def test_new_keys_read_from_the_cache_itself(how):
    from torch.utils.flop_counter import FlopCounterMode

    kv, q, want_k, want_v, want = _self_append_case()
    k_cache, v_cache = kv[0], kv[1]
    call = _self_append
    if how == "numpy views":  # (separate storages over the same memory)
        array = kv.numpy()
        k_cache, v_cache = torch.from_numpy(array[0]), torch.from_numpy(array[1])

        def call(q, k_cache, v_cache):
            return flashattn_py.flash_attn_with_kvcache(q, k_cache, v_cache, torch.from_numpy(array[0][:, 3:6]),
                                                        torch.from_numpy(array[0][:, 20:23]), cache_seqlens=5,
                                                        causal=True)
    mode = FlopCounterMode(display=False) if how == "dispatch mode" else contextlib.nullcontext()
    with mock.patch.object(kvcache, "_compiled_write", lambda device: how != "index ops"), torch.no_grad(), mode:
        out = call(q, k_cache, v_cache)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    assert torch.equal(out, want)


def test_compiled_append_of_the_cache_itself():
    # inductor drops the copy a traced call makes of such new keys: the CPU op reads them
    # from a copy of its own.
    kv, q, want_k, want_v, want = _self_append_case()
    with torch.no_grad():
        out = torch.compile(_self_append, backend="inductor", fullgraph=True)(q, kv[0], kv[1])
    assert torch.equal(kv[0], want_k) and torch.equal(kv[1], want_v)
    torch.testing.assert_close(out, want)


def test_inference_caches_are_written_only_in_inference_mode():
    # As torch's in-place ops: an inference tensor is not updated outside inference_mode.
    q, new = torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8)
    with torch.inference_mode():
        k_cache, v_cache = torch.zeros(1, 4, 2, 8), torch.zeros(1, 4, 2, 8)
    with pytest.raises(ValueError, match="k_cache: Inplace update to inference tensor outside InferenceMode"), \
            torch.no_grad():
        flashattn_py.flash_attn_with_kvcache(q, k_cache, v_cache, new, new, cache_seqlens=1)
    assert not k_cache.any() and not v_cache.any()
    with torch.inference_mode():
        flashattn_py.flash_attn_with_kvcache(q, k_cache, v_cache, new, new, cache_seqlens=1)
    assert torch.equal(k_cache[:, 1], new[:, 0])


def test_caches_whose_memory_is_shared_are_refused():
    # An expanded cache (stride 0: every entry's append into one memory) and one tensor as
    # both caches (the values over the keys) gave wrong answers silently.
    q, new = torch.randn(2, 1, 2, 8), torch.randn(2, 1, 2, 8)
    shared = torch.zeros(1, 4, 2, 8).expand(2, 4, 2, 8)
    with pytest.raises(ValueError, match="k_cache: an expanded tensor"), torch.no_grad():
        flashattn_py.flash_attn_with_kvcache(q, shared, torch.zeros(2, 4, 2, 8), new, new, cache_seqlens=1)
    cache = torch.zeros(2, 4, 2, 8)
    with pytest.raises(ValueError, match="k_cache, v_cache: the same memory"), torch.no_grad():
        flashattn_py.flash_attn_with_kvcache(q, cache, cache, new, new, cache_seqlens=1)
    assert not shared.any() and not cache.any()
    # Views of one buffer one element apart (a review: the values' append overwrote the keys
    # just written, silently); views side by side or interleaved share no element and work.
    buf, grid, numpy_buf = torch.zeros(2, 4, 2, 9), torch.zeros(17, 10), torch.zeros(3, 4, 2, 8).numpy()
    for k_cache, v_cache in ((buf[..., :8], buf[..., 1:]),
                             (grid[:-1, 2:].reshape(2, 4, 2, 8), grid[1:, :8].reshape(2, 4, 2, 8)),  # (a step each way)
                             (torch.from_numpy(numpy_buf)[1:], torch.from_numpy(numpy_buf[1:]))):  # (two storages)
        with pytest.raises(ValueError, match="k_cache, v_cache: the same memory"), torch.no_grad():
            flashattn_py.flash_attn_with_kvcache(q, k_cache, v_cache, new, new, cache_seqlens=1)
    assert not buf.any() and not grid.any() and not numpy_buf.any()
    for k_cache, v_cache in ((lambda b: (b[..., :8], b[..., 8:]))(torch.zeros(2, 4, 2, 16)),
                             (lambda b: (b[0], b[1]))(torch.zeros(2, 2, 4, 2, 8))):
        with torch.no_grad():
            flashattn_py.flash_attn_with_kvcache(q, k_cache, v_cache, new, 2 * new, cache_seqlens=1)
        assert torch.equal(k_cache[:, 1], new[:, 0]) and torch.equal(v_cache[:, 1], 2 * new[:, 0])


@pytest.mark.parametrize("backend", BACKENDS_ON_THEIR_DEVICE)
def test_paged_cache_of_more_than_2_30_slots(backend):
    # A block table reusing one page holds more than 2**30 slots per sequence (a few MB):
    # the CUDA kernels keep key bounds in 32 bits clamped at 2**30, so the cuda backend refuses
    # it by name; the others attend over the keys in use, split-KV combine included (its
    # workspace offsets in 64 bits), equal to the formula on those keys.
    device = "cpu" if backend == "cpu" else "cuda"
    gen = torch.Generator().manual_seed(11)
    page, used, heads, heads_k, d = 2**14, 37, 4, 2, 64
    table = torch.zeros(2, 2**30 // page + 1, dtype=torch.int32, device=device)
    k_cache, v_cache = (torch.randn(1, page, heads_k, d, generator=gen).to(device, torch.float16) for _ in range(2))
    q = torch.randn(2, 1, heads, d, generator=gen).to(device, torch.float16)
    lengths = torch.tensor([used, 5], dtype=torch.int32, device=device)
    call = dict(cache_seqlens=lengths, block_table=table, causal=True, backend=backend)
    if backend == "cuda":
        with pytest.raises(RuntimeError, match=r"at most 2\^30 positions"):
            flashattn_py.flash_attn_with_kvcache(q, k_cache, v_cache, num_splits=2, **call)
        return
    for num_splits in (1, 2):
        out = flashattn_py.flash_attn_with_kvcache(q, k_cache, v_cache, num_splits=num_splits, **call)
        for b, n in enumerate(lengths.tolist()):
            keys, values = (t[0, :n].transpose(0, 1).repeat_interleave(heads // heads_k, 0) for t in (k_cache, v_cache))
            def attend(dtype):
                return torch.nn.functional.scaled_dot_product_attention(
                    q[b].transpose(0, 1).to(dtype), keys.to(dtype), values.to(dtype)).transpose(0, 1)
            assert_rule(f"{backend} seq {b} num_splits={num_splits}", out[b], attend(torch.float64),
                        attend(torch.float16), OUT_FACTOR)


@pytest.mark.parametrize("backend", BACKENDS_ON_THEIR_DEVICE)
@pytest.mark.parametrize("name", ["cache_seqlens", "cache_seqlens_new_keys", "cache_leftpad", "cache_batch_idx",
                                  "block_table", "alibi_slopes"])
def test_a_batch_of_one_takes_index_views_of_any_stride(name, backend):
    # A batch of one's index tensor as a column of a table: shape (1,) (block_table (1, 1)),
    # a stride other than 1, which torch calls contiguous. The kernels read its one element;
    # the same call with a fresh copy gives the same result and the same caches. (The CPU op
    # refused it with an internal error, with new keys after the cache had been written;
    # cache_seqlens reaches the attention op as it is only without new keys; with them, the
    # append op's. The CUDA ops share that check: params_from_tensors.h.)
    new_keys = name != "cache_seqlens"
    name = "cache_seqlens" if name == "cache_seqlens_new_keys" else name
    device, dtype = ("cpu", torch.float32) if backend == "cpu" else ("cuda", torch.bfloat16)
    gen = torch.Generator().manual_seed(5)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    heads = 1 if name == "alibi_slopes" else 2
    q = randn(1, 1, heads, 16)
    k_cache, v_cache = randn(3, 8, 1, 16), randn(3, 8, 1, 16)
    new = {"k": randn(1, 1, 1, 16), "v": randn(1, 1, 1, 16)} if new_keys else {}
    table = {"cache_seqlens": [[9, 3, 7]], "cache_leftpad": [[9, 1, 7]], "cache_batch_idx": [[9, 2, 7]],
             "block_table": [[2, 0, 1]]}.get(name)
    if name == "alibi_slopes":
        view = torch.rand(1, 3, generator=gen).to(device)[:, 1]
    else:
        view = torch.tensor(table, dtype=torch.int32, device=device)[:, 1:2] if name == "block_table" else \
            torch.tensor(table, dtype=torch.int32, device=device)[:, 1]
        view = view.as_strided(view.shape, (3,) * view.dim())
    assert view.stride(-1) != 1
    results = []
    for arg in (view, view.clone(memory_format=torch.contiguous_format)):
        kwargs = {"cache_seqlens": torch.tensor([3], dtype=torch.int32, device=device), name: arg}
        caches = (k_cache.clone(), v_cache.clone())
        out = flashattn_py.flash_attn_with_kvcache(q, *caches, causal=True, backend=backend, **new, **kwargs)
        results.append((out, *caches))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS_ON_THEIR_DEVICE)
def test_empty_pools_and_reused_pages_on_each_backend(backend):
    # On each backend's own device (GPU tensors: no value is read back): an empty pool with
    # block-table entries, or a cache of no rows with cache_batch_idx, is refused from the
    # shapes (the kernels clamp indices into them: -1, a read before the tensors); an empty
    # batch over them runs; a window over a block table that reuses pages bounds every
    # sequence's keys (the Triton launcher took it as unbounded: no window).
    device, dtype = ("cpu", torch.float32) if backend == "cpu" else ("cuda", torch.float16)
    gen = torch.Generator().manual_seed(17)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    def i32(values):
        return torch.tensor(values, dtype=torch.int32, device=device)

    q = randn(1, 1, 4, 16)
    with torch.no_grad():
        with pytest.raises(ValueError, match="k_cache: an empty page pool"):
            flashattn_py.flash_attn_with_kvcache(q, randn(0, 4, 2, 16), randn(0, 4, 2, 16), cache_seqlens=i32([3]),
                                                 block_table=i32([[0, 0]]), backend=backend)
        with pytest.raises(ValueError, match="k_cache: 0 cache rows for a batch of 1"):
            flashattn_py.flash_attn_with_kvcache(q, randn(0, 8, 2, 16), randn(0, 8, 2, 16), cache_seqlens=i32([3]),
                                                 cache_batch_idx=i32([0]), backend=backend)
        empty = flashattn_py.flash_attn_with_kvcache(q[:0], randn(0, 4, 2, 16), randn(0, 4, 2, 16),
                                                     cache_seqlens=i32([]).view(0),
                                                     block_table=i32([[0, 0]])[:0], backend=backend)
        assert empty.shape == (0, 1, 4, 16)
        k_cache, v_cache = randn(2, 4, 2, 16), randn(2, 4, 2, 16)
        table, lengths = i32([[0, 1, 0, 1, 0, 1, 0, 1]]), i32([32])  # 32 keys over the pool's 8 slots
        call = dict(cache_seqlens=lengths, block_table=table, causal=True, window_size=(10, 0))
        out = flashattn_py.flash_attn_with_kvcache(q, k_cache, v_cache, backend=backend, **call)

        def on_cpu(dt):
            return flashattn_py.flash_attn_with_kvcache(
                *(t.cpu().to(dt) for t in (q, k_cache, v_cache)), backend="reference",
                **{name: t.cpu() if isinstance(t, torch.Tensor) else t for name, t in call.items()})

        assert_rule(f"{backend} window over reused pages", out.cpu(), on_cpu(torch.float64), on_cpu(dtype), OUT_FACTOR)
    if backend == "cuda":  # the op itself (params_from_tensors.h): kv_batch_idx over no row
        from flashattn_py import ops

        with pytest.raises(RuntimeError, match="kv_batch_idx needs k / v with at least one cache row"):
            ops.attn_fwd(*ops.fwd_args(q, randn(0, 6, 2, 16), randn(0, 6, 2, 16), scale=0.25, backend="cuda",
                                       kv_batch_idx=i32([0])))

"""Triton kernels (kernels/) on KV-cache decoding: flash_attn_with_kvcache's arguments.

Semantics: docs/design.md, "Packed sequences and paged K/V". q (B, Sq = 1..8, H, D) against a dense cache (B_cache, S_cache, Hk, D) with
``kv_batch_idx`` or a paged one (num_pages, page_size, Hk, D) with a shuffled
``block_table``; ``seqused_k`` (cache lengths + new keys, 0 included), ``leftpad_k``,
bottom-right causal / sliding window / softcap / ALiBi, GQA. The launchers are called
directly for every ``num_splits`` (0 = heuristic, 1, 2, 3, 7: the split-KV decode kernel
and its combine step, GQA-packed), and each sequence is held to the project's rule
(tests/rule.py) against ``attention_varlen_ref`` in float64. CPU runs use Triton's
interpreter (fp32 / fp16).
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from devices import triton_kernels, triton_test_device  # noqa: E402
from flashattn_py.reference import attention_varlen_ref  # noqa: E402
from rule import OUT_FACTOR, assert_rule  # noqa: E402

_kernels = triton_kernels()
flash_bwd, flash_fwd = _kernels.flash_bwd, _kernels.flash_fwd

DEVICE, pytestmark = triton_test_device()

SPLITS = (0, 1, 2, 3, 7)


def _randn(gen, *shape, dtype):
    return torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=dtype)


def _i32(values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


def _paged_pool(gen, nseq, capacity, page_size, hk, d, dtype):
    """A page pool with each sequence's `capacity` slots on shuffled pages; unused table
    entries hold an out-of-range page index (never read: clamped, masked)."""
    per_seq = -(-capacity // page_size)
    num_pages = nseq * per_seq + 3
    kp = _randn(gen, num_pages, page_size, hk, d, dtype=dtype)
    vp = _randn(gen, num_pages, page_size, hk, d, dtype=dtype)
    perm = torch.randperm(num_pages, generator=gen)
    table = perm[:nseq * per_seq].reshape(nseq, per_seq).to(torch.int32)
    table = torch.cat([table, torch.full((nseq, 2), 10**6, dtype=torch.int32)], 1)
    return kp, vp, table.to(DEVICE)


def _run(q, k, v, *, splits=SPLITS, scale, softcap=0.0, alibi=None, window_left=-1, window_right=0,
         diag_offset=0, seed=0, **cache):
    """flash_fwd for every num_splits, each sequence held to the rule; the splits agree."""
    ref_kw = dict(scale=scale, softcap=softcap, alibi_slopes=alibi, window_left=window_left,
                  window_right=window_right, diag_offset=diag_offset, bottom_right=True)
    cu_q = cache.get("cu_seqlens_q")
    # (the maxima only size the kernels' grids: the reference reads the true lengths)
    seq_kw = {n: t for n, t in cache.items() if n not in ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q",
                                                          "max_seqlen_k")}
    ref, ref_lse = attention_varlen_ref(q.double(), k.double(), v.double(), cu_q, cache.get("cu_seqlens_k"),
                                        **seq_kw, **ref_kw)
    naive, naive_lse = attention_varlen_ref(q, k, v, cu_q, cache.get("cu_seqlens_k"), **seq_kw, **ref_kw)
    if cu_q is not None:
        starts = cu_q.tolist()
        spans = [(0, slice(starts[b], starts[b + 1])) for b in range(len(starts) - 1)]
    else:
        spans = [(b, slice(None)) for b in range(q.shape[0])]
    outs = []
    for ns in splits:
        out, lse = flash_fwd(q, k, v, alibi, scale, softcap, window_left, window_right, diag_offset,
                             bottom_right=True, num_splits=ns, **cache)
        assert out.shape == q.shape[:3] + (v.shape[-1],) and out.dtype == q.dtype
        assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == torch.float32
        for b, rows in spans:
            tag = f"[seq {b}, num_splits={ns}]"
            assert_rule("out" + tag, out[b:b + 1, rows], ref[b:b + 1, rows], naive[b:b + 1, rows], OUT_FACTOR, seed)
            assert_rule("lse" + tag, lse[b:b + 1, :, rows], ref_lse[b:b + 1, :, rows],
                        naive_lse[b:b + 1, :, rows].float(), OUT_FACTOR, seed)
        outs.append((ns, out, lse, spans))
    # every num_splits gives the same result within rounding (the rule's bound, from ns=first)
    _, out0, lse0, _ = outs[0]
    for ns, out, lse, spans in outs[1:]:
        for b, rows in spans:
            assert_rule(f"out[seq {b}] num_splits={ns} vs {splits[0]}", out[b:b + 1, rows], ref[b:b + 1, rows],
                        naive[b:b + 1, rows], OUT_FACTOR, seed)
            if out[b:b + 1, rows].numel() == 0:
                continue
            err = (out[b:b + 1, rows].double() - out0[b:b + 1, rows].double()).abs().max().item()
            bound = 2 * OUT_FACTOR * (naive[b:b + 1, rows].double() - ref[b:b + 1, rows]).abs().max().item() + 2e-6
            assert err <= bound, f"out[seq {b}]: num_splits={ns} vs {splits[0]}: {err:.3e} > {bound:.3e}"
        assert torch.equal(torch.isfinite(lse), torch.isfinite(lse0))


# (Sq, H, Hk, D, dtype): Sq 1..7, GQA 8/8 and 8/2, D 64 and 80
DENSE = [(1, 8, 2, 64, torch.float32), (2, 8, 8, 80, torch.float16), (3, 8, 2, 80, torch.float32),
         (5, 8, 2, 64, torch.float16), (7, 8, 8, 64, torch.float32)]


@pytest.mark.parametrize("sq,h,hk,d,dtype", DENSE)
def test_dense_cache(sq, h, hk, d, dtype):
    """Dense cache rows picked by a kv_batch_idx permutation, per-batch lengths incl. 0,
    left padding, bottom-right causal; every num_splits."""
    seed = sq * 10 + hk
    gen = torch.Generator().manual_seed(seed)
    b_, b_cache, s_cache = 4, 5, 70
    q = _randn(gen, b_, sq, h, d, dtype=dtype)
    # non-contiguous cache views (padded rows), read through their strides
    k = _randn(gen, b_cache, s_cache, hk, d + 3, dtype=dtype)[..., :d]
    v = _randn(gen, b_cache, s_cache, hk, d + 3, dtype=dtype)[..., :d]
    cache_len = [0, 37, s_cache - sq, 3]
    used = [c + sq for c in cache_len]
    used[0] = 0  # an empty sequence: no keys at all
    leftpad = [0, 5, 11, 0]
    perm = torch.randperm(b_cache, generator=gen)[:b_].tolist()
    # every num_splits once; the other cases a few (interpreter time)
    splits = SPLITS if sq == 3 else ((0, 2, 7) if hk < h else (3,))
    _run(q, k, v, splits=splits, scale=d ** -0.5, seed=seed, seqused_k=_i32(used), kv_batch_idx=_i32(perm),
         leftpad_k=_i32(leftpad))


@pytest.mark.parametrize("page_size,sq,dtype", [(1, 1, torch.float32), (7, 4, torch.float16), (16, 6, torch.float32)])
def test_paged_cache(page_size, sq, dtype):
    """Paged cache, shuffled block table, page sizes 1 / 7 / 16, leftpad slots on the pages."""
    seed = 100 + page_size
    gen = torch.Generator().manual_seed(seed)
    b_, h, hk, d, capacity = 3, 8, 2, 80 if page_size == 7 else 64, 60
    q = _randn(gen, b_, sq, h, d, dtype=dtype)
    kp, vp, table = _paged_pool(gen, b_, capacity, page_size, hk, d, dtype)
    used = [capacity, sq, 29 + sq]
    leftpad = [9, 0, 4]
    splits = SPLITS if page_size == 7 else (0, 1, 3)
    _run(q, kp, vp, splits=splits, scale=d ** -0.5, seed=seed, block_table=table, seqused_k=_i32(used),
         leftpad_k=_i32(leftpad), max_seqlen_k=capacity)


FEATURES = {
    "softcap_alibi": dict(softcap=2.0, alibi=True),
    "window": dict(window_left=9, window_right=0),
    "window_right_diag": dict(window_left=20, window_right=3, diag_offset=-2, alibi=True),
    "noncausal_softcap": dict(window_right=-1, softcap=5.0),
}


@pytest.mark.parametrize("name", list(FEATURES))
@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
def test_features(name, paged):
    """softcap / sliding window / ALiBi with kv_batch_idx (dense) or pages, leftpad, GQA 8/2."""
    feats = dict(FEATURES[name])
    seed = len(name) + 7 * paged
    gen = torch.Generator().manual_seed(seed)
    b_, sq, h, hk, d, cap = 3, 3, 8, 2, 64, 64
    q = _randn(gen, b_, sq, h, d, dtype=torch.float32)
    alibi = (torch.rand(b_, h, generator=gen) * 0.5).to(DEVICE) if feats.pop("alibi", False) else None
    used = [cap, 21, sq]
    leftpad = [3, 0, 1]
    if paged:
        k, v, table = _paged_pool(gen, b_, cap, 16, hk, d, torch.float32)
        cache = dict(block_table=table, max_seqlen_k=cap)
    else:
        k = _randn(gen, b_ + 1, cap, hk, d, dtype=torch.float32)
        v = _randn(gen, b_ + 1, cap, hk, d, dtype=torch.float32)
        cache = dict(kv_batch_idx=_i32([3, 0, 2]))
    _run(q, k, v, splits=(1, 3), scale=0.2, alibi=alibi, seed=seed, seqused_k=_i32(used),
         leftpad_k=_i32(leftpad), **cache, **feats)


def test_packed_queries_paged():
    """Packed queries (cu_seqlens_q, rows in no sequence left alone) over a paged cache:
    the decode kernel and its combine step address q / out / lse rows per sequence."""
    gen = torch.Generator().manual_seed(3)
    h, hk, d, cap = 4, 1, 64, 48
    q_lens = [2, 0, 5]
    q = _randn(gen, 1, sum(q_lens) + 2, h, d, dtype=torch.float32)
    kp, vp, table = _paged_pool(gen, 3, cap, 5, hk, d, torch.float32)
    cu = _i32([0, 2, 2, 7])
    _run(q, kp, vp, splits=(0, 1, 3), scale=d ** -0.5, seed=3, cu_seqlens_q=cu, max_seqlen_q=5,
         block_table=table, seqused_k=_i32([40, 7, 30]), leftpad_k=_i32([2, 0, 6]), max_seqlen_k=cap)


def test_many_query_rows():
    """Sq > 8 (more packed rows than one block: group * Sq = 52): split-KV across several
    row blocks, and num_splits=1 taking the one-pass kernel with kv_batch_idx / leftpad /
    leftpad on pages."""
    gen = torch.Generator().manual_seed(13)
    b_, sq, h, hk, d, s_cache = 2, 13, 8, 2, 64, 50
    q = _randn(gen, b_, sq, h, d, dtype=torch.float16)
    k = _randn(gen, 3, s_cache, hk, d, dtype=torch.float16)
    v = _randn(gen, 3, s_cache, hk, d, dtype=torch.float16)
    _run(q, k, v, splits=(1, 3), scale=d ** -0.5, seed=13, seqused_k=_i32([s_cache, 20]),
         kv_batch_idx=_i32([2, 1]), leftpad_k=_i32([4, 0]))
    # paged, leftpad slots on the pages, through the one-pass kernel too
    q = _randn(gen, b_, 11, 4, d, dtype=torch.float32)
    kp, vp, table = _paged_pool(gen, b_, 40, 7, hk, d, torch.float32)
    _run(q, kp, vp, splits=(1, 2), scale=d ** -0.5, seed=13, block_table=table, seqused_k=_i32([40, 15]),
         leftpad_k=_i32([3, 6]), max_seqlen_k=40, window_left=12)


def test_window_over_a_block_table_that_reuses_pages():
    """A sequence's keys are its block table's slots: with pages used more than once it has
    more keys than the pool holds, and a window side under that length must still bound
    it (it was taken as unbounded: no window at all)."""
    gen = torch.Generator().manual_seed(31)
    q = _randn(gen, 1, 1, 2, 16, dtype=torch.float32)
    k = _randn(gen, 2, 4, 2, 16, dtype=torch.float32)
    v = _randn(gen, 2, 4, 2, 16, dtype=torch.float32)
    table = _i32([[0, 1, 0, 1, 0, 1, 0, 1]])  # 32 keys over the pool's 8 slots
    _run(q, k, v, splits=(1, 2), scale=0.25, window_left=10, seed=31, block_table=table, seqused_k=_i32([32]),
         max_seqlen_k=32)


def test_empty_pool_or_cache_is_refused():
    """The kernels clamp page and row indices into the pool / cache: an empty one has none
    to clamp to (on a GPU it was read before its start)."""
    q = torch.randn(1, 1, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="k: an empty page pool"):
        flash_fwd(q, q[:0], q[:0], None, 1.0, 0.0, -1, -1, 0, block_table=_i32([[0, 0]]), seqused_k=_i32([3]))
    empty = torch.zeros(0, 6, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="kv_batch_idx: k / v have no row"):
        flash_fwd(q, empty, empty, None, 1.0, 0.0, -1, -1, 0, kv_batch_idx=_i32([0]))


def test_out_of_range_values_are_clamped():
    """kv_batch_idx / leftpad_k come from device memory unchecked: clamped like seq_view."""
    gen = torch.Generator().manual_seed(21)
    q = _randn(gen, 2, 1, 4, 16, dtype=torch.float32)
    k = _randn(gen, 3, 20, 2, 16, dtype=torch.float32)
    v = _randn(gen, 3, 20, 2, 16, dtype=torch.float32)
    for ns in (1, 2):
        got, _ = flash_fwd(q, k, v, None, 0.25, 0.0, -1, 0, 0, bottom_right=True, num_splits=ns,
                           kv_batch_idx=_i32([7, -3]), leftpad_k=_i32([25, -4]), seqused_k=_i32([20, 9]))
        want, _ = flash_fwd(q, k, v, None, 0.25, 0.0, -1, 0, 0, bottom_right=True, num_splits=ns,
                            kv_batch_idx=_i32([2, 0]), leftpad_k=_i32([20, 0]), seqused_k=_i32([20, 9]))
        assert torch.equal(got, want)
        assert not got[0].any()  # leftpad past its keys: no keys, out 0


def test_heuristic_is_shape_only():
    """num_splits=0: a deterministic choice from shapes (a fixed SM count on the interpreter)."""
    fwd = _kernels.fwd
    assert fwd.num_splits_heuristic(programs=200, key_blocks=1000, sms=132) == 1  # GPU already full
    assert fwd.num_splits_heuristic(programs=4, key_blocks=3, sms=132) == 1  # short keys
    assert fwd.num_splits_heuristic(programs=4, key_blocks=1000, sms=132) == 33
    assert fwd.num_splits_heuristic(programs=4, key_blocks=10, sms=132) == 5
    assert fwd.num_splits_heuristic(programs=1, key_blocks=10**6, sms=132) == 64


def test_errors():
    q = torch.randn(2, 1, 2, 16, device=DEVICE)
    k = torch.randn(2, 4, 2, 16, device=DEVICE)
    lse = torch.zeros(2, 2, 1, device=DEVICE)
    idx = _i32([1, 0])
    for name in ("kv_batch_idx", "leftpad_k"):
        with pytest.raises(ValueError, match=name):
            flash_bwd(q, q, k, k, q, lse, None, 1.0, 0.0, -1, -1, 0, **{name: idx})
    # num_splits is accepted and ignored by the backward
    dq, dk, dv, _ = flash_bwd(q, q, k, k, q, lse, None, 1.0, 0.0, -1, -1, 0, num_splits=3)
    assert dq.shape == q.shape
    table = torch.zeros(2, 2, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="kv_batch_idx"):
        flash_fwd(q, k, k, None, 1.0, 0.0, -1, -1, 0, block_table=table, kv_batch_idx=idx)
    with pytest.raises(ValueError, match="int32"):
        flash_fwd(q, k, k, None, 1.0, 0.0, -1, -1, 0, leftpad_k=idx.long())
    with pytest.raises(ValueError, match="leftpad_k"):
        flash_fwd(q, k, k, None, 1.0, 0.0, -1, -1, 0, leftpad_k=_i32([1, 2, 3]))

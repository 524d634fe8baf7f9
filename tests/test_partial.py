"""Block attention primitives (flashattn_py.attention_forward / attention_backward /
merge_attention): the keys of one problem split into blocks, each block's (out, lse) merged,
and each block's backward given the MERGED out / lse, equal the one-block attention by the
project's rule (tests/rule.py), dense and packed (varlen).

A block of keys [a, c) cut out of a problem whose query row i has its diagonal at key
``i + off`` gets ``diag_offset = off - a``, so causal masks, windows and ALiBi distances stay
those of the whole problem. In the packed form the offset is per sequence aligned
bottom-right plus ``diag_offset``: a block that ends ``t`` keys before every sequence's end
gets ``diag_offset = t``.
"""
import math

import pytest
import torch

import flashattn_py
from flashattn_py.reference import attention_ref

from rule import check_attention, random_qkv


def _blockwise(blocks, **common):
    """run(q, k, v) for check_attention: the attention computed block by block.

    blocks: list of (idx, kwargs): the block's key rows (LongTensor along the key rows dim)
    and its own keyword arguments (diag_offset, cu_seqlens_k, ...). Dense tensors are
    (B, S, H, D) (rows dim 1); packed are (1, total, H, D) here and (total, H, D) in the calls.
    Stores the merged (out, lse) on ``run.merged``.
    """
    packed = "cu_seqlens_q" in common
    rows = 0 if packed else 1

    class Blockwise(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            if packed:
                q, k, v = q[0], k[0], v[0]
            acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
            out = lse = None
            for idx, kw in blocks:
                bo, bl = flashattn_py.attention_forward(q, k.index_select(rows, idx), v.index_select(rows, idx),
                                                        **common, **kw)
                assert bo.dtype == q.dtype, f"block out dtype {bo.dtype} != {q.dtype}"
                assert bl.dtype == acc_dtype, f"block lse dtype {bl.dtype} != {acc_dtype}"
                assert not bo.requires_grad and not bl.requires_grad
                if out is None:
                    out = torch.zeros(bo.shape, dtype=acc_dtype)
                    lse = torch.full(bl.shape, float("-inf"), dtype=bl.dtype)
                res = flashattn_py.merge_attention(out, lse, bo, bl)
                assert res[0] is out and res[1] is lse, "merge_attention must work in place and return its accumulators"
            final = out.to(q.dtype)
            ctx.save_for_backward(q, k, v, final, lse)
            run.merged = (out.clone(), lse.clone())
            return final[None] if packed else final

        @staticmethod
        def backward(ctx, dout):
            q, k, v, out, lse = ctx.saved_tensors
            if packed:
                dout = dout[0]
            acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
            dq = torch.zeros(q.shape, dtype=acc_dtype)
            dk = torch.zeros(k.shape, dtype=k.dtype)
            dv = torch.zeros(v.shape, dtype=v.dtype)
            for idx, kw in blocks:
                kb, vb = k.index_select(rows, idx), v.index_select(rows, idx)
                bdq, bdk, bdv = flashattn_py.attention_backward(dout, q, kb, vb, out, lse, **common, **kw)
                assert bdq.shape == q.shape and bdk.shape == kb.shape and bdv.shape == vb.shape
                dq += bdq.to(acc_dtype)
                dk.index_copy_(rows, idx, bdk.to(k.dtype))
                dv.index_copy_(rows, idx, bdv.to(v.dtype))
            dq = dq.to(q.dtype)
            return (dq[None], dk[None], dv[None]) if packed else (dq, dk, dv)

    def run(q, k, v):
        return Blockwise.apply(q, k, v)

    return run


def dense_blocks(bounds, off):
    """Key blocks [bounds[i], bounds[i+1]) of a dense problem whose diagonal offset is ``off``."""
    return [(torch.arange(a, c), {"diag_offset": off - a}) for a, c in zip(bounds[:-1], bounds[1:])]


DENSE_FEATURES = {
    # name: (api kwargs, reference kwargs)
    "plain": ({}, {}),
    "causal": ({"causal": True}, {"window_right": 0}),
    "window": ({"window_size": (5, 2)}, {"window_left": 5, "window_right": 2}),
    "causal_window": ({"causal": True, "window_size": (7, 0)}, {"window_left": 7, "window_right": 0}),
    "alibi_causal": ({"causal": True, "alibi": True}, {"window_right": 0, "alibi": True}),
    "alibi_bidirectional": ({"alibi": True}, {"alibi": True}),
    "softcap_scale": ({"softcap": 4.0, "softmax_scale": 0.3}, {"softcap": 4.0, "scale": 0.3}),
}


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("feature", list(DENSE_FEATURES))
@pytest.mark.parametrize("shape", ["bottom_right", "square_explicit", "three_blocks"])
def test_blocks_merge_to_the_whole_attention(dtype, feature, shape, backend):
    """Also on the reference backend, whose block backward is autograd through the formula
    given the merged out / lse (partial._reference_backward), 16-bit blocks in float32."""
    api_kw, ref_kw = (dict(x) for x in DENSE_FEATURES[feature])
    api_kw["backend"] = backend
    shapes = ["bottom_right", "square_explicit", "three_blocks"]
    dtypes = [torch.float32, torch.bfloat16, torch.float64]
    seed = (sorted(DENSE_FEATURES).index(feature) * 31 + shapes.index(shape) * 7 + dtypes.index(dtype)) * 101
    heads, heads_k = 4, 2
    if shape == "bottom_right":  # Sq < Sk, offset None = Sk - Sq
        sq, sk, bounds, off, explicit = 9, 20, [0, 11, 20], 11, False
    elif shape == "square_explicit":  # Sq == Sk, diag_offset 0 given explicitly for the whole
        sq, sk, bounds, off, explicit = 16, 16, [0, 7, 16], 0, True
    else:  # three uneven blocks, an explicit offset that is neither 0 nor Sk - Sq
        sq, sk, bounds, off, explicit = 12, 23, [0, 4, 15, 23], 5, True
    q, k, v = random_qkv(2, sq, sk, heads, heads_k, 24, 40, dtype=dtype, seed=seed)
    if api_kw.pop("alibi", False):
        slopes = torch.rand(heads, generator=torch.Generator().manual_seed(seed)) * 0.5
        api_kw["alibi_slopes"] = ref_kw["alibi_slopes"] = slopes
        del ref_kw["alibi"]
    ref_kw["diag_offset"] = off
    run = _blockwise(dense_blocks(bounds, off), **api_kw)
    check_attention(run, q, k, v, seed=seed, **ref_kw)
    # the merged lse is the whole problem's
    _, ref_lse = attention_ref(q.detach().double(), k.detach().double(), v.detach().double(), **ref_kw)
    lse = run.merged[1]
    assert lse.shape == (2, heads, sq)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=2e-5)
    if not explicit:  # diag_offset None is bottom-right (Sk - Sq), as flash_attn_func
        with torch.no_grad():
            out_none, lse_none = flashattn_py.attention_forward(q, k, v, **api_kw)
            out_off, lse_off = flashattn_py.attention_forward(q, k, v, diag_offset=sk - sq, **api_kw)
        assert torch.equal(out_none, out_off) and torch.equal(lse_none, lse_off)


@pytest.mark.parametrize("seed", [6, 30, 32])
def test_float32_accumulators_merge_five_blocks_within_the_rule(seed):
    # Five key blocks merged into float32 accumulators, the backward given the merged lse:
    # with the lse algebra in float32 these seeds' gradients were 3-4x the rule's bound
    # (a fuzzing helper's find; head dim 3 keeps one call's own error tiny).
    q, k, v = random_qkv(2, 21, 26, 4, 2, 3, dtype=torch.float32, seed=seed)
    run = _blockwise(dense_blocks([0, 1, 2, 6, 17, 26], 5), softmax_scale=1.86)
    check_attention(run, q, k, v, seed=seed, scale=1.86, diag_offset=5)


def test_one_block_is_flash_attn_func():
    # A single block with the default offset is flash_attn_func's problem: same out, same lse.
    q, k, v = random_qkv(2, 7, 13, 4, 2, 24, 40, seed=3)
    with torch.no_grad():
        out, lse = flashattn_py.attention_forward(q, k, v, causal=True, window_size=(4, 1), softcap=3.0)
        ref_out, ref_lse, _ = flashattn_py.flash_attn_func(q, k, v, causal=True, window_size=(4, 1), softcap=3.0,
                                                           return_attn_probs=True)
    assert out.shape == (2, 7, 4, 40) and lse.shape == (2, 4, 7) and lse.dtype == torch.float32
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)


def offsets(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def varlen_blocks(lens_k, cuts):
    """Blocks of every sequence's keys ending ``t`` keys before the sequence's end, for the
    distances t in ``cuts`` (descending, last 0): block b is keys [Sk - cuts[b-1], Sk - cuts[b])
    (clamped to the sequence; cuts[-1] before it = infinity), diag_offset cuts[b]."""
    cu_k = offsets(lens_k)
    blocks = []
    starts = [math.inf] + list(cuts)
    for hi_cut, lo_cut in zip(starts[:-1], starts[1:]):
        idx, lens = [], []
        for d, n in enumerate(lens_k):
            a = 0 if hi_cut == math.inf else max(0, n - hi_cut)
            c = max(0, n - lo_cut)
            idx += list(range(int(cu_k[d]) + a, int(cu_k[d]) + c))
            lens.append(c - a)
        kw = {"diag_offset": lo_cut, "cu_seqlens_k": offsets(lens), "max_seqlen_k": max(lens)}
        blocks.append((torch.tensor(idx, dtype=torch.long), kw))
    return blocks


VARLEN_FEATURES = {
    "plain": ({}, {}),
    "causal": ({"causal": True}, {"window_right": 0}),
    "window": ({"window_size": (6, 1)}, {"window_left": 6, "window_right": 1}),
    "alibi_softcap_causal": ({"causal": True, "softcap": 5.0, "alibi": True},
                             {"window_right": 0, "softcap": 5.0, "alibi": True}),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("feature", list(VARLEN_FEATURES))
def test_varlen_blocks_merge_to_the_whole_attention(dtype, feature):
    lens_q, lens_k = [5, 0, 9, 12, 3], [7, 3, 9, 20, 0]
    heads, heads_k = 4, 2
    api_kw, ref_kw = (dict(x) for x in VARLEN_FEATURES[feature])
    seed = sorted(VARLEN_FEATURES).index(feature) * 13 + {torch.float32: 0, torch.bfloat16: 1, torch.float64: 2}[dtype]
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, sum(lens_q), heads, 24, generator=gen).to(dtype)
    k = torch.randn(1, sum(lens_k), heads_k, 24, generator=gen).to(dtype)
    v = torch.randn(1, sum(lens_k), heads_k, 40, generator=gen).to(dtype)
    if api_kw.pop("alibi", False):
        slopes = torch.rand(len(lens_q), heads, generator=gen) * 0.5
        api_kw["alibi_slopes"] = ref_kw["alibi_slopes"] = slopes
        del ref_kw["alibi"]
    cu_q, cu_k = offsets(lens_q), offsets(lens_k)
    run = _blockwise(varlen_blocks(lens_k, [11, 4, 0]), cu_seqlens_q=cu_q, max_seqlen_q=max(lens_q),
                     **api_kw)
    check_attention(run, q, k, v, seed=seed, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, bottom_right=True, **ref_kw)
    _, ref_lse = attention_ref(q.double(), k.double(), v.double(), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                               bottom_right=True, **ref_kw)
    lse = run.merged[1]
    assert lse.shape == (heads, sum(lens_q))
    torch.testing.assert_close(lse.double(), ref_lse[0], atol=2e-5, rtol=2e-5)


def test_rows_that_see_no_key_merge_without_nan():
    # causal, square, diag_offset -3: rows 0..2 see no key in any block (out 0, lse -inf);
    # the last block [10, 16) is empty for rows 0..12.
    q, k, v = random_qkv(1, 16, 16, 2, 2, 16, dtype=torch.float32, seed=9)
    blocks = dense_blocks([0, 10, 16], -3)
    run = _blockwise(blocks, causal=True)
    check_attention(run, q, k, v, seed=9, window_right=0, diag_offset=-3)
    out, lse = run.merged
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.isinf(lse[:, :, :3]).all() and (lse[:, :, :3] < 0).all()
    assert torch.isfinite(lse[:, :, 3:]).all()
    assert torch.equal(out[:, :3], torch.zeros_like(out[:, :3]))
    # the empty block itself: lse -inf on rows that see none of its keys
    with torch.no_grad():
        bo, bl = flashattn_py.attention_forward(q, k[:, 10:], v[:, 10:], causal=True, diag_offset=-13)
    assert torch.isinf(bl[:, :, :13]).all() and not torch.isnan(bo).any()
    assert torch.equal(bo[:, :13], torch.zeros_like(bo[:, :13]))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_block_without_keys_has_zero_gradients(backend):
    # A rank's empty key block: out 0, lse -inf, gradients 0 (the reference's backward asked
    # autograd for a gradient of its constant lse and raised).
    q, k, v = random_qkv(1, 6, 0, 2, 2, 8, dtype=torch.float32, seed=3)
    with torch.no_grad():
        out, lse = flashattn_py.attention_forward(q, k, v, backend=backend)
    assert torch.equal(out, torch.zeros_like(out)) and bool((lse == float("-inf")).all())
    dq, dk, dv = flashattn_py.attention_backward(torch.randn_like(out), q, k, v, out, lse, backend=backend)
    assert torch.equal(dq, torch.zeros_like(q)) and dk.shape == k.shape and dv.shape == v.shape


def test_merge_attention_formula():
    gen = torch.Generator().manual_seed(0)
    out = torch.randn(1, 4, 2, 3, generator=gen)
    lse = torch.randn(1, 2, 4, generator=gen)
    bo = torch.randn(1, 4, 2, 3, generator=gen)
    bl = torch.randn(1, 2, 4, generator=gen)
    lse[0, 0, 1] = float("-inf")  # only the block sees keys
    out[0, 1, 0] = 0.0
    bl[0, 1, 2] = float("-inf")  # only the accumulator does
    bo[0, 2, 1] = 0.0
    lse[0, 1, 3] = bl[0, 1, 3] = float("-inf")  # neither
    out[0, 3, 1] = bo[0, 3, 1] = 0.0
    o64, l64, bo64, bl64 = out.double(), lse.double(), bo.double(), bl.double()
    want_lse = torch.logaddexp(l64, bl64)
    safe = torch.where(torch.isinf(want_lse), torch.zeros_like(want_lse), want_lse)
    w_a = torch.exp(l64 - safe).transpose(1, 2).unsqueeze(-1)
    w_b = torch.exp(bl64 - safe).transpose(1, 2).unsqueeze(-1)
    want_out = w_a * o64 + w_b * bo64
    got_out, got_lse = flashattn_py.merge_attention(out, lse, bo, bl)
    assert got_out is out and got_lse is lse
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.isinf(lse[0, 1, 3]) and lse[0, 1, 3] < 0
    assert torch.equal(out[0, 3, 1], torch.zeros(3))
    torch.testing.assert_close(lse.double(), want_lse)
    torch.testing.assert_close(out.double(), want_out)
    # packed layout: out (total, H, D), lse (H, total)
    out2, lse2 = torch.zeros(4, 2, 3), torch.full((2, 4), float("-inf"))
    flashattn_py.merge_attention(out2, lse2, bo[0], bl[0])
    torch.testing.assert_close(lse2, bl[0])
    torch.testing.assert_close(out2, bo[0] * torch.isfinite(bl[0]).T.unsqueeze(-1))


def _qkv(b=1, sq=6, sk=8, h=2, hk=2, d=16, dv=16):
    return torch.randn(b, sq, h, d), torch.randn(b, sk, hk, d), torch.randn(b, sk, hk, dv)


@pytest.mark.parametrize(
    "call,name",
    [
        (lambda: flashattn_py.attention_forward(torch.randn(1, 6, 2, 16), torch.randn(1, 8, 2, 32),
                                                torch.randn(1, 8, 2, 16)), "k"),
        (lambda: flashattn_py.attention_forward(torch.randn(1, 6, 2, 16), torch.randn(1, 8, 2, 16),
                                                torch.randn(1, 7, 2, 16)), "v"),
        (lambda: flashattn_py.attention_forward(torch.randn(6, 2, 16), *_qkv()[1:]), "q"),
        (lambda: flashattn_py.attention_forward(*_qkv(), diag_offset=1.5), "diag_offset"),
        (lambda: flashattn_py.attention_forward(torch.randn(6, 2, 16), torch.randn(8, 2, 16), torch.randn(8, 2, 16),
                                                cu_seqlens_q=offsets([6]), max_seqlen_q=6, max_seqlen_k=8),
         "cu_seqlens_k"),
        (lambda: flashattn_py.attention_backward(torch.randn(1, 6, 2, 16), *_qkv(), torch.randn(1, 6, 2, 16),
                                                 torch.randn(1, 2, 5)), "lse"),
        (lambda: flashattn_py.attention_backward(torch.randn(1, 6, 2, 16), *_qkv(), torch.randn(1, 6, 2, 8),
                                                 torch.randn(1, 2, 6)), "out"),
        (lambda: flashattn_py.attention_backward(torch.randn(1, 5, 2, 16), *_qkv(), torch.randn(1, 6, 2, 16),
                                                 torch.randn(1, 2, 6)), "dout"),
        (lambda: flashattn_py.merge_attention(torch.zeros(1, 6, 2, 16), torch.zeros(1, 2, 6),
                                              torch.randn(1, 5, 2, 16), torch.randn(1, 2, 5)), "out"),
        (lambda: flashattn_py.merge_attention(torch.zeros(1, 6, 2, 16), torch.zeros(1, 2, 5),
                                              torch.randn(1, 6, 2, 16), torch.randn(1, 2, 6)), "lse"),
        # a bf16 lse: gradients about 1 % off, silently
        (lambda: flashattn_py.attention_backward(torch.randn(1, 6, 2, 16), *_qkv(), torch.randn(1, 6, 2, 16),
                                                 torch.randn(1, 2, 6).bfloat16()), "lse"),
        (lambda: flashattn_py.merge_attention(torch.zeros(1, 6, 2, 16), torch.zeros(1, 2, 6),
                                              torch.randn(1, 6, 2, 16), torch.randn(1, 2, 6).long()), "block_lse"),
        (lambda: flashattn_py.merge_attention(torch.zeros(1, 6, 2, 16), torch.zeros(1, 2, 6),
                                              torch.ones(1, 6, 2, 16, dtype=torch.int32), torch.randn(1, 2, 6)),
         "block_out"),
        (lambda: flashattn_py.merge_attention(torch.zeros(16), torch.zeros(()), torch.randn(16), torch.randn(())),
         "out"),
        (lambda: flashattn_py.merge_attention(torch.zeros(1, 6, 2, 16), torch.zeros(1, 2, 6),
                                              torch.randn(1, 6, 2, 16, device="meta"), torch.randn(1, 2, 6)),
         "block_out"),
    ],
    ids=["k_head_dim", "v_rows", "q_rank", "diag_offset_float", "cu_seqlens_k_missing", "lse_shape", "out_shape",
         "dout_shape", "merge_out_shape", "merge_lse_shape", "lse_bf16", "merge_block_lse_int", "merge_block_out_int",
         "merge_1d", "merge_device"],
)
def test_wrong_arguments_are_named(call, name):
    with pytest.raises(flashattn_py.ArgumentError, match=rf"(^|\W){name}\W"):
        call()


def test_diag_offset_past_2_30_is_refused():
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(ValueError, match=r"diag_offset: must be within \+-2\*\*30, got 2147483638"):
        flashattn_py.attention_forward(q, q, q, diag_offset=2**31 - 10)


def test_merge_refuses_expanded_accumulators_and_copies_aliased_blocks():
    # An expanded lse let out be merged before lse.copy_ raised (half-written); a block in the
    # accumulators' own memory was read after being overwritten.
    out, block_out = torch.zeros(1, 6, 2, 16), torch.randn(1, 6, 2, 16)
    with pytest.raises(flashattn_py.ArgumentError, match="lse: an expanded tensor"):
        flashattn_py.merge_attention(out, torch.zeros(1, 2, 1).expand(1, 2, 6), block_out, torch.zeros(1, 2, 6))
    assert not out.any()
    out, lse = torch.randn(1, 6, 2, 16), torch.randn(1, 2, 6)
    want = out.clone()
    flashattn_py.merge_attention(out, lse, out, lse)  # (a block merged with itself: out unchanged)
    torch.testing.assert_close(out, want)


def test_merge_attention_compiles_fullgraph():
    # (its check whether a block shares the accumulators' memory read storage pointers,
    # which a trace cannot: compiled calls merge from a copy)
    gen = torch.Generator().manual_seed(3)
    blocks = [(torch.randn(2, 8, 4, 16, generator=gen), torch.randn(2, 4, 8, generator=gen)) for _ in range(2)]

    def merge_all(out, lse):
        for block_out, block_lse in blocks:
            flashattn_py.merge_attention(out, lse, block_out, block_lse)
        return flashattn_py.merge_attention(out, lse, out, lse)  # (the accumulators as their own block)

    def fresh():
        return torch.zeros(2, 8, 4, 16), torch.full((2, 4, 8), float("-inf"))

    want = fresh()
    merge_all(*want)
    torch._dynamo.reset()
    got = fresh()
    torch.compile(merge_all, backend="aot_eager", fullgraph=True)(*got)
    torch.testing.assert_close(got, want)

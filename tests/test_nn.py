"""flashattn_py.nn: MultiheadAttention as a drop-in for torch.nn.MultiheadAttention, and the
flash-attn style packed modules.

MultiheadAttention is held to the project's rule (docs/design.md) with torch's own module as the formula:
truth is torch.nn.MultiheadAttention in float64 with the same weights, the "naive" error is
torch's module run in the test dtype.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import flashattn_py.nn as fnn
from flashattn_py import api
from flashattn_py.reference import attention_ref
from rule import GRAD_FACTOR, OUT_FACTOR, assert_rule

E, H = 32, 4


def _pair(dtype, seed=0, **kw):
    """(torch MHA, ours) with the same random weights, in ``dtype``."""
    torch.manual_seed(seed)
    theirs = torch.nn.MultiheadAttention(E, H, **kw)
    with torch.no_grad():  # non-zero biases so the bias paths are exercised
        for name, p in theirs.named_parameters():
            if "bias" in name:
                p.normal_(0, 0.5)
    ours = fnn.MultiheadAttention(E, H, **kw)
    ours.load_state_dict(theirs.state_dict())
    return theirs.to(dtype), ours.to(dtype)


def _inputs(n, tgt, src, kdim, vdim, batch_first, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = (lambda s, d: (n, s, d)) if batch_first else (lambda s, d: (s, n, d))
    return (torch.randn(shape(tgt, E), generator=gen), torch.randn(shape(src, kdim), generator=gen),
            torch.randn(shape(src, vdim), generator=gen))


def _masks(kind, n, tgt, src, seed):
    """(attn_mask, key_padding_mask) in nn.MultiheadAttention's convention (True = masked out);
    key 0 always stays visible so no row is empty (torch gives NaN there, we give 0)."""
    gen = torch.Generator().manual_seed(seed + 100)
    bool_am = torch.rand(tgt, src, generator=gen) > 0.6
    bool_am[:, 0] = False
    kpm = torch.zeros(n, src, dtype=torch.bool)
    kpm[0, -3:] = True
    kpm[-1, 1:3] = True
    float_am3 = torch.randn(n * H, tgt, src, generator=gen)
    if kind == "none":
        return None, None
    if kind == "bool_attn":
        return bool_am, None
    if kind == "float_attn3":
        return float_am3, None
    if kind == "bool_kpm":
        return None, kpm
    if kind == "float_kpm":
        return None, torch.zeros(n, src).masked_fill(kpm, float("-inf"))
    if kind == "bool_both":
        return bool_am, kpm
    if kind == "mixed":  # float attn_mask + bool key_padding_mask
        return torch.zeros(tgt, src).masked_fill(bool_am, -1e9) + 0.1 * torch.randn(tgt, src, generator=gen), kpm
    raise ValueError(kind)


def _run(module, inputs, attn_mask, kpm, need_weights, dtype, **kw):
    xs = [x.detach().to(dtype).requires_grad_() for x in inputs]
    am = attn_mask.to(dtype) if attn_mask is not None and attn_mask.is_floating_point() else attn_mask
    km = kpm.to(dtype) if kpm is not None and kpm.is_floating_point() else kpm
    out, w = module(*xs, key_padding_mask=km, need_weights=need_weights, attn_mask=am, **kw)
    return out, w, xs


CONFIGS = {
    "default": {},
    "kvdim": dict(kdim=24, vdim=40),
    "bias_kv_zero_attn": dict(add_bias_kv=True, add_zero_attn=True),
    "no_bias_batch_first": dict(bias=False, batch_first=True),
}


MASKS = ["none", "bool_attn", "float_attn3", "bool_kpm", "float_kpm", "bool_both", "mixed"]
CASES = ([(c, m, False) for c in CONFIGS for m in MASKS]  # the fused path: every mask on every config
         + [(c, m, True) for c in CONFIGS for m in ("bool_both", "mixed")])  # the weights (reference) path


@pytest.mark.parametrize("config,mask,need_weights", CASES)
def test_mha_matches_torch(config, mask, need_weights):
    kw = CONFIGS[config]
    seed = hash((config, mask, need_weights)) % 1000
    n, tgt, src = 3, 7, 9
    t64, _ = _pair(torch.float64, seed, **kw)
    t32, o32 = _pair(torch.float32, seed, **kw)
    inputs = _inputs(n, tgt, src, t64.kdim, t64.vdim, t64.batch_first, seed)
    attn_mask, kpm = _masks(mask, n, tgt, src, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref, w_ref, x_ref = _run(t64, inputs, attn_mask, kpm, need_weights, torch.float64)
        naive, w_naive, x_naive = _run(t32, inputs, attn_mask, kpm, need_weights, torch.float32)
        got, w_got, x_got = _run(o32, inputs, attn_mask, kpm, need_weights, torch.float32)
    assert got.shape == ref.shape and got.dtype == torch.float32
    assert_rule("out", got, ref, naive, OUT_FACTOR, seed)
    if need_weights:
        assert w_got.shape == w_ref.shape
        assert_rule("weights", w_got, w_ref, w_naive, OUT_FACTOR, seed)
    else:
        assert w_got is None
    dout = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for o, d in ((ref, dout), (naive, dout.float()), (got, dout.float())):
        o.backward(d)
    for i, name in enumerate(("dquery", "dkey", "dvalue")):
        assert_rule(name, x_got[i].grad, x_ref[i].grad, x_naive[i].grad, GRAD_FACTOR, seed)
    p_ref, p_naive, p_got = (dict(m.named_parameters()) for m in (t64, t32, o32))
    assert p_got.keys() == p_ref.keys()
    for name in p_ref:
        assert_rule(f"d{name}", p_got[name].grad, p_ref[name].grad, p_naive[name].grad, GRAD_FACTOR, seed)


def test_state_dict_keys_and_round_trip():
    for kw in CONFIGS.values():
        theirs = torch.nn.MultiheadAttention(E, H, **kw)
        ours = fnn.MultiheadAttention(E, H, **kw)
        assert list(ours.state_dict()) == list(theirs.state_dict())
        for k, v in ours.state_dict().items():
            assert v.shape == theirs.state_dict()[k].shape, k
        theirs.load_state_dict(ours.state_dict())  # both directions, strict
        ours.load_state_dict(theirs.state_dict())


@pytest.mark.parametrize("average", [True, False])
def test_unbatched_and_causal(average):
    t64, _ = _pair(torch.float64, 5, batch_first=True)
    t32, o32 = _pair(torch.float32, 5, batch_first=True)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(11, E, generator=gen)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(11)  # float, -inf above the diagonal
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outs = [m(x.to(dt), x.to(dt), x.to(dt), attn_mask=causal.to(dt), is_causal=True, need_weights=nw,
                  average_attn_weights=average)
                for m, dt, nw in ((t64, torch.float64, False), (t32, torch.float32, False), (o32, torch.float32, False))]
        assert outs[2][0].shape == (11, E)
        assert_rule("out", outs[2][0], outs[0][0], outs[1][0], OUT_FACTOR)
        # is_causal without a mask (torch requires one) means top-left causal here.
        got, _ = o32(x, x, x, is_causal=True, need_weights=False)
        assert_rule("out", got, outs[0][0], outs[1][0], OUT_FACTOR)
        w_ref = t64(*(x.double(),) * 3, attn_mask=causal.double(), average_attn_weights=average)[1]
        w_got = o32(x, x, x, attn_mask=causal, average_attn_weights=average)[1]
    assert w_got.shape == w_ref.shape == ((11, 11) if average else (H, 11, 11))
    assert torch.allclose(w_got.double(), w_ref, atol=1e-5)


def test_need_weights_applies_the_mask_given_with_the_causal_hint():
    # torch's need_weights path applies attn_mask whatever the is_causal hint says (a wrong
    # hint is the caller's error, but what torch computes is the mask): so does ours.
    theirs, ours = _pair(torch.float64, 7, batch_first=True)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1, 3, E, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[False, True, False], [False, False, True], [True, False, False]])  # not causal
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want, want_w = theirs(x, x, x, attn_mask=mask, is_causal=True, need_weights=True)
        got, got_w = ours(x, x, x, attn_mask=mask, is_causal=True, need_weights=True)
    torch.testing.assert_close(got_w, want_w)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("extra", [{}, {"add_bias_kv": True}, {"add_zero_attn": True}])
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("lengths", [(9, 9), (4, 7), (7, 4)])
def test_is_causal_without_a_mask_beside_padding_and_extra_keys(extra, need_weights, lengths):
    # is_causal=True without attn_mask is the top-left causal mask, also beside a padding
    # mask (it was dropped there: query 0 saw the last token) and with the extra key of
    # add_bias_kv / add_zero_attn visible to every query, as the mask given explicitly.
    theirs, ours = _pair(torch.float64, 6, batch_first=True, **extra)
    (tgt, src), gen = lengths, torch.Generator().manual_seed(6)
    x = torch.randn(2, tgt, E, generator=gen, dtype=torch.float64, requires_grad=True)
    kv = torch.randn(2, src, E, generator=gen, dtype=torch.float64, requires_grad=True)
    kpm = torch.zeros(2, src, dtype=torch.bool)
    kpm[1, src // 2:src - 1] = True
    float_kpm = torch.zeros(2, src, dtype=torch.float64).masked_fill(kpm, float("-inf"))
    causal = torch.ones(tgt, src, dtype=torch.bool).triu(1)  # (True = masked out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for padding in (None, kpm, float_kpm):
            want = theirs(x, kv, kv, key_padding_mask=padding, attn_mask=causal, need_weights=True)[0]
            got = ours(x, kv, kv, key_padding_mask=padding, is_causal=True, need_weights=need_weights)[0]
            torch.testing.assert_close(got, want)
            for g, w in zip(torch.autograd.grad(got.sum(), (x, kv)), torch.autograd.grad(want.sum(), (x, kv))):
                torch.testing.assert_close(g, w)


def test_bfloat16_fast_path():
    seed = 9
    t64, _ = _pair(torch.float64, seed, batch_first=True)
    tb, ob = _pair(torch.bfloat16, seed, batch_first=True)
    inputs = _inputs(2, 33, 33, E, E, True, seed)
    attn_mask, kpm = _masks("bool_both", 2, 33, 33, seed)
    ref, _, _ = _run(t64, inputs, attn_mask, kpm, False, torch.float64)
    naive, _, _ = _run(tb, inputs, attn_mask, kpm, False, torch.bfloat16)
    got, _, _ = _run(ob, inputs, attn_mask, kpm, False, torch.bfloat16)
    assert got.dtype == torch.bfloat16
    assert_rule("out", got, ref, naive, OUT_FACTOR, seed)


def test_fast_path_calls_our_sdpa_and_weights_warn_once(monkeypatch):
    calls = []
    real = api.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(fnn, "_warned_need_weights", False)
    m = fnn.MultiheadAttention(E, H, batch_first=True)
    x = torch.randn(2, 5, E)
    out, w = m(x, x, x, need_weights=False)
    assert w is None and len(calls) == 1
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        m(x, x, x)
        m(x, x, x)
    assert sum("need_weights" in str(r.message) for r in rec) == 1
    assert len(calls) == 1  # the weights path is the reference formula


@pytest.mark.parametrize("fastpath", [True, False])
def test_in_a_transformer_encoder_layer(monkeypatch, fastpath):
    # Eval without grad: torch's fast path runs the whole layer in its own kernel (it asks
    # the module to merge_masks first; that was missing); with the fast path off, ours.
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(E, H, dim_feedforward=32, dropout=0.0, batch_first=True).eval()
    reference = torch.nn.TransformerEncoderLayer(E, H, dim_feedforward=32, dropout=0.0, batch_first=True).eval()
    reference.load_state_dict(layer.state_dict())
    ours = fnn.MultiheadAttention(E, H, dropout=0.0, batch_first=True)
    ours.load_state_dict(layer.self_attn.state_dict())
    layer.self_attn = ours
    calls = []
    real = api.scaled_dot_product_attention
    monkeypatch.setattr(api, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(2, 5, E)
    pad = torch.tensor([[False] * 5, [False, False, False, True, True]])
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(fastpath)
    try:
        with torch.no_grad():
            got, want = layer(x, src_key_padding_mask=pad), reference(x, src_key_padding_mask=pad)
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (len(calls) == 1) != fastpath


def test_dropout_only_in_training():
    m = fnn.MultiheadAttention(E, H, dropout=0.5, batch_first=True)
    x = torch.randn(2, 16, E)
    m.eval()
    a, _ = m(x, x, x, need_weights=False)
    b, _ = m(x, x, x, need_weights=False)
    assert torch.equal(a, b)
    m.train()
    torch.manual_seed(0)
    c, _ = m(x, x, x, need_weights=False)
    torch.manual_seed(0)
    d, _ = m(x, x, x, need_weights=False)
    assert torch.equal(c, d) and not torch.allclose(a, c)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, w = m(x, x, x, average_attn_weights=False)
    # Weights after dropout: each kept entry is scaled by 2, about half are zero.
    assert 0.3 < (w == 0).float().mean().item() < 0.7


def test_bad_arguments():
    m = fnn.MultiheadAttention(E, H)
    x = torch.randn(5, 2, E)
    with pytest.raises(ValueError, match="attn_mask"):
        m(x, x, x, attn_mask=torch.zeros(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_padding_mask"):
        m(x, x, x, key_padding_mask=torch.zeros(5, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="embed_dim"):
        fnn.MultiheadAttention(30, 4)


def _packed(b, s, h, d, seed, n=3):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, s, n, h, d, generator=gen).requires_grad_()


@pytest.mark.parametrize("causal", [False, True])
def test_flash_self_attention(causal):
    qkv = _packed(2, 13, 3, 16, seed=1)
    mod = fnn.FlashSelfAttention(causal=causal, softmax_scale=0.3)
    out = mod(qkv)
    q, k, v = qkv.double().unbind(2)
    ref, _ = attention_ref(q, k, v, scale=0.3, window_right=0 if causal else -1)
    naive, _ = attention_ref(*qkv.unbind(2), scale=0.3, window_right=0 if causal else -1)
    assert out.shape == (2, 13, 3, 16)
    assert_rule("out", out, ref, naive, OUT_FACTOR)
    # The forward's causal overrides the constructor's.
    other = mod(qkv, causal=not causal)
    assert not torch.allclose(other, out)
    # Varlen: two sequences packed (total, 3, H, D).
    packed = qkv.detach().reshape(26, 3, 3, 16)
    cu = torch.tensor([0, 13, 26], dtype=torch.int32)
    torch.testing.assert_close(mod(packed, cu_seqlens=cu, max_seqlen=13), out.detach().reshape(26, 3, 16))


def test_flash_cross_attention_and_dropout():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 5, 4, 16, generator=gen)
    kv = torch.randn(2, 9, 2, 2, 16, generator=gen)
    mod = fnn.FlashCrossAttention(causal=True, attention_dropout=0.5).eval()
    out = mod(q, kv)
    k, v = kv.unbind(2)
    ref, _ = attention_ref(q.double(), k.double(), v.double(), window_right=0, diag_offset=4)
    naive, _ = attention_ref(q, k, v, window_right=0, diag_offset=4)
    assert_rule("out", out, ref, naive, OUT_FACTOR)
    mod.train()
    assert not torch.allclose(mod(q, kv), out)


def test_flash_modules_positional_order_and_cast_models():
    # flash-attn's FlashCrossAttention takes alibi_slopes before window_size (its
    # FlashSelfAttention the other way round); a model cast to bf16 casts the slopes buffer,
    # which both modules take back to float32 as flash-attn's do.
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    gen = torch.Generator().manual_seed(5)
    q, kv = torch.randn(2, 5, 4, 16, generator=gen), torch.randn(2, 9, 2, 4, 16, generator=gen)
    cross = fnn.FlashCrossAttention(True, None, 0.0, slopes)
    assert cross.window_size == (-1, -1) and torch.equal(cross.alibi_slopes, slopes)
    torch.testing.assert_close(cross(q, kv), api.flash_attn_kvpacked_func(q, kv, causal=True, alibi_slopes=slopes))
    self_attn = fnn.FlashSelfAttention(True, None, 0.0, (3, 0), slopes)
    assert self_attn.window_size == (3, 0) and torch.equal(self_attn.alibi_slopes, slopes)
    qkv = torch.randn(2, 7, 3, 4, 16, generator=gen).to(torch.bfloat16)
    cast = self_attn.to(torch.bfloat16)
    assert cast.alibi_slopes.dtype == torch.bfloat16
    want = api.flash_attn_qkvpacked_func(qkv, causal=True, window_size=(3, 0),
                                         alibi_slopes=slopes.to(torch.bfloat16).float())
    assert torch.equal(cast(qkv), want)
    half = cross.half()
    assert torch.isfinite(half(q.half(), kv.half())).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("need_weights", [False, True])
def test_mha_float32_mask_with_16_bit_weights_is_read_as_float32(dtype, need_weights):
    # torch's module hands a float32 attn_mask to SDPA as it is (added in float32 there);
    # rounded to bf16 a bias near 200 loses its differences (bf16 steps by 1 there).
    n, tgt, src = 2, 7, 9
    t64, _ = _pair(torch.float64, 5)
    tlow, olow = _pair(dtype, 5)
    inputs = _inputs(n, tgt, src, E, E, False, 5)
    mask = torch.randn(tgt, src, generator=torch.Generator().manual_seed(6)) * 2 + 200
    # (with need_weights torch's module refuses a float32 mask beside 16-bit weights: its
    # naive output is the one without; ours computes the weights with the reference formula)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (need_weights: the reference formula, said once)
        ref = t64(*(x.double() for x in inputs), attn_mask=mask.double(), need_weights=need_weights)
        naive = tlow(*(x.to(dtype) for x in inputs), attn_mask=mask, need_weights=False)
        got = olow(*(x.to(dtype) for x in inputs), attn_mask=mask, need_weights=need_weights)
    assert_rule("out", got[0], ref[0], naive[0], 4 if need_weights else OUT_FACTOR)
    if need_weights:  # (rounded to 16 bits before: 0.23 off)
        assert got[1].dtype == dtype  # (torch's module: the weights in the inputs' dtype)
        assert (got[1].double() - ref[1]).abs().max() < (2e-2 if dtype == torch.bfloat16 else 3e-3)

"""flashattn_py.patch: the global torch.nn.functional.scaled_dot_product_attention switch.

Models run in training mode (dropout 0) with gradients, so torch's MHA / encoder layer take
their Python path (F.multi_head_attention_forward -> F.scaled_dot_product_attention) and
not the native fast path, which the patch cannot reach (see the module docstring).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flashattn_py
from flashattn_py import api
from flashattn_py import patch as fpatch
from flashattn_py.patch import is_patched, patch_sdpa, unpatch_sdpa
from rule import GRAD_FACTOR, OUT_FACTOR, assert_rule

TORCH_SDPA = torch._C._nn.scaled_dot_product_attention


class GPTBlock(nn.Module):
    """A pre-norm GPT block that calls F.scaled_dot_product_attention (looked up at call time)."""

    def __init__(self, dim: int = 32, heads: int = 4, kv_heads: int = 2):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        h = self.ln1(x)
        q = self.q(h).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(h).view(b, s, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, d))
        return x + self.mlp(self.ln2(x))


@pytest.fixture(autouse=True)
def _clean_patch():
    unpatch_sdpa()
    yield
    unpatch_sdpa()
    assert F.scaled_dot_product_attention is TORCH_SDPA


@pytest.fixture
def spy(monkeypatch):
    """Counts calls that reach flashattn_py's scaled_dot_product_attention."""
    calls = []
    real = api.scaled_dot_product_attention

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "scaled_dot_product_attention", counted)
    return calls


def test_plain_call_context_manager_and_nesting():
    assert not is_patched()
    handle = patch_sdpa()
    assert is_patched() and F.scaled_dot_product_attention is fpatch.scaled_dot_product_attention
    with patch_sdpa() as inner:
        assert is_patched()
    assert not inner.active and is_patched()  # the outer patch is still on
    handle.restore()
    handle.restore()  # idempotent
    assert F.scaled_dot_product_attention is TORCH_SDPA
    with patch_sdpa():
        assert is_patched()
    assert not is_patched()
    stale = patch_sdpa()
    unpatch_sdpa()
    assert not is_patched()
    with patch_sdpa():
        stale.restore()  # ended by unpatch_sdpa(): must not undo the new patch
        assert is_patched()
    assert not is_patched()


def test_restores_on_exception():
    with pytest.raises(RuntimeError):
        with patch_sdpa():
            raise RuntimeError("boom")
    assert F.scaled_dot_product_attention is TORCH_SDPA


@pytest.mark.parametrize("kind", ["plain", "causal", "bool_mask", "float_mask", "gqa", "3d", "5d"])
def test_patched_function_matches_torch(kind, spy):
    gen = torch.Generator().manual_seed(7)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    b, h, hk, sq, sk, d = 2, 4, 4, 9, 13, 16
    kwargs = {}
    if kind == "causal":
        kwargs["is_causal"] = True
    elif kind == "bool_mask":
        mask = randn(b, 1, sq, sk) > 0
        mask[..., 0] = True
        kwargs["attn_mask"] = mask
    elif kind == "float_mask":
        kwargs["attn_mask"] = randn(1, h, sq, sk)
    elif kind == "gqa":
        hk = 2
        kwargs["enable_gqa"] = True
    shapes = [(b, h, sq, d), (b, hk, sk, d), (b, hk, sk, d)]
    if kind == "3d":
        shapes = [(b, sq, d), (b, sk, d), (b, sk, d)]
    elif kind == "5d":
        shapes = [(3, *s) for s in shapes]
    q, k, v = (randn(*s).requires_grad_() for s in shapes)
    want = TORCH_SDPA(q.double(), k.double(), v.double(),
                      **{k_: (a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a)
                         for k_, a in kwargs.items()})
    naive = TORCH_SDPA(q, k, v, **kwargs)
    with patch_sdpa():
        got = F.scaled_dot_product_attention(q, k, v, **kwargs)
    assert len(spy) == 1
    assert_rule("out", got, want, naive, OUT_FACTOR)


def test_unservable_calls_fall_back_to_torch(spy):
    gen = torch.Generator().manual_seed(1)
    # dropout_p = 1 (everything dropped): served (zeros, as torch), not a fallback.
    q, k, v = (torch.randn(2, 6, 4, 8, generator=gen), torch.randn(2, 2, 6, 8, generator=gen),
               torch.randn(2, 2, 6, 8, generator=gen))
    # Head dim above our limit.
    big = torch.randn(1, 1, 4, 300, generator=gen)
    before = fpatch.stats.fallback
    with patch_sdpa():
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=1.0, enable_gqa=True)
        out_big = F.scaled_dot_product_attention(big, big, big)
        with pytest.raises(RuntimeError):  # torch's own error, not ours
            F.scaled_dot_product_attention(q, k[..., :5], v, enable_gqa=True)
    torch.testing.assert_close(out, TORCH_SDPA(q, k, v, dropout_p=1.0, enable_gqa=True))
    torch.testing.assert_close(out_big, TORCH_SDPA(big, big, big))
    assert fpatch.stats.fallback - before == 2
    assert len(spy) == 2  # the dropout call was served, the last tried (and refused); the head-dim one never was


def test_a_forced_backend_that_cannot_serve_raises_under_the_patch():
    # As outside the patch: a backend forced with use_backend serves or raises, never torch's
    # own (its refusal was taken for our validation's and fell back silently).
    q = torch.randn(1, 2, 8, 8)
    with patch_sdpa(), flashattn_py.use_backend("cuda"):
        before = fpatch.stats.fallback
        with pytest.raises(ValueError, match="backend 'cuda' can't serve this call"):
            F.scaled_dot_product_attention(q, q, q)
        assert fpatch.stats.fallback == before


def test_forward_mode_ad_falls_back_to_torch(spy):
    import torch.autograd.forward_ad as fwAD
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(1, 2, 5, 8, dtype=torch.float64) for _ in range(3))
    tangent = torch.randn_like(q)
    with patch_sdpa(), sdpa_kernel(SDPBackend.MATH), fwAD.dual_level():
        out = fwAD.unpack_dual(F.scaled_dot_product_attention(fwAD.make_dual(q, tangent), k, v))
    with sdpa_kernel(SDPBackend.MATH), fwAD.dual_level():
        want = fwAD.unpack_dual(TORCH_SDPA(fwAD.make_dual(q, tangent), k, v))
    assert not spy  # torch's own forward AD, not our reference fallback
    torch.testing.assert_close(out.tangent, want.tangent)


def _compare_models(make, inputs_fn, spy, min_calls):
    """Unpatched float64 model is the truth, unpatched float32 the naive run, patched float32 ours."""
    torch.manual_seed(0)
    base = make()
    models = {name: copy.deepcopy(base).to(dt).train() for name, dt in
              (("ref", torch.float64), ("naive", torch.float32), ("got", torch.float32))}
    results = {}
    for name, model in models.items():
        dt = torch.float64 if name == "ref" else torch.float32
        x, kwargs = inputs_fn(dt)
        x.requires_grad_()
        if name == "got":
            with patch_sdpa():
                out = model(x, **kwargs)
        else:
            out = model(x, **kwargs)
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        out.backward(dout.to(dt))
        results[name] = (out, x.grad, {n: p.grad for n, p in model.named_parameters()})
    assert len(spy) >= min_calls
    ref, naive, got = results["ref"], results["naive"], results["got"]
    assert_rule("out", got[0], ref[0], naive[0], OUT_FACTOR)
    assert_rule("dx", got[1], ref[1], naive[1], GRAD_FACTOR)
    for n in ref[2]:
        assert_rule(f"d{n}", got[2][n], ref[2][n], naive[2][n], GRAD_FACTOR)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("masks", ["none", "causal", "padding"])
def test_transformer_encoder_layer(norm_first, masks, spy):
    n, s, d = 2, 11, 32

    def make():
        return nn.TransformerEncoderLayer(d, 4, dim_feedforward=64, dropout=0.0, batch_first=True,
                                          norm_first=norm_first)

    def inputs(dt):
        x = torch.randn(n, s, d, generator=torch.Generator().manual_seed(1)).to(dt)
        kwargs = {}
        if masks == "causal":
            kwargs = dict(src_mask=nn.Transformer.generate_square_subsequent_mask(s, dtype=dt), is_causal=True)
        elif masks == "padding":
            pad = torch.zeros(n, s, dtype=torch.bool)
            pad[1, -4:] = True
            kwargs = dict(src_key_padding_mask=pad)
        return x, kwargs

    _compare_models(make, inputs, spy, min_calls=1)


def test_gpt_block_with_gqa(spy):
    def inputs(dt):
        return torch.randn(2, 17, 32, generator=torch.Generator().manual_seed(2)).to(dt), {}

    _compare_models(GPTBlock, inputs, spy, min_calls=1)


def test_native_fast_path_is_not_patched(spy):
    """Documented limit: eval + no_grad takes torch's native encoder fast path, which never calls
    F.scaled_dot_product_attention; disabling the fast path routes it through the patch."""
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True).eval()
    x = torch.randn(2, 7, 32)
    with patch_sdpa(), torch.no_grad():
        fast = layer(x)
        assert len(spy) == 0
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            slow = layer(x)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
        assert len(spy) == 1
    torch.testing.assert_close(slow, fast, atol=1e-5, rtol=1e-4)

"""Variable-length and packed forms against per-sequence reference results."""
import pytest
import torch

import flashattn_py

from flashattn_py.reference import attention_ref
from rule import assert_rule


def packed(lengths, heads, head_dim, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(lengths), heads, head_dim, generator=gen).to(dtype).requires_grad_()
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    return x, cu


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_varlen_matches_reference_per_sequence(causal, backend):
    lens_q, lens_k = [5, 0, 17, 1, 9], [7, 3, 17, 0, 30]
    q, cu_q = packed(lens_q, 4, 16, 1)
    k, cu_k = packed(lens_k, 2, 16, 2)
    v, _ = packed(lens_k, 2, 16, 3)
    out = flashattn_py.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
                                              backend=backend)
    dout = torch.randn_like(out)
    out.backward(dout)
    for b in range(len(lens_q)):
        sq = slice(int(cu_q[b]), int(cu_q[b + 1]))
        sk = slice(int(cu_k[b]), int(cu_k[b + 1]))
        q64, k64, v64 = (t.detach()[s].double().unsqueeze(0).requires_grad_() for t, s in ((q, sq), (k, sk), (v, sk)))
        ql, kl, vl = (t.detach()[s].unsqueeze(0).requires_grad_() for t, s in ((q, sq), (k, sk), (v, sk)))
        if q64.shape[1] == 0:
            continue
        if k64.shape[1] == 0:  # no key: out 0 and no gradient
            assert torch.equal(out[sq], torch.zeros_like(out[sq]))
            assert torch.equal(q.grad[sq], torch.zeros_like(q.grad[sq]))
            continue
        kw = dict(window_right=0 if causal else -1, diag_offset=k64.shape[1] - q64.shape[1])
        ref, _ = attention_ref(q64, k64, v64, **kw)
        naive, _ = attention_ref(ql, kl, vl, **kw)
        assert_rule(f"out[{b}]", out[sq].unsqueeze(0), ref, naive, 2.0)
        ref.backward(dout[sq].unsqueeze(0).double())
        naive.backward(dout[sq].unsqueeze(0))
        assert_rule(f"dq[{b}]", q.grad[sq].unsqueeze(0), q64.grad, ql.grad, 3.0, atol=1e-5)
        if k64.shape[1]:
            assert_rule(f"dk[{b}]", k.grad[sk].unsqueeze(0), k64.grad, kl.grad, 3.0, atol=1e-5)
            assert_rule(f"dv[{b}]", v.grad[sk].unsqueeze(0), v64.grad, vl.grad, 3.0, atol=1e-5)


def test_varlen_lse_and_packed_forms():
    lens = [4, 11, 6]
    qkv, cu = packed(lens, 3 * 2, 8, 5)
    qkv = qkv.detach().view(sum(lens), 3, 2, 8)
    out, lse, probs = flashattn_py.flash_attn_varlen_qkvpacked_func(qkv, cu, 11, causal=True, return_attn_probs=True)
    assert out.shape == (21, 2, 8) and lse.shape == (2, 21) and [p.shape for p in probs] == [(2, 4, 4), (2, 11, 11),
                                                                                               (2, 6, 6)]
    q, k, v = qkv.unbind(1)
    expected = flashattn_py.flash_attn_varlen_func(q, k, v, cu, cu, 11, 11, causal=True)
    torch.testing.assert_close(out, expected)
    out_kv = flashattn_py.flash_attn_varlen_kvpacked_func(q, torch.stack([k, v], 1), cu, cu, 11, 11, causal=True)
    torch.testing.assert_close(out_kv, expected)
    batch = torch.randn(2, 9, 3, 2, 8)
    dense = flashattn_py.flash_attn_qkvpacked_func(batch, causal=True)
    torch.testing.assert_close(dense, flashattn_py.flash_attn_func(*batch.unbind(2), causal=True))
    torch.testing.assert_close(flashattn_py.flash_attn_kvpacked_func(batch[:, :, 0], batch[:, :, 1:]), 
                               flashattn_py.flash_attn_func(*batch.unbind(2)))


@pytest.mark.parametrize(
    "cu_q,max_q,match",
    [
        (torch.tensor([0, 3, 2], dtype=torch.int32), 3, r"cu_seqlens_q: must rise from 0"),
        (torch.tensor([0, 3, 5], dtype=torch.int32), 2, r"max_seqlen for cu_seqlens_q: 2 is below"),
        (torch.tensor([0, 3, 5.0]), 3, r"cu_seqlens_q: expected a 1-D int32"),
        (torch.tensor([0, 5], dtype=torch.int32), 5, r"batch sizes differ"),
    ],
)
def test_varlen_rejects_bad_offsets(cu_q, max_q, match):
    q = torch.randn(5, 2, 8)
    k = torch.randn(5, 2, 8)
    cu_k = torch.tensor([0, 2, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match=match):
        flashattn_py.flash_attn_varlen_func(q, k, k, cu_q, cu_k, max_q, 3)

"""GPU tests of the CUDA kernels on packed sequences (cu_seqlens) and paged K / V (block_table).

One launch computes every sequence (csrc/cuda, seq_view); each sequence is held to the
dense float64 reference on its own rows by the rule in tests/rule.py. Run on the device
machine: ``pytest -m gpu tests/test_cuda_varlen.py``.
"""
from __future__ import annotations

import pytest
import torch

import flashattn_py
from flashattn_py.reference import attention_ref
from devices import has_cuda_kernels
from rule import GRAD_FACTOR, OUT_FACTOR, assert_rule

pytestmark = pytest.mark.gpu


if not has_cuda_kernels():
    pytest.skip("needs a CUDA GPU and the compiled CUDA ops", allow_module_level=True)

DEV = "cuda"
H, HK, D = 4, 2, 64


@pytest.fixture(autouse=True)
def _cuda_backend(monkeypatch):
    monkeypatch.setenv("FLASHATTN_BACKEND", "cuda")


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEV)


def _randn(gen, *shape, dtype=torch.float16):
    return torch.randn(*shape, generator=gen).to(device=DEV, dtype=dtype)


def _ref_kwargs(sq, sk, causal, window, softcap, slopes):
    # flash-attn: causal and windows aligned bottom-right within each sequence.
    left, right = window
    if causal:
        right = 0
    kw = dict(window_left=left, window_right=right, diag_offset=sk - sq, softcap=softcap)
    if slopes is not None:
        kw["alibi_slopes"] = slopes
    return kw


def _check_sequence(name, got, q, k, v, dout, kw, grads=None):
    """Sequence inputs q (1, Sq, H, D), k / v (1, Sk, Hk, D); got: out (1, Sq, H, D)."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ql, kl, vl = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref, _ = attention_ref(q64, k64, v64, **kw)
    naive, _ = attention_ref(ql, kl, vl, **kw)
    assert_rule(f"out[{name}]", got, ref, naive, OUT_FACTOR)
    if grads is None:
        return
    ref.backward(dout.double())
    naive.backward(dout)
    scale = max(t.grad.abs().max().item() for t in (q64, k64, v64))
    atol = 1e-3 * max(1.0, scale)  # fp16 rounding of O in delta (see rule.check_attention)
    for gname, g, r, n in zip(("dq", "dk", "dv"), grads, (q64, k64, v64), (ql, kl, vl)):
        assert_rule(f"{gname}[{name}]", g, r.grad, n.grad, GRAD_FACTOR, atol=atol)


@pytest.mark.parametrize("causal,window,softcap,alibi,deterministic", [
    (False, (-1, -1), 0.0, False, False),
    (True, (-1, -1), 0.0, False, True),
    (False, (40, 8), 5.0, True, False),
])
def test_varlen_forward_backward(causal, window, softcap, alibi, deterministic):
    # Empty sequences, a sequence longer than one block, query and key lengths that differ.
    lens_q, lens_k = [5, 0, 130, 1, 70], [7, 3, 130, 0, 200]
    gen = torch.Generator().manual_seed(7)
    q = _randn(gen, sum(lens_q), H, D).requires_grad_()
    k = _randn(gen, sum(lens_k), HK, D).requires_grad_()
    v = _randn(gen, sum(lens_k), HK, D).requires_grad_()
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    slopes = (torch.rand(len(lens_q), H, generator=gen) * 0.2).to(DEV) if alibi else None
    out = flashattn_py.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
                                              window_size=window, softcap=softcap, alibi_slopes=slopes,
                                              deterministic=deterministic)
    dout = _randn(gen, *out.shape)
    out.backward(dout)
    oq, ok = cu_q.tolist(), cu_k.tolist()
    for b in range(len(lens_q)):
        sq, sk = slice(oq[b], oq[b + 1]), slice(ok[b], ok[b + 1])
        if lens_q[b] == 0:
            continue
        if lens_k[b] == 0:  # no key: out 0, no gradient
            assert torch.equal(out[sq], torch.zeros_like(out[sq]))
            assert torch.equal(q.grad[sq], torch.zeros_like(q.grad[sq]))
            continue
        kw = _ref_kwargs(lens_q[b], lens_k[b], causal, window, softcap, None if slopes is None else slopes[b])
        grads = (q.grad[sq][None], k.grad[sk][None], v.grad[sk][None])
        _check_sequence(b, out[sq][None], q[sq][None], k[sk][None], v[sk][None], dout[sq][None], kw, grads)
    # Keys of the empty-query sequence get no gradient.
    assert torch.equal(k.grad[ok[1]:ok[2]], torch.zeros_like(k.grad[ok[1]:ok[2]]))


@pytest.mark.parametrize("page_size", [1, 16, 48])
@pytest.mark.parametrize("causal", [False, True])
def test_paged_forward(page_size, causal):
    # Page sizes that divide the key block, and one that does not (a tile spans pages);
    # pages of a sequence scattered through the cache in random order.
    lens_q, lens_k = [3, 64, 1], [50, 130, 0]
    max_blocks = (max(lens_k) + page_size - 1) // page_size
    num_pages = len(lens_k) * max_blocks + 3
    gen = torch.Generator().manual_seed(11 + page_size)
    q = _randn(gen, sum(lens_q), H, D)
    k_cache = _randn(gen, num_pages, page_size, HK, D)
    v_cache = _randn(gen, num_pages, page_size, HK, D)
    block_table = torch.randperm(num_pages, generator=gen)[: len(lens_k) * max_blocks]
    block_table = block_table.view(len(lens_k), max_blocks).to(device=DEV, dtype=torch.int32)
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    out = flashattn_py.flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, max(lens_q), max_blocks * page_size,
                                              causal=causal, block_table=block_table)
    oq = cu_q.tolist()
    for b in range(len(lens_q)):
        sq = slice(oq[b], oq[b + 1])
        if lens_k[b] == 0:
            assert torch.equal(out[sq], torch.zeros_like(out[sq]))
            continue
        # Key j of sequence b: row j % page_size of page block_table[b, j // page_size].
        j = torch.arange(lens_k[b], device=DEV)
        pages = block_table[b, j // page_size].long()
        kb, vb = k_cache[pages, j % page_size][None], v_cache[pages, j % page_size][None]
        kw = _ref_kwargs(lens_q[b], lens_k[b], causal, (-1, -1), 0.0, None)
        _check_sequence(b, out[sq][None], q[sq][None], kb, vb, None, kw)

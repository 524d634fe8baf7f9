"""Triton kernels (kernels/) on packed sequences (varlen) and paged K/V, one launch each.

Semantics: docs/design.md, "Packed sequences and paged K/V" (csrc/flash_params.h seq_view
is the C++ side of the same per-sequence view). Every
sequence is held to the project's rule (tests/rule.py) against the dense float64
reference run on that sequence alone. CPU runs use Triton's interpreter (fp32 / fp16).
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from devices import triton_kernels, triton_test_device  # noqa: E402
from flashattn_py.reference import attention_ref  # noqa: E402
from rule import GRAD_FACTOR, OUT_FACTOR, assert_rule  # noqa: E402

_kernels = triton_kernels()
dropout_mask, flash_bwd, flash_fwd = _kernels.dropout_mask, _kernels.flash_bwd, _kernels.flash_fwd

DEVICE, pytestmark = triton_test_device()

PAD = 3  # rows of q and k after the last sequence, in no sequence


def _cu(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)


def _randn(gen, *shape, dtype):
    return torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=dtype)


class _Packed(torch.autograd.Function):
    """flash_fwd / flash_bwd on packed tensors, with autograd."""

    @staticmethod
    def forward(ctx, q, k, v, kw):
        out, lse = flash_fwd(q, k, v, **kw)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.kw = kw
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        kw = dict(ctx.kw)
        args = [kw.pop(n) for n in ("alibi_slopes", "scale", "softcap", "window_left", "window_right", "diag_offset")]
        dq, dk, dv, _ = flash_bwd(dout.contiguous(), q, k, v, out, lse, *args, **kw)
        return dq, dk, dv, None


def _ref_packed(q, k, v, spans, kw_of, masks=None):
    """Reference out (1, total_q, H, Dv) and lse per sequence, each computed alone.

    spans[b] = (q0, q1, k0, k1): the rows of sequence b in q and k; rows in no sequence
    give out 0 (so their gradients are 0)."""
    pieces, lses = [], []
    end = 0
    for b, (q0, q1, k0, k1) in enumerate(spans):
        assert q0 == end
        kw = kw_of(b)
        if masks is not None:
            kw = dict(kw, dropout_mask=masks[b])
        o, lse = attention_ref(q[:, q0:q1], k[:, k0:k1], v[:, k0:k1], **kw)
        pieces.append(o)
        lses.append(lse)
        end = q1
    pieces.append(q.new_zeros((1, q.shape[1] - end, q.shape[2], v.shape[-1])))
    return torch.cat(pieces, 1), lses


def _grad_atol(q, k, ref, dout, scale, grads64):
    # the floor of tests/rule.py check_attention: delta = rowsum(dO * O) from O rounded to
    # the input dtype, and a 1e-6 slack relative to the gradients' scale
    atol = 1e-6 * max([g.abs().max().item() for g in grads64 if g.numel()] + [1.0])
    delta_term = (dout.abs() * ref.detach().abs()).sum(-1).max().item() if ref.numel() else 0.0
    qk = max(q.detach().abs().max().item(), k.detach().abs().max().item())
    return max(atol, torch.finfo(q.dtype).eps * delta_term * qk * scale)


def _check(seqs_q, seqs_k, h, hk, d, dtype, *, seed, grad=True, scale=None, softcap=0.0, alibi=False,
           window_left=-1, window_right=-1, diag_offset=0, bottom_right=False, seqused=None, dropout_p=0.0):
    """Packed q / k with PAD rows in no sequence, every sequence checked against the reference."""
    gen = torch.Generator().manual_seed(seed)
    nseq = len(seqs_q)
    total_q, total_k = sum(seqs_q) + PAD, sum(seqs_k) + PAD
    q = _randn(gen, 1, total_q, h, d, dtype=dtype)
    k = _randn(gen, 1, total_k, hk, d, dtype=dtype)
    v = _randn(gen, 1, total_k, hk, d, dtype=dtype)
    cu_q, cu_k = _cu(seqs_q), _cu(seqs_k)
    used = torch.tensor(seqused, dtype=torch.int32, device=DEVICE) if seqused is not None else None
    slopes = (torch.rand(nseq, h, generator=gen) * 0.3).to(DEVICE) if alibi else None
    scale = d ** -0.5 if scale is None else scale
    rng = torch.tensor([1234 + seed, 77], dtype=torch.int64)
    max_q, max_k = max(seqs_q), max(seqs_k)
    kw = dict(alibi_slopes=slopes, scale=scale, softcap=softcap, window_left=window_left,
              window_right=window_right, diag_offset=diag_offset, dropout_p=dropout_p,
              rng_state=rng if dropout_p > 0 else None,
              cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, seqused_k=used,
              max_seqlen_q=max_q, max_seqlen_k=max_k, bottom_right=bottom_right)

    spans = []
    for b in range(nseq):
        q0, k0 = int(sum(seqs_q[:b])), int(sum(seqs_k[:b]))
        sk = seqs_k[b] if seqused is None else min(seqused[b], seqs_k[b])
        spans.append((q0, q0 + seqs_q[b], k0, k0 + sk))
    masks = None
    if dropout_p > 0:
        # the varlen mask is the dense hook's with batch 1, Sq = total_q, Sk = max_seqlen_k
        full = dropout_mask(rng, 1, h, total_q, max_k, dropout_p, DEVICE)
        masks = [full[:, :, q0:q1, :k1 - k0] for q0, q1, k0, k1 in spans]

    def kw_of(b):
        q0, q1, k0, k1 = spans[b]
        return dict(scale=scale, softcap=softcap, alibi_slopes=None if slopes is None else slopes[b:b + 1],
                    window_left=window_left, window_right=window_right,
                    diag_offset=diag_offset + ((k1 - k0) - (q1 - q0) if bottom_right else 0),
                    dropout_p=dropout_p)

    leaves = [t.detach().clone().requires_grad_(grad) for t in (q, k, v)]
    out, lse = _Packed.apply(*leaves, kw)
    l64 = [t.detach().double().requires_grad_(grad) for t in (q, k, v)]
    ref, ref_lse = _ref_packed(*l64, spans, kw_of, masks)
    lo = [t.detach().clone().requires_grad_(grad) for t in (q, k, v)]
    naive, naive_lse = _ref_packed(*lo, spans, kw_of, masks)

    assert out.shape == (1, total_q, h, d) and lse.shape == (1, h, total_q) and lse.dtype == torch.float32
    for b, (q0, q1, _, _) in enumerate(spans):
        assert_rule(f"out[seq {b}]", out[:, q0:q1], ref[:, q0:q1], naive[:, q0:q1], OUT_FACTOR, seed)
        assert_rule(f"lse[seq {b}]", lse[:, :, q0:q1], ref_lse[b], naive_lse[b].float(), OUT_FACTOR, seed)
    if not grad:
        return
    nrows = spans[-1][1]
    dout = torch.randn(ref.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    dout[:, nrows:] = 0  # rows in no sequence: out is left unwritten there
    (out[:, :nrows] * dout[:, :nrows].to(dtype)).sum().backward()
    ref.backward(dout)
    naive.backward(dout.to(dtype))
    atol = _grad_atol(q, k, ref, dout, scale, [t.grad for t in l64])
    for name, got, r, n in zip(("dq", "dk", "dv"), leaves, l64, lo):
        assert_rule(name, got.grad, r.grad, n.grad, GRAD_FACTOR, seed, atol)
    # rows in no sequence (and keys past seqused_k) get exactly 0
    assert not leaves[0].grad[:, nrows:].any()
    key_rows = torch.zeros(total_k, dtype=torch.bool, device=DEVICE)
    for _, _, k0, k1 in spans:
        key_rows[k0:k1] = True
    assert not leaves[1].grad[:, ~key_rows].any() and not leaves[2].grad[:, ~key_rows].any()


# (seqs_q, seqs_k, H, Hk, dtype, features)
VARLEN = {
    "gqa_empty_seqs": ([17, 0, 1, 37], [37, 5, 0, 17], 4, 2, torch.float32, {}),
    "causal_fp16": ([37, 17, 1], [17, 37, 1], 2, 1, torch.float16, dict(window_right=0, bottom_right=True)),
    "window_softcap_alibi": ([37, 17], [30, 37], 2, 2, torch.float32,
                             dict(window_left=5, window_right=3, bottom_right=True, softcap=3.0, alibi=True)),
    "dropout_seqused_fp16": ([17, 37, 1], [17, 20, 37], 2, 1, torch.float16,
                             dict(dropout_p=0.3, seqused=[10, 20, 0])),
    "six_seqs_causal": ([1, 1, 0, 17, 3, 2], [1, 0, 1, 17, 37, 2], 2, 1, torch.float32,
                        dict(window_right=0, bottom_right=True, diag_offset=1)),
    # several query blocks per sequence and head (the forward's and dQ's per-row lse index and
    # Philox offsets from a sequence's q_start, query_block_rows), dropout under causal GQA
    "dropout_causal_query_blocks": ([150, 1, 97], [150, 30, 97], 4, 2, torch.float32,
                                    dict(dropout_p=0.2, window_right=0, bottom_right=True)),
}


@pytest.mark.parametrize("name", list(VARLEN))
def test_varlen(name):
    seqs_q, seqs_k, h, hk, dtype, feats = VARLEN[name]
    _check(seqs_q, seqs_k, h, hk, 16, dtype, seed=len(name), **feats)


def _paged(k_seqs, page_size, hk, d, dtype, gen):
    """Random pages holding each sequence's keys, in a shuffled order; unused table
    entries hold an out-of-range page index (never read)."""
    npages = [-(-n // page_size) for n in k_seqs]
    max_blocks = max(max(npages), 1)
    num_pages = sum(npages) + 2
    kp = _randn(gen, num_pages, page_size, hk, d, dtype=dtype)
    vp = _randn(gen, num_pages, page_size, hk, d, dtype=dtype)
    perm = torch.randperm(num_pages, generator=gen).tolist()
    table = torch.full((len(k_seqs), max_blocks), 10**6, dtype=torch.int32)
    keys, vals = [], []
    for b, n in enumerate(k_seqs):
        pages = [perm.pop() for _ in range(npages[b])]
        table[b, :len(pages)] = torch.tensor(pages, dtype=torch.int32)
        j = torch.arange(n)
        idx = torch.tensor(pages, dtype=torch.long)[j // page_size] if n else j
        idx, j = idx.to(DEVICE), j.to(DEVICE)
        keys.append(kp[idx, j % page_size].unsqueeze(0))
        vals.append(vp[idx, j % page_size].unsqueeze(0))
    return kp, vp, table.to(DEVICE), keys, vals


@pytest.mark.parametrize("page_size,mode,dtype", [(1, "cu_k", torch.float32), (3, "seqused", torch.float16),
                                                  (16, "dense_q", torch.float32)])
def test_paged_fwd(page_size, mode, dtype):
    gen = torch.Generator().manual_seed(page_size)
    h, hk, d = 4, 2, 16
    k_seqs = [37, 17, 5, 0]
    q_seqs = [17, 1, 0, 37] if mode != "dense_q" else [17] * 4
    kp, vp, table, keys, vals = _paged(k_seqs, page_size, hk, d, dtype, gen)
    scale = d ** -0.5
    kw = dict(block_table=table, bottom_right=True, max_seqlen_k=max(k_seqs))
    if mode == "cu_k":
        kw["cu_seqlens_k"] = _cu(k_seqs)
    else:
        kw["seqused_k"] = torch.tensor(k_seqs, dtype=torch.int32, device=DEVICE)
    if mode == "dense_q":
        q = _randn(gen, len(q_seqs), q_seqs[0], h, d, dtype=dtype)
        q_of = [q[b:b + 1] for b in range(len(q_seqs))]
    else:
        q = _randn(gen, 1, sum(q_seqs) + PAD, h, d, dtype=dtype)
        kw.update(cu_seqlens_q=_cu(q_seqs), max_seqlen_q=max(q_seqs))
        starts = _cu(q_seqs).tolist()
        q_of = [q[:, starts[b]:starts[b + 1]] for b in range(len(q_seqs))]
    slopes = torch.rand(len(q_seqs), h, generator=gen).to(DEVICE) * 0.3
    out, lse = flash_fwd(q, kp, vp, slopes, scale, 0.0, -1, 0, 0, **kw)
    assert out.shape == q.shape[:3] + (d,)
    for b, qb in enumerate(q_of):
        rkw = dict(scale=scale, alibi_slopes=slopes[b:b + 1], window_right=0, diag_offset=k_seqs[b] - qb.shape[1])
        ref, ref_lse = attention_ref(qb.double(), keys[b].double(), vals[b].double(), **rkw)
        naive, naive_lse = attention_ref(qb, keys[b], vals[b], **rkw)
        if mode == "dense_q":
            got, got_lse = out[b:b + 1], lse[b:b + 1]
        else:
            got, got_lse = out[:, starts[b]:starts[b + 1]], lse[:, :, starts[b]:starts[b + 1]]
        assert_rule(f"out[seq {b}]", got, ref, naive, OUT_FACTOR, page_size)
        assert_rule(f"lse[seq {b}]", got_lse, ref_lse, naive_lse.float(), OUT_FACTOR, page_size)


def test_dense_bottom_right_seqused():
    """Dense (B, S, H, D) call: bottom_right and seqused_k apply per batch entry."""
    gen = torch.Generator().manual_seed(5)
    b_, sq, sk, h, d = 2, 17, 37, 2, 16
    q, k, v = (_randn(gen, b_, s, h, d, dtype=torch.float32) for s in (sq, sk, sk))
    used = [37, 5]
    kw = dict(alibi_slopes=None, scale=0.3, softcap=0.0, window_left=-1, window_right=0, diag_offset=0,
              seqused_k=torch.tensor(used, dtype=torch.int32, device=DEVICE), bottom_right=True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = _Packed.apply(*leaves, kw)
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    (out * dout.float()).sum().backward()
    for b in range(b_):
        n = used[b]
        l64 = [q[b:b + 1].double().requires_grad_(), k[b:b + 1, :n].double().requires_grad_(),
               v[b:b + 1, :n].double().requires_grad_()]
        lo = [q[b:b + 1].clone().requires_grad_(), k[b:b + 1, :n].clone().requires_grad_(),
              v[b:b + 1, :n].clone().requires_grad_()]
        rkw = dict(scale=0.3, window_right=0, diag_offset=n - sq)
        ref, _ = attention_ref(*l64, **rkw)
        naive, _ = attention_ref(*lo, **rkw)
        assert_rule("out", out[b:b + 1], ref, naive, OUT_FACTOR, 5)
        ref.backward(dout[b:b + 1])
        naive.backward(dout[b:b + 1].float())
        atol = _grad_atol(q, k, ref, dout[b:b + 1], 0.3, [t.grad for t in l64])
        for name, got, r, nv in zip(("dq", "dk", "dv"), (leaves[0].grad[b:b + 1], leaves[1].grad[b:b + 1, :n],
                                                        leaves[2].grad[b:b + 1, :n]), l64, lo):
            assert_rule(name, got, r.grad, nv.grad, GRAD_FACTOR, 5, atol)
        assert not leaves[1].grad[b, n:].any() and not leaves[2].grad[b, n:].any()


def test_errors():
    q = torch.randn(1, 5, 2, 16, device=DEVICE)
    k = torch.randn(2, 4, 2, 16, device=DEVICE)
    table = torch.zeros(1, 2, dtype=torch.int32, device=DEVICE)
    cu = torch.tensor([0, 5], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="forward-only"):
        flash_bwd(q, q, k, k, q, torch.zeros(1, 2, 5, device=DEVICE), None, 1.0, 0.0, -1, -1, 0, block_table=table)
    bias = torch.zeros(1, 2, 5, 5, device=DEVICE)
    with pytest.raises(ValueError, match="attn_bias"):
        flash_fwd(q, q, q, None, 1.0, 0.0, -1, -1, 0, attn_bias=bias, cu_seqlens_q=cu, cu_seqlens_k=cu,
                  max_seqlen_q=5, max_seqlen_k=5)
    with pytest.raises(ValueError, match="int32"):
        flash_fwd(q, q, q, None, 1.0, 0.0, -1, -1, 0, cu_seqlens_q=cu.long(), cu_seqlens_k=cu)

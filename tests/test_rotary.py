"""apply_rotary_emb (flash-attn's flash_attn.layers.rotary signature) against the reference's
pair-by-pair rotation, dense and packed, with offsets, in place, with gradients."""
import math

import pytest
import torch

import flashattn_py as fa
from flashattn_py.errors import ArgumentError
from flashattn_py.reference import _rotate


def _tables(seqlen_ro, rotary_dim, gen, dtype=torch.float64):
    angle = torch.rand(seqlen_ro, rotary_dim // 2, generator=gen, dtype=torch.float64) * 2 * math.pi
    return angle.cos().to(dtype), angle.sin().to(dtype)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [16, 6])
def test_dense_with_offsets_equals_the_reference(interleaved, rotary_dim):
    gen = torch.Generator().manual_seed(rotary_dim + interleaved)
    B, S, H, D = 3, 5, 2, 16
    x = torch.randn(B, S, H, D, generator=gen, dtype=torch.float64)
    cos, sin = _tables(12, rotary_dim, gen)
    for offsets in (0, 4, torch.tensor([0, 7, 2])):
        out = fa.apply_rotary_emb(x, cos, sin, interleaved=interleaved, seqlen_offsets=offsets)
        for b in range(B):
            start = int(offsets[b]) if isinstance(offsets, torch.Tensor) else offsets
            want = _rotate(x[b], cos, sin, list(range(start, start + S)), interleaved)
            torch.testing.assert_close(out[b], want, atol=1e-12, rtol=0)


def test_packed_sequences_restart_their_positions():
    gen = torch.Generator().manual_seed(5)
    lengths, H, D = [3, 0, 6, 1], 2, 8
    cu = torch.tensor([0, 3, 3, 9, 10], dtype=torch.int32)
    x = torch.randn(sum(lengths), H, D, generator=gen, dtype=torch.float64)
    cos, sin = _tables(16, 8, gen)
    offsets = torch.tensor([2, 9, 0, 5])
    out = fa.apply_rotary_emb(x, cos, sin, seqlen_offsets=offsets, cu_seqlens=cu, max_seqlen=6)
    for b, n in enumerate(lengths):
        a = int(cu[b])
        want = _rotate(x[a:a + n], cos, sin, [int(offsets[b]) + i for i in range(n)], False)
        torch.testing.assert_close(out[a:a + n], want, atol=1e-12, rtol=0)


def test_in_place_low_precision_and_gradients():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, 3, 8, generator=gen)
    cos, sin = _tables(4, 8, gen, torch.float32)
    expected = fa.apply_rotary_emb(x, cos, sin)
    y = x.clone()
    assert fa.apply_rotary_emb(y, cos, sin, inplace=True) is y and torch.equal(y, expected)
    # 16-bit inputs rotate in float32, rounded once at the end
    xb, cb, sb = x.bfloat16(), cos.bfloat16(), sin.bfloat16()
    bf = fa.apply_rotary_emb(xb, cb, sb)
    assert bf.dtype == torch.bfloat16 and torch.equal(bf, fa.apply_rotary_emb(xb.float(), cb.float(), sb.float())
                                                      .bfloat16())
    # gradients of x and of the tables; in place too (a float32 x was aliased by what autograd
    # kept for the tables' gradient, then overwritten)
    x64 = torch.randn(1, 3, 2, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    c64, s64 = (t.requires_grad_() for t in _tables(3, 4, gen))
    assert torch.autograd.gradcheck(lambda *a: fa.apply_rotary_emb(*a, interleaved=True), (x64, c64, s64))
    cg, sg = (t.clone().requires_grad_() for t in (cos, sin))
    y = x.clone()
    fa.apply_rotary_emb(y, cg, sg, inplace=True).sum().backward()
    want = torch.autograd.grad(fa.apply_rotary_emb(x, cg, sg).sum(), (cg, sg))
    torch.testing.assert_close((cg.grad, sg.grad), want)


def test_bad_inputs_name_the_argument():
    x = torch.randn(1, 4, 2, 8)
    cos, sin = _tables(4, 8, torch.Generator().manual_seed(0), torch.float32)
    with pytest.raises(ArgumentError, match="cos: 4 positions"):
        fa.apply_rotary_emb(x, cos, sin, seqlen_offsets=1)
    with pytest.raises(ArgumentError, match="rotary_dim"):
        fa.apply_rotary_emb(x[..., :4], cos, sin)
    with pytest.raises(ArgumentError, match="sin"):
        fa.apply_rotary_emb(x, cos, sin[:, :2])
    with pytest.raises(ArgumentError, match="seqlen_offsets"):
        fa.apply_rotary_emb(x, cos, sin, seqlen_offsets=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ArgumentError, match="x: expected"):
        fa.apply_rotary_emb(x[0], cos, sin)
    with pytest.raises(ArgumentError, match="cu_seqlens"):
        fa.apply_rotary_emb(x[0], cos, sin, cu_seqlens=torch.tensor([0, 3], dtype=torch.int32), max_seqlen=3)
    with pytest.raises(ArgumentError, match="cu_seqlens: expected offsets rising"):
        fa.apply_rotary_emb(x[0], cos, sin, cu_seqlens=torch.tensor([0, 3, 1, 4], dtype=torch.int32), max_seqlen=3)
    with pytest.raises(ArgumentError, match="max_seqlen"):
        fa.apply_rotary_emb(x[0], cos, sin, cu_seqlens=torch.tensor([0, 4], dtype=torch.int32))

"""flashattn_py.bert_padding: a padded batch to packed rows and back, as flash-attn's."""
import pytest
import torch
import torch.nn.functional as F

import flashattn_py as fa
from flashattn_py.bert_padding import (index_first_axis, index_put_first_axis, pad_input, unpad_input,
                                      unpad_input_for_concatenated_sequences)
from flashattn_py.errors import ArgumentError


def _right_and_left_padded_mask():
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[0, :5] = True   # right padding
    mask[1, 3:] = True   # left padding
    mask[2, :] = True    # none
    return mask


def test_unpad_pad_round_trip_and_lengths():
    g = torch.Generator().manual_seed(0)
    mask = _right_and_left_padded_mask()
    x = torch.randn(3, 7, 4, 5, generator=g)
    rows, indices, cu, max_len, used = unpad_input(x, mask.int())
    assert rows.shape == (16, 4, 5) and indices.dtype == torch.int64
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 5, 9, 16] and max_len == 7
    assert used.tolist() == [5, 4, 7]
    assert torch.equal(rows, x[mask])  # each sequence's tokens in order, sequence after sequence
    back = pad_input(rows, indices, 3, 7)
    assert torch.equal(back, torch.where(mask[..., None, None], x, torch.zeros(())))


def test_unused_slots_are_packed_but_not_used():
    mask = _right_and_left_padded_mask()
    unused = torch.zeros_like(mask)
    unused[0, 5:] = True  # (slots kept for tokens to come)
    rows, indices, cu, max_len, used = unpad_input(torch.randn(3, 7, 2), mask, unused)
    assert cu.tolist() == [0, 7, 11, 18] and used.tolist() == [5, 4, 7] and rows.shape[0] == 18


def test_padded_attention_through_varlen_equals_sdpa_with_a_padding_mask():
    # The use the helpers exist for: packed rows into flash_attn_varlen_func, outputs and
    # gradients back in the padded layout.
    g = torch.Generator().manual_seed(1)
    mask = _right_and_left_padded_mask()
    B, S, H, D = 3, 7, 2, 16
    q, k, v = (torch.randn(B, S, H, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    (qp, indices, cu, max_len, _), kp, vp = unpad_input(q, mask), unpad_input(k, mask)[0], unpad_input(v, mask)[0]
    out = pad_input(fa.flash_attn_varlen_func(qp, kp, vp, cu, cu, max_len, max_len), indices, B, S)
    key_mask = mask[:, None, None, :]
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=key_mask)
    ref = ref.transpose(1, 2) * mask[..., None, None]  # (padded queries: zeros, as pad_input leaves them)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


def test_index_helpers_and_bad_shapes():
    x = torch.arange(12.0).view(6, 2)
    idx = torch.tensor([4, 1])
    assert torch.equal(index_first_axis(x, idx), x[[4, 1]])
    put = index_put_first_axis(x[[4, 1]], idx, 6)
    assert torch.equal(put[4], x[4]) and torch.equal(put[1], x[1]) and put[[0, 2, 3, 5]].abs().sum() == 0
    with pytest.raises(ArgumentError, match="attention_mask"):
        unpad_input(torch.randn(2, 5, 3), torch.ones(2, 4))
    with pytest.raises(ArgumentError, match="unused_mask"):
        unpad_input(torch.randn(2, 5, 3), torch.ones(2, 5), torch.ones(5))
    with pytest.raises(ArgumentError, match="values"):
        index_put_first_axis(torch.randn(3, 2), idx, 6)


def test_concatenated_sequences_attend_within_each_document():
    # flash-attn's example: rows holding documents of 2 + 3, 3 + 2 and 6 tokens (B=3, S=6)
    lengths = torch.tensor([[2, 3, 0, 0, 0, 0], [3, 2, 0, 0, 0, 0], [6, 0, 0, 0, 0, 0]])
    g = torch.Generator().manual_seed(2)
    B, S, H, D = 3, 6, 2, 8
    q, k, v = (torch.randn(B, S, H, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    qp, indices, cu, max_len = unpad_input_for_concatenated_sequences(q, lengths)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 2, 5, 8, 10, 16] and max_len == 6
    assert indices.tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 17]  # (row 0's slot 5, 1's 5)
    kp, vp = (unpad_input_for_concatenated_sequences(t, lengths)[0] for t in (k, v))
    out = pad_input(fa.flash_attn_varlen_func(qp, kp, vp, cu, cu, max_len, max_len, causal=True), indices, B, S)
    # the 3-D mask of flash-attn's docstring: causal within each document, padding rows zero
    doc = torch.tensor([[0, 0, 1, 1, 1, -1], [0, 0, 0, 1, 1, -2], [0, 0, 0, 0, 0, 0]])
    allowed = (doc[:, :, None] == doc[:, None, :]) & torch.ones(S, S, dtype=torch.bool).tril()
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=allowed[:, None]).transpose(1, 2)
    ref = ref * (indices.new_zeros(B * S).index_fill(0, indices, 1).view(B, S, 1, 1))
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout)):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    with pytest.raises(ArgumentError, match="attention_mask_in_length"):
        unpad_input_for_concatenated_sequences(q, torch.tensor([[4, 3, 0, 0, 0, 0]] * 3))  # 7 tokens in 6
    with pytest.raises(ArgumentError, match="attention_mask_in_length"):
        unpad_input_for_concatenated_sequences(q, lengths.float())
    with pytest.raises(ArgumentError, match="attention_mask_in_length"):
        unpad_input_for_concatenated_sequences(q, lengths[:2])


def test_flash_attns_autograd_functions():
    from flashattn_py.bert_padding import IndexFirstAxis, IndexPutFirstAxis, index_first_axis_residual

    x = torch.randn(6, 3, 2, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([4, 1, 5])
    assert torch.autograd.gradcheck(lambda t: IndexFirstAxis.apply(t, idx), (x,))
    values = torch.randn(3, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: IndexPutFirstAxis.apply(t, idx, 6), (values,))
    rows, residual = index_first_axis_residual(x, idx)
    assert torch.equal(rows, x[idx]) and torch.equal(residual, x)
    g_rows, g_res = torch.randn_like(rows), torch.randn_like(residual)
    (grad,) = torch.autograd.grad((rows, residual), x, (g_rows, g_res))
    want = g_res.clone()
    want[idx] += g_rows
    torch.testing.assert_close(grad, want)

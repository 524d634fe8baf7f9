"""Bias / masks and dropout on the CPU kernel, held to the float64 reference."""
import pytest
import torch

import flashattn_py
from flashattn_py import backends, ops

from rule import assert_rule, check_attention, random_qkv

pytestmark = pytest.mark.skipif(backends.compiled_ops_error() is not None, reason="compiled CPU ops not built")


def sdpa_run(mask, **kwargs):
    """flash layout in/out around our scaled_dot_product_attention on the cpu backend."""
    def run(q, k, v):
        with flashattn_py.use_backend("cpu"):
            out = flashattn_py.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, enable_gqa=True, **kwargs)
        return out.transpose(1, 2)
    return run


@pytest.mark.parametrize("mask_shape", [(2, 4, 33, 47), (33, 47), (2, 1, 1, 47), (1, 4, 33, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_float_bias(mask_shape, dtype):
    q, k, v = random_qkv(2, 33, 47, 4, 2, 16, dtype=dtype, seed=len(mask_shape))
    bias = torch.randn(mask_shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    check_attention(sdpa_run(bias), q, k, v, seed=1, attn_bias=bias)


@pytest.mark.parametrize("mask_shape", [(2, 4, 33, 47), (2, 1, 1, 47), (33, 47)])
@pytest.mark.parametrize("causal", [False, True])
def test_bool_mask(mask_shape, causal):
    q, k, v = random_qkv(2, 33, 47, 4, 2, 16, seed=3)
    mask = torch.rand(mask_shape, generator=torch.Generator().manual_seed(4)) > 0.4
    if causal:
        # is_causal and attn_mask are exclusive in SDPA: fold causality into the bool mask.
        mask = mask & torch.ones(33, 47, dtype=torch.bool).tril()
    check_attention(sdpa_run(mask), q, k, v, seed=3, attn_bias=mask)


def test_key_padding_mask_with_fully_masked_batch_and_rows():
    q, k, v = random_qkv(3, 20, 600, 2, 2, 16, seed=5)
    keep = torch.ones(3, 1, 1, 600, dtype=torch.bool)
    keep[0, ..., 100:] = False  # short sequence: whole 512-key blocks skipped
    keep[1] = False             # nothing visible at all: out 0, grads 0
    check_attention(sdpa_run(keep), q, k, v, seed=5, attn_bias=keep)
    out = sdpa_run(keep)(q, k, v)
    assert torch.equal(out[1], torch.zeros_like(out[1]))


def test_float_bias_gradient_is_summed_over_broadcast_dims():
    q, k, v = random_qkv(2, 17, 23, 4, 4, 8, dtype=torch.float32, seed=7)
    bias = torch.randn(1, 4, 17, 23, requires_grad=True)
    with flashattn_py.use_backend("cpu"):
        out = flashattn_py.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias, is_causal=False)
    dout = torch.randn_like(out)
    out.backward(dout)
    bias64 = bias.detach().double().requires_grad_()
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.detach().double().transpose(1, 2), k.detach().double().transpose(1, 2),
        v.detach().double().transpose(1, 2), attn_mask=bias64)
    ref.backward(dout.double())
    biasl = bias.detach().clone().requires_grad_()
    naive = torch.nn.functional.scaled_dot_product_attention(
        q.detach().transpose(1, 2), k.detach().transpose(1, 2), v.detach().transpose(1, 2), attn_mask=biasl)
    naive.backward(dout)
    assert bias.grad.shape == bias.shape
    assert_rule("dbias", bias.grad, bias64.grad, biasl.grad, 3.0, atol=1e-6 * max(1.0, bias64.grad.abs().max().item()))


def test_bias_with_softcap_alibi_window_gqa():
    q, k, v = random_qkv(2, 40, 50, 4, 2, 16, seed=9)
    bias = torch.randn(2, 1, 40, 50, generator=torch.Generator().manual_seed(9))
    slopes = torch.rand(4) * 0.2
    run = lambda q, k, v: ops.attention(  # noqa: E731
        q, k, v, scale=0.3, softcap=3.0, alibi_slopes=slopes, attn_mask=bias.expand(2, 4, 40, 50),
        window_left=9, window_right=2, diag_offset=10, backend="cpu")[0]
    check_attention(run, q, k, v, seed=9, scale=0.3, softcap=3.0, alibi_slopes=slopes, attn_bias=bias,
                    window_left=9, window_right=2, diag_offset=10)


def keep_mask_for_call(seed, batch, heads, seqlen_q, seqlen_k, p):
    torch.manual_seed(seed)
    return ops.dropout_keep_mask(ops.dropout_rng_state(), batch, heads, seqlen_q, seqlen_k, p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_dropout_matches_reference_with_the_kernels_mask(dtype, causal):
    q, k, v = random_qkv(2, 37, 45, 4, 2, 16, dtype=dtype, seed=11)
    keep = keep_mask_for_call(123, 2, 4, 37, 45, 0.3)

    def run(q, k, v):
        torch.manual_seed(123)  # the call draws its [seed, offset] from torch's generator
        return flashattn_py.flash_attn_func(q, k, v, dropout_p=0.3, causal=causal, backend="cpu")

    check_attention(run, q, k, v, seed=11, dropout_p=0.3, dropout_mask=keep, window_right=0 if causal else -1,
                    diag_offset=8)


def test_dropout_scale_is_rounded_once():
    # fp32 p = 0.9: kept values times 1 / (1 - p) = 10; 1 / (1 - 0.9f) is 9.9999981, 2e-7 off in
    # every kept value (over the rule's bound with one key: no softmax error). With V = 1 and one
    # key a kept row is the scale itself.
    q, k, v = random_qkv(1, 64, 1, 2, 2, 64, seed=5)
    keep = keep_mask_for_call(7, 1, 2, 64, 1, 0.9)
    torch.manual_seed(7)
    out = flashattn_py.flash_attn_func(q, k, torch.ones_like(v), dropout_p=0.9, backend="cpu")
    kept = keep[0, :, :, 0].transpose(0, 1)  # (S, H)
    assert kept.any() and not kept.all()
    assert torch.equal(out[0][kept], torch.full_like(out[0][kept], 10.0))
    assert torch.equal(out[0][~kept], torch.zeros_like(out[0][~kept]))

    def run(q, k, v):
        torch.manual_seed(7)
        return flashattn_py.flash_attn_func(q, k, v, dropout_p=0.9, backend="cpu")

    check_attention(run, q, k, v, seed=5, dropout_p=0.9, dropout_mask=keep)


def _philox4x32_10(counter, key):
    """Philox4x32-10 (Random123) in Python integers: four 32-bit words."""
    c, k, mask = list(counter), list(key), 0xFFFFFFFF
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [((p1 >> 32) ^ c[1] ^ k[0]) & mask, p1 & mask, ((p0 >> 32) ^ c[3] ^ k[1]) & mask, p0 & mask]
        k = [(k[0] + 0x9E3779B9) & mask, (k[1] + 0xBB67AE85) & mask]
    return c


def test_dropout_mask_is_philox_of_the_documented_counters():
    # Independent of the C++ (the hook and the kernels share one draw function): Random123's
    # known answers, then the layout csrc/cpu/dropout.h documents (counter (row, key / 4)
    # and the offset, key the seed, word key % 4, kept where the draw >= p * 2^32).
    ones = 0xFFFFFFFF
    assert _philox4x32_10([0] * 4, [0, 0]) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert _philox4x32_10([ones] * 4, [ones, ones]) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert _philox4x32_10([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0]) == [
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]
    seed, offset, p = 0x123456789ABCDEF, 2**32 + 5, 0.3
    heads, seqlen_q, seqlen_k = 2, 3, 70
    keep = ops.dropout_keep_mask(torch.tensor([seed, offset]), 1, heads, seqlen_q, seqlen_k, p)
    threshold = int(float(torch.tensor(p, dtype=torch.float32)) * 2**32)
    groups = (seqlen_k + 3) // 4
    for row in range(heads * seqlen_q):
        for g in range(groups):
            ctr = row * groups + g
            words = _philox4x32_10([ctr & ones, ctr >> 32, offset & ones, offset >> 32], [seed & ones, seed >> 32])
            for j in range(4 * g, min(4 * g + 4, seqlen_k)):
                assert bool(keep.view(-1, seqlen_k)[row, j]) == (words[j % 4] >= threshold)


@pytest.mark.parametrize("window", [(-1, -1), (61, 5)])
def test_dropout_keeps_exactly_the_masks_keys(window):
    # q = 0 weighs every visible key alike and V = I puts key j in column j: the output is
    # nonzero exactly where the kernel kept a visible key. Against the test hook's mask
    # (drawn key by key; the kernels draw 32 keys at a time where they can), over key blocks
    # and windows that start a row's keys anywhere within a group of four.
    seqlen_q, seqlen_k, heads = 70, 203, 2
    q = torch.zeros(1, seqlen_q, heads, seqlen_k)
    v = torch.eye(seqlen_k).expand(1, heads, seqlen_k, seqlen_k).transpose(1, 2).contiguous()
    k = torch.randn(v.shape, generator=torch.Generator().manual_seed(6))
    keep = keep_mask_for_call(5, 1, heads, seqlen_q, seqlen_k, 0.4)[0].transpose(0, 1)  # (Sq, H, Sk)
    torch.manual_seed(5)
    out = flashattn_py.flash_attn_func(q, k, v, dropout_p=0.4, window_size=window, backend="cpu")[0]
    i, j = torch.arange(seqlen_q)[:, None], torch.arange(seqlen_k)[None, :]
    diag = seqlen_k - seqlen_q  # (bottom-right)
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool)
    if window != (-1, -1):
        visible = (j >= i + diag - window[0]) & (j <= i + diag + window[1])
    assert torch.equal(out != 0, keep & visible[:, None, :])


def test_dropout_same_seed_same_mask_and_fraction():
    q, k, v = random_qkv(1, 64, 64, 2, 2, 8, seed=13)
    torch.manual_seed(0)
    a = flashattn_py.flash_attn_func(q, k, v, dropout_p=0.5, backend="cpu")
    torch.manual_seed(0)
    b = flashattn_py.flash_attn_func(q, k, v, dropout_p=0.5, backend="cpu")
    c = flashattn_py.flash_attn_func(q, k, v, dropout_p=0.5, backend="cpu")
    assert torch.equal(a, b) and not torch.equal(a, c)
    for p in (0.1, 0.5, 0.9):
        keep = keep_mask_for_call(1, 2, 8, 512, 512, p)
        assert abs(keep.float().mean().item() - (1 - p)) < 0.01

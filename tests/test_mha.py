"""flashattn_py.mha: flash-attn's MHA block against the formula written out here in float64
(projections, causal depthwise convolution, rotary, attention_ref), generation through
InferenceParams against the whole sequence at once."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from flashattn_py.errors import ArgumentError
from flashattn_py.mha import MHA, CrossAttention, InferenceParams, SelfAttention, get_alibi_slopes
from flashattn_py.reference import attention_ref

E, H = 64, 4


def _rotate(x, positions, dim, interleaved, base=10000.0):
    """x (B, S, h, D) with its first ``dim`` features rotated at ``positions`` (S,) or (B, S)."""
    half = dim // 2
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = positions.to(torch.float64)[..., None] * inv_freq  # (..., S, half)
    cos, sin = angles.cos(), angles.sin()
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, :, None], sin[:, :, None]  # (B, S, 1, half)
    out = x.clone()
    if interleaved:
        a, b = x[..., 0:dim:2], x[..., 1:dim:2]
        out[..., 0:dim:2], out[..., 1:dim:2] = a * cos - b * sin, a * sin + b * cos
    else:
        a, b = x[..., :half], x[..., half:dim]
        out[..., :half], out[..., half:dim] = a * cos - b * sin, a * sin + b * cos
    return out


def _formula(m: MHA, x, x_kv=None, rotary_interleaved=False, causal=None, mask=None, positions=None):
    """MHA's forward written out: (B, S, E) -> (B, S, E), in x's dtype."""
    d, hk = m.head_dim, m.num_heads_kv
    if m.cross_attn:
        q = F.linear(x, m.Wq.weight, m.Wq.bias)
        kv = F.linear(x if x_kv is None else x_kv, m.Wkv.weight, m.Wkv.bias)
    else:
        proj = F.linear(x, m.Wqkv.weight, m.Wqkv.bias)
        if m.dwconv and hk == m.num_heads:
            proj = F.conv1d(F.pad(proj.transpose(1, 2), (2, 0)), m.dwconv_qkv.weight, m.dwconv_qkv.bias,
                            groups=proj.shape[-1]).transpose(1, 2)
        q, kv = proj[..., :m.num_heads * d], proj[..., m.num_heads * d:]
        if m.dwconv and hk != m.num_heads:
            q = F.conv1d(F.pad(q.transpose(1, 2), (2, 0)), m.dwconv_q.weight, m.dwconv_q.bias,
                         groups=q.shape[-1]).transpose(1, 2)
            kv = F.conv1d(F.pad(kv.transpose(1, 2), (2, 0)), m.dwconv_kv.weight, m.dwconv_kv.bias,
                          groups=kv.shape[-1]).transpose(1, 2)
    q = q.unflatten(-1, (m.num_heads, d))
    k, v = kv.unflatten(-1, (2, hk, d)).unbind(2)
    if m.rotary_emb_dim:
        pos = torch.arange(q.shape[1]) if positions is None else positions
        q = _rotate(q, pos, m.rotary_emb_dim, rotary_interleaved)
        k = _rotate(k, pos, m.rotary_emb_dim, rotary_interleaved)
    inner = m.inner_attn
    causal = m.causal if causal is None else causal
    slopes = getattr(inner, "alibi_slopes", None)
    left, right = getattr(inner, "window_size", (-1, -1))
    out, _ = attention_ref(q, k, v, scale=inner.softmax_scale, alibi_slopes=slopes, attn_bias=mask,
                           window_left=left, window_right=0 if causal else right, diag_offset=k.shape[1] - q.shape[1])
    return F.linear(out.flatten(-2), m.out_proj.weight, m.out_proj.bias)


def _module(seed=0, **kwargs):
    torch.manual_seed(seed)
    return MHA(E, H, dtype=torch.float64, **kwargs)


CONFIGS = [
    dict(causal=True, use_flash_attn=True),
    dict(causal=True, use_flash_attn=True, num_heads_kv=2, rotary_emb_dim=8),
    dict(causal=True, use_flash_attn=True, rotary_emb_dim=12, rotary_emb_interleaved=True, dwconv=True),
    dict(use_flash_attn=True, use_alibi=True, window_size=(3, 1), softmax_scale=0.3, qkv_proj_bias=False),
    dict(num_heads_kv=1, dwconv=True, out_proj_bias=False),
    dict(causal=True),
    dict(causal=True, softmax_scale=0.3, dropout=0.5),  # (eval mode: no dropout)
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_forward_and_gradients_are_the_formula(cfg):
    m = _module(**cfg).eval()
    x = torch.randn(2, 11, E, dtype=torch.float64, requires_grad=True)
    out = m(x)
    want = _formula(m, x, rotary_interleaved=cfg.get("rotary_emb_interleaved", False))
    torch.testing.assert_close(out, want)
    dout = torch.randn_like(out)
    params = [x, *m.parameters()]
    grads = torch.autograd.grad(out, params, dout)
    want_grads = torch.autograd.grad(want, params, dout)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w)


def test_state_dict_names_are_flash_attns():
    keys = set(_module(num_heads_kv=2, rotary_emb_dim=8, dwconv=True, use_flash_attn=True).state_dict())
    assert keys == {"Wqkv.weight", "Wqkv.bias", "dwconv_q.weight", "dwconv_q.bias", "dwconv_kv.weight",
                    "dwconv_kv.bias", "out_proj.weight", "out_proj.bias"}
    assert set(_module(cross_attn=True).state_dict()) == {"Wq.weight", "Wq.bias", "Wkv.weight", "Wkv.bias",
                                                          "out_proj.weight", "out_proj.bias"}
    assert set(_module(dwconv=True).state_dict()) >= {"dwconv_qkv.weight", "dwconv_qkv.bias"}


def test_cross_attention_with_convolutions():
    m = _module(cross_attn=True, dwconv=True, causal=True)
    x, x_kv = torch.randn(2, 5, E, dtype=torch.float64), torch.randn(2, 9, E, dtype=torch.float64)
    q = F.conv1d(F.pad(m.Wq(x).transpose(1, 2), (2, 0)), m.dwconv_q.weight, m.dwconv_q.bias, groups=E)
    kv = F.conv1d(F.pad(m.Wkv(x_kv).transpose(1, 2), (2, 0)), m.dwconv_kv.weight, m.dwconv_kv.bias, groups=2 * E)
    q, (k, v) = q.transpose(1, 2).unflatten(-1, (H, -1)), kv.transpose(1, 2).unflatten(-1, (2, H, -1)).unbind(2)
    want = m.out_proj(attention_ref(q, k, v, window_right=0, diag_offset=4)[0].flatten(-2))
    torch.testing.assert_close(m(x, x_kv), want)


def test_cross_attention_mixer_subset_residual_and_checkpointing():
    m = _module(cross_attn=True, num_heads_kv=2, use_flash_attn=True, return_residual=True, checkpointing=True)
    calls = []
    m.inner_cross_attn.register_forward_pre_hook(lambda *args: calls.append(1))
    x = torch.randn(2, 7, E, dtype=torch.float64, requires_grad=True)
    x_kv = torch.randn(2, 13, E, dtype=torch.float64, requires_grad=True)
    out, residual = m(x, x_kv, mixer_subset=slice(0, 1))
    assert residual is x and out.shape == (2, 1, E)
    want = _formula(m, x[:, :1], x_kv)
    torch.testing.assert_close(out, want)
    grads = torch.autograd.grad(out.sum(), (x, x_kv, m.Wkv.weight))
    for g, w in zip(grads, torch.autograd.grad(want.sum(), (x, x_kv, m.Wkv.weight))):
        torch.testing.assert_close(g, w)
    assert len(calls) == 2  # (checkpointing: the attention ran again in the backward)


def test_packed_sequences_are_each_sequence_alone():
    m = _module(causal=True, use_flash_attn=True, num_heads_kv=2)
    lens = [5, 1, 9]
    xs = [torch.randn(1, n, E, dtype=torch.float64) for n in lens]
    cu = torch.tensor([0, 5, 6, 15], dtype=torch.int32)
    out = m(torch.cat(xs, 1)[0], cu_seqlens=cu, max_seqlen=9)
    torch.testing.assert_close(out, torch.cat([m(x)[0] for x in xs]))
    with pytest.raises(ArgumentError, match="cu_seqlens"):
        _module(use_flash_attn=True, rotary_emb_dim=8)(torch.cat(xs, 1)[0], cu_seqlens=cu, max_seqlen=9)


def test_key_padding_mask():
    # use_flash_attn=False: a (B, S) mask of kept keys; causal aligned to each row's last
    # kept key (flash-attn's reference CrossAttention)
    m = _module(causal=True)
    x = torch.randn(2, 6, E, dtype=torch.float64)
    keep = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    out = m(x, key_padding_mask=keep)
    torch.testing.assert_close(out, _formula(m, x, mask=keep[:, None, None, :], causal=True))
    cross = CrossAttention(causal=True)
    q, kv = torch.randn(2, 3, H, 8, dtype=torch.float64), torch.randn(2, 6, 2, 2, 8, dtype=torch.float64)
    kept = keep.sum(-1).view(2, 1, 1, 1)
    allowed = keep[:, None, None, :] & (torch.arange(6) <= torch.arange(3)[:, None] + kept - 3)
    k, v = kv.unbind(2)
    want = attention_ref(q, k, v, attn_bias=allowed)[0]
    torch.testing.assert_close(cross(q, kv, key_padding_mask=keep), want)
    qkv = torch.randn(2, 6, 3, H, 8, dtype=torch.float64)
    want = attention_ref(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], attn_bias=keep[:, None, None, :])[0]
    torch.testing.assert_close(SelfAttention()(qkv, key_padding_mask=keep), want)
    with pytest.raises(ArgumentError, match="key_padding_mask"):
        _module(use_flash_attn=True)(x, key_padding_mask=keep)


@pytest.mark.parametrize("cfg", [
    dict(use_flash_attn=True, num_heads_kv=2, rotary_emb_dim=12),  # (the cache call rotates: 12 % 16 != 0 -> module)
    dict(use_flash_attn=True, rotary_emb_dim=16, rotary_emb_interleaved=True),  # (rotary inside the cache call)
    dict(use_flash_attn=True, use_alibi=True, window_size=(4, 0)),
    dict(num_heads_kv=2, rotary_emb_dim=8),  # (reference modules: attention over the cache's rows)
], ids=str)
def test_generation_steps_are_the_whole_sequence(cfg):
    m = _module(causal=True, layer_idx=3, **cfg)
    x = torch.randn(2, 10, E, dtype=torch.float64)
    whole = m(x)
    params = InferenceParams(max_seqlen=16, max_batch_size=2)
    with torch.no_grad():
        steps = [m(x[:, :6], inference_params=params)]
        params.seqlen_offset = 6
        for t in range(6, 10):  # (one token at a time, then the rest of the cache stays unused)
            steps.append(m(x[:, t:t + 1], inference_params=params))
            params.seqlen_offset += 1
    torch.testing.assert_close(torch.cat(steps, 1), whole.detach())
    assert params.key_value_memory_dict[3].shape == (2, 16, 2, m.num_heads_kv, m.head_dim)


@pytest.mark.parametrize("use_flash_attn", [True, False])
def test_generation_at_a_batch_offset_and_with_xpos(use_flash_attn):
    # rows 1..2 of a 3-row cache (batch_size_offset 1); xPos rotary (its tables only the
    # module applies)
    m = _module(causal=True, layer_idx=0, use_flash_attn=use_flash_attn, rotary_emb_dim=16,
                rotary_emb_scale_base=64)
    x = torch.randn(2, 8, E, dtype=torch.float64)
    whole = m(x)
    params = InferenceParams(max_seqlen=10, max_batch_size=3, batch_size_offset=1)
    cache = m.allocate_inference_cache(3, 10)
    params.key_value_memory_dict[0] = cache.fill_(float("nan"))  # (rows and slots never written stay NaN)
    with torch.no_grad():
        steps = [m(x[:, :5], inference_params=params)]
        for t in range(5, 8):
            params.seqlen_offset = t
            steps.append(m(x[:, t:t + 1], inference_params=params))
    torch.testing.assert_close(torch.cat(steps, 1), whole.detach())
    assert cache[0].isnan().all() and not cache[1:, :8].isnan().any()


def test_generation_with_lengths_per_sample():
    # sequences at different lengths (left-aligned in the cache): each step attends each
    # sequence's own cached keys
    m = _module(causal=True, layer_idx=0, use_flash_attn=True, rotary_emb_dim=16, num_heads_kv=2)
    x = torch.randn(2, 9, E, dtype=torch.float64)
    params = InferenceParams(max_seqlen=12, max_batch_size=2)
    with torch.no_grad():
        m(x[:, :5], inference_params=params)  # (both cache 5 tokens; sequence 1 then goes on from 3)
        params.seqlen_offset = 5
        params.lengths_per_sample = torch.tensor([5, 3], dtype=torch.int32)
        step = m(x[:, 5:6], inference_params=params)
        torch.testing.assert_close(step[0], m(x[:1, :6])[0, 5:])
        torch.testing.assert_close(step[1], m(torch.cat([x[1:, :3], x[1:, 5:6]], 1))[0, 3:])
    # (the new keys went to each sequence's own next slot)
    cache = params.key_value_memory_dict[0]
    assert cache.shape == m.allocate_inference_cache(2, 12).shape
    with torch.no_grad():
        k_new = m.Wqkv(x[1:, 5:6])[..., H * m.head_dim:].unflatten(-1, (2, 2, m.head_dim))
    torch.testing.assert_close(cache[1, 3, 1], k_new[0, 0, 1])  # (the values: not rotated)


def test_get_alibi_slopes_and_bad_arguments():
    for n in (1, 4, 8, 6, 12):
        slopes = get_alibi_slopes(n)
        assert len(slopes) == n and all(0 < s < 1 for s in slopes)
    assert get_alibi_slopes(8) == [2.0 ** (-(i + 1)) for i in range(8)]
    assert get_alibi_slopes(6) == get_alibi_slopes(4) + get_alibi_slopes(8)[0::2][:2]
    with pytest.raises(ArgumentError, match="num_heads"):
        MHA(48, 4, num_heads_kv=3)
    with pytest.raises(ArgumentError, match="use_alibi"):
        MHA(48, 4, use_alibi=True)
    # (head dims 12 and 15: an odd rotary dim rounds up to even)
    for embed_dim, num_heads, rotary_emb_dim in ((48, 4, 14), (48, 4, 13), (48, 4, -2), (45, 3, 15)):
        with pytest.raises(ArgumentError, match=r"^rotary_emb_dim: must be in 0\.\."):
            MHA(embed_dim, num_heads, rotary_emb_dim=rotary_emb_dim)
    MHA(45, 3, rotary_emb_dim=14)(torch.randn(1, 2, 45))  # (the longest odd head dim's rotation)
    with pytest.raises(ArgumentError, match="layer_idx"):
        _module(causal=True, use_flash_attn=True)(torch.randn(1, 2, E, dtype=torch.float64),
                                                  inference_params=InferenceParams(4, 1))
    assert math.isclose(sum(get_alibi_slopes(2)), 2 ** -4 + 2 ** -8)

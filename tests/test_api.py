"""Public API: input validation, backend selection, the reference fallback, SDPA parity."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.varlen import AuxRequest

import flashattn_py
from flashattn_py import backends
from flashattn_py.reference import attention, attention_ref

from rule import assert_rule, check_attention, random_qkv

HAS_CPU = backends.compiled_ops_error() is None


def qkv(b=1, sq=8, sk=8, h=2, hk=2, d=16, dtype=torch.float32):
    return (torch.randn(b, sq, h, d, dtype=dtype), torch.randn(b, sk, hk, d, dtype=dtype),
            torch.randn(b, sk, hk, d, dtype=dtype))


@pytest.mark.parametrize(
    "make,kwargs,match",
    [
        (lambda: (torch.randn(8, 2, 16), *qkv()[1:]), {}, r"q: expected a 4-D tensor"),
        (lambda: (qkv()[0], torch.randn(2, 8, 2, 16), qkv()[2]), {}, r"batch sizes differ"),
        (lambda: (qkv()[0], torch.randn(1, 8, 2, 32), qkv()[2]), {}, r"q, k: head dims differ"),
        (lambda: (qkv()[0], torch.randn(1, 9, 2, 16), qkv()[2]), {}, r"k, v: sequence lengths differ"),
        (lambda: (qkv()[0], torch.randn(1, 8, 1, 16), qkv()[2]), {}, r"k, v: head counts differ"),
        (lambda: qkv(h=3, hk=2), {}, r"multiple of key/value heads"),
        (lambda: qkv(h=0, hk=0), {}, r"k: needs at least one key/value head, got 0"),
        (lambda: (qkv()[0].double(), *qkv()[1:]), {}, r"Expected query, key, and value to have the same dtype"),
        (lambda: (qkv()[0].int(), *qkv()[1:]), {}, r"q: dtype must be"),
        (lambda: qkv(d=257), {}, r"q: head dim must be in 1..256"),
        (lambda: qkv(), dict(window_size=(-2, 0)), r"window_size"),
        # (a float side would be truncated by int(), None would fail inside it)
        (lambda: qkv(), dict(window_size=(1.9, 0)), r"window_size: expected \(left, right\) ints"),
        (lambda: qkv(), dict(window_size=(None, None)), r"window_size: expected \(left, right\) ints"),
        (lambda: qkv(), dict(window_size=(1, 2, 3)), r"window_size: expected \(left, right\) ints"),
        (lambda: qkv(), dict(softcap=-1.0), r"softcap: must be a finite number >= 0"),
        (lambda: qkv(), dict(dropout_p=1.0), r"dropout_p: dropout probability has to be in \[0, 1\)"),
        (lambda: qkv(), dict(dropout_p=-0.1), r"dropout_p"),
        (lambda: qkv(), dict(alibi_slopes=torch.ones(3)), r"alibi_slopes: expected shape"),
        (lambda: qkv(), dict(alibi_slopes=torch.ones(2, dtype=torch.float64)), r"alibi_slopes: must be float32"),
        (lambda: qkv(), dict(backend="nope"), r"backend: unknown backend 'nope'"),
    ],
)
def test_flash_attn_func_rejects_bad_input(make, kwargs, match):
    with pytest.raises(ValueError, match=match):
        flashattn_py.flash_attn_func(*make(), **kwargs)


def test_device_mismatch_is_named():
    q, k, v = qkv()
    meta = torch.empty_like(k, device="meta")
    with pytest.raises(ValueError, match=r"q, k, v: Expected query, key, and value to be on the same device"):
        flashattn_py.flash_attn_func(q, meta, v)


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((torch.randn(4), torch.randn(4), torch.randn(4)), {}, r"at least 2 dimensional, but got query.dim: 1"),
        ((torch.randn(1, 2, 8, 16),) * 3, dict(attn_mask=torch.ones(3, 8, dtype=torch.bool)),
         r"attn_mask: shape \(3, 8\) is not broadcastable to \(1, 2, 8, 8\)"),
        ((torch.randn(1, 2, 8, 16),) * 3, dict(attn_mask=torch.ones(8, 8, dtype=torch.int64)),
         r"attn_mask: Expected attn_mask dtype to be bool"),
        ((torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)), {}, r"enable_gqa=True"),
        ((torch.randn(1, 2, 8, 16),) * 3, dict(dropout_p=2.0), r"dropout_p"),
    ],
)
def test_sdpa_rejects_bad_input(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        flashattn_py.scaled_dot_product_attention(*args, **kwargs)


@pytest.mark.skipif(not HAS_CPU, reason="compiled CPU ops not built")
def test_selection_order(monkeypatch):
    q, k, v = qkv()
    assert backends.select(backends.Problem("cpu", torch.float32)) == "cpu"
    monkeypatch.setenv("FLASHATTN_BACKEND", "reference")
    assert backends.select(backends.Problem("cpu", torch.float32)) == "reference"
    with flashattn_py.use_backend("cpu"):  # context beats env
        assert backends.select(backends.Problem("cpu", torch.float32)) == "cpu"
        # explicit argument beats the context
        assert backends.select(backends.Problem("cpu", torch.float32), "reference") == "reference"
    monkeypatch.setenv("FLASHATTN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FLASHATTN_BACKEND: unknown backend 'bogus'"):
        flashattn_py.flash_attn_func(q, k, v)


def test_use_backend_is_per_thread():
    # Thread a's block neither reaches thread b's calls nor, ending first, ends b's block
    # (one shared stack did both: b's calls went to the reference backend).
    import threading

    a_in, b_in, a_out, b_done = (threading.Event() for _ in range(4))
    seen = {}

    def thread_a():
        with flashattn_py.use_backend("reference"):
            a_in.set()
            b_in.wait(10)
        a_out.set()

    def thread_b():
        a_in.wait(10)
        seen["outside"] = backends.requested_backend()
        with flashattn_py.use_backend("cpu"):
            b_in.set()
            a_out.wait(10)
            seen["inside, after a's block"] = backends.requested_backend()
        b_done.set()

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert b_done.is_set()
    assert seen == {"outside": "auto", "inside, after a's block": "cpu"}
    assert backends.requested_backend() == "auto"


def test_forced_backend_lists_reasons():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"backend 'cuda' can't serve this call: .*runs on CUDA tensors"):
        flashattn_py.flash_attn_func(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match=r"backend 'triton' can't serve this call: .*dtype torch.float64"):
        flashattn_py.flash_attn_func(q.double(), k.double(), v.double(), backend="triton")
    with pytest.raises(ValueError, match="unknown backend"):
        with flashattn_py.use_backend("gpu"):
            pass


def test_available_backends():
    names = flashattn_py.available_backends()
    assert names[-1] == "reference"
    assert ("cpu" in names) == HAS_CPU
    assert "cuda" not in flashattn_py.available_backends("cpu")


def test_fallback_to_reference_warns_once(monkeypatch):
    backends._warned.clear()
    monkeypatch.setitem(backends.SUPPORTS, "cpu", lambda p: ["dropout is not supported"] if p.dropout_p else [])
    q, k, v = qkv()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            flashattn_py.flash_attn_func(q, k, v, dropout_p=0.5)
    messages = [str(w.message) for w in caught if "reference" in str(w.message)]
    assert len(messages) == 1 and "dropout" in messages[0]


def test_forward_mode_ad_falls_back_to_the_reference():
    # The fused kernels have no forward-mode derivative; dual tensors go to the reference
    # (plain torch ops) with the one-time warning, so the tangent is right, not dropped.
    import torch.autograd.forward_ad as fwAD

    backends._warned.clear()
    q, k, v = (torch.randn(1, 2, 7, 16, dtype=torch.float64) for _ in range(3))
    tq, tv = torch.randn_like(q), torch.randn_like(v)

    def tangent(sdpa, **kwargs):
        with fwAD.dual_level():
            out = sdpa(fwAD.make_dual(q, tq), k, fwAD.make_dual(v, tv), is_causal=True, **kwargs)
            return fwAD.unpack_dual(out)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = tangent(flashattn_py.scaled_dot_product_attention)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):  # torch's flash kernel has no forward AD (it raises)
        theirs = tangent(F.scaled_dot_product_attention)
    torch.testing.assert_close(ours.primal, theirs.primal)
    torch.testing.assert_close(ours.tangent, theirs.tangent)
    assert any("forward-mode AD" in str(w.message) for w in caught)
    if HAS_CPU:
        with fwAD.dual_level(), pytest.raises(ValueError, match="forward-mode AD"):
            flashattn_py.flash_attn_func(fwAD.make_dual(q, tq).transpose(1, 2), k.transpose(1, 2),
                                         v.transpose(1, 2), backend="cpu")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_lse_is_float32_or_float64_on_every_backend(backend, dtype):
    # (the reference computes in the input dtype: its 16-bit lse came back 16-bit)
    if backend == "cpu" and not HAS_CPU:
        pytest.skip("needs the compiled CPU ops")
    q, k, v = qkv(sq=5, sk=9, dtype=dtype)
    want = torch.float64 if dtype == torch.float64 else torch.float32
    assert flashattn_py.flash_attn_func(q, k, v, return_attn_probs=True, backend=backend)[1].dtype == want
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    assert flashattn_py.flash_attn_varlen_func(q[0], k[0, :5], v[0, :5], cu, cu, 3, 3, return_attn_probs=True,
                                               backend=backend)[1].dtype == want
    aux = flashattn_py.varlen_attn(q[0], k[0, :5], v[0, :5], cu, cu, 3, 3, backend=backend,
                                   return_aux=AuxRequest(lse=True))[1]
    assert aux.dtype == want
    assert flashattn_py.flash_attn_with_kvcache(q, k, v, return_softmax_lse=True, backend=backend)[1].dtype == want


def test_return_attn_probs():
    q, k, v = qkv(sq=5, sk=9, dtype=torch.float64)
    # without dropout, as flash-attn: out, lse and an empty tensor (no O(Sq * Sk) one), every form
    out, lse, probs = flashattn_py.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    ref_out, ref_lse, ref_probs = attention_ref(q, k, v, window_right=0, diag_offset=4, return_probs=True)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)
    assert probs.shape == (0,)
    cu = torch.tensor([0, 5], dtype=torch.int32)
    cu_k = torch.tensor([0, 9], dtype=torch.int32)
    _, varlen_lse, probs = flashattn_py.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu_k, 5, 9, causal=True,
                                                               return_attn_probs=True)
    assert probs.shape == (0,)
    torch.testing.assert_close(varlen_lse, ref_lse[0])
    # with dropout: the probabilities before dropout
    _, lse, probs = flashattn_py.flash_attn_func(q, k, v, dropout_p=0.5, causal=True, return_attn_probs=True)
    torch.testing.assert_close(probs, ref_probs)
    torch.testing.assert_close(lse, ref_lse)
    probs = flashattn_py.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu_k, 5, 9, dropout_p=0.5, causal=True,
                                                return_attn_probs=True)[2]
    torch.testing.assert_close(probs, ref_probs)


@pytest.mark.parametrize("shape", [(2, 4, 33, 16), (2, 33, 16), (2, 3, 2, 33, 16)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa_matches_torch(shape, is_causal):
    gen = torch.Generator().manual_seed(len(shape))
    q, k, v = (torch.randn(shape, generator=gen) for _ in range(3))
    out = flashattn_py.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=0.4)
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=is_causal, scale=0.4)
    naive = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=0.4)
    assert out.shape == expected.shape
    assert_rule("out", out, expected, naive, 2.0)


@pytest.mark.parametrize("mask_shape", [(33, 40), (2, 1, 1, 40), (2, 4, 33, 40)])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_sdpa_masks_match_torch(mask_shape, mask_dtype):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 33, 16, generator=gen)
    k, v = (torch.randn(2, 2, 40, 16, generator=gen) for _ in range(2))
    mask = torch.rand(mask_shape, generator=gen) > 0.3 if mask_dtype == torch.bool else torch.randn(mask_shape)
    if mask_dtype == torch.bool:
        mask[..., 0] = True  # torch's math path gives NaN for fully masked rows; ours gives 0
    out = flashattn_py.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                              attn_mask=mask if mask_dtype == torch.bool else mask.double(),
                                              enable_gqa=True)
    naive = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert_rule("out", out, expected, naive, 2.0)


@pytest.mark.parametrize("mask_shape", [(2, 1, 1, 9, 12), (1, 3, 1, 9, 12), (2, 3, 2, 9, 12), (9, 12)])
def test_sdpa_five_dim_masks_are_read_as_views(mask_shape, monkeypatch):
    # Leading dims a view cannot fold into one batch ((2, 1, 1, ...) over (2, 3, 2, ...)
    # inputs) were copied at the full (6, 2, 9, 12) size; the kernels now read the user's
    # mask in place, with gradients.
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 3, 2, n, 8, generator=gen, dtype=torch.float64).requires_grad_() for n in (9, 12, 12))
    mask = torch.randn(mask_shape, generator=gen, dtype=torch.float64).requires_grad_()
    storages = []
    attention = flashattn_py.ops.attention

    def recording(*args, attn_mask=None, **kwargs):
        storages.append(attn_mask.untyped_storage().data_ptr())
        return attention(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(flashattn_py.ops, "attention", recording)
    out = flashattn_py.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert set(storages) == {mask.untyped_storage().data_ptr()}
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, want)
    grads = torch.autograd.grad(out, (q, k, v, mask), torch.ones_like(out))
    for got, expected in zip(grads, torch.autograd.grad(want, (q, k, v, mask), torch.ones_like(want))):
        torch.testing.assert_close(got, expected)


def test_sdpa_five_dim_mask_compiles():
    # (the fold was decided by trying a view, which fails as an error under torch.compile)
    q = torch.randn(2, 3, 2, 9, 8)
    mask = torch.randn(2, 1, 1, 9, 9)
    run = lambda q, m: flashattn_py.scaled_dot_product_attention(q, q, q, attn_mask=m)  # noqa: E731
    torch.testing.assert_close(torch.compile(run, backend="aot_eager", fullgraph=True)(q, mask), run(q, mask))


@pytest.mark.skipif(not HAS_CPU, reason="compiled CPU ops not built")
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_sdpa_mask_with_is_causal_applies_both_as_torch_on_cpu(mask_dtype):
    # torch's CPU kernel takes the pair (its docs and math backend refuse it): mask and the
    # top-left causal mask together, gradients too.
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 3, n, 16, generator=gen, dtype=torch.float64).requires_grad_() for n in (9, 12, 12))
    mask = (torch.rand(2, 1, 9, 12, generator=gen) > 0.3 if mask_dtype == torch.bool
            else torch.randn(2, 1, 9, 12, generator=gen, dtype=torch.float64))
    if mask_dtype == torch.bool:
        mask[..., 0] = True  # (every row sees key 0: torch's math path gives NaN for rows that see none)
    tril = torch.ones(9, 12, dtype=torch.bool).tril()
    both = mask & tril if mask_dtype == torch.bool else mask.masked_fill(~tril, float("-inf"))
    out = flashattn_py.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=both)
    torch.testing.assert_close(out, want)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    for got, expected in zip(grads, torch.autograd.grad(want, (q, k, v), torch.ones_like(want))):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_sdpa_follows_cpu_autocast_as_torch_does(autocast_dtype):
    # torch's SDPA is on autocast's lower-precision list: under torch.autocast its float32
    # inputs (and a float mask) are cast to the autocast dtype, float64 ones are not, and
    # gradients reach the float32 leaves as float32. Ours: the same dtypes, and the same
    # values as calling it on the cast inputs; torch's own result within the bf16/fp16 rule.
    gen = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(2, 4, 40, 16, generator=gen).requires_grad_() for _ in range(3))
    mask = torch.randn(40, 40, generator=gen)
    with torch.autocast("cpu", dtype=autocast_dtype):
        out = flashattn_py.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out64 = flashattn_py.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert out.dtype == theirs.dtype == autocast_dtype
    assert out64.dtype == torch.float64
    cast = [t.detach().to(autocast_dtype) for t in (q, k, v, mask)]
    assert torch.equal(out, flashattn_py.scaled_dot_product_attention(*cast[:3], attn_mask=cast[3]))
    expected = F.scaled_dot_product_attention(*(t.double() for t in cast[:3]), attn_mask=cast[3].double())
    assert_rule("out", out, expected, theirs, 2.0)
    out.float().sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.float32 and torch.isfinite(q.grad).all()


def test_reference_generalises_the_seed_formula():
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 3, 11, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    seed_out, seed_p = attention(q, k, v)
    out, lse, probs = attention_ref(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), return_probs=True)
    torch.testing.assert_close(out.transpose(1, 2), seed_out)
    torch.testing.assert_close(probs, seed_p)
    torch.testing.assert_close(lse, torch.logsumexp(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1))


def test_reference_dropout_mask_and_fully_masked_rows():
    q, k, v = random_qkv(1, 6, 6, 2, 2, 4, dtype=torch.float64, seed=1)
    keep = torch.rand(1, 2, 6, 6) > 0.5
    out, _ = attention_ref(q, k, v, dropout_p=0.5, dropout_mask=keep)
    _, _, probs = attention_ref(q, k, v, return_probs=True)
    expected = torch.matmul(probs * keep / 0.5, v.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(out, expected)
    mask = torch.ones(1, 1, 6, 6, dtype=torch.bool)
    mask[..., 2, :] = False
    out, lse = attention_ref(q, k, v, attn_bias=mask)
    out.sum().backward()
    assert torch.equal(out[:, 2], torch.zeros_like(out[:, 2])) and lse[0, 0, 2] == float("-inf")
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_reference_backend_through_api_matches_rule():
    q, k, v = random_qkv(2, 20, 30, 4, 2, 16, seed=9)
    run = lambda q, k, v: flashattn_py.flash_attn_func(q, k, v, causal=True, backend="reference")  # noqa: E731
    check_attention(run, q, k, v, seed=9, window_right=0, diag_offset=10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_lse_of_16_bit_inputs_is_a_float32_logsumexp(dtype):
    # The reference backend's lse of 16-bit inputs: float32, the logsumexp of its 16-bit
    # scores taken in float32 (5-10x closer to the float64 truth here than the log of their
    # 16-bit sum in 16 bits, which it was).
    q, k, v = random_qkv(2, 33, 150, 4, 2, 16, dtype=dtype, seed=11)
    _, lse, _ = flashattn_py.flash_attn_func(q, k, v, causal=True, return_attn_probs=True, backend="reference")
    _, lse64 = attention_ref(q.double(), k.double(), v.double(), window_right=0, diag_offset=150 - 33)
    scores = q.transpose(1, 2) @ k.repeat_interleave(2, dim=2).permute(0, 2, 3, 1) / 4.0  # (16-bit, as the reference)
    scores = scores.masked_fill(torch.ones(33, 150, dtype=torch.bool).triu(150 - 33 + 1), float("-inf"))
    row_max = scores.amax(-1, keepdim=True)
    lse16 = (torch.log(torch.exp(scores - row_max).sum(-1, keepdim=True)) + row_max).squeeze(-1)
    assert lse.dtype == torch.float32
    err, err16 = ((x.double() - lse64).abs().max().item() for x in (lse, lse16))
    assert err <= 0.5 * err16, (err, err16)


def test_imports_and_falls_back_without_the_compiled_extension():
    import subprocess
    import sys

    script = (
        "import sys, warnings\n"
        "sys.modules['flashattn_py._C'] = None  # as if built with FLASHATTN_SKIP_EXT=1\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import torch, flashattn_py\n"
        "    q = torch.randn(1, 5, 2, 8)\n"
        "    out = flashattn_py.flash_attn_func(q, q, q, causal=True)\n"
        "    out = flashattn_py.flash_attn_func(q, q, q, causal=True)\n"
        "print(flashattn_py.available_backends('cpu'), out.shape)\n"
        "print(sum('flashattn_py._C is not available' in str(w.message) for w in caught))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    backends_line, warning_count = result.stdout.strip().splitlines()
    assert "'cpu'" not in backends_line and "'reference'" in backends_line
    assert int(warning_count) >= 1


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_no_keys_gives_zeros_in_the_autograd_graph(backend):
    # Without a key every row is empty: out 0, and a loss on it backpropagates zero
    # gradients on every backend (the reference once built a zeros tensor outside the
    # graph, so backward() raised "does not require grad").
    q = torch.randn(2, 5, 4, 8, requires_grad=True)
    k, v = torch.randn(2, 0, 2, 8, requires_grad=True), torch.randn(2, 0, 2, 6, requires_grad=True)
    out = flashattn_py.flash_attn_func(q, k, v, backend=backend)
    assert out.shape == (2, 5, 4, 6) and torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q)) and k.grad.shape == k.shape and v.grad.shape == v.shape


def test_sdpa_dropout_of_one_gives_zeros_as_torch():
    # torch's SDPA takes dropout_p = 1 (every weight dropped: zeros, zero gradients);
    # flash_attn_func keeps flash-attn's [0, 1).
    q, k, v = (torch.randn(2, 3, 5, 8, requires_grad=True) for _ in range(3))
    out = flashattn_py.scaled_dot_product_attention(q, k, v, dropout_p=1.0)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, dropout_p=1.0))
    out.sum().backward()
    assert all(torch.equal(t.grad, torch.zeros_like(t)) for t in (q, k, v))
    with pytest.raises(ValueError, match="dropout_p"):
        flashattn_py.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=1.0)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_window_side_as_long_as_the_keys_is_no_bound(backend):
    # flash-attn's rule (flash_api.cpp, as torch's varlen_attn): a side >= Sk (varlen:
    # max_seqlen_k) is -1. With Sq > Sk a right side of 5 >= Sk = 5 would otherwise hide
    # keys from the first rows (query 0 sees keys up to 0 + (5 - 7) + 5 = 3).
    if backend == "cpu" and not HAS_CPU:
        pytest.skip("needs the compiled CPU ops")
    q, k, v = (t.requires_grad_() for t in random_qkv(1, 7, 5, 2, 2, 16, seed=3))
    literal = attention_ref(q.detach(), k.detach(), v.detach(), window_left=5, window_right=5, diag_offset=-2)[0]
    full = attention_ref(q.detach(), k.detach(), v.detach(), diag_offset=-2)[0]
    assert not torch.allclose(literal, full)  # (the literal window would hide keys)
    out = flashattn_py.flash_attn_func(q, k, v, window_size=(5, 5), backend=backend)
    same = flashattn_py.flash_attn_func(q, k, v, window_size=(5, -1), backend=backend)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert torch.equal(out, same)
    assert all(torch.equal(a, b) for a, b in zip(grads, torch.autograd.grad(same, (q, k, v), torch.ones_like(out))))
    torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5)
    cu_q, cu_k = torch.tensor([0, 7, 10], dtype=torch.int32), torch.tensor([0, 5, 7], dtype=torch.int32)
    pq, pk, pv = (torch.randn(n, 2, 16) for n in (10, 7, 7))
    for window in ((5, 5), (-1, 5)):
        want = flashattn_py.flash_attn_varlen_func(pq, pk, pv, cu_q, cu_k, 7, 5, window_size=(window[0], -1),
                                                   backend=backend)
        got = flashattn_py.flash_attn_varlen_func(pq, pk, pv, cu_q, cu_k, 7, 5, window_size=window, backend=backend)
        assert torch.equal(got, want)
        got = flashattn_py.varlen_attn(pq, pk, pv, cu_q, cu_k, 7, 5, window_size=window, backend=backend)
        assert torch.equal(got, want)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_unbounded_right_side_beside_a_bounded_left_one_is_the_keys(backend):
    # flash-attn's kernels (flash_api.cpp set_params_fprop): with the left side bounded, a
    # right side of -1 or >= Sk is Sk, which hides keys from rows i < Sq - Sk - 1 (query 0
    # of Sq = 7, Sk = 4 sees keys up to 0 + (4 - 7) + 4 = 1).
    if backend == "cpu" and not HAS_CPU:
        pytest.skip("needs the compiled CPU ops")
    q, k, v = (t.requires_grad_() for t in random_qkv(1, 7, 4, 2, 2, 16, seed=4))
    q64, k64, v64 = (t.detach().double() for t in (q, k, v))  # (the float64 reference)
    want = attention_ref(q64, k64, v64, window_left=1, window_right=4, diag_offset=-3)[0]
    full = attention_ref(q64, k64, v64, window_left=1, diag_offset=-3)[0]
    assert not torch.allclose(want, full)
    first = flashattn_py.flash_attn_func(q, k, v, window_size=(1, 4), backend=backend)
    torch.testing.assert_close(first.double(), want, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(first, (q, k, v), torch.ones_like(first))
    for window in ((1, -1), (1, 100)):
        out = flashattn_py.flash_attn_func(q, k, v, window_size=window, backend=backend)
        assert torch.equal(out, first), window
        assert all(torch.equal(a, b) for a, b in zip(grads, torch.autograd.grad(out, (q, k, v), torch.ones_like(out))))
    # a left side that binds nothing (>= Sk) leaves the right one unbounded, as before
    torch.testing.assert_close(flashattn_py.flash_attn_func(q, k, v, window_size=(4, -1), backend=backend).double(),
                               attention_ref(q64, k64, v64, diag_offset=-3)[0],
                               atol=1e-5, rtol=1e-5)
    # varlen: the right side becomes max_seqlen_k (5), applied per sequence (7 queries, 5 and
    # 3 keys: query 0 of the second sees keys up to 0 + (3 - 7) + 5 = 1)
    cu_q, cu_k = torch.tensor([0, 7, 14], dtype=torch.int32), torch.tensor([0, 5, 8], dtype=torch.int32)
    pq, pk, pv = (torch.randn(n, 2, 16) for n in (14, 8, 8))
    want = torch.cat([attention_ref(pq[None, a:b].double(), pk[None, c:d].double(), pv[None, c:d].double(),
                                    window_left=1, window_right=5,
                                    diag_offset=(d - c) - 7)[0][0]
                      for a, b, c, d in ((0, 7, 0, 5), (7, 14, 5, 8))])
    for window in ((1, -1), (1, 5)):
        got = flashattn_py.flash_attn_varlen_func(pq, pk, pv, cu_q, cu_k, 7, 5, window_size=window, backend=backend)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
        got_torch = flashattn_py.varlen_attn(pq, pk, pv, cu_q, cu_k, 7, 5, window_size=window, backend=backend)
        assert torch.equal(got_torch, got)
        # max_seqlen_q 0 (not given) is the packed total: the same side
        assert torch.equal(got, flashattn_py.flash_attn_varlen_func(pq, pk, pv, cu_q, cu_k, 0, 5, window_size=window,
                                                                    backend=backend))
        # return_attn_probs' probabilities are the ones the kernels applied
        _, _, probs = flashattn_py.flash_attn_varlen_func(pq, pk, pv, cu_q, cu_k, 7, 5, window_size=window,
                                                          dropout_p=0.5, return_attn_probs=True, backend=backend)
        for p, (a, b, c, d) in zip(probs, ((0, 7, 0, 5), (7, 14, 5, 8))):
            torch.testing.assert_close(torch.einsum("hqk,khd->qhd", p[:, :b - a, :d - c].double(), pv[c:d].double()),
                                       want[a:b], atol=1e-5, rtol=1e-5)
    # a KV cache: the right side becomes its capacity
    k_cache, v_cache = torch.randn(1, 4, 2, 16), torch.randn(1, 4, 2, 16)
    got = flashattn_py.flash_attn_with_kvcache(q.detach(), k_cache, v_cache, cache_seqlens=3, window_size=(1, -1),
                                               backend=backend)
    want = attention_ref(q64, k_cache[:, :3].double(), v_cache[:, :3].double(), window_left=1, window_right=4,
                         diag_offset=-4)[0]
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(softmax_scale=float("nan")), r"softmax_scale: expected a finite number"),
    (dict(softmax_scale=float("inf")), r"softmax_scale: expected a finite number"),
    (dict(softmax_scale=1e39), r"softmax_scale: expected a finite number"),  # (inf as a float32)
    (dict(softmax_scale="a"), r"softmax_scale: expected a number"),
    (dict(softmax_scale="0.1"), r"softmax_scale: expected a number"),  # (float() took it; torch refuses)
    (dict(softcap="1.0"), r"softcap: must be a finite number >= 0"),
    (dict(softcap=float("nan")), r"softcap: must be a finite number >= 0"),  # (passed `< 0`: no softcap)
    (dict(softcap=float("inf")), r"softcap: must be a finite number >= 0"),
    (dict(softcap=None), r"softcap: must be a finite number >= 0"),
    (dict(dropout_p=None), r"dropout_p: dropout probability has to be in \[0, 1\)"),
    (dict(dropout_p=float("nan")), r"dropout_p: dropout probability has to be in \[0, 1\)"),
    (dict(alibi_slopes=[0.5, 0.25]), r"alibi_slopes: expected a float32 tensor"),
])
def test_scalar_options_are_checked(kwargs, match):
    # Non-finite scales and softcaps gave every output NaN, or (softcap NaN) no softcap; wrong
    # types raised Python's own errors without the argument's name.
    q, k, v = qkv()
    with pytest.raises(ValueError, match=match):
        flashattn_py.flash_attn_func(q, k, v, **kwargs)
    if "softmax_scale" in kwargs:
        with pytest.raises(ValueError, match=match.replace("softmax_scale", "scale")):
            flashattn_py.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)),
                                                      scale=kwargs["softmax_scale"])
    if "dropout_p" in kwargs:  # (SDPA takes 1 too: its range says so)
        with pytest.raises(ValueError, match=match.replace(r"1\)", r"1\]")):
            flashattn_py.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), **kwargs)


def test_varlen_attn_checks_ranks_before_reading_heads():
    q, kv = torch.randn(5, 2, 16), torch.randn(5, 2, 16)
    cu = torch.tensor([0, 5], dtype=torch.int32)
    for args, match in (((q, torch.randn(16), kv), r"key: expected a 3-D tensor"),
                        ((q, torch.randn(5, 0, 16), torch.randn(5, 0, 16)), r"key: needs at least one"),
                        ((None, kv, kv), r"query: expected a torch.Tensor")):
        with pytest.raises((ValueError, TypeError), match=match):
            flashattn_py.varlen_attn(*args, cu, cu, 5, 5, enable_gqa=True)
    with pytest.raises(ValueError, match=r"window_size: expected \(left, right\) ints"):
        flashattn_py.varlen_attn(q, kv, kv, cu, cu, 5, 5, window_size=5)


def test_numeric_options_take_numpy_scalars_and_one_element_tensors():
    # (as torch's SDPA: dropout_p=np.float32(0) passes there)
    import numpy as np

    q, k, v = qkv()
    want = flashattn_py.flash_attn_func(q, k, v, softcap=2.0)
    for softcap in (np.float32(2.0), torch.tensor(2.0), 2):
        got = flashattn_py.flash_attn_func(q, k, v, softcap=softcap, dropout_p=np.float64(0.0),
                                           softmax_scale=np.float32(0.25))
        torch.testing.assert_close(got, flashattn_py.flash_attn_func(q, k, v, softcap=2.0, softmax_scale=0.25))
    assert want.shape == got.shape
    flashattn_py.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), dropout_p=np.float32(0))

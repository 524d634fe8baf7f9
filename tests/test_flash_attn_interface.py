"""flash-attn's private forward / backward (flashattn_py.flash_attn_interface) and
install_as_flash_attn(); ring-flash-attention running on them: tests/test_distributed.py."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import flashattn_py
from flashattn_py.flash_attn_interface import (_flash_attn_backward, _flash_attn_forward,
                                               _flash_attn_varlen_backward, _flash_attn_varlen_forward)
from flashattn_py.reference import attention_ref
from devices import BACKENDS_ON_THEIR_DEVICE
from rule import random_qkv

OPTIONS = [
    dict(causal=True),
    dict(window=(5, 2), softcap=3.0),
    dict(alibi=True, causal=True),
    dict(window=(4, -1)),  # (a bounded left side: flash-attn's right side becomes Sk where Sq > Sk + 1)
]


def _private_args(opts, q):
    slopes = torch.rand(q.shape[2], generator=torch.Generator().manual_seed(3)) if opts.get("alibi") else None
    left, right = opts.get("window", (-1, -1))
    return dict(softmax_scale=opts.get("scale"), causal=opts.get("causal", False), window_size_left=left,
                window_size_right=right, softcap=opts.get("softcap", 0.0), alibi_slopes=slopes)


def _public_kwargs(args):
    return dict(softmax_scale=args["softmax_scale"], causal=args["causal"],
                window_size=(args["window_size_left"], args["window_size_right"]), softcap=args["softcap"],
                alibi_slopes=args["alibi_slopes"])


@pytest.mark.parametrize("opts", OPTIONS, ids=str)
@pytest.mark.parametrize("sizes", [(9, 9), (5, 13), (17, 6)], ids=str)
def test_dense_forward_and_backward_are_flash_attn_func(opts, sizes):
    sq, sk = sizes
    q, k, v = random_qkv(2, sq, sk, 4, 2, 16, 24, dtype=torch.float64, seed=sq * 31 + sk)
    q, k, v = q.detach(), k.detach(), v.detach()
    args = _private_args(opts, q)
    state = torch.get_rng_state()
    out, lse, s_dmask, rng_state = _flash_attn_forward(q, k, v, 0.0, return_softmax=False, **args)
    assert torch.equal(torch.get_rng_state(), state), "no dropout: torch's generator must not advance"
    assert s_dmask.shape == (0,) and rng_state.dtype == torch.int64 and rng_state.shape == (2,)
    assert out.shape == (2, sq, 4, 24) and lse.shape == (2, 4, sq)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    want_out, want_lse, _ = flashattn_py.flash_attn_func(*leaves, return_attn_probs=True, **_public_kwargs(args))
    assert torch.equal(out, want_out.detach()) and torch.equal(lse, want_lse)
    dout = torch.randn_like(out)
    want_out.backward(dout)
    dq, dk, dv = (torch.full_like(t, float("nan")) for t in (q, k, v))
    softmax_d = _flash_attn_backward(dout, q, k, v, out, lse, dq, dk, dv, 0.0, deterministic=False, **args)
    for got, leaf in zip((dq, dk, dv), leaves):
        torch.testing.assert_close(got, leaf.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(softmax_d, (dout * out).sum(-1).transpose(1, 2).float())
    # the formula itself, in float64
    ref_out, ref_lse = attention_ref(q, k, v, scale=args["softmax_scale"], softcap=args["softcap"],
                                     alibi_slopes=args["alibi_slopes"], window_left=args["window_size_left"],
                                     window_right=0 if args["causal"] else flashattn_py.api.flash_right_side(
                                         args["window_size_left"], args["window_size_right"], sq, sk),
                                     diag_offset=sk - sq)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)


def test_blocks_merge_to_the_whole_attention():
    # ring attention's use: each block's forward, merged; each block's backward with the
    # merged out / lse; gradients summed
    q, k, v = (t.detach() for t in random_qkv(1, 12, 20, 4, 2, 16, dtype=torch.float64, seed=11))
    dout = torch.randn(1, 12, 4, 16, dtype=torch.float64)
    out = torch.zeros(1, 12, 4, 16, dtype=torch.float64)
    lse = torch.full((1, 4, 12), float("-inf"), dtype=torch.float64)
    halves = [(k[:, :10], v[:, :10]), (k[:, 10:], v[:, 10:])]
    for kb, vb in halves:
        block_out, block_lse, _, _ = _flash_attn_forward(q, kb, vb, 0.0, None, False, -1, -1, 0.0, None, False)
        flashattn_py.merge_attention(out, lse, block_out, block_lse)
    grads = []
    for kb, vb in halves:
        dq, dk, dv = torch.empty_like(q), torch.empty_like(kb), torch.empty_like(vb)
        _flash_attn_backward(dout, q, kb, vb, out, lse, dq, dk, dv, 0.0, None, False, -1, -1, 0.0, None, False)
        grads.append((dq, dk, dv))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = attention_ref(*leaves)
    ref_out.backward(dout)
    torch.testing.assert_close(out, ref_out.detach())
    torch.testing.assert_close(lse, ref_lse.detach())
    torch.testing.assert_close(grads[0][0] + grads[1][0], leaves[0].grad)
    torch.testing.assert_close(torch.cat([grads[0][1], grads[1][1]], 1), leaves[1].grad)
    torch.testing.assert_close(torch.cat([grads[0][2], grads[1][2]], 1), leaves[2].grad)


def test_dropout_replays_the_forward_mask():
    q, k, v = (t.detach() for t in random_qkv(2, 11, 11, 4, 2, 16, dtype=torch.float32, seed=5))
    torch.manual_seed(7)
    out, lse, probs, rng_state = _flash_attn_forward(q, k, v, 0.3, None, True, -1, -1, 0.0, None, True)
    torch.manual_seed(7)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    want = flashattn_py.flash_attn_func(*leaves, dropout_p=0.3, causal=True)
    assert torch.equal(out, want.detach()), "the same seed draws the public function's mask"
    dout = torch.randn_like(out)
    want.backward(dout)
    dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
    softmax_d = _flash_attn_backward(dout, q, k, v, out, lse, dq, dk, dv, 0.3, None, True, -1, -1, 0.0, None, False,
                                     rng_state)
    for got, leaf in zip((dq, dk, dv), leaves):
        assert torch.equal(got, leaf.grad)
    # (flash-attn's softmax_d with dropout: rowsum(dout * out) times the keep probability)
    torch.testing.assert_close(softmax_d, 0.7 * (dout * out).sum(-1).transpose(1, 2))
    # S_dmask: the probabilities before dropout (flash-attn: only with dropout)
    ref_probs = attention_ref(q.double(), k.double(), v.double(), window_right=0, return_probs=True)[2]
    torch.testing.assert_close(probs.double(), ref_probs, atol=1e-6, rtol=1e-5)


def test_dropout_forward_and_backward_choose_one_backend(monkeypatch):
    # A dropout mask is its backend's: the forward and a backward with either deterministic
    # flag must choose alike (on some GPUs the flag changes the choice: cuda's deterministic
    # backward needs more shared memory).
    from flashattn_py import partial

    asked = []
    real = partial.select_backend

    def recording(q, k, v, backward, deterministic=False, alibi_slopes=None, cu_seqlens=None, backend="auto"):
        if backend == "auto":  # (the choice; a named backend is only checked)
            asked.append((backward, deterministic))
        return real(q, k, v, backward, deterministic, alibi_slopes, cu_seqlens, backend)

    monkeypatch.setattr(partial, "select_backend", recording)
    q, k, v = (t.detach() for t in random_qkv(1, 6, 6, 2, 2, 8, seed=4))
    out, lse, _, rng_state = _flash_attn_forward(q, k, v, 0.25, None, False, -1, -1, 0.0, None, False)
    for deterministic in (False, True):
        _flash_attn_backward(out, q, k, v, out, lse, None, None, None, 0.25, None, False, -1, -1, 0.0, None,
                             deterministic, rng_state)
    assert asked == [(True, True)] * 3
    asked.clear()
    _flash_attn_backward(out, q, k, v, out, lse, None, None, None, 0.0, None, False, -1, -1, 0.0, None, False)
    assert asked == [(True, False)]  # (without dropout the caller's flag)


def test_varlen_forward_and_backward_are_flash_attn_varlen_func():
    lens_q, lens_k = [3, 0, 17, 6], [5, 4, 9, 6]
    cu_q = torch.tensor([0, 3, 3, 20, 26], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 9, 18, 24], dtype=torch.int32)
    q, k, v = random_qkv(1, sum(lens_q), sum(lens_k), 4, 2, 16, dtype=torch.float64, seed=9)
    q, k, v = q[0].detach(), k[0].detach(), v[0].detach()
    for causal, window in ((True, (-1, -1)), (False, (3, 1)), (False, (-1, -1))):
        out, lse, s_dmask, _ = _flash_attn_varlen_forward(q, k, v, cu_q, cu_k, 17, 9, 0.0, None, causal,
                                                          *window)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        want, want_lse, _ = flashattn_py.flash_attn_varlen_func(*leaves, cu_q, cu_k, 17, 9, causal=causal,
                                                                window_size=window, return_attn_probs=True)
        assert s_dmask.shape == (0,) and torch.equal(out, want.detach()) and torch.equal(lse, want_lse)
        dout = torch.randn_like(out)
        want.backward(dout)
        dq, dk, dv = (torch.full_like(t, float("nan")) for t in (q, k, v))
        softmax_d = _flash_attn_varlen_backward(dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, 17, 9, 0.0, None,
                                                causal, *window, 0.0, None, False)
        for got, leaf in zip((dq, dk, dv), leaves):
            torch.testing.assert_close(got, leaf.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(softmax_d, (dout * out).sum(-1).t().float())
    # paged K/V and seqused_k (forward only): flash_attn_varlen_func's paged path
    pages_k, pages_v = torch.randn(7, 3, 2, 16, dtype=torch.float64), torch.randn(7, 3, 2, 16, dtype=torch.float64)
    table = torch.tensor([[6, 0, 2], [1, 5, 3], [4, 6, 0], [2, 1, 6]], dtype=torch.int32)
    out = _flash_attn_varlen_forward(q, pages_k, pages_v, cu_q, cu_k, 17, 9, 0.0, None, True, block_table=table)[0]
    want = flashattn_py.flash_attn_varlen_func(q, pages_k, pages_v, cu_q, cu_k, 17, 9, causal=True, block_table=table)
    assert torch.equal(out, want)


def test_bad_calls_raise_naming_the_argument():
    q, k, v = (t.detach() for t in random_qkv(1, 5, 5, 2, 2, 8, seed=1))
    with pytest.raises(ValueError, match="return_softmax"):
        _flash_attn_forward(q, k, v, 0.0, None, False, -1, -1, 0.0, None, True)
    out, lse, _, _ = _flash_attn_forward(q, k, v, 0.0, None, False, -1, -1, 0.0, None, False)
    dq = torch.empty(1, 4, 2, 8)
    with pytest.raises(ValueError, match=r"\bdq\b"):
        _flash_attn_backward(out, q, k, v, out, lse, dq, None, None, 0.0, None, False, -1, -1, 0.0, None, False)
    # buffers of another dtype, an expanded one, a bad lse: refused before anything is written
    dk = torch.full_like(k, float("nan"))
    for bad in (torch.zeros(q.shape, dtype=torch.int32), torch.zeros(q.shape, dtype=torch.float64),
                torch.zeros(1, 1, 1, 1).expand(q.shape)):
        with pytest.raises(ValueError, match=r"\bdq\b"):
            _flash_attn_backward(out, q, k, v, out, lse, bad, dk, None, 0.0, None, False, -1, -1, 0.0, None, False)
        assert dk.isnan().all()
    with pytest.raises(ValueError, match="^softmax_lse"):
        _flash_attn_backward(out, q, k, v, out, lse[:, :, :3], None, dk, None, 0.0, None, False, -1, -1, 0.0, None,
                             False)
    assert dk.isnan().all()
    # a leaf that requires grad takes its gradient as flash-attn's kernels write it
    dv, want_dv = torch.zeros_like(v, requires_grad=True), torch.empty_like(v)
    for into in (dv, want_dv):
        _flash_attn_backward(out, q, k, v, out, lse, None, None, into, 0.0, None, False, -1, -1, 0.0, None, False)
    assert torch.equal(dv.detach(), want_dv) and want_dv.abs().sum() > 0
    with pytest.raises(ValueError, match="rng_state"):
        _flash_attn_backward(out, q, k, v, out, lse, None, None, None, 0.2, None, False, -1, -1, 0.0, None, False)
    with pytest.raises(ValueError, match="window_size"):
        _flash_attn_forward(q, k, v, 0.0, None, False, -3, -1, 0.0, None, False)
    with pytest.raises(ValueError, match="leftpad_k"):
        cu = torch.tensor([0, 5], dtype=torch.int32)
        _flash_attn_varlen_forward(q[0], k[0], v[0], cu, cu, 5, 5, 0.0, None, False, leftpad_k=cu[:1])


def test_install_as_flash_attn():
    # (in a fresh interpreter: the alias stays in sys.modules for the rest of a process)
    script = textwrap.dedent("""
        import sys, types
        import flashattn_py
        top = flashattn_py.install_as_flash_attn()
        assert flashattn_py.install_as_flash_attn() is top
        import flash_attn
        from flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
        from flash_attn.flash_attn_interface import _flash_attn_forward, _flash_attn_backward
        from flash_attn.bert_padding import pad_input, unpad_input
        from flash_attn.layers.rotary import RotaryEmbedding, apply_rotary_emb
        from flash_attn.modules.mha import MHA, FlashSelfAttention, FlashCrossAttention, SelfAttention
        from flash_attn.utils.generation import InferenceParams
        assert MHA is flashattn_py.mha.MHA and InferenceParams is flashattn_py.mha.InferenceParams
        assert flash_attn_func is flashattn_py.flash_attn_func and flash_attn.__version__ == "2.8.4"
        assert RotaryEmbedding is flashattn_py.rotary.RotaryEmbedding
        from flash_attn.ops.triton.rotary import apply_rotary
        import flash_attn.layers.rotary
        assert apply_rotary is flashattn_py.rotary.apply_rotary_raw is flash_attn.layers.rotary.apply_rotary
        try:
            import flash_attn.ops.layer_norm
        except ModuleNotFoundError:
            pass
        else:
            raise AssertionError("flash_attn.ops.layer_norm is not served")
        import importlib.util
        if importlib.util.find_spec("transformers") is not None:
            # (transformers looks for packages through importlib: the alias must not break that)
            import transformers.utils
            assert transformers.utils.is_flash_attn_2_available() is False  # (no flash-attn distribution)
        # a flash_attn of someone else's is not replaced unless asked
        for name in [n for n in sys.modules if n.startswith("flash_attn")]:
            del sys.modules[name]
        sys.modules["flash_attn"] = types.ModuleType("flash_attn")
        try:
            flashattn_py.install_as_flash_attn()
        except ImportError as e:
            assert "replace=True" in str(e)
        else:
            raise AssertionError("a foreign flash_attn was replaced")
        assert flashattn_py.install_as_flash_attn(replace=True).flash_attn_func is flash_attn_func
        from flash_attn.flash_attn_interface import _flash_attn_varlen_forward
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


@pytest.mark.parametrize("backend", BACKENDS_ON_THEIR_DEVICE)
def test_private_primitives_on_each_backend(backend):
    # On each backend's own device (GPU tensors for triton and cuda): the dense and packed
    # primitives are the public functions' forward and backward on that backend (the same
    # kernels, dropout replayed from rng_state), and blocks merged as ring attention merges
    # them give the whole attention.
    device, dtype = ("cpu", torch.float32) if backend == "cpu" else ("cuda", torch.float16)
    q, k, v = (t.detach().to(device=device, dtype=dtype)
               for t in random_qkv(2, 19, 33, 4, 2, 32, dtype=torch.float32, seed=23))
    dout = torch.randn(2, 19, 4, 32, generator=torch.Generator().manual_seed(24)).to(device=device, dtype=dtype)
    for dropout_p in (0.0, 0.2):
        torch.manual_seed(5)
        out, lse, _, rng_state = _flash_attn_forward(q, k, v, dropout_p, None, True, -1, -1, 0.0, None, False,
                                                     backend=backend)
        torch.manual_seed(5)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        want, want_lse, _ = flashattn_py.flash_attn_func(*leaves, dropout_p=dropout_p, causal=True,
                                                         deterministic=True, return_attn_probs=True,
                                                         backend=backend)
        assert torch.equal(out, want.detach()) and torch.equal(lse, want_lse)
        want.backward(dout)
        dq, dk, dv = (torch.full_like(t, float("nan")) for t in (q, k, v))
        _flash_attn_backward(dout, q, k, v, out, lse, dq, dk, dv, dropout_p, None, True, -1, -1, 0.0, None, True,
                             rng_state, backend=backend)
        for got, leaf in zip((dq, dk, dv), leaves):
            assert torch.equal(got, leaf.grad), f"dropout_p {dropout_p}: gradients differ from flash_attn_func's"
    # packed: two sequences of the same rows
    cu_q = torch.tensor([0, 7, 19], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 20, 33], dtype=torch.int32, device=device)
    pq, pk, pv, pdout = q[0], k[0], v[0], dout[0]
    out, lse, _, _ = _flash_attn_varlen_forward(pq, pk, pv, cu_q, cu_k, 12, 20, 0.0, None, True, backend=backend)
    leaves = [t.clone().requires_grad_() for t in (pq, pk, pv)]
    want = flashattn_py.flash_attn_varlen_func(*leaves, cu_q, cu_k, 12, 20, causal=True, deterministic=True,
                                               backend=backend)
    assert torch.equal(out, want.detach())
    want.backward(pdout)
    grads = [torch.empty_like(t) for t in (pq, pk, pv)]
    _flash_attn_varlen_backward(pdout, pq, pk, pv, out, lse, *grads, cu_q, cu_k, 12, 20, 0.0, None, True, -1, -1,
                                0.0, None, True, backend=backend)
    for got, leaf in zip(grads, leaves):
        assert torch.equal(got, leaf.grad)
    # keys in two blocks, merged (float32 accumulators), each block's backward with the merge
    acc = torch.zeros(2, 19, 4, 32, dtype=torch.float32, device=device)
    acc_lse = torch.full((2, 4, 19), float("-inf"), dtype=torch.float32, device=device)
    blocks = [(k[:, :20], v[:, :20]), (k[:, 20:], v[:, 20:])]
    for kb, vb in blocks:
        block_out, block_lse, _, _ = _flash_attn_forward(q, kb, vb, 0.0, None, False, -1, -1, 0.0, None, False,
                                                         backend=backend)
        flashattn_py.merge_attention(acc, acc_lse, block_out, block_lse)
    merged = acc.to(dtype)
    grads = []
    for kb, vb in blocks:
        dq, dk, dv = torch.empty_like(q), torch.empty_like(kb), torch.empty_like(vb)
        _flash_attn_backward(dout, q, kb, vb, merged, acc_lse, dq, dk, dv, 0.0, None, False, -1, -1, 0.0, None,
                             False, backend=backend)
        grads.append((dq, dk, dv))
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = attention_ref(*leaves)
    ref_out.backward(dout.double())
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=5e-3, rtol=5e-3)
    torch.testing.assert_close(acc.double(), ref_out.detach(), **tol)
    torch.testing.assert_close(acc_lse.double(), ref_lse.detach(), **tol)
    torch.testing.assert_close((grads[0][0].double() + grads[1][0].double()), leaves[0].grad, **tol)
    torch.testing.assert_close(torch.cat([grads[0][1], grads[1][1]], 1).double(), leaves[1].grad, **tol)
    torch.testing.assert_close(torch.cat([grads[0][2], grads[1][2]], 1).double(), leaves[2].grad, **tol)

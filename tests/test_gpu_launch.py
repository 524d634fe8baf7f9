"""GPU checks of launch geometry and graph-safe dropout (issue 19), cuda and triton backends.

* batch * heads past 65535: the kernels run on 1-D grids (gridDim.y / .z stop at 65535).
* CUDA-graph capture with dropout: the [seed, offset] is drawn on the GPU inside the graph
  and read by the kernels when they run, so each replay draws a new mask (a host-drawn
  seed baked into the launch repeated one mask on every replay).
* B = 1 / H = 1 views whose batch / head strides are not multiples of 8 (the 16-byte vector
  path is taken now: outputs must still be right).
* A decode step (flash_attn_with_kvcache: append, then attend) captured in a CUDA graph:
  nothing is read back to the host, so replays follow the lengths written into the
  captured tensors.

Run on the device machine: ``pytest -m gpu tests/test_gpu_launch.py``.
"""
from __future__ import annotations

import math
import os

os.environ.setdefault("FLASHATTN_TRITON_AUTOTUNE", "0")

import pytest
import torch

import flashattn_py
from flashattn_py import backends, ops
from flashattn_py.reference import attention_ref

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

DEV = "cuda"


def _backend(name: str, dtype=torch.float16, **kw) -> str:
    reasons = backends.SUPPORTS[name](backends.Problem("cuda", dtype, **kw))
    if reasons:
        pytest.skip(f"{name}: " + "; ".join(reasons))
    return name


def _ref_check(out, q, k, v, scale, atol, **kw):
    ref, _ = attention_ref(q.double(), k.double(), v.double(), scale=scale, **kw)
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=0)


@pytest.mark.parametrize("name", ["cuda", "triton"])
@pytest.mark.parametrize("batch,heads", [(65537, 1), (1, 65537)])
def test_batch_or_heads_past_65535(name, batch, heads):
    _backend(name, head_dim=32, backward=True)
    g = torch.Generator(device=DEV).manual_seed(0)
    q, k, v = (torch.randn(batch, 8, heads, 32, device=DEV, generator=g, dtype=torch.float16, requires_grad=True)
               for _ in range(3))
    scale = 1 / math.sqrt(32)
    out, _ = ops.attention(q, k, v, scale=scale, window_right=0, backend=name)
    dout = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    for idx in (0, 1, max(batch, heads) - 1):  # the first and the last (b, h) of the grid
        sl = (slice(idx, idx + 1), slice(None), slice(None)) if batch > 1 else (slice(None), slice(None),
                                                                               slice(idx, idx + 1))
        q1, k1, v1 = (t[sl].detach().double().requires_grad_() for t in (q, k, v))
        ref, _ = attention_ref(q1, k1, v1, scale=scale, window_right=0)
        torch.testing.assert_close(out[sl].double(), ref, atol=5e-3, rtol=0)
        grads = torch.autograd.grad(ref, (q1, k1, v1), dout[sl].double())
        for got, want in zip((dq[sl], dk[sl], dv[sl]), grads):
            torch.testing.assert_close(got.double(), want, atol=2e-2, rtol=0)


def _capture(fn):
    """A CUDA graph of ``fn()`` (warmed up on a side stream first) and its output."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = fn()
    return graph, result


@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_dropout_graph_replays_draw_new_masks(name):
    _backend(name, dropout_p=0.3, head_dim=64)
    B, S, H, D, p = 2, 96, 2, 64, 0.3
    g = torch.Generator(device=DEV).manual_seed(1)
    q, k, v = (torch.randn(B, S, H, D, device=DEV, generator=g, dtype=torch.float16) for _ in range(3))
    scale = 1 / math.sqrt(D)

    def step():
        rng = ops.dropout_rng_state(q.device)
        out, _ = ops.attn_fwd(*ops.fwd_args(q, k, v, scale=scale, dropout_p=p, rng_state=rng, backend=name))
        return out, rng

    graph, (out, rng) = _capture(step)
    seen = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        state = rng.clone()
        keep = ops.dropout_keep_mask(state, B, H, S, S, p, backend=name, device=DEV)
        # This replay's output is attention with the mask of the state it drew.
        _ref_check(out, q, k, v, scale, 2e-2, dropout_p=p, dropout_mask=keep)
        seen.append((state.cpu(), out.clone()))
    assert not torch.equal(seen[0][0], seen[1][0]) and not torch.equal(seen[1][0], seen[2][0])
    assert not torch.equal(seen[0][1], seen[1][1])

    # The public API under capture: two replays, two different outputs.
    graph2, out2 = _capture(lambda: flashattn_py.flash_attn_func(q, k, v, dropout_p=p, backend=name))
    graph2.replay()
    first = out2.clone()
    graph2.replay()
    assert not torch.equal(first, out2)


@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_b1_h1_views_with_odd_strides(name):
    _backend(name, head_dim=64, backward=True)
    S, D = 130, 64
    span = S * D + 8  # a multiple of 8 fp16 elements: every view starts 16-byte aligned
    g = torch.Generator(device=DEV).manual_seed(2)
    base = torch.randn(8 + 3 * span, device=DEV, generator=g, dtype=torch.float16).requires_grad_()
    # (1, S, 1, D) views, row stride D, batch / head strides odd (never used: size-1 dims).
    q, k, v = (base.as_strided((1, S, 1, D), (span + 5, D, 7, 1), 8 + i * span) for i in range(3))
    assert all(t.data_ptr() % 16 == 0 for t in (q, k, v))
    scale = 1 / math.sqrt(D)
    out, _ = ops.attention(q, k, v, scale=scale, window_right=0, diag_offset=0, backend=name)
    _ref_check(out, q, k, v, scale, 5e-3, window_right=0)
    dout = torch.randn(out.shape, device=DEV, generator=g, dtype=out.dtype)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, _ = attention_ref(*leaves, scale=scale, window_right=0)
    ref.backward(dout.double())
    for got, leaf in zip(grads, leaves):
        torch.testing.assert_close(got.double(), leaf.grad, atol=2e-2, rtol=0)


@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_decode_step_replays_in_a_cuda_graph(name, paged):
    # Captured once; each replay gets new q / k / v and longer caches written into the
    # captured tensors in place, and must equal the eager call on the same state, its
    # append included (a length read on the host at capture would be baked into the graph),
    # and both the append and the attention written out here (a wrong write that the
    # graph and the eager call shared would pass the first comparison).
    _backend(name, head_dim=64)
    batch, slots, hq, hk, d, page = 3, 96, 8, 2, 64, 16
    g = torch.Generator(device=DEV).manual_seed(3)

    def rnd(*shape):
        return torch.randn(*shape, device=DEV, generator=g, dtype=torch.float16)

    if paged:
        k_cache, v_cache = rnd(batch * slots // page, page, hk, d), rnd(batch * slots // page, page, hk, d)
        table = torch.randperm(batch * slots // page, device=DEV, generator=g).to(torch.int32).view(batch, -1)
    else:
        k_cache, v_cache, table = rnd(batch, slots, hk, d), rnd(batch, slots, hk, d), None
    q, k, v = rnd(batch, 1, hq, d), rnd(batch, 1, hk, d), rnd(batch, 1, hk, d)
    lens = torch.tensor([0, 40, 71], dtype=torch.int32, device=DEV)

    def step(k_cache=k_cache, v_cache=v_cache):
        return flashattn_py.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lens,
                                                   block_table=table, causal=True, backend=name)

    def where(b, j):  # cache index of sequence b's key slot j (a tensor of slots)
        if paged:
            return table[b, j // page].long(), j % page
        return torch.full_like(j, b), j

    with torch.no_grad():
        graph, out = _capture(step)
        for i in range(3):
            for t in (q, k, v):
                t.copy_(rnd(*t.shape))
            lens.add_(i + 1)
            k_want, v_want = k_cache.clone(), v_cache.clone()
            k_exp, v_exp = k_cache.clone(), v_cache.clone()
            for b in range(batch):  # the new key of sequence b at slot lens[b]
                slot = lens[b:b + 1].long()
                k_exp[where(b, slot)], v_exp[where(b, slot)] = k[b], v[b]
            graph.replay()
            want = step(k_want, v_want)
            torch.cuda.synchronize()
            assert torch.equal(out, want)
            assert torch.equal(k_cache, k_want) and torch.equal(v_cache, v_want)
            assert torch.equal(k_cache, k_exp) and torch.equal(v_cache, v_exp)
            for b in range(batch):  # one query over the sequence's lens[b] + 1 keys
                j = torch.arange(int(lens[b]) + 1, device=DEV)
                keys, values = k_exp[where(b, j)].unsqueeze(0), v_exp[where(b, j)].unsqueeze(0)
                _ref_check(out[b:b + 1], q[b:b + 1], keys, values, 1 / math.sqrt(d), 5e-3)

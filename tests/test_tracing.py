"""The public functions under the tracers other than torch.compile's usual path: make_fx in
fake / symbolic mode, torch.export with dynamic sizes, torch.jit.trace, and compiled
calls whose Python arguments turn symbolic (a decode loop's int cache length, sizes that
ALiBi slopes or modules' warnings see). Each case failed or recompiled before its fix."""
from __future__ import annotations

import math

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import flashattn_py
import flashattn_py.nn as fnn


@pytest.mark.parametrize("mode", ["fake", "symbolic"])
def test_make_fx_records_packed_and_cache_calls(mode):
    # (their index checks read values; under fake tensors they become ops of the graph)
    cu = torch.tensor([0, 4, 13, 16], dtype=torch.int32)
    q = torch.randn(16, 2, 16)
    traced = make_fx(lambda q, cu: flashattn_py.flash_attn_varlen_func(q, q, q, cu, cu, 9, 9, causal=True),
                     tracing_mode=mode)(q, cu)
    assert "flashattn.check_packed" in traced.code
    torch.testing.assert_close(traced(q, cu), flashattn_py.flash_attn_varlen_func(q, q, q, cu, cu, 9, 9, causal=True))
    q1, cache, lens = torch.randn(2, 1, 2, 16), torch.randn(2, 10, 2, 16), torch.tensor([3, 5], dtype=torch.int32)
    with torch.no_grad():
        traced = make_fx(lambda q, c, n: flashattn_py.flash_attn_with_kvcache(q, c, c, cache_seqlens=n),
                         tracing_mode=mode)(q1, cache, lens)
        torch.testing.assert_close(traced(q1, cache, lens),
                                   flashattn_py.flash_attn_with_kvcache(q1, cache, cache, cache_seqlens=lens))


def test_block_primitive_with_symbolic_sizes():
    # attention_forward's default diag_offset (Sk - Sq) stays symbolic: traced at (5, 9), run
    # at (7, 20) (was specialised: wrong there), and export with dynamic lengths.
    def block(q, k):
        return flashattn_py.attention_forward(q, k, k, causal=True)[0]

    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 5, 2, 16, generator=gen), torch.randn(1, 9, 2, 16, generator=gen)
    traced = make_fx(block, tracing_mode="symbolic")(q, k)
    q2, k2 = torch.randn(1, 7, 2, 16, generator=gen), torch.randn(1, 20, 2, 16, generator=gen)
    torch.testing.assert_close(traced(q2, k2), block(q2, k2))

    class Block(torch.nn.Module):
        def forward(self, q, k):
            return block(q, k)

    sq, sk = torch.export.Dim("sq", min=2, max=64), torch.export.Dim("sk", min=2, max=64)
    ep = torch.export.export(Block(), (q, k), dynamic_shapes={"q": {1: sq}, "k": {1: sk}})
    torch.testing.assert_close(ep.module()(q2, k2), block(q2, k2))


def test_jit_trace_under_no_grad_keeps_the_gradients():
    # A trace under no_grad recorded the kernel without autograd: the traced module then
    # trained without the attention's gradients (the projection's came out None).
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(16, 16)

        def forward(self, x):
            q = self.lin(x).view(1, 5, 2, 8)
            return flashattn_py.flash_attn_func(q, q, q, causal=True)

    model, x = Model(), torch.randn(1, 5, 16)
    with torch.no_grad():
        traced = torch.jit.trace(model, (x,), check_trace=False)
    traced(x).square().sum().backward()
    assert model.lin.weight.grad is not None
    got = model.lin.weight.grad.clone()
    model.lin.weight.grad = None
    model(x).square().sum().backward()
    torch.testing.assert_close(got, model.lin.weight.grad)



def test_jit_trace_keeps_the_index_value_checks():
    # Under torch.jit.trace the value checks ran once, at trace time, and were not in the
    # trace: a traced decode step then overflowed its cache silently (one of three new keys
    # written) and a traced packed call took documents longer than its max_seqlen (0.81 off).
    import warnings

    H, D = 2, 8

    def step(q, k_cache, v_cache, k, v, lengths):
        return flashattn_py.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=lengths,
                                                    causal=True)

    def cache_args(new, held):
        return (torch.randn(1, new, H, D), torch.zeros(1, 8, H, D), torch.zeros(1, 8, H, D),
                torch.randn(1, new, H, D), torch.randn(1, new, H, D), torch.tensor([held], dtype=torch.int32))

    def attend(q, k, v, cu):
        return flashattn_py.flash_attn_varlen_func(q, k, v, cu, cu, q.shape[0], q.shape[0], causal=True)

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # (TracerWarnings)
        traced_step = torch.jit.trace(step, cache_args(3, 0), check_trace=False)  # (S_new: a constant of the trace)
        traced_attend = torch.jit.trace(attend, (*(torch.randn(20, H, D) for _ in range(3)),
                                                 torch.tensor([0, 5, 12, 20], dtype=torch.int32)), check_trace=False)
        args = cache_args(3, 7)  # (errors come wrapped in TorchScript's RuntimeError)
        with pytest.raises((ValueError, RuntimeError), match="cache_seqlens: entry 0 holds 7 keys"):
            traced_step(*args)
        assert not args[1].any()
        q, k, v = (torch.randn(77, H, D) for _ in range(3))
        # (the total and max_seqlen are constants of the trace: either check refuses)
        with pytest.raises((ValueError, RuntimeError), match="cu_seqlens_q: must rise|max_seqlen_q: 20 is below"):
            traced_attend(q, k, v, torch.tensor([0, 30, 31, 40, 50, 77], dtype=torch.int32))
        with pytest.raises((ValueError, RuntimeError), match="cache_seqlens: entry 0 is negative"):
            traced_step(*cache_args(3, -1))
        good = cache_args(3, 2)
        want = step(*(t.clone() for t in good))
        torch.testing.assert_close(traced_step(*good), want)

def test_compiled_decode_loop_with_an_int_cache_length_compiles_once(compiled_graphs):
    @torch.compile(backend=compiled_graphs.backend, fullgraph=True, dynamic=True)
    def step(q, k_cache, v_cache, k, v, n):
        return flashattn_py.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=n, causal=True)

    cache = torch.zeros(2, 64, 2, 16), torch.zeros(2, 64, 2, 16)
    eager = torch.zeros(2, 64, 2, 16), torch.zeros(2, 64, 2, 16)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n in range(6):
            q, k, v = (torch.randn(2, 1, h, 16, generator=gen) for h in (4, 2, 2))
            got = step(q, *cache, k, v, n)
            want = flashattn_py.flash_attn_with_kvcache(q, *eager, k, v, cache_seqlens=n, causal=True)
            torch.testing.assert_close(got, want)
    assert torch.equal(cache[0], eager[0]) and torch.equal(cache[1], eager[1])
    assert len(compiled_graphs) <= 2, f"compiled {len(compiled_graphs)} graphs"  # (0 / 1, then any n)


def test_compiled_alibi_slopes_from_symbolic_head_counts():
    torch._dynamo.reset()

    def f(q, k):
        return flashattn_py.flash_attn_func(q, k, k, causal=True, alibi_slopes=torch.linspace(0.1, 1, q.shape[2]))

    q, k = torch.randn(2, 5, 4, 16), torch.randn(2, 9, 2, 16)
    torch.testing.assert_close(torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=True)(q, k), f(q, k))


def test_compiled_multihead_attention_with_need_weights():
    torch._dynamo.reset()
    mha = fnn.MultiheadAttention(32, 4, batch_first=True)
    x = torch.randn(2, 5, 32)
    fnn._warned_need_weights = False  # (the first call warns; Dynamo cannot trace the warning)
    got = torch.compile(lambda x: mha(x, x, x), backend="aot_eager", fullgraph=True)(x)
    want = mha(x, x, x)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


# --- the same on a GPU (benchmarks/gpu_check.sh runs -m gpu), each backend that serves ----


def _gpu_backends():
    from devices import has_cuda_kernels

    marks = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
    return [pytest.param("cuda", marks=marks + [pytest.mark.skipif(not has_cuda_kernels(),
                                                                     reason="needs the compiled CUDA ops")]),
            pytest.param("triton", marks=marks)]


@pytest.mark.parametrize("backend", _gpu_backends())
def test_gpu_compiled_lengths_without_recompiles_or_host_reads(backend, compiled_graphs, monkeypatch):
    # diag_offset (Sk - Sq) symbolic: one graph for four length pairs, fwd + grads. Packed
    # offsets on the GPU are not read while tracing (no check op in the graph, nothing
    # syncs), unless FLASHATTN_CHECK_INPUTS=1 asks: then the graph checks them as it runs.
    @torch.compile(backend=compiled_graphs.backend, fullgraph=True, dynamic=True)
    def step(q, k, v):
        return flashattn_py.flash_attn_func(q, k, v, causal=True, window_size=(6, 0), backend=backend)

    gen = torch.Generator().manual_seed(0)
    for sq, sk in ((5, 9), (7, 20), (12, 13), (3, 31)):
        q = torch.randn(2, sq, 2, 64, generator=gen).to("cuda", torch.float16).requires_grad_()
        k, v = (torch.randn(2, sk, 2, 64, generator=gen).to("cuda", torch.float16).requires_grad_() for _ in range(2))
        out = step(q, k, v)
        got = torch.autograd.grad(out.float().sum(), (q, k, v))
        want_out = flashattn_py.flash_attn_func(q, k, v, causal=True, window_size=(6, 0), backend=backend)
        want = torch.autograd.grad(want_out.float().sum(), (q, k, v))
        torch.testing.assert_close(out, want_out)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)
    assert len(compiled_graphs) == 1, f"compiled {len(compiled_graphs)} graphs"

    q = torch.randn(9, 2, 64, generator=gen).to("cuda", torch.float16)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device="cuda")

    def packed(q, cu, max_k):
        return flashattn_py.flash_attn_varlen_func(q, q, q, cu, cu, 5, max_k, causal=True, backend=backend)

    for check in ("0", "1"):
        monkeypatch.setenv("FLASHATTN_CHECK_INPUTS", check)
        torch._dynamo.reset()
        traced = make_fx(packed, tracing_mode="fake")(q, cu, 5)
        assert ("flashattn.check_packed" in traced.code) == (check == "1")
        compiled = torch.compile(packed, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(q, cu, 5), packed(q, cu, 5))
    with pytest.raises(ValueError, match="max_seqlen_k: 2 is below the longest sequence"):
        compiled(q, cu, 2)


@pytest.mark.parametrize("backend", _gpu_backends())
def test_gpu_strides_of_size_one_dims(backend):
    # A one-row k / v from a transpose and a head dim of 1 with another stride (torch calls
    # them contiguous): copied to the layout the kernels read (ops.kernel_rows).
    gen = torch.Generator().manual_seed(11)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to("cuda", torch.float16)

    cases = ((rand(2, 3, 5, 64), rand(2, 3, 64, 1).transpose(-1, -2), rand(2, 3, 64, 1).transpose(-1, -2)),
             (rand(2, 3, 64, 1).transpose(-1, -2), rand(2, 3, 7, 64), rand(2, 3, 7, 64)))
    def formula(q, k, v):  # (the naive formula in the inputs' dtype: the project's rule)
        return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v

    for q, k, v in cases:
        assert min(t.stride(-2) for t in (q, k, v)) < q.shape[-1]
        with flashattn_py.use_backend(backend):
            got = flashattn_py.scaled_dot_product_attention(q, k, v)
        want, naive = formula(q.double(), k.double(), v.double()), formula(q, k, v)
        assert (got.double() - want).abs().max() <= 2 * (naive.double() - want).abs().max() + 1e-6

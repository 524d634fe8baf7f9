"""torch.compile(fullgraph=True) and torch.export on models that use flashattn_py.

Fast tests compile with the "aot_eager" backend (dynamo + AOTAutograd: graph capture, fake
tensors and the backward graph, without inductor's code generation); the inductor versions
are marked slow (CPU inductor compiles take minutes on 2 cores).
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch._dynamo.utils import counters

import flashattn_py
import flashattn_py.nn as fnn
from flashattn_py.patch import patch_sdpa, unpatch_sdpa
from test_patch import GPTBlock


def _compile_and_compare(fn, params, *inputs, backend="aot_eager", atol=1e-5, rtol=1e-4):
    """Compile ``fn`` with fullgraph=True, check no graph break, and compare forward and the
    gradients of ``params`` and floating ``inputs`` against eager."""
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    leaves = [x for x in inputs if x.is_floating_point()] + list(params)

    def run(f):
        for t in leaves:
            t.grad = None
        out = f(*inputs)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(0)))
        return out.detach(), [t.grad.clone() for t in leaves]

    got, got_grads = run(compiled)
    assert dict(counters["graph_break"]) == {}, f"graph breaks: {dict(counters['graph_break'])}"
    assert counters["stats"]["unique_graphs"] == 1
    want, want_grads = run(fn)
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol)


def _gpt_block_case():
    torch.manual_seed(0)
    block = GPTBlock()
    x = torch.randn(2, 17, 32, requires_grad=True)
    return block, x


def test_gpt_block_patched_compiles_fullgraph():
    block, x = _gpt_block_case()
    try:
        with patch_sdpa():
            _compile_and_compare(block, block.parameters(), x)
    finally:
        unpatch_sdpa()


def test_multihead_attention_compiles_fullgraph():
    torch.manual_seed(0)
    mha = fnn.MultiheadAttention(32, 4, batch_first=True)
    x = torch.randn(2, 9, 32, requires_grad=True)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1, -3:] = True

    def fn(x):
        return mha(x, x, x, key_padding_mask=pad, need_weights=False)[0]

    _compile_and_compare(fn, mha.parameters(), x)


class _FlashBlock(torch.nn.Module):
    """A module calling flash_attn_func (flash-attn layout), for export."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).unbind(2)
        a = flashattn_py.flash_attn_func(q, k, v, causal=True, window_size=(5, 0))
        return self.out(a.reshape(b, s, d))


def test_export_flash_attn_func_module():
    torch.manual_seed(0)
    model = _FlashBlock().eval()
    x = torch.randn(2, 13, 32)
    ep = torch.export.export(model, (x,))
    assert "flashattn.attn_fwd" in ep.graph_module.code
    x2 = torch.randn(2, 13, 32)
    torch.testing.assert_close(ep.module()(x2), model(x2))
    # A dynamic sequence length: the program runs at another length.
    seq = torch.export.Dim("seq", min=2, max=128)
    ep_dyn = torch.export.export(model, (x,), dynamic_shapes={"x": {1: seq}})
    x3 = torch.randn(2, 29, 32)
    torch.testing.assert_close(ep_dyn.module()(x3), model(x3))


def test_compile_dynamic_query_and_key_lengths_without_recompiles(compiled_graphs):
    # A bottom-right causal call's diagonal offset is Sk - Sq: an int argument of the op
    # would make each difference a new graph (a guard on it); as SymInt it stays symbolic.
    @torch.compile(backend=compiled_graphs.backend, fullgraph=True, dynamic=True)
    def step(q, k, v):
        return flashattn_py.flash_attn_func(q, k, v, causal=True, window_size=(6, 0))

    gen = torch.Generator().manual_seed(0)
    # (distinct lengths from the first call on: equal ones would be duck-sized together)
    for sq, sk in ((5, 9), (7, 20), (12, 13), (3, 31)):
        q = torch.randn(2, sq, 2, 16, generator=gen, requires_grad=True)
        k, v = (torch.randn(2, sk, 2, 16, generator=gen, requires_grad=True) for _ in range(2))
        out = step(q, k, v)
        out.sum().backward()
        grads = [t.grad for t in (q, k, v)]
        for t in (q, k, v):
            t.grad = None
        want = flashattn_py.flash_attn_func(q, k, v, causal=True, window_size=(6, 0))
        want.sum().backward()
        torch.testing.assert_close(out, want)
        for g, t in zip(grads, (q, k, v)):
            torch.testing.assert_close(g, t.grad)
    assert len(compiled_graphs) == 1, f"compiled {len(compiled_graphs)} graphs"


@pytest.mark.parametrize("grad", [False, True])
def test_dropout_without_inputs_needing_grad_compiles_fullgraph(compiled_graphs, grad):
    # (the backend choice asked torch.is_inference_mode_enabled, which Dynamo cannot trace)
    q = torch.randn(1, 5, 2, 8)
    step = torch.compile(lambda q: (flashattn_py.flash_attn_func(q, q, q, dropout_p=0.1),
                                    flashattn_py.scaled_dot_product_attention(q, q, q, dropout_p=0.1)),
                         backend=compiled_graphs.backend, fullgraph=True)
    with torch.set_grad_enabled(grad):
        out, out_sdpa = step(q)
    assert out.shape == q.shape and out_sdpa.shape == q.shape and len(compiled_graphs) == 1


def test_use_backend_blocks_of_other_threads_do_not_recompile(compiled_graphs):
    # A compiled call reads its own thread's use_backend blocks: it guarded on the count of
    # every thread's open blocks, recompiling (up to Dynamo's limit) as other threads
    # opened them.
    import threading

    step = torch.compile(lambda q: flashattn_py.scaled_dot_product_attention(q, q, q, is_causal=True),
                         backend=compiled_graphs.backend, fullgraph=True)
    q = torch.randn(1, 2, 8, 8)
    step(q)
    release, holders = threading.Event(), []
    for _ in range(4):
        ready = threading.Event()

        def hold(ready=ready):
            with flashattn_py.use_backend("auto"):
                ready.set()
                release.wait(30)

        holders.append(threading.Thread(target=hold))
        holders[-1].start()
        ready.wait(30)
        step(q)
    release.set()
    for thread in holders:
        thread.join()
    assert len(compiled_graphs) == 1
    with flashattn_py.use_backend("reference"):  # this thread's block still counts
        step(q)
    assert len(compiled_graphs) == 2


def test_reference_backend_compiles_fullgraph_after_eager_calls(compiled_graphs):
    # The reference's entry, bound on its first eager call, was an itemgetter Dynamo cannot
    # call: a compiled reference call after an eager one failed with fullgraph=True.
    q = torch.randn(1, 2, 8, 8, requires_grad=True)
    with flashattn_py.use_backend("reference"):
        want = flashattn_py.scaled_dot_product_attention(q, q, q, is_causal=True)
        want_grad, = torch.autograd.grad(want.sum(), q)
        step = torch.compile(lambda q: flashattn_py.scaled_dot_product_attention(q, q, q, is_causal=True),
                             backend=compiled_graphs.backend, fullgraph=True)
        out = step(q)
        grad, = torch.autograd.grad(out.sum(), q)
        step(q)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(grad, want_grad)
    assert len(compiled_graphs) == 1


@pytest.mark.slow
def test_gpt_block_patched_inductor():
    block, x = _gpt_block_case()
    try:
        with patch_sdpa():
            _compile_and_compare(block, block.parameters(), x, backend="inductor")
    finally:
        unpatch_sdpa()


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    from flashattn_py.integrations.transformers import register

    name = register()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg)
    model.set_attn_implementation(name)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: the bool mask path

    def fn(ids, mask):
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    return model, fn, ids, mask


def test_tiny_llama_compiles_once_when_its_first_forward_is_compiled(compiled_graphs, monkeypatch):
    # The backend's mask builder looks up (and caches) whether a model type calls its
    # attention through transformers' AttentionInterface: filled while Dynamo traced the
    # first forward, the cache failed the guard Dynamo had put on it, and the next call
    # compiled again; read while tracing, it failed that guard after an eager call filled it.
    from flashattn_py.integrations import transformers as tf_backend

    model, fn, ids, mask = _tiny_llama()
    monkeypatch.setattr(tf_backend, "_routes_attention", {})  # this process's first llama forward
    step = torch.compile(fn, fullgraph=True, dynamic=True, backend=compiled_graphs.backend)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        outs = [step(ids, mask) for _ in range(3)]
        want = fn(ids, mask)  # (eager: fills the cache)
        outs.append(step(ids, mask))
    for out in outs:
        torch.testing.assert_close(out, want)
    assert len(compiled_graphs) == 1, f"compiled {len(compiled_graphs)} graphs"


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_tiny_llama_compiles_fullgraph(backend):
    model, fn, ids, mask = _tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _compile_and_compare(fn, model.parameters(), ids, mask, backend=backend)

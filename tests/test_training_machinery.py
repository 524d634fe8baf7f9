"""The public functions under torch's training machinery: torch.func transforms, vmap inside
an ordinary backward, activation checkpointing with dropout, autocast on the reference,
torch.use_deterministic_algorithms, ALiBi slopes that require grad."""
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import flashattn_py
from flashattn_py import backends, ops

from rule import random_qkv

pytestmark = pytest.mark.skipif(backends.compiled_ops_error() is not None, reason="compiled CPU ops not built")


@pytest.fixture(autouse=True)
def _quiet_vmap_fallback():
    # (torch warns once per op without a batching rule; the op's own fallback is intended)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*batching rule.*")
        yield


def _attention(q, k, v, backend="auto"):
    return flashattn_py.flash_attn_func(q, k, v, causal=True, window_size=(3, 0), softcap=2.0, backend=backend)


def _loss(backend):
    return lambda q, k, v: _attention(q, k, v, backend).square().sum()


def test_vmap_inside_an_ordinary_backward_keeps_the_attention_gradient():
    # A batched tensor says requires_grad False whatever it wraps: the call must still go
    # through the op's autograd (it went to the kernel directly, and the attention's part of
    # the gradient was silently left out).
    q = torch.randn(3, 1, 7, 4, 8, dtype=torch.float64, requires_grad=True)

    def loss(batched):
        if batched:
            att = torch.vmap(lambda x: flashattn_py.flash_attn_func(x, x, x, causal=True))(q)
            sdpa = torch.vmap(lambda x: flashattn_py.scaled_dot_product_attention(x, x, x))(q)
        else:
            att = torch.stack([flashattn_py.flash_attn_func(x, x, x, causal=True) for x in q])
            sdpa = torch.stack([flashattn_py.scaled_dot_product_attention(x, x, x) for x in q])
        return att.square().sum() + sdpa.sin().sum() + q.sum()

    batched, = torch.autograd.grad(loss(True), q)
    looped, = torch.autograd.grad(loss(False), q)
    torch.testing.assert_close(batched, looped, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("transform", ["grad", "vjp", "jacrev", "vmap_grad"])
def test_torch_func_transforms_match_the_reference(transform):
    q, k, v = random_qkv(2, 5, 6, 4, 2, 8, dtype=torch.float64, seed=3)
    ours, ref = _loss("auto"), _loss("reference")
    if transform == "grad":
        got, want = (torch.func.grad(f, argnums=(0, 1, 2))(q, k, v) for f in (ours, ref))
    elif transform == "vjp":
        got, want = (torch.func.vjp(lambda q, k, v, f=f: _attention(q, k, v, f), q, k, v)[1](torch.ones_like(q))
                     for f in ("auto", "reference"))
    elif transform == "jacrev":
        got, want = ((torch.func.jacrev(lambda q, b=b: _attention(q, k, v, b).sum(dim=(2, 3)))(q),)
                     for b in ("auto", "reference"))
    else:
        qs = torch.stack([q, 2 * q, -q])
        got = (torch.vmap(torch.func.grad(ours), in_dims=(0, None, None))(qs, k, v),)
        want = (torch.stack([torch.func.grad(ref)(x, k, v) for x in qs]),)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_torch_func_second_derivative_raises():
    q, k, v = random_qkv(1, 4, 4, 2, 2, 8, dtype=torch.float64, seed=4)
    with pytest.raises(RuntimeError, match="not differentiable"):
        torch.func.grad(lambda q: torch.func.grad(_loss("auto"))(q, k, v).sum())(q)


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_reentrant_checkpoint_selects_for_both_passes_alike(dropout_p, monkeypatch):
    # The checkpointed forward runs under no_grad on q, k, v made inside the block, its
    # recomputation with grad: with dropout, both must ask for the same backend (two
    # backends draw different dropout masks), so the selection sees a backward in both.
    from torch.utils.checkpoint import checkpoint

    problems = []
    select = backends.select

    def recording(problem, backend="auto"):
        problems.append(problem.backward)
        return select(problem, backend)

    monkeypatch.setattr(backends, "select", recording)
    x = torch.randn(1, 6, 16, requires_grad=True)
    proj = torch.nn.Linear(16, 48)

    def block(x):
        q, k, v = proj(x).view(1, 6, 3, 2, 8).unbind(2)
        return flashattn_py.flash_attn_func(q, k, v, dropout_p=dropout_p, causal=True)

    checkpoint(block, x, use_reentrant=True).sum().backward()
    assert problems == ([True, True] if dropout_p else [False, True])


class _RecordDeterministic(TorchDispatchMode):
    """The ``deterministic`` argument of every attn_fwd / attn_bwd call."""

    def __init__(self):
        super().__init__()
        self.deterministic = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (ops.attn_fwd, ops.attn_bwd):
            spec = ops.FWD if func is ops.attn_fwd else ops.BWD
            self.deterministic.append(args[spec.index["deterministic"]])
        return func(*args, **(kwargs or {}))


def test_use_deterministic_algorithms_makes_calls_deterministic():
    # Every entry, the context-parallel ones (one gloo rank) and their backwards included.
    import torch.distributed as dist
    from flashattn_py.distributed import ring_flash_attn_func, ulysses_flash_attn_func

    q, k, v = (t.requires_grad_() for t in random_qkv(1, 6, 6, 2, 2, 8, seed=5))
    calls = [lambda: flashattn_py.flash_attn_func(q, k, v),
             lambda: flashattn_py.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                               v.transpose(1, 2)),
             lambda: ring_flash_attn_func(q, k, v, causal=True),
             lambda: ulysses_flash_attn_func(q, k, v, causal=True)]
    previous = torch.are_deterministic_algorithms_enabled()
    if dist.is_initialized():
        pytest.skip("a process group is already set up")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for flag in (False, True):
            torch.use_deterministic_algorithms(flag)
            with _RecordDeterministic() as record:
                for call in calls:
                    call().sum().backward()
            assert record.deterministic == [flag] * 2 * len(calls)
    finally:
        torch.use_deterministic_algorithms(previous)
        dist.destroy_process_group()


def test_reference_under_autocast_computes_in_the_given_dtype():
    # flash_attn_func takes the dtype it is given on every backend; the reference's plain
    # torch ops would otherwise run in autocast's dtype.
    q, k, v = random_qkv(1, 9, 9, 2, 2, 16, seed=6)
    expected = flashattn_py.flash_attn_func(q, k, v, causal=True, backend="reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = flashattn_py.flash_attn_func(q, k, v, causal=True, backend="reference")
        fused = flashattn_py.flash_attn_func(q, k, v, causal=True)
        probs = flashattn_py.flash_attn_func(q, k, v, dropout_p=0.5, causal=True, return_attn_probs=True)[2]
    assert out.dtype == fused.dtype == probs.dtype == torch.float32
    assert torch.equal(out, expected)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_alibi_slopes_get_no_gradient_on_any_backend(backend):
    q, k, v = (t.requires_grad_() for t in random_qkv(1, 6, 6, 2, 2, 8, seed=7))
    slopes = torch.rand(2, requires_grad=True)
    flashattn_py.flash_attn_func(q, k, v, alibi_slopes=slopes, backend=backend).sum().backward()
    assert slopes.grad is None and q.grad is not None

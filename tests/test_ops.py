"""Custom ops: torch.library.opcheck, and torch.compile(fullgraph=True) without graph breaks."""
import pytest
import torch

import flashattn_py
from flashattn_py import backends, ops

from op_args import dense_tail
from rule import random_qkv

pytestmark = pytest.mark.skipif(backends.compiled_ops_error() is not None, reason="compiled CPU ops not built")

# The CPU backend's eager inference entry (csrc/ops.cpp's flashattn::fwd_inference op).
CPU_FWD_INFERENCE = backends.BACKENDS["cpu"].inference() if backends.compiled_ops_error() is None else None


def fwd_args(dtype=torch.float32, alibi=False):
    q, k, v = random_qkv(2, 19, 23, 4, 2, 16, dtype=dtype, seed=1)
    slopes = torch.rand(4) if alibi else None
    return ops.fwd_args(q, k, v, alibi_slopes=slopes, scale=0.25, window_right=0, diag_offset=4, backend="cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_opcheck_attn_fwd(dtype):
    torch.library.opcheck(ops.attn_fwd, fwd_args(dtype, alibi=dtype == torch.float32))


def test_opcheck_attn_bwd():
    args = fwd_args()
    out, lse = ops.attn_fwd(*args)
    q, k, v = (t.detach() for t in args[:3])
    options = dict(zip(ops.FWD.names[3:], args[3:]))  # the forward's, backend included
    torch.library.opcheck(ops.attn_bwd, ops.bwd_args(torch.randn_like(out), q, k, v, out.detach(), lse.detach(),
                                                     **options))


def test_opcheck_with_bias_and_dropout():
    q, k, v = random_qkv(1, 9, 11, 2, 1, 8, seed=2)
    bias = torch.randn(1, 1, 9, 11).expand(1, 2, 9, 11).requires_grad_()
    rng = ops.dropout_rng_state()
    torch.library.opcheck(ops.attn_fwd, ops.fwd_args(q, k, v, attn_bias=bias, scale=0.3, diag_offset=2, dropout_p=0.2,
                                                     rng_state=rng, backend="cpu"))


def test_opcheck_compiled_ops():
    q, k, v, *_ = fwd_args()
    args = (q.detach(), k.detach(), v.detach(), None, None, 0.25, 0.0, -1, -1, 4, 0.0, None, *dense_tail())
    torch.library.opcheck(torch.ops.flashattn.fwd.default, args)
    out, lse = torch.ops.flashattn.fwd(*args)
    torch.library.opcheck(torch.ops.flashattn.bwd.default,
                          (torch.randn_like(out), *args[:3], out, lse, *args[3:], False, False))
    # packed sequences: (1, total, H, D) with offsets
    cu = torch.tensor([0, 5, 5, 12], dtype=torch.int32)
    packed = (q.detach()[:1, :12], k.detach()[:1, :12], v.detach()[:1, :12], None, None, 0.25, 0.0, -1, 0, 0, 0.0,
              None, cu, cu, None, None, 7, 7, True, *dense_tail()[7:])
    torch.library.opcheck(torch.ops.flashattn.fwd.default, packed)
    out, lse = torch.ops.flashattn.fwd(*packed)
    torch.library.opcheck(torch.ops.flashattn.bwd.default,
                          (torch.randn_like(out), *packed[:3], out, lse, *packed[3:], False, False))
    torch.library.opcheck(torch.ops.flashattn.dropout_mask.default, (ops.dropout_rng_state(), 1, 2, 5, 7, 0.3))


def test_compile_fullgraph_matches_eager():
    def block(q, k, v):
        return flashattn_py.flash_attn_func(q * 2, k, v, causal=True, window_size=(7, 0)).sum(dim=-1)

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    q, k, v = random_qkv(1, 33, 33, 2, 1, 16, seed=4)
    eager_out = block(q, k, v)
    eager_out.sum().backward()
    eager_grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    out = compiled(q, k, v)
    out.sum().backward()
    torch.testing.assert_close(out, eager_out)
    for got, want in zip((q.grad, k.grad, v.grad), eager_grads):
        torch.testing.assert_close(got, want)


def test_compile_inductor_sdpa_fullgraph():
    def fn(q, k, v):
        return flashattn_py.scaled_dot_product_attention(q, k, v, is_causal=True)

    torch._dynamo.reset()
    q, k, v = (torch.randn(1, 2, 17, 8) for _ in range(3))
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(q, k, v), fn(q, k, v))


def test_first_call_does_not_import_dynamo():
    # torch.library.custom_op would import torch._dynamo on the first call (~2.5 s, ~150 MB
    # resident); our ops import it only if the user already did (ops._outside_dynamo).
    import subprocess
    import sys

    script = (
        "import sys, torch, flashattn_py\n"
        "q = torch.randn(1, 33, 2, 16, requires_grad=True)\n"
        "flashattn_py.flash_attn_func(q, q, q, causal=True).sum().backward()\n"
        "flashattn_py.scaled_dot_product_attention(q.transpose(1, 2), q.transpose(1, 2), q.transpose(1, 2))\n"
        "assert q.grad is not None and q.grad.isfinite().all()\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "False"


def test_inference_calls_stay_visible_to_fake_mode_and_make_fx():
    # Eager no-grad calls skip the autograd op layer, but fake tensors and dispatch modes
    # must still reach flashattn::attn_fwd (its fake impl, one graph node).
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    with FakeTensorMode(), torch.no_grad():
        q = torch.randn(1, 9, 2, 16)
        out = flashattn_py.flash_attn_func(q, q, q, causal=True)
    assert isinstance(out, FakeTensor) and out.shape == (1, 9, 2, 16)

    def f(x):
        with torch.no_grad():
            return flashattn_py.flash_attn_func(x, x, x)

    assert "flashattn.attn_fwd" in make_fx(f)(torch.randn(1, 9, 2, 16)).code


def _op_path(q, k, v, slopes, bias, scale, softcap, left, right, offset, dropout_p, rng):
    return ops.attn_fwd(*ops.fwd_args(q, k, v, alibi_slopes=slopes, attn_bias=bias, scale=scale, softcap=softcap,
                                      window_left=left, window_right=right, diag_offset=offset, dropout_p=dropout_p,
                                      rng_state=rng, backend="cpu"))


@pytest.mark.parametrize("heads_first", [False, True])
@pytest.mark.parametrize("case", ["plain", "gqa_causal_alibi", "bias_dropout", "strided_last_dim"])
def test_inference_entry_matches_the_op(case, heads_first):
    # Eager no-grad CPU calls go to flashattn::fwd_inference (ops.attention), skipping the
    # autograd op and taking SDPA's (B, H, S, D) layout directly: the very same kernel, so
    # bit-for-bit the op.
    q, k, v = (t.detach() for t in random_qkv(2, 13, 21, 4, 2 if case == "gqa_causal_alibi" else 4, 24, 20, seed=3))
    slopes = torch.rand(2, 4) if case == "gqa_causal_alibi" else None
    right = 0 if case == "gqa_causal_alibi" else -1
    bias = torch.randn(1, 4, 13, 21).expand(2, 4, 13, 21) if case == "bias_dropout" else None
    dropout_p = 0.3 if case == "bias_dropout" else 0.0
    rng = ops.dropout_rng_state() if dropout_p else None
    if case == "strided_last_dim":  # not read in place: copied before the kernel
        q = torch.randn(2, 13, 4, 48)[..., ::2]
    want_out, want_lse = _op_path(q.contiguous(), k, v, slopes, bias, 0.3, 0.0, -1, right, 8, dropout_p, rng)
    args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)) if heads_first else (q, k, v)
    out, lse = CPU_FWD_INFERENCE(*args, slopes, bias, 0.3, 0.0, -1, right, 8, dropout_p, rng, heads_first)
    if heads_first:
        assert out.shape == (2, 4, 13, 20)
        out = out.transpose(1, 2)
    assert out.shape == want_out.shape and out.stride() == want_out.stride()
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)


def test_inference_calls_take_the_entry_and_stay_visible_to_the_profiler(monkeypatch):
    calls = []
    entry = CPU_FWD_INFERENCE
    monkeypatch.setitem(ops._inference, "cpu", lambda *args: calls.append(args[-1]) or entry(*args))
    q, k, v = (torch.randn(2, 3, 9, 16) for _ in range(3))
    with torch.no_grad(), torch.profiler.profile() as prof:
        out = flashattn_py.scaled_dot_product_attention(q, k, v, is_causal=True)
        flashattn_py.flash_attn_func(q, k, v)
    assert calls == [True, False]  # SDPA's layout as is; flash-attn's
    assert "flashattn::fwd_inference" in [e.key for e in prof.key_averages()]
    # Calls that need gradients keep the autograd op: the same kernel, the same result.
    q.requires_grad_()
    with_grad = flashattn_py.scaled_dot_product_attention(q, k, v, is_causal=True)
    with_grad.sum().backward()
    assert len(calls) == 2 and q.grad is not None
    assert torch.equal(out, with_grad.detach())


def test_inference_entry_argument_errors():
    q = torch.randn(1, 5, 2, 8)
    # (torch.ops' argument parsing, and the stable ABI's checks, raise RuntimeError)
    with pytest.raises(RuntimeError, match="Expected a value of type 'Tensor' for argument 'v'"):
        CPU_FWD_INFERENCE(q, q, "v", None, None, 0.3, 0.0, -1, -1, 0, 0.0, None, False)
    with pytest.raises(RuntimeError, match="head dims differ"):
        CPU_FWD_INFERENCE(q, q[..., :4], q, None, None, 0.3, 0.0, -1, -1, 0, 0.0, None, False)


def test_vmap_and_jit_trace_without_grad_go_through_the_dispatcher():
    # Under torch.vmap tensors are plain Tensors without storage, and torch.jit.trace
    # records dispatcher calls: the inference entry must not take these calls, and a trace
    # records the op with its autograd (tests/test_tracing.py), not the kernel below it.
    q = torch.randn(3, 1, 2, 5, 8)

    def f(x):
        return flashattn_py.scaled_dot_product_attention(x, x, x, is_causal=True)

    with torch.no_grad():
        out = torch.vmap(f)(q)
        assert torch.equal(out, torch.stack([f(x) for x in q]))
        traced = torch.jit.trace(f, (q[0],), check_trace=False)
    assert "flashattn::attn_fwd" in str(traced.graph)
    assert torch.equal(traced(q[1]), f(q[1]))


def test_torch_function_modes_see_inference_calls():
    from torch.overrides import TorchFunctionMode

    class Record(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    q = torch.randn(1, 2, 5, 8)
    with torch.no_grad(), Record() as record:
        flashattn_py.scaled_dot_product_attention(q, q, q)
    assert any("flashattn.fwd" in name for name in record.names)


@pytest.mark.parametrize("grad", [False, True])
def test_empty_batch_and_sequences(grad):
    # No tasks at all (the key-split rule divided by the task count: a SIGFPE).
    for shapes in (((0, 2, 4, 8), (0, 2, 6, 8)), ((1, 2, 0, 8), (1, 2, 6, 8)), ((1, 2, 4, 8), (1, 2, 0, 8))):
        q = torch.randn(shapes[0], requires_grad=grad)
        k, v = (torch.randn(shapes[1], requires_grad=grad) for _ in range(2))
        with torch.set_grad_enabled(grad):
            out = flashattn_py.scaled_dot_product_attention(q, k, v)
        assert torch.equal(out, torch.zeros_like(q))  # no key seen: zeros (documented)
        if grad:
            out.sum().backward()
            for t in (q, k, v):
                assert torch.equal(t.grad, torch.zeros_like(t))


def test_inference_entry_reads_a_key_broadcast_mask_in_place():
    # A query-padding mask (B, 1, Sq, 1) reaches the kernel expanded over keys (stride 0):
    # it must not be materialised as (B, H, Sq, Sk).
    q = torch.randn(1, 2, 64, 8)
    k, v = torch.randn(1, 2, 4096, 8), torch.randn(1, 2, 4096, 8)
    mask = torch.rand(1, 1, 64, 1) > 0.2
    with torch.no_grad(), torch.profiler.profile(profile_memory=True) as prof:
        out = flashattn_py.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    biggest = max(e.cpu_memory_usage for e in prof.events())
    assert biggest < 2 * 64 * 4096 // 4, biggest  # the expanded bool mask would be 512 KiB
    op_path = flashattn_py.scaled_dot_product_attention(q.requires_grad_(), k, v, attn_mask=mask)
    assert torch.equal(out, op_path.detach())


def test_problem_asks_for_backward_by_requires_grad_not_grad_mode():
    # Reentrant checkpointing runs the forward under no_grad and recomputes it with grad:
    # both must select the same backend (different backends draw different dropout masks).
    q, k, v = (torch.randn(1, 5, 2, 8, requires_grad=True) for _ in range(3))
    with torch.no_grad():
        inside = ops.problem(q, k, v, None, 0.1)
    assert inside == ops.problem(q, k, v, None, 0.1) and inside.backward
    assert not ops.problem(q.detach(), k.detach(), v.detach(), None, 0.0).backward


def test_second_derivative_raises_instead_of_zeros():
    # attn_bwd has no derivative. autograd's fallback for such ops warned and gave zeros
    # (a gradient penalty's attention term silently 0); now differentiating a gradient
    # taken with create_graph=True raises, also beside other terms.
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 5, 2, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    (gq,) = torch.autograd.grad(flashattn_py.flash_attn_func(q, k, v).sum(), q, create_graph=True)
    (want,) = torch.autograd.grad(flashattn_py.flash_attn_func(q, k, v).sum(), q)
    assert gq.requires_grad and torch.equal(gq.detach(), want)  # first order unchanged
    for penalty in ((gq ** 2).sum(), (gq ** 2).sum() + (q ** 2).sum()):
        with pytest.raises(RuntimeError, match="backward is not differentiable"):
            torch.autograd.grad(penalty, (q, k), retain_graph=True)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing(reentrant):
    # Non-reentrant checkpointing lets a backward unpack its saved tensors once.
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 9, 2, 16, generator=gen, requires_grad=True) for _ in range(3))

    def block(q, k, v):
        return flashattn_py.flash_attn_func(q, k, v, causal=True).square().sum()

    torch.utils.checkpoint.checkpoint(block, q, k, v, use_reentrant=reentrant).backward()
    got = [t.grad for t in (q, k, v)]
    want = torch.autograd.grad(block(q, k, v), (q, k, v))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.skipif(backends.compiled_ops_error() is not None, reason="needs the compiled ops")
def test_compiled_ops_take_any_window_sides_and_diagonal():
    # The compiled ops take int64 sides and diagonals as given (the API bounds its own; the
    # ops are callable directly): sides and diagonals near 2**62 or 2**63 overflowed the
    # kernels' position arithmetic (i + diag + right + 1 wrapped: rows lost every key, or
    # saw keys they should not). Each call below equals one with small values and the same
    # visible keys, forward and backward.
    big, i64 = 2**62, 2**63 - 1
    q, k, v = random_qkv(1, 20, 24, 2, 2, 32, seed=5)

    def both(wl, wr, diag):
        args = (q, k, v, None, None, 0.2, 0.0, wl, wr, diag, 0.0, None, *dense_tail())
        out, lse = torch.ops.flashattn.fwd(*args)
        dout = torch.ones_like(out)
        return out, lse, torch.ops.flashattn.bwd(dout, *args[:3], out, lse, *args[3:], False, False)[:3]

    for (wl, wr, diag), same in [
        ((i64, i64, 0), (-1, -1, 0)),
        ((-1, i64, 0), (-1, -1, 0)),
        ((big, big, big), (0, -1, 0)),           # i + 2**62 - 2**62 <= j <= i + 2**63
        ((-1, 0, big), (-1, -1, 0)),             # the diagonal past every key
        ((0, -1, -big), (-1, -1, 0)),            # ... and before every one
        ((3, 3, i64), (0, 0, 1000)),             # no row sees a key
        ((3, 3, -2**63), (0, 0, -1000)),
        ((big + 5, -1, big), (5, -1, 0)),        # the offsets bind: the same as 5 / 0
        ((-1, 2**61 + 3, -2**61), (-1, 3, 0)),
    ]:
        got, want = both(wl, wr, diag), both(*same)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (wl, wr, diag)
        assert all(torch.equal(a, b) for a, b in zip(got[2], want[2])), (wl, wr, diag)


@pytest.mark.skipif(backends.compiled_ops_error() is not None, reason="needs the compiled ops")
def test_compiled_ops_bound_packed_maxima_by_the_totals():
    # A packed call's max_seqlen_q / _k far past the totals (the API clamps its own) sized
    # the backward's buffers and blocks: 2**62 overflowed them and crashed. Past 2**31 the
    # ops take the totals: the same call as with max_seqlen = the totals, dropout included.
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    q, k, v = random_qkv(1, 12, 12, 2, 2, 32, seed=6)
    tail = list(dense_tail())
    names = [a.name for a in torch.ops.flashattn.fwd.default._schema.arguments][12:]

    def call(max_seqlen):
        args = [q, k, v, None, None, 0.2, 0.0, -1, -1, 0, 0.3, torch.tensor([7, 0]), *tail]
        for name, value in (("cu_seqlens_q", cu), ("cu_seqlens_k", cu), ("max_seqlen_q", max_seqlen),
                            ("max_seqlen_k", max_seqlen)):
            args[12 + names.index(name)] = value
        out, lse = torch.ops.flashattn.fwd(*args)
        grads = torch.ops.flashattn.bwd(torch.ones_like(out), *args[:3], out, lse, *args[3:], False, False)[:3]
        return out, lse, *grads

    for got, want in zip(call(2**62), call(12)):
        assert torch.equal(got, want)

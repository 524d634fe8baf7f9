"""apply_rotary_emb (flash-attn's flash_attn.layers.rotary signature) against the reference's
pair-by-pair rotation, dense and packed, with offsets, in place, with gradients."""
import math

import pytest
import torch

import flashattn_py as fa
from flashattn_py.errors import ArgumentError
from flashattn_py.reference import _rotate


def _tables(seqlen_ro, rotary_dim, gen, dtype=torch.float64):
    angle = torch.rand(seqlen_ro, rotary_dim // 2, generator=gen, dtype=torch.float64) * 2 * math.pi
    return angle.cos().to(dtype), angle.sin().to(dtype)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [16, 6])
def test_dense_with_offsets_equals_the_reference(interleaved, rotary_dim):
    gen = torch.Generator().manual_seed(rotary_dim + interleaved)
    B, S, H, D = 3, 5, 2, 16
    x = torch.randn(B, S, H, D, generator=gen, dtype=torch.float64)
    cos, sin = _tables(12, rotary_dim, gen)
    for offsets in (0, 4, torch.tensor([0, 7, 2])):
        out = fa.apply_rotary_emb(x, cos, sin, interleaved=interleaved, seqlen_offsets=offsets)
        for b in range(B):
            start = int(offsets[b]) if isinstance(offsets, torch.Tensor) else offsets
            want = _rotate(x[b], cos, sin, list(range(start, start + S)), interleaved)
            torch.testing.assert_close(out[b], want, atol=1e-12, rtol=0)


def test_packed_sequences_restart_their_positions():
    gen = torch.Generator().manual_seed(5)
    lengths, H, D = [3, 0, 6, 1], 2, 8
    cu = torch.tensor([0, 3, 3, 9, 10], dtype=torch.int32)
    x = torch.randn(sum(lengths), H, D, generator=gen, dtype=torch.float64)
    cos, sin = _tables(16, 8, gen)
    offsets = torch.tensor([2, 9, 0, 5])
    out = fa.apply_rotary_emb(x, cos, sin, seqlen_offsets=offsets, cu_seqlens=cu, max_seqlen=6)
    for b, n in enumerate(lengths):
        a = int(cu[b])
        want = _rotate(x[a:a + n], cos, sin, [int(offsets[b]) + i for i in range(n)], False)
        torch.testing.assert_close(out[a:a + n], want, atol=1e-12, rtol=0)


def test_in_place_low_precision_and_gradients():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, 3, 8, generator=gen)
    cos, sin = _tables(4, 8, gen, torch.float32)
    expected = fa.apply_rotary_emb(x, cos, sin)
    y = x.clone()
    assert fa.apply_rotary_emb(y, cos, sin, inplace=True) is y and torch.equal(y, expected)
    # 16-bit inputs rotate in float32, rounded once at the end
    xb, cb, sb = x.bfloat16(), cos.bfloat16(), sin.bfloat16()
    bf = fa.apply_rotary_emb(xb, cb, sb)
    assert bf.dtype == torch.bfloat16 and torch.equal(bf, fa.apply_rotary_emb(xb.float(), cb.float(), sb.float())
                                                      .bfloat16())
    # gradients of x and of the tables; in place too (a float32 x was aliased by what autograd
    # kept for the tables' gradient, then overwritten)
    x64 = torch.randn(1, 3, 2, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    c64, s64 = (t.requires_grad_() for t in _tables(3, 4, gen))
    assert torch.autograd.gradcheck(lambda *a: fa.apply_rotary_emb(*a, interleaved=True), (x64, c64, s64))
    cg, sg = (t.clone().requires_grad_() for t in (cos, sin))
    y = x.clone()
    fa.apply_rotary_emb(y, cg, sg, inplace=True).sum().backward()
    want = torch.autograd.grad(fa.apply_rotary_emb(x, cg, sg).sum(), (cg, sg))
    torch.testing.assert_close((cg.grad, sg.grad), want)


def test_bad_inputs_name_the_argument():
    x = torch.randn(1, 4, 2, 8)
    cos, sin = _tables(4, 8, torch.Generator().manual_seed(0), torch.float32)
    with pytest.raises(ArgumentError, match="cos: 4 positions"):
        fa.apply_rotary_emb(x, cos, sin, seqlen_offsets=1)
    with pytest.raises(ArgumentError, match="rotary_dim"):
        fa.apply_rotary_emb(x[..., :4], cos, sin)
    with pytest.raises(ArgumentError, match="sin"):
        fa.apply_rotary_emb(x, cos, sin[:, :2])
    with pytest.raises(ArgumentError, match="seqlen_offsets"):
        fa.apply_rotary_emb(x, cos, sin, seqlen_offsets=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ArgumentError, match="x: expected"):
        fa.apply_rotary_emb(x[0], cos, sin)
    with pytest.raises(ArgumentError, match="cu_seqlens"):
        fa.apply_rotary_emb(x[0], cos, sin, cu_seqlens=torch.tensor([0, 3], dtype=torch.int32), max_seqlen=3)
    with pytest.raises(ArgumentError, match="cu_seqlens: expected offsets rising"):
        fa.apply_rotary_emb(x[0], cos, sin, cu_seqlens=torch.tensor([0, 3, 1, 4], dtype=torch.int32), max_seqlen=3)
    with pytest.raises(ArgumentError, match="max_seqlen"):
        fa.apply_rotary_emb(x[0], cos, sin, cu_seqlens=torch.tensor([0, 4], dtype=torch.int32))
    # (from a fuzzing helper: these were taken silently, the float offset truncated, the
    # integer x rotated then truncated, a max_seqlen below a sequence's length unchecked)
    for offset in (1.5, "1"):
        with pytest.raises(ArgumentError, match="seqlen_offsets: expected an int"):
            fa.apply_rotary_emb(x, cos, sin, seqlen_offsets=offset)
    with pytest.raises(ArgumentError, match="x: expected a floating-point tensor, got torch.int32"):
        fa.apply_rotary_emb((x * 10).int(), cos, sin)
    with pytest.raises(ArgumentError, match="max_seqlen: expected an int >= 0"):
        fa.apply_rotary_emb(x[0], cos, sin, cu_seqlens=torch.tensor([0, 1, 4], dtype=torch.int32), max_seqlen=-1)
    with pytest.raises(ArgumentError, match="max_seqlen: 2, but cu_seqlens holds a sequence of 3"):
        fa.apply_rotary_emb(x[0], cos, sin, cu_seqlens=torch.tensor([0, 1, 4], dtype=torch.int32), max_seqlen=2)


@pytest.mark.parametrize("packed", [False, True])
def test_in_place_on_a_leaf_that_needs_a_gradient(packed):
    # flash-attn's own test rotates a leaf x with requires_grad in place and trains through
    # it (its kernel writes x unseen by autograd); here autograd refused the in-place op.
    gen = torch.Generator().manual_seed(9)
    shape = (9, 3, 8) if packed else (2, 5, 3, 8)
    kwargs = dict(cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32), max_seqlen=5) if packed else {}
    cos, sin = (torch.randn(16, 3, generator=gen, dtype=torch.float64) for _ in range(2))  # (not rotations)
    x = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    before = x.detach().clone()
    tables = [t.clone().requires_grad_() for t in (cos, sin)]
    out = fa.apply_rotary_emb(x, *tables, interleaved=True, inplace=True, seqlen_offsets=2, **kwargs)
    fresh = before.clone().requires_grad_()
    fresh_tables = [t.clone().requires_grad_() for t in (cos, sin)]
    want = fa.apply_rotary_emb(fresh, *fresh_tables, interleaved=True, seqlen_offsets=2, **kwargs)
    assert torch.equal(x.detach(), want.detach()) and torch.equal(out.detach(), want.detach())
    dout = torch.randn(shape, generator=gen, dtype=torch.float64)
    out.backward(dout)
    want.backward(dout)
    for got, expected in zip((x, *tables), (fresh, *fresh_tables)):
        torch.testing.assert_close(got.grad, expected.grad, atol=1e-12, rtol=0)
    # the result can be rotated again, in place too; compiled and under torch.func as well
    again = fa.apply_rotary_emb(out, cos, sin, inplace=True, **kwargs)
    assert torch.equal(again.detach(), fa.apply_rotary_emb(want.detach(), cos, sin, **kwargs))
    step = lambda x: fa.apply_rotary_emb(x, cos, sin, inplace=True, **kwargs).square().sum()  # noqa: E731
    eager = before.clone().requires_grad_()
    step(eager).backward()
    for backend in ("eager", "aot_eager"):
        leaf = before.clone().requires_grad_()
        torch.compile(step, fullgraph=True, backend=backend)(leaf).backward()
        torch.testing.assert_close(leaf.grad, eager.grad)
    torch.testing.assert_close(torch.func.grad(step)(before.clone()), eager.grad)
    # compiled with tables that need a gradient too, torch takes the written x for theirs
    # (wrong values): refused
    with_tables = lambda x: fa.apply_rotary_emb(x, *tables, inplace=True, **kwargs).sum()  # noqa: E731
    with pytest.raises(Exception, match="not supported under torch.compile"):
        torch.compile(with_tables, fullgraph=True, backend="aot_eager")(before.clone().requires_grad_())
    # a view of a leaf: the same; a tensor saved from x before still raises, never a wrong
    # gradient; a view from unbind (whose siblings autograd would then refuse): a clear error
    leaf = before.clone().requires_grad_()
    part = fa.apply_rotary_emb(leaf[..., :6], cos, sin, inplace=True, **kwargs)
    torch.testing.assert_close(torch.autograd.grad(part.sum(), leaf)[0][..., :6],
                               torch.autograd.grad(fa.apply_rotary_emb(fresh[..., :6], cos, sin, **kwargs).sum(),
                                                   fresh)[0][..., :6])
    w = torch.randn(8, 3 * 3 * 8, generator=gen, dtype=torch.float64, requires_grad=True)
    x = (torch.randn(2, 5, 8, generator=gen, dtype=torch.float64) @ w).view(2, 5, 3, 3, 8)[:, :, 1]
    saved = x * w.sum()  # (x saved for w's gradient, then rotated in place)
    fa.apply_rotary_emb(x, cos, sin, inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.sum().backward()
    sibling = (torch.randn(2, 5, 3, 3, 8, requires_grad=True) * 1).unbind(2)[1]
    with pytest.raises(ArgumentError, match="split / unbind / chunk"):
        fa.apply_rotary_emb(sibling, cos.float(), sin.float(), inplace=True)


def test_compiled_calls_read_nothing_back_and_leave_positions_past_the_tables():
    # torch.compile(fullgraph=True) broke on the CPU's host read of the positions (a
    # data-dependent guard); compiled (as on GPUs) positions past the tables stay unrotated,
    # as flash-attn's kernel leaves them (eager CPU calls raise, they can read the values).
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(2, 5, 3, 8, generator=gen)
    cos, sin = _tables(16, 8, gen, torch.float32)
    offsets = torch.tensor([1, 14])
    run = torch.compile(lambda x, o: fa.apply_rotary_emb(x, cos, sin, seqlen_offsets=o), fullgraph=True,
                        backend="eager")
    got = run(x, offsets)
    torch.testing.assert_close(got[0], fa.apply_rotary_emb(x[:1], cos, sin, seqlen_offsets=1)[0])
    torch.testing.assert_close(got[1, :2], fa.apply_rotary_emb(x[1:, :2], cos, sin, seqlen_offsets=14)[0])
    assert torch.equal(got[1, 2:], x[1, 2:])  # positions 16, 17, 18: unrotated
    with pytest.raises(ArgumentError, match="cos: 16 positions"):
        fa.apply_rotary_emb(x, cos, sin, seqlen_offsets=offsets)
    run_int = torch.compile(lambda x: fa.apply_rotary_emb(x, cos, sin, seqlen_offsets=3), fullgraph=True,
                            backend="eager")
    torch.testing.assert_close(run_int(x), fa.apply_rotary_emb(x, cos, sin, seqlen_offsets=3))


def test_qkv_and_kv_forms_rotate_in_place():
    # flash-attn's apply_rotary_emb_qkv_ / _kv_ (and the apply_rotary_emb_func alias)
    from flashattn_py import rotary
    gen = torch.Generator().manual_seed(11)
    cos, sin = _tables(12, 8, gen, torch.float32)
    cos_k, sin_k = _tables(12, 8, gen, torch.float32)
    assert rotary.apply_rotary_emb_func is fa.apply_rotary_emb
    qkv = torch.randn(2, 5, 3, 4, 16, generator=gen)
    want_q = fa.apply_rotary_emb(qkv[:, :, 0], cos, sin, seqlen_offsets=2)
    want_k = fa.apply_rotary_emb(qkv[:, :, 1], cos_k, sin_k, seqlen_offsets=2)
    v = qkv[:, :, 2].clone()
    assert rotary.apply_rotary_emb_qkv_(qkv, cos, sin, cos_k, sin_k, seqlen_offsets=2) is qkv
    assert torch.equal(qkv[:, :, 0], want_q) and torch.equal(qkv[:, :, 1], want_k) and torch.equal(qkv[:, :, 2], v)
    gqa = torch.randn(2, 5, 4 + 2 * 2, 16, generator=gen)  # Hq 4, Hk 2
    want_q, want_k = (fa.apply_rotary_emb(gqa[:, :, a:b], cos, sin) for a, b in ((0, 4), (4, 6)))
    v = gqa[:, :, 6:].clone()
    rotary.apply_rotary_emb_qkv_(gqa, cos, sin, num_heads_q=4)
    assert torch.equal(gqa[:, :, :4], want_q) and torch.equal(gqa[:, :, 4:6], want_k) and torch.equal(gqa[:, :, 6:], v)
    kv = torch.randn(2, 5, 2, 2, 16, generator=gen)
    want_k, v = fa.apply_rotary_emb(kv[:, :, 0], cos, sin, interleaved=True), kv[:, :, 1].clone()
    assert rotary.apply_rotary_emb_kv_(kv, cos, sin, interleaved=True) is kv
    assert torch.equal(kv[:, :, 0], want_k) and torch.equal(kv[:, :, 1], v)
    # through autograd, qkv from a layer: the gradient of the in-place rotation
    w = torch.randn(16, 3 * 4 * 16, generator=gen, requires_grad=True)
    h = torch.randn(2, 5, 16, generator=gen)
    grads = []
    for in_place in (True, False):
        qkv = (h @ w).view(2, 5, 3, 4, 16)
        if in_place:
            qkv = rotary.apply_rotary_emb_qkv_(qkv, cos, sin)
        else:
            qkv = torch.stack([fa.apply_rotary_emb(qkv[:, :, 0], cos, sin), fa.apply_rotary_emb(qkv[:, :, 1], cos, sin),
                               qkv[:, :, 2]], 2)
        grads.append(torch.autograd.grad((qkv * qkv.detach().cos()).sum(), w)[0])
    torch.testing.assert_close(grads[0], grads[1])
    # a leaf qkv that needs a gradient (flash-attn's tests), and one under no_grad
    leaf = torch.randn(2, 5, 3, 4, 16, generator=gen, requires_grad=True)
    start = leaf.detach().clone()
    got = rotary.apply_rotary_emb_qkv_(leaf, cos, sin, num_heads_q=4)  # (ignored for 5-D qkv, as flash-attn)
    want = torch.stack([fa.apply_rotary_emb(start[:, :, 0], cos, sin), fa.apply_rotary_emb(start[:, :, 1], cos, sin),
                        start[:, :, 2]], 2)
    assert torch.equal(leaf.detach(), want) and torch.equal(got.detach(), want)
    dout = torch.randn(want.shape, generator=gen)
    got.backward(dout)
    expected = torch.stack([fa.apply_rotary_emb(dout[:, :, 0], cos, -sin), fa.apply_rotary_emb(dout[:, :, 1], cos, -sin),
                            dout[:, :, 2]], 2)  # (the transposed rotation)
    torch.testing.assert_close(leaf.grad, expected)
    tables = [t.clone().requires_grad_() for t in (cos, sin)]  # (compiled: torch's table gradients would be wrong)
    with pytest.raises(Exception, match="not supported under torch.compile"):
        torch.compile(lambda t: rotary.apply_rotary_emb_qkv_(t, *tables), fullgraph=True, backend="aot_eager")(
            torch.randn(2, 5, 3, 4, 16, requires_grad=True))
    with torch.no_grad():
        rotary.apply_rotary_emb_qkv_(leaf, cos, sin)
        rotary.apply_rotary_emb_kv_(torch.randn(2, 5, 2, 2, 16, requires_grad=True), cos, sin)
    with pytest.raises(ArgumentError, match="num_heads_q"):
        rotary.apply_rotary_emb_qkv_(gqa, cos, sin, num_heads_q=3)
    with pytest.raises(ArgumentError, match="kv: expected"):
        rotary.apply_rotary_emb_kv_(qkv, cos, sin)


@pytest.mark.parametrize("xpos", [False, True])
def test_rotary_embedding_module(xpos):
    # flash-attn's RotaryEmbedding: tables of positions x base ** (-2i / dim) in float32, in the
    # inputs' dtype, applied in place to q and k (XPos: q's tables times the scale, k's over it)
    from flashattn_py.rotary import RotaryEmbedding
    gen = torch.Generator().manual_seed(12)
    dim, base, scale_base = 8, 500.0, 16.0
    module = RotaryEmbedding(dim, base=base, interleaved=True, scale_base=scale_base if xpos else None)
    assert dict(module.state_dict()) == {}  # (non-persistent buffers, as flash-attn's)

    def tables(length):
        freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angles = torch.arange(length, dtype=torch.float64)[:, None] * freq
        scale = torch.ones(length, dim // 2, dtype=torch.float64)
        if xpos:
            steps = (torch.arange(0, dim, 2, dtype=torch.float64) + 0.4 * dim) / (1.4 * dim)
            scale = steps ** ((torch.arange(length, dtype=torch.float64) - length // 2) / scale_base)[:, None]
        return angles.cos() * scale, angles.sin() * scale, angles.cos() / scale, angles.sin() / scale

    qkv = torch.randn(2, 5, 3, 2, 16, generator=gen, dtype=torch.float64)
    cos, sin, cos_k, sin_k = (t.float() for t in tables(5 + 3))
    want_q = fa.apply_rotary_emb(qkv[:, :, 0].float(), cos, sin, interleaved=True, seqlen_offsets=3)
    want_k = fa.apply_rotary_emb(qkv[:, :, 1].float(), cos_k, sin_k, interleaved=True, seqlen_offsets=3)
    got = qkv.float()
    assert module(got, seqlen_offset=3) is got
    torch.testing.assert_close(got[:, :, 0], want_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[:, :, 1], want_k, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[:, :, 2], qkv[:, :, 2].float())
    # q with kv, a tensor of offsets with max_seqlen (longer tables: remade)
    q, kv = torch.randn(2, 4, 2, 16, generator=gen), torch.randn(2, 4, 2, 2, 16, generator=gen)
    offsets = torch.tensor([0, 6])
    cos, sin, cos_k, sin_k = (t.float() for t in tables(10))
    want_q = fa.apply_rotary_emb(q, cos, sin, interleaved=True, seqlen_offsets=offsets)
    want_k = fa.apply_rotary_emb(kv[:, :, 0], cos_k, sin_k, interleaved=True, seqlen_offsets=offsets)
    q_out, kv_out = module(q, kv, seqlen_offset=offsets, max_seqlen=10)
    assert q_out is q and kv_out is kv
    torch.testing.assert_close(q, want_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kv[:, :, 0], want_k, atol=1e-5, rtol=1e-5)
    # training through split views of one projection (mamba_ssm's MHA: q, kv = split, then
    # the module on both), compiled too: the gradient of the out-of-place formula
    in_proj = torch.nn.Linear(16, (2 + 2 * 2) * 16).double()
    x = torch.randn(2, 4, 16, generator=gen, dtype=torch.float64)
    ref = RotaryEmbedding(dim, base=base, interleaved=True, scale_base=scale_base if xpos else None)

    def step(rotate, x):
        q, kv = torch.split(in_proj(x), [2 * 16, 2 * 2 * 16], dim=-1)
        q, kv = rotate(q.view(2, 4, 2, 16), kv.view(2, 4, 2, 2, 16))
        return (q.square().sum() + kv.square().sum(2).sum()).sum()

    def formula(q, kv):
        ref._update_cos_sin_cache(4, device=q.device, dtype=q.dtype)
        k_tables = (ref._cos_k_cached, ref._sin_k_cached) if xpos else (ref._cos_cached, ref._sin_cached)
        return (fa.apply_rotary_emb(q, ref._cos_cached, ref._sin_cached, interleaved=True),
                torch.stack([fa.apply_rotary_emb(kv[:, :, 0], *k_tables, interleaved=True), kv[:, :, 1]], 2))

    want = torch.autograd.grad(step(formula, x), in_proj.weight)[0]
    module.train()
    cold = RotaryEmbedding(dim, base=base, interleaved=True, scale_base=scale_base if xpos else None)
    for run, rotate in ((step, module), (torch.compile(step, fullgraph=True, backend="aot_eager"), module),
                        (torch.compile(step, fullgraph=True, backend="aot_eager"), cold)):  # (tables made compiled)
        torch.testing.assert_close(torch.autograd.grad(run(rotate, x), in_proj.weight)[0], want)
    # bf16 inputs get bf16 tables (computed in float32)
    module(torch.randn(1, 3, 3, 2, 16, dtype=torch.bfloat16))
    assert module._cos_cached.dtype == torch.bfloat16
    assert RotaryEmbedding(7).inv_freq.shape == (4,)  # (an odd dim rounds up, as flash-attn's)
    with pytest.raises(ArgumentError, match="dim"):
        RotaryEmbedding("8")


def test_rotary_embedding_subclass_frequencies():
    from flashattn_py.rotary import RotaryEmbedding, apply_rotary_emb

    # flash-attn's hook: a subclass's _compute_inv_freq (here linear position interpolation,
    # every frequency / 4) makes the module's tables
    class Interpolated(RotaryEmbedding):
        def _compute_inv_freq(self, device=None):
            return super()._compute_inv_freq(device) / 4

    plain, scaled = RotaryEmbedding(8), Interpolated(8)
    torch.testing.assert_close(scaled.inv_freq, plain.inv_freq / 4)
    qkv = torch.randn(1, 12, 3, 2, 8)
    positions = torch.arange(12, dtype=torch.float32)
    # position p of the interpolated module rotates as position p / 4 of the plain one
    angles = torch.outer(positions / 4, plain.inv_freq)
    want = apply_rotary_emb(qkv[:, :, 0], angles.cos(), angles.sin())
    got = scaled(qkv.clone())[:, :, 0]
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("interleaved", [False, True])
def test_apply_rotary_emb_torch_and_rotate_half(interleaved):
    from flashattn_py.rotary import apply_rotary_emb_torch, rotate_half

    x = torch.randn(2, 7, 3, 10, dtype=torch.float64)
    angles = torch.rand(7, 3, dtype=torch.float64) * 6
    want = fa.apply_rotary_emb(x, angles.cos(), angles.sin(), interleaved=interleaved)
    torch.testing.assert_close(apply_rotary_emb_torch(x, angles.cos(), angles.sin(), interleaved), want)
    # per-batch tables (B, S, rotary_dim / 2): batch 1 at positions shifted by 2
    both = torch.stack([angles, torch.roll(angles, -2, 0)])
    got = apply_rotary_emb_torch(x, both.cos(), both.sin(), interleaved)
    torch.testing.assert_close(got[1, :5], fa.apply_rotary_emb(x[1:, :5], angles[2:].cos(), angles[2:].sin(),
                                                               interleaved=interleaved)[0])
    pairs = [(0, 1), (2, 3)] if interleaved else [(0, 2), (1, 3)]
    y = torch.arange(4.0)
    r = rotate_half(y, interleaved)
    for a, b in pairs:
        assert r[a] == -y[b] and r[b] == y[a]


def test_apply_rotary_raw_in_a_hand_written_autograd_function():
    # flash-attn's ops.triton.rotary.apply_rotary as ModernBERT uses it: packed rows rotated in
    # place in an autograd.Function's forward, the gradient rotated back (conjugate) in its
    # backward; against apply_rotary_emb's own autograd
    from flashattn_py.rotary import apply_rotary_raw

    class Rotate(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, cos, sin, cu, max_seqlen):
            ctx.save_for_backward(cos, sin, cu)
            ctx.max_seqlen = max_seqlen
            return apply_rotary_raw(x, cos, sin, cu_seqlens=cu, max_seqlen=max_seqlen, inplace=True)

        @staticmethod
        def backward(ctx, grad):
            cos, sin, cu = ctx.saved_tensors
            return (apply_rotary_raw(grad.clone(), cos, sin, cu_seqlens=cu, max_seqlen=ctx.max_seqlen, inplace=True,
                                     conjugate=True), None, None, None, None)

    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    angles = torch.rand(7, 4, dtype=torch.float64) * 6
    x = torch.randn(12, 2, 10, dtype=torch.float64, requires_grad=True)
    got = Rotate.apply(x.clone(), angles.cos(), angles.sin(), cu, 7)
    want = fa.apply_rotary_emb(x, angles.cos(), angles.sin(), cu_seqlens=cu, max_seqlen=7)
    torch.testing.assert_close(got, want)
    dout = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad(got, x, dout)[0], torch.autograd.grad(want, x, dout)[0])

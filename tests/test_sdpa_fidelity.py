"""Drop-in fidelity of scaled_dot_product_attention (ours, and F's under patch_sdpa()):
torch's CausalBias masks, TorchScript, torch's exception types, torch's math backend when
code restricts torch to it, and every shape torch accepts (broadcast, 2-D, zero sizes)."""
from __future__ import annotations

import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

import flashattn_py
from flashattn_py import ArgumentError
from flashattn_py import patch as fpatch
from flashattn_py.patch import patch_sdpa, unpatch_sdpa
from rule import assert_rule, check_attention, random_qkv


def freeze_rng_state():
    """Each block starts from the RNG state at its entry, restored on exit (torch's own
    test helper imports expecttest, which a plain torch install need not have)."""
    return torch.random.fork_rng()

TORCH_SDPA = torch._C._nn.scaled_dot_product_attention


@pytest.fixture(autouse=True)
def _clean_patch():
    unpatch_sdpa()
    yield
    unpatch_sdpa()


def _sdpa_patched(*args, **kwargs):
    with patch_sdpa():
        return F.scaled_dot_product_attention(*args, **kwargs)


SDPAS = {"ours": flashattn_py.scaled_dot_product_attention, "patched": _sdpa_patched}


# --- CausalBias -------------------------------------------------------------------------

@pytest.mark.parametrize("entry", list(SDPAS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant,seqlens", [
    ("upper_left", (37, 61)), ("upper_left", (40, 40)), ("upper_left", (61, 37)),
    ("lower_right", (37, 61)), ("lower_right", (40, 40)),
])
def test_causal_bias_matches_the_reference(entry, dtype, variant, seqlens):
    sq, sk = seqlens
    seed = hash((entry, str(dtype), variant, seqlens)) % 10_000
    q, k, v = random_qkv(2, sq, sk, 4, 2, 24, dtype=dtype, seed=seed, layout="bhsd")
    bias = (causal_upper_left if variant == "upper_left" else causal_lower_right)(sq, sk)
    served = fpatch.stats.served

    def run(q, k, v):  # (B, S, H, D) views of (B, H, S, D) memory, as SDPA gets them
        out = SDPAS[entry](q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias, enable_gqa=True)
        return out.transpose(1, 2)

    diag_offset = 0 if variant == "upper_left" else sk - sq
    check_attention(run, q, k, v, seed=seed, window_right=0, diag_offset=diag_offset)
    if entry == "patched":
        assert fpatch.stats.served == served + 1  # ours served it, not torch's fallback


def test_causal_bias_fp16_upper_left_has_no_nan_under_the_patch():
    # The case from the report: torch's fallback read the bias as a plain tensor (4096 NaN).
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(16, 16, 128, 16, generator=gen).half() for _ in range(3))
    out = _sdpa_patched(q, k, v, attn_mask=causal_upper_left(128, 128))
    want = TORCH_SDPA(q.float(), k.float(), v.float(), is_causal=True)
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), want, atol=2e-3, rtol=2e-3)


def test_causal_bias_on_the_fallback_path_keeps_its_meaning():
    # Restricted to torch's math backend, the patch hands the call to torch: the bias must
    # reach CausalBias's own dispatch, not torch's function as a tensor.
    gen = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(2, 3, 6, 8, generator=gen), torch.randn(2, 3, 9, 8, generator=gen), torch.randn(2, 3, 9, 8)
    for bias in (causal_upper_left(6, 9), causal_lower_right(6, 9)):
        with sdpa_kernel(SDPBackend.MATH):
            want = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            served = fpatch.stats.served
            got = _sdpa_patched(q, k, v, attn_mask=bias)
            assert fpatch.stats.served == served
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("entry", list(SDPAS))
def test_causal_bias_errors_match_torch(entry):
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="CausalBias should not be used with causal=True"):
        F.scaled_dot_product_attention(q, q, q, attn_mask=causal_upper_left(5, 5), is_causal=True)  # torch's
    with pytest.raises(ValueError, match="CausalBias should not be used with causal=True"):
        SDPAS[entry](q, q, q, attn_mask=causal_upper_left(5, 5), is_causal=True)
    # Dropout with a CausalBias is accepted, as torch accepts it (causal dropout attention).
    out = SDPAS[entry](q, q, q, attn_mask=causal_lower_right(5, 5), dropout_p=0.5)
    assert out.shape == q.shape and not out.isnan().any()
    with pytest.raises(ValueError, match=r"attn_mask: CausalBias of sizes \(4, 5\)"):
        flashattn_py.scaled_dot_product_attention(q, q, q, attn_mask=causal_lower_right(4, 5))


# --- TorchScript ------------------------------------------------------------------------

class EncoderLayer(nn.TransformerEncoderLayer):
    """A subclass, as models define them; scripting it reaches F.multi_head_attention_forward."""


@pytest.mark.parametrize("make", [
    lambda: nn.MultiheadAttention(16, 4, dropout=0.1, batch_first=True),
    lambda: EncoderLayer(16, 4, 32, dropout=0.1, batch_first=True),
])
def test_torchscript_while_patched(make):
    torch.manual_seed(5)
    module = make()  # training mode: attention dropout on
    x = torch.randn(2, 7, 16)
    call = ((lambda m: m(x, x, x, need_weights=False)[0]) if isinstance(module, nn.MultiheadAttention)
            else (lambda m: m(x)))

    def seeded(m):
        torch.manual_seed(11)
        return call(m)

    with patch_sdpa():
        scripted = torch.jit.script(module)
        served = fpatch.stats.served
        eager = seeded(module)
        got = seeded(scripted)
        assert fpatch.stats.served == served + 2  # both ran ours
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer)
        buffer.seek(0)
        loaded = torch.jit.load(buffer)
        assert torch.equal(seeded(loaded), eager)
    assert torch.equal(got, eager)  # same kernels, same dropout draws
    # Unpatched, the scripted module runs torch's builtin, as the eager module does.
    torch.testing.assert_close(seeded(scripted), seeded(module), atol=0, rtol=0)


# --- exception types --------------------------------------------------------------------

@pytest.mark.parametrize("call", [
    lambda: flashattn_py.scaled_dot_product_attention(torch.randn(4), torch.randn(4), torch.randn(4)),
    lambda: flashattn_py.scaled_dot_product_attention(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4).double(),
                                                      torch.randn(1, 2, 3, 4)),
    lambda: flashattn_py.scaled_dot_product_attention(*(torch.randn(1, 2, 3, 4),) * 3,
                                                      attn_mask=torch.ones(3, 4, dtype=torch.bool)),
    lambda: flashattn_py.flash_attn_func(*(torch.randn(1, 3, 2, 4),) * 3, window_size=(-2, 0)),
    lambda: flashattn_py.flash_attn_func(*(torch.randn(1, 3, 2, 4),) * 3, backend="nope"),
    lambda: flashattn_py.nn.MultiheadAttention(10, 3),
])
def test_argument_errors_are_value_and_runtime_errors(call):
    for kind in (ValueError, RuntimeError, ArgumentError):
        with pytest.raises(kind):
            call()


def test_torch_wording_for_what_torch_rejects():
    with pytest.raises(RuntimeError, match="Expected query, key, and value to all be at least 2 dimensional"):
        flashattn_py.scaled_dot_product_attention(torch.randn(4), torch.randn(4), torch.randn(4))
    with pytest.raises(RuntimeError, match="Expected query, key, and value to have the same dtype"):
        flashattn_py.scaled_dot_product_attention(torch.randn(2, 3, 4), torch.randn(2, 3, 4).half(),
                                                  torch.randn(2, 3, 4))


# --- torch restricted to its math backend -----------------------------------------------

def test_math_only_dropout_is_torchs_bitwise():
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 3, 9, 8, generator=gen) for _ in range(3))
    with sdpa_kernel(SDPBackend.MATH):
        with freeze_rng_state():
            want = F.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
        with freeze_rng_state():
            got = _sdpa_patched(q, k, v, dropout_p=0.3)
    assert torch.equal(got, want)
    with freeze_rng_state():  # outside the restriction ours serves it (its own dropout stream)
        served = fpatch.stats.served
        _sdpa_patched(q, k, v, dropout_p=0.3)
        assert fpatch.stats.served == served + 1


# --- every shape torch accepts ----------------------------------------------------------

SHAPES = {
    "2d": ((7, 8), (5, 8), (5, 6)),
    "broadcast_batch": ((2, 3, 7, 8), (1, 3, 5, 8), (2, 3, 5, 8)),
    "broadcast_heads": ((2, 3, 7, 8), (2, 1, 5, 8), (2, 1, 5, 8)),
    "broadcast_rank": ((3, 7, 8), (2, 3, 5, 8), (2, 3, 5, 8)),
    "batch_0": ((0, 3, 7, 8), (0, 3, 5, 8), (0, 3, 5, 8)),
    "heads_0": ((2, 0, 7, 8), (2, 0, 5, 8), (2, 0, 5, 8)),
    "lead_0_5d": ((2, 0, 3, 7, 8), (2, 0, 3, 5, 8), (2, 0, 3, 5, 8)),
    "seqlen_q_0": ((2, 3, 0, 8), (2, 3, 5, 8), (2, 3, 5, 8)),
    "seqlen_k_0": ((2, 3, 7, 8), (2, 3, 0, 8), (2, 3, 0, 8)),
    "head_dim_0": ((2, 3, 7, 0), (2, 3, 5, 0), (2, 3, 5, 8)),
    "head_dim_v_0": ((2, 3, 7, 8), (2, 3, 5, 8), (2, 3, 5, 0)),
    # a 4-D query over 3-D key / value whose first two sizes match the query's (no shortcut)
    "kv_rank_3_under_4d_query": ((1, 2, 3, 8), (1, 2, 8), (1, 2, 8)),
}


@pytest.mark.parametrize("entry", list(SDPAS))
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("kind", ["plain", "causal", "mask"])
def test_every_shape_torch_accepts(entry, shape, kind):
    gen = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(*s, generator=gen, dtype=torch.float64) for s in SHAPES[shape])
    kwargs = {"is_causal": True} if kind == "causal" else {}
    if kind == "mask":
        kwargs["attn_mask"] = torch.randn(q.shape[-2], k.shape[-2], generator=gen, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    if shape == "heads_0" and torch.torch_version.TorchVersion(torch.__version__) < "2.13":
        # torch 2.11's own SDPA dies of SIGFPE on zero heads; what it returns from 2.13 on:
        # an empty (..., Sq, Dv) output, empty gradients
        want = leaves[0][..., :v.shape[-1]] * 0 + (leaves[1].sum() + leaves[2].sum()) * 0
    else:
        want = TORCH_SDPA(*leaves, **kwargs)
    mine = [t.clone().float().requires_grad_() for t in (q, k, v)]
    served = fpatch.stats.served
    got = SDPAS[entry](*mine, **{a: (b.float() if isinstance(b, torch.Tensor) else b) for a, b in kwargs.items()})
    if entry == "patched":
        assert fpatch.stats.served == served + 1
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=1e-5)
    dout = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    want.backward(dout)
    got.backward(dout.float())
    for a, b in zip(mine, leaves):
        assert a.grad is not None and a.grad.shape == b.grad.shape
        torch.testing.assert_close(a.grad.double(), b.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("entry", list(SDPAS))
@pytest.mark.parametrize("shapes", [
    ((4, 7, 8), (2, 5, 8), (2, 5, 8)),              # 3-D: dim -3 is heads under GQA
    ((2, 4, 7, 8), (2, 2, 5, 8), (2, 4, 5, 8)),     # key and value head counts differ
    ((2, 6, 7, 8), (1, 2, 5, 8), (2, 3, 5, 8)),     # both, and a broadcast batch
    ((2, 4, 4, 8), (2, 5, 8), (2, 5, 8)),           # 3-D key / value under a 4-D query
])
def test_gqa_shapes_torch_accepts(entry, shapes):
    gen = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(*s, generator=gen, dtype=torch.float64) for s in shapes)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    want = TORCH_SDPA(*leaves, is_causal=True, enable_gqa=True)
    mine = [t.clone().float().requires_grad_() for t in (q, k, v)]
    served = fpatch.stats.served
    got = SDPAS[entry](*mine, is_causal=True, enable_gqa=True)
    if entry == "patched":
        assert fpatch.stats.served == served + 1
    torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=1e-5)
    dout = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    want.backward(dout)
    got.backward(dout.float())
    for a, b in zip(mine, leaves):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=1e-5, rtol=1e-5)


def _size_one_layouts(layout: str, dtype: torch.dtype):
    """(q, k, v) whose size-1 dims have strides torch ignores (it calls such tensors
    contiguous, so .contiguous() keeps them) but a kernel reading rows in place would
    not: a one-row q or k from a transpose (its row stride 1, under the head dim), and a
    head dim of 1 with a stride other than 1."""
    gen = torch.Generator().manual_seed(11)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    if layout == "one_key":
        return rand(2, 3, 5, 8), rand(2, 3, 8, 1).transpose(-1, -2), rand(2, 3, 8, 1).transpose(-1, -2)
    if layout == "one_query":
        return rand(2, 3, 8, 1).transpose(-1, -2), rand(2, 3, 7, 8), rand(2, 3, 7, 8)
    return rand(2, 3, 1, 5).transpose(-1, -2), rand(2, 3, 1, 7).transpose(-1, -2), rand(2, 3, 7, 1)


@pytest.mark.parametrize("entry", list(SDPAS))
@pytest.mark.parametrize("layout", ["one_key", "one_query", "head_dim_1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_strides_of_size_one_dims(entry, layout, dtype):
    # Before: BLAS refused the one-row operands' leading dimension (MKL "Parameter 8 was
    # incorrect") and the results were garbage; the head dim of 1 raised.
    mine = [t.requires_grad_() for t in _size_one_layouts(layout, dtype)]
    assert mine[0].stride(-1) != 1 or min(t.stride(-2) for t in mine) < mine[0].shape[-1]
    exact = [t.detach().double().requires_grad_() for t in mine]
    naive = [t.detach().clone().requires_grad_() for t in mine]
    got, want, low = SDPAS[entry](*mine), TORCH_SDPA(*exact), TORCH_SDPA(*naive)
    assert_rule("out", got, want, low, 2)
    with torch.no_grad():  # (the inference entry, another way to the kernels)
        assert_rule("out without grad", SDPAS[entry](*mine), want, low, 2)
    dout = torch.randn(want.shape, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    for out, leaves in ((got, mine), (want, exact), (low, naive)):
        out.backward(dout.to(out.dtype))
    for name, a, b, c in zip("qkv", mine, exact, naive):
        assert_rule(f"d{name}", a.grad, b.grad, c.grad, 3)


@pytest.mark.parametrize("entry", [*SDPAS, "reference"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("bias", ["unit", "large"])
def test_float32_mask_with_another_query_dtype(entry, dtype, bias):
    # torch reads a float32 mask as float32 whatever the query's dtype. Rounded to bf16 a
    # bias near 200 loses its differences (bf16 steps by 1 there): outputs were 0.56 off
    # float64 where torch's own bf16 call is 0.008 off.
    gen = torch.Generator().manual_seed(10)
    q, k, v = (torch.randn(2, 4, 9, 16, generator=gen).to(dtype) for _ in range(3))
    mask = torch.randn(9, 9, generator=gen) * (2 if bias == "large" else 1) + (200 if bias == "large" else 0)
    mine, exact, naive = ([t.detach().to(to).requires_grad_() for t, to in zip((q, k, v, mask), dtypes)]
                          for dtypes in ((dtype,) * 3 + (torch.float32,), (torch.float64,) * 4, (dtype,) * 3 + (torch.float32,)))
    served = fpatch.stats.served
    if entry == "reference":  # (the formula as a backend: it added the mask rounded, 0.94 off)
        with flashattn_py.use_backend("reference"):
            got = SDPAS["ours"](*mine[:3], attn_mask=mine[3])
    else:
        got = SDPAS[entry](*mine[:3], attn_mask=mine[3])
    assert got.dtype == dtype
    if entry == "patched":
        assert fpatch.stats.served == served + 1
    want = TORCH_SDPA(*exact[:3], attn_mask=exact[3])
    low = TORCH_SDPA(*naive[:3], attn_mask=naive[3])  # torch's own in the input dtype
    if entry == "reference":  # (the naive formula itself, P rounded for P V: up to 2.5x torch's error, which
        assert_rule("out", got, want, low, 4)  # computes in float32 here; the mask added rounded: 120x)
        return
    assert_rule("out", got, want, low, 2)
    dout = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    for out in (got, want, low):
        out.backward(dout.to(out.dtype))
    assert mine[3].grad.dtype == torch.float32
    for name, a, b, c in zip(("dq", "dk", "dv", "dmask"), mine, exact, naive):
        assert_rule(name, a.grad, b.grad, c.grad, 3)


def test_cpu_selection_without_flash_is_math_only():
    # On CPU torch has flash and math: a selection without flash (the legacy
    # sdp_kernel(enable_flash=False) idiom, or MATH + EFFICIENT) leaves it math.
    gen = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(2, 3, 9, 8, generator=gen) for _ in range(3))
    with sdpa_kernel([SDPBackend.MATH, SDPBackend.EFFICIENT_ATTENTION]):
        with freeze_rng_state():
            want = F.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
        with freeze_rng_state():
            served = fpatch.stats.served
            got = _sdpa_patched(q, k, v, dropout_p=0.3)
            assert fpatch.stats.served == served
    assert torch.equal(got, want)


@pytest.mark.parametrize("entry", list(SDPAS))
def test_causal_bias_dropout_is_the_causal_kernels(entry):
    # A lower-right CausalBias with dropout is flash_attn_func(causal=True) with dropout:
    # the same kernel draws the same mask from the same generator state.
    q, k, v = random_qkv(1, 13, 21, 2, 2, 16, seed=13)
    bias = causal_lower_right(13, 21)
    torch.manual_seed(14)
    got = SDPAS[entry](q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias, dropout_p=0.4)
    torch.manual_seed(14)
    want = flashattn_py.flash_attn_func(q, k, v, causal=True, dropout_p=0.4)
    assert torch.equal(got.transpose(1, 2), want)


def test_patched_call_counted_once_and_0d_input_gets_torchs_error():
    q = torch.randn(1, 1, 5, 300)  # head dim above ours: falls back, through CausalBias's dispatch
    before = (fpatch.stats.served, fpatch.stats.fallback)
    _sdpa_patched(q, q, q, attn_mask=causal_upper_left(5, 5))
    assert (fpatch.stats.served, fpatch.stats.fallback) == (before[0], before[1] + 1)
    x = torch.tensor(1.0)
    with pytest.raises(RuntimeError, match="at least 2 dimensional"):
        _sdpa_patched(x, x, x)


def test_zero_size_forward_mode_ad():
    import torch.autograd.forward_ad as fwAD

    q, k, v = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 0, 8), torch.randn(2, 3, 0, 8)
    with fwAD.dual_level():
        out = flashattn_py.scaled_dot_product_attention(fwAD.make_dual(q, torch.randn_like(q)), k, v)
        primal, tangent = fwAD.unpack_dual(out)
    assert torch.equal(primal, torch.zeros(2, 3, 4, 8)) and torch.equal(tangent, torch.zeros(2, 3, 4, 8))


@pytest.mark.parametrize("entry", list(SDPAS))
def test_meta_tensors_give_the_output_shape(entry):
    # (shape inference, e.g. models built on the meta device: asking autocast about "meta" raised)
    q, k, v = torch.empty(2, 4, 7, 8, device="meta"), torch.empty(2, 4, 5, 8, device="meta"), \
        torch.empty(2, 4, 5, 16, device="meta")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the reference serves meta tensors, and says so)
        out = SDPAS[entry](q, k, v, is_causal=True)
    assert out.device.type == "meta" and out.shape == (2, 4, 7, 16)


@pytest.mark.parametrize("case", ["seqlen_k_0", "seqlen_q_0", "dropout_1"])
def test_compiled_fullgraph_where_no_output_sees_a_key(case):
    # (zeros with zero gradients, as torch; the eager path's custom jvp is not traced)
    q = torch.randn(1, 2, 0 if case == "seqlen_q_0" else 4, 8)
    k = torch.randn(1, 2, 0 if case == "seqlen_k_0" else 5, 8)
    leaves = [t.clone().requires_grad_() for t in (q, k, k)]
    dropout_p = 1.0 if case == "dropout_1" else 0.0
    fn = torch.compile(lambda q, k, v: flashattn_py.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p),
                       fullgraph=True, backend="aot_eager")
    out = fn(*leaves)
    out.sum().backward()
    assert torch.equal(out, torch.zeros(1, 2, q.shape[2], 8))
    for t in leaves:
        assert torch.equal(t.grad, torch.zeros_like(t))


@pytest.mark.parametrize("entry", ["ours", "patched"])
@pytest.mark.parametrize("name, value", [("is_causal", "False"), ("is_causal", None), ("is_causal", 1),
                                         ("is_causal", torch.tensor(True)), ("enable_gqa", None),
                                         ("enable_gqa", "True")])
def test_bool_arguments_must_be_bools(entry, name, value):
    # torch's parser raises TypeError; truthiness would read "False" as causal
    q = torch.randn(1, 2, 4, 8)
    call = flashattn_py.scaled_dot_product_attention if entry == "ours" else _sdpa_patched
    with pytest.raises(TypeError, match=name):
        call(q, q, q, **{name: value})


def test_numpy_bools_as_torch_takes_them():
    np = pytest.importorskip("numpy")
    q = torch.randn(1, 2, 4, 8)
    try:
        TORCH_SDPA(q, q, q, is_causal=np.bool_(True))
    except TypeError:
        with pytest.raises(TypeError, match="is_causal: must be bool, not numpy"):
            flashattn_py.scaled_dot_product_attention(q, q, q, is_causal=np.bool_(True))
    else:  # (a torch whose parser takes them)
        pytest.skip("this torch takes NumPy bools")


@pytest.mark.parametrize("entry", ["ours", "patched"])
def test_a_mask_that_is_not_a_tensor_is_named(entry):
    q = torch.randn(1, 1, 2, 4)
    call = flashattn_py.scaled_dot_product_attention if entry == "ours" else _sdpa_patched
    with pytest.raises(TypeError, match="attn_mask"):
        call(q, q, q, attn_mask=[[0.0, 0.0], [0.0, 0.0]])

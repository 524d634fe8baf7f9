"""Large CPU outputs (8 MiB and more) take the memory of freed ones (csrc/cpu_output_memory.h).

Reused memory holds the last tensor's values, not the zeros of fresh pages: these tests
leave NaN-filled blocks in the pool, then hold the calls that take them to the rule
(outputs, gradients, and the rows no packed sequence covers, which must still be cleared),
and check that the pool empties (flashattn_py.empty_cpu_cache) and can be turned off.
"""
import gc
import os
import subprocess
import sys

import pytest
import torch

import flashattn_py
from flashattn_py import ops
from flashattn_py.reference import attention_ref, attention_varlen_ref
from rule import GRAD_FACTOR, assert_rule, check_attention, random_qkv

ROWS, HEADS, DIM = 16384, 8, 64  # (1, ROWS, HEADS, DIM) float32: 32 MiB
BLOCK = ROWS * HEADS * DIM * 4
MIB = 1 << 20

# (The pool is Linux's; these tests count on its default size.)
pytestmark = [pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the pool is Linux only"),
              pytest.mark.skipif("FLASHATTN_CPU_POOL_MB" in os.environ, reason="FLASHATTN_CPU_POOL_MB is set")]


def _empty_pool():
    gc.collect()  # (tensors in reference cycles would hand their blocks back at any time)
    flashattn_py.empty_cpu_cache()


@pytest.fixture(autouse=True)
def _empty_pool_after():
    yield
    _empty_pool()


def _poison(blocks):
    """Leaves exactly `blocks` freed 32 MiB outputs in the pool, NaN-filled; their addresses."""
    _empty_pool()
    k = torch.randn(1, 3, HEADS, DIM)
    outs = [flashattn_py.flash_attn_func(torch.randn(1, ROWS, HEADS, DIM), k, k) for _ in range(blocks)]
    for out in outs:
        out.fill_(float("nan"))
    addresses = {out.data_ptr() for out in outs}
    del outs
    return addresses


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_outputs_and_gradients_in_reused_memory(layout):
    poisoned = _poison(2)  # one for out, one for dq
    q, k, v = random_qkv(1, ROWS, 37, HEADS, 2, DIM, seed=7, layout=layout)
    taken = []

    def run(q, k, v):
        out = flashattn_py.flash_attn_func(q, k, v, causal=True)  # early rows see no key: out 0
        taken.append(out.data_ptr())

        def record_dq(grad):
            taken.append(grad.data_ptr())

        q.register_hook(record_dq)
        return out

    check_attention(run, q, k, v, window_right=0, diag_offset=37 - ROWS, seed=7)
    if layout == "bshd":  # (the bhsd q's gradient is copied into q's layout by autograd)
        assert set(taken) == poisoned, "out and dq did not take the freed blocks"
    else:
        assert taken[0] in poisoned


def test_packed_sequences_in_reused_memory():
    # Keys past seqused_k get no gradient and the second sequence sees no key (out 0,
    # lse -inf): the cleared parts of dk, dv and the rows the kernels write as empty must
    # not keep the NaN of the blocks they take (out, dq, dk, dv: 32 MiB each).
    poisoned = _poison(4)
    lens_q, lens_k, used = [100, ROWS - 100], [ROWS - 50, 50], [ROWS - 60, 0]
    cu_q = torch.tensor([0, 100, ROWS], dtype=torch.int32)
    cu_k = torch.tensor([0, ROWS - 50, ROWS], dtype=torch.int32)
    seqused = torch.tensor(used, dtype=torch.int32)
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, ROWS, HEADS, DIM, generator=gen) for _ in range(3))
    taken = []

    def run(q, k, v):
        out = flashattn_py.varlen_attn(q.squeeze(0), k.squeeze(0), v.squeeze(0), cu_q, cu_k, max(lens_q),
                                       max(lens_k), seqused_k=seqused, window_size=(-1, 0))
        taken.append(out.data_ptr())
        for t in (q, k, v):
            t.register_hook(lambda grad: taken.append(grad.data_ptr()))
        return out[None]

    check_attention(run, q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, seqused_k=seqused, bottom_right=True,
                    window_right=0, seed=11)
    assert set(taken) == poisoned, "out, dq, dk, dv did not take the freed blocks"


def test_op_level_rows_after_the_last_sequence_cleared_in_reused_memory():
    poisoned = _poison(1)
    cu = torch.tensor([0, 100, ROWS - 384], dtype=torch.int32)  # rows after ROWS - 384: in no sequence
    q = torch.randn(1, ROWS, HEADS, DIM)
    k = torch.randn(1, ROWS, HEADS, DIM)
    out, lse = ops.attention(q, k, k, scale=0.125, cu_seqlens_q=cu, cu_seqlens_k=cu, bottom_right=True,
                             window_right=0, max_seqlen_q=ROWS - 484, max_seqlen_k=ROWS - 484)
    assert out.data_ptr() in poisoned
    assert torch.equal(out[0, ROWS - 384:], torch.zeros_like(out[0, ROWS - 384:]))
    assert torch.isneginf(lse[0, :, ROWS - 384:]).all()
    first = slice(0, 100)  # the first sequence against the reference (the second is 15900 rows)
    ref, _ = attention_varlen_ref(q[:, first].double(), k[:, first].double(), k[:, first].double(), cu[:2], cu[:2],
                                  window_right=0, scale=0.125)
    torch.testing.assert_close(out[:, first].double(), ref, atol=2e-6, rtol=1e-5)
    assert not out.isnan().any()


def test_empty_cpu_cache_returns_what_freed_outputs_left():
    _empty_pool()
    k = torch.randn(1, 3, HEADS, DIM)
    out = flashattn_py.flash_attn_func(torch.randn(1, ROWS, HEADS, DIM), k, k)
    assert flashattn_py.empty_cpu_cache() == 0  # (in use: not the pool's)
    del out
    assert flashattn_py.empty_cpu_cache() == BLOCK
    assert flashattn_py.empty_cpu_cache() == 0
    small = flashattn_py.flash_attn_func(torch.randn(1, ROWS // 8, HEADS, DIM), k, k)  # 4 MiB: torch's memory
    del small
    assert flashattn_py.empty_cpu_cache() == 0
    pooled = flashattn_py.flash_attn_func(torch.randn(1, ROWS // 4, HEADS, DIM), k, k)  # 8 MiB: the smallest pooled
    del pooled
    assert flashattn_py.empty_cpu_cache() == 8 * MIB


def _free_output(mib):
    """An output of `mib` MiB (float32) made and freed: its block goes to the pool."""
    k = torch.randn(1, 3, HEADS, DIM)
    out = flashattn_py.flash_attn_func(torch.randn(1, mib * MIB // (HEADS * DIM * 4), HEADS, DIM), k, k)
    address = out.data_ptr()
    del out
    return address


def test_a_kept_block_serves_outputs_up_to_an_eighth_smaller():
    _empty_pool()
    address = _free_output(36)
    assert _free_output(34) == address  # 36 <= 34 + 34 / 8: reused
    assert _free_output(32) == address  # 36 <= 32 + 4
    assert flashattn_py.empty_cpu_cache() == 36 * MIB  # (the whole block, never trimmed)
    _free_output(40)
    _free_output(32)  # 40 > 32 + 4: a new block
    assert flashattn_py.empty_cpu_cache() == 72 * MIB


POOL_SCRIPT = f"""
import torch, flashattn_py as f
def free_output(mib):
    k = torch.randn(1, 3, {HEADS}, {DIM})
    out = f.flash_attn_func(torch.randn(1, mib * {MIB} // ({HEADS * DIM * 4}), {HEADS}, {DIM}), k, k)
    del out
free_output(32)
print(f.empty_cpu_cache())
k = torch.randn(1, 3, {HEADS}, {DIM})
a = f.flash_attn_func(torch.randn(1, 40 * {MIB} // ({HEADS * DIM * 4}), {HEADS}, {DIM}), k, k)
free_output(40)
del a
free_output(64)
print(f.empty_cpu_cache())
"""


@pytest.mark.parametrize("pool_mb, kept", [("0", (0, 0)), ("31", (0, 0)), ("100", (32, 64)), ("-1", (32, 144))])
def test_pool_size_from_the_environment(pool_mb, kept):
    # The second line: two 40 MiB blocks kept (80 MiB), then a freed 64 MiB output evicts
    # the largest kept blocks until it fits (100 MiB: both go), is unmapped (a pool under
    # 64 MiB) or joins them (512: 144 MiB).
    # Anything but a whole number of MiB from 0 on means the default, 512.
    env = dict(os.environ, FLASHATTN_CPU_POOL_MB=pool_mb)
    result = subprocess.run([sys.executable, "-c", POOL_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert [int(line) // MIB for line in result.stdout.split()[-2:]] == list(kept)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int32])
def test_unsupported_dtypes_are_refused_before_memory_is_written(dtype):
    # A packed call clears rows outside its sequences before the kernel runs: an element
    # type the kernels do not take is refused first (and sized by its real width).
    q = torch.zeros(1, 32 * MIB // 8, 8, 1, dtype=dtype)
    k = torch.zeros(1, 4, 8, 1, dtype=dtype)
    cu = torch.tensor([0, 1], dtype=torch.int32)
    given = dict(q=q, k=k, v=k, scale=1.0, cu_seqlens_q=cu, cu_seqlens_k=torch.tensor([0, 4], dtype=torch.int32),
                 max_seqlen_q=1, max_seqlen_k=4)
    args = [given[a.name] if a.name in given else ops.FWD.args[ops.FWD.index[a.name]].default
            for a in torch.ops.flashattn.fwd.default._schema.arguments]
    _empty_pool()
    with pytest.raises(RuntimeError, match="CPU kernels take"):
        torch.ops.flashattn.fwd(*args)  # (the op itself: the API refuses these dtypes earlier)
    assert flashattn_py.empty_cpu_cache() == 0  # no output was made


STREAM_BYTES = 8 * MIB  # (csrc/cpu/flash_cpu.h)


@pytest.mark.parametrize("isa, dtype", [("avx2", torch.float32), ("avx2", torch.bfloat16), ("avx512", torch.float32),
                                        ("avx512", torch.bfloat16), ("avx512bf16", torch.bfloat16)])
@pytest.mark.parametrize("head_dim, causal, big_q, heads_k", [(64, True, True, HEADS), (40, False, True, HEADS),
                                                              (17, True, True, HEADS), (64, False, False, HEADS),
                                                              (17, True, False, HEADS), (40, True, False, 2)])
def test_streamed_outputs_equal_cached_ones(head_dim, causal, big_q, heads_k, dtype, isa, cpu_switch):
    # Outputs and gradients of 8 MiB or more are written with streaming stores (float and
    # bf16: csrc/cpu/flash_cpu.h store_row_maybe_streaming): the first batch entry of
    # such a call must equal, bit for bit, the same entry computed alone (half the size:
    # ordinary stores). Rows of 17 and 40 elements start off the 64-byte lines: the plain
    # head and tail of a row.
    # One thread: the key splits (and so the sums) then do not depend on the batch size.
    # GQA (2 KV heads): dk, dv summed over each KV head's query heads before they are stored.
    try:
        cpu_switch("FLASHATTN_CPU_ISA", isa)  # (AVX2 streams a line as two 32-byte halves)
    except (ValueError, RuntimeError) as e:  # (not this CPU's, or not built: FLASHATTN_CPU_ISAS)
        pytest.skip(f"no {isa} kernels here: {e}")
    long = -(-STREAM_BYTES // (2 * heads_k * head_dim * dtype.itemsize))  # rows for 8 MiB over the batch of 2
    sq, sk = (long, 37) if big_q else (64, long)  # a large out and dq, or a large dk and dv
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, sq, HEADS, head_dim, generator=gen).to(dtype)
    k, v = (torch.randn(2, sk, heads_k, head_dim, generator=gen).to(dtype) for _ in range(2))
    v[:, 3, 0, 5] = float("nan")  # (NaN outputs and gradients: rounded to bf16 as c10 rounds NaN)
    dout = torch.randn(2, sq, HEADS, head_dim, generator=gen).to(dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = []
        for n in (2, 1):
            leaves = [t[:n].clone().requires_grad_() for t in (q, k, v)]
            out = flashattn_py.flash_attn_func(*leaves, causal=causal)
            out.backward(dout[:n])
            results.append([out[:1]] + [t.grad[:1] for t in leaves])
    finally:
        torch.set_num_threads(threads)
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32  # (NaNs compared too)
    for name, streamed, cached in zip(("out", "dq", "dk", "dv"), *results):
        assert torch.equal(streamed.view(bits), cached.view(bits)), name


def test_gradient_of_overlapping_rows():
    # q's rows overlap (row s starts one element after row s - 1): the API copies them
    # (ops.attention), and the op would give such a q's gradient contiguous strides, not
    # torch.empty_like's (a last-dim stride of 2, which the kernels do not write).
    # Autograd then sums the overlapping elements; held to the reference by the rule.
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(200, generator=gen)
    k, v = (torch.randn(1, 5, 2, 16, generator=gen) for _ in range(2))
    dout = torch.randn(1, 3, 2, 16, generator=gen)
    grads = {}
    for name, dtype, attend in (("ours", torch.float32, flashattn_py.flash_attn_func),
                                ("ref", torch.float64, lambda *t: attention_ref(*t)[0]),
                                ("naive", torch.float32, lambda *t: attention_ref(*t)[0])):
        leaf = base.detach().to(dtype).clone().requires_grad_()
        q = leaf.as_strided((1, 3, 2, 16), (200, 1, 40, 1))
        attend(q, k.to(dtype), v.to(dtype)).backward(dout.to(dtype))
        grads[name] = leaf.grad
    assert_rule("dq", grads["ours"], grads["ref"], grads["naive"], GRAD_FACTOR)


def test_op_level_gradient_rows_after_the_last_sequence_cleared_in_reused_memory():
    # The backward clears only the rows after the last query / key sequence (offsets
    # rising from 0 in steps of at most the max lengths: the kernel writes every other row
    # of dq, dk and dv, keys no query sees included): in blocks left NaN, those rows must
    # come back 0 and the rest as the reference's gradients.
    poisoned = _poison(4)
    cu_q = torch.tensor([0, 100, ROWS - 384], dtype=torch.int32)  # q rows from ROWS - 384: in no sequence
    cu_k = torch.tensor([0, 60, ROWS - 200], dtype=torch.int32)  # k rows from ROWS - 200: in no sequence
    gen = torch.Generator().manual_seed(13)
    q, k, v = (torch.randn(1, ROWS, HEADS, DIM, generator=gen).requires_grad_() for _ in range(3))
    kw = dict(scale=0.125, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, bottom_right=True, window_left=8, window_right=0)
    out, _ = ops.attention(q, k, v, max_seqlen_q=ROWS - 484, max_seqlen_k=ROWS - 260, **kw)
    dout = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert {g.data_ptr() for g in grads} | {out.data_ptr()} == poisoned
    for g, first in zip(grads, (ROWS - 384, ROWS - 200, ROWS - 200)):
        assert not g.isnan().any()
        assert torch.equal(g[0, first:], torch.zeros_like(g[0, first:]))
    # The first sequence (100 queries, 60 keys) against the reference.
    sq, sk = slice(0, 100), slice(0, 60)
    leaves = [t[:, s].detach().double().requires_grad_() for t, s in ((q, sq), (k, sk), (v, sk))]
    ref, _ = attention_varlen_ref(*leaves, cu_q[:2], torch.tensor([0, 60], dtype=torch.int32), window_left=8,
                                  window_right=0, scale=0.125, bottom_right=True)
    ref_grads = torch.autograd.grad(ref, leaves, dout[:, sq].double())
    for g, ref_g, s in zip(grads, ref_grads, (sq, sk, sk)):
        torch.testing.assert_close(g[:, s].double(), ref_g, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("packed", [True, False])
def test_key_gradients_without_query_heads_are_zero_in_reused_memory(packed):
    # q with no heads (0 % Hk == 0 passes the checks): no backward task runs, so dk and dv
    # (taken from blocks left NaN) must be cleared whole.
    poisoned = _poison(2)
    gen = torch.Generator().manual_seed(17)
    q = torch.randn(1, 10, 0, DIM, generator=gen).requires_grad_()
    k, v = (torch.randn(1, ROWS, HEADS, DIM, generator=gen).requires_grad_() for _ in range(2))
    kw = dict(cu_seqlens_q=torch.tensor([0, 4, 10], dtype=torch.int32), max_seqlen_q=6,
              cu_seqlens_k=torch.tensor([0, ROWS // 2, ROWS], dtype=torch.int32), max_seqlen_k=ROWS // 2,
              bottom_right=True) if packed else {}
    out, _ = ops.attention(q, k, v, scale=0.125, **kw)
    dk, dv = torch.autograd.grad(out, (k, v), torch.zeros_like(out))
    assert {dk.data_ptr(), dv.data_ptr()} == poisoned
    assert torch.equal(dk, torch.zeros_like(dk)) and torch.equal(dv, torch.zeros_like(dv))



GQA_BACKWARD_SCRIPT = """
import resource, torch, flashattn_py as f
torch.set_num_threads({threads})
gen = torch.Generator().manual_seed(3)
def call(sk):
    q = torch.randn(1, 16, 64, 64, generator=gen, dtype=torch.{dtype}).requires_grad_()
    k, v = (torch.randn(1, sk, {heads_k}, 64, generator=gen, dtype=torch.{dtype}).requires_grad_() for _ in range(2))
    out = f.flash_attn_func(q, k, v)
    return out, (q, k, v)
out, leaves = call(64)
torch.autograd.grad(out, leaves, torch.ones_like(out))  # (the kernels' first-use setup)
out, leaves = call({keys})
dout = torch.ones_like(out)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
grads = torch.autograd.grad(out, leaves, dout)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


@pytest.mark.parametrize("dtype, threads, heads_k, keys", [("float32", 2, 8, 4096), ("bfloat16", 1, 8, 4096),
                                                           ("float32", 4, 8, 4096), ("float32", 2, 1, 8192)])
def test_gqa_backward_memory_is_per_thread_not_per_query_head(dtype, threads, heads_k, keys):
    # 64 query heads: a float32 buffer of dK and dV per (query head, key), 64 x keys x 128 x
    # 4 B (128 or 256 MiB here), is what the backward must not take. What it takes instead:
    # sums over whole groups (8 KV heads), a thread's keys (2 MiB); over parts of the
    # group of one KV head (2 x threads parts), parts x 4 MiB; and each thread's packed K,
    # V (and Q, dO) as any backward.
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    script = GQA_BACKWARD_SCRIPT.format(dtype=dtype, threads=threads, heads_k=heads_k, keys=keys)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    grown = int(result.stdout.split()[-1])
    gradients = 2 * keys * heads_k * 64 * torch.tensor([], dtype=getattr(torch, dtype)).element_size()
    per_query_head = 64 * keys * 128 * 4
    assert grown < gradients + per_query_head // 4, (f"the backward's peak memory grew by {grown / MIB:.0f} MiB "
                                                     f"(gradients: {gradients / MIB:.0f} MiB)")

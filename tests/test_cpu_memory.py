"""Large CPU outputs (32 MiB and more) take the memory of freed ones (csrc/cpu_output_memory.h).

Reused memory holds the last tensor's values, not the zeros of fresh pages: these tests
leave NaN-filled blocks in the pool, then hold the calls that take them to the rule
(outputs, gradients, and the rows no packed sequence covers, which must still be cleared),
and check that the pool empties (flashattn_py.empty_cpu_cache) and can be turned off.
"""
import os
import subprocess
import sys

import pytest
import torch

import flashattn_py
from flashattn_py import ops
from flashattn_py.reference import attention_varlen_ref
from rule import check_attention, random_qkv

ROWS, HEADS, DIM = 16384, 8, 64  # (1, ROWS, HEADS, DIM) float32: 32 MiB, the smallest pooled size
BLOCK = ROWS * HEADS * DIM * 4


def _poison(blocks):
    """Leaves exactly `blocks` freed 32 MiB outputs in the pool, NaN-filled; their addresses."""
    flashattn_py.empty_cpu_cache()
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
        out = flashattn_py.varlen_attn(q.squeeze(0), k.squeeze(0), v.squeeze(0), cu_q, cu_k, max(lens_q), max(lens_k), seqused_k=seqused,
                                       window_size=(-1, 0))
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
    flashattn_py.empty_cpu_cache()
    k = torch.randn(1, 3, HEADS, DIM)
    out = flashattn_py.flash_attn_func(torch.randn(1, ROWS, HEADS, DIM), k, k)
    assert flashattn_py.empty_cpu_cache() == 0  # (in use: not the pool's)
    del out
    assert flashattn_py.empty_cpu_cache() == BLOCK
    assert flashattn_py.empty_cpu_cache() == 0
    small = flashattn_py.flash_attn_func(torch.randn(1, ROWS // 2, HEADS, DIM), k, k)  # 16 MiB: torch's memory
    del small
    assert flashattn_py.empty_cpu_cache() == 0


@pytest.mark.parametrize("pool_mb, kept", [("0", 0), ("31", 0), ("32", BLOCK)])
def test_pool_size_from_the_environment(pool_mb, kept):
    code = ("import torch, flashattn_py as f\n"
            f"k = torch.randn(1, 3, {HEADS}, {DIM})\n"
            f"out = f.flash_attn_func(torch.randn(1, {ROWS}, {HEADS}, {DIM}), k, k)\n"
            "del out\n"
            "print(f.empty_cpu_cache())\n")
    env = dict(os.environ, FLASHATTN_CPU_POOL_MB=pool_mb)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.split()[-1]) == kept


@pytest.mark.parametrize("head_dim, causal, big_q", [(64, True, True), (40, False, True), (17, True, True),
                                                      (64, False, False), (17, True, False)])
def test_streamed_outputs_equal_cached_ones(head_dim, causal, big_q):
    # Outputs and gradients of 32 MiB or more are written with streaming stores
    # (csrc/cpu/flash_cpu.h store_row_streaming): the first batch entry of such a call must
    # equal, bit for bit, the same entry computed alone (half the size: ordinary stores).
    # Rows of 17 and 40 floats start off the 64-byte lines: the plain head and tail of a row.
    # One thread: the key splits (and so the sums) then do not depend on the batch size.
    long = -(-BLOCK // (2 * HEADS * head_dim * 4))  # rows for 32 MiB over the batch of 2
    sq, sk = (long, 37) if big_q else (64, long)  # a large out and dq, or a large dk and dv
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, sq, HEADS, head_dim, generator=gen)
    k, v = (torch.randn(2, sk, HEADS, head_dim, generator=gen) for _ in range(2))
    dout = torch.randn(2, sq, HEADS, head_dim, generator=gen)
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
    for name, streamed, cached in zip(("out", "dq", "dk", "dv"), *results):
        assert torch.equal(streamed, cached), name

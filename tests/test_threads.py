"""Calls from several Python threads at once (a server's request threads): each result is
bitwise the one the same call gives alone on as many torch threads. The CPU kernels keep
their buffers per call or per OS thread, and the GIL is released while they run; a shared
buffer or a race would show here as a changed bit or a cache written at another's slots.
"""
import threading
import time

import torch

import flashattn_py

CALLS_PER_THREAD = 12


def _workloads(gen):
    """name -> a call returning the tensors to compare: dense forward + backward, packed
    bf16 documents, a KV-cache step appending into the thread's own cache (reset first),
    and a step reading a cache every thread shares."""
    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen).to(dtype)

    q, k, v = (randn(2, 37, 4, 32).requires_grad_() for _ in range(3))
    dout = randn(2, 37, 4, 32)

    def dense():
        out = flashattn_py.flash_attn_func(q, k, v, causal=True)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
        return out.detach(), dq, dk, dv

    lengths = [5, 40, 1, 23]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    pq, pk, pv = (randn(sum(lengths), 4, 64, dtype=torch.bfloat16) for _ in range(3))

    def packed():
        return (flashattn_py.flash_attn_varlen_func(pq, pk, pv, cu, cu, max(lengths), max(lengths), causal=True),)

    cache_template = [randn(3, 300, 2, 64) for _ in range(2)]
    step_q, new_k, new_v = randn(3, 2, 8, 64), randn(3, 2, 2, 64), randn(3, 2, 2, 64)
    lens = torch.tensor([0, 117, 298], dtype=torch.int32)

    def append():
        k_cache, v_cache = (c.clone() for c in cache_template)
        out = flashattn_py.flash_attn_with_kvcache(step_q, k_cache, v_cache, new_k, new_v, cache_seqlens=lens,
                                                   causal=True)
        return out, k_cache, v_cache

    shared_k, shared_v = (randn(2, 4096, 2, 64, dtype=torch.bfloat16) for _ in range(2))
    read_q = randn(2, 1, 8, 64, dtype=torch.bfloat16)

    def shared_read():
        return (flashattn_py.flash_attn_with_kvcache(read_q, shared_k, shared_v, cache_seqlens=4000),)

    return {"dense": dense, "packed": packed, "append": append, "shared_read": shared_read}


def test_concurrent_calls_match_lone_calls():
    gen = torch.Generator().manual_seed(0)
    calls = _workloads(gen)
    threads_per_call = torch.get_num_threads()
    expected = {name: call() for name, call in calls.items()}
    failures = []

    def worker(names):
        torch.set_num_threads(threads_per_call)  # (torch keeps a count per OS thread)
        try:
            for i in range(CALLS_PER_THREAD):
                name = names[i % len(names)]
                got = calls[name]()
                if not all(torch.equal(a, b) for a, b in zip(got, expected[name])):
                    failures.append(f"{name}: call {i} differs from the lone call")
        except Exception as e:  # (reported by the main thread)
            failures.append(f"{type(e).__name__}: {e}")

    # Every workload in two threads, in other orders, so that each runs beside the others.
    orders = [list(calls), list(reversed(calls)), list(calls)[1:] + list(calls)[:1],
              list(calls)[2:] + list(calls)[:2]]
    # (daemon threads and one deadline: a hung call fails the test instead of holding pytest)
    threads = [threading.Thread(target=worker, args=(order,), daemon=True) for order in orders * 2]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "a thread did not finish in 120 s"
    assert not failures, failures[:5]

"""Context parallelism on GPUs (NCCL): ring, zigzag and Ulysses attention with the local
blocks on the GPU backends, one rank per GPU (world size 1 on a one-GPU machine), against
the float64 reference of the whole sequence by the rule. Run by benchmarks/gpu_check.sh."""
from __future__ import annotations

import pytest
import torch

from mp import run_workers
from rule import GRAD_FACTOR, OUT_FACTOR, assert_rule

pytestmark = [pytest.mark.gpu, pytest.mark.distributed]

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

WORLD = min(torch.cuda.device_count(), 2)
CASES = [  # (function, dtype, causal, window)
    ("ring", torch.bfloat16, True, (-1, -1)),
    ("zigzag", torch.bfloat16, True, (-1, -1)),
    ("zigzag", torch.float16, False, (64, 8)),
    ("ulysses", torch.bfloat16, True, (-1, -1)),
]
FUNCTIONS = {"ring": "ring_flash_attn_func", "zigzag": "zigzag_ring_flash_attn_func",
             "ulysses": "ulysses_flash_attn_func"}


def _inputs(dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(2, 512, 8, 64), (2, 512, 2, 64), (2, 512, 2, 64), (2, 512, 8, 64)]  # q, k, v, dout: GQA 8/2
    return [torch.randn(s, generator=gen).to(dtype) for s in shapes]


def _worker(rank, world, cases):
    from flashattn_py import distributed as cp

    results = []
    for i, (layout, dtype, causal, window) in enumerate(cases):
        full = _inputs(dtype, i)
        q, k, v, dout = (cp.shard(t, layout, rank, world).cuda() for t in full)
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        out = getattr(cp, FUNCTIONS[layout])(q, k, v, causal=causal, window_size=window)
        out.backward(dout)
        results.append([t.detach().cpu() for t in (out, q.grad, k.grad, v.grad)])
    return results


def test_context_parallel_on_gpus_matches_the_reference():
    from flashattn_py import distributed as cp
    from flashattn_py.reference import attention_ref

    per_rank = run_workers(_worker, WORLD, CASES, timeout=300, backend="nccl")
    for i, (layout, dtype, causal, window) in enumerate(CASES):
        q, k, v, dout = _inputs(dtype, i)
        got = [cp.unshard([r[i][j] for r in per_rank], layout) for j in range(4)]
        left, right = window[0], 0 if causal else window[1]
        refs = []
        for work_dtype in (torch.float64, dtype):  # the truth, and the naive formula in the input dtype
            leaves = [t.to(work_dtype).requires_grad_() for t in (q, k, v)]
            out, _ = attention_ref(*leaves, scale=64 ** -0.5, window_left=left, window_right=right)
            out.backward(dout.to(work_dtype))
            refs.append([out.detach()] + [t.grad for t in leaves])
        for j, name in enumerate(("out", "dq", "dk", "dv")):
            assert_rule(f"{layout} {dtype} {name}", got[j], refs[0][j], refs[1][j],
                        OUT_FACTOR if j == 0 else GRAD_FACTOR)

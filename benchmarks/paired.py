"""Paired speed ratio of one case: flashattn_py against torch's SDPA, call by call.

    python benchmarks/paired.py --seqlen 2048 --head-dim 128 --dtype fp32 --mode fwd

On a shared machine whose speed drifts over seconds, timing two kernels one after the
other biases their ratio. Here the two are called alternately (which one goes first
alternates too), each pair gives one ratio (torch ms / ours ms, above 1: we are faster),
and the median and quartiles of those ratios are printed. Both get the same (B, H, S, D)
tensors: ours through ``flashattn_py.scaled_dot_product_attention``, torch through
``torch.nn.functional.scaled_dot_product_attention`` with its default backend choice.
This is how the closing notes' single-case ratios are measured; ``bench_attention.py``
is the broad sweep.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import flashattn_py  # noqa: E402


def paired_ratios(ours: Callable[[], object], theirs: Callable[[], object], pairs: int) -> list[float]:
    """(theirs seconds) / (ours seconds) of ``pairs`` back-to-back pairs, after a warm-up."""
    def seconds(fn: Callable[[], object]) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    for _ in range(2):
        seconds(ours), seconds(theirs)
    ratios = []
    for i in range(pairs):
        if i % 2:
            t_ours, t_theirs = seconds(ours), seconds(theirs)
        else:
            t_theirs, t_ours = seconds(theirs), seconds(ours)
        ratios.append(t_theirs / t_ours)
    return ratios


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="fp32", help="fp32, bf16, fp16, fp64")
    p.add_argument("--causal", type=int, choices=[0, 1], default=0)
    p.add_argument("--mode", choices=["fwd", "fwd+bwd"], default="fwd")
    p.add_argument("--pairs", type=int, default=16)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.pairs < 1:
        p.error(f"--pairs must be at least 1, got {args.pairs}")

    dtype = common.DTYPES[args.dtype]
    shape = (args.batch, args.heads, args.seqlen, args.head_dim)
    grad = args.mode == "fwd+bwd"
    q, k, v = (torch.randn(shape, dtype=dtype, device=args.device, requires_grad=grad) for _ in range(3))
    dout = torch.randn(shape, dtype=dtype, device=args.device)
    causal = bool(args.causal)

    def step(attention: Callable[..., torch.Tensor]) -> Callable[[], object]:
        def run():
            if grad:
                torch.autograd.grad(attention(q, k, v, is_causal=causal), (q, k, v), dout)
            else:
                with torch.no_grad():
                    attention(q, k, v, is_causal=causal)
            common.synchronize(q.device)
        return run

    ratios = sorted(paired_ratios(step(flashattn_py.scaled_dot_product_attention),
                                  step(F.scaled_dot_product_attention), args.pairs))
    result = {"median": statistics.median(ratios), "q1": ratios[len(ratios) // 4],
              "q3": ratios[(3 * len(ratios)) // 4], "pairs": len(ratios)}
    print(f"{args.mode} {args.dtype} B={args.batch} H={args.heads} N={args.seqlen} D={args.head_dim} "
          f"causal={args.causal}: torch/ours median {result['median']:.3f} "
          f"(quartiles {result['q1']:.3f}-{result['q3']:.3f}, {result['pairs']} pairs)")
    return result


if __name__ == "__main__":
    main()

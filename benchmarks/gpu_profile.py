"""The GPU kernels' launches to profile with Nsight Compute, one case each.

Each case runs warm-up calls first (compiles, autotuning), then once between
``torch.cuda.profiler.start()`` and ``stop()``, so

    ncu --profile-from-start off --clock-control none --section SpeedOfLight ... \\
        python benchmarks/gpu_profile.py

profiles only the measured launches (benchmarks/gpu_check.sh's optional `profile` step).
Shapes are the benchmarks' (bench_decode.py's decode step, bench_attention.py's GPU
dense setting), bf16.
"""
from __future__ import annotations

import argparse
from typing import Callable

import torch

import flashattn_py


def decode_case(backend: str) -> Callable[[], object]:
    """One decode step: Sq=1, B=8, 8192 cached keys, Hq/Hk 32/8, D=128 (split-KV + combine)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    batch, keys, hq, hk, d = 8, 8192, 32, 8, 128
    q = torch.randn(batch, 1, hq, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    k_cache = torch.randn(batch, keys, hk, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    v_cache = torch.randn_like(k_cache)
    lens = torch.full((batch,), keys, dtype=torch.int32, device="cuda")
    return lambda: flashattn_py.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, backend=backend)


def dense_case(backend: str, backward: bool) -> Callable[[], object]:
    """flash_attn_func on B=8, N=2048, H=16, D=128, not causal: forward, or its backward."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(8, 2048, 16, 128, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_(backward)
               for _ in range(3))
    if not backward:
        return lambda: flashattn_py.flash_attn_func(q, k, v, backend=backend)
    out = flashattn_py.flash_attn_func(q, k, v, backend=backend)
    dout = torch.randn_like(out)
    return lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)


CASES = {
    "decode-cuda": lambda: decode_case("cuda"),
    "decode-triton": lambda: decode_case("triton"),
    "fwd-cuda": lambda: dense_case("cuda", backward=False),
    "bwd-cuda": lambda: dense_case("cuda", backward=True),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("cases", nargs="*", help=f"of {', '.join(CASES)} (default: all)")
    args = p.parse_args()
    unknown = [name for name in args.cases if name not in CASES]
    if unknown:
        p.error(f"unknown cases {unknown}; choose from {', '.join(CASES)}")
    for name in args.cases or list(CASES):
        call = CASES[name]()
        with torch.no_grad() if name.startswith("decode") else torch.enable_grad():
            for _ in range(3):
                call()
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
            call()
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
        print(f"# profiled {name}", flush=True)


if __name__ == "__main__":
    main()

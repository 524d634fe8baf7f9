"""Speed of one instruction set's CPU kernels in two builds (e.g. this checkout's runtime-
dispatched build against a -march build of the same set, as tools/isa_native_check.sh
makes): forward and forward+backward of a few problems, each build in its own process (two
builds cannot share one: both register the same ops), alternated over rounds; the median
of the per-round ratios.

    python benchmarks/isa_speed.py --isa avx2 --other /tmp/flashattn-native.XXXX [--rounds 7] [--cases decode]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CASES = [  # (name, dtype, batch, seqlen_q, seqlen_k, heads, heads_k, head_dim, causal, backward)
    ("fp32 fwd 2k causal", "float32", 1, 2048, 2048, 8, 8, 64, True, False),
    ("fp32 fwd+bwd 1k causal", "float32", 1, 1024, 1024, 8, 8, 64, True, True),
    ("bf16 fwd 2k causal", "bfloat16", 1, 2048, 2048, 8, 8, 64, True, False),
    ("bf16 fwd+bwd 1k causal", "bfloat16", 1, 1024, 1024, 8, 8, 64, True, True),
    ("fp32 decode 1x4k GQA", "float32", 4, 1, 4096, 32, 8, 128, True, False),
]

_WORKER = r"""
import json, sys, time, torch, flashattn_py
cases, repeats = json.loads(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
result = {"cpu_kernels": flashattn_py._C.CPU_KERNELS, "file": flashattn_py._C.__file__, "ms": {}}
for name, dtype, b, sq, sk, h, hk, d, causal, backward in cases:
    dt = getattr(torch, dtype)
    q = torch.randn(b, sq, h, d, dtype=dt, requires_grad=backward)
    k = torch.randn(b, sk, hk, d, dtype=dt, requires_grad=backward)
    v = torch.randn(b, sk, hk, d, dtype=dt, requires_grad=backward)
    def call():
        if backward:
            out = flashattn_py.flash_attn_func(q, k, v, causal=causal)
            out.backward(torch.ones_like(out))
        else:
            with torch.no_grad():
                flashattn_py.flash_attn_func(q, k, v, causal=causal)
    for _ in range(2):
        call()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    result["ms"][name] = 1e3 * sorted(times)[len(times) // 2]
print(json.dumps(result))
"""


def run(build: str, isa: str, repeats: int, cases: list) -> dict:
    env = dict(os.environ, PYTHONPATH=build, FLASHATTN_CPU_ISA=isa)
    out = subprocess.run([sys.executable, "-c", _WORKER, json.dumps(cases), str(repeats)], env=env, check=True,
                         capture_output=True, text=True, cwd="/")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--isa", required=True, help="baseline, avx2, avx512 or avx512bf16")
    parser.add_argument("--build", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        help="the build measured (default: this checkout)")
    parser.add_argument("--other", required=True, help="the build it is compared with (a checkout built in place)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cases", default="", help="only the cases whose name contains this (e.g. decode)")
    args = parser.parse_args(argv)
    cases = [case for case in CASES if args.cases in case[0]]
    if not cases:
        parser.error(f"--cases {args.cases!r} matches none of {[case[0] for case in CASES]}")
    ratios: dict[str, list[float]] = {name: [] for name, *_ in cases}
    first = None
    for r in range(args.rounds):
        order = [args.build, args.other] if r % 2 == 0 else [args.other, args.build]
        results = {build: run(build, args.isa, args.repeats, cases) for build in order}
        first = first or results
        for name in ratios:  # other / ours: above 1, ours is faster
            ratios[name].append(results[args.other]["ms"][name] / results[args.build]["ms"][name])
    print(f"isa {args.isa}: {first[args.build]['cpu_kernels']} ({first[args.build]['file']}) vs "
          f"{first[args.other]['cpu_kernels']} ({first[args.other]['file']}); {args.rounds} rounds")
    print("| case | median time ratio (other / this build) | min | max |")
    print("|---|---|---|---|")
    for name, values in ratios.items():
        print(f"| {name} | {statistics.median(values):.3f} | {min(values):.3f} | {max(values):.3f} |")


if __name__ == "__main__":
    main()

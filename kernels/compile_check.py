"""Compile the Triton kernels for a CUDA arch without a GPU (dev / CI check).

    python -m kernels.compile_check [--arch 90] [--spills] [name-filter ...]

Runs Triton's full pipeline down to PTX and cubin with the ptxas bundled in the Triton
wheel, so compiled-mode errors the interpreter cannot see (loop-carried types, layouts,
shared memory overflow) show up on a CPU-only machine. ``--spills`` prints ptxas
register / spill usage for each kernel.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # must happen before the kernels are decorated

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from . import bwd, common, fwd  # noqa: E402

_F32_PTRS = {"Lse", "Delta", "Alibi", "DBias"}
_PTRS = {"Q", "K", "V", "Out", "DO", "DK", "DV", "DQ", "Bias"} | _F32_PTRS
_FLOATS = {"qk_scale2", "softcap_in", "softcap2", "scale", "p_drop", "inv_keep"}
_I64 = {"seed", "rng_offset"}


def compile_kernel(jitfn, dtype: str, consts: dict, num_warps: int, num_stages: int, arch: int = 90):
    sig, cex = {}, {}
    for name in jitfn.arg_names:
        if name in consts:
            sig[name], cex[name] = "constexpr", consts[name]
        elif name == "Bias" and consts.get("BIAS_IS_BOOL"):
            sig[name] = "*u8"
        elif name in _PTRS:
            sig[name] = "*fp32" if name in _F32_PTRS else f"*{dtype}"
        elif name in _I64:
            sig[name] = "i64"
        elif name in _FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    src = ASTSource(fn=jitfn, signature=sig, constexprs=cex)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def _ptxas_info(kernel, arch: int) -> str:
    import triton.backends.nvidia as nv

    ptxas = os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(kernel.asm["ptx"])
    gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    r = subprocess.run([ptxas, "-v", "--gpu-name", gpu, f.name, "-o", os.devnull], capture_output=True, text=True)
    os.unlink(f.name)
    keep = [ln.split("info    : ")[-1].strip() for ln in r.stderr.splitlines() if "spill" in ln or "registers" in ln]
    return " | ".join(keep)


def cases():
    base = dict(HAS_LEFT=False, HAS_RIGHT=False, HAS_SOFTCAP=False, HAS_ALIBI=False, BLOCK_D=128, BLOCK_DV=128,
                EVEN_D=True, EVEN_DV=True, PREC="tf32",
                HAS_BIAS=False, BIAS_IS_BOOL=False, HAS_DROPOUT=False)
    bias = dict(base, HAS_RIGHT=True, HAS_BIAS=True)
    mask_drop = dict(base, HAS_BIAS=True, BIAS_IS_BOOL=True, HAS_DROPOUT=True)
    bias_drop = dict(base, HAS_RIGHT=True, HAS_BIAS=True, HAS_DROPOUT=True)
    every = dict(base, HAS_LEFT=True, HAS_RIGHT=True, HAS_SOFTCAP=True, HAS_ALIBI=True, EVEN_D=False, EVEN_DV=False)
    d256 = dict(base, BLOCK_D=256, BLOCK_DV=256)
    return [
        ("fwd", fwd._fwd_kernel, "bf16", dict(base, BLOCK_M=128, BLOCK_N=64), 8, 3),
        ("fwd_causal", fwd._fwd_kernel, "bf16", dict(base, HAS_RIGHT=True, BLOCK_M=128, BLOCK_N=64), 8, 3),
        ("fwd_every_feature", fwd._fwd_kernel, "fp16", dict(every, BLOCK_M=128, BLOCK_N=64), 8, 3),
        ("fwd_d256", fwd._fwd_kernel, "bf16", dict(d256, BLOCK_M=64, BLOCK_N=64), 4, 2),
        ("fwd_fp32", fwd._fwd_kernel, "fp32", dict(base, PREC="ieee", BLOCK_M=64, BLOCK_N=64), 4, 2),
        ("fwd_bias_causal", fwd._fwd_kernel, "bf16", dict(bias, BLOCK_M=128, BLOCK_N=64), 8, 3),
        ("fwd_mask_dropout", fwd._fwd_kernel, "bf16", dict(mask_drop, BLOCK_M=128, BLOCK_N=64), 8, 3),
        ("dkdv_bias_dropout", bwd._dkdv_kernel, "bf16", dict(bias_drop, BLOCK_M=32, BLOCK_N=128), 8, 3),
        ("dkdv_mask_dropout", bwd._dkdv_kernel, "fp16", dict(mask_drop, BLOCK_M=32, BLOCK_N=128), 8, 3),
        ("dq_bias_grad_dropout", bwd._dq_kernel, "bf16", dict(bias_drop, BIAS_GRAD=True, BLOCK_M=128, BLOCK_N=64), 8, 3),
        ("dq_mask_dropout", bwd._dq_kernel, "fp16", dict(mask_drop, BIAS_GRAD=False, BLOCK_M=128, BLOCK_N=64), 8, 3),
        ("dropout_mask", common._dropout_mask_kernel, "fp32", dict(BLOCK_M=64, BLOCK_N=64), 4, 1),
        ("dkdv", bwd._dkdv_kernel, "bf16", dict(base, HAS_RIGHT=True, BLOCK_M=32, BLOCK_N=128), 8, 3),
        ("dkdv_every_feature", bwd._dkdv_kernel, "fp16", dict(every, BLOCK_M=64, BLOCK_N=64), 4, 3),
        ("dkdv_d256", bwd._dkdv_kernel, "bf16", dict(d256, BLOCK_M=32, BLOCK_N=64), 4, 2),
        ("dq", bwd._dq_kernel, "bf16", dict(base, HAS_RIGHT=True, BIAS_GRAD=False, BLOCK_M=128, BLOCK_N=64), 8, 3),
        ("dq_every_feature", bwd._dq_kernel, "fp16", dict(every, BIAS_GRAD=False, BLOCK_M=64, BLOCK_N=32), 4, 3),
        ("delta", bwd._delta_kernel, "bf16", dict(BLOCK_DV=128, BLOCK_M=64, BLOCK_N=0), 4, 1),
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--spills", action="store_true")
    ap.add_argument("names", nargs="*")
    args = ap.parse_args(argv)
    failed = 0
    for name, fn, dtype, consts, warps, stages in cases():
        if args.names and not any(n in name for n in args.names):
            continue
        t0 = time.time()
        try:
            k = compile_kernel(fn, dtype, consts, warps, stages, args.arch)
        except Exception as e:  # report every failure, then exit non-zero
            failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {str(e)[:2000]}")
            continue
        line = f"ok   {name:20s} {time.time() - t0:5.1f}s shared={k.metadata.shared}"
        if args.spills:
            line += "  " + _ptxas_info(k, args.arch)
        print(line, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Compile the Triton kernels for a CUDA arch without a GPU (dev / CI check).

    python -m kernels.compile_check [--arch 90] [--spills] [--configs] [--no-specialize] [name-filter ...]

Runs Triton's full pipeline down to PTX and cubin with the ptxas bundled in the Triton
wheel, so compiled-mode errors the interpreter cannot see (loop-carried types, layouts,
shared memory overflow) show up on a CPU-only machine. ``--spills`` prints ptxas
register / spill usage for each kernel; ``--configs`` compiles every autotune candidate
of kernels/common.py (fwd, dq, dkdv per head-dim class and element size) and prints the
same numbers, the basis of the config tables (benchmarks/RESULTS.md).

Kernels are compiled as the JIT specialises them for a typical call (16-byte aligned
pointers; strides, sequence lengths, head dims and head counts divisible by 16; a unit
bias column stride and an MHA group of 1 as the constant 1), since register use and
spills differ a lot between that and the unspecialised kernel. ``--no-specialize``
compiles without it (what this script did before issue 19).
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

_F32_PTRS = {"Lse", "Delta", "Alibi", "DBias", "OPart", "MPart", "LPart"}
_I32_PTRS = {"CuSeqQ", "CuSeqK", "SeqUsedK", "BlockTable", "KvBatchIdx", "LeftpadK"}
_PTRS = {"Q", "K", "V", "Out", "DO", "DK", "DV", "DQ", "Bias"} | _F32_PTRS
_FLOATS = {"qk_scale2", "softcap_in", "softcap2", "scale", "p_drop", "inv_keep"}
_I64 = {"seed", "rng_offset"}
# Integer arguments a typical call passes as multiples of 16 (the JIT marks them
# tt.divisibility=16): every stride, the sizes of a 4096-token, 16-head, D=128 problem.
_DIVISIBLE = {"seqlen_q", "seqlen_k", "total_q", "total_k", "head_dim", "head_dim_v", "num_heads", "num_heads_k",
              "diag", "page_size", "num_pages"}
# ... and the ones it passes as exactly 1 (the JIT makes those constexpr 1): an MHA group,
# one dK/dV split, a bias read with unit column stride.
_ONE = {"group", "nsplit", "stride_bn"}
# (not specialised: window_left / right, -1 when unused, and autotune keys)


def _jit_specialisation(jitfn, consts: dict, runtime=()) -> tuple[dict, dict]:
    """(extra constexprs, attrs) as triton's JIT derives them for a typical call; names in
    ``runtime`` stay plain (e.g. a decode call's GQA group of 8, not 1 nor a multiple of 16)."""
    cex, attrs = {}, {}
    for i, name in enumerate(jitfn.arg_names):
        if name in consts or name in runtime:
            continue
        if name in _ONE:
            cex[name] = 1
        elif name in _PTRS or name in _I32_PTRS or name == "Rng" or name.startswith("stride_") or name in _DIVISIBLE:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return cex, attrs


def compile_kernel(jitfn, dtype: str, consts: dict, num_warps: int, num_stages: int, arch: int = 90,
                   specialize: bool = True):
    sig, cex = {}, {}
    attrs = None
    consts = dict(_seq_consts(jitfn, consts))
    runtime = consts.pop("_runtime", ())
    if specialize:
        extra, attrs = _jit_specialisation(jitfn, consts, runtime)
        consts = dict(consts, **extra)
    for name in jitfn.arg_names:
        if name in consts:
            sig[name], cex[name] = "constexpr", consts[name]
        elif name == "Bias" and consts.get("BIAS_IS_BOOL"):
            sig[name] = "*u8"
        elif name == "Rng":
            sig[name] = "*i64"
        elif name in _I32_PTRS:
            sig[name] = "*i32"
        elif name in _PTRS:
            sig[name] = "*fp32" if name in _F32_PTRS else f"*{dtype}"
        elif name in _I64:
            sig[name] = "i64"
        elif name in _FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    src = ASTSource(fn=jitfn, signature=sig, constexprs=cex, attrs=attrs)
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


# dense calls: no packed sequences, no pages (the bwd kernels have no PAGED)
_DENSE = dict(VARLEN_Q=False, VARLEN_K=False, HAS_SEQUSED=False, BOTTOM_RIGHT=False)
_DENSE_FWD = dict(_DENSE, PAGED=False, HAS_KV_BATCH_IDX=False, HAS_LEFTPAD=False)


def _seq_consts(fn, consts: dict) -> dict:
    """consts with the sequence-layout constexprs (dense unless given) the kernel takes."""
    if "VARLEN_Q" not in fn.arg_names:
        return consts
    return dict(_DENSE_FWD if "PAGED" in fn.arg_names else _DENSE, **consts)


def cases():
    base = dict(HAS_LEFT=False, HAS_RIGHT=False, HAS_SOFTCAP=False, HAS_ALIBI=False, BLOCK_D=128, BLOCK_DV=128,
                EVEN_D=True, EVEN_DV=True, PREC="tf32",
                HAS_BIAS=False, BIAS_IS_BOOL=False, HAS_DROPOUT=False)
    varlen = dict(base, HAS_RIGHT=True, HAS_DROPOUT=True, VARLEN_Q=True, VARLEN_K=True, HAS_SEQUSED=True,
                  BOTTOM_RIGHT=True)
    bias = dict(base, HAS_RIGHT=True, HAS_BIAS=True)
    mask_drop = dict(base, HAS_BIAS=True, BIAS_IS_BOOL=True, HAS_DROPOUT=True)
    bias_drop = dict(base, HAS_RIGHT=True, HAS_BIAS=True, HAS_DROPOUT=True)
    every = dict(base, HAS_LEFT=True, HAS_RIGHT=True, HAS_SOFTCAP=True, HAS_ALIBI=True, EVEN_D=False, EVEN_DV=False)
    d256 = dict(base, BLOCK_D=256, BLOCK_DV=256)
    decode = dict(base, HAS_RIGHT=True, HAS_SEQUSED=True, PAGED=True, BOTTOM_RIGHT=True, SPLIT=True,
                  _runtime=("group", "num_heads_k"))
    for name in ("HAS_BIAS", "BIAS_IS_BOOL", "HAS_DROPOUT"):  # (no bias / dropout in the decode kernel)
        decode.pop(name)
    return [
        ("fwd", fwd._fwd_kernel, "bf16", dict(base, BLOCK_M=128, BLOCK_N=64), 8, 3),
        ("fwd_causal", fwd._fwd_kernel, "bf16", dict(base, HAS_RIGHT=True, BLOCK_M=128, BLOCK_N=64), 8, 3),
        ("fwd_every_feature", fwd._fwd_kernel, "fp16", dict(every, BLOCK_M=128, BLOCK_N=64), 8, 3),
        ("fwd_d256", fwd._fwd_kernel, "bf16", dict(d256, BLOCK_M=64, BLOCK_N=64), 4, 2),
        ("fwd_fp32", fwd._fwd_kernel, "fp32", dict(base, PREC="ieee", BLOCK_M=32, BLOCK_N=16), 4, 2),
        ("fwd_bias_causal", fwd._fwd_kernel, "bf16", dict(bias, BLOCK_M=128, BLOCK_N=64), 8, 3),
        ("fwd_mask_dropout", fwd._fwd_kernel, "bf16", dict(mask_drop, BLOCK_M=128, BLOCK_N=64), 8, 3),
        ("dkdv_bias_dropout", bwd._dkdv_kernel, "bf16", dict(bias_drop, BLOCK_M=32, BLOCK_N=128), 8, 3),
        ("dkdv_mask_dropout", bwd._dkdv_kernel, "fp16", dict(mask_drop, BLOCK_M=32, BLOCK_N=128), 8, 3),
        ("dq_bias_grad_dropout", bwd._dq_kernel, "bf16", dict(bias_drop, BIAS_GRAD=True, BLOCK_M=128, BLOCK_N=64), 8, 3),
        ("dq_mask_dropout", bwd._dq_kernel, "fp16", dict(mask_drop, BIAS_GRAD=False, BLOCK_M=128, BLOCK_N=64), 8, 3),
        ("dropout_mask", common._dropout_mask_kernel, "fp32", dict(BLOCK_M=64, BLOCK_N=64), 4, 1),
        ("dkdv", bwd._dkdv_kernel, "bf16", dict(base, HAS_RIGHT=True, BLOCK_M=32, BLOCK_N=128), 8, 3),
        ("dkdv_every_feature", bwd._dkdv_kernel, "fp16", dict(every, BLOCK_M=32, BLOCK_N=64), 4, 3),
        ("dkdv_d256", bwd._dkdv_kernel, "bf16", dict(d256, BLOCK_M=32, BLOCK_N=32), 8, 2),
        ("dq", bwd._dq_kernel, "bf16", dict(base, HAS_RIGHT=True, BIAS_GRAD=False, BLOCK_M=128, BLOCK_N=64), 8, 3),
        ("dq_every_feature", bwd._dq_kernel, "fp16", dict(every, BIAS_GRAD=False, BLOCK_M=64, BLOCK_N=32), 4, 3),
        ("delta", bwd._delta_kernel, "bf16", dict(BLOCK_DV=128, BLOCK_M=64, BLOCK_N=0), 4, 1),
        ("fwd_varlen", fwd._fwd_kernel, "bf16", dict(varlen, PAGED=False, BLOCK_M=128, BLOCK_N=64), 8, 3),
        ("fwd_paged", fwd._fwd_kernel, "bf16", dict(varlen, PAGED=True, BLOCK_M=128, BLOCK_N=64), 8, 3),
        ("dkdv_varlen", bwd._dkdv_kernel, "bf16", dict(varlen, BLOCK_M=32, BLOCK_N=128), 8, 3),
        ("dq_varlen", bwd._dq_kernel, "bf16", dict(varlen, BIAS_GRAD=False, BLOCK_M=128, BLOCK_N=64), 8, 3),
        # KV-cache decoding (fwd.decode_blocks): GQA group 8 (rows = 8 * Sq), split-KV
        ("decode_paged_split", fwd._decode_kernel, "bf16", dict(decode, HAS_LEFTPAD=True, BLOCK_M=16, BLOCK_N=64),
         4, 3),
        ("decode_cache_every", fwd._decode_kernel, "fp16",
         dict(decode, HAS_LEFT=True, HAS_SOFTCAP=True, HAS_ALIBI=True, PAGED=False, HAS_KV_BATCH_IDX=True,
              HAS_LEFTPAD=True, SPLIT=False, EVEN_D=False, EVEN_DV=False, BLOCK_M=64, BLOCK_N=64), 8, 2),
        ("decode_varlen_d64", fwd._decode_kernel, "bf16",
         dict(decode, VARLEN_Q=True, BLOCK_D=64, BLOCK_DV=64, BLOCK_M=64, BLOCK_N=64), 4, 3),
        ("fwd_cache_rows", fwd._fwd_kernel, "bf16",
         dict(base, HAS_RIGHT=True, HAS_SEQUSED=True, BOTTOM_RIGHT=True, HAS_KV_BATCH_IDX=True, HAS_LEFTPAD=True,
              BLOCK_M=128, BLOCK_N=64), 8, 3),
        ("decode_d256", fwd._decode_kernel, "bf16", dict(decode, BLOCK_D=256, BLOCK_DV=256, BLOCK_M=16, BLOCK_N=32),
         4, 2),
        ("decode_fp32", fwd._decode_kernel, "fp32", dict(decode, PREC="ieee", BLOCK_M=16, BLOCK_N=32), 8, 2),
        ("decode_combine", fwd._combine_kernel, "bf16",
         dict(VARLEN_Q=False, EVEN_DV=True, BLOCK_DV=128, BLOCK_M=16, _runtime=("group", "num_heads_k")), 4, 1),
    ]


def config_cases():
    """Every autotune candidate of common.gpu_configs: (name, fn, dtype, consts, warps, stages)."""
    kernels = {"fwd": fwd._fwd_kernel, "dq": bwd._dq_kernel, "dkdv": bwd._dkdv_kernel}
    out = []
    for elem, dtype, prec in ((2, "bf16", "tf32"), (4, "fp32", "ieee")):
        for kind, fn in kernels.items():
            for d in (64, 128, 256):
                base = dict(HAS_LEFT=False, HAS_RIGHT=False, HAS_SOFTCAP=False, HAS_ALIBI=False, BLOCK_D=d,
                            BLOCK_DV=d, EVEN_D=True, EVEN_DV=True, PREC=prec, HAS_BIAS=False, BIAS_IS_BOOL=False,
                            HAS_DROPOUT=False)
                if kind == "dq":
                    base["BIAS_GRAD"] = False
                for i, cfg in enumerate(common.gpu_configs(kind, d, elem)):
                    bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
                    name = f"cfg_{kind}_{dtype}_d{d}_{bm}x{bn}_w{cfg.num_warps}_s{cfg.num_stages}" + ("*" if i == 0 else "")
                    out.append((name, fn, dtype, dict(base, BLOCK_M=bm, BLOCK_N=bn), cfg.num_warps, cfg.num_stages))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--spills", action="store_true")
    ap.add_argument("--configs", action="store_true", help="compile every autotune candidate (implies --spills)")
    ap.add_argument("--no-specialize", action="store_true", help="compile without the JIT's specialisation")
    ap.add_argument("names", nargs="*")
    args = ap.parse_args(argv)
    failed = 0
    for name, fn, dtype, consts, warps, stages in (config_cases() if args.configs else cases()):
        if args.names and not any(n in name for n in args.names):
            continue
        t0 = time.time()
        try:
            k = compile_kernel(fn, dtype, consts, warps, stages, args.arch,
                               specialize=not args.no_specialize)
        except Exception as e:  # report every failure, then exit non-zero
            failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {str(e)[:2000]}")
            continue
        line = f"ok   {name:20s} {time.time() - t0:5.1f}s shared={k.metadata.shared}"
        if args.spills or args.configs:
            line += "  " + _ptxas_info(k, args.arch)
        print(line, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

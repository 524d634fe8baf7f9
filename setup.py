"""Build flashattn_py: the Python package, `kernels/` as flashattn_py.kernels, and the
compiled ops flashattn_py._C (C++ CPU kernels always; CUDA kernels when a CUDA toolkit
and a CUDA torch are present, or FLASHATTN_FORCE_CUDA=1).

Environment:
  FLASHATTN_SKIP_EXT=1        pure-Python install (triton / reference backends only)
  FLASHATTN_FORCE_CUDA=1 / 0  build the CUDA ops / do not (default: where torch is a CUDA
                              build and a CUDA toolkit is found, with or without a GPU)
  FLASHATTN_CUDA_ARCHS        SM architectures for the CUDA ops; default "80;90", plus
                              "100;120" where the toolkit's nvcc lists them (CUDA 12.8+)
  FLASHATTN_CPU_ISAS          CPU instruction sets to build kernels for (default on x86-64:
                              "baseline;avx2;avx512;avx512bf16"; elsewhere "baseline")
  FLASHATTN_CPU_ISA_MARCH     e.g. "avx2=haswell": add -march=<cpu> to an instruction set's
                              library (tools/isa_native_check.sh compares such builds)
  MAX_JOBS                    parallel compile jobs (ninja)
"""
import glob
import os
import platform
import subprocess

from setuptools import setup

PACKAGES = ["flashattn_py", "flashattn_py.distributed", "flashattn_py.integrations", "flashattn_py.kernels"]
PACKAGE_DIR = {"flashattn_py": "flashattn_py", "flashattn_py.kernels": "kernels"}


# The CPU kernels are compiled once per instruction set, each into its own library
# flashattn_py._cpu_<isa> (csrc/cpu/kernel_table.h); the ops load the best one the CPU runs
# (csrc/cpu/isa_select.cpp). No -march=native: one build runs on any x86-64 CPU. The
# kernels' vector helpers (csrc/cpu/simd.h, at::vec's arithmetic) use their AVX2 code in
# every non-baseline library (FLASHATTN_VEC_AVX2); the kernels' own AVX-512 / AVX512-BF16
# code follows the compiler's __AVX512*__ macros. The two AVX-512 sets are scheduled for
# the first Intel core of each (-mtune), as a -march build of that core is: the avx512 set
# runs only on Intel's Skylake to Ice Lake cores; the avx512bf16 set runs on Intel's Cooper
# Lake and later and on AMD's Zen 4 / Zen 5, where this tuning is unmeasured. Generic
# tuning left them 3-4 % behind the -march builds on decoding (benchmarks/RESULTS.md). The
# avx2 set, common to every x86 core of the last ten years, keeps the generic tuning.
_AVX2 = ["-mavx2", "-mfma", "-mf16c", "-DFLASHATTN_VEC_AVX2"]
_AVX512 = _AVX2 + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
CPU_ISAS = {
    "baseline": [],
    "avx2": _AVX2,
    "avx512": _AVX512 + ["-mtune=skylake-avx512"],
    "avx512bf16": _AVX512 + ["-mavx512bf16", "-mtune=cooperlake"],
}


# Also compiled into the avx512bf16 library where the compiler knows them (GCC 11+, clang 12+):
# the AMX tiles for bf16 (csrc/cpu/tiles_amx.h), which run only where cpuid has AMX.
_AMX = ["-mamx-tile", "-mamx-bf16"]


def _compiler_accepts(flags: list, source: str) -> bool:
    cxx = os.environ.get("CXX", "c++")
    try:
        return subprocess.run([cxx, *flags, "-x", "c++", "-fsyntax-only", "-"], input=source,
                              capture_output=True, text=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _cpu_isas() -> dict:
    """The instruction sets to build kernels for: all on x86-64, the baseline elsewhere."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return {"baseline": []}
    wanted = [isa for isa in os.environ.get("FLASHATTN_CPU_ISAS", "").split(";") if isa]
    unknown = [isa for isa in wanted if isa not in CPU_ISAS]
    if unknown:
        raise ValueError(f"FLASHATTN_CPU_ISAS: unknown instruction sets {unknown}; expected some of {list(CPU_ISAS)}")
    isas = {isa: flags for isa, flags in CPU_ISAS.items() if not wanted or isa in wanted or isa == "baseline"}
    # (what tiles_amx.h needs of the compiler: the flags, the intrinsics, cpuid's AMX names)
    amx_probe = ('#include <immintrin.h>\n'
                 'int main() { if (__builtin_cpu_supports("amx-bf16")) _tile_release(); }\n')
    if "avx512bf16" in isas and _compiler_accepts(_AMX, amx_probe):
        isas["avx512bf16"] = isas["avx512bf16"] + _AMX
    # FLASHATTN_CPU_ISA_MARCH="avx2=haswell;avx512bf16=cooperlake": also -march=<cpu> for those
    # libraries (the "native build" of an instruction set that tools/isa_native_check.sh
    # compares the default build with), scheduled for that cpu (the set's own -mtune dropped)
    for item in filter(None, os.environ.get("FLASHATTN_CPU_ISA_MARCH", "").split(";")):
        isa, _, march = item.partition("=")
        if isa not in isas or not march:
            raise ValueError(f"FLASHATTN_CPU_ISA_MARCH: expected <isa>=<cpu> items for {list(isas)}, got {item!r}")
        isas[isa] = [flag for flag in isas[isa] if not flag.startswith("-mtune=")] + [f"-march={march}"]
    return isas


def _isa_sources(here: str, isa: str) -> list:
    """One source per kernel file and instruction set (build/isa_sources/<isa>_<name>.cpp,
    each including the real one), so that each library's objects have their own paths."""
    out_dir = os.path.join(here, "build", "isa_sources")
    os.makedirs(out_dir, exist_ok=True)
    sources = []
    for name in ("flash_fwd", "flash_bwd", "kernel_table"):
        path = os.path.join(out_dir, f"{isa}_{name}.cpp")
        text = f'// generated by setup.py: {name}.cpp for the {isa} kernels\n#include "cpu/{name}.cpp"\n'
        if not os.path.exists(path) or open(path).read() != text:
            with open(path, "w") as f:
                f.write(text)
        sources.append(os.path.relpath(path, here))
    return sources


def _default_cuda_archs(cuda_home) -> str:
    """80 and 90, plus sm_100 (B200) and sm_120 (RTX 50, RTX PRO 6000 Blackwell) where this
    nvcc can build them: the kernels use mma.sync / ldmatrix / cp.async, which those run.
    Built is not verified: README says which archs have run the GPU tests."""
    archs = ["80", "90"]
    try:
        nvcc = os.path.join(cuda_home, "bin", "nvcc")
        listed = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=60).stdout.split()
    except (TypeError, OSError, subprocess.SubprocessError):  # no CUDA_HOME, no nvcc, an old one
        listed = []
    archs += [a for a in ("100", "120") if f"compute_{a}" in listed]
    return ";".join(archs)


def _extensions():
    if os.environ.get("FLASHATTN_SKIP_EXT", "0") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    here = os.path.dirname(os.path.abspath(__file__))
    # An in-place build from before the abi3 one left flashattn_py/_C.cpython-3xx-<platform>.so
    # (and _cpu_<isa>.cpython-...): Python tries that suffix before .abi3.so, so the old
    # library would be imported instead of the new one. Remove them.
    # Kernel libraries of instruction sets this build leaves out (FLASHATTN_CPU_ISAS) would be
    # loaded from an older build: removed too.
    left_out = [f"_cpu_{isa}.*.so" for isa in CPU_ISAS if isa not in _cpu_isas()]
    for pattern in ["_C.cpython-*.so", "_cpu_*.cpython-*.so"] + left_out:
        for stale in glob.glob(os.path.join(here, "flashattn_py", pattern)):
            print(f"removing {stale} (from an older build)")
            os.remove(stale)
    sources = ["csrc/ops.cpp", "csrc/cpu/isa_select.cpp"]
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-Wno-unused-parameter"]
    # The ops (flashattn_py._C) use only PyTorch's LibTorch stable ABI, as of torch 2.11
    # (without this define the headers target the torch they come with), and CPython's
    # limited API (abi3, Python >= 3.10: py_limited_api below; torch's build adds
    # -DPy_LIMITED_API=0x030A0000 and does not link libtorch_python): one binary for every
    # torch >= 2.11 and Python >= 3.10 (`torch-abi-audit` checks the built library).
    stable = ["-DTORCH_TARGET_VERSION=0x020b000000000000"]
    include_dirs = [os.path.join(here, "csrc")]
    # The kernel libraries too (torch::stable::parallel_for, c10::BFloat16 / Half from
    # torch/headeronly); with TORCH_TARGET_VERSION set, an ATen / c10 header would not compile.
    # Each kernel library keeps private copies of the inline functions it uses (hidden, bound
    # locally), so no other library's AVX-512 copy ever runs in place of the baseline's.
    kernel_libraries = [
        CppExtension(f"flashattn_py._cpu_{isa}", _isa_sources(here, isa), include_dirs=include_dirs,
                     extra_compile_args={"cxx": cxx + ["-fvisibility=hidden", "-fvisibility-inlines-hidden",
                                                       f'-DFLASHATTN_ISA_NAME="{isa}"'] + stable + flags},
                     extra_link_args=["-fopenmp", "-Wl,-Bsymbolic"],
                     py_limited_api=True)  # (named _cpu_<isa>.abi3.so, next to _C.abi3.so: isa_select.cpp)
        for isa, flags in _cpu_isas().items()
    ]
    # With a CUDA build of torch and a CUDA toolkit (no GPU needed: a wheel is often built on
    # a machine without one); FLASHATTN_FORCE_CUDA=1 / =0 forces it on / off.
    force = os.environ.get("FLASHATTN_FORCE_CUDA", "")
    build_cuda = force == "1" or (force != "0" and torch.version.cuda is not None and CUDA_HOME is not None)
    if build_cuda:
        archs = (os.environ.get("FLASHATTN_CUDA_ARCHS") or _default_cuda_archs(CUDA_HOME)).split(";")
        nvcc = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"] + stable
        archs = [a for a in archs if a]
        nvcc += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        # and PTX of the newest, which the driver compiles for GPUs newer than every listed
        # arch (instead of "no kernel image is available" there)
        newest = max(archs, key=int)
        nvcc += [f"-gencode=arch=compute_{newest},code=compute_{newest}"]
        sources += ["csrc/ops_cuda.cpp"] + sorted(glob.glob("csrc/cuda/*.cu"))
        ext = CUDAExtension(
            "flashattn_py._C", sources, include_dirs=include_dirs,
            # (USE_CUDA: the stable C shim declares its CUDA stream / guard functions only then)
            extra_compile_args={"cxx": cxx + stable + ["-DUSE_CUDA"], "nvcc": nvcc + ["-DUSE_CUDA"]},
            extra_link_args=["-fopenmp", "-ldl"], py_limited_api=True,
        )
    else:
        ext = CppExtension(
            "flashattn_py._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx + stable}, extra_link_args=["-fopenmp", "-ldl"], py_limited_api=True,
        )
    return [ext] + kernel_libraries, {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
# An abi3 wheel (cp310-abi3): the extensions use the limited API of Python 3.10.
options = {"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {}
setup(packages=PACKAGES, package_dir=PACKAGE_DIR, ext_modules=ext_modules, cmdclass=cmdclass, options=options)

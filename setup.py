"""Build flashattn_py: the Python package, `kernels/` as flashattn_py.kernels, and the
compiled ops flashattn_py._C (C++ CPU kernels always; CUDA kernels when a CUDA toolkit
and a CUDA torch are present, or FLASHATTN_FORCE_CUDA=1).

Environment:
  FLASHATTN_SKIP_EXT=1        pure-Python install (triton / reference backends only)
  FLASHATTN_FORCE_CUDA=1      build the CUDA ops even if torch.cuda is unavailable here
  FLASHATTN_CUDA_ARCHS        SM architectures for the CUDA ops; default "80;90", plus
                              "100;120" where the toolkit's nvcc lists them (CUDA 12.8+)
  FLASHATTN_CPU_NATIVE=0      do not tune the CPU kernels for this machine (-march=native)
  MAX_JOBS                    parallel compile jobs (ninja)
"""
import glob
import os
import platform
import subprocess

from setuptools import setup

PACKAGES = ["flashattn_py", "flashattn_py.integrations", "flashattn_py.kernels"]
PACKAGE_DIR = {"flashattn_py": "flashattn_py", "flashattn_py.kernels": "kernels"}


def _x86_flags():
    """AVX2/FMA flags when this machine has them, so torch's vec headers vectorise exp."""
    if platform.machine() not in ("x86_64", "AMD64") or os.environ.get("FLASHATTN_CPU_NATIVE", "1") == "0":
        return []
    try:
        cpuinfo = open("/proc/cpuinfo").read()
    except OSError:
        return []
    if " avx2 " in cpuinfo and " fma " in cpuinfo:
        return ["-march=native", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return []


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
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-Wno-unused-parameter"] + _x86_flags()
    include_dirs = [os.path.join(here, "csrc")]
    build_cuda = os.environ.get("FLASHATTN_FORCE_CUDA", "0") == "1" or (
        torch.cuda.is_available() and CUDA_HOME is not None
    )
    if build_cuda:
        archs = (os.environ.get("FLASHATTN_CUDA_ARCHS") or _default_cuda_archs(CUDA_HOME)).split(";")
        nvcc = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
        archs = [a for a in archs if a]
        nvcc += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        # and PTX of the newest, which the driver compiles for GPUs newer than every listed
        # arch (instead of "no kernel image is available" there)
        newest = max(archs, key=int)
        nvcc += [f"-gencode=arch=compute_{newest},code=compute_{newest}"]
        sources += ["csrc/ops_cuda.cpp"] + sorted(glob.glob("csrc/cuda/*.cu"))
        ext = CUDAExtension(
            "flashattn_py._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "flashattn_py._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(packages=PACKAGES, package_dir=PACKAGE_DIR, ext_modules=ext_modules, cmdclass=cmdclass)

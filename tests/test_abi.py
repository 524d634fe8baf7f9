"""The compiled libraries use only PyTorch's stable ABI (one build serves every torch from
2.11 on): every symbol they import from libtorch / c10 is a C function that torch's stable
C headers declare (an allow-list read from the installed torch), and the ops module is a
limited-API (abi3) extension."""
import glob
import os
import re
import shutil
import subprocess

import pytest
import torch

import flashattn_py

PACKAGE = os.path.dirname(flashattn_py.__file__)
LIBRARIES = sorted(glob.glob(os.path.join(PACKAGE, "*.so")))
TORCH_DIR = os.path.dirname(torch.__file__)
# The stable C surface: the stable shim and the AOTInductor shim it builds on (with the
# generated per-backend fallback-op shims).
STABLE_HEADERS = [os.path.join(TORCH_DIR, "include", "torch", "csrc", *parts) for parts in (
    ("stable", "c"), ("inductor", "aoti_torch", "c"), ("inductor", "aoti_torch", "generated"))]
DECLARED = re.compile(r"\b((?:aoti_torch|torch)_\w+)\s*\(")
# Not torch's own interface, though libtorch_cpu exports them too: the Fortran BLAS entry
# points of the MKL inside torch's x86 wheels (csrc/cpu/blas.h binds them weakly, with a
# fallback), and the C++ runtime's instantiations (checked against the libstdc++ in use).
FORTRAN_BLAS = {"sgemm_", "dgemm_"}


def _nm(path: str, which: str) -> set[str]:
    out = subprocess.run(["nm", "-D", which, path], capture_output=True, text=True, check=True).stdout
    return {line.split()[-1].split("@")[0] for line in out.splitlines() if line.strip()}  # without @VERSION


def _target_version() -> str:
    """The TORCH_TARGET_VERSION setup.py builds with (the oldest torch the build serves)."""
    # (the checkout's setup.py beside tests/: the package may be an installed wheel's)
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py"),
              encoding="utf-8") as f:
        return re.search(r"-DTORCH_TARGET_VERSION=(0x[0-9a-fA-F]+)", f.read()).group(1)


def _stable_names() -> set[str]:
    """Functions the stable headers declare for the target version: preprocessed as the
    build sees them, so declarations behind a later TORCH_FEATURE_VERSION (functions the
    oldest torch served lacks) are left out, and so are headers that do not compile in a
    stable build (they include ATen). With USE_CUDA, as the CUDA ops are built."""
    include = os.path.join(TORCH_DIR, "include")
    names = set()
    for folder in STABLE_HEADERS:
        for header in glob.glob(os.path.join(folder, "*.h")):
            result = subprocess.run(["c++", "-E", "-P", "-x", "c++", "-std=c++17", "-DUSE_CUDA",
                                     f"-DTORCH_TARGET_VERSION={_target_version()}", "-I", include, header],
                                    capture_output=True, text=True)
            if result.returncode == 0:
                names.update(DECLARED.findall(result.stdout))
    return names


def _torch_exports() -> set[str]:
    libraries = glob.glob(os.path.join(TORCH_DIR, "lib", "libtorch*.so*")) + glob.glob(
        os.path.join(TORCH_DIR, "lib", "libc10*.so*"))
    return set().union(*(_nm(path, "--defined-only") for path in libraries))


def _cxx_runtime_exports() -> set[str]:
    with open("/proc/self/maps", encoding="utf-8") as f:
        loaded = {line.split()[-1] for line in f if re.search(r"/lib(stdc\+\+|gcc_s)\.so", line)}
    assert loaded, "no C++ runtime mapped into this process"
    return set().union(*(_nm(path, "--defined-only") for path in loaded))


@pytest.fixture(scope="module")
def torch_surface():
    stable, exported = _stable_names(), _torch_exports()
    assert "aoti_torch_get_data_ptr" in stable and "torch_call_dispatcher" in stable, STABLE_HEADERS
    assert "aoti_torch_get_data_ptr" in exported, "torch's libraries export no stable shim"
    return stable | FORTRAN_BLAS | _cxx_runtime_exports(), exported


@pytest.mark.skipif(shutil.which("nm") is None or shutil.which("c++") is None, reason="needs nm and c++")
@pytest.mark.skipif(not LIBRARIES, reason="no compiled libraries (FLASHATTN_SKIP_EXT build)")
@pytest.mark.parametrize("path", LIBRARIES, ids=os.path.basename)
def test_only_the_stable_torch_surface_is_imported(path, torch_surface):
    allowed, exported = torch_surface
    from_torch = _nm(path, "--undefined-only") & exported
    assert from_torch, f"{os.path.basename(path)} imports nothing from torch: the check would be vacuous"
    outside = sorted(from_torch - allowed)
    assert not outside, f"{os.path.basename(path)} imports torch symbols outside the stable C headers: {outside[:20]}"


@pytest.mark.skipif(not LIBRARIES, reason="no compiled libraries (FLASHATTN_SKIP_EXT build)")
def test_libraries_are_abi3():
    names = [os.path.basename(p) for p in LIBRARIES]
    assert all(name.endswith(".abi3.so") for name in names), names
    assert "_C.abi3.so" in names

"""The compiled libraries use only PyTorch's stable ABI (one build serves every torch from
2.11 on): no C++ symbol of libtorch / c10 / ATen is imported, only the stable C functions
(`aoti_torch_*`, `torch_*`), and the ops module is a limited-API (abi3) extension."""
import glob
import os
import re
import shutil
import subprocess

import pytest

import flashattn_py

PACKAGE = os.path.dirname(flashattn_py.__file__)
LIBRARIES = sorted(glob.glob(os.path.join(PACKAGE, "*.so")))
# C++ namespaces of libtorch's unstable surface, libtorch_python's C API (THP*), and the
# SLEEF copy inside libtorch_cpu that ATen's vector code calls
# (functions _ZN..., and typeinfo / vtables / names / guards / statics: _ZTI, _ZTV, _ZTS, _ZGV, _ZZN)
UNSTABLE = re.compile(r"^(_Z(T[IVS]|GV|Z)?N?K?\d+(c10|at|torch|caffe2)|THP|Sleef_)")


def _imports(path: str) -> list[str]:
    out = subprocess.run(["nm", "-D", "--undefined-only", path], capture_output=True, text=True, check=True).stdout
    return [line.split()[-1] for line in out.splitlines() if line.strip()]


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs nm (binutils)")
@pytest.mark.skipif(not LIBRARIES, reason="no compiled libraries (FLASHATTN_SKIP_EXT build)")
@pytest.mark.parametrize("path", LIBRARIES, ids=os.path.basename)
def test_only_the_stable_torch_surface_is_imported(path):
    imports = _imports(path)
    unstable = [name for name in imports if UNSTABLE.match(name)]
    assert not unstable, f"{os.path.basename(path)} imports libtorch's unstable symbols: {unstable[:20]}"
    torch_c = [name for name in imports if name.startswith(("aoti_", "torch_"))]
    assert all(name.startswith(("aoti_torch_", "torch_")) for name in torch_c), torch_c


@pytest.mark.skipif(not LIBRARIES, reason="no compiled libraries (FLASHATTN_SKIP_EXT build)")
def test_libraries_are_abi3():
    names = [os.path.basename(p) for p in LIBRARIES]
    assert all(name.endswith(".abi3.so") for name in names), names
    assert "_C.abi3.so" in names

"""What the device-specific tests need to know about this machine, in one place."""
from __future__ import annotations

import sys
from pathlib import Path

import torch


def has_cuda_kernels() -> bool:
    """An sm80+ CUDA GPU (the CUDA builds' targets) and flashattn_py._C built with its CUDA ops."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8:
        return False
    try:
        import flashattn_py._C  # noqa: F401  (loads the library, registers the ops)
    except Exception:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("flashattn::fwd", "CUDA")
    except Exception:
        return False


def _backends_on_their_device() -> list:
    import pytest

    return [
        "cpu",
        pytest.param("triton", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                          reason="needs a CUDA GPU")]),
        pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
            not has_cuda_kernels(), reason="needs an sm80+ CUDA GPU and the compiled CUDA ops")])]


# Parameters for a test run on each backend on its own device: cpu on CPU tensors, triton and
# cuda on GPU tensors (gpu-marked: benchmarks/gpu_check.sh runs them).
BACKENDS_ON_THEIR_DEVICE = _backends_on_their_device()


def triton_kernels():
    """The Triton kernels package: installed as flashattn_py.kernels, or the source tree's
    kernels/ (a checkout that was not installed)."""
    try:
        from flashattn_py import kernels
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        import kernels
    return kernels


def triton_test_device() -> tuple[str, list]:
    """(device, pytest marks) for the Triton kernel tests: CPU tensors under the interpreter
    (TRITON_INTERPRET=1, set by conftest without a GPU), else CUDA, where they are GPU tests
    (benchmarks/gpu_check.sh runs `-m gpu`)."""
    import os

    import pytest

    interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    marks = [pytest.mark.skipif(not interpreted and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 or a GPU")]
    if not interpreted:
        marks.append(pytest.mark.gpu)
    return ("cpu" if interpreted else "cuda"), marks

"""Test session setup.

Without a GPU, the Triton kernels run in Triton's interpreter on CPU tensors. Triton reads
TRITON_INTERPRET when kernels are defined, and torch.compile may import triton early, so
it is set here, before any test module imports anything.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# GPU tests of the Triton kernels: one config per kernel instead of autotuning every feature
# combination.
os.environ.setdefault("FLASHATTN_TRITON_AUTOTUNE", "0")

try:  # property tests: a bounded default run; HYPOTHESIS_PROFILE=slow runs many more examples
    from hypothesis import HealthCheck, settings

    settings.register_profile("default", max_examples=25, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("slow", max_examples=400, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
except ImportError:
    pass


@pytest.fixture
def cpu_switch(monkeypatch):
    """set(name, value): a CPU kernel switch (FLASHATTN_CPU_ISA / _TILES / _BF16_DOT / _AMX) for
    this test; the kernels read the switches once (csrc/cpu/switches.h), so each change is
    followed by flashattn_py._C.reload_cpu_switches(), and so is the restore."""
    from flashattn_py import _C

    def set_switch(name: str, value: str) -> None:
        monkeypatch.setenv(name, value)
        _C.reload_cpu_switches()

    yield set_switch
    monkeypatch.undo()
    _C.reload_cpu_switches()


class _Graphs(list):
    """The graphs torch.compile hands ``backend`` (one per compilation), run as traced."""

    def backend(self, gm, example_inputs):
        self.append(gm)
        return gm


@pytest.fixture
def compiled_graphs():
    """A fresh Dynamo state and a list that collects what it compiles: pass
    ``compiled_graphs.backend`` to torch.compile, count ``len(compiled_graphs)``."""
    torch._dynamo.reset()
    return _Graphs()

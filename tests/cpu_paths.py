"""The CPU kernel's product paths for bf16 (csrc/cpu/switches.h) as tests select them."""
from __future__ import annotations

import pytest
import torch


def cpu_vendor() -> str:
    """/proc/cpuinfo's vendor_id ('' where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":")[1].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return ""


def bf16_dot_compiled() -> bool:
    from flashattn_py import _C

    return "avx512bf16-dot" in _C.CPU_KERNELS


# The switches of each bf16 product path: AMX tiles where the CPU has them unless
# FLASHATTN_CPU_AMX=0 (or FLASHATTN_CPU_BF16_DOT is set); then the AVX512-BF16 or fp32 tiles.
BF16_PATHS = {"amx": {"FLASHATTN_CPU_AMX": "1"},
              "dot": {"FLASHATTN_CPU_AMX": "0", "FLASHATTN_CPU_BF16_DOT": "1"},
              "fp32": {"FLASHATTN_CPU_AMX": "0", "FLASHATTN_CPU_BF16_DOT": "0"}}

_amx_runs: bool | None = None


def amx_runs(cpu_switch) -> bool:
    """Whether bf16 products run on AMX tiles here: compiled in, and the CPU has them and the
    OS grants them (asked of the kernels: with AMX the scores are summed in another order).
    Leaves the switches at the AMX path's."""
    global _amx_runs
    from flashattn_py import _C

    if _amx_runs is None:
        _amx_runs = False
        if "amx-bf16" in _C.CPU_KERNELS:
            g = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(1, 64, 1, 64, generator=g).to(torch.bfloat16) for _ in range(3))
            outs = []
            for value in ("0", "1"):
                cpu_switch("FLASHATTN_CPU_BF16_DOT", "0")
                cpu_switch("FLASHATTN_CPU_AMX", value)
                import flashattn_py

                outs.append(flashattn_py.flash_attn_func(q, k, v, backend="cpu"))
            _amx_runs = not torch.equal(outs[0], outs[1])
    for name, value in BF16_PATHS["amx"].items():
        cpu_switch(name, value)
    return _amx_runs


def bf16_path(cpu_switch, path: str) -> None:
    """Selects a bf16 product path for this test; skips where it does not run."""
    if path == "amx" and not amx_runs(cpu_switch):
        pytest.skip("no AMX tiles on this CPU or in this build")
    if path == "dot" and not bf16_dot_compiled():
        pytest.skip("no AVX512-BF16 tiles on this CPU or in this build")
    for name, value in BF16_PATHS[path].items():
        cpu_switch(name, value)

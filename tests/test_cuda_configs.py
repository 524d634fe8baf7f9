"""The cuda backend's supports(): q's device, its compute capability and shared memory.

Consumer Ampere / Ada (sm86 / sm89) and sm120 give a block at most 99 KB of shared
memory; the D = 256 backward and the deterministic dQ kernels of D >= 128 take more, so
supports() must send those problems elsewhere (with the reason) instead of letting the
launch fail. The device-properties lookup is faked here, so this runs without a GPU; the
byte counts are held to csrc/cuda/flash_configs.h (compiled with the host compiler).
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from flashattn_py import backends

ROOT = Path(__file__).resolve().parents[1]
SM80 = (8, 0, 166912)
SM86 = (8, 6, 101376)  # also sm89 and sm120: 99 KB per block
SM90 = (9, 0, 232448)
SM75 = (7, 5, 65536)


@pytest.fixture
def devices(monkeypatch):
    """Fake devices: index -> (major, minor, smem per block opt-in); None = current (0)."""
    table = {0: SM90, 1: SM86}
    asked = []

    def props(index):
        asked.append(index)
        return table[0 if index is None else index]

    monkeypatch.setattr(backends, "cuda_device_props", props)
    return table, asked


def _reasons(**kw):
    p = backends.Problem("cuda", torch.float16, **kw)
    return backends.BACKENDS["cuda"].device_check(p)


def test_asks_q_device_not_the_current_one(devices):
    table, asked = devices
    assert _reasons(device_index=0, head_dim=256, backward=True) == []
    reasons = _reasons(device_index=1, head_dim=256, backward=True)
    assert asked[-1] == 1
    assert len(reasons) == 1 and "cuda:1" in reasons[0] and "sm86" in reasons[0] and "head dim 256" in reasons[0]
    assert "106752" in reasons[0] and "101376" in reasons[0]


@pytest.mark.parametrize("head_dim,backward,deterministic,fits_sm86", [
    (256, False, False, True),    # forward D=256: 101376 bytes, exactly the limit
    (256, True, False, False),    # backward D=256: 106752
    (128, True, False, True),
    (128, True, True, False),     # deterministic dQ D=128: 104448
    (96, True, True, True),
    (64, True, True, True),
    (200, True, False, False),    # bucket 256
])
def test_shared_memory_per_block(devices, head_dim, backward, deterministic, fits_sm86):
    table, _ = devices
    kw = dict(head_dim=head_dim, backward=backward, deterministic=deterministic)
    for dev in (0, 1):
        table[dev] = SM80
        assert _reasons(device_index=dev, **kw) == []
    table[1] = SM86
    reasons = _reasons(device_index=1, **kw)
    assert (reasons == []) == fits_sm86, reasons
    if reasons:
        assert "shared memory" in reasons[0] and ("deterministic" in reasons[0]) == deterministic


def test_compute_capability_reason_names_the_device(devices):
    table, _ = devices
    table[1] = SM75
    assert _reasons(device_index=1) == ["needs an sm80+ GPU, cuda:1 is sm75"]


def test_auto_selection_falls_back_with_the_reason(devices, monkeypatch):
    # As if the CUDA kernels were built: auto picks cuda where it fits, else triton; a forced
    # cuda raises with the reason.
    monkeypatch.setitem(backends._unavailable, "cuda", None)
    monkeypatch.setitem(backends._unavailable, "triton", None)
    fits = backends.Problem("cuda", torch.float16, device_index=1, head_dim=128, backward=True)
    too_big = fits._replace(head_dim=256)
    assert backends.select(fits) == "cuda"
    assert backends.select(too_big) == "triton"
    with pytest.raises(ValueError, match="shared memory per block"):
        backends.select(too_big, "cuda")


def test_smem_table_matches_flash_configs(tmp_path):
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    src = tmp_path / "smem.cpp"
    src.write_text(
        '#include <cstdio>\n#include <initializer_list>\n#include "cuda/flash_configs.h"\n'
        "int main() {\n"
        "  using namespace flashattn::cfg;\n"
        "  for (int d : {32, 64, 96, 128, 256})\n"
        '    std::printf("%d %d %d %d\\n", d, smem_bytes(d, false, false), bwd_smem(d), bwd_dq_smem(d));\n'
        "  for (int d : {1, 33, 200, 256}) for (int b = 0; b < 2; ++b) for (int det = 0; det < 2; ++det)\n"
        '    std::printf("s %d %d %d %d\\n", d, b, det, smem_bytes(d, b, det));\n'
        "}\n")
    exe = tmp_path / "smem"
    subprocess.run([cxx, "-std=c++17", "-I", str(ROOT / "csrc"), str(src), "-o", str(exe)], check=True)
    lines = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.splitlines()
    table = {int(x[0]): tuple(map(int, x[1:])) for x in (ln.split() for ln in lines if not ln.startswith("s"))}
    assert table == backends.CUDA_SMEM_BYTES
    for ln in lines:
        if ln.startswith("s"):
            d, b, det, need = map(int, ln.split()[1:])
            assert backends.cuda_smem_bytes(d, bool(b), bool(det)) == need, ln

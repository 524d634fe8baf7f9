"""The CPU kernels are built once per instruction set and chosen at run time
(csrc/cpu/isa_select.cpp): FLASHATTN_CPU_ISA forces one, every one this CPU runs computes
attention by the rule, and a bad choice is a clear error."""
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import flashattn_py
from flashattn_py import _C
from rule import check_attention, random_qkv

ISAS = ("baseline", "avx2", "avx512", "avx512bf16")
# the paths each instruction set's kernels have (CPU_KERNELS after the ISA's name); the
# avx512bf16 kernels also have AMX tiles where the compiler knew -mamx-tile (setup.py)
FEATURES = {"baseline": "blas", "avx2": "avx2-tiles", "avx512": "avx2-tiles avx512-exp",
            "avx512bf16": "avx2-tiles avx512-exp avx512bf16-dot"}


def _kernels_are(isa: str) -> bool:
    expected = {f"{isa}: {FEATURES[isa]}"}
    if isa == "avx512bf16":
        expected.add(f"{isa}: {FEATURES[isa]} amx-bf16")
    return _C.CPU_KERNELS in expected


def _force(cpu_switch, isa: str) -> bool:
    """Select ``isa``'s kernels; False when this CPU does not run them."""
    try:
        cpu_switch("FLASHATTN_CPU_ISA", isa)
    except ValueError as e:
        assert "does not run" in str(e), str(e)
        return False
    return True


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(line for line in f if line.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        return set()


def test_the_default_is_the_best_this_cpu_runs():
    assert _C.CPU_ISA in ISAS
    assert _kernels_are(_C.CPU_ISA)
    flags = _cpu_flags()
    if not flags or os.environ.get("FLASHATTN_CPU_ISA"):
        pytest.skip("no /proc/cpuinfo flags, or an instruction set is forced")
    avx2 = {"avx2", "fma", "f16c"} <= flags
    avx512 = avx2 and {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags
    best = ("avx512bf16" if avx512 and "avx512_bf16" in flags else "avx512" if avx512 else "avx2" if avx2
            else "baseline")
    assert _C.CPU_ISA == best, f"/proc/cpuinfo says {best}, the kernels in use are {_C.CPU_ISA}"


def _import_in_subprocess(package_dir: str, env: dict) -> subprocess.CompletedProcess:
    code = "import flashattn_py; from flashattn_py import _C; print(_C.CPU_ISA)"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/",
                          env=dict(os.environ, PYTHONPATH=package_dir, **env), timeout=120)


def test_an_unknown_instruction_set_fails_the_import():
    result = _import_in_subprocess(os.path.dirname(os.path.dirname(flashattn_py.__file__)),
                                   {"FLASHATTN_CPU_ISA": "sse3"})
    assert result.returncode != 0
    assert "ValueError: FLASHATTN_CPU_ISA: expected one of" in result.stderr, result.stderr[-2000:]


def test_a_library_left_out_of_the_build_is_skipped(tmp_path):
    """A build without the best set's library (FLASHATTN_CPU_ISAS) uses the next one it has."""
    if _C.CPU_ISA == "baseline":
        pytest.skip("this CPU runs only the baseline kernels")
    if os.environ.get("FLASHATTN_CPU_ISA"):  # (the library in use is then not the best one, which this removes)
        pytest.skip("an instruction set is forced")
    package = tmp_path / "flashattn_py"
    shutil.copytree(os.path.dirname(flashattn_py.__file__), package,
                    ignore=shutil.ignore_patterns("__pycache__", f"_cpu_{_C.CPU_ISA}.*"))
    result = _import_in_subprocess(str(tmp_path), {"FLASHATTN_CPU_ISA": ""})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == ISAS[ISAS.index(_C.CPU_ISA) - 1]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_each_instruction_set_follows_the_rule(cpu_switch, isa, dtype):
    if not _force(cpu_switch, isa):
        pytest.skip(f"this CPU does not run the {isa} kernels")
    assert _C.CPU_ISA == isa and _kernels_are(isa)
    # a tile-sized problem (every path's block products) and a decode-sized one (the row path)
    for seqlen_q, seqlen_k, seed in ((97, 130, 1), (1, 77, 2)):
        q, k, v = random_qkv(2, seqlen_q, seqlen_k, 4, 2, 40, dtype=dtype, seed=seed)
        check_attention(lambda a, b, c: flashattn_py.flash_attn_func(a, b, c, causal=True), q, k, v, seed=seed,
                        scale=40 ** -0.5, window_right=0, diag_offset=seqlen_k - seqlen_q)


def test_instruction_sets_run_different_kernels(cpu_switch):
    """Forcing a set changes the code that runs: the baseline (BLAS products, scalar exp) and
    the AVX2 tiles round differently."""
    q, k, v = (t.detach() for t in random_qkv(1, 64, 64, 2, 2, 32, seed=3))
    outs = []
    for isa in ("baseline", "avx2"):
        if not _force(cpu_switch, isa):
            pytest.skip(f"this CPU does not run the {isa} kernels")
        outs.append(flashattn_py.flash_attn_func(q, k, v))
    assert not torch.equal(outs[0], outs[1])
    torch.testing.assert_close(outs[0], outs[1])


@pytest.mark.parametrize("value", ["sse2", "AVX2", "avx512fp16"])
def test_an_unknown_instruction_set_is_a_clear_error(cpu_switch, value):
    with pytest.raises(ValueError, match="FLASHATTN_CPU_ISA: expected one of baseline, avx2, avx512, avx512bf16"):
        cpu_switch("FLASHATTN_CPU_ISA", value)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(os.path.join(REPO, ".git")) or shutil.which("git") is None,
                    reason="needs the source checkout (the script builds a copy of it)")
def test_each_instruction_set_is_bitwise_its_native_build():
    """Each set's kernels in this (runtime-dispatched) build against the same kernels built
    with -march=<a CPU of that set> added (tools/isa_native_check.sh): outputs and
    gradients of the snapshot's cases bitwise equal, for every set this CPU runs. Several
    minutes: it builds the extension once more."""
    script = os.path.join(REPO, "tools", "isa_native_check.sh")
    result = subprocess.run(["bash", script], cwd=REPO, capture_output=True, text=True,
                            env=dict(os.environ, PY=sys.executable), timeout=3600)
    kept = [line.removeprefix("native build kept in ") for line in result.stdout.splitlines()
            if line.startswith("native build kept in /tmp/flashattn-native.")]
    try:
        assert result.returncode == 0, result.stdout + result.stderr
        compared = [line for line in result.stdout.splitlines() if "(native: -march=" in line]
        if not compared:
            pytest.skip("this CPU runs none of avx2, avx512, avx512bf16")
        assert all(re.search(r": compared \d+ cases: 0 tensors differ;", line) for line in compared), result.stdout
    finally:
        for path in kept:
            shutil.rmtree(path, ignore_errors=True)

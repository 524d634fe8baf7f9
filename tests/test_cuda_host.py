"""CUDA-side checks that need nvcc but no GPU (issue 19).

* The softcap's tanh under the build's ``--use_fast_math`` (setup.py): no ``tanh.approx``
  in the PTX (relative error about 2^-11; ``tanhf`` compiles to it under fast math).
* The host helpers of csrc/cuda/flash_common.cuh, in a host program compiled by nvcc and
  run here: the 16-byte alignment gate ignores strides of size-1 dims (B = 1 / H = 1
  views keep the vector path), the launch grid is 1-D and sized for batch * heads past
  65535; the masking geometry (Window, block_range) gives the reference's visible pairs.
* Every .cu compiles for sm_100 / sm_120 where this nvcc lists them (setup.py's default
  arch list then includes them).

The first two take seconds; the Blackwell compile is marked slow
(``pytest -m slow tests/test_cuda_host.py``).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    cand = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"
    return str(cand) if cand.exists() else None


NVCC = _nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found")
# setup.py's nvcc flags that change code generation.
BUILD_FLAGS = ["-O3", "-std=c++17", "--use_fast_math", "--expt-relaxed-constexpr"]


def test_setup_builds_with_fast_math():
    # The PTX check below is only meaningful with the flags the build uses.
    assert '"--use_fast_math"' in (ROOT / "setup.py").read_text()


@pytest.mark.parametrize("src", ["flash_fwd_hdim64.cu", "flash_bwd_hdim64_fp16.cu"])
def test_softcap_tanh_is_accurate_under_fast_math(src, tmp_path):
    ptx = tmp_path / "out.ptx"
    subprocess.run([NVCC, *BUILD_FLAGS, "-I", str(ROOT / "csrc"), "--gpu-architecture=sm_80", "-ptx",
                    str(CUDA_DIR / src), "-o", str(ptx)], check=True, capture_output=True, text=True)
    text = ptx.read_text()
    assert "mma.sync" in text  # the kernels are in there
    assert text.count("tanh.approx") == 0, f"{src}: {text.count('tanh.approx')} tanh.approx in the PTX"


_HOST_MAIN = r"""
#include <cstdio>
#include "cuda/flash_common.cuh"
using namespace flashattn::cuda_impl;
#define CHECK(c) do { if (!(c)) { std::printf("FAILED %s\n", #c); return 1; } } while (0)
int main() {
  alignas(16) static unsigned short buf[1 << 16];
  const void* p = buf;
  const void* p_off = buf + 1;  // 2 bytes: not 16-byte aligned
  // (batch, batch_stride, rows, row_stride, heads, head_stride, cols)
  CHECK(rows_aligned16(p, 2, 4096, 16, 64, 2, 32, 32));
  CHECK(rows_aligned16(p, 1, 12345, 16, 64, 2, 32, 32));    // B = 1: batch stride unused
  CHECK(rows_aligned16(p, 2, 4096, 16, 64, 1, 7, 32));      // H = 1: head stride unused
  CHECK(rows_aligned16(p, 2, 4096, 1, 13, 2, 32, 32));      // one row: row stride unused
  CHECK(!rows_aligned16(p, 2, 4099, 16, 64, 2, 32, 32));    // a used batch stride off by 3
  CHECK(!rows_aligned16(p, 2, 4096, 16, 68, 2, 32, 32));    // a used row stride not % 8
  CHECK(!rows_aligned16(p, 1, 4096, 16, 64, 2, 36, 32));    // a used head stride not % 8
  CHECK(!rows_aligned16(p_off, 1, 0, 16, 64, 1, 0, 32));    // misaligned base
  CHECK(!rows_aligned16(p, 1, 0, 16, 64, 1, 0, 20));        // head dim not % 8
  // 1-D grid: batch * heads past 65535 fits; past 2^31 - 1 blocks it reports 0.
  CHECK(grid_1d(1, 65537, 1) == 65537u);
  CHECK(grid_1d(3, 2, 70000) == 420000u);
  CHECK(grid_1d(1 << 20, 1 << 12, 1) == 0u);
  std::printf("ok\n");
  return 0;
}
"""


def _run_host_program(source: str, tmp_path) -> subprocess.CompletedProcess:
    """Compile ``source`` (a host main including csrc/ headers) with nvcc and run it."""
    src = tmp_path / "host_main.cu"
    src.write_text(source)
    exe = tmp_path / "host_main"
    subprocess.run([NVCC, "-std=c++17", "-I", str(ROOT / "csrc"), "--gpu-architecture=sm_80", str(src),
                    "-o", str(exe)], check=True, capture_output=True, text=True)
    return subprocess.run([str(exe)], capture_output=True, text=True)


def test_host_helpers(tmp_path):
    result = _run_host_program(_HOST_MAIN, tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr


_WINDOW_MAIN = r"""
#include <cstdio>
#include "cuda/flash_common.cuh"
using namespace flashattn::cuda_impl;
// For every (sq, sk, off, left, right) of a grid: each query's keys [lo, hi), each key's
// queries [qlo, qhi), and each 4-row / 4-key block's block_range, for the test to compare
// with the reference's visibility mask.
int main() {
  const int lens[] = {1, 5, 13}, offs[] = {-9, -2, 0, 3, 14}, bounds[] = {-1, 0, 2, 6};
  for (int sq : lens) for (int sk : lens) for (int off : offs) for (int left : bounds) for (int right : bounds) {
    const Window w{off, left, right, sk, sq};
    std::printf("W %d %d %d %d %d\n", sq, sk, off, left, right);
    for (int i = 0; i < sq; ++i) std::printf("Q %d %lld %lld\n", i, (long long)w.lo(i), (long long)w.hi(i));
    for (int j = 0; j < sk; ++j) std::printf("K %d %lld %lld\n", j, (long long)w.qlo(j), (long long)w.qhi(j));
    for (int m0 = 0; m0 < sq; m0 += 4) {
      const int m_last = (m0 + 4 < sq ? m0 + 4 : sq) - 1;
      const BlockRange r = block_range<4>(w.lo(m0), w.hi(m_last));
      std::printf("N %d %d %d\n", m0, r.begin, r.end);
    }
    for (int n0 = 0; n0 < sk; n0 += 4) {
      const int n_last = (n0 + 4 < sk ? n0 + 4 : sk) - 1;
      const BlockRange r = block_range<4>(w.qlo(n0), w.qhi(n_last));
      std::printf("M %d %d %d\n", n0, r.begin, r.end);
    }
  }
  return 0;
}
"""


def test_window_ranges_match_the_reference_mask(tmp_path):
    # The CUDA kernels' masking geometry (Window, block_range), compiled for the host, against
    # reference.visibility_mask: the same visible (query, key) pairs, and block ranges that
    # hold every visible block and start and end on one.
    from flashattn_py.reference import visibility_mask

    result = _run_host_program(_WINDOW_MAIN, tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout

    def blocks(indices, size=4):
        return sorted({x // size for x in indices})

    windows = 0
    for chunk in out.split("W ")[1:]:
        lines = chunk.strip().splitlines()
        sq, sk, off, left, right = map(int, lines[0].split())
        mask = visibility_mask(sq, sk, left, right, off, "cpu")
        keys = [set(mask[i].nonzero().flatten().tolist()) for i in range(sq)]
        rows = [set(mask[:, j].nonzero().flatten().tolist()) for j in range(sk)]
        case = f"sq={sq} sk={sk} off={off} left={left} right={right}"
        for line in lines[1:]:
            kind, a, lo, hi = line.split()[0], *map(int, line.split()[1:])
            if kind == "Q":
                assert set(range(lo, hi)) == keys[a], f"{case}: query {a} keys [{lo}, {hi})"
            elif kind == "K":
                assert set(range(lo, hi)) == rows[a], f"{case}: key {a} queries [{lo}, {hi})"
            else:  # N: the key blocks of rows [a, a + 4); M: the query blocks of keys [a, a + 4)
                seen = set().union(*(keys[i] for i in range(a, min(a + 4, sq)))) if kind == "N" else \
                    set().union(*(rows[j] for j in range(a, min(a + 4, sk))))
                need = blocks(seen)
                got = list(range(lo, hi))
                assert set(need) <= set(got), f"{case}: {kind} block {a}: {got} misses {need}"
                assert not got or (got[0] in need and got[-1] in need), f"{case}: {kind} block {a}: {got} vs {need}"
        windows += 1
    assert windows == 3 * 3 * 5 * 4 * 4


def _listed_archs() -> list[str]:
    out = subprocess.run([NVCC, "--list-gpu-arch"], capture_output=True, text=True).stdout.split()
    return [a for a in ("100", "120") if f"compute_{a}" in out]


@pytest.mark.slow
def test_compiles_for_blackwell_archs(tmp_path):
    archs = _listed_archs()
    if not archs:
        pytest.skip("this nvcc lists neither sm_100 nor sm_120")
    jobs = [(src, a) for a in archs for src in sorted(CUDA_DIR.glob("*.cu"))]

    def compile_one(job):
        src, arch = job
        proc = subprocess.run([NVCC, "-c", *BUILD_FLAGS, "-I", str(ROOT / "csrc"), f"--gpu-architecture=sm_{arch}",
                               str(src), "-o", str(tmp_path / f"{src.stem}_{arch}.o")], capture_output=True, text=True)
        return src.name, arch, proc.returncode, proc.stderr[-2000:]

    with ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
        failures = [r for r in pool.map(compile_one, jobs) if r[2] != 0]
    assert not failures, failures

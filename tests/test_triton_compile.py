"""kernels/compile_check.py compiles the Triton kernels as the JIT does, and the autotune
candidates it measured hold (issue 19).

Register and spill counts without the JIT's specialisation (16-byte aligned pointers,
strides divisible by 16, constants equal to 1) were wrong by up to thousands of bytes of
spills, and the config tables were chosen from them. Runs the compiler in a subprocess
(compile_check must unset TRITON_INTERPRET before triton is imported); needs triton's
bundled ptxas, no GPU.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, timeout: int) -> str:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=ROOT)
    if proc.returncode != 0 and ("ptxas" in proc.stderr and "not found" in proc.stderr):
        pytest.skip("triton's ptxas is not available")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def _config_rows(arch: int, defaults_only: bool = False) -> list:
    """[name, spill bytes (stores + loads), shared memory bytes] of every autotune candidate
    (or only the defaults, names ending in '*') compiled for ``arch`` as the JIT does."""
    out = _run(
        "import json, re\n"
        "from kernels import compile_check as cc\n"
        "for name, fn, dt, consts, w, s in cc.config_cases():\n"
        f"    if {defaults_only!r} and not name.endswith('*'):\n"
        "        continue\n"
        f"    k = cc.compile_kernel(fn, dt, consts, w, s, {arch})\n"
        f"    info = cc._ptxas_info(k, {arch})\n"
        "    m = re.search(r'(\\d+) bytes spill stores, (\\d+) bytes spill loads', info)\n"
        "    print(json.dumps([name, int(m.group(1)) + int(m.group(2)), k.metadata.shared]), flush=True)\n",
        timeout=1800,
    )
    rows = [json.loads(ln) for ln in out.splitlines() if ln.startswith("[")]
    assert rows
    return rows


pytest.importorskip("triton")


def test_compiles_with_the_jit_specialisation():
    out = _run(
        "from kernels import compile_check as cc\n"
        "name, fn, dt, consts, w, s = [c for c in cc.cases() if c[0] == 'fwd'][0]\n"
        "k = cc.compile_kernel(fn, dt, consts, w, s, 90)\n"
        "u = cc.compile_kernel(fn, dt, consts, w, s, 90, specialize=False)\n"
        "import json\n"
        "print(json.dumps([k.asm['ttir'].count('tt.divisibility = 16'), u.asm['ttir'].count('tt.divisibility = 16')]))\n",
        timeout=300,
    )
    specialised, plain = json.loads(out.strip().splitlines()[-1])
    # every pointer and stride of the forward kernel is marked, as the JIT marks them
    assert specialised >= 20 and plain == 0, (specialised, plain)


@pytest.mark.slow
def test_config_tables_spill_little():
    # Defaults (first entries: FLASHATTN_TRITON_AUTOTUNE=0) must not spill at all; other
    # candidates at most a few bytes (16-bit) and fp32 (IEEE dots) none heavily.
    rows = _config_rows(90)
    bad = [r for r in rows if (r[0].endswith("*") and r[1] > 0) or r[1] > 64]
    assert not bad, bad
    # each (kind, dtype, head-dim class) keeps a candidate that fits 99 KB per block (sm86/89)
    groups: dict[str, list[int]] = {}
    for name, _, shared in rows:
        groups.setdefault(name.rsplit("_", 3)[0], []).append(shared)
    assert all(min(v) <= 101376 for v in groups.values()), groups


@pytest.mark.slow
def test_default_configs_fit_consumer_gpus():
    # The defaults are launched alone with FLASHATTN_TRITON_AUTOTUNE=0, so on sm86/89/120
    # (99 KB of shared memory per block) each must fit as compiled for sm86.
    too_big = [r for r in _config_rows(86, defaults_only=True) if r[2] > 101376]
    assert not too_big, too_big

#!/usr/bin/env bash
# make wheel-check: install the one wheel in dist/ into a fresh venv per torch version
# (default: 2.13.0 and 2.14.1, on this machine's disk; 2.11.0, the oldest the wheel
# targets, is a CUDA build of about 3 GB from PyPI) and run the smoke test and the CPU
# suite there, from a copy of tests/ outside the source tree (so `import flashattn_py` is
# the installed wheel).
# Usage: tools/wheel_check.sh [torch versions...]; logs in build/wheel-check/.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
wheels=(dist/flashattn_py-*.whl)
if [ ${#wheels[@]} -ne 1 ] || [ ! -f "${wheels[0]}" ]; then
  echo "wheel-check: expected exactly one wheel in dist/ (run make wheel), found: ${wheels[*]}" >&2
  exit 2
fi
wheel=$(realpath "${wheels[0]}")
versions=("$@")
[ ${#versions[@]} -eq 0 ] && versions=(2.13.0 2.14.1)
root=$(realpath build)/wheel-check
mkdir -p "$root"
status=0
for version in "${versions[@]}"; do
  env_dir=$root/torch-$version
  work=$root/tests-$version
  log=$root/torch-$version.log
  rm -rf "$env_dir" "$work"
  mkdir -p "$work"
  # the suite and the source files some tests read (never flashattn_py/: the wheel is tested)
  cp -r tests examples benchmarks kernels csrc docs pyproject.toml README.md setup.py "$work"/
  {
    echo "== torch $version, wheel $(basename "$wheel")"
    $PYTHON -m venv "$env_dir" &&
      "$env_dir/bin/python" -m pip install -q "torch==$version" &&
      ("$env_dir/bin/python" -c "import triton" 2>/dev/null || "$env_dir/bin/python" -m pip install -q triton==3.8.0) &&
      # (triton 3.6's interpreter, torch 2.11's, fails on NumPy 2.4: "only 0-dimensional
      # arrays can be converted to Python scalars")
      numpy_spec=$("$env_dir/bin/python" -c "
import triton
print('numpy<2.4' if tuple(map(int, triton.__version__.split('.')[:2])) < (3, 7) else 'numpy')" | tail -1) &&
      "$env_dir/bin/python" -m pip install -q "$numpy_spec" pytest hypothesis expecttest tqdm &&
      # (the Makefile's transformers, for its integration tests; it needs Python >= 3.11,
      # and without it those tests skip)
      if "$env_dir/bin/python" -c "import sys; sys.exit(sys.version_info < (3, 11))"; then
        "$env_dir/bin/python" -m pip install -q "transformers==5.25.0"
      else
        echo "Python < 3.11: no transformers 5.25.0, its tests skip"
      fi &&
      "$env_dir/bin/python" -m pip install -q --no-deps "$wheel" &&
      (cd "$work" && "$env_dir/bin/python" -c "
import torch, flashattn_py
assert flashattn_py.backends.compiled_ops_error() is None, flashattn_py.backends.compiled_ops_error()
from flashattn_py import _C
q = torch.randn(1, 64, 2, 32, requires_grad=True)
flashattn_py.flash_attn_func(q, q, q, causal=True).sum().backward()
print('smoke: torch', torch.__version__, '| CPU kernels', _C.CPU_KERNELS, '| ok')") &&
      (cd "$work" && "$env_dir/bin/pytest" -q -p no:cacheprovider 2>&1)
  } > "$log" 2>&1
  rc=$?
  grep -E "^(smoke|FAILED|ERROR)|[0-9]+ passed" "$log" | tail -12
  if [ $rc -ne 0 ] || ! grep -q "smoke:.*ok" "$log" || grep -qE "[0-9]+ (failed|error)" "$log"; then
    echo "wheel-check: torch $version FAILED (log: $log)"
    status=1
  else
    echo "wheel-check: torch $version passed"
  fi
done
exit $status

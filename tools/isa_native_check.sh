#!/usr/bin/env bash
# Each instruction set's kernels in the default build vs a "native" build of that set
# (-march=<cpu> added, FLASHATTN_CPU_ISA_MARCH): outputs and gradients on the
# snapshot (tests/snapshot.py), bitwise. Runs the sets this CPU runs.
# Usage: tools/isa_native_check.sh [isa=cpu ...] (default: avx2=haswell
# avx512=skylake-avx512 avx512bf16=cooperlake); needs the default build in place (make setup).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
case $PY in /*) ;; *) PY=$PWD/$PY ;; esac  # (also run from the copy below)
pairs=("$@")
[ ${#pairs[@]} -eq 0 ] && pairs=(avx2=haswell avx512=skylake-avx512 avx512bf16=cooperlake)
march=$(IFS=';'; echo "${pairs[*]}")
native=$(mktemp -d /tmp/flashattn-native.XXXXXX)
git ls-files -z | xargs -0 cp --parents -t "$native"
(cd "$native" && FLASHATTN_CPU_ISA_MARCH="$march" MAX_JOBS=${MAX_JOBS:-2} "$PY" setup.py -q build_ext --inplace \
  > build.log 2>&1) || { tail -20 "$native/build.log"; exit 1; }
status=0
for pair in "${pairs[@]}"; do
  isa=${pair%%=*}
  if ! FLASHATTN_CPU_ISA=$isa "$PY" -c "import flashattn_py" 2>/dev/null; then
    echo "$isa: this CPU does not run it, skipped"; continue
  fi
  record=$native/$isa.pt
  FLASHATTN_CPU_ISA=$isa PYTHONPATH=$native "$PY" tests/snapshot.py record "$record" > /dev/null
  if FLASHATTN_CPU_ISA=$isa PYTHONPATH=$PWD "$PY" tests/snapshot.py compare "$record" | tee "$native/$isa.txt" \
      | grep -qE "cases: 0 tensors differ;"; then
    echo "$isa (native: -march=${pair#*=}): $(tail -1 "$native/$isa.txt")"
  else
    echo "$isa (native: -march=${pair#*=}): DIFFERS: $(tail -1 "$native/$isa.txt")"; status=1
  fi
done
echo "native build kept in $native"
exit $status

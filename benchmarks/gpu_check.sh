#!/usr/bin/env bash
# The one script run on the lent GPU machine (H200, sm90, torch+cu130, triton 3.6,
# nvcc 13.0, no network). In under 8 minutes:
#   1. environment (nvidia-smi, versions), then usable backends   -> $OUT/env.log
#   2. build the CUDA ops for sm90 (pip install -e ., offline), or
#      unpack a prebuilt wheel's libraries (GPU_CHECK_WHEEL)       -> $OUT/build.log
#   3. tests: pytest -m gpu --maxfail=15 (xdist workers if there)  -> $OUT/pytest.log
#   4. dense: ours (triton, cuda) vs torch SDPA, the table          -> $OUT/bench.log, attention.csv
#   5. decode: decoding from a KV cache (bench_decode.py), per backend -> $OUT/decode.log
#   6. varlen: packed sequences (bench_varlen.py), per backend      -> $OUT/varlen.log
#   7. profile (only when asked; with a wheel, or it squeezes the benchmarks): Nsight
#      Compute sections of benchmarks/gpu_profile.py's launches      -> $OUT/profile.log
#   8. a one-line status summary, LAST.
# At most eight files: the device tool returns no more. A failing step is recorded and the
# script goes on (a broken CUDA build still gives the Triton numbers). Each step's time is
# capped so the whole stays within the budget; when time runs short the build comes first,
# then the tests, then the benchmarks in order (their rows so far survive a cut). The build
# takes about 3 minutes on the H200 machine: a wheel built beforehand (GPU_CHECK_WHEEL)
# leaves that time to the benchmarks.
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine
#   GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh # anywhere: no build, tiny CPU benchmarks
#
# Saving the build's 3 minutes of GPU time: build the wheel beforehand on any machine with
# nvcc (about 7 minutes on 2 cores, torch's CUDA build from PyPI included),
#   make wheel VENV=.venv-cu TORCH_SPEC=torch==2.14.1 CUDA_HOME=/usr/local/cuda FLASHATTN_CUDA_ARCHS=90
# take dist/ along to the GPU machine, and run there with
#   GPU_CHECK_WHEEL=dist/flashattn_py-0.1.0-cp310-abi3-linux_x86_64.whl bash benchmarks/gpu_check.sh
#
# Env: OUT (default benchmarks/out/gpu), PYTHON (default python), GPU_CHECK_DRY=1,
#      GPU_CHECK_BUDGET_S (default 480, whole-script budget in seconds),
#      GPU_CHECK_STEPS (default "tests dense decode varlen"; add "profile"),
#      GPU_CHECK_TESTS (pytest paths / node ids instead of every tests/test_*.py),
#      GPU_CHECK_WHEEL (a wheel built elsewhere, e.g. `make wheel` with a CUDA torch:
#      its compiled libraries are used instead of building; the build runs if they do
#      not load their CUDA ops).
set -u
# (a relative wheel path is the caller's, before the cd)
WHEEL=${GPU_CHECK_WHEEL:-}
[[ -n $WHEEL ]] && WHEEL=$(realpath "$WHEEL")
cd "$(dirname "$0")/.."

OUT=${OUT:-benchmarks/out/gpu}
PY=${PYTHON:-python}
DRY=${GPU_CHECK_DRY:-0}
BUDGET=${GPU_CHECK_BUDGET_S:-480}
STEPS=" ${GPU_CHECK_STEPS:-tests dense decode varlen} "
for s in $STEPS; do
  case $s in tests|dense|decode|varlen|profile) ;; *) echo "GPU_CHECK_STEPS: unknown step '$s'" >&2; exit 2 ;; esac
done
SCRATCH=$(mktemp -d)   # benchmark outputs not returned (json, md, per-backend csv)
mkdir -p "$OUT"
# (a reused OUT must not pass an earlier run's results off as this one's)
rm -f "$OUT"/{env,build,pytest,bench,decode,varlen,profile}.log "$OUT/attention.csv"
export PYTHONUNBUFFERED=1
START=$(date +%s)

wanted() { [[ $STEPS == *" $1 "* ]]; }
# Seconds each benchmark step may take: the time later steps keep back.
secs() { wanted "$1" && echo "$2" || echo 0; }
DENSE_S=$(secs dense 80)
DECODE_S=$(secs decode 35)    # each backend's
VARLEN_S=$(secs varlen 40)    # each backend's (Triton's compiles take most of it)
PROFILE_S=$(secs profile 60)
TESTS_S=$(secs tests 90)      # what the tests took on the H200 (67-81 s with 8 workers)

left() { echo $((BUDGET - ($(date +%s) - START))); }
# cap N: the smaller of N and the time left minus what later steps still need ($2), at
# least 10 s (the probes below have fixed timeouts: a hung CUDA init must not take the run)
cap() { local want=$1 reserve=$2 l; l=$(( $(left) - reserve )); (( l < want )) && want=$l; (( want < 10 )) && want=10; echo "$want"; }
step() { echo; echo "=== $* ($(( $(date +%s) - START )) s)"; }
status_of() { case $1 in 0) echo ok ;; 124|137) echo "timeout" ;; *) echo "failed(rc=$1)" ;; esac; }
# pytest without the checkout's root on sys.path (`python -m pytest` puts it first, and its
# kernels/ then shadows Hugging Face's `kernels` package, which transformers 5.25+ imports;
# pytest-xdist's workers take the same sys.path)
RUN_PYTEST=("$PY" -c 'import sys; sys.path = [p for p in sys.path if p not in ("", ".")]; import pytest; sys.exit(pytest.main())')
has_cuda_ops() { timeout 120 "$PY" -c 'import torch, flashattn_py._C; assert torch._C._dispatch_has_kernel_for_dispatch_key("flashattn::fwd", "CUDA")' 2>&1; }

step "environment"
{
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown) $(git status --porcelain 2>/dev/null | grep -q . && echo '(dirty)')"
  echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "steps:$STEPS"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || echo "nvidia-smi: not available"
  nvcc --version 2>&1 | tail -1 || true
  timeout 120 "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda, "| gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'
  "$PY" -c 'import triton; print("triton", triton.__version__)' 2>&1 || true
  "$PY" -c 'import xdist; print("pytest-xdist", xdist.__version__)' 2>&1 | tail -1
} 2>&1 | tee "$OUT/env.log"

step "build CUDA ops (sm90)"
BUILD=""
if [[ $DRY == 1 ]]; then
  BUILD=skipped
  echo "dry run: build skipped" | tee "$OUT/build.log"
elif [[ -n $WHEEL ]]; then
  # The wheel's libraries beside the sources, the package itself installed pure-Python
  # (the editable install maps kernels/ to flashattn_py.kernels).
  { echo "prebuilt: $WHEEL"; "$PY" - "$WHEEL" <<'EOF' &&
import pathlib, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    for name in wheel.namelist():
        if name.startswith("flashattn_py/") and name.count("/") == 1 and name.endswith(".so"):
            pathlib.Path(name).write_bytes(wheel.read(name))
            print("unpacked", name)
EOF
    FLASHATTN_SKIP_EXT=1 timeout 60 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . &&
    has_cuda_ops; } >"$OUT/build.log" 2>&1
  RC=$?
  BUILD="wheel=$(status_of $RC)"
  echo "$BUILD" | tee -a "$OUT/build.log"
  [[ $RC != 0 ]] && { rm -f flashattn_py/*.so; BUILD="$BUILD,"; }
fi
if [[ -z $BUILD || $BUILD == *, ]]; then
  T=$(cap 200 "$TESTS_S")
  echo "timeout ${T}s" | tee -a "$OUT/build.log"
  FLASHATTN_CUDA_ARCHS=90 MAX_JOBS=16 timeout "$T" \
    "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e . 2>&1 | tee -a "$OUT/build.log" | grep -E "error|Error|warning: |Successfully|nvcc" | tail -40
  RC=${PIPESTATUS[0]}
  BUILD="${BUILD}build=$(status_of "$RC")"
  if [[ $RC != 0 ]]; then
    # Without an install flashattn_py.kernels (kernels/) does not import: install the
    # pure-Python package so the Triton backend is still measured.
    echo "CUDA build failed: pure-Python install (FLASHATTN_SKIP_EXT=1) so triton still runs" | tee -a "$OUT/build.log"
    FLASHATTN_SKIP_EXT=1 timeout 60 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . >>"$OUT/build.log" 2>&1
    BUILD="$BUILD,pure-python-install=$(status_of $?)"
  fi
fi
echo "build: $BUILD"

step "available backends"
timeout 120 "$PY" -c 'import flashattn_py; print("cuda backends:", flashattn_py.available_backends("cuda"))' 2>&1 | tee -a "$OUT/env.log"
BACKENDS=$(grep -o "cuda backends: \[.*\]" "$OUT/env.log" | tail -1 | grep -o "\[.*\]")

PYTEST=skipped PYTEST_LINE=""
if wanted tests; then
  step "pytest -m gpu"
  # (at most 150 s: a hang must not take the benchmarks' time; 60 s kept for them)
  if [[ $DRY == 1 ]]; then T=60; else T=$(cap 150 60); fi
  # Every gpu test, the launch-geometry / graph / stride / offset checks (issue 19) first:
  # they are quick and each one covers a defect no CPU test can show. No -x: one failure
  # must not hide the others on a rare GPU run; --maxfail bounds a broken build's time.
  # With pytest-xdist, 8 workers share the GPU (Triton's compiles dominate and run on the
  # CPUs); -v logs each test as it ends, so a timeout still leaves the results so far.
  if [[ -n ${GPU_CHECK_TESTS:-} ]]; then
    read -r -a TESTS <<<"$GPU_CHECK_TESTS"
  else
    TESTS=(tests/test_gpu_launch.py tests/test_fake_strides.py tests/test_triton_offsets.py)
    for f in tests/test_*.py; do [[ " ${TESTS[*]} " == *" $f "* ]] || TESTS+=("$f"); done
  fi
  PARALLEL=()
  if [[ $DRY != 1 ]] && "$PY" -c 'import xdist' 2>/dev/null; then PARALLEL=(-n 8); fi
  timeout "$T" "${RUN_PYTEST[@]}" -m gpu -v -p no:cacheprovider --maxfail=15 --durations=15 "${PARALLEL[@]}" \
    "${TESTS[@]}" 2>&1 | tee "$OUT/pytest.log" | grep -E "FAILED|ERROR|passed|failed|skipped" | tail -40
  RC=${PIPESTATUS[0]}
  PYTEST=$(status_of "$RC")
  [[ $RC == 5 ]] && PYTEST="no tests collected"
  PYTEST_LINE=$(grep -E "^=+ .*(passed|failed|error|skipped|no tests ran)" "$OUT/pytest.log" | tail -1)
fi

BENCH=skipped
if wanted dense; then
  step "dense benchmark vs torch SDPA"
  if [[ $DRY == 1 ]]; then
    BENCH_ARGS=(--device cpu --dtypes fp32 --head-dims 32 --seqlens 128,256 --causal both
                --modes fwd,fwd+bwd --batch 1 --heads 2 --repeats 2 --matmul-size 512
                --backends ours,sdpa-flash,sdpa-math)
  else
    # 16k tokens x 16 heads, D=128: N=2048 -> B=8 (128 heads of work), N=8192 -> B=2 (32).
    BENCH_ARGS=(--device cuda --dtypes bf16 --head-dims 128 --seqlens 2048,8192 --causal both
                --modes fwd,fwd+bwd --tokens 16384 --heads 16
                --backends triton,cuda,sdpa-flash,sdpa-cudnn,sdpa-efficient)
  fi
  T=$(cap "$DENSE_S" $((2 * DECODE_S + 2 * VARLEN_S + PROFILE_S + 5)))
  timeout "$T" "$PY" benchmarks/bench_attention.py "${BENCH_ARGS[@]}" --out "$SCRATCH/dense" --no-plot --no-progress \
    2>&1 | tee "$OUT/bench.log" | grep -E "^#|Error|error" | head -20
  RC=${PIPESTATUS[0]}
  BENCH=$(status_of "$RC")
  cp "$SCRATCH/dense/attention.csv" "$OUT/attention.csv" 2>/dev/null
fi

# One benchmark script per backend into $SCRATCH/<name>-<backend>, its stdout and its CSV
# (partial rows survive a timeout) appended to $OUT/<name>.log. $1 name, $2 reserve after
# this one, $3 seconds wanted, the rest: arguments. Progress goes to stderr, the status
# line to stdout (not `tee /dev/stderr`: reopening a redirected stderr truncates its file).
per_backend() {
  local name=$1 reserve=$2 want=$3 backend rc status=""
  shift 3
  for backend in cuda triton; do
    [[ $DRY == 1 ]] && backend=cpu
    step "$name, backend $backend" | tee -a "$OUT/$name.log" >&2
    FLASHATTN_BACKEND=$backend timeout "$(cap "$want" "$reserve")" "$PY" "benchmarks/bench_$name.py" "$@" \
      --out "$SCRATCH/$name-$backend" --no-progress >>"$OUT/$name.log" 2>&1
    rc=$?
    echo "--- $name.csv ($backend)" >>"$OUT/$name.log"
    cat "$SCRATCH/$name-$backend/$name.csv" >>"$OUT/$name.log" 2>/dev/null
    grep -E "^#|Error" "$OUT/$name.log" | tail -3 >&2
    status="$status$backend=$(status_of $rc),"
    [[ $DRY == 1 ]] && break
    reserve=$((reserve - want)); (( reserve < 0 )) && reserve=0
  done
  echo "${status%,}"
}

if [[ $DRY == 1 ]]; then
  DECODE_ARGS=(--device cpu --quick); VARLEN_ARGS=(--device cpu --quick)
else
  # Sq=1 (the GPU bar's; Sq=4 would double the cases in the same budget), Hq/Hk 32/8, D=128
  # (the issue's decode shape); page 16 for the paged rows.
  DECODE_ARGS=(--device cuda --dtypes bf16 --shapes 1x8192,8x8192,32x8192 --queries 1)
  VARLEN_ARGS=(--device cuda --dtypes bf16)
fi
DECODE=skipped VARLEN=skipped PROFILE=skipped
if wanted decode; then
  DECODE=$(per_backend decode $((DECODE_S + 2 * VARLEN_S + PROFILE_S + 5)) "$DECODE_S" "${DECODE_ARGS[@]}")
fi
if wanted varlen; then
  VARLEN=$(per_backend varlen $((VARLEN_S + PROFILE_S + 5)) "$VARLEN_S" "${VARLEN_ARGS[@]}")
fi

if wanted profile && [[ $DRY != 1 ]]; then
  step "profile (Nsight Compute)"
  # Sections that place a kernel's time without reading the source: throughput against
  # the peaks, occupancy and its limits, memory traffic, where warps stall.
  timeout "$(cap "$PROFILE_S" 5)" ncu --profile-from-start off --clock-control none \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis \
    --section WarpStateStats --section SchedulerStats \
    "$PY" benchmarks/gpu_profile.py >"$OUT/profile.log" 2>&1
  PROFILE=$(status_of $?)
  grep -E "^  [a-z_]|==ERR|# profiled" "$OUT/profile.log" | head -20
fi

if wanted dense; then
  step "results (table: x torch = fastest sdpa-* ms / this ms; >1 is faster than torch)"
  timeout 60 "$PY" benchmarks/summarize.py "$OUT/attention.csv" | tee -a "$OUT/bench.log"
fi
rm -rf "$SCRATCH"
echo
echo "SUMMARY: build=$BUILD backends=${BACKENDS:-?} pytest=$PYTEST (${PYTEST_LINE:-no summary line}) bench=$BENCH decode=$DECODE varlen=$VARLEN profile=$PROFILE total=$(( $(date +%s) - START ))s out=$OUT"

"""Helpers shared by the benchmark scripts: flop counts, timing, peak memory,
failure classification, the matmul reference rate, progress and output files.

Nothing here knows about attention backends; ``bench_attention.py`` and
``bench_model.py`` build their cases and call these.
"""
from __future__ import annotations

import csv
import ctypes
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

# Forward is 2 matmuls of 2*Sq*Sk*D flops each; backward is 2.5x forward
# (5 matmuls, the flash-attn convention); fwd+bwd is the sum.
MODE_FACTORS = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp64": torch.float64,
    "float64": torch.float64,
}


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}[dtype]


def attention_flops(
    batch: int, heads: int, seqlen_q: int, seqlen_k: int, head_dim: int, causal: bool, mode: str = "fwd"
) -> float:
    """Flops of one attention call, docs/design.md's convention.

    fwd = 4 * B * H * Sq * Sk * D, halved when causal; bwd = 2.5 * fwd; fwd+bwd = 3.5 * fwd.
    """
    fwd = 4.0 * batch * heads * seqlen_q * seqlen_k * head_dim
    if causal:
        fwd /= 2
    return fwd * MODE_FACTORS[mode]


# ----------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_cpu_ms(fn: Callable[[], Any], repeats: int = 3, min_run_time: float = 0.05) -> float:
    """Median milliseconds of ``fn()`` on the CPU (see time_cpu_interleaved)."""
    result = time_cpu_interleaved({"fn": fn}, rounds=repeats, min_run_time=min_run_time)["fn"]
    if isinstance(result, Exception):
        raise result
    return result


def time_cpu_interleaved(
    fns: dict[str, Callable[[], Any]], rounds: int = 3, min_run_time: float = 0.05,
    before_each: Callable[[], Any] | None = None,
) -> dict[str, float | Exception]:
    """Median milliseconds per call of each ``fns[name]()``, timed in alternation.

    The callers have warmed the functions up (a first call can be several times slower).
    A CPU shared with other work drifts by 10-20 % over seconds, so timing one method
    after another biases their ratio; here each of ``rounds`` rounds takes one sample of
    every function, in an order rotated from round to round and, for three or more,
    reversed every other round (each function follows two different ones). A sample is a
    block of calls meant to last ``min_run_time`` s (the count comes from one probe call;
    one call for slow cases), timed with perf_counter on all of torch's intra-op threads. With ``before_each`` a sample is one
    call after ``before_each()`` (untimed; e.g. evicting the caches). A function that
    raises gets its exception as its result and leaves the later rounds.
    """
    def block(fn: Callable[[], Any], calls: int) -> float:
        if before_each is not None:
            before_each()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - start) / calls

    results: dict[str, float | Exception] = {}
    calls: dict[str, int] = {}
    for name, fn in fns.items():
        try:
            first = block(fn, 1)
        except Exception as exc:  # noqa: BLE001 - reported as the result
            results[name] = exc
            continue
        calls[name] = (1 if before_each is not None or first >= min_run_time
                       else max(1, math.ceil(min_run_time / max(first, 1e-9))))
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(max(1, rounds)):
        names = [name for name in calls if name not in results]
        if not names:
            break
        shift = r % len(names)
        order = names[shift:] + names[:shift]
        if r % 2 and len(order) > 2:  # (so that a method does not always follow the same one;
            order.reverse()             # two alternate by the rotation alone)
        for name in order:
            try:
                samples[name].append(block(fns[name], calls[name]))
            except Exception as exc:  # noqa: BLE001
                results[name] = exc
    for name, times in samples.items():
        if name not in results:
            results[name] = statistics.median(times) * 1e3
    return results


def time_cuda_ms(fn: Callable[[], Any], repeats: int = 20, rep_ms: int = 100) -> float:
    """Median milliseconds of ``fn()`` on the GPU.

    triton.testing.do_bench (it warms up, flushes L2 between calls and runs about
    ``rep_ms`` ms of calls); without Triton, CUDA events over ``repeats`` calls after
    a warm-up of 3.
    """
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        return float(do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def time_ms(fn: Callable[[], Any], device: torch.device, repeats: int, min_run_time: float = 0.05) -> float:
    """Median ms of ``fn()`` on ``device`` (see time_cpu_ms / time_cuda_ms)."""
    if device.type == "cuda":
        return time_cuda_ms(fn, repeats=max(repeats, 10))
    return time_cpu_ms(fn, repeats=repeats, min_run_time=min_run_time)


# ----------------------------------------------------------------------------- memory


def _proc_status_kib(*keys: str) -> dict[str, int]:
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in keys:
                values[key] = int(rest.split()[0])
    return values


def _reset_cpu_peak() -> bool:
    """Return freed heap to the OS (torch's and flashattn_py's kept outputs) and reset this
    process's peak RSS (VmHWM)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    # (memory kept by our output pool would otherwise count as live before the call:
    # ours would look smaller than it is)
    import flashattn_py

    flashattn_py.empty_cpu_cache()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the peak resident set size to the current one
        return True
    except OSError:
        return False


def peak_memory_bytes(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Extra memory at the peak of one ``fn()`` call, beyond what was live before it.

    GPU: ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` before the call
    (exact, caching-allocator bytes). CPU (Linux): growth of the process's peak
    resident set (VmHWM, reset through /proc/self/clear_refs after malloc_trim) over
    the resident set before the call. Approximate: it counts pages touched, so memory
    the allocator kept from earlier calls is not counted again. None where it cannot
    be measured (not Linux).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if not sys.platform.startswith("linux") or not _reset_cpu_peak():
        return None
    before = _proc_status_kib("VmRSS")["VmRSS"]
    fn()
    peak = _proc_status_kib("VmHWM")["VmHWM"]
    return max(0, peak - before) * 1024


# ----------------------------------------------------------------------------- failures


def classify_failure(exc: BaseException) -> str:
    """'oom', 'unsupported' or 'error' for an exception raised by a benchmarked call."""
    msg = str(exc).lower()
    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in msg:
        return "oom"
    if isinstance(exc, (ValueError, NotImplementedError)):
        return "unsupported"
    if "no available kernel" in msg or "no viable backend" in msg:
        return "unsupported"
    return "error"


def mark_failed(row: dict, exc: BaseException, drop: Sequence[str] = ()) -> None:
    """Turn ``row`` into a failure row: status from classify_failure, the first line of the
    message as ``error``, and the measurements named in ``drop`` cleared."""
    for key in drop:
        row[key] = None
    row["status"] = classify_failure(exc)
    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def fill_timings(rows: list[dict], name_key: str, timed: dict[str, float | Exception],
                 drop: Sequence[str] = ()) -> None:
    """Store time_cpu_interleaved's results in the rows (row[name_key] names the function):
    ms, or a failure row for a function that raised."""
    for row in rows:
        result = timed.get(row[name_key])
        if isinstance(result, Exception):
            mark_failed(row, result, drop)
        elif result is not None:
            row["ms"] = result


def free_memory(device: torch.device, collect: bool = False) -> None:
    """Release cached memory; ``collect``: first run the (slow) cycle collector, needed
    after an exception, whose traceback keeps the failed call's tensors alive."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- ratios

SETTING_KEYS = ("mode", "dtype", "head_dim", "causal", "seqlen", "batch", "heads")


def add_ratios(rows: list[dict], torch_names: set[str], matmul_tflops: float | None = None) -> None:
    """In place: ``x_torch`` = fastest torch ms in the same setting / this row's ms
    (above 1: faster than the best torch backend); ``pct_matmul`` = TFLOP/s as a
    percentage of ``matmul_tflops``. Rows whose status is not "ok" get neither."""
    key = lambda r: tuple(str(r[k]) for k in SETTING_KEYS)  # noqa: E731 - CSV rows hold strings
    best: dict[tuple, float] = {}
    for r in rows:
        if r["backend"] in torch_names and r["status"] == "ok":
            best[key(r)] = min(best.get(key(r), math.inf), float(r["ms"]))
    for r in rows:
        if r["status"] != "ok":
            continue
        r["x_torch"] = best[key(r)] / float(r["ms"]) if key(r) in best else None
        if matmul_tflops:
            r["pct_matmul"] = 100.0 * float(r["tflops"]) / matmul_tflops


# ----------------------------------------------------------------------------- reference rate


def matmul_tflops(device: torch.device, n: int = 2048, dtype: torch.dtype | None = None) -> tuple[float, str]:
    """TFLOP/s of ``torch.mm`` on n x n matrices: fp32 on CPU, bf16 on GPU."""
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    fn = lambda: torch.mm(a, b)  # noqa: E731
    fn()
    synchronize(device)
    ms = time_ms(fn, device, repeats=5, min_run_time=0.3)
    return 2.0 * n**3 / (ms * 1e-3) / 1e12, f"torch.mm {n}^3 {dtype_name(dtype)}"


# ----------------------------------------------------------------------------- environment


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: torch.device) -> dict[str, Any]:
    info = {
        "device": device_description(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    try:
        from flashattn_py import _C

        info["cpu_kernels"] = _C.CPU_KERNELS
    except ImportError:
        info["cpu_kernels"] = None
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


# ----------------------------------------------------------------------------- progress / output


class _Counter:
    """A minimal stderr progress counter, used when tqdm is not installed."""

    def __init__(self, iterable: Iterable, total: int, desc: str):
        self.iterable, self.total, self.desc, self.postfix = iterable, total, desc, ""

    def __iter__(self):
        start = time.perf_counter()
        for i, item in enumerate(self.iterable, 1):
            yield item
            elapsed = time.perf_counter() - start
            sys.stderr.write(f"\r{self.desc}: {i}/{self.total} [{elapsed:.0f}s] {self.postfix[:60]:<60}")
            sys.stderr.flush()
        sys.stderr.write("\n")

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text


def progress(iterable: Iterable, total: int, desc: str, enabled: bool = True):
    """tqdm over ``iterable`` if installed, else a simple stderr counter."""
    if not enabled:
        return _Silent(iterable)
    try:
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)
    except ImportError:
        return _Counter(iterable, total, desc)


class _Silent:
    def __init__(self, iterable: Iterable):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def set_postfix_str(self, text: str) -> None:
        pass


def fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """Plain-text table: ``columns`` is [(key, header)], numbers right-aligned."""
    cells = [[fmt(row.get(key)) for key, _ in columns] for row in rows]
    headers = [header for _, header in columns]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    for c in cells:
        lines.append("  ".join(v.rjust(w) for v, w in zip(c, widths)))
    return "\n".join(lines)


def write_csv(rows: Sequence[dict], path: Path, fieldnames: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fieldnames), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fieldnames})


def write_json(payload: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=str)


def save_run(out_dir: Path, stem: str, rows: list[dict], csv_fields, env: dict, args, elapsed: float, targets,
             summary: str) -> None:
    """A benchmark run's outputs: out_dir/stem.csv (rows), .json (environment, arguments,
    targets, rows), .md (the summary)."""
    write_csv(rows, out_dir / f"{stem}.csv", csv_fields)
    payload = {
        "environment": env,
        "elapsed_s": elapsed,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "targets": targets,
        "rows": rows,
    }
    write_json(payload, out_dir / f"{stem}.json")
    (out_dir / f"{stem}.md").write_text(summary)
    print(f"# wrote {out_dir / (stem + '.csv')}, {out_dir / (stem + '.json')}, {out_dir / (stem + '.md')}")


def run_cases(todo, stem: str, describe, measure, args, csv_fields, table_columns, legend: str, markdown,
              evaluate_targets, env: dict) -> list[dict]:
    """Measure each case of ``todo`` (``measure(case) -> rows``, ``describe(case)`` for the
    progress bar), writing out_dir/stem.csv as rows come (partial results survive a kill),
    then print the table, ``legend`` and the markdown summary and save the run (save_run)."""
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    start = time.perf_counter()
    bar = progress(todo, total=len(todo), desc=stem, enabled=not args.no_progress)
    for case in bar:
        bar.set_postfix_str(describe(case))
        rows.extend(measure(case))
        write_csv(rows, args.out / f"{stem}.csv", csv_fields)
    elapsed = time.perf_counter() - start
    env["load_after"] = load_average()
    print(format_table(rows, table_columns))
    print(f"# {len(rows)} rows in {elapsed:.0f} s; {legend}")
    summary = markdown(rows, env, args, elapsed)
    print(summary)
    save_run(args.out, stem, rows, csv_fields, env, args, elapsed, evaluate_targets(rows), summary)
    return rows


def check_choices(p, flag: str, values: Iterable[str], allowed: Iterable[str]) -> None:
    """parser error unless every one of ``values`` (a comma-list option) is in ``allowed``."""
    allowed = list(allowed)
    for value in values:
        if value not in allowed:
            p.error(f"{flag}: expected some of {','.join(allowed)}, got {value!r}")


def dtype_names(p, dtypes: Iterable[str]) -> list[str]:
    """--dtypes checked and spelled as the tables spell them (float32, bfloat16, ...)."""
    dtypes = list(dtypes)
    check_choices(p, "--dtypes", dtypes, DTYPES)
    return [dtype_name(DTYPES[d]) for d in dtypes]


def load_average() -> str:
    """The 1, 5 and 15 minute load averages (recorded before and after a run)."""
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def comma_strs(text: str) -> list[str]:
    """argparse type: a comma list of names."""
    return [x.strip() for x in text.split(",") if x.strip()]


def comma_ints(text: str) -> list[int]:
    """argparse type: a comma list of integers."""
    return [int(x) for x in comma_strs(text)]


def add_run_args(p, default_out: Path, quick_help: str) -> None:
    """The options every packed-sequence / decode benchmark takes after its own: timing,
    threads, output comparison, quick mode, output folder, progress bar."""
    p.add_argument("--min-run-time", type=float, default=0.05,
                   help="CPU: a timing sample is a block of calls lasting at least this (default 0.05 s)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--no-check", dest="check", action="store_false", help="no output comparison")
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--out", type=Path, default=default_out, help=f"output folder (default {default_out})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

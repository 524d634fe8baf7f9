"""Attention kernels against torch SDPA and the naive formula.

    python benchmarks/bench_attention.py            # defaults for the hardware present
    python benchmarks/bench_attention.py --seqlens 1024,4096 --head-dims 128 \
        --dtypes bf16 --causal 1 --modes fwd,fwd+bwd --backends ours,sdpa
    python benchmarks/bench_attention.py --varlen [--quick ...]   # packed sequences only

Measures, for every setting (mode, dtype, head dim, causal, sequence length):
  ours-<name>   flashattn_py.flash_attn_func(q, k, v, causal=..., backend=<name>) for each
                backend in flashattn_py.available_backends(device) but "reference";
                q/k/v (B, S, H, D)
  sdpa-<kind>   torch.nn.functional.scaled_dot_product_attention with one torch backend
                forced by torch.nn.attention.sdpa_kernel (GPU: math, flash, efficient,
                cudnn; CPU: flash, math); q/k/v (B, H, S, D), torch's native layout
  naive         flashattn_py.reference.attention_ref, the formula in plain torch ops
                (O(N^2) memory; on CPU only up to --naive-max-seqlen)

Modes: fwd (inputs without grad), bwd (backward of a forward recorded once, with
retain_graph), fwd+bwd (forward then backward). Per row: median ms, TFLOP/s
(fwd = 4*B*H*S*S*D, halved for causal; bwd 2.5x; fwd+bwd 3.5x), percent of the
torch.mm rate measured at the start, peak extra memory of one call
(see common.peak_memory_bytes) and ``x_torch`` = (fastest sdpa-* ms in the same
setting) / (this ms): above 1 is faster than the best torch backend.
Failures do not stop the run: "oom", "unsupported" (a forced backend that refuses the
case) or "error" in the status column.

Writes <out>/attention.csv, attention.json (rows + environment) and attention.png
(TFLOP/s against sequence length, one panel per mode/dtype/head dim/causal setting;
needs matplotlib).

Packed sequences: ``--varlen`` runs bench_varlen.py's benchmark instead of this sweep
(the options after it go to bench_varlen.py: --quick, --sets, --dtypes, --out, ...; see
``bench_varlen.py --help``). The default CPU run (no options shaping the sweep) runs it
too, after the sweep, into the same folder (varlen.csv, varlen.json, varlen.md; about 4
more minutes on 2 cores); --no-varlen skips it.

Decoding from a KV cache: ``--decode`` runs bench_decode.py's benchmark instead (one step
of flash_attn_with_kvcache, contiguous and paged caches, against torch SDPA and the
roofline; the options after it go to bench_decode.py: --quick, --shapes, --dtypes, --out,
...). The default CPU run runs it too, after the varlen part, into the same folder
(decode.csv, decode.json, decode.md; under 3 more minutes on 2 cores); --no-decode skips it.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

try:
    import flashattn_py
except ImportError:  # the naive formula and torch SDPA can still be measured
    flashattn_py = None
try:
    from flashattn_py.reference import attention_ref
except ImportError:
    attention_ref = None

DEFAULT_OUT = Path(__file__).resolve().parent / "out"
MODES = ("fwd", "bwd", "fwd+bwd")
CSV_FIELDS = [
    "device", "mode", "dtype", "head_dim", "causal", "seqlen", "batch", "heads", "backend",
    "status", "ms", "tflops", "pct_matmul", "peak_mem_mb", "x_torch", "error",
]
TABLE_COLUMNS = [
    ("mode", "mode"), ("dtype", "dtype"), ("head_dim", "D"), ("causal", "causal"),
    ("seqlen", "N"), ("batch", "B"), ("heads", "H"), ("backend", "backend"), ("ms", "ms"),
    ("tflops", "TFLOP/s"), ("pct_matmul", "%mm"), ("peak_mem_mb", "mem MB"),
    ("x_torch", "x torch"), ("status", "status"),
]

# ----------------------------------------------------------------------------- defaults

CPU_DEFAULTS = dict(
    seqlens=[512, 1024, 2048], head_dims=[64, 128], dtypes=["fp32", "bf16"], causal="both",
    modes=["fwd", "fwd+bwd"], tokens=2048, model_dim=256, repeats=3, naive_max_seqlen=512,
)
GPU_DEFAULTS = dict(
    seqlens=[512, 1024, 2048, 4096, 8192, 16384], head_dims=[64, 128], dtypes=["bf16", "fp16"],
    causal="both", modes=["fwd", "bwd", "fwd+bwd"], tokens=16384, model_dim=2048, repeats=20,
    naive_max_seqlen=0,
)

# ----------------------------------------------------------------------------- methods


@dataclass
class Method:
    """One way to compute attention: its inputs' layout and the call."""

    name: str
    layout: str  # "bshd" or "bhsd"
    call: Callable[..., torch.Tensor]  # (q, k, v, causal) -> out in the same layout
    is_torch: bool = False


def _ours(backend: str) -> Method:
    def call(q, k, v, causal):
        return flashattn_py.flash_attn_func(q, k, v, causal=causal, backend=backend)

    return Method(f"ours-{backend}", "bshd", call)


SDPA_KINDS = {"math": "MATH", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION"}


def _sdpa(kind: str) -> Method:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, SDPA_KINDS[kind])

    def call(q, k, v, causal):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return Method(f"sdpa-{kind}", "bhsd", call, is_torch=True)


def _naive() -> Method:
    def call(q, k, v, causal):
        offset = k.shape[1] - q.shape[1]
        return attention_ref(q, k, v, window_right=0 if causal else -1, diag_offset=offset)[0]

    return Method("naive", "bshd", call)


def available_methods(device: torch.device) -> list[Method]:
    """Every method this machine can run, ours first, then torch, then naive."""
    methods = []
    if flashattn_py is not None:
        for backend in flashattn_py.available_backends(device.type):
            if backend != "reference":  # that is the naive formula, measured as "naive"
                methods.append(_ours(backend))
    kinds = ["flash", "cudnn", "efficient", "math"] if device.type == "cuda" else ["flash", "math"]
    methods += [_sdpa(kind) for kind in kinds]
    if attention_ref is not None:
        methods.append(_naive())
    return methods


def select_methods(methods: list[Method], wanted: Sequence[str] | None) -> list[Method]:
    """Filter by name; "ours", "sdpa", "naive" and "all" select groups; "cuda" means ours-cuda."""
    if not wanted or "all" in wanted:
        return methods
    keep = []
    for m in methods:
        group = m.name.split("-")[0]
        short = m.name.split("-", 1)[-1]
        if m.name in wanted or group in wanted or (group == "ours" and short in wanted):
            keep.append(m)
    unknown = set(wanted) - {"ours", "sdpa", "naive"} - {m.name for m in methods} - {
        m.name.split("-", 1)[-1] for m in methods if m.name.startswith("ours-")
    }
    if unknown:
        print(f"note: backends not available here, skipped: {', '.join(sorted(unknown))}", file=sys.stderr)
    return keep


# ----------------------------------------------------------------------------- one case


@dataclass(frozen=True)
class Setting:
    mode: str
    dtype: str
    head_dim: int
    causal: bool
    seqlen: int
    batch: int
    heads: int

    @property
    def panel(self) -> tuple:
        return (self.mode, self.dtype, self.head_dim, self.causal)


def make_inputs(s: Setting, layout: str, device: torch.device, requires_grad: bool, n_sets: int):
    """``n_sets`` independent (q, k, v, grad_out) sets, rotated between timed calls."""
    dtype = common.DTYPES[s.dtype]
    shape = (s.batch, s.seqlen, s.heads, s.head_dim) if layout == "bshd" else (s.batch, s.heads, s.seqlen, s.head_dim)
    sets = []
    for _ in range(n_sets):
        q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=requires_grad) for _ in range(3))
        sets.append((q, k, v, torch.randn(shape, device=device, dtype=dtype)))
    return sets


def build_step(method: Method, s: Setting, device: torch.device, n_sets: int) -> Callable[[], object]:
    """A no-argument callable doing one ``s.mode`` step on the next input set."""
    sets = make_inputs(s, method.layout, device, requires_grad=s.mode != "fwd", n_sets=n_sets)
    counter = itertools.count()

    if s.mode == "fwd":
        def step():
            q, k, v, _ = sets[next(counter) % n_sets]
            with torch.no_grad():
                return method.call(q, k, v, s.causal)
    elif s.mode == "fwd+bwd":
        def step():
            q, k, v, dout = sets[next(counter) % n_sets]
            out = method.call(q, k, v, s.causal)
            return torch.autograd.grad(out, (q, k, v), dout)
    else:  # bwd: the graph of one forward per set, replayed
        graphs = [(method.call(q, k, v, s.causal), (q, k, v), dout) for q, k, v, dout in sets]

        def step():
            out, inputs, dout = graphs[next(counter) % n_sets]
            return torch.autograd.grad(out, inputs, dout, retain_graph=True)
    return step


def _new_row(method: Method, s: Setting, device: torch.device) -> dict:
    return {
        "device": device.type, "mode": s.mode, "dtype": s.dtype, "head_dim": s.head_dim,
        "causal": int(s.causal), "seqlen": s.seqlen, "batch": s.batch, "heads": s.heads,
        "backend": method.name, "status": "ok", "ms": None, "tflops": None, "pct_matmul": None,
        "peak_mem_mb": None, "x_torch": None, "error": "",
    }


def measure_setting(methods: list[Method], s: Setting, device: torch.device, args) -> list[dict]:
    """One row per method for setting ``s``.

    On the GPU each method is timed on its own (CUDA timing is steady). On the CPU the
    methods' steps are built first and then timed in alternation
    (common.time_cpu_interleaved), so that a drifting machine does not bias the ratios.
    """
    rows, steps = [], {}
    for method in methods:
        row = _new_row(method, s, device)
        rows.append(row)
        if method.name == "naive" and args.naive_max_seqlen and s.seqlen > args.naive_max_seqlen:
            row["status"] = "skipped"
            row["error"] = f"naive only up to N={args.naive_max_seqlen} (--naive-max-seqlen)"
            continue
        step, failed = None, False
        try:
            step = build_step(method, s, device, args.input_sets)
            if device.type == "cuda":
                step()  # warm-up: compilation, autotuning, workspaces
            # On the CPU the warm-up call itself is measured (the measure is fresh pages touched).
            mem = common.peak_memory_bytes(step, device)
            row["peak_mem_mb"] = None if mem is None else mem / 2**20
            if device.type == "cuda":
                row["ms"] = common.time_ms(step, device, repeats=args.repeats)
            else:
                steps[method.name] = step
        except Exception as exc:  # noqa: BLE001 - every failure becomes a row
            failed = True
            common.mark_failed(row, exc, drop=("peak_mem_mb",))
        finally:
            del step
            if device.type == "cuda" or failed:
                common.free_memory(device, collect=failed)
    if steps:
        timed = common.time_cpu_interleaved(steps, rounds=args.repeats, min_run_time=args.min_run_time)
        common.fill_timings(rows, "backend", timed, drop=("peak_mem_mb",))
        steps.clear()
        common.free_memory(device, collect=False)
    flops = common.attention_flops(s.batch, s.heads, s.seqlen, s.seqlen, s.head_dim, s.causal, s.mode)
    for row in rows:
        if row["status"] == "ok" and row["ms"] is not None:
            row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
    return rows


# ----------------------------------------------------------------------------- cli


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cpu or cuda")
    p.add_argument("--seqlens", type=common.comma_ints, help="comma list (CPU default 512,1024,2048; GPU 512..16384)")
    p.add_argument("--head-dims", type=common.comma_ints, help="comma list (default 64,128)")
    p.add_argument("--causal", choices=["0", "1", "both"], help="default both")
    p.add_argument("--dtypes", type=common.comma_strs, help="fp32,bf16,fp16 (CPU default fp32,bf16; GPU bf16,fp16)")
    p.add_argument("--modes", type=common.comma_strs, help="fwd,bwd,fwd+bwd (CPU default fwd,fwd+bwd; GPU all)")
    p.add_argument("--batch", type=int, help="fixed batch size (overrides --tokens)")
    p.add_argument("--tokens", type=int, help="token budget: batch = max(1, tokens // seqlen) (CPU 2048, GPU 16384)")
    p.add_argument("--heads", type=int, help="heads (default model_dim // head_dim)")
    p.add_argument("--model-dim", type=int, help="heads * head_dim when --heads is not given (CPU 256, GPU 2048)")
    p.add_argument("--backends", type=common.comma_strs, help="names or groups: ours, sdpa, naive, all, ours-cpu, cuda, sdpa-flash, ...")
    p.add_argument("--repeats", type=int, help="CPU: timing rounds per setting, each timing every backend once in rotated order (median); GPU: CUDA-event fallback count")
    p.add_argument("--min-run-time", type=float, default=0.05, help="CPU: a timing sample is a block of calls lasting at least this many seconds (default 0.05)")
    p.add_argument("--input-sets", type=int, help="input sets rotated between calls (CPU 2, GPU 4)")
    p.add_argument("--naive-max-seqlen", type=int, help="skip naive above this N; 0 = no limit (CPU 512, GPU 0)")
    p.add_argument("--matmul-size", type=int, default=2048, help="n of the n^3 torch.mm reference rate (default 2048)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--varlen", action="store_true", help="run bench_varlen.py's packed-sequence benchmark "
                   "instead (the options after --varlen go to it; see bench_varlen.py --help)")
    p.add_argument("--no-varlen", action="store_true", help="the default CPU run: skip the packed-sequence "
                   "benchmark that follows the sweep")
    p.add_argument("--decode", action="store_true", help="run bench_decode.py's KV-cache decoding benchmark "
                   "instead (the options after --decode go to it; see bench_decode.py --help)")
    p.add_argument("--no-decode", action="store_true", help="the default CPU run: skip the decoding "
                   "benchmark that follows the packed-sequence one")
    args = p.parse_args(argv)

    # The default run: nothing shapes the sweep. On the CPU it is followed by bench_varlen's defaults.
    shaping = [*CPU_DEFAULTS, "backends", "batch", "heads", "input_sets"]
    args.default_run = all(getattr(args, name, None) is None for name in shaping)

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    defaults = GPU_DEFAULTS if args.device.startswith("cuda") else CPU_DEFAULTS
    for name, value in defaults.items():
        if name != "causal" and getattr(args, name, None) is None:
            setattr(args, name, value)
    args.causal = {"0": [False], "1": [True], "both": [False, True], None: [False, True]}[args.causal]
    if args.input_sets is None:
        args.input_sets = 4 if args.device.startswith("cuda") else 2
    common.check_choices(p, "--modes", args.modes, MODES)
    args.dtypes = common.dtype_names(p, args.dtypes)
    return args


def settings(args) -> list[Setting]:
    out = []
    for mode, dtype, head_dim, causal, seqlen in itertools.product(
        args.modes, args.dtypes, args.head_dims, args.causal, args.seqlens
    ):
        batch = args.batch if args.batch else max(1, args.tokens // seqlen)
        heads = args.heads if args.heads else max(1, args.model_dim // head_dim)
        out.append(Setting(mode, dtype, head_dim, causal, seqlen, batch, heads))
    return out


def plot(rows: list[dict], path: Path) -> bool:
    """TFLOP/s against sequence length per backend, one panel per setting."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return False
    panels = sorted({(r["mode"], r["dtype"], r["head_dim"], r["causal"]) for r in rows})
    if not panels:
        return False
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.3 * nrows), squeeze=False)
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    for ax, panel in zip(axes.flat, panels):
        for backend in backends:
            pts = sorted(
                (r["seqlen"], r["tflops"])
                for r in rows
                if (r["mode"], r["dtype"], r["head_dim"], r["causal"]) == panel
                and r["backend"] == backend and r["status"] == "ok"
            )
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=backend)
        mode, dtype, head_dim, causal = panel
        ax.set_title(f"{mode} {dtype} D={head_dim} {'causal' if causal else 'full'}", fontsize=9)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("TFLOP/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run_varlen(argv: Sequence[str]) -> list[dict]:
    """bench_varlen.py's benchmark with ``argv``; its rows."""
    import bench_varlen

    return bench_varlen.main(list(argv))


def run_decode(argv: Sequence[str]) -> list[dict]:
    """bench_decode.py's benchmark with ``argv``; its rows."""
    import bench_decode

    return bench_decode.main(list(argv))


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Run the benchmark; returns the rows (also printed and written to --out).

    With --varlen: bench_varlen.py's rows instead (the arguments after --varlen go to it);
    with --decode: bench_decode.py's rows.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--varlen" in argv:
        at = argv.index("--varlen")
        return run_varlen(argv[:at] + argv[at + 1:])
    if "--decode" in argv:
        at = argv.index("--decode")
        return run_decode(argv[:at] + argv[at + 1:])
    args = parse_args(argv)
    device = torch.device(args.device)
    methods = select_methods(available_methods(device), args.backends)
    torch_names = {m.name for m in methods if m.is_torch}
    env = common.environment(device)
    mm_tflops, mm_what = common.matmul_tflops(device, n=args.matmul_size)
    print(f"# {env['device']} | torch {env['torch']} | commit {env['commit']} | {env['date']}"
          f" | cpu kernels: {env['cpu_kernels']}")
    print(f"# matmul rate: {mm_tflops:.3f} TFLOP/s ({mm_what})")
    print(f"# backends: {', '.join(m.name for m in methods)}")

    args.out.mkdir(parents=True, exist_ok=True)
    cases = settings(args)
    rows = []
    start = time.perf_counter()
    bar = common.progress(cases, total=len(cases), desc="attention", enabled=not args.no_progress)
    for s in bar:
        bar.set_postfix_str(f"{s.mode} {s.dtype} D{s.head_dim} {'c' if s.causal else 'f'} N{s.seqlen}")
        rows.extend(measure_setting(methods, s, device, args))
        common.write_csv(rows, args.out / "attention.csv", CSV_FIELDS)  # partial results survive a kill
    elapsed = time.perf_counter() - start
    common.add_ratios(rows, torch_names, mm_tflops)

    print(common.format_table(rows, TABLE_COLUMNS))
    print(f"# {len(rows)} cases in {elapsed:.0f} s; x torch = best sdpa-* ms / this ms (>1: faster than torch); "
          f"%mm = TFLOP/s as a percentage of the matmul rate")

    common.write_csv(rows, args.out / "attention.csv", CSV_FIELDS)
    payload = {
        "environment": env,
        "matmul_tflops": mm_tflops,
        "matmul": mm_what,
        "elapsed_s": elapsed,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rows": rows,
    }
    common.write_json(payload, args.out / "attention.json")
    written = [args.out / "attention.csv", args.out / "attention.json"]
    if not args.no_plot and plot(rows, args.out / "attention.png"):
        written.append(args.out / "attention.png")
    print(f"# wrote {', '.join(str(p) for p in written)}")
    if args.default_run and device.type == "cpu" and not args.no_varlen and flashattn_py is not None:
        print("# packed sequences (bench_varlen.py defaults; --no-varlen skips them)")
        run_varlen(["--device", "cpu", "--out", str(args.out)] + (["--no-progress"] if args.no_progress else []))
    if args.default_run and device.type == "cpu" and not args.no_decode and flashattn_py is not None:
        print("# decoding from a KV cache (bench_decode.py defaults; --no-decode skips it)")
        run_decode(["--device", "cpu", "--out", str(args.out)] + (["--no-progress"] if args.no_progress else []))
    return rows


if __name__ == "__main__":
    main()

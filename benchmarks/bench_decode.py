"""Decoding from a KV cache: one step of flash_attn_with_kvcache against torch SDPA.

    python benchmarks/bench_decode.py               # defaults for the hardware present
    python benchmarks/bench_attention.py --decode   # the same (other options pass through)
    python benchmarks/bench_decode.py --quick       # seconds: tiny caches, one round

One decoding step, Hq/Hk = 32/8 (GQA), D=128, for the shapes (B=1, 8k keys), (B=1, 32k
keys), (B=8, 8k keys), the dtypes fp32 and bf16 and Sq = 1 and 4 query tokens per sequence
(4: speculative decoding's draft tokens, causal among themselves, aligned bottom-right on
the cache). Methods, timed in
alternation on the same data (common.time_cpu_interleaved on the CPU, the order rotated
from round to round; 5 rounds, about two minutes on a quiet 2-core machine):
  ours               flashattn_py.flash_attn_with_kvcache(q, k_cache, v_cache,
                     cache_seqlens=lens, causal=True): attend only, contiguous (B, S, Hk,
                     D) cache
  ours-paged         the same keys in a paged pool (num_pages, 16, Hk, D) with a shuffled
                     block table (block_table=...)
  ours-append        k=k_new, v=v_new (Sq tokens each, (B, Sq, Hk, D)) written in place at
                     slots lens = keys - Sq onwards, then attended (the same keys)
  ours-paged-append  the same on the paged pool
  ours-graph         (GPU only) the `ours` call captured once in a CUDA graph and timed by
                     replaying it: the step without its host time (Python, launches), as
                     serving stacks run decoding
  sdpa               torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2),
                     k_cache.transpose(1, 2), v_cache.transpose(1, 2), enable_gqa=True)
                     on the contiguous cache (torch's default backend choice); Sq > 1
                     with the bottom-right causal mask as attn_mask (is_causal aligns
                     top-left), which may send torch to another backend than Sq = 1
  copy               dst.copy_(src) of a uint8 buffer as large as the case's K+V: the
                     memory bandwidth of the same size, measured in the same rounds

Each sample is a block of back-to-back calls (common.time_cpu_interleaved), so a cache
that fits the L3 is read from there after the first few calls. --cold (CPU) times single
calls, each after reading a buffer of twice the L3 (1 GiB if its size is unknown), so the
K/V come from memory, as in a model's decoding step, where the other layers' caches are
read in between.

Per row: median ms; K+V GB/s = bytes of the keys attended (K and V: 2*B*keys*Hk*D*elt)
/ time; the roofline = min(copy bandwidth, peak FLOP rate x bytes per FLOP of the call),
where the copy bandwidth counts the copy's read + write bytes (2 x buffer / time;
--copy-bytes read counts the read bytes only), the peak FLOP rate is torch.mm's on
--matmul-size^3 matrices in the case's dtype (as common.matmul_tflops), or in fp32 where
that is higher (16-bit products run as fp32 FMAs on CPUs without 16-bit arithmetic), and a call does
4*B*Hq*Sq*keys*D flops (so bytes per flop = 2*Hk*elt / (4*Hq*Sq)); ``pct_roofline`` = K+V GB/s
as a percentage of the roofline; ``x_sdpa`` = sdpa ms / this ms (above 1: faster than
torch); ``paged_ratio`` = this paged ms / the contiguous ms of the same variant (1.1:
paged 10 % slower). Before timing, the outputs are checked against SDPA (attend only;
the append variants against each other): ``max_diff``.

Targets printed met / not met: >= 70 % of the roofline for caches larger than the L3
(its size from /sys/devices/system/cpu, else lscpu), on GPUs >= 80 % at B >= 8 with 8k keys
or more (every method but sdpa, ours-graph included); ours >= 2x SDPA in fp32 and >= 5x in
bf16; paged (page 16) within 10 % of contiguous.

Writes <out>/decode.csv, decode.json (rows + environment) and decode.md (the summary
table with the targets, for RESULTS.md).
"""
from __future__ import annotations

import argparse
import functools
import itertools
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import flashattn_py  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "out"
METHODS = ("ours", "ours-paged", "ours-append", "ours-paged-append", "ours-graph", "sdpa")
GPU_ONLY = ("ours-graph",)
CSV_FIELDS = [
    "device", "dtype", "batch", "keys", "queries", "heads_q", "heads_k", "head_dim", "page_size", "method",
    "status", "ms", "kv_mb", "over_l3", "kv_gbps", "copy_gbps", "flop_gbps", "roofline_gbps",
    "pct_roofline", "x_sdpa", "paged_ratio", "max_diff", "error",
]
TABLE_COLUMNS = [
    ("dtype", "dtype"), ("batch", "B"), ("keys", "keys"), ("queries", "Sq"), ("kv_mb", "K+V MB"),
    ("method", "method"),
    ("ms", "ms"), ("kv_gbps", "K+V GB/s"), ("roofline_gbps", "roof GB/s"), ("pct_roofline", "%roof"),
    ("x_sdpa", "x sdpa"), ("paged_ratio", "paged/contig"), ("max_diff", "max diff"), ("status", "status"),
]
SHAPES = [(1, 8192), (1, 32768), (8, 8192)]  # (batch, keys)
QUICK_SHAPES = [(1, 64), (1, 256), (2, 64)]
QUERIES = [1, 4]  # query tokens per sequence: a decoding step, a speculative one

# Targets: roofline fraction (CPU: caches over L3; GPU: B >= 8 with 8k keys or more), x SDPA
# per dtype, paged / contiguous ms.
ROOFLINE_BAR = 70.0
GPU_ROOFLINE_BAR = 80.0
SDPA_BARS = {"fp32": 2.0, "bf16": 5.0}
PAGED_BAR = 1.10


@dataclass(frozen=True)
class Case:
    dtype: str
    batch: int
    keys: int
    queries: int = 1


# ----------------------------------------------------------------------------- machine


def l3_bytes() -> int | None:
    """Total L3 size: the distinct level-3 caches under /sys/devices/system/cpu, else lscpu."""
    seen: dict[str, int] = {}
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    for index in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/cache/index[0-9]*"):
        try:
            if (index / "level").read_text().strip() != "3":
                continue
            size = (index / "size").read_text().strip()
            shared = (index / "shared_cpu_list").read_text().strip()
        except OSError:
            continue
        m = re.fullmatch(r"(\d+)\s*([KMG]?)", size)
        if m:
            seen[shared] = int(m.group(1)) * units.get(m.group(2), 1)
    if seen:
        return sum(seen.values())
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"^L3 cache:\s*([\d.]+)\s*([KMG])i?B?", out, re.M)
    return int(float(m.group(1)) * units[m.group(2)]) if m else None


# ----------------------------------------------------------------------------- inputs and steps


def kv_bytes(case: Case, heads_k: int, head_dim: int) -> int:
    """Bytes of the keys one step attends: K and V, 2 * B * keys * Hk * D * element size."""
    return 2 * case.batch * case.keys * heads_k * head_dim * common.DTYPES[case.dtype].itemsize


def decode_flops(case: Case, heads_q: int, head_dim: int) -> float:
    """4 * B * Hq * Sq * keys * D (QK^T and PV, 2 flops a multiply-add; the Sq draft tokens'
    causal corner is left out of the count: at most Sq - 1 of keys keys)."""
    return common.attention_flops(case.batch, heads_q, case.queries, case.keys, head_dim, causal=False)


def build_calls(case: Case, args, device: torch.device) -> dict[str, Callable[[], torch.Tensor]]:
    """{method: no-argument call} on one set of tensors (the caches shared by the methods)."""
    dtype = common.DTYPES[case.dtype]
    gen = torch.Generator().manual_seed(args.seed)
    b, n, hq, hk, d, page = case.batch, case.keys, args.heads_q, args.heads_k, args.head_dim, args.page_size
    sq = case.queries

    def randn(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)

    q = randn(b, sq, hq, d)
    k_cache, v_cache = randn(b, n, hk, d), randn(b, n, hk, d)
    k_new, v_new = randn(b, sq, hk, d), randn(b, sq, hk, d)
    full = torch.full((b,), n, dtype=torch.int32, device=device)
    before = full - sq  # the append variants write slots keys - sq .. keys - 1 and attend keys keys
    # Paged pool: page p of entry i holds keys [16p, 16p + 16) of entry i, at a shuffled place.
    pages_per = -(-n // page)
    perm = torch.randperm(b * pages_per, generator=gen)
    block_table = perm.view(b, pages_per).to(device=device, dtype=torch.int32)
    k_pool = k_cache.new_zeros((b * pages_per, page, hk, d))
    v_pool = torch.zeros_like(k_pool)
    pad = pages_per * page - n
    k_pool[perm] = F.pad(k_cache, (0, 0, 0, 0, 0, pad)).view(b * pages_per, page, hk, d)
    v_pool[perm] = F.pad(v_cache, (0, 0, 0, 0, 0, pad)).view(b * pages_per, page, hk, d)
    kvc = functools.partial(flashattn_py.flash_attn_with_kvcache, causal=True)
    # SDPA reads K / V in its own layout, (B, Hk, S, D) contiguous: its fastest form (a
    # transposed view of ours took it 1.3-1.8x longer on the CPU), and its own memory, so
    # that in warm runs ours does not start on buffers SDPA has just read.
    qt = q.transpose(1, 2)
    kt, vt = (c.transpose(1, 2).contiguous() for c in (k_cache, v_cache))
    # query i sees keys up to n - sq + i (one query: all of them, no mask)
    mask = None if sq == 1 else torch.ones(sq, n, dtype=torch.bool, device=device).tril(n - sq)
    return {
        "ours": lambda: kvc(q, k_cache, v_cache, cache_seqlens=full),
        "ours-graph": graph_replay(lambda: kvc(q, k_cache, v_cache, cache_seqlens=full)),
        "ours-paged": lambda: kvc(q, k_pool, v_pool, cache_seqlens=full, block_table=block_table),
        "ours-append": lambda: kvc(q, k_cache, v_cache, k_new, v_new, cache_seqlens=before),
        "ours-paged-append": lambda: kvc(q, k_pool, v_pool, k_new, v_new, cache_seqlens=before,
                                         block_table=block_table),
        # (B, Hq, Sq, D) -> (B, Sq, Hq, D), the layout of ours, for the check.
        "sdpa": lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=True).transpose(1, 2),
    }


def graph_replay(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """A call that replays ``fn`` captured in a CUDA graph: captured on the first call
    (after two warm-up calls on a side stream, as torch.cuda.graphs' docs do), whose output
    tensor every replay rewrites."""
    state: dict = {}

    def call() -> torch.Tensor:
        if "graph" not in state:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn()
                fn()
            torch.cuda.current_stream().wait_stream(side)
            state["graph"] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(state["graph"]):
                state["out"] = fn()
        state["graph"].replay()
        return state["out"]

    return call


def evict_caches(args, l3: int | None) -> Callable[[], object] | None:
    """--cold: a call that reads a buffer of twice the L3 (1 GiB if unknown), else None.
    (Read, not copied: a copy would leave the timed call dirty lines to write back.)"""
    if not args.cold:
        return None
    nbytes = 2 * l3 if l3 else 2**30
    buffer = torch.ones(nbytes // 8, dtype=torch.int64)
    return lambda: buffer.max()


def copy_step(nbytes: int, device: torch.device) -> Callable[[], object]:
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.zeros_like(src)
    return lambda: dst.copy_(src)


# ----------------------------------------------------------------------------- measuring


def _row(case: Case, method: str, args, device: torch.device, l3: int | None) -> dict:
    nbytes = kv_bytes(case, args.heads_k, args.head_dim)
    return {
        "device": device.type, "dtype": case.dtype, "batch": case.batch, "keys": case.keys, "queries": case.queries,
        "heads_q": args.heads_q, "heads_k": args.heads_k, "head_dim": args.head_dim,
        "page_size": args.page_size if "paged" in method else None, "method": method, "status": "ok",
        "ms": None, "kv_mb": nbytes / 2**20, "over_l3": None if l3 is None else int(nbytes > l3),
        "kv_gbps": None, "copy_gbps": None, "flop_gbps": None, "roofline_gbps": None,
        "pct_roofline": None, "x_sdpa": None, "paged_ratio": None, "max_diff": None, "error": "",
    }


def measure_case(case: Case, methods: Sequence[str], device: torch.device, args,
                 peak_tflops: float, l3: int | None) -> list[dict]:
    """One row per method; the methods and the copy timed in alternation (CPU)."""
    calls = build_calls(case, args, device)
    rows = {m: _row(case, m, args, device, l3) for m in methods}
    nbytes = kv_bytes(case, args.heads_k, args.head_dim)
    steps: dict[str, Callable[[], object]] = {}
    outs: dict[str, torch.Tensor] = {}
    # SDPA and the attend-only calls first: the append variants then overwrite slot keys - 1.
    for m in sorted(methods, key=lambda m: (m != "sdpa", m.endswith("append"))):
        try:
            with torch.no_grad():
                out = calls[m]()  # the warm-up call, and the output for the check
            common.synchronize(device)
            if args.check:
                outs[m] = out.float()
            steps[m] = calls[m]
        except Exception as exc:  # noqa: BLE001 - a failure is a row
            common.mark_failed(rows[m], exc)
            common.free_memory(device, collect=True)
    if args.check:
        for m, out in outs.items():
            ref = outs.get("ours-append") if m.endswith("append") else outs.get("sdpa", outs.get("ours"))
            if ref is not None:
                rows[m]["max_diff"] = (out - ref).abs().max().item()
    outs.clear()
    copy = copy_step(nbytes, device)
    copy()
    if device.type == "cuda":
        timed = {m: common.time_ms(fn, device, repeats=args.repeats) for m, fn in steps.items()}
        timed["copy"] = common.time_ms(copy, device, repeats=args.repeats)
    else:
        timed = common.time_cpu_interleaved({**steps, "copy": copy}, rounds=args.repeats,
                                            min_run_time=args.min_run_time, before_each=evict_caches(args, l3))
    common.fill_timings(list(rows.values()), "method", timed)
    del steps, calls, copy
    common.free_memory(device)

    copy_ms = timed.get("copy")
    copy_gbps = None
    if isinstance(copy_ms, float):
        moved = nbytes * (2 if args.copy_bytes == "rw" else 1)
        copy_gbps = moved / (copy_ms * 1e-3) / 1e9
    flop_gbps = peak_tflops * 1e12 * nbytes / decode_flops(case, args.heads_q, args.head_dim) / 1e9
    roof = min(copy_gbps, flop_gbps) if copy_gbps else flop_gbps
    sdpa = rows.get("sdpa", {})
    sdpa_ms = sdpa.get("ms") if sdpa.get("status") == "ok" else None
    for m, row in rows.items():
        row["copy_gbps"], row["flop_gbps"], row["roofline_gbps"] = copy_gbps, flop_gbps, roof
        if row["status"] != "ok" or not row["ms"]:
            continue
        row["kv_gbps"] = nbytes / (row["ms"] * 1e-3) / 1e9
        row["pct_roofline"] = 100.0 * row["kv_gbps"] / roof
        row["x_sdpa"] = sdpa_ms / row["ms"] if sdpa_ms else None
        if "paged" in m:
            contig = rows.get(m.replace("-paged", ""), {})
            if contig.get("status") == "ok" and contig.get("ms"):
                row["paged_ratio"] = row["ms"] / contig["ms"]
    return list(rows.values())


def cases(args) -> list[Case]:
    return [Case(dtype, b, n, sq) for sq, dtype, (b, n) in itertools.product(args.queries, args.dtypes, args.shapes)]


# ----------------------------------------------------------------------------- summary


def evaluate_targets(rows: list[dict]) -> list[dict]:
    """One entry per target and case measured: the value, the bar and met."""
    out = []
    for r in rows:
        if r["status"] != "ok" or r["ms"] is None:
            continue
        sq = r.get("queries", 1)
        what = f"{r['dtype']} B={r['batch']} keys={r['keys']}{f' Sq={sq}' if sq != 1 else ''} {r['method']}"
        gpu_sized = r["device"] == "cuda" and r["batch"] >= 8 and r["keys"] >= 8192
        if r["method"] != "sdpa" and (r["over_l3"] or gpu_sized) and r["pct_roofline"] is not None:
            bar = GPU_ROOFLINE_BAR if gpu_sized else ROOFLINE_BAR
            out.append({"target": "roofline", "case": what, "value": r["pct_roofline"], "bar": bar,
                        "met": r["pct_roofline"] >= bar})
        if r["method"] in ("ours", "ours-paged") and r["x_sdpa"] is not None and r["dtype"] in SDPA_BARS:
            bar = SDPA_BARS[r["dtype"]]
            out.append({"target": "x_sdpa", "case": what, "value": r["x_sdpa"], "bar": bar,
                        "met": r["x_sdpa"] >= bar})
        if r["paged_ratio"] is not None:
            out.append({"target": "paged", "case": what, "value": r["paged_ratio"], "bar": PAGED_BAR,
                        "met": r["paged_ratio"] <= PAGED_BAR})
    return out


def markdown(rows: list[dict], env: dict, args, elapsed: float) -> str:
    """The summary for RESULTS.md: one line per (dtype, shape), then the targets."""
    f = lambda x, d=3: common.fmt(x, d)  # noqa: E731
    l3 = env.get("l3_bytes")
    lines = [
        f"{env['device']}; torch {env['torch']}; commit `{env['commit']}`; {env['date']}; "
        f"`CPU_KERNELS` = `{env['cpu_kernels']}`; L3 {f(l3 / 2**20) if l3 else '?'} MiB; "
        f"load average {env['load_before']} before, {env['load_after']} after; {elapsed:.0f} s",
        "",
        f"Sq={','.join(map(str, args.queries))} (causal, bottom-right), Hq/Hk={args.heads_q}/{args.heads_k}, "
        f"D={args.head_dim}, paged page {args.page_size} (shuffled block table). Peak FLOP rate (torch.mm {args.matmul_size}^3 in the dtype, or fp32's "
        "where higher): " + ", ".join(f"{k} {v * 1e3:.1f} GFLOP/s (mm {env['mm_tflops'][k] * 1e3:.2f})"
                                      for k, v in env["peak_tflops"].items())
        + f". Copy bandwidth counts {'read + write' if args.copy_bytes == 'rw' else 'read'} bytes. "
        + ("Cold: single calls, each after evicting the caches (K/V from memory)." if args.cold
           else "Warm: blocks of back-to-back calls (K/V that fit the L3 come from there)."),
        "",
        "| dtype | B | keys | Sq | K+V MiB | >L3 | ours ms | paged ms | append ms | paged-append ms | graph ms "
        "| sdpa ms | ours K+V GB/s | copy GB/s | roofline GB/s | ours % roof | paged % roof | graph % roof "
        "| x sdpa | paged x sdpa | paged/contig | paged-append/append |",
        "|" + "---|" * 22,
    ]
    keys = list(dict.fromkeys((r["dtype"], r["batch"], r["keys"], r["queries"]) for r in rows))
    by = {(r["dtype"], r["batch"], r["keys"], r["queries"], r["method"]): r for r in rows}
    for key in keys:
        o, p, a, pa, g, s = (by.get((*key, m), {}) for m in
                             ("ours", "ours-paged", "ours-append", "ours-paged-append", "ours-graph", "sdpa"))
        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {f(o.get('kv_mb'))} | {'yes' if o.get('over_l3') else 'no'} "
            f"| {f(o.get('ms'))} | {f(p.get('ms'))} | {f(a.get('ms'))} | {f(pa.get('ms'))} | {f(g.get('ms'))} "
            f"| {f(s.get('ms'))} | {f(o.get('kv_gbps'))} | {f(o.get('copy_gbps'))} | {f(o.get('roofline_gbps'))} "
            f"| {f(o.get('pct_roofline'))} | {f(p.get('pct_roofline'))} | {f(g.get('pct_roofline'))} "
            f"| {f(o.get('x_sdpa'))} | {f(p.get('x_sdpa'))} | {f(p.get('paged_ratio'))} | {f(pa.get('paged_ratio'))} |")
    failed = [r for r in rows if r["status"] != "ok"]
    for r in failed:
        lines.append(f"\n{r['dtype']} B={r['batch']} keys={r['keys']} Sq={r['queries']} {r['method']}: {r['status']} "
                     f"({r['error']})")
    diffs = [r["max_diff"] for r in rows if r["max_diff"] is not None]
    if diffs:
        lines += ["", f"Largest output difference (attend only: from SDPA; append: paged from contiguous): "
                      f"{max(diffs):.3g}"]
    names = {"roofline": f"K+V GB/s as % of the roofline: CPU caches over L3 (at least {ROOFLINE_BAR:g}), GPU "
                         f"B >= 8 with 8k keys or more (at least {GPU_ROOFLINE_BAR:g})",
             "x_sdpa": "sdpa ms / ours ms (at least 2 fp32, 5 bf16)",
             "paged": f"paged ms / contiguous ms (at most {PAGED_BAR:g})"}
    targets = evaluate_targets(rows)
    lines += ["", "Targets:"]
    for name, title in names.items():
        these = [t for t in targets if t["target"] == name]
        lines += ["", f"{title}:" + ("" if these else " no case measured")]
        for t in these:
            lines.append(f"- {t['case']}: {t['value']:.3g} (bar {t['bar']:g}): {'met' if t['met'] else 'NOT met'}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- cli


def _shapes(text: str) -> list[tuple[int, int]]:
    """'1x8192,8x8192' -> [(1, 8192), (8, 8192)] (batch x keys)."""
    out = []
    for item in common.comma_strs(text):
        b, _, n = item.lower().partition("x")
        out.append((int(b), int(n)))
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cpu or cuda")
    p.add_argument("--shapes", type=_shapes, help="batch x keys list (default 1x8192,1x32768,8x8192)")
    p.add_argument("--queries", type=common.comma_ints, default=QUERIES,
                   help="query tokens per sequence, a list (default 1,4)")
    p.add_argument("--dtypes", type=common.comma_strs, help="default fp32,bf16 (CPU), bf16,fp16 (GPU)")
    p.add_argument("--methods", type=common.comma_strs,
                   help=f"default all: {','.join(METHODS)} ({', '.join(GPU_ONLY)} on GPUs only)")
    p.add_argument("--heads-q", type=int, default=32)
    p.add_argument("--heads-k", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cold", action="store_true",
                   help="CPU: time single calls, each after evicting the caches (K/V from memory)")
    p.add_argument("--copy-bytes", choices=["rw", "read"], default="rw",
                   help="copy bandwidth counts read + write bytes (default) or the read bytes only")
    p.add_argument("--matmul-size", type=int, help="n of the torch.mm peak rate (default 2048; quick 256)")
    p.add_argument("--repeats", type=int, help="CPU: timing rounds, methods in rotated order (default 5); "
                   "GPU: CUDA-event fallback count")
    common.add_run_args(p, DEFAULT_OUT, "tiny caches, one round (a smoke test)")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.device.startswith("cuda")
    if args.dtypes is None:
        args.dtypes = ["bf16", "fp16"] if gpu else ["fp32", "bf16"]
    if args.shapes is None:
        args.shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.repeats is None:
        args.repeats = 1 if args.quick else (20 if gpu else 5)
    if args.matmul_size is None:
        args.matmul_size = 256 if args.quick else 2048
    if args.quick:
        args.min_run_time = min(args.min_run_time, 0.002)
    if args.methods is None:
        args.methods = [m for m in METHODS if gpu or m not in GPU_ONLY]
    common.check_choices(p, "--methods", args.methods, METHODS)
    if gpu and args.cold:
        p.error("--cold: CPU only")
    if any(n < 1 for n in args.queries):
        p.error(f"--queries: expected counts >= 1, got {args.queries}")
    if not gpu and set(args.methods) & set(GPU_ONLY):
        p.error(f"--methods: {', '.join(GPU_ONLY)} runs on GPUs only (CUDA graphs)")
    args.dtypes = common.dtype_names(p, args.dtypes)
    if args.heads_q % args.heads_k:
        p.error(f"--heads-q ({args.heads_q}) must be a multiple of --heads-k ({args.heads_k})")
    return args


def run(args: argparse.Namespace) -> list[dict]:
    """Measure every case; print, write <out>/decode.{csv,json,md}; return the rows."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = common.environment(device)
    env["load_before"] = common.load_average()
    l3 = l3_bytes() if device.type == "cpu" else None
    env["l3_bytes"] = l3
    # The peak FLOP rate of a dtype: torch.mm's in it, or fp32's where that is higher: the
    # kernels compute 16-bit products as fp32 FMAs where the CPU has no 16-bit arithmetic
    # (AVX2), while torch's own bf16 mm there can be a slow fallback (under 1 GFLOP/s on an
    # AVX2-only VM, benchmarks/RESULTS.md) that would put the roofline far below anything real.
    env["mm_tflops"] = {d: common.matmul_tflops(device, n=args.matmul_size, dtype=common.DTYPES[d])[0]
                        for d in dict.fromkeys([*args.dtypes, "fp32"])}
    env["peak_tflops"] = {d: max(env["mm_tflops"][d], env["mm_tflops"]["fp32"]) for d in args.dtypes}
    todo = cases(args)
    print(f"# decode: {env['device']} | torch {env['torch']} | commit {env['commit']} | {env['date']}"
          f" | cpu kernels: {env['cpu_kernels']} | load {env['load_before']}"
          f" | L3 {'?' if l3 is None else f'{l3 / 2**20:.0f} MiB'}")
    print(f"# Sq={','.join(map(str, args.queries))} Hq/Hk={args.heads_q}/{args.heads_k} D={args.head_dim} "
          f"page {args.page_size}; "
          f"peak FLOP rate " + ", ".join(f"{k} {v * 1e3:.1f} GFLOP/s" for k, v in env["peak_tflops"].items())
          + f"; copy counts {'read+write' if args.copy_bytes == 'rw' else 'read'} bytes; rounds {args.repeats}"
          + ("; cold (caches evicted before each call)" if args.cold else ""))
    if args.quick:
        print("# --quick: tiny caches and one round, a smoke test; its times and targets mean nothing")
    return common.run_cases(
        todo, "decode", lambda case: f"{case.dtype} B{case.batch} keys{case.keys} Sq{case.queries}",
        lambda case: measure_case(case, args.methods, device, args, env["peak_tflops"][case.dtype], l3), args,
        CSV_FIELDS, TABLE_COLUMNS, "K+V GB/s = K and V bytes attended / time; roof = min(copy GB/s, peak FLOP/s x "
        "bytes/FLOP); x sdpa = sdpa ms / this ms (>1: faster than torch)", markdown, evaluate_targets, env)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()

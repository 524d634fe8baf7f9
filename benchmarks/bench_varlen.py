"""Packed sequences (varlen): one launch against a per-document loop and padded SDPA.

    python benchmarks/bench_varlen.py               # defaults for the hardware present
    python benchmarks/bench_attention.py --varlen   # the same (other options pass through)
    python benchmarks/bench_varlen.py --quick       # seconds: tiny sets, one round

Documents of random lengths (fixed seed) packed into (total, H, D) q/k/v, causal within
each document, H=8, D=64. Two document sets:
  A   256 documents of 16-128 tokens (short documents: per-call overhead dominates)
  B   64 documents of 16-1024 tokens (mixed lengths: padding dominates)
Methods, timed in alternation on the same data (common.time_cpu_interleaved on the CPU):
  ours          flashattn_py.flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len,
                causal=True): all documents in one kernel launch
  loop          the previous approach: per document flashattn_py.flash_attn_func(
                q[a:b][None], k[a:b][None], v[a:b][None], causal=True), then torch.cat
                (the offsets read with cu.tolist() inside the call, as it did)
  sdpa-padded   torch.nn.functional.scaled_dot_product_attention on the padded
                (B, H, max_len, D) batch with a boolean padding + causal mask (B, 1, S, S)
                built once outside the timing (torch's default backend choice)
  torch-varlen  torch.nn.attention.varlen.varlen_attn(..., window_size=(-1, 0)); CUDA
                only (on the CPU it raises NotImplementedError: an "unsupported" row)
and, on one sequence as long as a set's total ("one" rows; --dense-one, default set A:
17,479 tokens; on the CPU only in fwd unless --dense-one-modes says otherwise):
  ours          flash_attn_varlen_func with cu = [0, total]
  dense         flash_attn_func(q[None], k[None], v[None], causal=True): the dense kernel

Modes: fwd (no grad) and fwd+bwd (forward then torch.autograd.grad). CPU timing: after
one warm-up call each, --repeats rounds (fwd+bwd: --repeats-fwd-bwd; default 3 and 2, which
aim at about 4 minutes on a quiet 2-core machine; the loop's fwd+bwd alone takes 10-65 s a
call there, and a loaded machine took 11 minutes), each round one sample of every
method in rotated order; a sample is a block of calls lasting --min-run-time. Per row: median ms,
GFLOP/s of the visible causal pairs only (forward sum over documents of
4*H*D*L*(L+1)/2; fwd+bwd 3.5x as in common.MODE_FACTORS; the same count for every method,
so padded SDPA's rate is its useful work), ``ms / ours`` (above 1: ours is faster) and,
in fwd, the largest difference of the method's output from ours (a check that all compute
the same thing; --no-check skips it).

Writes <out>/varlen.csv, varlen.json (rows + environment) and varlen.md (the summary
table with the targets, for RESULTS.md).
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import flashattn_py  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "out"
MODES = ("fwd", "fwd+bwd")
METHODS = ("ours", "loop", "sdpa-padded", "torch-varlen")
CSV_FIELDS = [
    "device", "set", "docs", "tokens", "max_len", "mode", "dtype", "heads", "head_dim", "causal",
    "method", "status", "ms", "gflops", "vs_ours", "max_diff", "error",
]
TABLE_COLUMNS = [
    ("set", "set"), ("docs", "docs"), ("tokens", "tokens"), ("max_len", "max L"), ("mode", "mode"),
    ("dtype", "dtype"), ("method", "method"), ("ms", "ms"), ("gflops", "GFLOP/s"),
    ("vs_ours", "ms/ours"), ("max_diff", "max diff"), ("status", "status"),
]


@dataclass(frozen=True)
class DocSet:
    name: str
    docs: int
    min_len: int
    max_len: int


DOC_SETS = {"A": DocSet("A", 256, 16, 128), "B": DocSet("B", 64, 16, 1024)}
QUICK_SETS = {"A": DocSet("A", 8, 4, 24), "B": DocSet("B", 3, 4, 80)}

# Targets stated in RESULTS.md: (set, method, least ms(method) / ms(ours)).
TARGETS = [("A", "loop", 3.0), ("B", "loop", 1.1), ("B", "sdpa-padded", 7.0), ("one", "dense", 0.97)]


def doc_lengths(doc_set: DocSet, seed: int) -> list[int]:
    """The set's document lengths: uniform in [min_len, max_len], from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(doc_set.min_len, doc_set.max_len + 1, (doc_set.docs,), generator=gen).tolist()


def visible_pairs(lengths: Sequence[int]) -> int:
    """(query, key) pairs a causal mask lets through, per head: sum of L*(L+1)/2."""
    return sum(n * (n + 1) // 2 for n in lengths)


def varlen_flops(lengths: Sequence[int], heads: int, head_dim: int, mode: str) -> float:
    """Forward 4*H*D per visible pair (two products of 2 flops a pair and feature);
    times common.MODE_FACTORS[mode] (fwd+bwd 3.5x)."""
    return 4.0 * heads * head_dim * visible_pairs(lengths) * common.MODE_FACTORS[mode]


@dataclass(frozen=True)
class Case:
    set: str  # "A", "B", or "one" (a single sequence as long as ``of``'s total)
    lengths: tuple
    mode: str
    dtype: str
    of: str = ""

    @property
    def tokens(self) -> int:
        return sum(self.lengths)


# ----------------------------------------------------------------------------- inputs and steps


def padded_mask(lengths: Sequence[int], device: torch.device) -> torch.Tensor:
    """(B, 1, S, S) bool, True where query i of document b may see key j: j <= i and j < L_b.
    Padded query rows see their document's keys (no empty row, so no NaN)."""
    s = max(lengths)
    i = torch.arange(s, device=device)
    lens = torch.tensor(list(lengths), device=device)
    causal = i[None, :] <= i[:, None]
    return (causal[None] & (i[None, None, :] < lens[:, None, None]))[:, None]


def to_padded(x: torch.Tensor, offsets: Sequence[int], max_len: int) -> torch.Tensor:
    """Packed (T, H, D) to padded (B, H, max_len, D), zeros past each document's end."""
    batch = len(offsets) - 1
    out = x.new_zeros((batch, max_len, *x.shape[1:]))
    for b, (a, e) in enumerate(zip(offsets, offsets[1:])):
        out[b, : e - a] = x[a:e]
    return out.transpose(1, 2).contiguous()


def from_padded(x: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """Padded (B, H, S, D) back to packed (T, H, D)."""
    return torch.cat([x[b, :, :n].transpose(0, 1) for b, n in enumerate(lengths)], dim=0)


def build_calls(case: Case, heads: int, head_dim: int, device: torch.device, seed: int):
    """{method: (inputs, call, unpack)} for ``case``; ``call(*inputs)`` returns the output,
    ``unpack`` turns it into the packed (T, H, D) layout for the check."""
    dtype = common.DTYPES[case.dtype]
    grad = case.mode != "fwd"
    lengths = list(case.lengths)
    offsets = [0, *itertools.accumulate(lengths)]
    total, max_len = offsets[-1], max(lengths)
    gen = torch.Generator().manual_seed(seed + 1)
    q, k, v, dout = (torch.randn((total, heads, head_dim), generator=gen).to(device=device, dtype=dtype)
                     for _ in range(4))
    cu = torch.tensor(offsets, dtype=torch.int32, device=device)
    packed = tuple(t.detach().clone().requires_grad_(grad) for t in (q, k, v))
    ident = lambda out: out  # noqa: E731
    calls = {}

    def ours(q, k, v):
        return flashattn_py.flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=True)

    calls["ours"] = (packed, ours, ident, dout)
    if case.set == "one":
        def dense(q, k, v):
            return flashattn_py.flash_attn_func(q[None], k[None], v[None], causal=True)[0]

        calls["dense"] = (packed, dense, ident, dout)
        return calls

    def loop(q, k, v):
        offs = cu.tolist()  # as the per-sequence implementation did (a sync on a GPU)
        outs = [flashattn_py.flash_attn_func(q[a:b][None], k[a:b][None], v[a:b][None], causal=True)
                for a, b in zip(offs, offs[1:])]
        return torch.cat(outs, dim=1)[0]

    calls["loop"] = (packed, loop, ident, dout)

    mask = padded_mask(lengths, device)
    padded = tuple(to_padded(t, offsets, max_len).requires_grad_(grad) for t in (q, k, v))

    def sdpa_padded(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    calls["sdpa-padded"] = (padded, sdpa_padded, lambda out: from_padded(out, lengths),
                            to_padded(dout, offsets, max_len))

    def torch_varlen(q, k, v):
        from torch.nn.attention.varlen import varlen_attn

        return varlen_attn(q, k, v, cu, cu, max_len, max_len, window_size=(-1, 0))

    calls["torch-varlen"] = (packed, torch_varlen, ident, dout)
    return calls


def make_step(mode: str, inputs, call: Callable, dout) -> Callable[[], object]:
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return call(*inputs)
    else:
        def step():
            return torch.autograd.grad(call(*inputs), inputs, dout)
    return step


# ----------------------------------------------------------------------------- measuring


def _row(case: Case, method: str, heads: int, head_dim: int, device: torch.device) -> dict:
    return {
        "device": device.type, "set": case.set, "docs": len(case.lengths), "tokens": case.tokens,
        "max_len": max(case.lengths), "mode": case.mode, "dtype": case.dtype, "heads": heads,
        "head_dim": head_dim, "causal": 1, "method": method, "status": "ok", "ms": None,
        "gflops": None, "vs_ours": None, "max_diff": None, "error": "", "of": case.of,
    }


def measure_case(case: Case, methods: Sequence[str], device: torch.device, args) -> list[dict]:
    """One row per method; on the CPU the methods are timed in alternation."""
    calls = build_calls(case, args.heads, args.head_dim, device, args.seed)
    names = [m for m in calls if m in methods or m in ("ours", "dense")]
    rows = {m: _row(case, m, args.heads, args.head_dim, device) for m in names}
    steps = {}
    reference = None
    for m in names:
        inputs, call, unpack, dout = calls[m]
        try:
            if args.check and case.mode == "fwd":
                with torch.no_grad():
                    out = unpack(call(*inputs)).float()
                if reference is None:
                    reference = out
                rows[m]["max_diff"] = (out - reference).abs().max().item()
                del out
            step = make_step(case.mode, inputs, call, dout)
            if device.type == "cuda":
                rows[m]["ms"] = common.time_ms(step, device, repeats=args.repeats)
            else:
                steps[m] = step
        except Exception as exc:  # noqa: BLE001 - a failure is a row
            common.mark_failed(rows[m], exc)
            common.free_memory(device, collect=True)
    if steps:
        rounds = args.repeats if case.mode == "fwd" else args.repeats_fwd_bwd
        timed = common.time_cpu_interleaved(steps, rounds=rounds, min_run_time=args.min_run_time)
        common.fill_timings(list(rows.values()), "method", timed)
    del steps, calls
    common.free_memory(device)
    flops = varlen_flops(case.lengths, args.heads, args.head_dim, case.mode)
    ours_ms = rows["ours"]["ms"] if rows["ours"]["status"] == "ok" else None
    for row in rows.values():
        if row["status"] == "ok" and row["ms"]:
            row["gflops"] = flops / (row["ms"] * 1e-3) / 1e9
            row["vs_ours"] = row["ms"] / ours_ms if ours_ms else None
    return list(rows.values())


def cases(args) -> list[Case]:
    sets = QUICK_SETS if args.quick else DOC_SETS
    lengths = {name: tuple(doc_lengths(sets[name], args.seed)) for name in {*args.sets, *args.dense_one}}
    out = []
    for mode, dtype in itertools.product(args.modes, args.dtypes):
        out += [Case(name, lengths[name], mode, dtype) for name in args.sets]
        if mode in args.dense_one_modes:
            out += [Case("one", (sum(lengths[name]),), mode, dtype, of=name) for name in args.dense_one]
    return out


# ----------------------------------------------------------------------------- summary


def _ms(rows: list[dict], case_key: tuple, method: str) -> float | None:
    for r in rows:
        if (r["set"], r["of"], r["mode"], r["dtype"]) == case_key and r["method"] == method and r["status"] == "ok":
            return r["ms"]
    return None


def evaluate_targets(rows: list[dict]) -> list[dict]:
    """One entry per (target, mode, dtype) measured: the ratio ms(method) / ms(ours) and met."""
    out = []
    keys = list(dict.fromkeys((r["set"], r["of"], r["mode"], r["dtype"]) for r in rows))
    for set_name, method, bar in TARGETS:
        for key in keys:
            if key[0] != set_name:
                continue
            ours, theirs = _ms(rows, key, "ours"), _ms(rows, key, method)
            if ours is None or theirs is None:
                continue
            ratio = theirs / ours
            out.append({"set": set_name, "of": key[1], "mode": key[2], "dtype": key[3], "method": method,
                        "ratio": ratio, "bar": bar, "met": ratio >= bar})
    return out


def markdown(rows: list[dict], env: dict, args, elapsed: float) -> str:
    """The summary for RESULTS.md: one line per (set, mode, dtype), then the targets."""
    f = lambda x, d=3: common.fmt(x, d)  # noqa: E731
    lines = [
        f"{env['device']}; torch {env['torch']}; commit `{env['commit']}`; {env['date']}; "
        f"`CPU_KERNELS` = `{env['cpu_kernels']}`; load average {env['load_before']} before, "
        f"{env['load_after']} after; {elapsed:.0f} s",
        "",
        "| set | docs, tokens, max L | mode | dtype | ours ms | loop ms | sdpa-padded ms "
        "| loop / ours | padded / ours | ours GFLOP/s | loop GFLOP/s | padded GFLOP/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    keys = list(dict.fromkeys((r["set"], r["of"], r["mode"], r["dtype"]) for r in rows))
    by = {(r["set"], r["of"], r["mode"], r["dtype"], r["method"]): r for r in rows}
    for key in keys:
        if key[0] == "one":
            continue
        ours, loop, pad = (by.get((*key, m), {}) for m in ("ours", "loop", "sdpa-padded"))
        lines.append(
            f"| {key[0]} | {ours.get('docs')}, {ours.get('tokens')}, {ours.get('max_len')} | {key[2]} | {key[3]} "
            f"| {f(ours.get('ms'))} | {f(loop.get('ms'))} | {f(pad.get('ms'))} "
            f"| {f(loop.get('vs_ours'))} | {f(pad.get('vs_ours'))} "
            f"| {f(ours.get('gflops'))} | {f(loop.get('gflops'))} | {f(pad.get('gflops'))} |")
    one = [k for k in keys if k[0] == "one"]
    if one:
        lines += ["", "| one sequence | mode | dtype | ours (varlen) ms | dense ms | dense / ours "
                      "| ours GFLOP/s | dense GFLOP/s |", "|---|---|---|---|---|---|---|---|"]
        for key in one:
            ours, dense = by.get((*key, "ours"), {}), by.get((*key, "dense"), {})
            lines.append(f"| {ours.get('tokens')} tokens (set {key[1]}'s total) | {key[2]} | {key[3]} "
                         f"| {f(ours.get('ms'))} | {f(dense.get('ms'))} | {f(dense.get('vs_ours'))} "
                         f"| {f(ours.get('gflops'))} | {f(dense.get('gflops'))} |")
    tv = [r for r in rows if r["method"] == "torch-varlen"]
    if tv:
        ok = [r for r in tv if r["status"] == "ok"]
        if ok:
            lines += ["", "torch varlen_attn, ms / ours: " + ", ".join(
                f"{r['set']} {r['mode']} {r['dtype']} {f(r['vs_ours'])}" for r in ok)]
        else:
            lines += ["", f"torch varlen_attn: {tv[0]['status']} here ({tv[0]['error'][:100]})"]
    diffs = [r["max_diff"] for r in rows if r["max_diff"] is not None]
    if diffs:
        lines += ["", f"Largest output difference from ours (fwd, all methods): {max(diffs):.3g}"]
    lines += ["", "Targets (ms of the other method / ms of ours, at least the bar):", ""]
    for t in evaluate_targets(rows):
        what = f"set {t['set']}" if t["set"] != "one" else f"one sequence ({t['of']}'s total)"
        lines.append(f"- {what}, {t['method']}, {t['mode']} {t['dtype']}: {t['ratio']:.3f} "
                     f"(bar {t['bar']}): {'met' if t['met'] else 'NOT met'}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- cli


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cpu or cuda")
    p.add_argument("--sets", type=common.comma_strs, default=["A", "B"], help="document sets (default A,B; 'none')")
    p.add_argument("--dense-one", type=common.comma_strs, help="sets whose total length gets the one-sequence "
                   "check (default: A on the CPU, A,B on a GPU; 'none' for none)")
    p.add_argument("--dense-one-modes", type=common.comma_strs, help="modes of the one-sequence check (default: "
                   "fwd on the CPU, where fwd+bwd at 17k tokens takes minutes; fwd,fwd+bwd on a GPU)")
    p.add_argument("--modes", type=common.comma_strs, default=list(MODES), help="fwd,fwd+bwd (default both)")
    p.add_argument("--dtypes", type=common.comma_strs, help="default fp32,bf16 (CPU), bf16,fp16 (GPU)")
    p.add_argument("--methods", type=common.comma_strs, default=list(METHODS),
                   help=f"besides ours (default all: {','.join(METHODS)})")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="document lengths and data (default 0)")
    p.add_argument("--repeats", type=int, help="CPU: timing rounds, methods in rotated order (default 3); "
                   "GPU: CUDA-event fallback count")
    p.add_argument("--repeats-fwd-bwd", type=int, help="CPU: the same for fwd+bwd cases (default 2: the "
                   "loop's fwd+bwd takes seconds a call)")
    common.add_run_args(p, DEFAULT_OUT, "tiny sets, one round (a smoke test)")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.device.startswith("cuda")
    if args.dtypes is None:
        args.dtypes = ["bf16", "fp16"] if gpu else ["fp32", "bf16"]
    if args.dense_one is None:
        args.dense_one = list(args.sets) if gpu else ["A"]
    args.sets = [s for s in args.sets if s.lower() != "none"]
    args.dense_one = [s for s in args.dense_one if s.lower() != "none"]
    if args.dense_one_modes is None:
        args.dense_one_modes = list(args.modes) if gpu or args.quick else ["fwd"]
    if args.repeats is None:
        args.repeats = 1 if args.quick else (20 if gpu else 3)
    if args.repeats_fwd_bwd is None:
        args.repeats_fwd_bwd = args.repeats if gpu or args.quick else min(args.repeats, 2)
    if args.quick:
        args.min_run_time = min(args.min_run_time, 0.002)
    for name in (*args.sets, *args.dense_one):
        if name not in DOC_SETS:
            p.error(f"unknown document set {name!r} (A, B)")
    common.check_choices(p, "--modes", (*args.modes, *args.dense_one_modes), MODES)
    common.check_choices(p, "--methods", args.methods, METHODS)
    args.dtypes = common.dtype_names(p, args.dtypes)
    return args


def run(args: argparse.Namespace) -> list[dict]:
    """Measure every case; print, write <out>/varlen.{csv,json,md}; return the rows."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = common.environment(device)
    env["load_before"] = common.load_average()
    todo = cases(args)
    print(f"# varlen: {env['device']} | torch {env['torch']} | commit {env['commit']} | {env['date']}"
          f" | cpu kernels: {env['cpu_kernels']} | load {env['load_before']}")
    shown = {c.set: c for c in todo if c.set != "one"}
    print(f"# H={args.heads} D={args.head_dim} causal; sets "
          + ", ".join(f"{c.set}: {len(c.lengths)} docs, {c.tokens} tokens, max {max(c.lengths)}"
                      for c in shown.values())
          + f"; rounds fwd {args.repeats}, fwd+bwd {args.repeats_fwd_bwd}")
    return common.run_cases(
        todo, "varlen", lambda case: f"{case.set}{case.of} {case.mode} {case.dtype}",
        lambda case: measure_case(case, args.methods, device, args), args, CSV_FIELDS, TABLE_COLUMNS,
        "ms/ours = this ms / ours ms (>1: ours is faster); GFLOP/s of the visible causal pairs", markdown,
        evaluate_targets, env)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()

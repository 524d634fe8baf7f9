"""Compact table of a bench_attention.py CSV (also a partial one, from a killed run).

    python benchmarks/summarize.py benchmarks/out/attention.csv [--markdown]

One line per (setting, backend): setting, backend, ms, TFLOP/s, x torch (fastest sdpa-*
ms in that setting / this ms, recomputed here so a partial CSV gets it too) and the
status for rows that failed. --markdown prints a Markdown table (for RESULTS.md).
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def load(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for key in ("ms", "tflops", "peak_mem_mb", "pct_matmul"):
            r[key] = float(r[key]) if r.get(key) not in (None, "") else None
    return rows


def compact(rows: list[dict]) -> list[dict]:
    common.add_ratios(rows, {r["backend"] for r in rows if r["backend"].startswith("sdpa-")})
    out = []
    for r in rows:
        causal = "causal" if str(r["causal"]) == "1" else "full"
        out.append({
            "setting": f"{r['mode']} {r['dtype']} D{r['head_dim']} {causal} N{r['seqlen']} B{r['batch']}xH{r['heads']}",
            "backend": r["backend"],
            "ms": r["ms"],
            "tflops": r["tflops"],
            "pct_matmul": r.get("pct_matmul"),
            "peak_mem_mb": r.get("peak_mem_mb"),
            "x_torch": r.get("x_torch"),
            "status": r["status"],
        })
    return out


COLUMNS = [("setting", "setting"), ("backend", "backend"), ("ms", "ms"), ("tflops", "TFLOP/s"),
           ("pct_matmul", "%mm"), ("peak_mem_mb", "mem MB"), ("x_torch", "x torch"), ("status", "status")]


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(common.fmt(r.get(k)) for k, _ in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("csv", type=Path)
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    if not args.csv.exists():
        print(f"no results: {args.csv} does not exist")
        return
    rows = compact(load(args.csv))
    if not rows:
        print(f"no results: {args.csv} has no rows")
        return
    print(markdown(rows) if args.markdown else common.format_table(rows, COLUMNS))


if __name__ == "__main__":
    main()

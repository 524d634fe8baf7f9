"""Smoke test of benchmarks/bench_attention.py: a tiny run end to end, and the flop count."""
import csv
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_attention  # noqa: E402
import common  # noqa: E402


def test_attention_flops_follow_design():
    fwd = 4 * 2 * 4 * 1024 * 1024 * 64
    assert common.attention_flops(2, 4, 1024, 1024, 64, causal=False, mode="fwd") == fwd
    assert common.attention_flops(2, 4, 1024, 1024, 64, causal=True, mode="fwd") == fwd / 2
    assert common.attention_flops(2, 4, 1024, 1024, 64, causal=False, mode="bwd") == 2.5 * fwd
    assert common.attention_flops(2, 4, 1024, 1024, 64, causal=True, mode="fwd+bwd") == 3.5 * fwd / 2


def test_bench_attention_tiny_run(tmp_path):
    pytest.importorskip("flashattn_py.reference")
    rows = bench_attention.main([
        "--device", "cpu", "--seqlens", "64", "--head-dims", "16", "--dtypes", "fp32",
        "--causal", "1", "--modes", "fwd,fwd+bwd", "--backends", "naive,sdpa",
        "--batch", "1", "--heads", "2", "--repeats", "2", "--min-run-time", "0.001",
        "--matmul-size", "256", "--out", str(tmp_path), "--no-plot", "--no-progress",
    ])
    assert (tmp_path / "attention.json").exists()
    with open(tmp_path / "attention.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows) == 2 * 3  # modes x (naive, sdpa-flash, sdpa-math)
    assert {"ms", "tflops", "x_torch", "pct_matmul", "peak_mem_mb", "status"} <= set(csv_rows[0])
    assert {r["backend"] for r in csv_rows} == {"naive", "sdpa-flash", "sdpa-math"}
    for r in csv_rows:
        assert r["status"] == "ok", r
        assert float(r["ms"]) > 0 and float(r["tflops"]) > 0
        assert float(r["x_torch"]) > 0
    # In each setting the fastest torch backend is the baseline: its ratio is exactly 1.
    for mode in ("fwd", "fwd+bwd"):
        for causal in ("1",):
            torch_ratios = [float(r["x_torch"]) for r in csv_rows
                            if r["mode"] == mode and r["causal"] == causal and r["backend"].startswith("sdpa-")]
            assert max(torch_ratios) == pytest.approx(1.0)
    payload = json.loads((tmp_path / "attention.json").read_text())
    assert payload["matmul_tflops"] > 0 and len(payload["rows"]) == len(rows)


def test_paired_tiny_run():
    import paired

    result = paired.main(["--seqlen", "33", "--head-dim", "8", "--heads", "2", "--mode", "fwd+bwd", "--pairs", "4"])
    assert result["pairs"] == 4
    assert 0 < result["q1"] <= result["median"] <= result["q3"]


def test_bench_varlen_quick_run(tmp_path):
    """bench_attention.py --varlen --quick: rows for ours, the per-document loop and padded SDPA."""
    pytest.importorskip("flashattn_py._C")
    rows = bench_attention.main(["--varlen", "--quick", "--device", "cpu", "--out", str(tmp_path),
                                 "--no-progress"])
    with open(tmp_path / "varlen.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows) > 0
    assert (tmp_path / "varlen.json").exists() and "| set |" in (tmp_path / "varlen.md").read_text()
    by_method = {}
    for r in csv_rows:
        by_method.setdefault(r["method"], []).append(r)
    for method in ("ours", "loop", "sdpa-padded", "dense"):
        assert by_method.get(method), method
        for r in by_method[method]:
            assert r["status"] == "ok", r
            assert float(r["ms"]) > 0 and float(r["gflops"]) > 0 and float(r["vs_ours"]) > 0
    # Every set, both modes, both dtypes; ours is its own baseline.
    assert {(r["set"], r["mode"], r["dtype"]) for r in by_method["loop"]} == {
        (s, m, d) for s in ("A", "B") for m in ("fwd", "fwd+bwd") for d in ("fp32", "bf16")}
    assert all(float(r["vs_ours"]) == pytest.approx(1.0) for r in by_method["ours"])
    # The methods compute the same attention (fwd rows carry the largest difference from ours).
    assert all(float(r["max_diff"]) < 0.05 for r in csv_rows if r["max_diff"] not in ("", None))
    # torch's varlen_attn runs on CUDA only: on the CPU a failure row, not a crash.
    assert all(r["status"] in ("ok", "unsupported", "error") for r in by_method.get("torch-varlen", []))


def test_varlen_flops_count_visible_pairs():
    import bench_varlen

    # Two documents of 3 and 1 tokens: 6 + 1 visible pairs per head.
    assert bench_varlen.visible_pairs([3, 1]) == 7
    assert bench_varlen.varlen_flops([3, 1], 8, 64, "fwd") == 4 * 8 * 64 * 7
    assert bench_varlen.varlen_flops([3, 1], 8, 64, "fwd+bwd") == 3.5 * 4 * 8 * 64 * 7
    mask = bench_varlen.padded_mask([3, 1], "cpu")
    assert mask.shape == (2, 1, 3, 3) and int(mask.sum()) == 6 + 3  # padded rows see the document


def test_bench_attention_default_run_adds_varlen():
    assert bench_attention.parse_args([]).default_run
    assert bench_attention.parse_args(["--device", "cpu", "--no-plot"]).default_run
    assert not bench_attention.parse_args(["--seqlens", "64"]).default_run


def test_bench_decode_quick_run(tmp_path):
    """bench_attention.py --decode --quick: ours (contiguous, paged, appending) against SDPA."""
    pytest.importorskip("flashattn_py._C")
    import bench_decode

    rows = bench_attention.main(["--decode", "--quick", "--device", "cpu", "--out", str(tmp_path),
                                 "--no-progress", "--shapes", "1x64,2x40", "--matmul-size", "128"])
    with open(tmp_path / "decode.csv") as f:
        csv_rows = list(csv.DictReader(f))
    cpu_methods = [m for m in bench_decode.METHODS if m not in bench_decode.GPU_ONLY]
    # dtypes x shapes x query counts (1, 4) x methods
    assert len(csv_rows) == len(rows) == 2 * 2 * 2 * len(cpu_methods)
    assert {r["queries"] for r in csv_rows} == {"1", "4"}
    assert (tmp_path / "decode.json").exists() and "| dtype |" in (tmp_path / "decode.md").read_text()
    for r in csv_rows:
        assert r["status"] == "ok", r
        assert float(r["ms"]) > 0 and float(r["kv_gbps"]) > 0 and float(r["pct_roofline"]) > 0
        assert float(r["roofline_gbps"]) <= min(float(r["copy_gbps"]), float(r["flop_gbps"])) * (1 + 1e-9)
        assert float(r["x_sdpa"]) > 0
        assert float(r["max_diff"]) < 0.05, r  # every method computes the same attention
        assert (r["paged_ratio"] != "") == ("paged" in r["method"])
    assert all(float(r["x_sdpa"]) == pytest.approx(1.0) for r in csv_rows if r["method"] == "sdpa")
    payload = json.loads((tmp_path / "decode.json").read_text())
    assert {t["target"] for t in payload["targets"]} >= {"x_sdpa", "paged"}


def test_bench_decode_cold_run(tmp_path):
    """--cold: single calls, each after evicting the caches (a 1 MiB stand-in buffer here)."""
    pytest.importorskip("flashattn_py._C")
    import bench_decode

    events = []
    real_evict, real_calls = bench_decode.evict_caches, bench_decode.build_calls

    def evict_caches(args, l3):
        evict = real_evict(args, 2**19)
        return lambda: (events.append("evict"), evict())

    def build_calls(case, args, device):
        return {m: (lambda fn=fn: (events.append("call"), fn())[1]) for m, fn in real_calls(case, args, device).items()}

    bench_decode.evict_caches, bench_decode.build_calls = evict_caches, build_calls
    try:
        rows = bench_decode.main(["--quick", "--cold", "--device", "cpu", "--out", str(tmp_path), "--no-progress",
                                  "--shapes", "1x64", "--dtypes", "fp32", "--queries", "1", "--methods", "ours,sdpa",
                                  "--repeats", "2"])
    finally:
        bench_decode.evict_caches, bench_decode.build_calls = real_evict, real_calls
    assert [r["status"] for r in rows] == ["ok", "ok"] and all(r["ms"] > 0 for r in rows)
    # ours and sdpa: a warm-up call, then (a probe + 2 rounds) x one call after an eviction
    timed = events[events.index("evict"):]
    assert timed.count("evict") == 3 * (1 + 2)  # (ours, sdpa, copy)
    assert timed.count("call") == 2 * (1 + 2)
    assert all(timed[i - 1] == "evict" for i, e in enumerate(timed) if e == "call")  # each call alone
    assert "Cold: single calls" in (tmp_path / "decode.md").read_text()


def test_bench_decode_rejects_bad_options(capsys):
    import bench_decode

    for argv, message in ((["--cold", "--device", "cuda"], "--cold: CPU only"),
                          (["--queries", "0"], "--queries: expected counts >= 1")):
        with pytest.raises(SystemExit):
            bench_decode.parse_args(argv)
        assert message in capsys.readouterr().err


def test_decode_gpu_roofline_target():
    # On GPUs the roofline bar (80 %) applies from B = 8 and 8k keys, to every method but
    # sdpa (the CUDA-graph replay too); CPU rows keep theirs (70 %, caches over the L3).
    import bench_decode

    def row(device, batch, method, pct, over_l3=None):
        return dict(device=device, dtype="bf16", batch=batch, keys=8192, method=method, status="ok", ms=0.1,
                    over_l3=over_l3, pct_roofline=pct, x_sdpa=None, paged_ratio=None)

    rows = [row("cuda", 8, "ours", 45.0), row("cuda", 8, "ours-graph", 83.0), row("cuda", 8, "sdpa", 82.0),
            row("cuda", 1, "ours", 18.0), row("cpu", 1, "ours", 72.0, over_l3=1)]
    got = {(t["case"], t["bar"], t["met"]) for t in bench_decode.evaluate_targets(rows) if t["target"] == "roofline"}
    assert got == {("bf16 B=8 keys=8192 ours", 80.0, False), ("bf16 B=8 keys=8192 ours-graph", 80.0, True),
                   ("bf16 B=1 keys=8192 ours", 70.0, True)}


def test_decode_bytes_and_flops():
    import bench_decode

    case = bench_decode.Case("bf16", 2, 1024)
    assert bench_decode.kv_bytes(case, 8, 128) == 2 * 2 * 1024 * 8 * 128 * 2
    assert bench_decode.decode_flops(case, 32, 128) == 4 * 2 * 32 * 1024 * 128
    l3 = bench_decode.l3_bytes()
    assert l3 is None or l3 > 0


def test_bench_attention_default_run_adds_decode():
    assert not bench_attention.parse_args([]).no_decode
    assert bench_attention.parse_args(["--no-decode"]).default_run


def test_context_parallel_local_steps_cover_the_causal_work():
    """bench_context_parallel.local_steps: the blocks each rank computes cover exactly the
    causal pairs of its rows (zigzag: the same count on every rank)."""
    import bench_context_parallel as cp

    world, s_local = 4, 8
    for impl in ("ring", "zigzag"):
        counts = []
        for rank in range(world):
            if impl == "ring":
                rows_global = list(range(rank * s_local, (rank + 1) * s_local))
            else:
                c = s_local // 2
                rows_global = [*range(rank * c, (rank + 1) * c), *range((2 * world - 1 - rank) * c,
                                                                        (2 * world - rank) * c)]
            pairs = 0
            for src, rows, cols, causal in cp.local_steps(impl, rank, world, s_local):
                src_rows = list(range(src * s_local, (src + 1) * s_local)) if impl == "ring" else [
                    *range(src * (s_local // 2), (src + 1) * (s_local // 2)),
                    *range((2 * world - 1 - src) * (s_local // 2), (2 * world - src) * (s_local // 2))]
                for i in range(rows.start, rows.stop):
                    for j in range(cols.start, cols.stop):
                        qi, kj = rows_global[i], src_rows[j]
                        assert causal or kj <= qi, (impl, rank, src)  # an unmasked block is all visible
                        pairs += (j <= i) if causal else 1
            assert pairs == sum(q + 1 for q in rows_global)  # every causal pair once
            counts.append(pairs)
        if impl == "zigzag":
            assert len(set(counts)) == 1


def test_context_parallel_paper_model():
    """The ring hides its transfers exactly while S/P >= 2 (Hk/H) rate / bandwidth; Ulysses
    needs P <= H."""
    import bench_context_parallel as cp

    h, hk, d = 32, 8, 128
    for s_local in (4096, 8192):
        m = cp.paper_model(s_local * 32, 32, h, hk, d)  # P=32: across nodes, InfiniBand
        threshold = 2 * hk / h * cp.fa3_tflops(s_local) * 1e12 / (cp.IB_GBS * 1e9)
        assert m["ring_hidden"] == (s_local >= threshold)
        assert m["ring_hidden"] == (m["ring_ms"] == pytest.approx(m["compute_only_ms"]))
    assert cp.paper_model(128 * 1024, 8, h, hk, d)["ring_hidden"]  # one node, NVLink
    assert cp.paper_model(128 * 1024, 64, h, hk, d)["ulysses_ms"] is None
    assert "P=512" in cp.model_grid()
    # USP: within a node it is Ulysses (a ring of one); across nodes a ring of nodes on H / 8
    # heads, whose transfers (Hk / 8 heads) stay hidden where the plain ring's do not
    one_node = cp.paper_model(128 * 1024, 8, h, hk, d)
    assert one_node["usp_ulysses"] == 8 and one_node["usp_ms"] == pytest.approx(one_node["ulysses_ms"])
    nodes = cp.paper_model(128 * 1024, 64, h, hk, d)
    assert nodes["usp_ulysses"] == 8 and nodes["usp_hidden"] and not nodes["ring_hidden"]
    assert nodes["usp_ms"] < nodes["ring_ms"] / 2
    assert cp.paper_model(128 * 1024, 48, 12, 12, 64)["usp_ulysses"] == 4  # (divides a node's 8, P, H and Hk)
    assert cp.paper_model(128 * 1024, 6, 12, 12, 64)["usp_ulysses"] == 6  # (one node: any divisor of P, H, Hk)


@pytest.mark.distributed
def test_bench_context_parallel_quick_run(tmp_path):
    pytest.importorskip("flashattn_py.distributed")
    import bench_context_parallel

    rows = bench_context_parallel.main(["--quick", "--seqlen", "256", "--out", str(tmp_path), "--no-progress",
                                        "--timeout", "120"])
    assert len(rows) == 8  # (ring, zigzag) x (fp32, bf16) x (fwd, fwd+bwd)
    for r in rows:
        assert r["status"] == "ok", r
        assert r["ring_ms"] > 0 and r["balance"] >= 1
    assert all(r["max_diff"] < 1e-2 for r in rows if r["mode"] == "fwd")
    assert (tmp_path / "context_parallel.json").exists()


@pytest.mark.distributed
def test_bench_context_parallel_packed_quick_run(tmp_path):
    pytest.importorskip("flashattn_py.distributed")
    import bench_context_parallel

    rows = bench_context_parallel.main(["--packed", "--quick", "--seqlen", "256", "--dtypes", "fp32",
                                        "--out", str(tmp_path), "--no-progress", "--timeout", "120"])
    assert [r["impl"] for r in rows] == [f"{i} (packed)" for i in bench_context_parallel.PACKED_IMPLS] * 2
    for r in rows:
        assert r["status"] == "ok", r
        assert r["ring_ms"] > 0 and r["together_ms"] > 0
    lengths = bench_context_parallel.packed_lengths(256, 2)
    assert sum(lengths) == 256 and all(n % 4 == 0 and n > 0 for n in lengths)

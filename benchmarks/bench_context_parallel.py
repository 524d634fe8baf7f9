"""Context parallelism on the CPU: how much of the ring's communication is hidden, and how even
the causal work is spread over the ranks (plain ring against zigzag).

Spawns ``world`` processes (gloo on 127.0.0.1, one torch thread each unless --threads) that
each hold B x S/world tokens of a causal attention over the global sequence S, and measures
per (world, implementation, dtype, mode):

- ``ring ms``: one call of ``ring_flash_attn_func`` / ``zigzag_ring_flash_attn_func``
  (``fwd+bwd``: the call and ``out.backward``), started after a barrier; the slowest rank's
  time, median over --repeats calls.
- ``local ms``: the same local kernel calls the ring makes, without any communication
  (``flashattn_py.attention_forward`` / ``attention_backward`` / ``merge_attention`` on the
  block shapes of each ring step, the rank's own K / V standing in for the arriving blocks; see
  ``local_steps``), on all ranks at once as in the ring (so they share the cores and memory
  the same way), the slowest rank; timed in alternation with the ring calls, so that load
  from elsewhere on the machine drifts into both alike.
- ``alone ms``: that local work timed on each rank in turn while the others wait (undisturbed
  per-rank compute; ``per-rank`` lists them); ``balance`` = max / min over the ranks (the
  issue's bar: zigzag <= 1.1; the plain ring's rank r does r full blocks and one diagonal).
- ``comm ms``: the ring's transfers alone (``batch_isend_irecv`` of the blocks each step sends,
  see ``ring_transfers``), no compute.
- ``exposed ms`` = ring - local (the part of the ring's time not explained by its compute);
  ``hidden %`` = 100 * (1 - exposed / comm): the share of the communication that overlapped
  compute (100: all of it; 0: none; below 0: the ring costs more than compute + its transfers,
  e.g. its per-call argument check, allocation of the arriving blocks, or waiting for a slower
  rank).

``--packed`` compares the packed-document forms instead (causal, the global row cut into
documents whose lengths are multiples of 2 * world, so that every form takes them):
``ring``, ``zigzag`` and ``ulysses`` (``*_flash_attn_varlen_func``) and ``llama3``
(``llama3_flash_attn_varlen_func``, offsets prepared once, outside the timing): ``ring ms``
is one call (``fwd+bwd``: with ``out.backward``), the slowest rank, median over --repeats
rounds that alternate the forms; ``local ms`` the rank's share of the work without any
communication (``flash_attn_varlen_func`` on the whole row on one process, timed alone,
divided by the world size: what perfect scaling would give).

``--model`` prints instead a paper model of ring against Ulysses on GPU clusters (no
measurement; assumptions in ``paper_model``'s docstring).

    python benchmarks/bench_context_parallel.py [--world 2,4] [--seqlen 8192] [--quick]
    python benchmarks/bench_context_parallel.py --packed [--world 2,4]
    python benchmarks/bench_context_parallel.py --model
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import socket
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "out"
IMPLS = ("ring", "zigzag")
PACKED_IMPLS = ("ring", "zigzag", "ulysses", "llama3")
MODES = ("fwd", "fwd+bwd")
BALANCE_BAR = 1.1  # issue 24: zigzag's per-rank compute max / min

CSV_FIELDS = ["world", "impl", "dtype", "mode", "batch", "seqlen", "heads", "heads_k", "head_dim", "threads",
              "ring_ms", "together_ms", "compute_ms", "comm_ms", "exposed_ms", "hidden_pct", "compute_min_ms",
              "balance", "per_rank_ms", "gflops", "max_diff", "status", "error"]
TABLE_COLUMNS = [("world", "P"), ("impl", "impl"), ("dtype", "dtype"), ("mode", "mode"), ("ring_ms", "ring ms"),
                 ("together_ms", "local ms"), ("compute_ms", "alone ms"), ("comm_ms", "comm ms"),
                 ("exposed_ms", "exposed ms"), ("hidden_pct", "hidden %"), ("balance", "max/min"),
                 ("per_rank_ms", "per-rank alone ms"), ("gflops", "GFLOP/s"), ("max_diff", "max diff"),
                 ("status", "status")]


# ----------------------------------------------------------------------------- the ring's local work


def local_steps(impl: str, rank: int, world: int, s_local: int) -> list[tuple[int, slice, slice, bool]]:
    """The attention blocks rank ``rank`` computes, one per ring step, as
    (source rank, query rows, key rows of the source's block, causal); steps whose block is
    fully masked are left out.

    ring (contiguous layout, rank r holds global rows [r*s, (r+1)*s)): step 0 the own block,
    causal; the blocks of earlier ranks (src < r) whole, no mask; later ranks' blocks are masked.
    zigzag (rank r holds chunks r and 2P-1-r of s/2 rows): step 0 the own 2 chunks against
    themselves, causal (the front chunk sees its own keys causally, the back chunk sees all the
    front chunk and its own keys causally); src < r: every query row against the source's front
    chunk (chunk src < r), no mask (its back chunk 2P-1-src is later than both of ours); src > r:
    the back half of the queries against the whole source block (chunks src and 2P-1-src, both
    earlier than our back chunk 2P-1-r, both later than our front chunk r), no mask. Every rank
    then does one causal s x s block and P-1 half blocks (s x s/2): the same work.
    """
    whole, front, back = slice(0, s_local), slice(0, s_local // 2), slice(s_local // 2, s_local)
    steps = [(rank, whole, whole, True)]
    for step in range(1, world):
        src = (rank - step) % world
        if impl == "ring":
            if src < rank:
                steps.append((src, whole, whole, False))
        elif src < rank:
            steps.append((src, whole, front, False))
        else:
            steps.append((src, back, whole, False))
    return steps


def run_local(impl: str, rank: int, world: int, q, k, v, dout, backward: bool) -> None:
    """The ring's kernel calls on this rank's block shapes (its own k / v stand in for the
    other ranks' blocks: same shapes, same work), no communication: per step attention_forward
    and merge_attention into a float32 accumulator; with ``backward`` then per step
    attention_backward against the merged out / lse and the sums of dq, dk, dv."""
    import flashattn_py

    b, s, h, d = q.shape
    steps = local_steps(impl, rank, world, s)
    out = torch.zeros(b, s, h, v.shape[-1], dtype=torch.float32)
    lse = torch.full((b, h, s), -math.inf, dtype=torch.float32)
    for _, rows, cols, causal in steps:
        blk_out, blk_lse = flashattn_py.attention_forward(q[:, rows], k[:, cols], v[:, cols], causal=causal,
                                                          diag_offset=0 if causal else None)
        if rows == slice(0, s):
            flashattn_py.merge_attention(out, lse, blk_out, blk_lse)
        else:
            o, l = out[:, rows], lse[:, :, rows]
            flashattn_py.merge_attention(o, l, blk_out, blk_lse)
    if not backward:
        return
    out = out.to(q.dtype)
    dq = torch.zeros(q.shape, dtype=torch.float32)
    dk = torch.zeros(k.shape, dtype=torch.float32)
    dv = torch.zeros(v.shape, dtype=torch.float32)
    for _, rows, cols, causal in steps:
        gq, gk, gv = flashattn_py.attention_backward(
            dout[:, rows], q[:, rows], k[:, cols], v[:, cols], out[:, rows], lse[:, :, rows], causal=causal,
            diag_offset=0 if causal else None)
        dq[:, rows] += gq
        dk[:, cols] += gk
        dv[:, cols] += gv


def ring_transfers(world: int, bufs: list[torch.Tensor], steps: int, group=None) -> None:
    """``steps`` ring steps of communication only: each step every rank sends ``bufs`` to the
    next rank and receives the same shapes from the previous one."""
    rank = dist.get_rank(group)
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    recv = [torch.empty_like(b) for b in bufs]
    for _ in range(steps):
        ops = [dist.P2POp(dist.isend, b, nxt, group) for b in bufs]
        ops += [dist.P2POp(dist.irecv, r, prv, group) for r in recv]
        for req in dist.batch_isend_irecv(ops):
            req.wait()
        bufs, recv = recv, bufs


# ----------------------------------------------------------------------------- worker processes


def _timed(fn, group=None) -> float:
    """Seconds of fn() on this rank, started after a barrier."""
    dist.barrier(group)
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _slowest(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _measure_case(impl: str, dtype_name: str, mode: str, cfg: dict) -> dict:
    import flashattn_py
    from flashattn_py import distributed as cpd

    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = common.DTYPES[dtype_name]
    b, s, h, hk, d = cfg["batch"], cfg["seqlen"], cfg["heads"], cfg["heads_k"], cfg["head_dim"]
    s_local = s // world
    row = {"world": world, "impl": impl, "dtype": dtype_name, "mode": mode, "batch": b, "seqlen": s, "heads": h,
           "heads_k": hk, "head_dim": d, "threads": torch.get_num_threads(), "status": "ok", "error": None}
    gen = torch.Generator().manual_seed(1234)  # the same global tensors on every rank
    q_full = torch.randn(b, s, h, d, generator=gen).to(dtype)
    k_full = torch.randn(b, s, hk, d, generator=gen).to(dtype)
    v_full = torch.randn(b, s, hk, d, generator=gen).to(dtype)
    do_full = torch.randn(b, s, h, d, generator=gen).to(dtype)
    q, k, v, dout = (cpd.shard(t, impl, rank, world, dim=1).contiguous() for t in (q_full, k_full, v_full, do_full))
    func = cpd.ring_flash_attn_func if impl == "ring" else cpd.zigzag_ring_flash_attn_func
    backward = mode == "fwd+bwd"
    repeats = cfg["repeats"]

    if backward:
        qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))

        def ring_call():
            qg.grad = kg.grad = vg.grad = None
            func(qg, kg, vg, causal=True).backward(dout)
    else:
        def ring_call():
            with torch.no_grad():
                func(q, k, v, causal=True)

    # correctness of the forward once (not timed): gathered output against one flash_attn_func call
    if cfg["check"] and not backward:
        with torch.no_grad():
            full = cpd.all_gather_shards(func(q, k, v, causal=True), impl, dim=1)
        if rank == 0:
            ref = flashattn_py.flash_attn_func(q_full, k_full, v_full, causal=True)
            row["max_diff"] = (full.float() - ref.float()).abs().max().item()

    # the ring itself, alternating with the same local work without communication on all ranks
    # at once (the ring's ranks share the machine the same way; alternation: drift from other
    # load on the machine affects both alike)
    local = lambda: run_local(impl, rank, world, q, k, v, dout, backward)  # noqa: E731
    ring_call()  # warm-ups
    local()
    ring, together = [], []
    for i in range(repeats):
        pair = [(ring, ring_call), (together, local)]
        for samples, fn in (pair if i % 2 == 0 else pair[::-1]):
            samples.append(_slowest(_timed(fn)))
    row["ring_ms"] = statistics.median(ring) * 1e3
    row["together_ms"] = statistics.median(together) * 1e3

    # the local work, each rank in turn (per-rank compute, undisturbed by the other ranks)
    per_rank = []
    for r in range(world):
        dist.barrier()
        mine = 0.0
        if rank == r:
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                local()
                times.append(time.perf_counter() - t0)
            mine = statistics.median(times)
        t = torch.tensor([mine], dtype=torch.float64)
        dist.broadcast(t, src=r)
        per_rank.append(t.item() * 1e3)
    row["per_rank_ms"] = " ".join(common.fmt(x) for x in per_rank)
    row["compute_ms"] = max(per_rank)
    row["compute_min_ms"] = min(per_rank)
    row["balance"] = max(per_rank) / min(per_rank)

    # the transfers alone: forward: P-1 steps of (k, v); backward: again P-1 steps of (k, v) and
    # P steps of (dk, dv) in float32 (the gradient accumulators travel home around the ring).
    # zigzag and ring send the same blocks (the whole local k / v).
    kv = [k, v]
    dkv = [torch.zeros(k.shape, dtype=torch.float32), torch.zeros(v.shape, dtype=torch.float32)]

    def comm():
        ring_transfers(world, kv, world - 1)
        if backward:
            ring_transfers(world, kv, world - 1)
            ring_transfers(world, dkv, world)

    comm()
    row["comm_ms"] = statistics.median(_slowest(_timed(comm)) for _ in range(repeats)) * 1e3
    row["exposed_ms"] = row["ring_ms"] - row["together_ms"]
    row["hidden_pct"] = 100.0 * (1.0 - row["exposed_ms"] / row["comm_ms"]) if row["comm_ms"] > 0 else None
    flops = common.attention_flops(b, h, s, s, d, causal=True, mode=mode)
    row["gflops"] = flops / (row["ring_ms"] * 1e-3) / 1e9
    return row


def packed_lengths(seqlen: int, world: int) -> list[int]:
    """Document lengths summing to ``seqlen``, each a multiple of 2 * world (every packed form
    takes them), drawn the same on every rank: 1/16 to 1/2 of the row."""
    unit = 2 * world
    gen = torch.Generator().manual_seed(7)
    lengths, left = [], seqlen
    while left > 0:
        n = unit * int(torch.randint(max(1, seqlen // (16 * unit)), max(2, seqlen // (2 * unit)), (1,),
                                     generator=gen))
        lengths.append(min(n, left))
        left -= lengths[-1]
    return lengths


def _measure_packed(dtype_name: str, mode: str, cfg: dict) -> list[dict]:
    """One row per packed form (see the module docstring), rounds alternating the forms."""
    import flashattn_py
    from flashattn_py import distributed as cpd

    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = common.DTYPES[dtype_name]
    s, h, hk, d = cfg["seqlen"], cfg["heads"], cfg["heads_k"], cfg["head_dim"]
    lengths = packed_lengths(s, world)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    gen = torch.Generator().manual_seed(1234)
    full = [torch.randn(s, n, d, generator=gen).to(dtype) for n in (h, hk, hk, h)]
    backward = mode == "fwd+bwd"
    prepared = cpd.llama3_flash_attn_prepare_cu_seqlens(cu, True, rank, world)
    calls = {}
    for impl in cfg["impls"]:
        layout = "ulysses" if impl == "llama3" else impl
        q, k, v, dout = (cpd.shard(t, layout, rank, world, dim=0, cu_seqlens=cu).contiguous() for t in full)
        if impl == "llama3":
            fn = lambda q_, k_, v_: cpd.llama3_flash_attn_varlen_func(  # noqa: E731
                q_, k_, v_, *prepared[:4], hk, prepared[4], causal=True)
        else:
            fn = (lambda f: lambda q_, k_, v_: f(q_, k_, v_, cu, max(lengths), causal=True))(  # noqa: E731
                getattr(cpd, {"ring": "ring_", "zigzag": "zigzag_ring_", "ulysses": "ulysses_"}[impl]
                        + "flash_attn_varlen_func"))
        leaves = [t.requires_grad_(backward) for t in (q, k, v)]  # (made once: no copies in the timing)
        calls[impl] = (lambda fn_, l_, d_: (lambda: _packed_call(fn_, l_, d_, backward)))(fn, leaves, dout)
    for call in calls.values():  # warm-ups
        call()
    samples: dict = {impl: [] for impl in calls}
    order = list(calls)
    for i in range(cfg["repeats"]):
        for impl in (order if i % 2 == 0 else order[::-1]):
            samples[impl].append(_slowest(_timed(calls[impl])))
    # the whole row on one process (rank 0 alone, the others waiting): the work to share
    alone = 0.0
    dist.barrier()
    if rank == 0:
        leaves = [t.clone().requires_grad_(backward) for t in full[:3]]

        def whole():
            for t in leaves:
                t.grad = None
            out = flashattn_py.flash_attn_varlen_func(*leaves, cu, cu, max(lengths), max(lengths), causal=True)
            if backward:
                out.backward(full[3])
        with torch.enable_grad() if backward else torch.no_grad():
            whole()
            times = []
            for _ in range(cfg["repeats"]):
                t0 = time.perf_counter()
                whole()
                times.append(time.perf_counter() - t0)
        alone = statistics.median(times)
    t = torch.tensor([alone], dtype=torch.float64)
    dist.broadcast(t, src=0)
    flops = sum(common.attention_flops(1, h, n, n, d, causal=True, mode=mode) for n in lengths)
    rows = []
    for impl in calls:
        ms = statistics.median(samples[impl]) * 1e3
        rows.append({"world": world, "impl": f"{impl} (packed)", "dtype": dtype_name, "mode": mode, "batch": 1,
                     "seqlen": s, "heads": h, "heads_k": hk, "head_dim": d, "threads": torch.get_num_threads(),
                     "ring_ms": ms, "together_ms": t.item() * 1e3 / world, "gflops": flops / (ms * 1e-3) / 1e9,
                     "compute_ms": None, "comm_ms": None, "exposed_ms": None, "hidden_pct": None, "balance": None,
                     "per_rank_ms": "-", "status": "ok", "error": None})
    return rows


def _packed_call(fn, leaves: list, dout, backward: bool) -> None:
    if backward:
        for t in leaves:
            t.grad = None
        fn(*leaves).backward(dout)
    else:
        with torch.no_grad():
            fn(*leaves)


def _worker(rank: int, world: int, port: int, cfg: dict, result_path: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", str(cfg["threads"]))
    torch.set_num_threads(cfg["threads"])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=cfg["timeout"]))
    rows = []
    try:
        for impl, dtype_name, mode in cfg["cases"]:
            if impl == "packed":
                try:
                    rows.extend(_measure_packed(dtype_name, mode, cfg))
                except Exception as exc:  # noqa: BLE001
                    row = {"world": world, "impl": "packed", "dtype": dtype_name, "mode": mode}
                    common.mark_failed(row, exc)
                    rows.append(row)
                if rank == 0:
                    Path(result_path).write_text(json.dumps(rows))
                    print(f"#   P={world} packed {dtype_name} {mode}: " + ", ".join(
                        f"{r['impl']} {common.fmt(r.get('ring_ms'))} ms" for r in rows[-len(cfg['impls']):]),
                        file=sys.stderr, flush=True)
                continue
            try:
                row = _measure_case(impl, dtype_name, mode, cfg)
            except Exception as exc:  # noqa: BLE001 - a failed case is a row (the check is collective)
                row = {"world": world, "impl": impl, "dtype": dtype_name, "mode": mode}
                common.mark_failed(row, exc)
                if rank == 0:
                    traceback.print_exc()
            rows.append(row)
            if rank == 0:
                print(f"#   P={world} {impl} {dtype_name} {mode}: ring {common.fmt(row.get('ring_ms'))} ms, "
                      f"local {common.fmt(row.get('together_ms'))} ms, comm {common.fmt(row.get('comm_ms'))} ms, "
                      f"balance {common.fmt(row.get('balance'))} {row['status']}", file=sys.stderr, flush=True)
                Path(result_path).write_text(json.dumps(rows))  # partial results survive a timeout
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world: int, cfg: dict, timeout: float) -> list[dict]:
    """The cases on ``world`` spawned processes; rank 0's rows (a timed-out run: the rows done)."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        result_path = os.path.join(tmp, "rows.json")
        port = _free_port()
        procs = [ctx.Process(target=_worker, args=(r, world, port, cfg, result_path)) for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        timed_out = any(p.is_alive() for p in procs)
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(10)
        rows = json.loads(Path(result_path).read_text()) if os.path.exists(result_path) else []
    done = {(r["impl"].split(" ")[0] if r["impl"].endswith("(packed)") else r["impl"], r["dtype"], r["mode"])
            for r in rows}
    done |= {("packed", d, m) for i, d, m in done}
    for impl, dtype_name, mode in cfg["cases"]:
        if (impl, dtype_name, mode) not in done:
            rows.append({"world": world, "impl": impl, "dtype": dtype_name, "mode": mode,
                         "status": "error", "error": "timed out" if timed_out else
                         f"worker exit codes {[p.exitcode for p in procs]}"})
    return rows


# ----------------------------------------------------------------------------- the paper model

# FlashAttention-3 forward rate on H100, bf16/fp16, head dim 128, (B * S = 16k tokens, H = 16),
# measured by pytorch/benchmark (commit ff65cb6, "Fix dimension order for FlashAttention-3"):
# sequence length -> TFLOP/s. The FA3 paper (Shah et al., arXiv 2407.08608) reports up to
# 740 TFLOP/s (75 % of the H100's 989 dense bf16 TFLOP/s) forward in fp16 at its best shapes;
# H200 has the same tensor cores (more, faster HBM), so the same rates are assumed.
FA3_RATE = {512: 430.0, 1024: 517.0, 2048: 566.0, 4096: 590.0, 8192: 614.0, 16384: 621.0}
NVLINK_GBS = 450.0  # NVLink4 (H100/H200 SXM): 900 GB/s per GPU both directions, 450 GB/s each way
IB_GBS = 50.0  # one 400 Gb/s NDR InfiniBand NIC per GPU, each way
GPUS_PER_NODE = 8
MODEL_SHAPES = [("H=32 Hk=8 D=128 (8B-like, GQA)", 32, 8, 128), ("H=32 Hk=32 D=128 (7B-like, MHA)", 32, 32, 128),
                ("H=64 Hk=8 D=128 (70B-like, GQA)", 64, 8, 128)]
MODEL_SEQLENS = [128 * 1024, 256 * 1024, 512 * 1024, 1024 * 1024]
MODEL_GPUS = [8, 16, 32, 64, 128, 256, 512]


def fa3_tflops(rows: float) -> float:
    """Assumed kernel rate for a block of ``rows`` query rows: FA3_RATE interpolated in log2,
    held at the ends (below 512 rows the real rate is lower still: optimistic there)."""
    keys = sorted(FA3_RATE)
    if rows <= keys[0]:
        return FA3_RATE[keys[0]]
    if rows >= keys[-1]:
        return FA3_RATE[keys[-1]]
    for lo, hi in zip(keys, keys[1:]):
        if lo <= rows <= hi:
            f = (math.log2(rows) - math.log2(lo)) / (math.log2(hi) - math.log2(lo))
            return FA3_RATE[lo] + f * (FA3_RATE[hi] - FA3_RATE[lo])
    raise AssertionError


def paper_model(seqlen: int, gpus: int, heads: int, heads_k: int, head_dim: int, nvlink_gbs: float = NVLINK_GBS,
                ib_gbs: float = IB_GBS, gpus_per_node: int = GPUS_PER_NODE, bwd: bool = False) -> dict:
    """Time of one causal attention layer (batch 1, bf16) on ``gpus`` GPUs, ring (zigzag) against
    Ulysses; a model, no measurement. Assumptions:

    - compute: causal forward = 2 * S^2 * H * D flops (4 S^2 H D halved), spread evenly (zigzag;
      Ulysses: H / P heads each); kernel rate fa3_tflops(rows of the block); fwd+bwd = 3.5x.
    - ring: P steps; each step computes (S/P)^2 * 2 * H * D flops (one half block, the diagonal
      step the causal full block) while the next K / V block, 2 * (S/P) * Hk * D * 2 bytes,
      moves to the neighbour; all ranks send at once, so a step's transfer runs at the slowest
      hop: NVLink (450 GB/s each way) when P <= 8 (one node), else InfiniBand (50 GB/s per GPU).
      Layer time = compute of step 0 + (P-1) * max(step compute, step transfer); hidden when
      step compute >= step transfer. fwd+bwd: the backward sends K, V (bf16) and the float32
      dK, dV accumulators per step (as ring.py does): 4x the forward's bytes in all against
      3.5x its compute (the backward assumed at the forward's rate: optimistic for compute,
      so pessimistic for hiding).
    - Ulysses: 4 all-to-alls (q, k, v before; out after) of (S/P) * (2H + 2Hk') * D * 2 bytes
      per rank, (P-1)/P of it leaving the rank, Hk' = max(Hk, P) (K / V heads repeated when
      P > Hk; this repository's ulysses_flash_attn_func instead requires P | Hk); inside a node
      at NVLink rate, the (P-8)/P going to other nodes over the rank's InfiniBand NIC, both at
      once; not overlapped with the attention (it is on the layer's critical path); then the
      attention of the whole sequence for H/P heads. Requires P <= H. fwd+bwd: 2x the bytes
      (dout, dq, dk, dv), 3.5x the compute.
    - USP (usp_flash_attn_func): Ulysses over U GPUs of a node (the most that divide P, H and
      Hk, as this repository requires, and beyond one node the node's GPUs), then the ring
      above over R = P / U ranks, one per node beyond 8 GPUs (InfiniBand), on S / R rows and
      H / U heads: the node's all-to-alls (NVLink, not overlapped) plus that ring's layer time.
    - no latency terms (each message is >= 1 MB here), no contention with other traffic
      (data / tensor parallelism).
    Times in ms.
    """
    s_local = seqlen / gpus
    compute_factor, ring_bytes_factor, uly_bytes_factor = (3.5, 4.0, 2.0) if bwd else (1.0, 1.0, 1.0)

    def ring(ranks: int, heads_r: float, heads_k_r: float) -> tuple[float, float, float]:
        """(step compute, step transfer, layer) ms of a zigzag ring of ``ranks`` on S / ranks rows."""
        rows = seqlen / ranks
        link = nvlink_gbs if gpus <= gpus_per_node else ib_gbs
        compute = 2.0 * rows ** 2 * heads_r * head_dim * compute_factor / (fa3_tflops(rows) * 1e12) * 1e3
        transfer = 2 * rows * heads_k_r * head_dim * 2 * ring_bytes_factor / (link * 1e9) * 1e3
        return compute, transfer, compute + (ranks - 1) * max(compute, transfer)

    step_compute, step_transfer, ring_ms = ring(gpus, heads, heads_k)
    out = {"seqlen": seqlen, "gpus": gpus, "heads": heads, "heads_k": heads_k, "head_dim": head_dim,
           "s_local": s_local, "ring_step_compute_ms": step_compute, "ring_step_transfer_ms": step_transfer,
           "ring_ms": ring_ms, "ring_hidden": step_compute >= step_transfer,
           "compute_only_ms": gpus * step_compute}
    # (beyond one node, Ulysses groups that tile the nodes: U divides a node's GPUs too)
    u = max(n for n in range(1, min(gpus, gpus_per_node) + 1)
            if gpus % n == 0 and heads % n == 0 and heads_k % n == 0
            and (gpus <= gpus_per_node or gpus_per_node % n == 0))
    usp_sent = s_local * (2 * heads + 2 * heads_k) * head_dim * 2 * (u - 1) / u * uly_bytes_factor
    usp_comm = usp_sent / (nvlink_gbs * 1e9) * 1e3
    usp_step_compute, usp_step_transfer, usp_ring = ring(gpus // u, heads / u, heads_k / u)
    out.update(usp_ulysses=u, usp_ms=usp_comm + usp_ring, usp_comm_ms=usp_comm,
               usp_hidden=usp_step_compute >= usp_step_transfer)
    if gpus > heads:
        out.update(ulysses_ms=None, ulysses_comm_ms=None)
        return out
    hk_eff = max(heads_k, gpus)
    sent = s_local * (2 * heads + 2 * hk_eff) * head_dim * 2 * (gpus - 1) / gpus * uly_bytes_factor
    inter = sent * max(0, gpus - gpus_per_node) / (gpus - 1)
    intra = sent - inter
    comm = max(intra / (nvlink_gbs * 1e9), inter / (ib_gbs * 1e9)) * 1e3
    compute = 2.0 * seqlen ** 2 * heads * head_dim * compute_factor / gpus / (fa3_tflops(seqlen) * 1e12) * 1e3
    out.update(ulysses_ms=compute + comm, ulysses_comm_ms=comm)
    return out


def model_grid(bwd: bool = False) -> str:
    """The compact form: per shape and S, one column per P with "ring / Ulysses / USP" ms."""
    f = lambda x: common.fmt(x, 3)  # noqa: E731
    mode = "fwd+bwd" if bwd else "fwd"
    lines = [f"Paper model, one causal attention layer, {mode}, batch 1, bf16: ring (zigzag) ms / Ulysses ms / "
             f"USP ms (`*`: the ring's transfers are not hidden; `-`: Ulysses needs P <= H; bold: the fastest)", "",
             "| shape | S | " + " | ".join(f"P={p}" for p in MODEL_GPUS) + " |",
             "|---|---|" + "---|" * len(MODEL_GPUS)]
    for name, h, hk, d in MODEL_SHAPES:
        for s in MODEL_SEQLENS:
            cells = []
            for p in MODEL_GPUS:
                m = paper_model(s, p, h, hk, d, bwd=bwd)
                times = [m["ring_ms"], m["ulysses_ms"], m["usp_ms"]]
                texts = [f(m["ring_ms"]) + ("" if m["ring_hidden"] else "*"),
                         "-" if m["ulysses_ms"] is None else f(m["ulysses_ms"]),
                         f(m["usp_ms"]) + ("" if m["usp_hidden"] else "*")]
                best = min(t for t in times if t is not None)
                cells.append(" / ".join(f"**{text}**" if t == best else text for t, text in zip(times, texts)))
            lines.append(f"| {name} | {s // 1024}k | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def model_markdown(bwd: bool = False) -> str:
    """The detailed form: one row per (shape, S, P) with the step times."""
    f = lambda x: common.fmt(x, 3)  # noqa: E731
    mode = "fwd+bwd" if bwd else "fwd"
    lines = [f"Paper model, one causal attention layer, {mode}, batch 1, bf16 (ms; `*` = the ring's transfers "
             f"are not hidden: step transfer > step compute; Ulysses `-` where P > H)", "",
             "| shape | S | P | S/P | ring step compute / transfer ms | ring ms | ideal (compute) ms "
             "| Ulysses ms (of it all-to-all) | USP U x R | USP ms (of it all-to-all) | fastest |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, h, hk, d in MODEL_SHAPES:
        for s in MODEL_SEQLENS:
            for p in MODEL_GPUS:
                m = paper_model(s, p, h, hk, d, bwd=bwd)
                uly = m["ulysses_ms"]
                times = {"ring": m["ring_ms"], "Ulysses": uly, "USP": m["usp_ms"]}
                fastest = min((t, name) for name, t in times.items() if t is not None)[1]
                u = m["usp_ulysses"]
                lines.append(
                    f"| {name} | {s // 1024}k | {p} | {m['s_local']:.0f} | {f(m['ring_step_compute_ms'])} / "
                    f"{f(m['ring_step_transfer_ms'])} | {f(m['ring_ms'])}{'' if m['ring_hidden'] else '*'} "
                    f"| {f(m['compute_only_ms'])} | "
                    + ("-" if uly is None else f"{f(uly)} ({f(m['ulysses_comm_ms'])})")
                    + f" | {u} x {p // u} | {f(m['usp_ms'])}{'' if m['usp_hidden'] else '*'} "
                    f"({f(m['usp_comm_ms'])}) | {fastest} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- summary, cli


def evaluate_targets(rows: list[dict]) -> list[dict]:
    return [{"world": r["world"], "dtype": r["dtype"], "mode": r["mode"], "balance": r["balance"],
             "bar": BALANCE_BAR, "met": r["balance"] <= BALANCE_BAR}
            for r in rows if r.get("impl") == "zigzag" and r.get("status") == "ok"]


def markdown(rows: list[dict], env: dict, args, elapsed: float) -> str:
    f = lambda x, d=3: common.fmt(x, d)  # noqa: E731
    first = next((r for r in rows if r.get("status") == "ok"), rows[0] if rows else {})
    # (packed rows: the whole row in one process divided by P, the perfect scaling)
    packed = getattr(args, "packed", False)
    local_column = "whole row in one process / P ms" if packed else "local ms (all ranks at once)"
    lines = [f"{env['device']}; torch {env['torch']}; commit `{env['commit']}`; {env['date']}; "
             f"`CPU_KERNELS` = `{env['cpu_kernels']}`; load average {env['load_before']} before, "
             f"{env.get('load_after')} after; {elapsed:.0f} s; B={first.get('batch')} S={first.get('seqlen')} "
             f"H={first.get('heads')} Hk={first.get('heads_k')} D={first.get('head_dim')} causal, "
             f"{first.get('threads')} thread(s) per rank, median of {args.repeats}",
             "",
             f"| P | impl | dtype | mode | ring ms | {local_column} | comm ms | exposed ms | hidden % "
             "| per-rank compute alone ms | max/min | GFLOP/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['world']} | {r['impl']} | {r['dtype']} | {r['mode']} | {r.get('status')}: "
                         f"{(r.get('error') or '')[:80]} |||||||||")
            continue
        lines.append(f"| {r['world']} | {r['impl']} | {r['dtype']} | {r['mode']} | {f(r['ring_ms'])} "
                     f"| {f(r['together_ms'])} | {f(r['comm_ms'])} | {f(r['exposed_ms'])} | {f(r['hidden_pct'])} "
                     f"| {r['per_rank_ms']} | {f(r['balance'])} | {f(r['gflops'])} |")
    diffs = [r["max_diff"] for r in rows if r.get("max_diff") is not None]
    if diffs:
        lines += ["", f"Largest forward difference from one flash_attn_func call: {max(diffs):.3g}"]
    targets = evaluate_targets(rows)
    if targets:
        lines += ["", f"zigzag balance (bar max/min <= {BALANCE_BAR}): " + ", ".join(
            f"P={t['world']} {t['dtype']} {t['mode']} {t['balance']:.3f} {'met' if t['met'] else 'NOT met'}"
            for t in targets)]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="store_true", help="print the paper model of ring vs Ulysses and exit")
    p.add_argument("--model-bwd", action="store_true", help="with --model: fwd+bwd instead of fwd")
    p.add_argument("--model-detail", action="store_true", help="with --model: one row per (shape, S, P) with "
                   "the ring's step compute / transfer times, instead of the grid")
    p.add_argument("--world", type=common.comma_ints,
                   help="process counts (default 2,4; --quick 2)")
    p.add_argument("--impls", type=common.comma_strs, help="ring,zigzag (default both); --packed: "
                   "ring,zigzag,ulysses,llama3 (default all)")
    p.add_argument("--packed", action="store_true", help="compare the packed-document forms (see above)")
    p.add_argument("--modes", type=common.comma_strs, default=list(MODES), help="fwd,fwd+bwd (default both)")
    p.add_argument("--dtypes", type=common.comma_strs, default=["fp32", "bf16"], help="default fp32,bf16")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seqlen", type=int, help="global sequence length (default 8192; --quick 1024)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--heads-k", type=int, help="K / V heads (default --heads)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, help="timed calls per measurement, median (default 5; --quick 1)")
    p.add_argument("--timeout", type=float, default=900, help="seconds for all the cases of one world size")
    common.add_run_args(p, DEFAULT_OUT, "S=1024, world 2, one repeat (a smoke test)")
    args = p.parse_args(argv)
    if args.heads_k is None:
        args.heads_k = args.heads
    if args.seqlen is None:
        args.seqlen = 1024 if args.quick else 8192
    if args.world is None:
        args.world = [2] if args.quick else [2, 4]
    if args.repeats is None:
        args.repeats = 1 if args.quick else 5
    if args.threads is None:
        args.threads = 1
    common.check_choices(p, "--modes", args.modes, MODES)
    if args.impls is None:
        args.impls = list(PACKED_IMPLS if args.packed else IMPLS)
    common.check_choices(p, "--impls", args.impls, PACKED_IMPLS if args.packed else IMPLS)
    args.dtypes = common.dtype_names(p, args.dtypes)
    for w in args.world:
        if w < 1 or args.seqlen % (2 * w):
            p.error(f"--seqlen {args.seqlen} must be divisible by 2 * world = {2 * w}")
    return args


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device("cpu")
    torch.set_num_threads(args.threads)
    env = common.environment(device)
    env["device"] = common.device_description(device).rsplit(",", 1)[0] + f", {os.cpu_count()} cores"
    env["load_before"] = common.load_average()
    print(f"# context parallel: {env['device']} | torch {env['torch']} | commit {env['commit']} | {env['date']}"
          f" | cpu kernels: {env['cpu_kernels']} | load {env['load_before']}")
    print(f"# B={args.batch} S={args.seqlen} H={args.heads} Hk={args.heads_k} D={args.head_dim} causal; "
          f"worlds {args.world}; {args.threads} thread(s) per rank; median of {args.repeats}")
    if args.packed:
        cases = [("packed", d, m) for d in args.dtypes for m in args.modes]
    else:
        cases = [(i, d, m) for d in args.dtypes for m in args.modes for i in args.impls]
    cfg = {"cases": cases, "impls": args.impls, "batch": args.batch, "seqlen": args.seqlen, "heads": args.heads,
           "heads_k": args.heads_k, "head_dim": args.head_dim, "repeats": args.repeats,
           "threads": args.threads, "timeout": max(60, int(args.timeout)), "check": args.check}
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows: list[dict] = []
    for world in args.world:
        if world > (os.cpu_count() or 1):
            print(f"# note: {world} ranks on {os.cpu_count()} cores: the ring's timings are oversubscribed "
                  f"(ranks share cores); the per-rank compute times are taken one rank at a time", file=sys.stderr)
        rows.extend(run_world(world, cfg, args.timeout))
        common.write_csv(rows, args.out / "context_parallel.csv", CSV_FIELDS)
    elapsed = time.perf_counter() - start
    env["load_after"] = common.load_average()
    print(common.format_table(rows, TABLE_COLUMNS))
    print(f"# {len(rows)} rows in {elapsed:.0f} s; exposed = ring - local; hidden % = 1 - exposed / comm")
    summary = markdown(rows, env, args, elapsed)
    print(summary)
    common.save_run(args.out, "context_parallel", rows, CSV_FIELDS, env, args, elapsed, evaluate_targets(rows),
                    summary)
    return rows


def main(argv: Sequence[str] | None = None):
    args = parse_args(argv)
    if args.model:
        text = (model_markdown if args.model_detail else model_grid)(bwd=args.model_bwd)
        print(text)
        return text
    return run(args)


if __name__ == "__main__":
    main()

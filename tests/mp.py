"""A small multi-process harness for the context-parallel tests (tests/test_distributed.py).

``run_workers(fn, world_size, *args)`` spawns ``world_size`` processes that join one gloo
process group on 127.0.0.1 and run ``fn(rank, world_size, *args)``; it returns the list of
their return values (rank order). Spawning costs an interpreter and a torch import (seconds),
so a test runs many cases inside one call, looping in ``fn``.

A failure never hangs the suite: an exception in any worker comes back as its traceback and
is raised in the parent as one AssertionError naming every failed rank; a worker that has not
finished ``timeout`` seconds after the start (or ``grace`` seconds after another rank failed:
its peers are then usually blocked in a collective) is killed and reported.

``fn`` must be a module-level function (it is pickled by reference). Return values travel
through ``torch.save`` (any tensor dtype, no shared memory that a finished worker takes away).
"""
from __future__ import annotations

import datetime
import io
import multiprocessing
import os
import queue as queue_mod
import socket
import time
import traceback
from typing import Any, Callable


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it when binding port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _encode(value: Any) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(value, buf)
    return buf.getvalue()


def _decode(data: bytes) -> Any:
    import torch

    return torch.load(io.BytesIO(data), weights_only=False)


def _worker(fn: Callable, rank: int, world_size: int, port: int, pg_timeout: float, backend: str, args: tuple,
            results) -> None:
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=pg_timeout))
        try:
            value = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        results.put((rank, True, _encode(value)))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        results.put((rank, False, traceback.format_exc()))


def run_workers(fn: Callable, world_size: int, *args, timeout: float = 120.0, pg_timeout: float = 60.0,
                grace: float = 15.0, backend: str = "gloo") -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks of a ``backend``
    process group (gloo; nccl: rank r on GPU r); their results.

    Raises AssertionError when a rank raised, died, or did not finish in time.
    """
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    env_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # the children read it at torch import
    try:
        procs = [ctx.Process(target=_worker, args=(fn, rank, world_size, port, pg_timeout, backend, args, results),
                             daemon=True, name=f"cp-rank{rank}")
                 for rank in range(world_size)]
        for p in procs:
            p.start()
    finally:
        if env_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env_threads

    start = time.monotonic()
    deadline = start + timeout
    outcome: dict[int, tuple[bool, Any]] = {}
    failures: dict[int, str] = {}
    try:
        while len(outcome) < world_size:
            now = time.monotonic()
            if now >= deadline:
                break
            try:
                rank, ok, payload = results.get(timeout=min(0.2, deadline - now))
            except queue_mod.Empty:
                # a worker that died without reporting (segfault, os._exit, killed)
                for rank, p in enumerate(procs):
                    if rank not in outcome and p.exitcode is not None:
                        # it may have reported just before exiting: drain once more
                        try:
                            while True:
                                r, ok, payload = results.get(timeout=0.5)
                                outcome[r] = (ok, payload)
                                if not ok:
                                    failures[r] = payload
                        except queue_mod.Empty:
                            pass
                        if rank not in outcome:
                            outcome[rank] = (False, None)
                            failures[rank] = f"exited with code {p.exitcode} without reporting"
                            deadline = min(deadline, time.monotonic() + grace)
                continue
            outcome[rank] = (ok, payload)
            if not ok:
                failures[rank] = payload
                deadline = min(deadline, time.monotonic() + grace)
    finally:
        elapsed = time.monotonic() - start
        another_failed = bool(failures)
        for rank, p in enumerate(procs):
            if rank not in outcome:
                failures[rank] = (f"did not finish within {elapsed:.0f} s (timeout {timeout:.0f} s"
                                  f"{', after another rank failed' if another_failed else ''}): killed")
            p.join(timeout=5 if rank in outcome else 0)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        results.close()
        results.join_thread()
    if failures:
        text = "\n".join(f"--- rank {rank} of {world_size} ---\n{failures[rank]}" for rank in sorted(failures))
        raise AssertionError(f"{len(failures)} of {world_size} ranks failed running {fn.__name__}:\n{text}")
    return [_decode(outcome[rank][1]) for rank in range(world_size)]

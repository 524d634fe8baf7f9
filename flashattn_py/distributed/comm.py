"""Communication for context parallelism: the ring's point-to-point exchange, Ulysses'
all-to-all, and the collective argument check that makes bad input fail on every rank."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import ArgumentError


class Group:
    """A process group as the ring sees it: this process's rank in it, its size, the global
    ranks of the next and previous ranks of the ring, and the device the collective
    argument check's tensor goes to (cpu where the group's backend serves it, else the
    current GPU)."""

    def __init__(self, group: Optional[dist.ProcessGroup]):
        if not dist.is_available() or not dist.is_initialized():
            raise ArgumentError("group: torch.distributed is not initialized (call "
                                "torch.distributed.init_process_group first)")
        self.group = group
        self.rank = dist.get_rank(group)
        if self.rank < 0:  # (raised here only: a non-member cannot take part in the group's check)
            raise ArgumentError("group: this process is not a member of the group")
        self.world_size = dist.get_world_size(group)
        pg = group if group is not None else dist.group.WORLD
        self.served = sorted({d.type for d in getattr(pg, "_device_types", [])})
        self.device = torch.device("cpu")
        if self.served and "cpu" not in self.served:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.next = dist.get_global_rank(pg, (self.rank + 1) % self.world_size)
        self.prev = dist.get_global_rank(pg, (self.rank - 1) % self.world_size)

    def check_device(self, device: torch.device) -> None:
        """ArgumentError unless the group's backend serves tensors on ``device``."""
        if self.served and device.type not in self.served:
            raise ArgumentError(f"group: its backend ({dist.get_backend(self.group)}) does not serve "
                                f"{device.type} tensors (it serves {self.served})")


class RingExchange:
    """Sends tensors to the next rank and receives as many from the previous one, in the
    background (one batch of isend / irecv), while the caller computes."""

    def __init__(self, group: Group, tag: int):
        self.group, self.tag = group, tag
        self.requests: list = []
        self.sent: list[Tensor] = []

    def start(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """Post the exchange; returns the buffers that will hold the previous rank's tensors
        once ``wait()`` returns."""
        received = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.group.next, self.group.group, self.tag) for t in tensors]
        ops += [dist.P2POp(dist.irecv, r, self.group.prev, self.group.group, self.tag) for r in received]
        self.requests = dist.batch_isend_irecv(ops)
        self.sent = list(tensors)  # (alive until the sends complete)
        return received

    def wait(self) -> None:
        for request in self.requests:
            request.wait()
        self.requests, self.sent = [], []


def all_to_all(x: Tensor, group: Group) -> Tensor:
    """x (world, ...) contiguous: block j goes to rank j; returns (world, ...) with block j
    from rank j."""
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group.group)
    return out


def _describe(values: Sequence[float], labels: Optional[Sequence[str]] = None) -> str:
    if labels is not None and len(values) == 1:
        return labels[int(values[0])]
    ints = [int(v) for v in values]
    return str(tuple(ints)) if all(i == v for i, v in zip(ints, values)) else str(tuple(values))


_HEAD = 2  # the row's flag and field count
_FIELD_WIDTH = 8  # numbers per field
_MAX_FIELDS = 20


def check_collectively(group: Group, validate: Callable[[], list[tuple]]) -> dict[str, list[list[float]]]:
    """Run ``validate`` (local checks; returns what must be equal on every rank: (argument
    name, numbers) or (argument name, [index], labels of the indices)), then compare across
    ranks in one all_gather. Any rank's exception or any difference raises on EVERY rank (the
    failing rank its own exception, the others an ArgumentError naming it), so a bad call
    fails everywhere instead of leaving the other ranks waiting in the ring. A field whose
    name starts with "~" is each rank's own (not compared): returned, by name without the
    "~", as every rank's numbers in rank order (the same on every rank, so that checks made
    from them raise everywhere alike)."""
    error: Optional[Exception] = None
    try:
        fields = validate()
        assert len(fields) <= _MAX_FIELDS and all(len(f[1]) <= _FIELD_WIDTH for f in fields), fields
    except Exception as e:  # noqa: BLE001  (re-raised below, after the other ranks heard of it)
        error, fields = e, []
    # fixed width: a flag (this rank's check failed), the number of fields, the fields (a rank
    # whose check failed sends zeros)
    row = torch.zeros(_HEAD + _FIELD_WIDTH * _MAX_FIELDS, dtype=torch.float64, device="cpu")  # (not the default device)
    row[0] = 1.0 if error is not None else 0.0
    row[1] = len(fields)
    for i, (_, values, *_labels) in enumerate(fields):
        padded = list(values) + [float("nan")] * (_FIELD_WIDTH - len(values))
        row[_HEAD + i * _FIELD_WIDTH: _HEAD + (i + 1) * _FIELD_WIDTH] = torch.tensor(padded, dtype=torch.float64,
                                                                                   device="cpu")
    row = row.to(group.device)
    rows = [torch.empty_like(row) for _ in range(group.world_size)]
    dist.all_gather(rows, row, group=group.group)
    table = torch.stack(rows).cpu()
    if bool((table[:, 0] != 0).any()):
        errors: list = [None] * group.world_size
        dist.all_gather_object(errors, None if error is None else f"{type(error).__name__}: {error}",
                               group=group.group)
        if error is not None:
            raise error
        failed = next(r for r, e in enumerate(errors) if e is not None)
        pg = group.group if group.group is not None else dist.group.WORLD
        where = f"rank {failed} of the group" + ("" if group.group is None else
                                                  f" (global rank {dist.get_global_rank(pg, failed)})")
        raise ArgumentError(f"{where} rejected the call: {errors[failed]}")
    # The fields every rank checked, in order, then their number (a rank with fewer fields
    # would compare only its own: the difference would raise on the others alone).
    counts = [int(c) for c in table[:, 1].tolist()]
    per_rank_fields: dict[str, list[list[float]]] = {}
    for i, (name, values, *labels) in enumerate(fields):
        if i == min(counts):
            break
        block = table[:, _HEAD + i * _FIELD_WIDTH: _HEAD + (i + 1) * _FIELD_WIDTH]
        if name.startswith("~"):
            per_rank_fields[name[1:]] = block[:, :len(values)].tolist()
            continue
        same = (block == block[0]) | (block.isnan() & block[0].isnan())
        if not bool(same.all()):
            per_rank = ", ".join(f"rank {r}: {_describe(block[r][~block[r].isnan()].tolist(), *labels)}"
                                 for r in range(group.world_size))
            raise ArgumentError(f"{name}: must be the same on every rank of the group, got {per_rank}")
    if len(set(counts)) > 1:
        raise ArgumentError(f"the call: not the same on every rank of the group (a different function or form of it, "
                            f"or another step of the check), got rank 0: {counts[0]} checked fields, "
                            + ", ".join(f"rank {r}: {c}" for r, c in enumerate(counts) if r))
    return per_rank_fields

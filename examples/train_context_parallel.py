"""One training step of a tiny GPT with its sequence split over processes (context parallelism).

Every rank holds the whole (replicated) model and one piece of each sequence: with the
default zigzag layout the sequence is cut into 2 * world chunks and rank r holds chunks r and
2 * world - 1 - r (``flashattn_py.distributed.shard``), which gives every rank the same share
of the causal attention work. Attention is ``zigzag_ring_flash_attn_func`` (``--attention
ring``: the contiguous layout and ``ring_flash_attn_func``; ``--attention ulysses``:
``ulysses_flash_attn_func``; ``--attention usp``: ``usp_flash_attn_func`` on a mesh of
--ulysses-size consecutive ranks per Ulysses group x world / that many ring ranks, zigzag
across them, rows from ``usp_shard``); everything else (embeddings, layer norms, MLPs, the LM head and
the loss) is per token and needs no communication. Position embeddings are looked up at the
GLOBAL positions of the rank's tokens.

The step's loss is the sum of the rank's per-token losses divided by the number of tokens of
the whole batch, all-reduced (SUM) over the ranks: the mean over the global sequence. The
gradients of the replicated parameters are the rank's contributions, all-reduced (SUM), as
data parallelism does. Rank 0 then runs the same model on the whole sequence in one process
with ``flashattn_py.flash_attn_func`` and compares the loss and every parameter's gradient.

    torchrun --nproc-per-node 2 examples/train_context_parallel.py [--attention ring|zigzag|ulysses]
    torchrun --nproc-per-node 4 examples/train_context_parallel.py --attention usp --ulysses-size 2

Run without torchrun it makes a one-process group (world size 1). Exit status 0 on PASS.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import math
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import flashattn_py
from flashattn_py import distributed as cp

# attention choice -> (distributed attention function, layout of the sequence)
ATTENTIONS = {
    "ring": (cp.ring_flash_attn_func, "ring"),
    "zigzag": (cp.zigzag_ring_flash_attn_func, "zigzag"),
    "ulysses": (cp.ulysses_flash_attn_func, "ulysses"),
    "usp": (cp.usp_flash_attn_func, "zigzag"),  # (the ring layout across the Ulysses groups)
}

# Tolerance of the comparison, relative to the size of the reference value (the loss; the
# largest |entry| of each gradient). Everything is fp32 (unit roundoff 6e-8). The two runs do
# the same mathematics in a different order: the ring merges per-block softmax results
# (out, lse) instead of one pass over all keys, the backward sums the key/value gradients
# block by block (and carries them around the ring), and the parameter gradients are summed
# over ranks by the all-reduce instead of over the whole sequence at once. Each reordering
# changes a sum by a few units of roundoff times the number of terms (<= 128 tokens here),
# and two layers amplify it a little: the observed differences are ~1e-7 to 1e-6 relative,
# so 1e-5 (about 170 ulps) has a margin of 10x while a real error (a wrong position, mask
# or a missing gradient contribution) gives differences of order 1e-2 to 1.
RTOL = 1e-5


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention (GQA) + MLP."""

    def __init__(self, dim: int, heads: int, kv_heads: int, hidden: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, (heads + 2 * kv_heads) * self.head_dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, attention) -> torch.Tensor:
        b, s, _ = x.shape
        d = self.head_dim
        q, k, v = self.qkv(self.norm1(x)).split([self.heads * d, self.kv_heads * d, self.kv_heads * d], dim=-1)
        out = attention(q.reshape(b, s, self.heads, d), k.reshape(b, s, self.kv_heads, d),
                        v.reshape(b, s, self.kv_heads, d))
        x = x + self.proj(out.reshape(b, s, self.heads * d))
        return x + self.mlp(self.norm2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 64, dim: int = 32, heads: int = 4, kv_heads: int = 2, layers: int = 2,
                 hidden: int = 64, max_positions: int = 128):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_positions, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, kv_heads, hidden) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, attention) -> torch.Tensor:
        """ids (B, S) tokens at ``positions`` (1, S) of the global sequence -> logits (B, S, vocab)."""
        x = self.tok(ids) + self.pos(positions)
        for block in self.blocks:
            x = block(x, attention)
        return self.head(self.norm(x))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--attention", choices=sorted(ATTENTIONS), default="zigzag")
    p.add_argument("--seqlen", type=int, default=96, help="global sequence length (default 96)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--ulysses-size", type=int, default=2, help="usp: ranks per Ulysses group (default 2)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_process_group() -> bool:
    """Join torchrun's group (gloo); without torchrun's variables, make a one-process group.
    Returns whether this call created the group (then it is destroyed at the end)."""
    if dist.is_initialized():
        return False
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    return True


def _relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return (got - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)


def step_errors(loss: torch.Tensor, ref_loss: torch.Tensor, model: nn.Module, reference: nn.Module) -> dict:
    """Relative differences of the loss and of every parameter's gradient, model against reference."""
    errors = {"loss": abs(loss.item() - ref_loss.item()) / abs(ref_loss.item())}
    for (name, p), ref_p in zip(model.named_parameters(), reference.parameters()):
        errors[name] = _relative_error(p.grad, ref_p.grad)
    return errors


def report(errors: dict, rtol: float, summary: str) -> bool:
    """Print ``summary`` with the largest difference, each one over ``rtol``, and PASS or FAIL."""
    worst = max(errors, key=errors.get)
    ok = all(math.isfinite(e) and e <= rtol for e in errors.values())
    print(f"{summary}; largest relative difference {errors[worst]:.2e} ({worst}) over the loss and "
          f"{len(errors) - 1} gradients")
    for name, e in errors.items():
        if not (math.isfinite(e) and e <= rtol):
            print(f"  {name}: relative difference {e:.3e} > {rtol:g}")
    print(f"{'PASS' if ok else 'FAIL'}: the sharded step matches the one-process step (relative tolerance "
          f"{rtol:g})", flush=True)
    return ok


def run_in_group(step, args: argparse.Namespace) -> bool:
    """``step(args)`` inside torchrun's gloo group, or a one-process group made for it."""
    created = _init_process_group()
    try:
        return step(args)
    finally:
        if created:
            dist.destroy_process_group()


def main(argv=None) -> bool:
    """One sharded training step checked against the unsharded model; True on PASS (every rank
    returns rank 0's verdict)."""
    return run_in_group(_step_and_check, parse_args(argv))


def usp_mesh(rank: int, world: int, ulysses_size: int):
    """USP's groups for ``rank``: Ulysses groups of ``ulysses_size`` consecutive ranks, ring
    groups of the ranks with the same place in theirs. (ulysses_group, ring_group, u, r, R)."""
    if ulysses_size < 1 or world % ulysses_size:
        raise SystemExit(f"--ulysses-size {ulysses_size} must divide the {world} ranks")
    rings = world // ulysses_size
    # (every rank makes every group, in the same order)
    ulysses = [dist.new_group(list(range(r * ulysses_size, (r + 1) * ulysses_size))) for r in range(rings)]
    ring = [dist.new_group(list(range(u, world, ulysses_size))) for u in range(ulysses_size)]
    u, r = rank % ulysses_size, rank // ulysses_size
    return ulysses[r], ring[u], u, r, rings


def _step_and_check(args: argparse.Namespace) -> bool:
    rank, world = dist.get_rank(), dist.get_world_size()
    attn_func, layout = ATTENTIONS[args.attention]
    chunks = 2 * world if layout == "zigzag" else world
    if args.seqlen % chunks:
        raise SystemExit(f"--seqlen {args.seqlen} must be divisible by {chunks} for {args.attention} "
                         f"on {world} ranks")
    kwargs = {}
    if args.attention == "usp":
        ulysses_group, ring_group, u, r, rings = usp_mesh(rank, world, args.ulysses_size)
        kwargs = dict(ulysses_group=ulysses_group, ring_group=ring_group, ring_layout=layout)

        def rows(t):
            return cp.usp_shard(t, layout, r, rings, u, args.ulysses_size, dim=1)
    else:
        def rows(t):
            return cp.shard(t, layout, rank, world, dim=1)

    torch.manual_seed(args.seed)  # the same initial model and data on every rank
    model = TinyGPT(heads=args.heads, kv_heads=args.kv_heads, max_positions=args.seqlen)
    reference = copy.deepcopy(model)  # rank 0 runs it unsharded after the step
    tokens = torch.randint(0, model.tok.num_embeddings, (args.batch, args.seqlen + 1))
    ids, targets = tokens[:, :-1], tokens[:, 1:]
    positions = torch.arange(args.seqlen)[None]
    n_tokens = targets.numel()  # the loss is the mean over all of them

    # ---- the sharded step: each rank sees its tokens, their targets and GLOBAL positions
    my_ids, my_targets, my_positions = (rows(t) for t in (ids, targets, positions))

    def attention(q, k, v):
        return attn_func(q, k, v, causal=True, **kwargs)

    logits = model(my_ids, my_positions, attention)
    local_loss = F.cross_entropy(logits.flatten(0, 1), my_targets.flatten(), reduction="sum") / n_tokens
    local_loss.backward()
    loss = local_loss.detach().clone()
    dist.all_reduce(loss)  # sum over ranks of (rank's sum / N) = the global mean
    for p in model.parameters():  # replicated parameters: sum the ranks' contributions
        dist.all_reduce(p.grad)

    # ---- rank 0: the same model on the whole sequence, one process, flash_attn_func
    verdict = torch.zeros(1)
    if rank == 0:
        ref_logits = reference(ids, positions, lambda q, k, v: flashattn_py.flash_attn_func(q, k, v, causal=True))
        ref_loss = F.cross_entropy(ref_logits.flatten(0, 1), targets.flatten())
        ref_loss.backward()
        n_params = sum(p.numel() for p in model.parameters())
        verdict[0] = float(report(step_errors(loss, ref_loss, model, reference), RTOL,
                                  f"{args.attention} attention, {world} ranks ({layout} layout), B={args.batch} "
                                  f"S={args.seqlen}, {n_params} parameters: loss {loss.item():.6f} (one process: "
                                  f"{ref_loss.item():.6f})"))
    dist.broadcast(verdict, src=0)
    return bool(verdict.item())


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

"""Context parallelism (flashattn_py.distributed) on gloo process groups of 1 to 4 CPU ranks.

Every rank builds the same full inputs from a seed, runs the distributed function on its
shard (forward and backward), and sends its out / lse / dq / dk / dv back (tests/mp.py). The
parent puts the shards together with the layouts as the contract defines them (``rows_of``
below, not the implementation's helpers) and holds the whole to the float64 reference over
the full sequence by the project's rule (tests/rule.py ``check_attention``: out within 2x,
gradients within 3x the naive low-precision formula's error), plus the lse.

Spawning a rank costs a torch import, so each world size runs all its cases in ONE spawn
(cached per module: ``_spawn``), and each test looks its case up. Also: world size 1 against
the plain flashattn_py call (bitwise), deterministic=True (bitwise across runs), bad input
(ArgumentError on every rank, the group usable afterwards), ``group=`` (two groups in one
world, a process outside the group). Run with
``pytest -m distributed`` (excluded from the default run).
"""
from __future__ import annotations

import contextlib
import importlib.util
import re
import time
import traceback

import pytest
import torch

import flashattn_py
from flashattn_py import distributed as cp
from flashattn_py.reference import attention_ref

from mp import run_workers
from rule import check_attention, random_qkv

distributed = pytest.mark.distributed

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


# ---------------------------------------------------------------------------------------------
# Layouts as the contract defines them (independent of flashattn_py.distributed.layout)


def offsets(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def usp_mesh(layout: str, rank: int, world: int) -> tuple[str, int, int, int, int]:
    """A USP case's layout "usp:<ring layout>:<U>:<low|high>": (ring layout, u, U, r, R) of
    ``rank``. "low": the Ulysses groups are runs of consecutive ranks (u = rank % U), "high":
    ranks R apart (u = rank // R)."""
    _, ring_layout, size, order = layout.split(":")
    u_size = int(size)
    r_size = world // u_size
    u, r = (rank % u_size, rank // u_size) if order == "low" else (rank // r_size, rank % r_size)
    return ring_layout, u, u_size, r, r_size


def rows_of(layout: str, rank: int, world: int, length: int, cu=None) -> torch.Tensor:
    """Global row indices of rank's local rows, in local order."""
    if layout.startswith("usp:"):  # the ring rank's rows, cut into U contiguous pieces
        ring_layout, u, u_size, r, r_size = usp_mesh(layout, rank, world)
        return rows_of(ring_layout, r, r_size, length, cu).chunk(u_size)[u]
    if layout == "stripe":
        assert cu is None
        return torch.arange(rank, length, world)
    if cu is None or layout in ("ulysses", "llama3"):
        docs = [(0, length)]
    else:
        cu = [int(x) for x in cu]
        docs = list(zip(cu[:-1], cu[1:]))
    pieces = 2 * world if layout == "zigzag" else world
    chunks = [rank, 2 * world - 1 - rank] if layout == "zigzag" else [rank]
    idx = []
    for a, b in docs:
        n = (b - a) // pieces
        assert n * pieces == b - a
        for c in chunks:
            idx += range(a + c * n, a + (c + 1) * n)
    return torch.tensor(idx, dtype=torch.long)


# ---------------------------------------------------------------------------------------------
# Cases: plain dicts (they travel to the workers)


def case(name, func, dtype="float32", *, varlen=False, packed=None, B=2, H=8, Hk=2, D=24, Dv=40, S=None, lens=None,
         alibi=None, lse=True, deterministic=False, repeat=1, backend=None, max_seqlen_as="int", stride=None,
         prepare_causal=None, library=None, **kwargs):
    # max_seqlen_as: how varlen cases pass max_seqlen ("int", "numpy": a NumPy int64, "tensor": a
    # one-element tensor, as torch's int arguments take). llama3 only: stride, heads_k_stride
    # (None: Hk); prepare_causal, the causal flag its offsets are prepared with (None: the call's).
    # library "ring_flash_attn": the function of ring-flash-attention's own code (its local
    # offsets for packed calls), on flashattn_py through install_as_flash_attn().
    return dict(name=name, func=func, dtype=dtype, varlen=varlen, packed=packed, B=B, H=H, Hk=Hk, D=D, Dv=Dv, S=S,
                lens=lens, alibi=alibi, lse=lse, deterministic=deterministic, repeat=repeat, backend=backend,
                max_seqlen_as=max_seqlen_as, stride=stride, prepare_causal=prepare_causal, library=library,
                kwargs=kwargs)


def max_seqlen_arg(c):
    """The case's longest document, as the case passes it."""
    n = max(c["lens"])
    if c["max_seqlen_as"] == "numpy":
        import numpy

        return numpy.int64(n)
    return torch.tensor([n]) if c["max_seqlen_as"] == "tensor" else n


def dense_cases(world: int, full: bool):
    """Dense and packed cases: S_local 16, GQA 8/2 (ulysses: heads divisible by the world)."""
    S = 16 * world
    hk = {1: 2, 2: 2, 3: 3, 4: 4}[world]  # ulysses needs H and Hk divisible by the world size
    out = []
    for func in ("ring", "zigzag", "ulysses"):
        hk_f = hk if func == "ulysses" else 2
        h = 6 if func == "ulysses" and world == 3 else 8
        if full:
            out += [
                case(f"{func}-plain", func, S=S, H=h, Hk=hk_f),
                case(f"{func}-causal", func, S=S, H=h, Hk=hk_f, causal=True),
                case(f"{func}-causal-bf16", func, "bfloat16", S=S, H=h, Hk=hk_f, causal=True, lse=False),
                case(f"{func}-window5_0", func, S=S, H=h, Hk=hk_f, window_size=(5, 0)),
                case(f"{func}-window7_3-bf16", func, "bfloat16", S=S, H=h, Hk=hk_f, window_size=(7, 3)),
                case(f"{func}-causal-window7", func, S=S, H=h, Hk=hk_f, causal=True, window_size=(7, 3)),
                case(f"{func}-alibi-causal", func, S=S, H=h, Hk=hk_f, alibi="H", causal=True),
                case(f"{func}-alibi-batch-window", func, S=S, H=h, Hk=hk_f, alibi="BH", window_size=(7, 3)),
                case(f"{func}-softcap-scale", func, S=S, H=h, Hk=hk_f, softcap=4.0, softmax_scale=0.3),
                case(f"{func}-softcap-causal-bf16", func, "bfloat16", S=S, H=h, Hk=hk_f, softcap=4.0, causal=True),
                case(f"{func}-deterministic", func, S=S, H=h, Hk=hk_f, causal=True, deterministic=True, repeat=2),
            ]
        else:
            out += [case(f"{func}-causal", func, S=S, H=h, Hk=hk_f, causal=True),
                    case(f"{func}-window7_3-alibi-bf16", func, "bfloat16", S=S, H=h, Hk=hk_f, window_size=(7, 3),
                         alibi="H", lse=False)]
    # stripe: rows r, r + P, ...; windows in global rows, no ALiBi
    out += [case("stripe-causal", "stripe", S=S, causal=True),
            case("stripe-window7_3-bf16", "stripe", "bfloat16", S=S, window_size=(7, 3), lse=False)]
    if full:
        out += [
            case("stripe-plain", "stripe", S=S),
            case("stripe-causal-bf16", "stripe", "bfloat16", S=S, causal=True, lse=False),
            case("stripe-causal-window5", "stripe", S=S, causal=True, window_size=(5, 0)),
            case("stripe-window1_0", "stripe", S=S, window_size=(1, 0)),  # (a narrower window than the ranks)
            case("stripe-window0_6-softcap-scale", "stripe", S=S, window_size=(0, 6), softcap=4.0, softmax_scale=0.3),
            case("stripe-deterministic", "stripe", S=S, causal=True, deterministic=True, repeat=2),
            case("stripe-kvpacked-causal", "stripe", packed="kv", S=S, D=32, Dv=32, causal=True),
            case("stripe-qkvpacked-window", "stripe", packed="qkv", S=S, H=4, Hk=4, D=32, Dv=32, window_size=(-1, 3)),
            case("stripe-window3_left-only", "stripe", S=S, window_size=(3, -1)),
            case("stripe-window-huge-right", "stripe", S=S, window_size=(0, 2**62)),
        ]
    if full:
        for func in ("ring", "zigzag"):
            out += [
                case(f"{func}-kvpacked-causal", func, packed="kv", S=S, D=32, Dv=32, causal=True),
                case(f"{func}-qkvpacked", func, packed="qkv", S=S, H=4, Hk=4, D=32, Dv=32, window_size=(5, 2)),
                case(f"{func}-qkvpacked-causal-bf16", func, "bfloat16", packed="qkv", S=S, H=4, Hk=4, D=32, Dv=32,
                     causal=True),
            ]
    return out


def usp_cases(world: int):
    """USP on meshes of U x R ranks (the mesh in the func: usp_mesh)."""
    S = 16 * world
    out = [case("usp-zigzag-u2-causal", "usp:zigzag:2:low", S=S, causal=True),
           case("usp-zigzag-u1-causal-bf16", "usp:zigzag:1:low", "bfloat16", S=S, causal=True, lse=False)]
    if world == 4:
        out += [
            case("usp-ring-u2-high-window7_3-bf16", "usp:ring:2:high", "bfloat16", S=S, window_size=(7, 3),
                 lse=False),
            case("usp-stripe-u2-causal-window5", "usp:stripe:2:low", S=S, causal=True, window_size=(5, 0)),
            case("usp-zigzag-u2-high-alibi-causal", "usp:zigzag:2:high", S=S, alibi="H", causal=True),
            case("usp-ring-u4-causal", "usp:ring:4:low", S=S, Hk=4, causal=True),
            case("usp-zigzag-u1-softcap-scale", "usp:zigzag:1:low", S=S, softcap=4.0, softmax_scale=0.3),
            case("usp-zigzag-u2-deterministic", "usp:zigzag:2:low", S=S, causal=True, deterministic=True, repeat=2),
            case("usp-zigzag-u2-qkvpacked-causal-bf16", "usp:zigzag:2:low", "bfloat16", packed="qkv", S=S, H=4, Hk=4,
                 D=32, Dv=32, causal=True),
            case("usp-ring-u2-kvpacked-window", "usp:ring:2:high", packed="kv", S=S, D=32, Dv=32,
                 window_size=(5, 2)),
            # packed documents: each cut into R (zigzag: 2R) pieces, a ring rank's rows over U
            case("usp-zigzag-u2-varlen-causal", "usp:zigzag:2:low", varlen=True, lens=[32, 4, 8, 4], causal=True),
            case("usp-ring-u2-high-varlen-bf16", "usp:ring:2:high", "bfloat16", varlen=True, lens=[6, 10, 2, 14],
                 lse=False),
            case("usp-zigzag-u2-high-varlen-qkvpacked", "usp:zigzag:2:high", varlen=True, packed="qkv",
                 lens=[8, 12, 4], H=4, Hk=4, D=32, Dv=32, causal=True),
        ]
    else:
        out.append(case("usp-ring-u2-varlen-kvpacked-causal", "usp:ring:2:low", varlen=True, packed="kv",
                        lens=[6, 10, 4], D=32, Dv=32, causal=True))
    return out


def varlen_cases(world: int, full: bool):
    # every document's length divisible by 2 * world (ring / zigzag)
    doc = {2: [8, 24, 8, 16], 3: [6, 18, 12], 4: [8, 24, 16]}[world]
    # ulysses: only the total divides; documents straddle ranks
    straddle = {2: [5, 13, 6, 8], 3: [5, 13, 6, 9], 4: [5, 29, 6, 8, 16]}[world]
    hk = {2: 2, 3: 3, 4: 4}[world]
    h = 6 if world == 3 else 8
    out = []
    for func in ("ring", "zigzag"):
        out.append(case(f"{func}-varlen-causal", func, varlen=True, lens=doc, causal=True))
        if full:
            out += [
                case(f"{func}-varlen-kvpacked-causal", func, varlen=True, packed="kv", lens=doc, D=32, Dv=32,
                     causal=True),
                case(f"{func}-varlen-qkvpacked", func, varlen=True, packed="qkv", lens=doc, H=4, Hk=4, D=32, Dv=32),
                case(f"{func}-varlen-plain", func, varlen=True, lens=doc),
                case(f"{func}-varlen-causal-bf16", func, "bfloat16", varlen=True, lens=doc, causal=True),
                case(f"{func}-varlen-softcap-scale", func, varlen=True, lens=doc, softcap=4.0, softmax_scale=0.25),
                case(f"{func}-varlen-deterministic", func, varlen=True, lens=doc, causal=True, deterministic=True,
                     repeat=2),
            ]
    out.append(case("ulysses-varlen-causal", "ulysses", varlen=True, lens=straddle, H=h, Hk=hk, causal=True))
    # llama3: contiguous rows as ulysses, any head count; documents meeting the ranks'
    # boundaries (for non-causal windows, whose keys past a rank's rows are refused)
    aligned = {2: [4, 12, 10, 6], 3: [4, 6, 3, 7, 10], 4: [8, 3, 5, 2, 6, 8]}[world]
    out.append(case("llama3-varlen-causal", "llama3", varlen=True, lens=straddle, Hk=2, stride=1, causal=True))
    if full:
        out += [
            case("llama3-varlen-plain", "llama3", varlen=True, lens=straddle, Hk=4),
            case("llama3-varlen-causal-bf16", "llama3", "bfloat16", varlen=True, lens=straddle, Hk=4, stride=2,
                 causal=True),
            case("llama3-varlen-window-alibi-softcap", "llama3", varlen=True, lens=straddle, window_size=(5, 0),
                 alibi="H", softcap=3.0),
            case("llama3-varlen-alibi-causal-stride1", "llama3", varlen=True, lens=straddle, Hk=4, stride=1,
                 alibi="H", causal=True),
            case("llama3-varlen-window-noncausal-bf16", "llama3", "bfloat16", varlen=True, lens=aligned,
                 window_size=(4, 2), alibi="H", softmax_scale=0.3),
            # offsets prepared for non-causal attention (keys to the end of the last document):
            # a causal call cuts the keys past its rows
            case("llama3-varlen-causal-prepared-noncausal", "llama3", varlen=True, lens=straddle, Hk=4, stride=2,
                 causal=True, prepare_causal=False),
            case("llama3-varlen-kvpacked-causal", "llama3", varlen=True, packed="kv", lens=straddle, D=32, Dv=32,
                 causal=True, stride=1),
            case("llama3-varlen-qkvpacked", "llama3", varlen=True, packed="qkv", lens=straddle, H=4, Hk=4, D=32,
                 Dv=32, stride=2),
            case("llama3-varlen-deterministic", "llama3", varlen=True, lens=straddle, causal=True,
                 deterministic=True, repeat=2),
            case("llama3-varlen-float64", "llama3", "float64", varlen=True, lens=straddle, Hk=4, stride=2,
                 window_size=(3, 0)),
        ]
    if full:
        out += [
            case("ring-varlen-causal-numpy-max", "ring", varlen=True, lens=doc, causal=True, max_seqlen_as="numpy"),
            case("ulysses-varlen-tensor-max", "ulysses", varlen=True, lens=straddle, H=h, Hk=hk,
                 max_seqlen_as="tensor"),
            case("ulysses-varlen-plain-bf16", "ulysses", "bfloat16", varlen=True, lens=straddle, H=h, Hk=hk),
            case("ulysses-varlen-window-alibi", "ulysses", varlen=True, lens=straddle, H=h, Hk=hk, window_size=(5, 0),
                 alibi="H"),
            case("ulysses-varlen-window-alibi-batch-softcap", "ulysses", varlen=True, lens=straddle, H=h, Hk=hk,
                 window_size=(4, 2), alibi="BH", softcap=3.0),
            case("ulysses-varlen-deterministic", "ulysses", varlen=True, lens=straddle, H=h, Hk=hk, causal=True,
                 deterministic=True, repeat=2),
        ]
    return out


# The local blocks on the triton backend (its interpreter on CPU tensors: fp32, small).
TRITON_CASES = [
    case("ring-causal-triton", "ring", S=16, H=4, D=16, Dv=16, causal=True, backend="triton"),
    case("zigzag-window-alibi-triton", "zigzag", S=16, H=4, D=16, Dv=16, window_size=(5, 2), alibi="H",
         backend="triton"),
    case("zigzag-varlen-causal-triton", "zigzag", varlen=True, lens=[8, 16], H=4, D=16, Dv=16, causal=True,
         backend="triton"),
    case("ulysses-causal-triton", "ulysses", S=16, H=4, D=16, Dv=16, causal=True, backend="triton"),
    case("stripe-window-triton", "stripe", S=16, H=4, D=16, Dv=16, window_size=(5, 2), backend="triton"),
    case("llama3-varlen-causal-triton", "llama3", varlen=True, lens=[5, 13, 6, 8], H=4, D=16, Dv=16, causal=True,
         stride=1, backend="triton"),
]

# ring-flash-attention (its package, unchanged) calling flash-attn's private forward / backward,
# served by flashattn_py.flash_attn_interface. Its backward sums gradients in float32 and
# returns 16-bit ones: bf16 cases.
RING_FLASH_ATTN_CASES = [
    case("rfa-ring-causal", "ring", "bfloat16", S=32, causal=True, library="ring_flash_attn"),
    case("rfa-ring-softmax-scale", "ring", "bfloat16", S=32, softmax_scale=0.3, library="ring_flash_attn"),
    case("rfa-zigzag-causal", "zigzag", "bfloat16", S=32, causal=True, library="ring_flash_attn"),
    case("rfa-stripe-causal", "stripe", "bfloat16", S=32, causal=True, library="ring_flash_attn"),
    case("rfa-ring-varlen-causal", "ring", "bfloat16", varlen=True, lens=[8, 24, 8, 16], causal=True,
         library="ring_flash_attn"),
    case("rfa-zigzag-varlen-causal", "zigzag", "bfloat16", varlen=True, lens=[8, 24, 8, 16], causal=True,
         library="ring_flash_attn"),
    case("rfa-llama3-varlen-causal", "llama3", "bfloat16", varlen=True, lens=[5, 13, 6, 8], Hk=2, Dv=24, stride=1,
         causal=True, library="ring_flash_attn"),
]


def ring_flash_attn_module():
    """ring-flash-attention's functions (its modules; the package's __init__ also imports a
    transformers adapter that transformers 5 no longer serves, so the package is entered
    without it), importing flash_attn from flashattn_py."""
    import importlib
    import importlib.util
    import sys
    import types

    flashattn_py.install_as_flash_attn()
    if "ring_flash_attn" not in sys.modules:
        spec = importlib.util.find_spec("ring_flash_attn")
        package = types.ModuleType("ring_flash_attn")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["ring_flash_attn"] = package
    names = ("ring_flash_attn", "zigzag_ring_flash_attn", "stripe_flash_attn", "ring_flash_attn_varlen",
             "zigzag_ring_flash_attn_varlen", "llama3_flash_attn_varlen")
    functions = types.SimpleNamespace()
    for name in names:
        module = importlib.import_module(f"ring_flash_attn.{name}")
        for attr in dir(module):
            if attr.endswith("_func") or attr.endswith("prepare_cu_seqlens"):
                setattr(functions, attr, getattr(module, attr))
    return functions


CASES = {
    2: dense_cases(2, True) + varlen_cases(2, True) + usp_cases(2) + TRITON_CASES + RING_FLASH_ATTN_CASES,
    3: dense_cases(3, False) + varlen_cases(3, False),  # an odd world: few cases
    4: dense_cases(4, True) + varlen_cases(4, True) + usp_cases(4),
}
WORLD1_CASES = [
    case("ring-causal", "ring", S=16, causal=True),
    case("ring-window-alibi-bf16", "ring", "bfloat16", S=16, window_size=(5, 2), alibi="H"),
    case("zigzag-causal", "zigzag", S=16, causal=True),
    case("zigzag-plain-bf16", "zigzag", "bfloat16", S=16),
    case("ulysses-causal-bf16", "ulysses", "bfloat16", S=16, causal=True),
    case("zigzag-window-alibi-bf16", "zigzag", "bfloat16", S=16, window_size=(5, 2), alibi="H"),
    case("ulysses-softcap", "ulysses", S=16, softcap=4.0),
    case("ring-kvpacked-causal", "ring", packed="kv", S=16, D=32, Dv=32, causal=True),
    case("ring-varlen-causal", "ring", varlen=True, lens=[6, 10, 3], causal=True),
    case("zigzag-varlen-causal-bf16", "zigzag", "bfloat16", varlen=True, lens=[6, 10, 4], causal=True),
    case("ulysses-varlen-window-alibi", "ulysses", varlen=True, lens=[6, 10, 3], window_size=(4, 0), alibi="H"),
    case("llama3-varlen-window-alibi", "llama3", varlen=True, lens=[6, 10, 3], window_size=(4, 0), alibi="H"),
    case("stripe-causal-window", "stripe", S=16, causal=True, window_size=(5, 0)),
    case("llama3-varlen-causal-bf16", "llama3", "bfloat16", varlen=True, lens=[6, 10, 4], causal=True),
    case("llama3-varlen-qkvpacked-plain", "llama3", varlen=True, packed="qkv", lens=[6, 10, 3], H=4, Hk=4, D=32,
         Dv=32),
    case("usp-zigzag-window-alibi-bf16", "usp:zigzag:1:low", "bfloat16", S=16, window_size=(5, 2), alibi="H"),
    case("usp-ring-varlen-causal", "usp:ring:1:low", varlen=True, lens=[6, 10, 3], causal=True),
]


def _seed(c) -> int:
    return sum(ord(ch) * (i + 1) for i, ch in enumerate(c["name"])) % 100003


def make_inputs(c):
    """Full q, k, v (detached; dense (B, S, H, D), packed (1, total, H, D)), alibi slopes,
    cu_seqlens and the upstream gradient (as check_attention draws it)."""
    dtype, seed = DTYPES[c["dtype"]], _seed(c)
    if c["varlen"]:
        total = sum(c["lens"])
        q, k, v = random_qkv(1, total, total, c["H"], c["Hk"], c["D"], c["Dv"], dtype=dtype, seed=seed)
        cu = offsets(c["lens"])
        batch = len(c["lens"])
    else:
        q, k, v = random_qkv(c["B"], c["S"], c["S"], c["H"], c["Hk"], c["D"], c["Dv"], dtype=dtype, seed=seed)
        cu, batch = None, c["B"]
    q, k, v = q.detach(), k.detach(), v.detach()
    gen = torch.Generator().manual_seed(seed + 7)
    slopes = None
    if c["alibi"] == "H":
        slopes = torch.rand(c["H"], generator=gen) * 0.5
    elif c["alibi"] == "BH":
        slopes = torch.rand(batch, c["H"], generator=gen) * 0.5
    dout = torch.randn((*q.shape[:3], c["Dv"]), generator=torch.Generator().manual_seed(seed + 1),
                       dtype=torch.float64)
    return q, k, v, slopes, cu, dout


def api_kwargs(c, slopes):
    kw = dict(c["kwargs"])
    if slopes is not None:
        kw["alibi_slopes"] = slopes
    if c["deterministic"]:
        kw["deterministic"] = True
    return kw


def ref_kwargs(c, slopes, cu):
    kw = c["kwargs"]
    ref = {}
    left, right = kw.get("window_size", (-1, -1))
    if kw.get("causal"):
        right = 0
    if left >= 0:
        ref["window_left"] = left
    if right >= 0:
        ref["window_right"] = right
    if "softcap" in kw:
        ref["softcap"] = kw["softcap"]
    if "softmax_scale" in kw:
        ref["scale"] = kw["softmax_scale"]
    if slopes is not None:
        ref["alibi_slopes"] = slopes
    if cu is not None:
        ref.update(cu_seqlens_q=cu, cu_seqlens_k=cu, bottom_right=True)
    return ref


PREFIX = {"ring": "ring_", "zigzag": "zigzag_ring_", "ulysses": "ulysses_", "llama3": "llama3_", "stripe": "stripe_",
          "usp": "usp_"}


def plain_name(c) -> str:
    """The non-distributed flashattn_py function of the case."""
    if c["varlen"]:
        return f"flash_attn_varlen_{c['packed']}packed_func" if c["packed"] else "flash_attn_varlen_func"
    if c["packed"]:
        return f"flash_attn_{c['packed']}packed_func"
    return "flash_attn_func"


def func_name(c) -> str:
    return PREFIX[c["func"].split(":")[0]] + plain_name(c)


# ---------------------------------------------------------------------------------------------
# Worker side


def _local(c, rank, world, q, k, v, cu, dout):
    """This rank's pieces of q, k, v and of the upstream gradient (rows by the contract's layout)."""
    total = q.shape[1]
    idx = rows_of(c["func"], rank, world, total, cu)
    if c["varlen"]:
        q, k, v, dout = q[0], k[0], v[0], dout[0]
        pick = lambda t: t.index_select(0, idx).contiguous()  # noqa: E731
    else:
        pick = lambda t: t.index_select(1, idx).contiguous()  # noqa: E731
    return pick(q), pick(k), pick(v), pick(dout)


_USP_GROUPS: dict = {}


def usp_kwargs(layout: str) -> dict:
    """A USP case's ulysses_group, ring_group and ring_layout; every group of the mesh is made
    once, by every rank in the same order (cases run in the same order on every rank)."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    ring_layout, u, u_size, r, r_size = usp_mesh(layout, rank, world)
    key = layout.split(":", 2)[2]
    if key not in _USP_GROUPS:
        coords = [usp_mesh(layout, g, world) for g in range(world)]
        ulysses = [dist.new_group([g for g in range(world) if coords[g][3] == i]) for i in range(r_size)]
        ring = [dist.new_group([g for g in range(world) if coords[g][1] == i]) for i in range(u_size)]
        _USP_GROUPS[key] = (ulysses, ring)
    ulysses, ring = _USP_GROUPS[key]
    return dict(ulysses_group=ulysses[r], ring_group=ring[u], ring_layout=ring_layout)


def _call(c, fn_name, q, k, v, cu, extra_kwargs, **override):
    """Run the distributed function on local q, k, v (packing them as the case says);
    returns (out, lse or None, (dq, dk, dv) leaves' grads getter)."""
    library = ring_flash_attn_module() if c["library"] else cp
    fn = getattr(library, fn_name)
    kw = dict(extra_kwargs, **override)
    if c["func"].startswith("usp:"):
        kw.update(usp_kwargs(c["func"]))
    varlen = (cu, max_seqlen_arg(c)) if c["varlen"] else ()
    if c["varlen"] and c["library"]:  # (ring-flash-attention's ring / zigzag take this rank's offsets)
        import torch.distributed as dist

        world = dist.get_world_size()
        varlen = ((cu // world).int(), max_seqlen_arg(c) // world)
    if c["func"] == "llama3":
        varlen = llama3_args(c, cu, library)
    dim = 1 if c["varlen"] else 2  # the packing dim of kv / qkv
    if c["packed"] == "kv":
        kv = torch.stack([k, v], dim=dim).requires_grad_()
        res = fn(q.requires_grad_(), kv, *varlen, **kw)
        grads = lambda: (q.grad, *kv.grad.unbind(dim))  # noqa: E731
    elif c["packed"] == "qkv":
        qkv = torch.stack([q, k, v], dim=dim).requires_grad_()
        res = fn(qkv, *varlen, **kw)
        grads = lambda: qkv.grad.unbind(dim)  # noqa: E731
    else:
        q, k, v = q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
        if c["varlen"]:
            res = fn(q, k, v, *varlen, **kw)
        else:
            res = fn(q, k, v, **kw)
        grads = lambda: (q.grad, k.grad, v.grad)  # noqa: E731
    return res, grads


def llama3_args(c, cu, library=cp):
    """This rank's offsets, maxima, heads_k_stride and key slice for a llama3 case."""
    import torch.distributed as dist

    causal = c["kwargs"].get("causal", False) if c["prepare_causal"] is None else c["prepare_causal"]
    cu_q, cu_k, max_q, max_k, keys = library.llama3_flash_attn_prepare_cu_seqlens(cu, causal, dist.get_rank(),
                                                                                   dist.get_world_size())
    return cu_q, cu_k, max_q, max_k, c["stride"] or c["Hk"], keys


def _run_case(c, rank, world):
    q, k, v, slopes, cu, dout = make_inputs(c)
    ql, kl, vl, doutl = _local(c, rank, world, q, k, v, cu, dout)
    kw = api_kwargs(c, slopes)
    runs = []
    backend = flashattn_py.use_backend(c["backend"]) if c["backend"] else contextlib.nullcontext()
    for _ in range(c["repeat"]):
        leaves = [t.detach().clone() for t in (ql, kl, vl)]
        with backend:
            res, grads = _call(c, func_name(c), *leaves, cu, kw, return_attn_probs=c["lse"])
        if c["lse"]:
            assert isinstance(res, tuple) and len(res) == 3, \
                f"return_attn_probs: expected (out, lse, None), got {res!r}"
            out, lse, probs = res
            assert probs is None, "return_attn_probs: the third value should be None"
        else:
            assert isinstance(res, torch.Tensor), f"expected a tensor, got {type(res)}"
            out, lse = res, None
        out.backward(doutl.to(out.dtype))
        dq, dk, dv = grads()
        runs.append(dict(out=out.detach(), lse=None if lse is None else lse.detach(), dq=dq, dk=dk, dv=dv))
    return runs


def worker_cases(rank, world, cases):
    results = {}
    for c in cases:
        t0 = time.perf_counter()
        try:
            results[c["name"]] = {"runs": _run_case(c, rank, world)}
        except Exception:  # noqa: BLE001 - reported per case
            results[c["name"]] = {"error": traceback.format_exc()}
        results[c["name"]]["seconds"] = time.perf_counter() - t0
    # helpers: all_gather_shards puts every rank's piece back together
    try:
        x = torch.randn(2, 16 * world, 3, generator=torch.Generator().manual_seed(5))
        cu = offsets([4 * world, 2 * world, 10 * world])
        got = cp.all_gather_shards(cp.shard(x, "stripe", rank, world), "stripe")
        assert torch.equal(got, x), "all_gather_shards stripe dense"
        for layout in ("ring", "zigzag", "ulysses"):
            got = cp.all_gather_shards(cp.shard(x, layout, rank, world), layout)
            assert torch.equal(got, x), f"all_gather_shards {layout} dense"
            xp = x[0]
            got = cp.all_gather_shards(cp.shard(xp, layout, rank, world, dim=0, cu_seqlens=cu), layout, dim=0,
                                       cu_seqlens=cu)
            assert torch.equal(got, xp), f"all_gather_shards {layout} varlen"
            # (offsets as a list, as shard / unshard take them; integer shards)
            got = cp.all_gather_shards(cp.shard(xp.long(), layout, rank, world, dim=0, cu_seqlens=cu.tolist()),
                                       layout, dim=0, cu_seqlens=cu.tolist())
            assert torch.equal(got, xp.long()), f"all_gather_shards {layout} varlen, list offsets"
        results["__all_gather_shards"] = {"ok": True}
    except Exception:  # noqa: BLE001
        results["__all_gather_shards"] = {"error": traceback.format_exc()}
    if world == 4:
        results["__subgroups"] = _subgroups(rank)
    return results


def _subgroups(rank):
    """Two independent 2-rank groups ({0, 1} and {2, 3}) in one world of 4, each running its own
    problem through group=: each pair's result is its own problem's attention."""
    try:
        import torch.distributed as dist

        groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
        mine, sub_rank = groups[rank // 2], rank % 2
        out = {}
        for func, fn_name in (("ring", "ring_flash_attn_func"), ("zigzag", "zigzag_ring_flash_attn_func"),
                              ("ulysses", "ulysses_flash_attn_func")):
            q, k, v = (t.detach() for t in random_qkv(1, 32, 32, 4, 2, 16, dtype=torch.float64, seed=rank // 2))
            idx = rows_of(func, sub_rank, 2, 32)
            got = getattr(cp, fn_name)(q[:, idx], k[:, idx], v[:, idx], causal=True, group=mine)
            ref, _ = attention_ref(q, k, v, window_right=0)
            torch.testing.assert_close(got, ref[:, idx], msg=lambda m: f"{func} with group=: {m}")
            out[func] = True
        return {"ok": out}
    except Exception:  # noqa: BLE001
        return {"error": traceback.format_exc()}


def worker_world1(rank, world, cases):
    """Distributed call on one rank next to the plain call: both results."""
    results = {}
    for c in cases:
        try:
            q, k, v, slopes, cu, dout = make_inputs(c)
            kw = api_kwargs(c, slopes)
            pair = []
            for name in (func_name(c), None):
                leaves = [t.clone() for t in ((q[0], k[0], v[0]) if c["varlen"] else (q, k, v))]
                if name is None:  # the plain flashattn_py call: flash_attn_..._func
                    fn = getattr(flashattn_py, plain_name(c))
                    res, grads = _call_plain(c, fn, leaves, cu, kw)
                else:
                    res, grads = _call(c, name, *leaves, cu, kw)
                d = dout[0] if c["varlen"] else dout
                res.backward(d.to(res.dtype))
                pair.append(dict(out=res.detach(), grads=[g.clone() for g in grads()]))
            results[c["name"]] = {"pair": pair}
        except Exception:  # noqa: BLE001
            results[c["name"]] = {"error": traceback.format_exc()}
    # under torch.compile the context-parallel calls run eagerly (a graph break; Dynamo failed
    # on the process group object)
    try:
        q = torch.randn(1, 8, 2, 16, generator=torch.Generator().manual_seed(3))
        import torch.distributed as dist

        world = dist.group.WORLD
        for fn_name, kw in (("ring_flash_attn_func", {}), ("ulysses_flash_attn_func", {}),
                            ("usp_flash_attn_func", dict(ulysses_group=world, ring_group=world))):
            fn = getattr(cp, fn_name)
            compiled = torch.compile(lambda x: fn(x, x, x, causal=True, **kw) * 2, backend="eager")(q)
            assert torch.equal(compiled, fn(q, q, q, causal=True, **kw) * 2), fn_name
        results["__compiled"] = {"ok": True}
    except Exception:  # noqa: BLE001
        results["__compiled"] = {"error": traceback.format_exc()}
    return results


def _call_plain(c, fn, leaves, cu, kw):
    q, k, v = leaves
    dim = 1 if cu is not None else 2  # (the packing dim of kv / qkv)
    n = max(c["lens"]) if cu is not None else None
    if c["packed"] == "kv":
        kv = torch.stack([k, v], dim=dim).requires_grad_()
        res = fn(q.requires_grad_(), kv, *((cu, cu, n, n) if cu is not None else ()), **kw)
        return res, lambda: (q.grad, *kv.grad.unbind(dim))
    if c["packed"] == "qkv":
        qkv = torch.stack([q, k, v], dim=dim).requires_grad_()
        return fn(qkv, *((cu, n) if cu is not None else ()), **kw), lambda: qkv.grad.unbind(dim)
    q, k, v = q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    if cu is not None:
        return fn(q, k, v, cu, cu, n, n, **kw), lambda: (q.grad, k.grad, v.grad)
    return fn(q, k, v, **kw), lambda: (q.grad, k.grad, v.grad)


# Bad input: (name, function, per-rank setup, pattern the message must match). Each is called
# on every rank; every rank must raise ArgumentError naming the argument.
ERROR_CASES = [
    ("shard_lengths_differ", "ring_flash_attn_func", dict(S_by_rank=[16, 8]), r"\b(q|k|v)\b"),
    ("zigzag_lengths_differ", "zigzag_ring_flash_attn_func", dict(S_by_rank=[16, 12]), r"\b(q|k|v)\b"),
    ("ulysses_heads_not_divisible", "ulysses_flash_attn_func", dict(H=3, Hk=3), r"\b(q|k|v|num_heads|heads)\b"),
    ("ulysses_kv_heads_not_divisible", "ulysses_flash_attn_func", dict(H=4, Hk=1), r"\b(k|v|num_heads_k|heads)\b"),
    ("zigzag_odd_local_length", "zigzag_ring_flash_attn_func", dict(S_by_rank=[15, 15]), r"\b(q|k|v)\b"),
    ("ring_dropout", "ring_flash_attn_func", dict(kwargs=dict(dropout_p=0.1)), r"\bdropout_p\b"),
    ("zigzag_dropout", "zigzag_ring_flash_attn_func", dict(kwargs=dict(dropout_p=0.1)), r"\bdropout_p\b"),
    ("ulysses_dropout", "ulysses_flash_attn_func", dict(kwargs=dict(dropout_p=0.1)), r"\bdropout_p\b"),
    ("ring_varlen_dropout", "ring_flash_attn_varlen_func", dict(kwargs=dict(dropout_p=0.1)), r"\bdropout_p\b"),
    ("ring_varlen_window", "ring_flash_attn_varlen_func", dict(kwargs=dict(window_size=(4, 0))), r"\bwindow_size\b"),
    ("zigzag_varlen_window", "zigzag_ring_flash_attn_varlen_func", dict(kwargs=dict(window_size=(4, 0))),
     r"\bwindow_size\b"),
    ("ring_varlen_alibi", "ring_flash_attn_varlen_func", dict(alibi=True), r"\balibi_slopes\b"),
    ("ring_varlen_doc_not_divisible", "ring_flash_attn_varlen_func", dict(lens=[7, 9]), r"\bcu_seqlens\b"),
    ("dtype_differs_across_ranks", "ring_flash_attn_func", dict(dtype_by_rank=["float32", "bfloat16"]),
     r"\b(q|k|v|dtype)\b"),
    ("ulysses_dtype_differs_across_ranks", "ulysses_flash_attn_func", dict(dtype_by_rank=["bfloat16", "float32"]),
     r"\b(q|k|v|dtype)\b"),
    ("causal_differs_across_ranks", "ring_flash_attn_func", dict(kwargs_by_rank=[dict(causal=True), {}]),
     r"\bcausal\b"),
    # the local blocks' backend is part of the check: ranks that would compute with different
    # kernels, or a rank whose backend refuses the call, fail on every rank
    ("backend_differs_across_ranks", "ring_flash_attn_func", dict(backend_by_rank=["cpu", "reference"]),
     r"\bbackend\b"),
    ("backend_refuses_on_one_rank", "ulysses_flash_attn_func",
     dict(backend_by_rank=["triton", None], dtype_by_rank=["float64", "float64"]), r"\bbackend\b"),
    # a group whose backend (gloo) does not serve one rank's tensors
    ("device_not_served_on_one_rank", "zigzag_ring_flash_attn_func", dict(device_by_rank=["cpu", "meta"]),
     r"\bgroup\b"),
    # an error that is not an ArgumentError (q is not a tensor on rank 0): rank 0 raises it,
    # the other ranks an ArgumentError naming rank 0's
    ("not_a_tensor_on_one_rank", "ring_flash_attn_func",
     dict(q_not_a_tensor_on=0, expect_types=["TypeError", "ArgumentError"]), r"\bq\b"),
    # values every rank must share: offsets that differ by (..., 1, -2, 1, ...) steps (a sum
    # weighted by the index alone could not tell them apart), ALiBi slopes, and the layout
    # (ring and Ulysses ranks would wait on each other's different collectives)
    ("cu_seqlens_differ_across_ranks", "ring_flash_attn_varlen_func",
     dict(cu_by_rank=[[0, 4, 16, 20, 32], [0, 8, 8, 24, 32]]), r"\bcu_seqlens\b"),
    ("alibi_values_differ_across_ranks", "ring_flash_attn_func", dict(alibi_by_rank=[0.25, 0.5]),
     r"\balibi_slopes\b"),
    ("ring_and_zigzag_across_ranks", "ring_flash_attn_func",
     dict(fn_by_rank=["ring_flash_attn_func", "zigzag_ring_flash_attn_func"]), r"\blayout\b"),
    ("ring_and_ulysses_across_ranks", "ring_flash_attn_func",
     dict(fn_by_rank=["ring_flash_attn_func", "ulysses_flash_attn_func"]), r"\blayout\b"),
    # Ulysses exchanges lse only when asked for it: one rank asking alone hung both
    ("ulysses_return_attn_probs_differs", "ulysses_flash_attn_func",
     dict(kwargs_by_rank=[dict(return_attn_probs=True), {}]), r"\breturn_attn_probs\b"),
    # llama3 (its own arguments: `llama3` in the setup)
    ("stripe_alibi", "stripe_flash_attn_func", dict(alibi_by_rank=[0.25, 0.25]), r"\balibi_slopes\b"),
    # llama3 (its own arguments: `llama3` in the setup)
    ("llama3_stride_not_dividing", "llama3_flash_attn_varlen_func", dict(llama3=dict(stride=3), Hk=4),
     r"\bheads_k_stride\b"),
    ("llama3_stride_differs_across_ranks", "llama3_flash_attn_varlen_func", dict(llama3=dict(stride_by_rank=[1, 2])),
     r"\bheads_k_stride\b"),
    ("llama3_slice_past_the_rows", "llama3_flash_attn_varlen_func", dict(llama3=dict(keys=slice(0, 25))),
     r"\blocal_k_slice\b"),
    ("llama3_offsets_misaligned", "llama3_flash_attn_varlen_func",
     dict(lens=[5, 13, 6], llama3=dict(shift_k=True)), r"\bcu_seqlens_q, cu_seqlens_k\b"),
    ("llama3_alibi_per_sequence", "llama3_flash_attn_varlen_func", dict(alibi_2d=True), r"\balibi_slopes\b"),
    ("llama3_dropout", "llama3_flash_attn_varlen_func", dict(kwargs=dict(dropout_p=0.1)), r"\bdropout_p\b"),
    # non-causal windows over keys that run past a rank's rows (its last document straddles on)
    ("llama3_window_keys_past_rows", "llama3_flash_attn_varlen_func",
     dict(lens=[5, 13, 6], kwargs=dict(window_size=(4, 2))), r"\blocal_k_slice\b"),
    # offsets prepared causal under a non-causal call, where a document continues on the next
    # rank (its keys there would be missing); offsets from two different global cu_seqlens
    ("llama3_causal_offsets_noncausal_call", "llama3_flash_attn_varlen_func",
     dict(lens=[5, 13, 6], llama3=dict(prepare_causal=True)), r"\bcausal\b"),
    ("llama3_offsets_of_two_batches", "llama3_flash_attn_varlen_func",
     dict(lens_by_rank=[[5, 13, 6], [8, 16]], kwargs=dict(causal=True)), r"\bcu_seqlens_q, cu_seqlens_k\b"),
    ("llama3_offsets_of_two_batches_noncausal", "llama3_flash_attn_varlen_func",
     dict(lens_by_rank=[[6, 2], [5, 3]]), r"\bcu_seqlens_q, cu_seqlens_k\b"),
    ("llama3_no_offsets_on_one_rank", "llama3_flash_attn_varlen_func", dict(llama3=dict(cu_q_none_on=1)),
     r"\bcu_seqlens_q\b"),
    ("llama3_and_ulysses_across_ranks", "llama3_flash_attn_varlen_func",
     dict(fn_by_rank=["llama3_flash_attn_varlen_func", "ulysses_flash_attn_varlen_func"]), r"\blayout\b"),
    # USP: one group as both axes (every rank's rows would be attended as another's), and a
    # ring layout it does not take
    ("usp_one_group_twice", "usp_flash_attn_func", dict(kwargs=dict(ulysses_group=None, ring_group=None)),
     r"\bulysses_group, ring_group\b"),
    ("usp_unknown_ring_layout", "usp_flash_attn_func",
     dict(kwargs=dict(ulysses_group=None, ring_group=None, ring_layout="llama3")), r"\bring_layout\b"),
    ("usp_stripe_packed", "usp_flash_attn_varlen_func",
     dict(kwargs=dict(ulysses_group=None, ring_layout="stripe"), solo_ring=True), r"\bring_layout\b"),
    ("usp_varlen_window", "usp_flash_attn_varlen_func",
     dict(kwargs=dict(ulysses_group=None, ring_layout="ring", window_size=(4, 0)), solo_ring=True),
     r"\bwindow_size\b"),
    ("usp_and_ulysses_across_ranks", "usp_flash_attn_func",
     dict(fn_by_rank=["usp_flash_attn_func", "ulysses_flash_attn_func"], solo_ring=True,
          kwargs_by_rank=[dict(ulysses_group=None), {}]),
     r"context-parallel scheme"),
]


def worker_errors(rank, world, cases):
    import torch.distributed as dist

    results = {}
    solo = [dist.new_group([r]) for r in range(world)]  # (USP's ring over one rank)
    for name, fn_name, setup, _ in cases:
        fn_name = setup.get("fn_by_rank", [fn_name] * world)[rank]
        S = setup.get("S_by_rank", [16] * world)[rank]
        H, Hk = setup.get("H", 4), setup.get("Hk", 2)
        dtype = DTYPES[setup.get("dtype_by_rank", ["float32"] * world)[rank]]
        kw = dict(setup.get("kwargs", {}), **setup.get("kwargs_by_rank", [{}] * world)[rank])
        if setup.get("solo_ring") and fn_name.startswith("usp"):
            kw.update(ring_group=solo[rank])
        gen = torch.Generator().manual_seed(rank)
        backend = setup.get("backend_by_rank", [None] * world)[rank]
        device = setup.get("device_by_rank", ["cpu"] * world)[rank]
        try:
            if "alibi_by_rank" in setup:
                kw["alibi_slopes"] = torch.full((H,), setup["alibi_by_rank"][rank])
            if "varlen" in fn_name:
                if "cu_by_rank" in setup:
                    cu = torch.tensor(setup["cu_by_rank"][rank], dtype=torch.int32)
                    lens = (cu[1:] - cu[:-1]).tolist()
                else:
                    lens = setup.get("lens_by_rank", [setup.get("lens", [8, 16])] * world)[rank]
                    cu = offsets(lens)
                n = sum(lens) // world
                q = torch.randn(n, H, 16, generator=gen).to(dtype)
                k, v = (torch.randn(n, Hk, 16, generator=gen).to(dtype) for _ in range(2))
                if setup.get("alibi"):
                    kw["alibi_slopes"] = torch.rand(H)
                if setup.get("alibi_2d"):
                    kw["alibi_slopes"] = torch.rand(len(lens), H)
                if fn_name.startswith("llama3"):
                    l3 = setup.get("llama3", {})
                    cu_q, cu_k, max_q, max_k, keys = cp.llama3_flash_attn_prepare_cu_seqlens(
                        cu, l3.get("prepare_causal", kw.get("causal", False)), rank, world)
                    if l3.get("cu_q_none_on") == rank:
                        cu_q = None
                    if l3.get("shift_k"):
                        cu_k = cu_k.clone()
                        cu_k[1:-1] += 1
                        max_k += 1
                    stride = l3.get("stride_by_rank", [l3.get("stride", Hk)] * world)[rank]
                    out = getattr(cp, fn_name)(q, k, v, cu_q, cu_k, max_q, max_k, stride, l3.get("keys", keys), **kw)
                else:
                    out = getattr(cp, fn_name)(q, k, v, cu, max(lens), **kw)
            else:
                q = torch.randn(2, S, H, 16, generator=gen).to(dtype=dtype, device=device)
                k, v = (torch.randn(2, S, Hk, 16, generator=gen).to(dtype=dtype, device=device) for _ in range(2))
                if setup.get("q_not_a_tensor_on") == rank:
                    q = q.tolist()
                with flashattn_py.use_backend(backend) if backend else contextlib.nullcontext():
                    out = getattr(cp, fn_name)(q, k, v, **kw)
            results[name] = {"returned": tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}
        except Exception as e:  # noqa: BLE001
            results[name] = {"type": type(e).__name__, "argument_error": isinstance(e, flashattn_py.ArgumentError),
                             "message": str(e), "traceback": traceback.format_exc()}
    # a process that is not in `group` (rank 1; rank 0 is a group of one and just computes)
    try:
        import torch.distributed as dist

        solo = dist.new_group([0])
        q = torch.randn(1, 8, 2, 16, generator=torch.Generator().manual_seed(rank))
        out = cp.ring_flash_attn_func(q, q, q, causal=True, group=solo)
        results["__not_in_group"] = {"returned": tuple(out.shape)}
    except Exception as e:  # noqa: BLE001
        results["__not_in_group"] = {"type": type(e).__name__, "message": str(e),
                                     "argument_error": isinstance(e, flashattn_py.ArgumentError),
                                     "traceback": traceback.format_exc()}
    # Ulysses with ranks asking autograd for different inputs: each rank's exchanges of q, k
    # and v gradients must pair up (three autograd nodes let rank 0 skip two: a wrong dq)
    try:
        g = torch.Generator().manual_seed(0)
        full = [torch.randn(1, 16, 2, 16, generator=g, dtype=torch.float64) for _ in range(3)]
        q, k, v = (cp.shard(t, "ulysses", rank, world).requires_grad_() for t in full)
        out = cp.ulysses_flash_attn_func(q, k, v, causal=True)
        dq = torch.autograd.grad(out.sum(), [q] if rank == 0 else [q, k, v])[0]
        whole_q = full[0].clone().requires_grad_()
        (want,) = torch.autograd.grad(flashattn_py.flash_attn_func(whole_q, *full[1:], causal=True).sum(), [whole_q])
        error = (dq - cp.shard(want, "ulysses", rank, world)).abs().max().item()
        # frozen k / v (only q's gradient is exchanged)
        q_only = cp.shard(full[0], "ulysses", rank, world).requires_grad_()
        k_frozen, v_frozen = (cp.shard(t, "ulysses", rank, world) for t in full[1:])
        (dq,) = torch.autograd.grad(cp.ulysses_flash_attn_func(q_only, k_frozen, v_frozen, causal=True).sum(), [q_only])
        error = max(error, (dq - cp.shard(want, "ulysses", rank, world)).abs().max().item())
        # a gradient penalty (create_graph) raises as every attention backward does here (its
        # exchanges have no history: it was silently zero)
        out = cp.ulysses_flash_attn_func(q, k, v, causal=True)
        (dq,) = torch.autograd.grad(out.sum(), [q], create_graph=True)
        try:
            dq.square().sum().backward()
            second = "no error"
        except RuntimeError as e:
            second = str(e)
        results["__ulysses_grad_subset"] = {"error": error, "second": second}
    except Exception:  # noqa: BLE001
        results["__ulysses_grad_subset"] = {"traceback": traceback.format_exc()}
    # all_gather_shards with shards that differ across ranks (gloo aborted a process on other
    # sizes; equal sizes of other shapes came back as the wrong rows)
    for shard_case, x in (("length", torch.randn(1, 8 if rank == 0 else 4, 2, 16)),
                          ("same_numel", torch.randn((1, 8, 2, 1) if rank == 0 else (1, 4, 2, 2)))):
        try:
            cp.all_gather_shards(x, "ring")
            results[f"__gather_{shard_case}"] = {"returned": True}
        except Exception as e:  # noqa: BLE001
            results[f"__gather_{shard_case}"] = {"argument_error": isinstance(e, flashattn_py.ArgumentError),
                                                 "message": str(e)}
    # packed offsets given on rank 0 only (rank 0 went on into the all_gather alone before the
    # field counts were compared)
    try:
        cp.all_gather_shards(torch.randn(8, 2), "ring", dim=0, cu_seqlens=[0, 16] if rank == 0 else None)
        results["__gather_offsets_on_one_rank"] = {"returned": True}
    except Exception as e:  # noqa: BLE001
        results["__gather_offsets_on_one_rank"] = {"argument_error": isinstance(e, flashattn_py.ArgumentError),
                                                   "message": str(e)}
    # a packed form's kv split wrongly on rank 1 only: refused on every rank by the collective
    # check (the split ran before it and raised on rank 1 alone, leaving rank 0 waiting)
    try:
        q, kv = torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 2, 16)
        cp.ring_flash_attn_kvpacked_func(q, kv[:, :, :1] if rank == 1 else kv, causal=True)
        results["__kvpacked_on_one_rank"] = {"returned": True}
    except Exception as e:  # noqa: BLE001
        results["__kvpacked_on_one_rank"] = {"argument_error": isinstance(e, flashattn_py.ArgumentError),
                                             "message": str(e)}
    # ... and a plain q given as qkv on every rank (passed on whole, it was attention(q, q, q))
    try:
        cp.ring_flash_attn_qkvpacked_func(torch.randn(1, 8, 2, 16), causal=True)
        results["__plain_q_as_qkv"] = {"returned": True}
    except Exception as e:  # noqa: BLE001
        results["__plain_q_as_qkv"] = {"argument_error": isinstance(e, flashattn_py.ArgumentError),
                                       "message": str(e)}
    # zigzag with an empty batch, forward and backward (rank 0's lse view failed a layout check)
    try:
        q = torch.randn(0, 8, 2, 16, requires_grad=True)
        cp.zigzag_ring_flash_attn_func(q, q, q, causal=True).sum().backward()
        results["__zigzag_empty_batch"] = {"ok": tuple(q.grad.shape) == (0, 8, 2, 16)}
    except Exception:  # noqa: BLE001
        results["__zigzag_empty_batch"] = {"error": traceback.format_exc()}
    # the collective check with fewer fields on one rank: both ranks refuse (rank 0 compared
    # only its own field and passed)
    try:
        from flashattn_py.distributed import comm

        fields = [("a", [1.0])] + ([("b", [2.0])] if rank == 1 else [])
        comm.check_collectively(comm.Group(None), lambda: fields)
        results["__field_counts"] = {"returned": True}
    except Exception as e:  # noqa: BLE001
        results["__field_counts"] = {"argument_error": isinstance(e, flashattn_py.ArgumentError), "message": str(e)}
    # the group still works after all that: one good call
    try:
        q = torch.randn(1, 8, 2, 16, generator=torch.Generator().manual_seed(rank))
        out = cp.ring_flash_attn_func(q, q, q, causal=True)
        results["__after_errors"] = {"ok": tuple(out.shape) == (1, 8, 2, 16)}
    except Exception:  # noqa: BLE001
        results["__after_errors"] = {"error": traceback.format_exc()}
    return results


# USP refusals on a 2 x 2 mesh (Ulysses groups {0, 1}, {2, 3}; ring groups {0, 2}, {1, 3}): a
# refusal on some ranks must reach all four before any data moves (each case: pattern).
USP_ERROR_CASES = {
    "dropout_on_one_rank": r"\bdropout_p\b",
    # the two Ulysses groups agree within themselves but differ in the heads of u = 1 only
    "alibi_differs_between_ulysses_groups": r"\balibi_slopes\b",
    # every rank's two groups share only it, but ring groups {0, 3} and {1, 2} do not pair the
    # same Ulysses rank: not the two axes of one mesh (it returned wrong rows)
    "groups_not_a_mesh": r"\bulysses_group\b",
    # packed: max_seqlen 24 on rank 0, 32 elsewhere (only the ring's check, after the
    # exchange, saw it on some ranks)
    "max_seqlen_differs_on_one_rank": r"\bmax_seqlen\b",
    # ranks 0, 1: Ulysses {0, 1}, rings {0, 2} / {1, 3}; ranks 2, 3 the other way round (Ulysses
    # {0, 2} / {1, 3}, ring {2, 3}): one rank's first round paired with another's second
    "groups_roles_swapped": r"USP check round",
}


def worker_usp_errors(rank, world, cases):
    import torch.distributed as dist

    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    rings = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    crossed = [dist.new_group([0, 3]), dist.new_group([1, 2])]
    results = {}
    for name in cases:
        ulysses, ring = pairs[rank // 2], rings[rank % 2]
        if name == "groups_not_a_mesh":
            ring = crossed[0] if rank in (0, 3) else crossed[1]
        if name == "groups_roles_swapped":
            ulysses, ring = (pairs[0], rings[rank]) if rank < 2 else (rings[rank - 2], pairs[1])
        u, r = dist.get_rank(ulysses), dist.get_rank(ring)
        g = torch.Generator().manual_seed(0)
        q, k, v = (cp.usp_shard(torch.randn(1, 16, 4, 8, generator=g), "zigzag", r, 2, u, 2) for _ in range(3))
        kw = dict(causal=True, ulysses_group=ulysses, ring_group=ring)
        if name == "dropout_on_one_rank" and rank == 3:
            kw["dropout_p"] = 0.1
        if name == "alibi_differs_between_ulysses_groups":
            kw["alibi_slopes"] = torch.tensor([0.1, 0.2, 0.3, 0.4] if rank < 2 else [0.1, 0.2, 0.5, 0.6])
        try:
            if name == "max_seqlen_differs_on_one_rank":
                cu = offsets([8, 24])
                x = cp.usp_shard(torch.randn(32, 4, 8, generator=g), "zigzag", r, 2, u, 2, dim=0, cu_seqlens=cu)
                out = cp.usp_flash_attn_varlen_func(x, x, x, cu, 24 if rank == 0 else 32, **kw)
            else:
                out = cp.usp_flash_attn_func(q, k, v, **kw)
            results[name] = {"returned": tuple(out.shape)}
        except Exception as e:  # noqa: BLE001
            results[name] = {"argument_error": isinstance(e, flashattn_py.ArgumentError), "message": str(e),
                             "traceback": traceback.format_exc()}
    return results


def worker_usp_meshes(rank, world, cases):
    """8 ranks, Ulysses pairs {0, 1}, {2, 3}, {4, 5}, {6, 7}: as two 2 x 2 meshes on {0, 1, 4, 5}
    and {2, 3, 6, 7} ("two_meshes": each rank's rows of its mesh's problem, max error against
    the reference), and with ring groups {0, 4}, {2, 6}, {1, 7}, {3, 5} ("twisted": every
    rank's groups share only it and positions agree along each axis, but they form no mesh:
    the rows came out wrong without an error)."""
    import torch.distributed as dist

    pairs = [dist.new_group([2 * i, 2 * i + 1]) for i in range(4)]
    results = {}
    for name in cases:
        members = [[0, 4], [2, 6], [1, 7], [3, 5]] if name == "twisted" else [[0, 4], [2, 6], [1, 5], [3, 7]]
        rings = [dist.new_group(m) for m in members]
        ulysses, ring = pairs[rank // 2], next(g for g, m in zip(rings, members) if rank in m)
        u, r = dist.get_rank(ulysses), dist.get_rank(ring)
        g = torch.Generator().manual_seed(0 if rank in (0, 1, 4, 5) else 1)
        q, k, v = (torch.randn(1, 16, 4, 8, generator=g, dtype=torch.float64) for _ in range(3))
        try:
            out = cp.usp_flash_attn_func(*(cp.usp_shard(t, "zigzag", r, 2, u, 2) for t in (q, k, v)), causal=True,
                                         ulysses_group=ulysses, ring_group=ring)
            ref, _ = attention_ref(q, k, v, window_right=0)
            results[name] = {"error": (out - cp.usp_shard(ref, "zigzag", r, 2, u, 2)).abs().max().item()}
        except Exception as e:  # noqa: BLE001
            results[name] = {"argument_error": isinstance(e, flashattn_py.ArgumentError), "message": str(e),
                             "traceback": traceback.format_exc()}
    return results


# ---------------------------------------------------------------------------------------------
# Parent side

_SPAWNS: dict = {}


def _spawn(key):
    """Run (once per module) the spawn ``key`` and cache its per-rank results or its failure."""
    if key not in _SPAWNS:
        t0 = time.perf_counter()
        try:
            if key == "errors":
                value = run_workers(worker_errors, 2, ERROR_CASES, timeout=90, pg_timeout=30)
            elif key == "usp_errors":  # (a rank left waiting fails at the group timeout, 30 s)
                value = run_workers(worker_usp_errors, 4, list(USP_ERROR_CASES), timeout=90, pg_timeout=30)
            elif key == "usp_meshes":
                value = run_workers(worker_usp_meshes, 8, ["two_meshes", "twisted"], timeout=150, pg_timeout=30)
            elif key == 1:
                value = run_workers(worker_world1, 1, WORLD1_CASES, timeout=90)
            else:
                value = run_workers(worker_cases, key, CASES[key], timeout=240 if key > 2 else 150)
            _SPAWNS[key] = ("ok", value)
        except AssertionError as e:
            _SPAWNS[key] = ("failed", str(e))
        _SPAWNS[key] += (time.perf_counter() - t0,)
    status, value, _ = _SPAWNS[key]
    if status != "ok":
        pytest.fail(f"spawn {key!r} failed:\n{value}", pytrace=False)
    return value


def _case_results(world, name):
    per_rank = [r[name] for r in _spawn(world)]
    errors = [f"--- rank {rank} ---\n{r['error']}" for rank, r in enumerate(per_rank) if "error" in r]
    if errors:
        pytest.fail(f"case {name} (world {world}) raised:\n" + "\n".join(errors), pytrace=False)
    return per_rank


def _assemble(c, world, pieces, what, full_shape, dtype, cu):
    """The full tensor from every rank's piece by the contract's layout; rows on dim 1 for dense
    (B, S, ...) and lse (B, H, S) -> dim 2; packed rows dim 0, lse (H, total) -> dim 1."""
    total = sum(c["lens"]) if c["varlen"] else c["S"]
    if what == "lse":
        dim = 1 if c["varlen"] else 2
    else:
        dim = 0 if c["varlen"] else 1
    full = torch.zeros(full_shape, dtype=dtype)
    for rank, piece in enumerate(pieces):
        idx = rows_of(c["func"], rank, world, total, cu)
        want = list(full_shape)
        want[dim] = len(idx)
        assert tuple(piece.shape) == tuple(want), \
            f"{what} on rank {rank}: shape {tuple(piece.shape)}, expected {tuple(want)}"
        assert piece.dtype == dtype, f"{what} on rank {rank}: dtype {piece.dtype}, expected {dtype}"
        full.index_copy_(dim, idx, piece)
    return full


class _Replay(torch.autograd.Function):
    """Hands check_attention the assembled out, and the assembled grads on backward."""

    @staticmethod
    def forward(ctx, q, k, v, out, grads, dout):
        ctx.grads, ctx.dout = grads, dout
        return out.clone()

    @staticmethod
    def backward(ctx, g):
        assert torch.equal(g, ctx.dout.to(g.dtype)), "test bug: upstream gradient differs from the workers'"
        return (*ctx.grads, None, None, None)


def _check_case(world, c):
    if c["backend"] == "triton" and flashattn_py.backends.triton_error():
        pytest.skip(flashattn_py.backends.triton_error())
    if c["library"] and importlib.util.find_spec(c["library"]) is None:
        pytest.skip(f"{c['library']} is not installed")
    per_rank = _case_results(world, c["name"])
    q, k, v, slopes, cu, dout = make_inputs(c)
    dtype = q.dtype
    packed = c["varlen"]
    out_shape = (*q.shape[:3], c["Dv"])
    runs = []
    for i in range(c["repeat"]):
        pieces = {key: [r["runs"][i][key] for r in per_rank] for key in ("out", "dq", "dk", "dv")}
        sq = (lambda s: s[1:]) if packed else (lambda s: s)
        full = {
            "out": _assemble(c, world, pieces["out"], "out", sq(out_shape), dtype, cu),
            "dq": _assemble(c, world, pieces["dq"], "dq", sq(q.shape), dtype, cu),
            "dk": _assemble(c, world, pieces["dk"], "dk", sq(k.shape), dtype, cu),
            "dv": _assemble(c, world, pieces["dv"], "dv", sq(v.shape), dtype, cu),
        }
        if packed:
            full = {key: t[None] for key, t in full.items()}
        runs.append(full)

    def replay(q1, k1, v1):
        return _Replay.apply(q1, k1, v1, runs[0]["out"], (runs[0]["dq"], runs[0]["dk"], runs[0]["dv"]), dout)

    ref_kw = ref_kwargs(c, slopes, cu)
    check_attention(replay, q, k, v, seed=_seed(c), **ref_kw)
    if c["lse"]:
        lse_shape = (c["H"], sum(c["lens"])) if packed else (c["B"], c["H"], c["S"])
        lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        lse = _assemble(c, world, [r["runs"][0]["lse"] for r in per_rank], "lse", lse_shape, lse_dtype, cu)
        _, ref_lse = attention_ref(q.double(), k.double(), v.double(), **ref_kw)
        ref_lse = ref_lse[0] if packed else ref_lse
        torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=2e-5, msg=lambda m: f"lse: {m}")
    for i in range(1, c["repeat"]):  # deterministic=True: bitwise the same gradients
        for key in ("out", "dq", "dk", "dv"):
            assert torch.equal(runs[i][key], runs[0][key]), f"deterministic=True: {key} differs between two runs"


@distributed
@pytest.mark.parametrize("name", [c["name"] for c in CASES[2]])
def test_world2_matches_reference(name):
    _check_case(2, next(c for c in CASES[2] if c["name"] == name))


@distributed
@pytest.mark.parametrize("name", [c["name"] for c in CASES[3]])
def test_world3_matches_reference(name):
    _check_case(3, next(c for c in CASES[3] if c["name"] == name))


@distributed
@pytest.mark.parametrize("name", [c["name"] for c in CASES[4]])
def test_world4_matches_reference(name):
    _check_case(4, next(c for c in CASES[4] if c["name"] == name))


@distributed
@pytest.mark.parametrize("world", [2])
def test_all_gather_shards(world):
    per_rank = [r["__all_gather_shards"] for r in _spawn(world)]
    errors = [f"--- rank {rank} ---\n{r['error']}" for rank, r in enumerate(per_rank) if "error" in r]
    assert not errors, "\n".join(errors)


@distributed
def test_context_parallel_calls_under_torch_compile():
    (r,) = [x["__compiled"] for x in _spawn(1)]
    assert "error" not in r, r["error"]


@distributed
@pytest.mark.parametrize("name", [c["name"] for c in WORLD1_CASES])
def test_world1_is_the_plain_call_bitwise(name):
    (result,) = _spawn(1)
    r = result[name]
    if "error" in r:
        pytest.fail(f"case {name} raised:\n{r['error']}", pytrace=False)
    dist_run, plain_run = r["pair"]
    assert torch.equal(dist_run["out"], plain_run["out"]), \
        f"out differs: max {(dist_run['out'].double() - plain_run['out'].double()).abs().max().item():.3e}"
    for g_name, a, b in zip(("dq", "dk", "dv"), dist_run["grads"], plain_run["grads"]):
        assert torch.equal(a, b), f"{g_name} differs: max {(a.double() - b.double()).abs().max().item():.3e}"


@distributed
@pytest.mark.parametrize("name,pattern", [(e[0], e[3]) for e in ERROR_CASES])
def test_bad_input_raises_on_every_rank(name, pattern):
    per_rank = [r[name] for r in _spawn("errors")]
    setup = next(e[2] for e in ERROR_CASES if e[0] == name)
    for rank, r in enumerate(per_rank):
        assert "returned" not in r, f"rank {rank}: no error raised (returned {r['returned']})"
        expected = setup.get("expect_types", ["ArgumentError"] * len(per_rank))[rank]
        if expected == "ArgumentError":
            assert r["argument_error"], f"rank {rank}: raised {r['type']}, not ArgumentError:\n{r['traceback']}"
        else:
            assert r["type"] == expected, f"rank {rank}: raised {r['type']}, not {expected}:\n{r['traceback']}"
        assert re.search(pattern, r["message"]), f"rank {rank}: message does not name the argument: {r['message']!r}"


@distributed
@pytest.mark.parametrize("name", list(USP_ERROR_CASES))
def test_usp_refusal_reaches_every_rank_of_the_mesh(name):
    for rank, r in enumerate(x[name] for x in _spawn("usp_errors")):
        assert "returned" not in r, f"rank {rank}: no error raised (returned {r['returned']})"
        assert r["argument_error"], f"rank {rank}: not an ArgumentError:\n{r['traceback']}"
        assert re.search(USP_ERROR_CASES[name], r["message"]), f"rank {rank}: {r['message']!r}"


@distributed
def test_usp_two_meshes_in_one_world_and_a_twisted_one():
    per_rank = _spawn("usp_meshes")
    for rank, r in enumerate(x["two_meshes"] for x in per_rank):
        assert "traceback" not in r, f"rank {rank}:\n{r['traceback']}"
        assert r["error"] < 1e-12, f"rank {rank}: off by {r['error']}"
    for rank, r in enumerate(x["twisted"] for x in per_rank):
        assert "error" not in r, f"rank {rank}: no error raised (rows off by {r['error']})"
        assert r["argument_error"] and "one mesh" in r["message"], f"rank {rank}:\n{r['traceback']}"


@distributed
def test_collective_check_refuses_a_different_number_of_fields_on_every_rank():
    for rank, r in enumerate(x["__field_counts"] for x in _spawn("errors")):
        assert "returned" not in r, f"rank {rank}: no error raised"
        assert r["argument_error"] and "checked fields" in r["message"], f"rank {rank}: {r['message']}"


@distributed
def test_process_not_in_group_raises():
    member, outsider = (r["__not_in_group"] for r in _spawn("errors"))
    assert member.get("returned") == (1, 8, 2, 16), f"rank 0 (a group of one): {member}"
    assert "returned" not in outsider, "rank 1 is not in the group: expected ArgumentError"
    assert outsider["argument_error"], f"raised {outsider['type']}, not ArgumentError:\n{outsider['traceback']}"
    assert re.search(r"\bgroup\b", outsider["message"]), outsider["message"]


@distributed
def test_two_groups_in_one_world():
    for rank, r in enumerate(x["__subgroups"] for x in _spawn(4)):
        assert "error" not in r, f"rank {rank}:\n{r['error']}"


@distributed
def test_ulysses_grads_when_ranks_ask_for_different_inputs():
    for rank, r in enumerate(x["__ulysses_grad_subset"] for x in _spawn("errors")):
        assert "traceback" not in r, f"rank {rank}:\n{r['traceback']}"
        assert r["error"] < 1e-12, f"rank {rank}: dq off by {r['error']}"
        assert "not differentiable" in r["second"], f"rank {rank}: double backward: {r['second']}"


def _refused_on_every_rank(key: str, pattern: str) -> None:
    """The errors spawn's result ``key``: an ArgumentError matching ``pattern`` on every rank."""
    for rank, r in enumerate(x[key] for x in _spawn("errors")):
        assert "returned" not in r, f"rank {rank}: {key}: no error raised"
        assert r["argument_error"] and re.search(pattern, r["message"]), f"rank {rank}: {key}: {r}"


@distributed
@pytest.mark.parametrize("shard_case", ["length", "same_numel"])
def test_all_gather_shards_refuses_shards_that_differ(shard_case):
    _refused_on_every_rank(f"__gather_{shard_case}", r"\bx\b")


@distributed
def test_all_gather_shards_refuses_offsets_on_one_rank():
    _refused_on_every_rank("__gather_offsets_on_one_rank", r"\bcu_seqlens\b")


@distributed
def test_packed_form_split_wrongly_on_one_rank_raises_on_every_rank():
    _refused_on_every_rank("__kvpacked_on_one_rank", r"\bkv\b.*\(1, 8, 1, 2, 16\)")
    _refused_on_every_rank("__plain_q_as_qkv", r"\bqkv\b")  # (a plain q taken as qkv: attention(q, q, q))


@distributed
def test_zigzag_empty_batch_backward():
    for rank, r in enumerate(x["__zigzag_empty_batch"] for x in _spawn("errors")):
        assert "error" not in r, f"rank {rank}:\n{r['error']}"
        assert r["ok"]


@distributed
def test_group_still_works_after_bad_input():
    per_rank = [r["__after_errors"] for r in _spawn("errors")]
    for rank, r in enumerate(per_rank):
        assert "error" not in r, f"rank {rank}:\n{r['error']}"
        assert r["ok"]


# ---------------------------------------------------------------------------------------------
# Pure layout helpers: no processes


@pytest.mark.parametrize("layout", ["ring", "zigzag", "ulysses", "llama3", "stripe"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_unshard_dense(layout, world):
    x = torch.randn(2, 8 * world, 3, 5)
    pieces = [cp.shard(x, layout, r, world) for r in range(world)]
    for r, p in enumerate(pieces):
        assert torch.equal(p, x.index_select(1, rows_of(layout, r, world, x.shape[1]))), f"rank {r}'s piece"
    assert torch.equal(cp.unshard(pieces, layout), x)
    # another dim (the lse's rows: (B, H, S))
    y = torch.randn(2, 3, 4 * world)
    pieces = [cp.shard(y, layout, r, world, dim=2) for r in range(world)]
    assert torch.equal(cp.unshard(pieces, layout, dim=2), y)
    assert torch.equal(pieces[-1], y.index_select(2, rows_of(layout, world - 1, world, y.shape[2])))


@pytest.mark.parametrize("ring_layout", ["ring", "zigzag", "stripe"])
@pytest.mark.parametrize("u_size,r_size", [(1, 3), (2, 2), (3, 2), (4, 1)])
def test_usp_shard(ring_layout, u_size, r_size):
    x = torch.randn(2, 12 * u_size * r_size, 3)
    world = u_size * r_size
    for rank in range(world):
        _, u, _, r, _ = usp_mesh(f"usp:{ring_layout}:{u_size}:low", rank, world)
        want = x.index_select(1, rows_of(f"usp:{ring_layout}:{u_size}:low", rank, world, x.shape[1]))
        assert torch.equal(cp.usp_shard(x, ring_layout, r, r_size, u, u_size), want), f"rank {rank}"
        assert torch.equal(cp.usp_shard(x.transpose(1, 2), ring_layout, r, r_size, u, u_size, dim=2),
                           want.transpose(1, 2)), f"rank {rank}, dim=2"
    with pytest.raises(flashattn_py.ArgumentError, match="ring_layout"):
        cp.usp_shard(x, "ulysses", 0, r_size, 0, u_size)
    if ring_layout == "stripe":
        return
    # packed documents: the ring rank's pieces of every document, then cut over U
    lens = [4 * r_size * u_size, 2 * r_size * u_size, 6 * r_size * u_size]
    cu = offsets(lens)
    xp = torch.randn(sum(lens), 3)
    for rank in range(world):
        _, u, _, r, _ = usp_mesh(f"usp:{ring_layout}:{u_size}:low", rank, world)
        want = xp.index_select(0, rows_of(f"usp:{ring_layout}:{u_size}:low", rank, world, xp.shape[0], cu))
        got = cp.usp_shard(xp, ring_layout, r, r_size, u, u_size, dim=0, cu_seqlens=cu)
        assert torch.equal(got, want), f"rank {rank}, packed"


@pytest.mark.parametrize("layout", ["ring", "zigzag", "ulysses", "llama3"])
@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_shard_unshard_varlen(layout, world, as_tensor):
    contiguous = layout in ("ulysses", "llama3")
    lens = [2 * world * n for n in (1, 3, 2)] if not contiguous else [3, 2 * world * 3 - 3, 4 * world]
    cu_list = [0] + torch.tensor(lens).cumsum(0).tolist()
    cu = torch.tensor(cu_list, dtype=torch.int32) if as_tensor else cu_list
    x = torch.randn(sum(lens), 2, 3)
    pieces = [cp.shard(x, layout, r, world, dim=0, cu_seqlens=cu) for r in range(world)]
    for r, p in enumerate(pieces):
        assert torch.equal(p, x.index_select(0, rows_of(layout, r, world, x.shape[0], cu_list))), f"rank {r}"
    assert torch.equal(cp.unshard(pieces, layout, dim=0, cu_seqlens=cu), x)
    lse = torch.randn(2, sum(lens))  # (H, total): rows on dim 1
    pieces = [cp.shard(lse, layout, r, world, dim=1, cu_seqlens=cu) for r in range(world)]
    assert torch.equal(cp.unshard(pieces, layout, dim=1, cu_seqlens=cu), lse)


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_stripe_plan_matches_the_global_window(world):
    """plan_stripe_step's one call per step keeps exactly the keys the global window keeps."""
    from flashattn_py.distributed.ring import plan_stripe_step

    for rows in (1, 2, 5):
        n = rows * world
        for left in range(-1, n + 2):
            for right in range(-1, n + 2):
                for rank in range(world):
                    for source in range(world):
                        want = torch.zeros(rows, rows, dtype=torch.bool)
                        for i in range(rows):
                            for j in range(rows):
                                g = (i * world + rank) - (j * world + source)  # query row - key row, global
                                want[i, j] = (left < 0 or g <= left) and (right < 0 or -g <= right)
                        got = torch.zeros(rows, rows, dtype=torch.bool)
                        for call in plan_stripe_step(rank, source, world, rows, left, right):
                            if not call.masked:
                                got[:] = True
                                continue
                            w_left, w_right, diag = call.local_window
                            assert abs(diag) <= rows - 1, (world, rows, left, right, rank, source, call)
                            for i in range(rows):
                                for j in range(rows):
                                    got[i, j] = ((w_left < 0 or j >= i + diag - w_left)
                                                 and (w_right < 0 or j <= i + diag + w_right))
                        assert torch.equal(got, want), (world, rows, left, right, rank, source)


def test_stripe_layout_with_no_rows():
    x = torch.randn(2, 0, 3, 4)
    pieces = [cp.shard(x, "stripe", r, 2) for r in range(2)]
    assert all(p.shape == (2, 0, 3, 4) for p in pieces)
    assert cp.unshard(pieces, "stripe").shape == (2, 0, 3, 4)
    assert cp.local_rows("stripe", 1, 2, 0).numel() == 0
    with pytest.raises(flashattn_py.ArgumentError, match="pieces"):
        cp.unshard([torch.randn(1, 2, 3), torch.randn(1, 2, 3).double()], "stripe")


def test_llama3_prepare_cu_seqlens_by_hand():
    # documents [0, 5), [5, 18), [18, 24), [24, 32) over 2 ranks of 16 rows: rank 0 holds
    # document 0 and the start of 1; rank 1 the rest of 1 (its keys from row 5), 2 and 3
    cu = offsets([5, 13, 6, 8])
    want = {  # (rank, causal): (cu_q, cu_k, max_q, max_k, slice)
        (0, True): ([0, 5, 16], [0, 5, 16], 11, 11, slice(0, 16)),
        (0, False): ([0, 5, 16], [0, 5, 18], 11, 13, slice(0, 18)),
        (1, True): ([0, 2, 8, 16], [0, 13, 19, 27], 8, 13, slice(5, 32)),
        (1, False): ([0, 2, 8, 16], [0, 13, 19, 27], 8, 13, slice(5, 32)),
    }
    for (rank, causal), (cu_q, cu_k, max_q, max_k, keys) in want.items():
        got = cp.llama3_flash_attn_prepare_cu_seqlens(cu, causal, rank, 2)
        assert [got[0].tolist(), got[1].tolist(), *got[2:]] == [cu_q, cu_k, max_q, max_k, keys], (rank, causal, got)
        assert got[0].dtype == got[1].dtype == torch.int32
    # one rank: the global offsets themselves; a document boundary on a rank's edge
    got = cp.llama3_flash_attn_prepare_cu_seqlens([0, 3, 8], True, 0, 1)
    assert [got[0].tolist(), got[1].tolist(), *got[2:]] == [[0, 3, 8], [0, 3, 8], 5, 5, slice(0, 8)]
    got = cp.llama3_flash_attn_prepare_cu_seqlens(offsets([4, 4, 8]), False, 1, 2)
    assert [got[0].tolist(), got[1].tolist(), *got[2:]] == [[0, 8], [0, 8], 8, 8, slice(8, 16)]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_llama3_prepared_offsets_cover_each_ranks_rows(world):
    lens = [7, 0, 13, 1, 6, 9, 0, 12]  # 48 rows
    cu = offsets(lens)
    rows = 48 // world
    for rank in range(world):
        for causal in (False, True):
            cu_q, cu_k, max_q, max_k, keys = cp.llama3_flash_attn_prepare_cu_seqlens(cu, causal, rank, world)
            q_off, k_off = cu_q.tolist(), cu_k.tolist()
            assert q_off[0] == k_off[0] == 0 and q_off[-1] == rows and k_off[-1] == keys.stop - keys.start
            assert max_q == max(b - a for a, b in zip(q_off, q_off[1:]))
            assert max_k == max(b - a for a, b in zip(k_off, k_off[1:]))
            for d in range(len(q_off) - 1):
                q_rows = (rank * rows + q_off[d], rank * rows + q_off[d + 1])  # global rows
                k_rows = (keys.start + k_off[d], keys.start + k_off[d + 1])
                if q_rows[0] == q_rows[1]:  # an empty document
                    assert k_rows == q_rows, (rank, causal, d)
                    continue
                doc = next(i for i in range(len(lens)) if cu[i] <= q_rows[0] and q_rows[1] <= cu[i + 1])
                # the keys: the document from its start, to its end (or, causal, to the rank's)
                end = min(int(cu[doc + 1]), (rank + 1) * rows) if causal else int(cu[doc + 1])
                assert k_rows == (int(cu[doc]), end), (rank, causal, d)
    with pytest.raises(flashattn_py.ArgumentError, match="cu_seqlens"):
        cp.llama3_flash_attn_prepare_cu_seqlens(offsets([5, 6]), True, 0, 2)  # 11 rows over 2 ranks
    with pytest.raises(flashattn_py.ArgumentError, match="rank"):
        cp.llama3_flash_attn_prepare_cu_seqlens(offsets([6, 6]), True, 2, 2)
    with pytest.raises(flashattn_py.ArgumentError, match="cu_seqlens"):
        cp.llama3_flash_attn_prepare_cu_seqlens(offsets([6, 6]).float(), True, 0, 2)
    with pytest.raises(flashattn_py.ArgumentError, match="cu_seqlens: expected a 1-D"):
        cp.llama3_flash_attn_prepare_cu_seqlens(offsets([6, 6])[None], True, 0, 2)
    with pytest.raises(flashattn_py.ArgumentError, match="cu_seqlens: expected integer"):
        cp.llama3_flash_attn_prepare_cu_seqlens([0, 2.7, 8], True, 0, 2)
    with pytest.raises(flashattn_py.ArgumentError, match="rank"):
        cp.llama3_flash_attn_prepare_cu_seqlens([0, 4, 8], True, True, 2)
    import numpy

    got = cp.llama3_flash_attn_prepare_cu_seqlens([0, 4, 8], True, numpy.int64(1), numpy.int64(2))
    assert got[4] == slice(4, 8) and type(got[4].start) is int


def test_shard_rejects_bad_layouts():
    x = torch.randn(1, 12, 2, 4)
    with pytest.raises(flashattn_py.ArgumentError):
        cp.shard(x, "zigzag", 0, 4)  # 12 rows do not make 8 chunks
    with pytest.raises(flashattn_py.ArgumentError, match="layout"):
        cp.shard(x, "diagonal", 0, 2)
    with pytest.raises(flashattn_py.ArgumentError):
        cp.shard(x[0], "ring", 0, 2, dim=0, cu_seqlens=[0, 5, 12])  # document 0 of 5 rows over 2 ranks
    with pytest.raises(flashattn_py.ArgumentError, match="cu_seqlens"):
        cp.shard(x[0], "stripe", 0, 2, dim=0, cu_seqlens=[0, 6, 12])  # (no packed form)
    with pytest.raises(flashattn_py.ArgumentError):
        cp.shard(x, "stripe", 0, 5)  # 12 rows over 5 ranks
    with pytest.raises(flashattn_py.ArgumentError, match="pieces"):
        cp.unshard([x[:, :6], x[:, 6:10], x[:, 10:]], "stripe")  # 6 + 4 + 2 rows: not 4 each
    with pytest.raises(flashattn_py.ArgumentError, match="pieces"):
        cp.unshard([x[:, :6], x[:, 6:].double()], "ring")  # (torch.cat would promote the dtype)


def worker_ulysses_unequal_lengths(rank, world, windows):
    """Dense Ulysses with more queries than keys (shards of 7 and 4 rows per rank), beside
    flash_attn_func on the whole sequences: each rank's rows of the output."""
    q, k, v = random_qkv(1, 7 * world, 4 * world, 2 * world, world, 16, seed=11)
    out = {}
    for window in windows:
        shard = cp.ulysses_flash_attn_func(q[:, 7 * rank:7 * (rank + 1)], k[:, 4 * rank:4 * (rank + 1)],
                                           v[:, 4 * rank:4 * (rank + 1)], window_size=window)
        whole = flashattn_py.flash_attn_func(q, k, v, window_size=window)[:, 7 * rank:7 * (rank + 1)]
        out[window] = (shard, whole)
    return out


@distributed
def test_ulysses_applies_flash_attns_window_rule_to_the_whole_sequences():
    # Sq 14 > Sk 8 + 1: flash-attn's rule makes a right side of -1 or >= 8 beside a bounded
    # left side 8 (query 0 sees keys up to 0 + (8 - 14) + 8 = 2), one of 8 or more beside
    # an unbounded left side -1; Ulysses attends the gathered sequences, so the same.
    windows = [(1, -1), (1, 8), (-1, 9), (3, 2)]
    for rank, per_window in enumerate(run_workers(worker_ulysses_unequal_lengths, 2, windows, timeout=90)):
        for window, (shard, whole) in per_window.items():
            torch.testing.assert_close(shard, whole, atol=1e-5, rtol=1e-5, msg=f"rank {rank}, window {window}")

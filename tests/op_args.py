"""Positional arguments of the compiled ops (csrc/ops.cpp schemas) for tests that call them
directly, taken from the spec (flashattn_py/ops.py FWD) by name, so an argument added to
both stays out of these tests."""
from __future__ import annotations

import torch

from flashattn_py import ops

# The compiled forward's leading arguments: q, k, v and the dense ones up to rng_state.
_LEADING = 12


def dense_tail() -> tuple:
    """The compiled forward's arguments after rng_state (packed sequences, pages, KV cache,
    splits, the CPU path), each at the spec's default: a dense call."""
    names = [a.name for a in torch.ops.flashattn.fwd.default._schema.arguments][_LEADING:]
    return tuple(ops.FWD.args[ops.FWD.index[name]].default for name in names)

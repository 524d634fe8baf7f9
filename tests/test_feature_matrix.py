"""README's feature x backend table agrees with each backend's supports()."""
import re
from pathlib import Path

import torch

from flashattn_py import backends

README = Path(__file__).resolve().parents[1] / "README.md"

# Table rows that depend on what a backend's kernels compute, as the Problem that asks.
PROBLEMS = {
    "float32": backends.Problem("cpu", torch.float32),
    "float64": backends.Problem("cpu", torch.float64),
    "bfloat16": backends.Problem("cpu", torch.bfloat16),
    "float16": backends.Problem("cpu", torch.float16),
    "attn_mask (float bias, bool mask)": backends.Problem("cpu", torch.bfloat16, has_attn_mask=True),
    "dropout": backends.Problem("cpu", torch.bfloat16, dropout_p=0.1),
    "packed sequences (varlen) in one launch, packed qkv / kv, nested (jagged)": backends.Problem(
        "cpu", torch.bfloat16, cu_seqlens=torch.zeros(2, dtype=torch.int32)),
    "paged K/V, any page size (forward only)": backends.Problem(
        "cpu", torch.bfloat16, block_table=torch.zeros(1, 1, dtype=torch.int32)),
}


def read_table():
    text = README.read_text()
    section = text[text.index("## Backends and features"):]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    table = {}
    for line in rows[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        table[cells[0]] = dict(zip(header[1:], cells[1:]))
    return header[1:], table


def test_table_names_every_backend_and_only_yes_no():
    names, table = read_table()
    assert names == ["cpu", "triton", "cuda", "reference"]
    assert set(names) == set(backends.BACKEND_NAMES)
    for feature, cells in table.items():
        assert set(cells.values()) <= {"yes", "no"}, feature


def test_table_matches_supports():
    names, table = read_table()
    assert set(PROBLEMS) <= set(table), "a feature row the test knows is missing from the README"
    for feature, cells in table.items():
        for name in names:
            if feature in PROBLEMS:
                served = not backends.BACKENDS[name].feature_reasons(PROBLEMS[feature])
                assert cells[name] == ("yes" if served else "no"), f"{feature} / {name}: README says {cells[name]}"
            else:
                # Rows with no switch in Problem are served by every backend.
                assert cells[name] == "yes", f"{feature} / {name}"

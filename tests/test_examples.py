"""The examples run and check themselves (examples/*.py)."""
import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("page_size", [1, 5, 16])
def test_decode_from_a_paged_cache_matches_transformers(page_size):
    pytest.importorskip("transformers")
    assert _load("decode").main(["--new-tokens", "6", "--page-size", str(page_size)])

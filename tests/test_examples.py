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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_passes(script: str, *args: str, timeout: float = 120, ranks: int = 2) -> None:
    """examples/<script> under torchrun with ``ranks`` CPU ranks (gloo): exit status 0 and PASS."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(EXAMPLES / script), *args]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "PASS" in result.stdout, output[-4000:]


@pytest.mark.distributed
@pytest.mark.parametrize("attention", ["zigzag", "ring", "ulysses"])
def test_context_parallel_training_step_matches_one_process(attention):
    """examples/train_context_parallel.py under torchrun, 2 CPU ranks (gloo): the sharded
    step's loss and every gradient match the unsharded model's (the example checks, prints
    PASS and exits 0)."""
    pytest.importorskip("flashattn_py.distributed")
    _torchrun_passes("train_context_parallel.py", "--attention", attention)


@pytest.mark.distributed
def test_usp_training_step_matches_one_process():
    """The same example with USP on a 2 x 2 mesh of 4 CPU ranks (Ulysses pairs, a zigzag ring
    across them)."""
    pytest.importorskip("flashattn_py.distributed")
    _torchrun_passes("train_context_parallel.py", "--attention", "usp", "--ulysses-size", "2", ranks=4,
                     timeout=180)


@pytest.mark.distributed
@pytest.mark.parametrize("stride", [1, 2])
def test_hf_context_parallel_training_step_matches_one_process(stride):
    """examples/hf_context_parallel.py under torchrun, 2 CPU ranks (gloo): a transformers
    Llama's sharded step (substitute_hf_flash_attn) matches the whole row with eager attention."""
    pytest.importorskip("transformers")
    _torchrun_passes("hf_context_parallel.py", "--heads-k-stride", str(stride), timeout=180)

"""Property tests: random problems over shapes, dtypes, layouts and every feature.

For each backend available here, a random problem either matches the float64 reference
by the project's rule (docs/design.md) (outputs and gradients) or is refused by selection with a reason,
never silently wrong. Bounded by default; ``HYPOTHESIS_PROFILE=slow`` runs many more.
"""
import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

from flashattn_py import backends, ops  # noqa: E402

from rule import check_attention, random_qkv  # noqa: E402

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@st.composite
def problems(draw, allow_dropout: bool, max_len: int = 70, max_dim: int = 48):
    num_heads_k = draw(st.sampled_from([1, 2]))
    p = dict(
        batch=draw(st.integers(1, 2)),
        seqlen_q=draw(st.integers(1, max_len)),
        seqlen_k=draw(st.integers(1, max_len)),
        num_heads_k=num_heads_k,
        num_heads=num_heads_k * draw(st.sampled_from([1, 2, 3])),
        head_dim=draw(st.integers(1, max_dim)),
        dtype=draw(st.sampled_from(DTYPES)),
        layout=draw(st.sampled_from(["bshd", "bhsd", "strided"])),
        window_left=draw(st.sampled_from([-1, 0, 3, 17])),
        window_right=draw(st.sampled_from([-1, 0, 5])),
        diag_offset_kind=draw(st.sampled_from(["bottom_right", "top_left"])),
        softcap=draw(st.sampled_from([0.0, 2.5])),
        alibi=draw(st.booleans()),
        mask=draw(st.sampled_from([None, "bool", "float", "key_padding"])),
        dropout_p=draw(st.sampled_from([0.0, 0.25])) if allow_dropout else 0.0,
        seed=draw(st.integers(0, 2**16)),
    )
    p["head_dim_v"] = draw(st.sampled_from([p["head_dim"], max(1, p["head_dim"] // 2)]))
    return p


def run_case(backend: str, p: dict):
    q, k, v = random_qkv(p["batch"], p["seqlen_q"], p["seqlen_k"], p["num_heads"], p["num_heads_k"], p["head_dim"],
                         p["head_dim_v"], dtype=p["dtype"], seed=p["seed"], layout=p["layout"])
    gen = torch.Generator().manual_seed(p["seed"])
    shape = (p["batch"], p["num_heads"], p["seqlen_q"], p["seqlen_k"])
    mask = None
    if p["mask"] == "bool":
        mask = torch.rand(shape[2:], generator=gen) > 0.3
    elif p["mask"] == "float":
        mask = torch.randn(1, p["num_heads"], p["seqlen_q"], p["seqlen_k"], generator=gen).to(p["dtype"])
    elif p["mask"] == "key_padding":
        mask = torch.rand(p["batch"], 1, 1, p["seqlen_k"], generator=gen) > 0.2
    slopes = torch.rand(p["num_heads"], generator=gen) * 0.3 if p["alibi"] else None
    diag_offset = p["seqlen_k"] - p["seqlen_q"] if p["diag_offset_kind"] == "bottom_right" else 0
    semantics = dict(scale=0.5, softcap=p["softcap"], alibi_slopes=slopes, window_left=p["window_left"],
                     window_right=p["window_right"], diag_offset=diag_offset)
    problem = backends.Problem("cpu", p["dtype"], has_attn_mask=mask is not None, dropout_p=p["dropout_p"])
    reasons = backends.SUPPORTS[backend](problem)
    expanded = None if mask is None else mask.expand(shape)

    def run(q, k, v):
        torch.manual_seed(p["seed"])
        return ops.attention(q, k, v, attn_mask=expanded, dropout_p=p["dropout_p"], backend=backend, **semantics)[0]

    if reasons:
        with pytest.raises(ValueError, match="can't serve"):
            run(q, k, v)
        return
    keep = None
    if p["dropout_p"] > 0:
        torch.manual_seed(p["seed"])
        keep = ops.dropout_keep_mask(ops.dropout_rng_state(), *shape, p["dropout_p"], backend=backend)
    check_attention(run, q, k, v, seed=p["seed"], attn_bias=mask, dropout_p=p["dropout_p"], dropout_mask=keep,
                    **semantics)


@pytest.mark.skipif(backends.compiled_ops_error() is not None, reason="compiled CPU ops not built")
@given(problems(allow_dropout=True))
def test_cpu_backend_properties(p):
    run_case("cpu", p)


@given(problems(allow_dropout=False, max_len=40))
@settings(max_examples=max(5, settings().max_examples // 3))
def test_reference_backend_properties(p):
    run_case("reference", p)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or backends.triton_error() is not None,
                    reason="triton runs on CPU only under TRITON_INTERPRET=1")
@given(problems(allow_dropout=True, max_len=40, max_dim=32))
@settings(max_examples=max(4, settings().max_examples // 4))
def test_triton_backend_properties(p):
    run_case("triton", p)

"""The argument spec in flashattn_py/ops.py (FWD, BWD) against everything that takes its
values: the custom ops' schemas, the compiled ops' schemas (csrc/ops.cpp), the Triton
launchers and the backends' entries."""
import dataclasses
import inspect

import pytest
import torch

from flashattn_py import backends, ops


def _args(op):
    return {a.name: str(a.type) for a in op._schema.arguments}


def test_custom_op_schemas_follow_the_spec():
    for spec, op in ((ops.FWD, ops.attn_fwd), (ops.BWD, ops.attn_bwd)):
        assert str(op._schema) == f"flashattn::{spec.name}{spec.schema}"
        assert tuple(_args(op)) == spec.names
        assert len(op._schema.returns) == len(spec.returns)
    # The backward gives one gradient per differentiable forward argument.
    assert ops.BWD.returns == ("dq", "dk", "dv", "dbias")


@pytest.mark.skipif(backends.compiled_ops_error() is not None, reason="compiled ops not built")
def test_compiled_op_arguments_are_spec_arguments():
    # The compiled ops take a subset of the spec's values by name, each of the same type.
    for spec, custom, compiled in ((ops.FWD, ops.attn_fwd, torch.ops.flashattn.fwd.default),
                                   (ops.BWD, ops.attn_bwd, torch.ops.flashattn.bwd.default)):
        want = _args(custom)
        for name, type_ in _args(compiled).items():
            assert want.get(name) == type_, f"{compiled}: {name} {type_} is not the spec's ({want.get(name)})"
        assert [spec.names.index(n) for n in _args(compiled)] == sorted(spec.names.index(n) for n in _args(compiled))


# The spec values a Python entry may leave out (it takes the rest by name; a value it
# neither takes nor is allowed to ignore would be silently dropped).
IGNORED = {
    # (cpu_path: the CPU kernels' own)
    "flash_fwd": {"deterministic", "backend", "cpu_path"},
    "flash_bwd": {"backend", "num_splits", "cpu_path"},
    # (the reference reads the true lengths from cu_seqlens: the maxima only size kernel grids)
    "attention_ref": {"rng_state", "deterministic", "backend", "max_seqlen_q", "max_seqlen_k", "num_splits",
                      "cpu_path"},
}


def _check_python_entry(spec, entry):
    params = inspect.signature(entry).parameters
    for name, param in params.items():
        assert name in spec.index or param.default is not inspect.Parameter.empty, f"{entry.__name__}: {name}"
    dropped = set(spec.names) - set(params) - IGNORED[entry.__name__]
    assert not dropped, f"{entry.__name__} takes no parameter for {sorted(dropped)}"


def test_launcher_parameters_are_spec_arguments():
    if backends.triton_error():
        pytest.skip(backends.triton_error())
    from flashattn_py import kernels

    for spec, launcher in ((ops.FWD, kernels.flash_fwd), (ops.BWD, kernels.flash_bwd)):
        _check_python_entry(spec, launcher)


def test_reference_entry_takes_the_spec_values():
    _check_python_entry(ops.FWD, backends.BACKENDS["reference"].forward())


@pytest.mark.skipif(backends.compiled_ops_error() is not None, reason="compiled ops not built")
def test_inference_entry_order_is_the_compiled_forwards():
    # ops.attention calls flashattn::fwd_inference with the compiled forward's leading values
    # in this order (then heads_first), for dense calls only: the packed-sequence values that
    # follow keep their defaults there.
    assert tuple(_args(torch.ops.flashattn.fwd.default))[:12] == (
        "q", "k", "v", "alibi_slopes", "attn_bias", "scale", "softcap", "window_left", "window_right", "diag_offset",
        "dropout_p", "rng_state")
    assert tuple(_args(torch.ops.flashattn.fwd.default))[12:] == (
        "cu_seqlens_q", "cu_seqlens_k", "seqused_k", "block_table", "max_seqlen_q", "max_seqlen_k", "bottom_right",
        "kv_batch_idx", "leftpad_k", "num_splits", "cpu_path")
    # and the inference op takes those leading values, then heads_first
    assert tuple(_args(torch.ops.flashattn.fwd_inference.default)) == (
        tuple(_args(torch.ops.flashattn.fwd.default))[:12] + ("heads_first",))


def test_every_fused_backend_has_its_entries():
    for name, backend in backends.BACKENDS.items():
        assert backend.forward is not None, name
        assert (backend.backward is not None) == backend.fused, name


def test_fwd_args_fills_the_spec_defaults():
    q = torch.zeros(1, 2, 1, 4)
    args = ops.fwd_args(q, q, q, scale=0.5, backend="cpu")
    assert args == (q, q, q, None, None, 0.5, 0.0, -1, -1, 0, 0.0, None, None, None, None, None, 0, 0, False, None,
                    None, 0, 0, False, "cpu")
    assert ops.FWD.view(*args).window_left == -1
    with pytest.raises(TypeError):
        ops.fwd_args(q, q, q, backend="cpu")  # scale has no default


@pytest.mark.parametrize("field, flag, reason", [("cu_seqlens", "varlen", "variable length"),
                                                 ("block_table", "paged", "paged")])
def test_backends_say_whether_they_serve_varlen_and_paged(field, flag, reason):
    problem = backends.Problem("cpu", torch.float16, **{field: torch.zeros(2, dtype=torch.int32)})
    for backend in backends.BACKENDS.values():  # every backend serves both
        assert not backend.feature_reasons(problem), backend.name
        without = dataclasses.replace(backend, **{flag: False})
        assert any(reason in r for r in without.feature_reasons(problem))

"""The CPU kernels are built once per instruction set and chosen at run time
(csrc/cpu/isa_select.cpp): FLASHATTN_CPU_ISA forces one, every one this CPU runs computes
attention by the rule, and a bad choice is a clear error."""
import pytest
import torch

import flashattn_py
from flashattn_py import _C
from rule import check_attention, random_qkv

ISAS = ("baseline", "avx2", "avx512", "avx512bf16")
# the paths each instruction set's kernels have (CPU_KERNELS after the ISA's name)
FEATURES = {"baseline": "blas", "avx2": "avx2-tiles", "avx512": "avx2-tiles avx512-exp",
            "avx512bf16": "avx2-tiles avx512-exp avx512bf16-dot"}


def _force(cpu_switch, isa: str) -> bool:
    """Select ``isa``'s kernels; False when this CPU does not run them."""
    try:
        cpu_switch("FLASHATTN_CPU_ISA", isa)
    except ValueError as e:
        assert "does not run" in str(e), str(e)
        return False
    return True


def test_the_default_is_the_best_this_cpu_runs():
    assert _C.CPU_ISA in ISAS
    assert _C.CPU_KERNELS == f"{_C.CPU_ISA}: {FEATURES[_C.CPU_ISA]}"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_each_instruction_set_follows_the_rule(cpu_switch, isa, dtype):
    if not _force(cpu_switch, isa):
        pytest.skip(f"this CPU does not run the {isa} kernels")
    assert _C.CPU_ISA == isa and _C.CPU_KERNELS == f"{isa}: {FEATURES[isa]}"
    # a tile-sized problem (every path's block products) and a decode-sized one (the row path)
    for seqlen_q, seqlen_k, seed in ((97, 130, 1), (1, 77, 2)):
        q, k, v = random_qkv(2, seqlen_q, seqlen_k, 4, 2, 40, dtype=dtype, seed=seed)
        check_attention(lambda a, b, c: flashattn_py.flash_attn_func(a, b, c, causal=True), q, k, v, seed=seed,
                        scale=40 ** -0.5, window_right=0, diag_offset=seqlen_k - seqlen_q)


def test_instruction_sets_run_different_kernels(cpu_switch):
    """Forcing a set changes the code that runs: the baseline (BLAS products, scalar exp) and
    the AVX2 tiles round differently."""
    q, k, v = (t.detach() for t in random_qkv(1, 64, 64, 2, 2, 32, seed=3))
    outs = []
    for isa in ("baseline", "avx2"):
        if not _force(cpu_switch, isa):
            pytest.skip(f"this CPU does not run the {isa} kernels")
        outs.append(flashattn_py.flash_attn_func(q, k, v))
    assert not torch.equal(outs[0], outs[1])
    torch.testing.assert_close(outs[0], outs[1])


@pytest.mark.parametrize("value", ["sse2", "AVX2", "avx512fp16"])
def test_an_unknown_instruction_set_is_a_clear_error(cpu_switch, value):
    with pytest.raises(ValueError, match="FLASHATTN_CPU_ISA: expected one of baseline, avx2, avx512, avx512bf16"):
        cpu_switch("FLASHATTN_CPU_ISA", value)

"""Meta tensors (shape inference, model init), a default device other than the inputs', and
tensor subclasses torch's SDPA serves (DTensor under patch_sdpa)."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import flashattn_py
from flashattn_py import backends

pytestmark = pytest.mark.skipif(backends.compiled_ops_error() is not None, reason="compiled CPU ops not built")


def _meta(*shape, dtype=torch.float32):
    return torch.empty(shape, device="meta", dtype=dtype)


def test_meta_tensors_give_meta_outputs_on_every_function():
    # (through the compiled ops' fakes, as torch's own ops; they went to the reference,
    # which reads offsets and lengths: "Tensor.item() cannot be called on meta tensors")
    q, k, v = _meta(2, 5, 4, 16), _meta(2, 7, 2, 16), _meta(2, 7, 2, 16)
    packed_q, packed_kv = _meta(9, 4, 16), _meta(11, 2, 16)
    cu_q = torch.tensor([0, 4, 9], dtype=torch.int32, device="meta")
    cu_k = torch.tensor([0, 5, 11], dtype=torch.int32, device="meta")
    pages, table = _meta(6, 4, 2, 16), torch.zeros(2, 3, dtype=torch.int32, device="meta")
    lengths = torch.tensor([3, 5], dtype=torch.int32, device="meta")
    calls = {
        "flash_attn_func": (lambda: flashattn_py.flash_attn_func(q, k, v, causal=True, dropout_p=0.1), (2, 5, 4, 16)),
        "varlen": (lambda: flashattn_py.flash_attn_varlen_func(packed_q, packed_kv, packed_kv, cu_q, cu_k, 5, 6,
                                                               causal=True), (9, 4, 16)),
        "varlen paged": (lambda: flashattn_py.flash_attn_varlen_func(packed_q, pages, pages, cu_q, cu_k, 5, 6,
                                                                     block_table=table), (9, 4, 16)),
        "kvcache": (lambda: flashattn_py.flash_attn_with_kvcache(q[:, :1], k, v, cache_seqlens=lengths), (2, 1, 4, 16)),
        "kvcache new keys": (lambda: flashattn_py.flash_attn_with_kvcache(
            q[:, :1], k, v, k[:, :1].clone(), v[:, :1].clone(), cache_seqlens=lengths, causal=True), (2, 1, 4, 16)),
        "sdpa": (lambda: flashattn_py.scaled_dot_product_attention(
            q.transpose(1, 2), q.transpose(1, 2), q.transpose(1, 2), is_causal=True), (2, 4, 5, 16)),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no "using the reference" fallback warning either)
        for name, (call, shape) in calls.items():
            out = call()
            assert out.is_meta and out.shape == shape and out.dtype == torch.float32, name
        for dtype in (torch.float64, torch.bfloat16):  # (lse: float64 for float64, else float32)
            out, lse = flashattn_py.flash_attn_with_kvcache(q[:, :1].to(dtype), k.to(dtype), v.to(dtype),
                                                            cache_seqlens=lengths, return_softmax_lse=True)
            assert out.dtype == dtype and lse.shape == (2, 4, 1)
            assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


def test_dropout_under_another_default_device_draws_on_the_cpu():
    # The dropout state followed the default device: under torch.device("meta") a CPU call
    # then ran the op's fake and returned uninitialised memory (NaN or zeros) as its output.
    q, k, v = (torch.randn(1, 6, 2, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    torch.manual_seed(1)
    expected = flashattn_py.flash_attn_func(q, k, v, dropout_p=0.3)
    torch.manual_seed(1)
    with torch.device("meta"):
        out = flashattn_py.flash_attn_func(q, k, v, dropout_p=0.3)
    assert out.device.type == "cpu" and torch.equal(out, expected)


def test_patched_sdpa_leaves_dtensors_to_torch():
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed not built")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    if dist.is_initialized():
        pytest.skip("a process group is already set up")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        q = torch.randn(2, 4, 6, 8)
        dq = DTensor.from_local(q, mesh, [Shard(1)])  # (heads: a layout torch's rules take)
        expected = F.scaled_dot_product_attention(q, q, q)
        with flashattn_py.patch_sdpa():
            out = F.scaled_dot_product_attention(dq, dq, dq)
        assert isinstance(out, DTensor)
        torch.testing.assert_close(out.to_local(), expected)
    finally:
        dist.destroy_process_group()

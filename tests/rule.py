"""The correctness rule of docs/design.md, shared by every backend's tests.

Truth is ``reference.attention_ref`` in float64 on the same inputs. A kernel passes when
``max|out - ref| <= factor * max|naive_lowp - ref| + 1e-6`` where naive_lowp is the same
formula run in the input dtype (factor 2 for outputs, 3 for gradients).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from flashattn_py.reference import attention_ref

OUT_FACTOR = 2.0
GRAD_FACTOR = 3.0


def random_qkv(
    batch: int,
    seqlen_q: int,
    seqlen_k: int,
    num_heads: int,
    num_heads_k: int,
    head_dim: int,
    head_dim_v: int | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
    layout: str = "bshd",
):
    """Fresh random q (B, Sq, H, D), k, v (B, Sk, Hk, D/Dv) that require grad.

    layout "bhsd" allocates (B, H, S, D) memory and returns the (B, S, H, D) view of it
    (the SDPA layout seen through flash-attn's); "strided" returns views whose row stride
    is padded, so kernels must honour strides.
    """
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    gen = torch.Generator().manual_seed(seed)

    def make(s, h, d):
        def randn(*shape):
            return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

        if layout == "bshd":
            x = randn(batch, s, h, d)
        elif layout == "bhsd":
            x = randn(batch, h, s, d).transpose(1, 2)
        elif layout == "strided":
            x = randn(batch, s, h, d + 3)[..., :d]
        else:
            raise ValueError(layout)
        return x.requires_grad_()

    return make(seqlen_q, num_heads, head_dim), make(seqlen_k, num_heads_k, head_dim), make(seqlen_k, num_heads_k, head_dim_v)


def _leaf64(t: Tensor) -> Tensor:
    return t.detach().double().requires_grad_()


def _leaf(t: Tensor) -> Tensor:
    return t.detach().clone().requires_grad_()


def assert_rule(
    name: str, got: Tensor, ref: Tensor, naive: Tensor, factor: float, seed: int | None = None, atol: float = 1e-6,
    atol_if_exact: float | None = None,
):
    """Assert ``max|got - ref| <= factor * max|naive - ref| + atol`` (ref in float64);
    ``atol_if_exact`` in place of ``atol`` where the naive error is exactly 0."""
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    got64, ref64, naive64 = got.double(), ref.double(), naive.double()
    assert not torch.isnan(got64).any(), f"{name}: NaN in result (seed {seed})"
    finite = torch.isfinite(ref64)
    assert torch.equal(torch.isfinite(got64), finite), f"{name}: inf pattern differs from reference (seed {seed})"
    err = (got64 - ref64)[finite].abs().max().item() if finite.any() else 0.0
    base = (naive64 - ref64)[finite].abs().max().item() if finite.any() else 0.0
    bound = factor * base + (atol_if_exact if atol_if_exact is not None and base == 0 else atol)
    assert err <= bound, f"{name}: max error {err:.3e} > {factor} * naive error {base:.3e} + {atol:.1e} (seed {seed})"


def check_attention(
    run: Callable[[Tensor, Tensor, Tensor], Tensor],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    grad: bool = True,
    seed: int | None = None,
    **ref_kwargs,
):
    """Hold ``run(q, k, v) -> out (B, Sq, H, Dv)`` to the reference by the project's rule (docs/design.md).

    ``ref_kwargs`` are ``attention_ref``'s semantic arguments (scale, window_left, ...).
    With ``grad`` the gradients of q, k, v for a random upstream gradient are checked too.
    """
    q1, k1, v1 = _leaf(q), _leaf(k), _leaf(v)
    out = run(q1, k1, v1)
    q64, k64, v64 = _leaf64(q), _leaf64(k), _leaf64(v)
    ref, _ = attention_ref(q64, k64, v64, **ref_kwargs)
    ql, kl, vl = _leaf(q), _leaf(k), _leaf(v)
    naive, _ = attention_ref(ql, kl, vl, **ref_kwargs)
    assert out.dtype == q.dtype, f"out dtype {out.dtype} != input dtype {q.dtype}"
    assert_rule("out", out, ref, naive, OUT_FACTOR, seed)
    if not grad:
        return
    gen = torch.Generator().manual_seed(1234 if seed is None else seed + 1)
    dout = torch.randn(ref.shape, generator=gen, dtype=torch.float64).to(q.device)
    out.backward(dout.to(out.dtype))
    ref.backward(dout)
    naive.backward(dout.to(naive.dtype))
    # The 1e-6 slack is for unit-scale values: the three gradients of one backward share
    # one scale, so a gradient that is exactly 0 in exact math (dq when each row sees one
    # key, where the naive autograd path happens to be exact) is held to the rounding of its
    # siblings' magnitude, not to an absolute 1e-6.
    grad_scale = max([t.grad.abs().max().item() for t in (q64, k64, v64) if t.grad.numel()] + [0.0])
    atol = 1e-6 * max(1.0, grad_scale)
    if q.dtype != torch.float64:
        # Every flash backward computes delta = rowsum(dO * O) from O stored in the input
        # dtype, and dP = dO V^T in another order: half an ulp of O moves delta by
        # eps/2 * sum|dO * O|, which reaches dq and dk through P * k * scale. That is the
        # floor when the naive error is exactly 0 (one visible key, where dS is 0 in exact
        # math: float32 too once dropout's 1/(1-p) rounds O).
        scale = ref_kwargs.get("scale") or q.shape[-1] ** -0.5
        delta_term = (dout.abs() * ref.detach().abs()).sum(-1).max().item() if ref.numel() else 0.0
        qk = max([t.detach().abs().max().item() for t in (q, k) if t.numel()] + [0.0])
        atol = max(atol, torch.finfo(q.dtype).eps * delta_term * qk * scale)
    # (dk sums that floor over the query heads of a KV head: where the naive dk is exact, the
    # group's heads each add theirs)
    group = q.shape[-2] // k.shape[-2] if k.shape[-2] else 1
    for name, got, r, n in (("dq", q1, q64, ql), ("dk", k1, k64, kl), ("dv", v1, v64, vl)):
        assert got.grad is not None, f"{name}: no gradient"
        assert_rule(name, got.grad, r.grad, n.grad, GRAD_FACTOR, seed, atol,
                    atol * group if name == "dk" and q.dtype != torch.float64 else None)

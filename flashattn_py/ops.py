"""The attention custom ops and their autograd.

``flashattn::attn_fwd`` / ``flashattn::attn_bwd`` are what torch.compile and autograd see:
one op pair for every fused backend, defined with ``torch.library.define`` + ``impl``, with
fake impls and ``register_autograd``. Their implementations call the compiled ops
``torch.ops.flashattn.fwd`` / ``bwd`` (schemas in csrc/ops.cpp, CPU and CUDA kernels by
dispatch key) or the Triton launchers in ``flashattn_py.kernels``. The forward returns
``(out, lse)``; the backward recomputes P from lse, nothing N x N is saved. lse is not
differentiable (its gradient is ignored).

Layout everywhere: q (B, Sq, H, D), k (B, Sk, Hk, D), v (B, Sk, Hk, Dv), any strides with a
contiguous last dimension; out (B, Sq, H, Dv); lse (B, H, Sq).
"""
from __future__ import annotations

import functools
import sys
from typing import Callable, Optional

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import backends
from .reference import attention_ref


def _lse_dtype(q: Tensor, backend: str) -> torch.dtype:
    # The CPU kernel accumulates float64 inputs in float64, lse included.
    return torch.float64 if (q.dtype == torch.float64 and backend == "cpu") else torch.float32


def _outside_dynamo(fn: Callable) -> Callable:
    """Run ``fn`` with Dynamo disabled, importing Dynamo only if something else already did.

    ``torch.library.custom_op`` wraps kernels in ``torch._disable_dynamo``, which imports
    torch._dynamo on the first call: about 2.5 s and 150 MB of resident memory for every
    user's first attention call. Dynamo can only be tracing once it is imported, so the
    plain call is safe until then.
    """
    disabled: list[Callable] = []

    @functools.wraps(fn)
    def inner(*args):
        if "torch._dynamo" not in sys.modules:
            return fn(*args)
        if not disabled:
            disabled.append(torch._dynamo.disable(fn))
        return disabled[0](*args)

    return inner


torch.library.define(
    "flashattn::attn_fwd",
    "(Tensor q, Tensor k, Tensor v, Tensor? alibi_slopes, Tensor? attn_bias, float scale, float softcap, "
    "int window_left, int window_right, int diag_offset, float dropout_p, Tensor? rng_state, bool deterministic, "
    "str backend) -> (Tensor, Tensor)",
)
torch.library.define(
    "flashattn::attn_bwd",
    "(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? alibi_slopes, Tensor? attn_bias, "
    "float scale, float softcap, int window_left, int window_right, int diag_offset, float dropout_p, "
    "Tensor? rng_state, bool deterministic, bool bias_requires_grad, str backend) -> (Tensor, Tensor, Tensor, Tensor)",
)


@_outside_dynamo
def _attn_fwd_impl(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    alibi_slopes: Optional[Tensor],
    attn_bias: Optional[Tensor],
    scale: float,
    softcap: float,
    window_left: int,
    window_right: int,
    diag_offset: int,
    dropout_p: float,
    rng_state: Optional[Tensor],
    deterministic: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Fused forward on ``backend``; ``deterministic`` is kept for the backward.

    attn_bias: None or (B, H, Sq, Sk) (broadcast dims with stride 0), bool or q's dtype.
    rng_state: int64 [seed, offset] on the CPU when dropout_p > 0.
    """
    if backend == "triton":
        from . import kernels

        return kernels.flash_fwd(q, k, v, alibi_slopes, scale, softcap, window_left, window_right, diag_offset,
                                 attn_bias, dropout_p, rng_state)
    return torch.ops.flashattn.fwd.default(
        q, k, v, alibi_slopes, attn_bias, scale, softcap, window_left, window_right, diag_offset, dropout_p, rng_state
    )


torch.library.impl("flashattn::attn_fwd", "CompositeExplicitAutograd", _attn_fwd_impl)


@torch.library.register_fake("flashattn::attn_fwd")
def _attn_fwd_fake(q, k, v, alibi_slopes, attn_bias, scale, softcap, window_left, window_right, diag_offset,
                   dropout_p, rng_state, deterministic, backend):
    batch, seqlen_q, num_heads, _ = q.shape
    out = q.new_empty((batch, seqlen_q, num_heads, v.shape[-1]))
    lse = q.new_empty((batch, num_heads, seqlen_q), dtype=_lse_dtype(q, backend))
    return out, lse


@_outside_dynamo
def _attn_bwd_impl(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    alibi_slopes: Optional[Tensor],
    attn_bias: Optional[Tensor],
    scale: float,
    softcap: float,
    window_left: int,
    window_right: int,
    diag_offset: int,
    dropout_p: float,
    rng_state: Optional[Tensor],
    deterministic: bool,
    bias_requires_grad: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv, dbias) of attn_fwd's out; dbias is float32 (B, H, Sq, Sk)
    when ``bias_requires_grad``, else empty."""
    if backend == "triton":
        from . import kernels

        dq, dk, dv, dbias = kernels.flash_bwd(
            dout, q, k, v, out, lse, alibi_slopes, scale, softcap, window_left, window_right, diag_offset,
            deterministic, attn_bias, dropout_p, rng_state, bias_requires_grad,
        )
        return dq, dk, dv, dbias if dbias is not None else q.new_empty((0,), dtype=torch.float32)
    return torch.ops.flashattn.bwd.default(
        dout, q, k, v, out, lse, alibi_slopes, attn_bias, scale, softcap, window_left, window_right, diag_offset,
        dropout_p, rng_state, deterministic, bias_requires_grad,
    )


torch.library.impl("flashattn::attn_bwd", "CompositeExplicitAutograd", _attn_bwd_impl)


def _dbias_fake(q, k, bias_requires_grad):
    shape = (q.shape[0], q.shape[2], q.shape[1], k.shape[1]) if bias_requires_grad else (0,)
    return q.new_empty(shape, dtype=torch.float32)


def _grads_fake(q, k, v, backend: str):
    """dq, dk, dv as ``backend``'s backward allocates them. The fakes must give the real
    strides, not just the shapes: inductor asserts every output's strides against the
    fake's, and a transposed (SDPA layout) or packed-qkv input is the normal case. The CPU
    kernel writes grads in the inputs' layout (empty_like); the CUDA and Triton backwards
    allocate contiguous (B, S, H, D) grads (tests/test_fake_strides.py holds each
    backend to this)."""
    if backend == "cpu":
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@torch.library.register_fake("flashattn::attn_bwd")
def _attn_bwd_fake(dout, q, k, v, out, lse, alibi_slopes, attn_bias, scale, softcap, window_left, window_right,
                   diag_offset, dropout_p, rng_state, deterministic, bias_requires_grad, backend):
    return (*_grads_fake(q, k, v, backend), _dbias_fake(q, k, bias_requires_grad))


def _setup_context(ctx, inputs, output):
    (q, k, v, alibi_slopes, attn_bias, scale, softcap, window_left, window_right, diag_offset, dropout_p, rng_state,
     deterministic, backend) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, alibi_slopes, attn_bias, rng_state)
    bias_requires_grad = attn_bias is not None and attn_bias.is_floating_point() and attn_bias.requires_grad
    ctx.args = (scale, softcap, window_left, window_right, diag_offset, dropout_p, deterministic, bias_requires_grad,
                backend)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, alibi_slopes, attn_bias, rng_state = ctx.saved_tensors
    scale, softcap, window_left, window_right, diag_offset, dropout_p, deterministic, bias_requires_grad, backend = (
        ctx.args
    )
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    dq, dk, dv, dbias = attn_bwd(
        dout, q, k, v, out, lse, alibi_slopes, attn_bias, scale, softcap, window_left, window_right, diag_offset,
        dropout_p, rng_state, deterministic, bias_requires_grad, backend,
    )
    dbias = dbias.to(attn_bias.dtype) if bias_requires_grad else None
    return dq, dk, dv, None, dbias, None, None, None, None, None, None, None, None, None


attn_fwd = torch.ops.flashattn.attn_fwd.default
attn_bwd = torch.ops.flashattn.attn_bwd.default
torch.library.register_autograd("flashattn::attn_fwd", _backward, setup_context=_setup_context)


def _register_compiled_op_fakes() -> None:
    """Fake impls for the C++ ops themselves, so they too trace and pass opcheck."""
    if backends.compiled_ops_error():
        return

    @torch.library.register_fake("flashattn::fwd")
    def _fwd_fake(q, k, v, alibi_slopes, attn_bias, scale, softcap, window_left, window_right, diag_offset, dropout_p,
                  rng_state):
        return _attn_fwd_fake(q, k, v, alibi_slopes, attn_bias, scale, softcap, window_left, window_right,
                              diag_offset, dropout_p, rng_state, False, "cpu" if q.device.type == "cpu" else "cuda")

    @torch.library.register_fake("flashattn::bwd")
    def _bwd_fake(dout, q, k, v, out, lse, alibi_slopes, attn_bias, scale, softcap, window_left, window_right,
                  diag_offset, dropout_p, rng_state, deterministic, bias_requires_grad):
        backend = "cpu" if q.device.type == "cpu" else "cuda"
        return (*_grads_fake(q, k, v, backend), _dbias_fake(q, k, bias_requires_grad))

    @torch.library.register_fake("flashattn::dropout_mask")
    def _dropout_mask_fake(rng_state, batch, num_heads, seqlen_q, seqlen_k, dropout_p):
        return rng_state.new_empty((batch, num_heads, seqlen_q, seqlen_k), dtype=torch.bool)


_register_compiled_op_fakes()

# The CPU forward's entry for eager inference calls (csrc/ops.cpp), when the extension loaded.
_cpu_fwd_inference: Optional[Callable] = None
if backends.compiled_ops_error() is None:
    from ._C import fwd_inference as _cpu_fwd_inference


def dropout_rng_state(device: torch.device | str = "cpu") -> Tensor:
    """The [seed, offset] (int64) one dropout call draws from torch's generator of ``device``.

    Seeding torch (``torch.manual_seed``) before a call therefore fixes its dropout mask.
    On a GPU the state is drawn on the GPU and the kernels read it from device memory when
    they run: under CUDA-graph capture the draw is part of the graph, which torch replays
    with a fresh Philox offset each time, so every replay gets a new mask (a state drawn
    on the host would be baked into the captured launches: one mask for every replay).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.randint(0, 2**62, (2,), dtype=torch.int64, device=device)
    return torch.randint(0, 2**62, (2,), dtype=torch.int64)


def dropout_keep_mask(rng_state: Tensor, batch: int, num_heads: int, seqlen_q: int, seqlen_k: int,
                      dropout_p: float, backend: str = "cpu", device: torch.device | str = "cpu") -> Tensor:
    """Testing hook: the bool keep-mask (B, H, Sq, Sk) ``backend`` draws for ``rng_state``.

    The cpu and cuda kernels share one Philox stream layout (csrc/cpu/dropout.h,
    csrc/cuda/philox.cuh); triton uses its own (kernels/common.py).
    """
    if backend == "triton":
        from . import kernels

        return kernels.dropout_mask(rng_state, batch, num_heads, seqlen_q, seqlen_k, dropout_p, device)
    # (a GPU rng_state from dropout_rng_state: the CPU impl draws the CUDA kernels' masks)
    keep = torch.ops.flashattn.dropout_mask(rng_state.cpu(), batch, num_heads, seqlen_q, seqlen_k, dropout_p)
    return keep.to(device)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float,
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    attn_mask: Optional[Tensor] = None,
    window_left: int = -1,
    window_right: int = -1,
    diag_offset: int = 0,
    dropout_p: float = 0.0,
    deterministic: bool = False,
    backend: str = "auto",
    heads_first: bool = False,
) -> tuple[Tensor, Tensor]:
    """Attention on validated (B, S, H, D) inputs, or (B, H, S, D) ones with
    ``heads_first``, on the selected backend: ``(out, lse)``, out in the inputs' layout."""
    forward_ad = _has_tangents(q, k, v, alibi_slopes, attn_mask)
    backward = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                            or (attn_mask is not None and attn_mask.requires_grad))
    # (the head dim matters only to the cuda backend's shared-memory check; computed for
    # CUDA tensors only, so torch.jit.trace on CPU sees no shape arithmetic here)
    head_dim = max(q.shape[-1], v.shape[-1]) if q.device.type == "cuda" else 0
    name = backends.select(
        backends.Problem(q.device.type, q.dtype, attn_mask is not None, dropout_p, forward_ad, q.device.index,
                         head_dim, backward, deterministic),
        backend,
    )
    if name != "reference":
        rng_state = dropout_rng_state(q.device) if dropout_p > 0 else None
        plain = _plain_inference(q, k, v, attn_mask)
        if name == "cpu" and plain and _outside_dispatcher_ok():
            # The kernel straight from Python, in either layout, any strides
            # (csrc/ops.cpp fwd_inference): the op's autograd layer and torch.ops' boxed call
            # would cost more than a decode-sized kernel.
            return _cpu_fwd_inference(q, k, v, alibi_slopes, attn_mask, scale, softcap, window_left, window_right,
                                      diag_offset, dropout_p, rng_state, heads_first)
        if q.stride(-1) != 1:
            q = q.contiguous()
        if k.stride(-1) != 1:
            k = k.contiguous()
        if v.stride(-1) != 1:
            v = v.contiguous()
        if alibi_slopes is not None:
            alibi_slopes = alibi_slopes.contiguous()
    if heads_first:
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if name == "reference":
        out, lse = attention_ref(
            q, k, v, scale=scale, softcap=softcap, alibi_slopes=alibi_slopes, attn_bias=attn_mask,
            window_left=window_left, window_right=window_right, diag_offset=diag_offset, dropout_p=dropout_p,
        )
    else:
        args = (q, k, v, alibi_slopes, attn_mask, scale, softcap, window_left, window_right, diag_offset,
                dropout_p, rng_state, deterministic, name)
        # Inference on the other fused backends skips the op's autograd layer (about 50 us a call).
        out, lse = _attn_fwd_impl(*args) if plain else attn_fwd(*args)
    return (out.transpose(1, 2), lse) if heads_first else (out, lse)


def _has_tangents(*tensors: Optional[Tensor]) -> bool:
    """True inside ``torch.autograd.forward_ad.dual_level()`` when an input is a dual tensor:
    the fused kernels have no forward-mode derivative (the op would drop the tangent), the
    reference's plain torch ops do. (The level is checked first: outside a dual level this
    costs one attribute read.)"""
    if fwAD._current_level < 0:
        return False
    return any(t is not None and fwAD.unpack_dual(t).tangent is not None for t in tensors)


def _outside_dispatcher_ok() -> bool:
    """Whether a plain inference call may skip torch.ops and the dispatcher altogether: not
    under torch.func transforms (vmap's tensors are plain Tensors without storage, which
    only the dispatcher's fallbacks handle), not while torch.jit traces (it records
    dispatcher calls) and not under a TorchFunctionMode (torch.ops calls reach it)."""
    return (not torch._C._are_functorch_transforms_active() and torch._C._get_tracing_state() is None
            and not torch._C._is_torch_function_mode_enabled())


def _plain_inference(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor]) -> bool:
    """True for eager calls on plain tensors that need no gradient and no tracing: the ones
    that may skip the op. Fake / functional tensors, dispatch modes (make_fx, FakeTensorMode)
    and torch.compile must see ``flashattn::attn_fwd`` itself (its fake impl, one graph node).
    (Spelled out rather than looped over the tensors: this runs on every call.)"""
    if type(q) is not Tensor or type(k) is not Tensor or type(v) is not Tensor:
        return False
    if attn_mask is not None and type(attn_mask) is not Tensor:
        return False
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                    or (attn_mask is not None and attn_mask.requires_grad)):
        return False
    if torch.compiler.is_compiling():
        return False
    return _get_current_dispatch_mode() is None

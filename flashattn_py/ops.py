"""The attention custom ops and their autograd.

``flashattn::attn_fwd`` / ``flashattn::attn_bwd`` are what torch.compile and autograd see:
one op pair for every fused backend, defined with ``torch.library.define`` + ``impl``, with
fake impls and an Autograd kernel, all following from one argument spec (``FWD`` /
``BWD``). Their implementations call the selected backend's entries (backends.py): the
compiled ops ``torch.ops.flashattn.fwd`` / ``bwd`` (schemas in csrc/ops.cpp, CPU and CUDA
kernels by dispatch key) or the Triton launchers in ``flashattn_py.kernels``, each with
the spec's values it names. The forward returns
``(out, lse)``; the backward recomputes P from lse, nothing N x N is saved. lse is not
differentiable (its gradient is ignored).

Layout everywhere: q (B, Sq, H, D), k (B, Sk, Hk, D), v (B, Sk, Hk, Dv), any strides with a
contiguous last dimension; out (B, Sq, H, Dv); lse (B, H, Sq).
"""
from __future__ import annotations

import collections
import contextlib
import functools
import inspect
import operator
import sys
from typing import Any, Callable, NamedTuple, Optional

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import backends
from .errors import ArgumentError


class Arg(NamedTuple):
    """One argument of the attention ops: its name, its torch schema type, its default
    (``REQUIRED``: none) and, for a differentiable input, the name of its gradient among
    the backward's outputs."""

    name: str
    type: str
    default: object = None
    grad: Optional[str] = None


REQUIRED = object()


class Spec:
    """An op's arguments and outputs in order. Everything on the Python side follows from
    it: the schema string, named access to a call's values (``view``), a call's values
    from keywords with the defaults (``pack``), and the calls into each backend's entries
    (``_bind``: an entry takes the spec's values it names). Adding an argument means adding
    it here, to the compiled ops' list (csrc/params_from_tensors.h FLASHATTN_PROBLEM_ARGS,
    from which their schemas follow) and to the kernels that use it."""

    def __init__(self, name: str, args: tuple[Arg, ...], returns: tuple[str, ...]):
        self.name = name
        self.args = args
        self.names = tuple(a.name for a in args)
        self.returns = returns
        self.index = {n: i for i, n in enumerate(self.names)}
        self.view = collections.namedtuple(f"{name}_args", self.names)
        self.schema = "({}) -> ({})".format(", ".join(f"{a.type} {a.name}" for a in args),
                                            ", ".join("Tensor" for _ in returns))
        # pack(q, k, v, *, name=default, ...) -> the values in order: the leading required
        # tensors positional, the rest by keyword; generated like namedtuple's __new__ (a
        # plain function: it runs on every call).
        lead = next(i for i, a in enumerate(args) if a.type != "Tensor" or a.default is not REQUIRED)
        params = ", ".join(a.name if a.default is REQUIRED else f"{a.name}=_d[{a.name!r}]" for a in args[lead:])
        source = f"def pack({', '.join(self.names[:lead])}, *, {params}):\n    return ({', '.join(self.names)},)\n"
        namespace: dict = {"_d": {a.name: a.default for a in args}}
        exec(source, namespace)  # noqa: S102  (source built from the spec's identifiers only)
        self.pack = namespace["pack"]

    def getter(self, names) -> Callable[[tuple], tuple]:
        """A function taking a tuple of this spec's values to the values of ``names``."""
        indices = [self.index[n] for n in names]
        if len(indices) == 1:
            return lambda values: (values[indices[0]],)
        return operator.itemgetter(*indices)


# The arguments both ops take after their leading tensors, as the forward's caller gives them.
_OPTIONS = (
    Arg("alibi_slopes", "Tensor?"),  # None or float32 (H,) / (B, H)
    # None or (B, H, Sq, Sk) (broadcast dims with stride 0), bool, q's dtype or float32
    Arg("attn_bias", "Tensor?", grad="dbias"),
    Arg("scale", "float", REQUIRED),
    Arg("softcap", "float", 0.0),
    Arg("window_left", "int", -1),
    Arg("window_right", "int", -1),
    Arg("diag_offset", "SymInt", 0),  # (Sk - Sq in a bottom-right call: symbolic under torch.compile)
    Arg("dropout_p", "float", 0.0),
    Arg("rng_state", "Tensor?"),  # int64 [seed, offset] when dropout_p > 0
    # Packed sequences and paged K/V (docs/design.md, "Packed sequences and paged K/V"):
    # int32 (B + 1,) offsets of each sequence's rows in q (1, total_q, H, D) / k, v (1,
    # total_k, Hk, D); keys used per sequence (B,); pages (B, max_blocks) of k, v
    # (num_pages, page_size, Hk, D); the longest sequences (grids are sized by them);
    # whether each sequence's diagonal is aligned bottom-right (+ its Sk - Sq).
    Arg("cu_seqlens_q", "Tensor?"),
    Arg("cu_seqlens_k", "Tensor?"),
    Arg("seqused_k", "Tensor?"),
    Arg("block_table", "Tensor?"),
    Arg("max_seqlen_q", "SymInt", 0),  # (SymInt: torch.compile keeps them symbolic, no recompiles)
    Arg("max_seqlen_k", "SymInt", 0),
    Arg("bottom_right", "bool", False),
    # KV caches (flash_attn_with_kvcache; forward only): int32 (B,) k / v batch row of each
    # sequence; int32 (B,) key slots before each sequence's keys; key splits per query block
    # (0: the kernel's heuristic).
    Arg("kv_batch_idx", "Tensor?"),
    Arg("leftpad_k", "Tensor?"),
    Arg("num_splits", "int", 0),
    # The CPU kernels' path (csrc/cpu/flash_cpu.h; 0: chosen per call from the problem): a
    # call with gradients gets it before its forward, and its backward runs the same.
    Arg("cpu_path", "int", 0),
    Arg("deterministic", "bool", False),  # the forward keeps it for the backward
)
_BACKEND = Arg("backend", "str", REQUIRED)  # a name in backends.BACKENDS (a fused one)
FWD = Spec(
    "attn_fwd",
    (Arg("q", "Tensor", REQUIRED, "dq"), Arg("k", "Tensor", REQUIRED, "dk"), Arg("v", "Tensor", REQUIRED, "dv"),
     *_OPTIONS, _BACKEND),
    returns=("out", "lse"),
)
BWD = Spec(
    "attn_bwd",
    (Arg("dout", "Tensor", REQUIRED), *FWD.args[:3], Arg("out", "Tensor", REQUIRED), Arg("lse", "Tensor", REQUIRED),
     *_OPTIONS, Arg("bias_requires_grad", "bool", False), _BACKEND),
    returns=tuple(a.grad for a in FWD.args if a.grad),
)
fwd_args = FWD.pack  # fwd_args(q, k, v, scale=..., backend=...): attn_fwd's arguments
bwd_args = BWD.pack  # bwd_args(dout, q, k, v, out, lse, scale=..., backend=...): attn_bwd's arguments


def _is_tensor(arg: Arg) -> bool:
    return arg.type.startswith("Tensor")


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


torch.library.define(f"flashattn::{FWD.name}", FWD.schema)
torch.library.define(f"flashattn::{BWD.name}", BWD.schema)


class _Bound(NamedTuple):
    call: Callable[[tuple], Any]  # the entry called with a spec-ordered tuple's values
    select: Callable[[tuple], tuple]  # the values the entry takes, in its order


def _bind(entry: Callable, spec: Spec) -> _Bound:
    """How ``entry`` takes ``spec``'s values: an op overload (the compiled ops) positionally
    by its schema's argument names, each of which the spec must have; a Python function
    (the Triton launchers, the reference) by keyword, the spec's values it has parameters
    for (its other parameters keep their defaults)."""
    if isinstance(entry, torch._ops.OpOverload):
        names = [a.name for a in entry._schema.arguments]
        select = spec.getter(names)
        return _Bound(lambda values: entry(*select(values)), select)
    params = inspect.signature(entry).parameters
    names = [n for n in params if n in spec.index]
    select = spec.getter(names)
    return _Bound(lambda values: entry(**dict(zip(names, select(values)))), select)


_bound: dict[tuple[str, str], _Bound] = {}


def _entry(backend: backends.Backend, which: str, spec: Spec) -> _Bound:
    """``backend``'s ``which`` entry ("forward" / "backward"), bound to ``spec`` once; bound
    afresh inside a torch.compile trace (the reference's calls are traced): Dynamo cannot
    call an itemgetter made outside the trace, and would guard on the cache's contents."""
    if torch.compiler.is_compiling():
        return _bind(getattr(backend, which)(), spec)
    bound = _bound.get((backend.name, which))
    if bound is None:
        bound = _bound[backend.name, which] = _bind(getattr(backend, which)(), spec)
    return bound


_FWD_BACKEND = FWD.index["backend"]
_BWD_BACKEND = BWD.index["backend"]


@_outside_dynamo
def _attn_fwd_impl(*args) -> tuple[Tensor, Tensor]:
    """Fused forward on ``backend`` (``args`` as FWD spells them): ``(out, lse)``."""
    return _entry(backends.BACKENDS[args[_FWD_BACKEND]], "forward", FWD).call(args)


torch.library.impl(f"flashattn::{FWD.name}", "CompositeExplicitAutograd", _attn_fwd_impl)


def _fwd_fake(q: Tensor, v: Tensor, backend: backends.Backend) -> tuple[Tensor, Tensor]:
    batch, seqlen_q, num_heads, _ = q.shape
    out = q.new_empty((batch, seqlen_q, num_heads, v.shape[-1]))
    lse = q.new_empty((batch, num_heads, seqlen_q), dtype=backend.lse_dtype(q.dtype))
    return out, lse


@torch.library.register_fake(f"flashattn::{FWD.name}")
def _attn_fwd_fake(*args):
    a = FWD.view(*args)
    return _fwd_fake(a.q, a.v, backends.BACKENDS[a.backend])


@_outside_dynamo
def _attn_bwd_impl(*args) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv, dbias) of attn_fwd's out; dbias is float32 (B, H, Sq, Sk)
    when ``bias_requires_grad``, else empty (an entry may return None for it)."""
    dq, dk, dv, dbias = _entry(backends.BACKENDS[args[_BWD_BACKEND]], "backward", BWD).call(args)
    if dbias is None:
        dbias = args[BWD.index["q"]].new_empty((0,), dtype=torch.float32)
    return dq, dk, dv, dbias


torch.library.impl(f"flashattn::{BWD.name}", "CompositeExplicitAutograd", _attn_bwd_impl)


def _dbias_fake(q, k, bias_requires_grad):
    shape = (q.shape[0], q.shape[2], q.shape[1], k.shape[1]) if bias_requires_grad else (0,)
    return q.new_empty(shape, dtype=torch.float32)


def _grads_fake(q, k, v, backend: backends.Backend):
    """dq, dk, dv as ``backend``'s backward allocates them. The fakes must give the real
    strides, not just the shapes: inductor asserts every output's strides against the
    fake's, and a transposed (SDPA layout) or packed-qkv input is the normal case. The CPU
    kernel writes grads in the inputs' layout (empty_like); the CUDA and Triton backwards
    allocate contiguous (B, S, H, D) grads (tests/test_fake_strides.py holds each
    backend to this)."""
    if backend.grads_like_inputs:
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _bwd_fake(a, backend: backends.Backend):
    return (*_grads_fake(a.q, a.k, a.v, backend), _dbias_fake(a.q, a.k, a.bias_requires_grad))


@torch.library.register_fake(f"flashattn::{BWD.name}")
def _attn_bwd_fake(*args):
    a = BWD.view(*args)
    return _bwd_fake(a, backends.BACKENDS[a.backend])


# What the forward keeps for the backward: its tensor arguments and outputs (saved), its
# other arguments plus bias_requires_grad (ctx.args). The backward's arguments are taken
# from (dout, *saved, *ctx.args) by name.
_SAVED = tuple(a.name for a in FWD.args if _is_tensor(a)) + FWD.returns
_KEPT = tuple(a.name for a in FWD.args if not _is_tensor(a)) + ("bias_requires_grad",)
_get_saved = FWD.getter(_SAVED[:-len(FWD.returns)])
_get_kept = FWD.getter(_KEPT[:-1])
_SOURCES = ("dout",) + _SAVED + _KEPT
_get_bwd_args = operator.itemgetter(*(_SOURCES.index(n) for n in BWD.names))
_ATTN_BIAS = FWD.index["attn_bias"]
_SAVED_BIAS = _SAVED.index("attn_bias")
# Where each of the backward's outputs goes in the gradients of FWD's arguments.
_GRAD_SLOTS = tuple(FWD.names.index(next(a.name for a in FWD.args if a.grad == g)) for g in BWD.returns)
_NO_GRADS = (None,) * len(FWD.args)


def _setup_context(ctx, inputs, output):
    attn_bias = inputs[_ATTN_BIAS]
    ctx.save_for_backward(*_get_saved(inputs), *output)
    bias_requires_grad = attn_bias is not None and attn_bias.is_floating_point() and attn_bias.requires_grad
    ctx.args = (*_get_kept(inputs), bias_requires_grad)


def _backward(ctx, saved: tuple, dout, dlse):
    """The gradients of FWD's arguments, ``saved`` ctx.saved_tensors (unpacked once by the
    caller: non-reentrant activation checkpointing allows one unpacking)."""
    dout = kernel_rows(dout, 1)
    grads = attn_bwd(*_get_bwd_args((dout, *saved, *ctx.args)))
    result = list(_NO_GRADS)
    for slot, grad in zip(_GRAD_SLOTS, grads):
        result[slot] = grad
    bias_requires_grad = ctx.args[-1]
    result[_ATTN_BIAS] = result[_ATTN_BIAS].to(saved[_SAVED_BIAS].dtype) if bias_requires_grad else None
    return tuple(result)


attn_fwd = getattr(torch.ops.flashattn, FWD.name).default
attn_bwd = getattr(torch.ops.flashattn, BWD.name).default
_CPU_PATH = FWD.index["cpu_path"]
_CPU_PATH_ARGS = FWD.getter(("q", "cu_seqlens_q", "max_seqlen_q"))
_choose_path: dict[str, Callable[[torch.dtype, int, int], int]] = {}  # each backend's, resolved on first use
_EAGER_TENSORS = (Tensor, torch.nn.Parameter)


def _with_cpu_path(args: tuple) -> tuple:
    """FWD values with the kernels' path for this problem filled in (``cpu_path``), for a
    call with gradients on a backend that chooses one (``Backend.choose_path``: cpu): its
    forward and its backward then run one path, chosen once. Eager tensors only: traced
    calls (fake / functional tensors under torch.compile, whose sizes may be symbolic;
    torch.jit.trace and dispatch modes such as make_fx, which would bake one problem's path
    into a graph) keep 0, and the kernels choose from the same problem in the forward and
    again in the backward."""
    q, cu_seqlens_q, max_seqlen_q = _CPU_PATH_ARGS(args)
    backend = backends.BACKENDS[args[_FWD_BACKEND]]
    if (backend.choose_path is None or args[_CPU_PATH] != 0 or type(q) not in _EAGER_TENSORS
            or torch._C._get_tracing_state() is not None or _get_current_dispatch_mode() is not None):
        return args
    choose = _choose_path.get(backend.name)
    if choose is None:
        choose = _choose_path[backend.name] = backend.choose_path()
    # (the kernels' seqlen_q, csrc/params_from_tensors.h fill_params: the longest sequence's
    # when packed and given, else q's rows; tests/test_varlen.py holds the two to agree)
    seqlen_q = max_seqlen_q if cu_seqlens_q is not None and max_seqlen_q > 0 else q.shape[1]
    path = choose(q.dtype, seqlen_q, q.shape[-1])
    return (*args[:_CPU_PATH], path, *args[_CPU_PATH + 1:])


class _AttnAutograd(torch.autograd.Function):
    """attn_fwd's autograd: the op below autograd, then the spec's backward (attn_bwd)."""

    @staticmethod
    def forward(ctx, keyset, *args):
        args = _with_cpu_path(args)
        with torch._C._AutoDispatchBelowAutograd():
            output = attn_fwd.redispatch(keyset & torch._C._after_autograd_keyset, *args)
        _setup_context(ctx, args, output)
        return output

    @staticmethod
    def backward(ctx, dout, dlse):
        saved = ctx.saved_tensors
        return (None, *not_twice_differentiable(_backward(ctx, saved, dout, dlse), saved))


def not_twice_differentiable(grads: tuple, saved: tuple) -> tuple:
    """An attention backward's gradients; under create_graph=True (grad mode on in the
    backward) each tied to the saved inputs that require grad (_NotTwiceDifferentiable)."""
    if not torch.is_grad_enabled():
        return grads
    inputs = [t for t in saved if t is not None and t.requires_grad]
    return tuple(g if g is None else _NotTwiceDifferentiable.apply(g, *inputs) for g in grads)


class _NotTwiceDifferentiable(torch.autograd.Function):
    """A first-order gradient taken with create_graph=True, tied to the attention's inputs:
    attn_bwd has no derivative, so differentiating the gradient again raises (as torch's
    fused SDPA kernels do), where autograd's fallback for ops without one would give zeros
    with a warning, or, beside other terms, silently leave the attention's part out.
    (setup_context and a vmap rule: torch.func.grad runs every backward with create_graph.)"""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad, *inputs):
        # (returned as is, autograd makes it a view: an in-place op on the gradient in grad
        # mode then raises; under no_grad, .grad accumulation and clipping it does not)
        return grad

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("flashattn_py: the attention's backward is not differentiable: a gradient of its "
                           "gradient (second derivative, e.g. a gradient penalty) is not supported")


class _FunctorchAttention(torch.autograd.Function):
    """attn_fwd with its autograd for torch.func transforms (grad, vjp, jacrev, vmap):
    they take part in an autograd.Function's backward only where it is applied from Python
    in the setup_context form, with a vmap rule, not in the op's Autograd kernel
    (_AttnAutograd, applied inside the dispatcher). ops.attention calls it while a
    transform is active; the same forward and backward (a vmapped call runs the op once
    per batch entry: torch's fallback for ops without a batching rule)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*args):
        with torch._C._AutoDispatchBelowAutograd():
            return attn_fwd(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)

    @staticmethod
    def backward(ctx, dout, dlse):
        saved = ctx.saved_tensors
        return not_twice_differentiable(_backward(ctx, saved, dout, dlse), saved)


def _attn_fwd_autograd(keyset, *args):
    """attn_fwd's Autograd kernel. torch.library.register_autograd would do the same, plus a
    pass over the schema per call (torch._library.utils.fill_defaults: quadratic in the
    argument count, most of a decode-sized call's time with this spec's 25 arguments)
    that restores defaults the dispatcher drops: these schemas have none to drop."""
    if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
        return _AttnAutograd.apply(keyset, *args)
    with torch._C._AutoDispatchBelowAutograd():
        return attn_fwd.redispatch(keyset & torch._C._after_autograd_keyset, *args)


_LIB = torch.library.Library("flashattn", "FRAGMENT")
_LIB.impl(FWD.name, _attn_fwd_autograd, "Autograd", with_keyset=True)


def _register_compiled_op_fakes() -> None:
    """Fake impls for the C++ ops themselves, so they too trace and pass opcheck: named by
    the ops' own schemas, the same fakes as the custom ops'."""
    if backends.compiled_ops_error():
        return

    def named(op, args):
        return collections.namedtuple("args", [a.name for a in op._schema.arguments])(*args)

    def backend(q):  # (meta tensors: the cpu backend's, which serves them)
        return backends.BACKENDS["cuda" if q.device.type == "cuda" else "cpu"]

    @torch.library.register_fake("flashattn::fwd")
    def _compiled_fwd_fake(*args):
        a = named(torch.ops.flashattn.fwd.default, args)
        return _fwd_fake(a.q, a.v, backend(a.q))

    @torch.library.register_fake("flashattn::bwd")
    def _compiled_bwd_fake(*args):
        a = named(torch.ops.flashattn.bwd.default, args)
        return _bwd_fake(a, backend(a.q))

    @torch.library.register_fake("flashattn::dropout_mask")
    def _dropout_mask_fake(rng_state, batch, num_heads, seqlen_q, seqlen_k, dropout_p):
        return rng_state.new_empty((batch, num_heads, seqlen_q, seqlen_k), dtype=torch.bool)

    @torch.library.register_fake("flashattn::kvcache_write")
    def _kvcache_write_fake(k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table):
        return None


_register_compiled_op_fakes()


def dropout_rng_state(device: torch.device | str = "cpu") -> Tensor:
    """The [seed, offset] (int64) one dropout call draws from torch's generator of ``device``.

    Seeding torch (``torch.manual_seed``) before a call therefore fixes its dropout mask.
    On a GPU the state is drawn on the GPU and the kernels read it from device memory when
    they run: under CUDA-graph capture the draw is part of the graph, which torch replays
    with a fresh Philox offset each time, so every replay gets a new mask (a state drawn
    on the host would be baked into the captured launches: one mask for every replay).
    """
    device = torch.device(device)
    # (the device always named: under torch.set_default_device("meta") or a default GPU
    # a CPU call's state landed there, and the op then ran its fake on CPU tensors)
    return torch.randint(0, 2**62, (2,), dtype=torch.int64, device=device if device.type == "cuda" else "cpu")


def dropout_keep_mask(rng_state: Tensor, batch: int, num_heads: int, seqlen_q: int, seqlen_k: int,
                      dropout_p: float, backend: str = "cpu", device: torch.device | str = "cpu") -> Tensor:
    """Testing hook: the bool keep-mask (B, H, Sq, Sk) ``backend`` draws for ``rng_state``.

    The cpu and cuda kernels share one Philox stream layout (csrc/cpu/dropout.h,
    csrc/cuda/philox.cuh); triton uses its own (kernels/common.py).
    """
    impl = backends.BACKENDS.get(backend)
    if impl is None or impl.dropout_mask is None:
        raise ArgumentError(f"backend: expected a backend that draws a dropout mask (cpu, cuda, triton), got "
                            f"{backend!r}")
    return impl.dropout_mask(rng_state, batch, num_heads, seqlen_q, seqlen_k, dropout_p, device)


def problem(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], dropout_p: float,
            deterministic: bool = False, alibi_slopes: Optional[Tensor] = None,
            cu_seqlens: Optional[Tensor] = None, block_table: Optional[Tensor] = None) -> backends.Problem:
    """The selection's view of a call, in either layout (the head dim is last in both).

    ``backward`` follows requires_grad, not grad mode, and is True for every call with
    dropout outside inference mode: reentrant activation checkpointing runs the forward
    under no_grad and recomputes it with grad, where q, k, v made inside the checkpointed
    block need a gradient only the second time, and both passes must pick the same backend
    (two backends draw different dropout masks). Under torch.func transforms a batched
    tensor says requires_grad False whatever it wraps (_plain_inference): True there too.
    (A trace cannot ask for inference mode: there dropout always counts as a backward.)"""
    backward = (q.requires_grad or k.requires_grad or v.requires_grad
                or (attn_mask is not None and attn_mask.requires_grad)
                or (dropout_p > 0 and (torch.compiler.is_compiling() or not torch.is_inference_mode_enabled()))
                or torch._C._are_functorch_transforms_active())
    device = q.device  # (a new torch.device per read: read once, this runs on every call)
    device_type = device.type
    # (the head dim matters only to the cuda backend's shared-memory check; computed for
    # CUDA tensors only, so torch.jit.trace on CPU sees no shape arithmetic here)
    head_dim = max(q.shape[-1], v.shape[-1]) if device_type == "cuda" else 0
    return backends.Problem(device_type, q.dtype, attn_mask is not None, dropout_p,
                            _has_tangents(q, k, v, alibi_slopes, attn_mask), device.index, head_dim, backward,
                            deterministic, cu_seqlens, block_table)


def formula_dtype(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off for the reference's plain torch ops, which it would otherwise run in
    its lower dtype: every backend computes in the dtype it is given (the fused kernels
    never see autocast; the public functions that follow torch's autocast rules, SDPA's,
    cast before they get here)."""
    if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def deterministic_wanted(deterministic: bool) -> bool:
    """A call's ``deterministic``, or torch.use_deterministic_algorithms(True) (as torch's
    SDPA, whose flash backward then runs deterministically): only the CUDA backward has a
    faster nondeterministic form (dQ summed with atomics); the CPU and Triton backwards
    are always reproducible."""
    return bool(deterministic) or torch.are_deterministic_algorithms_enabled()


def kernel_rows(t: Tensor, seq: int) -> Tensor:
    """t, or a copy in torch's contiguous layout where the kernels could not read it in
    place: a head-dim stride other than 1, or rows (sequence dim ``seq``) less than a head
    dim apart (from as_strided, expand or a transpose), which the CPU kernels' BLAS products
    take as leading dimensions (at least the head dim) and their gradients could not
    take. Also for dims of size 1, whose strides torch ignores (``contiguous()`` keeps
    them)."""
    stride = t.stride()
    if stride[-1] == 1 and stride[seq] >= t.shape[-1]:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def bounded_windows(q: Tensor, k: Tensor, left: int, right: int, diag_offset: int, heads_first: bool,
                     block_table: Optional[Tensor]) -> tuple[int, int]:
    """A window side too long to hide any key of the call as -1 (unbounded), the same
    keys: the Triton kernels add it to row and key positions in 32 bits, where a side near
    2**31 would wrap (the others in 64 bits, near 2**63). Bound: every query and key
    position of any sequence (the tensors' lengths, packed or not; a paged call's pages per
    sequence) plus the diagonal's offset. (The Triton launchers do the same on the tensors
    they are given, kernels/common.py window_sides, for calls that reach them directly.)"""
    seq = 2 if heads_first else 1
    sizes = (q.shape[seq], k.shape[seq] if block_table is None else block_table.shape[1] * k.shape[1], diag_offset)
    if all(type(x) is int for x in sizes):
        limit = sizes[0] + sizes[1] + abs(diag_offset)
    else:  # symbolic sizes (torch.compile, export): comparing with them would add a guard
        limit = 2**30
    return (-1 if left >= limit else left), (-1 if right >= limit else right)


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
    cu_seqlens_q: Optional[Tensor] = None,
    cu_seqlens_k: Optional[Tensor] = None,
    seqused_k: Optional[Tensor] = None,
    block_table: Optional[Tensor] = None,
    max_seqlen_q: int = 0,
    max_seqlen_k: int = 0,
    bottom_right: bool = False,
    kv_batch_idx: Optional[Tensor] = None,
    leftpad_k: Optional[Tensor] = None,
    num_splits: int = 0,
    selected: bool = False,
    forward_only: Optional[bool] = None,
    rng_state: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Attention on validated (B, S, H, D) inputs, or (B, H, S, D) ones with
    ``heads_first``, on the selected backend: ``(out, lse)``, out in the inputs' layout.
    Packed sequences: q (1, total_q, H, D) with ``cu_seqlens_q`` etc. (FWD's arguments).
    ``selected``: ``backend`` is what ``backends.select`` chose for this very call (a
    caller that had to know first), so it is not chosen again. ``forward_only``: whether
    no backward follows the call (the CPU kernels may then run products a backward would
    not recompute bitwise, ``_forward_only_path``): True says none does, whatever the
    tensors (flash_attn_with_kvcache); False that one may (partial.py's primitive, whose
    backward is a separate call); None: none does for eager calls on inputs that need no
    gradient (not grad mode alone: reentrant activation checkpointing runs the forward
    under no_grad and recomputes it with grad). ``rng_state``: the dropout stream's
    [seed, offset] (``dropout_rng_state``) for a caller that runs the backward itself;
    None draws one."""
    deterministic = deterministic_wanted(deterministic)
    if window_left > 0 or window_right > 0:
        window_left, window_right = bounded_windows(q, k, window_left, window_right, diag_offset, heads_first,
                                                     block_table)
    # (spelled out, not a generator over the tensors: this runs on every call)
    per_sequence = None
    if (cu_seqlens_q is not None or cu_seqlens_k is not None or seqused_k is not None or kv_batch_idx is not None
            or leftpad_k is not None):
        per_sequence = next(t for t in (cu_seqlens_q, cu_seqlens_k, seqused_k, kv_batch_idx, leftpad_k)
                            if t is not None)
    name = backend if selected else backends.select(problem(q, k, v, attn_mask, dropout_p, deterministic,
                                                            alibi_slopes, per_sequence, block_table), backend)
    impl = backends.BACKENDS[name]
    inference = None
    if impl.fused:
        seq = 2 if heads_first else 1
        q, k, v = kernel_rows(q, seq), kernel_rows(k, seq), kernel_rows(v, seq)
        if dropout_p > 0 and rng_state is None:
            rng_state = dropout_rng_state(q.device)
        plain = _plain_inference(q, k, v, attn_mask)
        if forward_only is None:
            forward_only = plain and not (q.requires_grad or k.requires_grad or v.requires_grad
                                          or (attn_mask is not None and attn_mask.requires_grad))
        # (the inference entry takes FLASHATTN_DENSE_ARGS only: every other value must be at
        # its default, or one the kernel ignores in a dense call, max_seqlen_q / _k; it
        # says that no backward follows)
        if (plain and forward_only and per_sequence is None and block_table is None and not bottom_right
                and num_splits == 0 and impl.inference is not None and outside_dispatcher_ok()
                and not q.is_meta):  # (the inference op has a CPU kernel only)
            # The kernel at the first dispatch key, in either layout, any strides
            # (csrc/ops.cpp flashattn::fwd_inference, registered for AutogradCPU; its short
            # schema is parsed faster): the op's autograd layer and fwd's 23-argument boxed
            # call would cost more than a decode-sized kernel.
            inference = _inference_entry(impl)
    if inference is None and alibi_slopes is not None:
        # (no backend differentiates the slopes, as in flash-attn: the reference must not
        # either, or a backend's choice would decide whether they train)
        alibi_slopes = alibi_slopes.contiguous() if impl.fused else alibi_slopes.detach()
    if inference is None:
        if heads_first:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if inference is not None:
        # The compiled forward's arguments in its schema's order (tests/test_op_spec.py pins
        # it), then heads_first; passed straight, without building the spec's values: a
        # decode-sized call feels every microsecond.
        return inference(q, k, v, alibi_slopes, attn_mask, scale, softcap, window_left, window_right, diag_offset,
                         dropout_p, rng_state, heads_first)
    args = fwd_args(q, k, v, alibi_slopes=alibi_slopes, attn_bias=attn_mask, scale=scale, softcap=softcap,
                    window_left=window_left, window_right=window_right, diag_offset=diag_offset,
                    dropout_p=dropout_p, rng_state=rng_state, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                    seqused_k=seqused_k, block_table=block_table, max_seqlen_q=max_seqlen_q,
                    max_seqlen_k=max_seqlen_k, bottom_right=bottom_right, kv_batch_idx=kv_batch_idx,
                    leftpad_k=leftpad_k, num_splits=num_splits, deterministic=deterministic, backend=name,
                    cpu_path=_forward_only_path(impl) if forward_only else 0)
    if not impl.fused:
        with formula_dtype(q.device):
            out, lse = _entry(impl, "forward", FWD).call(args)
    else:
        # Inference on the other fused backends skips the op's autograd layer (its per-call cost).
        if plain:
            out, lse = _attn_fwd_impl(*args)
        elif torch._C._are_functorch_transforms_active():
            out, lse = _FunctorchAttention.apply(*_with_cpu_path(args))
        else:
            out, lse = attn_fwd(*args)
    return (out.transpose(1, 2), lse) if heads_first else (out, lse)


_FORWARD_ONLY: list[int] = []  # _C.CPU_FORWARD_ONLY (read below, where the compiled ops load)


def _forward_only_path(backend: backends.Backend) -> int:
    """The ``cpu_path`` of a call that no backward follows, on a backend that has paths
    (cpu: ``_C.CPU_FORWARD_ONLY``, the path still chosen per call; its forward may then
    compute a decoding step's query rows on AMX, csrc/cpu/flash_fwd.cpp), else 0."""
    if backend.choose_path is None:
        return 0
    if not _FORWARD_ONLY:
        _read_forward_only()
    return _FORWARD_ONLY[0]


def _read_forward_only() -> None:
    from . import _C

    _FORWARD_ONLY.append(_C.CPU_FORWARD_ONLY)


# (Read now where the ops loaded, not first inside a torch.compile trace: Dynamo would
# guard on the list being empty and compile the first compiled call twice.)
if backends.compiled_ops_error() is None:
    _read_forward_only()


# Each backend's inference entry, resolved on first use (tests replace one here).
_inference: dict[str, Callable] = {}


def _inference_entry(backend: backends.Backend) -> Callable:
    entry = _inference.get(backend.name)
    if entry is None:
        entry = _inference[backend.name] = backend.inference()
    return entry


def _has_tangents(*tensors: Optional[Tensor]) -> bool:
    """True inside ``torch.autograd.forward_ad.dual_level()`` when an input is a dual tensor:
    the fused kernels have no forward-mode derivative (the op would drop the tangent), the
    reference's plain torch ops do. (The level is checked first: outside a dual level this
    costs one attribute read.)"""
    if fwAD._current_level < 0:
        return False
    return any(t is not None and fwAD.unpack_dual(t).tangent is not None for t in tensors)


def outside_dispatcher_ok() -> bool:
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
    # (torch.jit.trace records what runs: a trace under no_grad must still record the op
    # with its autograd, or the traced module would later train without these gradients.
    # Under torch.func transforms a batched tensor says requires_grad False while the
    # tensor it wraps may need a gradient: only the op's autograd layer sees that.)
    return (unobserved_eager() and torch._C._get_tracing_state() is None
            and not torch._C._are_functorch_transforms_active())


def unobserved_eager() -> bool:
    """No torch.compile trace and no dispatch mode (make_fx, FakeTensorMode) is recording:
    with plain tensors and ``outside_dispatcher_ok()``, a call may run its body directly."""
    return not torch.compiler.is_compiling() and _get_current_dispatch_mode() is None

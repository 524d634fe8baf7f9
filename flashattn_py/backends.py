"""Backend registry and selection.

Each backend answers ``supports(problem) -> list[str]``: empty means it can serve the
problem, otherwise the reasons it can't (like xformers' ``not_supported_reasons``).
Selection order: explicit ``backend=`` argument > ``with use_backend(...)`` >
env ``FLASHATTN_BACKEND`` > auto. Auto tries cuda -> triton -> reference for CUDA
tensors and cpu -> reference for CPU tensors; falling to ``reference`` warns once.
A forced backend that can't serve the problem raises ValueError naming each reason.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import warnings
from typing import Callable, Iterator, NamedTuple

import torch

from .errors import ArgumentError

BACKEND_NAMES = ("cuda", "triton", "cpu", "reference")
MAX_HEAD_DIM = 256


class Problem(NamedTuple):
    """What a backend needs to know to say whether it can serve a call (a NamedTuple: one
    is built per call, and a frozen dataclass costs several times as much to build).
    ``cu_seqlens`` / ``block_table`` are set for packed sequences (or per-sequence key
    counts, cache rows) and paged K/V; None (the default) is dense, unpaged attention.
    """

    device_type: str
    dtype: torch.dtype
    has_attn_mask: bool = False
    dropout_p: float = 0.0
    forward_ad: bool = False  # an input carries a forward-mode AD tangent (a dual tensor)
    device_index: int | None = None  # q's device (None: the current one)
    head_dim: int = 0  # max(D, Dv); 0: unknown (the smallest kernels)
    backward: bool = False  # a gradient will be asked for (the backward's kernels must fit too)
    deterministic: bool = False
    cu_seqlens: object = None  # variable length: cumulative sequence lengths (None: dense)
    block_table: object = None  # paged K/V: the page table (None: contiguous K/V)


# Why each optional piece is unavailable (None: available), computed once on first use.
# A plain dict rather than functools.lru_cache, so torch.compile traces it as a constant.
_unavailable: dict[str, str | None] = {}


def _load_compiled_ops() -> str | None:
    try:
        from . import _C  # noqa: F401  (registers torch.ops.flashattn.*)
    except ImportError as e:
        return f"the compiled extension flashattn_py._C is not available ({e})"
    return None


def _load_triton() -> str | None:
    try:
        from . import kernels  # noqa: F401
    except Exception as e:  # ImportError, or triton failing to initialise
        return f"triton kernels unavailable ({type(e).__name__}: {e})"
    return None


def _load_cuda_kernels() -> str | None:
    err = compiled_ops_error()
    if err:
        return err
    if not torch._C._dispatch_has_kernel_for_dispatch_key("flashattn::fwd", "CUDA"):
        return "flashattn_py._C was built without CUDA kernels"
    return None


def _why_unavailable(piece: str, load: Callable[[], str | None]) -> str | None:
    if piece not in _unavailable:
        _unavailable[piece] = load()
    return _unavailable[piece]


def compiled_ops_error() -> str | None:
    """None when flashattn_py._C (the C++/CUDA ops) loaded, else why not."""
    return _why_unavailable("compiled", _load_compiled_ops)


def triton_error() -> str | None:
    """None when the Triton kernels import, else why not."""
    return _why_unavailable("triton", _load_triton)


def cuda_kernels_error() -> str | None:
    """None when flashattn_py._C has CUDA kernels, else why not."""
    return _why_unavailable("cuda", _load_cuda_kernels)


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Dynamic shared memory per block (bytes) the CUDA kernels launch with, per head-dim bucket:
# (forward: the plain or the split-KV kernel, whichever takes more; backward main kernel;
# deterministic dQ kernel). A copy of csrc/cuda/flash_configs.h, which
# tests/test_cuda_configs.py compiles and compares.
CUDA_SMEM_BYTES = {
    32: (25600, 30208, 30720),
    64: (46080, 46592, 55296),
    96: (66560, 45312, 79872),
    128: (87040, 57600, 104448),
    256: (101376, 106752, 135168),
}


def cuda_smem_bytes(head_dim: int, backward: bool, deterministic: bool) -> int:
    """The most shared memory per block one launch of the CUDA kernels asks for
    (flash_configs.h's cfg::smem_bytes)."""
    bucket = next((b for b in CUDA_SMEM_BYTES if head_dim <= b), 256)
    fwd, bwd, dq = CUDA_SMEM_BYTES[bucket]
    if not backward:
        return fwd
    return max(fwd, bwd, dq if deterministic else 0)


_device_props: dict[int, tuple[int, int, int]] = {}


def cuda_device_props(index: int | None) -> tuple[int, int, int]:
    """(major, minor, shared memory per block with opt-in) of CUDA device ``index``
    (None: the current device); looked up once per device. Tests replace this function."""
    if index is None:
        index = torch.cuda.current_device()
    if index not in _device_props:
        props = torch.cuda.get_device_properties(index)
        _device_props[index] = (props.major, props.minor, props.shared_memory_per_block_optin)
    return _device_props[index]


def _cpu_device(p: Problem) -> list[str]:
    # (meta tensors: the compiled ops' fakes give the shapes, as for torch's own ops)
    return [] if p.device_type in ("cpu", "meta") else [f"runs on CPU tensors, got {p.device_type}"]


def _triton_device(p: Problem) -> list[str]:
    if p.device_type != "cuda":
        if not (p.device_type == "cpu" and triton_interpreted()):
            return [f"runs on CUDA tensors (CPU tensors only with TRITON_INTERPRET=1), got {p.device_type}"]
        if p.dtype == torch.bfloat16:  # the interpreter computes bf16 tl.dot wrongly
            return ["bfloat16 is not supported by the Triton interpreter (CPU tensors)"]
    return []


def _cuda_device(p: Problem) -> list[str]:
    if p.device_type != "cuda":
        return [f"runs on CUDA tensors, got {p.device_type}"]
    # q's device, not the current one: they differ in multi-GPU code.
    major, minor, smem = cuda_device_props(p.device_index)
    device = "cuda" if p.device_index is None else f"cuda:{p.device_index}"
    if major < 8:
        return [f"needs an sm80+ GPU, {device} is sm{major}{minor}"]
    need = cuda_smem_bytes(p.head_dim, p.backward, p.deterministic)
    if need > smem:
        what = ("deterministic backward" if p.deterministic else "backward") if p.backward else "forward"
        return [f"head dim {p.head_dim} ({what}) needs {need} bytes of shared memory per block, "
                f"{device} (sm{major}{minor}) has {smem}"]
    return []


def _any_device(p: Problem) -> list[str]:
    return []


# The backends' entries, resolved on first use (the compiled ops and Triton are optional).
# flashattn_py/ops.py calls each with the values of its argument spec (ops.FWD / ops.BWD):
# an op overload by its schema's argument names, a Python function by its parameter names.
def _compiled_fwd() -> Callable:
    return torch.ops.flashattn.fwd.default


def _compiled_bwd() -> Callable:
    return torch.ops.flashattn.bwd.default


def _cpu_fwd_inference() -> Callable:
    """csrc/ops.cpp flashattn::fwd_inference: the compiled forward's dense arguments, then
    heads_first; registered for AutogradCPU too, so a call reaches the kernel at the first
    dispatch key. (The overload, bound once: no OpOverloadPacket lookup per call.)"""
    return torch.ops.flashattn.fwd_inference.default


def _triton_fwd() -> Callable:
    from . import kernels

    return kernels.flash_fwd


def _triton_bwd() -> Callable:
    from . import kernels

    return kernels.flash_bwd


def _reference_fwd() -> Callable:
    from .reference import attention_ref

    return attention_ref


def empty_cpu_cache() -> int:
    """Return to the system the memory the CPU ops keep from their freed large outputs.

    On Linux, CPU outputs and gradients of 8 MiB or more (``out``, ``dq``, ``dk``, ``dv``)
    come from memory that earlier such outputs freed, already mapped, instead of new pages
    that the operating system must fault in and zero on first write (10-30 % of a long
    packed-sequence step); up to ``FLASHATTN_CPU_POOL_MB`` MiB (default 512; 0 keeps none)
    is kept. Like ``torch.cuda.empty_cache()``: this unmaps what is kept now (tensors in
    use are untouched) and returns its size in bytes (0 without the compiled ops).
    """
    if compiled_ops_error():
        return 0
    from . import _C

    return _C.release_cpu_memory()


def _cpu_choose_path() -> Callable[[torch.dtype, int, int], int]:
    from . import _C

    index = {getattr(torch, name): i for i, name in enumerate(_C.CPU_DTYPES)}

    def choose(dtype: torch.dtype, seqlen_q: int, head_dim: int) -> int:
        return _C.choose_cpu_path(index.get(dtype, -1), seqlen_q, head_dim)

    return choose


def _compiled_dropout_mask(rng_state, batch, num_heads, seqlen_q, seqlen_k, dropout_p, device):
    # (a GPU rng_state from dropout_rng_state: the CPU impl draws the CUDA kernels' masks)
    keep = torch.ops.flashattn.dropout_mask(rng_state.cpu(), batch, num_heads, seqlen_q, seqlen_k, dropout_p)
    return keep.to(device)


def _triton_dropout_mask(rng_state, batch, num_heads, seqlen_q, seqlen_k, dropout_p, device):
    from . import kernels

    return kernels.dropout_mask(rng_state, batch, num_heads, seqlen_q, seqlen_k, dropout_p, device)


@dataclasses.dataclass(frozen=True)
class Backend:
    """A backend: its static capabilities, how to tell whether it is usable here, and its
    entries. ``fused`` backends run through the custom ops flashattn::attn_fwd / attn_bwd
    (flashattn_py/ops.py), which call ``forward()`` / ``backward()``'s entry; the others
    (reference) are called directly by ``forward()``'s entry and differentiated by autograd."""

    name: str
    dtypes: tuple[torch.dtype, ...]
    attn_mask: bool
    dropout: bool
    why_unavailable: Callable[[], str | None]
    forward_ad: bool = False
    varlen: bool = False  # Problem.cu_seqlens
    paged: bool = False  # Problem.block_table
    device_check: Callable[[Problem], list[str]] = _any_device
    fused: bool = True
    forward: Callable[[], Callable] | None = None  # resolves the forward entry
    backward: Callable[[], Callable] | None = None  # resolves the backward entry (fused only)
    # resolves the entry for eager calls that need no autograd and no tracing (None: the op)
    inference: Callable[[], Callable] | None = None
    # (rng_state, batch, num_heads, seqlen_q, seqlen_k, dropout_p, device) -> bool keep-mask
    dropout_mask: Callable[..., torch.Tensor] | None = None
    # resolves (dtype, seqlen_q, head_dim) -> the kernels' path (the ops' cpu_path), which a
    # call with gradients asks once and passes to its forward and its backward
    choose_path: Callable[[], Callable[[torch.dtype, int, int], int]] | None = None
    float64_lse: bool = False  # float64 inputs give a float64 lse (else lse is float32)
    grads_like_inputs: bool = False  # the backward's dq, dk, dv have the inputs' strides

    def lse_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return torch.float64 if (dtype == torch.float64 and self.float64_lse) else torch.float32

    def feature_reasons(self, p: Problem) -> list[str]:
        """Reasons the kernels can't compute this problem, wherever they run."""
        reasons = []
        if p.dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            reasons.append(f"dtype {p.dtype} not supported ({names})")
        if p.has_attn_mask and not self.attn_mask:
            reasons.append("attn_mask is not supported by this backend yet")
        if p.dropout_p > 0 and not self.dropout:
            reasons.append("dropout is not supported by this backend yet")
        if p.forward_ad and not self.forward_ad:
            reasons.append("forward-mode AD (dual tensors) is not supported by this backend")
        if p.cu_seqlens is not None and not self.varlen:
            reasons.append("variable length (cu_seqlens) is not supported by this backend yet")
        if p.block_table is not None and not self.paged:
            reasons.append("paged K/V (block_table) is not supported by this backend yet")
        return reasons

    def supports(self, p: Problem) -> list[str]:
        """Empty when this backend can serve ``p`` here, else the reasons it can't."""
        unavailable = self.why_unavailable()
        return ([unavailable] if unavailable else []) + self.device_check(p) + self.feature_reasons(p)


# The floating dtypes every public function takes (the fused CPU backend and the reference
# serve them all).
FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
BACKENDS: dict[str, Backend] = {
    "cuda": Backend("cuda", (torch.bfloat16, torch.float16), attn_mask=True, dropout=True, varlen=True, paged=True,
                    why_unavailable=cuda_kernels_error, device_check=_cuda_device, forward=_compiled_fwd,
                    backward=_compiled_bwd, dropout_mask=_compiled_dropout_mask),
    "triton": Backend("triton", (torch.float32, torch.bfloat16, torch.float16), attn_mask=True, dropout=True,
                      varlen=True, paged=True,
                      why_unavailable=triton_error, device_check=_triton_device, forward=_triton_fwd,
                      backward=_triton_bwd, dropout_mask=_triton_dropout_mask),
    "cpu": Backend("cpu", FLOAT_DTYPES, attn_mask=True, dropout=True, varlen=True, paged=True,
                   why_unavailable=compiled_ops_error,
                   device_check=_cpu_device, forward=_compiled_fwd, backward=_compiled_bwd,
                   inference=_cpu_fwd_inference, dropout_mask=_compiled_dropout_mask, choose_path=_cpu_choose_path,
                   float64_lse=True,
                   grads_like_inputs=True),
    "reference": Backend("reference", FLOAT_DTYPES, attn_mask=True, dropout=True, varlen=True, paged=True,
                         why_unavailable=lambda: None,
                         forward_ad=True, fused=False, forward=_reference_fwd,
                         # (it draws from torch's RNG; for an rng_state the testing hook gives
                         # the compiled kernels' mask)
                         dropout_mask=_compiled_dropout_mask),
}
SUPPORTS: dict[str, Callable[[Problem], list[str]]] = {name: b.supports for name, b in BACKENDS.items()}

# use_backend's blocks, innermost last (`stack`, a tuple): per thread, as torch.no_grad is,
# so that one thread's block neither reaches another's calls nor ends another's block. (A
# threading.local, which torch.compile reads and guards on; it cannot trace a ContextVar.)
_forced = threading.local()
# Blocks open in any thread: while none is, calls skip the thread-local read (per-call cost).
_blocks_open = [0]
_blocks_lock = threading.Lock()


def check_backend_name(name: str, argument: str = "backend") -> None:
    if name != "auto" and name not in BACKEND_NAMES:
        raise ArgumentError(f"{argument}: unknown backend {name!r}; expected 'auto' or one of {list(BACKEND_NAMES)}")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Route calls inside the block to backend ``name`` (or "auto"): the calls this thread
    makes; other threads keep their own setting."""
    check_backend_name(name)
    outer = getattr(_forced, "stack", ())
    _forced.stack = outer + (name,)
    with _blocks_lock:
        _blocks_open[0] += 1
    try:
        yield
    finally:
        _forced.stack = outer
        with _blocks_lock:
            _blocks_open[0] -= 1


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Backends usable on this machine (for ``device``'s type when given): the ones a
    ``backend=`` argument may name there. Auto selection tries cuda, triton, reference on
    CUDA tensors and cpu, reference on CPU tensors (``auto_order``), so a backend listed here
    may serve only when named (triton on CPU tensors under ``TRITON_INTERPRET=1``)."""
    device_types = [torch.device(device).type] if device is not None else ["cuda", "cpu"]
    names = []
    for name in BACKEND_NAMES:
        for device_type in device_types:
            if device_type == "cuda" and not torch.cuda.is_available():
                continue
            if not SUPPORTS[name](Problem(device_type, torch.float16 if name == "cuda" else torch.float32)):
                names.append(name)
                break
    return names


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=4)


def requested_backend(backend: str = "auto") -> str:
    """The backend asked for: explicit argument > ``use_backend`` > FLASHATTN_BACKEND > "auto"."""
    check_backend_name(backend)
    # (_blocks_open spares eager calls the thread-local read while no block is open in any
    # thread; a trace reads this thread's stack alone, or the compiled code would guard on
    # the count of every thread's blocks and recompile whenever another thread opens one)
    if backend == "auto" and (torch.compiler.is_compiling() or _blocks_open[0]):
        forced = getattr(_forced, "stack", ())
        if forced:
            backend = forced[-1]
    if backend == "auto":
        backend = os.environ.get("FLASHATTN_BACKEND", "auto") or "auto"
        check_backend_name(backend, "FLASHATTN_BACKEND")
    return backend


def auto_order(device_type: str) -> tuple[str, ...]:
    """Backends auto selection tries, in order; the last one, reference, serves anything."""
    return ("cuda", "triton", "reference") if device_type == "cuda" else ("cpu", "reference")


def select(problem: Problem, backend: str = "auto") -> str:
    """The backend that serves ``problem``, by the order in the module docstring."""
    backend = requested_backend(backend)
    if backend != "auto":
        reasons = SUPPORTS[backend](problem)
        if reasons:
            raise ArgumentError(f"backend {backend!r} can't serve this call: " + "; ".join(reasons))
        return backend
    why_not = []
    for name in auto_order(problem.device_type):
        reasons = SUPPORTS[name](problem)
        if not reasons:
            if not BACKENDS[name].fused:
                _warn_once(
                    "flashattn_py: no fused backend serves this call, using the reference "
                    "(O(N^2) memory): " + "; ".join(why_not)
                )
            return name
        why_not.append(f"{name}: " + ", ".join(reasons))
    raise AssertionError("reference serves every problem")

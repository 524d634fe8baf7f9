"""A global switch: route ``torch.nn.functional.scaled_dot_product_attention`` through ours.

    from flashattn_py.patch import patch_sdpa

    with patch_sdpa():           # a context manager ...
        model(x)
    handle = patch_sdpa()        # ... or a plain call, until handle.restore() / unpatch_sdpa()

What is patched: the attribute ``torch.nn.functional.scaled_dot_product_attention``. Code
that looks it up at call time sees ours: ``F.scaled_dot_product_attention(...)``,
``torch.nn.functional.multi_head_attention_forward`` (hence ``nn.MultiheadAttention`` and
``nn.TransformerEncoderLayer`` / ``DecoderLayer`` on their Python path), transformers'
``sdpa`` attention. Not patched: the builtin ``torch._C._nn.scaled_dot_product_attention``,
names bound before patching (``from torch.nn.functional import scaled_dot_product_attention``),
and torch's native fast paths: ``nn.MultiheadAttention`` / ``TransformerEncoderLayer`` in
eval mode under ``torch.no_grad()`` call ``torch._native_multi_head_attention`` /
``torch._transformer_encoder_layer_fwd``, which never reach the Python function. Run them in
training mode or with gradients enabled (or disable the fast path,
``torch.backends.mha.set_fastpath_enabled(False)``) to route them through the patch.

Calls ours can't serve go to the function that was there before patching (torch's own):
invalid arguments (our ``ArgumentError``/TypeError), nested tensors other than jagged ones
(those are served by the packed-sequence kernels), non-float dtypes, head
dims beyond ``MAX_HEAD_DIM``, and problems no fused backend supports (we don't use our
reference there: torch's own is the better fallback), unless a backend is forced with
``use_backend`` / ``FLASHATTN_BACKEND``. Inside ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``
(torch restricted to its math backend for the call's device: on CPU, any selection without
flash) every call goes to torch's own: such code expects
torch's math semantics, e.g. dropout drawn from torch's generator exactly as ``F.dropout``
(eager calls: inside ``torch.compile`` ours serves them).
torch's ``CausalBias`` masks (``causal_upper_left`` / ``causal_lower_right``) are served as
causal attention with their alignment; on the fallback path they go to torch's own
``CausalBias`` dispatch, so the bias is never read as a plain tensor.

TorchScript: ``torch.jit.script`` of code that reaches the patched function
(``nn.MultiheadAttention``, ``F.multi_head_attention_forward``, encoder layers) compiles it as
a call of the op ``flashattn::patched_sdpa`` (torch's schema), which runs what eager code
runs: ours while patched (outputs and dropout draws equal the eager module's), torch's
builtin after unpatching. Scripted modules save; loading one needs flashattn_py imported.
Functions TorchScript compiled before patching (it caches them, e.g. per module type) keep
torch's builtin, as names imported before patching keep torch's function.
"""
from __future__ import annotations

import sys
import threading
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import api, backends, ops

__all__ = ["patch_sdpa", "unpatch_sdpa", "is_patched", "SDPAPatch"]


# The function found at F.scaled_dot_product_attention when the first patch went in, and
# how many patches are active (nesting: the original comes back when the last one ends).
_original: Optional[Callable] = None
_depth = 0
_generation = 0  # bumped by unpatch_sdpa(), which ends every outstanding handle
# Held while the three above change (handles opened and closed on several threads: a thread
# switch inside the read-modify-write of _depth would lose a count).
_lock = threading.Lock()


class _Stats:
    """Calls seen by the patched function (eager calls only; compiled graphs don't count)."""

    served = 0  # computed by flashattn_py
    fallback = 0  # handed to torch's own function


stats = _Stats()


def _torch_restricted_to_math(device_type: str) -> bool:
    """True when torch's backend selection leaves it only its math backend for this device
    (``sdpa_kernel(SDPBackend.MATH)``; on CPU, where torch has only flash and math, any
    selection without flash)."""
    cuda = torch.backends.cuda
    if not cuda.math_sdp_enabled() or cuda.flash_sdp_enabled():
        return False
    return device_type == "cpu" or not (cuda.mem_efficient_sdp_enabled() or cuda.cudnn_sdp_enabled())


def _is_dtensor(t: Tensor) -> bool:
    module = sys.modules.get("torch.distributed.tensor")  # (loaded by anything that made one)
    return module is not None and isinstance(t, module.DTensor)


def _fallback_reason(query, key, value, attn_mask, dropout_p, enable_gqa) -> Optional[str]:
    """None when ours should serve the call, else why torch's own should."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            return f"{name} is not a tensor"
        if _is_dtensor(t):
            return f"{name} is a DTensor (torch's SDPA has sharding rules, the custom ops have none)"
        if t.layout != torch.strided and not (t.is_nested and t.layout == torch.jagged):
            return f"{name} is neither strided nor a jagged nested tensor"
        if t.dtype not in backends.FLOAT_DTYPES:
            return f"{name} dtype {t.dtype}"
        if t.dim() < 2:
            return f"{name} has fewer than 2 dims"
    if query.shape[-1] > backends.MAX_HEAD_DIM or value.shape[-1] > backends.MAX_HEAD_DIM:
        return "head dim too large"
    if api.causal_bias(attn_mask) is not None:
        attn_mask = None  # served as causal attention
    if attn_mask is not None and (not isinstance(attn_mask, Tensor) or not (
            attn_mask.dtype in (torch.bool, torch.float32, query.dtype))):
        return "attn_mask dtype"
    # (torch's backend flags are not traceable by Dynamo: compiled calls are ours)
    if not torch.compiler.is_compiling() and _torch_restricted_to_math(query.device.type):
        return "torch is restricted to its math backend"
    if backends.requested_backend() != "auto":
        return None  # the user chose a backend: let it serve or raise
    problem = ops.problem(query, key, value, attn_mask, float(dropout_p), ops.deterministic_wanted(False))
    for name in backends.auto_order(query.device.type)[:-1]:  # the fused ones, not reference
        if not backends.SUPPORTS[name](problem):
            return None
    return "no fused backend serves it"


def _call_original(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> Tensor:
    """torch's own function. A ``CausalBias`` goes to its own dispatch: called with
    anything but ``F.scaled_dot_product_attention`` (ours now) it would act as a plain tensor."""
    bias = api.causal_bias(attn_mask)
    if bias is not None:  # (its dispatch calls F.scaled_dot_product_attention, ours, which counts the call)
        return type(bias)._dispatch(query, key, value, bias, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                                    enable_gqa=enable_gqa)
    original = _original if _original is not None else torch._C._nn.scaled_dot_product_attention
    return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                    enable_gqa=enable_gqa)


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> Tensor:
    """The function ``patch_sdpa`` installs: ours when it can serve the call, else the original."""
    args = (query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    # A CausalBias call that falls back re-enters this function through torch's CausalBias
    # dispatch, and is counted there.
    count = not torch.compiler.is_compiling() and api.causal_bias(attn_mask) is None
    if _fallback_reason(query, key, value, attn_mask, dropout_p, enable_gqa) is not None:
        if count:
            stats.fallback += 1
        return _call_original(*args)
    if torch.compiler.is_compiling():
        return api.scaled_dot_product_attention(*args)
    try:
        out = api.scaled_dot_product_attention(*args)
    except (ValueError, TypeError):  # our validation refused: torch's own decides,
        if backends.requested_backend() != "auto":  # unless a backend was forced: it serves or raises
            raise
        if count:
            stats.fallback += 1
        return _call_original(*args)
    stats.served += 1
    return out


# TorchScript resolves F.scaled_dot_product_attention to this function while patched and can't
# compile its Python. It compiles a call of a dispatcher op instead: this op, whose schema is
# torch's (defaults included). It runs what eager code runs at that moment (so a scripted
# module's output, dropout draws included, equals the eager module's): the patched function
# while patched, torch's builtin after unpatch_sdpa().
torch.library.define(
    "flashattn::patched_sdpa",
    "(Tensor query, Tensor key, Tensor value, Tensor? attn_mask=None, float dropout_p=0.0, bool is_causal=False, "
    "*, float? scale=None, bool enable_gqa=False) -> Tensor",
)


@torch.library.impl("flashattn::patched_sdpa", "CompositeImplicitAutograd")
def _patched_sdpa_op(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                     dropout_p: float = 0.0, is_causal: bool = False, *, scale: Optional[float] = None,
                     enable_gqa: bool = False) -> Tensor:
    sdpa = scaled_dot_product_attention if is_patched() else torch._C._nn.scaled_dot_product_attention
    return sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)


torch.jit._builtins._register_builtin(scaled_dot_product_attention, "flashattn::patched_sdpa")


class SDPAPatch:
    """Handle of one ``patch_sdpa()``: ``restore()`` (idempotent) or use it as a context manager."""

    def __init__(self) -> None:
        global _original, _depth
        with _lock:
            if _depth == 0:
                _original = F.scaled_dot_product_attention
                F.scaled_dot_product_attention = scaled_dot_product_attention
            _depth += 1
            self.active = True
            self._generation = _generation

    def restore(self) -> None:
        global _original, _depth
        with _lock:
            if not self.active or self._generation != _generation:
                self.active = False
                return
            self.active = False
            _depth -= 1
            if _depth == 0:
                F.scaled_dot_product_attention = _original
                _original = None

    def __enter__(self) -> "SDPAPatch":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def patch_sdpa() -> SDPAPatch:
    """Route ``torch.nn.functional.scaled_dot_product_attention`` through flashattn_py.

    Returns a handle: call ``.restore()`` (or ``unpatch_sdpa()``) to put torch's back, or use
    ``with patch_sdpa(): ...``. Patches nest; the original returns when the last one ends.
    Counters of served/fallen-back eager calls are in ``flashattn_py.patch.stats``.
    """
    return SDPAPatch()


def unpatch_sdpa() -> None:
    """Restore the original ``torch.nn.functional.scaled_dot_product_attention`` now (all patches)."""
    global _original, _depth, _generation
    with _lock:
        if _depth > 0:
            F.scaled_dot_product_attention = _original
        _original = None
        _depth = 0
        _generation += 1


def is_patched() -> bool:
    """True while ``torch.nn.functional.scaled_dot_product_attention`` is ours."""
    return F.scaled_dot_product_attention is scaled_dot_product_attention

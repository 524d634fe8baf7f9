"""``install_as_flash_attn()``: code written against flash-attn 2 imports this package.

After the call, ``import flash_attn`` and the submodules such code imports load this
package's implementations (on every backend, CPUs included):

=================================  ==========================================
flash_attn                         the public functions, ``__version__`` 2.8.4
flash_attn.flash_attn_interface    flashattn_py.flash_attn_interface (with the
                                   private ``_flash_attn_forward`` / ``_backward``)
flash_attn.bert_padding            flashattn_py.bert_padding
flash_attn.layers.rotary           flashattn_py.rotary
flash_attn.modules.mha             flashattn_py.mha (MHA, FlashSelfAttention, ...)
flash_attn.utils.generation        InferenceParams (flashattn_py.mha's) only
flash_attn.ops.triton.rotary       apply_rotary (flashattn_py.rotary.apply_rotary_raw) only
=================================  ==========================================

Other flash-attn modules (its fused layer norm and dense layers, losses, models,
``flash_attn_2_cuda``) still raise ModuleNotFoundError. The modules are entries of ``sys.modules``, so this
works in the process that called it (spawned workers call it again).
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types

from . import bert_padding, flash_attn_interface, mha, rotary

__all__ = ["install_as_flash_attn"]

# The flash-attn release whose Python API these modules follow.
FLASH_ATTN_API_VERSION = "2.8.4"
_MARK = "__flashattn_py_alias__"


def _package(name: str, **attributes) -> types.ModuleType:
    """A package module named ``name`` with a spec (importlib.util.find_spec and tools that
    look for installed packages read it), no files and ``attributes``."""
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    module.__path__ = []
    module.__package__ = name
    setattr(module, _MARK, True)
    for key, value in attributes.items():
        setattr(module, key, value)
    return module


def install_as_flash_attn(replace: bool = False) -> types.ModuleType:
    """Make ``flash_attn`` and its submodules above importable as this package; returns the
    ``flash_attn`` module. Calling it again is a no-op.

    Args:
        replace: also when a flash-attn package is installed or imported (its modules are
            then shadowed in this process). Without it that case raises ImportError, so
            that a real flash-attn is never replaced by accident.
    """
    current = sys.modules.get("flash_attn")
    if current is not None and getattr(current, _MARK, False):
        return current
    if not replace:
        installed = current is not None
        if not installed:
            try:
                installed = importlib.util.find_spec("flash_attn") is not None
            except (ImportError, ValueError):
                installed = True
        if installed:
            raise ImportError("flash_attn: a flash-attn package is installed or imported in this process; "
                              "install_as_flash_attn(replace=True) shadows it with flashattn_py")
    for name in [n for n in sys.modules if n == "flash_attn" or n.startswith("flash_attn.")]:
        del sys.modules[name]
    layers = _package("flash_attn.layers", rotary=rotary)
    modules = _package("flash_attn.modules", mha=mha)
    generation = _package("flash_attn.utils.generation", InferenceParams=mha.InferenceParams)
    utils = _package("flash_attn.utils", generation=generation)
    triton_rotary = _package("flash_attn.ops.triton.rotary", apply_rotary=rotary.apply_rotary_raw)
    triton_ops = _package("flash_attn.ops.triton", rotary=triton_rotary)
    ops = _package("flash_attn.ops", triton=triton_ops)
    public = {name: getattr(flash_attn_interface, name) for name in flash_attn_interface.__all__}
    top = _package("flash_attn", __version__=FLASH_ATTN_API_VERSION, flash_attn_interface=flash_attn_interface,
                   bert_padding=bert_padding, layers=layers, modules=modules, utils=utils, ops=ops, **public)
    sys.modules.update({
        "flash_attn": top,
        "flash_attn.flash_attn_interface": flash_attn_interface,
        "flash_attn.bert_padding": bert_padding,
        "flash_attn.layers": layers,
        "flash_attn.layers.rotary": rotary,
        "flash_attn.modules": modules,
        "flash_attn.modules.mha": mha,
        "flash_attn.utils": utils,
        "flash_attn.utils.generation": generation,
        "flash_attn.ops": ops,
        "flash_attn.ops.triton": triton_ops,
        "flash_attn.ops.triton.rotary": triton_rotary,
    })
    return top

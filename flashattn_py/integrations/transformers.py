"""A Hugging Face transformers attention backend: ``attn_implementation="fattn_py"``.

    from flashattn_py.integrations.transformers import register
    register()                   # returns the name, "fattn_py"
    model = AutoModelForCausalLM.from_config(config, attn_implementation="fattn_py")
    # or, for a loaded model: model.set_attn_implementation("fattn_py")

The name has no "flash" in it on purpose: transformers treats every implementation whose
name contains "flash" as a flash-attn kernel (``is_flash_attention_requested``): it tries to
import it as one and builds 2-D (unpadded) masks for it. Ours takes SDPA's inputs instead.

``register()`` adds the attention function to transformers' ``AttentionInterface`` and,
when the installed transformers has ``AttentionMaskInterface``, a mask builder under the
same name: transformers' SDPA one (None when a pure causal mask can be expressed as
``is_causal``, else a 4-D bool mask with True = attend, covering padding, sliding windows
and packed sequences).

Padding-free training (``DataCollatorWithFlattening``: documents packed into one row,
``position_ids`` restarting at each): where transformers would build a causal (or
bidirectional) mask restricted to the packed documents, the builder returns the documents'
offsets instead (``PackedDocuments``) and the attention function runs them through the
packed-sequence kernels (``flash_attn_varlen_func``), one launch per layer, no mask. Any
other mask (sliding windows, chunked attention, image overlays) is built as for "sdpa".
"""
from __future__ import annotations

import sys
import threading
import warnings
from typing import Optional

import torch
from torch import Tensor

from .. import api
from ..backends import MAX_HEAD_DIM
from ..errors import ArgumentError

NAME = "fattn_py"

__all__ = ["NAME", "register", "flashattn_attention_forward"]

# flashattn_py.distributed.hf_adapter once substitute_hf_flash_attn has run (its active()
# says whether layers run context-parallel now); None before, so a plain call pays one read.
context_parallel = None


def flashattn_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Optional[Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    is_causal: Optional[bool] = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers' attention-function signature.

    Args:
        module: the calling attention module (``is_causal``, ``num_key_value_groups`` read).
        query: (B, H, Sq, D); key, value: (B, Hk, Sk, D) with H % Hk == 0 (GQA).
        attention_mask: None, or 4-D (B or 1, 1 or H, Sq, Sk) bool (True = attend) or
            float (added to the scores).
        scaling: softmax scale, default 1/sqrt(D); dropout: probability (the model passes
            0 outside training). ``is_causal`` overrides ``module.is_causal``.

    Returns:
        ``(attn_output (B, Sq, H, D), None)``: attention weights are never materialised.
    """
    if kwargs.get("output_attentions", False):
        _warn_no_attention_weights()
    softcap = float(kwargs.get("softcap") or 0.0)  # (Gemma 2's attn_logit_softcapping)
    # What models hand to attention functions other than eager / sdpa and this one cannot do:
    # refused by name, never dropped (T5's relative bias; block-sparse key selection).
    for name in ("position_bias", "block_indices"):
        if kwargs.get(name) is not None:
            raise ArgumentError(f"{name}: not supported by the flashattn_py transformers backend (use eager)")
    if context_parallel is not None and context_parallel.active():
        for name in ("s_aux", "sinks", "indices"):
            if kwargs.get(name) is not None:
                raise ArgumentError(f"{name}: not supported with context parallelism (substitute_hf_flash_attn)")
        return context_parallel.attention_forward(module, query, key, value, scaling, dropout, is_causal,
                                                  kwargs), None
    # Under autocast, as sdpa gets them (a model's q and k can leave RoPE in float32 beside a
    # 16-bit v): every path below, the flash_attn_* calls too, in the autocast dtype.
    query, key, value, _ = api._autocast(query, key, value, None)
    q_len = query.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if kwargs.get("indices") is not None:
        attention_mask = _with_selected_keys(attention_mask, kwargs["indices"], query, key, bool(causal))
    sinks = kwargs.get("s_aux") if kwargs.get("s_aux") is not None else kwargs.get("sinks")
    if sinks is not None:
        return _attention_with_sinks(query, key, value, attention_mask, sinks, scaling, dropout, softcap,
                                     bool(causal)), None
    if isinstance(attention_mask, PackedDocuments):
        if attention_mask.serves(query, key, module, kwargs):
            return _packed_attention(query, key, value, attention_mask, scaling, dropout, softcap), None
        attention_mask = attention_mask.mask()
    elif attention_mask is None:
        # transformers builds no mask for packed documents when a cache is in use (it looks
        # for packing only without one); flash-attn's path finds them from position_ids
        # whatever the cache, and so does ours.
        docs = _documents_from_positions(kwargs.get("position_ids"), query, key, module, kwargs, bool(causal))
        if docs is not None:
            return _packed_attention(query, key, value, docs, scaling, dropout, softcap), None
    # As transformers' sdpa: the kernel's causal flag only when there is no mask and more than
    # one query (a single decoding query sees every cached key). Shape check first so that
    # compiled graphs with dynamic shapes keep a plain bool.
    causal = bool(q_len > 1 and attention_mask is None and causal)
    if causal and key.shape[2] > q_len:
        # Prefill into an empty static cache: keys past q_len are unused slots (top-left causal).
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    mask = attention_mask
    if mask is not None:
        mask = api.sdpa_mask_dtype(mask, query.dtype)
    out = api.sdpa_with_softcap(
        query, key, value, attn_mask=mask, dropout_p=float(dropout), is_causal=causal, scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1], softcap=softcap,
    )
    return out.transpose(1, 2).contiguous(), None


def _attention_with_sinks(query: Tensor, key: Tensor, value: Tensor, attention_mask, sinks: Tensor, scaling,
                          dropout: float, softcap: float, causal: bool) -> Tensor:
    """Attention with sinks (gpt-oss' ``s_aux``: a learned logit per query head, one more
    term in each row's softmax that attends to nothing), as eager computes it, through the
    kernels: the sink is one more key, in front of the others, whose key is 0 in the head
    dims and 1 in an extra one where each query head carries sink / scale (its score is
    the sink, whatever the query; GQA keeps one key for all heads), and whose value is 0.
    Gradients reach the sinks through that extra query column. Causal masks are aligned
    bottom-right over the one more key. (B, Sq, H, Dv) out."""
    if softcap:
        raise ArgumentError("s_aux: attention sinks with a logit softcap are not supported (use eager)")
    batch, num_heads, q_len, head_dim = query.shape
    if head_dim >= MAX_HEAD_DIM:  # (the sink's extra dimension would pass the kernels' largest)
        raise ArgumentError(f"s_aux: attention sinks need a head dim under {MAX_HEAD_DIM}, got {head_dim} (use eager)")
    num_heads_k, k_len = key.shape[1], key.shape[2]
    if isinstance(attention_mask, PackedDocuments):
        attention_mask = attention_mask.mask()
    if attention_mask is None and causal and q_len > 1 and k_len > q_len:
        key, value = key[:, :, :q_len], value[:, :, :q_len]  # (prefill into an empty static cache, as below)
        k_len = q_len
    if sinks.shape != (num_heads,):
        raise ArgumentError(f"s_aux: expected one sink per query head ({num_heads},), got {tuple(sinks.shape)}")
    scale = float(scaling) if scaling is not None else head_dim ** -0.5
    sink_column = (sinks.to(query.dtype) / scale).view(1, num_heads, 1, 1).expand(batch, num_heads, q_len, 1)
    q = torch.cat([query, sink_column], -1).transpose(1, 2)  # (B, Sq, H, D + 1)
    k = torch.cat([key, key.new_zeros(batch, num_heads_k, k_len, 1)], -1)
    sink_key = key.new_zeros(batch, num_heads_k, 1, head_dim + 1)
    sink_key[..., head_dim] = 1
    k = torch.cat([sink_key, k], 2).transpose(1, 2)  # (B, Sk + 1, Hk, D + 1)
    v = torch.cat([value.new_zeros(batch, num_heads_k, 1, value.shape[-1]), value], 2).transpose(1, 2)
    if attention_mask is None:  # (one query sees every key; more: causal from the bottom right)
        return api.flash_attn_func(q, k, v, dropout_p=float(dropout), softmax_scale=scale,
                                   causal=causal and q_len > 1).contiguous()
    mask = attention_mask
    sink_seen = (torch.ones if mask.dtype == torch.bool else torch.zeros)(
        *mask.shape[:-1], 1, dtype=mask.dtype, device=mask.device)
    mask = torch.cat([sink_seen, mask], -1)
    mask = api.sdpa_mask_dtype(mask, query.dtype)
    out = api.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                           dropout_p=float(dropout), scale=scale,
                                           enable_gqa=num_heads != num_heads_k)
    return out.transpose(1, 2).contiguous()


def _with_selected_keys(attention_mask, indices: Tensor, query: Tensor, key: Tensor, causal: bool) -> Tensor:
    """The mask with only the keys ``indices`` (B, Sq, topk) selects for each query left
    visible: DeepSeek-V3.2-style sparse attention (its indexer's top-k keys), which models
    apply to the mask themselves for eager and sdpa and pass as ``indices`` to any other
    implementation. As they do: a bool mask keeps True where also selected, a float mask
    gets the dtype's minimum where not; no mask: the selection within the causal mask
    (bottom-right aligned, as the kernel's flag would be)."""
    batch, q_len, k_len = query.shape[0], query.shape[2], key.shape[2]
    if isinstance(attention_mask, PackedDocuments):
        attention_mask = attention_mask.mask()
    selected = torch.zeros(batch, q_len, k_len, dtype=torch.bool, device=query.device)
    selected = selected.scatter(-1, indices.long(), True).unsqueeze(1)  # (B, 1, Sq, Sk)
    if attention_mask is None:
        if not causal:
            return selected
        return selected & torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
    if attention_mask.dtype == torch.bool:
        return attention_mask & selected
    return attention_mask.masked_fill(~selected, torch.finfo(attention_mask.dtype).min)


_warned_weights = False


def _warn_no_attention_weights() -> None:
    """Once, as transformers' sdpa path does: output_attentions=True gets no weights here."""
    global _warned_weights
    if not _warned_weights and not torch.compiler.is_compiling():  # (Dynamo cannot trace warn)
        _warned_weights = True
        warnings.warn(f"{NAME} attention does not return attention weights (output_attentions=True): they are "
                      f"never materialised; use attn_implementation='eager' for them.", stacklevel=3)


class PackedDocuments:
    """What our mask builder gives a model for one row of packed documents whose mask is
    only causal (or bidirectional) within each document: the documents' offsets, found once
    per forward from transformers' own packed-sequence detection, for the packed-sequence
    kernels (no mask). ``mask()`` builds transformers' SDPA mask instead, for a layer it
    does not serve."""

    def __init__(self, causal: bool, new_document: Tensor, sdpa_kwargs: Optional[dict] = None):
        """new_document (S,) bool: True where a document starts (position 0's value is not read:
        one always starts there)."""
        self.causal = causal
        # (no (S - 1)-sized slices: torch.export would guard S >= 3 on them; one host sync per forward)
        not_first = torch.arange(new_document.numel(), device=new_document.device) != 0
        starts = (new_document & not_first).nonzero().view(-1)
        edges = torch.tensor([0, new_document.numel()], device=new_document.device)
        self.cu_seqlens = torch.cat([edges[:1], starts, edges[1:]]).to(torch.int32)
        self.length = new_document.numel()
        self._sdpa_kwargs = sdpa_kwargs
        self._mask = None

    def _with_causal(self, causal: bool) -> "PackedDocuments":
        other = object.__new__(PackedDocuments)
        other.__dict__.update(self.__dict__, causal=causal)
        return other

    def serves(self, query: Tensor, key: Tensor, module=None, kwargs=None) -> bool:
        sliding = (kwargs or {}).get("sliding_window") is not None or getattr(module, "sliding_window", None) is not None
        return query.shape[0] == 1 and query.shape[2] == key.shape[2] == self.length and not sliding

    def __getitem__(self, index):
        """As transformers' mask would index (models that slice or read their mask, e.g.
        Gemma 4's KV-shared layers, DeepSeek-V3.2's indexer)."""
        return self.mask()[index]

    def __getattr__(self, name: str):
        """The mask's attributes and methods (``.dtype``, ``.shape``, ``.masked_fill`` ...), for
        models whose own code reads or combines their mask (Doge's dynamic mask): it is built
        then. (Not for private or special names: copying, pickling and this object's own
        attributes must not build it.)"""
        if name.startswith("_") or not hasattr(Tensor, name):  # (hasattr(docs, "x") builds nothing)
            raise AttributeError(name)
        return getattr(self.mask(), name)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        """torch functions given this object (``torch.where(mask, ...)``): on the mask."""
        def unwrap(x):
            return x.mask() if isinstance(x, PackedDocuments) else x

        return func(*(unwrap(a) for a in args), **{k: unwrap(v) for k, v in (kwargs or {}).items()})

    def mask(self) -> Optional[Tensor]:
        if self._mask is None:
            from transformers.masking_utils import sdpa_mask

            self._mask = sdpa_mask(**self._sdpa_kwargs)
        return self._mask


# The documents found from the last position_ids seen on this thread, with its version
# counter (every layer of a forward passes the same tensor: found once per forward; a
# tensor written in place since is read again). Per thread, as one immutable entry: threads
# serving requests of their own would otherwise read each other's documents.
_last_documents = threading.local()  # .entry: (position_ids, its _version (values: inference), PackedDocuments)


def _find_documents(position_ids: Tensor, causal: bool) -> Optional[PackedDocuments]:
    """The documents of position_ids (1, S), or None for one document."""
    positions = position_ids[0]
    docs = PackedDocuments(causal, positions != positions.roll(1) + 1)  # (no (S - 1)-sized slices, as above)
    return docs if docs.cu_seqlens.numel() > 2 else None


def _documents_from_positions(position_ids: Optional[Tensor], query: Tensor, key: Tensor, module, kwargs,
                              causal: bool) -> Optional[PackedDocuments]:
    """PackedDocuments when one row (B = 1, no cached keys) holds several documents: its
    position_ids (1, S) restart (a position that is not the previous one + 1 starts a
    document, as transformers' find_packed_sequence_indices decides); else None. Layers
    with a sliding window keep their mask, and so do all layers of a model that has some."""
    q_len = query.shape[2]
    if (position_ids is None or position_ids.dim() != 2 or position_ids.shape != (1, q_len) or query.shape[0] != 1
            or q_len < 2 or key.shape[2] != q_len or position_ids.is_meta):  # (meta: no values to search)
        return None
    if kwargs.get("sliding_window") is not None or getattr(module, "sliding_window", None) is not None:
        return None
    # A model with other layers too (sliding windows, chunks): those get transformers' mask,
    # which with a cache does not keep documents apart; neither do these layers then, so
    # that every layer follows one rule (transformers' own, as eager and sdpa).
    layer_types = getattr(getattr(module, "config", None), "layer_types", None) or ()
    if any(t != "full_attention" for t in layer_types):
        return None
    if torch.compiler.is_compiling():  # (traced: no state kept between calls)
        docs = _find_documents(position_ids, causal)
    else:
        entry = getattr(_last_documents, "entry", None)
        # (an inference-mode tensor has no version counter: its values are compared instead,
        # S elements per layer; it may be written in place inside inference mode)
        if position_ids.is_inference():
            same = entry is not None and entry[0] is position_ids and torch.equal(entry[1], position_ids)
            version = None if same else position_ids.clone()
        else:
            version = position_ids._version
            same = entry is not None and entry[0] is position_ids and entry[1] == version
        if same:
            docs = entry[2]
        else:
            docs = _find_documents(position_ids, causal)
            _last_documents.entry = (position_ids, version, docs)
    if docs is not None and docs.causal != causal:
        docs = docs._with_causal(causal)
    return docs


def _packed_attention(query: Tensor, key: Tensor, value: Tensor, docs: PackedDocuments, scaling,
                      dropout, softcap: float) -> Tensor:
    """The documents of a one-row batch, each attending within itself: (1, S, H, D) out. The
    sequences' bound is the row's length (no host read of the longest document)."""
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (S, H, D) views
    out = api.flash_attn_varlen_func(q, k, v, docs.cu_seqlens, docs.cu_seqlens, docs.length, docs.length,
                                     dropout_p=float(dropout), softmax_scale=scaling, causal=docs.causal,
                                     softcap=softcap)
    return out.unsqueeze(0)


def _closure(fn, name: str):
    """The value of ``fn``'s closure variable ``name`` (None when it has none)."""
    names = getattr(getattr(fn, "__code__", None), "co_freevars", ())
    if name not in names or not fn.__closure__:
        return None
    return fn.__closure__[names.index(name)].cell_contents


def _packed_plain_mask(mask_function):
    """(causal, document ids (B, S)) when ``mask_function`` is transformers' causal or
    bidirectional mask restricted to packed documents (create_causal_mask's
    ``and_masks(remap_positions_for_packed_sequence(base), packed_sequence_mask_function)``
    in 5.x, ``and_masks(base, packed_sequence_mask_function)`` in 4.5x), else None: any
    other mask (sliding windows, chunks, image overlays, ...) is built as transformers
    builds it. Read from the closures transformers builds; a version that builds them
    otherwise gets its masks built, never a wrong mask."""
    from transformers import masking_utils as mu

    # (and_masks' closure only: or_masks and others close over mask_functions too)
    if (getattr(mask_function, "__module__", None) != mu.__name__
            or getattr(mask_function, "__qualname__", "") != "and_masks.<locals>.and_mask"):
        return None
    parts = _closure(mask_function, "mask_functions")
    if not isinstance(parts, tuple) or len(parts) != 2:
        return None
    base = parts[0]  # transformers 4.5x: and_masks(causal_mask_function, packed_sequence_mask_function(ids))
    if _closure(base, "position_ids") is not None:  # 5.x: remap_positions_for_packed_sequence(base, position_ids)
        base = _closure(base, "mask_function")
    document_ids = _closure(parts[1], "packed_sequence_mask")
    if base is None or not isinstance(document_ids, Tensor):
        return None
    if base is mu.causal_mask_function:
        return True, document_ids
    if base is getattr(mu, "bidirectional_mask_function", None):
        return False, document_ids
    return None


# Models that extend the mask themselves in eager's float form (see _packed_aware_sdpa_mask).
_FLOAT_MASK_MODELS = ("deepseek_v4",)


# model_type -> whether its model class calls attention through AttentionInterface
_routes_attention: dict = {}


def _check_routes_attention(config) -> None:
    """ValueError for a model whose code does not call its attention through transformers'
    AttentionInterface (Bloom, MPT, XGLM, BigBird: neither ``_supports_attention_backend``
    nor ALL_ATTENTION_FUNCTIONS in its modeling module, which BART-like models use without
    the flag): it would run its own attention on the SDPA-form mask built here, a wrong
    result. Unknown model types (custom code) pass."""
    model_type = getattr(config, "model_type", None)
    # The cache neither read nor filled while Dynamo traces: a read would put a guard on
    # its keys, which the next eager call of any model type would fail (a recompile); a
    # fill, one the next compiled call would fail.
    compiling = torch.compiler.is_compiling()
    routes = None if compiling else _routes_attention.get(model_type)
    if routes is None:
        import transformers
        from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

        name = MODEL_MAPPING_NAMES.get(model_type)
        model_class = getattr(transformers, name, None) if isinstance(name, str) else None
        routes = (model_class is None or getattr(model_class, "_supports_attention_backend", False)
                  or hasattr(sys.modules.get(model_class.__module__), "ALL_ATTENTION_FUNCTIONS"))
        if not compiling:
            _routes_attention[model_type] = routes
    if not routes:
        raise ValueError(f"attn_implementation={NAME!r}: {model_type} models do not call their attention through "
                         f"transformers' AttentionInterface (_supports_attention_backend is False), so they would "
                         f"run their own attention on this backend's masks; use 'eager' (or 'sdpa' where supported)")


def _packed_aware_sdpa_mask(batch_size: int, *args, attention_mask: Optional[Tensor] = None, **kwargs):
    """transformers' sdpa_mask, except for one row of packed documents with a plain causal
    or bidirectional mask: PackedDocuments (no mask built)."""
    from transformers.masking_utils import sdpa_mask

    _check_routes_attention(kwargs.get("config"))
    # DeepSeek-V4 appends its compressed keys' columns to the mask as a float bias (-inf / 0),
    # written for eager's float masks (on a bool one it inverts them): eager's mask for it.
    if getattr(kwargs.get("config"), "model_type", None) in _FLOAT_MASK_MODELS:
        from transformers.masking_utils import eager_mask

        return eager_mask(batch_size, *args, attention_mask=attention_mask, **kwargs)
    # Gemma 4's KV-shared layers keep only the last queries where sdpa's mask is skipped for
    # logits_to_keep > 1 or a static cache, which the model decides by the name "sdpa": a
    # missing mask would then read as top-left causal over the whole cache. Always a mask.
    if getattr(kwargs.get("config"), "num_kv_shared_layers", 0):
        kwargs["allow_is_causal_skip"] = False
    if batch_size == 1 and attention_mask is None and not args and "mask_function" in kwargs:
        plain = _packed_plain_mask(kwargs["mask_function"])
        if plain is not None:
            causal, document_ids = plain
            ids = document_ids.reshape(-1)
            return PackedDocuments(causal, ids != ids.roll(1),  # (no (S - 1)-sized slices: PackedDocuments)
                                   dict(kwargs, batch_size=batch_size, attention_mask=None))
    return sdpa_mask(batch_size, *args, attention_mask=attention_mask, **kwargs)


def register(name: str = NAME) -> str:
    """Register the backend with transformers under ``name``; returns the name.

    Idempotent. Raises ImportError when transformers is not installed, ValueError for a
    name containing "flash" (transformers would treat it as a flash-attn kernel).
    """
    if "flash" in name:
        raise ArgumentError(f"name: must not contain 'flash' (transformers reserves it for flash-attn kernels), "
                         f"got {name!r}")
    from transformers import AttentionInterface

    AttentionInterface.register(name, flashattn_attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:  # older transformers: masks are built by each model from the sdpa path
        return name
    AttentionMaskInterface.register(name, _packed_aware_sdpa_mask)
    return name

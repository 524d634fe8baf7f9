"""The transformers attention backend (flashattn_py.integrations.transformers).

Tiny randomly initialised Llama (GQA) and GPT-2, no downloads. Logits and gradients follow
the project's rule (docs/design.md): truth is the model in float64 with transformers' "sdpa" attention (torch's
math kernel; "eager" in float64 turns left-padded sequences into NaN, its mask being
finfo.min added twice), the naive error is the "eager" model in float32, ours runs in float32.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from flashattn_py import api  # noqa: E402
from flashattn_py.integrations import transformers as tf_backend  # noqa: E402
from flashattn_py.integrations.transformers import NAME, flashattn_attention_forward, register  # noqa: E402
from rule import GRAD_FACTOR, OUT_FACTOR, assert_rule  # noqa: E402

VOCAB = 128


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


MODELS = {"llama": _llama, "gpt2": _gpt2}


@pytest.fixture(scope="module", autouse=True)
def _registered():
    assert register() == NAME


@pytest.fixture
def spy(monkeypatch):
    calls = []
    real = api.sdpa_with_softcap

    def counted(*args, **kwargs):
        calls.append(kwargs.get("attn_mask") is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "sdpa_with_softcap", counted)
    return calls


def _batch(padded: bool):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (3, 10), generator=gen)
    mask = torch.ones_like(ids)
    if padded:  # left padding, as for batched generation
        mask[1, :3] = 0
        mask[2, :6] = 0
    return ids, mask


def _models(name):
    torch.manual_seed(0)
    base = MODELS[name]()
    out = {}
    for key, dtype, impl in (("ref", torch.float64, "sdpa"), ("naive", torch.float32, "eager"),
                             ("got", torch.float32, NAME)):
        m = copy.deepcopy(base).to(dtype)
        m.set_attn_implementation(impl)
        out[key] = m
    assert out["got"].config._attn_implementation == NAME
    return out


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("name", list(MODELS))
def test_logits_and_training_grads_match_eager(name, padded, spy):
    ids, mask = _batch(padded)
    keep = mask.bool()  # padded query rows differ by design (eager: uniform over masked keys)
    labels = ids.masked_fill(~keep, -100)
    results = {}
    for key, model in _models(name).items():
        model.train()  # dropout probabilities are 0: training mode only switches the code path
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        results[key] = (out.logits[keep], out.loss, {n: p.grad for n, p in model.named_parameters()})
    assert len(spy) == 2  # one call per layer
    assert all(spy) == padded  # the padding mask reaches our function; without padding, is_causal
    ref, naive, got = results["ref"], results["naive"], results["got"]
    assert_rule("logits", got[0], ref[0], naive[0], OUT_FACTOR)
    assert_rule("loss", got[1], ref[1], naive[1], OUT_FACTOR)
    for n, g in ref[2].items():
        if g is not None:
            assert_rule(f"d{n}", got[2][n], g, naive[2][n], GRAD_FACTOR)


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_generate_left_padded(name, spy):
    ids, mask = _batch(padded=True)
    models = _models(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokens = {key: models[key].eval().generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                                                   do_sample=False, pad_token_id=0)
                  for key in ("naive", "got")}
    assert len(spy) > 2  # prefill + decoding steps went through ours
    assert torch.equal(tokens["got"], tokens["naive"])
    assert tokens["got"].shape == (3, 16)


class _Module(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 2


def test_attention_function_signature(monkeypatch):
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 5, 8, generator=gen)
    k, v = torch.randn(2, 2, 5, 8, generator=gen), torch.randn(2, 2, 5, 8, generator=gen)
    out, weights = flashattn_attention_forward(_Module(), q, k, v, None, scaling=0.5)
    assert weights is None and out.shape == (2, 5, 4, 8) and out.is_contiguous()
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.5, enable_gqa=True)
    torch.testing.assert_close(out, want.transpose(1, 2))
    # A single decoding query sees every key; a float mask in another dtype is cast.
    mask = torch.zeros(2, 1, 1, 5, dtype=torch.float64)
    mask[..., 1] = float("-inf")
    out1, _ = flashattn_attention_forward(_Module(), q[:, :, :1], k, v, mask)
    want1 = torch.nn.functional.scaled_dot_product_attention(q[:, :, :1], k, v, attn_mask=mask.float(),
                                                             enable_gqa=True)
    torch.testing.assert_close(out1, want1.transpose(1, 2))
    # softcap (Gemma 2): scores capped as the formula does
    out2, _ = flashattn_attention_forward(_Module(), q, k, v, None, scaling=0.5, softcap=1.5)
    scores = 1.5 * torch.tanh(q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 0.5 / 1.5)
    scores = scores.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(out2, (scores.softmax(-1) @ v.repeat_interleave(2, 1)).transpose(1, 2))
    with pytest.raises(ValueError, match="flash"):
        register("flashattn_py")
    # output_attentions=True: no weights (never materialised), said once as transformers' sdpa does
    monkeypatch.setattr(tf_backend, "_warned_weights", False)
    with pytest.warns(UserWarning, match="does not return attention weights"):
        _, weights = flashattn_attention_forward(_Module(), q, k, v, None, output_attentions=True)
    assert weights is None


@pytest.mark.parametrize("use_cache, all_ones_mask", [(False, False), (True, False), (False, True)])
def test_padding_free_packed_documents_match_eager_per_document(monkeypatch, use_cache, all_ones_mask):
    # use_cache=False: transformers finds the packing and our mask builder hands the
    # documents over; use_cache=True: it builds no mask and ours finds them from position_ids.
    # An attention_mask of all ones (an eager call, full-attention layers): transformers'
    # flash-attn path drops it and finds the documents from position_ids, and so does ours
    # (its eager and sdpa would not).
    # DataCollatorWithFlattening's inputs: documents packed into one row, position_ids
    # restarting at each, labels -100 on each document's first token. Ours runs them through
    # the packed-sequence kernels (no mask built); truth is each document alone in float64.
    lengths = [7, 12, 1, 20]  # (a one-token document: a position restarting at 0 twice in a row)
    gen = torch.Generator().manual_seed(3)
    docs = [torch.randint(0, VOCAB, (n,), generator=gen) for n in lengths]
    ids = torch.cat(docs)[None]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    labels = torch.cat([torch.cat([torch.tensor([-100]), d[1:]]) for d in docs])[None]

    varlen_calls = []
    real = api.flash_attn_varlen_func
    monkeypatch.setattr(api, "flash_attn_varlen_func",
                        lambda *a, **k: varlen_calls.append(1) or real(*a, **k))
    built = []
    from flashattn_py.integrations import transformers as integration
    real_build = integration.PackedDocuments.mask
    monkeypatch.setattr(integration.PackedDocuments, "mask", lambda self: built.append(1) or real_build(self))

    base = _llama()

    def per_document(model):  # eager, one document at a time: (logits, summed loss)
        logits, loss_sum = [], 0.0
        for d in docs:
            out = model(input_ids=d[None], labels=d[None] if len(d) > 1 else None)
            logits.append(out.logits[0])
            if len(d) > 1:
                loss_sum = loss_sum + out.loss * (len(d) - 1)
        return torch.cat(logits), loss_sum / sum(n - 1 for n in lengths)

    results = {}
    for label, dtype, impl in (("ref", torch.float64, "eager"), ("naive", torch.float32, "eager"),
                               ("ours", torch.float32, NAME)):
        model = copy.deepcopy(base).to(dtype)
        model.config._attn_implementation = impl
        if impl == NAME:
            mask = torch.ones_like(ids) if all_ones_mask else None
            out = model(input_ids=ids, position_ids=position_ids, attention_mask=mask, labels=labels,
                        use_cache=use_cache)
            logits, loss = out.logits[0], out.loss
        else:
            logits, loss = per_document(model)
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        results[label] = (logits.detach(), loss.detach(), grads)
    assert varlen_calls and not built  # the packed path, every layer, and no mask
    ref, naive, ours = results["ref"], results["naive"], results["ours"]
    assert_rule("logits", ours[0], ref[0], naive[0], OUT_FACTOR)
    assert_rule("loss", ours[1], ref[1], naive[1], OUT_FACTOR)
    for name in ref[2]:
        assert_rule(f"grad {name}", ours[2][name], ref[2][name], naive[2][name], GRAD_FACTOR, atol=1e-5)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_generate_gqa_llama_with_each_cache(cache, spy):
    # A tiny GQA Llama decodes the same tokens with ours as with eager, from a DynamicCache
    # and from a StaticCache (keys past the filled slots masked, one compiled-friendly shape).
    ids, mask = _batch(padded=False)
    models = _models("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokens = {key: models[key].eval().generate(input_ids=ids, attention_mask=mask, max_new_tokens=8,
                                                   do_sample=False, pad_token_id=0, cache_implementation=cache)
                  for key in ("naive", "got")}
    assert len(spy) > 2
    assert torch.equal(tokens["got"], tokens["naive"])


def test_packed_documents_keep_sliding_window_masks(monkeypatch):
    # A sliding-window model's packed rows keep transformers' mask (built, not the packed path).
    cfg = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, sliding_window=4)
    base = transformers.MistralForCausalLM(cfg)
    varlen_calls = []
    real = api.flash_attn_varlen_func
    monkeypatch.setattr(api, "flash_attn_varlen_func", lambda *a, **k: varlen_calls.append(1) or real(*a, **k))
    lengths = [5, 9]
    ids = torch.randint(0, VOCAB, (1, sum(lengths)), generator=torch.Generator().manual_seed(1))
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    logits = {}
    for impl in ("sdpa", NAME):
        model = copy.deepcopy(base)
        model.config._attn_implementation = impl
        logits[impl] = model(input_ids=ids, position_ids=position_ids, use_cache=False).logits
    assert not varlen_calls
    torch.testing.assert_close(logits[NAME], logits["sdpa"], atol=2e-5, rtol=1e-4)


def test_padding_free_under_inference_mode():
    # Inference tensors have no version counter: the documents' cache keys on identity then.
    model = _llama().eval()
    model.config._attn_implementation = NAME
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(5))
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1]])
    with torch.inference_mode():
        packed = model(input_ids=ids, position_ids=position_ids).logits
        alone = [model(input_ids=ids[:, a:b]).logits for a, b in ((0, 4), (4, 7), (7, 9))]
    torch.testing.assert_close(packed, torch.cat(alone, 1), atol=1e-5, rtol=1e-4)


def _with_each_impl(base, impls=("eager", NAME)):
    """(impl, a copy of ``base`` set to attend with it) for each implementation."""
    for impl in impls:
        model = copy.deepcopy(base)
        model.set_attn_implementation(impl)
        yield impl, model


def _restarting_positions(lengths):
    """position_ids (1, sum(lengths)) of packed documents: 0.. again at each."""
    return torch.cat([torch.arange(n) for n in lengths])[None]


def test_gemma2_logit_softcap():
    # Gemma 2's attn_logit_softcapping reaches the kernels (it raised); sliding layers too.
    cfg = transformers.Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
                                    attn_logit_softcapping=2.0)
    torch.manual_seed(0)
    base = transformers.Gemma2ForCausalLM(cfg).eval()
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # (right padding: eager's left-padded rows differ in what padded queries see)
    lengths = [4, 7]
    position_ids = _restarting_positions(lengths)
    logits = {}
    with torch.no_grad():
        for impl, model in _with_each_impl(base):
            logits[impl] = model(input_ids=ids, attention_mask=mask).logits
            packed = model(input_ids=ids[:1], position_ids=position_ids, use_cache=False).logits
            alone = torch.cat([model(input_ids=part).logits for part in ids[:1].split(lengths, 1)], 1)
            torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-4)
    keep = mask.bool()
    torch.testing.assert_close(logits[NAME][keep], logits["eager"][keep], atol=1e-5, rtol=1e-4)


def test_packed_documents_with_a_cache_in_a_model_with_sliding_layers():
    # Full and sliding layers: with a cache transformers' masks do not keep documents apart
    # (eager, sdpa); every layer now follows that one rule (the full ones split documents, the
    # sliding ones did not: a result matching neither).
    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                                   sliding_window=4, max_window_layers=1)
    assert cfg.layer_types == ["full_attention", "sliding_attention"]
    torch.manual_seed(0)
    base = transformers.Qwen2ForCausalLM(cfg).eval()
    lengths = [5, 1, 9, 7]
    ids = torch.randint(1, VOCAB, (1, sum(lengths)), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = {impl: model(input_ids=ids, position_ids=_restarting_positions(lengths), use_cache=True).logits
                  for impl, model in _with_each_impl(base)}
    torch.testing.assert_close(logits[NAME], logits["eager"], atol=1e-5, rtol=1e-4)


def test_packed_positions_rewritten_in_place_under_inference_mode():
    # An inference tensor has no version counter: rewritten in place, its documents were
    # taken from the cache of the earlier forward (off by 0.3).
    model = _llama().eval()
    model.config._attn_implementation = NAME
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1]])
        model(input_ids=ids, position_ids=position_ids)
        position_ids.copy_(torch.tensor([[0, 1, 0, 1, 2, 3, 4, 5, 6]]))
        packed = model(input_ids=ids, position_ids=position_ids).logits
        alone = [model(input_ids=ids[:, a:b]).logits for a, b in ((0, 2), (2, 9))]
    torch.testing.assert_close(packed, torch.cat(alone, 1), atol=1e-5, rtol=1e-4)


def test_packed_mask_forms_recognised_and_others_not():
    # The packed causal mask as transformers 5.x builds it (positions remapped) and as 4.5x
    # does (no remap) take the packed kernels; any other combination is built as a mask.
    from transformers import masking_utils as mu

    ids = torch.tensor([[0, 0, 0, 1, 1, 2]])
    packed = mu.packed_sequence_mask_function(ids)
    remapped = mu.remap_positions_for_packed_sequence(mu.causal_mask_function, torch.tensor([[0, 1, 2, 0, 1, 0]]))
    for plain in (mu.and_masks(remapped, packed), mu.and_masks(mu.causal_mask_function, packed)):
        causal, document_ids = tf_backend._packed_plain_mask(plain)
        assert causal and document_ids is ids
    assert tf_backend._packed_plain_mask(mu.or_masks(mu.causal_mask_function, packed)) is None
    assert tf_backend._packed_plain_mask(mu.and_masks(mu.sliding_window_causal_mask_function(2), packed)) is None
    assert tf_backend._packed_plain_mask(mu.and_masks(packed, mu.causal_mask_function)) is None


def _config_or_skip(name):
    cls = getattr(transformers, name, None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    return cls


def test_attention_sinks_match_eager():
    # gpt-oss hands its per-head sinks to non-eager implementations as s_aux, where they were
    # dropped (every generated token differed, the sinks got no gradient). Now an extra key:
    # logits, gradients (the sinks' too) and greedy tokens equal eager's, padded or not, with
    # sliding and full layers.
    cfg = _config_or_skip("GptOssConfig")(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=5,
        layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():
        for layer in base.model.layers:
            layer.self_attn.sinks.copy_(torch.tensor([2.0, -1.0, 3.0, 0.5]))
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    results = {}
    for impl, model in _with_each_impl(base):
        for padded in (False, True):
            kwargs = dict(attention_mask=mask) if padded else {}
            out = model(input_ids=ids, labels=ids, **kwargs)
            out.loss.backward()
            sinks_grad = model.model.layers[1].self_attn.sinks.grad
            assert sinks_grad is not None and sinks_grad.abs().sum() > 0
            grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
            model.zero_grad()
            results[impl, padded] = out.logits.detach(), grads
        model.eval()
        with torch.no_grad():
            results[impl, "tokens"] = model.generate(ids[:1, :4], do_sample=False, max_new_tokens=8, pad_token_id=0)
    for padded in (False, True):
        keep = mask.bool() if padded else torch.ones_like(mask, dtype=torch.bool)
        (ours, ours_grads), (eager, eager_grads) = results[NAME, padded], results["eager", padded]
        torch.testing.assert_close(ours[keep], eager[keep], atol=1e-5, rtol=1e-4)
        assert len(ours_grads) == len(eager_grads)
        for g, e in zip(ours_grads, eager_grads):
            torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-3)
    assert torch.equal(results[NAME, "tokens"], results["eager", "tokens"])


def test_sparse_attention_indices_match_eager():
    # DeepSeek-V3.2's indexer selects each query's top-k keys; models apply the selection to
    # the mask for eager / sdpa and pass it as `indices` to other implementations, where it
    # was dropped (every key attended: 0.19 off eager, other tokens).
    cfg = _config_or_skip("DeepseekV32Config")(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, n_group=1, topk_group=1,
        num_experts_per_tok=2, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, v_head_dim=16,
        qk_nope_head_dim=16, head_dim=8, index_topk=4, index_head_dim=16, index_n_heads=2, first_k_dense_replace=2,
        eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(1))
    logits, tokens, packed = {}, {}, {}
    with torch.no_grad():
        for impl, model in _with_each_impl(base):
            logits[impl] = model(input_ids=ids).logits
            tokens[impl] = model.generate(ids, do_sample=False, max_new_tokens=6)
            # (packed documents: the indexer reads the mask, which our builder leaves unbuilt)
            packed[impl] = model(input_ids=ids, position_ids=_restarting_positions([5, 7]), use_cache=False).logits
    torch.testing.assert_close(logits[NAME], logits["eager"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(packed[NAME], packed["eager"], atol=1e-5, rtol=1e-4)
    assert torch.equal(tokens[NAME], tokens["eager"])


def test_kv_shared_layers_keep_their_mask():
    # Gemma 4's KV-shared layers attend with only the last queries when the model skips
    # sdpa's mask (logits_to_keep > 1, prompt lookup, static caches); without a mask ours
    # read that as causal from the first key (0.38 off eager). The builder now always masks.
    cfg = _config_or_skip("Gemma4TextConfig")(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, global_head_dim=16, sliding_window=64, vocab_size_per_layer_input=VOCAB,
        hidden_size_per_layer_input=8, num_kv_shared_layers=2,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(1))
    positions = _restarting_positions([5, 7])
    with torch.no_grad():
        full = base(input_ids=ids).logits[:, -4:]
        packed = base(input_ids=ids, position_ids=positions, use_cache=False).logits
        for impl, model in _with_each_impl(base):
            kept = model(input_ids=ids, logits_to_keep=4).logits
            torch.testing.assert_close(kept, full, atol=1e-5, rtol=1e-4)
            # (packed documents: the shared layers slice the mask, which our builder leaves unbuilt)
            torch.testing.assert_close(model(input_ids=ids, position_ids=positions, use_cache=False).logits, packed,
                                       atol=1e-5, rtol=1e-4)


def test_deepseek_v4_compressed_keys_get_eager_masks():
    # DeepSeek-V4 appends its compressed keys' columns to the mask as a float bias written for
    # eager's masks: on sdpa's bool mask it inverted them (0.23 off eager, other tokens).
    cfg = _config_or_skip("DeepseekV4Config")(
        vocab_size=VOCAB, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, head_dim=32, q_lora_rank=32, num_experts_per_tok=2, n_routed_experts=4,
        n_shared_experts=1, sliding_window=8, o_groups=2, o_lora_rank=16, index_n_heads=2, index_head_dim=16,
        index_topk=4, num_nextn_predict_layers=0, hc_mult=2, pad_token_id=0,
        layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"])
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if name.endswith("sinks"):
                p.copy_(torch.randn(p.shape, generator=gen) * 2)
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    results = {}
    with torch.no_grad():
        for impl, model in _with_each_impl(base):
            results[impl] = (model(input_ids=ids).logits, model(input_ids=ids, attention_mask=mask).logits,
                             model.generate(ids[:, :6], do_sample=False, max_new_tokens=6, pad_token_id=0))
    keep = mask.bool()
    torch.testing.assert_close(results[NAME][0], results["eager"][0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(results[NAME][1][keep], results["eager"][1][keep], atol=1e-5, rtol=1e-4)
    assert torch.equal(results[NAME][2], results["eager"][2])


def test_attention_sinks_at_the_largest_head_dim_refused():
    # The sink's extra dimension would take a head dim of 256 past the kernels' largest.
    query, key = torch.randn(1, 2, 3, 256), torch.randn(1, 2, 3, 256)
    module = torch.nn.Module()
    with pytest.raises(ValueError, match="s_aux: attention sinks need a head dim under 256"):
        flashattn_attention_forward(module, query, key, key, None, s_aux=torch.zeros(2))


def test_packed_documents_of_two_threads_stay_apart():
    # Two threads (a server's two requests) finding the documents of their own position_ids
    # shared one cached entry: a thread read the other's documents between deciding and
    # reading (a review: wrong attention in about 0.5 % of calls, off by up to 3).
    import sys
    import threading

    S = 64

    class Module:
        is_causal = True

    def positions(cuts):
        with torch.inference_mode():
            pos = torch.cat([torch.arange(b - a) for a, b in zip([0, *cuts], [*cuts, S])]).view(1, S)
        return pos, torch.tensor([0, *cuts, S], dtype=torch.int32)

    q = torch.empty(1, 2, S, 8)
    wrong = []

    def find(cuts):
        pos, expected = positions(cuts)
        for _ in range(3000):
            with torch.inference_mode():
                docs = tf_backend._documents_from_positions(pos, q, q, Module(), {}, True)
            if not torch.equal(docs.cu_seqlens, expected):
                wrong.append(docs.cu_seqlens.tolist())

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # (switch threads often: the race needed a switch inside a call)
    try:
        threads = [threading.Thread(target=find, args=(cuts,)) for cuts in ([16, 40], [8, 24, 50])]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not wrong, f"{len(wrong)} lookups got another thread's documents, e.g. {wrong[0]}"


def test_export_with_position_ids_down_to_two_tokens():
    # The packed-documents search sliced (S - 1)-sized tensors, on which torch.export
    # guards S >= 3: a model exported with sdpa at min=2 was refused with ours (a review).
    class Logits(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, position_ids):
            return self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits

    model = _llama().eval()
    model.config._attn_implementation = NAME
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(6))
    seq = torch.export.Dim("S", min=2, max=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(Logits(model), (ids, torch.arange(16)[None]),
                                      dynamic_shapes=({1: seq}, {1: seq})).module()
    with torch.no_grad():
        for n, positions in ((2, torch.arange(2)[None]), (9, torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1]]))):
            torch.testing.assert_close(program(ids[:, :n], positions), Logits(model)(ids[:, :n], positions),
                                       atol=1e-5, rtol=1e-4)


def test_autocast_reaches_every_path():
    # Under autocast a model's q and k can leave RoPE in float32 beside a bfloat16 v: sdpa
    # casts all three, but the packed-documents and the attention-sinks paths called the
    # flash_attn_* functions as they were, which refused the mixed dtypes (a review).
    class Module:
        is_causal = True

    g = torch.Generator().manual_seed(8)
    q, k = torch.randn(1, 4, 9, 16, generator=g), torch.randn(1, 2, 9, 16, generator=g)
    v = torch.randn(1, 2, 9, 16, generator=g).bfloat16()
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1]])
    sinks = torch.tensor([2.0, -1.0, 3.0, 0.5])
    for kwargs in (dict(position_ids=position_ids), dict(s_aux=sinks)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = flashattn_attention_forward(Module(), q, k, v, None, **kwargs)
        want, _ = flashattn_attention_forward(Module(), q.bfloat16(), k.bfloat16(), v, None, **kwargs)
        assert out.dtype == torch.bfloat16
        assert torch.equal(out, want)
    model = _llama()
    ids = torch.randint(0, VOCAB, (1, 9), generator=g)
    losses = {}
    for impl, copy_ in _with_each_impl(model, ("sdpa", NAME)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses[impl] = copy_(input_ids=ids, position_ids=position_ids, labels=ids, use_cache=False).loss
        losses[impl].backward()
    torch.testing.assert_close(losses[NAME], losses["sdpa"], atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("sinks", [False, True])
def test_float32_mask_with_bf16_states_is_read_as_float32(sinks):
    # transformers' sdpa hands a float32 mask beside bf16 states (e.g. a mask built in float32
    # by the caller) to torch, which adds it in float32 to the scores; ours rounded it to bf16
    # first (a bias near 200 lost its differences: bf16 steps by 1 there), with or without
    # gpt-oss's sinks. (Under autocast torch and ours both cast the mask to bf16 first.)
    gen = torch.Generator().manual_seed(8)
    q = torch.randn(2, 4, 6, 16, generator=gen)
    k, v = torch.randn(2, 2, 6, 16, generator=gen), torch.randn(2, 2, 6, 16, generator=gen)
    mask = torch.randn(2, 1, 6, 6, generator=gen) * 2 + 200
    s_aux = torch.tensor([2.0, -1.0, 3.0, 0.5])
    kwargs = dict(s_aux=s_aux) if sinks else {}

    def formula(q, k, v, mask):  # transformers' eager attention with sinks, as the truth
        scores = q @ k.repeat_interleave(2, 1).transpose(-1, -2) / 4 + mask
        if sinks:
            scores = torch.cat([scores, s_aux.to(scores.dtype).view(1, 4, 1, 1).expand(2, 4, 6, 1)], -1)
        probs = scores.softmax(-1)[..., :6]
        return (probs.to(v.dtype) @ v.repeat_interleave(2, 1)).transpose(1, 2)

    want = formula(q.double(), k.double(), v.double(), mask.double())
    low = formula(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)  # bf16 products, the mask in float32
    got, _ = flashattn_attention_forward(_Module(), q.bfloat16(), k.bfloat16(), v.bfloat16(), mask, scaling=0.25,
                                         **kwargs)
    assert_rule("out", got, want, low, OUT_FACTOR)


def test_a_model_reading_its_packed_mask_gets_it():
    # Doge combines its mask with a dynamic one in its own code (mask.dtype, torch.where):
    # the packed-documents object our mask builder returns for packed position_ids died
    # there of an AttributeError; it now builds the mask where the model reads it.
    cfg = _config_or_skip("DogeConfig")(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                        pad_token_id=0)
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    ids = torch.randint(2, VOCAB, (1, 12), generator=torch.Generator().manual_seed(2))
    positions = _restarting_positions([3, 5, 4])
    with torch.no_grad():
        logits = {impl: model(input_ids=ids, position_ids=positions, use_cache=False).logits
                  for impl, model in _with_each_impl(base, ("sdpa", NAME))}
    torch.testing.assert_close(logits[NAME], logits["sdpa"], atol=1e-5, rtol=1e-4)


def test_models_that_do_not_route_attention_through_the_interface_are_refused():
    # Bloom (like MPT, XGLM, BigBird) runs its own attention code on whatever mask the mask
    # interface builds: with ours (SDPA's bool masks, or none) it computed non-causal,
    # wrongly masked attention without an error.
    cfg = transformers.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=NAME).eval()
    with pytest.raises(ValueError, match=f"attn_implementation='{NAME}': bloom models do not call their attention"):
        with torch.no_grad():
            model(input_ids=torch.randint(2, VOCAB, (1, 6)))


def test_packed_documents_build_their_mask_only_for_tensor_attributes():
    # (a lookup of any other name, hasattr included, must not build the S x S mask)
    docs = tf_backend.PackedDocuments(True, torch.tensor([True, False, True, False]), sdpa_kwargs=None)
    assert not hasattr(docs, "foo") and not hasattr(docs, "_private")
    with pytest.raises(TypeError):  # (dtype is a tensor attribute: it builds, here from no kwargs)
        docs.dtype

"""Context parallelism inside a transformers model (flashattn_py.distributed.hf_adapter):
a tiny Llama trained one step on packed documents whose row is sharded over a gloo group,
against the same model run whole in one process with eager attention (transformers keeps
the documents apart from the restarting position_ids). Marked ``distributed``."""
from __future__ import annotations

import pytest
import torch

from mp import run_workers

pytest.importorskip("transformers")

distributed = pytest.mark.distributed

LENGTHS = {2: [5, 13, 6, 8], 4: [5, 29, 6, 8, 16]}  # documents straddling the ranks' rows


def _model(sliding_window):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                           sliding_window=sliding_window)
    return MistralForCausalLM(config)


def _batch(lengths):
    g = torch.Generator().manual_seed(1)
    total = sum(lengths)
    ids = torch.randint(0, 64, (1, total), generator=g)
    labels = torch.randint(0, 64, (1, total), generator=g)
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    return ids, labels, positions, cu


def _step(model, ids, positions, labels):
    """Logits and each parameter's gradient of the summed token losses (no cache: transformers
    finds packed documents only without one)."""
    model.zero_grad()
    logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits
    torch.nn.functional.cross_entropy(logits[0], labels[0], reduction="sum").backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def worker_training_step(rank, world, sliding_window, heads_k_stride):
    import torch.distributed as dist

    from flashattn_py.distributed import substitute_hf_flash_attn, update_ring_flash_attn_params, use_ring_attn

    lengths = LENGTHS[world]
    ids, labels, positions, cu = _batch(lengths)
    rows = slice(rank * (sum(lengths) // world), (rank + 1) * (sum(lengths) // world))
    model = _model(sliding_window)
    model.set_attn_implementation("eager")
    whole_logits, whole_grads = _step(model, ids, positions, labels)
    substitute_hf_flash_attn(None, heads_k_stride)
    model.set_attn_implementation("fattn_py")
    update_ring_flash_attn_params(cu, None)
    logits, grads = _step(model, ids[:, rows], positions[:, rows], labels[:, rows])
    for g in grads.values():  # the whole step's gradient: every rank's share summed
        dist.all_reduce(g)
    # switched off: plain attention over the local rows (their own documents only)
    use_ring_attn(False)
    local_off, _ = _step(model, ids[:, rows], positions[:, rows], labels[:, rows])
    model.set_attn_implementation("eager")
    local_eager, _ = _step(model, ids[:, rows], positions[:, rows], labels[:, rows])
    return dict(logits=(logits, whole_logits[:, rows]), grads=(grads, whole_grads), off=(local_off, local_eager))


@distributed
@pytest.mark.parametrize("world,sliding_window,heads_k_stride", [(2, None, 1), (2, 7, 2), (4, None, 2)])
def test_context_parallel_training_step_matches_the_whole_model(world, sliding_window, heads_k_stride):
    for rank, r in enumerate(run_workers(worker_training_step, world, sliding_window, heads_k_stride,
                                         timeout=180)):
        got, want = r["logits"]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m: f"rank {rank} logits: {m}")
        grads, whole = r["grads"]
        for name, g in grads.items():
            torch.testing.assert_close(g, whole[name], rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"rank {rank} grad of {name}: {m}")
        off, eager = r["off"]
        torch.testing.assert_close(off, eager, rtol=1e-4, atol=1e-5, msg=lambda m: f"rank {rank} switched off: {m}")


def worker_refusals(rank, world):
    """Each refusal on every rank (a rank refusing alone left the others waiting in the
    call's collective check until the group's timeout)."""
    import flashattn_py
    from flashattn_py.distributed import substitute_hf_flash_attn, update_ring_flash_attn_params

    lengths = LENGTHS[world]
    ids, labels, positions, cu = _batch(lengths)
    model = _model(None)
    substitute_hf_flash_attn(None, 1)
    model.set_attn_implementation("fattn_py")
    rows = slice(rank * 16, (rank + 1) * 16)
    mine = dict(input_ids=ids[:, rows], position_ids=positions[:, rows])

    def params_on_rank0_only():
        if rank == 0:
            update_ring_flash_attn_params(cu, None)
        model(**mine)

    def batch_of_two_on_rank1():
        update_ring_flash_attn_params(cu, None)
        model(**({k: t.repeat(2, 1) for k, t in mine.items()} if rank == 1 else mine))

    def stride():
        substitute_hf_flash_attn(None, 3)
        model(**mine)

    def update_differs_then_forward():  # (offsets of two batches: the update refuses on every
        # rank and leaves none set, so the forward refuses too)
        substitute_hf_flash_attn(None, 1)
        try:
            update_ring_flash_attn_params(cu if rank == 0 else torch.tensor([0, 8, 32], dtype=torch.int32), None)
        except flashattn_py.ArgumentError as e:
            messages["update_differs"] = str(e)
        model(**mine)

    messages = {}
    for name, call in (("no_params", lambda: model(**mine)), ("params_on_rank0_only", params_on_rank0_only),
                       ("batch_of_two_on_rank1", batch_of_two_on_rank1), ("stride", stride),
                       ("after_failed_update", update_differs_then_forward)):
        try:
            call()
            messages[name] = None
        except flashattn_py.ArgumentError as e:
            messages[name] = str(e)
    return messages


@distributed
def test_context_parallel_refusals_name_the_argument_on_every_rank():
    for rank, messages in enumerate(run_workers(worker_refusals, 2, timeout=120, pg_timeout=30)):
        assert "update_ring_flash_attn_params" in (messages["no_params"] or ""), (rank, messages)
        assert "update_ring_flash_attn_params" in (messages["params_on_rank0_only"] or ""), (rank, messages)
        assert "query" in (messages["batch_of_two_on_rank1"] or ""), (rank, messages)
        assert "heads_k_stride" in (messages["stride"] or ""), (rank, messages)
        assert "cu_seqlens" in messages.get("update_differs", ""), (rank, messages)
        assert "update_ring_flash_attn_params" in (messages["after_failed_update"] or ""), (rank, messages)

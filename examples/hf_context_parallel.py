"""One training step of a transformers Llama on packed documents whose row is split over
processes (context parallelism through ``flashattn_py.distributed.substitute_hf_flash_attn``).

The model is the stock ``LlamaForCausalLM`` (tiny, randomly initialised, the same on every
rank) on flashattn_py's transformers backend (``attn_implementation="fattn_py"``). A batch
is several documents packed into one row, ``position_ids`` restarting at each (as
transformers' ``DataCollatorWithFlattening`` makes it); rank r takes the r-th contiguous
chunk of the row. ``update_ring_flash_attn_params`` hands every layer the row's global
offsets, and each attention layer runs ``llama3_flash_attn_varlen_func``: the rank gathers
every rank's keys / values and attends its own queries over the keys of their documents, so
documents that straddle ranks are attended whole.

The loss is the sum of the rank's per-token losses over the number of tokens in the row,
all-reduced (SUM); the replicated parameters' gradients are all-reduced (SUM), as data
parallelism does. Rank 0 then runs the same model on the whole row in one process with
transformers' eager attention (which keeps the documents apart from the restarting
position_ids) and compares the loss and every parameter's gradient.

    torchrun --nproc-per-node 2 examples/hf_context_parallel.py [--heads-k-stride 1]

Without torchrun it makes a one-process group (world size 1). Exit status 0 on PASS.
"""
from __future__ import annotations

import argparse
import copy
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from flashattn_py.distributed import substitute_hf_flash_attn, update_ring_flash_attn_params
# (the process group set-up and the comparison of the other example, beside this file)
from train_context_parallel import report, run_in_group, step_errors

# Tolerance relative to the size of the reference value (the loss; each gradient's largest
# |entry|): both runs are float32 and do the same mathematics in another order (a packed call
# per rank and layer against one over the whole row, gradients summed over ranks), which
# moves results by ~1e-7 to 1e-6 relative; attending across documents moves the loss by
# ~1e-3 and the gradients by half their size.
RTOL = 1e-4


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[23, 50, 7, 16],
                   help="document lengths of the packed row (default 23,50,7,16: 96 tokens); the total must be "
                        "divisible by the number of ranks")
    p.add_argument("--heads-k-stride", type=int, default=1, help="KV heads gathered at a time (default 1)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _step_and_check(args: argparse.Namespace) -> bool:
    rank, world = dist.get_rank(), dist.get_world_size()
    total = sum(args.lengths)
    if total % world:
        raise SystemExit(f"--lengths: {total} tokens are not divisible by {world} ranks")
    torch.manual_seed(args.seed)  # the same model and data on every rank
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max(args.lengths))
    model = LlamaForCausalLM(config)
    reference = copy.deepcopy(model)  # rank 0 runs it whole after the step
    ids = torch.randint(0, config.vocab_size, (1, total))
    labels = torch.randint(0, config.vocab_size, (1, total))
    positions = torch.cat([torch.arange(n) for n in args.lengths])[None]
    cu_seqlens = torch.tensor([0] + torch.tensor(args.lengths).cumsum(0).tolist(), dtype=torch.int32)

    # ---- the sharded step: rank r's contiguous chunk of the row
    substitute_hf_flash_attn(None, args.heads_k_stride)
    model.set_attn_implementation("fattn_py")
    update_ring_flash_attn_params(cu_seqlens, None)
    mine = slice(rank * total // world, (rank + 1) * total // world)
    logits = model(input_ids=ids[:, mine], position_ids=positions[:, mine], use_cache=False).logits
    local_loss = F.cross_entropy(logits[0], labels[0, mine], reduction="sum") / total
    local_loss.backward()
    loss = local_loss.detach().clone()
    dist.all_reduce(loss)
    for p in model.parameters():
        dist.all_reduce(p.grad)

    # ---- rank 0: the whole row in one process, eager attention
    verdict = torch.zeros(1)
    if rank == 0:
        reference.set_attn_implementation("eager")
        ref_logits = reference(input_ids=ids, position_ids=positions, use_cache=False).logits
        ref_loss = F.cross_entropy(ref_logits[0], labels[0])
        ref_loss.backward()
        verdict[0] = float(report(step_errors(loss, ref_loss, model, reference), RTOL,
                                  f"llama3 context parallelism in a transformers Llama, {world} ranks, documents "
                                  f"{args.lengths}: loss {loss.item():.6f} (one process, eager: "
                                  f"{ref_loss.item():.6f})"))
    dist.broadcast(verdict, src=0)
    return bool(verdict.item())


def main(argv=None) -> bool:
    """The sharded training step checked against the whole model; True on PASS (every rank
    returns rank 0's verdict)."""
    return run_in_group(_step_and_check, parse_args(argv))


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

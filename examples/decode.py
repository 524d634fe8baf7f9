"""Greedy decoding of a tiny randomly initialised Llama from a paged KV cache.

Every attention call is one ``flashattn_py.flash_attn_with_kvcache``: it writes the step's
keys / values into the layer's paged cache (rotary applied to the keys, GPT-NeoX style as
Llama does) and attends over the cache. The tokens are checked against transformers' own
``generate`` with eager attention.

    python examples/decode.py [--new-tokens 16] [--page-size 5]
"""
from __future__ import annotations

import argparse

import torch
import transformers

import flashattn_py


def tiny_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(config).eval()


class PagedCache:
    """Per layer, K and V pools of pages (num_pages, page_size, Hk, D); each sequence owns the
    pages of its row of ``block_table``, handed out in a shuffled order (as an allocator
    serving many requests would)."""

    def __init__(self, layers: int, batch: int, capacity: int, page_size: int, heads_k: int, head_dim: int,
                 dtype: torch.dtype):
        pages_per_seq = -(-capacity // page_size)
        num_pages = batch * pages_per_seq
        order = torch.randperm(num_pages, generator=torch.Generator().manual_seed(1))
        self.block_table = order.view(batch, pages_per_seq).to(torch.int32)
        self.k = [torch.zeros(num_pages, page_size, heads_k, head_dim, dtype=dtype) for _ in range(layers)]
        self.v = [torch.zeros(num_pages, page_size, heads_k, head_dim, dtype=dtype) for _ in range(layers)]
        self.seqlens = torch.zeros(batch, dtype=torch.int32)


def rotary_tables(model: transformers.LlamaForCausalLM, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin (positions, head_dim / 2) of the model's rotary embedding."""
    rope = model.model.rotary_emb
    freqs = torch.arange(positions, dtype=torch.float32)[:, None] * rope.inv_freq[None, :]
    return (freqs.cos() * rope.attention_scaling), (freqs.sin() * rope.attention_scaling)


@torch.no_grad()
def forward(model: transformers.LlamaForCausalLM, ids: torch.Tensor, cache: PagedCache, cos, sin) -> torch.Tensor:
    """Logits of the last position of each row of ids (B, S), appending them to the cache."""
    cfg = model.config
    heads, heads_k = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = cfg.hidden_size // heads
    x = model.model.embed_tokens(ids)
    batch, seqlen = ids.shape
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q = attn.q_proj(h).view(batch, seqlen, heads, head_dim)
        k = attn.k_proj(h).view(batch, seqlen, heads_k, head_dim)
        v = attn.v_proj(h).view(batch, seqlen, heads_k, head_dim)
        out = flashattn_py.flash_attn_with_kvcache(
            q, cache.k[i], cache.v[i], k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=cache.seqlens,
            block_table=cache.block_table, causal=True, rotary_interleaved=False)
        x = x + attn.o_proj(out.reshape(batch, seqlen, heads * head_dim))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    cache.seqlens += seqlen
    return model.lm_head(model.model.norm(x[:, -1]))


def greedy_decode(model, prompt: torch.Tensor, new_tokens: int, page_size: int) -> torch.Tensor:
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    capacity = prompt.shape[1] + new_tokens
    cache = PagedCache(cfg.num_hidden_layers, prompt.shape[0], capacity, page_size, cfg.num_key_value_heads,
                       head_dim, torch.float32)
    cos, sin = rotary_tables(model, capacity)
    tokens = prompt
    logits = forward(model, prompt, cache, cos, sin)  # prefill: the prompt as the first new keys
    for _ in range(new_tokens):
        nxt = logits.argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], dim=1)
        logits = forward(model, nxt, cache, cos, sin)
    return tokens


def main(argv=None) -> bool:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--page-size", type=int, default=5)
    parser.add_argument("--batch", type=int, default=3)
    parser.add_argument("--prompt-len", type=int, default=7)
    args = parser.parse_args(argv)
    model = tiny_llama()
    prompt = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt_len),
                           generator=torch.Generator().manual_seed(2))
    ours = greedy_decode(model, prompt, args.new_tokens, args.page_size)
    model.config._attn_implementation = "eager"
    theirs = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new_tokens,
                            do_sample=False, pad_token_id=0)
    same = torch.equal(ours, theirs)
    print(f"paged cache, page size {args.page_size}: {args.new_tokens} tokens x {args.batch} sequences, "
          f"{'identical to' if same else 'DIFFERENT from'} transformers' eager generate")
    return same


if __name__ == "__main__":
    raise SystemExit(0 if main() else 1)

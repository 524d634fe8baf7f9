"""Training throughput of a small GPT with each attention implementation.

    python benchmarks/bench_model.py                 # defaults for the hardware present
    python benchmarks/bench_model.py --layers 4 --d-model 512 --heads 8 --seqlen 2048

The model (defined here): token + position embeddings, pre-LayerNorm blocks of causal
self-attention and a 4x GELU MLP, a final LayerNorm and a tied LM head. Attention is a
pluggable function of q, k, v (B, S, H, D) -> (B, S, H, D), causal:

  ours-<name>  flashattn_py.flash_attn_func(q, k, v, causal=True, backend=<name>)
               for each backend in flashattn_py.available_backends(device) but "reference"
  sdpa         torch.nn.functional.scaled_dot_product_attention(is_causal=True), torch's choice
  naive        flashattn_py.reference.attention_ref (the formula in plain torch ops)

Each step is forward + cross-entropy loss + backward (no optimizer step) on random
tokens, with the same weights and batch for every attention. Reports median ms per
step, tokens/s, speed relative to sdpa, peak extra memory of one step, and the loss
(it should agree across attentions). Writes <out>/model.csv.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

try:
    import flashattn_py
except ImportError:
    flashattn_py = None
try:
    from flashattn_py.reference import attention_ref
except ImportError:
    attention_ref = None

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
DEFAULT_OUT = Path(__file__).resolve().parent / "out"
CPU_DEFAULTS = dict(layers=2, d_model=256, heads=4, seqlen=1024, batch=2, vocab=1024, dtype="fp32", repeats=3)
GPU_DEFAULTS = dict(layers=8, d_model=1024, heads=16, seqlen=4096, batch=4, vocab=32768, dtype="bf16", repeats=20)
CSV_FIELDS = ["device", "attention", "status", "ms", "tokens_per_s", "x_sdpa", "peak_mem_mb", "loss",
              "layers", "d_model", "heads", "seqlen", "batch", "dtype", "error"]
TABLE_COLUMNS = [("attention", "attention"), ("ms", "ms/step"), ("tokens_per_s", "tokens/s"),
                 ("x_sdpa", "x sdpa"), ("peak_mem_mb", "mem MB"), ("loss", "loss"), ("status", "status")]


# ----------------------------------------------------------------------------- model


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor, attention: AttentionFn) -> torch.Tensor:
        batch, seqlen, d_model = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(batch, seqlen, 3, self.heads, d_model // self.heads).unbind(2)
        x = x + self.proj(attention(q, k, v).reshape(batch, seqlen, d_model))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Token ids (B, S) -> logits (B, S, vocab)."""

    def __init__(self, vocab: int, seqlen: int, d_model: int, heads: int, layers: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(seqlen, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d_model)
        for module in self.modules():  # GPT-2 style init: small weights, zero biases
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, ids: torch.Tensor, attention: AttentionFn) -> torch.Tensor:
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x, attention)
        return self.ln_f(x) @ self.tok.weight.t()  # tied LM head


# ----------------------------------------------------------------------------- attentions


def _ours(backend: str) -> AttentionFn:
    return lambda q, k, v: flashattn_py.flash_attn_func(q, k, v, causal=True, backend=backend)


def _sdpa(q, k, v):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return out.transpose(1, 2)


def _naive(q, k, v):
    return attention_ref(q, k, v, window_right=0, diag_offset=k.shape[1] - q.shape[1])[0]


def attentions(device: torch.device) -> dict[str, AttentionFn]:
    fns: dict[str, AttentionFn] = {}
    if flashattn_py is not None:
        for backend in flashattn_py.available_backends(device.type):
            if backend != "reference":
                fns[f"ours-{backend}"] = _ours(backend)
    fns["sdpa"] = _sdpa
    if attention_ref is not None:
        fns["naive"] = _naive
    return fns


# ----------------------------------------------------------------------------- run


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cpu or cuda")
    p.add_argument("--layers", type=int, help="CPU 2, GPU 8")
    p.add_argument("--d-model", type=int, help="CPU 256, GPU 1024")
    p.add_argument("--heads", type=int, help="CPU 4, GPU 16")
    p.add_argument("--seqlen", type=int, help="CPU 1024, GPU 4096")
    p.add_argument("--batch", type=int, help="CPU 2, GPU 4")
    p.add_argument("--vocab", type=int, help="CPU 1024, GPU 32768")
    p.add_argument("--dtype", help="parameter/activation dtype: fp32, bf16, fp16 (CPU fp32, GPU bf16)")
    p.add_argument("--attentions", help="comma list of names (ours-cpu, sdpa, naive, ...); default all available")
    p.add_argument("--repeats", type=int, help="CPU: timing rounds, each timing every attention once in rotated order (median); GPU: CUDA-event fallback count")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    for name, value in (GPU_DEFAULTS if args.device.startswith("cuda") else CPU_DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.d_model % args.heads:
        p.error(f"--d-model must be a multiple of --heads, got {args.d_model} and {args.heads}")
    return args


def make_step(model: nn.Module, ids: torch.Tensor, attention: AttentionFn) -> Callable[[], torch.Tensor]:
    """One training step (forward + backward, gradients reset) of ``model``; returns the loss."""
    def step():
        for param in model.parameters():
            param.grad = None
        logits = model(ids[:, :-1], attention)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        return loss

    return step


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = common.DTYPES[args.dtype]
    fns = attentions(device)
    if args.attentions:
        wanted = [a.strip() for a in args.attentions.split(",")]
        fns = {name: fn for name, fn in fns.items() if name in wanted}
    torch.manual_seed(0)
    # seqlen + 1 tokens: inputs are ids[:, :-1], targets ids[:, 1:].
    base = GPT(args.vocab, args.seqlen, args.d_model, args.heads, args.layers).to(device=device, dtype=dtype)
    ids = torch.randint(0, args.vocab, (args.batch, args.seqlen + 1), device=device)
    env = common.environment(device)
    n_params = sum(p.numel() for p in base.parameters())
    print(f"# {env['device']} | torch {env['torch']} | commit {env['commit']} | {env['date']}"
          f" | cpu kernels: {env['cpu_kernels']}")
    print(f"# GPT: {args.layers} layers, d_model {args.d_model}, {args.heads} heads, vocab {args.vocab}, "
          f"{n_params / 1e6:.1f}M params, {args.dtype}; batch {args.batch} x seqlen {args.seqlen}; fwd+bwd per step")

    # Each attention gets its own copy of the model. On the CPU the steps are then timed in
    # alternation (common.time_cpu_interleaved) so machine drift does not bias x sdpa.
    rows, steps, models = [], {}, {}
    start = time.perf_counter()
    for name, fn in common.progress(list(fns.items()), total=len(fns), desc="model"):
        row = {"device": device.type, "attention": name, "status": "ok", "error": "", "layers": args.layers,
               "d_model": args.d_model, "heads": args.heads, "seqlen": args.seqlen, "batch": args.batch,
               "dtype": args.dtype}
        rows.append(row)
        models[name] = copy.deepcopy(base)
        step = make_step(models[name], ids, fn)
        losses: list[float] = []
        try:
            if device.type == "cuda":
                step()  # warm-up
            # On the CPU the warm-up step itself is measured (the measure is fresh pages touched).
            mem = common.peak_memory_bytes(lambda: losses.append(step().item()), device)
            row["loss"] = losses[0]
            row["peak_mem_mb"] = None if mem is None else mem / 2**20
            if device.type == "cuda":
                row["ms"] = common.time_ms(step, device, repeats=args.repeats)
                del models[name]
                common.free_memory(device, collect=False)
            else:
                steps[name] = step
        except Exception as exc:  # noqa: BLE001 - every failure becomes a row
            common.mark_failed(row, exc, drop=("loss", "peak_mem_mb"))
            del models[name]
            common.free_memory(device, collect=True)
    if steps:
        timed = common.time_cpu_interleaved(steps, rounds=args.repeats, min_run_time=0.2)
        common.fill_timings(rows, "attention", timed, drop=("loss", "peak_mem_mb"))
    steps.clear()
    models.clear()
    for row in rows:
        if row["status"] == "ok":
            row["tokens_per_s"] = args.batch * args.seqlen / (row["ms"] * 1e-3)
    sdpa_ms = next((r["ms"] for r in rows if r["attention"] == "sdpa" and r["status"] == "ok"), None)
    for r in rows:
        if sdpa_ms and r["status"] == "ok":
            r["x_sdpa"] = sdpa_ms / r["ms"]

    print(common.format_table(rows, TABLE_COLUMNS))
    print(f"# {time.perf_counter() - start:.0f} s; x sdpa = sdpa ms / this ms (>1: faster than torch SDPA)")
    common.write_csv(rows, args.out / "model.csv", CSV_FIELDS)
    print(f"# wrote {args.out / 'model.csv'}")
    return rows


if __name__ == "__main__":
    main()

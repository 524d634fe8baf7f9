"""Bitwise snapshot of outputs, lse and gradients over a fixed set of cases: proof that a
restructure changes no result.

    python tests/snapshot.py record /tmp/before.pt     # at the commit before the change
    python tests/snapshot.py compare /tmp/before.pt    # after it: every tensor bitwise equal

Cases: every dtype the CPU kernel takes, both CPU paths (register tiles / bf16 dot products,
and BLAS via FLASHATTN_CPU_TILES=0; FLASHATTN_CPU_BF16_DOT=0 / =1 with FLASHATTN_CPU_AMX=0 for the
fp32 / vdpbf16ps tiles on bf16; the default bf16 cases run AMX where the CPU has it),
odd sizes, GQA, both layouts (flash_attn_func's and SDPA's), causal in both alignments,
windows, softcap, ALiBi, float bias with its gradient, bool masks, dropout, decoding-sized
calls, and the Triton kernels under TRITON_INTERPRET=1 (fp32/fp16). The reference backend
is included as a check of the snapshot itself.
"""
from __future__ import annotations

import itertools
import os
import sys
import zlib

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import flashattn_py  # noqa: E402
from flashattn_py import _C  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}


def _cases() -> list[dict]:
    cases = []
    sizes = [(1, 17, 17, 2, 2, 32), (2, 97, 61, 4, 2, 64), (1, 130, 257, 8, 1, 48), (2, 3, 300, 4, 4, 128),
             (1, 1, 1025, 2, 1, 80)]
    features = [{}, {"causal": True}, {"window": (16, 4)}, {"softcap": 5.0}, {"alibi": True}, {"bias": True},
                {"mask": True}, {"dropout": 0.2}]
    for (b, sq, sk, h, hk, d), feat, dtype, layout in itertools.product(
            sizes, features, ["fp32", "bf16", "fp16", "fp64"], ["bshd", "bhsd"]):
        if layout == "bhsd" and ("window" in feat or "softcap" in feat or "alibi" in feat):
            continue  # SDPA has no such arguments
        if layout == "bshd" and ("bias" in feat or "mask" in feat):
            continue  # flash_attn_func has no mask
        cases.append(dict(size=(b, sq, sk, h, hk, d), feat=feat, dtype=dtype, layout=layout, backend="cpu"))
    # The other CPU paths, on a subset.
    no_amx = ("FLASHATTN_CPU_AMX", "0")
    for env, dtype in (((("FLASHATTN_CPU_TILES", "0"),), "fp32"), ((("FLASHATTN_CPU_TILES", "0"),), "bf16"),
                       ((("FLASHATTN_CPU_BF16_DOT", "0"), no_amx), "bf16"),
                       ((("FLASHATTN_CPU_BF16_DOT", "1"), no_amx), "bf16")):
        for size, feat in itertools.product(sizes[:4], features[:2] + features[5:7]):
            layout = "bhsd" if ("bias" in feat or "mask" in feat) else "bshd"
            cases.append(dict(size=size, feat=feat, dtype=dtype, layout=layout, backend="cpu", env=env))
    for size, feat, dtype in itertools.product(sizes[:3], features[:6], ["fp32", "fp16"]):
        if "bias" in feat:
            continue
        cases.append(dict(size=size, feat=feat, dtype=dtype, layout="bshd", backend="triton"))
    for feat in features[:3]:
        cases.append(dict(size=sizes[1], feat=feat, dtype="fp64", layout="bshd", backend="reference"))
    return cases


def _name(case: dict) -> str:
    env = case.get("env")
    return (f"{case['backend']}-{case['dtype']}-{case['layout']}-{'x'.join(map(str, case['size']))}-"
            f"{','.join(f'{k}={v}' for k, v in sorted(case['feat'].items())) or 'plain'}"
            + "".join(f"-{name}={value}" for name, value in env or ()))


def _run(case: dict) -> dict[str, torch.Tensor]:
    b, sq, sk, h, hk, d = case["size"]
    dtype, feat, layout = DTYPES[case["dtype"]], case["feat"], case["layout"]
    gen = torch.Generator().manual_seed(zlib.crc32(_name(case).encode()))

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    if layout == "bshd":
        q, k, v = randn(b, sq, h, d), randn(b, sk, hk, d), randn(b, sk, hk, d)
    else:
        q, k, v = randn(b, h, sq, d), randn(b, hk, sk, d), randn(b, hk, sk, d)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    extra = {}
    env = case.get("env") or ()
    for name, value in env:
        os.environ[name] = value
    if env:
        _C.reload_cpu_switches()  # (the kernels read the switches once)
    try:
        torch.manual_seed(1234)
        if layout == "bshd":
            if "alibi" in feat:
                extra["alibi_slopes"] = torch.rand(h, generator=gen) * 0.5
            out, lse, _ = flashattn_py.flash_attn_func(
                q, k, v, dropout_p=feat.get("dropout", 0.0), causal=feat.get("causal", False),
                window_size=feat.get("window", (-1, -1)), softcap=feat.get("softcap", 0.0),
                alibi_slopes=extra.get("alibi_slopes"), return_attn_probs=True, backend=case["backend"])
        else:
            mask = None
            if "bias" in feat:
                mask = randn(1, h, sq, sk).requires_grad_()
                leaves.append(mask)
            elif "mask" in feat:
                mask = torch.rand(b, 1, sq, sk, generator=gen) > 0.3
            with flashattn_py.use_backend(case["backend"]):
                out = flashattn_py.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, dropout_p=feat.get("dropout", 0.0), is_causal=feat.get("causal", False),
                    enable_gqa=h != hk)
            lse = None
        dout = torch.randn(out.shape, generator=gen).to(dtype)
        out.backward(dout)
    finally:
        for name, _ in env:
            del os.environ[name]
        if env:
            _C.reload_cpu_switches()
    result = {"out": out.detach()}
    if lse is not None:
        result["lse"] = lse.detach()
    for name, t in zip(("dq", "dk", "dv", "dbias"), leaves):
        result[name] = t.grad
    return result


def main() -> int:
    mode, path = sys.argv[1], sys.argv[2]
    cases = _cases()
    results = {}
    for case in cases:
        results[_name(case)] = _run(case)
    if mode == "record":
        torch.save(results, path)
        print(f"recorded {len(results)} cases ({sum(len(r) for r in results.values())} tensors) to {path}")
        return 0
    want = torch.load(path)
    differ = []
    for name, tensors in want.items():
        got = results.get(name)
        for key, t in tensors.items():
            if got is None or key not in got or not torch.equal(got[key], t) or got[key].stride() != t.stride():
                differ.append(f"{name}: {key}")
    missing = set(results) - set(want)
    print(f"compared {len(want)} cases: {len(differ)} tensors differ; {len(missing)} new cases not in the record")
    for line in differ[:40]:
        print("  differs:", line)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())

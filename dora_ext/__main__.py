"""`python -m dora_ext`: check the fused path against eager and float64, and time both.

On a machine without a GPU it runs the eager path on the CPU at a small size.
"""
from __future__ import annotations

import argparse
import json

import torch

import dora_ext
from dora_ext._timing import median_ms


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--d-in", type=int, default=4096 if cuda else 512)
    p.add_argument("--d-out", type=int, default=4096 if cuda else 512)
    p.add_argument("--rank", type=int, default=64 if cuda else 16)
    p.add_argument("--tokens", type=int, default=4096 if cuda else 256)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16" if cuda else "fp32")
    args = p.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    device = "cuda" if cuda else "cpu"
    print(json.dumps(dora_ext.info(), indent=1))

    torch.manual_seed(0)
    d_in, d_out, r, T = args.d_in, args.d_out, args.rank, args.tokens
    W = torch.randn(d_out, d_in, dtype=torch.float64) * d_in ** -0.5
    A = torch.randn(r, d_in, dtype=torch.float64) * d_in ** -0.5
    B = torch.randn(d_out, r, dtype=torch.float64) * 0.05
    m = (W + 2.0 * B @ A).norm(dim=1) * (1 + 0.1 * torch.randn(d_out, dtype=torch.float64))
    x = torch.randn(T, d_in, dtype=torch.float64)
    Wp = W + 2.0 * B @ A
    ref = (x @ Wp.T) * (m / Wp.norm(dim=1))
    args_dev = [t.to(device, dtype) for t in (x, W)] + [None] + [t.to(device, dtype) for t in (A, B)] + [m.to(device)]

    results = {}
    for tier in (["fused", "eager"] if cuda else ["eager"]):
        with torch.no_grad(), dora_ext.overrides(tier=tier):
            y = dora_ext.dora_linear(*args_dev, 2.0)
            err = ((y.double().cpu() - ref).norm() / ref.norm()).item()
            ms = median_ms(lambda: dora_ext.dora_linear(*args_dev, 2.0), reps=20)
            results[tier] = (dora_ext.last_tier()[0], err, ms)
    print(f"\nDoRA linear d_in={d_in} d_out={d_out} r={r} tokens={T} {args.dtype} on {device}")
    print(f"{'path':<8} {'tier':<16} {'rel. error vs float64':>22} {'median ms':>10}")
    for name, (tier, err, ms) in results.items():
        print(f"{name:<8} {tier:<16} {err:>22.2e} {ms:>10.3f}")


if __name__ == "__main__":
    main()

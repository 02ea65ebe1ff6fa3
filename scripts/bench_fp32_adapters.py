#!/usr/bin/env python3
"""Measure both routes of float32 adapters on a bfloat16 layer (PEFT's default mix) side by side.

(a) tensor cores over exact bfloat16 parts of the float32 operands (option ``fp32_parts_min_tokens=0``),
    made by the parts kernel (triton_src/parts.py) where the build has cubins for the GPU (the table's
    first line says whether), else by ATen ops;
(b) float32 GEMMs (the limit set above every token count), as PEFT computes them;
(c) the library's default (the parts from 2048 tokens).
Per layer shape and token count: the inference forward (cached norm) and the training step
(forward + backward, the norm recomputed from the cached ||W||^2 after an in-place update of B),
medians of ``triton.testing.do_bench`` (scripts/timing.py), and the relative error of (a) against (b)
for the output and the gradients of A and B. Writes ``fp32_adapters.json`` and ``fp32_adapters.md``.

    python3 scripts/bench_fp32_adapters.py --out R [--tokens 1 512 2048 4096] [--rank 384]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch
import triton

if importlib.util.find_spec("dora_ext") is None:  # not installed: use the checkout (built in place)
    sys.path.append(str(Path(__file__).resolve().parents[1]))
import dora_ext  # noqa: E402
from timing import median_ms  # noqa: E402  (scripts/timing.py)

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # d_in x d_out
ROUTES = {"(a) bf16 parts": 0, "(b) fp32 GEMMs": 1 << 40, "(c) default": None}


def _layer(d_in: int, d_out: int, rank: int, tokens: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    def rnd(*shape, std=1.0, dtype=torch.float32):
        return (torch.randn(*shape, generator=gen, device="cuda") * std).to(dtype)
    W = rnd(d_out, d_in, std=d_in ** -0.5, dtype=torch.bfloat16)
    A = rnd(rank, d_in, std=d_in ** -0.5).requires_grad_(True)
    B = rnd(d_out, rank, std=0.01).requires_grad_(True)
    m = (W.float().norm(dim=1) * 1.1).requires_grad_(True)
    x = rnd(tokens, d_in, dtype=torch.bfloat16).requires_grad_(True)
    return dict(x=x, weight=W, bias=None, lora_A=A, lora_B=B, magnitude=m, scale=2.0)


def _step(inp: dict, gy: torch.Tensor) -> None:
    with torch.no_grad():
        inp["lora_B"].add_(0.0)  # a new version of B each step: the norm is recomputed, as after an optimizer step
    inp["x"].grad = inp["lora_A"].grad = inp["lora_B"].grad = inp["magnitude"].grad = None
    dora_ext.dora_linear(**inp).backward(gy)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 16, 128, 512, 1024, 2048, 4096])
    p.add_argument("--rank", type=int, default=384)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for d_in, d_out in SHAPES:
        for tokens in args.tokens:
            inp = _layer(d_in, d_out, args.rank, tokens)
            gy = torch.randn(tokens, d_out, device="cuda", dtype=torch.bfloat16)
            row = {"shape": f"{d_in}x{d_out}", "tokens": tokens, "rank": args.rank}
            results = {}
            for name, limit in ROUTES.items():
                with dora_ext.options(fp32_parts_min_tokens=limit):
                    with torch.no_grad():
                        row[f"{name} infer ms"] = median_ms(lambda: dora_ext.dora_linear(**inp))
                    row[f"{name} step ms"] = median_ms(lambda: _step(inp, gy))
                    with torch.no_grad():
                        y = dora_ext.dora_linear(**inp)
                    inp["lora_B"].grad = inp["lora_A"].grad = None
                    dora_ext.dora_linear(**inp).backward(gy)
                results[name] = (y, inp["lora_A"].grad.clone(), inp["lora_B"].grad.clone())
            (ya, gAa, gBa), (yb, gAb, gBb) = results["(a) bf16 parts"], results["(b) fp32 GEMMs"]
            rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()  # noqa: E731
            row["rel err y (a) vs (b)"] = rel(ya, yb)
            row["rel err dA (a) vs (b)"] = rel(gAa, gAb)
            row["rel err dB (a) vs (b)"] = rel(gBa, gBb)
            print(json.dumps(row), flush=True)
            rows.append(row)
    parts_kernel = torch.ops.dora_ext.fused_available.default(torch.cuda.current_device())[0]
    meta = (f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
            f"bf16 x and W, fp32 A, B and magnitude, r = {args.rank}; parts made by "
            f"{'the parts kernel' if parts_kernel else 'ATen ops (no cubin for this GPU)'}; "
            f"median ms (triton.testing.do_bench)")
    keys = list(rows[0].keys())
    lines = [meta, "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    (args.out / "fp32_adapters.md").write_text("\n".join(lines) + "\n")
    (args.out / "fp32_adapters.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

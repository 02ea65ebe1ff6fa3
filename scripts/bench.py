#!/usr/bin/env python3
"""Layer-level DoRA benchmark on one CUDA GPU: dora_ext (fused and eager) against
Hugging Face PEFT's DoRA and LoRA and a plain nn.Linear, in one run.

For every shape (d_in x d_out), token count T, rank r and dtype it times, as
medians of triton.testing.do_bench:
  fwd      inference forward (no grad)
  fwd+bwd  forward and backward (adapters trainable, base frozen)
  norm     dora_ext.row_norm alone
and reports peak extra memory of a training step and the ratio to the FLOP
floor, with the GEMM rate measured in the same run. Writes JSON and a markdown
table to --out.

    python scripts/bench.py --out bench_results
    python scripts/bench.py --shapes 4096x4096 --tokens 4096 --ranks 384 --dtypes bf16
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn as nn
from triton.testing import do_bench

import dora_ext

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_SHAPES = ["4096x4096", "4096x14336", "14336x4096", "8192x8192", "5120x27648"]


def median_ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def gemm_tflops(dtype: torch.dtype) -> float:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = median_ms(lambda: a @ b)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def copy_tbps() -> float:
    a = torch.empty(1 << 30, device="cuda", dtype=torch.uint8)
    b = torch.empty_like(a)
    ms = median_ms(lambda: b.copy_(a))
    return 2 * a.numel() / (ms * 1e-3) / 1e12


def peft_layer(base: nn.Linear, r: int, use_dora: bool) -> nn.Module:
    """PEFT's own LoRA/DoRA Linear around `base`, adapters in the base dtype."""
    from peft import LoraConfig, get_peft_model

    model = nn.Sequential(base)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"], use_dora=use_dora, lora_dropout=0.0)
    peft_model = get_peft_model(model, cfg, autocast_adapter_dtype=False)
    layer = peft_model.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.02)  # non-trivial adapter (PEFT inits B to 0)
    return layer.to(base.weight.dtype)


def step_fn(module_or_fn, x):
    def run():
        y = module_or_fn(x)
        y.backward(torch.ones_like(y))
    return run


def peak_extra_mib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2 ** 20


def bench_case(d_in, d_out, T, r, dtype, tflops, tbps, with_peft) -> dict:
    torch.manual_seed(0)
    dev = "cuda"
    base = nn.Linear(d_in, d_out, bias=False, device=dev, dtype=dtype).requires_grad_(False)
    W = base.weight
    A = (torch.randn(r, d_in, device=dev, dtype=dtype) * d_in ** -0.5).requires_grad_(True)
    B = (torch.randn(d_out, r, device=dev, dtype=dtype) * 0.02).requires_grad_(True)
    s = 2.0
    m = dora_ext.row_norm(W, A.detach(), B.detach(), s).clone().requires_grad_(True)
    x = torch.randn(T, d_in, device=dev, dtype=dtype)
    xg = x.clone().requires_grad_(True)

    def ours(inp):
        return dora_ext.dora_linear(inp, W, None, A, B, m, s)

    row = {"d_in": d_in, "d_out": d_out, "T": T, "r": r, "dtype": str(dtype).split(".")[-1]}
    fwd_flops = 2 * T * d_in * d_out + 2 * T * r * (d_in + d_out)
    norm_flops = 2 * d_out * d_in * r
    step_flops = 2 * (2 * T * d_in * d_out) + 3 * 2 * T * r * (d_in + d_out)
    row["floor_fwd_ms"] = (fwd_flops + norm_flops) / (tflops * 1e12) * 1e3
    row["floor_step_ms"] = (step_flops + norm_flops) / (tflops * 1e12) * 1e3
    # The norm reads W once at least: at small r that, not the FLOPs, is its floor.
    w_bytes = d_out * d_in * W.element_size()
    row["floor_norm_ms"] = max(norm_flops / (tflops * 1e12), w_bytes / (tbps * 1e12)) * 1e3

    def timed(name, fwd, step):
        with torch.no_grad():
            row[f"{name}_fwd_ms"] = median_ms(lambda: fwd(x))
        if step is not None:
            row[f"{name}_step_ms"] = median_ms(step)
            row[f"{name}_step_peak_mib"] = peak_extra_mib(step)

    timed("linear", base, None)
    row["linear_step_ms"] = median_ms(step_fn(base, xg))
    for tier in ("fused", "eager"):
        os.environ["DORA_EXT_TIER"] = tier
        timed(f"dora_ext_{tier}", ours, step_fn(ours, xg))
    os.environ.pop("DORA_EXT_TIER")
    row["row_norm_ms"] = median_ms(lambda: dora_ext.row_norm(W, A.detach(), B.detach(), s))
    if with_peft:
        for name, use_dora in (("peft_lora", False), ("peft_dora", True)):
            layer = peft_layer(nn.Linear(d_in, d_out, bias=False, device=dev, dtype=dtype).requires_grad_(False), r,
                               use_dora)
            timed(name, layer, step_fn(layer, xg))
            del layer
    for k in [k for k in row if k.endswith("_ms") and not k.startswith("floor")]:
        kind = "norm" if k == "row_norm_ms" else ("fwd" if k.endswith("_fwd_ms") else "step")
        row[k.replace("_ms", "_x_floor")] = row[k] / row[f"floor_{kind}_ms"]
    torch.cuda.empty_cache()
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    cols = ["linear", "peft_lora", "peft_dora", "dora_ext_eager", "dora_ext_fused"]
    lines = [f"GPU: {meta['gpu']}; torch {meta['torch']}; triton {meta['triton']}; peft {meta['peft']}; "
             f"measured bf16 GEMM {meta['gemm_tflops']:.0f} TFLOP/s, copy {meta['copy_tbps']:.2f} TB/s; "
             f"median ms (x FLOP floor)", ""]
    for kind in ("fwd", "step"):
        lines.append(f"**{'inference forward' if kind == 'fwd' else 'forward+backward'}**")
        lines.append("")
        lines.append("| d_in x d_out | T | r | dtype | floor | " + " | ".join(cols) + " |")
        lines.append("|---" * (5 + len(cols)) + "|")
        for row in rows:
            cells = []
            for c in cols:
                ms = row.get(f"{c}_{kind}_ms")
                cells.append("—" if ms is None else f"{ms:.3f} ({row[f'{c}_{kind}_x_floor']:.2f}×)")
            lines.append(f"| {row['d_in']}×{row['d_out']} | {row['T']} | {row['r']} | {row['dtype']} | "
                         f"{row[f'floor_{kind}_ms']:.3f} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("**row_norm and training peak extra memory (MiB)**")
    lines.append("")
    lines.append("| d_in x d_out | T | r | dtype | row_norm ms (x floor) | peft_lora | peft_dora | dora_ext_eager | dora_ext_fused |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        mem = [f"{row[f'{c}_step_peak_mib']:.0f}" if f"{c}_step_peak_mib" in row else "—"
               for c in ("peft_lora", "peft_dora", "dora_ext_eager", "dora_ext_fused")]
        lines.append(f"| {row['d_in']}×{row['d_out']} | {row['T']} | {row['r']} | {row['dtype']} | "
                     f"{row['row_norm_ms']:.3f} ({row['row_norm_x_floor']:.1f}×) | " + " | ".join(mem) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench_results"))
    p.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="d_inxd_out, e.g. 4096x14336")
    p.add_argument("--tokens", nargs="+", type=int, default=[4096])
    p.add_argument("--ranks", nargs="+", type=int, default=[384])
    p.add_argument("--dtypes", nargs="+", default=["bf16"], choices=list(DTYPES))
    p.add_argument("--no-peft", action="store_true", help="skip the PEFT columns")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        import peft
        peft_version = peft.__version__
    except ImportError:
        peft_version, args.no_peft = "not installed", True
    import triton
    meta = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
            "peft": peft_version, "date": time.strftime("%Y-%m-%d"),
            "gemm_tflops": gemm_tflops(torch.bfloat16), "copy_tbps": copy_tbps()}
    rows = []
    for dt in args.dtypes:
        for shape in args.shapes:
            d_in, d_out = map(int, shape.split("x"))
            for T in args.tokens:
                for r in args.ranks:
                    rows.append(bench_case(d_in, d_out, T, r, DTYPES[dt], meta["gemm_tflops"], meta["copy_tbps"],
                                           not args.no_peft))
                    print(json.dumps(rows[-1]), flush=True)
    (args.out / "bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    table = markdown(rows, meta)
    (args.out / "bench.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()

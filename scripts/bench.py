#!/usr/bin/env python3
"""Layer-level DoRA benchmark on one CUDA GPU: dora_ext (fused and eager) against
Hugging Face PEFT's DoRA and LoRA and a plain nn.Linear, in one run.

For every shape (d_in x d_out), token count T, rank r and dtype it times, as
medians of triton.testing.do_bench (scripts/timing.py):
  fwd      inference forward (no grad); dora_ext with its norm cache warm (the
           weights do not change in inference), PEFT recomputing its norm as it does
  fwd+bwd  forward and backward (adapters trainable, base frozen); dora_ext recomputes
           its norm every step, as after an optimizer step (||W||^2 stays cached: W is frozen)
  norm     dora_ext.row_norm alone after an optimizer step (||W||^2 cached)
and reports peak extra memory of a training step and the ratio to the floor:
FLOPs at the bf16/fp16 GEMM rate and bytes at the copy bandwidth, both measured in
the same run (the larger of the two). Training steps are timed for T >= 512 only
(decode sizes are inference). Writes bench.json and bench.md to --out, and
bench.png when matplotlib is importable (else: --plot DIR/bench.json elsewhere).

    python scripts/bench.py --out bench_results                     # the full grid
    python scripts/bench.py --shapes 4096x4096 --tokens 4096 --ranks 384 --dtypes bf16
    python scripts/bench.py --plot bench_results/bench.json          # PNG from a saved run
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch.autograd.graph import increment_version

import dora_ext
from timing import median_ms  # scripts/timing.py

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_SHAPES = ["4096x4096", "4096x14336", "14336x4096", "8192x8192", "5120x27648"]
# The default grid: (tokens, ranks, dtypes) groups run over every shape.
DEFAULT_GRID = [
    ([4096], [16, 64, 384, 768], ["bf16"]),
    ([4096], [384], ["fp16"]),
    ([1, 16, 128], [16, 384], ["bf16"]),
]
MIN_TRAINING_TOKENS = 512


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


def step_fn(module_or_fn, x, new_adapter=None):
    """A training step; ``new_adapter`` (a tensor) gets its version bumped first, as an
    optimizer step would, so dora_ext recomputes the norm (||W||^2 stays cached)."""
    def run():
        if new_adapter is not None:
            increment_version(new_adapter)
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
    training = T >= MIN_TRAINING_TOKENS

    def ours(inp):
        return dora_ext.dora_linear(inp, W, None, A, B, m, s)

    row = {"d_in": d_in, "d_out": d_out, "T": T, "r": r, "dtype": str(dtype).split(".")[-1]}
    el = W.element_size()
    rate, bw = tflops * 1e12, tbps * 1e12
    norm_flops = 2 * d_out * d_in * r
    lora_bytes = (d_in + d_out) * r * el
    # Inference with a cached norm: the GEMMs, or one read of W, x, y and the adapters.
    fwd_flops = 2 * T * d_in * d_out + 2 * T * r * (d_in + d_out)
    fwd_bytes = (d_out * d_in + T * (d_in + d_out)) * el + lora_bytes
    # A training step: forward and backward GEMMs plus one norm (W read twice, x, y, gy, gx).
    step_flops = 2 * (2 * T * d_in * d_out) + 3 * 2 * T * r * (d_in + d_out) + norm_flops
    step_bytes = (2 * d_out * d_in + 2 * T * (d_in + d_out)) * el + 3 * lora_bytes
    row["floor_fwd_ms"] = max(fwd_flops / rate, fwd_bytes / bw) * 1e3
    row["floor_step_ms"] = max(step_flops / rate, step_bytes / bw) * 1e3
    # The norm reads W once at least: at small r that, not the FLOPs, is its floor.
    row["floor_norm_ms"] = max(norm_flops / rate, d_out * d_in * el / bw) * 1e3

    def timed(name, fwd, step):
        with torch.no_grad():
            row[f"{name}_fwd_ms"] = median_ms(lambda: fwd(x))
        if step is not None and training:
            row[f"{name}_step_ms"] = median_ms(step)
            row[f"{name}_step_peak_mib"] = peak_extra_mib(step)

    timed("linear", base, None)
    if training:
        row["linear_step_ms"] = median_ms(step_fn(base, xg))
    for tier in ("fused", "eager"):
        with dora_ext.overrides(tier=tier):
            with torch.no_grad():
                ours(x)  # warm the norm cache: inference reuses the norm
                row[f"dora_ext_{tier}_fwd_ms"] = median_ms(lambda: ours(x))
            if training:  # every step pays for its norm
                row[f"dora_ext_{tier}_step_ms"] = median_ms(step_fn(ours, xg, A))
                row[f"dora_ext_{tier}_step_peak_mib"] = peak_extra_mib(step_fn(ours, xg, A))
            # after an optimizer step: ||W||^2 cached, the norm not
            row[f"row_norm_{tier}_ms"] = median_ms(lambda: (increment_version(A), dora_ext.row_norm(W, A, B, s)))
    if with_peft:
        for name, use_dora in (("peft_lora", False), ("peft_dora", True)):
            layer = peft_layer(nn.Linear(d_in, d_out, bias=False, device=dev, dtype=dtype).requires_grad_(False), r,
                               use_dora)
            timed(name, layer, step_fn(layer, xg))
            del layer
    for k in [k for k in row if k.endswith("_ms") and not k.startswith("floor")]:
        kind = "norm" if k.startswith("row_norm") else ("fwd" if k.endswith("_fwd_ms") else "step")
        row[k.replace("_ms", "_x_floor")] = row[k] / row[f"floor_{kind}_ms"]
    for k in [k for k in row if k.endswith("_fwd_ms")]:
        row[k.replace("_fwd_ms", "_fwd_x_linear")] = row[k] / row["linear_fwd_ms"]
    torch.cuda.empty_cache()
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    cols = ["linear", "peft_lora", "peft_dora", "dora_ext_eager", "dora_ext_fused"]
    lines = [f"GPU: {meta['gpu']}; torch {meta['torch']}; triton {meta['triton']}; peft {meta['peft']}; "
             f"measured bf16 GEMM {meta['gemm_tflops']:.0f} TFLOP/s, copy {meta['copy_tbps']:.2f} TB/s; "
             f"median ms (x floor)", ""]
    for kind, title in (("fwd", "inference forward (dora_ext: cached norm)"),
                        ("step", "forward+backward (dora_ext: norm recomputed every step)")):
        kind_rows = [row for row in rows if f"dora_ext_fused_{kind}_ms" in row]
        if not kind_rows:
            continue
        lines += [f"**{title}**", ""]
        extra = " fused / linear |" if kind == "fwd" else ""
        lines.append("| d_in x d_out | T | r | dtype | floor | " + " | ".join(cols) + " |" + extra)
        lines.append("|---" * (5 + len(cols) + (kind == "fwd")) + "|")
        for row in kind_rows:
            cells = []
            for c in cols:
                ms = row.get(f"{c}_{kind}_ms")
                cells.append("—" if ms is None else f"{ms:.3f} ({row[f'{c}_{kind}_x_floor']:.2f}×)")
            tail = f" {row['dora_ext_fused_fwd_x_linear']:.2f} |" if kind == "fwd" else ""
            lines.append(f"| {row['d_in']}×{row['d_out']} | {row['T']} | {row['r']} | {row['dtype']} | "
                         f"{row[f'floor_{kind}_ms']:.3f} | " + " | ".join(cells) + " |" + tail)
        lines.append("")
    lines += ["**row_norm (uncached) and training peak extra memory (MiB)**", "",
              "| d_in x d_out | r | dtype | norm floor | row_norm fused | row_norm eager | "
              "peft_lora | peft_dora | dora_ext_eager | dora_ext_fused |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "dora_ext_fused_step_ms" not in row:
            continue
        mem = [f"{row[f'{c}_step_peak_mib']:.0f}" if f"{c}_step_peak_mib" in row else "—"
               for c in ("peft_lora", "peft_dora", "dora_ext_eager", "dora_ext_fused")]
        norms = [f"{row[f'row_norm_{t}_ms']:.3f} ({row[f'row_norm_{t}_x_floor']:.2f}×)" for t in ("fused", "eager")]
        lines.append(f"| {row['d_in']}×{row['d_out']} | {row['r']} | {row['dtype']} | {row['floor_norm_ms']:.3f} | "
                     + " | ".join(norms) + " | " + " | ".join(mem) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], meta: dict, path: Path) -> bool:
    """Bar charts of x floor per shape (training at T=4096, r=384, bf16; decode T=1 vs nn.Linear)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib not installed, no PNG (run --plot on bench.json where it is)")
        return False
    cols = ["peft_lora", "peft_dora", "dora_ext_eager", "dora_ext_fused"]
    panels = [("step", lambda r: r["T"] == 4096 and r["r"] == 384 and r["dtype"] == "bfloat16", "x floor",
               "forward+backward, T=4096, r=384, bf16"),
              ("fwd", lambda r: r["T"] == 4096 and r["r"] == 384 and r["dtype"] == "bfloat16", "x floor",
               "inference forward, T=4096, r=384, bf16"),
              ("fwd", lambda r: r["T"] == 1 and r["r"] == 384 and r["dtype"] == "bfloat16", "x nn.Linear",
               "decode forward, T=1, r=384, bf16")]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5))
    for ax, (kind, keep, unit, title) in zip(axes, panels):
        sel = [r for r in rows if keep(r) and f"dora_ext_fused_{kind}_ms" in r]
        width = 0.8 / len(cols)
        for i, c in enumerate(cols):
            key = f"{c}_{kind}_x_linear" if unit == "x nn.Linear" else f"{c}_{kind}_x_floor"
            ax.bar([j + i * width for j in range(len(sel))], [r.get(key, 0.0) for r in sel], width, label=c)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sel))])
        ax.set_xticklabels([f"{r['d_in']}x{r['d_out']}" for r in sel], rotation=20, fontsize=8)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylabel(unit)
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{meta['gpu']}, torch {meta['torch']}, triton {meta['triton']} ({meta['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench_results"))
    p.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="d_inxd_out, e.g. 4096x14336")
    p.add_argument("--tokens", nargs="+", type=int, help="token counts (default: the grid in DEFAULT_GRID)")
    p.add_argument("--ranks", nargs="+", type=int)
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES))
    p.add_argument("--no-peft", action="store_true", help="skip the PEFT columns")
    p.add_argument("--plot", type=Path, help="only draw bench.png next to this saved bench.json")
    args = p.parse_args()
    if args.plot:
        saved = json.loads(args.plot.read_text())
        plot(saved["rows"], saved["meta"], args.plot.with_suffix(".png"))
        return
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
    custom = args.tokens or args.ranks or args.dtypes
    grid = [(args.tokens or [4096], args.ranks or [384], args.dtypes or ["bf16"])] if custom else DEFAULT_GRID
    rows = []
    for tokens, ranks, dtypes in grid:
        for dt in dtypes:
            for shape in args.shapes:
                d_in, d_out = map(int, shape.split("x"))
                for T in tokens:
                    for r in ranks:
                        rows.append(bench_case(d_in, d_out, T, r, DTYPES[dt], meta["gemm_tflops"],
                                               meta["copy_tbps"], not args.no_peft))
                        print(json.dumps(rows[-1]), flush=True)
    (args.out / "bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    table = markdown(rows, meta)
    (args.out / "bench.md").write_text(table)
    plot(rows, meta, args.out / "bench.png")
    print(table)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Tune the tile config of the mixed-batch LoRA kernel on the current GPU (development tool).

Runs triton_src/decode.py's ``dora_mixed_lora_kernel`` (dora_linear_mixed above decode sizes: every
row's adapter applied over the base output z = x W^T) through Triton's JIT (this script only: the
library ships AOT cubins) for each candidate (BLOCK_M, BLOCK_N, BLOCK_R, warps, stages) on the
serving benchmark's prefill: --rows rows of --per-row tokens, one adapter per row, 8 bf16 adapters of
ranks 16..64 stacked along the rank as csrc/adapter_stack.cpp stacks them, at the decoder's output
widths. Each config's output is checked against the shipped config's, and its time is printed next
to its floor: a copy of z (the kernel reads and writes z once; the adapters' products are small).
Copy a winner into MIXED_LORA_TILE / MIXED_LORA_BLOCK_R (and the spec's num_warps / num_stages) in
triton_src/specs.py.

    python3 scripts/tune_mixed_lora.py --out tune_mixed_lora

Writes OUT/tune_mixed_lora.json and OUT/tune_mixed_lora.md (the table, also printed).
"""
from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path
from typing import Any, Optional

import torch
import triton

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
from bench_model import run_and_save  # noqa: E402  (scripts/bench_model.py)
from timing import median_ms  # noqa: E402  (scripts/timing.py)
from triton_src.decode import dora_mixed_lora_kernel  # noqa: E402
from triton_src.specs import MIXED_LORA_BLOCK_R, MIXED_LORA_TILE  # noqa: E402

WIDTHS = [1024, 4096, 14336]  # the 8B-dims decoder's output widths (k/v, q/o/down, gate/up)
SHIPPED = (MIXED_LORA_TILE["BLOCK_M"], MIXED_LORA_TILE["BLOCK_N"], MIXED_LORA_BLOCK_R[False], 8, 2)
CANDIDATES = [  # (BLOCK_M, BLOCK_N, BLOCK_R, warps, stages)
    SHIPPED, (64, 128, 32, 4, 2), (64, 256, 32, 8, 2), (128, 128, 32, 8, 2), (128, 256, 32, 8, 2),
    (64, 128, 16, 4, 3), (64, 128, 64, 8, 2), (32, 256, 32, 4, 2), (128, 64, 32, 4, 2), (64, 64, 32, 4, 2),
    (128, 128, 32, 8, 3), (64, 256, 32, 8, 3), (256, 128, 32, 8, 2),
]
# The kernel reads h and B in whole BLOCK_R tiles: the stack is padded to a multiple of every
# candidate's BLOCK_R (the library pads to csrc/adapter_stack.cpp's kRankQuantum).
RANK_QUANTUM = max(config[2] for config in CANDIDATES)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for tune_mixed_lora.json")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--per-row", type=int, default=512, help="tokens per row")
    p.add_argument("--adapters", type=int, default=8)
    return p.parse_args(argv)


def inputs(args: argparse.Namespace, n_cols: int) -> dict[str, Any]:
    """z, h, B_cat, G and the row table of a stacked mixed batch (csrc/mixed_row_table.cpp's layout:
    per leading row its row of G, its columns [lo, hi) and the float32 bits of its scale)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    n = args.adapters
    ranks = [round(16 + 48 * k / max(n - 1, 1)) for k in range(n)]
    columns = [0]
    for r in ranks:
        columns.append(columns[-1] + r)
    rank = -(-columns[-1] // RANK_QUANTUM) * RANK_QUANTUM
    tokens = args.rows * args.per_row
    table = []
    for i in range(args.rows):
        k = i % n
        table.append([k, columns[k], columns[k + 1], struct.unpack("<i", struct.pack("<f", 2.0))[0]])

    def rand(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device="cuda").to(dtype)

    return {"z": rand(tokens, n_cols), "h": rand(tokens, rank), "b": rand(n_cols, rank) * 0.1,
            "g": rand(n + 1, n_cols, dtype=torch.float32).abs() + 0.5,
            "rows": torch.tensor(table, dtype=torch.int32, device="cuda"), "tokens": tokens, "rank": rank}


def launch(t: dict[str, Any], y: torch.Tensor, per_row: int, config: tuple) -> None:
    block_m, block_n, block_r, warps, stages = config
    n_cols = t["z"].shape[1]
    grid = (triton.cdiv(t["tokens"], block_m), triton.cdiv(n_cols, block_n))
    dora_mixed_lora_kernel[grid](
        t["z"], t["h"], t["b"], t["g"], t["rows"], t["g"], y,  # bias unused (HAS_BIAS=False)
        t["tokens"], n_cols, per_row, t["z"].stride(0),
        t["h"].stride(0), t["b"].stride(0), t["g"].stride(0), y.stride(0), HAS_BIAS=False, FP32_ADAPTERS=False,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, num_warps=warps, num_stages=stages)


def run(args: argparse.Namespace) -> dict[str, Any]:
    results = []
    for n_cols in WIDTHS:
        t = inputs(args, n_cols)
        y = torch.empty_like(t["z"])
        copy_ms = median_ms(lambda: y.copy_(t["z"]))
        launch(t, y, args.per_row, SHIPPED)
        reference = y.clone()
        for config in CANDIDATES:
            y.zero_()
            launch(t, y, args.per_row, config)
            error = ((y.float() - reference.float()).abs().max() / reference.float().abs().max()).item()
            ms = median_ms(lambda: launch(t, y, args.per_row, config))
            row = {"n_cols": n_cols, "config": list(config), "ms": ms, "copy_ms": copy_ms, "vs_copy": ms / copy_ms,
                   "max_rel_diff_vs_shipped": error, "shipped": config == SHIPPED}
            print(json.dumps(row), flush=True)
            results.append(row)
    return {"setup": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                      **vars(args)}, "results": results}


def markdown(result: dict[str, Any]) -> str:
    lines = ["| d_out | BLOCK_M, BLOCK_N, BLOCK_R, warps, stages | ms | copy of z, ms | × copy | max rel diff |",
             "|---|---|---|---|---|---|"]
    for r in result["results"]:
        mark = " (shipped)" if r["shipped"] else ""
        lines.append(f"| {r['n_cols']} | {tuple(r['config'])}{mark} | {r['ms']:.4f} | {r['copy_ms']:.4f} | "
                     f"{r['vs_copy']:.2f} | {r['max_rel_diff_vs_shipped']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    return run_and_save(parse_args(argv), "tune_mixed_lora", run, markdown)


if __name__ == "__main__":
    main()

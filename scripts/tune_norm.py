#!/usr/bin/env python3
"""Tune the block configs of the factored-norm kernel on the current GPU (development tool).

Runs triton_src/norm.py's ``dora_norm_partials_kernel`` through Triton's JIT (this
script only: the library itself ships AOT cubins) for every candidate config of each
rank tile (the steady-state variant, ||W||^2 cached), on the layer shapes of the benchmark, and prints per rank tile
the config
with the lowest total time next to the cuBLAS ``W A^T`` GEMM and the FLOP/byte floor.
Copy the winners into NORM_CONFIGS_* in triton_src/specs.py. With ``--compare-split-rules`` it
only times the shipped configs with csrc/fused_norm.cpp's split rule next to the previous one.
With ``--breakdown`` it only writes where ``dora_ext.row_norm``'s time goes at the given ranks:
the op (uncached), the shipped partials config alone, and cuBLAS's ``W A^T`` and ``A A^T``, each
against the floor.

    python scripts/tune_norm.py --out tune_results [--dtype bf16] [--compare-split-rules]
    python scripts/tune_norm.py --out R --breakdown [--ranks 384 768]
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import triton
from timing import median_ms  # scripts/timing.py

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from triton_src.norm import dora_norm_partials_kernel  # noqa: E402

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192), (5120, 27648)]  # d_in x d_out
RANKS = {16: [16], 32: [32], 64: [64], 128: [128, 384, 768]}
CANDIDATES = {  # rank tile -> [(BLOCK_M, BLOCK_K, warps, stages)]
    16: [(128, 64, 4, 4), (64, 64, 4, 4), (128, 128, 4, 3)],
    32: [(128, 64, 4, 4), (64, 64, 4, 4), (128, 128, 4, 3)],
    64: [(64, 64, 4, 4), (128, 64, 4, 4), (128, 64, 8, 4)],
    128: [(256, 64, 8, 3), (256, 64, 8, 4), (128, 128, 8, 3), (256, 32, 8, 4)],
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


PROGRAM_OVERHEAD_COLUMNS = 256  # csrc/fused_norm.cpp's kProgramOverheadColumns


def _columns(d_in: int, splits: int) -> int:
    return -(-(-(-d_in // splits)) // 128) * 128


def splits_for(d_in: int, tiles: int, slots: int) -> tuple[int, int]:
    """csrc/fused_norm.cpp's choose_splits: the split count with the least waves x (columns per
    program + fixed cost); returns (splits, columns per split)."""
    def cost(splits: int) -> int:
        columns = _columns(d_in, splits)
        return -(-tiles * -(-d_in // columns) // slots) * (columns + PROGRAM_OVERHEAD_COLUMNS)
    best = min(range(1, max(1, d_in // 512) + 1), key=lambda s: (cost(s), s))
    k_per = _columns(d_in, best)
    return -(-d_in // k_per), k_per


def splits_two_per_sm(d_in: int, tiles: int, sms: int) -> tuple[int, int]:
    """The rule before 2026-11-28: split until the grid holds about two programs per SM
    (kept for --compare-split-rules)."""
    splits = max(1, min(-(-2 * sms // tiles), max(1, d_in // 512)))
    k_per = _columns(d_in, splits)
    return -(-d_in // k_per), k_per


def slots_for(compiled, sms: int) -> int:
    """Programs the GPU runs at once, as csrc/fused_norm.cpp counts them: per SM, as many as
    shared memory and 64 warps allow."""
    props = torch.cuda.get_device_properties(0)
    per_sm_smem = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)
    per_sm = min(per_sm_smem // max(compiled.metadata.shared, 1), 64 // compiled.metadata.num_warps)
    return sms * max(1, min(per_sm, 32))


def run(w, a, b, block_r, cfg, sms, rule=splits_for):
    """A launcher of the norm-partials kernel (||W||^2 cached) with the splits of ``rule``."""
    block_m, block_k, warps, stages = cfg
    d_out, d_in = w.shape
    rank = a.shape[0]
    rank_tiles, row_tiles = -(-rank // block_r), -(-d_out // block_m)
    gram = (a.float() @ a.float().t()).contiguous()

    def launch_with(splits, k_per, cross, wsq):
        return dora_norm_partials_kernel[(rank_tiles, row_tiles, splits)](
            w, a, b, gram, cross, wsq, d_out, d_in, rank, w.stride(0), a.stride(0), b.stride(0), k_per, 0.5,
            BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k, BLOCK_J=32,
            INPUT_KIND={torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}[w.dtype],
            WSQ=False, num_warps=warps, num_stages=stages)

    scratch = torch.empty(rank_tiles, d_out, device="cuda", dtype=torch.float32)
    compiled = launch_with(1, _columns(d_in, 1), scratch, scratch)  # compiles; gives the shared memory size
    tiles = rank_tiles * row_tiles
    splits, k_per = rule(d_in, tiles, sms if rule is splits_two_per_sm else slots_for(compiled, sms))
    cross = torch.empty(splits * rank_tiles, d_out, device="cuda", dtype=torch.float32)
    wsq = torch.empty(splits, d_out, device="cuda", dtype=torch.float32)
    return lambda: launch_with(splits, k_per, cross, wsq)


def compare_split_rules(dtype: torch.dtype, sms: int, out: Path, name: str) -> None:
    """The shipped large-smem 16-bit configs with the old and the current split rule, side by side."""
    from triton_src.specs import NORM_CONFIGS

    configs = NORM_CONFIGS[("16bit", False)]
    lines = ["| d_in×d_out | r | two per SM ms | waves ms | waves / two per SM |", "|---|---|---|---|---|"]
    for (d_in, d_out), rank in itertools.product(SHAPES, (16, 64, 384, 768)):
        block_r = min(128, max(16, 1 << (rank - 1).bit_length()))
        w = torch.randn(d_out, d_in, device="cuda", dtype=dtype)
        a = torch.randn(rank, d_in, device="cuda", dtype=dtype)
        b = torch.randn(d_out, rank, device="cuda", dtype=dtype)
        old = median_ms(run(w, a, b, block_r, configs[block_r], sms, splits_two_per_sm))
        new = median_ms(run(w, a, b, block_r, configs[block_r], sms))
        lines.append(f"| {d_in}×{d_out} | {rank} | {old:.4f} | {new:.4f} | {new / old:.2f} |")
        print(lines[-1], flush=True)
        del w, a, b
    (out / f"split_rules_{name}.md").write_text("\n".join(lines) + "\n")


def breakdown(dtype: torch.dtype, ranks: list[int], sms: int, gemm_rate: float, out: Path, name: str) -> None:
    """dora_ext.row_norm (uncached: A's version bumped before each call) next to its parts, x floor."""
    from torch.autograd.graph import increment_version

    import dora_ext
    from triton_src.specs import NORM_CONFIGS

    configs = NORM_CONFIGS[("fp32" if dtype == torch.float32 else "16bit", False)]
    lines = ["| d_in×d_out | r | floor us | row_norm | partials kernel | cuBLAS W·Aᵀ | cuBLAS A·Aᵀ us |",
             "|---|---|---|---|---|---|---|"]
    for rank, (d_in, d_out) in itertools.product(ranks, SHAPES):
        block_r = min(128, max(16, 1 << (rank - 1).bit_length()))
        w = torch.randn(d_out, d_in, device="cuda", dtype=dtype)
        a = torch.randn(rank, d_in, device="cuda", dtype=dtype) / 64
        b = torch.randn(d_out, rank, device="cuda", dtype=dtype) / 64
        floor = max(2 * d_out * d_in * rank / gemm_rate, w.numel() * w.element_size() / 3.0e12) * 1e3
        op = median_ms(lambda: (increment_version(a), dora_ext.row_norm(w, a, b, 0.5)))
        partials = median_ms(run(w, a, b, block_r, configs[block_r], sms))
        wat = median_ms(lambda: torch.mm(w, a.t()))
        aat = median_ms(lambda: a.float() @ a.float().t() if dtype == torch.float32
                        else torch.mm(a, a.t(), out_dtype=torch.float32))
        lines.append(f"| {d_in}×{d_out} | {rank} | {floor * 1e3:.1f} | {op / floor:.2f}× | {partials / floor:.2f}× | "
                     f"{wat / floor:.2f}× | {aat * 1e3:.1f} |")
        print(lines[-1], flush=True)
    (out / f"breakdown_{name}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("tune_results"))
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--compare-split-rules", action="store_true",
                        help="only time the shipped configs with the old and the current split rule")
    parser.add_argument("--breakdown", action="store_true",
                        help="only time row_norm next to its parts (shipped partials config, cuBLAS W A^T, A A^T)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[384, 768], help="ranks of --breakdown")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dtype = DTYPES[args.dtype]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    if args.compare_split_rules:
        compare_split_rules(dtype, sms, args.out, args.dtype)
        return
    n = 8192
    square = torch.randn(n, n, device="cuda", dtype=dtype)
    gemm_rate = 2 * n ** 3 / (median_ms(lambda: square @ square) * 1e-3)
    if args.breakdown:
        breakdown(dtype, args.ranks, sms, gemm_rate, args.out, args.dtype)
        return
    results, best = [], {}
    for block_r, ranks in RANKS.items():
        totals = {}
        for (d_in, d_out), rank in itertools.product(SHAPES, ranks):
            w = torch.randn(d_out, d_in, device="cuda", dtype=dtype)
            a = torch.randn(rank, d_in, device="cuda", dtype=dtype)
            b = torch.randn(d_out, rank, device="cuda", dtype=dtype)
            cublas = median_ms(lambda: torch.mm(w, a.t()))
            floor = max(2 * d_out * d_in * rank / gemm_rate, w.numel() * w.element_size() / 3.0e12) * 1e3
            for cfg in CANDIDATES[block_r]:
                try:
                    ms = median_ms(run(w, a, b, block_r, cfg, sms))
                except Exception as exc:  # out of shared memory etc.: not a candidate here
                    print(f"r{block_r} {cfg}: {type(exc).__name__}: {str(exc)[:80]}", flush=True)
                    ms = float("inf")
                totals[cfg] = totals.get(cfg, 0.0) + ms / floor
                results.append({"block_r": block_r, "cfg": cfg, "d_in": d_in, "d_out": d_out, "rank": rank,
                                "ms": ms, "cublas_WAt_ms": cublas, "floor_ms": floor})
                print(f"r{block_r} {d_in}x{d_out} r={rank} {cfg}: {ms:.4f} ms ({ms / floor:.2f}x floor), "
                      f"cuBLAS W A^T {cublas:.4f} ms", flush=True)
        best[block_r] = min(totals, key=totals.get)
        mean = totals[best[block_r]] / len(SHAPES) / len(ranks)
        print(f"best for rank tile {block_r}: {best[block_r]} (mean {mean:.2f}x floor)")
    (args.out / f"tune_norm_{args.dtype}.json").write_text(json.dumps(
        {"gpu": torch.cuda.get_device_name(), "triton": triton.__version__, "gemm_tflops": gemm_rate / 1e12,
         "best": {str(k): v for k, v in best.items()}, "results": results}, indent=1))


if __name__ == "__main__":
    main()

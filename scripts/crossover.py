#!/usr/bin/env python3
"""Measure where the fused tiers beat the eager path on this GPU and store it for the dispatcher.

Times ``dora_ext.dora_linear`` with DORA_EXT_TIER=fused and =eager over a grid of
token counts x d_out (square layers, bf16, r = 16 and 64): inference forward with
the norm cached, and a training step (forward + backward, norm recomputed). For each
tier the crossover is the smallest tokens*d_out from which fused is at least as fast
as eager (within --noise) at every larger measured size. With --write, this arch's
line in csrc/crossover_table.inc is replaced; rebuild the extension to use it.

    python scripts/crossover.py --out crossover_results --write

To support another GPU: run this there, commit the changed crossover_table.inc.
"""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

import dora_ext
from timing import median_ms  # scripts/timing.py

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "csrc" / "crossover_table.inc"
D_OUTS = [256, 512, 1024, 2048, 4096, 8192]
TOKENS = [1, 8, 64, 256, 1024, 4096]
RANKS = [16, 64]
# do_bench's budgets in ms (scripts/timing.py), shorter than its defaults: the grid takes 288 timings
WARMUP_MS, REP_MS = 10, 40


def time_point(d: int, T: int, r: int, tier: str) -> tuple[float, float]:
    """(inference ms, training-step ms) of dora_linear with d_in = d_out = d at T tokens."""
    dt, dev = torch.bfloat16, "cuda"
    W = torch.randn(d, d, device=dev, dtype=dt) * d ** -0.5
    A = (torch.randn(r, d, device=dev, dtype=dt) * d ** -0.5).requires_grad_(True)
    B = (torch.randn(d, r, device=dev, dtype=dt) * 0.02).requires_grad_(True)
    m = torch.rand(d, device=dev, dtype=dt).add_(0.5).requires_grad_(True)
    x = torch.randn(T, d, device=dev, dtype=dt, requires_grad=True)
    with dora_ext.overrides(tier=tier), torch.no_grad():
        infer = median_ms(lambda: dora_ext.dora_linear(x, W, None, A, B, m, 2.0), WARMUP_MS, REP_MS)

    def step():
        dora_ext.dora_linear(x, W, None, A, B, m, 2.0).sum().backward()
    with dora_ext.overrides(tier=tier, norm_cache=False):
        train = median_ms(step, WARMUP_MS, REP_MS)
    return infer, train


def threshold(points: list[dict], key: str, noise: float) -> int:
    """Smallest tokens*d_out from which fused / eager <= 1 + noise at every larger size."""
    ordered = sorted(points, key=lambda p: p["elements"])
    result = ordered[-1]["elements"] + 1  # fused never wins: above every measured size
    for p in reversed(ordered):
        if p[f"ratio_{key}"] > 1 + noise:
            break
        result = p["elements"]
    return 0 if result == ordered[0]["elements"] else result


def write_table(arch: int, inference: int, training: int, source: str) -> None:
    line = f'    {{{arch}, {inference}, {training}, "{source}"}},'
    lines = TABLE.read_text().splitlines()
    lines = [ln for ln in lines if not re.match(rf"\s*\{{{arch},", ln)]
    lines.append(line)
    header = [ln for ln in lines if ln.startswith("//")]
    entries = sorted((ln for ln in lines if not ln.startswith("//")), key=lambda ln: int(re.search(r"\{(\d+)", ln)[1]))
    TABLE.write_text("\n".join(header + entries) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("crossover_results"))
    parser.add_argument("--noise", type=float, default=0.03, help="relative slack for timing noise")
    parser.add_argument("--write", action="store_true", help=f"update {TABLE.relative_to(ROOT)}")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    major, minor = torch.cuda.get_device_capability()
    arch = 10 * major + minor
    points = []
    for d in D_OUTS:
        for T in TOKENS:
            p = {"d_out": d, "T": T, "elements": d * T}
            for r in RANKS:
                for tier in ("fused", "eager"):
                    p[f"{tier}_inference_r{r}"], p[f"{tier}_training_r{r}"] = time_point(d, T, r, tier)
            # The worst rank decides: a threshold must hold for every rank measured.
            for key in ("inference", "training"):
                p[f"ratio_{key}"] = max(p[f"fused_{key}_r{r}"] / p[f"eager_{key}_r{r}"] for r in RANKS)
            points.append(p)
            print(json.dumps(p), flush=True)
    inference, training = threshold(points, "inference", args.noise), threshold(points, "training", args.noise)
    gpu = torch.cuda.get_device_name()
    source = f"measured on {gpu}, {time.strftime('%Y-%m-%d')}, scripts/crossover.py"
    result = {"arch": arch, "gpu": gpu, "torch": torch.__version__, "min_elements_inference": inference,
              "min_elements_training": training, "points": points}
    (args.out / f"crossover_sm{arch}.json").write_text(json.dumps(result, indent=1))
    print(f"sm_{arch}: fused inference from tokens*d_out >= {inference}, training from >= {training}")
    if args.write:
        write_table(arch, inference, training, source)
        print(f"wrote {TABLE}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Host time of one layer call at decode sizes: what the CPU spends per call of each op.

Decoding is host-bound (scripts/profile_generate.py): a few tokens per call leave the GPU idle while
the host prepares the next launch, so the microseconds per call on the host set the tokens/s. Each
case runs --calls times back to back with no synchronisation in between (the GPU runs behind), once
for warm-up and then --reps times; the result is the median wall time per call. The GPU time of one
call (scripts/timing.py's median_ms) is printed next to it: where it is the larger, the wall time is
the GPU's, not the host's (use a smaller --dim).

Cases (x [--rows, 1, dim] bf16, W [dim, dim] bf16, --adapters adapters of ranks 16..64):
  linear        torch.nn.functional.linear (the floor: one cuBLAS call)
  dora_bf16     dora_ext.dora_linear, one bf16 DoRA adapter of rank 64
  dora_fp32     the same with float32 adapters (PEFT's default)
  mixed_bf16    dora_ext.dora_linear_mixed, every row a different bf16 DoRA adapter
  mixed_fp32    the same with float32 adapters
  peft_mixed    an accelerated PEFT DoRA layer called with adapter_names= (PEFT's serving API)

    python3 scripts/bench_host.py --out host_bench
    python3 scripts/bench_host.py --device cpu --dim 64 --calls 20 --reps 2 --out /tmp/h   # smoke test

Writes OUT/bench_host.json and OUT/bench_host.md.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

HERE = Path(__file__).resolve().parent
if importlib.util.find_spec("dora_ext") is None:  # not installed: use the checkout (built in place)
    sys.path.append(str(HERE.parent))
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
from bench_model import run_and_save  # noqa: E402  (scripts/bench_model.py)
from timing import median_ms  # noqa: E402  (scripts/timing.py)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for bench_host.json and bench_host.md")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dim", type=int, default=1024, help="d_in = d_out (small: the GPU stays ahead)")
    p.add_argument("--rows", type=int, default=8, help="rows of x, one token each")
    p.add_argument("--adapters", type=int, default=8, help="adapters of the mixed cases (one per row)")
    p.add_argument("--calls", type=int, default=2000, help="calls per timed run")
    p.add_argument("--reps", type=int, default=5, help="timed runs (the median is kept)")
    return p.parse_args(argv)


def host_us(fn: Callable[[], Any], calls: int, reps: int, device: torch.device) -> float:
    """Median over ``reps`` runs of the wall microseconds per call of ``calls`` back-to-back calls."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    runs = []
    for rep in range(reps + 1):
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        if rep > 0:  # the first run warms up
            runs.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(runs)


def cases(args: argparse.Namespace, device: torch.device) -> dict[str, Callable[[], Any]]:
    import peft

    import dora_ext
    import dora_ext.peft as dp

    gen = torch.Generator().manual_seed(0)
    dim, rows, n = args.dim, args.rows, args.adapters
    ranks = [round(16 + 48 * k / max(n - 1, 1)) for k in range(n)]

    def rand(*shape: int, dtype: torch.dtype = torch.bfloat16, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    x = rand(rows, 1, dim)
    W = rand(dim, dim, scale=dim ** -0.5)
    adapters = {dt: [(rand(r, dim, dtype=dt, scale=dim ** -0.5), rand(dim, r, dtype=dt, scale=0.1),
                      rand(dim, dtype=dt).abs() + 0.5) for r in ranks] for dt in (torch.bfloat16, torch.float32)}
    index = torch.arange(rows) % n
    scale = [2.0] * n

    def mixed(dt: torch.dtype) -> Callable[[], Any]:
        A, B, M = (list(t) for t in zip(*adapters[dt]))
        return lambda: dora_ext.dora_linear_mixed(x, W, None, A, B, M, scale, index)

    def single(dt: torch.dtype) -> Callable[[], Any]:
        A, B, M = adapters[dt][-1]
        return lambda: dora_ext.dora_linear(x, W, None, A, B, M, 2.0)

    layer_model = torch.nn.Sequential(torch.nn.Linear(dim, dim, bias=False)).to(device=device, dtype=torch.bfloat16)
    model = None
    for k, r in enumerate(ranks):
        config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"], use_dora=True)
        if model is None:
            model = peft.get_peft_model(layer_model, config, adapter_name="a0", autocast_adapter_dtype=False)
        else:
            model.add_adapter(f"a{k}", config, autocast_adapter_dtype=False)
    dp.accelerate(model)
    layer = model.base_model.model[0]
    names = [f"a{i % n}" for i in range(rows)]
    return {"linear": lambda: torch.nn.functional.linear(x, W), "dora_bf16": single(torch.bfloat16),
            "dora_fp32": single(torch.float32), "mixed_bf16": mixed(torch.bfloat16),
            "mixed_fp32": mixed(torch.float32), "peft_mixed": lambda: layer(x, adapter_names=names)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import dora_ext

    device = torch.device(args.device)
    results = []
    with torch.no_grad():
        for name, fn in cases(args, device).items():
            fn()
            row = {"case": name, "host_us": host_us(fn, args.calls, args.reps, device),
                   "gpu_us": median_ms(fn) * 1e3 if device.type == "cuda" else None,
                   "tier": list(dora_ext.last_tier()) if name != "linear" else None}
            print(json.dumps(row), flush=True)
            results.append(row)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"setup": {"gpu": gpu, "torch": torch.__version__, **vars(args)}, "results": results}


def markdown(result: dict[str, Any]) -> str:
    a = result["setup"]
    lines = [f"Host time per call ({a['gpu']}, torch {a['torch']}): x [{a['rows']}, 1, {a['dim']}] bf16, "
             f"W [{a['dim']}, {a['dim']}], {a['adapters']} adapters (ranks 16..64); median of {a['reps']} runs of "
             f"{a['calls']} calls.", "", "| case | host µs per call | GPU µs per call |", "|---|---|---|"]
    for r in result["results"]:
        gpu = "—" if r["gpu_us"] is None else f"{r['gpu_us']:.1f}"
        lines.append(f"| {r['case']} | {r['host_us']:.1f} | {gpu} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    return run_and_save(parse_args(argv), "bench_host", run, markdown)


if __name__ == "__main__":
    main()

"""Where the time of one DoRA training step goes on this GPU (torch.profiler), fused and eager tiers.

    python3 scripts/profile_step.py OUT.txt [--sizes 4096 8192] [--tokens 4096] [--rank 384]

Square layers d x d in bf16; before every step the adapter's version is bumped, as an optimizer
step does, so the norm is recomputed (||W||^2 stays cached). Prints and writes the host time per
step (launch only, and with a final sync) and the profiler's kernel table sorted by CUDA time.
With ``--ncu`` it instead runs, per size and tier, warm-up steps and then exactly one step between
``cudaProfilerStart`` / ``cudaProfilerStop``, for Nsight Compute to measure (scripts/ncu_step.sh).
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.autograd.graph import increment_version
from torch.profiler import ProfilerActivity, profile

import dora_ext


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--sizes", nargs="+", type=int, default=[4096, 8192])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--rank", type=int, default=384)
    p.add_argument("--ncu", action="store_true", help="one step per size and tier inside a profiler range")
    args = p.parse_args()
    with open(args.out, "w") as out:
        def emit(text: str) -> None:
            print(text)
            print(text, file=out, flush=True)

        for d in args.sizes:
            torch.manual_seed(0)
            W = torch.randn(d, d, device="cuda", dtype=torch.bfloat16)
            A = (torch.randn(args.rank, d, device="cuda", dtype=torch.bfloat16) * d ** -0.5).requires_grad_(True)
            B = (torch.randn(d, args.rank, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_(True)
            m = dora_ext.row_norm(W, A.detach(), B.detach(), 2.0).clone().requires_grad_(True)
            x = torch.randn(args.tokens, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)

            def step() -> None:
                increment_version(A)
                y = dora_ext.dora_linear(x, W, None, A, B, m, 2.0)
                y.backward(torch.ones_like(y))

            for tier in ("fused", "eager"):
                with dora_ext.overrides(tier=tier):
                    for _ in range(5):
                        step()
                    torch.cuda.synchronize()
                    if args.ncu:
                        torch.cuda.profiler.start()
                        step()
                        torch.cuda.synchronize()
                        torch.cuda.profiler.stop()
                        emit(f"{d}x{d} {tier}: one step profiled")
                        continue
                    n = 50
                    t0 = time.perf_counter()
                    for _ in range(n):
                        step()
                    host_ms = (time.perf_counter() - t0) / n * 1e3
                    torch.cuda.synchronize()
                    total_ms = (time.perf_counter() - t0) / n * 1e3
                    emit(f"\n## {d}x{d} {tier}: host time per step {host_ms:.3f} ms (launch only), "
                         f"{total_ms:.3f} ms incl. sync")
                    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                        for _ in range(5):
                            step()
                        torch.cuda.synchronize()
                    emit(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22,
                                                   max_name_column_width=70))


if __name__ == "__main__":
    main()

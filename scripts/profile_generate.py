#!/usr/bin/env python3
"""Where a ``generate`` step's time goes (decoding is host-bound at these sizes): host and GPU.

Builds scripts/bench_model.py's model (same arguments; default the 8B-dims 4-layer decoder in bf16)
with PEFT DoRA adapters accelerated by dora_ext.peft, then runs ``model.generate`` (greedy, KV cache)
on --batch rows of --prompt tokens for --new tokens and writes: the wall time per new token, the GPU
kernels per token and their busy time (torch.profiler), the profiler's host table (self CPU time), on a
GPU its kernel table (self GPU time), and
cProfile's 30 most expensive Python functions. ``--mixed N``: N adapters (ranks 16..64), row i with
adapter i % N through PEFT's ``adapter_names`` (the mixed-adapter path); otherwise one adapter of
--rank.

    python3 scripts/profile_generate.py --out R --batch 8             # one adapter, r = 64
    python3 scripts/profile_generate.py --out R --batch 8 --mixed 8   # eight adapters, one per row
    python3 scripts/profile_generate.py --tiny --device cpu --out /tmp/g   # smoke test

Writes OUT/profile_generate.txt (a development tool: nothing reads it back).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
import bench_model as bm  # noqa: E402  (scripts/bench_model.py; puts the checkout on sys.path if needed)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bm.add_model_args(p, "profile_generate")
    p.add_argument("--rank", type=int, default=64, help="the adapter's rank (without --mixed)")
    p.add_argument("--mixed", type=int, default=0, help="adapters of ranks 16..64, row i with adapter i %% N")
    p.add_argument("--batch", type=int, default=8, help="rows, one prompt each")
    p.add_argument("--prompt", type=int, default=256, help="prompt tokens per row")
    p.add_argument("--new", type=int, default=32, help="new tokens per row")
    p.add_argument("--tiny", action="store_true", help="bench_model.py's tiny decoder, r 8, 8+4 tokens")
    args = p.parse_args(argv)
    if args.tiny:
        bm.tiny_model(args)
        args.rank, args.prompt, args.new = 8, 8, 4
    return args


def build(args: argparse.Namespace, device: torch.device) -> tuple[Any, dict]:
    """The accelerated PEFT DoRA model (bf16 adapters, scripts/bench_serving.py's with_adapters) and the
    generate keyword arguments it needs."""
    import bench_serving

    import dora_ext.peft as dp

    base = bm.build_base(args, device, positions=args.prompt + args.new + 8, use_cache=True).eval()
    args.adapters = max(args.mixed, 1)
    args.ranks = ("2,8" if args.tiny else "16,64") if args.mixed else f"{args.rank},{args.rank}"
    model = bench_serving.with_adapters(base, args, dora=True)
    dp.accelerate(model)
    kwargs = {"adapter_names": [f"a{i % args.adapters}" for i in range(args.batch)]} if args.mixed else {}
    return model, kwargs


def main(argv: Optional[list[str]] = None) -> None:
    from torch.profiler import ProfilerActivity, profile

    import dora_ext

    args = parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    model, kwargs = build(args, device)
    ids = torch.randint(0, args.vocab, (args.batch, args.prompt), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)

    def generate() -> None:
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                           min_new_tokens=args.new, do_sample=False, pad_token_id=0, **kwargs)
        if cuda:
            torch.cuda.synchronize()

    generate()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with open(Path(args.out) / "profile_generate.txt", "w") as out:
        start = time.perf_counter()
        generate()
        ms = (time.perf_counter() - start) * 1e3
        print(f"batch {args.batch}, {'mixed ' + str(args.mixed) + ' adapters' if args.mixed else 'one adapter'}: "
              f"{ms:.1f} ms for {args.new} new tokens after a {args.prompt}-token prompt ({ms / args.new:.2f} ms a "
              f"token, prefill included); last tier {dora_ext.last_tier()}; {dora_ext.norm_cache_stats()}", file=out)
        with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
            generate()
        gpu = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        print(f"GPU operations {len(gpu)} ({len(gpu) / args.new:.0f} a token), GPU busy "
              f"{sum(e.device_time for e in gpu) / 1e3:.2f} ms", file=out)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30), file=out)
        if cuda:  # where the GPU's time goes (the kernels)
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=20), file=out)
        python = cProfile.Profile()
        python.enable()
        generate()
        python.disable()
        text = io.StringIO()
        pstats.Stats(python, stream=text).sort_stats("tottime").print_stats(30)
        print(text.getvalue(), file=out, flush=True)


if __name__ == "__main__":
    main()

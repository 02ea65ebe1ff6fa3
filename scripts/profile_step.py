#!/usr/bin/env python3
"""Where a training step's GPU time goes: PEFT LoRA against accelerated PEFT DoRA, kernel by kernel.

Builds scripts/bench_model.py's model (same arguments; default one decoder layer of the 8B-dims model,
r = 384, 1 x 4096 tokens), runs a few training steps (forward, LM loss, backward) of PEFT LoRA and of
PEFT DoRA after dora_ext.peft.accelerate, then profiles one step of each with torch.profiler and
writes, per setup, every GPU kernel name with its count and summed GPU time (largest first), and the
host-side table of the profiler (self CPU time: launches, syncs, the ops' own host work).

    python3 scripts/profile_step.py --out R                          # both adapter dtypes
    python3 scripts/profile_step.py --out R --adapter-dtypes bf16    # bf16 adapters only
    python3 scripts/profile_step.py --out R --recipe dropout         # lora_dropout 0.05, and DoRA without
    python3 scripts/profile_step.py --out R --inference              # a forward under no_grad, base model too
    python3 scripts/profile_step.py --tiny --device cpu --out /tmp/p # smoke test (no GPU kernels)

Writes OUT/profile_step_<adapter dtype>.txt, with --inference OUT/profile_inference_<adapter dtype>.txt
(the model in eval mode, the norm cached after the untimed calls; also the base model without adapters).
A development tool: nothing reads the files back.
"""
from __future__ import annotations

import collections
import sys
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
import bench_model as bm  # noqa: E402  (scripts/bench_model.py; puts the checkout on sys.path if needed)


def profile_step(model: torch.nn.Module, ids: torch.Tensor, name: str, out: Any, inference: bool = False) -> None:
    """Three untimed training steps (``inference``: forwards under no_grad in eval mode), then one
    profiled; writes its kernels and host table to ``out``."""
    from torch.profiler import ProfilerActivity, profile

    model.train(not inference)

    def step() -> None:
        if inference:
            with torch.no_grad():
                model(input_ids=ids)
            return
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()

    cuda = ids.device.type == "cuda"
    for _ in range(3):
        step()
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    count: collections.Counter = collections.Counter()
    gpu_us: collections.Counter = collections.Counter()
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            count[e.name] += 1
            gpu_us[e.name] += e.device_time
    print(f"== {name}: {sum(count.values())} GPU operations, {sum(gpu_us.values()) / 1e3:.3f} ms of GPU time",
          file=out)
    for kernel in sorted(count, key=lambda k: -gpu_us[k]):
        print(f"{count[kernel]:6d} {gpu_us[kernel] / 1e3:9.3f} ms  {kernel[:140]}", file=out)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30), file=out, flush=True)


def main() -> None:
    inference = "--inference" in sys.argv  # this script's own flag; the rest are bench_model.py's
    argv = [a for a in sys.argv[1:] if a != "--inference"]
    args = bm.parse_args([*argv, *([] if "--layers" in argv else ["--layers", "1"])])
    import peft

    import dora_ext.peft as dp

    device = torch.device(args.device)
    gen = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.tokens), generator=gen).to(device)
    base = bm.build_base(args, device)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    dropout = args.dropout if args.recipe == "dropout" else 0.0
    # (setup name, use_dora, lora_dropout); with --recipe dropout also the accelerated step without
    # dropout, the dropout target's reference
    setups = [("peft_lora", False, dropout), ("dora_ext", True, dropout)]
    if dropout:
        setups.append(("dora_ext_no_dropout", True, 0.0))
    for adapter_dtype in [a.strip() for a in args.adapter_dtypes.split(",") if a.strip()]:
        fp32 = adapter_dtype == "fp32"
        kind = "inference" if inference else "step"
        with open(Path(args.out) / f"profile_{kind}_{adapter_dtype}.txt", "w") as out:
            if inference:
                profile_step(base, ids, "base_model", out, inference=True)
            for name, use_dora, lora_dropout in setups:
                config = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=bm.TARGETS,
                                         use_dora=use_dora, lora_dropout=lora_dropout)
                model = peft.get_peft_model(base, config, autocast_adapter_dtype=fp32)
                bm.perturb_adapters(model, seed=3)
                if use_dora:
                    dp.accelerate(model)
                profile_step(model, ids, f"{name}_{adapter_dtype}" + (f" (lora_dropout {lora_dropout})"
                                                                      if lora_dropout else ""), out, inference)
                if use_dora:
                    dp.restore(model)
                base = model.unload()
                del model
                bm.free(device)

if __name__ == "__main__":
    main()

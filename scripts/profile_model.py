#!/usr/bin/env python3
"""Where the time of bench_model.py's model goes: kernel time per kernel name (torch.profiler) and
the median wall time of one step and one inference forward, for the base model (activation
gradients only), PEFT LoRA and PEFT DoRA + dora_ext, all with bf16 adapters.

The gap between wall time and summed kernel time is GPU idle time (launch and CPU overheads).

    python3 scripts/profile_model.py --out R [bench_model.py's model options]

Writes R/<config>_<step|fwd>.md (top kernels) and R/profile_model.md (the summary table).
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_model  # noqa: E402


def kernel_table(fn: Callable[[], None]) -> tuple[float, list[tuple[float, int, str]]]:
    """Summed kernel ms of one call and (ms, count, name) per kernel name, largest first."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = [(ev.device_time_total / 1e3, ev.count, ev.key) for ev in prof.key_averages() if ev.device_time_total > 0]
    rows.sort(reverse=True)
    return sum(r[0] for r in rows), rows


def main() -> None:
    import peft

    import dora_ext.peft
    from dora_ext._timing import median_ms

    args = bench_model.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    base = bench_model.build_base(args, device)
    ids = torch.randint(0, args.vocab, (args.batch, args.tokens), device=device,
                        generator=torch.Generator(device=device).manual_seed(0))
    summary = ["| config | step wall ms | step kernel ms | step kernel launches | inference wall ms | "
               "inference kernel ms | inference kernel launches |", "|---|---|---|---|---|---|---|"]

    def record(name: str, model: torch.nn.Module, step: Callable[[], None]) -> None:
        def forward() -> None:
            with torch.no_grad():
                model(input_ids=ids)
        cells = []
        for kind, fn, train in (("step", step, True), ("fwd", forward, False)):
            model.train(train)
            wall = median_ms(fn, reps=10, warmup=3)
            kernels, rows = kernel_table(fn)
            lines = [f"{name} {kind}: median wall {wall:.2f} ms, kernels {kernels:.2f} ms in "
                     f"{sum(r[1] for r in rows)} launches", "",
                     "| ms | count | kernel |", "|---|---|---|"]
            lines += [f"| {t:.3f} | {c} | {k[:120]} |" for t, c, k in rows[:60]]
            slug = "".join(c if c.isalnum() else "_" for c in name.lower())[:40]
            (out / f"{slug}_{kind}.md").write_text("\n".join(lines) + "\n")
            cells += [f"{wall:.2f}", f"{kernels:.2f}", str(sum(r[1] for r in rows))]
        summary.append(f"| {name} | " + " | ".join(cells) + " |")
        print(summary[-1], flush=True)

    embed = base.get_input_embeddings()

    def base_step() -> None:  # frozen weights: the gradient of the activations only, as under adapters
        base(inputs_embeds=embed(ids).detach().requires_grad_(True), labels=ids).loss.backward()

    record("base model (activation gradients only)", base, base_step)

    def record_peft(use_dora: bool) -> None:
        config = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=bench_model.TARGETS,
                                 lora_dropout=0.0, use_dora=use_dora)
        model = peft.get_peft_model(copy.deepcopy(base), config, autocast_adapter_dtype=False)
        bench_model.perturb_adapters(model, 0)
        if use_dora:
            dora_ext.peft.accelerate(model)

        trainable = [p for p in model.parameters() if p.requires_grad]

        def step() -> None:  # as after an optimizer step: the norm is recomputed (bench_model.py)
            for p in trainable:
                torch.autograd.graph.increment_version(p)
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()

        record("PEFT DoRA + dora_ext, bf16 adapters" if use_dora else "PEFT LoRA, bf16 adapters", model, step)

    record_peft(use_dora=False)
    torch.cuda.empty_cache()
    record_peft(use_dora=True)
    (out / "profile_model.md").write_text("\n".join(summary) + "\n")
    print("\n".join(summary))


if __name__ == "__main__":
    main()

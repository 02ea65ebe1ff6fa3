#!/usr/bin/env python3
"""Serving many adapters: one base model, N adapters, every row of a batch with its own adapter.

A Llama-style decoder built from a transformers config (random weights, nothing downloaded; bf16,
every decoder linear adapted), N adapters of ranks spread over --ranks (bf16, B and the magnitude
perturbed so every adapter differs). Setups, each timed on the same prompts (one per row,
--prompt tokens, greedy, KV cache, --new tokens):

  dora_ext_mixed   PEFT DoRA adapters, dora_ext.peft.accelerate, one batch with
                   adapter_names=[a0, a1, ...] (stock PEFT refuses adapter_names with DoRA); the
                   first call moves each layer's adapters into one stack the kernels read in place
  merged_sequential  each DoRA adapter merged into its own copy of the model (the usual workaround),
                   the rows run one after another, one model per adapter in memory
  peft_lora_mixed  PEFT LoRA adapters of the same ranks, one batch with adapter_names
  base             the base model, one batch (no adapter)

Per setup: prefill ms (one forward over all rows' prompts), decode tokens/s (rows x new tokens over
the generate time minus its prefill), and the GPU memory its weights take (after setup, before
generating), what stays allocated after the timed runs (weights plus whatever the setup keeps
between calls: dora_ext's stacks of adapters, norms and g) and the peak during generate. Timings:
medians of --reps runs after one warm-up (scripts/timing.py's median_wall_ms). For the dora_ext setups,
the row-norm cache's counters over the setup's calls (dora_ext.norm_cache_stats): with every cache
doing its job each adapter's norm is computed once per layer (adapters x adapted linears), and the
stacks of adapters answer every later call without a norm lookup. On CUDA, the GPU operations
(kernels, copies) of one forward of one token per row without KV cache, the work of a decode step's
linears (torch.profiler).

    python3 scripts/bench_serving.py --out serving_bench
    python3 scripts/bench_serving.py --tiny --device cpu --out /tmp/s     # smoke test
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if importlib.util.find_spec("dora_ext") is None:  # not installed: use the checkout (built in place)
    sys.path.append(str(ROOT))
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
from bench_model import (  # noqa: E402  (scripts/bench_model.py)
    add_model_args, build_base, fmt, free, perturb_adapters, run_and_save, tiny_model)
from timing import median_wall_ms  # noqa: E402  (scripts/timing.py)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p, "bench_serving")
    p.add_argument("--adapters", type=int, default=8, help="adapters, one per batch row")
    p.add_argument("--ranks", default="16,64", help="lowest,highest rank (spread over the adapters)")
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens per row")
    p.add_argument("--new", type=int, default=64, help="new tokens per row")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="hidden 64, 2 layers, vocab 128, 3 adapters, 16+4 tokens")
    args = p.parse_args(argv)
    if args.tiny:
        tiny_model(args)
        args.adapters, args.ranks, args.prompt, args.new, args.reps = 3, "2,8", 16, 4, 1
    return args


def allocated_gib(device: torch.device) -> Optional[float]:
    return torch.cuda.memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


def ranks(args: argparse.Namespace) -> list[int]:
    low, high = (int(v) for v in args.ranks.split(","))
    n = args.adapters
    return [round(low + (high - low) * k / max(n - 1, 1)) for k in range(n)]


def with_adapters(base: torch.nn.Module, args: argparse.Namespace, dora: bool) -> Any:
    """A PEFT model with one adapter per rank ("a0", "a1", ...), bf16, B and magnitude perturbed."""
    import peft

    model = None
    for k, r in enumerate(ranks(args)):
        config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, use_dora=dora)
        if model is None:
            model = peft.get_peft_model(base, config, adapter_name=f"a{k}", autocast_adapter_dtype=False)
        else:
            model.add_adapter(f"a{k}", config, autocast_adapter_dtype=False)  # bf16 too (its default: fp32)
    perturb_adapters(model, seed=2)  # every adapter's B and magnitude, from one generator
    return model.eval()


def timed(fn: Callable[[], Any], reps: int, device: torch.device) -> float:
    return median_wall_ms(fn, reps, warmup=1, cuda=device.type == "cuda")


def gpu_ops_per_token_forward(runs: list[tuple[Any, torch.Tensor, dict]], device: torch.device) -> Optional[int]:
    """GPU operations (kernels, copies, memsets) of one forward of one token per row, no KV cache,
    after one warm-up forward of the same shape; None off CUDA."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    def forward() -> None:
        with torch.no_grad():
            for model, ids, kw in runs:
                model(input_ids=ids[:, :1], use_cache=False, **kw)
        torch.cuda.synchronize(device)

    forward()
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            forward()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    except RuntimeError as e:  # no CUPTI: the column stays empty, the timings stand
        print(f"bench_serving: GPU operations not counted ({e})", file=sys.stderr)
        return None


def measure(name: str, label: str, runs: list[tuple[Any, torch.Tensor, dict]], args: argparse.Namespace,
            device: torch.device, weights_gib: Optional[float]) -> dict[str, Any]:
    """``runs``: (model, prompt ids, extra generate/forward kwargs) run one after another."""
    def prefill() -> None:
        with torch.no_grad():
            for model, ids, kw in runs:
                model(input_ids=ids, **kw)

    def generate() -> torch.Tensor:
        with torch.no_grad():
            return [model.generate(input_ids=ids, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                                   **kw) for model, ids, kw in runs]

    import dora_ext

    before = dora_ext.norm_cache_stats()
    prefill_ms = timed(prefill, args.reps, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    generate_ms = timed(generate, args.reps, device)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    held = allocated_gib(device)
    rows = sum(ids.shape[0] for _, ids, _ in runs)
    decode_s = max(generate_ms - prefill_ms, 1e-6) / 1e3
    row = {"setup": name, "label": label, "prefill_ms": prefill_ms, "generate_ms": generate_ms,
           "decode_tokens_per_s": rows * args.new / decode_s, "weights_gib": weights_gib, "held_gib": held,
           "peak_gib": peak,
           "outputs": [t.tolist() for t in generate()]}
    after = dora_ext.norm_cache_stats()
    row["norms_computed"] = after["norm_misses"] - before["norm_misses"]
    row["norm_lookups"] = row["norms_computed"] + after["norm_hits"] - before["norm_hits"]
    row["gpu_ops_per_token_forward"] = gpu_ops_per_token_forward(runs, device)
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k != "outputs"}),
          flush=True)
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    import peft

    import dora_ext
    import dora_ext.peft as dp

    device = torch.device(args.device)
    n = args.adapters
    gen = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, args.vocab, (n, args.prompt), generator=gen).to(device)
    names = [f"a{k}" for k in range(n)]
    rows = []

    base = build_base(args, device, positions=args.prompt + args.new + 8, use_cache=True).eval()
    free(device)
    rows.append(measure("base", "base model, no adapter", [(base, ids, {})], args, device, allocated_gib(device)))

    dora = with_adapters(base, args, dora=True)
    dp.accelerate(dora)
    free(device)
    weights = allocated_gib(device)
    rows.append(measure("dora_ext_mixed", f"PEFT DoRA + dora_ext, {n} adapters in one batch (adapter_names)",
                        [(dora, ids, {"adapter_names": names})], args, device, weights))
    assert dp.fallback_counts(dora) == {}, dp.fallback_counts(dora)

    # The usual workaround: one merged model per adapter, each row on its own model.
    dp.restore(dora)
    merged = []
    for k, name in enumerate(names):
        copy_k = copy.deepcopy(dora)
        copy_k.set_adapter(name)
        merged.append((copy_k.merge_and_unload(), ids[k:k + 1], {}))
    base = dora.unload()
    del dora
    free(device)
    rows.append(measure("merged_sequential", f"{n} DoRA adapters merged into {n} model copies, rows one by one",
                        merged, args, device, allocated_gib(device)))
    # the mixed batch equals each row on its own merged model
    merged_rows = [r[0] for r in rows[2]["outputs"]]
    agree = {rows[1]["setup"]: f"{sum(a == b for a, b in zip(rows[1]['outputs'][0], merged_rows))}/{n}"}
    del merged
    free(device)

    lora = with_adapters(base, args, dora=False)
    free(device)
    rows.append(measure("peft_lora_mixed", f"PEFT LoRA, {n} adapters of the same ranks in one batch",
                        [(lora, ids, {"adapter_names": names})], args, device, allocated_gib(device)))
    return {
        "setup": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "peft": peft.__version__,
            "transformers": __import__("transformers").__version__, "dora_ext": dora_ext.info(),
            "adapter_ranks": ranks(args), "rows_equal_to_merged_models": agree,
            **{k: v for k, v in vars(args).items() if k not in ("out", "device")},
        },
        "results": [{k: v for k, v in r.items() if k != "outputs"} for r in rows],
    }


def markdown(result: dict[str, Any]) -> str:
    s = result["setup"]
    lines = [
        f"Serving benchmark ({s['device']}, torch {s['torch']}, peft {s['peft']}): Llama-style decoder, hidden "
        f"{s['hidden']}, intermediate {s['intermediate']}, {s['layers']} layers, bf16; {s['adapters']} adapters "
        f"(ranks {s['adapter_ranks']}), one per row; {s['prompt']}-token prompts, {s['new']} new tokens, greedy, "
        "KV cache; "
        f"median of {s['reps']} runs. Mixed-batch greedy outputs equal to the merged models': "
        + ", ".join(f"{k} {v} rows" for k, v in s["rows_equal_to_merged_models"].items()) + ".",
        "",
        "| setup | prefill ms | generate ms | decode tokens/s | weights GiB | held GiB | peak GiB | norms computed "
        "| norm lookups | GPU ops per 1-token forward |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["results"]:
        dora = r["setup"].startswith("dora_ext")
        lines.append(f"| {r['label']} | {fmt(r['prefill_ms'], 2)} | {fmt(r['generate_ms'], 1)} | "
                     f"{fmt(r['decode_tokens_per_s'], 1)} | {fmt(r['weights_gib'], 2)} | {fmt(r['held_gib'], 2)} | "
                     f"{fmt(r['peak_gib'], 2)} | {r['norms_computed'] if dora else '—'} | "
                     f"{r['norm_lookups'] if dora else '—'} | {fmt(r['gpu_ops_per_token_forward'], 0)} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    return run_and_save(parse_args(argv), "bench_serving", run, markdown)

if __name__ == "__main__":
    main()

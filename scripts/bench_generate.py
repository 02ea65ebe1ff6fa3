#!/usr/bin/env python3
"""Generation benchmark: ``model.generate`` tokens/s with one adapter, DoRA against LoRA and the base.

A Llama-style decoder built from a transformers config (random weights, nothing downloaded; bf16,
KV cache), every decoder linear (q, k, v, o, gate, up, down) adapted at --rank. Setups, per batch
size of --batches, each on the same random prompts (seeded, --prompt tokens a row), greedy
(do_sample=False), KV cache, exactly --new new tokens a row (min_new_tokens = max_new_tokens):

  base             the model without adapters
  peft_lora_<a>    PEFT LoRA
  peft_dora_<a>    PEFT DoRA
  dora_ext_<a>     the same PEFT DoRA model (same weights) after dora_ext.peft.accelerate()
with <a> = fp32 (PEFT's default, autocast_adapter_dtype=True: adapters and magnitude in fp32 on the
bf16 base) and bf16 (autocast_adapter_dtype=False). Adapters start from PEFT's init with B and the
magnitude perturbed (seeded, scripts/bench_model.py's perturb_adapters), so DoRA differs from the base.

Per row: generate_ms (median of --reps runs after --warmup untimed ones, scripts/timing.py's
median_wall_ms: prefill and decode together, host work included), tokens_per_s (batch x new over the
generate time), its ratio to the base model's at the same batch size, and for dora_ext rows
tokens_match (the fraction of generated tokens equal to PEFT DoRA's own greedy output on the same
prompts; computed once, untimed), logits_cos_min and argmax_match (decoding PEFT DoRA's tokens one at
a time with the KV cache: the smallest cosine between the accelerated and PEFT DoRA's logits over all
steps and rows, and how often the accelerated argmax is PEFT DoRA's token), norm_misses (norms
computed during the timed runs), routed_layers, fallback_calls and last_tier.

    python3 scripts/bench_generate.py --out generate_bench                  # one H100/H200, defaults above
    python3 scripts/bench_generate.py --batches 1,8,32 --new 256 --out generate_bench
    python3 scripts/bench_generate.py --tiny --device cpu --out /tmp/g      # smoke test (seconds)

Writes OUT/bench_generate.json and OUT/bench_generate.md.
"""

from __future__ import annotations

import argparse
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
if str(HERE) not in sys.path:  # loaded by a test, not run as scripts/bench_generate.py
    sys.path.insert(0, str(HERE))
from bench_model import (  # noqa: E402  (scripts/bench_model.py)
    add_model_args,
    build_base,
    fmt,
    free,
    perturb_adapters,
    run_and_save,
    tiny_model,
)
from timing import median_wall_ms  # noqa: E402  (scripts/timing.py)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SETUPS = ("base", "peft_lora", "peft_dora", "dora_ext")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p, "bench_generate")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--prompt", type=int, default=256, help="prompt tokens per row")
    p.add_argument("--new", type=int, default=128, help="new tokens per row (exactly: min = max new tokens)")
    p.add_argument("--batches", default="1,8", help="comma list of batch sizes (rows, one prompt each)")
    p.add_argument("--adapter-dtypes", default="fp32,bf16", help="comma list of fp32, bf16")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument(
        "--tiny",
        action="store_true",
        help="hidden 64, intermediate 128, 4/2 heads, 2 layers, vocab 128, r 8, 16+8 tokens",
    )
    args = p.parse_args(argv)
    if args.tiny:
        tiny_model(args)
        args.rank, args.prompt, args.new, args.warmup, args.reps = 8, 16, 8, 0, 1
    args.batch_sizes = [int(b) for b in args.batches.split(",") if b.strip()]
    args.adapter_dtype_list = [a.strip() for a in args.adapter_dtypes.split(",") if a.strip()]
    for a in args.adapter_dtype_list:
        if a not in ("fp32", "bf16"):
            raise SystemExit(f"--adapter-dtypes: unknown {a!r} (fp32, bf16)")
    return args


def prompts(args: argparse.Namespace, batch: int, device: torch.device) -> torch.Tensor:
    """``batch`` rows of --prompt random token ids (seeded: row k is the same at every batch size)."""
    gen = torch.Generator(device="cpu").manual_seed(1)
    return torch.randint(0, args.vocab, (batch, args.prompt), generator=gen).to(device)


def generate_fn(model: Any, ids: torch.Tensor, args: argparse.Namespace) -> Callable[[], torch.Tensor]:
    """One greedy generate with the KV cache, exactly --new new tokens a row; returns the new tokens."""
    mask = torch.ones_like(ids)

    def generate() -> torch.Tensor:
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=args.new,
                min_new_tokens=args.new,
                do_sample=False,
                use_cache=True,
                pad_token_id=0,  # never used: no row ends before --new tokens (min_new_tokens)
            )
        return out[:, ids.shape[1] :]

    return generate


def forced_logits(model: Any, ids: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The logits [rows, new, vocab] (fp32) of decoding ``tokens`` after ``ids`` one token at a time with
    the KV cache (teacher forcing: prefill, then one-token steps, as generate runs them)."""
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
        logits, past = [out.logits[:, -1].float()], out.past_key_values
        for t in range(tokens.shape[1] - 1):
            mask = torch.ones(ids.shape[0], ids.shape[1] + t + 1, dtype=ids.dtype, device=ids.device)
            out = model(input_ids=tokens[:, t : t + 1], attention_mask=mask, past_key_values=past, use_cache=True)
            logits.append(out.logits[:, -1].float())
            past = out.past_key_values
    return torch.stack(logits, 1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import peft

    import dora_ext
    import dora_ext.peft as dp

    device = torch.device(args.device)
    inputs = {b: prompts(args, b, device) for b in args.batch_sizes}
    rows: list[dict[str, Any]] = []

    def measure(model: Any, setup: str, label: str, adapter_dtype: Optional[str]) -> dict[int, torch.Tensor]:
        """Times generate at every batch size; returns each batch's generated tokens (one untimed run)."""
        outputs = {}
        for b, ids in inputs.items():
            generate = generate_fn(model, ids, args)
            fallbacks = fallback_calls(model) if setup.startswith("dora_ext") else None
            misses = dora_ext.norm_cache_stats()["norm_misses"]
            ms = median_wall_ms(generate, args.reps, args.warmup, cuda=device.type == "cuda")
            misses = dora_ext.norm_cache_stats()["norm_misses"] - misses
            outputs[b] = generate()
            assert outputs[b].shape == (b, args.new), outputs[b].shape
            row = {
                "setup": setup,
                "label": label,
                "batch": b,
                "adapter_dtype": adapter_dtype,
                "generate_ms": ms,
                "tokens_per_s": b * args.new / (ms / 1e3),
            }
            if setup.startswith("dora_ext"):
                row["last_tier"] = list(dora_ext.last_tier())
                row["fallback_calls"] = fallback_calls(model) - fallbacks
                row["norm_misses"] = misses  # norms computed during the timed runs: once per layer at most
            rows.append(row)
        return outputs

    def fallback_calls(model: Any) -> int:
        return sum(sum(c.values()) for c in dp.fallback_counts(model).values())

    def show(n: int) -> None:
        for row in rows[-n:]:
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)

    base = build_base(args, device, positions=args.prompt + args.new + 8, use_cache=True).eval()
    free(device)
    measure(base, "base", "base model, no adapter", None)
    show(len(inputs))

    for a in args.adapter_dtype_list:
        autocast_adapter_dtype = a == "fp32"
        what = "default fp32 adapters" if autocast_adapter_dtype else "bf16 adapters"

        lora_cfg = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS)
        lora = peft.get_peft_model(base, lora_cfg, autocast_adapter_dtype=autocast_adapter_dtype).eval()
        perturb_adapters(lora, seed=2)
        measure(lora, f"peft_lora_{a}", f"PEFT LoRA, {what}", a)
        show(len(inputs))
        base = lora.unload()  # the base model back, adapters dropped
        del lora
        free(device)

        dora_cfg = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS, use_dora=True)
        dora = peft.get_peft_model(base, dora_cfg, autocast_adapter_dtype=autocast_adapter_dtype).eval()
        perturb_adapters(dora, seed=3)
        reference = measure(dora, f"peft_dora_{a}", f"PEFT DoRA, {what}", a)
        show(len(inputs))
        ref_logits = {b: forced_logits(dora, inputs[b], reference[b]).cpu() for b in inputs}
        free(device)

        routed = dp.accelerate(dora)  # the very same PEFT DoRA model (same weights)
        ours = measure(dora, f"dora_ext_{a}", f"PEFT DoRA + dora_ext.peft.accelerate, {what}", a)
        for row in rows[-len(inputs) :]:
            b = row["batch"]
            row["routed_layers"] = routed
            row["tokens_match"] = float((ours[b] == reference[b]).float().mean())
            # Along PEFT DoRA's own tokens: how close the accelerated logits are at every step, and how
            # often their argmax is PEFT's token (free-running greedy decoding of a random-weight model
            # diverges at the first near-tie, so tokens_match alone says little).
            logits = forced_logits(dora, inputs[b], reference[b]).cpu()
            cos = torch.nn.functional.cosine_similarity(logits, ref_logits[b], dim=-1)
            row["logits_cos_min"] = float(cos.min())
            row["argmax_match"] = float((logits.argmax(-1) == reference[b].cpu()).float().mean())
            row["ref_argmax_match"] = float((ref_logits[b].argmax(-1) == reference[b].cpu()).float().mean())
        show(len(inputs))
        del reference, ours, ref_logits
        dp.restore(dora)
        base = dora.unload()
        del dora
        free(device)

    # ratios against the base model, PEFT LoRA and PEFT DoRA of the same batch size (and adapter dtype)
    by_key = {(r["setup"], r["batch"]): r for r in rows}
    for r in rows:
        b, a = r["batch"], r["adapter_dtype"]
        r["vs_base"] = r["tokens_per_s"] / by_key[("base", b)]["tokens_per_s"]
        for name, ref in (("vs_peft_lora", f"peft_lora_{a}"), ("vs_peft_dora", f"peft_dora_{a}")):
            other = by_key.get((ref, b)) if a is not None else None
            r[name] = r["tokens_per_s"] / other["tokens_per_s"] if other else None
    order = {s: k for k, s in enumerate(["base"] + [f"{s}_{a}" for a in args.adapter_dtype_list for s in SETUPS[1:]])}
    rows.sort(key=lambda r: (r["batch"], order[r["setup"]]))

    return {
        "setup": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "peft": peft.__version__,
            "transformers": __import__("transformers").__version__,
            "dora_ext": dora_ext.info() if hasattr(dora_ext, "info") else None,
            **{k: v for k, v in vars(args).items() if k not in ("out", "device")},
        },
        "results": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    s = result["setup"]
    lines = [
        f"Generation benchmark ({s['device']}, torch {s['torch']}, peft {s['peft']}, transformers "
        f"{s['transformers']}): Llama-style decoder, hidden {s['hidden']}, intermediate {s['intermediate']}, "
        f"{s['heads']}/{s['kv_heads']} heads, {s['layers']} layers, vocab {s['vocab']}, bf16 base, every linear "
        f"adapted at r={s['rank']}; {s['prompt']}-token prompts, {s['new']} new tokens a row, greedy, KV cache; "
        f"median of {s['reps']} runs. tokens/s = batch x new tokens / generate time (prefill included); "
        "tokens match = fraction of generated tokens equal to PEFT DoRA's (same weights, same prompts; "
        "free-running greedy decoding of random weights diverges at the first near-tie); along PEFT DoRA's "
        "tokens (teacher forcing, one-token steps with the KV cache): the smallest logits cosine and the "
        "fraction of steps whose argmax is PEFT DoRA's token.",
        "",
        "| batch | setup | tokens/s | generate ms | vs base | vs PEFT LoRA | vs PEFT DoRA | tokens match "
        "| logits cos (min) | argmax match |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["results"]:
        lines.append(
            f"| {r['batch']} | {r['label']} | {fmt(r['tokens_per_s'], 1)} | {fmt(r['generate_ms'], 1)} | "
            f"{fmt(r['vs_base'], 2)} | {fmt(r['vs_peft_lora'], 2)} | {fmt(r['vs_peft_dora'], 2)} | "
            f"{fmt(r.get('tokens_match'), 4)} | {fmt(r.get('logits_cos_min'), 6)} | {fmt(r.get('argmax_match'), 4)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    return run_and_save(parse_args(argv), "bench_generate", run, markdown)


if __name__ == "__main__":
    main()

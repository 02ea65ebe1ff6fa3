#!/usr/bin/env python3
"""Model-level DoRA benchmark: a Llama-style decoder built from a transformers config (random
weights, nothing downloaded), every linear of every decoder layer adapted, bf16 base.

Configs (one model per adapter dtype, built once and reused):
  base             the model without adapters (inference only)
  peft_lora_<a>    PEFT LoRA
  peft_dora_<a>    PEFT DoRA
  dora_ext_<a>     the same PEFT DoRA model after dora_ext.peft.accelerate()
with <a> = fp32 (PEFT's default, autocast_adapter_dtype=True: adapters and magnitude in fp32 on
the bf16 base) and bf16 (autocast_adapter_dtype=False).

Measured per config, medians over --reps timed runs after --warmup untimed ones (CUDA events on
a GPU, perf_counter on the CPU: scripts/timing.py's median_wall_ms):
  fwd_ms      inference forward, no_grad, eval mode
  step_ms     gradient step: zero_grad, forward, LM loss, backward (no optimizer; dora_ext
              computes the norm every step, as in training: its cache serves no norm to a
              forward that records gradients)
  step_peak_gib  torch.cuda.max_memory_allocated() during one step minus the memory allocated
              before it (model, adapters and inputs excluded; activations, gradients and
              transients included)
  saved_mib   the bytes autograd saves for backward in one training forward (saved_tensors_hooks:
              each saved tensor's storage counted once; parameters' and buffers' storages excluded);
              under --recipe ckpt the checkpointed layers save nothing through autograd (their inputs,
              kept by the checkpoint itself, are not counted)
  logits_cos  cosine of the logits against PEFT DoRA of the same adapter dtype (same weights)
  grad_cos    cosine of all adapter gradients (concatenated) against PEFT DoRA, same adapter dtype
  logits_cos_fp64  cosine of the logits against a float64 copy of the PEFT DoRA model (same
              weights, PEFT's own code run in float64): which of the two is closer to exact
  fwd_kernels, step_kernels  GPU kernels one inference forward / one gradient step launches
              (torch.profiler's CUDA activity, copies and memsets left out; GPU only); the table
              shows them per decoder layer (the embedding, final norm, LM head and loss included)

    python scripts/bench_model.py --out model_bench                # one H100/H200, defaults above
    python scripts/bench_model.py --autocast --out model_bench_amp # the same under torch.autocast
    python scripts/bench_model.py --recipe dropout --out model_dropout  # lora_dropout 0.05 in training
    python scripts/bench_model.py --recipe ckpt --out model_ckpt        # gradient checkpointing
    python scripts/bench_model.py --tiny --device cpu --out /tmp/x # smoke test (seconds)

Writes OUT/bench_model.json and OUT/bench_model.md. Adapters start from PEFT's init with B and the
magnitude perturbed (seeded), so DoRA differs from the base model and the cosines mean something.
"""
from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import itertools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if importlib.util.find_spec("dora_ext") is None:  # not installed: use the checkout (built in place)
    sys.path.append(str(ROOT))
if str(HERE) not in sys.path:  # loaded by a test, not run as scripts/bench_model.py
    sys.path.insert(0, str(HERE))
from timing import median_wall_ms  # noqa: E402  (scripts/timing.py)

RECIPES = ("default", "dropout", "ckpt", "qdora")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def add_model_args(p: argparse.ArgumentParser, name: str) -> None:
    """The arguments the model-level benchmarks share: --out (for OUT/<name>.json and .md), --device
    and the decoder's dimensions (defaults: the 8B-dims 4-layer Llama-style model)."""
    p.add_argument("--out", required=True, help=f"folder for {name}.json and {name}.md")
    p.add_argument("--device", default="cuda")
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)


def tiny_model(args: argparse.Namespace) -> None:
    """The decoder dimensions of --tiny (CPU smoke tests): 2 layers, hidden 64, intermediate 128,
    4/2 heads, vocab 128."""
    args.layers, args.hidden, args.intermediate, args.heads, args.kv_heads, args.vocab = 2, 64, 128, 4, 2, 128


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p, "bench_model")
    p.add_argument("--rank", type=int, default=384)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=4096, help="sequence length")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--autocast", action="store_true",
                   help="run every config under torch.autocast(bfloat16), as mixed-precision trainers do")
    p.add_argument("--adapter-dtypes", default="fp32,bf16", help="comma list of fp32, bf16")
    p.add_argument("--recipe", choices=RECIPES, default="default",
                   help="default: no dropout, no checkpointing; dropout: lora_dropout=--dropout in training "
                        "(TRL/Axolotl settings); ckpt: transformers' gradient checkpointing (non-reentrant); "
                        "qdora: the decoder's linears as bitsandbytes NF4 with double quantization, bf16 compute")
    p.add_argument("--dropout", type=float, default=0.05, help="lora_dropout of the dropout recipe")
    p.add_argument("--tiny", action="store_true",
                   help="hidden 64, intermediate 128, 4/2 heads, 2 layers, vocab 128, r 8, 32 tokens, 1 rep")
    args = p.parse_args(argv)
    if args.tiny:
        tiny_model(args)
        args.rank, args.tokens, args.warmup, args.reps = 8, 32, 1, 2
    return args


class Timer:
    """Median wall time of a callable: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device, warmup: int, reps: int) -> None:
        self.device, self.warmup, self.reps = device, warmup, reps

    def median_ms(self, fn: Callable[[], Any]) -> float:
        return median_wall_ms(fn, self.reps, self.warmup, cuda=self.device.type == "cuda")


def build_base(args: argparse.Namespace, device: torch.device, positions: Optional[int] = None,
               use_cache: bool = False) -> torch.nn.Module:
    """The bf16 decoder of ``args``' dimensions (seeded random weights, frozen). Without ``use_cache``
    (training-style forwards) no KV cache is built; ``positions`` defaults to ``args.tokens``."""
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
        max_position_embeddings=max(positions or args.tokens, 128), attn_implementation="sdpa",
        use_cache=use_cache)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config)
    return model.to(torch.bfloat16).requires_grad_(False)


def quantize_nf4(model: torch.nn.Module) -> torch.nn.Module:
    """Every decoder linear as a bitsandbytes Linear4bit (NF4, double quantization, bf16 compute),
    quantized on the model's device, as BitsAndBytesConfig(load_in_4bit=True, ...) would load it."""
    import bitsandbytes as bnb

    device = next(model.parameters()).device
    for module in list(model.model.layers.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True,
                                      device="meta")
                q.weight = bnb.nn.Params4bit(child.weight.data.to("cpu"), requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(module, name, q.to(device))
                del child
    model.is_loaded_in_4bit = True
    free(device)
    return model


def perturb_adapters(model: torch.nn.Module, seed: int) -> None:
    """B ~ N(0, 0.02), magnitude * (1 + 0.05 N(0, 1)): a trained-looking adapter (PEFT inits B = 0)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_((torch.randn(p.shape, generator=gen) * 0.02).to(p))
            elif "lora_magnitude_vector" in name:
                p.mul_((1 + 0.05 * torch.randn(p.shape, generator=gen)).to(p))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    return float((a @ b) / (a.norm() * b.norm()).clamp_min(1e-300))


def adapter_grads(model: torch.nn.Module) -> Optional[torch.Tensor]:
    grads = [p.grad.flatten().float() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None]
    return torch.cat(grads) if grads else None


def float64_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The logits of a float64 copy of ``model`` (eval mode, no autocast); the copy is freed."""
    exact = copy.deepcopy(model).to(torch.float64).eval()
    with torch.no_grad():
        logits = exact(input_ids=ids).logits.detach().clone()
    del exact
    free(ids.device)
    return logits


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def saved_bytes(model: torch.nn.Module, ids: torch.Tensor, autocast: Any) -> int:
    """The bytes autograd saves for backward in one training forward of ``model`` on ``ids`` (LM loss):
    every tensor packed by a saved-tensors hook, counted by its storage (each storage once, views
    included, so a slice of a larger buffer counts that buffer), leaving out the storages of the
    model's parameters and buffers (frozen weights and adapters are not activation memory). Runs the
    backward too (nothing kept alive) and leaves the gradients zeroed (None)."""
    weights = {t.untyped_storage().data_ptr() for t in itertools.chain(model.parameters(), model.buffers())}
    seen: dict[Any, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # a tensor subclass with no storage of its own
            key, nbytes = ("tensor", id(t)), t.numel() * t.element_size()
        if key not in weights:
            seen.setdefault(key, nbytes)
        return t

    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack), autocast:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def count_kernels(fn: Callable[[], Any], device: torch.device) -> Optional[int]:
    """The GPU kernels one call of ``fn`` launches (copies and memsets not counted), by torch.profiler's
    CUDA activity; None on the CPU or where the profiler records no CUDA activity."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    gpu = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels = [e for e in gpu if not e.name.startswith(("Memcpy", "Memset"))]
    return len(kernels) or None


def measure(model: torch.nn.Module, ids: torch.Tensor, timer: Timer, args: argparse.Namespace,
            train: bool) -> dict[str, Any]:
    """fwd_ms, step_ms, step_peak_gib, saved_mib, and the logits / adapter gradients of one run."""
    device = ids.device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.autocast)
    out: dict[str, Any] = {}

    def forward() -> torch.Tensor:
        with torch.no_grad(), autocast:
            return model(input_ids=ids).logits

    model.eval()
    out["logits"] = forward().detach().clone()
    out["fwd_ms"] = timer.median_ms(forward)
    out["fwd_kernels"] = count_kernels(forward, device)
    if not train:
        return out

    model.train()

    def step() -> None:
        # a training forward computes its norm (||W||^2 included) every step, as after an
        # optimizer step: dora_ext's norm cache never serves one across recording forwards
        model.zero_grad(set_to_none=True)
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()

    out["step_ms"] = timer.median_ms(step)
    out["step_kernels"] = count_kernels(step, device)
    out["step_peak_gib"] = None
    model.zero_grad(set_to_none=True)
    free(device)
    torch.manual_seed(args.step_seed)  # the measured step's dropout masks: the same for every config
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        out["step_peak_gib"] = (torch.cuda.max_memory_allocated() - before) / 2 ** 30
    else:
        step()
    out["grads"] = adapter_grads(model)
    model.zero_grad(set_to_none=True)
    out["saved_mib"] = saved_bytes(model, ids, autocast) / 2 ** 20
    free(device)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    import peft

    import dora_ext
    import dora_ext.peft as dp

    device = torch.device(args.device)
    timer = Timer(device, args.warmup, args.reps)
    args.step_seed = 1234
    lora_dropout = args.dropout if args.recipe == "dropout" else 0.0

    def with_recipe(model: Any) -> Any:
        if args.recipe == "ckpt":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    gen = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.tokens), generator=gen).to(device)
    rows: list[dict[str, Any]] = []

    def record(name: str, label: str, m: dict[str, Any], ref: Optional[dict[str, Any]], extra: dict[str, Any]) -> None:
        row = {"config": name, "label": label,
               **{k: m.get(k) for k in ("fwd_ms", "step_ms", "step_peak_gib", "saved_mib", "fwd_kernels",
                                   "step_kernels")}}
        row["logits_cos"] = cosine(m["logits"], ref["logits"]) if ref is not None else None
        row["logits_cos_fp64"] = (cosine(m["logits"], ref["logits_fp64"])
                                  if ref is not None and ref.get("logits_fp64") is not None else None)
        row["grad_cos"] = (cosine(m["grads"], ref["grads"]) if ref is not None and m.get("grads") is not None
                           and ref.get("grads") is not None else None)
        row.update(extra)
        rows.append(row)
        shown = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items() if k != "label"}
        print(json.dumps(shown), flush=True)

    base = build_base(args, device)
    if args.recipe == "qdora":
        base = quantize_nf4(base)
    base_m = measure(base, ids, timer, args, train=False)
    record("base", "base model, no adapter", base_m, None, {})
    del base_m
    free(device)

    for adapter_dtype in [a.strip() for a in args.adapter_dtypes.split(",") if a.strip()]:
        if adapter_dtype not in ("fp32", "bf16"):
            raise SystemExit(f"--adapter-dtypes: unknown {adapter_dtype!r} (fp32, bf16)")
        autocast_adapter_dtype = adapter_dtype == "fp32"
        what = "default fp32 adapters" if autocast_adapter_dtype else "bf16 adapters"

        lora_cfg = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS,
                                   lora_dropout=lora_dropout)
        lora = with_recipe(peft.get_peft_model(base, lora_cfg, autocast_adapter_dtype=autocast_adapter_dtype))
        perturb_adapters(lora, seed=2)
        m = measure(lora, ids, timer, args, train=True)
        record(f"peft_lora_{adapter_dtype}", f"PEFT LoRA, {what}", m, None, {})
        del m
        base = lora.unload()  # the base model back, adapters dropped
        del lora
        free(device)

        dora_cfg = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS,
                                   lora_dropout=lora_dropout, use_dora=True)
        dora = with_recipe(peft.get_peft_model(base, dora_cfg, autocast_adapter_dtype=autocast_adapter_dtype))
        perturb_adapters(dora, seed=3)
        ref = measure(dora, ids, timer, args, train=True)
        # (a float64 copy of a 4-bit model has no meaning: its weights are the quantized ones)
        ref["logits_fp64"] = float64_logits(dora, ids) if args.recipe != "qdora" else None
        record(f"peft_dora_{adapter_dtype}", f"PEFT DoRA, {what}", ref, ref, {})
        free(device)

        routed = dp.accelerate(dora)
        m = measure(dora, ids, timer, args, train=True)
        tier = dora_ext.last_tier()
        record(f"dora_ext_{adapter_dtype}", f"PEFT DoRA + dora_ext.peft.accelerate, {what}", m, ref, {
            "routed_layers": routed,
            "fallback_calls": sum(sum(c.values()) for c in dp.fallback_counts(dora).values()),
            "last_tier": list(tier),
        })
        del m, ref
        dp.restore(dora)
        base = dora.unload()
        del dora
        free(device)

    return {
        "setup": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "peft": peft.__version__,
            "transformers": __import__("transformers").__version__,
            "dora_ext": dora_ext.info() if hasattr(dora_ext, "info") else None,
            **{k: v for k, v in vars(args).items() if k not in ("out", "device")},
        },
        "results": rows,
    }


def fmt(value: Optional[float], digits: int) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    s = result["setup"]
    lines = [
        f"Model-level benchmark ({s['device']}, torch {s['torch']}, peft {s['peft']}, transformers "
        f"{s['transformers']}): Llama-style decoder, hidden {s['hidden']}, intermediate {s['intermediate']}, "
        f"{s['heads']}/{s['kv_heads']} heads, {s['layers']} layers, vocab {s['vocab']}, every linear adapted "
        f"at r={s['rank']}, batch {s['batch']}x{s['tokens']}, bf16 base, recipe {s.get('recipe', 'default')}"
        f"{' (lora_dropout ' + str(s['dropout']) + ')' if s.get('recipe') == 'dropout' else ''}"
        f"{', under torch.autocast(bf16)' if s['autocast'] else ''}; median ms of {s['reps']} runs.",
        "",
        "| config | inference fwd ms | gradient step ms | peak GiB (step) | saved MiB | logits cos vs PEFT DoRA "
        "| grad cos vs PEFT DoRA | logits cos vs float64 | kernels per layer (fwd / step) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def per_layer(kernels: Optional[int]) -> Optional[float]:
        return None if kernels is None else kernels / s["layers"]

    for r in result["results"]:
        lines.append(f"| {r['label']} | {fmt(r['fwd_ms'], 2)} | {fmt(r['step_ms'], 2)} | "
                     f"{fmt(r['step_peak_gib'], 2)} | {fmt(r.get('saved_mib'), 1)} | {fmt(r['logits_cos'], 6)} | "
                     f"{fmt(r['grad_cos'], 6)} | "
                     f"{fmt(r.get('logits_cos_fp64'), 6)} | {fmt(per_layer(r.get('fwd_kernels')), 1)} / "
                     f"{fmt(per_layer(r.get('step_kernels')), 1)} |")
    by_name = {r["config"]: r for r in result["results"]}
    speedups = []
    for a in ("fp32", "bf16"):
        ours, theirs = by_name.get(f"dora_ext_{a}"), by_name.get(f"peft_dora_{a}")
        if ours and theirs:
            speedups.append(f"- {a} adapters: inference {theirs['fwd_ms'] / ours['fwd_ms']:.2f}x, gradient step "
                            f"{theirs['step_ms'] / ours['step_ms']:.2f}x faster than PEFT DoRA"
                            + (f", peak step memory {ours['step_peak_gib']:.2f} vs {theirs['step_peak_gib']:.2f} GiB"
                               if ours["step_peak_gib"] is not None else ""))
    if speedups:
        lines += ["", "dora_ext against PEFT DoRA (same weights):", *speedups]
    return "\n".join(lines) + "\n"


def run_and_save(args: argparse.Namespace, name: str, run_fn: Callable[[argparse.Namespace], dict[str, Any]],
                 markdown_fn: Callable[[dict[str, Any]], str]) -> dict[str, Any]:
    """Runs a benchmark, then writes OUT/<name>.json (everything, with the wall time) and OUT/<name>.md
    (the table, also printed)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = run_fn(args)
    result["setup"]["wall_s"] = time.perf_counter() - t0
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    table = markdown_fn(result)
    (out / f"{name}.md").write_text(table)
    print(table)
    return result


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    return run_and_save(parse_args(argv), "bench_model", run, markdown)


if __name__ == "__main__":
    main()

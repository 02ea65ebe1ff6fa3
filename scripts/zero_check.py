"""Train a tiny Llama with PEFT DoRA adapters under DeepSpeed ZeRO-3 and ZeRO-2, accelerated by dora_ext,
and compare with one process training the same model with stock PEFT.

    torchrun --standalone --nproc_per_node N scripts/zero_check.py RESULTS_DIR [--device cpu|cuda]
        [--stages 3,2] [--steps N]

CPU runs use DeepSpeed's CPU accelerator (set DS_ACCELERATOR=cpu) and gloo; CUDA runs NCCL. Every
rank builds the same seeded model (nothing downloaded; B perturbed so DoRA's norm matters), wraps it
with ``deepspeed.initialize`` (client torch.optim.AdamW; the stage-3 buckets and thresholds set so a
tiny model's parameters are really partitioned and released), then calls
``dora_ext.peft.accelerate`` on the engine's module. Each rank trains on its slice of a fixed global
batch; rank 0 also trains the reference (no DeepSpeed, stock PEFT, the whole batch). Reported per
stage: the losses of both, the eval loss, the eval loss after adapters are written in place through
``GatheredParameters`` (no version bump: a stale cached norm would show), ``report()``'s statuses,
fallback calls and how many ``dora_linear`` calls the routed layers made. Writes
RESULTS_DIR/zero_check.json; exits 1 if a stage fails.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

# The checkout's dora_ext, appended: an installed dora_ext keeps priority.
sys.path.append(str(Path(__file__).resolve().parent.parent))

import dora_ext.peft as dp  # noqa: E402

VOCAB, HIDDEN, SEQ, GLOBAL_BATCH, RANK_R, LR = 128, 64, 16, 4, 4, 1e-2
TOLERANCE = 1e-5  # relative, on losses (fp32 throughout)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(device: torch.device) -> torch.nn.Module:
    import peft
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                      max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).float()
    model = peft.get_peft_model(model, peft.LoraConfig(r=RANK_R, lora_alpha=2 * RANK_R, use_dora=True,
                                                       target_modules=TARGETS))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model.to(device)


def ds_config(stage: int, world: int) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": False}
    if stage == 3:
        # a tiny model's parameters would all be "persistent" (never partitioned) by default
        zero.update(stage3_param_persistence_threshold=0, stage3_max_reuse_distance=0,
                    stage3_prefetch_bucket_size=0, stage3_max_live_parameters=0)
    return {"train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
            "gradient_accumulation_steps": 1, "zero_optimization": zero, "zero_allow_untested_optimizer": True,
            "steps_per_print": 10 ** 9}


def write_adapters(model: torch.nn.Module) -> None:
    """An in-place write of every lora_B between two evals. ZeRO-3: as DeepSpeed users write partitioned
    parameters, through ``GatheredParameters`` and ``.data`` (no version bump; a cached norm of the
    gathered storage would be stale); otherwise an in-place op on the parameter."""
    import deepspeed

    params = [p for n, p in model.named_parameters() if "lora_B" in n]
    with torch.no_grad():
        if any(hasattr(p, "ds_id") for p in params):
            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                for p in params:
                    p.data.mul_(1.5)
        else:
            for p in params:
                p.mul_(1.5)


def reference(device: torch.device, ids: torch.Tensor, steps: int) -> dict[str, Any]:
    model = build_model(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        evaluated = model(input_ids=ids, labels=ids).loss.item()
        write_adapters(model)
        rewritten = model(input_ids=ids, labels=ids).loss.item()
    return {"losses": losses, "eval": evaluated, "eval_after_write": rewritten}


def run_stage(stage: int, device: torch.device, ids: torch.Tensor, steps: int, early: bool) -> dict[str, Any]:
    """``early``: accelerate the PEFT model before ``deepspeed.initialize`` (the routed layers then
    register their parameters with DeepSpeed at their first forward)."""
    import deepspeed

    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model(device)
    routed = dp.accelerate(model) if early else 0
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(stage, world))
    routed = routed or dp.accelerate(engine.module)
    calls = {"dora_linear": 0}
    op = dp.dora_linear

    def counted(*args: Any) -> torch.Tensor:
        calls["dora_linear"] += 1
        return op(*args)

    dp.dora_linear = counted
    try:
        per = GLOBAL_BATCH // world
        local = ids[rank * per:(rank + 1) * per]
        losses = []
        for _ in range(steps):
            loss = engine(input_ids=local, labels=local).loss
            engine.backward(loss)
            engine.step()
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            losses.append((mean / world).item())
        engine.eval()
        with torch.no_grad():
            evaluated = engine(input_ids=ids, labels=ids).loss.item()
            write_adapters(engine.module)
            rewritten = engine(input_ids=ids, labels=ids).loss.item()
    finally:
        dp.dora_linear = op
    result = {"losses": losses, "eval": evaluated, "eval_after_write": rewritten, "routed": routed,
              "statuses": sorted(set(dp.report(engine.module).values())),
              "fallbacks": {k: v for d in dp.fallback_counts(engine.module).values() for k, v in d.items()},
              "dora_linear_calls": calls["dora_linear"]}
    restored = dp.restore(engine.module)
    result["restored"] = restored
    result["external_params_left"] = sum(len(getattr(m, "_external_params", {}) or {})
                                         for m in engine.module.modules())
    engine.destroy()
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--stages", default="3,2,3early", help="3, 2, 3early (accelerate before initialize)")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend="gloo" if args.device == "cpu" else "nccl")
    rank = dist.get_rank()
    device = torch.device("cpu") if args.device == "cpu" else torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False
    ids = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(123)).to(device)
    results: dict[str, Any] = {"world": dist.get_world_size(), "device": args.device,
                               "deepspeed": deepspeed.__version__, "torch": torch.__version__}
    ref = reference(device, ids, args.steps) if rank == 0 else None
    ok = True
    for name in args.stages.split(","):
        stage = int(name[0])
        got = run_stage(stage, device, ids, args.steps, early=name.endswith("early"))
        if rank == 0:
            got["reference"] = ref
            diffs = [abs(a - b) / abs(b) for a, b in zip(got["losses"] + [got["eval"], got["eval_after_write"]],
                                                        ref["losses"] + [ref["eval"], ref["eval_after_write"]])]
            got["max_rel_diff"] = max(diffs)
            got["ok"] = bool(got["max_rel_diff"] < TOLERANCE and got["routed"] == 14 and not got["fallbacks"]
                             and got["dora_linear_calls"] > 0 and got["external_params_left"] == 0)
            ok = ok and got["ok"]
            results[f"zero{name}"] = got
            print(json.dumps({f"zero{name}": got}), flush=True)
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "zero_check.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

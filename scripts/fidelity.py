"""Training fidelity: does the fused tier train a model the way the eager tier (and exact math) does?

A small random-init Llama-style decoder (transformers) gets DoRA adapters on every
projection (dora_ext.nn.apply_dora, PEFT's init: B = 0, m = row norms), and is trained
on a synthetic, deterministic next-token task (a fixed random successor table with
10% noise tokens) with fixed seeds. The same initial weights and the same batches are
trained in

    fused     bf16 base, fp32 adapter masters, DORA_EXT_TIER=fused
    eager     the same with DORA_EXT_TIER=eager (twice: the second run is the noise
              floor; it is 0 when the run is deterministic, as it is set up to be)
    float64   every weight and activation in float64 (eager path): the exact run
              (transformers computes RMSNorm and the attention softmax in fp32
              whatever the dtype, so "exact" means to about 1e-7 there)

and the script reports, per bf16 run against the eager run and against float64:
mean and max per-step |delta loss|, the final eval-loss difference, and the cosine
and relative error of the eval logits against (a) the same trained weights evaluated
in float64 (the forward's own error) and (b) the float64-trained model.

    python scripts/fidelity.py --out fidelity_results            # GPU, bf16, ~300 steps
    python scripts/fidelity.py --device cpu --steps 3 --tiny --out /tmp/f   # smoke test

Writes OUT/fidelity.json (everything, including per-step losses) and OUT/fidelity.md.
On a CPU there is no fused tier: the bf16 runs are eager only.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

sys.path.append(str(Path(__file__).resolve().parent.parent))  # the checkout, where dora_ext is not installed

import dora_ext  # noqa: E402
from dora_ext.nn import DoRALinear, apply_dora, mark_only_dora_trainable  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Config:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    seq: int
    batch: int
    rank: int
    alpha: float
    lr: float
    steps: int
    seed: int

    @staticmethod
    def from_args(args: argparse.Namespace) -> "Config":
        if args.tiny:
            shape = dict(vocab=128, hidden=64, intermediate=176, layers=2, heads=4, seq=16, batch=2, rank=4)
        else:
            shape = dict(vocab=1024, hidden=512, intermediate=1376, layers=4, heads=8, seq=128, batch=8, rank=16)
        return Config(**shape, alpha=2.0 * shape["rank"], lr=args.lr, steps=args.steps, seed=args.seed)


# ---------------------------------------------------------------------------
# model and data


def build_model(cfg: Config) -> torch.nn.Module:
    """The shared starting point: fp32 random-init Llama with DoRA on every projection."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaConfig(vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                     num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                     max_position_embeddings=cfg.seq, tie_word_embeddings=False)
    # Plain matmul attention: deterministic backward and the same code in float64.
    hf._attn_implementation = "eager"
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(hf)
    replaced = apply_dora(model, target_modules=TARGETS, r=cfg.rank, alpha=cfg.alpha)
    assert len(replaced) == 7 * cfg.layers, replaced
    mark_only_dora_trainable(model)
    return model


def as_precision(model: torch.nn.Module, precision: str, device: str) -> torch.nn.Module:
    """A copy of ``model`` in ``bf16`` (frozen weights bf16, adapters and magnitudes fp32
    masters, as PEFT keeps them) or ``fp64`` (everything float64)."""
    m = copy.deepcopy(model)
    if precision == "fp64":
        return m.to(device=device, dtype=torch.float64)
    m = m.to(device=device, dtype=torch.bfloat16)
    for layer in m.modules():
        if isinstance(layer, DoRALinear):
            for p in (layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector):
                p.data = p.data.float()
    return m


def make_batches(cfg: Config, n: int, seed: int, device: str) -> list[torch.Tensor]:
    """``n`` batches of a fixed random successor table (next = table[prev]) with 10% noise."""
    g = torch.Generator().manual_seed(cfg.seed)  # the task: the same table for train and eval
    table = torch.randperm(cfg.vocab, generator=g)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.empty(cfg.batch, cfg.seq, dtype=torch.long)
        ids[:, 0] = torch.randint(cfg.vocab, (cfg.batch,), generator=g)
        for t in range(1, cfg.seq):
            noise = torch.rand(cfg.batch, generator=g) < 0.1
            ids[:, t] = torch.where(noise, torch.randint(cfg.vocab, (cfg.batch,), generator=g), table[ids[:, t - 1]])
        out.append(ids.to(device))
    return out


def lm_loss(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(input_ids=ids).logits
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return loss, logits


# ---------------------------------------------------------------------------
# runs


@dataclass
class Run:
    name: str
    precision: str
    tier: Optional[str]
    losses: list
    eval_loss: float
    tier_seen: str
    seconds: float
    logits: Optional[torch.Tensor] = None        # eval logits (CPU float64)
    logits_fp64_eval: Optional[torch.Tensor] = None  # same trained weights evaluated in float64


def train(name: str, base: torch.nn.Module, cfg: Config, precision: str, tier_value: Optional[str], device: str,
          batches: list[torch.Tensor], eval_ids: torch.Tensor) -> Run:
    start = time.perf_counter()
    model = as_precision(base, precision, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    losses = []
    seen = "?"
    with dora_ext.overrides(tier=tier_value or "auto"):
        model.train()
        for ids in batches:
            opt.zero_grad(set_to_none=True)
            loss, _ = lm_loss(model, ids)
            seen = dora_ext.last_tier()[0]  # the forward's tier, recorded on this thread
            loss.backward()
            opt.step()
            losses.append(loss.item())
        model.eval()
        with torch.no_grad():
            eval_loss, logits = lm_loss(model, eval_ids)
    run = Run(name, precision, tier_value, losses, eval_loss.item(), seen, 0.0,
              logits=logits.detach().to("cpu", torch.float64))
    if precision != "fp64":
        # The forward's own error: the trained weights, evaluated exactly.
        exact = copy.deepcopy(model).to(torch.float64)
        with torch.no_grad():
            run.logits_fp64_eval = lm_loss(exact, eval_ids)[1].detach().to("cpu", torch.float64)
        del exact
    if device == "cuda":
        torch.cuda.synchronize()
    run.seconds = time.perf_counter() - start
    return run


def logits_agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Per-token cosine (mean, min) and relative error ||a - b|| / ||b|| of logits."""
    a2, b2 = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    cos = F.cosine_similarity(a2, b2, dim=-1)
    return {"cosine_mean": cos.mean().item(), "cosine_min": cos.min().item(),
            "rel_err": ((a2 - b2).norm() / b2.norm()).item()}


def loss_deltas(a: Run, b: Run) -> dict:
    d = [abs(x - y) for x, y in zip(a.losses, b.losses)]
    return {"mean_abs_dloss": sum(d) / len(d), "max_abs_dloss": max(d), "final_eval_dloss": a.eval_loss - b.eval_loss}


# ---------------------------------------------------------------------------
# report


def report(cfg: Config, runs: dict[str, Run], device: str, out: Path) -> dict:
    ref = runs["float64"]
    comparisons = {}
    for name, r in runs.items():
        if name == "float64":
            continue
        c = {"vs_float64": loss_deltas(r, ref),
             "logits_vs_own_weights_in_float64": logits_agreement(r.logits, r.logits_fp64_eval),
             "logits_vs_float64_trained": logits_agreement(r.logits, ref.logits)}
        if name != "eager" and "eager" in runs:
            c["vs_eager"] = loss_deltas(r, runs["eager"])
        comparisons[name] = c
    result = {
        "config": asdict(cfg), "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__, "dora_ext": dora_ext.__version__,
        "runs": {k: {"tier": r.tier, "tier_seen": r.tier_seen, "eval_loss": r.eval_loss, "first_loss": r.losses[0],
                     "last_loss": r.losses[-1], "seconds": r.seconds, "losses": r.losses} for k, r in runs.items()},
        "comparisons": comparisons,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "fidelity.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Training fidelity ({result['device_name']}, torch {torch.__version__})", "",
             f"Llama {cfg.layers} layers, hidden {cfg.hidden}, vocab {cfg.vocab}; DoRA r={cfg.rank} on every "
             f"projection; batch {cfg.batch}x{cfg.seq}, {cfg.steps} AdamW steps at lr {cfg.lr}, seed {cfg.seed}.", "",
             "| run | tier seen | first loss | last loss | eval loss | seconds |", "|---|---|---|---|---|---|"]
    for k, r in runs.items():
        lines.append(f"| {k} | {r.tier_seen} | {r.losses[0]:.5f} | {r.losses[-1]:.5f} | {r.eval_loss:.5f} "
                     f"| {r.seconds:.1f} |")
    lines += ["", "| run | vs | mean per-step abs dloss | max abs dloss | final eval dloss |", "|---|---|---|---|---|"]
    for k, c in comparisons.items():
        for vs in ("vs_eager", "vs_float64"):
            if vs in c:
                d = c[vs]
                lines.append(f"| {k} | {vs[3:]} | {d['mean_abs_dloss']:.3e} | {d['max_abs_dloss']:.3e} "
                             f"| {d['final_eval_dloss']:+.3e} |")
    lines += ["", "| run | logits vs | cosine mean | cosine min | rel err |", "|---|---|---|---|---|"]
    for k, c in comparisons.items():
        for vs, label in (("logits_vs_own_weights_in_float64", "same weights in float64"),
                          ("logits_vs_float64_trained", "float64-trained model")):
            d = c[vs]
            lines.append(f"| {k} | {label} | {d['cosine_mean']:.6f} | {d['cosine_min']:.6f} | {d['rel_err']:.3e} |")
    (out / "fidelity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="directory for fidelity.json and fidelity.md")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--tiny", action="store_true", help="a toy model (CPU smoke test)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda needs a GPU (use --device cpu --tiny for a smoke test)")
    cfg = Config.from_args(args)
    # Deterministic kernels, so that a second eager run measures the noise floor (0 when exact).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    base = build_model(cfg)
    batches = make_batches(cfg, cfg.steps, cfg.seed + 1, args.device)
    eval_ids = make_batches(cfg, 1, cfg.seed + 2, args.device)[0]
    plan = [("fused", "bf16", "fused")] if args.device == "cuda" else []
    plan += [("eager", "bf16", "eager"), ("eager_repeat", "bf16", "eager"), ("float64", "fp64", "eager")]
    runs = {}
    for name, precision, tier_value in plan:
        runs[name] = train(name, base, cfg, precision, tier_value, args.device, batches, eval_ids)
        print(f"{name}: {runs[name].seconds:.1f} s, tier {runs[name].tier_seen}, "
              f"loss {runs[name].losses[0]:.4f} -> {runs[name].losses[-1]:.4f}, eval {runs[name].eval_loss:.4f}",
              flush=True)
    if "fused" in runs and runs["fused"].tier_seen != "fused_training":
        raise SystemExit(f"the fused run did not run the fused tier: {runs['fused'].tier_seen}")
    return report(cfg, runs, args.device, args.out)


if __name__ == "__main__":
    main()

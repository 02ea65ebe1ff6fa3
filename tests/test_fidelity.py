"""Training fidelity: does the fused tier train a model the way the eager tier (and exact math) does?

A small random-init Llama-style decoder (transformers) gets DoRA adapters on every
projection (dora_ext.nn.apply_dora, PEFT's init: B = 0, m = row norms), and is trained
on a synthetic, deterministic next-token task (a fixed random successor table with
10% noise tokens) with fixed seeds. The same initial weights and the same batches are
trained in

    fused     bf16 base, fp32 adapter masters, tier option "fused" (GPU only)
    eager     the same with the tier option "eager"
    float64   every weight and activation in float64 (eager tier): the exact run
              (transformers computes RMSNorm and the attention softmax in fp32
              whatever the dtype, so "exact" means to about 1e-7 there)

and compared: per-step |delta loss| and the final eval-loss difference of each bf16 run
against the eager run and against float64, and the per-token cosine and relative error
of the eval logits against (a) the same trained weights evaluated in float64 (the
forward's own error) and (b) the float64-trained model. The tier is set with
``dora_ext.options(tier=...)`` around each run.

- ``test_fidelity_gpu`` (markers ``cuda`` and ``slow``): the real comparison, 4 layers,
  hidden 512, 300 steps (about a minute on an H100). Its tables (docs/RELIABILITY.md
  section 6) are printed: ``python3 -m pytest -q -s -m slow tests/test_fidelity.py``.
- ``test_fidelity_cpu_smoke``: a toy model, a few steps, eager tier only (a CPU has no
  fused tier), in a few seconds.

Thresholds are in units of bf16's unit roundoff ``U_BF16 = 2**-8`` (8 significand bits,
round to nearest): one rounding to bf16 moves a value by at most that much, relatively.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import dora_ext  # noqa: E402
from dora_ext.nn import DoRALinear, apply_dora, mark_only_dora_trainable  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
U_BF16 = 2.0 ** -8


@dataclass(frozen=True)
class Config:
    vocab: int = 1024
    hidden: int = 512
    intermediate: int = 1376
    layers: int = 4
    heads: int = 8
    seq: int = 128
    batch: int = 8
    rank: int = 16
    lr: float = 2e-3
    steps: int = 300
    seed: int = 0

    @property
    def alpha(self) -> float:
        return 2.0 * self.rank


GPU = Config()  # the run of docs/RELIABILITY.md section 6
TINY = Config(vocab=128, hidden=64, intermediate=176, layers=2, heads=4, seq=16, batch=2, rank=4, steps=5)


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
# runs and their comparison


@dataclass
class Run:
    name: str
    precision: str
    tier: str
    losses: list = field(default_factory=list)
    eval_loss: float = float("nan")
    tier_seen: str = "?"
    seconds: float = 0.0
    initial_eval_loss: float = float("nan")
    initial_logits: Optional[torch.Tensor] = None    # eval logits before training (CPU float64)
    logits: Optional[torch.Tensor] = None            # eval logits after training (CPU float64)
    logits_fp64_eval: Optional[torch.Tensor] = None  # same trained weights evaluated in float64


def train(name: str, base: torch.nn.Module, cfg: Config, precision: str, tier: str, device: str,
          batches: list[torch.Tensor], eval_ids: torch.Tensor) -> Run:
    """Trains a copy of ``base`` in ``precision`` on ``batches`` with the tier option ``tier``."""
    start = time.perf_counter()
    run = Run(name, precision, tier)
    model = as_precision(base, precision, device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    with dora_ext.options(tier=tier):
        model.eval()
        with torch.no_grad():
            initial_loss, initial_logits = lm_loss(model, eval_ids)
        run.initial_eval_loss, run.initial_logits = initial_loss.item(), initial_logits.to("cpu", torch.float64)
        model.train()
        for ids in batches:
            opt.zero_grad(set_to_none=True)
            loss, _ = lm_loss(model, ids)
            run.tier_seen = dora_ext.last_tier()[0]  # the forward's tier, recorded on this thread
            loss.backward()
            opt.step()
            run.losses.append(loss.item())
        model.eval()
        with torch.no_grad():
            eval_loss, logits = lm_loss(model, eval_ids)
    run.eval_loss = eval_loss.item()
    run.logits = logits.detach().to("cpu", torch.float64)
    if precision != "fp64":
        # The forward's own error: the trained weights, evaluated exactly.
        exact = copy.deepcopy(model).to(torch.float64)
        with torch.no_grad(), dora_ext.options(tier="eager"):
            run.logits_fp64_eval = lm_loss(exact, eval_ids)[1].detach().to("cpu", torch.float64)
        del exact
    if device == "cuda":
        torch.cuda.synchronize()
    run.seconds = time.perf_counter() - start
    return run


def run_all(cfg: Config, device: str, plan: list[tuple[str, str, str]]) -> dict[str, Run]:
    """Each ``(name, precision, tier)`` of ``plan`` trained from the same initial weights on the same batches."""
    base = build_model(cfg)
    batches = make_batches(cfg, cfg.steps, cfg.seed + 1, device)
    eval_ids = make_batches(cfg, 1, cfg.seed + 2, device)[0]
    return {name: train(name, base, cfg, precision, tier, device, batches, eval_ids) for name, precision, tier in plan}


def logits_agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Per-token cosine (mean, min), relative error ``||a - b|| / ||b||`` over all logits and its
    per-token maximum."""
    a2, b2 = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    cos = F.cosine_similarity(a2, b2, dim=-1)
    per_token = (a2 - b2).norm(dim=-1) / b2.norm(dim=-1)
    return {"cosine_mean": cos.mean().item(), "cosine_min": cos.min().item(),
            "rel_err": ((a2 - b2).norm() / b2.norm()).item(), "rel_err_max_token": per_token.max().item()}


def loss_deltas(a: Run, b: Run) -> dict:
    d = [abs(x - y) for x, y in zip(a.losses, b.losses, strict=True)]
    return {"mean_abs_dloss": sum(d) / len(d), "max_abs_dloss": max(d), "final_eval_dloss": a.eval_loss - b.eval_loss}


def compare(runs: dict[str, Run]) -> dict[str, dict]:
    """Every bf16 run against float64 (losses, logits) and against the eager run (losses)."""
    ref = runs["float64"]
    out = {}
    for name, r in runs.items():
        if name == "float64":
            continue
        c = {"vs_float64": loss_deltas(r, ref),
             "logits_vs_own_weights_in_float64": logits_agreement(r.logits, r.logits_fp64_eval),
             "logits_vs_float64_trained": logits_agreement(r.logits, ref.logits)}
        if name != "eager":
            c["vs_eager"] = loss_deltas(r, runs["eager"])
        out[name] = c
    return out


def report(cfg: Config, runs: dict[str, Run], comparisons: dict[str, dict], device: str) -> str:
    """The markdown tables of docs/RELIABILITY.md section 6."""
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    lines = [f"# Training fidelity ({name}, torch {torch.__version__})", "",
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
    lines += ["", "| run | logits vs | cosine mean | cosine min | rel err | max per-token rel err |",
              "|---|---|---|---|---|---|"]
    for k, c in comparisons.items():
        for vs, label in (("logits_vs_own_weights_in_float64", "same weights in float64"),
                          ("logits_vs_float64_trained", "float64-trained model")):
            d = c[vs]
            lines.append(f"| {k} | {label} | {d['cosine_mean']:.6f} | {d['cosine_min']:.6f} | {d['rel_err']:.3e} "
                         f"| {d['rel_err_max_token']:.3e} |")
    return "\n".join(lines) + "\n"


def min_cosine(rel_err: float) -> float:
    """The smallest cosine between ``b`` and ``a = b + e`` with ``||e|| <= rel_err ||b||``: the angle
    is at most ``asin(rel_err)``."""
    return math.sqrt(1.0 - rel_err ** 2)


@pytest.fixture
def deterministic(monkeypatch):
    """Deterministic algorithms and no TF32 for the test (the float64 comparison is meaningless
    with 10-bit TF32 products), put back afterwards."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    # cuBLAS's own switch for deterministic GEMMs (not a dora_ext option); it only counts if no cuBLAS
    # handle exists yet, and one stream is deterministic either way.
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[2], saved[3]


# ---------------------------------------------------------------------------
# tests


def test_fidelity_cpu_smoke(deterministic):
    """The toy model for TINY.steps steps on the CPU: bf16 eager (twice) against float64."""
    cfg = TINY
    runs = run_all(cfg, "cpu", [("eager", "bf16", "eager"), ("eager_repeat", "bf16", "eager"),
                                ("float64", "fp64", "eager")])
    comp = compare(runs)
    print(report(cfg, runs, comp, "cpu"))

    for name, r in runs.items():
        assert r.tier_seen == "eager", (name, r.tier_seen)
        assert len(r.losses) == cfg.steps and all(math.isfinite(v) for v in r.losses), name
        # A random-init model starts near the uniform loss ln(vocab).
        assert abs(r.losses[0] - math.log(cfg.vocab)) < 0.5, (name, r.losses[0])
    # The same run twice is the same run: what follows compares roundings, not noise.
    assert runs["eager_repeat"].losses == runs["eager"].losses
    assert torch.equal(runs["eager_repeat"].logits, runs["eager"].logits)

    # Training moves the float64 model by far more than the tolerances below: a bf16 run that trained
    # wrongly (or not at all) cannot pass them. Seen: eval logits moved by ~50 U, eval loss by ~3 U.
    exact = runs["float64"]
    assert logits_agreement(exact.logits, exact.initial_logits)["rel_err"] > 10 * U_BF16
    assert exact.initial_eval_loss - exact.eval_loss > U_BF16

    eager = comp["eager"]
    # Logits: 2 layers of bf16 roundings (each at most U relatively, fp32 accumulation) put every
    # token within a few U of float64 (seen: ~1.4 U overall, 2.2 U for the worst token): 4 U per token,
    # hence a cosine of at least sqrt(1 - (4 U)^2). Both against the same weights in float64 (the
    # forward's own error) and against the float64-trained model (plus the bf16 training steps').
    for key in ("logits_vs_own_weights_in_float64", "logits_vs_float64_trained"):
        agree = eager[key]
        assert agree["rel_err_max_token"] < 4 * U_BF16, (key, agree)
        assert agree["cosine_min"] > min_cosine(4 * U_BF16), (key, agree)
    # Loss: a per-token loss logsumexp(z) - z_target moves by at most 2 max_i |dz_i|, and the mean over
    # the batch's tokens averages the roundings' random signs (seen: 4e-4 = 0.1 U at most). Held to
    # U / 2 per step and at the end: 5x what is seen, and half the eval-loss drop asserted above.
    assert eager["vs_float64"]["max_abs_dloss"] < U_BF16 / 2, eager["vs_float64"]
    assert abs(eager["vs_float64"]["final_eval_dloss"]) < U_BF16 / 2, eager["vs_float64"]


@pytest.mark.slow
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fidelity_gpu(deterministic):
    """The GPU run of docs/RELIABILITY.md section 6: bf16 fused vs bf16 eager vs float64, 300 steps."""
    cfg = GPU
    runs = run_all(cfg, "cuda", [("fused", "bf16", "fused"), ("eager", "bf16", "eager"),
                                 ("float64", "fp64", "eager")])
    comp = compare(runs)
    print(report(cfg, runs, comp, "cuda"))

    assert runs["fused"].tier_seen == "fused_training", runs["fused"].tier_seen
    assert runs["eager"].tier_seen == "eager" and runs["float64"].tier_seen == "eager"
    for name, r in runs.items():
        assert all(math.isfinite(v) for v in r.losses), name
    exact = runs["float64"]
    # The task is learnt (uniform loss ln(1024) = 6.9; seen 7.04 -> 1.19): the comparisons below are
    # between trained models, not between copies of the initial one.
    assert exact.losses[-1] < exact.losses[0] - 2.0, (exact.losses[0], exact.losses[-1])

    # Seen on an H100 and an H200 alike (the run is deterministic), in units of U = 2**-8:
    #   per-step |dloss|, mean / max: fused-eager 0.77 / 4.2, fused-float64 0.93 / 4.6, eager-float64 0.96 / 5.9;
    #   final eval dloss: fused-float64 1.6, eager-float64 1.5;
    #   logits vs the same weights in float64, overall / worst token: fused 3.2 / 4.5, eager 3.2 / 4.7.
    fused, eager = comp["fused"], comp["eager"]
    # Losses, relative. Two bf16 runs each within e of float64 are within 2e of each other (triangle
    # inequality): fused vs eager is held to twice eager's own distance to float64, mean and max, so the
    # fused tier may round differently but may not train differently. And fused is as close to float64
    # as eager is: at most twice eager's distance (flash-attention's rule, as in test_cuda.py).
    for stat in ("mean_abs_dloss", "max_abs_dloss"):
        assert fused["vs_eager"][stat] <= 2 * eager["vs_float64"][stat], (stat, comp)
        assert fused["vs_float64"][stat] <= 2 * eager["vs_float64"][stat], (stat, comp)
    assert abs(fused["vs_float64"]["final_eval_dloss"]) <= max(2 * abs(eager["vs_float64"]["final_eval_dloss"]),
                                                               U_BF16), comp
    # Losses, absolute (a backstop should eager drift too): a per-token loss logsumexp(z) - z_t moves by
    # sum_i p_i dz_i - dz_t, a few U (the logits' error, below) times the logits' scale, plus what 300
    # steps of bf16 gradients add; the mean over 1016 tokens averages the roundings' signs. Seen about
    # U per step on average, 6 U for the worst of 300 steps, 1.6 U at the end: held to 2 U, 12 U and
    # 4 U (2x or more above what is seen).
    for c in (fused, eager):
        assert c["vs_float64"]["mean_abs_dloss"] < 2 * U_BF16, comp
        assert c["vs_float64"]["max_abs_dloss"] < 12 * U_BF16, comp
        assert abs(c["vs_float64"]["final_eval_dloss"]) < 4 * U_BF16, comp
    # Logits of the trained weights against the same weights in float64 (the forward's own error):
    # about a dozen bf16 roundings from the embedding to the logits (attention output, MLP output and
    # residual stream in each of 4 layers, then the head), each at most U relatively, adding up in
    # quadrature: 6 U overall, 8 U for every token (cosine >= sqrt(1 - (8 U)^2) = 0.99951), and fused
    # within twice eager's error.
    for c in (fused, eager):
        own = c["logits_vs_own_weights_in_float64"]
        assert own["rel_err"] < 6 * U_BF16, own
        assert own["rel_err_max_token"] < 8 * U_BF16, own
        assert own["cosine_min"] > min_cosine(8 * U_BF16), own
    assert (fused["logits_vs_own_weights_in_float64"]["rel_err"]
            <= 2 * eager["logits_vs_own_weights_in_float64"]["rel_err"]), comp
    # Against the float64-trained model the trajectories have drifted apart over 300 steps (seen: 0.38
    # relative, mean cosine 0.93, for fused and eager alike): no bound from rounding alone, but the
    # fused model is no farther from it than twice the eager one.
    assert (fused["logits_vs_float64_trained"]["rel_err"]
            <= 2 * eager["logits_vs_float64_trained"]["rel_err"]), comp

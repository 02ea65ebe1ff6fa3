"""Train a tiny Llama decoder with DoRA adapters under FSDP2 and FSDP1 and compare with one device.

    torchrun --standalone --nproc_per_node 2 scripts/fsdp_check.py RESULTS_DIR \
        [--device cuda|cpu] [--configs NAME,...] [--steps N]

Every config builds the same randomly initialised model (seeded; nothing is downloaded) with DoRA
adapters, either ``dora_ext.nn.apply_dora`` ("nn") or PEFT + ``dora_ext.peft.accelerate`` ("peft";
"peftlate" accelerates after sharding, on DTensor parameters),
trains it N SGD steps sharded over all ranks (each rank gets its slice of a fixed global batch) and,
on rank 0, trains an unsharded copy on the whole global batch. It reports per-step losses of both,
max |delta loss|, whether the gathered adapter (full state dict -> PEFT adapter layout) matches the
reference's, the logits of a fresh unsharded model loaded with the gathered adapter, the collectives
of one training step with dora_ext against the same step with a plain-PyTorch / stock-PEFT forward
(dora_ext must add none), and the types the dora_ext ops received (plain tensors: FSDP's gathered
weights, never DTensors). Writes RESULTS_DIR/fsdp_check.json; exits 1 if a config fails.

Precisions ("<model>-<fsdp>-<precision>"):
  fp32  everything fp32 (TF32 off): the sharded run must match to fp32 rounding.
  bf16  frozen bf16 base, fp32 adapters (so fp32 magnitude), compute under torch.autocast(bf16),
        no FSDP parameter cast (FSDP2 only: FSDP1 cannot flatten mixed dtypes).
  mp    fp32 parameters cast by FSDP (FSDP2 MixedPrecisionPolicy / FSDP1 MixedPrecision:
        param_dtype bf16, reduce_dtype fp32); the reference emulates the cast (a bf16 twin whose
        gradients step the fp32 parameters).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

# The checkout's dora_ext, appended: an installed dora_ext (the GPU machine's build) keeps priority.
sys.path.append(str(Path(__file__).resolve().parent.parent))

import dora_ext  # noqa: E402
import dora_ext.nn as dnn  # noqa: E402

VOCAB, HIDDEN, SEQ, GLOBAL_BATCH, RANK_R = 128, 64, 16, 4, 8
TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2, "mp": 2e-2}  # relative, on losses and reloaded losses
UPDATE_TOLERANCE = {"fp32": 1e-4, "bf16": 0.25, "mp": 0.25}  # on adapter differences / trained change
ALL_CONFIGS = ["nn-fsdp2-fp32", "nn-fsdp1-fp32", "peft-fsdp2-fp32", "peftlate-fsdp2-fp32", "peft-fsdp1-fp32",
               "nn-fsdp2-bf16", "peft-fsdp2-bf16", "nn-fsdp2-mp", "nn-fsdp1-mp", "peft-fsdp2-mp",
               "peft-fsdp1-mp"]


# ------------------------------------------------------------------------------------------ models


def tiny_llama(dtype: torch.dtype) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                      max_position_embeddings=SEQ, attn_implementation="eager")
    return transformers.LlamaForCausalLM(config).to(dtype)


def perturb(model: nn.Module) -> None:
    """B and magnitudes away from their init, so every adapter tensor matters from step 0."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.05 * torch.randn(p.shape, generator=gen).to(p.dtype))


def build(kind: str, precision: str, device: torch.device, accelerate: bool = True) -> nn.Module:
    """The model on ``device``: fp32 parameters, or bf16 base + fp32 adapters for "bf16"."""
    base = tiny_llama(torch.bfloat16 if precision == "bf16" else torch.float32)
    if kind == "nn":
        dnn.apply_dora(base, r=RANK_R, alpha=2 * RANK_R, exclude_modules=["lm_head"],
                       adapter_dtype=torch.float32)
        dnn.mark_only_dora_trainable(base)
        model = base
    else:
        import dora_ext.peft as dp
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(base, LoraConfig(use_dora=True, r=RANK_R, lora_alpha=2 * RANK_R,
                                                target_modules="all-linear"))  # adapters fp32
        if accelerate:
            routed = dp.accelerate(model)
            assert routed == 14, f"dora_ext.peft routed {routed} of 14 layers: {dp.report(model)}"
    perturb(model)
    return model.to(device)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    inner = model.base_model.model if hasattr(model, "peft_config") else model
    return list(inner.model.layers)


def adapter_state(kind: str, model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The saved-adapter layout (PEFT's adapter file keys) of a full model state dict."""
    if kind == "nn":
        return {k: v.detach().float().cpu().clone() for k, v in dnn.to_peft_state_dict(state).items()}
    from peft import get_peft_model_state_dict

    return {k: v.detach().float().cpu().clone()
            for k, v in get_peft_model_state_dict(model, state_dict=state).items()}


def load_adapter(kind: str, model: nn.Module, adapter: dict[str, torch.Tensor]) -> None:
    if kind == "nn":
        state = model.state_dict()
        loaded = dnn.from_peft_state_dict(adapter)
        missing = set(loaded) - set(state)
        assert not missing, f"adapter keys not in the model: {sorted(missing)[:4]}"
        model.load_state_dict({**state, **{k: v.to(state[k].dtype) for k, v in loaded.items()}})
    else:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, adapter)
        assert not result.unexpected_keys, result.unexpected_keys


# ------------------------------------------------------------------------------------------ sharding


def shard(model: nn.Module, wrapper: str, precision: str, device: torch.device) -> nn.Module:
    if wrapper == "fsdp2":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                  if precision == "mp" else MixedPrecisionPolicy())
        # an explicit mesh: fully_shard's default one is CUDA wherever a GPU exists, also for a gloo run
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        return model
    from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    layer_type = type(decoder_layers(model)[0])
    policy = (MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if precision == "mp" else None)
    # use_orig_params: FSDP1 flattens frozen base weights with trainable adapters only with it
    return FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({layer_type}), use_orig_params=True,
                                    mixed_precision=policy, device_id=device)


def unwrapped(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # FSDP1 wraps, FSDP2 does not


# ------------------------------------------------------------------------------------------ training


def batch(step: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=gen).to(device)


def lm_loss(model: nn.Module, ids: torch.Tensor, precision: str) -> torch.Tensor:
    autocast = (torch.autocast(ids.device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    with autocast:
        logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def optimizer(model: nn.Module) -> torch.optim.Optimizer:
    # SGD: the update is linear in the gradient, so sharded and unsharded runs stay comparable
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9)


def train_sharded(model: nn.Module, steps: int, precision: str, device: torch.device) -> list[float]:
    rank, world = dist.get_rank(), dist.get_world_size()
    opt = optimizer(model)
    losses = []
    for step in range(steps):
        ids = batch(step, device).chunk(world)[rank]
        loss = lm_loss(model, ids, precision)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
    return losses


def train_reference(model: nn.Module, steps: int, precision: str, device: torch.device) -> list[float]:
    """One device, whole global batch; for "mp" a bf16 twin computes and the fp32 model steps."""
    opt = optimizer(model)
    twin = copy.deepcopy(model) if precision == "mp" else None
    losses = []
    for step in range(steps):
        ids = batch(step, device)
        if twin is None:
            loss = lm_loss(model, ids, precision)
            loss.backward()
        else:
            for low, master in zip(twin.parameters(), model.parameters()):
                low.data = master.data.to(torch.bfloat16)  # parameters only: buffers keep their dtype
                low.grad = None
            loss = lm_loss(twin, ids, precision)
            loss.backward()
            for low, master in zip(twin.parameters(), model.parameters()):
                if master.requires_grad:
                    master.grad = low.grad.float()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


# ------------------------------------------------------------------------------------------ probes


@contextlib.contextmanager
def recording_op_inputs(seen: list[str], tiers: set[str]):
    """Wraps the ops as the layers call them, recording the weight's type and shape (whole, not a
    shard) and the tier the dispatcher chose."""
    import dora_ext.peft as dp

    originals = {(mod, name): getattr(mod, name) for mod in (dnn, dp) for name in ("dora_linear", "row_norm")}

    def wrap(fn: Callable, weight_index: int) -> Callable:
        def recorder(*args: Any) -> Any:
            weight = args[weight_index]
            seen.append(f"{type(weight).__name__}{list(weight.shape)}")
            out = fn(*args)
            tiers.add(dora_ext.last_tier()[0])
            return out
        return recorder

    for (mod, name), fn in originals.items():
        setattr(mod, name, wrap(fn, 1 if name == "dora_linear" else 0))
    try:
        yield
    finally:
        for (mod, name), fn in originals.items():
            setattr(mod, name, fn)


def _dense_dora_forward(self: dnn.DoRALinear, x: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch DoRA (dense norm): the stock forward that collectives are compared against."""
    weight, dtype = self.base_layer.weight, dnn.compute_dtype(x, self.base_layer.weight)
    lora = self.lora_B.weight.to(dtype) @ self.lora_A.weight.to(dtype)
    norm = torch.linalg.vector_norm((weight.to(dtype) + self.scaling * lora).float(), dim=1).detach()
    w = (self.lora_magnitude_vector / norm).unsqueeze(1) * (weight.to(dtype) + self.scaling * lora)
    bias = self.base_layer.bias
    return F.linear(x.to(dtype), w.to(dtype), bias.to(dtype) if bias is not None else None)


@contextlib.contextmanager
def stock_forward(kind: str, model: nn.Module):
    if kind == "nn":
        original = dnn.DoRALinear.forward
        dnn.DoRALinear.forward = _dense_dora_forward
        try:
            yield
        finally:
            dnn.DoRALinear.forward = original
    else:
        import dora_ext.peft as dp

        dp.restore(model)
        try:
            yield
        finally:
            dp.accelerate(model)


# torch 2.11's CommDebugMode crashes in its module hooks on FSDP1 models (IndexError in
# _fw_set_module_hook, seen on 2 x H200, 2026-11-27) and leaves them broken for the rest of
# the process; 2.14 (CPU CI) counts fine.
COMM_DEBUG_MODE_WORKS = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 14)


def collectives_of_step(model: nn.Module, precision: str, device: torch.device
                        ) -> tuple[dict[str, int] | None, float]:
    """Collectives (by c10d op) of one forward + backward, and the peak memory (GiB, CUDA only).

    None instead of the counts where CommDebugMode itself is broken (COMM_DEBUG_MODE_WORKS);
    the step still runs, unmeasured.
    """
    from torch.distributed.tensor.debug import CommDebugMode

    rank, world = dist.get_rank(), dist.get_world_size()
    ids = batch(0, device).chunk(world)[rank]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    counts: dict[str, int] | None = None
    if COMM_DEBUG_MODE_WORKS:
        with CommDebugMode() as comm:
            lm_loss(model, ids, precision).backward()
        counts = {str(op): n for op, n in comm.get_comm_counts().items()}
    else:
        lm_loss(model, ids, precision).backward()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    model.zero_grad(set_to_none=True)
    return counts, peak


# ------------------------------------------------------------------------------------------ compare


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def run_config(name: str, steps: int, device: torch.device) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    kind, wrapper, precision = name.split("-")
    late = kind == "peftlate"  # dora_ext.peft.accelerate after sharding (DTensor base weights)
    kind = "peft" if late else kind
    rank = dist.get_rank()
    tol = TOLERANCE[precision]
    started = time.perf_counter()
    model = build(kind, precision, device, accelerate=not late)
    if late:
        import dora_ext.peft as dp
    reference = copy.deepcopy(model) if rank == 0 else None
    sharded = shard(model, wrapper, precision, device)
    if late:
        routed = dp.accelerate(unwrapped(sharded))
        assert routed == 14, f"dora_ext.peft routed {routed} of 14 sharded layers: {dp.report(unwrapped(sharded))}"
        if reference is not None:
            dp.accelerate(reference)

    op_inputs: list[str] = []
    tiers: set[str] = set()
    with recording_op_inputs(op_inputs, tiers):
        comm_dora, peak_dora = collectives_of_step(sharded, precision, device)
    with stock_forward(kind, unwrapped(sharded)):
        comm_stock, peak_stock = collectives_of_step(sharded, precision, device)
    losses = train_sharded(sharded, steps, precision, device)
    full = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    fallbacks = {}
    if kind == "peft":
        import dora_ext.peft as dp

        fallbacks = dp.fallback_counts(unwrapped(sharded))
    result: dict[str, Any] = {"config": name, "steps": steps, "tolerance": tol,
                              "update_tolerance": UPDATE_TOLERANCE[precision]}
    if rank == 0:
        initial = adapter_state(kind, reference, reference.state_dict())
        ref_losses = train_reference(reference, steps, precision, device)
        # an unsharded model of the same structure reads the keys (PEFT's reader trips over FSDP1's
        # wrapped module names); the values are the gathered ones
        fresh = build(kind, precision, device)
        got = adapter_state(kind, fresh, full)
        want = adapter_state(kind, fresh, reference.state_dict())
        # the trained change of each adapter tensor: differences are judged against it, not against the
        # (much larger) tensor, so a lost or doubled gradient cannot hide under the init
        update = {k: want[k] - initial[k] for k in want}
        load_adapter(kind, fresh, {k: v.to(device) for k, v in got.items()})
        probe = batch(steps, device)
        with torch.no_grad():
            loss_fresh = lm_loss(fresh, probe, precision)
            loss_ref = lm_loss(reference, probe, precision)
        dloss = [abs(a - b) for a, b in zip(losses, ref_losses)]
        keys_match = sorted(got) == sorted(want)
        adapter_rel = max((rel_diff(got[k], want[k]) for k in want if k in got), default=math.inf)
        update_rel = max(((got[k] - want[k]).norm().item() / update[k].norm().clamp_min(1e-30).item()
                          for k in want if k in got), default=math.inf)
        result.update({
            "losses_fsdp": losses,
            "losses_single": ref_losses,
            "max_abs_dloss": max(dloss),
            "max_rel_dloss": max(d / abs(b) for d, b in zip(dloss, ref_losses)),
            "adapter_keys_match": keys_match,
            "adapter_tensors": len(want),
            "adapter_max_rel_diff": adapter_rel,
            "adapter_update_max_rel_diff": update_rel,
            "adapter_min_rel_update": min(rel_diff(want[k], initial[k]) for k in want),
            "adapter_max_abs_diff": max((got[k] - want[k]).abs().max().item() for k in want if k in got),
            "reloaded_loss": loss_fresh.item(),
            "reference_loss_after": loss_ref.item(),
            "op_inputs": sorted(set(op_inputs)),
            "op_calls": len(op_inputs),
            "op_tiers": sorted(tiers),
            "collectives_dora_ext": comm_dora,
            "collectives_stock": comm_stock,
            "peak_gib_dora_ext": peak_dora,
            "peak_gib_stock": peak_stock,
            "peft_fallbacks": fallbacks,
        })
        checks = {
            "losses": result["max_rel_dloss"] <= tol,
            "adapter_keys": keys_match and len(want) > 0,
            "adapter_values": update_rel <= UPDATE_TOLERANCE[precision],
            "reloaded": abs(loss_fresh.item() - loss_ref.item()) <= tol * abs(loss_ref.item()),
            "op_inputs_plain": len(op_inputs) > 0 and not any(s.startswith("DTensor") for s in op_inputs),
            # None: CommDebugMode could not count on this torch; reported, left out of "passed".
            "no_extra_collectives": (None if comm_dora is None or comm_stock is None
                                     else comm_dora == comm_stock and sum(comm_dora.values()) > 0),
            "no_peft_fallbacks": not fallbacks,
        }
        result["checks"] = checks
        result["passed"] = all(v for v in checks.values() if v is not None)
    result["seconds"] = time.perf_counter() - started
    dist.barrier()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results_dir", type=Path)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--configs", default=",".join(ALL_CONFIGS))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--tier", choices=["auto", "eager", "fused"], default=None,
                        help="the tier option for this run (default: as the environment sets it)")
    args = parser.parse_args()
    if args.tier is not None:
        dora_ext.set_options(tier=args.tier)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off on the shared GPU machines

    # FSDP1 warns that frozen and trainable parameters share a flat parameter (docs/FSDP.md)
    warnings.filterwarnings("ignore", message=".*has both parameters with requires_grad=True and False.*")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rank = int(os.environ["RANK"])
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    results = []
    try:
        for name in args.configs.split(","):
            result = run_config(name, args.steps, device)
            results.append(result)
            if rank == 0:
                print(f"{name}: passed={result['passed']} max|dloss|={result['max_abs_dloss']:.3g} "
                      f"(rel {result['max_rel_dloss']:.3g}, tol {result['tolerance']:g}) "
                      f"adapter diff/update {result['adapter_update_max_rel_diff']:.3g} "
                      f"checks={ {k: v for k, v in result['checks'].items() if v is not True} or 'all ok'} "
                      f"[{result['seconds']:.1f} s]", flush=True)
                print("   losses fsdp  ", " ".join(f"{x:.6f}" for x in result["losses_fsdp"]))
                print("   losses single", " ".join(f"{x:.6f}" for x in result["losses_single"]), flush=True)
    finally:
        dist.barrier()  # a rank that tears gloo down while its peer still talks aborts the peer
        dist.destroy_process_group()
    if rank != 0:
        return 0
    summary = {
        "world_size": int(os.environ["WORLD_SIZE"]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "dora_ext_tier_env": dora_ext.get_options()["tier"],
        "dora_ext_last_tier": dora_ext.last_tier(),
        "dora_ext_file": dora_ext.__file__,
        "results": results,
        "passed": all(r["passed"] for r in results),
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "fsdp_check.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"fsdp_check: {'PASSED' if summary['passed'] else 'FAILED'} -> {args.results_dir / 'fsdp_check.json'}")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

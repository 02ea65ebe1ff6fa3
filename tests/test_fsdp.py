"""dora_ext under FSDP2 (fully_shard, DTensor parameters) and FSDP1, on CPU with 2 gloo processes.

Two torchrun launches (``--standalone``: the rendezvous port is picked free) run the workers; each
launch is bounded by a timeout and killed as a process group if it hangs:

- ``scripts/fsdp_check.py --device cpu``: a tiny Llama with DoRA adapters (``dora_ext.nn`` and PEFT +
  ``dora_ext.peft.accelerate``) trained 5 SGD steps under FSDP2 and FSDP1 (``use_orig_params=True``),
  in fp32 and bf16 / mixed precision, against the same model trained unsharded on the whole global
  batch. The same script is the GPU check (NCCL, bf16; see docs/FSDP.md).
- ``tests/dist_row_norm_worker.py``: ``dora_ext.distributed.row_norm`` of DTensor weights sharded
  along d_out and d_in against the float64 dense norm, and the collectives it issues.

FSDP1 runs on CPU with gloo here (``device_id=torch.device("cpu")``), so both FSDP generations are
covered in CI.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fresh_process import torchrun

pytest.importorskip("torch.distributed.fsdp")
pytest.importorskip("transformers")
pytest.importorskip("peft")

import torch.distributed as dist  # noqa: E402

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ["nn-fsdp2-fp32", "nn-fsdp1-fp32", "peft-fsdp2-fp32", "peftlate-fsdp2-fp32", "peft-fsdp1-fp32",
           "nn-fsdp2-bf16", "peft-fsdp2-bf16", "nn-fsdp2-mp", "nn-fsdp1-mp", "peft-fsdp2-mp", "peft-fsdp1-mp"]


@pytest.fixture(scope="module")
def training(tmp_path_factory) -> dict[str, dict[str, Any]]:
    out_dir = tmp_path_factory.mktemp("fsdp_check")
    # exit status 1 means "a config failed its checks": the per-config tests say which and why
    log = torchrun(ROOT / "scripts" / "fsdp_check.py", str(out_dir), "--device", "cpu", "--configs",
                   ",".join(CONFIGS), ok_codes=(0, 1))
    if not (out_dir / "fsdp_check.json").exists():
        pytest.fail(f"fsdp_check.py wrote no summary:\n{log[-6000:]}")
    summary = json.loads((out_dir / "fsdp_check.json").read_text())
    return {r["config"]: r for r in summary["results"]}


@pytest.mark.parametrize("config", CONFIGS)
def test_sharded_training_matches_single_process(training, config):
    """Per-step losses, the gathered adapter and a model reloaded from it match the unsharded run;
    the ops saw FSDP's gathered plain tensors; dora_ext added no collective to FSDP's own."""
    r = training[config]
    failed = {k: v for k, v in r["checks"].items() if not v}
    detail = (f"{config}: losses fsdp {r['losses_fsdp']} single {r['losses_single']} "
              f"(max |d| {r['max_abs_dloss']:.3g}, rel {r['max_rel_dloss']:.3g}, tol {r['tolerance']}); "
              f"adapter diff/update {r['adapter_update_max_rel_diff']:.3g} (tol {r['update_tolerance']}); "
              f"reloaded {r['reloaded_loss']} vs {r['reference_loss_after']}; op inputs {r['op_inputs']}; "
              f"collectives {r['collectives_dora_ext']} vs stock {r['collectives_stock']}; "
              f"PEFT fallbacks {r['peft_fallbacks']}")
    assert not failed, f"failed checks {sorted(failed)}: {detail}"
    assert r["passed"], detail
    # every adapter tensor was trained, so the comparison of updates is not vacuous
    assert r["adapter_min_rel_update"] > 0, detail
    assert len(r["losses_fsdp"]) == r["steps"] == 5


def test_fp32_runs_agree_to_rounding(training):
    """fp32 on CPU: FSDP2 and FSDP1 reproduce the unsharded losses to fp32 rounding."""
    for config in CONFIGS:
        if config.endswith("fp32"):
            r = training[config]
            assert r["max_rel_dloss"] < 1e-5 and r["adapter_update_max_rel_diff"] < 1e-4, r


def test_ops_received_whole_plain_weights(training):
    """Inside forward FSDP2 hands the layers its all-gathered nn.Parameters and FSDP1 plain-tensor
    views: the ops never see a DTensor or a shard, so the norm uses the weight FSDP gathered anyway."""
    for config in CONFIGS:
        r = training[config]
        kinds = {s.split("[")[0] for s in r["op_inputs"]}
        want = {"Parameter"} if "fsdp2" in config else {"Tensor"}
        assert kinds == want, (config, r["op_inputs"])
        # whole weights: q/k/v/o/gate/up/down shapes of the tiny Llama (64 hidden, 128 intermediate)
        shapes = {s.split("[", 1)[1] for s in r["op_inputs"]}
        assert shapes == {"64, 64]", "32, 64]", "128, 64]", "64, 128]"}, (config, shapes)
        assert r["op_calls"] == 14, (config, r["op_calls"])


@pytest.fixture(scope="module")
def norm_cases(tmp_path_factory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("row_norm") / "cases.json"
    torchrun(ROOT / "tests" / "dist_row_norm_worker.py", str(out))
    return json.loads(out.read_text())


def test_distributed_row_norm_matches_dense_float64(norm_cases):
    """DTensor weights sharded along d_out / d_in (1-D and 2-D meshes, uneven shards, fp32 / bf16 /
    float64) against the float64 dense norm; W is never gathered; DoRALinear.row_norm() of an
    FSDP2-sharded layer; errors for unsupported placements and mismatched inputs."""
    failed = [c for c in norm_cases if not c["ok"]]
    assert not failed, json.dumps(failed, indent=1)
    assert len(norm_cases) >= 70
    d_in_sharded = [c for c in norm_cases if "W[Shard(dim=1)]" in c["case"]]
    assert d_in_sharded and all(c.get("comm", {}).get("c10d.allreduce_", 0) == 1 for c in d_in_sharded)

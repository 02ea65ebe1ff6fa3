"""The fused kernels on a second GPU: correct on cuda:1 after the first call happened on cuda:0.

The launcher loads each cubin once per device and caches the functions per device; a kernel launched
with device 0's module, context or stream on device 1's memory would fault or compute garbage. These
tests force the fused tier (``DORA_EXT_TIER=fused``: an error, not a silent eager fallback, if it
cannot run) and compare every result with the float64 reference. Skipped without 2 GPUs.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import dora_ext
from reference import (BATCH_GRAD_TOL, FWD_TOL, NORM_TOL, make_inputs, ref_compose_delta, ref_dora_linear,
                       ref_row_norm, rel_err)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
]


def check_device(index: int, dtype: torch.dtype, seed: int, device_type: str = "cuda") -> dict[str, Any]:
    """Forward + backward of dora_linear, row_norm and compose_delta on cuda:<index>, from whatever the
    current device is; returns the errors against float64, the tiers and the output devices."""
    device = torch.device(device_type, index)
    t = make_inputs(96, 160, 8, (3, 37), dtype, device=device, requires_grad=True, mag_dtype=torch.float32,
                    seed=seed)
    y = dora_ext.dora_linear(**t)
    tier_fwd = dora_ext.last_tier()[0]
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    y.backward(gy.to(device, dtype))
    tier_bwd = dora_ext.last_tier()[0]
    leaves = {k: t[k].detach().double().cpu().requires_grad_(True)
              for k in ("x", "bias", "lora_A", "lora_B", "magnitude")}
    ref = ref_dora_linear(leaves["x"], t["weight"], leaves["bias"], leaves["lora_A"], leaves["lora_B"],
                          leaves["magnitude"], t["scale"])
    ref.backward(gy)
    with torch.no_grad():
        norm = dora_ext.row_norm(t["weight"], t["lora_A"], t["lora_B"], t["scale"])
        base = t["x"] @ t["weight"].T
        lora = (t["x"] @ t["lora_A"].T) @ t["lora_B"].T
        delta = dora_ext.compose_delta(base, lora, t["magnitude"], norm, t["scale"])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    out = {
        "device": index, "dtype": str(dtype), "tiers": [tier_fwd, tier_bwd],
        "out_devices": sorted({str(v.device) for v in (y, norm, delta, *(t[k].grad for k in leaves))}),
        "y": rel_err(y, ref),
        "norm": rel_err(norm, ref_row_norm(t["weight"], t["lora_A"], t["lora_B"], t["scale"])),
        "delta": rel_err(delta, ref_compose_delta(base, lora, t["magnitude"], norm, t["scale"])),
        "finite": bool(torch.isfinite(y).all() and all(torch.isfinite(t[k].grad).all() for k in leaves)),
    }
    out.update({f"grad_{k}": rel_err(t[k].grad, leaves[k].grad) for k in leaves})
    return out


def assert_ok(r: dict[str, Any], dtype: torch.dtype) -> None:
    assert r["tiers"] == ["fused_training", "fused_training"], r
    assert r["out_devices"] == [f"cuda:{r['device']}"], r
    assert r["finite"], r
    assert r["y"] < FWD_TOL[dtype] and r["delta"] < FWD_TOL[dtype], r
    assert r["norm"] < NORM_TOL[dtype], r
    for k, v in r.items():
        if k.startswith("grad_"):
            assert v < BATCH_GRAD_TOL[dtype], (k, r)  # 111 tokens


def first_on_0_then_1() -> list[dict[str, Any]]:
    """cuda:0 first (current device 0 throughout), then cuda:1, then cuda:1 as current device, then 0."""
    dora_ext.set_options(tier="fused")
    torch.cuda.set_device(0)
    runs = [check_device(0, torch.bfloat16, 1), check_device(1, torch.bfloat16, 2)]
    assert torch.cuda.current_device() == 0, "an op changed the current device"
    runs.append(check_device(1, torch.float32, 3))
    with torch.cuda.device(1):
        runs.append(check_device(1, torch.bfloat16, 4))
    runs.append(check_device(0, torch.float32, 5))
    return runs


def test_fused_on_cuda1_after_cuda0_fresh_process():
    """A fresh process whose first dora_ext call is on cuda:0 (nothing loaded for cuda:1 before)."""
    tests_dir = Path(__file__).resolve().parent
    # tests/ first (this module, reference.py); the checkout last, so an installed dora_ext wins
    code = (f"import sys; sys.path.insert(0, {str(tests_dir)!r}); sys.path.append({str(tests_dir.parent)!r}); "
            "import json, test_multi_gpu as t; print('RESULT ' + json.dumps(t.first_on_0_then_1()))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = json.loads(proc.stdout.split("RESULT ", 1)[1])
    dtypes = [torch.bfloat16, torch.bfloat16, torch.float32, torch.bfloat16, torch.float32]
    for r, dtype in zip(runs, dtypes):
        assert_ok(r, dtype)
    assert [r["device"] for r in runs] == [0, 1, 1, 1, 0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fused_on_cuda1_in_this_process(dtype, monkeypatch):
    dora_ext.set_options(tier="fused")
    with torch.cuda.device(0):
        assert_ok(check_device(0, dtype, 10), dtype)
        assert_ok(check_device(1, dtype, 11), dtype)

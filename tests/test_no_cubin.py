"""A GPU this build has no cubin for: every op runs the eager path, observably.

These tests need a dora_ext built *without* cubins for the GPU at hand, so with a normal build
they skip (and say why). ``scripts/gpu_check.sh`` builds such a copy (cubins for another
architecture only) and runs this file against it:

    DORA_EXT_CUDA_ARCHS=80 pip install --no-build-isolation --no-deps --target DIR .   # on an sm_90 GPU
    PYTHONPATH=DIR python3 -m pytest tests/test_no_cubin.py
"""
from __future__ import annotations

import json
import textwrap

import pytest
import torch

import dora_ext
from reference import make_inputs, ref_dora_linear, ref_row_norm, rel_err
from fresh_process import run_python


def _gpu_arch() -> int:
    major, minor = torch.cuda.get_device_capability()
    return 10 * major + minor


def _build_serves_this_gpu() -> bool:
    """The launcher's own answer (csrc/launcher.cpp: an exact arch, or an earlier minor below sm_90)."""
    return torch.ops.dora_ext.fused_available.default(torch.cuda.current_device())[0]


pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(torch.cuda.is_available() and dora_ext.info()["cuda_build"] and _build_serves_this_gpu(),
                       reason="this build has cubins for this GPU; scripts/gpu_check.sh runs this file against a "
                              "build for another architecture"),
]


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_auto_tier_runs_eager_with_the_reason(dtype, training):
    inp = make_inputs(640, 768, 16, (3, 67), dtype, device="cuda", requires_grad=training)
    tier, reason = dora_ext.select_tier(inp["x"], inp["weight"], inp["lora_A"], training)
    assert tier == "eager"
    assert f"no cubin for sm_{_gpu_arch()}" in reason, reason
    y = dora_ext.dora_linear(**inp)
    assert dora_ext.last_tier() == (tier, reason)
    ref = ref_dora_linear(inp["x"], inp["weight"], inp["bias"], inp["lora_A"], inp["lora_B"], inp["magnitude"],
                          inp["scale"])
    assert rel_err(y, ref) < (1e-5 if dtype == torch.float32 else 1e-2)
    if training:
        y.float().sum().backward()
        assert inp["lora_A"].grad is not None and torch.isfinite(inp["lora_A"].grad).all()


def test_row_norm_runs_eager():
    inp = make_inputs(512, 300, 8, (4,), torch.bfloat16, device="cuda")
    n = dora_ext.row_norm(inp["weight"], inp["lora_A"], inp["lora_B"], inp["scale"])
    assert rel_err(n, ref_row_norm(inp["weight"], inp["lora_A"], inp["lora_B"], inp["scale"])) < 1e-5


def test_forced_fused_tier_raises_naming_the_missing_cubin(monkeypatch):
    inp = make_inputs(256, 256, 4, (8,), torch.bfloat16, device="cuda")
    dora_ext.set_options(tier="fused")
    with pytest.raises(RuntimeError, match=rf"DORA_EXT_TIER=fused.*no cubin for sm_{_gpu_arch()}"):
        dora_ext.dora_linear(**inp)


def test_prefer_fused_warns_once_and_runs_eager():
    """In a fresh process (the warning is once per process): three calls, one warning, eager results."""
    script = textwrap.dedent("""
        import json
        import torch, dora_ext
        x, W = torch.randn(33, 96, device="cuda"), torch.randn(80, 96, device="cuda")
        A, B = torch.randn(4, 96, device="cuda"), torch.randn(80, 4, device="cuda")
        m = torch.rand(80, device="cuda") + .5
        with dora_ext.overrides(tier="prefer_fused"):
            ys = [dora_ext.dora_linear(x, W, None, A, B, m, 0.5) for _ in range(3)]
            tier = dora_ext.last_tier()[0]
        with dora_ext.overrides(tier="eager"):
            ref = dora_ext.dora_linear(x, W, None, A, B, m, 0.5)
        print(json.dumps({"tier": tier, "equal": all(torch.equal(y, ref) for y in ys)}))
    """)
    proc = run_python(["-c", script], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"tier": "eager", "equal": True}
    warnings = [line for line in proc.stderr.splitlines() if "DORA_EXT_TIER=prefer_fused" in line]
    assert len(warnings) == 1, proc.stderr[-3000:]
    assert f"no cubin for sm_{_gpu_arch()}" in warnings[0], warnings[0]

"""CPU smoke test of scripts/fidelity.py (the GPU training-fidelity run): a toy model, 3 steps.

Runs the script as the lead does on the GPU, in a subprocess (it switches torch to
deterministic algorithms for the whole process), and checks that its report is
complete and sane: the repeated eager run is bitwise the eager run, bf16 training
stays close to the float64 run, and the logits agree with float64.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from fresh_process import run_python

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "fidelity.py"


def test_fidelity_cpu_smoke(tmp_path):
    proc = run_python([str(SCRIPT), "--device", "cpu", "--steps", "3", "--tiny", "--out", str(tmp_path)],
                      timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "fidelity.json").read_text())
    md = (tmp_path / "fidelity.md").read_text()
    assert "mean per-step abs dloss" in md and "cosine mean" in md

    runs = result["runs"]
    assert set(runs) == {"eager", "eager_repeat", "float64"}  # no fused tier on a CPU
    vocab = result["config"]["vocab"]
    for name, r in runs.items():
        assert len(r["losses"]) == 3 and all(math.isfinite(v) for v in r["losses"]), name
        assert r["tier_seen"] == "eager", name
        # A random-init model starts near the uniform loss ln(vocab).
        assert abs(r["first_loss"] - math.log(vocab)) < 0.5, (name, r["first_loss"])

    comp = result["comparisons"]
    # Deterministic set-up: the same run twice is the same run.
    assert comp["eager_repeat"]["vs_eager"] == {"mean_abs_dloss": 0.0, "max_abs_dloss": 0.0, "final_eval_dloss": 0.0}
    # bf16 against float64 over 3 steps: rounding-level differences, not a different model.
    assert comp["eager"]["vs_float64"]["max_abs_dloss"] < 1e-2
    for key in ("logits_vs_own_weights_in_float64", "logits_vs_float64_trained"):
        agreement = comp["eager"][key]
        assert agreement["cosine_min"] > 0.999 and agreement["rel_err"] < 5e-2, (key, agreement)

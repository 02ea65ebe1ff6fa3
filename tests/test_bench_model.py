"""Smoke test of scripts/bench_model.py: the model-level benchmark runs end to end on the CPU with
tiny dimensions and writes its JSON and table (the GPU numbers come from the lead's device run)."""
from __future__ import annotations

import json

import pytest

from script_loader import load_script

pytest.importorskip("peft")
pytest.importorskip("transformers")

def test_bench_model_tiny_cpu(tmp_path):
    bench = load_script("scripts/bench_model.py")
    result = bench.main(["--tiny", "--device", "cpu", "--warmup", "0", "--reps", "1", "--out", str(tmp_path)])
    rows = {r["config"]: r for r in result["results"]}
    assert list(rows) == ["base", "peft_lora_fp32", "peft_dora_fp32", "dora_ext_fp32",
                          "peft_lora_bf16", "peft_dora_bf16", "dora_ext_bf16"]
    for name, row in rows.items():
        assert row["fwd_ms"] > 0, name
        assert (row["step_ms"] is None) == (name == "base"), name
        # the bytes autograd saved for backward in one training forward (weights excluded)
        if name == "base":
            assert row["saved_mib"] is None
        else:
            assert isinstance(row["saved_mib"], float) and row["saved_mib"] > 0, name
    for a in ("fp32", "bf16"):
        ours = rows[f"dora_ext_{a}"]
        assert ours["routed_layers"] == 14 and ours["fallback_calls"] == 0  # 2 layers x 7 linears, all routed
        # same weights as PEFT DoRA: the cosines compare two computations, not a value with itself.
        # bf16 adapters: both round in bf16, differently (~0.99998 on this tiny random model)
        assert ours["logits_cos"] >= (0.99999 if a == "fp32" else 0.9999), a
        assert ours["grad_cos"] >= 0.9999, a
        assert rows[f"peft_dora_{a}"]["logits_cos"] == pytest.approx(1.0)
        # both against a float64 copy of the PEFT DoRA model: close, and not the value itself
        for name in (f"peft_dora_{a}", f"dora_ext_{a}"):
            assert 0.9999 <= rows[name]["logits_cos_fp64"] < 1.0, name
        assert rows[f"peft_lora_{a}"]["logits_cos_fp64"] is None
    saved = json.loads((tmp_path / "bench_model.json").read_text())
    assert [r["config"] for r in saved["results"]] == list(rows)
    table = (tmp_path / "bench_model.md").read_text()
    assert "PEFT DoRA + dora_ext.peft.accelerate, bf16 adapters" in table and "faster than PEFT DoRA" in table
    assert "logits cos vs float64" in table and "| peak GiB (step) | saved MiB |" in table


def test_profile_step_tiny_cpu(tmp_path, monkeypatch):
    """scripts/profile_step.py runs both setups per adapter dtype and writes their profiles (on the CPU
    no GPU kernels are listed: it checks the plumbing, the GPU run gives the content)."""
    script = load_script("scripts/profile_step.py")
    monkeypatch.setattr("sys.argv", ["profile_step.py", "--tiny", "--device", "cpu", "--adapter-dtypes", "bf16",
                                     "--out", str(tmp_path)])
    script.main()
    text = (tmp_path / "profile_step_bf16.txt").read_text()
    assert "== peft_lora_bf16:" in text and "== dora_ext_bf16:" in text
    assert "dora_ext::dora_linear_backward" in text  # the accelerated step ran the op (host-side table)



def test_profile_step_dropout_recipe_tiny_cpu(tmp_path, monkeypatch):
    """With --recipe dropout the profiles are of PEFT LoRA and accelerated DoRA with lora_dropout, and of
    accelerated DoRA without it (the dropout target's reference); the dropout op ran."""
    script = load_script("scripts/profile_step.py")
    monkeypatch.setattr("sys.argv", ["profile_step.py", "--tiny", "--device", "cpu", "--adapter-dtypes", "bf16",
                                     "--recipe", "dropout", "--out", str(tmp_path)])
    script.main()
    text = (tmp_path / "profile_step_bf16.txt").read_text()
    assert "== peft_lora_bf16 (lora_dropout 0.05):" in text and "== dora_ext_bf16 (lora_dropout 0.05):" in text
    assert "== dora_ext_no_dropout_bf16:" in text
    assert "dora_ext::dora_linear_dropout" in text


def test_profile_inference_tiny_cpu(tmp_path, monkeypatch):
    """With --inference the profiles are of one no_grad forward of the base model, PEFT LoRA and
    accelerated DoRA (no backward op ran)."""
    script = load_script("scripts/profile_step.py")
    monkeypatch.setattr("sys.argv", ["profile_step.py", "--tiny", "--device", "cpu", "--adapter-dtypes", "bf16",
                                     "--inference", "--out", str(tmp_path)])
    script.main()
    text = (tmp_path / "profile_inference_bf16.txt").read_text()
    assert "== base_model:" in text and "== peft_lora_bf16:" in text and "== dora_ext_bf16:" in text
    assert "dora_ext::dora_linear" in text and "dora_linear_backward" not in text
    assert not (tmp_path / "profile_step_bf16.txt").exists()


def test_profile_generate_tiny_cpu(tmp_path):
    """scripts/profile_generate.py, one adapter and PEFT's mixed-adapter path, on the CPU (the plumbing;
    the GPU run gives the content)."""
    script = load_script("scripts/profile_generate.py")
    for extra in ([], ["--mixed", "3", "--batch", "4"]):
        script.main(["--tiny", "--device", "cpu", "--out", str(tmp_path), *extra])
        text = (tmp_path / "profile_generate.txt").read_text()
        assert ("mixed 3 adapters" if extra else "one adapter") in text
        assert "ms a token" in text and "dora_ext::dora_linear" in text  # the routed layers ran the op


def test_bench_serving_tiny_cpu(tmp_path):
    """scripts/bench_serving.py on the CPU: every setup runs, the rows agreeing with the merged models
    are counted, and each adapter's norm is computed once per adapted linear (the cache's job),
    counted in the table."""
    script = load_script("scripts/bench_serving.py")
    result = script.main(["--tiny", "--device", "cpu", "--out", str(tmp_path)])
    setups = [r["setup"] for r in result["results"]]
    assert setups == ["base", "dora_ext_mixed", "merged_sequential", "peft_lora_mixed"]
    n = result["setup"]["adapters"]
    # bf16 merged weights round differently, so a greedy row may part from the merged model's: counted
    agreeing = result["setup"]["rows_equal_to_merged_models"]
    assert set(agreeing) == {"dora_ext_mixed"}
    assert all(v.endswith(f"/{n}") for v in agreeing.values())
    linears = result["setup"]["layers"] * len(script.TARGETS)
    by_setup = {r["setup"]: r for r in result["results"]}
    assert by_setup["dora_ext_mixed"]["norms_computed"] == n * linears
    assert by_setup["dora_ext_mixed"]["norm_lookups"] > n * linears  # no stacks on the CPU: looked up per call
    assert all(r["gpu_ops_per_token_forward"] is None for r in result["results"])  # counted on CUDA only
    assert "| norms computed | norm lookups | GPU ops per 1-token forward |" in (
        tmp_path / "bench_serving.md").read_text()

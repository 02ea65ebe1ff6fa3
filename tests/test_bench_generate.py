"""Smoke test of scripts/bench_generate.py: the generation benchmark runs end to end on the CPU with
tiny dimensions and writes its JSON and table (the GPU numbers come from the lead's device run)."""

from __future__ import annotations

import json

import pytest

from script_loader import load_script

pytest.importorskip("peft")
pytest.importorskip("transformers")


def test_bench_generate_tiny_cpu(tmp_path):
    bench = load_script("scripts/bench_generate.py")
    result = bench.main(["--tiny", "--device", "cpu", "--batches", "1,2", "--out", str(tmp_path)])
    setups = ["base"] + [f"{s}_{a}" for a in ("fp32", "bf16") for s in ("peft_lora", "peft_dora", "dora_ext")]
    rows = {(r["batch"], r["setup"]): r for r in result["results"]}
    assert list(rows) == [(b, s) for b in (1, 2) for s in setups]
    for key, row in rows.items():
        assert row["tokens_per_s"] > 0 and row["generate_ms"] > 0, key
        assert row["vs_base"] > 0, key
        assert (row.get("tokens_match") is None) == (not key[1].startswith("dora_ext")), key
    for b in (1, 2):
        assert rows[(b, "base")]["vs_base"] == pytest.approx(1.0)
        for a in ("fp32", "bf16"):
            ours = rows[(b, f"dora_ext_{a}")]
            assert ours["adapter_dtype"] == a
            assert ours["routed_layers"] == 14 and ours["fallback_calls"] == 0  # 2 layers x 7 linears, all routed
            assert ours["last_tier"][0] == "eager"  # the CPU has no fused kernels
            assert isinstance(ours["tokens_match"], float) and 0.0 <= ours["tokens_match"] <= 1.0, (b, a)
            # fp32 adapters: the accelerated path is float32-accurate as PEFT's, greedy tokens all equal
            if a == "fp32":
                assert ours["tokens_match"] == 1.0, b
            # along PEFT DoRA's tokens: the same logits up to rounding, the same argmax
            assert 0.9999 <= ours["logits_cos_min"] <= 1.0 + 1e-6 and ours["argmax_match"] == 1.0, (b, a)
            assert ours["ref_argmax_match"] == 1.0 and ours["norm_misses"] >= 0
            assert ours["vs_peft_dora"] > 0 and ours["vs_peft_lora"] > 0
    saved = json.loads((tmp_path / "bench_generate.json").read_text())
    assert [(r["batch"], r["setup"]) for r in saved["results"]] == list(rows)
    table = (tmp_path / "bench_generate.md").read_text()
    assert "| batch | setup | tokens/s |" in table and "tokens match" in table
    assert "PEFT DoRA + dora_ext.peft.accelerate, bf16 adapters" in table

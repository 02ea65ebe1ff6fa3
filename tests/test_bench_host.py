"""Smoke test of scripts/bench_host.py: the host-time benchmark runs every case on the CPU with tiny
dimensions and writes its JSON and table (the GPU numbers come from a device run)."""

from __future__ import annotations

import json

import pytest

from script_loader import load_script

pytest.importorskip("peft")


def test_bench_host_tiny_cpu(tmp_path):
    bench = load_script("scripts/bench_host.py")
    result = bench.main(["--device", "cpu", "--dim", "32", "--calls", "3", "--reps", "2", "--out", str(tmp_path)])
    cases = [r["case"] for r in result["results"]]
    assert cases == ["linear", "dora_bf16", "dora_fp32", "mixed_bf16", "mixed_fp32", "peft_mixed"]
    for row in result["results"]:
        assert row["host_us"] > 0 and row["gpu_us"] is None, row
        assert row["case"] == "linear" or row["tier"][0] == "eager", row  # the CPU has no fused kernels
    assert json.loads((tmp_path / "bench_host.json").read_text())["results"] == result["results"]
    assert "| peft_mixed |" in (tmp_path / "bench_host.md").read_text()

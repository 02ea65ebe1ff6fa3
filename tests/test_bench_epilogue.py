"""scripts/bench_epilogue.py's fused-GEMM kernel, run by Triton's interpreter on the CPU against float64.

The kernel is a development measurement (issue 3: "measure both"), not part of the library; this keeps
it correct where it can be checked without a GPU. Triton's interpreter computes bf16 dots wrongly on the
CPU (a 16x16 bf16 tl.dot came out ~1e10 off), so fp32 and fp16 are checked here and bf16 on the GPU by
the script itself (its rel. error column against the library's fused forward).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]

_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, sys.argv[1])
    from bench_epilogue import dora_fwd_gemm
    out = []
    for dtype, T, K, N, R, bias, config in [
        (torch.float32, 37, 70, 45, 5, True, (16, 32, 16, 2, 4, 2)),
        (torch.float32, 1, 64, 33, 1, False, (16, 32, 32, 1, 4, 2)),
        (torch.float16, 29, 48, 40, 17, True, (16, 16, 16, 3, 4, 2)),
    ]:
        gen = torch.Generator().manual_seed(T * 1000 + N)
        x, W = torch.randn(T, K, generator=gen).to(dtype), torch.randn(N, K, generator=gen).to(dtype)
        h, B = torch.randn(T, R, generator=gen).to(dtype), torch.randn(N, R, generator=gen).to(dtype)
        g = torch.rand(N, generator=gen) + 0.5
        b = torch.randn(N, generator=gen).to(dtype) if bias else None
        y = dora_fwd_gemm(x, W, h, B, g, b, 0.7, config)
        ref = g.double() * (x.double() @ W.double().t() + 0.7 * h.double() @ B.double().t())
        if bias:
            ref = ref + b.double()
        out.append({"dtype": str(dtype), "ok_dtype": y.dtype == dtype,
                    "err": ((y.double() - ref).norm() / ref.norm()).item()})
    print(json.dumps(out))
""")


def test_fused_gemm_kernel_matches_float64_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(ROOT / "scripts")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cases = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(cases) == 3
    for case in cases:
        assert case["ok_dtype"], case
        assert case["err"] < (1e-6 if case["dtype"] == "torch.float32" else 1e-3), case

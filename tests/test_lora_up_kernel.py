"""triton_src/lora_up.py's kernel under Triton's interpreter on the CPU, against float64.

The AOT cubins of this kernel run on the GPU (tests/test_cuda.py, DORA_EXT_LORA_EPILOGUE=1); this
checks its arithmetic where no GPU is: masks for odd sizes, the rank loop, the write-back of z and
the in-place case (out is z). Triton's interpreter computes bf16 dots wrongly on the CPU, so fp16
and fp32 inputs are checked here.
"""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from fresh_process import run_python

pytest.importorskip("triton")

_SCRIPT = textwrap.dedent("""
    import json, sys, torch, triton
    sys.path.insert(0, sys.argv[1])
    from triton_src.lora_up import dora_lora_up_kernel
    out = []
    for dtype, T, N, R, bias, write_z, in_place in [
        (torch.float32, 37, 45, 5, True, True, False),
        (torch.float32, 1, 33, 1, False, False, True),
        (torch.float16, 29, 70, 40, True, False, False),
        (torch.float16, 64, 128, 32, False, True, False),
    ]:
        gen = torch.Generator().manual_seed(T * 100 + N)
        z0 = torch.randn(T, N, generator=gen).to(dtype)
        h, B = torch.randn(T, R, generator=gen).to(dtype), torch.randn(N, R, generator=gen).to(dtype)
        g = torch.rand(N, generator=gen) + 0.5
        b = torch.randn(N, generator=gen).to(dtype)
        z = z0.clone()
        y = z if in_place else torch.empty_like(z)
        BM, BN, BR = 16, 32, 16
        grid = (triton.cdiv(T, BM), triton.cdiv(N, BN))
        dora_lora_up_kernel[grid](z, h, B, g, b if bias else g, y, T, N, R, z.stride(0), h.stride(0),
                                  B.stride(0), y.stride(0), 0.7, HAS_BIAS=bias, WRITE_Z=write_z,
                                  BLOCK_M=BM, BLOCK_N=BN, BLOCK_R=BR)
        zs = z0.double() + 0.7 * h.double() @ B.double().t()
        ref = zs * g.double() + (b.double() if bias else 0)
        if write_z:
            z_err = ((z.double() - zs).norm() / zs.norm()).item()
        else:  # untouched, unless it is the output itself
            z_err = 0.0 if in_place or torch.equal(z, z0) else 1.0
        out.append({"case": [str(dtype), T, N, R, bias, write_z, in_place],
                    "err": ((y.double() - ref).norm() / ref.norm()).item(), "z_err": z_err})
    print(json.dumps(out))
""")


def test_lora_up_kernel_matches_float64_under_the_interpreter():
    proc = run_python(["-c", _SCRIPT, str(Path(__file__).resolve().parents[1])], timeout=300, TRITON_INTERPRET="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    cases = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(cases) == 4
    for case in cases:
        tol = 1e-6 if case["case"][0] == "torch.float32" else 1e-3
        assert case["err"] < tol, case
        assert case["z_err"] < tol, case  # z written back exactly when asked, else untouched

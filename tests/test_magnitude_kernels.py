"""The backward's magnitude gradient from the saved output, under Triton's interpreter on the CPU:
triton_src/compose.py's ``dora_grad_prologue_output_kernel`` (gz and per-program partial sums) then
``dora_grad_output_finish_kernel`` (grad_m, the columns the output cannot give, their count), against
float64.

The AOT cubins run on the GPU (tests/test_saved_activation.py); this checks the arithmetic and the
column rules where no GPU is: a zero magnitude (g = 0), a g below the smallest recoverable scale, a
bias that dominates the output, an output that overflowed, odd sizes and several row programs.
"""
from __future__ import annotations

import textwrap

import pytest

from fresh_process import interpreted_cases

pytest.importorskip("triton")

_SCRIPT = textwrap.dedent("""
    import json, sys, torch, triton
    sys.path.insert(0, sys.argv[1])
    from triton_src.compose import dora_grad_prologue_output_kernel, dora_grad_output_finish_kernel
    out = []
    for T, N, has_bias, min_scale in [(37, 45, True, 1.2e-38), (5, 300, False, 0.0625), (64, 17, True, 0.0625)]:
        gen = torch.Generator().manual_seed(T * 1000 + N)
        gy = torch.randn(T, N, generator=gen)
        z = torch.randn(T, N, generator=gen)
        m = torch.rand(N, generator=gen) + 0.5
        n = torch.rand(N, generator=gen) + 0.5
        bias = torch.randn(N, generator=gen) if has_bias else torch.zeros(N)
        m[3] = 0.0                   # g = 0: z cannot be recovered
        m[5] = 0.01 * n[5]           # g = 0.01: below fp16's smallest recoverable scale (1/16)
        if has_bias:
            bias[7] = 1e4            # |gy y| far above |gy (y - bias)|
        g = (m / n).float()
        y = g * z + bias
        y[:, 11] = float("inf")      # an output that overflowed
        # The rules in float64 (random biases make some columns bias-dominated too)
        gy64, y64, b64 = gy.double(), y.double(), bias.double()
        dominated = (gy64 * y64).abs().sum(0) > 4.0 * (gy64 * (y64 - b64)).abs().sum(0)
        expect_bad = (g.abs() < min_scale) | (dominated if has_bias else False)
        expect_bad[11] = True
        assert expect_bad[3] and (expect_bad[5] or min_scale < 0.01) and (expect_bad[7] or not has_bias)
        BM, BN, programs = 8, 32, 3
        gz = torch.full((T, N), float("nan"))
        partial = torch.full((3 if has_bias else 1, programs, N), float("nan"))
        dora_grad_prologue_output_kernel[(programs, triton.cdiv(N, BN))](
            gy, y, g, bias, gz, partial, T, N, gy.stride(0), y.stride(0), gz.stride(0),
            HAS_BIAS=has_bias, BLOCK_M=BM, BLOCK_N=BN)
        grad_m = torch.full((N,), float("nan"))
        unrecovered = torch.full((N,), 7, dtype=torch.int8)
        count = torch.zeros((), dtype=torch.int32)
        dora_grad_output_finish_kernel[(triton.cdiv(N, 16),)](
            partial, g, n, grad_m, unrecovered, count, programs, N, min_scale, 4.0,
            HAS_BIAS=has_bias, BLOCK_N=16)
        want = (gy.double() * z.double()).sum(0) / n.double()
        ok = ~expect_bad
        err = float(((grad_m[ok].double() - want[ok]).norm() / want[ok].norm()))
        out.append({"case": [T, N, has_bias, min_scale], "grad_m_err": err,
                    "bad_zero": bool((grad_m[expect_bad] == 0).all()),
                    "mask_ok": bool(torch.equal(unrecovered.bool(), expect_bad)),
                    "mask_values": sorted(set(unrecovered.tolist())),
                    "count": int(count), "expected_count": int(expect_bad.sum()),
                    "gz_err": float(((gz - gy * g).abs().max()))})
    print(json.dumps(out))
""")


def test_output_prologue_and_finish_match_float64_under_the_interpreter():
    cases = interpreted_cases(_SCRIPT)
    assert len(cases) == 3
    for case in cases:
        assert case["grad_m_err"] < 1e-5, case  # float32 sums of float32 products (NaN fails too)
        assert case["bad_zero"] and case["mask_ok"], case
        assert case["mask_values"] in ([0, 1], [1]), case
        assert case["count"] == case["expected_count"], case
        assert case["gz_err"] == 0.0, case

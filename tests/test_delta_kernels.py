"""triton_src/compose.py's delta kernels under Triton's interpreter on the CPU, against float64.

The AOT cubins run on the GPU (the compose_delta CUDA tests); this checks the arithmetic where no
GPU is: a 16-bit base with a float32 lora read as it is, masks for odd sizes, strided rows, the
row walk of the backward's partial column sums over several programs, and its base gradient
written or not.
"""
from __future__ import annotations

import textwrap

import pytest
import torch

from fresh_process import interpreted_cases
from reference import FWD_TOL, ROUNDED_ONCE_TOL

pytest.importorskip("triton")


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


_SCRIPT = textwrap.dedent("""
    import json, sys, torch, triton
    sys.path.insert(0, sys.argv[1])
    sys.path.insert(0, sys.argv[1] + "/tests")
    from reference import ref_compose_delta, rel_err
    from triton_src.compose import dora_delta_kernel, dora_delta_backward_kernel
    out = []
    for base_dtype, dtype, T, N, write_gbase in [
        (torch.float32, torch.float32, 37, 45, True),
        (torch.float16, torch.float32, 70, 33, True),
        (torch.float16, torch.float16, 5, 130, False),
        (torch.float16, torch.float32, 1, 17, False),
    ]:
        gen = torch.Generator().manual_seed(T * 100 + N)
        base = torch.randn(T, N + 5, generator=gen).to(base_dtype)[:, :N]  # rows strided past N
        lora, gy = torch.randn(T, N, generator=gen).to(dtype), torch.randn(T, N, generator=gen).to(dtype)
        m, n = torch.rand(N, generator=gen).double() + 0.5, torch.rand(N, generator=gen).double() + 0.5
        g, gm1 = (m / n).float(), ((m - n) / n).float()
        s = 0.7
        BM, BN = 16, 32
        delta = torch.full((T, N), float("nan"), dtype=dtype)
        dora_delta_kernel[(triton.cdiv(T, BM), triton.cdiv(N, BN))](
            base, lora, g, gm1, delta, T, N, base.stride(0), lora.stride(0), delta.stride(0), s,
            BLOCK_M=BM, BLOCK_N=BN)
        ref = ref_compose_delta(base, lora, m, n, s)
        programs = 3  # row programs, each walking every third row tile
        grad_base = torch.full((T, N), float("nan"), dtype=base_dtype)
        grad_lora = torch.full((T, N), float("nan"), dtype=dtype)
        partial = torch.full((programs, N), float("nan"))
        dora_delta_backward_kernel[(programs, triton.cdiv(N, BN))](
            gy, base, lora, g, gm1, grad_base if write_gbase else g, grad_lora, partial, T, N, gy.stride(0),
            base.stride(0), lora.stride(0), grad_base.stride(0), grad_lora.stride(0), s,
            WRITE_GRAD_BASE=write_gbase, BLOCK_M=BM, BLOCK_N=BN)
        gy64 = gy.double()
        want_base = gy64 * ((m - n) / n)
        want_lora = gy64 * (m / n) * s
        want_m = (gy64 * (base.double() + s * lora.double())).sum(0) / n
        out.append({"case": [str(base_dtype), str(dtype), T, N, write_gbase],
                    "delta": rel_err(delta, ref), "delta_dtype_ok": delta.dtype == dtype,
                    "grad_base": (rel_err(grad_base, want_base) if write_gbase
                                  else (0.0 if grad_base.isnan().all() else 1.0)),
                    "grad_lora": rel_err(grad_lora, want_lora),
                    "grad_m": rel_err(partial.sum(0).double() / n, want_m)})
    print(json.dumps(out))
""")


def test_delta_kernels_match_float64_under_the_interpreter():
    cases = interpreted_cases(_SCRIPT)
    assert len(cases) == 4
    for case in cases:
        assert case["delta_dtype_ok"], case
        tol_out = ROUNDED_ONCE_TOL[_dtype(case["case"][1])]
        tol_base = ROUNDED_ONCE_TOL[_dtype(case["case"][0])]
        assert case["delta"] < tol_out, case  # NaN (a row or column left unwritten) fails too
        assert case["grad_lora"] < tol_out, case
        assert case["grad_base"] < tol_base, case  # written when asked, untouched otherwise
        assert case["grad_m"] < FWD_TOL[torch.float32], case  # fp32 partial sums of exact products


_FP32_COMPOSE_SCRIPT = textwrap.dedent("""
    import json, sys, torch, triton
    sys.path.insert(0, sys.argv[1])
    sys.path.insert(0, sys.argv[1] + "/tests")
    from reference import rel_err
    from triton_src.compose import dora_fp32_compose_kernel
    out = []
    for dtype, T, N, bias, write_z in [
        (torch.float16, 37, 45, True, True),
        (torch.float16, 70, 33, False, True),
        (torch.float16, 5, 130, True, False),
        (torch.float16, 1, 17, False, False),
    ]:
        gen = torch.Generator().manual_seed(T * 100 + N)
        base = torch.randn(T, N + 5, generator=gen).to(dtype)[:, :N]  # rows strided past N
        lora = torch.randn(T, N, generator=gen)
        b = torch.randn(N, generator=gen).to(dtype)
        g = torch.rand(N, generator=gen) + 0.5
        s = 0.7
        BM, BN = 16, 32
        y = torch.full((T, N), float("nan"), dtype=dtype)
        z = torch.full((T, N), float("nan"), dtype=dtype)
        dora_fp32_compose_kernel[(triton.cdiv(T, BM), triton.cdiv(N, BN))](
            base, lora, g, b if bias else g, y, z if write_z else g, T, N, base.stride(0), lora.stride(0),
            y.stride(0), z.stride(0), s, HAS_BIAS=bias, WRITE_Z=write_z, BLOCK_M=BM, BLOCK_N=BN)
        want_z = base.double() + s * lora.double()
        want_y = want_z * g.double() + (b.double() if bias else 0.0)
        # rounded once: within half an ulp of the activations' dtype of the float64 value
        ulp_ok = lambda a, r: bool(((a.double() - r).abs() <= r.abs() * 2.0 ** -11 + 1e-30).all())
        out.append({"case": [str(dtype), T, N, bias, write_z], "y": rel_err(y, want_y), "y_once": ulp_ok(y, want_y),
                    "z": rel_err(z, want_z) if write_z else (0.0 if z.isnan().all() else 1.0)})
    print(json.dumps(out))
""")


def test_fp32_compose_kernel_matches_float64_under_the_interpreter():
    """Float32 adapters' compose: y = g (base + s lora) + bias rounded once, z written only when asked."""
    cases = interpreted_cases(_FP32_COMPOSE_SCRIPT)
    assert len(cases) == 4
    for case in cases:
        tol = ROUNDED_ONCE_TOL[_dtype(case["case"][0])]
        assert case["y"] < tol and case["y_once"], case  # NaN (an element left unwritten) fails too
        assert case["z"] < tol, case

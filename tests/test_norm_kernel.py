"""triton_src/norm.py's kernels (partials, then finish) under Triton's interpreter on the CPU, against float64.

The AOT cubins run on the GPU (tests/test_cuda_norm.py); this checks the kernels' arithmetic in CI:
the factored norm ||W||^2 + s (2 <B, W A^T> + B (A A^T) B^T) from partial sums over several splits
of d_in and several rank tiles, the Gram term shared out among the splits, ||W||^2 computed (WSQ)
or read from a cached value, odd sizes everywhere. Float32 inputs only: the 16-bit kinds run their
Gram term as bf16 dots, which Triton's interpreter computes wrongly on the CPU.
"""
from __future__ import annotations

import textwrap

import pytest
import torch

from fresh_process import interpreted_cases
from reference import NORM_TOL, ROUNDED_ONCE_TOL

pytest.importorskip("triton")

_SCRIPT = textwrap.dedent("""
    import json, sys, torch, triton
    sys.path.insert(0, sys.argv[1])
    sys.path.insert(0, sys.argv[1] + "/tests")
    from reference import ref_row_norm, rel_err
    from triton_src.norm import dora_norm_partials_kernel, dora_norm_finish_kernel
    out = []
    for d_out, d_in, rank, k_per_split, wsq_pass, scale in [
        (70, 96, 37, 32, True, 0.7),    # 3 splits, 3 rank tiles, ||W||^2 from the same tiles
        (70, 96, 37, 32, False, -1.3),  # ||W||^2 from the cache, negative scale
        (9, 40, 1, 48, True, 2.0),      # r = 1, one split, fewer rows than a tile
    ]:
        gen = torch.Generator().manual_seed(d_out * 7 + rank)
        W = torch.randn(d_out, d_in, generator=gen)
        A = torch.randn(rank, d_in, generator=gen) * d_in ** -0.5
        B = torch.randn(d_out, rank, generator=gen) * 0.3
        BM, BR, BK, BJ = 16, 16, 16, 16
        rank_tiles, row_tiles, splits = triton.cdiv(rank, BR), triton.cdiv(d_out, BM), triton.cdiv(d_in, k_per_split)
        gram = (A.double() @ A.double().t()).float().contiguous()
        cross = torch.full((splits * rank_tiles, d_out), float("nan"))
        wsq_parts = torch.full((splits, d_out), float("nan")) if wsq_pass else (W.double() ** 2).sum(1).float()[None]
        dora_norm_partials_kernel[(rank_tiles, row_tiles, splits)](
            W, A, B, gram, cross, wsq_parts, d_out, d_in, rank, W.stride(0), A.stride(0), B.stride(0),
            k_per_split, scale, BLOCK_M=BM, BLOCK_R=BR, BLOCK_K=BK, BLOCK_J=BJ, INPUT_KIND=2, WSQ=wsq_pass)
        norm, wsq_out = torch.full((d_out,), float("nan")), torch.full((d_out,), float("nan"))
        dora_norm_finish_kernel[(triton.cdiv(d_out, 32),)](
            cross, wsq_parts, norm, wsq_out, d_out, splits * rank_tiles, splits if wsq_pass else 1, int(wsq_pass),
            scale, 1e-12, BLOCK_M=32)
        wsq_ref = (W.double() ** 2).sum(1)
        out.append({"case": [d_out, d_in, rank, k_per_split, wsq_pass, scale],
                    "norm_err": rel_err(norm, ref_row_norm(W, A, B, scale)),
                    "wsq_err": rel_err(wsq_out, wsq_ref) if wsq_pass else 0.0})
    print(json.dumps(out))
""")


def test_norm_kernels_match_float64_under_the_interpreter():
    cases = interpreted_cases(_SCRIPT)
    assert len(cases) == 3
    for case in cases:
        assert case["norm_err"] < NORM_TOL[torch.float32], case  # NaN (a partial sum left unwritten) fails too
        assert case["wsq_err"] < ROUNDED_ONCE_TOL[torch.float32], case

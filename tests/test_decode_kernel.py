"""triton_src/decode.py's kernel under Triton's interpreter on the CPU, against float64.

The AOT cubins of this kernel run on the GPU (tests/test_cuda.py, the decode tests); this checks
its arithmetic where no GPU is: masks for odd sizes and for rows past the batch, both K loops
(rank and d_in, each longer than one K tile), strided rows, bias on and off, 16-bit and float32
adapters (the base term rounded to x's dtype first, as PEFT's base layer output). Triton's interpreter
computes bf16 dots wrongly on the CPU, so fp16 and fp32 inputs are checked here.
"""
from __future__ import annotations

import textwrap

import pytest
import torch

from fresh_process import interpreted_cases
from reference import ROUNDED_ONCE_TOL

pytest.importorskip("triton")

_SCRIPT = textwrap.dedent("""
    import json, sys, torch, triton
    sys.path.insert(0, sys.argv[1])
    sys.path.insert(0, sys.argv[1] + "/tests")
    from reference import rel_err
    from triton_src.decode import dora_decode_kernel
    out = []
    for dtype, adapter_dtype, T, d_in, N, R, bias in [
        (torch.float32, torch.float32, 1, 70, 45, 5, True),
        (torch.float32, torch.float32, 17, 33, 16, 1, False),
        (torch.float16, torch.float16, 5, 48, 40, 37, True),
        (torch.float16, torch.float16, 16, 64, 33, 16, False),
        (torch.float16, torch.float32, 3, 40, 37, 21, True),
        (torch.float16, torch.float32, 16, 35, 16, 1, False),
    ]:
        fp32_adapters = adapter_dtype != dtype
        gen = torch.Generator().manual_seed(T * 100 + N)
        x = torch.randn(T, d_in + 3, generator=gen).to(dtype)[:, :d_in]  # rows strided past d_in
        W, h = torch.randn(N, d_in, generator=gen).to(dtype), torch.randn(T, R, generator=gen).to(adapter_dtype)
        B = torch.randn(N, R, generator=gen).to(adapter_dtype)
        g = torch.rand(N, generator=gen) + 0.5
        b = torch.randn(N, generator=gen).to(dtype)
        y = torch.full((T, N), float("nan"), dtype=dtype)
        BM, BN, BK = 16, 16, 16
        grid = (triton.cdiv(N, BN), triton.cdiv(T, BM))
        dora_decode_kernel[grid](x, W, h, B, g, b if bias else g, y, T, N, d_in, R, x.stride(0), W.stride(0),
                                 h.stride(0), B.stride(0), y.stride(0), 0.7, HAS_BIAS=bias, FP32_ADAPTERS=fp32_adapters,
                                 BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, BLOCK_R=8)
        base = x.double() @ W.double().t()
        if fp32_adapters:  # rounded like PEFT's base layer output
            base = base.to(dtype).double()
        ref = (base + 0.7 * h.double() @ B.double().t()) * g.double()
        ref = ref + (b.double() if bias else 0)
        out.append({"case": [str(dtype), str(adapter_dtype), T, d_in, N, R, bias], "dtype_ok": y.dtype == dtype,
                    "err": rel_err(y, ref)})
    print(json.dumps(out))
""")


def test_decode_kernel_matches_float64_under_the_interpreter():
    cases = interpreted_cases(_SCRIPT)
    assert len(cases) == 6
    for case in cases:
        assert case["dtype_ok"], case
        dtype = getattr(torch, case["case"][0].removeprefix("torch."))
        assert case["err"] < ROUNDED_ONCE_TOL[dtype], case  # NaN fails too


# The stacked adapters of dora_linear_mixed, laid out as csrc/mixed_stacked.cpp lays them out for both
# mixed kernels: h [T, R] and B [N, R] side by side (plus at least 3 padding columns that no row owns,
# filled with noise so that a row reading past its own columns shows, up to a multiple of 16 wide: the
# mixed LoRA kernel reads whole rank tiles), G with a row of ones per plain LoRA adapter and one for
# base-model rows (adapter -1), and the row table (one entry per index entry).
_STACKED = textwrap.dedent("""
    def stacked_adapters(gen, ranks, dora, index, T, N, adapter_dtype):
        K = len(ranks)
        ends = torch.tensor(ranks).cumsum(0).tolist()
        starts = [e - r for e, r in zip(ends, ranks)]
        width = (ends[-1] + 3 + 15) // 16 * 16
        h = torch.randn(T, width, generator=gen).to(adapter_dtype)
        B = torch.randn(N, width, generator=gen).to(adapter_dtype)
        G = torch.ones(K + 1, N)
        for k in range(K):
            if dora[k]:
                G[k] = torch.rand(N, generator=gen) + 0.5
        scales = [0.25 * (k + 1) for k in range(K)]
        info = torch.zeros(len(index), 4, dtype=torch.int32)
        for i, k in enumerate(index):
            if k >= 0:
                info[i, :3] = torch.tensor([k, starts[k], ends[k]])
                info[i, 3] = torch.tensor([scales[k]], dtype=torch.float32).view(torch.int32)
            else:
                info[i, :3] = torch.tensor([K, 0, 0])
        return starts, ends, h, B, G, scales, info
""")


# dora_mixed_decode_kernel: every row its own adapter (dora_linear_mixed at decode sizes), on the
# stacked adapters with a row table entry per token.
_MIXED_SCRIPT = _STACKED + textwrap.dedent("""
    import json, sys, torch, triton
    sys.path.insert(0, sys.argv[1])
    sys.path.insert(0, sys.argv[1] + "/tests")
    from reference import rel_err
    from triton_src.decode import dora_mixed_decode_kernel
    out = []
    for name, dtype, adapter_dtype, d_in, N, ranks, dora, index, bias in [
        ("odd shapes, r = 1, base rows", torch.float16, torch.float16, 70, 45, [1, 5, 3],
         [True, False, True], [0, -1, 2, 1, -1, 0, 2], True),
        ("every row another adapter", torch.float16, torch.float16, 48, 40, [2, 7, 1, 16, 4],
         [True, True, False, True, False], [4, 3, 2, 1, 0], False),
        ("one adapter for all rows, two row tiles", torch.float16, torch.float16, 33, 16, [9, 1],
         [False, True], [1] * 17, True),
        ("only base rows", torch.float16, torch.float16, 40, 33, [3], [True], [-1, -1, -1], True),
        ("float32 adapters", torch.float16, torch.float32, 40, 37, [1, 21, 6], [True, False, True],
         [2, -1, 0, 1, 1, 2], True),
        ("float32 adapters, every row another", torch.float16, torch.float32, 35, 16, [3, 1],
         [False, True], [1, 0], False),
        ("float32", torch.float32, torch.float32, 70, 45, [5, 1, 2], [True, False, True], [1, 2, 0, -1], True),
    ]:
        fp32_adapters = adapter_dtype != dtype
        gen = torch.Generator().manual_seed(len(index) * 100 + N)
        T = len(index)
        x = torch.randn(T, d_in + 3, generator=gen).to(dtype)[:, :d_in]  # rows strided past d_in
        W = torch.randn(N, d_in, generator=gen).to(dtype)
        starts, ends, h, B, G, scales, info = stacked_adapters(gen, ranks, dora, index, T, N, adapter_dtype)
        R = h.shape[1]
        b = torch.randn(N, generator=gen).to(dtype)
        y = torch.full((T, N), float("nan"), dtype=dtype)
        BM, BN, BK = 16, 16, 16
        grid = (triton.cdiv(N, BN), triton.cdiv(T, BM))
        dora_mixed_decode_kernel[grid](x, W, h, B, G, info, b if bias else G, y, T, N, d_in, R, x.stride(0),
                                       W.stride(0), h.stride(0), B.stride(0), G.stride(0), y.stride(0),
                                       HAS_BIAS=bias, FP32_ADAPTERS=fp32_adapters, BLOCK_M=BM, BLOCK_N=BN,
                                       BLOCK_K=BK, BLOCK_R=8)
        base = x.double() @ W.double().t()
        if fp32_adapters:  # rounded like PEFT's base layer output
            base = base.to(dtype).double()
        ref = torch.empty(T, N, dtype=torch.float64)
        for t, k in enumerate(index):
            ref[t] = base[t]
            if k >= 0:
                cols = slice(starts[k], ends[k])
                ref[t] = (base[t] + scales[k] * h[t, cols].double() @ B[:, cols].double().t()) * G[k].double()
        ref = ref + (b.double() if bias else 0)
        out.append({"case": name, "dtype": str(dtype), "dtype_ok": y.dtype == dtype, "err": rel_err(y, ref),
                    "row_errs": [rel_err(y[t], ref[t]) for t in range(T)]})
    print(json.dumps(out))
""")


def test_mixed_decode_kernel_matches_float64_under_the_interpreter():
    cases = interpreted_cases(_MIXED_SCRIPT)
    assert len(cases) == 7
    for case in cases:
        assert case["dtype_ok"], case
        tol = ROUNDED_ONCE_TOL[getattr(torch, case["dtype"].removeprefix("torch."))]
        assert max(case["row_errs"]) < tol, case  # each row on its own: NaN fails too


# dora_mixed_lora_kernel: the adapters of a mixed batch on its base output z (dora_linear_mixed above
# decode sizes), on the stacked adapters with a row table entry per leading row of x, each row holding
# per_row tokens; y written over z as the op does.
_MIXED_LORA_SCRIPT = _STACKED + textwrap.dedent("""
    import json, sys, torch, triton
    sys.path.insert(0, sys.argv[1])
    sys.path.insert(0, sys.argv[1] + "/tests")
    from reference import rel_err
    from triton_src.decode import dora_mixed_lora_kernel
    out = []
    for name, dtype, adapter_dtype, N, ranks, dora, index, per_row, bias in [
        ("odd shapes, r = 1, base rows, rows of 5 tokens", torch.float16, torch.float16, 45, [1, 5, 3],
         [True, False, True], [0, -1, 2, 1, -1, 0, 2], 5, True),
        ("one token per row, every row another adapter", torch.float16, torch.float16, 40, [2, 7, 1, 16, 4],
         [True, True, False, True, False], [4, 3, 2, 1, 0, 2, 4, 1, 0, 3, 3, 2, 1, 0, 4, 4, 2, 1], 1, False),
        ("rows longer than a tile, ranks longer than a K tile", torch.float16, torch.float16, 33, [19, 1, 40],
         [False, True, True], [2, 0, 1], 37, True),
        ("only base rows", torch.float16, torch.float16, 33, [3], [True], [-1, -1], 9, True),
        ("float32 adapters", torch.float16, torch.float32, 37, [1, 21, 6], [True, False, True],
         [2, -1, 0, 1], 11, True),
        ("float32", torch.float32, torch.float32, 45, [5, 1, 2], [True, False, True], [1, 2, 0, -1], 3, False),
    ]:
        fp32_adapters = adapter_dtype != dtype
        gen = torch.Generator().manual_seed(len(index) * 100 + N)
        T = len(index) * per_row
        z = torch.randn(T, N + 5, generator=gen).to(dtype)[:, :N]  # rows strided past N
        starts, ends, h, B, G, scales, info = stacked_adapters(gen, ranks, dora, index, T, N, adapter_dtype)
        b = torch.randn(N, generator=gen).to(dtype)
        ref = torch.empty(T, N, dtype=torch.float64)
        h_seen = torch.full_like(h, float("nan"))  # a token's h outside its adapter's columns: never read
        for t in range(T):
            k = index[t // per_row]
            ref[t] = z[t].double()
            if k >= 0:
                cols = slice(starts[k], ends[k])
                h_seen[t, cols] = h[t, cols]
                ref[t] = (ref[t] + scales[k] * h[t, cols].double() @ B[:, cols].double().t()) * G[k].double()
        ref = ref + (b.double() if bias else 0)
        BM, BN, BR = 16, 16, 16
        grid = (triton.cdiv(T, BM), triton.cdiv(N, BN))
        dora_mixed_lora_kernel[grid](z, h_seen, B, G, info, b if bias else G, z, T, N, per_row, z.stride(0),
                                     h.stride(0), B.stride(0), G.stride(0), z.stride(0), HAS_BIAS=bias,
                                     FP32_ADAPTERS=fp32_adapters, BLOCK_M=BM, BLOCK_N=BN, BLOCK_R=BR)
        out.append({"case": name, "dtype": str(dtype), "dtype_ok": z.dtype == dtype,
                    "row_errs": [rel_err(z[t], ref[t]) for t in range(T)]})
    print(json.dumps(out))
""")


def test_mixed_lora_kernel_matches_float64_under_the_interpreter():
    cases = interpreted_cases(_MIXED_LORA_SCRIPT)
    assert len(cases) == 6
    for case in cases:
        assert case["dtype_ok"], case
        tol = ROUNDED_ONCE_TOL[getattr(torch, case["dtype"].removeprefix("torch."))]
        assert max(case["row_errs"]) < tol, case  # each token on its own: NaN fails too


def test_mixed_lora_rank_tiles_divide_the_stack_padding():
    """dora_mixed_lora_kernel reads h and B in whole BLOCK_R tiles up to its rows' last column rounded
    up: the stack's padding (csrc/adapter_stack.cpp's kRankQuantum) must be a multiple of BLOCK_R, or
    the last tile reads past the stack."""
    import re
    from pathlib import Path

    from triton_src.specs import MIXED_LORA_BLOCK_R

    source = (Path(__file__).resolve().parents[1] / "csrc" / "adapter_stack.cpp").read_text()
    quantum = int(re.search(r"constexpr int64_t kRankQuantum = (\d+);", source).group(1))
    for block_r in MIXED_LORA_BLOCK_R.values():
        assert quantum % block_r == 0, (quantum, block_r)

"""triton_src/parts.py's kernel against ATen's split: under Triton's interpreter on the CPU, and
compiled by Triton on a GPU.

The AOT cubins of this kernel are checked in the library on the GPU (tests/test_fp32_adapters.py);
this checks its arithmetic and its stores, also where no GPU is: every layout in both concatenation
dims, bit for bit equal to ATen's hi = bf16(t), mid = bf16(t - hi), lo = bf16(t - hi - mid)
concatenated by at::cat (csrc/fp32_adapters.cpp's fallback). Odd shapes (one element, r = 1,
several tiles with ragged edges), strided and transposed inputs, and values at the edges: zeros of
both signs, ties of the rounding, the largest floats and infinities, subnormal inputs and parts.
ATen's CPU and CUDA conversions give a NaN different bits, so on the CPU a NaN is checked as a NaN;
on the GPU (where the kernel runs in the library) its bits are ATen's too.
"""
from __future__ import annotations

import json
import textwrap

import pytest
import torch

from fresh_process import REPO_ROOT, interpreted_cases, run_python

pytest.importorskip("triton")

_SCRIPT = textwrap.dedent("""
    import json, sys, torch, triton
    sys.path.insert(0, sys.argv[1])
    device = sys.argv[2] if len(sys.argv) > 2 else "cpu"
    from triton_src.parts import dora_fp32_parts_kernel
    from triton_src.specs import PARTS_LAYOUTS, SPECS

    def aten_parts(t, layout, dim):
        hi = t.to(torch.bfloat16)
        rest = t - hi.float()
        mid = rest.to(torch.bfloat16)
        lo = (rest - mid.float()).to(torch.bfloat16)
        blocks = {0: [hi, mid, lo], 1: [hi, hi, hi, mid, mid, lo], 2: [hi, mid, lo, hi, mid, hi]}[layout]
        return torch.cat(blocks, dim)

    def values(rows, cols, gen):
        exponents = torch.randint(-20, 21, (rows, cols), generator=gen).float()
        t = torch.randn(rows, cols, generator=gen) * torch.exp2(exponents)
        edge = torch.tensor([0.0, -0.0, 1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8 + 2**-16 + 2**-24), 3.0e38,
                             3.4028235e38, -3.39e38, float("inf"), -float("inf"), float("nan"), 1e-40, -2**-149,
                             2**-126 * (1 + 2**-9 + 2**-20), 2**-118 * (1 + 2**-12 + 2**-23), 5e-39])
        flat = t.view(-1)
        n = min(flat.numel(), edge.numel())
        flat[:n] = edge[:n]
        return t

    tile = next(s.tile for s in SPECS if s.kernel == "dora_fp32_parts_kernel")
    out = []
    for rows, cols, view in [(1, 1, "plain"), (3, 37, "plain"), (129, 5, "plain"), (1, 70, "plain"),
                             (70, 1, "transposed"), (40, 133, "sliced"), (67, 45, "transposed")]:
        gen = torch.Generator().manual_seed(rows * 1000 + cols)
        if view == "transposed":  # a [cols, rows] tensor's transpose: unit stride along dim 0
            t = values(cols, rows, gen).to(device).t()
        elif view == "sliced":  # rows strided past the columns read
            t = values(rows, cols + 3, gen).to(device)[:, 2:cols + 2]
        else:
            t = values(rows, cols, gen).to(device)
        for tiles in (tile, (16, 16)):
            for layout in PARTS_LAYOUTS.values():
                for dim in (0, 1):
                    ref = aten_parts(t, layout, dim)
                    got = torch.full_like(ref, float("nan"))
                    grid = (triton.cdiv(rows, tiles[0]), triton.cdiv(cols, tiles[1]))
                    dora_fp32_parts_kernel[grid](t, got, rows, cols, t.stride(0), t.stride(1), LAYOUT=layout,
                                                 DIM=dim, BLOCK_M=tiles[0], BLOCK_N=tiles[1])
                    nan = ref.isnan()
                    out.append({"case": [rows, cols, view, list(tiles), layout, dim],
                                "nans": int(nan.sum()), "nan_ok": bool(torch.equal(nan, got.isnan())),
                                "bits_differ": int((ref.view(torch.int16) != got.view(torch.int16))[~nan].sum()),
                                "nan_bits_differ": int((ref.view(torch.int16) != got.view(torch.int16))[nan].sum())})
    print(json.dumps(out))
""")


def test_parts_kernel_matches_aten_split_bitwise_under_the_interpreter():
    cases = interpreted_cases(_SCRIPT)
    assert len(cases) == 7 * 2 * 3 * 2
    for case in cases:
        assert case["nan_ok"] and case["bits_differ"] == 0, case
    assert any(case["nans"] for case in cases)  # the edge values reached the check (inf - inf, NaN)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_parts_kernel_matches_aten_split_bitwise_on_the_gpu():
    """The same cases compiled for this GPU (Triton's JIT, the compiler of the AOT cubins), against
    ATen's split on the GPU: every bit, NaNs included."""
    proc = run_python(["-c", _SCRIPT, str(REPO_ROOT), "cuda"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cases = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(cases) == 7 * 2 * 3 * 2
    for case in cases:
        assert case["nan_ok"] and case["bits_differ"] == 0 and case["nan_bits_differ"] == 0, case

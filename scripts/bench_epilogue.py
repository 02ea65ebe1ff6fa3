#!/usr/bin/env python3
"""Measure both forward designs of issue 3 (development tool, Triton JIT; the library ships AOT cubins).

(a) today's fused inference forward: cuBLAS ``z = x W^T``, cuBLAS ``z += s h B^T`` (h = x A^T),
    then one Triton pass ``y = g * z + bias``;
(b) one Triton GEMM whose accumulator takes the LoRA up-projection ``s h B^T`` and then ``x W^T``,
    with ``y = g * acc + bias`` in its epilogue: no ``[T, d_out]`` intermediate is written or read
    (h = x A^T still comes from cuBLAS);
(c) the library with ``DORA_EXT_LORA_EPILOGUE=1``: cuBLAS ``z = x W^T``, then the AOT kernel of
    triton_src/lora_up.py adds ``s h B^T`` and applies g and bias in one pass (no addmm_, no scale
    pass); also timed for a training step (forward + backward) against (a) where T >= 512.

Both with the same cached norm (``g = m / n``), bf16, r = 384 by default, on the layer shapes of
scripts/bench.py; every config of (b) is timed and the best kept. Writes ``epilogue.json`` and
``epilogue.md`` with medians (``triton.testing.do_bench``), the FLOP floor from the GEMM rate
measured in the same run and the relative error of (b) against (a).

    python3 scripts/bench_epilogue.py --out R [--tokens 4096 1] [--rank 384]

``dora_fwd_gemm`` is also run under ``TRITON_INTERPRET=1`` on the CPU by tests/test_bench_epilogue.py.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import triton
import triton.language as tl

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192), (5120, 27648)]  # d_in x d_out
# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages)
CONFIGS = [
    (128, 256, 64, 8, 8, 3),
    (128, 128, 64, 8, 4, 4),
    (256, 128, 64, 8, 8, 3),
    (128, 128, 128, 8, 8, 3),
    (64, 128, 64, 8, 4, 4),
    # decode-sized T: narrow column tiles so that enough programs stream W (d_out / BLOCK_N of them)
    (16, 128, 128, 1, 4, 4),
    (16, 64, 128, 1, 4, 4),
    (16, 32, 256, 1, 4, 3),
]


@triton.jit
def _accumulate_abt(acc, a_ptr, b_ptr, offs_m, offs_n, m_ok, n_ok, stride_a, stride_b, K,
                    BLOCK_K: tl.constexpr):
    """acc + a[offs_m, :K] @ b[offs_n, :K]^T, both with unit stride along K."""
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        a = tl.load(a_ptr + offs_m[:, None] * stride_a + kk[None, :], mask=m_ok[:, None] & (kk[None, :] < K),
                    other=0.0)
        b = tl.load(b_ptr + offs_n[:, None] * stride_b + kk[None, :], mask=n_ok[:, None] & (kk[None, :] < K),
                    other=0.0)
        acc = tl.dot(a, tl.trans(b), acc)
    return acc


@triton.jit
def dora_fwd_gemm_kernel(x_ptr, w_ptr, h_ptr, b_ptr, g_ptr, bias_ptr, y_ptr,
                         T, N, K, R, scale,
                         stride_xm, stride_wn, stride_hm, stride_bn, stride_ym,
                         HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """y[T, N] = g * (scale * h B^T + x W^T) + bias; x [T, K], W [N, K], h [T, R], B [N, R], unit
    stride along K and R. One fp32 accumulator: the LoRA term first, scaled in fp32, then the base."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(T, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # grouped order: GROUP_M row tiles share each column tile of W while it is in L2
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % rows_in_group
    pid_n = (pid % (GROUP_M * num_n)) // rows_in_group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < T
    n_ok = offs_n < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _accumulate_abt(acc, h_ptr, b_ptr, offs_m, offs_n, m_ok, n_ok, stride_hm, stride_bn, R, BLOCK_K)
    acc = acc * scale
    acc = _accumulate_abt(acc, x_ptr, w_ptr, offs_m, offs_n, m_ok, n_ok, stride_xm, stride_wn, K, BLOCK_K)

    g = tl.load(g_ptr + offs_n, mask=n_ok, other=0.0)
    y = acc * g[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def dora_fwd_gemm(x: torch.Tensor, weight: torch.Tensor, h: torch.Tensor, lora_B: torch.Tensor, g: torch.Tensor,
                  bias: torch.Tensor | None, scale: float, config: tuple[int, ...]) -> torch.Tensor:
    """Design (b) for 2-D x with one config; ``g`` fp32 [d_out]; ``h = x A^T`` [T, r]."""
    block_m, block_n, block_k, group_m, warps, stages = config
    for name, t in (("x", x), ("weight", weight), ("h", h), ("lora_B", lora_B)):
        assert t.dim() == 2 and t.stride(1) == 1, f"{name} must be 2-D with unit stride along its last dim"
    T, K = x.shape
    N, R = lora_B.shape
    y = torch.empty((T, N), device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(T, block_m) * triton.cdiv(N, block_n),)
    dora_fwd_gemm_kernel[grid](x, weight, h, lora_B, g, bias if bias is not None else g, y, T, N, K, R, scale,
                               x.stride(0), weight.stride(0), h.stride(0), lora_B.stride(0), y.stride(0),
                               HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                               GROUP_M=group_m, num_warps=warps, num_stages=stages)
    return y


def main() -> None:
    from triton.testing import do_bench

    import dora_ext

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tokens", nargs="+", type=int, default=[4096, 1])
    p.add_argument("--rank", type=int, default=384)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    def ms(fn) -> float:
        return do_bench(fn, warmup=25, rep=100, return_mode="median")

    square = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    rate = 2 * 8192 ** 3 / (ms(lambda: square @ square) * 1e-3)  # the bf16 GEMM rate, FLOP/s
    rows = []
    for d_in, d_out in SHAPES:
        for T in args.tokens:
            torch.manual_seed(0)
            r, s = args.rank, 2.0
            W = torch.randn(d_out, d_in, device="cuda", dtype=torch.bfloat16)
            A = torch.randn(r, d_in, device="cuda", dtype=torch.bfloat16) * d_in ** -0.5
            B = torch.randn(d_out, r, device="cuda", dtype=torch.bfloat16) * 0.02
            bias = torch.randn(d_out, device="cuda", dtype=torch.bfloat16)
            m = dora_ext.row_norm(W, A, B, s) * (1 + 0.1 * torch.randn(d_out, device="cuda"))
            x = torch.randn(T, d_in, device="cuda", dtype=torch.bfloat16)
            g = (m / dora_ext.row_norm(W, A, B, s)).float().contiguous()
            with torch.no_grad(), dora_ext.overrides(tier="fused"):
                ref = dora_ext.dora_linear(x, W, bias, A, B, m, s)  # also warms the norm cache
                t_now = ms(lambda: dora_ext.dora_linear(x, W, bias, A, B, m, s))
                os.environ["DORA_EXT_LORA_EPILOGUE"] = "1"
                y_lib = dora_ext.dora_linear(x, W, bias, A, B, m, s)
                t_lib = ms(lambda: dora_ext.dora_linear(x, W, bias, A, B, m, s))
                del os.environ["DORA_EXT_LORA_EPILOGUE"]
            lib_err = float((y_lib.double() - ref.double()).norm() / ref.double().norm())
            steps = {}
            if T >= 512:
                leaves = [t.clone().requires_grad_(True) for t in (x, A, B, m)]

                def step() -> None:
                    y = dora_ext.dora_linear(leaves[0], W, bias, *leaves[1:], s)
                    y.backward(torch.ones_like(y))

                with dora_ext.overrides(tier="fused"):
                    for flag in ("0", "1"):
                        os.environ["DORA_EXT_LORA_EPILOGUE"] = flag
                        steps[flag] = ms(step)
                    del os.environ["DORA_EXT_LORA_EPILOGUE"]
            best = None
            for config in CONFIGS:
                if config[0] > max(16, triton.next_power_of_2(T)) * 8:
                    continue  # tiles far taller than the batch
                try:
                    y = dora_fwd_gemm(x, W, x @ A.t(), B, g, bias, s, config)
                    t = ms(lambda: dora_fwd_gemm(x, W, x @ A.t(), B, g, bias, s, config))
                except triton.runtime.errors.OutOfResources:
                    continue
                err = float((y.double() - ref.double()).norm() / ref.double().norm())
                if best is None or t < best[0]:
                    best = (t, config, err)
            t_linear = ms(lambda: torch.nn.functional.linear(x, W, bias))
            floor = 2 * T * (d_in * d_out + r * (d_in + d_out)) / rate * 1e3
            row = {"d_in": d_in, "d_out": d_out, "T": T, "r": r, "floor_ms": floor, "linear_ms": t_linear,
                   "cublas_plus_pass_ms": t_now, "triton_epilogue_ms": best[0], "config": best[1],
                   "rel_err_vs_fused": best[2], "lib_lora_epilogue_ms": t_lib, "lib_lora_epilogue_rel_err": lib_err,
                   "step_cublas_plus_pass_ms": steps.get("0"), "step_lib_lora_epilogue_ms": steps.get("1")}
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "gemm_tflops": rate / 1e12}
    (args.out / "epilogue.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"GPU {meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}, bf16 GEMM "
             f"{meta['gemm_tflops']:.0f} TFLOP/s; inference forward with cached norm, median ms (x floor)", "",
             "| d_in×d_out | T | r | floor | nn.Linear | (a) cuBLAS + pass | (b) Triton GEMM epilogue | (b) config | "
             "(b) vs (a) rel. err | (c) library, LoRA-up epilogue | (c) vs (a) rel. err | step (a) | step (c) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        f = row["floor_ms"]
        lines.append(f"| {row['d_in']}×{row['d_out']} | {row['T']} | {row['r']} | {f:.3f} | "
                     f"{row['linear_ms']:.3f} ({row['linear_ms'] / f:.2f}×) | "
                     f"{row['cublas_plus_pass_ms']:.3f} ({row['cublas_plus_pass_ms'] / f:.2f}×) | "
                     f"{row['triton_epilogue_ms']:.3f} ({row['triton_epilogue_ms'] / f:.2f}×) | {row['config']} | "
                     f"{row['rel_err_vs_fused']:.1e} | "
                     f"{row['lib_lora_epilogue_ms']:.3f} ({row['lib_lora_epilogue_ms'] / f:.2f}×) | "
                     f"{row['lib_lora_epilogue_rel_err']:.1e} | "
                     + " | ".join("—" if row[k] is None else f"{row[k]:.3f}"
                                  for k in ("step_cublas_plus_pass_ms", "step_lib_lora_epilogue_ms")) + " |")
    (args.out / "epilogue.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""One small CUDA workload per process, to find what makes compute-sanitizer's racecheck fail.

racecheck stopped with "Internal Sanitizer Error: The Sanitizer failed to handle a hardware
exception" once dora_ext's norm kernels ran (docs/RELIABILITY.md §5). Each probe below isolates
one suspect; the answer (H100, compute-sanitizer 2025.3, 2026-11-28): only runs with a
``--kernel-name`` filter fail; unfiltered, every probe runs with 0 hazards. ``scripts/sanitize.sh``
is the real check, this is its debugging aid, run under racecheck once per probe by

    bash scripts/racecheck_probe.sh RESULTS_DIR

Probes: ``cublas`` (no Triton: torch.matmul only, the control); ``cublas_gram`` (the Gram matrices
of the norm tests exactly as the fused row_norm makes them: ``mm(A, Aᵀ, out_dtype=float32)``, cuBLAS
only); ``jit_add`` (a Triton JIT
elementwise kernel: does racecheck handle Triton at all?); ``jit_dot`` (one tl.dot tile, no loop:
tensor-core code, wgmma on sm_90); ``jit_loop1`` / ``jit_loop3`` (a tl.dot K loop compiled with 1
and with 3 pipeline stages: the software pipelining of our GEMM-shaped kernels);
``jit_norm_{nowsq,wsq}_{a16,any}`` (triton_src/norm.py's partials kernel through Triton's JIT with
sm_90's rank-16 config, without / with the ||W||^2 accumulation, on an aligned W and on a W with an
odd row stride and a 2-byte offset: the norm kernel's code without our AOT build and loader). dora_ext's AOT
kernels, one each: ``aot_norm`` (row_norm: the norm kernels), ``aot_norm_fp32`` (the same on
fp32 tensors, whose Gram matrix is a plain fp32 cuBLAS GEMM), and, with the norm computed on the
eager path first so that only the named kernel runs from the cache on: ``aot_scale`` (fused
inference, 256 tokens: the scale pass), ``aot_decode`` (fused inference, 4 tokens: the decode
kernel), ``aot_backward`` (the fused training step: scale pass and gradient prologue),
``aot_delta`` (compose_delta).
"""
from __future__ import annotations

import argparse

import torch

PROBES = ("cublas", "cublas_gram", "jit_add", "jit_dot", "jit_loop1", "jit_loop3", "jit_norm_nowsq_a16",
          "jit_norm_wsq_a16",
          "jit_norm_nowsq_any", "jit_norm_wsq_any", "aot_norm", "aot_norm_fp32", "aot_scale", "aot_decode",
          "aot_backward", "aot_delta")


def _jit_add() -> None:
    import triton
    import triton.language as tl

    @triton.jit
    def add(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + tl.load(y_ptr + offs, mask=mask), mask=mask)

    x, y = torch.randn(10_000, device="cuda"), torch.randn(10_000, device="cuda")
    out = torch.empty_like(x)
    add[(triton.cdiv(x.numel(), 1024),)](x, y, out, x.numel(), BLOCK=1024)
    assert torch.equal(out, x + y)


def _jit_dot() -> None:
    import triton
    import triton.language as tl

    @triton.jit
    def matmul(a_ptr, b_ptr, c_ptr, K: tl.constexpr, N: tl.constexpr):
        i = tl.arange(0, 64)
        j = tl.arange(0, N)
        k = tl.arange(0, K)
        a = tl.load(a_ptr + i[:, None] * K + k[None, :])
        b = tl.load(b_ptr + k[:, None] * N + j[None, :])
        tl.store(c_ptr + i[:, None] * N + j[None, :], tl.dot(a, b))

    a = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(64, 64, device="cuda")
    matmul[(1,)](a, b, c, K=64, N=64)
    torch.testing.assert_close(c, a.float() @ b.float(), rtol=1e-2, atol=1e-2)


def _jit_loop(stages: int) -> None:
    import triton
    import triton.language as tl

    @triton.jit
    def matmul(a_ptr, b_ptr, c_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = tl.load(a_ptr + rows[:, None] * K + (k0 + ks)[None, :])
            b = tl.load(b_ptr + cols[:, None] * K + (k0 + ks)[None, :])
            acc = tl.dot(a, tl.trans(b), acc)
        tl.store(c_ptr + rows[:, None] * N + cols[None, :], acc)

    a = torch.randn(256, 1024, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(256, 1024, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(256, 256, device="cuda")
    matmul[(2, 2)](a, b, c, 256, 256, 1024, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=stages)
    torch.testing.assert_close(c, a.float() @ b.float().t(), rtol=2e-2, atol=2e-1)


def _jit_norm(wsq: bool, aligned: bool) -> None:
    from tune_norm import dora_norm_partials_kernel, splits_for  # scripts/ is this script's folder

    _, W, A, B, _ = _layer(False)
    if not aligned:  # odd row stride, data pointer 2 bytes past a 16-byte boundary
        W = torch.cat([torch.zeros_like(W[:, :1]), W], dim=1)[:, 1:]
    d_out, d_in, rank = W.shape[0], W.shape[1], A.shape[0]
    block_m, block_k, warps, stages = 64, 64, 4, 4  # triton_src/specs.py, 16-bit, rank tile 16
    splits, k_per = splits_for(d_in, -(-d_out // block_m), torch.cuda.get_device_properties(0).multi_processor_count)
    cross = torch.empty(splits, d_out, device="cuda")
    wsq_parts = torch.empty(splits, d_out, device="cuda")
    gram = (A.float() @ A.float().t()).contiguous()
    dora_norm_partials_kernel[(1, -(-d_out // block_m), splits)](
        W, A, B, gram, cross, wsq_parts, d_out, d_in, rank, W.stride(0), A.stride(0), B.stride(0), k_per, 0.5,
        BLOCK_M=block_m, BLOCK_R=16, BLOCK_K=block_k, BLOCK_J=32, INPUT_KIND=0, WSQ=wsq, num_warps=warps,
        num_stages=stages)
    if wsq:
        torch.testing.assert_close(wsq_parts.sum(0), W.float().pow(2).sum(1), rtol=1e-4, atol=1e-4)


def _layer(requires_grad: bool) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16, generator=gen)
    W = torch.randn(384, 512, device="cuda", dtype=torch.bfloat16, generator=gen) * 512 ** -0.5
    A = (torch.randn(16, 512, device="cuda", dtype=torch.bfloat16, generator=gen) * 512 ** -0.5)
    B = torch.randn(384, 16, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.1
    m = torch.rand(384, device="cuda", generator=gen) + 0.5
    leaves = [t.requires_grad_(requires_grad) for t in (x, A, B, m)]
    return leaves[0], W, leaves[1], leaves[2], leaves[3]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("probe", nargs="?", choices=PROBES)
    p.add_argument("--list", action="store_true", help="print the probe names")
    args = p.parse_args()
    if args.list or args.probe is None:
        print(" ".join(PROBES))
        return
    if args.probe == "cublas":
        a = torch.randn(512, 512, device="cuda", dtype=torch.bfloat16)
        (a @ a).sum().item()
    elif args.probe == "cublas_gram":
        # the Gram GEMMs of tests/test_cuda_norm.py (A = [r, d_in]), cuBLAS only: on the H100 some
        # (split-K, N = 8 tiles) draw racecheck's "potential WAR" reports without dora_ext loaded
        for dt in (torch.bfloat16, torch.float16, torch.float32):
            for r, d_in in ((16, 512), (64, 2048), (48, 1024), (17, 4096), (100, 2048)):
                A = torch.randn(r, d_in, device="cuda", dtype=dt)
                gram = torch.mm(A, A.t(), out_dtype=torch.float32) if dt != torch.float32 else A @ A.t()
                torch.testing.assert_close(gram, A.float() @ A.float().t(), rtol=1e-3, atol=1e-2)
    elif args.probe == "jit_add":
        _jit_add()
    elif args.probe == "jit_dot":
        _jit_dot()
    elif args.probe.startswith("jit_loop"):
        _jit_loop(int(args.probe[-1]))
    elif args.probe.startswith("jit_norm"):
        _, wsq, alignment = args.probe.rsplit("_", 2)
        _jit_norm(wsq == "wsq", alignment == "a16")
    else:
        import dora_ext

        x, W, A, B, m = _layer(args.probe == "aot_backward")
        if args.probe.startswith("aot_norm"):
            if args.probe == "aot_norm_fp32":
                W, A, B = W.float(), A.float(), B.float()
            with dora_ext.overrides(tier="fused", norm_cache=False):
                dora_ext.row_norm(W, A, B, 0.5)
        else:
            with dora_ext.overrides(tier="eager"):
                norm = dora_ext.row_norm(W, A, B, 0.5)  # cached: the fused calls below skip the norm kernels
            torch.cuda.synchronize()
            with dora_ext.overrides(tier="fused"):
                if args.probe == "aot_backward":
                    dora_ext.dora_linear(x, W, None, A, B, m, 0.5).float().sum().backward()
                elif args.probe == "aot_delta":
                    base = x.detach() @ W.t()
                    lora = (x.detach() @ A.detach().t()) @ B.detach().t()
                    dora_ext.compose_delta(base, lora, m.detach(), norm, 0.5)
                else:
                    with torch.no_grad():
                        dora_ext.dora_linear(x[:4] if args.probe == "aot_decode" else x, W, None, A, B, m, 0.5)
        print(args.probe, dora_ext.last_tier())
    torch.cuda.synchronize()
    print(f"{args.probe}: ran")


if __name__ == "__main__":
    main()

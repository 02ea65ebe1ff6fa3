#!/usr/bin/env python3
"""One small CUDA workload per process, to find what makes compute-sanitizer's racecheck fail.

racecheck stopped with "Internal Sanitizer Error: The Sanitizer failed to handle a hardware
exception" whenever dora_ext's kernels were instrumented (docs/RELIABILITY.md). Each probe below
isolates one suspect; ``scripts/sanitize.sh`` is the real check, this is its debugging aid, run
under racecheck once per probe (and per dora_ext kernel) by

    bash scripts/racecheck_probe.sh RESULTS_DIR

Probes: ``jit_add`` (a Triton JIT elementwise kernel: does racecheck handle Triton at all?),
``jit_dot`` (a Triton JIT tl.dot kernel: tensor-core code, wgmma on sm_90), ``aot_scale`` (our
AOT scale kernel through dora_linear, fused inference: our launcher and module loading),
``aot_norm`` (our AOT norm kernel through row_norm), ``aot_backward`` (the fused training step:
the gradient prologue), ``cublas`` (no Triton: torch.matmul only, the control).
"""
from __future__ import annotations

import argparse

import torch

PROBES = ("cublas", "jit_add", "jit_dot", "aot_scale", "aot_norm", "aot_backward")


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
    elif args.probe == "jit_add":
        _jit_add()
    elif args.probe == "jit_dot":
        _jit_dot()
    else:
        import dora_ext

        with dora_ext.overrides(tier="fused", norm_cache=False):
            if args.probe == "aot_norm":
                _, W, A, B, _ = _layer(False)
                dora_ext.row_norm(W, A, B, 0.5)
            elif args.probe == "aot_scale":
                x, W, A, B, m = _layer(False)
                with torch.no_grad():
                    dora_ext.dora_linear(x, W, None, A, B, m, 0.5)
            else:
                x, W, A, B, m = _layer(True)
                dora_ext.dora_linear(x, W, None, A, B, m, 0.5).float().sum().backward()
            print(args.probe, dora_ext.last_tier())
    torch.cuda.synchronize()
    print(f"{args.probe}: ran")


if __name__ == "__main__":
    main()

"""Threads: the ops called from several Python threads at once give the single-threaded results.

The ops release the GIL (torch.ops calls do), so threads really run the C++ side
concurrently: the dispatcher's per-thread tier record, the launcher's per-device
module cache and kernel lookup, the lazily opened CUDA driver. Each check runs in a
fresh process so that the threads' first calls are the process's first calls (cold
kernel loader), released together by a barrier. Every thread runs its own workload
(dtype, shape, layout, bias: different kernel variants load at the same time) a few
times; afterwards the main thread runs every workload alone, and the results must be
bitwise equal.

CPU: intra-op parallelism is set to one thread so that a GEMM's result does not
depend on how many BLAS threads it got while others were busy (that would test
MKL's reproducibility, not ours). CUDA: each thread launches on its own stream
(a kernel launched on the wrong stream races with the GEMMs around it), with the
fused tier forced and cuBLAS in its deterministic workspace mode. The norm cache is
off, so every call runs the same kernels (tests/test_norm_cache.py covers the cache,
including from threads' point of view: its table is guarded by one mutex).
"""
from __future__ import annotations

import json
import textwrap

import pytest
import torch

from fresh_process import run_python

THREADS = 8

_SCRIPT = textwrap.dedent("""
    import json, sys, threading, traceback
    import torch
    import dora_ext

    device, n_threads = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    ITERS = 3
    dtypes = [torch.bfloat16, torch.float16, torch.float32] + ([torch.float64] if device == "cpu" else [])
    shapes = [(64, 256, 8, (32,)), (37, 100, 3, (5, 7)), (16, 17, 1, (3,)), (128, 512, 16, (2, 9))]

    def workload(i):
        d_in, d_out, r, batch = shapes[i % len(shapes)]
        dtype = dtypes[i % len(dtypes)]
        g = torch.Generator().manual_seed(1000 + i)
        rnd = lambda *s, std=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * std)
        W = rnd(d_out, d_in, std=d_in ** -0.5)
        t = dict(x=rnd(*batch, d_in), weight=W, bias=rnd(d_out) if i % 2 else None,
                 lora_A=rnd(r, d_in, std=d_in ** -0.5), lora_B=rnd(d_out, r, std=0.3),
                 magnitude=W.norm(dim=1) * (1 + 0.3 * rnd(d_out)), gy=rnd(*batch, d_out),
                 base=rnd(*batch, d_out), lora=rnd(*batch, d_out, std=0.1))
        out = {k: (v.to(device=device, dtype=torch.float32 if k == "magnitude" else dtype) if v is not None else None)
               for k, v in t.items()}
        if i % 3 == 1:  # a transposed (non-contiguous) x
            out["x"] = out["x"].transpose(-1, -2).contiguous().transpose(-1, -2)
        return out

    def run(t, last_training):
        leaves = {k: t[k].detach().clone().requires_grad_(True) for k in ("x", "lora_A", "lora_B", "magnitude")}
        y = dora_ext.dora_linear(leaves["x"], t["weight"], t["bias"], leaves["lora_A"], leaves["lora_B"],
                                 leaves["magnitude"], 0.5)
        y.backward(t["gy"])
        n = dora_ext.row_norm(t["weight"], t["lora_A"], t["lora_B"], 0.5)
        m = t["magnitude"].clone().requires_grad_(True)
        base = t["base"].clone().requires_grad_(True)
        d = dora_ext.compose_delta(base, t["lora"], m, n, 0.5)
        d.backward(t["gy"])
        with torch.set_grad_enabled(last_training):  # the thread's last op: its own tier must be recorded
            if last_training:
                last = dora_ext.dora_linear(leaves["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"],
                                            leaves["magnitude"], 0.5)
            else:
                last = dora_ext.dora_linear(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"],
                                            t["magnitude"], 0.5)
        res = {"y": y, "norm": n, "delta": d, "last": last, "grad_base": base.grad, "grad_m_delta": m.grad}
        res.update({"grad_" + k: v.grad for k, v in leaves.items()})
        return {k: v.detach().cpu() for k, v in res.items()}, dora_ext.last_tier()[0]

    workloads = [workload(i) for i in range(n_threads)]
    if device == "cuda":
        torch.cuda.synchronize()
        streams = [torch.cuda.Stream() for _ in range(n_threads)]
    barrier = threading.Barrier(n_threads)
    threaded, tiers, errors = [None] * n_threads, [None] * n_threads, []

    def worker(i):
        try:
            barrier.wait()
            if device == "cuda":
                with torch.cuda.stream(streams[i]):
                    runs = [run(workloads[i], i % 2 == 0) for _ in range(ITERS)]
                streams[i].synchronize()
            else:
                runs = [run(workloads[i], i % 2 == 0) for _ in range(ITERS)]
            threaded[i] = runs
            tiers[i] = [tier for _, tier in runs]
        except Exception:
            errors.append(traceback.format_exc())

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if device == "cuda":
        torch.cuda.synchronize()

    mismatches = []
    if not errors:
        for i in range(n_threads):
            alone, _ = run(workloads[i], i % 2 == 0)
            for it, (res, _) in enumerate(threaded[i]):
                for k, v in alone.items():
                    if not torch.equal(res[k], v):
                        diff = (res[k].double() - v.double()).abs().max().item()
                        mismatches.append(f"thread {i} iteration {it} {k}: max |diff| {diff:.3g}")
    print(json.dumps({"errors": errors, "mismatches": mismatches, "tiers": tiers}))
""")


def _run(device: str, tier: str | None) -> dict:
    # DORA_EXT_NORM_CACHE=0: every call takes the same norm path. With the cache on, a first
    # (cold) call computes ||W||^2 in a different kernel variant than later (warm) calls, and
    # the two may round the norm's last bit differently, which bitwise comparison would flag.
    proc = run_python(["-c", _SCRIPT, device, str(THREADS)], timeout=600, DORA_EXT_TIER=tier,
                      CUBLAS_WORKSPACE_CONFIG=":4096:8", DORA_EXT_NORM_CACHE="0")
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not result["errors"], "\n".join(result["errors"])
    assert not result["mismatches"], "\n".join(result["mismatches"][:20])
    return result


def test_threads_cpu_match_single_thread():
    result = _run("cpu", None)
    assert all(t == ["eager"] * len(t) for t in result["tiers"]), result["tiers"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_threads_cuda_fused_match_single_thread():
    result = _run("cuda", "fused")
    # Each thread's last op was its own: training forward for even threads, inference for odd.
    for i, tiers in enumerate(result["tiers"]):
        want = "fused_training" if i % 2 == 0 else "fused_inference"
        assert tiers == [want] * len(tiers), (i, tiers)

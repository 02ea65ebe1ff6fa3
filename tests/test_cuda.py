"""CUDA tests: the AOT-compiled fused kernels against float64 and against eager.

Skipped cleanly without a GPU; on a GPU machine run them with scripts/gpu_check.sh.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import dora_ext
from reference import (BATCH_GRAD_TOL, FWD_TOL, TIERS_TOL, make_inputs, ref_compose_delta, ref_dora_linear,
                       rel_err)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _inputs(d_in, d_out, r, batch, dtype, bias=True, mag_dtype=None, g_near_one=False, seed=0):
    """reference.make_inputs on CUDA, keyed as the tests here name them (W, b, A, B, m, s)."""
    inp = make_inputs(d_in, d_out, r, batch, dtype, "cuda", bias=bias, mag_dtype=mag_dtype, seed=seed,
                      g_noise=1e-4 if g_near_one else 0.3)
    return dict(x=inp["x"], W=inp["weight"], b=inp["bias"], A=inp["lora_A"], B=inp["lora_B"], m=inp["magnitude"],
                s=inp["scale"])


def _plain_torch(x, W, b, A, B, m, s):
    """The same math in plain PyTorch at the input precision (the 2x rule's baseline)."""
    Wp = W + s * (B @ A)
    n = torch.linalg.vector_norm(Wp, dim=1)
    y = (x @ W.T + s * (x @ A.T) @ B.T) * (m.to(x.dtype) / n.to(x.dtype))
    return y if b is None else y + b




def _poison_allocator():
    """Fill the caching allocator's free blocks with NaN so unwritten outputs show."""
    junk = torch.full((64 << 20,), float("nan"), device="cuda", dtype=torch.float32)
    del junk


@pytest.fixture(autouse=True)
def _auto_tier(monkeypatch):
    dora_ext.set_options(tier="auto")


def test_info_reports_this_device():
    info = dora_ext.info()
    dev = info["devices"][0]
    major, minor = torch.cuda.get_device_capability(0)
    assert dev["capability"] == f"sm_{major}{minor}"
    assert "fused_inference" in dev["tiers"], dev["reason"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 96, 16, (128,)), (37, 23, 1, (3, 5)), (256, 512, 64, (2, 100))])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_forward_matches_reference(dtype, shape, bias):
    d_in, d_out, r, batch = shape
    t = _inputs(d_in, d_out, r, batch, dtype, bias=bias)
    _poison_allocator()
    with torch.no_grad():
        y = dora_ext.dora_linear(t["x"], t["W"], t["b"], t["A"], t["B"], t["m"], t["s"])
    assert dora_ext.last_tier()[0] == "fused_inference", dora_ext.last_tier()
    assert y.dtype == dtype and y.shape == (*batch, d_out)
    assert torch.isfinite(y).all()
    ref = ref_dora_linear(t["x"], t["W"], t["b"], t["A"], t["B"], t["m"], t["s"])
    err = rel_err(y, ref)
    assert err < FWD_TOL[dtype]
    if dtype != torch.float32:  # flash-attention's rule: at most 2x the plain-PyTorch error
        plain = rel_err(_plain_torch(t["x"], t["W"], t["b"], t["A"], t["B"], t["m"], t["s"]), ref)
        assert err <= 2 * plain + 1e-6, (err, plain)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_matches_forced_eager(dtype, monkeypatch):
    t = _inputs(128, 256, 8, (4, 33), dtype)
    args = (t["x"], t["W"], t["b"], t["A"], t["B"], t["m"], t["s"])
    with torch.no_grad():
        fused = dora_ext.dora_linear(*args)
        dora_ext.set_options(tier="eager")
        eager = dora_ext.dora_linear(*args)
        assert dora_ext.last_tier() == ("eager", "forced by DORA_EXT_TIER=eager")
    assert rel_err(fused, eager) < TIERS_TOL[dtype]


def test_fp32_magnitude_keeps_activation_dtype():
    t = _inputs(64, 64, 4, (10,), torch.bfloat16, mag_dtype=torch.float32)
    y = dora_ext.dora_linear(t["x"], t["W"], t["b"], t["A"], t["B"], t["m"], t["s"])
    assert y.dtype == torch.bfloat16


def test_non_contiguous_and_3d_inputs():
    t = _inputs(48, 80, 5, (6, 7), torch.bfloat16)
    x = t["x"].transpose(0, 1)  # [7, 6, 48], not contiguous
    y = dora_ext.dora_linear(x, t["W"], t["b"], t["A"], t["B"], t["m"], t["s"])
    ref = ref_dora_linear(x, t["W"], t["b"], t["A"], t["B"], t["m"], t["s"])
    assert rel_err(y, ref) < FWD_TOL[torch.bfloat16]
    xs = torch.randn(20, 96, device="cuda", dtype=torch.bfloat16)[:, ::2]  # column stride 2
    y2 = dora_ext.dora_linear(xs, t["W"], t["b"], t["A"], t["B"], t["m"], t["s"])
    assert rel_err(y2, ref_dora_linear(xs, t["W"], t["b"], t["A"], t["B"], t["m"], t["s"])) < FWD_TOL[torch.bfloat16]


def test_empty_batch():
    t = _inputs(32, 48, 4, (0,), torch.float16)
    y = dora_ext.dora_linear(t["x"], t["W"], t["b"], t["A"], t["B"], t["m"], t["s"])
    assert y.shape == (0, 48)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 96, 16, (128,)), (37, 23, 1, (3, 5))])
def test_fused_gradients_match_reference(dtype, shape):
    d_in, d_out, r, batch = shape
    t = _inputs(d_in, d_out, r, batch, dtype, mag_dtype=torch.float32)
    leaves = {k: t[k].clone().requires_grad_(True) for k in ("x", "A", "B", "m", "b")}
    _poison_allocator()
    y = dora_ext.dora_linear(leaves["x"], t["W"], leaves["b"], leaves["A"], leaves["B"], leaves["m"], t["s"])
    assert dora_ext.last_tier()[0] == "fused_training"
    gy = torch.randn_like(y)
    y.backward(gy)
    assert dora_ext.last_tier()[0] == "fused_training"  # the backward ran fused too
    ref_leaves = {k: v.detach().double().cpu().requires_grad_(True) for k, v in leaves.items()}
    ref = ref_dora_linear(ref_leaves["x"], t["W"], ref_leaves["b"], ref_leaves["A"], ref_leaves["B"], ref_leaves["m"],
                          t["s"])
    ref.backward(gy.double().cpu())
    for k in leaves:
        assert leaves[k].grad.dtype == leaves[k].dtype
        assert torch.isfinite(leaves[k].grad).all(), k
        assert rel_err(leaves[k].grad, ref_leaves[k].grad) < BATCH_GRAD_TOL[dtype], k  # 15 or 128 tokens


@pytest.mark.parametrize("dtype", DTYPES)
def test_compose_delta_fused_is_stable_near_g_equal_one(dtype):
    t = _inputs(64, 200, 8, (50,), dtype, g_near_one=True)
    norm = dora_ext.row_norm(t["W"], t["A"], t["B"], t["s"])
    base = t["x"] @ t["W"].T
    lora = (t["x"] @ t["A"].T) @ t["B"].T
    _poison_allocator()
    delta = dora_ext.compose_delta(base, lora, t["m"], norm, t["s"])
    assert dora_ext.last_tier()[0] == "fused_inference"
    ref = ref_compose_delta(base, lora, t["m"], norm, t["s"])
    # The delta is ~1e-4 of base here: the cancelling form would lose it entirely in 16 bits.
    assert rel_err(delta, ref) < FWD_TOL[dtype]


@pytest.mark.parametrize("base_dtype, dtype", [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                                               (torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                               (torch.float16, torch.float32)])
@pytest.mark.parametrize("batch", [(1,), (3, 37), (1000,)])
@pytest.mark.parametrize("need_base", [True, False])
def test_compose_delta_fused_forward_and_backward(base_dtype, dtype, batch, need_base):
    """The delta and its one-pass backward (triton_src/compose.py) against float64: one dtype or a
    16-bit base with a float32 lora (read as it is), strided base rows, the base gradient on or off."""
    d_out = 203
    gen = torch.Generator().manual_seed(11)
    wide = torch.randn(*batch, d_out + 9, generator=gen, dtype=torch.float64)
    base = wide.to("cuda", base_dtype)[..., 4:4 + d_out].requires_grad_(need_base)  # strided, misaligned rows
    lora = (0.3 * torch.randn(*batch, d_out, generator=gen, dtype=torch.float64)).to("cuda", dtype).requires_grad_()
    norm = (torch.rand(d_out, generator=gen, dtype=torch.float64) + 0.5).to("cuda", torch.float32)
    m = (norm.double().cpu() * (1 + 0.2 * torch.randn(d_out, generator=gen, dtype=torch.float64))).to(
        "cuda", torch.float32).requires_grad_()
    s = 0.7
    _poison_allocator()
    delta = dora_ext.compose_delta(base, lora, m, norm, s)
    assert dora_ext.last_tier()[0] == "fused_inference" and delta.dtype == dtype and delta.shape == base.shape
    gy = torch.randn(delta.shape, generator=gen, dtype=torch.float64).to("cuda", dtype)
    _poison_allocator()
    grads = torch.autograd.grad(delta, [base, lora, m] if need_base else [lora, m], gy)
    # CUDA backward runs on autograd's device thread and last_tier() is per thread: ask for the
    # tier by calling the backward op here, with the mask autograd passed.
    torch.ops.dora_ext.compose_delta_backward(gy, base.detach(), lora.detach(), m.detach(), norm, s,
                                              [need_base, True, True])
    assert dora_ext.last_tier()[0] == "fused_training", dora_ext.last_tier()
    b64, l64, m64 = (t.detach().double().cpu().requires_grad_() for t in (base, lora, m))
    ref = ref_compose_delta(b64, l64, m64, norm, s)
    want = torch.autograd.grad(ref, [b64, l64, m64], gy.double().cpu())
    assert rel_err(delta, ref) < FWD_TOL[dtype]
    got = dict(zip(["base", "lora", "m"] if need_base else ["lora", "m"], grads))
    for (name, w), t in zip(zip(["base", "lora", "m"], want), (base, lora, m)):
        if name not in got:
            continue
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert rel_err(got[name], w) < FWD_TOL[t.dtype], name  # one product per element, as the forward


def test_compose_delta_backward_partial_masks_and_bad_grad_out():
    """Only one of the lora / magnitude gradients: the eager ops, said in the reason; a grad_out that
    is not the output's shape or dtype is an error naming it (the op may be called directly)."""
    base = torch.randn(8, 40, device="cuda", dtype=torch.bfloat16)
    lora = torch.randn(8, 40, device="cuda", dtype=torch.bfloat16).requires_grad_()
    m, norm = torch.rand(40, device="cuda") + 0.5, torch.rand(40, device="cuda") + 0.5
    delta = dora_ext.compose_delta(base, lora, m, norm, 0.5)
    (grad_lora,) = torch.autograd.grad(delta, [lora], torch.ones_like(delta))
    op = torch.ops.dora_ext.compose_delta_backward
    op(torch.ones_like(delta), base, lora.detach(), m, norm, 0.5, [False, True, False])  # on this thread
    tier, reason = dora_ext.last_tier()
    assert tier == "eager" and "both the lora and the magnitude gradient" in reason
    g = (m / norm).cpu().double()
    assert rel_err(grad_lora, torch.ones(8, 40, dtype=torch.float64) * g * 0.5) < FWD_TOL[torch.bfloat16]
    with pytest.raises(RuntimeError, match="grad_out must have the output's shape"):
        op(torch.ones(7, 40, device="cuda", dtype=torch.bfloat16), base, lora.detach(), m, norm, 0.5,
           [True, True, True])
    with pytest.raises(RuntimeError, match="grad_out must have the output's dtype"):
        op(torch.ones(8, 40, device="cuda"), base, lora.detach(), m, norm, 0.5, [True, True, True])
    t = _inputs(16, 24, 4, (5,), torch.float16)
    _, z, h, n = torch.ops.dora_ext.dora_linear_forward(t["x"], t["W"], None, t["A"], t["B"], t["m"], t["s"], True)
    with pytest.raises(RuntimeError, match="grad_out must have the output's shape"):
        torch.ops.dora_ext.dora_linear_backward(torch.ones(5, 23, device="cuda", dtype=torch.float16), t["x"],
                                                t["W"], None, t["A"], t["B"], t["m"], n, z, None, h, t["s"],
                                                [True, True, True, True, False])


def test_forced_fused_tier_and_eager_reason(monkeypatch):
    t = _inputs(32, 32, 2, (4,), torch.float64)
    assert dora_ext.select_tier(t["x"], t["W"], t["A"], False)[0] == "eager"
    dora_ext.set_options(tier="fused")
    with pytest.raises(RuntimeError, match="DORA_EXT_TIER=fused.*float64|Double"):
        dora_ext.dora_linear(t["x"], t["W"], t["b"], t["A"], t["B"], t["m"], t["s"])


def test_no_triton_at_run_time(tmp_path):
    """A fresh process runs the fused path with an empty Triton cache and never imports triton."""
    cache = tmp_path / "triton_cache"
    cache.mkdir()
    script = textwrap.dedent("""
        import json, sys, time
        t0 = time.perf_counter()
        import torch, dora_ext
        x = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16)
        W = torch.randn(256, 128, device="cuda", dtype=torch.bfloat16)
        A = torch.randn(8, 128, device="cuda", dtype=torch.bfloat16)
        B = torch.randn(256, 8, device="cuda", dtype=torch.bfloat16)
        m = torch.rand(256, device="cuda")
        y = dora_ext.dora_linear(x, W, None, A, B, m, 0.5)
        torch.cuda.synchronize()
        print(json.dumps({"tier": dora_ext.last_tier()[0], "triton": "triton" in sys.modules,
                          "seconds": time.perf_counter() - t0}))
    """)
    env = dict(os.environ, TRITON_CACHE_DIR=str(cache))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print("cold start (import to first fused result):", result)
    assert result["tier"] == "fused_inference"
    assert result["triton"] is False
    assert list(cache.iterdir()) == []


# ---------------------------------------------------------------------------
# The decode kernel (triton_src/decode.py): inference calls with at most 16 tokens in 16-bit


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 96, 16, (1,)), (37, 23, 1, (3, 5)), (520, 300, 40, (16,)),
                                   (4096, 1000, 384, (2, 1)), (300, 257, 7, (1, 1, 1))])
@pytest.mark.parametrize("bias", [True, False])
def test_decode_kernel_matches_reference(dtype, shape, bias):
    d_in, d_out, r, batch = shape
    t = _inputs(d_in, d_out, r, batch, dtype, bias=bias, mag_dtype=torch.float32, seed=5)
    args = (t["x"], t["W"], t["b"], t["A"], t["B"], t["m"], t["s"])
    ref = ref_dora_linear(*args)
    with torch.no_grad():
        _poison_allocator()
        y = dora_ext.dora_linear(*args)
    tier, reason = dora_ext.last_tier()
    assert tier == "fused_inference" and "decode kernel" in reason, (tier, reason)
    assert y.dtype == dtype and y.shape == (*batch, d_out)
    err = rel_err(y, ref)
    assert err < FWD_TOL[dtype]
    assert err <= 2 * rel_err(_plain_torch(*args), ref) + 1e-6


def test_decode_kernel_strided_inputs_and_limits(monkeypatch):
    """A strided x row and a column slice of a wider x; 17 tokens and fp32 take the cuBLAS path;
    the decode_max_tokens option moves the limit and 0 turns the kernel off; a bad value is an error."""
    t = _inputs(200, 136, 12, (17,), torch.bfloat16, seed=6)
    wide = torch.randn(17, 260, device="cuda", dtype=torch.bfloat16)
    wide[:, 30:230] = t["x"]
    x = wide[:, 30:230]  # rows strided by 260, pointer not 16-byte aligned
    rest = (t["W"], t["b"], t["A"], t["B"], t["m"], t["s"])
    ref = ref_dora_linear(x, *rest)
    with torch.no_grad():
        for tokens, want in ((x[:3], True), (x[::5], True), (x, False)):
            y = dora_ext.dora_linear(tokens, *rest)
            assert ("decode kernel" in dora_ext.last_tier()[1]) == want, (tokens.shape, dora_ext.last_tier())
            assert rel_err(y, ref_dora_linear(tokens, *rest)) < FWD_TOL[torch.bfloat16]
        dora_ext.set_options(decode_max_tokens=32)
        y = dora_ext.dora_linear(x, *rest)
        assert "decode kernel (tokens <= 32)" in dora_ext.last_tier()[1]
        assert rel_err(y, ref) < FWD_TOL[torch.bfloat16]
        dora_ext.set_options(decode_max_tokens=0)
        dora_ext.dora_linear(x[:1], *rest)
        assert "decode kernel" not in dora_ext.last_tier()[1]
        with pytest.raises(RuntimeError, match="decode_max_tokens must be a non-negative integer"):
            dora_ext.set_options(decode_max_tokens="few")
        dora_ext.set_options(decode_max_tokens=16)
        t32 = _inputs(64, 96, 8, (1,), torch.float32)
        y = dora_ext.dora_linear(t32["x"], t32["W"], t32["b"], t32["A"], t32["B"], t32["m"], t32["s"])
        assert "decode kernel" not in dora_ext.last_tier()[1]
        ref32 = ref_dora_linear(t32["x"], t32["W"], t32["b"], t32["A"], t32["B"], t32["m"], t32["s"])
        assert rel_err(y, ref32) < FWD_TOL[torch.float32]


def test_decode_kernel_not_used_for_training():
    """With a gradient to record, decode-sized calls keep the training path (z saved for backward)."""
    t = _inputs(64, 96, 8, (2,), torch.bfloat16, seed=7)
    A = t["A"].clone().requires_grad_(True)
    y = dora_ext.dora_linear(t["x"], t["W"], t["b"], A, t["B"], t["m"], t["s"])
    assert dora_ext.last_tier()[0] == "fused_training" and "decode" not in dora_ext.last_tier()[1]
    y.sum().backward()
    assert A.grad is not None and torch.isfinite(A.grad).all()

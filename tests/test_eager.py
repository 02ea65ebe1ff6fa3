"""CPU (eager tier) correctness of every public op against the float64 dense reference.

Tolerances are DESIGN.md section 6: relative error ||out - ref|| / ||ref|| below
1e-5 for fp32, 1e-2 for fp16/bf16 (the row norm itself, accumulated in fp32,
below 1e-4) and ~1e-12 for float64. The reference is always computed from the
*same rounded inputs* the op sees, so the budget only covers the op's own
arithmetic.
"""
from __future__ import annotations

import pytest
import torch

import dora_ext
from reference import (
    NORM_EPS,
    make_inputs,
    ref_compose_delta,
    ref_dora_linear_for,
    FWD_TOL,
    GRAD_TOL,
    NORM_TOL,
    ref_row_norm,
    rel_err,
)

LOW = (torch.float16, torch.bfloat16)
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
GRAD_KEYS = ("x", "bias", "lora_A", "lora_B", "magnitude")

# (d_in, d_out, r, batch_shape): square-ish, odd sizes, r = 1, 3-D x, 1-D x.
SHAPES = [
    pytest.param(64, 48, 8, (16,), id="2d"),
    pytest.param(37, 23, 5, (7,), id="odd"),
    pytest.param(33, 17, 1, (9,), id="r1"),
    pytest.param(24, 40, 4, (2, 5), id="3d"),
    pytest.param(19, 13, 3, (2, 3, 2), id="4d"),
    pytest.param(16, 12, 2, (), id="1d"),
]


def _dt_id(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grads_and_ref_grads(inp: dict, y: torch.Tensor, **ref_kw) -> tuple[dict, dict]:
    """Backpropagates the same random cotangent through the op and the float64 reference."""
    gy = torch.randn(y.shape, dtype=torch.float64).to(y.dtype)
    torch.autograd.backward(y, gy)
    keys = [k for k in GRAD_KEYS if inp[k] is not None]
    got = {k: inp[k].grad for k in keys}
    for k in keys:
        assert got[k] is not None, f"no gradient for {k}"
        inp[k].grad = None
    ref = ref_dora_linear_for(inp, **ref_kw)
    want = dict(zip(keys, torch.autograd.grad(ref, [inp[k] for k in keys], gy.to(torch.float64))))
    return got, want


# ---------------------------------------------------------------------------
# row_norm


@pytest.mark.parametrize("dtype", DTYPES, ids=_dt_id)
@pytest.mark.parametrize("d_in, d_out, r", [(64, 48, 8), (37, 23, 1), (130, 7, 17)])
def test_row_norm_matches_reference(dtype, d_in, d_out, r):
    inp = make_inputs(d_in, d_out, r, (1,), dtype)
    W, A, B, s = inp["weight"], inp["lora_A"], inp["lora_B"], inp["scale"]
    n = dora_ext.row_norm(W, A, B, s)
    assert n.dtype == _acc_dtype(dtype)
    assert n.shape == (d_out,)
    assert n.device == W.device
    assert rel_err(n, ref_row_norm(W, A, B, s)) < NORM_TOL[dtype]
    # torch.ops entry point is the same op
    torch.testing.assert_close(torch.ops.dora_ext.row_norm(W, A, B, s), n, rtol=0, atol=0)


@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float16], ids=_dt_id)
@pytest.mark.parametrize("d_in, d_out, r", [(64, 48, 8), (37, 23, 1), (64, 1100, 5), (520, 96, 40)])
def test_row_norm_float32_adapters_on_16bit_weight(any_device, w_dtype, d_in, d_out, r):
    """row_norm's promotion rule: float32 lora_A/lora_B with a float16/bfloat16 weight (PEFT's default
    adapters) give the norm of exactly those values at float32 accuracy, the weight left as it is."""
    inp = make_inputs(d_in, d_out, r, (1,), torch.float32, device=any_device)
    W, A, B, s = inp["weight"].to(w_dtype), inp["lora_A"], inp["lora_B"], inp["scale"]
    n = dora_ext.row_norm(W, A, B, s)
    assert n.dtype == torch.float32 and n.shape == (d_out,) and n.device == W.device
    ref = ref_row_norm(W, A, B, s)  # the 16-bit weight's values with the float32 adapters, in float64
    assert rel_err(n, ref) < NORM_TOL[torch.float32]
    # the adapters' float32 digits count: rounding them to the weight's dtype first is measurably off
    rounded = ref_row_norm(W, A.to(w_dtype), B.to(w_dtype), s)
    assert rel_err(rounded, ref) > 4 * rel_err(n, ref)


@pytest.mark.parametrize("scale", [0.0, -1.5, 4.0])
def test_row_norm_scales(scale):
    inp = make_inputs(29, 11, 3, (1,), torch.float64)
    W, A, B = inp["weight"], inp["lora_A"], inp["lora_B"]
    n = dora_ext.row_norm(W, A, B, scale)
    assert rel_err(n, ref_row_norm(W, A, B, scale)) < 1e-12
    if scale == 0.0:
        torch.testing.assert_close(n, W.norm(dim=1), rtol=1e-12, atol=0)


def test_row_norm_noncontiguous_inputs():
    inp = make_inputs(40, 24, 6, (1,), torch.float32)
    W, A, B, s = inp["weight"], inp["lora_A"], inp["lora_B"], inp["scale"]
    Wt = W.t().contiguous().t()  # same values, column-major strides
    A2 = torch.cat([A, torch.randn_like(A)], dim=1)[:, ::2]  # strided view
    A2.copy_(A)
    Bt = B.t().contiguous().t()
    assert not (Wt.is_contiguous() or A2.is_contiguous() or Bt.is_contiguous())
    n = dora_ext.row_norm(Wt, A2, Bt, s)
    assert rel_err(n, ref_row_norm(W, A, B, s)) < NORM_TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=_dt_id)
def test_row_norm_never_requires_grad(dtype):
    inp = make_inputs(20, 10, 4, (1,), dtype, requires_grad=True)
    W, A, B, s = inp["weight"], inp["lora_A"], inp["lora_B"], inp["scale"]
    assert A.requires_grad and B.requires_grad
    n = dora_ext.row_norm(W, A, B, s)
    assert not n.requires_grad
    assert n.grad_fn is None
    n_op = torch.ops.dora_ext.row_norm(W, A, B, s)
    assert not n_op.requires_grad
    # even with every input requiring grad (the weight too: row_norm is not the layer)
    W2 = W.detach().clone().requires_grad_(True)
    assert not dora_ext.row_norm(W2, A, B, s).requires_grad


def test_row_norm_of_zero_row_is_clamped():
    inp = make_inputs(16, 6, 2, (1,), torch.float32)
    W, A, B, s = inp["weight"].clone(), inp["lora_A"], inp["lora_B"].clone(), inp["scale"]
    W[2] = 0
    B[2] = 0
    n = dora_ext.row_norm(W, A, B, s)
    assert torch.isfinite(n).all()
    assert n[2].item() > 0
    assert n[2].item() == pytest.approx(NORM_EPS, rel=1e-3)
    others = torch.arange(6) != 2
    assert rel_err(n[others], ref_row_norm(W, A, B, s)[others]) < 1e-5


# ---------------------------------------------------------------------------
# dora_linear forward


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("d_in, d_out, r, batch", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt_id)
def test_dora_linear_forward_matches_reference(dtype, d_in, d_out, r, batch, bias):
    inp = make_inputs(d_in, d_out, r, batch, dtype, bias=bias)
    y = dora_ext.dora_linear(**inp)
    assert y.dtype == dtype
    assert y.shape == (*batch, d_out)
    assert torch.isfinite(y).all()
    assert rel_err(y, ref_dora_linear_for(inp)) < FWD_TOL[dtype]
    assert dora_ext.last_tier()[0] == "eager"


def test_public_wrapper_and_torch_ops_agree():
    inp = make_inputs(21, 9, 3, (4,), torch.float32)
    a = dora_ext.dora_linear(**inp)
    b = torch.ops.dora_ext.dora_linear(
        inp["x"], inp["weight"], inp["bias"], inp["lora_A"], inp["lora_B"], inp["magnitude"], inp["scale"]
    )
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_inputs_are_not_modified():
    inp = make_inputs(21, 9, 3, (2, 4), torch.float32, requires_grad=True)
    before = {k: v.detach().clone() for k, v in inp.items() if isinstance(v, torch.Tensor)}
    y = dora_ext.dora_linear(**inp)
    y.sum().backward()
    for k, v in before.items():
        assert torch.equal(inp[k].detach(), v), f"{k} was modified in place"


@pytest.mark.parametrize("scale", [0.0, -2.0, 8.0])
def test_dora_linear_scales(scale):
    inp = make_inputs(30, 14, 4, (6,), torch.float64, scale=scale)
    y = dora_ext.dora_linear(**inp)
    assert rel_err(y, ref_dora_linear_for(inp)) < FWD_TOL[torch.float64]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=_dt_id)
@pytest.mark.parametrize(
    "layout", ["transposed", "sliced", "permuted3d", "expanded", "all_noncontig"]
)
def test_dora_linear_noncontiguous(dtype, layout):
    d_in, d_out, r = 24, 18, 3
    inp = make_inputs(d_in, d_out, r, (10,), dtype)
    x = inp["x"]
    if layout == "transposed":
        xv = x.t().contiguous().t()  # [10, d_in] with strides (1, 10)
    elif layout == "sliced":
        big = torch.randn(10, 2 * d_in, dtype=dtype)
        xv = big[:, 1::2]
        xv.copy_(x)
    elif layout == "permuted3d":
        x3 = x.reshape(2, 5, d_in)
        xv = x3.permute(1, 0, 2).contiguous().permute(1, 0, 2)  # [2, 5, d_in], non-contiguous
        x = x3
    elif layout == "expanded":
        x = x[:1].expand(3, d_in)  # stride 0 along the batch
        xv = x
    else:  # every tensor a non-contiguous view
        xv = x.t().contiguous().t()
        for k in ("weight", "lora_A", "lora_B"):
            inp[k] = inp[k].t().contiguous().t()
        for k in ("bias", "magnitude"):
            inp[k] = torch.stack([inp[k], inp[k]], dim=1)[:, 0]
    if layout != "expanded":
        assert not xv.is_contiguous()
    inp["x"] = xv
    y = dora_ext.dora_linear(**inp)
    assert y.shape == (*x.shape[:-1], d_out)
    assert rel_err(y, ref_dora_linear_for(dict(inp, x=x))) < FWD_TOL[dtype]


@pytest.mark.parametrize(
    "x_dtype, mag_dtype",
    [
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.float32, torch.float64),
        (torch.float64, torch.float32),
        (torch.float32, torch.bfloat16),
    ],
    ids=lambda d: _dt_id(d),
)
def test_magnitude_dtype_does_not_change_output_dtype(x_dtype, mag_dtype):
    inp = make_inputs(32, 20, 4, (3, 4), x_dtype, mag_dtype=mag_dtype, requires_grad=True)
    assert inp["magnitude"].dtype == mag_dtype
    y = dora_ext.dora_linear(**inp)
    assert y.dtype == x_dtype, "the magnitude's dtype must not promote the output"
    assert rel_err(y, ref_dora_linear_for(inp)) < FWD_TOL[x_dtype]
    got, want = _grads_and_ref_grads(inp, y)
    assert got["magnitude"].dtype == mag_dtype
    for k in ("x", "bias", "lora_A", "lora_B"):
        assert got[k].dtype == x_dtype, k
    for k in GRAD_KEYS:
        assert rel_err(got[k], want[k]) < max(GRAD_TOL[x_dtype], GRAD_TOL[mag_dtype]), k


@pytest.mark.parametrize("dtype", DTYPES, ids=_dt_id)
def test_dora_linear_g_near_one(dtype):
    mag = torch.float32 if dtype in LOW else dtype
    inp = make_inputs(48, 32, 4, (12,), dtype, mag_dtype=mag, g_noise=1e-4)
    g = inp["magnitude"].double() / ref_row_norm(inp["weight"], inp["lora_A"], inp["lora_B"], inp["scale"])
    assert 0 < (g - 1).abs().max() < 1e-3
    y = dora_ext.dora_linear(**inp)
    assert rel_err(y, ref_dora_linear_for(inp)) < FWD_TOL[dtype]


# fp16 stops at 1e3: outputs of ~1e6 are beyond its range (65504).
@pytest.mark.parametrize(
    "dtype, factor",
    [(dt, f) for dt in DTYPES for f in (1e3, 1e6) if not (dt == torch.float16 and f > 1e3)],
    ids=lambda v: _dt_id(v) if isinstance(v, torch.dtype) else f"{v:g}",
)
def test_large_magnitudes(dtype, factor):
    inp = make_inputs(40, 24, 4, (8,), dtype, requires_grad=True)
    with torch.no_grad():
        inp["magnitude"].mul_(factor)
    y = dora_ext.dora_linear(**inp)
    assert torch.isfinite(y).all()
    assert rel_err(y, ref_dora_linear_for(inp)) < FWD_TOL[dtype]
    got, want = _grads_and_ref_grads(inp, y)
    for k in GRAD_KEYS:
        assert torch.isfinite(got[k]).all(), k
        assert rel_err(got[k], want[k]) < GRAD_TOL[dtype], k


@pytest.mark.parametrize("row_mag", ["m_zero", "m_one"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt_id)
def test_zero_row_is_finite(dtype, row_mag):
    """W_i = 0 and B_i = 0: n_i is clamped, y_i = bias_i, and no NaN anywhere, forward or backward.

    m_zero is the state PEFT initialises such a row to (m = ||W_i + s B_i A|| = 0);
    m_one is a trained magnitude on that row, which makes g_i = m_i / 1e-6 huge.
    """
    d_in, d_out, r = 20, 9, 3
    inp = make_inputs(d_in, d_out, r, (5,), dtype)
    inp["weight"][4] = 0
    inp["lora_B"][4] = 0
    inp["magnitude"][4] = 0.0 if row_mag == "m_zero" else 1.0
    for k in GRAD_KEYS:
        inp[k].requires_grad_(True)
    y = dora_ext.dora_linear(**inp)
    assert not torch.isnan(y).any()
    assert torch.isfinite(y).all()
    # z_i = 0 for the zero row, so y_i is exactly the bias
    torch.testing.assert_close(y[:, 4], inp["bias"].detach()[4].expand(5), rtol=0, atol=0)
    assert rel_err(y, ref_dora_linear_for(inp)) < FWD_TOL[dtype]
    got, want = _grads_and_ref_grads(inp, y)
    for k in GRAD_KEYS:
        assert torch.isfinite(got[k]).all(), f"gradient of {k} is not finite"
    # A zero row has no direction: dora_ext defines g_i = 0 there (README), so the row's
    # output is its bias and it gets no gradient -- grad_B[4] and grad_m[4] are exactly 0
    # where the clamped-norm formula would give g_4 = m_4 / 1e-6 (inf in fp16).
    assert (got["lora_B"][4] == 0).all()
    assert got["magnitude"][4].item() == 0
    want["lora_B"][4] = 0
    if dtype in (torch.float32, torch.float64):
        for k in GRAD_KEYS:
            assert rel_err(got[k], want[k]) < GRAD_TOL[dtype], k


@pytest.mark.parametrize("batch", [(0,), (2, 0), (0, 3)], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=_dt_id)
def test_empty_batch(dtype, batch):
    d_in, d_out, r = 12, 7, 2
    inp = make_inputs(d_in, d_out, r, batch, dtype, requires_grad=True)
    y = dora_ext.dora_linear(**inp)
    assert y.shape == (*batch, d_out)
    assert y.dtype == dtype
    y.sum().backward()
    assert inp["x"].grad.shape == inp["x"].shape
    for k in ("lora_A", "lora_B", "magnitude", "bias"):
        g = inp[k].grad
        assert g is None or (g.shape == inp[k].shape and torch.all(g == 0)), k


def test_no_grad_and_inference_mode():
    inp = make_inputs(20, 10, 2, (4,), torch.float32, requires_grad=True)
    ref = ref_dora_linear_for(inp).detach()
    with torch.no_grad():
        y = dora_ext.dora_linear(**inp)
    assert not y.requires_grad
    assert rel_err(y, ref) < 1e-5
    with torch.inference_mode():
        y2 = dora_ext.dora_linear(**inp)
    assert not y2.requires_grad
    torch.testing.assert_close(y2, y)


# ---------------------------------------------------------------------------
# dora_linear gradients


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("batch", [(4,), (2, 3)], ids=["2d", "3d"])
def test_gradcheck_x_magnitude_bias(batch, bias):
    inp = make_inputs(7, 5, 2, batch, torch.float64, bias=bias)
    W, A, B, s = inp["weight"], inp["lora_A"], inp["lora_B"], inp["scale"]
    x = inp["x"].requires_grad_(True)
    m = inp["magnitude"].requires_grad_(True)
    args = [x, m]
    if bias:
        args.append(inp["bias"].requires_grad_(True))

    def f(x, m, *b):
        return dora_ext.dora_linear(x, W, b[0] if b else None, A, B, m, s)

    assert torch.autograd.gradcheck(f, tuple(args), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("d_in, d_out, r, batch", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt_id)
def test_gradients_match_reference(dtype, d_in, d_out, r, batch, bias):
    inp = make_inputs(d_in, d_out, r, batch, dtype, bias=bias, requires_grad=True)
    y = dora_ext.dora_linear(**inp)
    assert y.requires_grad
    got, want = _grads_and_ref_grads(inp, y)
    for k, g in got.items():
        assert g.shape == inp[k].shape, k
        assert g.dtype == inp[k].dtype, k
        assert rel_err(g, want[k]) < GRAD_TOL[dtype], f"grad of {k}: {rel_err(g, want[k]):.3g}"


def test_gradients_only_for_requested_inputs():
    inp = make_inputs(16, 8, 2, (5,), torch.float32)
    inp["lora_B"].requires_grad_(True)
    y = dora_ext.dora_linear(**inp)
    (gB,) = torch.autograd.grad(y.sum(), [inp["lora_B"]])
    ref_inp = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
    ref_inp["lora_B"].requires_grad_(True)
    (wB,) = torch.autograd.grad(ref_dora_linear_for(ref_inp).sum(), [ref_inp["lora_B"]])
    assert rel_err(gB, wB) < 1e-5
    for k in ("x", "lora_A", "magnitude", "bias"):
        assert inp[k].grad is None


def test_lora_gradients_exclude_the_norm_path():
    """A/B gradients equal the detached-norm reference and differ from the attached one."""
    inp = make_inputs(12, 8, 3, (6,), torch.float64, requires_grad=True)
    y = dora_ext.dora_linear(**inp)
    gy = torch.randn_like(y)
    gA, gB = torch.autograd.grad(y, [inp["lora_A"], inp["lora_B"]], gy)

    ref = ref_dora_linear_for(inp)
    wA, wB = torch.autograd.grad(ref, [inp["lora_A"], inp["lora_B"]], gy)
    assert rel_err(gA, wA) < 1e-12
    assert rel_err(gB, wB) < 1e-12

    attached = ref_dora_linear_for(inp, attach_norm=True)
    aA, aB = torch.autograd.grad(attached, [inp["lora_A"], inp["lora_B"]], gy)
    # Same forward value, different gradient: the test above can tell them apart.
    assert rel_err(attached, ref) < 1e-14
    assert rel_err(gA, aA) > 1e-3 or rel_err(gB, aB) > 1e-3


def test_gradients_accumulate_over_two_calls():
    inp = make_inputs(14, 6, 2, (3,), torch.float64, requires_grad=True)
    dora_ext.dora_linear(**inp).sum().backward()
    first = {k: inp[k].grad.clone() for k in GRAD_KEYS}
    dora_ext.dora_linear(**inp).sum().backward()
    for k in GRAD_KEYS:
        torch.testing.assert_close(inp[k].grad, 2 * first[k], rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------
# compose_delta


def _compose_inputs(dtype, batch, d_in=40, d_out=24, r=4, g_noise=0.3, lora_std=None, mag_dtype=None):
    """base = x W^T and lora = (x A^T) B^T in the input dtype, norm from row_norm."""
    mag_dtype = mag_dtype or (torch.float32 if dtype in LOW else dtype)
    inp = make_inputs(d_in, d_out, r, batch, dtype, mag_dtype=mag_dtype, g_noise=g_noise)
    if lora_std is not None:
        inp["lora_B"] = (torch.randn(d_out, r, dtype=torch.float64) * lora_std).to(dtype)
        n = ref_row_norm(inp["weight"], inp["lora_A"], inp["lora_B"], inp["scale"])
        inp["magnitude"] = (n * (1 + g_noise * torch.randn(d_out, dtype=torch.float64))).to(mag_dtype)
    x, W, A, B, s = inp["x"], inp["weight"], inp["lora_A"], inp["lora_B"], inp["scale"]
    base = x @ W.t()
    lora = (x @ A.t()) @ B.t()
    norm = dora_ext.row_norm(W, A, B, s)
    return base, lora, inp["magnitude"], norm, s


@pytest.mark.parametrize("batch", [(9,), (2, 5), (0,)], ids=["2d", "3d", "empty"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt_id)
def test_compose_delta_matches_reference(dtype, batch):
    base, lora, m, n, s = _compose_inputs(dtype, batch)
    assert n.dtype == _acc_dtype(dtype)
    out = dora_ext.compose_delta(base, lora, m, n, s)
    assert out.dtype == dtype
    assert out.shape == base.shape
    assert rel_err(out, ref_compose_delta(base, lora, m, n, s)) < FWD_TOL[dtype]
    torch.testing.assert_close(torch.ops.dora_ext.compose_delta(base, lora, m, n, s), out, rtol=0, atol=0)


@pytest.mark.parametrize(
    "dtype, lora_std",
    [
        (torch.float32, 1e-4),  # lora small: the delta is ~1e-4 of base, cancellation would show
        (torch.float64, 1e-4),
        (torch.bfloat16, 1e-6),  # lora negligible: the delta is almost all (g - 1) * base
        (torch.float16, 1e-6),
    ],
    ids=["fp32", "fp64", "bf16", "fp16"],
)
def test_compose_delta_stable_near_g_equal_one(dtype, lora_std):
    base, lora, m, n, s = _compose_inputs(dtype, (32,), g_noise=1e-4, lora_std=lora_std)
    g = m.double() / n.double()
    assert 1e-7 < (g - 1).abs().max().item() < 1e-3
    ref = ref_compose_delta(base, lora, m, n, s)
    out = dora_ext.compose_delta(base, lora, m, n, s)
    err = rel_err(out, ref)  # relative to ||delta||, not to ||base||
    assert err < FWD_TOL[dtype], f"relative error of the delta {err:.3g}"
    # Sanity: the naive, cancelling formula in the same precision fails this bound, so the
    # test does measure the stable form (for low precision: g rounded to the input dtype).
    if dtype == torch.float32:
        naive = g.float() * (s * lora + base) - base
    elif dtype in LOW:
        gl = (m.float() / n.float()).to(dtype)
        naive = (gl - 1) * base + gl * s * lora
    else:
        return
    assert rel_err(naive, ref) > FWD_TOL[dtype]


def test_compose_delta_zero_norm_row_is_finite():
    inp = make_inputs(16, 6, 2, (4,), torch.float32)
    inp["weight"][1] = 0
    inp["lora_B"][1] = 0
    x, W, A, B, s = inp["x"], inp["weight"], inp["lora_A"], inp["lora_B"], inp["scale"]
    n = dora_ext.row_norm(W, A, B, s)
    out = dora_ext.compose_delta(x @ W.t(), (x @ A.t()) @ B.t(), inp["magnitude"], n, s)
    assert torch.isfinite(out).all()
    assert torch.all(out[:, 1] == 0)


@pytest.mark.parametrize("batch", [(4,), (2, 3)], ids=["2d", "3d"])
def test_gradcheck_compose_delta(batch):
    base, lora, m, n, s = _compose_inputs(torch.float64, batch, d_in=6, d_out=5, r=2)
    base.requires_grad_(True)
    lora.requires_grad_(True)
    m.requires_grad_(True)
    n = n.detach()

    def f(base, lora, m):
        return dora_ext.compose_delta(base, lora, m, n, s)

    assert torch.autograd.gradcheck(f, (base, lora, m), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dt_id)
def test_compose_delta_gradients_match_reference(dtype):
    base, lora, m, n, s = _compose_inputs(dtype, (2, 7))
    for t in (base, lora, m):
        t.requires_grad_(True)
    out = dora_ext.compose_delta(base, lora, m, n, s)
    gy = torch.randn(out.shape, dtype=torch.float64).to(dtype)
    got = torch.autograd.grad(out, [base, lora, m], gy)
    want = torch.autograd.grad(ref_compose_delta(base, lora, m, n, s), [base, lora, m], gy.double())
    for name, a, b, t in zip(("base", "lora", "magnitude"), got, want, (base, lora, m)):
        assert a.dtype == t.dtype and a.shape == t.shape, name
        assert rel_err(a, b) < FWD_TOL[dtype], name


@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float16], ids=_dt_id)
def test_compose_delta_16bit_base_with_float32_lora(any_device, base_dtype):
    """compose_delta's promotion rule (PEFT's default adapters): a 16-bit base with a float32 lora
    gives a float32 delta of exactly those values; each gradient comes in its input's dtype."""
    base, lora, m, n, s = _compose_inputs(torch.float32, (3, 7))
    base, lora, m, n = base.to(any_device, base_dtype), lora.to(any_device), m.to(any_device), n.to(any_device)
    for t in (base, lora, m):
        t.requires_grad_(True)
    out = dora_ext.compose_delta(base, lora, m, n, s)
    assert out.dtype == torch.float32 and out.shape == base.shape
    ref = ref_compose_delta(base, lora, m, n, s)
    assert rel_err(out, ref) < FWD_TOL[torch.float32]
    gy = torch.randn(out.shape, dtype=torch.float64)
    got = torch.autograd.grad(out, [base, lora, m], gy.to(out))
    want = torch.autograd.grad(ref, [base, lora, m], gy)
    for name, a, b, t in zip(("base", "lora", "magnitude"), got, want, (base, lora, m)):
        assert a.dtype == t.dtype and a.shape == t.shape, name
        assert rel_err(a, b) < FWD_TOL[t.dtype], name


def test_compose_delta_norm_is_not_differentiated():
    """Even a norm that requires grad gets none: compose_delta treats it as a constant."""
    base, lora, m, n, s = _compose_inputs(torch.float64, (5,))
    for t in (base, lora, m):
        t.requires_grad_(True)
    n = n.clone().requires_grad_(True)
    out = dora_ext.compose_delta(base, lora, m, n, s)
    gy = torch.randn_like(out)
    gb, gl, gm, gn = torch.autograd.grad(out, [base, lora, m, n], gy, allow_unused=True)
    assert gn is None or torch.all(gn == 0)
    want = torch.autograd.grad(ref_compose_delta(base, lora, m, n, s), [base, lora, m], gy)
    for a, b in zip((gb, gl, gm), want):
        assert rel_err(a, b) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_row_norm_sq_of_column_shards_adds_up(dtype):
    """row_norm_sq is the squared norm before the clamp, and its values over a partition of d_in
    (columns of W and A, all of B) sum to the whole weight's: what dora_ext.distributed all-reduces."""
    inp = make_inputs(37, 11, 3, (1,), dtype)
    W, A, B, s = inp["weight"], inp["lora_A"], inp["lora_B"], inp["scale"]
    with torch.no_grad():
        W[4].zero_()
        B[4].zero_()  # a zero row: 0 here, unclamped (the norm clamps it)
    ref = (W.double() + s * B.double() @ A.double()).square().sum(1)
    whole = torch.ops.dora_ext.row_norm_sq(W, A, B, s)
    assert whole.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert whole[4].item() == 0.0
    shards = [(0, 10), (10, 29), (29, 37)]
    summed = sum(torch.ops.dora_ext.row_norm_sq(W[:, a:b], A[:, a:b], B, s) for a, b in shards)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert rel_err(whole, ref) < tol and rel_err(summed, ref) < tol
    torch.testing.assert_close(dora_ext.row_norm(W, A, B, s).double(), ref.clamp_min(1e-12).sqrt(),
                               rtol=tol, atol=0)

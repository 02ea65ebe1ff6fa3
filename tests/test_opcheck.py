"""torch.library.opcheck for every dora_ext op on CPU sample inputs.

opcheck checks that the schema (mutation/aliasing), the fake kernel registered
in dora_ext/ops.py, the C++ autograd registration and the real kernels agree,
including under AOT dispatch with dynamic shapes. Public ops are checked with
and without requires_grad; the internal forward/backward ops are checked
without (autograd is registered on the public ops only).
"""
from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

import dora_ext  # noqa: F401  (loads the library: registers torch.ops.dora_ext and the fake kernels)

from reference import make_inputs

OPS = torch.ops.dora_ext

# bfloat16 x, weight and bias with float32 lora_A, lora_B and magnitude (PEFT's default mix)
FP32_ADAPTERS = "bf16 with fp32 adapters"

# (d_in, d_out, r, batch_shape, bias)
LINEAR_SHAPES = [
    pytest.param(16, 12, 4, (5,), True, id="2d"),
    pytest.param(16, 12, 4, (5,), False, id="2d-nobias"),
    pytest.param(13, 9, 1, (2, 3), True, id="3d-r1"),
    pytest.param(13, 9, 2, (2, 3), False, id="3d-nobias"),
    pytest.param(8, 5, 2, (0,), True, id="empty"),
]
DTYPES = [
    pytest.param(torch.float32, None, id="fp32"),
    pytest.param(torch.float64, None, id="fp64"),
    pytest.param(torch.bfloat16, torch.float32, id="bf16-fp32mag"),
]
LINEAR_DTYPES = DTYPES + [pytest.param(FP32_ADAPTERS, None, id="bf16-fp32adapters")]


def _linear_inputs(d_in, d_out, r, batch, dtype, mag_dtype, bias, requires_grad=False):
    if dtype == FP32_ADAPTERS:
        dtype, mag_dtype, adapter_dtype = torch.bfloat16, torch.float32, torch.float32
    else:
        adapter_dtype = None
    return make_inputs(d_in, d_out, r, batch, dtype, bias=bias, requires_grad=requires_grad, mag_dtype=mag_dtype,
                       adapter_dtype=adapter_dtype)


def _linear_args(inp):
    return (inp["x"], inp["weight"], inp["bias"], inp["lora_A"], inp["lora_B"], inp["magnitude"], inp["scale"])


# ---------------------------------------------------------------------------
# public ops


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("dtype, mag_dtype", LINEAR_DTYPES)
@pytest.mark.parametrize("d_in, d_out, r, batch, bias", LINEAR_SHAPES)
def test_opcheck_dora_linear(d_in, d_out, r, batch, bias, dtype, mag_dtype, requires_grad):
    inp = _linear_inputs(d_in, d_out, r, batch, dtype, mag_dtype, bias, requires_grad)
    opcheck(OPS.dora_linear.default, _linear_args(inp))


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("d_in, d_out, r", [(16, 12, 4), (13, 9, 1)])
def test_opcheck_row_norm(d_in, d_out, r, dtype, requires_grad):
    inp = make_inputs(d_in, d_out, r, (1,), dtype, requires_grad=requires_grad)
    opcheck(OPS.row_norm.default, (inp["weight"], inp["lora_A"], inp["lora_B"], inp["scale"]))


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_opcheck_row_norm_sq(dtype, requires_grad):
    inp = make_inputs(13, 9, 3, (1,), dtype, requires_grad=requires_grad)
    opcheck(OPS.row_norm_sq.default, (inp["weight"], inp["lora_A"], inp["lora_B"], inp["scale"]))


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_opcheck_row_norm_float32_adapters(w_dtype, requires_grad):
    """row_norm's promotion rule (16-bit weight, float32 adapters) through the fake kernel too."""
    inp = make_inputs(16, 12, 4, (1,), torch.float32, requires_grad=requires_grad)
    opcheck(OPS.row_norm.default, (inp["weight"].to(w_dtype), inp["lora_A"], inp["lora_B"], inp["scale"]))


def _compose_sample(dtype, batch, d_in=12, d_out=9, r=3, requires_grad=False, mag_dtype=None):
    inp = make_inputs(d_in, d_out, r, batch, dtype, mag_dtype=mag_dtype)
    x, W, A, B, s = inp["x"], inp["weight"], inp["lora_A"], inp["lora_B"], inp["scale"]
    base = x @ W.t()
    lora = (x @ A.t()) @ B.t()
    norm = OPS.row_norm(W, A, B, s)
    m = inp["magnitude"]
    if requires_grad:
        for t in (base, lora, m):
            t.requires_grad_(True)
    return base, lora, m, norm, s


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("dtype, mag_dtype", DTYPES)
@pytest.mark.parametrize("batch", [(5,), (2, 3), (0,)], ids=["2d", "3d", "empty"])
def test_opcheck_compose_delta(batch, dtype, mag_dtype, requires_grad):
    args = _compose_sample(dtype, batch, requires_grad=requires_grad, mag_dtype=mag_dtype)
    opcheck(OPS.compose_delta.default, args)


# ---------------------------------------------------------------------------
# internal ops (no requires_grad: they are the insides of the autograd functions)


@pytest.mark.parametrize("keep_z", [True, False], ids=["z", "noz"])
@pytest.mark.parametrize("dtype, mag_dtype", LINEAR_DTYPES)
@pytest.mark.parametrize("d_in, d_out, r, batch, bias", LINEAR_SHAPES)
def test_opcheck_dora_linear_forward(d_in, d_out, r, batch, bias, dtype, mag_dtype, keep_z):
    inp = _linear_inputs(d_in, d_out, r, batch, dtype, mag_dtype, bias)
    opcheck(OPS.dora_linear_forward.default, (*_linear_args(inp), keep_z))


MASKS = [
    pytest.param([True] * 5, id="all"),
    pytest.param([True, False, True, True, False], id="x-B-m"),
    pytest.param([False, True, False, False, True], id="A-bias"),
    pytest.param([False, False, False, True, False], id="m-only"),
]


# Every shape x dtype with all five gradients requested, and every partial mask on a
# 2-D and a 3-D no-bias sample in fp32 and bf16 (masked-out outputs are [0] tensors).
BACKWARD_CASES = [
    pytest.param(*shape.values, *dt.values, [True] * 5, id=f"{shape.id}-{dt.id}-all")
    for shape in LINEAR_SHAPES
    for dt in LINEAR_DTYPES
] + [
    pytest.param(*shape.values, *dt.values, *mask.values, id=f"{shape.id}-{dt.id}-{mask.id}")
    for shape in (LINEAR_SHAPES[0], LINEAR_SHAPES[3])
    for dt in (LINEAR_DTYPES[0], LINEAR_DTYPES[2], LINEAR_DTYPES[3])
    for mask in MASKS[1:]
]


# The magnitude gradient's source (the saved_activation option): a saved z, the output, or neither.
@pytest.mark.parametrize("source", ["z", "out", "recompute"])
@pytest.mark.parametrize("d_in, d_out, r, batch, bias, dtype, mag_dtype, mask", BACKWARD_CASES)
def test_opcheck_dora_linear_backward(d_in, d_out, r, batch, bias, dtype, mag_dtype, mask, source):
    inp = _linear_inputs(d_in, d_out, r, batch, dtype, mag_dtype, bias)
    out, z, h, norm = OPS.dora_linear_forward(*_linear_args(inp), source == "z")
    assert h.shape == (out.numel() // d_out, r)
    assert z.shape == ((out.numel() // d_out, d_out) if source == "z" else (0,))
    grad_out = torch.randn_like(out)
    args = (grad_out, inp["x"], inp["weight"], inp["bias"], inp["lora_A"], inp["lora_B"], inp["magnitude"], norm,
            z if source == "z" else None, out if source == "out" else None, h, inp["scale"], mask)
    opcheck(OPS.dora_linear_backward.default, args)
    grads = OPS.dora_linear_backward(*args)
    for wanted, g in zip(mask, grads):
        if not wanted:
            assert g.shape == (0,)


@pytest.mark.parametrize("mask", [[True] * 3, [True, False, True], [False, True, False], [False, False, True]],
                         ids=lambda m: "".join("1" if v else "0" for v in m))
@pytest.mark.parametrize("dtype, mag_dtype", DTYPES)
@pytest.mark.parametrize("batch", [(5,), (2, 3)], ids=["2d", "3d"])
def test_opcheck_compose_delta_backward(batch, dtype, mag_dtype, mask):
    base, lora, m, norm, s = _compose_sample(dtype, batch, mag_dtype=mag_dtype)
    grad_out = torch.randn_like(base)
    args = (grad_out, base, lora, m, norm, s, mask)
    opcheck(OPS.compose_delta_backward.default, args)
    grads = OPS.compose_delta_backward(*args)
    for wanted, g in zip(mask, grads):
        if not wanted:
            assert g.shape == (0,)


# ---------------------------------------------------------------------------
# introspection ops (strings and bools out, no tensors)

# test_aot_dispatch_dynamic is inapplicable here: it traces the op into an AOT graph and
# compares outputs with torch.testing.assert_close, which cannot compare str outputs
# (TypeError "No comparison pair was able to handle inputs of type <class 'str'>"), and a
# str-returning op can never be part of a compiled graph anyway. The other three checks run.
_INTROSPECTION_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.mark.parametrize("training", [False, True])
def test_opcheck_select_tier(training):
    inp = make_inputs(16, 12, 4, (2, 3), torch.float32)
    opcheck(OPS.select_tier.default, (inp["x"], inp["weight"], inp["lora_A"], training),
            test_utils=_INTROSPECTION_UTILS)


def test_opcheck_last_tier():
    opcheck(OPS.last_tier.default, (), test_utils=_INTROSPECTION_UTILS)


def _mixed_compose_sample(batch, requires_grad=False):
    """A bfloat16 base with a float32 lora (compose_delta's one mixed pair)."""
    base, lora, m, norm, s = _compose_sample(torch.float32, batch)
    base = base.bfloat16()
    if requires_grad:
        for t in (base, lora, m):
            t.requires_grad_(True)
    return base, lora, m, norm, s


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
def test_opcheck_compose_delta_bf16_base_float32_lora(requires_grad):
    opcheck(OPS.compose_delta.default, _mixed_compose_sample((2, 3), requires_grad))


@pytest.mark.parametrize("mask", [[True] * 3, [True, False, True], [False, True, False]],
                         ids=lambda m: "".join("1" if v else "0" for v in m))
def test_opcheck_compose_delta_backward_bf16_base_float32_lora(mask):
    base, lora, m, norm, s = _mixed_compose_sample((5,))
    grad_out = torch.randn(base.shape)  # the delta's dtype: float32
    opcheck(OPS.compose_delta_backward.default, (grad_out, base, lora, m, norm, s, mask))


# ---------------------------------------------------------------------------
# dora_linear_dropout: x_dropped in x's dtype, or float32 with float32 adapters on bf16 x (PEFT
# casts x to the adapter dtype before its dropout)


def _dropout_args(inp, requires_grad=False, dropped_dtype=None):
    x = inp["x"]
    x_dropped = torch.nn.functional.dropout(x.detach().to(dropped_dtype or x.dtype), p=0.4, training=True)
    if requires_grad:
        x_dropped.requires_grad_(True)
    return (x, x_dropped, inp["weight"], inp["bias"], inp["lora_A"], inp["lora_B"], inp["magnitude"], inp["scale"])


DROPOUT_DTYPES = LINEAR_DTYPES + [pytest.param(FP32_ADAPTERS, "fp32", id="bf16-fp32adapters-fp32dropped")]


def _dropout_inputs(d_in, d_out, r, batch, dtype, dropped, bias, requires_grad=False):
    inp = _linear_inputs(d_in, d_out, r, batch, dtype, None if dropped == "fp32" else dropped, bias, requires_grad)
    return inp, (torch.float32 if dropped == "fp32" else None)


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("dtype, dropped", DROPOUT_DTYPES)
@pytest.mark.parametrize("d_in, d_out, r, batch, bias", LINEAR_SHAPES)
def test_opcheck_dora_linear_dropout(d_in, d_out, r, batch, bias, dtype, dropped, requires_grad):
    inp, dropped_dtype = _dropout_inputs(d_in, d_out, r, batch, dtype, dropped, bias, requires_grad)
    opcheck(OPS.dora_linear_dropout.default, _dropout_args(inp, requires_grad, dropped_dtype))


@pytest.mark.parametrize("keep_z", [True, False], ids=["z", "noz"])
@pytest.mark.parametrize("dtype, dropped", DROPOUT_DTYPES)
@pytest.mark.parametrize("d_in, d_out, r, batch, bias", LINEAR_SHAPES)
def test_opcheck_dora_linear_dropout_forward(d_in, d_out, r, batch, bias, dtype, dropped, keep_z):
    inp, dropped_dtype = _dropout_inputs(d_in, d_out, r, batch, dtype, dropped, bias)
    opcheck(OPS.dora_linear_dropout_forward.default, (*_dropout_args(inp, dropped_dtype=dropped_dtype), keep_z))


@pytest.mark.parametrize("mask", [[True] * 6, [True, False, True, True, True, False], [False, True, False, False,
                                                                                     True, True],
                                  [False, False, False, False, True, False]],
                         ids=lambda m: "".join("1" if v else "0" for v in m))
@pytest.mark.parametrize("dtype, dropped", DROPOUT_DTYPES)
@pytest.mark.parametrize("d_in, d_out, r, batch, bias", [LINEAR_SHAPES[0], LINEAR_SHAPES[2]])
@pytest.mark.parametrize("keep_z", [True, False], ids=["z", "recompute"])
def test_opcheck_dora_linear_dropout_backward(d_in, d_out, r, batch, bias, dtype, dropped, mask, keep_z):
    inp, dropped_dtype = _dropout_inputs(d_in, d_out, r, batch, dtype, dropped, bias)
    x, x_dropped, weight, b, A, B, m, s = _dropout_args(inp, dropped_dtype=dropped_dtype)
    out, z_dropped, h, norm = OPS.dora_linear_dropout_forward(x, x_dropped, weight, b, A, B, m, s, keep_z)
    args = (torch.randn_like(out), x_dropped, weight, A, B, m, norm, z_dropped if keep_z else None, h, s, mask)
    opcheck(OPS.dora_linear_dropout_backward.default, args)
    for wanted, g in zip(mask, OPS.dora_linear_dropout_backward(*args)):
        if not wanted:
            assert g.shape == (0,)


# ---------------------------------------------------------------------------
# dora_linear_mixed (inference only: no requires_grad)


@pytest.mark.parametrize("dtype, mag_dtype", LINEAR_DTYPES)
@pytest.mark.parametrize("batch, index", [((4, 3), [0, -1, 1, 0]), ((5,), [1, 1, 0, -1, 1])], ids=["3d", "2d"])
def test_opcheck_dora_linear_mixed(batch, index, dtype, mag_dtype):
    first = _linear_inputs(16, 12, 4, batch, dtype, mag_dtype, True)
    second = _linear_inputs(16, 12, 2, batch, dtype, mag_dtype, True)
    args = (first["x"], first["weight"], first["bias"], [first["lora_A"], second["lora_A"]],
            [first["lora_B"], second["lora_B"]], [first["magnitude"], None], [first["scale"], 0.75],
            torch.tensor(index))
    opcheck(OPS.dora_linear_mixed.default, args)


# shared_adapter_stack (one new padded stack, which share_adapter_storage cuts into views)
@pytest.mark.parametrize("ranks", [[1], [4, 2, 7], [32, 3]], ids=["r1", "three", "quantum-edge"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_opcheck_shared_adapter_stack(ranks, dtype):
    inputs = [_linear_inputs(16, 12, r, (1,), dtype, None, False) for r in ranks]
    opcheck(OPS.shared_adapter_stack.default, ([i["lora_A"] for i in inputs], [i["lora_B"] for i in inputs]))

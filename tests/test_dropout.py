"""dora_linear_dropout: DoRA with LoRA dropout in one op, against PEFT's formula in float64.

    y = x W^T + bias + (g - 1) (x_d W^T) + g s (x_d A^T) B^T,   g = m / ||W + s B A||_row (detached)

x_d = dropout(x) comes from the caller, in x's dtype or (PEFT's default float32 adapters, which
PEFT applies its dropout to after casting x) in the adapters' dtype. Forward and every gradient
(x, x_d, A, B, m, bias) on CPU, CUDA eager and CUDA fused, odd shapes, r = 1, 3-D and
non-contiguous inputs, g close to 1, every dtype.
"""
from __future__ import annotations

import pytest
import torch

import dora_ext
from reference import BATCH_GRAD_TOL, FWD_TOL, GRAD_TOL, TIERS_TOL, make_inputs, ref_dora_linear_dropout, rel_err

P = 0.3


def _inputs(dtype, device, *, d_in=37, d_out=29, r=3, batch=(2, 7), bias=True, adapter_dtype=None,
            dropped_dtype=None, g_noise=0.3, seed=None):
    mag_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else None
    inp = make_inputs(d_in, d_out, r, batch, dtype, device, bias=bias, requires_grad=True, mag_dtype=mag_dtype,
                      adapter_dtype=adapter_dtype, g_noise=g_noise, seed=seed)
    x = inp["x"]
    # The dropped input as PEFT draws it: x cast to the adapter dtype, then dropout (kept rows scaled).
    x_dropped = torch.nn.functional.dropout(x.detach().to(dropped_dtype or x.dtype), p=P, training=True)
    inp["x_dropped"] = x_dropped.requires_grad_(True)
    return inp


def _call(inp):
    return dora_ext.dora_linear_dropout(inp["x"], inp["x_dropped"], inp["weight"], inp["bias"], inp["lora_A"],
                                        inp["lora_B"], inp["magnitude"], inp["scale"])


def _reference(inp):
    refs = {k: (v.detach().double().cpu().requires_grad_(v.requires_grad) if torch.is_tensor(v) else v)
            for k, v in inp.items()}
    y = ref_dora_linear_dropout(refs["x"], refs["x_dropped"], refs["weight"], refs["bias"], refs["lora_A"],
                                refs["lora_B"], refs["magnitude"], refs["scale"])
    return y, refs


def _terms_abs(refs):
    """|x W^T| + |bias| + |(g - 1) x_d W^T| + |g s x_d A^T B^T| in float64: the size of what the output
    adds up. The op rounds its two base GEMMs to x's dtype (as PEFT's base layer does), so its error is
    relative to these terms: where they cancel (one output of one token), to far more than the output."""
    with torch.no_grad():
        W, A, B = refs["weight"], refs["lora_A"], refs["lora_B"]
        n = (W + refs["scale"] * B @ A).norm(dim=1)
        g = refs["magnitude"] / n
        xd = refs["x_dropped"]
        out = (refs["x"] @ W.T).abs() + ((g - 1) * (xd @ W.T)).abs() + (g * refs["scale"] * ((xd @ A.T) @ B.T)).abs()
        return out + refs["bias"].abs() if refs["bias"] is not None else out


GRADS = ("x", "x_dropped", "lora_A", "lora_B", "magnitude", "bias")

CASES = [
    pytest.param(torch.float32, None, None, id="fp32"),
    pytest.param(torch.float64, None, None, id="fp64"),
    pytest.param(torch.bfloat16, None, None, id="bf16"),
    pytest.param(torch.float16, None, None, id="fp16"),
    pytest.param(torch.bfloat16, torch.float32, torch.float32, id="bf16-fp32adapters"),  # PEFT's default
    pytest.param(torch.float16, torch.float32, torch.float32, id="fp16-fp32adapters"),
    pytest.param(torch.bfloat16, torch.float32, None, id="bf16-fp32adapters-bf16dropped"),
]


def _check_against_reference(inp, dtype):
    if dtype == torch.float64 and dora_ext.get_options()["tier"] == "fused":
        dora_ext.set_options(tier="auto")  # no fused kernels for float64 (the fixture restores the option)
    for name in GRADS:
        if inp[name] is not None:
            inp[name].grad = None
    y = _call(inp)
    ref, refs = _reference(inp)
    assert y.dtype == inp["x"].dtype and y.shape == ref.shape
    err = (y.detach().cpu().double() - ref.detach()).norm() / _terms_abs(refs).norm()
    assert err < FWD_TOL[dtype], (err, rel_err(y, ref))
    gy = torch.randn_like(ref)
    y.backward(gy.to(device=y.device, dtype=y.dtype))
    ref.backward(gy)
    tol = BATCH_GRAD_TOL if inp["x"].numel() // inp["x"].shape[-1] > 8 else GRAD_TOL
    for name in GRADS:
        if inp[name] is None:
            continue
        got, want = inp[name].grad, refs[name].grad
        assert got is not None and got.dtype == inp[name].dtype, name
        assert rel_err(got, want) < tol[dtype], (name, rel_err(got, want))


# saved_activation: the op keeps z of the dropped input (output and z modes) or recomputes it.
@pytest.mark.parametrize("saved_activation", ["output", "recompute"])
@pytest.mark.parametrize("dtype, adapter_dtype, dropped_dtype", CASES)
def test_matches_peft_formula(any_device, dtype, adapter_dtype, dropped_dtype, saved_activation):
    inp = _inputs(dtype, any_device, adapter_dtype=adapter_dtype, dropped_dtype=dropped_dtype)
    with dora_ext.options(saved_activation=saved_activation):
        _check_against_reference(inp, dtype)


@pytest.mark.parametrize("shape", [dict(r=1, batch=(5,)), dict(d_in=8, d_out=1, r=2, batch=(1,)),
                                   dict(bias=False, batch=(3, 2, 4)), dict(g_noise=1e-4)],
                         ids=["r1", "d_out1-one-token", "nobias-4d", "g-near-1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_shapes(any_device, dtype, shape):
    _check_against_reference(_inputs(dtype, any_device, **shape), dtype)


def test_non_contiguous_inputs(any_device):
    inp = _inputs(torch.float32, any_device, batch=(6,))
    # x and x_d as column-strided views of wider buffers (every other column of a [T, 2 d_in]).
    for key in ("x", "x_dropped"):
        wide = torch.randn(6, 2 * inp[key].shape[-1], device=any_device, dtype=inp[key].dtype)
        wide[:, ::2] = inp[key].detach()
        inp[key] = wide[:, ::2].requires_grad_(True)
        assert not inp[key].is_contiguous()
    _check_against_reference(inp, torch.float32)


def test_equals_dora_linear_without_dropout(any_device):
    inp = _inputs(torch.float32, any_device)
    with torch.no_grad():
        same = dora_ext.dora_linear_dropout(inp["x"], inp["x"], inp["weight"], inp["bias"], inp["lora_A"],
                                            inp["lora_B"], inp["magnitude"], inp["scale"])
        plain = dora_ext.dora_linear(inp["x"], inp["weight"], inp["bias"], inp["lora_A"], inp["lora_B"],
                                     inp["magnitude"], inp["scale"])
    assert rel_err(same, plain) < 1e-6


def test_no_grad_call_matches_training_forward(any_device):
    inp = _inputs(torch.bfloat16, any_device, adapter_dtype=torch.float32, dropped_dtype=torch.float32)
    with torch.no_grad():
        y_eval = _call(inp)
    y_train = _call(inp)
    assert rel_err(y_eval, y_train.detach()) < 1e-6


def test_gradients_reach_the_dropout_input():
    """Through the layer's own dropout module: x's gradient sums its two paths (x itself and
    dropout(x)), as in PEFT."""
    inp = _inputs(torch.float64, "cpu", batch=(4,))
    x = inp["x"]
    torch.manual_seed(0)
    y = dora_ext.dora_linear_dropout(x, torch.nn.functional.dropout(x, P, True), inp["weight"], inp["bias"],
                                     inp["lora_A"], inp["lora_B"], inp["magnitude"], inp["scale"])
    y.sum().backward()
    torch.manual_seed(0)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = ref_dora_linear_dropout(x_ref, torch.nn.functional.dropout(x_ref, P, True), inp["weight"], inp["bias"],
                                  inp["lora_A"], inp["lora_B"], inp["magnitude"], inp["scale"])
    ref.sum().backward()
    assert rel_err(x.grad, x_ref.grad) < 1e-12


@pytest.mark.parametrize("bad, message", [
    (lambda inp: inp["x_dropped"][..., :-1], "x_dropped must have the shape of x"),
    (lambda inp: inp["x_dropped"].double(), "x_dropped must have the dtype of x"),
])
def test_bad_x_dropped_is_named(bad, message):
    inp = _inputs(torch.float32, "cpu")
    inp["x_dropped"] = bad(inp).detach()
    with pytest.raises(RuntimeError, match=message):
        _call(inp)
    # the fake kernel (tracing) says the same
    with pytest.raises(RuntimeError, match=message), torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = {k: (mode.from_tensor(v) if torch.is_tensor(v) else v) for k, v in inp.items()}
        _call(fake)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_x_dropped_on_another_device_is_named():
    inp = _inputs(torch.float32, "cuda")
    inp["x_dropped"] = inp["x_dropped"].detach().cpu()
    with pytest.raises(RuntimeError, match="x_dropped is on cpu"):
        _call(inp)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype, adapter_dtype, dropped_dtype", [CASES[2], CASES[4]])
def test_fused_tier_runs_and_matches_eager(dtype, adapter_dtype, dropped_dtype):
    """A training-size call: the fused tier serves it (one op, its passes fused) and agrees with eager."""
    inp = _inputs(dtype, "cuda", d_in=1024, d_out=768, r=16, batch=(2, 512), adapter_dtype=adapter_dtype,
                  dropped_dtype=dropped_dtype, seed=3)
    outs = {}
    for tier in ("fused", "eager"):
        with dora_ext.options(tier=tier):
            for name in GRADS:
                if inp[name] is not None:
                    inp[name].grad = None
            y = _call(inp)
            assert dora_ext.last_tier()[0] == ("fused_training" if tier == "fused" else "eager")
            y.backward(torch.ones_like(y))
            outs[tier] = [y.detach()] + [inp[n].grad.clone() for n in GRADS if inp[n] is not None]
    for a, b in zip(outs["fused"], outs["eager"]):
        assert rel_err(a, b) < TIERS_TOL[dtype]
    _check_against_reference(inp, dtype)

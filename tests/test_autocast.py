"""Autocast kernels of the ops (csrc/autocast.cpp): mixed-dtype inputs under torch.autocast.

Rules tested (documented in csrc/autocast.cpp):
- dora_linear: x, weight, bias, lora_A, lora_B cast to the autocast dtype; magnitude as it is;
  output in the autocast dtype; gradients come back in each input's own dtype.
- row_norm: inputs promoted to the widest of their dtypes, never narrowed (norm stays accurate).
- dora_linear_mixed: dora_linear's rule for every adapter (each row equals its adapter's output on
  the cast inputs; bit-equal to casting by hand).
- compose_delta: base and lora promoted to the wider of the two; the norm cast to match.
- float64 tensors are never cast; without autocast, mixed dtypes are still rejected.
"""
from __future__ import annotations

import pytest
import torch

import dora_ext
from reference import make_inputs, ref_compose_delta, ref_dora_linear, ref_row_norm, rel_err

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda,
                                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]),
]
# autocast dtypes per device: CPU autocast supports bf16 (and fp16 on recent torch); CUDA both
LOW = [torch.bfloat16, torch.float16]


def _autocast(device: str, dtype: torch.dtype):
    return torch.autocast(device, dtype=dtype)


def _mixed_inputs(device: str, low: torch.dtype, seed: int, d_in: int = 45, d_out: int = 37, r: int = 5):
    """fp32 x, bias, A, B, magnitude and a `low` base weight (PEFT's default mix under AMP)."""
    inp = make_inputs(d_in, d_out, r, (3, 7), dtype=torch.float32, device=device, seed=seed)
    inp["weight"] = inp["weight"].to(low)
    for k in ("x", "bias", "lora_A", "lora_B", "magnitude"):
        inp[k].requires_grad_(True)
    return inp


def _rounded(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """What the autocast kernel hands the op: ``t`` rounded to ``dtype``, as a float64 CPU leaf."""
    return None if t is None else t.detach().to(dtype).to("cpu", torch.float64).requires_grad_(t.requires_grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("low", LOW)
def test_dora_linear_mixed_dtypes_under_autocast(device, low):
    inp = _mixed_inputs(device, low, seed=int(torch.randint(0, 2**31, (1,))))
    with _autocast(device, low):
        y = dora_ext.dora_linear(**inp)
    assert y.dtype == low and y.device.type == device and y.shape == (3, 7, 37)

    # reference: float64 of exactly what autocast feeds the op (the inputs rounded to `low`)
    ref_in = {k: _rounded(inp[k], low) for k in ("x", "weight", "bias", "lora_A", "lora_B")}
    ref_in["magnitude"] = _rounded(inp["magnitude"], torch.float32)
    ref = ref_dora_linear(ref_in["x"], ref_in["weight"], ref_in["bias"], ref_in["lora_A"], ref_in["lora_B"],
                          ref_in["magnitude"], inp["scale"])
    assert rel_err(y, ref) < 1e-2

    gy = torch.randn(y.shape, dtype=torch.float64)
    y.backward(gy.to(device, y.dtype))
    ref.backward(gy.to(y.dtype).double())
    for k in ("x", "bias", "lora_A", "lora_B", "magnitude"):
        grad = inp[k].grad
        assert grad is not None and grad.dtype == torch.float32, k  # back in the input's own dtype
        assert rel_err(grad, ref_in[k].grad) < 1e-2, k
    assert inp["weight"].grad is None


@pytest.mark.parametrize("device", DEVICES)
def test_dora_linear_autocast_matches_explicit_casts(device):
    """The autocast kernel is exactly "cast the five tensors, keep the magnitude": bit-equal."""
    low = torch.bfloat16
    inp = _mixed_inputs(device, low, seed=11)
    with _autocast(device, low):
        y = dora_ext.dora_linear(**inp)
    cast = {k: (v.to(low) if k in ("x", "weight", "bias", "lora_A", "lora_B") else v) for k, v in inp.items()}
    torch.testing.assert_close(y, dora_ext.dora_linear(**cast), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_fp32_magnitude_does_not_promote_and_bf16_inputs_pass_through(device):
    inp = make_inputs(32, 24, 4, 6, dtype=torch.bfloat16, device=device, mag_dtype=torch.float32, seed=3)
    plain = dora_ext.dora_linear(**inp)
    with _autocast(device, torch.bfloat16):
        y = dora_ext.dora_linear(**inp)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, plain, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_float64_is_never_cast(device):
    inp = make_inputs(16, 12, 3, 5, dtype=torch.float64, device=device, seed=4)
    with _autocast(device, torch.bfloat16):
        y = dora_ext.dora_linear(**inp)
        n = dora_ext.row_norm(inp["weight"], inp["lora_A"], inp["lora_B"], inp["scale"])
    assert y.dtype == torch.float64 and n.dtype == torch.float64
    ref = ref_dora_linear(inp["x"], inp["weight"], inp["bias"], inp["lora_A"], inp["lora_B"], inp["magnitude"],
                          inp["scale"])
    assert rel_err(y, ref) < 1e-12


def _mixed_batch_inputs(device: str, low: torch.dtype):
    """PEFT's AMP mix for a mixed batch: fp32 x, bias and adapters (two DoRA, one LoRA), a `low`
    weight; rows with adapters 2, base, 0, 1."""
    from test_mixed import _adapters

    base = make_inputs(45, 37, 1, (4, 3), dtype=torch.float32, device=device, seed=21)
    adapters = _adapters(45, 37, [5, 1, 3], torch.float32, device, ["dora", "lora", "dora"], seed=22)
    return base["x"], base["weight"].to(low), base["bias"], adapters, torch.tensor([2, -1, 0, 1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("low", LOW)
def test_dora_linear_mixed_under_autocast(device, low):
    """Every row equals its adapter's output (float64) on what autocast feeds the op: x, weight,
    bias, A and B rounded to `low`, the magnitudes as they are."""
    from test_mixed import _assert_rows, _run

    x, weight, bias, adapters, index = _mixed_batch_inputs(device, low)
    with torch.no_grad(), _autocast(device, low):
        y = _run(x, weight, bias, adapters, index)
    assert y.dtype == low
    rounded = [dict(a, A=a["A"].to(low), B=a["B"].to(low)) for a in adapters]
    _assert_rows(y, x.to(low), weight, bias.to(low), rounded, index, low)


@pytest.mark.parametrize("device", DEVICES)
def test_dora_linear_mixed_autocast_matches_explicit_casts(device):
    from test_mixed import _run

    low = torch.bfloat16
    x, weight, bias, adapters, index = _mixed_batch_inputs(device, low)
    with torch.no_grad():
        with _autocast(device, low):
            y = _run(x, weight, bias, adapters, index)
        cast = [dict(a, A=a["A"].to(low), B=a["B"].to(low)) for a in adapters]
        expected = _run(x.to(low), weight, bias.to(low), cast, index)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes_are_rejected_without_autocast(device):
    inp = _mixed_inputs(device, torch.bfloat16, seed=5)
    with pytest.raises(RuntimeError, match="weight has dtype"):
        dora_ext.dora_linear(**inp)


@pytest.mark.parametrize("device", DEVICES)
def test_row_norm_under_autocast_keeps_its_accuracy(device):
    inp = make_inputs(200, 48, 6, 1, dtype=torch.float32, device=device, seed=6)
    W, A, B, s = inp["weight"], inp["lora_A"], inp["lora_B"], inp["scale"]
    with _autocast(device, torch.bfloat16):
        n_fp32 = dora_ext.row_norm(W, A, B, s)                 # fp32 inputs: not narrowed
        n_mixed = dora_ext.row_norm(W.to(torch.bfloat16), A, B, s)  # PEFT's mix: computed in fp32
        n_low = dora_ext.row_norm(W.bfloat16(), A.bfloat16(), B.bfloat16(), s)
    assert n_fp32.dtype == n_mixed.dtype == n_low.dtype == torch.float32
    assert rel_err(n_fp32, ref_row_norm(W, A, B, s)) < 1e-5
    torch.testing.assert_close(n_fp32, dora_ext.row_norm(W, A, B, s), rtol=0, atol=0)
    assert rel_err(n_mixed, ref_row_norm(W.to(torch.bfloat16), A, B, s)) < 1e-5
    assert rel_err(n_low, ref_row_norm(W.bfloat16(), A.bfloat16(), B.bfloat16(), s)) < 1e-4
    # narrowing the fp32 weights first (what a "cast to the autocast dtype" rule would do) is
    # measurably worse than the accurate norm: the test can tell the two rules apart
    assert rel_err(n_low, ref_row_norm(W, A, B, s)) > 2 * rel_err(n_fp32, ref_row_norm(W, A, B, s))


@pytest.mark.parametrize("device", DEVICES)
def test_compose_delta_under_autocast(device):
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(5, 9, 20, generator=gen).to(device)
    lora = torch.randn(5, 9, 20, generator=gen).to(device)
    n = (torch.rand(20, generator=gen) + 0.5).to(device)
    m = (n.cpu() * (1 + 0.2 * torch.randn(20, generator=gen))).to(device)
    with _autocast(device, torch.bfloat16):
        same = dora_ext.compose_delta(base.bfloat16(), lora.bfloat16(), m, n, 0.7)
        mixed = dora_ext.compose_delta(base.bfloat16(), lora, m, n.double(), 0.7)  # float64 norm is cast too
    assert same.dtype == torch.bfloat16
    assert mixed.dtype == torch.float32
    assert rel_err(same, ref_compose_delta(base.bfloat16(), lora.bfloat16(), m, n, 0.7)) < 1e-2
    assert rel_err(mixed, ref_compose_delta(base.bfloat16(), lora, m, n, 0.7)) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_under_autocast(device):
    inp = _mixed_inputs(device, torch.bfloat16, seed=8)

    def f(x, weight, bias, lora_A, lora_B, magnitude):
        with torch.autocast(device, dtype=torch.bfloat16):
            return dora_ext.dora_linear(x, weight, bias, lora_A, lora_B, magnitude, inp["scale"])

    args = [inp[k] for k in ("x", "weight", "bias", "lora_A", "lora_B", "magnitude")]
    eager = f(*args)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    assert compiled.dtype == torch.bfloat16
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)

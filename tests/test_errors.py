"""Argument validation, the frozen-weight rule, DORA_EXT_TIER and tier introspection on the CPU.

Every bad argument must raise a RuntimeError whose message names the argument and
shows what was expected next to what was given; each rule has its own test so a
failure points at one rule.
"""
from __future__ import annotations

import json
import re
import textwrap

import pytest
import torch

import dora_ext
from reference import make_inputs
from fresh_process import run_python

OPS = torch.ops.dora_ext
D_IN, D_OUT, R, T = 12, 7, 3, 5


@pytest.fixture
def inp():
    return make_inputs(D_IN, D_OUT, R, (T,), torch.float32)


def _linear(inp, **over):
    a = dict(inp, **over)
    return dora_ext.dora_linear(a["x"], a["weight"], a["bias"], a["lora_A"], a["lora_B"], a["magnitude"], a["scale"])


def _norm(inp, **over):
    a = dict(inp, **over)
    return dora_ext.row_norm(a["weight"], a["lora_A"], a["lora_B"], a["scale"])


def _compose_args(inp, dtype=torch.float32):
    x, W, A, B = (inp[k].to(dtype) for k in ("x", "weight", "lora_A", "lora_B"))
    base = x @ W.t()
    lora = (x @ A.t()) @ B.t()
    norm = dora_ext.row_norm(W, A, B, inp["scale"])
    return dict(base=base, lora=lora, magnitude=inp["magnitude"], norm=norm, scale=inp["scale"])


def _compose(c, **over):
    a = dict(c, **over)
    return dora_ext.compose_delta(a["base"], a["lora"], a["magnitude"], a["norm"], a["scale"])


def _shape(*dims) -> str:
    """Regex for a shape printed as [a, b] or (a, b) or torch.Size([a, b])."""
    return r"[\[(]" + r",\s*".join(str(d) for d in dims) + r"[\])]"


# ---------------------------------------------------------------------------
# dora_linear: x


def test_x_zero_dim(inp):
    with pytest.raises(RuntimeError, match=r"\bx\b.*(0-D|dimension)"):
        _linear(inp, x=torch.tensor(1.0))


def test_x_wrong_last_dim(inp):
    with pytest.raises(RuntimeError, match=rf"\bx\b.*{D_IN + 1}.*{D_IN}"):
        _linear(inp, x=torch.randn(T, D_IN + 1))


def test_x_integer_dtype(inp):
    with pytest.raises(RuntimeError, match=r"\bx\b.*(Int|int32)"):
        _linear(inp, x=torch.ones(T, D_IN, dtype=torch.int32))


# ---------------------------------------------------------------------------
# dora_linear: weight


def test_weight_not_2d(inp):
    with pytest.raises(RuntimeError, match=r"weight.*2-D.*" + _shape(D_OUT * D_IN)):
        _linear(inp, weight=inp["weight"].reshape(-1))


def test_weight_dtype_differs_from_x(inp):
    # Only the weight is half here; the message may phrase it as another tensor not
    # matching the weight, but it must name the weight and show both dtypes.
    with pytest.raises(RuntimeError, match=r"weight") as e:
        _linear(inp, weight=inp["weight"].half())
    assert re.search(r"Half|float16", str(e.value)) and re.search(r"Float|float32", str(e.value)), str(e.value)


def test_weight_requires_grad_is_rejected(inp):
    W = inp["weight"].clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"(?i)frozen"):
        _linear(inp, weight=W)
    # also when the adapter parameters train (the usual mistake)
    for k in ("x", "lora_A", "lora_B", "magnitude"):
        inp[k].requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"(?i)weight.*frozen|frozen.*weight"):
        _linear(inp, weight=W)


def test_weight_requires_grad_allowed_without_grad_mode(inp):
    W = inp["weight"].clone().requires_grad_(True)
    with torch.no_grad():
        y = _linear(inp, weight=W)
    torch.testing.assert_close(y, _linear(inp))


# ---------------------------------------------------------------------------
# dora_linear / row_norm: lora_A, lora_B, rank


@pytest.mark.parametrize("op", ["dora_linear", "row_norm"])
def test_lora_A_wrong_d_in(inp, op):
    f = _linear if op == "dora_linear" else _norm
    with pytest.raises(RuntimeError, match=r"lora_A.*" + _shape(R, D_IN) + r".*" + _shape(R, D_IN - 1)):
        f(inp, lora_A=torch.randn(R, D_IN - 1))


@pytest.mark.parametrize("op", ["dora_linear", "row_norm"])
def test_lora_A_not_2d(inp, op):
    f = _linear if op == "dora_linear" else _norm
    with pytest.raises(RuntimeError, match=r"lora_A.*2-D"):
        f(inp, lora_A=torch.randn(1, R, D_IN))


@pytest.mark.parametrize("op", ["dora_linear", "row_norm"])
def test_lora_A_dtype(inp, op):
    f = _linear if op == "dora_linear" else _norm
    with pytest.raises(RuntimeError, match=r"lora_A.*(BFloat16|bfloat16).*(Float|float32)"):
        f(inp, lora_A=inp["lora_A"].bfloat16())


@pytest.mark.parametrize("op", ["dora_linear", "row_norm"])
def test_float32_adapters_on_a_bf16_weight(op):
    """Both ops take float32 lora_A and lora_B with a 16-bit weight (PEFT's default adapters; both
    of them float32, nothing wider)."""
    a = make_inputs(D_IN, D_OUT, R, (T,), torch.bfloat16)
    W, A, B, s = a["weight"], a["lora_A"].float(), a["lora_B"].float(), a["scale"]
    if op == "dora_linear":
        call = lambda A, B: dora_ext.dora_linear(**dict(a, lora_A=A, lora_B=B))  # noqa: E731
        assert call(A, B).dtype == torch.bfloat16
    else:
        call = lambda A, B: dora_ext.row_norm(W, A, B, s)  # noqa: E731
        assert call(A, B).shape == (D_OUT,)
    with pytest.raises(RuntimeError,
                       match=r"lora_B has dtype (BFloat16|bfloat16) but lora_A has dtype (Float|float32)"):
        call(A, B.bfloat16())
    with pytest.raises(RuntimeError, match=r"lora_A has dtype (Double|float64) but weight has dtype"):
        call(A.double(), B.double())


@pytest.mark.parametrize("op", ["dora_linear", "row_norm"])
def test_lora_B_wrong_d_out(inp, op):
    f = _linear if op == "dora_linear" else _norm
    with pytest.raises(RuntimeError, match=r"lora_B.*" + _shape(D_OUT, R) + r".*" + _shape(D_OUT + 2, R)):
        f(inp, lora_B=torch.randn(D_OUT + 2, R))


@pytest.mark.parametrize("op", ["dora_linear", "row_norm"])
def test_lora_B_wrong_rank(inp, op):
    f = _linear if op == "dora_linear" else _norm
    with pytest.raises(RuntimeError, match=r"lora_B.*" + _shape(D_OUT, R) + r".*" + _shape(D_OUT, R + 1)):
        f(inp, lora_B=torch.randn(D_OUT, R + 1))


@pytest.mark.parametrize("op", ["dora_linear", "row_norm"])
def test_lora_B_not_2d(inp, op):
    f = _linear if op == "dora_linear" else _norm
    with pytest.raises(RuntimeError, match=r"lora_B.*2-D"):
        f(inp, lora_B=torch.randn(D_OUT * R))


@pytest.mark.parametrize("op", ["dora_linear", "row_norm"])
def test_lora_B_dtype(inp, op):
    f = _linear if op == "dora_linear" else _norm
    with pytest.raises(RuntimeError, match=r"lora_B.*(Double|float64).*(Float|float32)"):
        f(inp, lora_B=inp["lora_B"].double())


@pytest.mark.parametrize("op", ["dora_linear", "row_norm"])
def test_rank_zero_is_rejected(inp, op):
    f = _linear if op == "dora_linear" else _norm
    with pytest.raises(RuntimeError, match=r"lora_A.*(rank|r >= 1|\br\b).*" + _shape(0, D_IN)
                       + r"|lora_A.*" + _shape(0, D_IN) + r".*rank"):
        f(inp, lora_A=torch.randn(0, D_IN), lora_B=torch.randn(D_OUT, 0))


@pytest.mark.parametrize("op", ["dora_linear", "row_norm"])
@pytest.mark.parametrize("which", ["d_out", "d_in"])
def test_zero_sized_weight_is_rejected(inp, op, which):
    # A layer with no outputs or no inputs has no row norm; the backward could not
    # even reshape its activations. Rejected by name, before any computation.
    d_out, d_in = (0, D_IN) if which == "d_out" else (D_OUT, 0)
    over = dict(weight=torch.randn(d_out, d_in), lora_A=torch.randn(R, d_in), lora_B=torch.randn(d_out, R),
                magnitude=torch.rand(d_out), bias=torch.randn(d_out), x=torch.randn(T, d_in))
    f = _linear if op == "dora_linear" else _norm
    with pytest.raises(RuntimeError, match=r"weight.*d_out >= 1 and d_in >= 1.*" + _shape(d_out, d_in)):
        f(inp, **over)


def test_row_norm_weight_not_float(inp):
    with pytest.raises(RuntimeError, match=r"weight.*(Long|int64)"):
        _norm(inp, weight=torch.ones(D_OUT, D_IN, dtype=torch.int64),
              lora_A=torch.ones(R, D_IN, dtype=torch.int64), lora_B=torch.ones(D_OUT, R, dtype=torch.int64))


# ---------------------------------------------------------------------------
# dora_linear: magnitude, bias


def test_magnitude_wrong_length(inp):
    with pytest.raises(RuntimeError, match=r"magnitude.*" + _shape(D_OUT) + r".*" + _shape(D_OUT + 1)):
        _linear(inp, magnitude=torch.rand(D_OUT + 1))


def test_magnitude_not_1d(inp):
    with pytest.raises(RuntimeError, match=r"magnitude.*1-D"):
        _linear(inp, magnitude=torch.rand(1, D_OUT))


def test_magnitude_integer_dtype(inp):
    with pytest.raises(RuntimeError, match=r"magnitude.*(Int|int32)"):
        _linear(inp, magnitude=torch.ones(D_OUT, dtype=torch.int32))


def test_magnitude_other_float_dtype_is_allowed(inp):
    y = _linear(inp, magnitude=inp["magnitude"].double())
    assert y.dtype == torch.float32


def test_bias_wrong_length(inp):
    with pytest.raises(RuntimeError, match=r"bias.*" + _shape(D_OUT) + r".*" + _shape(D_OUT - 1)):
        _linear(inp, bias=torch.randn(D_OUT - 1))


def test_bias_not_1d(inp):
    with pytest.raises(RuntimeError, match=r"bias.*1-D"):
        _linear(inp, bias=torch.randn(1, D_OUT))


def test_bias_dtype(inp):
    with pytest.raises(RuntimeError, match=r"bias.*(BFloat16|bfloat16).*\bx\b.*(Float|float32)"):
        _linear(inp, bias=inp["bias"].bfloat16())


def test_mixed_dtypes_rejected_for_bf16_x():
    a = make_inputs(D_IN, D_OUT, R, (T,), torch.bfloat16)
    for k in ("weight", "lora_A", "lora_B", "bias"):
        bad = dict(a, **{k: a[k].float()})
        with pytest.raises(RuntimeError, match=k):
            dora_ext.dora_linear(**bad)


def test_empty_batch_is_not_an_error(inp):
    y = _linear(inp, x=torch.randn(0, D_IN))
    assert y.shape == (0, D_OUT)


# ---------------------------------------------------------------------------
# compose_delta


def test_compose_base_zero_dim(inp):
    c = _compose_args(inp)
    with pytest.raises(RuntimeError, match=r"\bbase\b"):
        _compose(c, base=torch.tensor(1.0), lora=torch.tensor(1.0))


def test_compose_base_integer(inp):
    c = _compose_args(inp)
    with pytest.raises(RuntimeError, match=r"\bbase\b.*(Int|int32)"):
        _compose(c, base=c["base"].int(), lora=c["lora"].int())


def test_compose_lora_shape(inp):
    c = _compose_args(inp)
    with pytest.raises(RuntimeError, match=r"\blora\b.*" + _shape(T, D_OUT) + r".*" + _shape(T + 1, D_OUT)):
        _compose(c, lora=torch.randn(T + 1, D_OUT))


def test_compose_lora_dtype(inp):
    c = _compose_args(inp)
    with pytest.raises(RuntimeError, match=r"\blora\b.*(Half|float16).*\bbase\b.*(Float|float32)"):
        _compose(c, lora=c["lora"].half())


def test_compose_float32_lora_only_with_a_16bit_base(inp):
    """The one mixed pair compose_delta takes is a float16/bfloat16 base with a float32 lora."""
    c = _compose_args(inp)
    assert _compose(c, base=c["base"].bfloat16()).dtype == torch.float32
    with pytest.raises(RuntimeError, match=r"\blora\b.*(Double|float64).*\bbase\b.*(BFloat16|bfloat16)"):
        _compose(c, base=c["base"].bfloat16(), lora=c["lora"].double())
    with pytest.raises(RuntimeError, match=r"\blora\b.*(BFloat16|bfloat16).*\bbase\b.*(Half|float16)"):
        _compose(c, base=c["base"].half(), lora=c["lora"].bfloat16())


def test_compose_magnitude_length(inp):
    c = _compose_args(inp)
    with pytest.raises(RuntimeError, match=r"magnitude.*" + _shape(D_OUT) + r".*" + _shape(D_OUT + 3)):
        _compose(c, magnitude=torch.rand(D_OUT + 3))


def test_compose_norm_length(inp):
    c = _compose_args(inp)
    with pytest.raises(RuntimeError, match=r"\bnorm\b.*" + _shape(D_OUT) + r".*" + _shape(D_OUT - 2)):
        _compose(c, norm=torch.rand(D_OUT - 2))


@pytest.mark.parametrize(
    "base_dtype, norm_dtype",
    [
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16),
        (torch.float32, torch.float64),
        (torch.float64, torch.float32),
    ],
    ids=["bf16-bf16", "fp16-fp16", "fp32-fp64", "fp64-fp32"],
)
def test_compose_norm_dtype(inp, base_dtype, norm_dtype):
    c = _compose_args(inp, base_dtype)
    names = {torch.float32: "(Float|float32)", torch.float64: "(Double|float64)",
             torch.bfloat16: "(BFloat16|bfloat16)", torch.float16: "(Half|float16)"}
    expected = names[torch.float64 if base_dtype == torch.float64 else torch.float32]
    with pytest.raises(RuntimeError, match=rf"\bnorm\b.*{expected}.*{names[norm_dtype]}"):
        _compose(c, norm=c["norm"].to(norm_dtype))


def test_compose_zero_d_out_is_rejected(inp):
    c = _compose_args(inp)
    with pytest.raises(RuntimeError, match=r"\bbase\b.*d_out >= 1.*" + _shape(T, 0)):
        _compose(c, base=torch.randn(T, 0), lora=torch.randn(T, 0), magnitude=torch.rand(0), norm=torch.rand(0))


@pytest.mark.parametrize("batch", [(0,), (3, 0)], ids=str)
def test_compose_empty_batch_forward_and_backward(inp, batch):
    c = _compose_args(inp)
    base = torch.randn(*batch, D_OUT, requires_grad=True)
    lora = torch.randn(*batch, D_OUT, requires_grad=True)
    m = c["magnitude"].clone().requires_grad_(True)
    out = _compose(c, base=base, lora=lora, magnitude=m)
    assert out.shape == (*batch, D_OUT)
    out.sum().backward()
    assert base.grad.shape == base.shape and lora.grad.shape == lora.shape
    # No tokens: the magnitude gradient is a sum over nothing, exactly zero.
    assert m.grad.shape == (D_OUT,) and torch.all(m.grad == 0)


def test_compose_magnitude_other_float_dtype_is_allowed(inp):
    c = _compose_args(inp, torch.bfloat16)
    out = _compose(c, magnitude=c["magnitude"].float())
    assert out.dtype == torch.bfloat16


# ---------------------------------------------------------------------------
# devices (need a second real device: run on the GPU machine)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU for a second device")
@pytest.mark.parametrize("name", ["weight", "bias", "lora_A", "lora_B", "magnitude"])
def test_tensor_on_another_device(name):
    a = make_inputs(D_IN, D_OUT, R, (T,), torch.float32, device="cuda")
    a[name] = a[name].cpu()
    with pytest.raises(RuntimeError, match=rf"{name}.*(cpu|cuda)"):
        dora_ext.dora_linear(**a)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU for a second device")
def test_x_on_another_device():
    # x alone on the CPU: the CUDA kernel is chosen (other arguments are CUDA) and must
    # name x and both devices rather than fail inside a GEMM.
    a = make_inputs(D_IN, D_OUT, R, (T,), torch.float32, device="cuda")
    a["x"] = a["x"].cpu()
    with pytest.raises(RuntimeError, match=r"\bx is on cpu"):
        dora_ext.dora_linear(**a)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU for a second device")
@pytest.mark.parametrize("name", ["lora_A", "lora_B"])
def test_row_norm_tensor_on_another_device(name):
    a = make_inputs(D_IN, D_OUT, R, (T,), torch.float32, device="cuda")
    a[name] = a[name].cpu()
    with pytest.raises(RuntimeError, match=rf"{name} is on cpu.*weight is on cuda"):
        dora_ext.row_norm(a["weight"], a["lora_A"], a["lora_B"], a["scale"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tier", ["eager", "fused"])
@pytest.mark.parametrize("batch", [(0,), (2, 0)], ids=str)
def test_cuda_empty_batch_forward_and_backward(monkeypatch, tier, batch):
    dora_ext.set_options(tier=tier)
    a = make_inputs(D_IN, D_OUT, R, batch, torch.bfloat16, device="cuda", requires_grad=True)
    y = dora_ext.dora_linear(**a)
    assert y.shape == (*batch, D_OUT)
    assert dora_ext.last_tier()[0] == ("fused_training" if tier == "fused" else "eager"), dora_ext.last_tier()
    y.sum().backward()
    assert a["x"].grad.shape == a["x"].shape
    for k in ("lora_A", "lora_B", "magnitude", "bias"):
        assert a[k].grad.shape == a[k].shape and torch.all(a[k].grad == 0), k
    c = _compose_args(a)
    base = torch.randn(*batch, D_OUT, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    m = a["magnitude"].detach().clone().requires_grad_(True)
    out = _compose(c, base=base, lora=torch.randn_like(base), magnitude=m)
    assert out.shape == base.shape
    out.sum().backward()
    assert torch.all(m.grad == 0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU for a second device")
@pytest.mark.parametrize("name", ["lora", "magnitude", "norm"])
def test_compose_tensor_on_another_device(name):
    a = make_inputs(D_IN, D_OUT, R, (T,), torch.float32, device="cuda")
    c = _compose_args(a)
    c[name] = c[name].cpu()
    with pytest.raises(RuntimeError, match=rf"{name}.*(cpu|cuda)"):
        _compose(c)


# ---------------------------------------------------------------------------
# DORA_EXT_TIER and tier introspection


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_forced_fused_tier_raises_on_cpu(inp, monkeypatch, training):
    dora_ext.set_options(tier="fused")
    if training:
        inp["lora_A"].requires_grad_(True)
    with pytest.raises(RuntimeError, match="DORA_EXT_TIER=fused"):
        _linear(inp)


def test_forced_fused_tier_raises_for_compose_delta(inp, monkeypatch):
    c = _compose_args(inp)
    dora_ext.set_options(tier="fused")
    with pytest.raises(RuntimeError, match="DORA_EXT_TIER=fused"):
        _compose(c)


def test_forced_fused_tier_raises_in_select_tier(inp, monkeypatch):
    dora_ext.set_options(tier="fused")
    with pytest.raises(RuntimeError, match="DORA_EXT_TIER=fused"):
        dora_ext.select_tier(inp["x"], inp["weight"], inp["lora_A"], False)


@pytest.mark.parametrize("value", ["bogus", "FUSED", "fused_training", " eager"])
def test_invalid_tier_value_raises(inp, value):
    with pytest.raises(RuntimeError, match="tier must be 'auto', 'eager', 'fused' or 'prefer_fused'"):
        dora_ext.set_options(tier=value)
    assert dora_ext.get_options()["tier"] == "auto"  # unchanged
    _linear(inp)


def test_invalid_environment_raises_at_the_first_op_naming_the_variable():
    """Options come from the environment once; a malformed variable makes every op raise, naming
    it, until the option is set (in a fresh process: the environment is read once per process)."""
    script = textwrap.dedent("""
        import json
        import torch, dora_ext
        x, W, A, B = torch.randn(5, 12), torch.randn(7, 12), torch.randn(2, 12), torch.randn(7, 2)
        m = torch.rand(7) + 0.5
        errors = []
        for _ in range(2):
            try:
                dora_ext.dora_linear(x, W, None, A, B, m, 0.5)
            except RuntimeError as e:
                errors.append(str(e).splitlines()[0])
        dora_ext.set_options(tier="eager")
        y = dora_ext.dora_linear(x, W, None, A, B, m, 0.5)
        print(json.dumps({"errors": errors, "tier": dora_ext.last_tier()[0], "shape": list(y.shape)}))
    """)
    proc = run_python(["-c", script], timeout=120, DORA_EXT_TIER="bogus")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(result["errors"]) == 2 and all("DORA_EXT_TIER must be" in e for e in result["errors"]), result
    assert result["tier"] == "eager" and result["shape"] == [5, 7], result


def test_prefer_fused_falls_back_with_one_warning():
    """DORA_EXT_TIER=prefer_fused where fused cannot run (CPU): eager results, one warning per process.

    The warning is c10's TORCH_WARN_ONCE (stderr, for Python and LibTorch callers alike);
    checked in a fresh process, since it is once per process.
    """
    script = textwrap.dedent("""
        import json, os
        import torch, dora_ext
        dora_ext.set_options(tier="prefer_fused")
        x, W, A, B = torch.randn(5, 12), torch.randn(7, 12), torch.randn(2, 12), torch.randn(7, 2)
        m = torch.rand(7) + 0.5
        ys = [dora_ext.dora_linear(x, W, None, A, B, m, 0.5) for _ in range(3)]
        tier = dora_ext.last_tier()[0]
        dora_ext.set_options(tier="eager")
        ref = dora_ext.dora_linear(x, W, None, A, B, m, 0.5)
        print(json.dumps({"tier": tier, "equal": all(torch.equal(y, ref) for y in ys)}))
    """)
    proc = run_python(["-c", script], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"tier": "eager", "equal": True}
    warnings = [line for line in proc.stderr.splitlines() if "DORA_EXT_TIER=prefer_fused" in line]
    assert len(warnings) == 1, proc.stderr[-3000:]
    assert "cannot run here (device cpu has no fused kernels)" in warnings[0] and "eager" in warnings[0]


@pytest.mark.parametrize("value", ["auto", "eager"])
def test_valid_tier_values_run_eager_on_cpu(inp, monkeypatch, value):
    dora_ext.set_options(tier=value)
    y = _linear(inp)
    assert y.shape == (T, D_OUT)
    assert dora_ext.last_tier()[0] == "eager"


@pytest.mark.parametrize("training", [False, True])
def test_select_tier_reports_eager_on_cpu(inp, training):
    tier, reason = dora_ext.select_tier(inp["x"], inp["weight"], inp["lora_A"], training)
    assert tier == "eager"
    assert re.search(r"(?i)cpu", reason), reason
    assert OPS.select_tier(inp["x"], inp["weight"], inp["lora_A"], training) == (tier, reason)


@pytest.mark.parametrize("which", ["dora_linear", "dora_linear_training", "compose_delta"])
def test_last_tier_reports_eager_on_cpu(inp, which):
    if which == "compose_delta":
        _compose(_compose_args(inp))
    else:
        if which == "dora_linear_training":
            inp["magnitude"].requires_grad_(True)
        y = _linear(inp)
        if which == "dora_linear_training":
            y.sum().backward()
    tier, reason = dora_ext.last_tier()
    assert tier == "eager"
    assert re.search(r"(?i)cpu", reason), reason
    assert OPS.last_tier() == (tier, reason)


def test_info_is_a_dict():
    info = dora_ext.info()
    assert isinstance(info, dict)
    assert "torch_version" in info


def test_cpu_backward_ops_check_grad_out(inp):
    """The backward ops may be called directly: on the CPU too, a grad_out that is not the output's
    shape, dtype or device is an error naming it."""
    _, z, h, n = torch.ops.dora_ext.dora_linear_forward(inp["x"], inp["weight"], None, inp["lora_A"], inp["lora_B"],
                                                        inp["magnitude"], inp["scale"], True)
    args = (inp["x"], inp["weight"], None, inp["lora_A"], inp["lora_B"], inp["magnitude"], n, z, None, h,
            inp["scale"], [True, True, True, True, False])
    with pytest.raises(RuntimeError, match="dora_linear_backward: grad_out must have the output's shape"):
        torch.ops.dora_ext.dora_linear_backward(torch.ones(T, D_OUT + 1), *args)
    with pytest.raises(RuntimeError, match="dora_linear_backward: grad_out must have the output's dtype"):
        torch.ops.dora_ext.dora_linear_backward(torch.ones(T, D_OUT, dtype=torch.float64), *args)
    c = _compose_args(inp)
    with pytest.raises(RuntimeError, match="compose_delta_backward: grad_out must have the output's shape"):
        torch.ops.dora_ext.compose_delta_backward(torch.ones(T + 1, D_OUT), c["base"], c["lora"], c["magnitude"],
                                                  c["norm"], c["scale"], [True, True, True])

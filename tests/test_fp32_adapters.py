"""dora_linear with float32 adapters on float16/bfloat16 activations (PEFT's default mix).

The contract (csrc/fp32_adapters.h): the output keeps x's dtype; the adapters' products and their
gradients are float32-accurate, as PEFT computes them (x upcast, float32 GEMMs); on CUDA with
bfloat16 they run as tensor-core GEMMs over exact bfloat16 parts of the float32 operands. Checked
against the float64 reference on CPU, CUDA eager and CUDA fused, and against the plain-PyTorch
float32 computation (DESIGN.md section 6's 2x rule).
"""
from __future__ import annotations

import pytest
import torch

import dora_ext
from reference import FWD_TOL, make_inputs, ref_dora_linear, rel_err

SHAPES = [(64, 96, 16, (128,)), (37, 23, 1, (3, 5)), (130, 70, 12, (2, 9))]  # odd sizes, r = 1, 3-D


@pytest.fixture(autouse=True, params=["bf16_parts", "fp32_gemms"])
def route(request) -> str:
    """Both CUDA bfloat16 routes at test sizes: tensor cores over exact parts from the first token,
    or float32 GEMMs throughout (the default switches at 512 tokens). No effect elsewhere."""
    dora_ext.set_options(fp32_parts_min_tokens=0 if request.param == "bf16_parts" else 1_000_000_000)
    return request.param


def _mixed(d_in, d_out, r, batch, dtype, device, g_noise=0.3):
    """16-bit x, weight and bias; float32 lora_A, lora_B and magnitude."""
    return make_inputs(d_in, d_out, r, batch, dtype, device=device, mag_dtype=torch.float32, g_noise=g_noise,
                       adapter_dtype=torch.float32)


def _detached(inp):
    return {k: (v.detach() if torch.is_tensor(v) else v) for k, v in inp.items()}


def _as_ref(inp):
    """float64 CPU leaves of the same values, for the reference's gradients."""
    return {k: (v.detach().double().cpu().requires_grad_(True) if torch.is_tensor(v) else v)
            for k, v in inp.items()}


def _leaves(inp):
    return {k: (v.clone().requires_grad_(True) if k in ("x", "bias", "lora_A", "lora_B", "magnitude") else v)
            for k, v in inp.items()}


def _plain_fp32(inp):
    """PEFT's computation of the mix in plain PyTorch: base GEMM in x's dtype, LoRA in float32."""
    x, W, A, B, m, s = (inp[k] for k in ("x", "weight", "lora_A", "lora_B", "magnitude", "scale"))
    n = torch.linalg.vector_norm(W.float() + s * (B @ A), dim=1).detach()
    g = m / n
    base = x @ W.T
    y = g * base.float() + g * s * ((x.float() @ A.T) @ B.T) + inp["bias"].float()
    return y.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:3])))
def test_forward_and_gradients_against_float64(any_device, dtype, shape):
    d_in, d_out, r, batch = shape
    _check_against_float64(_leaves(_mixed(d_in, d_out, r, batch, dtype, any_device)))


def _check_against_float64(inp):
    """dora_linear's output and every gradient on `inp` (leaves) against the float64 reference."""
    dtype, batch, d_out = inp["x"].dtype, inp["x"].shape[:-1], inp["weight"].shape[0]
    y = dora_ext.dora_linear(**inp)
    assert y.dtype == dtype and y.shape == (*batch, d_out)
    gy = torch.randn_like(y)
    y.backward(gy)
    ref_in = _as_ref(inp)
    ref = ref_dora_linear(ref_in["x"], ref_in["weight"], ref_in["bias"], ref_in["lora_A"], ref_in["lora_B"],
                          ref_in["magnitude"], ref_in["scale"])
    ref.backward(gy.double().cpu())
    assert rel_err(y, ref) < FWD_TOL[dtype]
    assert rel_err(y, ref) <= 2 * rel_err(_plain_fp32(_detached(inp)), ref) + 1e-6
    for k in ("x", "bias", "lora_A", "lora_B", "magnitude"):
        assert inp[k].grad.dtype == inp[k].dtype, k
        assert torch.isfinite(inp[k].grad).all(), k
    # the adapters' gradients are float32-accurate: gy is exact in x's dtype and nothing on their
    # path is rounded to 16 bits (bfloat16 adapters would be ~1e-3 off)
    for k in ("lora_A", "lora_B"):
        assert rel_err(inp[k].grad, ref_in[k].grad) < FWD_TOL[torch.float32], k
    for k in ("x", "bias", "magnitude"):  # through the 16-bit base output: the 16-bit forward bound
        assert rel_err(inp[k].grad, ref_in[k].grad) < FWD_TOL[dtype], k


def test_float32_accuracy_is_discriminating():
    """The 1e-5 bound above fails for adapters rounded to bfloat16: it tests float32 accuracy."""
    inp = _leaves(_mixed(64, 96, 16, (128,), torch.bfloat16, "cpu"))
    rounded = {k: (v.detach().bfloat16().float().requires_grad_(True) if k in ("lora_A", "lora_B") else v)
               for k, v in inp.items()}
    y = dora_ext.dora_linear(**rounded)
    gy = torch.randn_like(y)
    y.backward(gy)
    ref_in = _as_ref(inp)
    ref_dora_linear(ref_in["x"], ref_in["weight"], ref_in["bias"], ref_in["lora_A"], ref_in["lora_B"],
                    ref_in["magnitude"], ref_in["scale"]).backward(gy.double())
    assert rel_err(rounded["lora_B"].grad, ref_in["lora_B"].grad) > 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_magnitude_near_one_and_no_grad(any_device, dtype):
    """g close to 1 (trained magnitudes) and the inference path (no autograd, cached norm)."""
    inp = _mixed(65, 47, 5, (33,), dtype, any_device, g_noise=1e-4)
    ref = ref_dora_linear(*(inp[k] for k in ("x", "weight", "bias", "lora_A", "lora_B", "magnitude", "scale")))
    with torch.no_grad():
        y = dora_ext.dora_linear(**inp)
        again = dora_ext.dora_linear(**inp)
    assert y.dtype == dtype
    assert rel_err(y, ref) < FWD_TOL[dtype] and torch.equal(y, again)


def test_non_contiguous_input(any_device):
    inp = _mixed(48, 40, 8, (6, 10), torch.bfloat16, any_device)
    x_t = inp["x"].transpose(0, 1).contiguous().transpose(0, 1)  # same values, strided
    assert not x_t.is_contiguous()
    y = dora_ext.dora_linear(**dict(inp, x=x_t))
    assert torch.equal(y, dora_ext.dora_linear(**inp))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_tiers(monkeypatch):
    """The fused tiers serve the mix: the decode kernel up to decode_max_tokens inference tokens,
    cuBLAS with the compose kernel above, the training kernels with a gradient to record."""
    dora_ext.set_options(tier="fused")
    inp = _leaves(_mixed(64, 96, 16, (4,), torch.bfloat16, "cuda"))
    with torch.no_grad():
        dora_ext.dora_linear(**inp)
        assert "decode kernel" in dora_ext.last_tier()[1]
        dora_ext.dora_linear(**_mixed(64, 96, 16, (17,), torch.bfloat16, "cuda"))
    tier, reason = dora_ext.last_tier()
    assert tier == "fused_inference" and "decode" not in reason
    dora_ext.dora_linear(**inp).sum().backward()
    assert dora_ext.last_tier()[0] == "fused_training"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", [(64, 96, 16, (1,)), (37, 23, 1, (3, 5)), (4096, 1000, 384, (16,)),
                                   (300, 257, 7, (2, 1, 1))], ids=lambda s: "x".join(map(str, s[:3])))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_decode_kernel_keeps_fp32_adapter_accuracy(dtype, shape, bias):
    """Decode-sized calls with float32 adapters run the decode kernel at the accuracy of the float32
    compose route (PEFT's computation): within the 2x rule of PEFT's own plain-PyTorch float32 result."""
    d_in, d_out, r, batch = shape
    inp = _detached(_mixed(d_in, d_out, r, batch, dtype, "cuda"))
    if not bias:
        inp["bias"] = None
    ref = ref_dora_linear(*(inp[k] for k in ("x", "weight", "bias", "lora_A", "lora_B", "magnitude", "scale")))
    with torch.no_grad():
        y = dora_ext.dora_linear(**inp)
        assert "decode kernel" in dora_ext.last_tier()[1], dora_ext.last_tier()
        with dora_ext.options(decode_max_tokens=0):
            y_compose = dora_ext.dora_linear(**inp)
    plain = _plain_fp32(dict(inp, bias=inp["bias"] if bias else torch.zeros(d_out, device="cuda", dtype=dtype)))
    assert y.dtype == dtype and y.shape == (*batch, d_out)
    assert rel_err(y, ref) <= 2 * rel_err(plain, ref) + 1e-6
    assert rel_err(y, ref) <= 2 * rel_err(y_compose, ref) + 1e-6


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_parts_min_tokens_option_is_checked():
    with pytest.raises(RuntimeError, match="fp32_parts_min_tokens must be a non-negative integer"):
        dora_ext.set_options(fp32_parts_min_tokens="many")
    with pytest.raises(RuntimeError, match="fp32_parts_min_tokens must be a non-negative integer"):
        dora_ext.set_options(fp32_parts_min_tokens=-1)


def _gpu_kernel_names(fn) -> list[str]:
    """The names of the GPU kernels one call of ``fn`` launches (torch.profiler's CUDA activity)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def _aten_parts(t: torch.Tensor, dim: int) -> torch.Tensor:
    """ATen's [hi, mid, lo] split of float32 t along ``dim`` (csrc/fp32_adapters.cpp's fallback)."""
    hi = t.bfloat16()
    rest = t - hi.float()
    mid = rest.bfloat16()
    return torch.cat([hi, mid, (rest - mid.float()).bfloat16()], dim)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tier", ["eager", "fused"])
def test_parts_kernel_from_the_token_limit(route, tier):
    """From fp32_parts_min_tokens tokens on (bf16_parts: the limit set at the call's 300 tokens) the parts
    come from triton_src/parts.py's kernel where the build has cubins for this GPU, else from ATen's split:
    the same bits either way (h = x A^T through A's parts equals the same GEMM over ATen's parts), and the
    float64 reference's accuracy forward and backward. One token below it (fp32_gemms): no parts at all."""
    kernels_here = torch.ops.dora_ext.fused_available.default(torch.cuda.current_device())[0]
    if tier == "fused" and not kernels_here:
        pytest.skip("this build has no cubins for this GPU: no fused tier")
    tokens = 300
    dora_ext.set_options(tier=tier, fp32_parts_min_tokens=tokens if route == "bf16_parts" else tokens + 1)
    inp = _leaves(_mixed(96, 80, 8, (tokens,), torch.bfloat16, "cuda"))
    names = _gpu_kernel_names(lambda: dora_ext.dora_linear(**inp).sum().backward())
    assert dora_ext.last_tier()[0] == ("eager" if tier == "eager" else "fused_training")
    launched = sum("dora_fp32_parts_kernel" in name for name in names)
    if route == "bf16_parts" and kernels_here:
        # forward: A's parts (x A^T), the six products of h and B; backward: the parts of h (grad_B),
        # of s g B (grad of h), of its result (grad_A) and the six products of that and A (grad_x)
        assert launched >= 8, names
    else:
        # below the limit only the norm's W A^T takes A's parts (a 16-bit W against float32 A, whatever
        # the token count: csrc/eager.cpp's matmul_nt_acc); seen once per step on the H100
        assert launched == (1 if kernels_here else 0), names
    x, A = inp["x"].detach(), inp["lora_A"].detach()
    args = [inp[k].detach() if torch.is_tensor(inp[k]) else inp[k]
            for k in ("x", "weight", "bias", "lora_A", "lora_B", "magnitude", "scale")]
    with torch.no_grad():
        h = torch.ops.dora_ext.dora_linear_forward(*args, False)[2]
    if route == "bf16_parts":
        expected = torch.mm(x, _aten_parts(A, 0).t(), out_dtype=torch.float32).view(tokens, 3, -1).sum(1)
    else:
        expected = torch.mm(x.float(), A.t())
    assert torch.equal(h, expected)
    _check_against_float64(_leaves(_detached(inp)))

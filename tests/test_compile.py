"""dora_ext.dora_linear under torch.compile(fullgraph=True) on the CPU.

The op must trace without graph breaks (its fake kernel gives the shapes), and the
compiled forward and backward must match eager. Backend: inductor (works on this
machine with gcc); aot_eager is also run for the basic case since it isolates the
AOT-autograd tracing from inductor's code generation.
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing

import dora_ext
from reference import SAME_TOL

SCALE = 0.5


class DoRALinear(torch.nn.Module):
    """Minimal DoRA layer around dora_ext.dora_linear (frozen weight, trainable adapter)."""

    def __init__(self, d_in, d_out, r, bias=True, dtype=torch.float32, mag_dtype=None, adapter_dtype=None):
        super().__init__()
        self.weight = torch.nn.Parameter((torch.randn(d_out, d_in) * d_in**-0.5).to(dtype), requires_grad=False)
        self.bias = torch.nn.Parameter(torch.randn(d_out).to(dtype)) if bias else None
        self.lora_A = torch.nn.Parameter((torch.randn(r, d_in) * d_in**-0.5).to(adapter_dtype or dtype))
        self.lora_B = torch.nn.Parameter((torch.randn(d_out, r) * 0.3).to(adapter_dtype or dtype))
        with torch.no_grad():
            n = dora_ext.row_norm(self.weight, self.lora_A, self.lora_B, SCALE)
            m = n * (1 + 0.2 * torch.randn_like(n))
        self.magnitude = torch.nn.Parameter(m.to(mag_dtype or dtype))

    def forward(self, x):
        return dora_ext.dora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.magnitude, SCALE)


class TwoLayers(torch.nn.Module):
    def __init__(self, d, r, bias):
        super().__init__()
        self.a = DoRALinear(d, 2 * d, r, bias=bias)
        self.b = DoRALinear(2 * d, d, r, bias=bias)

    def forward(self, x):
        return self.b(torch.nn.functional.gelu(self.a(x)))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _params(mod):
    return [p for p in mod.parameters() if p.requires_grad]


def _run(mod, x, gy=None):
    """Forward + backward; returns the output and the gradients of x (if any) and every trainable parameter."""
    for p in _params(mod):
        p.grad = None
    if x.requires_grad:
        x.grad = None
    y = mod(x)
    if gy is None:
        gy = torch.randn_like(y)
    y.backward(gy)
    grads = [p.grad.clone() for p in _params(mod)]
    if x.requires_grad:
        grads.append(x.grad.clone())
    return y.detach(), grads, gy


def _assert_same(a, b, dtype=torch.float32):
    torch.testing.assert_close(a, b, **SAME_TOL[dtype])


@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
@pytest.mark.parametrize(
    "bias, x_grad, batch",
    [
        pytest.param(True, True, (3, 5), id="bias-xgrad-3d"),
        # no bias and an x without grad (the first layer of a model): the backward is asked
        # for fewer than all five gradients, so several outputs are masked out
        pytest.param(False, False, (6,), id="nobias-noxgrad-2d"),
    ],
)
def test_compiled_matches_eager(backend, bias, x_grad, batch):
    torch.manual_seed(0)
    mod = DoRALinear(16, 12, 4, bias=bias)
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    compiled = torch.compile(mod, backend=counter, fullgraph=True)
    x = torch.randn(*batch, 16, requires_grad=x_grad)
    y_ref, g_ref, gy = _run(mod, x)
    y, g, _ = _run(compiled, x, gy)
    assert sum("dora_linear" in gm.code for gm in counter.graphs) == 1
    _assert_same(y, y_ref)
    assert len(g) == len(g_ref)
    for a, b in zip(g, g_ref):
        _assert_same(a, b)


def test_compiled_two_layer_model_matches_eager():
    torch.manual_seed(1)
    model = TwoLayers(12, 3, bias=True)
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    x = torch.randn(2, 4, 12, requires_grad=True)
    y_ref, g_ref, gy = _run(model, x)
    y, g, _ = _run(compiled, x, gy)
    _assert_same(y, y_ref)
    for a, b in zip(g, g_ref):
        _assert_same(a, b)


def test_compiled_dynamic_second_batch_size_does_not_recompile():
    torch.manual_seed(2)
    mod = DoRALinear(20, 10, 2, bias=True)
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(mod, backend=counter, fullgraph=True, dynamic=True)
    for i, batch in enumerate([(3, 5), (7, 2), (4, 9)]):
        x = torch.randn(*batch, 20, requires_grad=True)
        if i == 0:
            y, g, gy = _run(compiled, x)
            compiled_after_first_call = counter.frame_count
        else:
            with torch._dynamo.config.patch(error_on_recompile=True):
                y, g, gy = _run(compiled, x)
            assert counter.frame_count == compiled_after_first_call, f"recompiled for batch {batch}"
        y_ref, g_ref, _ = _run(mod, x, gy)
        assert y.shape == (*batch, 10)
        _assert_same(y, y_ref)
        for a, b in zip(g, g_ref):
            _assert_same(a, b)
    # One graph holds the op (dynamo may also hand the backend an empty graph first).
    assert sum("dora_linear" in gm.code for gm in counter.graphs) == 1


def test_compiled_inference_bf16_with_fp32_magnitude():
    torch.manual_seed(3)
    mod = DoRALinear(24, 16, 4, dtype=torch.bfloat16, mag_dtype=torch.float32)
    compiled = torch.compile(mod, backend="inductor", fullgraph=True)
    x = torch.randn(5, 24, dtype=torch.bfloat16)
    with torch.no_grad():
        y_ref = mod(x)
        y = compiled(x)
    assert y.dtype == torch.bfloat16
    _assert_same(y.float(), y_ref.float(), torch.bfloat16)


def test_compiled_training_bf16_with_fp32_adapters():
    """PEFT's default mix (fp32 adapters and magnitude on bf16 x/W) compiles without graph breaks;
    forward and backward match eager, the adapters' gradients stay float32."""
    torch.manual_seed(4)
    mod = DoRALinear(24, 16, 4, dtype=torch.bfloat16, mag_dtype=torch.float32, adapter_dtype=torch.float32)
    compiled = torch.compile(mod, backend="inductor", fullgraph=True)
    x = torch.randn(2, 5, 24, dtype=torch.bfloat16, requires_grad=True)
    y_ref, g_ref, gy = _run(mod, x)
    y, g, _ = _run(compiled, x, gy)
    assert y.dtype == torch.bfloat16
    assert [t.dtype for t in g] == [torch.bfloat16, torch.float32, torch.float32, torch.float32, torch.bfloat16]
    _assert_same(y.float(), y_ref.float(), torch.bfloat16)
    for a, b in zip(g, g_ref):
        _assert_same(a.float(), b.float(), torch.bfloat16)

"""dora_ext.nn.DoRALinear against a float64 dense reference (CPU)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dora_ext.nn import (
    DoRALinear,
    apply_dora,
    from_peft_state_dict,
    mark_only_dora_trainable,
    merge_dora_modules,
    to_peft_state_dict,
    unmerge_dora_modules,
)
from reference import FWD_TOL, GRAD_TOL, ref_dora_linear
from reference import rel_err as rel


def make_layer(d_in=19, d_out=13, r=3, alpha=6.0, bias=True, dtype=torch.float32, **kw) -> DoRALinear:
    """A DoRA layer with non-trivial B and magnitude (fresh random values)."""
    layer = DoRALinear.from_linear(nn.Linear(d_in, d_out, bias=bias, dtype=dtype), r, alpha, **kw)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.3)
        layer.lora_magnitude_vector.mul_(1 + 0.2 * torch.randn_like(layer.lora_magnitude_vector))
    return layer


def layer_reference(layer: DoRALinear, x: torch.Tensor, dropout_mask=None):
    """Reference output and leaves (float64 CPU copies of every parameter and x, requiring grad);
    ``dropout_mask`` (already scaled) on the LoRA input."""

    def leaf(t: torch.Tensor) -> torch.Tensor:
        return t.detach().cpu().double().requires_grad_()

    leaves = {"x": leaf(x), "A": leaf(layer.lora_A.weight), "B": leaf(layer.lora_B.weight),
              "m": leaf(layer.lora_magnitude_vector)}
    bias = None
    if layer.base_layer.bias is not None:
        bias = leaves["bias"] = leaf(layer.base_layer.bias)
    lora_x = None if dropout_mask is None else leaves["x"] * dropout_mask
    y = ref_dora_linear(leaves["x"], layer.base_layer.weight.detach(), bias, leaves["A"], leaves["B"], leaves["m"],
                        layer.scaling, lora_x=lora_x)
    return y, leaves


def grads_of(layer: DoRALinear, x: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {"x": x.grad, "A": layer.lora_A.weight.grad, "B": layer.lora_B.weight.grad,
           "m": layer.lora_magnitude_vector.grad}
    if layer.base_layer.bias is not None and layer.base_layer.bias.requires_grad:
        out["bias"] = layer.base_layer.bias.grad
    return out


# ------------------------------------------------------------------------------------------ init


@pytest.mark.parametrize("use_rslora", [False, True])
def test_fresh_layer_equals_base_layer(use_rslora):
    linear = nn.Linear(37, 23)
    x = torch.randn(4, 5, 37)
    expected = linear(x).detach()
    layer = DoRALinear.from_linear(linear, r=4, alpha=8, use_rslora=use_rslora)
    assert layer.base_layer is linear and not linear.weight.requires_grad and not linear.bias.requires_grad
    assert layer.scaling == pytest.approx(8 / math.sqrt(4) if use_rslora else 8 / 4)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    bound = 1 / math.sqrt(37)  # kaiming_uniform(a=sqrt(5)) as nn.Linear and PEFT
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.std() > bound / 4
    torch.testing.assert_close(layer.lora_magnitude_vector, torch.linalg.vector_norm(linear.weight, dim=1))
    assert rel(layer(x), expected) < 1e-6


def test_magnitude_is_fp32_for_low_precision_base():
    layer = DoRALinear.from_linear(nn.Linear(24, 16, dtype=torch.bfloat16), r=2, alpha=2)
    assert layer.lora_magnitude_vector.dtype == torch.float32
    assert layer.lora_A.weight.dtype == torch.bfloat16
    x = torch.randn(6, 24, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16  # an fp32 magnitude does not promote the output
    torch.testing.assert_close(y, layer.base_layer(x), rtol=1e-2, atol=1e-2)


# --------------------------------------------------------------------------- forward / backward


@pytest.mark.parametrize(
    "d_in,d_out,r,bias,shape,use_rslora",
    [
        (19, 13, 3, True, (7,), False),
        (19, 13, 1, False, (2, 5), False),
        (33, 47, 5, True, (3, 2, 4), True),
        (16, 8, 8, True, (1,), False),
    ],
)
def test_forward_and_gradients_match_float64_reference(d_in, d_out, r, bias, shape, use_rslora, any_device):
    layer = make_layer(d_in, d_out, r, alpha=2.0 * r + 1, bias=bias, use_rslora=use_rslora).to(any_device)
    if bias:
        layer.base_layer.bias.requires_grad_(True)  # frozen by default; a trainable bias gets its gradient
    x = torch.randn(*shape, d_in, device=any_device, requires_grad=True)
    y = layer(x)
    assert y.shape == (*shape, d_out) and y.dtype == torch.float32 and y.device == x.device
    y_ref, leaves = layer_reference(layer, x)
    assert rel(y, y_ref) < FWD_TOL[torch.float32]
    gy = torch.randn_like(y)
    y.backward(gy)
    y_ref.backward(gy.cpu().double())
    assert layer.base_layer.weight.grad is None
    for name, grad in grads_of(layer, x).items():
        assert grad is not None, name
        assert rel(grad, leaves[name].grad) < GRAD_TOL[torch.float32], name


def test_non_contiguous_input_and_g_close_to_one():
    layer = make_layer(20, 12, 2)
    with torch.no_grad():  # g = 1 + O(1e-6): the delta form must not cancel
        layer.lora_B.weight.mul_(1e-4)
        layer.lora_magnitude_vector.copy_(torch.linalg.vector_norm(
            layer.base_layer.weight.double() + layer.scaling * layer.lora_B.weight.double()
            @ layer.lora_A.weight.double(), dim=1) * (1 + 1e-6))
    x = torch.randn(20, 9).T  # non-contiguous [9, 20]
    y_ref, _ = layer_reference(layer, x)
    assert rel(layer(x), y_ref) < FWD_TOL[torch.float32]


def test_float64_layer_is_exact():
    layer = make_layer(21, 11, 3, dtype=torch.float64)
    assert layer.lora_magnitude_vector.dtype == torch.float64
    x = torch.randn(4, 21, dtype=torch.float64)
    y_ref, _ = layer_reference(layer, x)
    y = layer(x)
    assert y.dtype == torch.float64 and rel(y, y_ref) < FWD_TOL[torch.float64]


def test_gradcheck_x_magnitude_bias():
    layer = make_layer(9, 7, 2, dtype=torch.float64)
    w, a, b = (t.detach() for t in (layer.base_layer.weight, layer.lora_A.weight, layer.lora_B.weight))

    def fn(x, m, bias):
        from dora_ext import dora_linear
        return dora_linear(x, w, bias, a, b, m, layer.scaling)

    inputs = (torch.randn(3, 9, dtype=torch.float64, requires_grad=True),
              layer.lora_magnitude_vector.detach().clone().requires_grad_(),
              layer.base_layer.bias.detach().clone().requires_grad_())
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_forward(dtype, any_device):
    layer = make_layer(40, 24, 4, dtype=dtype).to(any_device)
    x = torch.randn(6, 40, dtype=dtype, device=any_device)
    y = layer(x)
    assert y.dtype == dtype
    y_ref, _ = layer_reference(layer, x)
    assert rel(y, y_ref) < FWD_TOL[dtype]


def test_autocast_runs_in_autocast_dtype_with_fp32_accumulation(any_device):
    layer = make_layer(40, 24, 4).to(any_device)
    x = torch.randn(6, 40, device=any_device)
    with torch.autocast(any_device.type, dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y_ref, _ = layer_reference(layer, x)
    assert rel(y, y_ref) < FWD_TOL[torch.bfloat16]
    with torch.autocast(any_device.type, dtype=torch.bfloat16):
        assert layer.row_norm().dtype == torch.float32


def test_zero_row_is_defined():
    layer = make_layer(10, 6, 2)
    with torch.no_grad():
        layer.base_layer.weight[2].zero_()
        layer.lora_B.weight[2].zero_()
    y = layer(torch.randn(3, 10))
    assert torch.isfinite(y).all()


# --------------------------------------------------------------------------------------- dropout


def test_dropout_applies_to_lora_input_only(any_device):
    layer = make_layer(30, 17, 4, dropout=0.4).to(any_device)
    x = torch.randn(5, 30, device=any_device, requires_grad=True)
    torch.manual_seed(1234)
    y = layer(x)
    torch.manual_seed(1234)  # the same mask on the layer's device
    mask = F.dropout(torch.ones(5, 30, device=any_device), p=0.4, training=True)
    y_ref, leaves = layer_reference(layer, x, dropout_mask=mask.cpu().double())
    assert rel(y, y_ref) < FWD_TOL[torch.float32]
    gy = torch.randn_like(y)
    y.backward(gy)
    y_ref.backward(gy.cpu().double())
    for name, grad in grads_of(layer, x).items():
        assert rel(grad, leaves[name].grad) < GRAD_TOL[torch.float32], name
    # eval: no dropout, the single-op path
    layer.eval()
    y_eval_ref, _ = layer_reference(layer, x)
    assert rel(layer(x), y_eval_ref) < FWD_TOL[torch.float32]


# --------------------------------------------------------------------------------------- merging


def test_merged_weight_is_exact_to_rounding():
    layer = make_layer(29, 15, 3)
    w = layer.base_layer.weight.detach().double()
    v = w + layer.scaling * layer.lora_B.weight.detach().double() @ layer.lora_A.weight.detach().double()
    expected = (layer.lora_magnitude_vector.detach().double() / v.norm(dim=1)).unsqueeze(1) * v
    merged = layer.merged_weight()
    assert merged.dtype == torch.float32
    # computed in float64 and rounded once: within half an ulp (+ float64 noise)
    ulp = torch.finfo(torch.float32).eps * expected.abs()
    assert ((merged.double() - expected).abs() <= 0.5 * ulp + 1e-15).all()


def test_merge_unmerge():
    layer = make_layer(29, 15, 3)
    x = torch.randn(4, 29)
    original = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        y = layer(x)
        layer.merge()
        assert layer.merged
        assert rel(layer(x), y) < 1e-6
        assert rel(layer.to_linear()(x), y) < 1e-6
        layer.merge()  # no-op
        layer.unmerge()
        assert not layer.merged
        assert rel(layer.base_layer.weight, original) < 1e-6
        before = layer.base_layer.weight.detach().clone()
        layer.merge(keep_original=True)
        layer.unmerge()
        assert torch.equal(layer.base_layer.weight, before)
        assert rel(layer(x), y) < 1e-6
        assert rel(layer.to_linear()(x), y) < 1e-6

    model = nn.Sequential(make_layer(8, 8, 2), nn.Tanh(), make_layer(8, 4, 2))
    xs = torch.randn(3, 8)
    with torch.no_grad():
        y = model(xs)
        assert merge_dora_modules(model) == 2
        assert rel(model(xs), y) < 1e-6
        assert unmerge_dora_modules(model) == 2
        assert rel(model(xs), y) < 1e-6


def test_merged_weight_refuses_when_merged():
    layer = make_layer(8, 4, 2)
    layer.merge()
    with pytest.raises(RuntimeError, match="merged"):
        layer.merged_weight()


# ------------------------------------------------------------------------------------ state dict


def test_state_dict_keys_match_peft_layout():
    layer = make_layer(12, 6, 2)
    assert set(layer.state_dict()) == {"base_layer.weight", "base_layer.bias", "lora_A.weight", "lora_B.weight",
                                       "lora_magnitude_vector"}
    model = nn.Sequential()
    model.add_module("proj", layer)
    sd = model.state_dict()
    assert set(to_peft_state_dict(sd)) == {"base_model.model.proj.lora_A.weight", "base_model.model.proj.lora_B.weight",
                                           "base_model.model.proj.lora_magnitude_vector"}
    full = to_peft_state_dict(sd, adapter_name="default")
    assert set(full) == {"base_model.model.proj.base_layer.weight", "base_model.model.proj.base_layer.bias",
                         "base_model.model.proj.lora_A.default.weight", "base_model.model.proj.lora_B.default.weight",
                         "base_model.model.proj.lora_magnitude_vector.default.weight"}
    back = from_peft_state_dict(full)
    assert set(back) == set(sd) and all(back[k] is sd[k] for k in sd)
    back_adapter_file = from_peft_state_dict(to_peft_state_dict(sd))
    assert set(back_adapter_file) == {"proj.lora_A.weight", "proj.lora_B.weight", "proj.lora_magnitude_vector"}


def test_state_dict_roundtrip_through_stock_peft():
    """Our keys and math are PEFT's: DoRA weights moved between the two give the same function."""
    peft = pytest.importorskip("peft")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Linear(12, 20)
            self.down = nn.Linear(20, 7, bias=False)

        def forward(self, x):
            return self.down(torch.relu(self.up(x)))

    torch.manual_seed(3)
    base = Net()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}

    def ours_on_base():
        net = Net()
        net.load_state_dict(base_state)
        assert apply_dora(net, ["up", "down"], r=4, alpha=8) == ["up", "down"]
        return net

    ours = ours_on_base()
    for module in ours.modules():
        if isinstance(module, DoRALinear):
            with torch.no_grad():
                module.lora_B.weight.normal_(0, 0.2)
                module.lora_magnitude_vector.mul_(1.1)
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["up", "down"]))
    result = peft.set_peft_model_state_dict(theirs, to_peft_state_dict(ours.state_dict()))
    assert not result.unexpected_keys
    x = torch.randn(5, 12)
    with torch.no_grad():
        expected = ours(x)
        assert rel(theirs(x), expected) < 1e-5
        # and back: PEFT's full state dict and its adapter file both load into our layers
        fresh = ours_on_base()
        fresh.load_state_dict(from_peft_state_dict(theirs.state_dict()))
        assert rel(fresh(x), expected) < 1e-6
        fresh = ours_on_base()
        missing, unexpected = fresh.load_state_dict(from_peft_state_dict(peft.get_peft_model_state_dict(theirs)),
                                                    strict=False)
        assert not unexpected and all(".base_layer." in k for k in missing)
        assert rel(fresh(x), expected) < 1e-6


# ------------------------------------------------------------------------------ model integration


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(24, 40)
        self.fc2 = nn.Linear(40, 40)
        self.head = nn.Linear(40, 5)

    def forward(self, x):
        return self.head(F.gelu(self.fc2(F.gelu(self.fc1(x)))))


def make_model(**kw) -> TwoLayer:
    model = TwoLayer()
    names = apply_dora(model, ["fc1", "fc2"], r=4, alpha=8, **kw)
    assert names == ["fc1", "fc2"] and isinstance(model.head, nn.Linear)
    mark_only_dora_trainable(model)
    for module in model.modules():
        if isinstance(module, DoRALinear):
            with torch.no_grad():
                module.lora_B.weight.normal_(0, 0.2)
                module.lora_magnitude_vector.mul_(1 + 0.1 * torch.randn_like(module.lora_magnitude_vector))
    return model


def test_apply_dora_targets():
    model = TwoLayer()
    assert apply_dora(model, r=2) == ["fc1", "fc2", "head"]
    model = TwoLayer()
    assert apply_dora(model, r"fc\d", r=2, exclude_modules=["fc2"]) == ["fc1"]
    mark_only_dora_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc1.lora_magnitude_vector", "fc1.lora_A.weight", "fc1.lora_B.weight"}


def _step(model, x):
    model.zero_grad(set_to_none=True)
    y = model(x)
    y.square().sum().backward()
    return y.detach(), {n.removeprefix("_orig_mod."): p.grad.clone()
                        for n, p in model.named_parameters() if p.requires_grad}


def test_torch_compile_fullgraph_matches_eager():
    model = make_model()
    x = torch.randn(3, 6, 24)
    y_eager, g_eager = _step(model, x)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    y_comp, g_comp = _step(compiled, x)
    assert rel(y_comp, y_eager) < 1e-6
    assert g_comp.keys() == g_eager.keys() and len(g_comp) == 6
    for name in g_eager:
        assert rel(g_comp[name], g_eager[name]) < 1e-6, name
    # the dropout (compose) path compiles too
    model_dropout = make_model(dropout=0.2)
    compiled = torch.compile(model_dropout, fullgraph=True, backend="aot_eager")
    model_dropout.eval()
    assert rel(compiled(x), model_dropout(x)) < 1e-6
    model_dropout.train()
    assert compiled(x).shape == (3, 6, 5)


def test_checkpoint_gives_same_gradients():
    model = make_model()
    x = torch.randn(4, 24, requires_grad=True)
    y_plain, g_plain = _step(model, x)
    gx_plain = x.grad.clone()
    x.grad = None

    class Wrapped(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return checkpoint(self.inner, x, use_reentrant=False)

    y_ckpt, g_ckpt = _step(Wrapped(model), x)
    assert torch.equal(y_ckpt, y_plain)
    for name in g_plain:
        torch.testing.assert_close(g_ckpt["inner." + name], g_plain[name], rtol=0, atol=0)
    torch.testing.assert_close(x.grad, gx_plain, rtol=0, atol=0)


def test_invalid_arguments():
    with pytest.raises(ValueError):
        DoRALinear(4, 4, r=0)
    with pytest.raises(ValueError):
        DoRALinear(4, 4, r=2, dropout=1.0)
    with pytest.raises(TypeError):
        DoRALinear.from_linear(nn.Conv1d(2, 2, 1), r=2, alpha=2)

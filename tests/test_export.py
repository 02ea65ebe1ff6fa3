"""dora_ext.export: adapter and base files for C++ (format, precomputed norm, DoRALinear and PEFT)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dora_ext.export
from dora_ext import compose_delta
from dora_ext.nn import apply_dora
from reference import ref_row_norm, rel_err


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(20)
        self.fc1 = nn.Linear(20, 33)
        self.fc2 = nn.Linear(33, 11, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


def _load(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a tensor file, read with plain torch.load (weights only)."""
    content = torch.load(str(path), weights_only=True)
    assert set(content) == {"metadata", "tensors"}
    return content["tensors"], content["metadata"]


def _randomise_adapter(model: nn.Module) -> None:
    """A 'trained' adapter: B != 0 and magnitudes away from the row norms (fresh random values)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
            elif "lora_magnitude_vector" in name:
                p.mul_(0.5 + torch.rand_like(p))


def _dora_net() -> nn.Module:
    model = Net()
    apply_dora(model, r=3, alpha=5.0)
    _randomise_adapter(model)
    return model.eval()


def _forward_from_files(base: dict, adapter: dict, x: torch.Tensor) -> torch.Tensor:
    """Net's forward from the exported files alone, as the C++ example computes it."""
    def linear(name: str, h: torch.Tensor) -> torch.Tensor:
        out = F.linear(h, base[f"{name}.weight"])
        lora = F.linear(F.linear(h, adapter[f"{name}.lora_A"]), adapter[f"{name}.lora_B"])
        out = out + compose_delta(out, lora, adapter[f"{name}.magnitude"], adapter[f"{name}.norm"],
                                  float(adapter[f"{name}.scale"]))
        return out + base[f"{name}.bias"] if f"{name}.bias" in base else out

    h = F.layer_norm(x, (20,), base["norm.weight"], base["norm.bias"])
    return linear("fc2", F.gelu(linear("fc1", h)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_adapter_file_layout_and_norm(tmp_path, dtype):
    model = _dora_net()
    names = dora_ext.export.save_adapter(model, tmp_path / "a.pt", dtype=dtype)
    assert names == ["fc1", "fc2"]
    tensors, meta = _load(tmp_path / "a.pt")
    assert meta["format"] == "dora_ext.adapter" and meta["format_version"] == "2"
    assert json.loads(meta["layers"]) == names and meta["source"] == "dora_ext.nn"
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for name in names:
        layer = getattr(model, name)
        assert tensors[f"{name}.lora_A"].dtype == dtype and tensors[f"{name}.lora_B"].dtype == dtype
        assert tensors[f"{name}.magnitude"].dtype == acc and tensors[f"{name}.norm"].dtype == acc
        assert tensors[f"{name}.scale"].dtype == torch.float64 and float(tensors[f"{name}.scale"]) == layer.scaling
        # the norm of the weights as exported (rounded to dtype), float64 dense reference
        ref = ref_row_norm(layer.base_layer.weight.to(dtype), tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"],
                           layer.scaling)
        assert rel_err(tensors[f"{name}.norm"], ref) < (1e-12 if dtype == torch.float64 else 1e-6)


def test_files_reproduce_the_model(tmp_path):
    model = _dora_net()
    dora_ext.export.save_adapter(model, tmp_path / "a.pt")
    keys = dora_ext.export.save_base(model, tmp_path / "b.pt")
    assert keys == ["fc1.bias", "fc1.weight", "fc2.weight", "norm.bias", "norm.weight"]
    base, _ = _load(tmp_path / "b.pt")
    adapter, _ = _load(tmp_path / "a.pt")
    x = torch.randn(4, 7, 20)
    with torch.no_grad():
        assert rel_err(_forward_from_files(base, adapter, x), model(x)) < 1e-6


def test_peft_export_matches_peft(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(Net(), peft.LoraConfig(r=4, lora_alpha=6, use_dora=True,
                                                       target_modules=["fc1", "fc2"])).eval()
    _randomise_adapter(model)
    assert dora_ext.export.save_adapter(model, tmp_path / "a.pt") == ["fc1", "fc2"]
    keys = dora_ext.export.save_base(model, tmp_path / "b.pt")
    assert keys == ["fc1.bias", "fc1.weight", "fc2.weight", "norm.bias", "norm.weight"]
    base, _ = _load(tmp_path / "b.pt")
    adapter, meta = _load(tmp_path / "a.pt")
    assert meta["source"] == "peft"
    x = torch.randn(5, 20)
    with torch.no_grad():
        assert rel_err(_forward_from_files(base, adapter, x), model(x)) < 1e-6


def test_export_refuses_what_it_cannot_represent(tmp_path):
    model = _dora_net()
    model.fc1.merge()
    with pytest.raises(ValueError, match="merged"):
        dora_ext.export.save_adapter(model, tmp_path / "a.pt")
    with pytest.raises(ValueError, match="no DoRA layers"):
        dora_ext.export.save_adapter(Net(), tmp_path / "a.pt")

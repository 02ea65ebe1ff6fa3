"""PEFT's ``adapter_names=`` hooks after dora_ext.peft.accelerate (dora_ext._adapter_names): the
layers to hook come from a kept list, which must follow every change to the model, and the
errors and clean-up must stay PEFT's."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from reference import assert_rows_alone, perturb_adapters, tiny_llama_config  # noqa: E402


def _model(targets: list[str]):
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(transformers.LlamaForCausalLM(tiny_llama_config()),
                           LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=targets))
    model.add_adapter("plain", LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    perturb_adapters(model)
    return model.eval()


def _ids(rows: int) -> torch.Tensor:
    return torch.randint(0, 128, (rows, 7), generator=torch.Generator().manual_seed(rows))


def _hooks_left(model) -> int:
    return sum(len(m._forward_pre_hooks) for m in model.modules())


def test_lora_model_is_routed_and_restored():
    import dora_ext.peft as dp
    from dora_ext._adapter_names import DoraExtLoraModel
    from peft.tuners.lora.model import LoraModel

    model = _model(["q_proj", "v_proj"])
    text = repr(model)
    dp.accelerate(model)
    assert type(model.base_model) is DoraExtLoraModel and repr(model) == text
    assert_rows_alone(model, _ids(3), ["plain", "default", "__base__"])
    dp.restore(model)
    assert type(model.base_model) is LoraModel


def test_errors_and_no_hooks_left_behind():
    import dora_ext.peft as dp

    model = _model(["q_proj", "v_proj"])
    dp.accelerate(model)
    ids = _ids(2)
    with torch.no_grad():
        with pytest.raises(ValueError, match="non-existing adapter.*: nope"):
            model(input_ids=ids, adapter_names=["default", "nope"])
        with pytest.raises(ValueError, match="Length of `adapter_names`"):  # raised inside the forward
            model(input_ids=ids, adapter_names=["default"])
        assert _hooks_left(model) == 0
        model.train()
        with pytest.raises(ValueError, match="training mode"):
            model(input_ids=ids, adapter_names=["default", "plain"])
        model.eval()
    assert _hooks_left(model) == 0
    assert_rows_alone(model, ids, ["default", "plain"])
    assert _hooks_left(model) == 0


def test_new_layers_and_deleted_adapters_are_seen():
    """A LoRA adapter added on modules that had none (new PEFT layers, hooked by the PEFT way, as
    accelerate was not called again) gets its rows; a deleted adapter's name is refused."""
    import dora_ext.peft as dp
    from peft import LoraConfig

    model = _model(["q_proj"])
    dp.accelerate(model)
    assert_rows_alone(model, _ids(2), ["plain", "default"])  # the list of layers is made here
    model.add_adapter("late", LoraConfig(r=3, lora_alpha=3, target_modules=["v_proj", "down_proj"]))
    perturb_adapters(model)
    assert_rows_alone(model, _ids(4), ["late", "default", "__base__", "late"])
    model.delete_adapter("late")
    with torch.no_grad(), pytest.raises(ValueError, match="non-existing adapter.*: late"):
        model(input_ids=_ids(1), adapter_names=["late"])


def test_the_model_is_walked_again_only_after_a_registration():
    import dora_ext.peft as dp
    from dora_ext._adapter_names import _hooked_layers
    from peft.tuners.lora.layer import LoraLayer

    model = _model(["q_proj", "v_proj"])
    dp.accelerate(model)
    first = _hooked_layers(model.base_model)
    assert _hooked_layers(model.base_model) is first
    assert len(first) == sum(isinstance(m, LoraLayer) for m in model.modules()) > 0
    model.base_model.model.extra = torch.nn.Linear(2, 2)  # any registration, anywhere
    assert _hooked_layers(model.base_model) is not first

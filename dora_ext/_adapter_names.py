"""PEFT's ``adapter_names=`` without a walk over every module of the model per call.

Every forward or ``generate`` call with ``adapter_names=`` enters PEFT's
``LoraModel._enable_peft_forward_hooks``, which walks ``self.modules()`` twice (to check the names
and to hook each LoRA layer) and hooks each LoRA layer's forward to pass the names on. A LoRA model
holds tens of modules per adapted layer (each adapter's ``lora_A``, ``lora_B``, dropout and
magnitude), so the walk visits ~1150 modules for a 4-layer decoder with 8 adapters and grows with
depth: 2.5 ms of host time per call on the development CPU, all of it before the model's first
kernel can start (a prefill waits for it).

:class:`DoraExtLoraModel` (what :func:`dora_ext.peft.accelerate` changes a ``LoraModel`` to; only
this method differs) keeps the list of modules to hook and walks the model again only after a
submodule was registered anywhere (torch's global module-registration hook bumps a counter: PEFT
adds, replaces and unloads layers through ``setattr``). The names are checked against the adapters
the hooked layers hold now (``delete_adapter`` is seen at once). Beam search and aLoRA offsets keep
PEFT's own method. The hooks are removed even when the forward raises.
"""
from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Any, Iterator

from peft.tuners.lora.layer import LoraLayer
from peft.tuners.lora.model import LoraModel, _adapter_names_pre_forward_hook
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook

__all__ = ["DoraExtLoraModel"]

_HOOKED_TYPES = (LoraLayer, AuxiliaryTrainingWrapper)  # the modules PEFT hooks
_LAYERS = "_dora_ext_hooked_layers"  # instance attribute: (registration count, modules)


class _Registrations:
    """How many submodules were registered on any module since the first DoraExtLoraModel."""

    count = 0
    handle: Any = None

    @classmethod
    def watch(cls) -> None:
        if cls.handle is None:
            cls.handle = register_module_module_registration_hook(cls._bump)

    @classmethod
    def _bump(cls, module: nn.Module, name: str, submodule: Any) -> None:
        cls.count += 1


def _hooked_layers(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that PEFT hooks for ``adapter_names=``, walked again only after a
    submodule was registered somewhere."""
    cached = model.__dict__.get(_LAYERS)
    if cached is not None and cached[0] == _Registrations.count:
        return cached[1]
    layers = [m for m in model.modules() if isinstance(m, _HOOKED_TYPES)]
    model.__dict__[_LAYERS] = (_Registrations.count, layers)
    return layers


class DoraExtLoraModel(LoraModel):
    """PEFT's ``LoraModel`` whose ``adapter_names=`` hooks find the LoRA layers from a kept list (see
    the module docstring). Made by :func:`dora_ext.peft.accelerate` (class change in place), turned
    back by :func:`dora_ext.peft.restore`."""

    def _get_name(self) -> str:  # repr stays "LoraModel(...)"
        return "LoraModel"

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        adapter_names = kwargs.get("adapter_names")
        num_beams = kwargs.get("num_beams")
        if (adapter_names is None or kwargs.get("alora_offsets") is not None
                or (isinstance(num_beams, int) and num_beams > 1)):
            with LoraModel._enable_peft_forward_hooks(self, *args, **kwargs):
                yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        layers = _hooked_layers(self)
        expected: set[str] = set()
        for layer in layers:
            if isinstance(layer, LoraLayer):
                expected |= layer.lora_A.keys()
                expected |= layer.lora_embedding_A.keys()
        unexpected = {name for name in adapter_names if name != "__base__"} - expected
        if unexpected:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unexpected))}")
        hook = partial(_adapter_names_pre_forward_hook, adapter_names=adapter_names)
        handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def route(module: nn.Module) -> None:
    """Make ``module`` a :class:`DoraExtLoraModel` if it is a plain ``LoraModel`` (called on each
    module of accelerate's walk)."""
    if type(module) is LoraModel:
        _Registrations.watch()
        module.__class__ = DoraExtLoraModel


def unroute(module: nn.Module) -> None:
    """Undo :func:`route` on ``module`` (called on each module of restore's walk)."""
    if type(module) is DoraExtLoraModel:
        module.__class__ = LoraModel
    module.__dict__.pop(_LAYERS, None)

"""DeepSpeed ZeRO-3 under dora_ext.peft: recognising its partitioned parameters and module hooks.

ZeRO-3 splits every parameter across processes (``param.data`` is an empty placeholder, the full
shape is ``param.ds_shape``) and puts hooks on every module that gather a module's own parameters
before its forward and backward and release them after. A routed PEFT layer computes DoRA from its
base weight and adapters without calling ``base_layer`` (nor ``lora_A``, ``lora_B``, the magnitude
module), so :func:`register` declares those parameters *external parameters* of the LoRA layer:
DeepSpeed then gathers them with the layer's own parameters, for its forward and again for its
backward, where the op's saved tensors are read. ZeRO-2 partitions no parameters and puts no hooks:
nothing here applies.

A gathered parameter lives in a fresh buffer each time and may be written in place (through
``GatheredParameters``) without a version bump, so the row-norm cache and the adapter-cast cache
cannot key on it: routed ZeRO-3 layers run with the ``norm_cache`` option off
(:func:`no_caches`). DeepSpeed is imported only when a partitioned parameter is met.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch
from torch import nn

from .ops import options

# Where DeepSpeed defines its module hooks (DeepSpeedZeRoOffload._register_deepspeed_module).
_HOOK_MODULE = "deepspeed.runtime.zero.parameter_offload"
_REGISTERED = "_dora_ext_zero3_params"


def is_partitioned(p: Optional[torch.Tensor]) -> bool:
    """Whether ``p`` is a ZeRO-3 parameter (partitioned across processes)."""
    return p is not None and hasattr(p, "ds_id") and hasattr(p, "ds_status") and hasattr(p, "ds_shape")


def full_shape(p: torch.Tensor) -> tuple[int, ...]:
    """The parameter's shape, gathered or not."""
    return tuple(p.ds_shape) if is_partitioned(p) else tuple(p.shape)


def _is_deepspeed_hook(fn: Any, depth: int = 0) -> bool:
    # DeepSpeed wraps two of its hooks: torch.compiler.disable keeps the function in __wrapped__, and
    # deepspeed.utils.nvtx.instrument_w_nvtx keeps it in a closure cell.
    if fn is None or depth > 4 or not callable(fn):
        return False
    module, qualname = getattr(fn, "__module__", "") or "", getattr(fn, "__qualname__", "") or ""
    if module == _HOOK_MODULE and "_register_deepspeed_module.<locals>." in qualname:
        return True
    if _is_deepspeed_hook(getattr(fn, "__wrapped__", None), depth + 1):
        return True
    if module.startswith(("deepspeed.", "torch.")):
        for cell in getattr(fn, "__closure__", None) or ():
            try:
                inner = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if _is_deepspeed_hook(inner, depth + 1):
                return True
    return False


def foreign_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward hooks other than DeepSpeed ZeRO-3's (accelerate's offloading
    hooks included): such a base layer must run its own forward."""
    if module.__dict__.get("_hf_hook") is not None:  # (accelerate sets it as a plain attribute)
        return True
    hooks = [*module._forward_pre_hooks.values(), *module._forward_hooks.values()]
    if not hooks:
        return False
    return not (is_partitioned(getattr(module, "weight", None)) and all(_is_deepspeed_hook(h) for h in hooks))


def _layer_params(layer: nn.Module) -> list[nn.Parameter]:
    """The parameters a routed layer reads without calling the module that owns them."""
    base = layer.base_layer
    params = [base.weight, base.bias]
    for adapter in layer.lora_A:
        params += [layer.lora_A[adapter].weight, layer.lora_B[adapter].weight, layer.lora_B[adapter].bias]
        if adapter in layer.lora_magnitude_vector:
            params.append(layer.lora_magnitude_vector[adapter].weight)
    return [p for p in params if is_partitioned(p)]


def register(layer: nn.Module) -> bool:
    """Declares the partitioned parameters a routed layer reads as external parameters of the layer
    (idempotent); returns whether there were any (the layer is under ZeRO-3)."""
    params = _layer_params(layer)
    if not params:
        return False
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    registered = layer.__dict__.setdefault(_REGISTERED, [])
    for p in params:
        if not any(p is q for q in registered):
            register_external_parameter(layer, p)
            registered.append(p)
    return True


def unregister(layer: nn.Module) -> None:
    """Undoes :func:`register` (``restore``)."""
    registered = layer.__dict__.pop(_REGISTERED, None)
    if not registered:
        return
    from deepspeed.runtime.zero.partition_parameters import unregister_external_parameter

    for p in registered:
        unregister_external_parameter(layer, p)


def is_registered(layer: nn.Module) -> bool:
    """Whether ``layer`` runs under ZeRO-3 (its parameters registered by :func:`register`)."""
    return bool(layer.__dict__.get(_REGISTERED))


def missing(layer: nn.Module) -> bool:
    """Whether a registered parameter is not gathered now (a call outside DeepSpeed's hooks)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return any(p.ds_status != ZeroParamStatus.AVAILABLE for p in layer.__dict__.get(_REGISTERED, ()))


@contextlib.contextmanager
def no_caches(layer: nn.Module) -> Iterator[None]:
    """The body with the norm cache (and the cast cache that follows it) off when ``layer`` is under
    ZeRO-3; unchanged otherwise."""
    if not is_registered(layer):
        yield
        return
    with options(norm_cache=False):
        yield

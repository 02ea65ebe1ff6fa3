"""Route stock PEFT DoRA layers through dora_ext, and undo it.

    import dora_ext.peft
    n = dora_ext.peft.accelerate(peft_model)     # how many DoRA layers are now served by dora_ext
    ...
    dora_ext.peft.restore(peft_model)            # back to PEFT's own code

How: PEFT's files are not touched. :func:`accelerate` changes the class of each servable
``peft.tuners.lora.layer.Linear`` that has a DoRA adapter to :class:`DoraExtLinear`, a subclass
that only overrides ``forward`` (parameters, buffers, adapters, state dict, ``merge``/``unmerge``,
``set_adapter``, saving and loading all stay PEFT's). :func:`restore` changes the class back.

The new forward reproduces PEFT's ``Linear.forward`` + ``DoraLinearVariant.forward`` semantics:

* one active DoRA adapter, unmerged, no ``lora_bias``, a frozen base weight, and either autocast,
  one dtype for x/W/A/B, or PEFT's default float32 adapters on a 16-bit x/W: the whole layer is
  **one ``dora_ext.dora_linear`` call** (the base GEMM is not run separately; float32 adapters'
  products at float32 accuracy, as PEFT computes them); with ``lora_dropout > 0`` in training,
  **one ``dora_ext.dora_linear_dropout`` call** on ``x`` and the layer's own ``lora_dropout(x)``
  (x cast to the adapter dtype first, as PEFT does: same draws, same masks);
* otherwise (several adapters, ``lora_bias``, a trainable base weight, hooks on the base layer):
  the base layer runs as in PEFT and
  each DoRA adapter adds ``dora_ext.compose_delta(base_result, lora_result, m, row_norm(...), s)``
  (the norm in factored form, no ``[d_out, d_in]`` product); vanilla LoRA adapters active in the same
  layer add ``B A dropout(x) s`` as in PEFT;
* disabled adapters / merged layers: the base layer, as in PEFT.

dtypes follow PEFT: x is cast to the adapter dtype (``cast_input_dtype``); under autocast the GEMMs
run in the autocast dtype, otherwise in the adapter dtype; the result is cast back to the base
layer's output dtype. ``g = m / n`` is kept in fp32 (PEFT computes it in the adapter dtype).

QDoRA: PEFT's bitsandbytes layers (``peft.tuners.lora.bnb.Linear4bit`` / ``Linear8bitLt`` on a quantized
bitsandbytes base) are routed too (dora_ext._quantized): bitsandbytes' own base GEMM, the factored norm
from a transient dequantized weight (kept per layer while nothing changes), ``compose_delta``.

Not served, observably (PEFT's own forward runs): other layer types (Embedding, Conv, torchao/HQQ
layers, ...), base layers other than ``nn.Linear`` / transformers ``Conv1D`` (or bitsandbytes under a
PEFT bitsandbytes layer), other quantized or tensor-subclass weights
(DTensor weights are served: FSDP2 hands forward the unsharded tensors; see docs/FSDP.md),
base layers with hooks (DeepSpeed ZeRO-3's are recognised and served: dora_ext._zero3, docs/FSDP.md),
``ephemeral_gpu_offload``. :func:`report` gives the reason per layer and
``accelerate`` logs it on the ``dora_ext.peft`` logger. ``adapter_names=`` mixed batches (DoRA and
LoRA adapters and ``"__base__"`` rows; stock PEFT refuses DoRA there) are one ``dora_linear_mixed`` call
per layer (on a bitsandbytes base: its GEMM once, then each adapter's rows, _quantized_mixed_batch);
on CUDA such a call first moves the layer's adapters into one stack the kernels read in place
(dora_ext._shared_adapters: the parameters become views of it, values unchanged; :func:`share_adapters`
does it ahead of time for every layer); the ``LoraModel``
finds the layers to hand the names to from a kept list instead of walking every module per call
(dora_ext._adapter_names). Calls that a routed layer hands back to PEFT (extra
forward arguments, a non-DoRA variant among the active adapters, ``cast_input_dtype_enabled=False``,
devices that differ) are counted per layer: :func:`fallback_counts`.

Call :func:`accelerate` again after adding adapters to new modules (it is idempotent).
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners.lora.dora import DoraLinearLayer
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.lora.variants import DoraLinearVariant
from torch import nn

from . import _adapter_names, _quantized, _shared_adapters, _zero3
from ._frozen import detach_if_frozen_view
from ._cast_cache import cast_for_forward
from .ops import compose_delta, dora_linear, dora_linear_dropout, dora_linear_mixed, row_norm

__all__ = ["DoraExtLinear", "accelerate", "fallback_counts", "is_accelerated", "report", "restore", "share_adapters"]

logger = logging.getLogger("dora_ext.peft")

ROUTED = "routed"
ROUTED_ZERO3 = "routed (DeepSpeed ZeRO-3)"
_STATUS = "_dora_ext_status"
_FALLBACKS = "_dora_ext_fallbacks"
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _conv1d_type() -> Optional[type]:
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # transformers is optional
        return None
    return Conv1D


def _is_dora_adapter(layer: LoraLayer, adapter: str) -> bool:
    return type(layer.lora_variant.get(adapter)) is DoraLinearVariant


def _param(module: nn.Module, name: str) -> Optional[torch.Tensor]:
    """``getattr(module, name)`` for a parameter, read from ``module._parameters`` where it is
    registered (``nn.Module.__getattr__`` costs about half a microsecond, and the routed forward runs
    per layer and decoded token); FSDP1 swaps registered parameters for plain tensor attributes, which
    take the usual lookup."""
    params = module._parameters
    return params[name] if name in params else getattr(module, name, None)


def _why_not_servable(layer: nn.Module) -> Optional[str]:
    """None if ``layer`` can be routed, else the reason."""
    if is_accelerated(layer):
        return None
    if not isinstance(layer, LoraLayer):
        return "not a LoRA layer"
    if not any(isinstance(v, DoraLinearVariant) for v in getattr(layer, "lora_variant", {}).values()):
        return "no DoRA adapter"
    if type(layer) in _quantized.peft_bnb_classes():
        return _why_not_servable_quantized(layer)
    if type(layer) is not LoraLinear:
        return (f"layer type {type(layer).__module__}.{type(layer).__qualname__} is not served (only peft Linear "
                "and, with bitsandbytes, its Linear4bit / Linear8bitLt)")
    base = layer.base_layer
    conv1d = _conv1d_type()
    if type(base) is not nn.Linear and (conv1d is None or type(base) is not conv1d):
        return f"base layer type {type(base).__qualname__} is not nn.Linear or transformers Conv1D"
    if bool(getattr(layer, "fan_in_fan_out", False)) != (type(base) is not nn.Linear):
        return "fan_in_fan_out does not match the base layer's weight layout"
    weight = base.weight
    # a DTensor is FSDP2's sharded parameter: forward sees the unsharded plain tensor (a call that
    # still sees a DTensor falls back to PEFT, see _call_fallback_reason)
    plain = type(weight) in (nn.Parameter, torch.Tensor) or type(weight).__name__ == "DTensor"
    dim = len(_zero3.full_shape(weight))  # a ZeRO-3 parameter is empty outside its module's forward
    if not plain or dim != 2:
        return f"base weight is {type(weight).__qualname__} of dim {dim} (quantized or a tensor subclass)"
    if weight.dtype not in _SUPPORTED_DTYPES:
        return f"base weight dtype {weight.dtype} is not supported"
    if _zero3.foreign_hooks(base):  # DeepSpeed ZeRO-3's own hooks are fine (dora_ext._zero3)
        return "the base layer has forward hooks (e.g. accelerate offloading)"
    if getattr(layer, "ephemeral_gpu_offload", False):
        return "ephemeral_gpu_offload is on"
    for adapter, variant in layer.lora_variant.items():
        if type(variant) is DoraLinearVariant and type(layer.lora_magnitude_vector[adapter]) is not DoraLinearLayer:
            return f"adapter {adapter!r} has a magnitude module of type {type(layer.lora_magnitude_vector[adapter])}"
    return None


def _why_not_servable_quantized(layer: LoraLayer) -> Optional[str]:
    """None if a PEFT bitsandbytes LoRA layer (QDoRA) can be routed, else the reason."""
    base = layer.base_layer
    if not _quantized.is_quantized_base(base):
        return f"base layer type {type(base).__qualname__} is not a bitsandbytes Linear4bit / Linear8bitLt"
    reason = _quantized.quantized_weight_reason(base.weight)
    if reason is not None:
        return reason
    if base._forward_hooks or base._forward_pre_hooks or hasattr(base, "_hf_hook"):
        return "the base layer has forward hooks (e.g. accelerate offloading)"
    for adapter, variant in layer.lora_variant.items():
        if type(variant) is DoraLinearVariant and type(layer.lora_magnitude_vector[adapter]) is not DoraLinearLayer:
            return f"adapter {adapter!r} has a magnitude module of type {type(layer.lora_magnitude_vector[adapter])}"
    return None


def _routed_class(peft_class: type) -> type:
    """The dora_ext class that a PEFT layer class is changed to (created once per PEFT class)."""
    if peft_class is LoraLinear:
        return DoraExtLinear
    routed = _ROUTED_QUANTIZED.get(peft_class)
    if routed is None:
        routed = type(f"DoraExt{peft_class.__name__}", (peft_class,),
                      {"forward": _quantized_forward, "_get_name": lambda self: peft_class.__name__,
                       "__module__": __name__, "__doc__": f"PEFT's {peft_class.__name__} routed through dora_ext "
                                                          "(QDoRA: dora_ext._quantized)."})
        _ROUTED_QUANTIZED[peft_class] = routed
    return routed


def accelerate(peft_model: nn.Module) -> int:
    """Route every servable DoRA ``peft.tuners.lora.layer.Linear`` of ``peft_model`` (a ``PeftModel``
    or any module holding PEFT LoRA layers) through dora_ext. Returns the number of routed layers
    (already routed ones included: idempotent). Layers with a DoRA adapter that cannot be served keep
    PEFT's forward; the reason is logged (INFO, ``dora_ext.peft``) and listed by :func:`report`."""
    routed = 0
    for name, module in peft_model.named_modules():
        _adapter_names.route(module)
        if not isinstance(module, LoraLayer):
            continue
        reason = _why_not_servable(module)
        if reason == "no DoRA adapter":
            continue
        if reason is not None:
            if getattr(module, _STATUS, None) != reason:
                logger.info("dora_ext.peft: %s stays on PEFT's forward: %s", name, reason)
            setattr(module, _STATUS, reason)
            continue
        if not is_accelerated(module):
            module.__class__ = _routed_class(type(module))
            setattr(module, _FALLBACKS, Counter())
        setattr(module, _STATUS, ROUTED_ZERO3 if _zero3.register(module) else ROUTED)
        routed += 1
    logger.info("dora_ext.peft: %d DoRA layer(s) routed through dora_ext", routed)
    return routed


def restore(peft_model: nn.Module) -> int:
    """Undo :func:`accelerate`: every routed layer, and the ``LoraModel``, gets PEFT's own class (and
    forward) back, and adapters moved into a shared stack (by serving or :func:`share_adapters`)
    their own contiguous tensors. Returns the number of layers restored."""
    restored = 0
    for module in peft_model.modules():
        _adapter_names.unroute(module)
        if is_accelerated(module):
            module.__class__ = type(module).__bases__[0]
            _shared_adapters.unshare(module)
            _quantized.forget_norms(module)
            _zero3.unregister(module)
            restored += 1
        for attr in (_STATUS, _FALLBACKS):
            if attr in module.__dict__:
                delattr(module, attr)
    return restored


def is_accelerated(layer: nn.Module) -> bool:
    """Whether ``layer`` is routed through dora_ext."""
    return type(layer) is DoraExtLinear or type(layer) in _ROUTED_QUANTIZED.values()


def report(peft_model: nn.Module) -> dict[str, str]:
    """``{module name: "routed" | "routed (DeepSpeed ZeRO-3)" | reason}`` for every LoRA layer with a DoRA
    adapter seen by :func:`accelerate` (layers it has not seen are listed with the reason they would get)."""
    out = {}
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        status = getattr(module, _STATUS, None)
        if status is None:
            status = _why_not_servable(module)
            if status == "no DoRA adapter":
                continue
            status = f"not accelerated{'' if status is None else ' (' + status + ')'}"
        out[name] = status
    return out


def share_adapters(peft_model: nn.Module) -> int:
    """Moves the LoRA factors of every accelerated layer into one stack per layer, which the CUDA
    mixed-batch kernels (``adapter_names=``) read in place, so that a served model holds each adapter
    once (otherwise the kernels keep a stacked copy of every layer's adapters beside them). Inference
    ``adapter_names=`` calls on CUDA do this for the layers they run, at a layer's first call and
    again after one of the call's adapters was added or replaced; this function does it ahead of
    time, for every layer.

    Each ``lora_A`` / ``lora_B`` parameter keeps its object, shape, dtype and values; its ``.data``
    becomes a view of the stack (``lora_B`` with the stack's rank as row stride: not contiguous).
    Forward and backward passes, ``state_dict``, ``save_pretrained`` and merging work on the views;
    an optimizer step first gives the stepped layers' factors back as separate contiguous tensors
    (fused optimizers would update a strided view as if it were contiguous), and so does
    :func:`restore`. The ``state_dict`` tensors are views of one storage, which
    ``safetensors.torch.save_file`` refuses: save with ``save_pretrained`` (PEFT copies them out) or
    ``torch.save``, or make them contiguous first. Layers whose adapters did not change are left as
    they are. Factors of mixed dtypes or devices, tensor subclasses and factors in storage another
    owner lays out (FSDP's flat parameters) stay where they are (served from a copy). Returns the
    number of layers whose adapters are views of one stack."""
    shared = 0
    for module in peft_model.modules():
        if is_accelerated(module):  # a LoRA layer: lora_A and lora_B are ModuleDicts
            shared += _shared_adapters.share(module, module.lora_A._modules, module.lora_B._modules, _param)
    return shared


def fallback_counts(peft_model: nn.Module) -> dict[str, dict[str, int]]:
    """``{module name: {reason: calls}}``: forward calls that routed layers handed to PEFT's code."""
    return {name: dict(getattr(m, _FALLBACKS)) for name, m in peft_model.named_modules()
            if is_accelerated(m) and getattr(m, _FALLBACKS, None)}


# ---------------------------------------------------------------------------------------------------


def _call_fallback_reason(layer: "DoraExtLinear", x: torch.Tensor, args: tuple, kwargs: dict) -> Optional[str]:
    """Why this call must run PEFT's own forward, or None.

    Runs on every routed call (per layer, per decoded token): each submodule and parameter is looked
    up once, through the modules' own dicts (``nn.Module.__getattr__`` costs about half a microsecond
    a lookup, and there are dozens per call)."""
    if args or any(v is not None for v in kwargs.values()):
        return "extra forward arguments (adapter_names / variant kwargs / base layer args)"
    if not layer.cast_input_dtype_enabled:
        return "cast_input_dtype_enabled is False"
    if layer.disable_adapters or layer.merged:
        return None
    modules = layer._modules
    base = modules["base_layer"]
    weight = _param(base, "weight")
    quantized = _quantized.is_quantized_base(base)
    if not quantized and type(weight) is not nn.Parameter and type(weight) is not torch.Tensor:
        return "the base weight is a tensor subclass (quantized / DTensor)"
    device = weight.device
    lora_A, lora_B = modules["lora_A"]._modules, modules["lora_B"]._modules
    for adapter in layer.active_adapters:
        a = lora_A.get(adapter)
        if a is None:
            continue
        variant = layer.lora_variant.get(adapter)
        if variant is not None and type(variant) is not DoraLinearVariant:
            return f"adapter {adapter!r} uses variant {type(variant).__name__}"
        if _param(a, "weight").device != device or _param(lora_B[adapter], "weight").device != device:
            return f"adapter {adapter!r} is on another device than the base weight"
        if variant is not None and _param(modules["lora_magnitude_vector"][adapter], "weight").device != device:
            return f"adapter {adapter!r} magnitude is on another device than the base weight"
    if x.device != device:
        return "input is on another device than the base weight"
    if _zero3.is_registered(layer) and _zero3.missing(layer):
        return "DeepSpeed ZeRO-3 parameters are not gathered (a call outside DeepSpeed's module hooks)"
    return None


def _base_weight(layer: "DoraExtLinear", base: nn.Module) -> torch.Tensor:
    """The weight of ``base`` (the layer's base layer) as ``[d_out, d_in]`` (a transposed view for
    Conv1D / fan_in_fan_out); FSDP1's forward view of a frozen weight comes detached (see
    ``dora_ext._frozen``)."""
    weight = detach_if_frozen_view(_param(base, "weight"))
    return weight.T if layer.fan_in_fan_out else weight


def _dropout_active(layer: "DoraExtLinear", dropout: nn.Module) -> bool:
    """Whether ``dropout`` (one adapter's dropout module) applies: PEFT reuses the base result unless
    training with a real dropout module."""
    return layer.training and not isinstance(dropout, nn.Identity)


def _single_call(layer: "DoraExtLinear", x: torch.Tensor, adapter: str) -> Optional[torch.Tensor]:
    """The whole layer as one dora_linear call (dora_linear_dropout with dropout in training), or
    None when this call does not qualify. (Submodules looked up once, as in _call_fallback_reason.)"""
    modules = layer._modules
    base = modules["base_layer"]
    weight = _base_weight(layer, base)
    lora_A = _param(modules["lora_A"]._modules[adapter], "weight")
    lora_B_module = modules["lora_B"]._modules[adapter]
    if _param(lora_B_module, "bias") is not None:
        return None
    lora_B = _param(lora_B_module, "weight")
    if (weight.requires_grad and torch.is_grad_enabled()) or _zero3.foreign_hooks(base):
        return None  # (accelerate's hooks wrap base.forward: let it run)
    device_type = x.device.type
    autocast = torch.is_autocast_enabled(device_type)
    if autocast:
        dtype = adapter_dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = weight.dtype
        adapter_dtype = lora_A.dtype
        # one dtype throughout, or PEFT's default mix: float32 adapters on a 16-bit base, whose
        # LoRA products PEFT computes in float32 (so does dora_linear for this mix)
        fp32_adapters = dtype in (torch.float16, torch.bfloat16) and adapter_dtype == torch.float32
        if x.dtype != dtype or lora_B.dtype != adapter_dtype or (adapter_dtype != dtype and not fp32_adapters):
            return None  # dtypes dora_linear does not take: the compose path, as PEFT computes them
    bias = detach_if_frozen_view(_param(base, "bias"))
    if bias is not None and bias.dtype != dtype:
        bias = bias.to(dtype)
    magnitude = _param(modules["lora_magnitude_vector"]._modules[adapter], "weight")
    scale = layer.scaling[adapter]
    dropout = modules["lora_dropout"]._modules[adapter]
    lora_A, lora_B = cast_for_forward(lora_A, adapter_dtype), cast_for_forward(lora_B, adapter_dtype)
    if not autocast:  # (no context manager and no .to: each costs microseconds, per layer and token)
        return _dora_call(layer, x, weight, bias, lora_A, lora_B, magnitude, scale, dropout, adapter_dtype)
    with torch.autocast(device_type, enabled=False):
        # the weight not cached in the compute dtype: a lasting copy of every base weight would cost memory
        return _dora_call(layer, x.to(dtype), weight.to(dtype), bias, lora_A, lora_B, magnitude, scale, dropout,
                          adapter_dtype)


def _dora_call(layer: "DoraExtLinear", x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
               lora_A: torch.Tensor, lora_B: torch.Tensor, magnitude: torch.Tensor, scale: float, dropout: nn.Module,
               adapter_dtype: torch.dtype) -> torch.Tensor:
    """_single_call's op call, every tensor in its compute dtype: dora_linear, or dora_linear_dropout
    when the layer's dropout applies."""
    if not _dropout_active(layer, dropout):
        return dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scale)
    # PEFT's order: x cast to the adapter dtype, then the layer's own dropout module (the same draw
    # from the same generator state: a seeded run gets PEFT's masks)
    x_dropped = dropout(layer._cast_input_dtype(x, adapter_dtype))
    if x_dropped.dtype != adapter_dtype:
        x_dropped = x_dropped.to(x.dtype)
    return dora_linear_dropout(x, x_dropped, weight, bias, lora_A, lora_B, magnitude, scale)


def _to_compute_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, except a 16-bit ``t`` meeting float32 compute stays as it is: row_norm takes a
    16-bit weight and compose_delta a 16-bit base next to float32 adapters (no float32 copy)."""
    if dtype == torch.float32 and t.dtype in (torch.float16, torch.bfloat16):
        return t
    return t.to(dtype)


def _dora_delta(layer: "DoraExtLinear", adapter: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """PEFT's ``DoraLinearLayer.forward``: the DoRA delta to add to ``result`` (the running output)."""
    lora_A = layer.lora_A[adapter]
    lora_B = layer.lora_B[adapter]
    scaling = layer.scaling[adapter]
    base = layer.base_layer
    weight = _base_weight(layer, base)
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    with torch.autocast(device_type, enabled=False):
        a = cast_for_forward(lora_A.weight, dtype)
        b = cast_for_forward(lora_B.weight, dtype)
        b_bias = lora_B.bias.to(dtype) if lora_B.bias is not None else None
        # float32 adapters on a 16-bit base (PEFT's default): row_norm takes the weight as it is, so
        # there is no float32 copy of W and the norm cache keys on the parameter itself
        norm = row_norm(_to_compute_dtype(weight, dtype), a, b, scaling)
        if _dropout_active(layer, layer.lora_dropout[adapter]):
            x = layer.lora_dropout[adapter](x).to(dtype)
            base_result = F.linear(x, weight.to(dtype))
        else:
            x = x.to(dtype)
            base_result = result if base.bias is None else result - base.bias
            base_result = _to_compute_dtype(base_result, dtype)  # a 16-bit one is saved for backward as it is
        lora_result = F.linear(F.linear(x, a), b, b_bias)
        return compose_delta(base_result, lora_result, layer.lora_magnitude_vector[adapter].weight, norm, scaling)


_ROW_INDEXES: dict[tuple[int, ...], torch.Tensor] = {}


def _row_index(values: tuple[int, ...]) -> torch.Tensor:
    """The int64 CPU adapter index holding ``values``, one tensor per distinct value tuple: a decode
    step calls every layer with the same one (making it costs microseconds per layer call). Read by
    dora_linear_mixed only, never written; at most 256 are kept (none while torch.compile traces)."""
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=torch.int64)
    index = _ROW_INDEXES.get(values)
    if index is None:
        if len(_ROW_INDEXES) >= 256:
            _ROW_INDEXES.clear()
        with torch.inference_mode(False):  # a normal tensor, usable in and out of inference mode
            index = _ROW_INDEXES[values] = torch.tensor(values, dtype=torch.int64)
    return index


def _served_adapter_names(layer: LoraLayer, args: tuple, kwargs: dict) -> Optional[list[str]]:
    """The ``adapter_names`` of a call dora_ext may serve as a mixed batch (the names and nothing else
    passed, adapters enabled), else None."""
    adapter_names = kwargs.get("adapter_names")
    if adapter_names is None or args or set(kwargs) != {"adapter_names"} or layer.disable_adapters:
        return None
    return adapter_names


def _check_adapter_names(layer: LoraLayer, x: torch.Tensor, adapter_names: list[str]) -> None:
    """PEFT's own checks of ``adapter_names=`` (its messages), less the refusal of DoRA adapters."""
    if len(x) != len(adapter_names):
        raise ValueError("Length of `adapter_names` should be the same as the number of inputs, but got "
                         f"{len(adapter_names)} and {len(x)} respectively.")
    if layer.merged:
        raise ValueError("Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` "
                         "first.")


def _mixed_batch(layer: "DoraExtLinear", x: torch.Tensor, adapter_names: list[str]) -> Optional[torch.Tensor]:
    """``adapter_names=`` (PEFT's mixed-adapter batches; DoRA adapters included): one
    dora_linear_mixed call, row i with adapter ``adapter_names[i]`` (``"__base__"`` or an adapter this
    layer lacks: the base model). None where the call does not qualify (PEFT's forward then runs).
    Runs once per layer and decode step: submodules and parameters are read straight from their
    dictionaries (see _param; eight adapters need ~30 lookups)."""
    _check_adapter_names(layer, x, adapter_names)
    modules = layer._modules
    base = modules["base_layer"]
    if _zero3.foreign_hooks(base) or x.dim() < 2:
        return None
    weight = _base_weight(layer, base)
    device_type = x.device.type
    autocast = torch.is_autocast_enabled(device_type)
    dtype = torch.get_autocast_dtype(device_type) if autocast else weight.dtype
    A_modules, B_modules = modules["lora_A"]._modules, modules["lora_B"]._modules
    magnitude_modules, variants, scaling = modules["lora_magnitude_vector"]._modules, layer.lora_variant, layer.scaling
    names = [n for n in dict.fromkeys(adapter_names) if n != "__base__" and n in A_modules]
    lora_A, lora_B, magnitude, scale, factors = [], [], [], [], []
    for name in names:
        b_module = B_modules[name]
        a, b = _param(A_modules[name], "weight"), _param(b_module, "weight")
        factors += (a, b)
        adapter_dtype = dtype if autocast else a.dtype
        fp32_adapters = dtype in (torch.float16, torch.bfloat16) and adapter_dtype == torch.float32
        if _param(b_module, "bias") is not None or (adapter_dtype != dtype and not fp32_adapters):
            return None
        variant = variants.get(name)
        dora = type(variant) is DoraLinearVariant
        if variant is not None and not dora:
            return None  # another variant: PEFT's own code
        lora_A.append(cast_for_forward(a, adapter_dtype))
        lora_B.append(cast_for_forward(b, adapter_dtype))
        magnitude.append(_param(magnitude_modules[name], "weight") if dora else None)
        scale.append(scaling[name])
    position = {n: k for k, n in enumerate(names)}
    index = _row_index(tuple(position.get(n, -1) for n in adapter_names))
    bias = detach_if_frozen_view(base.bias)
    if bias is not None and bias.dtype != dtype:
        bias = bias.to(dtype)
    if not (torch.is_grad_enabled() and (x.requires_grad or any(
            t.requires_grad for t in (*lora_A, *lora_B, *(m for m in magnitude if m is not None))))):
        if x.dtype != dtype:
            x = x.to(dtype)
        if factors:  # the stacked kernels then read the adapters where they are: each held once
            _shared_adapters.keep_shared(layer, A_modules, B_modules, _param, factors)
        if autocast:
            with torch.autocast(device_type, enabled=False):
                return dora_linear_mixed(x, weight.to(dtype), bias, lora_A, lora_B, magnitude, scale, index)
        return dora_linear_mixed(x, weight, bias, lora_A, lora_B, magnitude, scale, index)
    with torch.autocast(device_type, enabled=False):
        # gradients recorded: the adapters' groups one by one through the differentiable ops
        x = x.to(dtype)
        weight = weight.to(dtype)
        out = F.linear(x, weight, bias)
        rows = [i for i, n in enumerate(adapter_names) if n not in position]
        parts = [(torch.tensor(rows, dtype=torch.int64, device=x.device), out[rows])] if rows else []
        for k, name in enumerate(names):
            sel = torch.tensor([i for i, n in enumerate(adapter_names) if n == name], dtype=torch.int64,
                               device=x.device)
            xs = x.index_select(0, sel)
            if magnitude[k] is not None:
                ys = dora_linear(xs, weight, bias, lora_A[k], lora_B[k], magnitude[k], scale[k])
            else:
                lora = F.linear(F.linear(xs.to(lora_A[k].dtype), lora_A[k]), lora_B[k])
                ys = (F.linear(xs, weight, bias) + lora * scale[k]).to(dtype)
            parts.append((sel, ys))
        result = out.new_empty(out.shape)
        return result.index_copy(0, torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))


class DoraExtLinear(LoraLinear):
    """A PEFT LoRA ``Linear`` whose DoRA forward runs on dora_ext (see the module docstring).
    Only ``forward`` differs from ``peft.tuners.lora.layer.Linear``; instances are made by
    :func:`accelerate` (class change in place) and turned back by :func:`restore`."""

    def _get_name(self) -> str:  # repr stays "lora.Linear(...)"
        return "Linear"

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not _zero3.is_registered(self):
            if not _zero3.is_partitioned(_param(self._modules["base_layer"], "weight")):
                return self._routed_forward(x, *args, **kwargs)
            # accelerate() ran before deepspeed.initialize partitioned the parameters
            _zero3.register(self)
            self.__dict__[_STATUS] = ROUTED_ZERO3
        with _zero3.no_caches(self):  # ZeRO-3's gathered parameters are fresh buffers each time
            return self._routed_forward(x, *args, **kwargs)

    def _routed_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = _served_adapter_names(self, args, kwargs)
        if adapter_names is not None:
            out = _mixed_batch(self, x, adapter_names)
            if out is not None:
                return out
        reason = _call_fallback_reason(self, x, args, kwargs)
        if reason is not None:
            counts = self.__dict__.get(_FALLBACKS)
            if counts is not None:
                counts[reason] += 1
            return LoraLinear.forward(self, x, *args, **kwargs)

        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x)
        if self.merged:
            return self.base_layer(x)

        adapters = [a for a in self.active_adapters if a in self._modules["lora_A"]._modules]
        if len(adapters) == 1 and _is_dora_adapter(self, adapters[0]):
            # x goes straight to the compute dtype; PEFT's detour through the adapter dtype changes
            # nothing unless the adapter dtype is narrower than the autocast dtype
            out = _single_call(self, x, adapters[0])
            if out is not None:
                return out

        result = self.base_layer(x)
        result_dtype = result.dtype
        for adapter in adapters:
            x = self._cast_input_dtype(x, self.lora_A[adapter].weight.dtype)
            if _is_dora_adapter(self, adapter):
                result = result + _dora_delta(self, adapter, x, result)
            else:  # vanilla LoRA adapter in the same layer, as PEFT computes it
                lora_A, lora_B = self.lora_A[adapter], self.lora_B[adapter]
                result = result + lora_B(lora_A(self.lora_dropout[adapter](x))) * self.scaling[adapter]
        return result.to(result_dtype)


_ROUTED_QUANTIZED: dict[type, type] = {}


def _fall_back(layer: nn.Module, reason: str, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    counts = layer.__dict__.get(_FALLBACKS)
    if counts is not None:
        counts[reason] += 1
    return type(layer).__bases__[0].forward(layer, x, *args, **kwargs)


def _quantized_dora_delta(layer: nn.Module, adapter: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """PEFT's ``DoraLinearLayer.forward`` on a bitsandbytes base (``result``: its output, bias included):
    the norm from a transient dequantized weight (or the layer's kept norm), the delta by compose_delta."""
    lora_A, lora_B = layer.lora_A[adapter], layer.lora_B[adapter]
    scaling = layer.scaling[adapter]
    base = layer.base_layer
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    dropout = _dropout_active(layer, layer.lora_dropout[adapter])
    with torch.autocast(device_type, enabled=False):
        a = cast_for_forward(lora_A.weight, dtype)
        b = cast_for_forward(lora_B.weight, dtype)
        norm = _quantized.cached_norm(layer, adapter, lora_A.weight, lora_B.weight, dtype)
        weight = _quantized.dequantized_weight(base) if norm is None or dropout else None
        if norm is None:
            norm = row_norm(_to_compute_dtype(weight, dtype), a, b, scaling)
            _quantized.keep_norm(layer, adapter, lora_A.weight, lora_B.weight, dtype, norm)
        if dropout:
            x = layer.lora_dropout[adapter](x)
            base_result = F.linear(x.to(weight.dtype), weight)  # PEFT's GEMM on the dropped input
        else:
            base_result = result if base.bias is None else result - base.bias
        del weight  # the only dequantized copy: gone before the adapter's GEMMs
        lora_result = F.linear(F.linear(x.to(dtype), a), b)
        return compose_delta(_to_compute_dtype(base_result, dtype), lora_result,
                             layer.lora_magnitude_vector[adapter].weight, norm, scaling)


def _quantized_mixed_batch(layer: LoraLayer, x: torch.Tensor, adapter_names: list[str]) -> Optional[torch.Tensor]:
    """``adapter_names=`` on a bitsandbytes base, DoRA adapters included (PEFT refuses them): the base
    GEMM (bitsandbytes') once for the whole batch, then each adapter's rows as PEFT's mixed batch
    takes them: a LoRA adapter's product, or a DoRA adapter's delta from _quantized_dora_delta (its
    norm kept per layer and adapter, so decode steps do not dequantize). None where an adapter of the
    call has another variant (PEFT's forward then runs)."""
    _check_adapter_names(layer, x, adapter_names)
    names = [n for n in dict.fromkeys(adapter_names) if n != "__base__" and n in layer.lora_A]
    if any(n in layer.lora_variant and not _is_dora_adapter(layer, n) for n in names):
        return None
    result = layer.base_layer(x)
    requires_conversion = not torch.is_autocast_enabled(x.device.type)
    for name in names:
        rows = [i for i, n in enumerate(adapter_names) if n == name]
        xs = x[rows]
        if requires_conversion:
            xs = layer._cast_input_dtype(xs, layer.lora_A[name].weight.dtype)
        if _is_dora_adapter(layer, name):  # rounded once, as the single-adapter forward rounds
            base_rows = result[rows]
            out = base_rows + _quantized_dora_delta(layer, name, xs, base_rows)
            result[rows] = out.to(result.dtype) if requires_conversion else out
        else:  # PEFT's LoRA sub-batch
            out = layer.lora_B[name](layer.lora_A[name](layer.lora_dropout[name](xs))) * layer.scaling[name]
            result[rows] += out.to(result.dtype) if requires_conversion else out
    return result


def _quantized_forward(self: LoraLayer, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The forward of a routed PEFT bitsandbytes LoRA layer: PEFT's, with the DoRA terms of one active
    DoRA adapter, or of each adapter of an ``adapter_names=`` mixed batch, from dora_ext (several
    active adapters and other calls: PEFT's own)."""
    adapter_names = _served_adapter_names(self, args, kwargs)
    if adapter_names is not None:
        out = _quantized_mixed_batch(self, x, adapter_names)
        if out is not None:
            return out
    reason = _call_fallback_reason(self, x, args, kwargs)
    if reason is not None:
        return _fall_back(self, reason, x, *args, **kwargs)
    adapters = [a for a in self.active_adapters if a in self.lora_A]
    if self.disable_adapters or self.merged or not adapters:
        return type(self).__bases__[0].forward(self, x)
    if len(adapters) != 1 or not _is_dora_adapter(self, adapters[0]):
        return _fall_back(self, "several active adapters (or a non-DoRA one) on a quantized base", x)
    adapter = adapters[0]
    result = self.base_layer(x)  # bitsandbytes' own kernels
    requires_conversion = not torch.is_autocast_enabled(x.device.type)
    expected_dtype = result.dtype
    if requires_conversion:
        x = self._cast_input_dtype(x, self.lora_A[adapter].weight.dtype)
    result = result + _quantized_dora_delta(self, adapter, x, result)
    return result.to(expected_dtype) if requires_conversion else result

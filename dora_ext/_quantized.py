"""QDoRA: PEFT DoRA layers on bitsandbytes 4-bit (NF4 / FP4, double quantization or not) and 8-bit
(``Linear8bitLt``) base layers, for dora_ext.peft.

The base GEMM stays bitsandbytes' own (``base_layer(x)``); the DoRA terms are dora_ext's: the row
norm in factored form from a transient dequantized weight (``dequantize_module_weight``, PEFT's own
helper: one ``[d_out, d_in]`` copy per layer at a time, freed before the layer returns, never kept,
and never a dense ``B·A``), then ``compose_delta``'s fused pass. PEFT's QDoRA builds the dense
``B·A`` (through a ``d_in x d_in`` identity) and the adapted weight on every forward.

The norm depends on W, A, B and s only, so it is kept per layer under the norm cache's rule
(README "Norm cache"): a forward that records gradients computes it fresh, except a checkpoint
recompute inside the backward pass; calls without recorded gradients (eval, decode) reuse it while
the quantized weight, A and B keep identity, storage and version and the norm cache has not been
invalidated since (``norm_cache_generation``: every optimizer step and every backward pass that
used a norm). A reused norm also skips the dequantization (an eval forward without dropout needs
no dequantized weight at all).
"""
from __future__ import annotations

import sys
from typing import Any, Optional

import torch
from torch import nn

from .ops import _ops, norm_cache_generation

_NORMS = "_dora_ext_quantized_norms"  # layer attribute: {adapter: (key, norm)}


def bnb_classes() -> tuple[type, ...]:
    """bitsandbytes' quantized linear layers, or () while bitsandbytes is not imported.

    Never imports it: a layer of bitsandbytes exists only once its module has been imported, and this
    runs on every routed forward, where a failed import (bitsandbytes is an optional extra) searches
    ``sys.path`` each time (~0.2 ms a call, measured in a decode step)."""
    bnb = sys.modules.get("bitsandbytes")
    nn_module = getattr(bnb, "nn", None)
    if nn_module is None:  # not imported, or still being imported
        return ()
    return (nn_module.Linear4bit, nn_module.Linear8bitLt)


def peft_bnb_classes() -> tuple[type, ...]:
    """PEFT's LoRA layers over bitsandbytes layers, or () without bitsandbytes."""
    if not bnb_classes():
        return ()
    from peft.tuners.lora import bnb as peft_bnb

    return tuple(getattr(peft_bnb, name) for name in ("Linear4bit", "Linear8bitLt") if hasattr(peft_bnb, name))


def is_quantized_base(base: nn.Module) -> bool:
    classes = bnb_classes()
    return bool(classes) and type(base) in classes


def dequantized_weight(base: nn.Module) -> torch.Tensor:
    """The base weight as a dense ``[d_out, d_in]`` tensor (bitsandbytes' dequantization, through
    PEFT's helper): a transient copy the caller drops before returning."""
    from peft.utils.integrations import dequantize_module_weight

    weight = base.weight
    dense = dequantize_module_weight(base)
    # On the CPU the helper re-registers the weight as ``weight.to(device)``, a new Params4bit over the
    # same data: the layer keeps its own parameter, whose identity the kept norms are keyed on (a new
    # object per dequantization would make the norms of a layer's other adapters miss every call).
    if base.weight is not weight and base.weight.data_ptr() == weight.data_ptr():
        base.weight = weight
    return dense


def _key(layer: nn.Module, adapter: str, lora_A: torch.Tensor, lora_B: torch.Tensor, dtype: torch.dtype) -> tuple:
    w = layer.base_layer.weight
    return (id(w), w._version, w.data_ptr(), id(lora_A), lora_A._version, lora_A.data_ptr(), id(lora_B),
            lora_B._version, lora_B.data_ptr(), float(layer.scaling[adapter]), dtype, norm_cache_generation())


def _may_reuse(lora_A: torch.Tensor, lora_B: torch.Tensor) -> bool:
    """No gradients recorded (eval, decode), or a checkpoint recompute inside the backward pass."""
    if torch.compiler.is_compiling() or torch.is_inference_mode_enabled() or _ops.get_option.default(
            "norm_cache") == "0":
        return False
    records = torch.is_grad_enabled() and (lora_A.requires_grad or lora_B.requires_grad)
    return not records or torch._C._current_graph_task_id() != -1


def cached_norm(layer: nn.Module, adapter: str, lora_A: torch.Tensor, lora_B: torch.Tensor,
                dtype: torch.dtype) -> Optional[torch.Tensor]:
    """The norm this layer computed last for these exact inputs, where the rule allows reuse."""
    if not _may_reuse(lora_A, lora_B):
        return None
    entry = layer.__dict__.get(_NORMS, {}).get(adapter)
    if entry is not None and entry[0] == _key(layer, adapter, lora_A, lora_B, dtype):
        return entry[1]
    return None


def keep_norm(layer: nn.Module, adapter: str, lora_A: torch.Tensor, lora_B: torch.Tensor, dtype: torch.dtype,
              norm: torch.Tensor) -> None:
    if torch.compiler.is_compiling() or torch.is_inference_mode_enabled():
        return
    layer.__dict__.setdefault(_NORMS, {})[adapter] = (_key(layer, adapter, lora_A, lora_B, dtype), norm)


def forget_norms(layer: nn.Module) -> None:
    layer.__dict__.pop(_NORMS, None)


def quantized_weight_reason(weight: Any) -> Optional[str]:
    """None for a bitsandbytes weight dora_ext can dequantize, else why not."""
    name = type(weight).__name__
    if name not in ("Params4bit", "Int8Params"):
        return f"base weight is {type(weight).__qualname__}, not a bitsandbytes Params4bit / Int8Params"
    if name == "Params4bit" and getattr(weight, "quant_state", None) is None:
        return "the 4-bit weight is not quantized yet (move the model to its device first)"
    return None

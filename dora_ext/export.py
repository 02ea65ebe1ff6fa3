"""Export a trained DoRA model for C++ inference without Python (docs/CPP.md).

    import dora_ext.export
    dora_ext.export.save_adapter(model, "adapter.pt")   # DoRA factors + precomputed norm
    dora_ext.export.save_base(model, "base.pt")         # everything else: the base model

``model`` is a model with :class:`dora_ext.nn.DoRALinear` layers or a PEFT model whose DoRA adapter is
active (stock or accelerated by :mod:`dora_ext.peft`). C++ reads the files with
``dora_ext::load_adapter`` and ``dora_ext::load_tensor_file`` (cpp/include/dora_ext/).

Files are *tensor files*: PyTorch's own archive (``torch.save``) of
``{"metadata": {str: str}, "tensors": {str: Tensor}}``, which LibTorch reads with its own
serialization code (no parser of ours) and Python with ``torch.load(path, weights_only=True)``
(:func:`load_tensors`).

Adapter file (metadata ``format = "dora_ext.adapter"``, ``format_version = "2"``), per DoRA layer
at module path ``<name>`` (PEFT's ``base_model.model.`` prefix removed)::

    <name>.lora_A     [r, d_in]   export dtype
    <name>.lora_B     [d_out, r]  export dtype
    <name>.magnitude  [d_out]     float32 (float64 for a float64 export)
    <name>.norm       [d_out]     ||W + s B A||_row of the exported W, A, B: float32 (float64 for float64)
    <name>.scale      []          float64

The norm is computed here in float64 from the factors as they are written (so it is exactly the norm
of the weights C++ runs with, rounded once) and C++ inference uses it instead of recomputing it.

Base file: the state dict of the model without its adapter, in the export dtype (floating tensors
only are cast): a DoRA layer contributes ``<name>.weight`` (as ``[d_out, d_in]``, also for
transformers ``Conv1D``) and ``<name>.bias``; every other module its parameters and persistent
buffers under their usual names.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from .nn import DoRALinear
from .ops import accumulate_dtype, row_norm

__all__ = ["DoraLayerView", "FORMAT", "FORMAT_VERSION", "dora_layers", "load_tensors", "save_adapter", "save_base",
           "save_tensors"]

FORMAT = "dora_ext.adapter"
FORMAT_VERSION = "2"  # 1 was a safetensors file
_PEFT_PREFIX = "base_model.model."
# Rows per float64 norm chunk: bounds the float64 copy of W to chunk x d_in.
_NORM_CHUNK_ROWS = 1024


@dataclass
class DoraLayerView:
    """One DoRA layer of a model, as the export sees it (tensors are the model's own, not copies)."""

    weight: torch.Tensor  # [d_out, d_in]
    bias: Optional[torch.Tensor]
    lora_A: torch.Tensor  # [r, d_in]
    lora_B: torch.Tensor  # [d_out, r]
    magnitude: torch.Tensor  # [d_out]
    scale: float


def save_tensors(tensors: dict[str, torch.Tensor], path: Union[str, Path],
                 metadata: Optional[dict[str, str]] = None) -> None:
    """Write a tensor file (``dora_ext::load_tensor_file`` reads it in C++): compact CPU copies of
    ``tensors`` (a view does not carry its whole storage along) and string ``metadata``."""
    metadata = dict(metadata or {})
    bad = {k: type(v).__name__ for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))}
    if bad:
        raise TypeError(f"save_tensors: metadata keys and values must be strings, got {bad}")
    metadata = {str(k): str(v) for k, v in metadata.items()}  # plain str: torch.__version__ is a subclass
    copies = {str(k): t.detach().to("cpu").clone(memory_format=torch.contiguous_format) for k, t in tensors.items()}
    torch.save({"metadata": metadata, "tensors": copies}, str(path))


def load_tensors(path: Union[str, Path]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a tensor file (written by :func:`save_tensors` or C++'s
    ``dora_ext::save_tensor_file``), read with ``torch.load(weights_only=True)``."""
    content = torch.load(str(path), map_location="cpu", weights_only=True)
    if not (isinstance(content, dict) and isinstance(content.get("tensors"), dict)):
        raise ValueError(f"load_tensors: {path} is not a tensor file (a dict with \"metadata\" and \"tensors\")")
    return content["tensors"], dict(content.get("metadata", {}))


def _peft_root(model: nn.Module) -> Optional[nn.Module]:
    """The wrapped model of a PEFT model (``model.base_model.model``), or None for other models."""
    base = getattr(model, "base_model", None)
    if base is not None and base is not model and hasattr(base, "peft_config") and hasattr(base, "model"):
        return base.model
    return None


def _peft_dora_view(name: str, layer: nn.Module) -> Optional[DoraLayerView]:
    """The active DoRA adapter of a PEFT LoRA layer; None if the layer has no adapter; raises where
    the layer cannot be exported (merged, several active adapters, plain LoRA, lora_bias)."""
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if not active:
        return None
    if len(active) > 1:
        raise ValueError(f"export: layer {name!r} has several active adapters {active}; activate one")
    adapter = active[0]
    if adapter not in getattr(layer, "lora_magnitude_vector", {}):
        raise ValueError(f"export: layer {name!r} adapter {adapter!r} is plain LoRA, not DoRA")
    if layer.merged:
        raise ValueError(f"export: layer {name!r} is merged; unmerge it first (the base weight holds W')")
    if layer.lora_B[adapter].bias is not None:
        raise ValueError(f"export: layer {name!r} uses lora_bias, which dora_ext does not support")
    weight = layer.get_base_layer().weight
    if getattr(layer, "fan_in_fan_out", False):
        weight = weight.T
    return DoraLayerView(weight, layer.get_base_layer().bias, layer.lora_A[adapter].weight,
                         layer.lora_B[adapter].weight, layer.lora_magnitude_vector[adapter].weight,
                         float(layer.scaling[adapter]))


def dora_layers(model: nn.Module) -> dict[str, DoraLayerView]:
    """``{module path: view}`` for every DoRA layer of ``model`` (a model with
    :class:`~dora_ext.nn.DoRALinear` layers, or a PEFT model; paths relative to the wrapped model)."""
    peft_root = _peft_root(model)
    root = peft_root if peft_root is not None else model
    out: dict[str, DoraLayerView] = {}
    for name, module in root.named_modules():
        if isinstance(module, DoRALinear):
            if module.merged:
                raise ValueError(f"export: layer {name!r} is merged; unmerge it first (the base weight holds W')")
            out[name] = DoraLayerView(module.base_layer.weight, module.base_layer.bias, module.lora_A.weight,
                                      module.lora_B.weight, module.lora_magnitude_vector, module.scaling)
        elif peft_root is not None and hasattr(module, "lora_A") and hasattr(module, "get_base_layer"):
            view = _peft_dora_view(name, module)
            if view is not None:
                out[name] = view
    return out


@torch.no_grad()
def _norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """``||W + s B A||_row`` in float64 from the factored form, a block of rows at a time."""
    a = lora_A.to(torch.float64)
    parts = [row_norm(weight[i:i + _NORM_CHUNK_ROWS].to(torch.float64), a,
                      lora_B[i:i + _NORM_CHUNK_ROWS].to(torch.float64), scale)
             for i in range(0, weight.shape[0], _NORM_CHUNK_ROWS)]
    return torch.cat(parts)


def _export_dtype(layers: dict[str, DoraLayerView], dtype: Optional[torch.dtype]) -> torch.dtype:
    if dtype is not None:
        if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise ValueError(f"export: dtype must be float16, bfloat16, float32 or float64, got {dtype}")
        return dtype
    dtypes = {v.weight.dtype for v in layers.values()}
    if len(dtypes) != 1:
        raise ValueError(f"export: the DoRA layers have base weights of several dtypes {sorted(map(str, dtypes))}; "
                         "pass dtype=")
    return dtypes.pop()


def _is_peft(model: nn.Module) -> bool:
    return _peft_root(model) is not None


@torch.no_grad()
def save_adapter(model: nn.Module, path: Union[str, Path], dtype: Optional[torch.dtype] = None) -> list[str]:
    """Write the DoRA adapter of ``model`` with its precomputed row norms to ``path`` (layout in the
    module docstring). ``dtype``: the dtype C++ computes in (default: the base weights' dtype); A and
    B are written in it and the norm is the norm of W, A, B rounded to it. Returns the layer names."""
    layers = dora_layers(model)
    if not layers:
        raise ValueError("save_adapter: the model has no DoRA layers (DoRALinear or an active PEFT DoRA adapter)")
    dtype = _export_dtype(layers, dtype)
    acc = accumulate_dtype(dtype)
    tensors: dict[str, torch.Tensor] = {}
    for name, v in layers.items():
        weight, lora_A, lora_B = v.weight.to(dtype), v.lora_A.to(dtype), v.lora_B.to(dtype)
        tensors[f"{name}.lora_A"] = lora_A
        tensors[f"{name}.lora_B"] = lora_B
        tensors[f"{name}.magnitude"] = v.magnitude.to(acc)
        tensors[f"{name}.norm"] = _norm(weight, lora_A, lora_B, v.scale).to(acc)
        tensors[f"{name}.scale"] = torch.tensor(v.scale, dtype=torch.float64)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dtype": str(dtype).removeprefix("torch."),
        "source": "peft" if _is_peft(model) else "dora_ext.nn",
        "torch_version": torch.__version__,
        "layers": json.dumps(sorted(layers)),
    }
    save_tensors(tensors, path, metadata)
    return sorted(layers)


@torch.no_grad()
def save_base(model: nn.Module, path: Union[str, Path], dtype: Optional[torch.dtype] = None) -> list[str]:
    """Write the base model (``model`` without its DoRA adapters) to ``path``, floating tensors in
    ``dtype`` (default: the DoRA layers' base weight dtype). Returns the keys written."""
    layers = dora_layers(model)
    dtype = _export_dtype(layers, dtype) if layers else dtype
    peft_root = _peft_root(model)
    root = peft_root if peft_root is not None else model
    tensors: dict[str, torch.Tensor] = {}

    def put(key: str, t: Optional[torch.Tensor]) -> None:
        if t is None:
            return
        t = t.detach()
        tensors[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t

    skip: list[str] = []  # modules whose subtree the DoRA layer covers (base layer, lora_A/B, dropout)
    for name, module in root.named_modules():
        if any(name.startswith(s + ".") for s in skip):
            continue
        prefix = f"{name}." if name else ""
        if name in layers:
            put(prefix + "weight", layers[name].weight)
            put(prefix + "bias", layers[name].bias)
            skip.append(name)
            continue
        if peft_root is not None and hasattr(module, "lora_A") and hasattr(module, "get_base_layer"):
            raise ValueError(f"save_base: layer {name!r} is a PEFT LoRA layer without an active DoRA adapter")
        for pname, p in module.named_parameters(recurse=False):
            put(prefix + pname, p)
        persistent = [b for b in module._buffers if b not in module._non_persistent_buffers_set]
        for bname in persistent:
            put(prefix + bname, module._buffers[bname])
    metadata = {"format": "dora_ext.base", "torch_version": torch.__version__}
    save_tensors(tensors, path, metadata)
    return sorted(tensors)

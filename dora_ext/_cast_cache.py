"""Casts of adapter weights (small: r x (d_in + d_out)) that keep their identity while the source is unchanged.

The row-norm cache (csrc/norm_cache.cpp) keys on tensor identity, storage and version. Where
dora_ext.nn and the PEFT integration cast float32 adapters to the compute dtype (under autocast),
a fresh ``.to()`` per forward is a new tensor every call, so the norm would be recomputed on every
forward, eval and decode included. Without recorded gradients the cast is reused while the source
tensor's storage and version are unchanged and the norm cache has not been invalidated since
(``norm_cache_generation``: a fused optimizer step changes an adapter without a version bump, and
every optimizer step and every backward pass that used a norm invalidates); with gradients
(training) it is made fresh, so autograd sees the cast.
"""
from __future__ import annotations

import weakref

import torch

from .ops import _ops, norm_cache_generation

# id(source) -> (weak ref to the source, version, data_ptr, dtype, generation, cast). Keyed on id (tensors
# compare elementwise, so they cannot be dict keys); a finalizer drops the entry with its source.
_CASTS: dict[int, tuple[weakref.ref, int, int, torch.dtype, int, torch.Tensor]] = {}


def cast_for_forward(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``; without recorded gradients the same tensor as last time while ``t`` is unchanged.

    Bypassed (a plain ``.to``) where the norm cache is off (option ``norm_cache``), under
    torch.compile, in inference mode (inference tensors have no version counter) and for tensor
    subclasses.
    """
    if t.dtype == dtype:
        return t
    if (torch.compiler.is_compiling() or torch.is_inference_mode_enabled() or t.is_inference()
            or (torch.is_grad_enabled() and t.requires_grad) or _ops.get_option.default("norm_cache") == "0"
            or type(t) not in (torch.Tensor, torch.nn.Parameter)):  # a subclass (DTensor) has no data_ptr
        return t.to(dtype)
    key = (t._version, t.data_ptr(), dtype, norm_cache_generation())
    entry = _CASTS.get(id(t))
    if entry is not None and entry[0]() is t and entry[1:5] == key:
        return entry[5]
    if entry is None or entry[0]() is not t:
        weakref.finalize(t, _CASTS.pop, id(t), None)
    cast = t.detach().to(dtype)
    _CASTS[id(t)] = (weakref.ref(t), *key, cast)
    return cast

"""One copy of a PEFT layer's adapters while it serves mixed batches on CUDA.

The stacked mixed-batch kernels read every adapter of a call from one stack (``h = x A_cat^T``,
``B_cat``). Adapters held as separate tensors are copied into a stack kept per layer, so a served
model would hold each adapter twice. :func:`keep_shared` (each inference ``adapter_names=`` call on
CUDA) and :func:`share` (``dora_ext.peft.share_adapters``) move a layer's LoRA factors into one stack made by
:func:`dora_ext.share_adapter_storage` (the parameters' ``.data`` become views of it; values,
parameter objects, dtypes and shapes are unchanged) and the kernels read them in place.

A layer remembers the data pointers it left, so a second call moves nothing unless an adapter was
added, removed or had its data replaced (``model.to``, ``load_state_dict`` with ``assign=True``).
Factors that are part of storage another owner lays out (such as FSDP's flat parameters), wrapped
tensors, or factors of mixed dtypes or devices are left where they are (the kernels' stack is then a
copy).

An optimizer step moves a shared layer's factors back out first (:func:`_unshare_before_step`):
each ``lora_B`` view has the stack's rank as row stride, and fused optimizers (torch's
``AdamW(fused=True)``, transformers' Trainer default; bitsandbytes') update a parameter as if it
were contiguous: on the CPU torch's writes over the next adapters' columns and leaves the
parameter's own mostly as they were; on CUDA it raises (layouts differ).
"""
from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.weak import WeakIdKeyDictionary

from .ops import share_adapter_storage

__all__ = ["SHARE_ON", "keep_shared", "share", "unshare"]

# Layer attribute: (factors' data pointers when last seen, stacks' storage pointers, shared or not,
# weak references to the factors last moved into a stack).
_SHARED = "_dora_ext_shared_adapters"

#: Device types whose mixed-batch kernels read a shared stack in place: inference ``adapter_names=``
#: calls there move the layer's adapters into one (the CPU path has no stacked copy to save).
SHARE_ON: tuple[str, ...] = ("cuda",)

# Every factor moved into a shared stack -> its layer (weakly; the keys are weak too).
_SHARED_FACTORS = WeakIdKeyDictionary()


def _pointers(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> frozenset[int]:
    return frozenset(p for a, b in pairs for p in (a.data_ptr(), b.data_ptr()))


def _movable(t: torch.Tensor, first: torch.Tensor, stacks: tuple[int, ...]) -> bool:
    """``t`` can be replaced by a view of a new stack: a plain tensor like ``first`` that owns its
    whole storage or lies in this layer's stack (a tensor in it keeps it alive), not part of storage
    someone else lays out."""
    if type(t.data) is not torch.Tensor or t.dtype != first.dtype or t.device != first.device:
        return False
    storage = t.untyped_storage()
    whole = t.storage_offset() == 0 and t.is_contiguous() and storage.nbytes() == t.numel() * t.element_size()
    return whole or storage.data_ptr() in stacks


def share(layer: nn.Module, A_modules: dict[str, nn.Module], B_modules: dict[str, nn.Module],
          param: Any) -> bool:
    """Make the LoRA factors of every adapter of ``layer`` views of one shared stack, unless they
    already are (checked by data pointer) or cannot be moved. Returns whether they are views of one
    stack now. ``param(module, name)`` reads a registered parameter (dora_ext.peft._param)."""
    pairs = [(param(A_modules[n], "weight"), param(B_modules[n], "weight")) for n in A_modules if n in B_modules]
    if not pairs:
        return False
    pointers = _pointers(pairs)
    last = layer.__dict__.get(_SHARED)
    if last is not None and last[0] == pointers:
        return last[2]
    stacks, moved = (last[1], last[3]) if last is not None else ((), ())
    first = pairs[0][0]
    if not all(_movable(t, first, stacks) for pair in pairs for t in pair):
        layer.__dict__[_SHARED] = (pointers, stacks, False, moved)  # left as they are until they change
        return False
    a_views, b_views = share_adapter_storage([a for a, _ in pairs], [b for _, b in pairs])
    for (a, b), a_view, b_view in zip(pairs, a_views, b_views):
        a.data, b.data = a_view, b_view
    stacks = (a_views[0].untyped_storage().data_ptr(), b_views[0].untyped_storage().data_ptr())
    factors = [t for pair in pairs for t in pair]
    layer.__dict__[_SHARED] = (_pointers(pairs), stacks, True, tuple(weakref.ref(t) for t in factors))
    for t in factors:
        _SHARED_FACTORS[t] = weakref.ref(layer)
    return True


def keep_shared(layer: nn.Module, A_modules: dict[str, nn.Module], B_modules: dict[str, nn.Module],
                param: Any, called: list[torch.Tensor]) -> None:
    """Before an inference mixed-batch call on a :data:`SHARE_ON` device: :func:`share` the layer's
    adapters, unless every factor of the call (``called``) is where the last look left it (its data
    pointer: a fraction of a microsecond a factor, per layer and decode step). Not while torch.compile
    traces or a CUDA graph captures (moving allocates and copies)."""
    if called[0].device.type not in SHARE_ON or torch.compiler.is_compiling():
        return
    last = layer.__dict__.get(_SHARED)
    if last is not None and all(t.data_ptr() in last[0] for t in called):
        return
    if called[0].is_cuda and torch.cuda.is_current_stream_capturing():
        return
    share(layer, A_modules, B_modules, param)


def unshare(layer: nn.Module) -> None:
    """Give every factor of ``layer`` that is a view of its shared stack its own contiguous copy; the
    stack is freed with its last view, and ``share`` may move them into a new one later."""
    last = layer.__dict__.pop(_SHARED, None)
    if last is None:
        return
    _, stacks, _, moved = last
    for t in (t for ref in moved if (t := ref()) is not None):
        _SHARED_FACTORS.pop(t, None)
        if t.untyped_storage().data_ptr() in stacks:
            t.data = t.data.clone(memory_format=torch.contiguous_format)


def _unshare_before_step(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    """Global optimizer step pre-hook: the layers with a shared factor among the parameters about
    to be stepped get their factors back as separate contiguous tensors (see the module's note)."""
    if not _SHARED_FACTORS:
        return
    owners = {id(owner): owner for group in optimizer.param_groups for p in group["params"]
              if (owner := _SHARED_FACTORS.get(p)) is not None}
    for owner in owners.values():
        if (layer := owner()) is not None:
            unshare(layer)


register_optimizer_step_pre_hook(_unshare_before_step)

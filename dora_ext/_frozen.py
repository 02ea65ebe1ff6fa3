"""Recognise FSDP1's forward views of frozen parameters, so the frozen DoRA base weight stays frozen.

FSDP1 (``FullyShardedDataParallel(use_orig_params=True)``) flattens a module's frozen and trainable
parameters into one ``FlatParameter`` that requires grad as a whole. During forward it hands every
module plain-tensor *views* of the unsharded flat parameter, and those views all require grad, the
frozen base weight's included. ``dora_linear`` refuses a weight that requires grad (the DoRA base
weight gets no gradient by design), so the layers detach exactly those views whose original
parameter is frozen. FSDP1 discards gradients of frozen parameters anyway; detaching only skips
computing them. A weight the user really made trainable is left alone (and the op still says so).

The lookup reads two private FSDP1 attributes (``FlatParameter._tensors``, the forward views, and
``FlatParameter._params``, the original parameters); if they are missing the tensor is returned
unchanged, so a future FSDP1 change surfaces as the op's clear "weight requires grad" error, not as
a silently untrained weight.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["detach_if_frozen_view"]


def detach_if_frozen_view(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``t.detach()`` if ``t`` is FSDP1's forward view of a parameter with ``requires_grad=False``,
    else ``t`` itself (``None`` stays ``None``)."""
    if t is None or not t.requires_grad or t.is_leaf:
        return t
    flat = t._base
    if flat is None or not getattr(flat, "_is_flat_param", False):
        return t
    views = getattr(flat, "_tensors", None)
    params = getattr(flat, "_params", None)
    if views is None or params is None:
        return t
    for view, param in zip(views, params):
        if view is t:
            return t if param.requires_grad else t.detach()
    return t

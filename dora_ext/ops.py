"""Typed Python wrappers of torch.ops.dora_ext and their fake (meta) kernels.

The ops are defined, implemented and differentiated in C++ (csrc/); this
module only gives them Python signatures and registers the shape functions
that torch.compile and torch.export trace with.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Iterator

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from ._library import load_library

load_library()
_ops = torch.ops.dora_ext

_CACHE_ENV = "DORA_EXT_NORM_CACHE"


@torch.compiler.disable
def _invalidate_after_optimizer_step(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    """Global optimizer step hook: every cached norm is recomputed after any optimizer step.

    Fused optimizers (``AdamW(fused=True)``, transformers' Trainer default), bitsandbytes' and
    DeepSpeed's write parameters without bumping their version counters, so the version keys
    alone would serve the norm of the adapters before the step. Not traced by torch.compile
    (a compiled ``opt.step`` runs it eagerly).
    """
    _ops.invalidate_norm_cache.default()


register_optimizer_step_post_hook(_invalidate_after_optimizer_step)


def row_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """Row norms ``||W_i + scale * (B A)_i||`` as fp32 ``[d_out]`` (float64 for float64 inputs).

    Computed from the factored form ``||W_i||^2 + 2s<B_i, (W A^T)_i> + s^2 B_i (A A^T) B_i^T``:
    no ``[d_out, d_in]`` intermediate. The result never requires grad (DoRA detaches the norm).
    """
    return _ops.row_norm.default(weight, lora_A, lora_B, scale)


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """DoRA linear layer: ``(m / n) * (x W^T + scale (x A^T) B^T) + bias``.

    Args:
        x: activations ``[..., d_in]``.
        weight: frozen base weight ``[d_out, d_in]``, same dtype as x.
        bias: optional ``[d_out]``, same dtype as x.
        lora_A: ``[r, d_in]``; lora_B: ``[d_out, r]``, same dtype as x, or both float32 with
            float16/bfloat16 x (PEFT's default adapters): their products are then computed to
            float32 accuracy (x upcast, as PEFT does; on CUDA bf16, tensor-core GEMMs over exact
            bfloat16 parts of the float32 operands) and their gradients are float32.
        magnitude: ``[d_out]``, any float dtype (fp32 under mixed precision).
        scale: LoRA scaling ``s`` (alpha / r).

    Returns ``[..., d_out]`` in x's dtype. Gradients flow to x, lora_A, lora_B,
    magnitude and bias; the norm ``n`` is detached and the weight is frozen.
    """
    return _ops.dora_linear.default(x, weight, bias, lora_A, lora_B, magnitude, scale)


def compose_delta(
    base: torch.Tensor, lora: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor, scale: float
) -> torch.Tensor:
    """The DoRA delta for callers that already computed ``base = x W^T`` (no bias) and ``lora = (x A^T) B^T``.

    Returns ``(g - 1) * base + g * scale * lora`` with ``g = magnitude / norm`` in fp32: the
    form that does not cancel when g is close to 1. ``norm`` comes from :func:`row_norm`.
    ``base`` and ``lora`` share a dtype, except that a float16/bfloat16 ``base`` may come with a
    float32 ``lora`` (PEFT's default adapters); the delta then is float32.
    """
    return _ops.compose_delta.default(base, lora, magnitude, norm, scale)


def select_tier(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, training: bool) -> tuple[str, str]:
    """The tier dora_linear would run for these inputs and why: ``("fused_training" |
    "fused_inference" | "eager", reason)``. ``DORA_EXT_TIER=auto|eager|fused`` overrides it."""
    return _ops.select_tier.default(x, weight, lora_A, training)


def last_tier() -> tuple[str, str]:
    """The tier and reason of the last DoRA op run by the C++ dispatcher on this thread.

    Per thread, so concurrent callers each see their own. Autograd runs CUDA backward passes on its
    own device thread: after ``.backward()`` this thread still shows the forward's tier; call the
    backward op (``torch.ops.dora_ext.*_backward``) directly to see the backward's.
    """
    return _ops.last_tier.default()


@contextlib.contextmanager
def overrides(tier: str | None = None, norm_cache: bool | None = None) -> Iterator[None]:
    """Sets ``DORA_EXT_TIER`` (``"auto"``, ``"eager"``, ``"fused"`` or ``"prefer_fused"``) and/or
    ``DORA_EXT_NORM_CACHE`` for the body and restores the previous values; ``None`` leaves a
    variable as it is. The C++ side reads both on every call, so this works mid-process."""
    wanted = {"DORA_EXT_TIER": tier, _CACHE_ENV: None if norm_cache is None else str(int(norm_cache))}
    old = {name: os.environ.get(name) for name, value in wanted.items() if value is not None}
    os.environ.update({name: value for name, value in wanted.items() if value is not None})
    try:
        yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def norm_cache_stats() -> dict[str, int]:
    """Counters of the row-norm cache since the last :func:`clear_norm_cache`.

    What is reused and when it is recomputed (README, "Norm cache"): a forward that records
    gradients computes its norm fresh (``norm_misses``), except a checkpoint recompute inside the
    backward pass, which reuses its forward's norm (``norm_hits``); a norm used by a backward pass
    is dropped when that pass ends, and every optimizer step drops all of them (each counted in
    ``invalidations``); eval, no-grad and inference calls reuse a norm while W, A, B and the scale
    keep their identity, storage and version (``norm_hits``). ``weight_sq_hits``: misses that
    reused ``||W||^2``; ``scale_hits``: ``g = m / n`` reused; ``bypassed``: calls that skipped the
    cache (``DORA_EXT_NORM_CACHE=0``, inference-mode tensors, CUDA-graph capture); ``entries``:
    norms held now.
    """
    names = ("norm_hits", "norm_misses", "weight_sq_hits", "scale_hits", "bypassed", "entries", "invalidations")
    return dict(zip(names, _ops.norm_cache_stats.default()))


def clear_norm_cache() -> None:
    """Drops every cached norm and resets the counters of :func:`norm_cache_stats`."""
    _ops.clear_norm_cache.default()


def invalidate_norm_cache() -> None:
    """Drops every cached norm (the counters stay): call it after writing W, A, B or the magnitude
    in a way that bypasses version counters (``p.data.mul_(...)``, a custom kernel) outside
    training. Optimizer steps and backward passes invalidate by themselves."""
    _ops.invalidate_norm_cache.default()


def norm_cache_generation() -> int:
    """A counter that grows with every invalidation of the norm cache (backward passes that used
    a norm, optimizer steps, :func:`invalidate_norm_cache`, :func:`clear_norm_cache`): other
    caches of quantities derived from parameters key on it."""
    return _ops.norm_cache_generation.default()


# ---------------------------------------------------------------------------
# Fake kernels: output shapes, dtypes and devices only, for tracing.


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype norms and magnitude scales are computed and returned in for inputs of ``dtype``:
    float64 for float64, fp32 otherwise (csrc/checks.h ``accumulate_type``)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tokens(x: torch.Tensor) -> int:
    return math.prod(x.shape[:-1])


@torch.library.register_fake("dora_ext::row_norm")
def _row_norm_fake(weight, lora_A, lora_B, scale):
    return weight.new_empty((weight.shape[0],), dtype=accumulate_dtype(weight.dtype))


@torch.library.register_fake("dora_ext::dora_linear")
def _dora_linear_fake(x, weight, bias, lora_A, lora_B, magnitude, scale):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("dora_ext::dora_linear_forward")
def _dora_linear_forward_fake(x, weight, bias, lora_A, lora_B, magnitude, scale):
    d_out, tokens = weight.shape[0], _tokens(x)
    return (
        x.new_empty((*x.shape[:-1], d_out)),
        x.new_empty((tokens, d_out)),
        lora_A.new_empty((tokens, lora_A.shape[0])),  # h: float32 for float32 adapters on 16-bit x
        x.new_empty((d_out,), dtype=accumulate_dtype(x.dtype)),
    )


@torch.library.register_fake("dora_ext::dora_linear_backward")
def _dora_linear_backward_fake(grad_out, x, weight, lora_A, lora_B, magnitude, norm, z, h, scale, output_mask):
    # A masked-out gradient is a fresh empty tensor (never one shared object:
    # outputs must not alias each other, as in the real kernels).
    return (
        x.new_empty(x.shape if output_mask[0] else (0,)),
        lora_A.new_empty(lora_A.shape) if output_mask[1] else x.new_empty((0,)),
        lora_B.new_empty(lora_B.shape) if output_mask[2] else x.new_empty((0,)),
        magnitude.new_empty(magnitude.shape if output_mask[3] else (0,)),
        x.new_empty((weight.shape[0],) if output_mask[4] else (0,)),
    )


@torch.library.register_fake("dora_ext::compose_delta")
def _compose_delta_fake(base, lora, magnitude, norm, scale):
    return base.new_empty(base.shape, dtype=torch.promote_types(base.dtype, lora.dtype))


@torch.library.register_fake("dora_ext::compose_delta_backward")
def _compose_delta_backward_fake(grad_out, base, lora, magnitude, norm, scale, output_mask):
    return (
        base.new_empty(base.shape if output_mask[0] else (0,)),
        lora.new_empty(lora.shape if output_mask[1] else (0,)),
        magnitude.new_empty(magnitude.shape if output_mask[2] else (0,)),
    )

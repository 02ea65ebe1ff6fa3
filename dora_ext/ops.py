"""Typed Python wrappers of torch.ops.dora_ext and their fake (meta) kernels.

The ops are defined, implemented and differentiated in C++ (csrc/); this
module only gives them Python signatures and registers the shape functions
that torch.compile and torch.export trace with.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import _fake_checks
from ._library import load_library

load_library()
_ops = torch.ops.dora_ext

#: The smallest row norm the ops use: a zero row gets n = NORM_EPS (g = 0, output = bias), never a
#: division by zero. Defined once, in C++ (eager.h kNormEpsilon).
NORM_EPS: float = _ops.norm_epsilon.default()

def _invalidate_after_optimizer_step(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    """Global optimizer step hook: every cached norm is recomputed after any optimizer step.

    Fused optimizers (``AdamW(fused=True)``, transformers' Trainer default), bitsandbytes' and
    DeepSpeed's write parameters without bumping their version counters, so the version keys
    alone would serve the norm of the adapters before the step. (Not wrapped in
    ``torch.compiler.disable``: that would import dynamo, and Triton with it, at ``import
    dora_ext``. A compiled ``opt.step`` follows a backward pass, which invalidates too.)
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


def dora_linear_dropout(
    x: torch.Tensor,
    x_dropped: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """DoRA linear layer with LoRA dropout, exactly as PEFT's DoRA layer trains:
    ``x W^T + bias + (g - 1) (x_d W^T) + g * scale (x_d A^T) B^T`` with ``g = m / n``.

    ``x_dropped`` (``x_d``) is ``lora_dropout(x)``, drawn by the caller (the layer's own dropout
    module, so a seeded run reproduces its masks): ``x``'s shape and device, and ``x``'s dtype or
    the adapters' (PEFT casts ``x`` to the adapter dtype before its dropout). Other arguments as
    :func:`dora_linear`, which this equals for ``x_dropped = x``. One op: the two base GEMMs as one
    GEMM over ``[x; x_d]``, the factored norm, one fused pass for the DoRA terms (CUDA), C++
    autograd. Gradients flow to x, x_dropped, lora_A, lora_B, magnitude and bias.
    """
    return _ops.dora_linear_dropout.default(x, x_dropped, weight, bias, lora_A, lora_B, magnitude, scale)


def dora_linear_mixed(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: Sequence[torch.Tensor],
    lora_B: Sequence[torch.Tensor],
    magnitude: Sequence[torch.Tensor | None],
    scale: Sequence[float],
    adapter_index: torch.Tensor,
) -> torch.Tensor:
    """Many adapters in one batch (serving): leading row ``i`` of ``x`` (``[rows, ..., d_in]``: a
    sequence, or a token of 2-D x) uses adapter ``adapter_index[i]``; ``-1`` is the base model.

    Adapter ``k`` is ``lora_A[k]`` ``[r_k, d_in]``, ``lora_B[k]`` ``[d_out, r_k]``, ``scale[k]`` and
    ``magnitude[k]`` ``[d_out]`` for DoRA (its norm computed once and cached while the adapter is
    unchanged) or ``None`` for plain LoRA; ranks and kinds may differ. Every row equals
    :func:`dora_linear` (or LoRA) of that row alone with its adapter. The base GEMM runs once for the
    whole batch. Dtypes per adapter as :func:`dora_linear`. Inference only: a call that would record
    gradients raises. ``adapter_index`` is int64/int32 on the CPU or on x's device.
    """
    return _ops.dora_linear_mixed.default(x, weight, bias, list(lora_A), list(lora_B), list(magnitude),
                                          [float(s) for s in scale], adapter_index)


def share_adapter_storage(
    lora_A: Sequence[torch.Tensor], lora_B: Sequence[torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One layer's adapters copied into one new stack, returned as views of it (values unchanged).

    ``lora_A[k]`` ``[r_k, d_in]`` and ``lora_B[k]`` ``[d_out, r_k]``, one dtype and device. The views
    are plain tensors (no autograd history); ``lora_B[k]`` has the stack's rank as its row stride.
    :func:`dora_linear_mixed` over views of one stack (any of them, in any order) reads the adapters
    where they are: without it the CUDA kernels keep a stacked copy of each layer's adapters, so
    serving holds every adapter twice. Replace the adapters with the views (``p.data = view``);
    for a PEFT model, ``dora_ext.peft.share_adapters(model)`` does that for every accelerated layer
    and moves them out again before an optimizer steps them. Views made here are not safe for fused
    optimizers (torch's ``AdamW(fused=True)`` updates them as if contiguous on the CPU, over the next
    adapters' columns, and raises on CUDA): train them with a for-each or for-loop optimizer, or copy
    them out first.
    """
    a_stack, b_stack = _ops.shared_adapter_stack.default([t.detach() for t in lora_A], [t.detach() for t in lora_B])
    a_views, b_views, first = [], [], 0
    for a in lora_A:  # adapter k at its packed columns: the ranks before it, summed
        r = a.shape[0]
        a_views.append(a_stack.narrow(0, first, r))
        b_views.append(b_stack.narrow(1, first, r))
        first += r
    return a_views, b_views


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
    "fused_inference" | "eager", reason)``. The ``tier`` option (:func:`options`) overrides it."""
    return _ops.select_tier.default(x, weight, lora_A, training)


def last_tier() -> tuple[str, str]:
    """The tier and reason of the last DoRA op run by the C++ dispatcher on this thread.

    Per thread, so concurrent callers each see their own. Autograd runs CUDA backward passes on its
    own device thread: after ``.backward()`` this thread still shows the forward's tier; call the
    backward op (``torch.ops.dora_ext.*_backward``) directly to see the backward's.
    """
    return _ops.last_tier.default()


OPTION_NAMES = ("tier", "norm_cache", "decode_max_tokens", "fp32_parts_min_tokens", "saved_activation")


def _spell(name: str, value: str | bool | int) -> str:
    """An option value as the C++ side takes it (its environment variable's spelling)."""
    if name == "norm_cache" and isinstance(value, (bool, int)):
        return "1" if value else "0"
    return str(value)  # checked by the C++ side, which names the option in its error


def _typed(name: str, value: str) -> str | bool | int:
    if name in ("tier", "saved_activation"):
        return value
    if name == "norm_cache":
        return value == "1"
    return int(value)


def get_options() -> dict[str, str | bool | int]:
    """The run-time options in effect on this thread: ``tier`` (``"auto"``, ``"eager"``,
    ``"fused"`` or ``"prefer_fused"``), ``norm_cache`` (bool), ``decode_max_tokens`` and
    ``fp32_parts_min_tokens`` (ints), ``saved_activation`` (``"output"``, ``"z"`` or ``"recompute"``).
    README, "Options"."""
    return {name: _typed(name, _ops.get_option.default(name)) for name in OPTION_NAMES}


def set_options(**values: str | bool | int) -> None:
    """Sets options process-wide (every thread without its own override), e.g.
    ``set_options(tier="eager")``. Their environment variables give the values at start-up."""
    for name, value in values.items():
        _ops.set_option.default(name, _spell(name, value))


@contextlib.contextmanager
def options(**values: str | bool | int | None) -> Iterator[None]:
    """Overrides options on this thread for the body, e.g. ``with options(tier="eager",
    norm_cache=False):``; ``None`` leaves an option as it is. Calls made inside keep these options
    in their backward pass too (autograd runs it on another thread). Other threads are unaffected."""
    wanted = {name: value for name, value in values.items() if value is not None}
    previous = {name: _ops.thread_option.default(name) for name in wanted}
    try:
        for name, value in wanted.items():
            _ops.set_thread_option.default(name, _spell(name, value))
        yield
    finally:
        for name, value in previous.items():
            _ops.set_thread_option.default(name, value)


def overrides(tier: str | None = None, norm_cache: bool | None = None):
    """The earlier name of :func:`options` for ``tier`` and ``norm_cache`` (same behaviour)."""
    return options(tier=tier, norm_cache=norm_cache)


def norm_cache_stats() -> dict[str, int]:
    """Counters of the row-norm cache since the last :func:`clear_norm_cache`.

    What is reused and when it is recomputed (README, "Norm cache"): a forward that records
    gradients computes its norm fresh (``norm_misses``), except a checkpoint recompute inside the
    backward pass, which reuses its forward's norm (``norm_hits``); a norm used by a backward pass
    is dropped when that pass ends, and every optimizer step drops all of them (each counted in
    ``invalidations``); eval, no-grad and inference calls reuse a norm while W, A, B and the scale
    keep their identity, storage and version (``norm_hits``). ``weight_sq_hits``: misses that
    reused ``||W||^2``; ``scale_hits``: ``g = m / n`` reused; ``bypassed``: calls that skipped the
    cache (option ``norm_cache=False``, inference-mode tensors, CUDA-graph capture); ``entries``:
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
# Fake kernels for tracing: the real kernels' argument checks (_fake_checks), then output shapes,
# dtypes and devices.


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype norms and magnitude scales are computed and returned in for inputs of ``dtype``:
    float64 for float64, fp32 otherwise (csrc/checks.h ``accumulate_type``)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tokens(x: torch.Tensor) -> int:
    return math.prod(x.shape[:-1])


@torch.library.register_fake("dora_ext::row_norm")
def _row_norm_fake(weight, lora_A, lora_B, scale):
    _fake_checks.row_norm_args("row_norm", weight, lora_A, lora_B)
    return weight.new_empty((weight.shape[0],), dtype=accumulate_dtype(weight.dtype))


@torch.library.register_fake("dora_ext::row_norm_sq")
def _row_norm_sq_fake(weight, lora_A, lora_B, scale):
    _fake_checks.row_norm_args("row_norm_sq", weight, lora_A, lora_B)
    return weight.new_empty((weight.shape[0],), dtype=accumulate_dtype(weight.dtype))


@torch.library.register_fake("dora_ext::dora_linear")
def _dora_linear_fake(x, weight, bias, lora_A, lora_B, magnitude, scale):
    _fake_checks.dora_linear_args("dora_linear", x, weight, bias, lora_A, lora_B, magnitude)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("dora_ext::dora_linear_forward")
def _dora_linear_forward_fake(x, weight, bias, lora_A, lora_B, magnitude, scale, keep_z):
    _fake_checks.dora_linear_args("dora_linear", x, weight, bias, lora_A, lora_B, magnitude)
    d_out, tokens = weight.shape[0], _tokens(x)
    return (
        x.new_empty((*x.shape[:-1], d_out)),
        x.new_empty((tokens, d_out) if keep_z else (0,)),
        lora_A.new_empty((tokens, lora_A.shape[0])),  # h: float32 for float32 adapters on 16-bit x
        x.new_empty((d_out,), dtype=accumulate_dtype(x.dtype)),
    )


@torch.library.register_fake("dora_ext::dora_linear_backward")
def _dora_linear_backward_fake(grad_out, x, weight, bias, lora_A, lora_B, magnitude, norm, z, out, h, scale,
                               output_mask):
    op = "dora_linear_backward"
    _fake_checks.dora_linear_args(op, x, weight, bias, lora_A, lora_B, magnitude)
    y_shape = (*x.shape[:-1], weight.shape[0])
    _fake_checks.grad_out(op, grad_out, y_shape, x.dtype, x.device)
    if z is not None:
        _fake_checks.saved(op, "z", z, (_tokens(x), weight.shape[0]), x)
    if out is not None:
        _fake_checks.saved(op, "out", out, y_shape, x)
    # A masked-out gradient is a fresh empty tensor (never one shared object:
    # outputs must not alias each other, as in the real kernels).
    return (
        x.new_empty(x.shape if output_mask[0] else (0,)),
        lora_A.new_empty(lora_A.shape) if output_mask[1] else x.new_empty((0,)),
        lora_B.new_empty(lora_B.shape) if output_mask[2] else x.new_empty((0,)),
        magnitude.new_empty(magnitude.shape if output_mask[3] else (0,)),
        x.new_empty((weight.shape[0],) if output_mask[4] else (0,)),
    )


@torch.library.register_fake("dora_ext::dora_linear_dropout")
def _dora_linear_dropout_fake(x, x_dropped, weight, bias, lora_A, lora_B, magnitude, scale):
    _fake_checks.dora_linear_dropout_args("dora_linear_dropout", x, x_dropped, weight, bias, lora_A, lora_B,
                                          magnitude)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("dora_ext::dora_linear_dropout_forward")
def _dora_linear_dropout_forward_fake(x, x_dropped, weight, bias, lora_A, lora_B, magnitude, scale, keep_z):
    _fake_checks.dora_linear_dropout_args("dora_linear_dropout", x, x_dropped, weight, bias, lora_A, lora_B,
                                          magnitude)
    d_out, tokens = weight.shape[0], _tokens(x)
    return (
        x.new_empty((*x.shape[:-1], d_out)),
        x.new_empty((tokens, d_out) if keep_z else (0,)),
        lora_A.new_empty((tokens, lora_A.shape[0])),
        x.new_empty((d_out,), dtype=accumulate_dtype(x.dtype)),
    )


@torch.library.register_fake("dora_ext::dora_linear_dropout_backward")
def _dora_linear_dropout_backward_fake(grad_out, x_dropped, weight, lora_A, lora_B, magnitude, norm, z_dropped, h,
                                       scale, output_mask):
    op = "dora_linear_dropout_backward"
    x_like = x_dropped.new_empty(()).to(weight.dtype).expand(x_dropped.shape)
    _fake_checks.dora_linear_dropout_args(op, x_like, x_dropped, weight, None, lora_A, lora_B, magnitude)
    _fake_checks.grad_out(op, grad_out, (*x_dropped.shape[:-1], weight.shape[0]), weight.dtype, x_dropped.device)
    if z_dropped is not None:
        _fake_checks.saved(op, "z_dropped", z_dropped, (_tokens(x_dropped), weight.shape[0]), x_like)
    none = (0,)
    return (
        weight.new_empty(x_dropped.shape) if output_mask[0] else x_dropped.new_empty(none),
        x_dropped.new_empty(x_dropped.shape if output_mask[1] else none),
        lora_A.new_empty(lora_A.shape) if output_mask[2] else x_dropped.new_empty(none),
        lora_B.new_empty(lora_B.shape) if output_mask[3] else x_dropped.new_empty(none),
        magnitude.new_empty(magnitude.shape if output_mask[4] else none),
        weight.new_empty((weight.shape[0],)) if output_mask[5] else x_dropped.new_empty(none),
    )


#: The multiple of columns a stack of adapters is padded to (csrc/adapter_stack.cpp's kRankQuantum;
#: test_opcheck compares the fake kernel's shapes with the real op's).
_STACK_RANK_QUANTUM = 32


@torch.library.register_fake("dora_ext::shared_adapter_stack")
def _shared_adapter_stack_fake(lora_A, lora_B):
    _fake_checks.shared_adapter_stack_args("shared_adapter_stack", lora_A, lora_B)
    rank = -(-sum(a.shape[0] for a in lora_A) // _STACK_RANK_QUANTUM) * _STACK_RANK_QUANTUM
    return lora_A[0].new_empty((rank, lora_A[0].shape[1])), lora_B[0].new_empty((lora_B[0].shape[0], rank))


@torch.library.register_fake("dora_ext::dora_linear_mixed")
def _dora_linear_mixed_fake(x, weight, bias, lora_A, lora_B, magnitude, scale, adapter_index):
    _fake_checks.dora_linear_mixed_args("dora_linear_mixed", x, weight, bias, lora_A, lora_B, magnitude, scale,
                                        adapter_index)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("dora_ext::compose_delta")
def _compose_delta_fake(base, lora, magnitude, norm, scale):
    _fake_checks.compose_delta_args("compose_delta", base, lora, magnitude, norm)
    return base.new_empty(base.shape, dtype=torch.promote_types(base.dtype, lora.dtype))


@torch.library.register_fake("dora_ext::compose_delta_backward")
def _compose_delta_backward_fake(grad_out, base, lora, magnitude, norm, scale, output_mask):
    _fake_checks.compose_delta_args("compose_delta_backward", base, lora, magnitude, norm)
    _fake_checks.grad_out("compose_delta_backward", grad_out, base.shape, lora.dtype, base.device)
    return (
        base.new_empty(base.shape if output_mask[0] else (0,)),
        lora.new_empty(lora.shape if output_mask[1] else (0,)),
        magnitude.new_empty(magnitude.shape if output_mask[2] else (0,)),
    )

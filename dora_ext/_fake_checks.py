"""The argument checks of csrc/checks.cpp for the fake (meta) kernels.

Under torch.compile and torch.export the fake kernels stand in for the real ones; they must reject
what the real kernels reject (a device mix, a dtype mix, a wrong shape) with the same message,
not build an output for it. ``torch._check`` keeps the shape checks valid for symbolic sizes.
"""
from __future__ import annotations

import torch

_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_16BIT = (torch.float16, torch.bfloat16)
_DTYPE_RULE = ("; they must match (except the magnitude, any float dtype, and lora_A/lora_B, which may both be "
               "float32 with float16/bfloat16 x and weight)")


_C10_NAMES = {torch.float16: "Half", torch.bfloat16: "BFloat16", torch.float32: "Float", torch.float64: "Double",
              torch.int32: "Int", torch.int64: "Long", torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
              torch.bool: "Bool"}


def _check(condition, message: str) -> None:
    torch._check(condition, lambda: message)


def _dt(dtype: torch.dtype) -> str:
    """A dtype as c10 prints it in the real kernels' messages."""
    return _C10_NAMES.get(dtype, str(dtype))


def _sz(t_or_shape) -> str:
    """Sizes as c10 prints them: [a, b]."""
    shape = t_or_shape.shape if isinstance(t_or_shape, torch.Tensor) else t_or_shape
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _float(op: str, name: str, t: torch.Tensor) -> None:
    _check(t.dtype in _FLOAT, f"{op}: {name} must be float16, bfloat16, float32 or float64, got {_dt(t.dtype)}")


def _same_device(op: str, name: str, t: torch.Tensor, ref: torch.Tensor, ref_name: str) -> None:
    _check(t.device == ref.device, f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}; all tensors "
                                   "must be on one device")


def _same_dtype(op: str, name: str, t: torch.Tensor, ref: torch.Tensor, ref_name: str) -> None:
    _check(t.dtype == ref.dtype, f"{op}: {name} has dtype {_dt(t.dtype)} but {ref_name} has dtype {_dt(ref.dtype)}"
                                 + _DTYPE_RULE)


def _dim(op: str, name: str, t: torch.Tensor, dim: int, shape: str) -> None:
    _check(t.dim() == dim, f"{op}: {name} must be {dim}-D {shape}, got shape {_sz(t)}")


def row_norm_args(op: str, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
    _dim(op, "weight", weight, 2, "[d_out, d_in]")
    _dim(op, "lora_A", lora_A, 2, "[r, d_in]")
    _dim(op, "lora_B", lora_B, 2, "[d_out, r]")
    _float(op, "weight", weight)
    if weight.dtype in _16BIT and lora_A.dtype == torch.float32:
        _same_dtype(op, "lora_B", lora_B, lora_A, "lora_A")
    else:
        _same_dtype(op, "lora_A", lora_A, weight, "weight")
        _same_dtype(op, "lora_B", lora_B, weight, "weight")
    _same_device(op, "lora_A", lora_A, weight, "weight")
    _same_device(op, "lora_B", lora_B, weight, "weight")
    (d_out, d_in), r = weight.shape, lora_A.shape[0]
    _check(d_out >= 1, f"{op}: weight must be [d_out, d_in] with d_out >= 1 and d_in >= 1, got shape {_sz(weight)}")
    _check(d_in >= 1, f"{op}: weight must be [d_out, d_in] with d_out >= 1 and d_in >= 1, got shape {_sz(weight)}")
    _check(r >= 1, f"{op}: lora_A has rank 0 (shape {_sz(lora_A)}); DoRA needs r >= 1")
    _check(lora_A.shape[1] == d_in, f"{op}: lora_A must be [r, d_in] = [{r}, {d_in}] (weight is {_sz(weight)}), got "
                                    f"{_sz(lora_A)}")
    lora_B_message = (f"{op}: lora_B must be [d_out, r] = [{d_out}, {r}] (weight is {_sz(weight)}, lora_A is "
                      f"{_sz(lora_A)}), got {_sz(lora_B)}")
    _check(lora_B.shape[0] == d_out, lora_B_message)
    _check(lora_B.shape[1] == r, lora_B_message)


def dora_linear_args(op: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     lora_A: torch.Tensor, lora_B: torch.Tensor, magnitude: torch.Tensor) -> None:
    _check(x.dim() >= 1, f"{op}: x must have at least 1 dimension [..., d_in], got a 0-D tensor")
    _float(op, "x", x)
    _dim(op, "weight", weight, 2, "[d_out, d_in]")
    _same_dtype(op, "weight", weight, x, "x")
    _same_device(op, "weight", weight, x, "x")
    row_norm_args(op, weight, lora_A, lora_B)
    _check(x.shape[-1] == weight.shape[1], f"{op}: x has last dimension {x.shape[-1]} but weight is "
                                           f"{_sz(weight)} (expects d_in = {weight.shape[1]})")
    _dim(op, "magnitude", magnitude, 1, "[d_out]")
    _float(op, "magnitude", magnitude)
    _same_device(op, "magnitude", magnitude, x, "x")
    _check(magnitude.shape[0] == weight.shape[0],
           f"{op}: magnitude must be [d_out] = [{weight.shape[0]}], got {_sz(magnitude)}")
    if bias is not None:
        _dim(op, "bias", bias, 1, "[d_out]")
        _same_dtype(op, "bias", bias, x, "x")
        _same_device(op, "bias", bias, x, "x")
        _check(bias.shape[0] == weight.shape[0], f"{op}: bias must be [d_out] = [{weight.shape[0]}], got "
                                                 f"{_sz(bias)}")


def dora_linear_dropout_args(op: str, x: torch.Tensor, x_dropped: torch.Tensor, weight: torch.Tensor,
                             bias: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor,
                             magnitude: torch.Tensor) -> None:
    dora_linear_args(op, x, weight, bias, lora_A, lora_B, magnitude)
    _check(x_dropped.shape == x.shape, f"{op}: x_dropped must have the shape of x {_sz(x)}, got {_sz(x_dropped)}")
    _same_device(op, "x_dropped", x_dropped, x, "x")
    _check(x_dropped.dtype in (x.dtype, lora_A.dtype),
           f"{op}: x_dropped must have the dtype of x ({_dt(x.dtype)}) or of lora_A ({_dt(lora_A.dtype)}, PEFT's "
           f"dropout of the input cast to the adapter dtype), got {_dt(x_dropped.dtype)}")


def dora_linear_mixed_args(op: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           lora_A: list, lora_B: list, magnitude: list, scale: list,
                           adapter_index: torch.Tensor) -> None:
    _check(x.dim() >= 2, f"{op}: x must be [rows, ..., d_in] (one adapter per row), got shape {_sz(x)}")
    n = len(lora_A)
    _check(len(lora_B) == n and len(magnitude) == n and len(scale) == n,
           f"{op}: lora_A, lora_B, magnitude and scale must list the same adapters, got {n}, {len(lora_B)}, "
           f"{len(magnitude)} and {len(scale)} entries")
    _dim(op, "weight", weight, 2, "[d_out, d_in]")
    for k in range(n):
        m = magnitude[k] if magnitude[k] is not None else x.new_empty((weight.shape[0],), dtype=torch.float32)
        dora_linear_args(f"{op} (adapter {k})", x, weight, bias, lora_A[k], lora_B[k], m)
    _check(adapter_index.dim() == 1 and adapter_index.shape[0] == x.shape[0],
           f"{op}: adapter_index must be [rows] = [{x.shape[0]}] (one adapter per leading row of x), got shape "
           f"{_sz(adapter_index)}")
    _check(adapter_index.dtype in (torch.int64, torch.int32),
           f"{op}: adapter_index must be int64 or int32, got {_dt(adapter_index.dtype)}")


def shared_adapter_stack_args(op: str, lora_A: list, lora_B: list) -> None:
    _check(len(lora_A) >= 1, f"{op}: lora_A must list at least one adapter")
    _check(len(lora_B) == len(lora_A),
           f"{op}: lora_A and lora_B must list the same adapters, got {len(lora_A)} and {len(lora_B)} entries")
    _check(lora_A[0].dim() == 2 and lora_B[0].dim() == 2,
           f"{op}: lora_A[0] must be [r, d_in] and lora_B[0] [d_out, r], got {_sz(lora_A[0])} and {_sz(lora_B[0])}")
    d_in, d_out = lora_A[0].shape[1], lora_B[0].shape[0]
    for k, (a, b) in enumerate(zip(lora_A, lora_B)):
        _check(a.dim() == 2 and a.shape[1] == d_in and a.shape[0] >= 1,
               f"{op}: lora_A[{k}] must be [r, d_in] = [r, {d_in}] with r >= 1, got {_sz(a)}")
        _check(b.dim() == 2 and b.shape[0] == d_out and b.shape[1] == a.shape[0],
               f"{op}: lora_B[{k}] must be [d_out, r] = [{d_out}, {a.shape[0]}], got {_sz(b)}")


def compose_delta_args(op: str, base: torch.Tensor, lora: torch.Tensor, magnitude: torch.Tensor,
                       norm: torch.Tensor) -> None:
    _check(base.dim() >= 1, f"{op}: base must have at least 1 dimension [..., d_out], got a 0-D tensor")
    _float(op, "base", base)
    if not (base.dtype in _16BIT and lora.dtype == torch.float32):
        _same_dtype(op, "lora", lora, base, "base")
    _same_device(op, "lora", lora, base, "base")
    _check(lora.shape == base.shape, f"{op}: lora must have the shape of base {_sz(base)}, got {_sz(lora)}")
    d_out = base.shape[-1]
    _check(d_out >= 1, f"{op}: base must be [..., d_out] with d_out >= 1, got shape {_sz(base)}")
    _dim(op, "magnitude", magnitude, 1, "[d_out]")
    _float(op, "magnitude", magnitude)
    _same_device(op, "magnitude", magnitude, base, "base")
    _check(magnitude.shape[0] == d_out, f"{op}: magnitude must be [d_out] = [{d_out}], got {_sz(magnitude)}")
    _dim(op, "norm", norm, 1, "[d_out]")
    _same_device(op, "norm", norm, base, "base")
    want = torch.float64 if base.dtype == torch.float64 else torch.float32
    _check(norm.dtype == want, f"{op}: norm must be {_dt(want)} (as row_norm returns for {_dt(base.dtype)} inputs), "
                               f"got {_dt(norm.dtype)}")
    _check(norm.shape[0] == d_out, f"{op}: norm must be [d_out] = [{d_out}], got {_sz(norm)}")


def saved(op: str, name: str, t: torch.Tensor, shape, x: torch.Tensor) -> None:
    _check(tuple(t.shape) == tuple(shape), f"{op}: {name} must have shape {_sz(shape)}, got {_sz(t)}")
    _check(t.dtype == x.dtype, f"{op}: {name} must have x's dtype {_dt(x.dtype)}, got {_dt(t.dtype)}")
    _check(t.device == x.device, f"{op}: {name} must be on x's device {x.device}, got {t.device}")


def grad_out(op: str, grad: torch.Tensor, shape, dtype: torch.dtype, device: torch.device) -> None:
    _check(tuple(grad.shape) == tuple(shape), f"{op}: grad_out must have the output's shape {_sz(shape)}, got "
                                              f"{_sz(grad)}")
    _check(grad.dtype == dtype, f"{op}: grad_out must have the output's dtype {_dt(dtype)}, got {_dt(grad.dtype)}")
    _check(grad.device == device, f"{op}: grad_out must be on the output's device {device}, got {grad.device}")

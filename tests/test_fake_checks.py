"""The fake kernels (torch.compile / torch.export) reject what the real kernels reject, with the
same message: devices, dtypes and shapes (never an output built for bad input)."""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import dora_ext
from reference import make_inputs

D_IN, D_OUT, R, T = 12, 7, 3, 5
ops = torch.ops.dora_ext


def _linear_args(**over):
    a = make_inputs(D_IN, D_OUT, R, (T,), torch.float32)
    a.update(over)
    return a["x"], a["weight"], a["bias"], a["lora_A"], a["lora_B"], a["magnitude"], a["scale"]


def _compose_args(**over):
    a = {"base": torch.randn(T, D_OUT), "lora": torch.randn(T, D_OUT), "magnitude": torch.rand(D_OUT) + 0.5,
         "norm": torch.rand(D_OUT) + 0.5, "scale": 0.5}
    a.update(over)
    return a["base"], a["lora"], a["magnitude"], a["norm"], a["scale"]


BAD = {
    "dora_linear: x on meta, weights on cpu": (ops.dora_linear, lambda: _linear_args(x=torch.randn(T, D_IN,
                                                                                                   device="meta"))),
    "dora_linear: bf16 weight": (ops.dora_linear, lambda: _linear_args(weight=torch.randn(D_OUT, D_IN,
                                                                                          dtype=torch.bfloat16))),
    "dora_linear: d_in mismatch": (ops.dora_linear, lambda: _linear_args(x=torch.randn(T, D_IN + 1))),
    "dora_linear: lora_B rank": (ops.dora_linear, lambda: _linear_args(lora_B=torch.randn(D_OUT, R + 1))),
    "dora_linear: magnitude size": (ops.dora_linear, lambda: _linear_args(magnitude=torch.rand(D_OUT + 2))),
    "dora_linear: bias dtype": (ops.dora_linear, lambda: _linear_args(bias=torch.randn(D_OUT, dtype=torch.float64))),
    "dora_linear: rank 0": (ops.dora_linear, lambda: _linear_args(lora_A=torch.randn(0, D_IN),
                                                                  lora_B=torch.randn(D_OUT, 0))),
    "row_norm: lora_A d_in": (ops.row_norm, lambda: (torch.randn(D_OUT, D_IN), torch.randn(R, D_IN - 1),
                                                     torch.randn(D_OUT, R), 0.5)),
    "compose_delta: norm dtype": (ops.compose_delta, lambda: _compose_args(norm=torch.rand(D_OUT,
                                                                                          dtype=torch.float64))),
    "compose_delta: lora shape": (ops.compose_delta, lambda: _compose_args(lora=torch.randn(T + 1, D_OUT))),
    "compose_delta: int base": (ops.compose_delta, lambda: _compose_args(base=torch.ones(T, D_OUT, dtype=torch.int32),
                                                                         lora=torch.ones(T, D_OUT, dtype=torch.int32))),
}


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0]


@pytest.mark.parametrize("case", sorted(BAD))
def test_fake_kernel_rejects_what_the_real_one_rejects(case):
    op, make = BAD[case]
    args = make()
    on_meta = any(isinstance(a, torch.Tensor) and a.device.type == "meta" for a in args)
    if on_meta:  # meta tensors run the fake kernel; the real kernels see the same mix as cpu + cuda
        with pytest.raises(RuntimeError, match="weight is on cpu but x is on meta; all tensors must be on one device"):
            op(*args)
        return
    with pytest.raises(RuntimeError) as real_error:
        op(*args)
    with FakeTensorMode() as mode:
        fake_args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        with pytest.raises(RuntimeError) as fake_error:
            op(*fake_args)
    assert _first_line(fake_error.value) == _first_line(real_error.value)


def test_fake_kernels_still_trace_good_inputs():
    real = _linear_args()
    with FakeTensorMode() as mode:
        args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in real)
        y = ops.dora_linear(*args)
        assert y.shape == (T, D_OUT) and y.dtype == torch.float32
        out, z, h, n = ops.dora_linear_forward(*args, True)
        assert n.shape == (D_OUT,) and h.shape == (T, R) and z.shape == (T, D_OUT)
        assert ops.dora_linear_forward(*args, False)[1].shape == (0,)
    assert dora_ext.row_norm is not None

"""The DoRA row norm of a sharded (DTensor) base weight, without gathering the weight.

Under FSDP2 (``fully_shard``) and FSDP1 a layer's forward sees the *unsharded* weight that FSDP has
just all-gathered, so the layers in :mod:`dora_ext.nn` and :mod:`dora_ext.peft` call the plain ops
on it and nothing here is involved (docs/FSDP.md). This module is for the norm of a weight that is
still sharded: FSDP2 parameters outside forward (``DoRALinear.row_norm()`` on a sharded model,
monitoring, checks) and DTensor weights in general (tensor-parallel layouts).

The factored norm splits along the shards::

    ||W_i + s (B A)_i||^2 = ||W_i||^2 + 2s <B_i, (W A^T)_i> + s^2 B_i (A A^T) B_i^T

- ``W`` sharded along d_out (``Shard(0)``, FSDP2's layout): rows are independent. Each rank runs the
  ordinary op on its rows of W and B with the whole A (A is ``r x d_in``, r/d_out of W's size; an
  FSDP2-sharded A is all-gathered, W never is). The result is ``Shard(0)``.
- ``W`` sharded along d_in (``Shard(1)``): ``||W_i||^2``, ``W A^T`` and ``A A^T`` are sums over d_in
  and the squared norm is linear in them, so each rank computes the squared norm of its own columns
  (``torch.ops.dora_ext.row_norm_sq`` with A's matching columns and all of B) and one all-reduce of
  that ``[d_out]`` vector completes it. The result is replicated over those ranks.

Both compose over the dims of a device mesh. Sums are accumulated in fp32 (float64 for float64),
as in the op.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import Placement

from .ops import NORM_EPS, accumulate_dtype
from .ops import row_norm as _row_norm_op

__all__ = ["row_norm", "row_norm_partials"]

# Rows of a low-precision CPU weight upcast at a time (bounds the transient fp32 copy, as the op does).
_CPU_CHUNK_ROWS = 1024


def row_norm_partials(weight: torch.Tensor, lora_A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(||W_i||^2 [d_out], W A^T [d_out, r], A A^T [r, r])`` accumulated in fp32 (float64 for float64
    inputs), for plain tensors ``weight [d_out, k]`` and ``lora_A [r, k]`` over the same k columns.
    Summing these over a partition of the d_in columns gives the terms of the whole weight's norm."""
    acc = accumulate_dtype(weight.dtype)
    if weight.dtype == acc:
        return (torch.linalg.vector_norm(weight, dim=1).square(), weight @ lora_A.T, lora_A @ lora_A.T)
    if weight.is_cuda:  # 16-bit GEMMs on tensor cores with fp32 output; no upcast copy of W
        return (torch.linalg.vector_norm(weight, dim=1, dtype=acc).square(),
                torch.mm(weight, lora_A.T, out_dtype=acc), torch.mm(lora_A, lora_A.T, out_dtype=acc))
    a = lora_A.to(acc)
    w_sq = weight.new_empty(weight.shape[0], dtype=acc)
    u = weight.new_empty((weight.shape[0], a.shape[0]), dtype=acc)
    for start in range(0, weight.shape[0], _CPU_CHUNK_ROWS):
        chunk = weight[start:start + _CPU_CHUNK_ROWS].to(acc)
        w_sq[start:start + chunk.shape[0]] = chunk.square().sum(1)
        u[start:start + chunk.shape[0]] = chunk @ a.T
    return w_sq, u, a @ a.T


def _check_placements(placements: Sequence[Placement]) -> list[Placement]:
    out = []
    for p in placements:
        if type(p) is Shard:  # not _StridedShard and friends
            dim = p.dim + 2 if p.dim < 0 else p.dim
            if dim not in (0, 1):
                raise ValueError(f"dora_ext.distributed.row_norm: weight placement {p} is not a 2-D shard")
            out.append(Shard(dim))
        elif isinstance(p, Replicate):
            out.append(Replicate())
        else:
            raise ValueError(f"dora_ext.distributed.row_norm: weight placement {p} is not supported "
                             "(Shard(0), Shard(1) or Replicate per mesh dim)")
    return out


def _local_factor(t: torch.Tensor, mesh, placements: list[Placement], dim: int, offset: int,
                  length: int) -> torch.Tensor:
    """This rank's slice ``[offset, offset + length)`` along ``dim`` of a LoRA factor that is either a
    DTensor on the weight's mesh (redistributed to ``placements``: small, A or B only) or a full tensor."""
    if isinstance(t, DTensor):
        if t.device_mesh != mesh:
            raise ValueError("dora_ext.distributed.row_norm: lora_A / lora_B must live on the weight's device mesh")
        local = t.redistribute(mesh, placements).to_local()
    else:
        local = t.narrow(dim, offset, length)
    if local.shape[dim] != length:
        raise ValueError(f"dora_ext.distributed.row_norm: a LoRA factor's local slice has {local.shape[dim]} "
                         f"entries along dim {dim}, the weight's has {length}")
    return local


@torch.no_grad()
def row_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """``||W_i + scale (B A)_i||`` (fp32, float64 for float64; detached) for a DTensor ``weight``
    ``[d_out, d_in]`` placed ``Shard(0)``, ``Shard(1)`` or ``Replicate()`` on each mesh dim, without
    gathering the weight (see the module docstring). ``lora_A [r, d_in]`` and ``lora_B [d_out, r]`` are
    DTensors on the same mesh (any placements; they are redistributed, being small) or full plain
    tensors; all three share one dtype, as for :func:`dora_ext.row_norm`.

    Returns a DTensor ``[d_out]``: ``Shard(0)`` on the mesh dims where W is ``Shard(0)``, ``Replicate()``
    elsewhere. Plain tensors go straight to :func:`dora_ext.row_norm`. Collective: every rank of the
    mesh must call it.
    """
    if not isinstance(weight, DTensor):
        full = [t.full_tensor() if isinstance(t, DTensor) else t for t in (lora_A, lora_B)]
        return _row_norm_op(weight, full[0], full[1], scale)
    if weight.dim() != 2 or lora_A.dim() != 2 or lora_B.dim() != 2:
        raise ValueError("dora_ext.distributed.row_norm: weight, lora_A and lora_B must be 2-D")
    d_out, d_in = weight.shape
    r = lora_A.shape[0]
    if lora_A.shape[1] != d_in or tuple(lora_B.shape) != (d_out, r):
        raise ValueError(f"dora_ext.distributed.row_norm: shapes weight {tuple(weight.shape)}, lora_A "
                         f"{tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)} do not fit [d_out, d_in], "
                         "[r, d_in], [d_out, r]")
    if not (weight.dtype == lora_A.dtype == lora_B.dtype):
        raise ValueError(f"dora_ext.distributed.row_norm: weight, lora_A and lora_B must share a dtype, got "
                         f"{weight.dtype}, {lora_A.dtype}, {lora_B.dtype}")
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh = weight.device_mesh
    placements = _check_placements(weight.placements)
    local_w = weight.to_local()
    (rows, cols), (row_off, col_off) = compute_local_shape_and_global_offset(weight.shape, mesh, placements)
    a_placements = [Shard(1) if p == Shard(1) else Replicate() for p in placements]
    b_placements = [Shard(0) if p == Shard(0) else Replicate() for p in placements]
    local_a = _local_factor(lora_A, mesh, a_placements, 1, col_off, cols)
    local_b = _local_factor(lora_B, mesh, b_placements, 0, row_off, rows)

    reduce_dims = [i for i, p in enumerate(placements) if p == Shard(1) and mesh.size(i) > 1]
    if not any(p == Shard(1) for p in placements):  # whole rows here: the op itself (fused on CUDA)
        norm = _row_norm_op(local_w, local_a, local_b, scale)
    else:
        # the squared norm of this rank's columns; one all-reduce of [rows] per d_in-sharded mesh dim
        squared = torch.ops.dora_ext.row_norm_sq(local_w, local_a, local_b, scale)
        for i in reduce_dims:
            dist.all_reduce(squared, group=mesh.get_group(i))
        norm = squared.clamp_min(NORM_EPS * NORM_EPS).sqrt()
    return DTensor.from_local(norm, mesh, b_placements, run_check=False, shape=torch.Size([d_out]),
                              stride=(1,))

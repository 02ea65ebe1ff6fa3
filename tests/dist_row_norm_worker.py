"""Worker for tests/test_fsdp.py: dora_ext.distributed.row_norm against the float64 dense norm.

    torchrun --standalone --nproc_per_node 2 tests/dist_row_norm_worker.py OUT.json [cpu|cuda]

(cpu: gloo, the CI test; cuda: NCCL, one GPU per rank, run by scripts/fsdp_check.sh.)

Every rank draws the same fresh random W, A, B (seeded per case), distributes them with the
placements of the case and compares the gathered result with the float64 dense norm of the same
values. Also records the collectives each call issued (the weight must never be all-gathered) and
checks DoRALinear.row_norm() on an FSDP2-sharded layer. Rank 0 writes the cases to OUT.json.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode

sys.path.append(str(Path(__file__).resolve().parent.parent))  # an installed dora_ext keeps priority

import dora_ext  # noqa: E402
from dora_ext.distributed import row_norm  # noqa: E402
from dora_ext.nn import DoRALinear  # noqa: E402
from reference import NORM_TOL, ref_row_norm, rel_err  # noqa: E402  (tests/: this script's folder)

SCALE = 1.7
DEVICE = torch.device("cpu")  # set by main()


def factors(seed: int, d_out: int, d_in: int, r: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=gen).to(DEVICE, dtype)
    a = (torch.randn(r, d_in, generator=gen) / d_in ** 0.5).to(DEVICE, dtype)
    b = (0.5 * torch.randn(d_out, r, generator=gen)).to(DEVICE, dtype)
    return w, a, b


def comm_counts(comm: CommDebugMode) -> dict[str, int]:
    return {str(op): n for op, n in comm.get_comm_counts().items()}


def case(name: str, mesh, w_pl, a_spec, b_spec, dtype, shape, seed) -> dict[str, Any]:
    """``a_spec`` / ``b_spec``: a list of placements (a DTensor) or "full" (a plain full tensor)."""
    w, a, b = factors(seed, *shape, dtype)
    want = ref_row_norm(w, a, b, SCALE)
    dw = distribute_tensor(w, mesh, w_pl)
    da = a if a_spec == "full" else distribute_tensor(a, mesh, a_spec)
    db = b if b_spec == "full" else distribute_tensor(b, mesh, b_spec)
    with CommDebugMode() as comm:
        got = row_norm(dw, da, db, SCALE)
    expected_out = [Shard(0) if p == Shard(0) else Replicate() for p in w_pl]
    full = got.full_tensor()
    err = rel_err(full, want)
    counts = comm_counts(comm)
    gathers = sum(n for op, n in counts.items() if "gather" in op)
    out = {
        "case": name, "dtype": str(dtype), "shape": shape, "rel_err": err, "tol": NORM_TOL[dtype],
        "out_dtype": str(full.dtype), "placements": [str(p) for p in got.placements], "comm": counts,
        "ok": (err < NORM_TOL[dtype] and isinstance(got, DTensor) and list(got.placements) == expected_out
               and full.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
               and not got.requires_grad),
    }
    # The weight is never gathered. With A and B laid out as the computation needs them (A: W's
    # d_in shards, else replicated; B: W's d_out shards, else replicated) or given whole: no gather at
    # all, and one all-reduce per d_in-sharded mesh dim. FSDP2's layout (all Shard(0)): one gather, of A.
    reduces = sum(n for op, n in counts.items() if "allreduce" in op or "all_reduce" in op)
    want_reduces = sum(1 for p, size in zip(w_pl, mesh.shape) if p == Shard(1) and size > 1)
    a_ready = a_spec == "full" or list(a_spec) == [Shard(1) if p == Shard(1) else Replicate() for p in w_pl]
    b_ready = b_spec == "full" or list(b_spec) == [Shard(0) if p == Shard(0) else Replicate() for p in w_pl]
    fsdp_layout = list(w_pl) == [Shard(0)] and a_spec == [Shard(0)] and b_spec == [Shard(0)]
    if a_ready and b_ready:
        out["ok"] = out["ok"] and gathers == 0 and reduces == want_reduces
    elif fsdp_layout:
        out["ok"] = out["ok"] and gathers == 1 and reduces == 0
    return out


def fsdp_layer_case(mesh: DeviceMesh) -> dict[str, Any]:
    """DoRALinear.row_norm() of an FSDP2-sharded layer (DTensor parameters, outside forward)."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(3)
    layer = DoRALinear.from_linear(nn.Linear(19, 13), r=3, alpha=5.0).to(DEVICE)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.3)
    want = ref_row_norm(layer.base_layer.weight, layer.lora_A.weight, layer.lora_B.weight, layer.scaling)
    fully_shard(layer, mesh=mesh)  # explicit: fully_shard's default mesh is CUDA wherever a GPU exists
    assert isinstance(layer.base_layer.weight, DTensor)
    got = layer.row_norm()
    err = rel_err(got.full_tensor(), want)
    return {"case": "DoRALinear.row_norm under fully_shard", "rel_err": err, "tol": NORM_TOL[torch.float32],
            "placements": [str(p) for p in got.placements], "ok": err < NORM_TOL[torch.float32]}


def error_cases(mesh) -> dict[str, Any]:
    w, a, b = factors(9, 8, 6, 2, torch.float32)
    errors = {}
    for name, args in {
        "partial weight": (DTensor.from_local(w, mesh, [Partial()]), a, b),
        "dtype mismatch": (distribute_tensor(w, mesh, [Shard(0)]), a.double(), b),
        "shape mismatch": (distribute_tensor(w, mesh, [Shard(1)]), a[:, :5], b),
    }.items():
        try:
            row_norm(*args, SCALE)
            errors[name] = "no error"
        except ValueError as e:
            errors[name] = f"ValueError: {e}"
    return {"case": "errors", "errors": errors, "ok": all(v.startswith("ValueError") for v in errors.values())}


def main() -> None:
    global DEVICE
    if len(sys.argv) > 2 and sys.argv[2] == "cuda":
        DEVICE = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(DEVICE)
        dist.init_process_group("nccl", device_id=DEVICE)
    else:
        dist.init_process_group("gloo")
    world = dist.get_world_size()
    mesh = init_device_mesh(DEVICE.type, (world,))
    results = []
    seed = 0
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for shape in ((13, 19, 3), (8, 33, 1), (64, 96, 16)):
            for w_pl, a_spec, b_spec in (
                ([Shard(0)], "full", "full"),
                ([Shard(1)], "full", "full"),
                ([Replicate()], "full", "full"),
                ([Shard(0)], [Shard(0)], [Shard(0)]),   # FSDP2's layout of all three
                ([Shard(1)], [Shard(1)], [Replicate()]),  # laid out like W: no gather at all
                ([Shard(1)], [Shard(0)], [Shard(0)]),
                ([Shard(0)], [Replicate()], [Shard(0)]),
            ):
                seed += 1
                results.append(case(f"W{w_pl} A{a_spec} B{b_spec}", mesh, w_pl, a_spec, b_spec, dtype, shape, seed))
    for mesh_shape in ((world, 1), (1, world)):
        mesh2 = init_device_mesh(DEVICE.type, mesh_shape, mesh_dim_names=("x", "y"))
        for w_pl in ([Shard(0), Shard(1)], [Shard(1), Shard(0)], [Shard(1), Shard(1)]):
            a_spec = [Shard(1) if p == Shard(1) else Replicate() for p in w_pl]
            b_spec = [Shard(0) if p == Shard(0) else Replicate() for p in w_pl]
            seed += 1
            results.append(case(f"mesh{mesh_shape} W{w_pl}", mesh2, w_pl, a_spec, b_spec, torch.float32,
                                (13, 19, 3), seed))
    results.append(fsdp_layer_case(mesh))
    results.append(error_cases(mesh))
    # plain tensors go to the op unchanged
    w, a, b = factors(99, 7, 5, 2, torch.float32)
    plain = row_norm(w, a, b, SCALE)
    results.append({"case": "plain tensors", "rel_err": rel_err(plain, ref_row_norm(w, a, b, SCALE)),
                    "ok": not isinstance(plain, DTensor) and torch.equal(plain, dora_ext.row_norm(w, a, b, SCALE))})
    dist.barrier()  # a rank that tears gloo down while its peer still talks aborts the peer
    if dist.get_rank() == 0:
        Path(sys.argv[1]).write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Train a small DoRA MLP for a few steps and write what the C++ example (dora_mlp.cpp) reads.

    python examples/cpp/make_example.py --out example_data [--dtype float32] [--device cpu] [--aoti]
                                        [--tokens T --d-model D --d-hidden H --d-out O --blocks N] [--bench N]

Writes into --out:
    base.pt      the base model (dora_ext.export.save_base)
    adapter.pt   the DoRA adapter with precomputed norms (dora_ext.export.save_adapter)
    input.pt     "x": a batch [batch, tokens, d_model] in the model dtype
    python.pt    "y": the Python model's output for x (eval mode, dora_ext ops)
    model.pt2             with --aoti: the model exported by torch.export and compiled by AOTInductor
The model (attention-free): ``blocks`` residual MLP blocks ``x + fc2(gelu(fc1(layer_norm(x))))`` and a
``head``; fc1, fc2 and head are DoRA layers. dora_mlp.cpp mirrors it layer for layer.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import dora_ext.export
from dora_ext.nn import apply_dora, mark_only_dora_trainable

LAYER_NORM_EPS = 1e-5


class Block(nn.Module):
    """Pre-norm residual MLP block."""

    def __init__(self, d_model: int, d_hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model, eps=LAYER_NORM_EPS)
        self.fc1 = nn.Linear(d_model, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class MLP(nn.Module):
    """``blocks`` residual blocks and a linear head."""

    def __init__(self, d_model: int = 48, d_hidden: int = 72, d_out: int = 40, blocks: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(d_model, d_hidden) for _ in range(blocks))
        self.head = nn.Linear(d_model, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def trained_model(seed: int = 0, steps: int = 20, r: int = 6, alpha: float = 12.0, **dims: int) -> MLP:
    """A float32 MLP with DoRA on every linear layer, trained a few Adam steps on random data so that
    B != 0 and the magnitudes moved away from the row norms (g != 1)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = MLP(**dims)
    apply_dora(model, r=r, alpha=alpha)
    mark_only_dora_trainable(model)
    d_model = model.blocks[0].fc1.in_features
    d_out = model.head.out_features
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    for _ in range(steps):
        x = torch.randn(16, d_model, generator=gen)
        target = torch.randn(16, d_out, generator=gen)
        loss = F.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def make_input(d_model: int, dtype: torch.dtype, seed: int = 1, batch: int = 3, tokens: int = 5) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, tokens, d_model, generator=gen).to(dtype)


def aoti_package(model: nn.Module, x: torch.Tensor, path: Path) -> Path:
    """torch.export the model (its DoRA layers call torch.ops.dora_ext.dora_linear) and compile it with
    AOTInductor into a .pt2 package that C++ loads with torch::inductor::AOTIModelPackageLoader."""
    with torch.no_grad():
        ep = torch.export.export(model, (x,))
        return Path(torch._inductor.aoti_compile_and_package(ep, package_path=str(path)))


@torch.no_grad()
def bench(model: nn.Module, x: torch.Tensor, iters: int) -> float:
    """Median milliseconds of one forward (after 3 warm-up calls), synchronising CUDA each call."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    for _ in range(3):
        model(x)
    sync()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        model(x)
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu", help="device of the Python reference output and AOTI package")
    parser.add_argument("--aoti", action="store_true", help="also write model.pt2 (AOTInductor)")
    parser.add_argument("--tokens", type=int, default=5)
    parser.add_argument("--d-model", type=int, default=48)
    parser.add_argument("--d-hidden", type=int, default=72)
    parser.add_argument("--d-out", type=int, default=40)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--bench", type=int, default=0, metavar="N",
                        help="time N forward calls of the Python model and print the median (JSON)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    args.out.mkdir(parents=True, exist_ok=True)

    model = trained_model(d_model=args.d_model, d_hidden=args.d_hidden, d_out=args.d_out, blocks=args.blocks)
    dora_ext.export.save_base(model, args.out / "base.pt", dtype=dtype)
    dora_ext.export.save_adapter(model, args.out / "adapter.pt", dtype=dtype)
    model = model.to(device=args.device, dtype=dtype)
    x = make_input(model.blocks[0].fc1.in_features, dtype, tokens=args.tokens)
    dora_ext.export.save_tensors({"x": x}, args.out / "input.pt")
    with torch.no_grad():
        y = model(x.to(args.device))
    dora_ext.export.save_tensors({"y": y}, args.out / "python.pt")
    if args.bench > 0:
        print(json.dumps({"mode": "python", "device": args.device, "dtype": args.dtype,
                          "median_ms": bench(model, x.to(args.device), args.bench)}))
    if args.aoti:
        start = time.perf_counter()
        aoti_package(model, x.to(args.device), args.out / "model.pt2")
        print(f"make_example: AOTInductor package in {time.perf_counter() - start:.1f} s")
    print(f"make_example: wrote {args.out}")


if __name__ == "__main__":
    main()

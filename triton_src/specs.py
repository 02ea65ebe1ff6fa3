"""The table of kernel specialisations compiled ahead of time for every CUDA arch.

Each ``Spec`` is one cubin per arch: a @triton.jit kernel with its argument
types, constexpr values and launch configuration fixed. The C++ launcher finds
a cubin by ``(kernel, variant, arch)`` and reads the tile sizes from the table
to size the grid, so block shapes live here and nowhere else.

Variants:
  <dtype>            storage dtype of the activations: fp16, bf16 or fp32;
  _bias / _nobias    (scale kernel) whether a bias is added;
  _a16 / _any        _a16 promises 16-byte aligned pointers and row strides and a
                     column count divisible by 16 (vectorised loads); _any
                     promises nothing. The launcher checks and picks.
"""
from __future__ import annotations

from dataclasses import dataclass, field

DTYPES = ("fp16", "bf16", "fp32")


@dataclass(frozen=True)
class Spec:
    module: str                       # module in triton_src holding the kernel
    kernel: str                       # @triton.jit function name
    variant: str                      # key the C++ side asks for
    signature: dict[str, str]         # argument -> Triton type ("*bf16", "i64", "fp32")
    aligned: tuple[str, ...]          # arguments promised divisible by 16
    constexprs: dict[str, int] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 1
    tile: tuple[int, int] = (1, 1)    # (rows, cols) one program covers, for the grid

    @property
    def name(self) -> str:
        return f"{self.kernel}:{self.variant}"


def _scale_specs() -> list[Spec]:
    specs = []
    for dt in DTYPES:
        for bias in (True, False):
            for a16 in (True, False):
                sig = {"z_ptr": f"*{dt}", "g_ptr": "*fp32", "bias_ptr": f"*{dt}", "out_ptr": f"*{dt}",
                       "n_rows": "i64", "n_cols": "i64", "stride_z": "i64", "stride_out": "i64"}
                specs.append(Spec(
                    module="compose", kernel="dora_scale_kernel",
                    variant=f"{dt}_{'bias' if bias else 'nobias'}_{'a16' if a16 else 'any'}",
                    signature=sig,
                    aligned=("z_ptr", "g_ptr", "bias_ptr", "out_ptr", "n_cols", "stride_z", "stride_out") if a16 else (),
                    constexprs={"HAS_BIAS": int(bias), "BLOCK_M": 16, "BLOCK_N": 256},
                    num_warps=4, tile=(16, 256)))
    return specs


def _delta_specs() -> list[Spec]:
    specs = []
    for dt in DTYPES:
        for a16 in (True, False):
            sig = {"base_ptr": f"*{dt}", "lora_ptr": f"*{dt}", "g_ptr": "*fp32", "gm1_ptr": "*fp32",
                   "out_ptr": f"*{dt}",
                   "n_rows": "i64", "n_cols": "i64", "stride_base": "i64", "stride_lora": "i64",
                   "stride_out": "i64", "scale": "fp32"}
            specs.append(Spec(
                module="compose", kernel="dora_delta_kernel",
                variant=f"{dt}_{'a16' if a16 else 'any'}",
                signature=sig,
                aligned=("base_ptr", "lora_ptr", "g_ptr", "gm1_ptr", "out_ptr", "n_cols", "stride_base", "stride_lora",
                         "stride_out") if a16 else (),
                constexprs={"BLOCK_M": 16, "BLOCK_N": 256},
                num_warps=4, tile=(16, 256)))
    return specs


def _grad_prologue_specs() -> list[Spec]:
    specs = []
    for dt in DTYPES:
        for a16 in (True, False):
            sig = {"gy_ptr": f"*{dt}", "z_ptr": f"*{dt}", "g_ptr": "*fp32", "gz_ptr": f"*{dt}",
                   "partial_ptr": "*fp32", "n_rows": "i64", "n_cols": "i64", "stride_gy": "i64",
                   "stride_z": "i64", "stride_gz": "i64"}
            specs.append(Spec(
                module="compose", kernel="dora_grad_prologue_kernel",
                variant=f"{dt}_{'a16' if a16 else 'any'}",
                signature=sig,
                aligned=("gy_ptr", "z_ptr", "g_ptr", "gz_ptr", "partial_ptr", "n_cols", "stride_gy", "stride_z",
                         "stride_gz") if a16 else (),
                constexprs={"BLOCK_M": 32, "BLOCK_N": 128},
                num_warps=4, tile=(32, 128)))
    return specs


SPECS: tuple[Spec, ...] = tuple(_scale_specs() + _delta_specs() + _grad_prologue_specs())

# Archs compiled when DORA_EXT_CUDA_ARCHS is unset: every major family Triton
# targets from Ampere to Blackwell. Cubins below sm_90 also serve later minors
# of their major (an sm_80 cubin runs on sm_87); sm_90 and later are compiled
# arch-specific ("sm_90a") and serve only their exact arch.
DEFAULT_ARCHS: tuple[int, ...] = (80, 86, 89, 90, 100, 120)

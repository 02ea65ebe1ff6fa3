"""The table of kernel specialisations compiled ahead of time for every CUDA arch.

Each ``Spec`` is one cubin per arch: a @triton.jit kernel with its argument
types, constexpr values and launch configuration fixed. The C++ launcher finds
a cubin by ``(kernel, variant, arch)`` and reads the tile sizes from the table
to size the grid, so block shapes live here and nowhere else.

Variants: each kernel's variant key is a tuple of typed axes (KERNEL_KEYS below):
  dtype axes         a storage dtype: fp16, bf16 or fp32 (the delta kernels have two:
                     the base's and the lora's);
  flag axes          e.g. bias / nobias, z / noz, gbase / nogbase, wsq / nowsq;
  aligned            a16 promises 16-byte aligned pointers and row strides and a column
                     count divisible by 16 (vectorised loads); any promises nothing. The
                     launcher checks and picks;
  int axes           the norm kernel's rank tile, r16 ... r128; the parts kernel's layout and dim.
scripts/aot_build.py generates from KERNEL_KEYS one C++ struct per kernel
(kernel_variants.h, namespace dora_ext::kernels) whose fields are these axes and whose
variant() spells the key exactly as Spec.variant does: csrc/ never writes a key by hand.
"""
from __future__ import annotations

from dataclasses import dataclass, field

DTYPES = ("fp16", "bf16", "fp32")


@dataclass(frozen=True)
class Axis:
    """One typed part of a variant key: a C++ field of the generated struct and its spelling."""

    field: str                        # C++ field name
    kind: str                         # "dtype" (at::ScalarType), "flag" (bool) or "int" (int64_t)
    on: str = ""                      # flag: spelling when true; int: prefix of the number
    off: str = ""                     # flag: spelling when false

    def spell(self, value: str | bool | int) -> str:
        if self.kind == "dtype":
            assert value in DTYPES, value
            return str(value)
        if self.kind == "flag":
            return self.on if value else self.off
        return f"{self.on}{int(value)}"


def _dtype(field: str) -> Axis:
    return Axis(field, "dtype")


def _flag(field: str, on: str, off: str) -> Axis:
    return Axis(field, "flag", on, off)


ALIGNED = _flag("aligned", "a16", "any")
BIAS = _flag("bias", "bias", "nobias")

# kernel -> the axes of its variant key, in order (joined with "_").
KERNEL_KEYS: dict[str, tuple[Axis, ...]] = {
    "dora_scale_kernel": (_dtype("dtype"), BIAS, ALIGNED),
    "dora_delta_kernel": (_dtype("base_dtype"), _dtype("lora_dtype"), ALIGNED),
    "dora_delta_backward_kernel": (_dtype("base_dtype"), _dtype("lora_dtype"),
                                   _flag("write_grad_base", "gbase", "nogbase"), ALIGNED),
    "dora_fp32_compose_kernel": (_dtype("dtype"), BIAS, _flag("write_z", "z", "noz"), ALIGNED),
    "dora_grad_prologue_kernel": (_dtype("dtype"), ALIGNED),
    "dora_grad_prologue_output_kernel": (_dtype("dtype"), BIAS, ALIGNED),
    "dora_grad_output_finish_kernel": (BIAS,),
    "dora_decode_kernel": (_dtype("dtype"), _dtype("adapter_dtype"), BIAS, ALIGNED),
    "dora_mixed_decode_kernel": (_dtype("dtype"), _dtype("adapter_dtype"), BIAS, ALIGNED),
    "dora_mixed_lora_kernel": (_dtype("dtype"), _dtype("adapter_dtype"), BIAS, ALIGNED),
    "dora_norm_partials_kernel": (_dtype("dtype"), Axis("rank_tile", "int", "r"),
                                  _flag("weight_sq", "wsq", "nowsq"), ALIGNED),
    "dora_norm_finish_kernel": (_dtype("dtype"),),
    "dora_fp32_parts_kernel": (Axis("layout", "int", "layout"), Axis("dim", "int", "dim")),
}


def variant_name(kernel: str, key: tuple) -> str:
    """The variant string of ``key`` (one value per axis of ``KERNEL_KEYS[kernel]``)."""
    axes = KERNEL_KEYS[kernel]
    if len(key) != len(axes):
        raise ValueError(f"{kernel}: key {key} has {len(key)} values for axes {[a.field for a in axes]}")
    return "_".join(axis.spell(value) for axis, value in zip(axes, key))


@dataclass(frozen=True)
class Spec:
    module: str                       # module in triton_src holding the kernel
    kernel: str                       # @triton.jit function name
    key: tuple                        # one value per axis of KERNEL_KEYS[kernel]
    signature: dict[str, str]         # argument -> Triton type ("*bf16", "i64", "fp32")
    aligned: tuple[str, ...]          # arguments promised divisible by 16
    constexprs: dict[str, int] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 1
    tile: tuple[int, int] = (1, 1)    # (rows, cols) one program covers, for the grid
    small_smem: bool | None = None    # only for archs with (True) / without (False) small shared memory

    def builds_for(self, arch: int) -> bool:
        return self.small_smem is None or (arch in SMALL_SMEM_ARCHS) == self.small_smem

    @property
    def variant(self) -> str:
        """The key the C++ side asks for (through the struct generated for this kernel)."""
        return variant_name(self.kernel, self.key)

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
                    key=(dt, bias, a16),
                    signature=sig,
                    aligned=(("z_ptr", "g_ptr", "bias_ptr", "out_ptr", "n_cols", "stride_z", "stride_out")
                             if a16 else ()),
                    constexprs={"HAS_BIAS": int(bias), "BLOCK_M": 16, "BLOCK_N": 256},
                    num_warps=4, tile=(16, 256)))
    return specs


# (base dtype, lora dtype) pairs of the delta kernels: one dtype, or a 16-bit base with an fp32
# lora (PEFT's default fp32 adapters on a 16-bit model); the delta has the lora's dtype.
DELTA_DTYPES = (("fp16", "fp16"), ("bf16", "bf16"), ("fp32", "fp32"), ("fp16", "fp32"), ("bf16", "fp32"))


def _delta_specs() -> list[Spec]:
    specs = []
    for base_dt, dt in DELTA_DTYPES:
        for a16 in (True, False):
            sig = {"base_ptr": f"*{base_dt}", "lora_ptr": f"*{dt}", "g_ptr": "*fp32", "gm1_ptr": "*fp32",
                   "out_ptr": f"*{dt}",
                   "n_rows": "i64", "n_cols": "i64", "stride_base": "i64", "stride_lora": "i64",
                   "stride_out": "i64", "scale": "fp32"}
            specs.append(Spec(
                module="compose", kernel="dora_delta_kernel",
                key=(base_dt, dt, a16),
                signature=sig,
                aligned=("base_ptr", "lora_ptr", "g_ptr", "gm1_ptr", "out_ptr", "n_cols", "stride_base", "stride_lora",
                         "stride_out") if a16 else (),
                constexprs={"BLOCK_M": 16, "BLOCK_N": 256},
                num_warps=4, tile=(16, 256)))
    return specs


def _fp32_compose_specs() -> list[Spec]:
    specs = []
    for dt in ("fp16", "bf16"):  # the activations' dtype; the lora term is fp32
        for bias in (True, False):
            for write_z in (True, False):
                for a16 in (True, False):
                    sig = {"base_ptr": f"*{dt}", "lora_ptr": "*fp32", "g_ptr": "*fp32", "bias_ptr": f"*{dt}",
                           "y_ptr": f"*{dt}", "z_ptr": f"*{dt}", "n_rows": "i64", "n_cols": "i64",
                           "stride_base": "i64", "stride_lora": "i64", "stride_y": "i64", "stride_z": "i64",
                           "scale": "fp32"}
                    specs.append(Spec(
                        module="compose", kernel="dora_fp32_compose_kernel",
                        key=(dt, bias, write_z, a16),
                        signature=sig,
                        aligned=("base_ptr", "lora_ptr", "g_ptr", "bias_ptr", "y_ptr", "z_ptr", "n_cols",
                                 "stride_base", "stride_lora", "stride_y", "stride_z") if a16 else (),
                        constexprs={"HAS_BIAS": int(bias), "WRITE_Z": int(write_z), "BLOCK_M": 16, "BLOCK_N": 256},
                        num_warps=4, tile=(16, 256)))
    return specs


def _delta_backward_specs() -> list[Spec]:
    specs = []
    for base_dt, dt in DELTA_DTYPES:
        for write_grad_base in (True, False):
            for a16 in (True, False):
                sig = {"gy_ptr": f"*{dt}", "base_ptr": f"*{base_dt}", "lora_ptr": f"*{dt}", "g_ptr": "*fp32",
                       "gm1_ptr": "*fp32", "grad_base_ptr": f"*{base_dt}", "grad_lora_ptr": f"*{dt}",
                       "partial_ptr": "*fp32", "n_rows": "i64", "n_cols": "i64", "stride_gy": "i64",
                       "stride_base": "i64", "stride_lora": "i64", "stride_grad_base": "i64",
                       "stride_grad_lora": "i64", "scale": "fp32"}
                specs.append(Spec(
                    module="compose", kernel="dora_delta_backward_kernel",
                    key=(base_dt, dt, write_grad_base, a16),
                    signature=sig,
                    aligned=("gy_ptr", "base_ptr", "lora_ptr", "g_ptr", "gm1_ptr", "grad_base_ptr", "grad_lora_ptr",
                             "partial_ptr", "n_cols", "stride_gy", "stride_base", "stride_lora", "stride_grad_base",
                             "stride_grad_lora") if a16 else (),
                    constexprs={"WRITE_GRAD_BASE": int(write_grad_base), "BLOCK_M": 32, "BLOCK_N": 128},
                    num_warps=4, tile=(32, 128)))
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
                key=(dt, a16),
                signature=sig,
                aligned=("gy_ptr", "z_ptr", "g_ptr", "gz_ptr", "partial_ptr", "n_cols", "stride_gy", "stride_z",
                         "stride_gz") if a16 else (),
                constexprs={"BLOCK_M": 32, "BLOCK_N": 128},
                num_warps=4, tile=(32, 128)))
    return specs


def _grad_prologue_output_specs() -> list[Spec]:
    specs = []
    for dt in DTYPES:
        for bias in (True, False):
            for a16 in (True, False):
                sig = {"gy_ptr": f"*{dt}", "y_ptr": f"*{dt}", "g_ptr": "*fp32", "bias_ptr": f"*{dt}",
                       "gz_ptr": f"*{dt}", "partial_ptr": "*fp32", "n_rows": "i64", "n_cols": "i64",
                       "stride_gy": "i64", "stride_y": "i64", "stride_gz": "i64"}
                specs.append(Spec(
                    module="compose", kernel="dora_grad_prologue_output_kernel",
                    key=(dt, bias, a16),
                    signature=sig,
                    aligned=("gy_ptr", "y_ptr", "g_ptr", "bias_ptr", "gz_ptr", "partial_ptr", "n_cols", "stride_gy",
                             "stride_y", "stride_gz") if a16 else (),
                    constexprs={"HAS_BIAS": int(bias), "BLOCK_M": 32, "BLOCK_N": 128},
                    num_warps=4, tile=(32, 128)))
    return specs


def _grad_output_finish_specs() -> list[Spec]:
    sig = {"partial_ptr": "*fp32", "g_ptr": "*fp32", "norm_ptr": "*fp32", "grad_m_ptr": "*fp32",
           "unrecovered_ptr": "*i8", "count_ptr": "*i32", "n_programs": "i64", "n_cols": "i64", "min_scale": "fp32",
           "loss_limit": "fp32"}
    return [Spec(module="compose", kernel="dora_grad_output_finish_kernel", key=(bias,), signature=sig, aligned=(),
                 constexprs={"HAS_BIAS": int(bias), "BLOCK_N": 256}, num_warps=4, tile=(256, 1))
            for bias in (True, False)]


# The decode kernel's tile: 16 token rows (the smallest tensor-core tile), 32 output columns so that
# d_out / 32 programs stream W (128 for d_out = 4096), K tiles of 256. The best of the configs that
# scripts/bench_epilogue.py timed at T = 1 on an H100 (2026-11-28) for four of the five layer shapes;
# its 3 stages take 72 KiB of shared memory, which every arch in DEFAULT_ARCHS has. Float32 adapters
# walk the rank in tiles of 32 (IEEE float32 products run on the FMA units, not tensor cores: a
# short tile keeps the fp32 operands in registers).
DECODE_TILE = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 256}
DECODE_FP32_ADAPTERS_BLOCK_R = 32


def _decode_specs() -> list[Spec]:
    """The single-adapter decode kernel and its mixed-adapter sibling (dora_linear_mixed: h and B of
    every adapter side by side, a table G of g rows, and a row table saying which are each row's)."""
    specs = []
    for kernel in ("dora_decode_kernel", "dora_mixed_decode_kernel"):
        mixed = kernel == "dora_mixed_decode_kernel"
        for dt in ("fp16", "bf16"):  # fp32 keeps cuBLAS (tl.dot on fp32 would round through tf32)
            for adapter_dt in (dt, "fp32"):  # the adapters' dtype: x's, or PEFT's default float32
                fp32_adapters = adapter_dt == "fp32"
                for bias in (True, False):
                    for a16 in (True, False):
                        sig = {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "h_ptr": f"*{adapter_dt}",
                               "b_ptr": f"*{adapter_dt}", "g_ptr": "*fp32", "bias_ptr": f"*{dt}", "y_ptr": f"*{dt}",
                               "n_rows": "i64", "n_cols": "i64", "d_in": "i64", "rank": "i64", "stride_x": "i64",
                               "stride_w": "i64", "stride_h": "i64", "stride_b": "i64", "stride_y": "i64"}
                        if mixed:  # G's row stride and the row table (which holds the scales)
                            sig |= {"row_ptr": "*i32", "stride_g": "i64"}
                        else:
                            sig["scale"] = "fp32"
                        block_r = DECODE_FP32_ADAPTERS_BLOCK_R if fp32_adapters else DECODE_TILE["BLOCK_K"]
                        aligned = ("x_ptr", "w_ptr", "h_ptr", "b_ptr", "g_ptr", "bias_ptr", "y_ptr", "n_cols", "d_in",
                                   "rank", "stride_x", "stride_w", "stride_h", "stride_b", "stride_y")
                        specs.append(Spec(
                            module="decode", kernel=kernel,
                            key=(dt, adapter_dt, bias, a16),
                            signature=sig,
                            aligned=(aligned + (("stride_g",) if mixed else ())) if a16 else (),
                            constexprs={"HAS_BIAS": int(bias), "FP32_ADAPTERS": int(fp32_adapters), **DECODE_TILE,
                                        "BLOCK_R": block_r},
                            num_warps=4, num_stages=3, tile=(DECODE_TILE["BLOCK_M"], DECODE_TILE["BLOCK_N"])))
    return specs


# dora_mixed_lora_kernel's tile: tokens x columns of the base output, and the rank step (16 for
# float32 adapters, whose IEEE products run on the FMA units and hold fp32 operand tiles).
MIXED_LORA_TILE = {"BLOCK_M": 64, "BLOCK_N": 128}
MIXED_LORA_BLOCK_R = {False: 32, True: 16}


def _mixed_lora_specs() -> list[Spec]:
    """The adapters of a mixed batch on its base output (dora_linear_mixed above decode sizes)."""
    specs = []
    for dt in ("fp16", "bf16"):
        for adapter_dt in (dt, "fp32"):
            fp32_adapters = adapter_dt == "fp32"
            for bias in (True, False):
                for a16 in (True, False):
                    sig = {"z_ptr": f"*{dt}", "h_ptr": f"*{adapter_dt}", "b_ptr": f"*{adapter_dt}", "g_ptr": "*fp32",
                           "row_ptr": "*i32", "bias_ptr": f"*{dt}", "y_ptr": f"*{dt}", "n_tokens": "i64",
                           "n_cols": "i64", "per_row": "i64", "stride_z": "i64", "stride_h": "i64",
                           "stride_b": "i64", "stride_g": "i64", "stride_y": "i64"}
                    aligned = ("z_ptr", "h_ptr", "b_ptr", "g_ptr", "bias_ptr", "y_ptr", "n_cols", "stride_z",
                               "stride_h", "stride_b", "stride_g", "stride_y")
                    specs.append(Spec(
                        module="decode", kernel="dora_mixed_lora_kernel",
                        key=(dt, adapter_dt, bias, a16),
                        signature=sig,
                        aligned=aligned if a16 else (),
                        constexprs={"HAS_BIAS": int(bias), "FP32_ADAPTERS": int(fp32_adapters), **MIXED_LORA_TILE,
                                    "BLOCK_R": MIXED_LORA_BLOCK_R[fp32_adapters]},
                        num_warps=8, num_stages=2, tile=(MIXED_LORA_TILE["BLOCK_M"], MIXED_LORA_TILE["BLOCK_N"])))
    return specs


# The layouts of the parts kernel (triton_src/parts.py's LAYOUT, csrc/fp32_adapters.cpp's PartsLayout):
# [hi mid lo], the six products' left factor [hi hi hi mid mid lo] and their right factor
# [hi mid lo hi mid hi]. Each in both concatenation dims: six variants, no alignment axis (a copy
# pass whose strided and transposed inputs rarely promise 16 bytes).
PARTS_LAYOUTS = {"hi_mid_lo": 0, "six_a": 1, "six_b": 2}


def _fp32_parts_specs() -> list[Spec]:
    sig = {"t_ptr": "*fp32", "out_ptr": "*bf16", "n_rows": "i64", "n_cols": "i64", "stride_row": "i64",
           "stride_col": "i64"}
    return [Spec(module="parts", kernel="dora_fp32_parts_kernel", key=(layout, dim), signature=sig, aligned=(),
                 constexprs={"LAYOUT": layout, "DIM": dim, "BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4, tile=(32, 64))
            for layout in PARTS_LAYOUTS.values() for dim in (0, 1)]


# Archs whose blocks may opt in to at most ~99 KB of shared memory (consumer and
# workstation parts); the others have 163 KB (sm_80) or more.
SMALL_SMEM_ARCHS: tuple[int, ...] = (75, 86, 89, 120, 121)

# Rank tile -> (BLOCK_M, BLOCK_K, num_warps, num_stages) of the norm's partials kernel, for
# 16-bit and fp32 inputs on large- and small-smem archs. The launcher picks the smallest
# rank tile >= r (capped at 128; larger ranks use several rank tiles). The large-smem
# 16-bit entries won scripts/tune_norm.py on an H200 (2026-11-27); the others are sized
# to fit their shared memory.
INPUT_KINDS = {"bf16": 0, "fp16": 1, "fp32": 2}  # the norm kernel's INPUT_KIND per input dtype
NORM_CONFIGS: dict[tuple[str, bool], dict[int, tuple[int, int, int, int]]] = {
    ("16bit", False): {16: (64, 64, 4, 4), 32: (64, 64, 4, 4), 64: (128, 64, 4, 4), 128: (256, 64, 8, 4)},
    ("16bit", True): {16: (128, 64, 4, 3), 32: (128, 64, 4, 3), 64: (64, 64, 4, 3), 128: (128, 64, 8, 2)},
    ("fp32", False): {16: (128, 32, 4, 3), 32: (128, 32, 4, 3), 64: (64, 32, 4, 3), 128: (128, 32, 8, 3)},
    ("fp32", True): {16: (128, 32, 4, 2), 32: (128, 32, 4, 2), 64: (64, 32, 4, 2), 128: (128, 32, 8, 2)},
}


def _norm_partials_specs() -> list[Spec]:
    specs = []
    for dt, small in ((dt, small) for dt in DTYPES for small in (False, True)):
        configs = NORM_CONFIGS[("fp32" if dt == "fp32" else "16bit", small)]
        for block_r, (block_m, block_k, warps, stages) in configs.items():
            sig = {"w_ptr": f"*{dt}", "a_ptr": f"*{dt}", "b_ptr": f"*{dt}", "gram_ptr": "*fp32",
                   "cross_ptr": "*fp32", "wsq_ptr": "*fp32", "d_out": "i64", "d_in": "i64", "rank": "i64",
                   "stride_w": "i64", "stride_a": "i64", "stride_b": "i64", "k_per_split": "i64", "scale": "fp32"}
            # Both passes (||W||^2 computed once per weight, then cached) come in two
            # alignments: "a16" also promises r, B's row stride and B's pointer 16-aligned,
            # which vectorises the Gram epilogue's loads of B and G ("any" loads them with
            # 4-byte async copies).
            for wsq, a16 in ((False, True), (False, False), (True, True), (True, False)):
                extra = ("b_ptr", "gram_ptr", "rank", "stride_b") if a16 else ()
                specs.append(Spec(
                    module="norm", kernel="dora_norm_partials_kernel",
                    key=(dt, block_r, wsq, a16),
                    signature=sig,
                    aligned=("w_ptr", "a_ptr", "cross_ptr", "wsq_ptr", "d_in", "stride_w", "stride_a",
                             "k_per_split") + extra,
                    constexprs={"BLOCK_M": block_m, "BLOCK_R": block_r, "BLOCK_K": block_k, "BLOCK_J": 32,
                                "INPUT_KIND": INPUT_KINDS[dt], "WSQ": int(wsq)},
                    num_warps=warps, num_stages=stages, tile=(block_m, block_r), small_smem=small))
    return specs


def _norm_finish_specs() -> list[Spec]:
    sig = {"cross_ptr": "*fp32", "wsq_ptr": "*fp32", "norm_ptr": "*fp32", "wsq_out_ptr": "*fp32", "d_out": "i64",
           "n_cross_parts": "i64", "n_wsq_parts": "i64", "write_wsq": "i64", "scale": "fp32", "eps_sq": "fp32"}
    return [Spec(module="norm", kernel="dora_norm_finish_kernel", key=("fp32",), signature=sig, aligned=(),
                 constexprs={"BLOCK_M": 256}, num_warps=4, tile=(256, 1))]


# Archs compiled when DORA_EXT_CUDA_ARCHS is unset: every major family Triton
# targets from Ampere to Blackwell. Cubins below sm_90 also serve later minors
# of their major (an sm_80 cubin runs on sm_87); sm_90 and later are compiled
# arch-specific ("sm_90a") and serve only their exact arch.
DEFAULT_ARCHS: tuple[int, ...] = (80, 86, 89, 90, 100, 120)

SPECS: tuple[Spec, ...] = tuple(_scale_specs() + _delta_specs() + _delta_backward_specs() + _fp32_compose_specs() +
                                _grad_prologue_specs() + _grad_prologue_output_specs() + _grad_output_finish_specs() +
                                _decode_specs() + _mixed_lora_specs() + _norm_partials_specs() + _norm_finish_specs() +
                                _fp32_parts_specs())

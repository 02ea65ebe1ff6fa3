#!/usr/bin/env python3
"""Compile every kernel specialisation in triton_src/specs.py to cubin, ahead of time.

For each arch in the arch list and each Spec, Triton's compiler (the same
``triton.compile`` call that ``triton.tools.compile`` makes) produces a cubin;
this script embeds all of them in one generated C++ file, ``kernel_images.cpp``,
which defines ``dora_ext::kernel_images()`` for the launcher (csrc/launcher.cpp),
writes ``kernel_variants.h`` (one typed key struct per kernel, from
``specs.KERNEL_KEYS``: how csrc/ names the variant it launches) and
``manifest.json`` describing what was built.

It needs no GPU and no CUDA driver: an offline stand-in driver tells Triton
which arch to target. Arch list: ``--archs`` or the environment variable
``DORA_EXT_CUDA_ARCHS`` ("80;90", "8.0 9.0", "9.0a" and "all" are accepted);
by default every arch in specs.DEFAULT_ARCHS.

    python scripts/aot_build.py --out build/aot
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from triton_src.specs import DEFAULT_ARCHS, KERNEL_KEYS, SPECS, Axis, Spec  # noqa: E402

ARCH_ENV = "DORA_EXT_CUDA_ARCHS"
PARAM_KIND = {"i64": "l", "i32": "i", "fp32": "f"}  # pointers ("*...") are "p"


def parse_archs(text: str | None) -> list[int]:
    """Turn "80;90", "8.0 9.0+PTX", "9.0a" or "all" into sorted unique [80, 90]."""
    if not text or text.strip().lower() == "all":
        return list(DEFAULT_ARCHS)
    if text.strip().lower() == "none":  # CPU-only library: an empty registry
        return []
    archs = set()
    for item in re.split(r"[;,\s]+", text.strip()):
        if not item:
            continue
        m = re.fullmatch(r"(?:sm_)?(\d+)(?:\.(\d))?a?(?:\+PTX)?", item, flags=re.IGNORECASE)
        if not m:
            raise SystemExit(f"{ARCH_ENV}: cannot parse arch '{item}' (expected e.g. 80, 8.0, sm_90)")
        archs.add(int(m.group(1)) * 10 + int(m.group(2)) if m.group(2) is not None else int(m.group(1)))
    return sorted(archs)


def _install_offline_driver(arch: int) -> None:
    """Make Triton believe a CUDA device of `arch` is present (no libcuda needed)."""
    import triton
    from triton.backends.compiler import GPUTarget

    class OfflineCudaDriver:
        def __init__(self, arch: int) -> None:
            self.arch = arch

        def get_current_target(self):
            return GPUTarget("cuda", self.arch, 32)

        def get_active_torch_device(self):
            raise RuntimeError("ahead-of-time build: no device")

        def is_active(self) -> bool:
            return True

    triton.runtime.driver.set_active(OfflineCudaDriver(arch))


def _ptx_param_count(ptx: str, name: str) -> int:
    m = re.search(r"\.entry\s+" + re.escape(name) + r"\s*\((.*?)\)", ptx, flags=re.S)
    if not m:
        raise RuntimeError(f"entry {name} not found in PTX")
    return len(re.findall(r"\.param\s", m.group(1)))


def compile_one(spec: Spec, arch: int) -> dict:
    """Compile one spec for one arch; returns the image record (cubin as bytes)."""
    import triton
    from triton.backends.compiler import GPUTarget

    _install_offline_driver(arch)
    fn = getattr(importlib.import_module(f"triton_src.{spec.module}"), spec.kernel)
    names = fn.arg_names
    signature = {n: spec.signature.get(n, "constexpr") for n in names}
    missing = [n for n in names if n not in spec.signature and n not in spec.constexprs]
    if missing:
        raise RuntimeError(f"{spec.name}: arguments {missing} have neither a type nor a constexpr value")
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in spec.aligned}
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=dict(spec.constexprs), attrs=attrs)
    target = GPUTarget("cuda", arch, 32)
    backend = triton.compiler.make_backend(target)
    options = backend.parse_options({"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    compiled = triton.compile(src, target=target, options=options.__dict__)
    md = compiled.metadata
    for attr in ("global_scratch_size", "profile_scratch_size"):
        if getattr(md, attr, 0):
            raise RuntimeError(f"{spec.name} sm_{arch}: needs {attr}={getattr(md, attr)}; the launcher passes none")
    if (getattr(md, "num_ctas", 1) != 1 or getattr(md, "launch_cooperative_grid", False)
            or getattr(md, "launch_pdl", False)):
        raise RuntimeError(f"{spec.name} sm_{arch}: clusters, cooperative or PDL launches are not supported")
    user_params = [n for n in names if n in spec.signature]
    n_ptx = _ptx_param_count(compiled.asm["ptx"], md.name)
    trailing = n_ptx - len(user_params)
    if not 0 <= trailing <= 2:
        raise RuntimeError(f"{spec.name} sm_{arch}: PTX has {n_ptx} params for {len(user_params)} arguments")
    kinds = "".join("p" if spec.signature[n].startswith("*") else PARAM_KIND[spec.signature[n]] for n in user_params)
    return {
        "kernel": spec.kernel, "variant": spec.variant, "arch": arch, "function": md.name,
        "num_warps": md.num_warps, "shared": md.shared, "tile": list(spec.tile), "params": kinds,
        "trailing_null_params": trailing, "cubin": compiled.asm["cubin"],
    }


def _compile_arch(arch: int) -> list[dict]:
    return [compile_one(spec, arch) for spec in SPECS if spec.builds_for(arch)]


def _c_bytes(data: bytes) -> str:
    lines = []
    for i in range(0, len(data), 80):
        lines.append('    "' + "".join(f"\\{b:03o}" for b in data[i:i + 80]) + '"')
    return "\n".join(lines)


def write_cpp(images: list[dict], triton_version: str, path: Path) -> None:
    parts = ["// Generated by scripts/aot_build.py. Do not edit.",
             '#include "kernel_registry.h"', "", "namespace dora_ext {",
             f'const char* aot_triton_version() {{ return "{triton_version}"; }}', "namespace {"]
    for i, img in enumerate(images):
        parts.append(f"// {img['kernel']}:{img['variant']} sm_{img['arch']}")
        parts.append(f"alignas(16) constexpr char kCubin{i}[] =\n{_c_bytes(img['cubin'])};")
    parts.append("const KernelImage kImages[] = {")
    for i, img in enumerate(images):
        parts.append(
            f'    {{"{img["kernel"]}", "{img["variant"]}", {img["arch"]}, "{img["function"]}", '
            f'reinterpret_cast<const unsigned char*>(kCubin{i}), sizeof(kCubin{i}) - 1, '
            f'{img["num_warps"]}, {img["shared"]}, {img["tile"][0]}, {img["tile"][1]}, '
            f'"{img["params"]}", {img["trailing_null_params"]}}},')
    parts += ["};", "}  // namespace", "",
              "c10::ArrayRef<KernelImage> kernel_images() {",
              "  return c10::ArrayRef<KernelImage>(kImages, sizeof(kImages) / sizeof(kImages[0]));",
              "}", "}  // namespace dora_ext", ""]
    if not images:  # an empty array is ill-formed: keep the symbol, list nothing
        parts = ["// Generated by scripts/aot_build.py: no CUDA arch requested.", '#include "kernel_registry.h"',
                 "namespace dora_ext {", "c10::ArrayRef<KernelImage> kernel_images() { return {}; }",
                 f'const char* aot_triton_version() {{ return "{triton_version}"; }}',
                 "}  // namespace dora_ext", ""]
    text = "\n".join(parts)
    if not path.exists() or path.read_text() != text:  # keep the timestamp: no needless rebuilds
        path.write_text(text)


_CXX_TYPE = {"dtype": "c10::ScalarType", "flag": "bool", "int": "int64_t"}
_SCALAR_TYPE = {"fp16": "c10::ScalarType::Half", "bf16": "c10::ScalarType::BFloat16",
                "fp32": "c10::ScalarType::Float"}


def _struct_name(kernel: str) -> str:
    """dora_norm_partials_kernel -> NormPartials."""
    return "".join(w.capitalize() for w in kernel.removeprefix("dora_").removesuffix("_kernel").split("_"))


def _cxx_spelling(axis: Axis) -> str:
    """A C++ expression appending the spelling of ``axis`` (a field of the struct) to ``v``."""
    if axis.kind == "dtype":
        return f"v += dtype_spelling({axis.field});"
    if axis.kind == "flag":
        return f'v += {axis.field} ? "{axis.on}" : "{axis.off}";'
    return f'v += "{axis.on}" + std::to_string({axis.field});'


def write_variants_header(path: Path) -> None:
    """``kernel_variants.h``: for each kernel of specs.KERNEL_KEYS a struct whose fields are its key's
    axes and whose ``variant()`` spells the key as ``specs.variant_name`` does."""
    dtype_cases = "\n".join(f'    case {_SCALAR_TYPE[d]}:\n      return "{d}";' for d in _SCALAR_TYPE)
    parts = ["// Generated by scripts/aot_build.py from triton_src/specs.py (KERNEL_KEYS). Do not edit.",
             "#pragma once", "#include <c10/core/ScalarType.h>", "#include <c10/util/Exception.h>", "",
             "#include <cstdint>", "#include <string>", "", "namespace dora_ext::kernels {", "",
             "// The dtype axis of a variant key: the kernels exist for these storage dtypes only.",
             "inline const char* dtype_spelling(c10::ScalarType dtype) {", "  switch (dtype) {", dtype_cases,
             "    default:", '      TORCH_CHECK(false, "dora_ext: no fused kernels for dtype ", dtype);', "  }", "}"]
    for kernel, axes in KERNEL_KEYS.items():
        spelled = "_".join(f"<{a.field}>" if a.kind != "flag" else f"{{{a.on}|{a.off}}}" for a in axes)
        parts += ["", f"// {kernel}: variants {spelled}", f"struct {_struct_name(kernel)} {{",
                  f'  static constexpr const char* kernel = "{kernel}";']
        parts += [f"  {_CXX_TYPE[a.kind]} {a.field};" for a in axes]
        parts += ["", "  std::string variant() const {", "    std::string v;"]
        for i, axis in enumerate(axes):
            if i:
                parts.append("    v += '_';")
            parts.append("    " + _cxx_spelling(axis))
        parts += ["    return v;", "  }", "};"]
    parts += ["", "}  // namespace dora_ext::kernels", ""]
    text = "\n".join(parts)
    if not path.exists() or path.read_text() != text:  # keep the timestamp: no needless rebuilds
        path.write_text(text)


def build(out: Path, archs: list[int], jobs: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    write_variants_header(out / "kernel_variants.h")
    if not archs:  # CPU-only library: no Triton needed
        write_cpp([], "none", out / "kernel_images.cpp")
        manifest = {"triton_version": "none", "archs": [], "seconds": 0.0, "jobs": jobs, "kernels": []}
        (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        return manifest
    import triton

    # Triton's compile cache goes to a private folder: the user's cache is never touched.
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="dora_ext_aot_")
    start = time.perf_counter()
    if jobs > 1 and len(archs) > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            per_arch = list(pool.map(_compile_arch, archs))
    else:
        per_arch = [_compile_arch(a) for a in archs]
    images = [img for batch in per_arch for img in batch]
    seconds = time.perf_counter() - start
    write_cpp(images, triton.__version__, out / "kernel_images.cpp")
    manifest = {
        "triton_version": triton.__version__,
        "archs": archs,
        "seconds": round(seconds, 2),
        "jobs": jobs,
        "kernels": [{k: v for k, v in img.items() if k != "cubin"} | {"cubin_bytes": len(img["cubin"])}
                    for img in images],
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for kernel_images.cpp, kernel_variants.h and manifest.json")
    parser.add_argument("--archs", default=os.environ.get(ARCH_ENV), help=f"arch list (default: ${ARCH_ENV} or all)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    args = parser.parse_args()
    archs = parse_archs(args.archs)
    manifest = build(args.out, archs, args.jobs)
    print(f"aot_build: {len(manifest['kernels'])} cubins for sm_{', sm_'.join(map(str, archs))} "
          f"in {manifest['seconds']} s (triton {manifest['triton_version']}) -> {args.out}")


if __name__ == "__main__":
    main()

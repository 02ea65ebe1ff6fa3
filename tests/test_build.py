"""The build: AOT cubins for every requested arch, and a library that imports without a GPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dora_ext

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # after site-packages: the installed dora_ext wins

from scripts.aot_build import _struct_name, compile_one, parse_archs, write_variants_header  # noqa: E402
from triton_src.specs import KERNEL_KEYS, SPECS  # noqa: E402

MANIFEST = Path(dora_ext.__file__).parent / "aot_manifest.json"


def test_library_reports_the_archs_of_its_manifest():
    info = dora_ext.info()
    manifest = json.loads(MANIFEST.read_text())
    assert info["archs"] == manifest["archs"]
    assert info["kernels"] == len(manifest["kernels"])
    if info["cuda_build"]:
        assert info["archs"], "a CUDA build with no cubins"
        assert info["triton_version"] == manifest["triton_version"]


def test_every_spec_was_compiled_for_every_arch():
    manifest = json.loads(MANIFEST.read_text())
    built = {(k["kernel"], k["variant"], k["arch"]) for k in manifest["kernels"]}
    expected = {(s.kernel, s.variant, a) for s in SPECS for a in manifest["archs"]}
    assert built == expected
    requested = os.environ.get("DORA_EXT_CUDA_ARCHS")
    if requested is not None and dora_ext.info()["cuda_build"]:
        assert manifest["archs"] == parse_archs(requested)


@pytest.mark.parametrize("text,expected", [
    ("80;90", [80, 90]), ("8.0 9.0", [80, 90]), ("sm_90a", [90]), ("9.0+PTX,8.6", [86, 90]), ("none", []),
])
def test_arch_list_parsing(text, expected):
    assert parse_archs(text) == expected


def test_bad_arch_is_refused():
    with pytest.raises(SystemExit, match="cannot parse arch"):
        parse_archs("ampere")


def test_aot_compiles_without_a_gpu_or_driver(tmp_path, monkeypatch):
    """One spec for sm_90 through the offline driver: a cubin, the entry point and its argument kinds."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    spec = next(s for s in SPECS if s.kernel == "dora_delta_kernel" and s.variant == "bf16_bf16_a16")
    image = compile_one(spec, 90)
    assert image["cubin"][:4] == b"\x7fELF"
    assert image["params"] == "ppppplllllf"
    assert image["trailing_null_params"] in (0, 1, 2)
    assert image["num_warps"] == spec.num_warps


def _cxx_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    names = {"fp16": "Half", "bf16": "BFloat16", "fp32": "Float"}
    return f"c10::ScalarType::{names[value]}"


def test_generated_variant_structs_spell_every_spec(tmp_path):
    """csrc/ names a kernel variant through the structs aot_build.py generates (kernel_variants.h):
    compiled and run, each struct spells every spec's key exactly as the cubin table does."""
    import shutil

    from torch.utils.cpp_extension import include_paths, library_paths

    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    write_variants_header(tmp_path / "kernel_variants.h")
    assert set(KERNEL_KEYS) == {s.kernel for s in SPECS}
    lines = ['#include "kernel_variants.h"', "#include <iostream>", "int main() {",
             "  using namespace dora_ext::kernels;"]
    for spec in SPECS:
        values = ", ".join(_cxx_value(v) for v in spec.key)
        lines.append(f'  std::cout << {_struct_name(spec.kernel)}::kernel << ":" '
                     f'<< {_struct_name(spec.kernel)}{{{values}}}.variant() << "\\n";')
    lines += ["}", ""]
    (tmp_path / "main.cpp").write_text("\n".join(lines))
    std = "-std=c++20" if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 14) else "-std=c++17"
    libs = library_paths()[0]
    cmd = [compiler, std, "-O0", "-D_GLIBCXX_USE_CXX11_ABI=" + str(int(torch._C._GLIBCXX_USE_CXX11_ABI)),
           "-I", str(tmp_path), *[f"-I{p}" for p in include_paths()], str(tmp_path / "main.cpp"),
           f"-L{libs}", "-lc10", f"-Wl,-rpath,{libs}", "-o", str(tmp_path / "spell")]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(tmp_path / "spell")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [s.name for s in SPECS]


def test_import_and_eager_path_without_a_gpu():
    """With no visible GPU (and, in CI, no driver) the library imports and runs the eager path."""
    script = (
        "import torch, dora_ext\n"
        "x = torch.randn(3, 8); W = torch.randn(5, 8); A = torch.randn(2, 8); B = torch.randn(5, 2)\n"
        "y = dora_ext.dora_linear(x, W, None, A, B, torch.rand(5), 1.0)\n"
        "assert y.shape == (3, 5) and dora_ext.last_tier()[0] == 'eager'\n"
        "print(dora_ext.info()['devices'])\n"
    )
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    assert torch.ops.dora_ext.dora_linear.default is not None


def test_source_folder_without_a_build_uses_the_installed_copy(tmp_path):
    """`pip install .` then `python -m dora_ext` from the repository root: Python imports the
    source folder (no compiled library there); the package must load the installed copy's."""
    import shutil

    package = Path(dora_ext.__file__).resolve().parent
    source = tmp_path / "checkout" / "dora_ext"
    shutil.copytree(package, source, ignore=shutil.ignore_patterns("_C*.so", "aot_manifest.json", "__pycache__"))
    site = tmp_path / "site"
    shutil.copytree(package, site / "dora_ext", ignore=shutil.ignore_patterns("__pycache__"))
    dist_info = site / "dora_ext-0.1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: dora_ext\nVersion: 0.1.0\n")
    # pip's in-tree build leaves metadata in the checkout too (found first: it must not stop the lookup)
    egg_info = source.parent / "dora_ext.egg-info"
    egg_info.mkdir()
    (egg_info / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: dora_ext\nVersion: 0.1.0\n")
    env = dict(os.environ, PYTHONPATH=str(site))
    script = ("import dora_ext, json; from dora_ext import _library; "
              "print(json.dumps([dora_ext.__file__, str(_library.library_path()), dora_ext.info()['kernels']]))")
    proc = subprocess.run([sys.executable, "-c", script], cwd=source.parent, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    init_file, library, kernels = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(init_file).parent == source  # the source folder was imported first ...
    assert Path(library).parent == site / "dora_ext"  # ... and the installed library loaded
    assert kernels == dora_ext.info()["kernels"]

"""Build dora_ext: the AOT step (Triton kernels -> cubins -> generated C++), then the C++ library.

    pip install --no-build-isolation .           # against the torch already installed
    DORA_EXT_CUDA_ARCHS="80;90" pip install ...  # choose the CUDA archs (default: all, see README)
    DORA_EXT_WITH_CUDA=0 pip install ...         # CPU-only library (eager path only)
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent.resolve()


def find_cuda_home() -> str | None:
    """The CUDA toolkit folder holding include/cuda.h, or None.

    torch's own guess follows `nvcc` on PATH and can land on a folder without
    headers (/usr/local for /usr/local/bin/nvcc), so look for the header itself.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for candidate in candidates:
        if candidate and (Path(candidate) / "include" / "cuda.h").is_file():
            return candidate
    return None


CUDA_HOME = find_cuda_home()
if CUDA_HOME:
    os.environ["CUDA_HOME"] = CUDA_HOME  # before torch.utils.cpp_extension reads it

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

WITH_CUDA = os.environ.get("DORA_EXT_WITH_CUDA", "1") != "0" and torch.version.cuda is not None and CUDA_HOME
CUDA_ONLY_SOURCES = {"cuda_driver.cpp", "fused.cpp", "fused_norm.cpp", "mixed_stacked.cpp", "mixed_row_table.cpp"}


def loaded_libstdcxx() -> list[str]:
    """Link the shared C++ runtime this Python process already uses, by path.

    Some toolchains (seen: a g++ wrapper on the GPU image) link libstdc++
    statically into shared objects; the private copy's locale is never set up
    and the first number formatted into an error message crashes. Naming the
    process's own libstdc++.so first makes the linker take every C++ runtime
    symbol from it.
    """
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if "/libstdc++.so" in path:
                    return [path]
    except OSError:
        pass
    return []


def sources() -> list[str]:
    files = sorted(p.name for p in (ROOT / "csrc").glob("*.cpp"))
    if not WITH_CUDA:
        files = [f for f in files if f not in CUDA_ONLY_SOURCES]
    return [f"csrc/{f}" for f in files]


class BuildWithAOT(BuildExtension):
    """Runs scripts/aot_build.py first and compiles its kernel_images.cpp into the library (its
    kernel_variants.h, the typed variant keys csrc/ launches by, on the include path)."""

    def run(self) -> None:
        aot_dir = Path(self.build_temp).resolve() / "aot"
        cmd = [sys.executable, str(ROOT / "scripts" / "aot_build.py"), "--out", str(aot_dir)]
        if not WITH_CUDA:
            cmd += ["--archs", "none"]
        subprocess.check_call(cmd, cwd=ROOT)
        for ext in self.extensions:
            ext.sources.append(str(aot_dir / "kernel_images.cpp"))
            ext.include_dirs.append(str(aot_dir))
        super().run()
        for ext in self.extensions:  # ship the manifest beside the library: dora_ext.info() reads it
            library_dir = Path(self.get_ext_fullpath(ext.name)).parent
            shutil.copyfile(aot_dir / "manifest.json", library_dir / "aot_manifest.json")


# torch >= 2.14 headers require C++20; older torch builds its extensions as C++17
# (mixing standards with an older torch's headers has crashed in libstdc++ here).
TORCH_MAJOR_MINOR = tuple(int(v) for v in torch.__version__.split(".")[:2])
cxx_flags = ["-O2", "-std=c++20" if TORCH_MAJOR_MINOR >= (2, 14) else "-std=c++17"]
if WITH_CUDA:
    cxx_flags.append("-DDORA_EXT_WITH_CUDA")
    extension = CUDAExtension
else:
    extension = CppExtension

setup(
    name="dora_ext",
    version="0.1.0",
    description="Fast, exact DoRA for PyTorch: factored norm, AOT-compiled Triton kernels, C++ ops and autograd",
    packages=find_packages(include=["dora_ext", "dora_ext.*"]),
    package_data={"dora_ext": ["aot_manifest.json"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.8"],
    extras_require={"qdora": ["bitsandbytes>=0.45"]},  # PEFT DoRA on 4-bit / 8-bit bases (dora_ext.peft)
    ext_modules=[
        extension(
            name="dora_ext._C",
            sources=sources(),
            include_dirs=[str(ROOT / "csrc")],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=loaded_libstdcxx(),
            libraries=["dl"],
        )
    ],
    cmdclass={"build_ext": BuildWithAOT},
    zip_safe=False,
)

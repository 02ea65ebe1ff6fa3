"""Finds and loads the compiled C++ library, which registers torch.ops.dora_ext."""
from __future__ import annotations

from pathlib import Path

import torch

_PACKAGE_DIR = Path(__file__).resolve().parent


def library_path() -> Path:
    """Path of the built library (dora_ext/_C*.so)."""
    candidates = sorted(_PACKAGE_DIR.glob("_C*.so")) + sorted(_PACKAGE_DIR.glob("_C*.pyd"))
    if not candidates:
        raise ImportError(
            f"dora_ext: the compiled library _C*.so is missing from {_PACKAGE_DIR}; "
            "install the package with `pip install .` (see README), or build it in place with "
            "`python setup.py build_ext --inplace`"
        )
    return candidates[0]


def load_library() -> None:
    """Loads the library once; afterwards torch.ops.dora_ext.* exist."""
    if not hasattr(torch.ops.dora_ext, "dora_linear"):
        torch.ops.load_library(str(library_path()))

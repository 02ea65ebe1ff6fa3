"""A file of scripts/ or examples/ loaded as a module, so a test can call its functions."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parents[1]


def load_script(path: Path | str) -> ModuleType:
    """The module of ``path`` (relative paths from the repository root), executed once per call."""
    path = REPO_ROOT / path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

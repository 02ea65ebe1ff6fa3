"""docs/DESIGN.md's map of the code ("Where things live") names every source file, so a newcomer
finds each one's job there; a file added without a line in the map fails here."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("csrc", "cpp", "dora_ext", "triton_src", "scripts")
SUFFIXES = {".h", ".cpp", ".inc", ".py", ".sh"}


def _source_files() -> list[str]:
    """The files git tracks under FOLDERS (the checkout's own files, not build outputs)."""
    try:
        out = subprocess.run(["git", "ls-files", *FOLDERS], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [p for p in out.stdout.split() if Path(p).suffix in SUFFIXES]


def _map_text() -> str:
    design = (ROOT / "docs" / "DESIGN.md").read_text()
    start = design.index("## 6. Where things live")
    end = design.find("\n## ", start + 1)
    return design[start:] if end < 0 else design[start:end]


def test_every_source_file_is_in_the_map():
    files = _source_files()
    assert len(files) > 50  # the listing worked
    text = _map_text()
    missing = [p for p in files if f"`{Path(p).name}`" not in text]
    assert not missing, f"add these to docs/DESIGN.md, section 6: {missing}"

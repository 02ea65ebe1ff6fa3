"""pytest setup shared by every test file.

- Puts tests/ on sys.path so that ``from reference import ...`` works (and the
  repository root, so that ``from tests.reference import ...`` works too).
- Clears DORA_EXT_TIER after every test, so a test that forces a tier cannot
  leak it into the next one.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

_TESTS_DIR = Path(__file__).resolve().parent
if str(_TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(_TESTS_DIR))
# Appended (not prepended): an installed dora_ext keeps priority over the checkout.
if str(_TESTS_DIR.parent) not in sys.path:
    sys.path.append(str(_TESTS_DIR.parent))


@pytest.fixture(autouse=True)
def _clear_dora_ext_tier(monkeypatch):
    """Runs each test without DORA_EXT_TIER; whatever a test sets is cleared afterwards.

    monkeypatch's teardown (after ours) puts back the value the process started
    with, if any, so a tier set for the whole session is not lost either.
    """
    monkeypatch.delenv("DORA_EXT_TIER", raising=False)
    yield
    os.environ.pop("DORA_EXT_TIER", None)


_NEEDS_CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=_NEEDS_CUDA),
                        pytest.param("cuda_fused", marks=_NEEDS_CUDA)])
def any_device(request, monkeypatch) -> torch.device:
    """The device a CPU/CUDA-equivalence test runs on: ``cpu``; ``cuda`` with the dispatcher's own
    choice (tiny test shapes sit below the crossover: eager on the GPU); ``cuda_fused`` with
    ``DORA_EXT_TIER=fused`` so that the same test runs the fused kernels. CUDA params carry the
    ``cuda`` marker and skip cleanly without a GPU."""
    if request.param == "cuda_fused":
        monkeypatch.setenv("DORA_EXT_TIER", "fused")
        return torch.device("cuda")
    return torch.device(request.param)

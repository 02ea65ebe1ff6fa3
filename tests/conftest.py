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

"""pytest setup shared by every test file.

- Puts tests/ on sys.path so that ``from reference import ...`` works (and the
  repository root, so that ``from tests.reference import ...`` works too).
- Runs every test with the tier option at "auto" and puts back the process-wide
  run-time options afterwards, so a test that sets one (dora_ext.set_options)
  cannot leak it into the next one.
- Gives torch.compile a fresh cache folder per test session: a cache filled by an
  earlier build would replay code compiled against that build's internal op schemas.
- Makes a custom op whose outputs alias its inputs or each other an error, as torch does
  where the CI variable is set (elsewhere a deprecation warning, an error to come).
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch._functorch.config

_TESTS_DIR = Path(__file__).resolve().parent
if str(_TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(_TESTS_DIR))
# Appended (not prepended): an installed dora_ext keeps priority over the checkout.
if str(_TESTS_DIR.parent) not in sys.path:
    sys.path.append(str(_TESTS_DIR.parent))
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="dora_ext_tests_inductor_")
torch._functorch.config.error_on_custom_op_aliasing = True


@pytest.fixture(autouse=True)
def _restore_dora_ext_options():
    """Each test starts with tier "auto" and the other options as the process started; whatever a
    test sets process-wide is put back afterwards."""
    import dora_ext

    saved = dora_ext.get_options()
    dora_ext.set_options(tier="auto")
    yield
    dora_ext.set_options(**saved)


_NEEDS_CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=_NEEDS_CUDA),
                        pytest.param("cuda_fused", marks=_NEEDS_CUDA)])
def any_device(request, monkeypatch) -> torch.device:
    """The device a CPU/CUDA-equivalence test runs on: ``cpu``; ``cuda`` with the dispatcher's own
    choice (tiny test shapes sit below the crossover: eager on the GPU); ``cuda_fused`` with
    the tier option "fused" so that the same test runs the fused kernels. CUDA params carry the
    ``cuda`` marker and skip cleanly without a GPU."""
    if request.param == "cuda_fused":
        import dora_ext

        dora_ext.set_options(tier="fused")
        return torch.device("cuda")
    return torch.device(request.param)


@pytest.fixture
def fresh_norm_cache():
    """The norm cache on and empty (counters reset) for the test, emptied again after it."""
    import dora_ext

    dora_ext.set_options(norm_cache=True)
    dora_ext.clear_norm_cache()
    yield
    dora_ext.clear_norm_cache()

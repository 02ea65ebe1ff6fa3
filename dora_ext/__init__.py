"""dora_ext: fast, exact DoRA (weight-decomposed low-rank adaptation) for PyTorch.

    y = m * (W + s B A) / ||W + s B A||_row  applied to x, plus bias

The row norm is computed in factored form (no [d_out, d_in] product) with fp32
accumulation; CUDA runs ahead-of-time compiled Triton kernels chosen by a C++
dispatcher; every op has C++ autograd and works under torch.compile.
"""
import sys as _sys
from pathlib import Path as _Path


def _use_the_installed_build() -> None:
    """`python -m dora_ext` run from the repository root imports this source folder, which has no
    compiled library unless it was built in place; after `pip install .` the installed copy has one.
    Then every submodule is imported from the installed copy (``__path__``), library included: the
    first other ``dora_ext`` folder with a library on ``sys.path``."""
    here = _Path(__file__).resolve().parent
    if any(here.glob("_C*.so")):
        return
    for entry in _sys.path:
        candidate = (_Path(entry or ".") / "dora_ext").resolve()
        if candidate != here and any(candidate.glob("_C*.so")):
            __path__[:] = [str(candidate)]
            return


_use_the_installed_build()

from ._library import load_library  # noqa: E402

load_library()

from .info import info  # noqa: E402
from .ops import (  # noqa: E402
    clear_norm_cache,
    compose_delta,
    dora_linear,
    dora_linear_dropout,
    dora_linear_mixed,
    get_options,
    invalidate_norm_cache,
    last_tier,
    norm_cache_stats,
    options,
    overrides,
    row_norm,
    select_tier,
    set_options,
    share_adapter_storage,
)

__version__ = "0.1.0"
__all__ = ["clear_norm_cache", "compose_delta", "dora_linear", "dora_linear_dropout", "dora_linear_mixed",
           "get_options", "info",
           "invalidate_norm_cache", "last_tier", "norm_cache_stats", "options", "overrides", "row_norm", "select_tier",
           "set_options", "share_adapter_storage", "__version__"]

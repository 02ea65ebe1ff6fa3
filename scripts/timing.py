"""The one timing convention of the benchmarks and tools in scripts/.

Two ways to time, both returning milliseconds:

- :func:`median_ms` -- GPU work of one call (a layer, a kernel, a training step of one layer): the
  median of ``triton.testing.do_bench`` (asked for: do_bench returns the mean unless told).
  ``warmup`` and ``rep`` are do_bench's own, in **milliseconds of running time** (not call counts):
  do_bench estimates one call's time, then runs as many untimed calls as fill ``warmup`` ms and as
  many timed ones as fill ``rep`` ms, each between CUDA events with the L2 cache cleared before it,
  and synchronizes once at the end (host work overlaps the GPU's). The defaults (25, 100) are
  do_bench's; scripts/crossover.py passes a shorter budget for its large grid.
- :func:`median_wall_ms` -- the wall time of a whole step, host work included (a model's forward or
  training step): the median of ``reps`` calls after ``warmup`` untimed ones (call counts), each
  call between CUDA events on the current stream and waited for before the next one on a GPU,
  ``time.perf_counter`` on the CPU. It is ``dora_ext._timing.median_ms``, the helper
  ``python -m dora_ext`` times with, so there is one implementation of it.

Scripts run as ``python3 scripts/x.py`` have scripts/ on ``sys.path`` (the script's folder); a
script loaded from elsewhere (a test's ``importlib``) puts its own folder there first, see
scripts/bench_model.py. Triton and dora_ext are imported on first use, not by importing this module.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

DO_BENCH_WARMUP_MS = 25
DO_BENCH_REP_MS = 100


def median_ms(fn: Callable[[], Any], warmup: int = DO_BENCH_WARMUP_MS, rep: int = DO_BENCH_REP_MS) -> float:
    """Median milliseconds of ``fn()`` on the current CUDA device, by ``triton.testing.do_bench``
    (``warmup`` and ``rep``: milliseconds of untimed and timed running, as do_bench takes them)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def median_wall_ms(fn: Callable[[], Any], reps: int, warmup: int = 0, cuda: Optional[bool] = None) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` calls after ``warmup`` untimed ones, host work
    included; ``cuda`` (default: a GPU is available) times each call between CUDA events on the
    current stream, else with the host clock. dora_ext must be importable (where it is not
    installed, scripts/bench_model.py puts the checkout on ``sys.path`` first)."""
    from dora_ext._timing import median_ms as _median_wall_ms

    return _median_wall_ms(fn, reps, warmup, cuda=cuda)

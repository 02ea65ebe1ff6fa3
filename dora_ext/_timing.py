"""Median wall time of a callable: CUDA events on a GPU, the host clock elsewhere."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch


def median_ms(fn: Callable[[], Any], reps: int, warmup: int = 0, cuda: bool | None = None) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` calls after ``warmup`` untimed ones; ``cuda``
    (default: a GPU is available) times each call between CUDA events on the current stream."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)

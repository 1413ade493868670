"""Timing: the median of repeated runs. In the check layer because both the export (auto picks
the fastest form) and the face (bench) time things, and a helper two layers use lives in the
lower one."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def median_us(fn: Callable[[], object], budget_s: float = 1.0, min_runs: int = 5, max_runs: int = 1000) -> float:
    """Median wall time of `fn` in microseconds, over as many runs as fit in `budget_s`."""
    for _ in range(3):
        fn()  # warm-up: first calls allocate and (for onnxruntime) plan
    start = time.perf_counter()
    fn()
    estimate = max(time.perf_counter() - start, 1e-7)
    runs = int(min(max_runs, max(min_runs, budget_s / estimate)))
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6

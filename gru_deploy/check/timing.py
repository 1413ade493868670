"""Timing: the median of repeated runs, and where a run's time goes (seconds per stage). In the
check layer because both the export (auto picks the fastest form; its stages) and the face
(bench; train) time things, and a helper two layers use lives in the lower one."""

from __future__ import annotations

import contextvars
import statistics
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator


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


# --- where a run's time goes: seconds per stage (export and verify report them) ----------------

_CLOCK: "contextvars.ContextVar[StageClock | None]" = contextvars.ContextVar("gru_deploy_stage_clock", default=None)


class StageClock:
    """Seconds per stage of one run. Each second counts once, in the innermost stage open at
    the time (float32's noise estimate inside parity counts as noise, not parity); `other` is
    the run's time in no stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._open: list[list] = []  # [name, since] per open stage, innermost last
        self._start = time.perf_counter()

    def _charge(self, now: float) -> None:
        if self._open:
            name, since = self._open[-1]
            self.seconds[name] = self.seconds.get(name, 0.0) + now - since

    def enter(self, name: str) -> None:
        now = time.perf_counter()
        self._charge(now)
        self._open.append([name, now])

    def leave(self) -> None:
        now = time.perf_counter()
        self._charge(now)
        self._open.pop()
        if self._open:
            self._open[-1][1] = now

    def record(self) -> dict[str, Any]:
        """{"total_s", "stages_s": {stage: seconds}, "other_s"}, rounded to milliseconds."""
        total = time.perf_counter() - self._start
        return {"total_s": round(total, 3), "stages_s": {k: round(v, 3) for k, v in self.seconds.items()},
                "other_s": round(max(0.0, total - sum(self.seconds.values())), 3)}


@contextmanager
def measuring() -> Iterator[StageClock]:
    """Time the stages (`stage`) of the work inside, in this thread: the clock collects them."""
    clock = StageClock()
    token = _CLOCK.set(clock)
    try:
        yield clock
    finally:
        _CLOCK.reset(token)


@contextmanager
def stage(name: str) -> Iterator[None]:
    """The work inside is stage `name` of the run being measured (nothing is timed outside
    `measuring`)."""
    clock = _CLOCK.get()
    if clock is None:
        yield
        return
    clock.enter(name)
    try:
        yield
    finally:
        clock.leave()


def stage_line(record: dict[str, Any]) -> str:
    """A StageClock record as one line for people: the stages, slowest first, and the total."""
    parts = sorted(record["stages_s"].items(), key=lambda item: -item[1]) + [("other", record["other_s"])]
    return (f"time {record['total_s']:.1f} s: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in parts))

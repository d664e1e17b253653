"""Achieved rate and latency percentiles over bounded sliding windows.

Times are `time.perf_counter()` seconds (monotonic), latencies milliseconds. Not thread-safe on
its own: `ControlMonitor` serialises access.
"""

from __future__ import annotations

from collections import deque
from typing import Iterable, Mapping

import numpy as np

PERCENTILES = (50, 90, 99)


class RateMeter:
    """Events per second over the last `window_s` seconds (0 when nothing happened in it)."""

    def __init__(self, window_s: float = 5.0, max_events: int = 4096) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, found {window_s}")
        self._window_s = window_s
        self._events: deque[float] = deque(maxlen=max_events)
        self._start_s: float | None = None

    def reset(self, now_s: float | None) -> None:
        """Count afresh from `now_s`; None: from the next `reset` with a time, or the first event."""
        self._events.clear()
        self._start_s = now_s

    @property
    def started(self) -> bool:
        return self._start_s is not None

    def record(self, t_s: float) -> None:
        if self._start_s is None:
            self._start_s = t_s
        self._events.append(t_s)

    def span_s(self, now_s: float) -> float:
        """How long the window behind `rate_hz(now_s)` is: `window_s`, or less since the reset."""
        if self._start_s is None:
            return 0.0
        return max(0.0, now_s - max(self._start_s, now_s - self._window_s))

    def filled(self, now_s: float) -> bool:
        """Whether `window_s` has passed since the reset: the window no longer begins there."""
        return self._start_s is not None and now_s - self._start_s >= self._window_s

    def count(self, now_s: float) -> int:
        """Events in the window behind `rate_hz(now_s)`."""
        window_start = now_s - self.span_s(now_s)
        return sum(1 for t in self._events if t > window_start)

    def rate_hz(self, now_s: float) -> float:
        span_s = self.span_s(now_s)
        return self.count(now_s) / span_s if span_s > 0.0 else 0.0


class LatencyWindow:
    """The last `size` samples of each named stage, summarised as percentiles."""

    def __init__(self, size: int = 256) -> None:
        self._size = size
        self._samples: dict[str, deque[float]] = {}

    def clear(self) -> None:
        self._samples.clear()

    def record(self, stage: str, ms: float) -> None:
        window = self._samples.get(stage)
        if window is None:
            window = self._samples[stage] = deque(maxlen=self._size)
        window.append(float(ms))

    def record_all(self, timings_ms: Mapping[str, float]) -> None:
        for stage, ms in timings_ms.items():
            self.record(stage, ms)

    def percentiles(self, qs: Iterable[int] = PERCENTILES) -> dict[str, dict[str, float]]:
        """stage -> {"p50": ms, ...}; stages without samples are absent."""
        qs = tuple(qs)
        out: dict[str, dict[str, float]] = {}
        for stage, window in self._samples.items():
            if window:
                values = np.percentile(np.fromiter(window, dtype=np.float64), qs)
                out[stage] = {f"p{q}": float(v) for q, v in zip(qs, values)}
        return out

"""What the control loop did lately, summarised for /diagnostics (ROS-free).

The loop reports each tick's outcome (published or held with a reason); sensor callbacks report
rejected inputs. `report()` turns that into a level, a one-line message and key/value pairs.
Thread-safe: the loop, the callbacks and the diagnostics timer run on different threads.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Mapping

from pi0_policy_ros.control.rate_meter import LatencyWindow, RateMeter

# Same values as diagnostic_msgs/DiagnosticStatus.
OK, WARN, ERROR, STALE = 0, 1, 2, 3

# Below this fraction of the target rate the report warns.
SLOW_RATE_FRACTION = 0.8


@dataclass(frozen=True)
class HealthReport:
    level: int
    message: str
    values: dict[str, str] = field(default_factory=dict)


class ControlMonitor:
    """Counters, the achieved rate and latency percentiles of the control loop."""

    def __init__(self, control_rate_hz: float, rate_window_s: float = 5.0) -> None:
        self._lock = threading.Lock()
        self._rate = RateMeter(rate_window_s)
        self._latency = LatencyWindow()
        self.control_rate_hz = control_rate_hz
        self._active = False
        self._reset_counters()

    def _reset_counters(self) -> None:
        self._ticks = 0
        self._skipped_ticks = 0
        self._chunks = 0
        self._holds = 0
        self._observation_errors = 0
        self._last_tick_s: float | None = None
        self._hold_reason = ""
        self._hold_level = OK
        self._last_input_error = ""
        self._observation_age_s = float("nan")
        self._camera_skew_s = float("nan")

    def start(self, now_s: float) -> None:
        """Activation: count from zero."""
        with self._lock:
            self._reset_counters()
            self._rate.reset(now_s)
            self._latency.clear()
            self._active = True

    def stop(self) -> None:
        with self._lock:
            self._active = False

    def tick_started(self, now_s: float) -> None:
        """Counts the timer periods that passed without a tick (inference too slow): skipped, not queued."""
        with self._lock:
            self._ticks += 1
            if self._last_tick_s is not None:
                periods = (now_s - self._last_tick_s) * self.control_rate_hz
                self._skipped_ticks += max(0, int(round(periods)) - 1)
            self._last_tick_s = now_s

    def held(self, reason: str, level: int = WARN) -> None:
        with self._lock:
            self._holds += 1
            self._hold_reason = reason
            self._hold_level = level

    def input_rejected(self, reason: str) -> None:
        with self._lock:
            self._observation_errors += 1
            self._last_input_error = reason

    def published(self, now_s: float, timings_ms: Mapping[str, float], observation_age_s: float,
                  camera_skew_s: float) -> None:
        with self._lock:
            self._chunks += 1
            self._rate.record(now_s)
            self._latency.record_all(timings_ms)
            self._observation_age_s = observation_age_s
            self._camera_skew_s = camera_skew_s
            self._hold_reason = ""
            self._hold_level = OK

    def report(self, now_s: float) -> HealthReport:
        with self._lock:
            rate_hz = self._rate.rate_hz(now_s) if self._active else 0.0
            values = {
                "active": str(self._active),
                "target_rate_hz": f"{self.control_rate_hz:.3f}",
                "achieved_rate_hz": f"{rate_hz:.3f}",
                "ticks": str(self._ticks),
                "skipped_ticks": str(self._skipped_ticks),
                "chunks_published": str(self._chunks),
                "holds": str(self._holds),
                "observation_errors": str(self._observation_errors),
                "last_hold_reason": self._hold_reason,
                "last_input_error": self._last_input_error,
                "observation_age_s": f"{self._observation_age_s:.4f}",
                "camera_skew_s": f"{self._camera_skew_s:.4f}",
            }
            for stage, pcts in sorted(self._latency.percentiles().items()):
                for name, ms in pcts.items():
                    values[f"latency_{stage}_{name}_ms"] = f"{ms:.3f}"
            if not self._active:
                return HealthReport(OK, "inactive", values)
            if self._hold_reason:
                return HealthReport(self._hold_level, f"holding: {self._hold_reason}", values)
            if self._chunks and rate_hz < SLOW_RATE_FRACTION * self.control_rate_hz:
                return HealthReport(WARN, f"slow: {rate_hz:.2f} Hz of {self.control_rate_hz:.2f} Hz target", values)
            return HealthReport(OK, f"running at {rate_hz:.2f} Hz", values)

"""What the control loop did lately, summarised for /diagnostics (ROS-free).

The loop reports each tick's outcome (published, or held with a reason and a kind); sensor
callbacks report received and rejected inputs. `report()` turns that into a level, a one-line
message and key/value pairs. Thread-safe: the loop, the callbacks and the diagnostics timer run
on different threads.

Times (`now_s`) come from the caller's clock, the one the control timer runs on: ROS time in the
node (sim time under `use_sim_time`), bag time in the offline replay. A clock that goes backwards
(simulation reset) restarts the rate window instead of counting negative periods. Latencies are
durations in milliseconds, measured by the caller with `time.perf_counter()`.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Mapping

from pi0_policy_ros.control.rate_meter import LatencyWindow, RateMeter

# Same values as diagnostic_msgs/DiagnosticStatus.
OK, WARN, ERROR, STALE = 0, 1, 2, 3

# Below this fraction of the target rate the report warns.
SLOW_RATE_FRACTION = 0.8
# Until the rate window has filled, a loop on time may have published this many chunks fewer than the
# periods since the start: its first tick comes one period after it, and its latest may still be inferring.
STARTUP_CHUNKS_SHORT = 2


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
        self._holds: Counter[str] = Counter()
        self._observation_errors = 0
        self._input_errors: Counter[str] = Counter()
        self._inputs: Counter[str] = Counter()
        self._input_delay = LatencyWindow()
        self._clock_jumps = 0
        self._last_tick_s: float | None = None
        self._hold_reason = ""
        self._hold_kind = ""
        self._hold_level = OK
        self._last_input_error = ""
        self._observation_age_s = float("nan")
        self._camera_skew_s = float("nan")
        self._extra: dict[str, dict[str, str]] = {}

    def start(self, now_s: float | None) -> None:
        """Activation: count from zero. now_s None: the clock has no time yet (use_sim_time before the
        first /clock), and the rate window starts at the first tick: from 0, the simulator's first
        seconds of ticks read as a fraction of the target rate ("slow") until the window passed."""
        with self._lock:
            self._reset_counters()
            self._rate.reset(now_s)  # None: from the first tick (tick_started)
            self._latency.clear()
            self._active = True

    def change_rate(self, control_rate_hz: float, now_s: float | None) -> None:
        """A new target rate while running: the achieved rate is measured afresh from now, and the
        gap before the first tick at the new rate is not counted as skipped ticks of it. A window
        over both rates read as slow (or as too fast) for up to `rate_window_s` after a change."""
        with self._lock:
            self.control_rate_hz = control_rate_hz
            self._rate.reset(now_s)
            self._last_tick_s = None

    def stop(self) -> None:
        with self._lock:
            self._active = False

    def tick_started(self, now_s: float) -> None:
        """Counts the timer periods that passed without a tick (inference too slow): skipped, not queued."""
        with self._lock:
            self._ticks += 1
            if not self._rate.started:  # start(None) / change_rate(None): the window begins here
                self._rate.reset(now_s)
            if self._last_tick_s is not None and now_s < self._last_tick_s:
                self._clock_jumps += 1
                self._rate.reset(now_s)
            elif self._last_tick_s is not None:
                periods = (now_s - self._last_tick_s) * self.control_rate_hz
                self._skipped_ticks += max(0, int(round(periods)) - 1)
            self._last_tick_s = now_s

    def held(self, reason: str, level: int = WARN, kind: str = "other", observation_age_s: float = float("nan"),
             camera_skew_s: float = float("nan")) -> None:
        """A tick that published no chunk; counted per `kind` (see control/step.py). The ages are
        this tick's observation's, nan when it held before it had one (a missing or stale input,
        whose reason gives the age): the last chunk's read as fresh inputs through an outage."""
        with self._lock:
            self._holds[kind] += 1
            self._observation_age_s = observation_age_s
            self._camera_skew_s = camera_skew_s
            self._hold_reason = reason
            self._hold_kind = kind
            self._hold_level = level

    def waited(self, now_s: float) -> None:
        """A tick that started no inference because the chunk schedule said not yet (non-naive chunk
        modes infer every `execute_horizon` action periods): on schedule, so it counts toward the
        achieved rate like a published tick. Otherwise those modes always looked slow.

        It ends a hold like a published tick too: a tick between starts waits only when the inputs
        pass the checks a start makes (stale inputs hold it), so the loop runs again. Kept, a hold
        between starts was reported until the next chunk, up to `execute_horizon` periods later."""
        with self._lock:
            self._rate.record(now_s)
            self._end_hold()

    def input_received(self, source: str, delay_s: float) -> None:
        """An input message accepted; delay_s: receipt time minus its stamp (how far callbacks lag)."""
        with self._lock:
            self._inputs[source] += 1
            if delay_s == delay_s:  # not NaN
                self._input_delay.record(source, delay_s * 1e3)

    def input_rejected(self, reason: str, source: str = "input") -> None:
        with self._lock:
            self._observation_errors += 1
            self._input_errors[source] += 1
            self._last_input_error = reason

    def set_values(self, group: str, values: Mapping[str, object]) -> None:
        """Status of another part (safety filter, scheduler, prompt), reported as `<group>.<key>`."""
        with self._lock:
            self._extra[group] = {k: str(v) for k, v in values.items()}

    def published(self, now_s: float, timings_ms: Mapping[str, float], observation_age_s: float,
                  camera_skew_s: float) -> None:
        with self._lock:
            self._chunks += 1
            self._rate.record(now_s)
            self._latency.record_all(timings_ms)
            self._observation_age_s = observation_age_s
            self._camera_skew_s = camera_skew_s
            self._end_hold()

    def _end_hold(self) -> None:
        """The loop acts again: the report no longer holds (the counts per kind stay). Under the lock."""
        self._hold_reason = ""
        self._hold_kind = ""
        self._hold_level = OK

    def report(self, now_s: float) -> HealthReport:
        with self._lock:
            rate_hz = self._rate.rate_hz(now_s) if self._active else 0.0
            values = {
                "active": str(self._active),
                "target_rate_hz": f"{self.control_rate_hz:.3f}",
                "achieved_rate_hz": f"{rate_hz:.3f}",
                # The seconds the rate is measured over: up to rate_window_s, shorter after activation,
                # a rate change or a clock jump (the window starts at the first tick then).
                "rate_window_s": f"{self._rate.span_s(now_s) if self._active else 0.0:.3f}",
                "ticks": str(self._ticks),
                "skipped_ticks": str(self._skipped_ticks),
                "chunks_published": str(self._chunks),
                "holds": str(sum(self._holds.values())),
                "observation_errors": str(self._observation_errors),
                "last_hold_reason": self._hold_reason,
                "last_hold_kind": self._hold_kind,
                "last_input_error": self._last_input_error,
                "observation_age_s": f"{self._observation_age_s:.4f}",
                "camera_skew_s": f"{self._camera_skew_s:.4f}",
                "clock_jumps": str(self._clock_jumps),
            }
            values.update({f"holds.{kind}": str(n) for kind, n in sorted(self._holds.items())})
            values.update({f"input_errors.{source}": str(n) for source, n in sorted(self._input_errors.items())})
            values.update({f"inputs.{source}": str(n) for source, n in sorted(self._inputs.items())})
            for stage, pcts in sorted(self._latency.percentiles().items()):
                for name, ms in pcts.items():
                    values[f"latency_{stage}_{name}_ms"] = f"{ms:.3f}"
            for source, pcts in sorted(self._input_delay.percentiles().items()):
                for name, ms in pcts.items():
                    values[f"input_delay_{source}_{name}_ms"] = f"{ms:.3f}"
            for group, extra in sorted(self._extra.items()):
                values.update({f"{group}.{k}": v for k, v in extra.items()})
            if not self._active:
                return HealthReport(OK, "inactive", values)
            if self._hold_reason:
                return HealthReport(self._hold_level, f"holding: {self._hold_reason}", values)
            # Slow only over a window of at least two target periods: right after activation or a rate
            # change, the first tick at the new rate is not due yet.
            measured = self._rate.span_s(now_s) >= 2.0 / self.control_rate_hz
            if not measured:
                # "running at 0.00 Hz" while the first chunks went out: one or no tick is not a rate.
                return HealthReport(OK, "running (the achieved rate is measured after two control periods)", values)
            if self._slow(now_s):  # also with no chunk out yet: a loop that never published is not "running"
                return HealthReport(WARN, f"slow: {rate_hz:.2f} Hz of {self.control_rate_hz:.2f} Hz target", values)
            return HealthReport(OK, f"running at {rate_hz:.2f} Hz", values)

    def _slow(self, now_s: float) -> bool:
        """The achieved rate is below SLOW_RATE_FRACTION of the target. Until the window has filled,
        STARTUP_CHUNKS_SHORT chunks more are allowed: a loop on time at 10 Hz had 1 chunk out 0.29 s
        after an activation, "slow: 3.45 Hz of 10.00 Hz target" (WARN) after every activation. A
        stalled or half-rate loop still reads as slow within a few periods. Under the lock."""
        allowed = 0 if self._rate.filled(now_s) else STARTUP_CHUNKS_SHORT
        span_s = self._rate.span_s(now_s)
        return (self._rate.count(now_s) + allowed) < SLOW_RATE_FRACTION * self.control_rate_hz * span_s


def transition_failure_report(transition: str, reason: str) -> HealthReport:
    """What /diagnostics says last after a lifecycle transition failed: which one, and why."""
    return HealthReport(ERROR, f"{transition} failed: {reason}", {"active": "False", f"{transition}_error": reason})


def configure_failure_report(reason: str) -> HealthReport:
    """What /diagnostics says after a failed configure: the node is up, unconfigured, and why."""
    return transition_failure_report("configure", reason)


def cleanup_report() -> HealthReport:
    """The status a cleanup leaves: the node is up and unconfigured, and publishes nothing more
    until the next configure (monitoring tools would see "inactive" go stale otherwise)."""
    return HealthReport(OK, "cleaned up", {"active": "False"})


def shutdown_report() -> HealthReport:
    """The last status of a node shut down on purpose (monitoring tools would see it go stale otherwise)."""
    return HealthReport(OK, "shut down", {"active": "False"})

"""What a replay did, in numbers: the data behind the JSON report (ROS-free, no plotting)."""

from __future__ import annotations

import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, TextIO

import numpy as np

PERCENTILES = (50, 90, 99)
# Not the digits of a name ('joint_7', 'cam_1', 'bgr8'): masked, a missing joint read 'joint_#'.
_NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def reason_kind(reason: str) -> str:
    """A hold reason with its numbers replaced by '#', so that reasons group by cause."""
    return _NUMBER.sub("#", reason)


def percentiles_ms(samples: Iterable[float]) -> dict[str, float]:
    values = np.fromiter(samples, dtype=np.float64)
    if values.size == 0:
        return {}
    out = {f"p{q}": float(v) for q, v in zip(PERCENTILES, np.percentile(values, PERCENTILES))}
    out.update(mean=float(values.mean()), max=float(values.max()), count=float(values.size))
    return out


@dataclass
class ReplaySummary:
    """Counts and timings of one replay.

    ticks: control ticks (offline: simulated; realtime: the node's own count, from /diagnostics).
    chunks: chunks published. holds: hold reason kind -> ticks held for it.
    skipped_ticks: timer periods without a tick because inference was too slow (realtime only).
    input_rejections: reason kind -> input messages the node refused; rejection_examples: kind -> its first reason.
    safety: the safety filter's counters (`clamp.<limit>`, `reject.<limit>`: its clamps and rejects
    per limit), as the node's /diagnostics reports them under `safety.`.
    latencies_ms: stage -> samples (wall clock; not deterministic).
    waited_ticks: ticks that started no inference because the chunk schedule said not yet (the
    non-naive chunk modes infer every `execute_horizon` action periods): on schedule.
    duration_s: bag time replayed; achieved_rate_hz: ticks on schedule (a chunk published, or
    waited) per second of bag time, as the node's /diagnostics counts its achieved rate.
    """

    mode: str
    bag: str
    output: str
    control_rate_hz: float
    start_ns: int = 0
    end_ns: int = 0
    ticks: int = 0
    chunks: int = 0
    skipped_ticks: int = 0
    waited_ticks: int = 0
    holds: Counter[str] = field(default_factory=Counter)
    hold_examples: dict[str, str] = field(default_factory=dict)
    input_rejections: Counter[str] = field(default_factory=Counter)
    rejection_examples: dict[str, str] = field(default_factory=dict)
    safety: dict[str, int] = field(default_factory=dict)
    latencies_ms: dict[str, list[float]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def duration_s(self) -> float:
        return max(0, self.end_ns - self.start_ns) / 1e9

    @property
    def achieved_rate_hz(self) -> float:
        # With chunks alone, rtc at execute_horizon 2 control periods read as half the target rate.
        return (self.chunks + self.waited_ticks) / self.duration_s if self.duration_s > 0 else 0.0

    def hold(self, reason: str) -> None:
        kind = reason_kind(reason)
        self.holds[kind] += 1
        self.hold_examples.setdefault(kind, reason)

    def reject_input(self, reason: str) -> None:
        kind = reason_kind(reason)
        self.input_rejections[kind] += 1
        self.rejection_examples.setdefault(kind, reason)

    def record_latencies(self, timings_ms: Mapping[str, float]) -> None:
        for stage, ms in timings_ms.items():
            self.latencies_ms.setdefault(stage, []).append(float(ms))

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "bag": self.bag,
            "output": self.output,
            "bag_start_s": self.start_ns / 1e9,
            "duration_s": self.duration_s,
            "target_rate_hz": self.control_rate_hz,
            "achieved_rate_hz": self.achieved_rate_hz,
            "ticks": self.ticks,
            "chunks": self.chunks,
            "held_ticks": sum(self.holds.values()),
            "skipped_ticks": self.skipped_ticks,
            "waited_ticks": self.waited_ticks,
            "hold_reasons": [{"reason": kind, "count": n, "example": self.hold_examples.get(kind, kind)}
                             for kind, n in self.holds.most_common()],
            "input_rejections": [{"reason": kind, "count": n, "example": self.rejection_examples.get(kind, kind)}
                                 for kind, n in self.input_rejections.most_common()],
            "safety": dict(self.safety),
            "latency_ms": {stage: percentiles_ms(v) for stage, v in sorted(self.latencies_ms.items())},
            **self.extra,
        }


class Progress:
    """A one-line progress display on stderr for long bags, at most a few updates a second."""

    def __init__(self, label: str, total_s: float, enabled: bool = True, stream: TextIO | None = None,
                 period_s: float = 0.5) -> None:
        self.label = label
        self.total_s = total_s
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.period_s = period_s
        self._tty = self.stream.isatty()
        self._last = 0.0

    def update(self, done_s: float, detail: str = "", force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < self.period_s:
            return
        self._last = now
        pct = 100.0 * done_s / self.total_s if self.total_s > 0 else 100.0
        line = f"{self.label}: {pct:5.1f}% ({done_s:.1f} / {self.total_s:.1f} s of bag)"
        line += f", {detail}" if detail else ""
        self.stream.write(("\r" + line + "\x1b[K") if self._tty else line + "\n")
        self.stream.flush()

    def finish(self, detail: str = "") -> None:
        if self.enabled:
            self.update(self.total_s, detail, force=True)
            if self._tty:
                self.stream.write("\n")
                self.stream.flush()

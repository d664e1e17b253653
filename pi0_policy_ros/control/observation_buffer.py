"""The latest sample of every observation source, and consistent snapshots of them.

Sensor callbacks `put_*` (cheap: they only store); the control loop calls `snapshot(now_s)`,
which either returns one sample of every source that together are fresh and aligned, or raises
`ObservationError` saying why the loop must hold. Times are seconds on the caller's clock (ROS
time in the node, so sim time works). Thread-safe: callbacks and the loop run on different
threads.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any, Generic, Mapping, Sequence, TypeVar

import numpy as np

from pi0_policy_ros.control.config import ControlConfig
from pi0_policy_ros.errors import ObservationError

T = TypeVar("T")

STATE_SOURCE = "joint_states"

# `ObservationError.kind` of the snapshot refusals: the hold reasons counted in /diagnostics.
MISSING_INPUT = "missing_input"
STALE_OBSERVATION = "stale_observation"
CAMERA_SKEW = "camera_skew"


@dataclass(frozen=True)
class Sample(Generic[T]):
    value: T
    stamp_s: float


@dataclass(frozen=True)
class Snapshot:
    """One sample per source, checked for age and camera skew.

    images: camera name -> the stored value (a raw message when the caller decodes lazily).
    state: the state vector, in the robot profile's order.
    stamp_s: the newest stamp among the samples used (the observation time).
    age_s: now minus the oldest stamp used.
    camera_skew_s: newest minus oldest camera stamp.
    """

    images: Mapping[str, Any]
    state: np.ndarray
    prompt: str | None
    stamp_s: float
    age_s: float
    camera_skew_s: float


class ObservationBuffer:
    """Latest image per camera, latest state, latest prompt; no history is kept."""

    def __init__(self, camera_names: Sequence[str], config: ControlConfig) -> None:
        if not camera_names:
            raise ObservationError("expected at least one camera name, found none")
        if len(set(camera_names)) != len(camera_names):
            raise ObservationError(f"expected unique camera names, found {list(camera_names)}")
        self._camera_names = tuple(camera_names)
        self._config = config
        self._lock = threading.Lock()
        self._images: dict[str, Sample[Any]] = {}
        self._state: Sample[np.ndarray] | None = None
        self._prompt: str | None = None
        # Source (camera name or STATE_SOURCE) -> why its latest message was refused, kept until
        # one is accepted: a hold on a missing or stale source then says why, not "none received".
        self._refused: dict[str, str] = {}
        # Source -> the topic it is read from (`set_topics`), named in the holds on a source never
        # received: the usual cause is a topic name or namespace that is not the publisher's.
        self._topics: dict[str, str] = {}

    @property
    def config(self) -> ControlConfig:
        return self._config

    @config.setter
    def config(self, config: ControlConfig) -> None:
        # Dynamic parameters change the limits; an attribute swap is atomic.
        self._config = config

    def set_topics(self, topics: Mapping[str, str]) -> None:
        """Where each source (camera name, STATE_SOURCE) is read from, as the holds should name it."""
        self._topics = dict(topics)

    def _topics_of(self, sources: Sequence[str]) -> str:
        topics = [self._topics[source] for source in sources if source in self._topics]
        return f" (topic{'s' if len(topics) > 1 else ''} {', '.join(topics)})" if topics else ""

    def reset(self) -> None:
        """Forget every sample (on activation, so that stamps from before a pause don't count)."""
        with self._lock:
            self._images.clear()
            self._state = None
            self._refused.clear()

    def put_image(self, camera: str, value: Any, stamp_s: float, now_s: float) -> None:
        if camera not in self._camera_names:
            raise ObservationError(f"unknown camera {camera!r}: expected one of {list(self._camera_names)}")
        with self._lock:
            self._check_stamp(camera, f"camera {camera!r}", self._images.get(camera), stamp_s, now_s)
            self._images[camera] = Sample(value, stamp_s)
            self._refused.pop(camera, None)

    def put_state(self, state: np.ndarray, stamp_s: float, now_s: float) -> None:
        with self._lock:
            self._check_stamp(STATE_SOURCE, STATE_SOURCE, self._state, stamp_s, now_s)
            self._state = Sample(state, stamp_s)
            self._refused.pop(STATE_SOURCE, None)

    def refused(self, source: str, reason: str) -> None:
        """A message of `source` (a camera name or STATE_SOURCE) refused before it reached `put_*`
        (it could not be read). The put methods note their own refusals."""
        with self._lock:
            self._refused[source] = reason

    def put_prompt(self, prompt: str | None) -> None:
        """An empty prompt means: use the policy's default prompt."""
        self._prompt = prompt or None

    def latest_state(self) -> Sample[np.ndarray] | None:
        """The latest state sample whatever its age (hold_position reads it when a snapshot fails)."""
        with self._lock:
            return self._state

    def snapshot(self, now_s: float) -> Snapshot:
        """The latest of each source, or `ObservationError` naming the source that is missing/stale."""
        with self._lock:
            images = dict(self._images)
            state = self._state
            prompt = self._prompt
            refused = dict(self._refused)
        cfg = self._config
        missing = [name for name in self._camera_names if name not in images]
        # Every source missing is named at once: a recording whose wrist camera and joint_states
        # start late read as the camera alone missing, then joint_states as if it had just gone.
        no_state = ""
        if state is None:
            no_state = (f"no usable {STATE_SOURCE} yet: every one received was refused, the last: "
                        f"{refused[STATE_SOURCE]}" if STATE_SOURCE in refused
                        else f"no {STATE_SOURCE} received yet{self._topics_of([STATE_SOURCE])}")
        if missing:
            reasons = [refused[name] for name in missing if name in refused]
            also = f"; {no_state}" if no_state else ""
            if reasons:
                raise ObservationError(f"no usable image yet from camera(s) {missing}: every one received was "
                                       f"refused, the last: {reasons[0]}{also}", kind=MISSING_INPUT)
            raise ObservationError(f"no image received yet from camera(s) {missing}{self._topics_of(missing)}{also}",
                                   kind=MISSING_INPUT)
        if no_state:
            raise ObservationError(no_state, kind=MISSING_INPUT)

        stamps = {name: images[name].stamp_s for name in self._camera_names}
        stamps[STATE_SOURCE] = state.stamp_s
        oldest_source = min(stamps, key=stamps.__getitem__)
        age_s = now_s - stamps[oldest_source]
        if age_s > cfg.max_observation_age_s:
            label = STATE_SOURCE if oldest_source == STATE_SOURCE else f"camera {oldest_source!r}"
            since = (f"; every one received since was refused, the last: {refused[oldest_source]}"
                     if oldest_source in refused else "")
            raise ObservationError(
                f"{label} is stale: expected age <= {cfg.max_observation_age_s:.3f} s "
                f"(max_observation_age_s), found {age_s:.3f} s{since}", kind=STALE_OBSERVATION)

        camera_stamps = [images[name].stamp_s for name in self._camera_names]
        skew_s = max(camera_stamps) - min(camera_stamps)
        if skew_s > cfg.max_camera_skew_s:
            detail = ", ".join(f"{n!r} at {images[n].stamp_s:.3f}" for n in self._camera_names)
            raise ObservationError(
                f"cameras out of sync: expected stamp spread <= {cfg.max_camera_skew_s:.3f} s "
                f"(max_camera_skew_s), found {skew_s:.3f} s ({detail})", kind=CAMERA_SKEW)

        return Snapshot(
            images={name: images[name].value for name in self._camera_names},
            state=state.value,
            prompt=prompt,
            stamp_s=max(stamps.values()),
            age_s=age_s,
            camera_skew_s=skew_s,
        )

    def _check_stamp(self, key: str, source: str, previous: Sample[Any] | None, stamp_s: float,
                     now_s: float) -> None:
        """Raises ObservationError for a bad stamp, noted as `key`'s latest refusal. Under the lock."""
        try:
            self._check_stamp_value(source, previous, stamp_s, now_s)
        except ObservationError as exc:
            self._refused[key] = str(exc)
            raise

    def _check_stamp_value(self, source: str, previous: Sample[Any] | None, stamp_s: float, now_s: float) -> None:
        if not math.isfinite(stamp_s) or stamp_s <= 0.0:
            raise ObservationError(f"{source}: expected a positive header stamp, found {stamp_s!r} (unstamped message?)")
        # A stored stamp further ahead of our clock than any sample may be is from before our clock
        # went back (a simulator reset, which the next tick resets the buffer for): not an order.
        in_our_past = previous is not None and previous.stamp_s - now_s <= self._config.max_future_stamp_s
        if in_our_past and stamp_s < previous.stamp_s:
            raise ObservationError(
                f"{source}: stamp went backwards: expected >= {previous.stamp_s:.6f} s, found {stamp_s:.6f} s")
        ahead_s = stamp_s - now_s
        if ahead_s > self._config.max_future_stamp_s:
            raise ObservationError(
                f"{source}: stamp is {ahead_s:.3f} s in the future: expected <= "
                f"{self._config.max_future_stamp_s:.3f} s ahead of our clock (clocks not synchronised?)")

"""ChunkScheduler: when to start the next inference, and which action to execute when.

Time is in seconds on one clock (ROS time in the node, simulated time in `rtc-eval`). A chunk is
stamped with its observation time: action k is meant for `stamp_s + k * period_s`. Between
grid points the actions are interpolated linearly.

Timeline, with d the inference delay in action steps and s the execution horizon:
- an inference starts every s periods, at most one at a time (a slower inference starts the next
  one as soon as it completes);
- until the new chunk is available, the previous one keeps executing; from the moment it is
  available, the new one takes over at the index of the current time (never an earlier one);
- when the previous chunk runs out before the next arrives, the last action is held; a chunk that
  arrives with no action left in the future is dropped.

Modes:
- `naive`: the newest chunk replaces the previous one on arrival;
- `temporal_ensemble`: every chunk covering the current time is averaged with ACT's weights
  `exp(−m·i)`, i = 0 for the oldest (Zhao et al. 2023);
- `rtc_fast`, `rtc`: splice like `naive`, but each request carries the actions that will be executed
  from the new observation time on, for the guided denoising (`model/rtc.py`) to continue.

d is predicted from a running percentile of the measured latency (completion time minus
observation stamp), rounded up to whole periods.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from pi0_policy_ros.errors import ConfigError, Pi0PolicyError

SCHEDULER_MODES = ("naive", "temporal_ensemble", "rtc_fast", "rtc")
RTC_SCHEDULER_MODES = ("rtc_fast", "rtc")
MASK_SCHEDULES = ("exp", "linear")  # the same names as model/rtc.py (control/ must not import torch)
INDEX_TOLERANCE = 1e-3  # in action periods: within this of a grid point is on it (epoch-sized float64 stamps
# carry ~2e-7 s of rounding, 5e-5 periods at 200 Hz)
MAX_INITIAL_LATENCY_S = 60.0  # the largest latency a config may assume before the first measurement


@dataclass(frozen=True)
class SchedulerConfig:
    """How chunks are spliced and when inference starts.

    mode: one of SCHEDULER_MODES.
    execute_horizon: s, the action periods between inference starts (the actions each chunk
        executes when inference is faster than that).
    max_guidance_weight: β, the clip of the RTC guidance weight (the paper's 5).
    mask_schedule: the decay of the RTC soft mask over the overlap ("exp" as in the paper).
    ensemble_decay: m of temporal ensembling; 0 averages uniformly (ACT uses 0.01).
    latency_percentile, latency_window: the delay estimate is this percentile of the last
        `latency_window` measured latencies.
    initial_latency_s: the latency assumed before the first measurement.
    """

    mode: str = "naive"
    execute_horizon: int = 5
    max_guidance_weight: float = 5.0
    mask_schedule: str = "exp"
    ensemble_decay: float = 0.01
    latency_percentile: float = 90.0
    latency_window: int = 50
    initial_latency_s: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in SCHEDULER_MODES:
            raise ConfigError(f"scheduler mode must be one of {SCHEDULER_MODES}, found {self.mode!r}")
        if self.mask_schedule not in MASK_SCHEDULES:
            raise ConfigError(f"mask_schedule must be one of {MASK_SCHEDULES}, found {self.mask_schedule!r}")
        if self.execute_horizon < 1:
            raise ConfigError(f"execute_horizon must be >= 1 action, found {self.execute_horizon}")
        if self.latency_window < 1:
            raise ConfigError(f"latency_window must be >= 1 sample, found {self.latency_window}")
        for name, lo, hi in (("max_guidance_weight", 0.0, 1e3), ("ensemble_decay", 0.0, 1e3),
                             ("latency_percentile", 0.0, 100.0), ("initial_latency_s", 0.0, MAX_INITIAL_LATENCY_S)):
            value = getattr(self, name)
            if not (math.isfinite(value) and lo <= value <= hi):
                raise ConfigError(f"{name} must be a finite number in [{lo}, {hi}], found {value!r}")

    @property
    def guided(self) -> bool:
        return self.mode in RTC_SCHEDULER_MODES


@dataclass(frozen=True)
class InferenceRequest:
    """What one inference must produce, issued by `ChunkScheduler.begin`.

    chunk_id: sequence number of the chunk to be produced.
    stamp_s: the observation time, i.e. the time of the new chunk's action 0.
    delay_steps: d, the predicted delay in action periods (the RTC frozen prefix).
    prev_actions: rtc modes only, else None: Y [H, A], the actions that will be executed at
        `stamp_s + i * period_s` if no new chunk arrived (the held last action past the previous
        chunk's end). None also when there is no chunk yet (plain sampling).
    mask_end: rows [0, mask_end) of Y continue the previous chunk (the paper's H − s); at least d
        when prev_actions is given, since those d actions are executed whatever happens.
    """

    chunk_id: int
    stamp_s: float
    delay_steps: int
    prev_actions: np.ndarray | None = None
    mask_end: int = 0


@dataclass(frozen=True)
class ScheduledAction:
    """The action for one time: the positions, the chunks they come from, and whether they are a
    hold (the time lies past the end of every chunk)."""

    positions: np.ndarray
    chunk_ids: tuple[int, ...]
    holding: bool


@dataclass(frozen=True)
class SchedulerStatus:
    """For diagnostics."""

    mode: str
    delay_steps: int
    latency_s: float  # the percentile the delay comes from; nan before the first measurement
    in_flight: bool
    chunks_received: int
    chunks_dropped: int


@dataclass(frozen=True)
class _Chunk:
    chunk_id: int
    stamp_s: float
    actions: np.ndarray  # [H, A] float64
    arrival_s: float


class ChunkScheduler:
    """Not thread-safe: the node calls it from its one control callback group.

    `lead_s` is how long after its arrival a chunk's first point is executed (the node sends it one
    control period ahead): the previous chunk runs that much longer, so it counts toward d."""

    def __init__(self, config: SchedulerConfig, period_s: float, horizon: int, lead_s: float = 0.0) -> None:
        if not (math.isfinite(period_s) and period_s > 0.0):
            raise ConfigError(f"action period must be > 0 s, found {period_s!r}")
        if not (math.isfinite(lead_s) and lead_s >= 0.0):
            raise ConfigError(f"chunk lead time must be >= 0 s, found {lead_s!r}")
        if horizon < 1:
            raise ConfigError(f"chunk horizon must be >= 1, found {horizon}")
        # naive starts an inference every tick and never reads it (a file made for longer chunks stays usable)
        if config.mode != "naive" and config.execute_horizon > horizon:
            raise ConfigError(f"execute_horizon ({config.execute_horizon}) must be <= the chunk horizon ({horizon})")
        self.config = config
        self.period_s = period_s
        self.horizon = horizon
        self.lead_s = lead_s
        self._latencies_s: deque[float] = deque(maxlen=config.latency_window)
        # temporal_ensemble needs every chunk that may still cover the future: ceil(H / s) + 1 of them
        self._chunks: deque[_Chunk] = deque(maxlen=-(-horizon // config.execute_horizon) + 1)
        self._in_flight: InferenceRequest | None = None
        self._last_start_s: float | None = None
        self._start_before_in_flight_s: float | None = None  # what abort restores
        self._last_arrival_s: float | None = None
        self._next_id = 0
        self._received = 0
        self._dropped = 0

    # ---- latency -------------------------------------------------------------------------------
    @property
    def latency_s(self) -> float:
        if not self._latencies_s:
            return self.config.initial_latency_s
        return float(np.percentile(np.asarray(self._latencies_s), self.config.latency_percentile))

    @property
    def delay_steps(self) -> int:
        """d: whole action periods from the observation time to the chunk's first executed point
        (its arrival plus the lead)."""
        return max(0, math.ceil((self.latency_s + self.lead_s) / self.period_s - INDEX_TOLERANCE))

    def status(self) -> SchedulerStatus:
        return SchedulerStatus(mode=self.config.mode, delay_steps=self.delay_steps,
                               latency_s=self.latency_s if self._latencies_s else math.nan,
                               in_flight=self._in_flight is not None, chunks_received=self._received,
                               chunks_dropped=self._dropped)

    # ---- inference -------------------------------------------------------------------------------
    def should_start(self, now_s: float) -> bool:
        """True when no inference is in flight and s periods have passed since the last start."""
        if self._in_flight is not None:
            return False
        if self._last_start_s is None:
            return True
        elapsed_steps = (now_s - self._last_start_s) / self.period_s
        return elapsed_steps >= self.config.execute_horizon - INDEX_TOLERANCE

    def begin(self, now_s: float, stamp_s: float | None = None) -> InferenceRequest:
        """Register an inference on the observation stamped `stamp_s` (default: now)."""
        if self._in_flight is not None:
            raise Pi0PolicyError(f"expected no inference in flight, found chunk {self._in_flight.chunk_id} "
                                 "still running")
        stamp_s = now_s if stamp_s is None else stamp_s
        if stamp_s > now_s:
            raise Pi0PolicyError(f"expected an observation stamp <= now ({now_s:.6f} s), found {stamp_s:.6f} s")
        d = self.delay_steps
        prev, mask_end = None, 0
        if self.config.guided and self._chunks:
            latest = self._chunks[-1]
            times = stamp_s + self.period_s * np.arange(self.horizon)
            prev = np.stack([self._sample(latest, t) for t in times])
            last_index = (stamp_s - latest.stamp_s) / self.period_s  # index of row 0 in the latest chunk
            covered = math.floor(self.horizon - 1 - last_index + INDEX_TOLERANCE) + 1
            mask_end = min(self.horizon, max(covered, d, 0))
        request = InferenceRequest(chunk_id=self._next_id, stamp_s=stamp_s, delay_steps=d,
                                   prev_actions=prev, mask_end=mask_end)
        self._next_id += 1
        self._in_flight = request
        self._start_before_in_flight_s = self._last_start_s
        self._last_start_s = now_s
        return request

    def complete(self, request: InferenceRequest, actions: np.ndarray, now_s: float) -> bool:
        """The chunk of `request` is available at `now_s`. Returns False when it was dropped
        because none of its actions lies in the future."""
        self._check_in_flight(request)
        actions = np.asarray(actions, dtype=np.float64)
        if actions.ndim != 2 or actions.shape[0] != self.horizon:
            raise Pi0PolicyError(f"expected actions [{self.horizon}, A], found {actions.shape}")
        if now_s < request.stamp_s or (self._last_arrival_s is not None and now_s < self._last_arrival_s):
            raise Pi0PolicyError(f"time went backwards: chunk {request.chunk_id} completed at {now_s:.6f} s, "
                                 f"before its stamp {request.stamp_s:.6f} s or the previous arrival "
                                 f"{self._last_arrival_s}")
        self._in_flight = None
        self._latencies_s.append(now_s - request.stamp_s)
        self._last_arrival_s = now_s
        self._received += 1
        if (now_s - request.stamp_s) / self.period_s > self.horizon - 1 + INDEX_TOLERANCE:
            self._dropped += 1
            return False
        if self._chunks and actions.shape[1] != self._chunks[-1].actions.shape[1]:
            raise Pi0PolicyError(f"expected {self._chunks[-1].actions.shape[1]} action dims, found {actions.shape[1]}")
        self._chunks.append(_Chunk(request.chunk_id, request.stamp_s, actions, now_s))
        return True

    def abort(self, request: InferenceRequest) -> None:
        """The inference failed: forget it, its start time included, so that the next tick may start
        another (waiting s periods from the failed start could let the previous chunk run out)."""
        self._check_in_flight(request)
        self._in_flight = None
        self._last_start_s = self._start_before_in_flight_s

    def abort_in_flight(self) -> None:
        """`abort` whatever request is in flight (none: nothing to do): its caller failed without
        ending it, and a request left in flight blocks every later `begin` / `should_start`."""
        if self._in_flight is not None:
            self.abort(self._in_flight)

    def withdraw(self, request: InferenceRequest) -> None:
        """The chunk of `request` was completed but never sent (a check after `complete` refused it,
        or no point of it was left to send): forget it like an aborted inference, so that what is
        executed, ensembled and guided toward stays the chunks the controller actually has. A chunk
        that `complete` already dropped (too late) is counted once."""
        if self._chunks and self._chunks[-1].chunk_id == request.chunk_id:
            self._chunks.pop()
            self._dropped += 1
        self._last_start_s = self._start_before_in_flight_s

    def executed(self, request: InferenceRequest, first_index: int, positions: np.ndarray) -> None:
        """The controller executes `positions` [K, A] at the action times of rows first_index.. of the
        chunk of `request` instead of its own actions (the safety filter's check of the points sent
        clamped them): in the splicing modes those rows become the positions, so that later requests
        continue, and holds end at, what the robot does. temporal_ensemble keeps the chunk as the
        policy gave it: the points sent are a blend of several chunks, not this chunk's actions."""
        if self.config.mode == "temporal_ensemble" or not self._chunks:
            return
        latest = self._chunks[-1]
        positions = np.asarray(positions, dtype=np.float64)
        if latest.chunk_id != request.chunk_id or positions.shape != latest.actions[first_index:].shape:
            raise Pi0PolicyError(f"expected positions {latest.actions[first_index:].shape} for rows {first_index}.. "
                                 f"of the newest chunk {latest.chunk_id}, found {positions.shape} for chunk "
                                 f"{request.chunk_id}")
        actions = latest.actions.copy()  # the caller's array stays as it was
        actions[first_index:] = positions
        self._chunks[-1] = dataclasses.replace(latest, actions=actions)

    def drop_chunks(self) -> None:
        """The controller no longer executes any chunk of ours (a hold point replaced them): forget
        them, so that the next chunk is neither blended with nor guided toward actions the robot
        abandoned, and let the next inference start at once (no chunk of ours is left to execute
        for s periods). The latency estimate stays."""
        self._chunks.clear()
        self._last_start_s = None

    def _check_in_flight(self, request: InferenceRequest) -> None:
        if self._in_flight is None or request.chunk_id != self._in_flight.chunk_id:
            running = None if self._in_flight is None else self._in_flight.chunk_id
            raise Pi0PolicyError(f"expected the request in flight ({running}), found chunk {request.chunk_id}")

    # ---- execution -------------------------------------------------------------------------------
    def action_at(self, now_s: float) -> ScheduledAction | None:
        """The action for time `now_s` from the chunks available now; None before the first."""
        if not self._chunks:
            return None
        latest = self._chunks[-1]
        if self.config.mode == "temporal_ensemble":
            covering = tuple(c.chunk_id for c in self._chunks
                             if 0.0 <= self._index(c, now_s) <= self.horizon - 1 + INDEX_TOLERANCE)
            if covering:
                return ScheduledAction(self.compose(covering, now_s), covering, holding=False)
        holding = self._index(latest, now_s) > self.horizon - 1 + INDEX_TOLERANCE
        return ScheduledAction(self.compose((latest.chunk_id,), now_s), (latest.chunk_id,), holding)

    def compose(self, chunk_ids: tuple[int, ...], t_s: float) -> np.ndarray:
        """The positions that the given chunks (still held here) give at `t_s`, each held past its
        end: one chunk alone, or several with the ensemble weights, oldest first. `rtc-eval`
        uses it for the counterfactual "had nothing changed"."""
        chunks = {c.chunk_id: c for c in self._chunks}
        missing = [i for i in chunk_ids if i not in chunks]
        if not chunk_ids or missing:
            raise Pi0PolicyError(f"expected ids of chunks held, found {list(chunk_ids)} (held: {sorted(chunks)})")
        if len(chunk_ids) == 1:
            return self._sample(chunks[chunk_ids[0]], t_s)
        weights = np.exp(-self.config.ensemble_decay * np.arange(len(chunk_ids)))
        stacked = np.stack([self._sample(chunks[i], t_s) for i in sorted(chunk_ids)])
        return np.tensordot(weights / weights.sum(), stacked, axes=1)

    def plan(self, now_s: float, num_steps: int) -> np.ndarray | None:
        """[num_steps, A]: the actions at now + k·period if no new chunk arrives."""
        actions = [self.action_at(now_s + k * self.period_s) for k in range(num_steps)]
        if actions[0] is None:
            return None
        return np.stack([a.positions for a in actions if a is not None])

    def _index(self, chunk: _Chunk, t_s: float) -> float:
        return (t_s - chunk.stamp_s) / self.period_s

    def _sample(self, chunk: _Chunk, t_s: float) -> np.ndarray:
        """Linear interpolation on the chunk's grid; the last action past its end (hold)."""
        f = min(max(self._index(chunk, t_s), 0.0), float(self.horizon - 1))
        i0 = math.floor(f + INDEX_TOLERANCE)
        frac = f - i0
        if i0 >= self.horizon - 1 or frac <= INDEX_TOLERANCE:
            return chunk.actions[min(i0, self.horizon - 1)].copy()
        return (1.0 - frac) * chunk.actions[i0] + frac * chunk.actions[i0 + 1]

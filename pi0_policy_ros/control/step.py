"""One control tick, ROS-free: the node's timer callback and the offline replay both run it.

`ControlStep.run(clock)` does, in order:
1. snapshot the `ObservationBuffer` (age and skew rules) and decode the stored images with the
   injected decoders (`ros/convert` in the node and in replay: control/ imports neither rclpy nor
   torch), the cameras of `parallel_cameras` on a thread each when there are several (`close()`
   ends those threads);
2. `Observation` -> `policy.infer` -> `ActionChunk` (rtc modes: with the scheduler's previous
   actions as `ChunkGuidance`, for the guided denoising);
3. `SafetyFilter`: NaN/Inf guard and limits; a rejected chunk holds;
4. `ChunkScheduler` and the trajectory plan. `naive`: the chunk itself, points less than one
   control period ahead dropped (`plan_trajectory`), one inference per tick. Other modes: an
   inference every `execute_horizon` action periods, and the scheduler's splice / ensemble
   sampled at the newest chunk's action times, from the first at least one control period ahead
   to its last;
5. `SafetyFilter.limit_start`: the step and velocity limits again on the points sent, from the
   latest measured position to the first of them in the time the plan gives it (its actions
   before were never executed, so without this a chunk after a rest could start too fast); points
   it clamps replace the chunk's actions in the scheduler (splicing modes), as the robot executes them.
   With step or velocity limits set and no measured position fresh enough, the chunk holds;
6. a `StepResult`: PUBLISH (chunk and trajectory), HOLD (reason, kind, level; with
   `hold_position` a one-point trajectory at the measured position, reached within the step and
   velocity limits from where the last trajectory sent has the joints) or WAIT (non-naive modes
   between inference starts: the controller keeps executing what it has; the inputs' age and skew
   are still checked on every tick, and hold when they fail).

clock: returns now in seconds on the caller's clock. The node passes its ROS clock (read again
after inference, which takes time); the offline replay passes the tick's bag time, so the same
bag gives the same outputs. A clock that runs backwards (simulation reset) resets the buffers and
the schedule: old samples and chunks would otherwise look like they come from the future. Less
than CLOCK_JUMP_TOLERANCE_S back is jitter: the tick goes on at the latest reading.
"""

from __future__ import annotations

import dataclasses
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Mapping, Protocol, Sequence

import numpy as np

from pi0_policy_ros.control.monitor import ERROR, OK, WARN
from pi0_policy_ros.control.observation_buffer import STALE_OBSERVATION, STATE_SOURCE, ObservationBuffer
from pi0_policy_ros.control.safety import SafetyFilter
from pi0_policy_ros.control.scheduler import (INDEX_TOLERANCE, ChunkScheduler, InferenceRequest, SchedulerConfig,
                                              SchedulerStatus)
from pi0_policy_ros.control.trajectory import (TrajectoryPlan, check_control_period, expired_reason,
                                               finite_difference_velocities, plan_trajectory, rest_at_end)
from pi0_policy_ros.errors import ConfigError, ObservationError, Pi0PolicyError
from pi0_policy_ros.policy.robots import TRAJECTORY_ACTION_SPACES
from pi0_policy_ros.policy.types import ActionChunk, ChunkGuidance, Observation

PUBLISH, HOLD, WAIT = "publish", "hold", "wait"
HOLD_STOP, HOLD_POSITION = "stop", "hold_position"
HOLD_MODES = (HOLD_STOP, HOLD_POSITION)
NAIVE = "naive"

# Hold kinds besides the snapshot's (observation_buffer.MISSING_INPUT, ...): /diagnostics counts
# holds per kind.
BAD_IMAGE = "bad_image"
POLICY_REFUSED = "policy_refused"
INFERENCE_FAILED = "inference_failed"
SAFETY_REJECT = "safety_reject"
UNUSABLE_CHUNK = "unusable_chunk"
EXPIRED_CHUNK = "expired_chunk"
CLOCK_JUMP = "clock_jump"
INTERNAL_ERROR = "internal_error"  # a tick that raised (a bug): the caller reports it with `hold`

# A clock this far behind the previous tick is a jump (simulation reset), not jitter.
CLOCK_JUMP_TOLERANCE_S = 1e-3

Decoder = Callable[[Any], np.ndarray]
Clock = Callable[[], float]


class InferencePolicy(Protocol):
    def infer(self, observation: Observation, guidance: ChunkGuidance | None = None) -> ActionChunk: ...


@dataclass(frozen=True)
class StepResult:
    """What one tick did.

    outcome: PUBLISH, HOLD or WAIT. reason / kind / level: why it held (kind: the /diagnostics
    counter). observation: the observation used, when one was built. chunk: the policy's chunk,
    with the safety-filtered actions when it got that far. plan: the trajectory to publish (the
    chunk's, or the hold point of `hold_position`; None when nothing goes out). clamped: the
    safety limits that clamped this chunk. timings_ms: decode / infer / plan and the policy's
    own stages (policy_*). age_s / camera_skew_s: of the snapshot (nan without one).
    """

    outcome: str
    reason: str = ""
    kind: str = ""
    level: int = OK
    observation: Observation | None = None
    chunk: ActionChunk | None = None
    plan: TrajectoryPlan | None = None
    clamped: tuple[str, ...] = ()
    timings_ms: Mapping[str, float] = field(default_factory=dict)
    age_s: float = math.nan
    camera_skew_s: float = math.nan

    @property
    def published(self) -> bool:
        return self.outcome == PUBLISH


def action_state_indices(joint_names: Sequence[str], action_joint_names: Sequence[str],
                         action_space: str = "joint_position") -> tuple[int, ...] | None:
    """Where each action joint sits in the state vector; None when the actions are not joint
    positions (velocities, end-effector deltas) or some action joint is not a measured joint:
    then there is no measured position to compare actions with or to hold. The generic profile's
    actions (`unspecified`) go out on the trajectory as joint positions, so they count as such:
    else its step and velocity limits never applied from the measured position, nor hold_position."""
    index = {name: i for i, name in enumerate(joint_names)}
    if action_space not in TRAJECTORY_ACTION_SPACES or not action_joint_names:
        return None
    if any(name not in index for name in action_joint_names):
        return None
    return tuple(index[name] for name in action_joint_names)


def _decoded(name: str, decode: Decoder, frames: Mapping[str, Any]) -> np.ndarray:
    """One camera's stored frame decoded; its ObservationError names the camera."""
    try:
        return decode(frames[name])
    except ObservationError as exc:
        raise ObservationError(f"camera {name!r}: {exc}", BAD_IMAGE) from None


def _decoded_here(name: str, decode: Decoder, frames: Mapping[str, Any]) -> Future[np.ndarray]:
    """`_decoded` on this thread, as a done Future: its error is raised in camera order with the pool's."""
    future: Future[np.ndarray] = Future()
    try:
        future.set_result(_decoded(name, decode, frames))
    except Exception as exc:  # noqa: BLE001 - raised again by result(), where its camera comes
        future.set_exception(exc)
    return future


def _guidance(request: InferenceRequest | None) -> ChunkGuidance | None:
    """RTC modes: the scheduler's previous actions for the policy's guided denoising (None before
    the first chunk, and in the other modes)."""
    if request is None or request.prev_actions is None:
        return None
    return ChunkGuidance(request.prev_actions, request.delay_steps, request.mask_end)


class ControlStep:
    """The control loop's logic, one `run` per tick. Not thread-safe: one caller at a time (the
    node's control callback group, holding its lock).

    decoders: camera name -> raw stored value -> uint8 RGB [H, W, 3], in the camera order the
        policy sees. state_indices: `action_state_indices(...)` of the configuration.
    parallel_cameras: the cameras whose frames each tick decodes in parallel, one thread per camera
        (the tick's own for the first, the step's for the others, which `close()` ends); None: all.
        Worth it for compressed frames (cv2.imdecode releases the GIL: ~1.8 ms per 640x480 JPEG),
        not for raw ones, read in place in microseconds, less than a hand-off to another thread.
    state_to_actions: a measured state [state_dim] in the action units (`robots.state_in_action_units`
        of the profile: ALOHA measures its gripper as a finger position, commands it as a joint);
        None where both are the same units.
    """

    def __init__(self, policy: InferencePolicy, buffer: ObservationBuffer, decoders: Mapping[str, Decoder],
                 safety: SafetyFilter, scheduler_config: SchedulerConfig | None = None,
                 state_indices: tuple[int, ...] | None = None, hold_mode: str = HOLD_STOP,
                 state_to_actions: Callable[[np.ndarray], np.ndarray] | None = None,
                 parallel_cameras: Collection[str] | None = None) -> None:
        if hold_mode not in HOLD_MODES:
            raise ConfigError(f"hold_mode: expected one of {list(HOLD_MODES)}, found {hold_mode!r}")
        unknown = sorted(set(parallel_cameras or ()) - set(decoders))
        if unknown:
            raise ConfigError(f"parallel_cameras: expected cameras from {list(decoders)}, found {unknown}")
        self.policy = policy
        self.buffer = buffer
        self.decoders = dict(decoders)
        # Decoding JPEG cameras is, after resizing, most of a tick's host time. The tick's own thread
        # decodes the first parallel camera (one hand-off less), this pool the other ones.
        parallel = [name for name in self.decoders if parallel_cameras is None or name in parallel_cameras]
        self._pooled = tuple(parallel[1:])
        self._decode_pool = ThreadPoolExecutor(len(self._pooled), "pi0-decode") if self._pooled else None
        self.safety = safety
        self.scheduler_config = scheduler_config or SchedulerConfig()
        self.state_indices = state_indices
        self.hold_mode = hold_mode
        self.state_to_actions = state_to_actions
        self._scheduler: ChunkScheduler | None = None
        self._executing = False  # a trajectory of ours is running on the controller
        # The last trajectory published, when, and where the joints were then (None: not known).
        self._sent: tuple[float, TrajectoryPlan, np.ndarray | None] | None = None
        self._unsent: InferenceRequest | None = None  # completed this tick, not yet published
        self._last_now_s: float | None = None

    # ---- state --------------------------------------------------------------------------------

    def prepare(self, horizon: int, period_s: float) -> None:
        """Build the scheduler for chunks of `horizon` actions `period_s` apart (the node does it at
        configure, after the warm-up chunk, so that a bad `execute_horizon` or a control period too
        long for the chunk fails configure). ConfigError."""
        check_control_period(self.buffer.config.control_period_s, horizon, period_s)
        self._scheduler = self._new_scheduler(period_s, horizon)

    def check_control_period(self, control_period_s: float) -> None:
        """ConfigError when chunks of the prepared geometry could never be sent at this control
        period (`trajectory.check_control_period`); nothing to check before `prepare`."""
        if self._scheduler is not None:
            check_control_period(control_period_s, self._scheduler.horizon, self._scheduler.period_s)

    def _new_scheduler(self, period_s: float, horizon: int) -> ChunkScheduler:
        # Each chunk's first point is sent one control period ahead (min_lead_s in run).
        return ChunkScheduler(self.scheduler_config, period_s, horizon, lead_s=self.buffer.config.control_period_s)

    def reset(self) -> None:
        """Forget samples, chunks and timing (activation, clock jump). The scheduler keeps its
        geometry but starts over."""
        self.buffer.reset()
        if self._scheduler is not None:
            self._scheduler = self._new_scheduler(self._scheduler.period_s, self._scheduler.horizon)
        self._executing = False
        self._sent = None
        self._last_now_s = None

    def close(self) -> None:
        """End the decode threads (the step's owner is done with it: the node's cleanup, the replay's
        end). Idempotent; a later `run` decodes on the caller's thread."""
        pool, self._decode_pool = self._decode_pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    @property
    def executing(self) -> bool:
        """A trajectory of ours may still be running on the controller (no hold point sent since)."""
        return self._executing

    def stop_plan(self, now_s: float) -> tuple[TrajectoryPlan | None, str]:
        """The loop stops (deactivate, shutdown): with `hold_position` and a trajectory of ours running,
        the hold point a held tick would send, else None (`stop`: the controller finishes what it
        has); with why none can be sent when hold_position has no fresh measured position of the
        action joints, or one outside the safety filter's position limits or gripper range."""
        if self.hold_mode != HOLD_POSITION or not self._executing:
            return None, ""
        plan, refusal = self._hold_plan(now_s)
        if plan is not None:
            self._hold_point_sent()
        return plan, refusal

    def scheduler_status(self) -> SchedulerStatus:
        if self._scheduler is None:
            return SchedulerStatus(mode=self.scheduler_config.mode, delay_steps=0, latency_s=math.nan,
                                   in_flight=False, chunks_received=0, chunks_dropped=0)
        return self._scheduler.status()

    # ---- the tick ------------------------------------------------------------------------------

    def run(self, clock: Clock) -> StepResult:
        try:
            return self._run(clock)
        except Exception:
            # A bug, not an input (the caller reports it). An inference this tick began must not
            # stay in flight: naive would refuse every later tick ("expected no inference in
            # flight"), the other modes would wait on it forever. A chunk it completed never went
            # out: the next ones must neither continue nor blend it, nor wait s periods after it.
            if self._scheduler is not None:
                self._scheduler.abort_in_flight()
                if self._unsent is not None:
                    self._scheduler.withdraw(self._unsent)
            raise
        finally:
            self._unsent = None

    def _run(self, clock: Clock) -> StepResult:
        now_s = clock()
        jumped = self._clock_jump(now_s)
        if jumped is not None:
            return jumped
        now_s = self._monotonic(now_s)
        scheduler = self._scheduler
        if scheduler is not None:
            # d counts the lead the points go out with: one control period, which the node's
            # control_rate_hz may have changed since the scheduler was built.
            scheduler.lead_s = self.buffer.config.control_period_s
        # A start goes to the tick nearest its due time: ticks come one control period apart with
        # some jitter, and one a fraction of a millisecond early must not wait a whole period more
        # (by then the chunk executing may have run out).
        due_by_s = now_s + 0.5 * self.buffer.config.control_period_s
        if self.scheduler_config.mode != NAIVE and scheduler is not None and not scheduler.should_start(due_by_s):
            return self._between_starts(now_s)

        t0 = time.perf_counter()
        try:
            snapshot = self.buffer.snapshot(now_s)
        except ObservationError as exc:
            return self._hold(exc.kind, str(exc), now_s)
        try:
            images = self._decode(snapshot.images)
        except ObservationError as exc:
            return self._hold(BAD_IMAGE, str(exc), now_s)
        observation = Observation(images=images, state=snapshot.state, prompt=snapshot.prompt,
                                  stamp_s=snapshot.stamp_s)
        seen = {"observation": observation, "age_s": snapshot.age_s, "camera_skew_s": snapshot.camera_skew_s}
        t_decoded = time.perf_counter()

        # A stamp slightly ahead counts as now, in every mode (the chunk keeps the observation's own).
        start_s, stamp_s = now_s, min(snapshot.stamp_s, now_s)
        request = scheduler.begin(start_s, stamp_s) if scheduler is not None else None
        failure: tuple[str, str, int] | None = None
        try:
            guidance = _guidance(request)
            chunk = self.policy.infer(observation) if guidance is None else self.policy.infer(observation, guidance)
        except ObservationError as exc:
            failure = (POLICY_REFUSED, f"policy refused the observation: {exc}", WARN)
        except Exception as exc:  # noqa: BLE001 - a failed inference holds; the loop goes on
            failure = (INFERENCE_FAILED, f"inference failed: {exc!r}", ERROR)
        t_inferred = time.perf_counter()
        # Read again after the inference, which takes time: what goes out now, a hold point included,
        # starts from where the arm is now (a hold timed from before a slow inference that failed sent
        # a measured position gone stale, and too soon for the velocity limit from where the arm went).
        now_s = clock()
        # A jump during inference (a bag loop restarting) leaves a chunk stamped before it: dropped.
        jumped = self._clock_jump(now_s)
        if jumped is not None:
            return jumped
        now_s = self._monotonic(now_s)
        if failure is not None:
            self._abort(request)
            kind, reason, level = failure
            return self._hold(kind, reason, now_s, level, **seen)

        current = self._as_actions(snapshot.state)
        filtered = self.safety.apply(chunk.actions, current)
        if filtered.rejected:
            self._abort(request)
            return self._hold(SAFETY_REJECT, f"safety filter rejected the chunk: {filtered.reason}", now_s,
                              chunk=chunk, **seen)
        chunk = dataclasses.replace(chunk, actions=filtered.actions)
        min_lead_s = self.buffer.config.control_period_s
        try:
            if scheduler is None:  # not prepared (a profile without action_horizon): the first chunk gives the geometry
                self.prepare(chunk.horizon, chunk.period_s)
                scheduler = self._scheduler
                request = scheduler.begin(start_s, stamp_s)
            assert request is not None
            kept = scheduler.complete(request, chunk.actions, now_s)
            self._unsent = request
            if self.scheduler_config.mode == NAIVE:
                plan = plan_trajectory(chunk.actions, chunk.period_s, stamp_s, now_s, min_lead_s)
            else:
                plan = self._scheduled_plan(scheduler, request, now_s, min_lead_s) if kept else None
        except Pi0PolicyError as exc:  # ConfigError included (execute_horizon > horizon)
            self._abort(request)
            return self._hold(UNUSABLE_CHUNK, f"unusable chunk: {exc}", now_s, ERROR, chunk=chunk, **seen)
        if plan is None or plan.empty:
            scheduler.withdraw(request)  # nothing of it goes out: the controller keeps the previous chunks
            reason = expired_reason(chunk.horizon, chunk.period_s, stamp_s, now_s, min_lead_s)
            return self._hold(EXPIRED_CHUNK, reason, now_s, chunk=chunk, **seen)
        measured = self._measured(now_s)
        if measured is None and self.state_indices is not None and self.safety.limits_rates:
            # joint_states stopped during the inference: without a measured position the start
            # check would pass anything, and a chunk after a rest could start over the limits.
            scheduler.withdraw(request)
            age_s = self.buffer.config.max_observation_age_s
            return self._hold(STALE_OBSERVATION, f"{STATE_SOURCE} went stale during the inference: expected a "
                                                 f"measured position at most {age_s:g} s old to check the first "
                                                 "point sent against the step and velocity limits, found none",
                              now_s, chunk=chunk, **seen)
        start = self.safety.limit_start(plan.positions, float(plan.times_from_start_s[0]), measured, filtered.clamped)
        if start.rejected:
            scheduler.withdraw(request)
            return self._hold(SAFETY_REJECT, f"safety filter rejected the chunk: {start.reason}", now_s,
                              chunk=chunk, **seen)
        if start.clamped:
            positions = start.actions.astype(np.float64)
            plan = dataclasses.replace(plan, positions=positions, velocities=rest_at_end(
                finite_difference_velocities(positions, chunk.period_s)))
            # The controller executes these, not the chunk's actions: the next RTC request continues them.
            scheduler.executed(request, plan.first_index, positions)
        self._executing = True
        # The controller goes from where the joints are to the first point: where our trajectory before
        # had them (the measured position lags a moving arm), else the measured position.
        commanded = self._commanded(now_s)
        self._sent = (now_s, plan, measured if commanded is None else commanded)
        timings = {f"policy_{k}": v for k, v in chunk.timings_ms.items()}
        timings.update(decode=(t_decoded - t0) * 1e3, infer=(t_inferred - t_decoded) * 1e3,
                       plan=(time.perf_counter() - t_inferred) * 1e3)
        clamped = filtered.clamped + tuple(name for name in start.clamped if name not in filtered.clamped)
        return StepResult(PUBLISH, chunk=chunk, plan=plan, clamped=clamped, timings_ms=timings, **seen)

    # ---- helpers -------------------------------------------------------------------------------

    def _decode(self, stored: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Every camera's frame, in camera order. Raises as decoding one camera after another would:
        the first camera in camera order whose decode raised decides (ObservationError: a bad image),
        whichever failed first in time. No decode outlives the call."""
        pool = self._decode_pool
        if pool is None:
            return {name: _decoded(name, decode, stored) for name, decode in self.decoders.items()}
        pooled = {name: pool.submit(_decoded, name, self.decoders[name], stored) for name in self._pooled}
        try:
            # The first parallel camera on this thread too: on 2 cores, 3 JPEG cameras took 3.6 ms
            # median and 3.8 ms p90, against 3.75 and 5.5 ms with all three on the pool.
            outcomes = {name: pooled[name] if name in pooled else _decoded_here(name, decode, stored)
                        for name, decode in self.decoders.items()}
        finally:
            wait(pooled.values())
        return {name: outcome.result() for name, outcome in outcomes.items()}

    def _clock_jump(self, now_s: float) -> StepResult | None:
        """A clock behind the last reading: reset (buffers, schedule, any inference in flight) and hold."""
        if self._last_now_s is None or now_s >= self._last_now_s - CLOCK_JUMP_TOLERANCE_S:
            return None
        jump_s = self._last_now_s - now_s
        self.reset()
        self._last_now_s = now_s
        return StepResult(HOLD, f"clock jumped back by {jump_s:.3f} s (simulation reset?): observation "
                                "buffers and chunk schedule reset", CLOCK_JUMP, WARN)

    def _monotonic(self, now_s: float) -> float:
        """`now_s`, or the latest reading when jitter (less than CLOCK_JUMP_TOLERANCE_S, not a jump)
        put it behind: the scheduler refuses time going backwards."""
        if self._last_now_s is not None:
            now_s = max(now_s, self._last_now_s)
        self._last_now_s = now_s
        return now_s

    def _between_starts(self, now_s: float) -> StepResult:
        """WAIT, once the inputs pass the checks a start makes before decoding: a source gone stale or
        cameras out of sync hold on this tick (with `hold_position`, a hold point), not at the next
        start up to `execute_horizon` action periods later."""
        try:
            self.buffer.snapshot(now_s)
        except ObservationError as exc:
            return self._hold(exc.kind, str(exc), now_s)
        return StepResult(WAIT)

    def _abort(self, request: InferenceRequest | None) -> None:
        scheduler = self._scheduler
        if request is not None and scheduler is not None and scheduler.status().in_flight:
            scheduler.abort(request)

    @staticmethod
    def _scheduled_plan(scheduler: ChunkScheduler, request: InferenceRequest, now_s: float,
                        min_lead_s: float) -> TrajectoryPlan | None:
        """The scheduler's actions at the newest chunk's own action times, from the first at least
        one control period ahead to its last action (as `plan_trajectory` keeps them): sampled
        from one control period ahead instead, a tick off the action grid never sent that last
        action, and the robot stopped short of it when the next chunk came late."""
        period_s = scheduler.period_s
        # The first action at least the lead ahead, in periods from the stamp; the epoch-sized stamps
        # subtracted first. A tick on the grid may land a rounding error past an action: within the
        # tolerance is on it.
        first = max(0, math.ceil(((now_s - request.stamp_s) + min_lead_s) / period_s - INDEX_TOLERANCE))
        count = scheduler.horizon - first
        if count < 1:
            return None
        positions = scheduler.plan(request.stamp_s + first * period_s, count)
        if positions is None:
            return None
        first_ahead_s = (request.stamp_s - now_s) + first * period_s
        if abs(first_ahead_s - min_lead_s) <= INDEX_TOLERANCE * period_s:
            first_ahead_s = min_lead_s  # on the grid within rounding: exactly the lead, never less
        return TrajectoryPlan(first_index=first,
                              times_from_start_s=first_ahead_s + np.arange(count, dtype=np.float64) * period_s,
                              positions=positions.astype(np.float64),
                              velocities=rest_at_end(finite_difference_velocities(positions, period_s)))

    def hold(self, kind: str, reason: str, now_s: float, level: int = WARN) -> StepResult:
        """A hold decided by the caller (a tick that raised): as the tick's own holds, the hold
        point included with `hold_position`."""
        return self._hold(kind, reason, now_s, level)

    def _hold(self, kind: str, reason: str, now_s: float, level: int = WARN, **seen: Any) -> StepResult:
        """A hold: with `hold_position`, the first hold after our own trajectory also sends a hold point."""
        plan = None
        if self.hold_mode == HOLD_POSITION and self._executing:
            plan, refusal = self._hold_plan(now_s)
            if plan is None:
                reason += f" (hold_position: {refusal}; nothing sent)"
            else:
                self._hold_point_sent()
        return StepResult(HOLD, reason, kind, level, plan=plan, **seen)

    def _hold_point_sent(self) -> None:
        """The hold point replaces our trajectory on the controller: the chunks before it are no
        longer executed, so the next chunk is neither blended with nor guided toward them."""
        self._executing = False
        self._sent = None
        if self._scheduler is not None:
            self._scheduler.drop_chunks()

    def _measured(self, now_s: float) -> np.ndarray | None:
        """The latest measured position of the action joints; None when there is none fresh enough
        (or the actions are not joint positions). joint_trajectory_controller starts a new
        trajectory from here (unless `interpolate_from_desired_state` is set)."""
        sample = self.buffer.latest_state()
        config = self.buffer.config
        if sample is None or now_s - sample.stamp_s > config.max_observation_age_s:
            return None
        return self._as_actions(sample.value)

    def _as_actions(self, state: np.ndarray) -> np.ndarray | None:
        """The action joints' values of a measured state [state_dim], in the action units; None when
        the actions are not measured joint positions."""
        if self.state_indices is None:
            return None
        values = np.asarray(state, dtype=np.float64)
        if self.state_to_actions is not None:
            values = self.state_to_actions(values)
        return values[list(self.state_indices)]

    def _commanded(self, now_s: float) -> np.ndarray | None:
        """Where our last published trajectory puts the action joints at `now_s`: linear from where they
        were when it was sent to its first point (that first point before it when that is not known),
        then between its points, its last after it; None when none was published. (Taking the first
        point for the joints until it was due timed a hold point on a tick before then from where the
        joints were not yet.)"""
        if self._sent is None:
            return None
        sent_s, plan, start = self._sent
        times_s = sent_s + plan.times_from_start_s
        positions = plan.positions
        if start is not None:
            times_s, positions = np.concatenate([[sent_s], times_s]), np.concatenate([start[None, :], positions])
        return np.array([np.interp(now_s, times_s, positions[:, dim]) for dim in range(positions.shape[1])])

    def _hold_plan(self, now_s: float) -> tuple[TrajectoryPlan | None, str]:
        """One point at the measured position of the action joints, zero velocity; or None and why
        not. A measured position outside the safety limits is not sent: the point would command the
        joints outside them (a bad measurement, e.g. encoder ticks for radians).

        The point lies one control period ahead, or further when the step and velocity limits need
        longer to reach it from where our trajectory has the joints now: a measured position up to
        `max_observation_age_s` old lags a moving arm, and the controller would go back to it in one
        control period."""
        position = self._measured(now_s)
        config = self.buffer.config
        if position is None:
            return None, "no fresh measured position of the action joints"
        outside = self.safety.outside_limits(position)
        if outside is not None:
            limit, _, _, detail = outside
            return None, f"the measured position is outside the {limit} limits, {detail}"
        ahead_s = config.control_period_s
        commanded = self._commanded(now_s)
        if commanded is not None:
            ahead_s = max(ahead_s, self.safety.min_travel_s(commanded, position))
        return TrajectoryPlan(first_index=0, times_from_start_s=np.array([ahead_s]),
                              positions=position[None, :], velocities=np.zeros((1, position.size))), ""

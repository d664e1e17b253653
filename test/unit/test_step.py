"""control/step.py: the one control tick shared by the node and the offline replay (no ROS)."""

from __future__ import annotations

import functools
import threading
import time
from typing import Mapping

import numpy as np
import pytest

from pi0_policy_ros.control.config import ControlConfig
from pi0_policy_ros.control.monitor import ERROR, WARN, ControlMonitor
from pi0_policy_ros.control.observation_buffer import STALE_OBSERVATION, ObservationBuffer
from pi0_policy_ros.control.safety import SafetyConfig, SafetyFilter
from pi0_policy_ros.control.scheduler import ChunkScheduler, SchedulerConfig
from pi0_policy_ros.control.step import (BAD_IMAGE, CLOCK_JUMP, EXPIRED_CHUNK, HOLD, HOLD_POSITION, INFERENCE_FAILED,
                                         POLICY_REFUSED, PUBLISH, SAFETY_REJECT, UNUSABLE_CHUNK, WAIT, ControlStep,
                                         Decoder, StepResult, action_state_indices)
from pi0_policy_ros.control.trajectory import (TrajectoryPlan, finite_difference_velocities, plan_trajectory,
                                               rest_at_end)
from pi0_policy_ros.errors import ConfigError, ObservationError
from pi0_policy_ros.policy.config import PolicyConfig
from pi0_policy_ros.policy.robots import get_profile, state_in_action_units
from pi0_policy_ros.policy.types import ActionChunk, ChunkGuidance, Observation
from test.fakes import FakePolicy, FakeProfile, expected_actions

PROFILE = FakeProfile()
CONTROL = ControlConfig(control_rate_hz=20.0, max_observation_age_s=0.3, max_camera_skew_s=0.2)
IMAGE = np.full((4, 5, 3), 10, np.uint8)
STATE = np.array([0.1, -0.2, 0.3])


def decode(value: object) -> np.ndarray:
    if isinstance(value, str):
        raise ObservationError(f"expected an image, found {value!r}")
    return value  # type: ignore[return-value]


class FailingPolicy(FakePolicy):
    def __init__(self, error: Exception) -> None:
        super().__init__(PolicyConfig())
        self.error = error

    def infer(self, observation):  # noqa: ANN001, ANN201
        raise self.error


def make_step(policy=None, safety: SafetyConfig | None = None, hold_mode: str = "stop",
              scheduler: SchedulerConfig | None = None, action_joints: tuple[str, ...] = ("j0", "j1", "j2"),
              decoders: Mapping[str, Decoder] | None = None, parallel_cameras: list[str] | None = None
              ) -> ControlStep:
    decoders = decoders or {"cam_a": decode, "cam_b": decode}
    buffer = ObservationBuffer(list(decoders), CONTROL)
    filt = SafetyFilter(safety or SafetyConfig(), PROFILE.action_dim, PROFILE.action_period_s)
    return ControlStep(policy or FakePolicy(PolicyConfig()), buffer, decoders, filt,
                       scheduler, action_state_indices(["j0", "j1", "j2"], action_joints), hold_mode,
                       parallel_cameras=parallel_cameras)


def feed(step: ControlStep, t_s: float, state: np.ndarray = STATE, image: object = IMAGE) -> None:
    step.buffer.put_image("cam_a", image, t_s, t_s)
    step.buffer.put_image("cam_b", IMAGE, t_s, t_s)
    step.buffer.put_state(state, t_s, t_s)


def test_naive_publishes_the_chunk_as_plan_trajectory_does() -> None:
    step = make_step()
    feed(step, 10.0)
    result = step.run(lambda: 10.02)
    assert result.outcome == PUBLISH and result.published
    expected = expected_actions(PROFILE, STATE, {"cam_a": IMAGE, "cam_b": IMAGE})
    np.testing.assert_array_equal(result.chunk.actions, expected)
    reference = plan_trajectory(expected, PROFILE.action_period_s, 10.0, 10.02, CONTROL.control_period_s)
    np.testing.assert_array_equal(result.plan.positions, reference.positions)
    np.testing.assert_array_equal(result.plan.times_from_start_s, reference.times_from_start_s)
    assert result.age_s == pytest.approx(0.02) and {"decode", "infer", "plan", "policy_fake"} <= set(result.timings_ms)
    assert step.scheduler_status().mode == "naive" and step.scheduler_status().chunks_received == 1


@pytest.mark.parametrize("case,kind,level", [
    ("missing", "missing_input", WARN),
    ("stale", "stale_observation", WARN),
    ("bad_image", BAD_IMAGE, WARN),
    ("refused", POLICY_REFUSED, WARN),
    ("failed", INFERENCE_FAILED, ERROR),
    ("expired", EXPIRED_CHUNK, WARN),
])
def test_every_hold_has_a_kind_and_a_reason(case: str, kind: str, level: int) -> None:
    policy = {"refused": FailingPolicy(ObservationError("no prompt")),
              "failed": FailingPolicy(RuntimeError("boom"))}.get(case)
    step = make_step(policy)
    step.prepare(PROFILE.action_horizon, PROFILE.action_period_s)  # as the node does at configure
    now = 10.05
    if case != "missing":
        feed(step, 10.0, image="yuv422" if case == "bad_image" else IMAGE)
    if case == "stale":
        now = 11.0
    if case == "expired":
        step.buffer.config = ControlConfig(control_rate_hz=20.0, max_observation_age_s=5.0)
        now = 10.6  # the whole 0.5 s chunk lies in the past
    result = step.run(lambda: now)
    assert (result.outcome, result.kind, result.level) == (HOLD, kind, level)
    assert result.reason and result.plan is None
    assert not step.scheduler_status().in_flight  # a hold never leaves the scheduler waiting
    if case == "bad_image":
        assert "camera 'cam_a'" in result.reason and "yuv422" in result.reason


def test_safety_clamp_and_reject() -> None:
    clamp = make_step(safety=SafetyConfig(position_lower=(-0.05,), position_upper=(0.05,)))
    feed(clamp, 10.0)
    result = clamp.run(lambda: 10.01)
    assert result.published and result.clamped == ("position",)
    assert np.all(np.abs(result.chunk.actions) <= 0.05) and clamp.safety.clamp_counts["position"] == 1

    reject = make_step(safety=SafetyConfig(position_lower=(-0.05,), position_upper=(0.05,), position_policy="reject"))
    reject.prepare(PROFILE.action_horizon, PROFILE.action_period_s)  # else there is no scheduler to wedge
    feed(reject, 10.0)
    result = reject.run(lambda: 10.01)
    assert (result.outcome, result.kind) == (HOLD, SAFETY_REJECT) and "position" in result.reason
    assert reject.safety.reject_counts["position"] == 1
    assert not reject.scheduler_status().in_flight  # the aborted request does not wedge the scheduler


def test_hold_position_sends_one_point_at_the_measured_position_once() -> None:
    step = make_step(hold_mode=HOLD_POSITION)
    feed(step, 10.0)
    assert step.run(lambda: 10.01).published
    step.buffer.put_image("cam_a", "corrupt", 10.05, 10.05)  # the next ticks hold
    moved = STATE + 0.01
    step.buffer.put_state(moved, 10.05, 10.05)
    held = step.run(lambda: 10.06)
    assert held.outcome == HOLD and held.kind == BAD_IMAGE
    np.testing.assert_array_equal(held.plan.positions, moved[None, :])
    np.testing.assert_array_equal(held.plan.velocities, np.zeros((1, 3)))
    np.testing.assert_allclose(held.plan.times_from_start_s, [CONTROL.control_period_s])
    assert step.run(lambda: 10.11).plan is None  # once per hold: the controller already stops there


@pytest.mark.parametrize("max_velocity", [0.7, None])
def test_a_hold_point_behind_the_arm_is_reached_within_the_velocity_limit(max_velocity: float | None) -> None:
    # joint_states last came at 10.0 (0.25 s old at 10.25, still fresh), while the chunk sent at
    # 10.01 has the arm at STATE + 0.08 by then: one control period to go back there would be
    # 1.6 units/s. With the limit, the point lies 0.08 / 0.7 s ahead.
    safety = SafetyConfig() if max_velocity is None else SafetyConfig(max_velocity=(max_velocity,))
    step = make_step(safety=safety, hold_mode=HOLD_POSITION)
    feed(step, 10.0)
    sent = step.run(lambda: 10.01)
    assert sent.published and sent.clamped == ()
    step.buffer.put_image("cam_a", "corrupt", 10.24, 10.24)
    step.buffer.put_image("cam_b", IMAGE, 10.24, 10.24)
    held = step.run(lambda: 10.25)
    assert held.kind == BAD_IMAGE
    np.testing.assert_array_equal(held.plan.positions, STATE[None, :])
    commanded = np.array([np.interp(10.25, 10.01 + sent.plan.times_from_start_s, sent.plan.positions[:, d])
                          for d in range(3)])
    np.testing.assert_allclose(commanded - STATE, 0.08, atol=1e-6)
    expected_s = CONTROL.control_period_s if max_velocity is None else 0.08 / max_velocity
    np.testing.assert_allclose(held.plan.times_from_start_s, [expected_s], rtol=1e-5)


def test_hold_position_without_a_fresh_state_sends_nothing() -> None:
    step = make_step(hold_mode=HOLD_POSITION)
    feed(step, 10.0)
    assert step.run(lambda: 10.01).published
    result = step.run(lambda: 11.0)  # everything stale, the state included
    assert result.kind == "stale_observation" and result.plan is None
    assert "nothing sent" in result.reason


def test_stop_sends_nothing_on_hold() -> None:
    step = make_step()
    feed(step, 10.0)
    assert step.run(lambda: 10.01).published
    assert step.run(lambda: 11.0).plan is None


def test_a_clock_jump_back_resets_and_recovers() -> None:
    step = make_step()
    feed(step, 100.0)
    assert step.run(lambda: 100.01).published
    result = step.run(lambda: 5.0)  # simulation reset
    assert (result.outcome, result.kind) == (HOLD, CLOCK_JUMP) and "95.010 s" in result.reason
    feed(step, 5.02)  # earlier stamps than before the jump are accepted again
    assert step.run(lambda: 5.05).published


@pytest.mark.parametrize("mode", ["naive", "temporal_ensemble"])
def test_a_clock_jump_back_during_inference_is_a_clock_jump(mode: str) -> None:
    # A bag loop restarting (use_sim_time) while the policy runs: the chunk, stamped before the
    # jump, is dropped, and the tick resets as a jump seen at its start would (not an ERROR hold
    # "unusable chunk" that leaves the old stamps refusing every new sample until the next tick).
    step = make_step(scheduler=SchedulerConfig(mode=mode, execute_horizon=4))
    step.prepare(PROFILE.action_horizon, PROFILE.action_period_s)
    feed(step, 100.0)
    times = iter([100.01, 5.0])
    result = step.run(lambda: next(times))
    assert (result.outcome, result.kind, result.level, result.plan) == (HOLD, CLOCK_JUMP, WARN, None)
    assert not step.scheduler_status().in_flight
    feed(step, 5.02)  # the buffers were reset: the new stamps count
    assert step.run(lambda: 5.05).published


def test_temporal_ensemble_infers_every_execute_horizon_and_blends() -> None:
    step = make_step(scheduler=SchedulerConfig(mode="temporal_ensemble", execute_horizon=4, ensemble_decay=0.0))
    step.prepare(PROFILE.action_horizon, PROFILE.action_period_s)
    feed(step, 10.0)
    first = step.run(lambda: 10.0)
    assert first.published and first.plan.times_from_start_s[0] == pytest.approx(CONTROL.control_period_s)
    feed(step, 10.05, STATE + 1.0)
    assert step.run(lambda: 10.05).outcome == WAIT  # 1 of 4 action periods since the last start
    feed(step, 10.2, STATE + 1.0)
    second = step.run(lambda: 10.2)
    assert second.published
    # At 10.25 both chunks cover the time: the uniform average of chunk 0 (index 5) and chunk 1 (index 1).
    a0 = expected_actions(PROFILE, STATE, {"cam_a": IMAGE, "cam_b": IMAGE})
    a1 = expected_actions(PROFILE, STATE + 1.0, {"cam_a": IMAGE, "cam_b": IMAGE})
    np.testing.assert_allclose(second.plan.positions[0], (a0[5] + a1[1]) / 2, rtol=1e-6)
    # The controller (Jazzy) rejects a trajectory whose last point still moves.
    assert np.any(second.plan.velocities[0] != 0.0)
    np.testing.assert_array_equal(second.plan.velocities[-1], np.zeros(PROFILE.action_dim))


@pytest.mark.parametrize("mode", ["temporal_ensemble", "rtc"])
def test_inputs_gone_stale_between_starts_hold_on_that_tick(mode: str) -> None:
    # Starts come every 8 action periods (0.4 s). joint_states stop after 10.0: at 10.35 they are
    # 0.35 s old (over 0.3) on a tick between starts. That tick holds, not the next start at 10.4.
    step = make_step(hold_mode=HOLD_POSITION, scheduler=SchedulerConfig(mode=mode, execute_horizon=8))
    feed(step, 10.0)
    assert step.run(lambda: 10.0).published
    assert step.run(lambda: 10.15).outcome == WAIT
    for t_s in (10.3, 10.35):
        step.buffer.put_image("cam_a", IMAGE, t_s, t_s)
        step.buffer.put_image("cam_b", IMAGE, t_s, t_s)
    held = step.run(lambda: 10.35)
    assert (held.outcome, held.kind) == (HOLD, STALE_OBSERVATION) and "joint_states is stale" in held.reason
    assert held.plan is None  # the measured position is as stale: no hold point, the reason says so
    assert "hold_position: no fresh measured position" in held.reason
    # No hold point went out, so the controller still runs the chunk: with joint_states back, the
    # ticks wait for the next start again.
    feed(step, 10.37)
    assert step.run(lambda: 10.37).outcome == WAIT


@pytest.mark.parametrize("mode", ["temporal_ensemble", "rtc"])
def test_a_camera_gone_stale_between_starts_stops_the_arm_and_the_next_tick_starts_again(mode: str) -> None:
    step = make_step(hold_mode=HOLD_POSITION, scheduler=SchedulerConfig(mode=mode, execute_horizon=8))
    feed(step, 10.0)
    assert step.run(lambda: 10.0).published
    step.buffer.put_state(STATE, 10.3, 10.3)  # joint_states keep coming; the cameras stopped at 10.0
    held = step.run(lambda: 10.31)
    assert (held.outcome, held.kind) == (HOLD, STALE_OBSERVATION) and "camera 'cam_a' is stale" in held.reason
    np.testing.assert_array_equal(held.plan.positions, STATE[None, :])
    # The hold point replaced the chunk: nothing of ours runs, so the next tick with fresh inputs
    # starts an inference at once, not at the next scheduled start (10.4).
    feed(step, 10.32)
    assert step.run(lambda: 10.32).published


def test_execute_horizon_longer_than_the_chunk_is_a_config_error() -> None:
    step = make_step(scheduler=SchedulerConfig(mode="rtc_fast", execute_horizon=20))
    with pytest.raises(ConfigError, match="execute_horizon"):
        step.prepare(PROFILE.action_horizon, PROFILE.action_period_s)


def test_a_control_period_past_the_chunks_last_action_is_a_config_error() -> None:
    # Every point goes out at least one control period ahead and a chunk's last action lies 0.45 s
    # (9 x 50 ms) after its observation: at 2 Hz no point of any chunk could be sent.
    step = make_step()
    step.buffer.config = ControlConfig(control_rate_hz=2.0, max_observation_age_s=0.3)
    with pytest.raises(ConfigError, match=r"control_rate_hz: expected at least 2.222 Hz for chunks of 10 actions "
                                          r"0.05 s apart .* found 2 Hz"):
        step.prepare(PROFILE.action_horizon, PROFILE.action_period_s)
    step.buffer.config = ControlConfig(control_rate_hz=1.0 / 0.45, max_observation_age_s=0.3)
    step.prepare(PROFILE.action_horizon, PROFILE.action_period_s)  # the last action exactly one period ahead
    with pytest.raises(ConfigError, match="control_rate_hz: expected at least 2.222 Hz"):
        step.check_control_period(0.5)  # what the node asks before it takes a new rate
    step.check_control_period(0.1)
    with pytest.raises(ConfigError, match="chunk horizon: expected at least 2 actions, found 1"):
        make_step().prepare(1, PROFILE.action_period_s)  # its one action is never ahead of the clock


def test_a_control_period_past_the_chunks_last_action_holds_an_unprepared_step() -> None:
    # A step not prepared builds its scheduler from the first chunk: every tick holds, saying why.
    step = make_step()
    step.buffer.config = ControlConfig(control_rate_hz=2.0, max_observation_age_s=0.3)
    for now in (10.01, 10.51):
        feed(step, now - 0.01)
        result = step.run(lambda: now)
        assert (result.outcome, result.kind) == (HOLD, UNUSABLE_CHUNK)
        assert "expected at least 2.222 Hz" in result.reason and not step.scheduler_status().in_flight


def test_action_state_indices() -> None:
    assert action_state_indices(["a", "b", "c"], ["c", "a"]) == (2, 0)
    assert action_state_indices(["a", "b"], ["a", "x"]) is None
    assert action_state_indices(["a", "b"], ["a", "b"], "joint_velocity") is None
    assert action_state_indices(["a", "b"], ["b", "a"], "unspecified") == (1, 0)  # the generic profile
    assert action_state_indices(["a", "b"], []) is None  # no action joint: nothing measured to compare with


def test_monitor_counts_holds_per_kind_on_the_callers_clock() -> None:
    monitor = ControlMonitor(control_rate_hz=10.0, rate_window_s=1.0)
    monitor.start(100.0)
    monitor.tick_started(100.1)
    monitor.held("stale", WARN, "stale_observation")
    monitor.tick_started(100.2)
    monitor.held("stale again", WARN, "stale_observation")
    monitor.held("rejected", WARN, "safety_reject")
    monitor.input_received("cam_a", 0.004)
    monitor.input_rejected("bad", "joint_states")
    monitor.set_values("safety", {"clamp.position": 3})
    values = monitor.report(100.3).values
    assert values["holds"] == "3" and values["holds.stale_observation"] == "2" and values["holds.safety_reject"] == "1"
    assert values["last_hold_kind"] == "safety_reject" and values["inputs.cam_a"] == "1"
    assert values["input_errors.joint_states"] == "1" and values["safety.clamp.position"] == "3"
    assert float(values["input_delay_cam_a_p50_ms"]) == pytest.approx(4.0)
    # Sim time reset: the rate window restarts instead of counting negative periods.
    monitor.tick_started(1.0)
    monitor.published(1.05, {}, 0.01, 0.0)
    values = monitor.report(1.1).values
    assert values["clock_jumps"] == "1" and values["skipped_ticks"] == "0"
    assert float(values["achieved_rate_hz"]) == pytest.approx(10.0)


def test_monitor_a_tick_that_waits_after_a_hold_between_starts_ends_the_hold() -> None:
    # hold_mode stop, starts every 8 action periods: the cameras stop after 10.0, the tick at 10.31
    # holds and sends nothing (the chunk runs on), and with the cameras back the tick at 10.32 waits
    # for the next start (10.4). The report held on until the next chunk was published.
    step = make_step(scheduler=SchedulerConfig(mode="rtc", execute_horizon=8))
    monitor = ControlMonitor(control_rate_hz=20.0)
    monitor.start(10.0)
    feed(step, 10.0)
    sent = step.run(lambda: 10.0)
    monitor.published(10.0, sent.timings_ms, sent.age_s, sent.camera_skew_s)
    step.buffer.put_state(STATE, 10.3, 10.3)
    held = step.run(lambda: 10.31)
    assert (held.outcome, held.plan) == (HOLD, None)
    monitor.held(held.reason, held.level, held.kind)
    assert monitor.report(10.31).message.startswith("holding: camera 'cam_a' is stale")
    feed(step, 10.32)
    assert step.run(lambda: 10.32).outcome == WAIT
    monitor.waited(10.32)
    report = monitor.report(10.32)
    assert not report.message.startswith("holding"), report.message
    assert (report.values["last_hold_reason"], report.values["last_hold_kind"]) == ("", "")
    assert report.values["holds.stale_observation"] == "1"


def test_rtc_modes_pass_the_scheduler_guidance_to_the_policy() -> None:
    """rtc: the first inference has no previous chunk (plain sampling); the next one gets the
    actions the first chunk will execute from its observation time on, d and the mask end."""
    policy = FakePolicy(PolicyConfig())
    step = make_step(policy, scheduler=SchedulerConfig(mode="rtc", execute_horizon=4))
    feed(step, 10.0)
    assert step.run(lambda: 10.0).published
    assert policy.guidance[-1] is None
    first = expected_actions(PROFILE, STATE, {"cam_a": IMAGE, "cam_b": IMAGE})
    feed(step, 10.2, STATE + 1.0)
    assert step.run(lambda: 10.2).published
    guidance = policy.guidance[-1]
    assert guidance is not None and guidance.prev_actions.shape == (PROFILE.action_horizon, PROFILE.action_dim)
    # The new observation is 4 action periods after the first: row i is the first chunk's row 4 + i,
    # held at its last action past the end; rows [0, 6) continue it.
    np.testing.assert_allclose(guidance.prev_actions[:6], first[4:], rtol=1e-6)
    np.testing.assert_allclose(guidance.prev_actions[6:], np.repeat(first[-1:], 4, axis=0), rtol=1e-6)
    # inference here takes no clock time, but the chunk's first point goes out one control period
    # (one action period) after it arrives: the first chunk's row 4 is still executed
    assert guidance.mask_end == 6 and guidance.delay_steps == 1


def test_naive_and_ensemble_modes_pass_no_guidance() -> None:
    for mode in ("naive", "temporal_ensemble"):
        policy = FakePolicy(PolicyConfig())
        step = make_step(policy, scheduler=SchedulerConfig(mode=mode, execute_horizon=4))
        for k in range(3):
            feed(step, 10.0 + 0.2 * k)
            step.run(lambda k=k: 10.0 + 0.2 * k)
        assert len(policy.guidance) == 3 and all(g is None for g in policy.guidance)


def test_the_first_point_sent_keeps_the_velocity_limit_from_rest() -> None:
    # The chunk starts at the observation (10.0) and moves 0.2 units/s; at 10.12 its actions 0-3 are
    # past, so the first point sent (action 4) is 0.07 from the measured position but only 0.08 s
    # ahead: 0.875 units/s. The chunk itself passes the 0.7 units/s limit (0.035 per 0.05 s step).
    safety = SafetyConfig(max_velocity=(0.7,))
    step = make_step(safety=safety)
    feed(step, 10.0)
    result = step.run(lambda: 10.12)
    assert result.published and result.clamped == ("velocity",)
    assert result.plan.first_index == 4 and result.plan.times_from_start_s[0] == pytest.approx(0.08)
    np.testing.assert_allclose(result.plan.positions[0], STATE + 0.7 * 0.08, rtol=1e-6)
    assert np.all(np.abs(np.diff(result.plan.positions, axis=0)) <= 0.035 + 1e-9)
    np.testing.assert_array_equal(result.plan.velocities[-1], np.zeros(3))
    # The velocities sent are those of the clamped positions, not of the chunk before clamping.
    np.testing.assert_allclose(result.plan.velocities[:-1],
                               np.gradient(result.plan.positions, PROFILE.action_period_s, axis=0)[:-1], rtol=1e-6)

    reject = make_step(safety=SafetyConfig(max_velocity=(0.7,), velocity_policy="reject"))
    feed(reject, 10.0)
    held = reject.run(lambda: 10.12)
    assert (held.outcome, held.kind) == (HOLD, SAFETY_REJECT) and "point sent 0 moves dim 0 by 0.07" in held.reason
    sooner = make_step(safety=SafetyConfig(max_velocity=(0.7,), velocity_policy="reject"))
    feed(sooner, 10.0)
    # At 10.02 the first point sent is action 2: 0.05 away, 0.08 s ahead (0.625 units/s).
    result = sooner.run(lambda: 10.02)
    assert result.published and result.plan.first_index == 2 and result.clamped == ()


@pytest.mark.parametrize("limits", ["velocity", "none"])
def test_joint_states_gone_stale_during_the_inference_hold_the_rate_limited_chunk(limits: str) -> None:
    # The start check needs the measured position: joint_states last stamped 10.0 are 0.31 s old
    # (over max_observation_age_s 0.3) when the chunk is ready at 10.31. The check then passed
    # anything: a chunk after a rest could start over the velocity limit.
    times = [10.1, 10.31]
    safety = SafetyConfig(max_velocity=(0.7,)) if limits == "velocity" else SafetyConfig()
    step = make_step(safety=safety, scheduler=SchedulerConfig(mode="rtc", execute_horizon=4))
    feed(step, 10.0)
    result = step.run(lambda: times.pop(0) if len(times) > 1 else times[0])
    if limits == "none":  # nothing to check the first point against: it goes out as planned
        assert result.published
        return
    assert (result.outcome, result.kind) == (HOLD, STALE_OBSERVATION)
    assert result.reason == ("joint_states went stale during the inference: expected a measured position at most "
                             "0.3 s old to check the first point sent against the step and velocity limits, found none")
    # Nothing went out: the next request is not guided toward the withdrawn chunk.
    feed(step, 10.35)
    assert step.run(lambda: 10.35).published


def test_a_chunk_refused_at_its_start_leaves_the_schedule() -> None:
    """A chunk that passed the safety filter but whose first point sent was refused never reached
    the controller, which keeps executing the previous chunk: the next RTC request must continue
    that one, not the refused chunk."""
    policy = FakePolicy(PolicyConfig())
    step = make_step(policy, safety=SafetyConfig(max_velocity=(0.85,), velocity_policy="reject"),
                     scheduler=SchedulerConfig(mode="rtc", execute_horizon=4))
    feed(step, 10.0)
    assert step.run(lambda: 10.0).published
    first = expected_actions(PROFILE, STATE, {"cam_a": IMAGE, "cam_b": IMAGE})
    # 0.12 s old at 10.32: the first point sent (index 4, at 10.4) is 0.07 from the measured
    # position, 0.08 s ahead (0.875 units/s > 0.85), while the chunk itself moves 0.2 units/s.
    feed(step, 10.2, STATE + 1.0)
    refused = step.run(lambda: 10.32)
    assert (refused.outcome, refused.kind) == (HOLD, SAFETY_REJECT)
    feed(step, 10.4, STATE + 1.0)
    assert step.run(lambda: 10.4).outcome != WAIT  # the refused start does not delay the next one
    guidance = policy.guidance[-1]
    assert guidance is not None
    # stamp 10.4: index 8 of the first chunk, then its last action held
    np.testing.assert_allclose(guidance.prev_actions, np.vstack([first[8:], np.repeat(first[-1:], 8, axis=0)]),
                               rtol=1e-6)
    assert guidance.mask_end == 4  # the 2 rows left, or d = 4 (0.12 s measured + 0.05 s lead) if more


@pytest.mark.parametrize(("period_s", "lead_steps", "age_steps"), [(0.02, 1, 7), (0.05, 5, 3), (0.2, 2, 0)])
def test_the_scheduled_plan_keeps_its_last_point_on_the_action_grid(period_s: float, lead_steps: int,
                                                                    age_steps: int) -> None:
    """Ticks on the action grid of an epoch-sized clock (offline replay, simulated time): the
    trajectory runs to the chunk's last action, whatever the float rounding of the times."""
    horizon = 50
    rng = np.random.default_rng(0)
    actions = np.arange(horizon, dtype=np.float64)[:, None] * np.ones((1, 3))
    for stamp_s in 1.7e9 + rng.integers(0, 10**8, 100) * period_s:
        scheduler = ChunkScheduler(SchedulerConfig(execute_horizon=10), period_s, horizon)
        now_s = stamp_s + age_steps * period_s
        request = scheduler.begin(now_s, float(stamp_s))
        scheduler.complete(request, actions, now_s)
        plan = ControlStep._scheduled_plan(scheduler, request, now_s, lead_steps * period_s)
        assert plan is not None and len(plan.positions) == horizon - lead_steps - age_steps, stamp_s
        np.testing.assert_array_equal(plan.positions[-1], actions[-1])
        # The first point is the lead ahead (not one action period), and it is the chunk's action
        # lead + age.
        assert plan.first_index == lead_steps + age_steps
        np.testing.assert_allclose(plan.times_from_start_s, (lead_steps + np.arange(len(plan.positions))) * period_s)
        np.testing.assert_allclose(plan.positions[0], actions[lead_steps + age_steps], atol=1e-3)


@pytest.mark.parametrize("prepared", [True, False])
def test_a_stamp_slightly_ahead_of_the_clock_counts_as_now(prepared: bool) -> None:
    # Within max_future_stamp_s (0.1 s here) a sample may be stamped ahead of our clock (clocks a
    # little apart); the scheduler then takes the observation as taken now: no crash (prepared:
    # begin() raised out of run) and no "unusable chunk" hold.
    step = make_step()
    if prepared:
        step.prepare(PROFILE.action_horizon, PROFILE.action_period_s)
    feed(step, 10.03)
    result = step.run(lambda: 10.0)
    assert result.published, result.reason
    assert not step.scheduler_status().in_flight and step.scheduler_status().chunks_received == 1


def test_naive_mode_also_takes_a_stamp_slightly_ahead_as_now() -> None:
    # Action k is planned for now + k periods, as in the scheduled modes: the unclipped stamp would
    # delay the whole trajectory by the clocks' offset (up to max_future_stamp_s).
    step = make_step()
    feed(step, 10.03)
    result = step.run(lambda: 10.0)
    assert result.published, result.reason
    expected = expected_actions(PROFILE, STATE, {"cam_a": IMAGE, "cam_b": IMAGE})
    reference = plan_trajectory(expected, PROFILE.action_period_s, 10.0, 10.0, CONTROL.control_period_s)
    np.testing.assert_array_equal(result.plan.times_from_start_s, reference.times_from_start_s)
    np.testing.assert_array_equal(result.plan.positions, reference.positions)
    assert result.chunk.stamp_s == pytest.approx(10.03)


@pytest.mark.parametrize("mode", ["rtc", "temporal_ensemble"])
def test_a_chunk_completed_by_a_tick_that_raised_leaves_the_schedule(mode: str, monkeypatch) -> None:
    # A bug raised after the scheduler took the chunk (here in the start check): the chunk never went
    # out, so the next tick starts again at once, and neither guides toward nor blends that chunk.
    policy = FakePolicy(PolicyConfig())
    step = make_step(policy, scheduler=SchedulerConfig(mode=mode, execute_horizon=4))
    feed(step, 10.0)
    limit_start = step.safety.limit_start
    calls = []

    def raise_once(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("a bug in the start check")
        return limit_start(*args, **kwargs)

    monkeypatch.setattr(step.safety, "limit_start", raise_once)
    with pytest.raises(RuntimeError, match="a bug"):
        step.run(lambda: 10.0)
    feed(step, 10.05, STATE + 1.0)
    result = step.run(lambda: 10.05)
    assert result.published, result.outcome
    assert policy.guidance[-1] is None  # no chunk of ours before it
    new = expected_actions(PROFILE, STATE + 1.0, {"cam_a": IMAGE, "cam_b": IMAGE})
    np.testing.assert_allclose(result.plan.positions, new[1:], rtol=1e-6)  # not blended with the unsent chunk


def test_the_action_joints_are_read_from_their_own_state_dims() -> None:
    # Action joints (j2, j0, j1) against state joints (j0, j1, j2): the current position of action
    # dim 0 is state dim 2, and so on, both for the safety filter's first step and for a hold point.
    step = make_step(safety=SafetyConfig(max_step=(0.05,)), hold_mode=HOLD_POSITION, action_joints=("j2", "j0", "j1"))
    feed(step, 10.0)
    result = step.run(lambda: 10.0)
    assert result.published and result.clamped == ("step",)
    current = STATE[[2, 0, 1]]
    first = expected_actions(PROFILE, STATE, {"cam_a": IMAGE, "cam_b": IMAGE})[0]
    np.testing.assert_allclose(result.chunk.actions[0], current + np.clip(first - current, -0.05, 0.05), rtol=1e-6)
    moved = STATE + np.array([0.01, 0.02, 0.03])
    step.buffer.put_state(moved, 10.05, 10.05)
    step.buffer.put_image("cam_a", "corrupt", 10.05, 10.05)
    held = step.run(lambda: 10.06)
    assert held.kind == BAD_IMAGE
    np.testing.assert_array_equal(held.plan.positions, moved[[2, 0, 1]][None, :])


def test_an_expired_scheduled_chunk_leaves_the_schedule() -> None:
    """rtc: a chunk that completes with its last action still ahead but less than the lead away is
    kept by the scheduler yet nothing of it is sent; the next request must continue the chunk the
    controller has, not the expired one."""
    policy = FakePolicy(PolicyConfig())
    step = make_step(policy, scheduler=SchedulerConfig(mode="rtc", execute_horizon=4))
    feed(step, 10.0)
    assert step.run(lambda: 10.0).published
    first = expected_actions(PROFILE, STATE, {"cam_a": IMAGE, "cam_b": IMAGE})
    feed(step, 10.2, STATE + 1.0)
    times = iter([10.2, 10.62])  # inference took 0.42 s: index 8.4 of 9, the lead reaches past it
    expired = step.run(lambda: next(times))
    assert (expired.outcome, expired.kind) == (HOLD, EXPIRED_CHUNK)
    assert step.scheduler_status().chunks_dropped == 1
    feed(step, 10.63, STATE + 2.0)
    assert step.run(lambda: 10.63).published
    # stamp 10.63 lies past the end of the first chunk: its last action, held
    np.testing.assert_allclose(policy.guidance[-1].prev_actions, np.repeat(first[-1:], PROFILE.action_horizon, axis=0),
                               rtol=1e-6)


class StateDuringInference(FakePolicy):
    """A joint_states message arrives while the policy runs."""

    def __init__(self, buffer: ObservationBuffer, state: np.ndarray, stamp_s: float) -> None:
        super().__init__(PolicyConfig())
        self.buffer, self.state, self.stamp_s = buffer, state, stamp_s

    def infer(self, observation, guidance=None):  # noqa: ANN001, ANN201
        self.buffer.put_state(self.state, self.stamp_s, self.stamp_s)
        return super().infer(observation, guidance)


def test_the_first_point_sent_is_limited_from_the_latest_measured_position() -> None:
    # As in test_the_first_point_sent_keeps_the_velocity_limit_from_rest, but the robot reached
    # action 4's position (STATE + 0.07) while the policy ran: the controller starts from there, so
    # the first point sent is no jump and is not clamped.
    step = make_step(safety=SafetyConfig(max_velocity=(0.7,)))
    first = expected_actions(PROFILE, STATE, {"cam_a": IMAGE, "cam_b": IMAGE})
    step.policy = StateDuringInference(step.buffer, first[4].astype(np.float64), 10.11)
    feed(step, 10.0)
    result = step.run(lambda: 10.12)
    assert result.published and result.clamped == () and result.plan.first_index == 4
    np.testing.assert_array_equal(result.plan.positions[0], first[4])



@pytest.mark.parametrize("mode", ["naive", "rtc"])
def test_clock_jitter_below_the_jump_tolerance_publishes(mode: str) -> None:
    # 0.5 ms behind the previous reading is jitter (CLOCK_JUMP_TOLERANCE_S), not a reset: the tick
    # goes on as usual. The scheduler refuses time going backwards, so the step must not hand it
    # the earlier reading (it held with an ERROR "unusable chunk: time went backwards").
    step = make_step(scheduler=SchedulerConfig(mode=mode, execute_horizon=1))
    feed(step, 10.0)
    times = iter([10.0, 10.1])  # the chunk arrives at 10.1
    assert step.run(lambda: next(times)).published
    feed(step, 10.09)
    result = step.run(lambda: 10.0995)  # behind the previous arrival
    assert result.published, result.reason
    feed(step, 10.2)
    times = iter([10.2, 10.1995])  # behind the tick's own start (and the observation stamp)
    result = step.run(lambda: next(times))
    assert result.published, result.reason
    assert step.scheduler_status().chunks_received == 3


def _first_tick_at_rate(mode: str, control_rate_hz: float) -> StepResult:
    """The first tick of a step in `mode` (execute_horizon 4) whose control loop runs at
    `control_rate_hz`, with fresh inputs stamped at the tick."""
    step = make_step(scheduler=SchedulerConfig(mode=mode, execute_horizon=4))
    step.buffer.config = ControlConfig(control_rate_hz=control_rate_hz, max_observation_age_s=0.3)
    feed(step, 10.0)
    return step.run(lambda: 10.0)


@pytest.mark.parametrize("mode", ["naive", "rtc"])
def test_the_first_point_sent_is_one_control_period_ahead(mode: str) -> None:
    # A 10 Hz control loop for 20 Hz actions: the lead is the control period (0.1 s), not the
    # action period; points closer than that are dropped.
    result = _first_tick_at_rate(mode, 10.0)
    assert result.published and result.plan.first_index == 2
    np.testing.assert_allclose(result.plan.times_from_start_s[:2], [0.1, 0.15])


@pytest.mark.parametrize("mode", ["temporal_ensemble", "rtc"])
def test_a_hold_point_ends_the_chunks_the_controller_had(mode: str) -> None:
    # hold_position replaces the running trajectory with the measured position: the chunk before the
    # hold is no longer executed. The next chunk must not be blended with it (temporal_ensemble: the
    # first point jumped back toward where that chunk would have been by now) nor guided toward it
    # (rtc: its frozen rows pulled the new chunk away from where the robot stands).
    policy = FakePolicy(PolicyConfig())
    step = make_step(policy, hold_mode=HOLD_POSITION,
                     scheduler=SchedulerConfig(mode=mode, execute_horizon=4, ensemble_decay=0.0))
    feed(step, 10.0)
    assert step.run(lambda: 10.0).published
    moved = STATE + 0.5
    step.buffer.put_image("cam_a", "corrupt", 10.2, 10.2)
    step.buffer.put_state(moved, 10.2, 10.2)
    held = step.run(lambda: 10.2)
    assert held.kind == BAD_IMAGE and held.plan is not None
    feed(step, 10.25, moved)
    result = step.run(lambda: 10.25)
    assert result.published, result.reason
    assert policy.guidance[-1] is None  # nothing of ours runs: plain sampling from the measured state
    new = expected_actions(PROFILE, moved, {"cam_a": IMAGE, "cam_b": IMAGE})
    np.testing.assert_allclose(result.plan.positions, new[1:], rtol=1e-6)  # the lead (0.05 s) is one action


@pytest.mark.parametrize("mode", ["rtc", "temporal_ensemble"])
def test_a_control_period_off_the_action_grid_still_sends_the_chunk_to_its_last_action(mode: str) -> None:
    # A 30 Hz control loop for 20 Hz actions: one control period ahead lies between actions 0 and 1.
    # The points sent were sampled from there one action period apart (indices 0.67 ... 8.67), so
    # the chunk's last action was never sent: a robot whose next chunk came late stopped short of it,
    # while the next RTC request took that last action as the position held. The points are the
    # chunk's own actions, from the first at least a control period ahead to the last.
    result = _first_tick_at_rate(mode, 30.0)
    assert result.published, result.reason
    chunk = expected_actions(PROFILE, STATE, {"cam_a": IMAGE, "cam_b": IMAGE})
    plan = result.plan
    assert plan.first_index == 1
    np.testing.assert_allclose(plan.positions, chunk[1:], rtol=1e-6)
    np.testing.assert_allclose(plan.times_from_start_s, np.arange(1, PROFILE.action_horizon) * PROFILE.action_period_s)
    assert plan.times_from_start_s[0] >= 1 / 30.0


@pytest.mark.parametrize("early_s", [0.0002, 0.02])
def test_a_tick_a_little_early_still_starts_the_inference_due(early_s: float) -> None:
    # 20 Hz ticks for 20 Hz actions, s = 8 of H = 10: the next start is due 0.4 s after the first.
    # A timer tick a fraction of a millisecond early (callback jitter) waited a whole control period
    # more: the first chunk had run out by then (its last action at 10.45), so the robot came to a
    # stop before the next chunk (and under jitter about every start slipped so, a third of them
    # with s = 1). The start goes to the tick nearest its due time.
    step = make_step(scheduler=SchedulerConfig(mode="rtc", execute_horizon=8))
    feed(step, 10.0)
    assert step.run(lambda: 10.0).published
    feed(step, 10.35)
    assert step.run(lambda: 10.35).outcome == WAIT
    now = 10.4 - early_s
    feed(step, now)
    assert step.run(lambda: now).published


@pytest.mark.parametrize("mode", ["rtc", "rtc_fast"])
def test_the_next_rtc_request_continues_the_points_sent_after_the_start_check_clamped_them(mode: str) -> None:
    # As in test_the_first_point_sent_keeps_the_velocity_limit_from_rest: the first point sent
    # (action 4, at 10.2) is clamped from STATE + 0.07 to STATE + 0.056. The controller executes
    # the clamped points, so the next request's previous actions Y (stamp 10.2: action 4 on) are
    # those points. They were the chunk's own actions, which the robot never went to: the frozen
    # prefix pulled the next chunk 0.014 away from where the robot is.
    policy = FakePolicy(PolicyConfig())
    step = make_step(policy, safety=SafetyConfig(max_velocity=(0.7,)),
                     scheduler=SchedulerConfig(mode=mode, execute_horizon=4))
    feed(step, 10.0)
    first = step.run(lambda: 10.12)
    assert first.published and first.clamped == ("velocity",) and first.plan.first_index == 4
    sent = first.plan.positions
    assert not np.allclose(sent[0], first.chunk.actions[4])  # the check did clamp the first point
    feed(step, 10.2, sent[0])
    assert step.run(lambda: 10.32).published
    guidance = policy.guidance[-1]
    assert guidance is not None
    np.testing.assert_allclose(guidance.prev_actions[:len(sent)], sent, rtol=1e-6)


class ConstantPolicy(FakePolicy):
    """Every action of every chunk is `action`."""

    def __init__(self, profile: FakeProfile, action: np.ndarray) -> None:
        super().__init__(PolicyConfig(), profile)
        self.action = np.asarray(action, np.float32)

    def infer(self, observation, guidance=None):  # noqa: ANN001, ANN201
        chunk = super().infer(observation, guidance)
        return ActionChunk(actions=np.tile(self.action, (chunk.horizon, 1)), stamp_s=chunk.stamp_s,
                           period_s=chunk.period_s)


def linkage_gripper_joint(state_gripper: np.ndarray) -> np.ndarray:
    """ALOHA's normalized gripper joint (-0.6213 .. 1.4910 rad) at the opening of a normalized finger
    position (0.01844 .. 0.05800 m), by Interbotix's horn linkage run forward: finger = r sin(theta) +
    sqrt(L^2 - (r cos(theta))^2), r = 0.022 m, L = 0.036 m, increasing on [-pi/2, pi/2]."""
    theta = np.linspace(-np.pi / 2, np.pi / 2, 200_001)
    finger_m = 0.022 * np.sin(theta) + np.sqrt(0.036**2 - (0.022 * np.cos(theta)) ** 2)
    return (np.interp(0.01844 + np.asarray(state_gripper) * (0.05800 - 0.01844), finger_m, theta) + 0.6213) / 2.1123


def test_aloha_measured_grippers_are_compared_and_held_as_gripper_joints() -> None:
    # ALOHA measures its gripper as a finger position and commands it as a joint angle (both
    # normalized): half open is 0.5 measured but ~0.48 commanded, fully open 1.0 but ~1.038. Taken
    # as the same, a chunk that keeps the grippers where they are was clamped as a jump (0.018 over
    # a 0.001 step limit) and a hold point moved them (up to 9 % of their range).
    assert linkage_gripper_joint(0.0) == pytest.approx(0.0, abs=1e-3)  # closed is closed
    assert linkage_gripper_joint(1.0) == pytest.approx((np.pi / 2 + 0.6213) / 2.1123)  # the linkage's widest
    profile = FakeProfile(name="fake_aloha", state_dim=14, action_dim=14, aloha_gripper_dims=(6, 13))
    state = np.array([0.1, -0.9, 1.0, 0.0, 0.3, 0.0, 0.5, -0.1, -0.8, 0.9, 0.0, 0.2, 0.0, 1.0])
    keep = state.copy()
    keep[[6, 13]] = linkage_gripper_joint(state[[6, 13]])
    buffer = ObservationBuffer(["cam_a", "cam_b"], CONTROL)
    safety = SafetyFilter(SafetyConfig(max_step=(0.001,), gripper_dims=(6, 13), gripper_range=(-0.05, 1.05)),
                          14, profile.action_period_s)
    step = ControlStep(ConstantPolicy(profile, keep), buffer, {"cam_a": decode, "cam_b": decode}, safety,
                       state_indices=tuple(range(14)), hold_mode=HOLD_POSITION,
                       state_to_actions=functools.partial(state_in_action_units, get_profile("pi0_aloha")))
    feed(step, 10.0, state)
    result = step.run(lambda: 10.01)
    assert result.published and result.clamped == ()
    np.testing.assert_allclose(result.plan.positions, np.tile(keep, (len(result.plan.positions), 1)), atol=1e-6)
    step.buffer.put_image("cam_a", "corrupt", 10.05, 10.05)
    held = step.run(lambda: 10.06)
    assert held.kind == BAD_IMAGE
    np.testing.assert_allclose(held.plan.positions, keep[None, :], atol=1e-6)


def test_a_limit_that_clamps_the_chunk_and_its_points_sent_counts_once() -> None:
    # 0.4 units/s is 0.02 per 0.05 s action. The chunk's first action is 0.03 from the measured
    # position (clamped along the chunk); at 10.01 the first point sent is action 2, 0.05 away but
    # 0.09 s ahead (0.036 allowed: clamped again). One chunk, one velocity clamp in /diagnostics.
    step = make_step(safety=SafetyConfig(max_velocity=(0.4,)))
    feed(step, 10.0)
    result = step.run(lambda: 10.01)
    assert result.published and result.clamped == ("velocity",) and result.plan.first_index == 2
    np.testing.assert_allclose(result.chunk.actions[0], STATE + 0.02, rtol=1e-6)  # clamped along the chunk
    np.testing.assert_allclose(result.plan.positions[0], STATE + 0.036, rtol=1e-6)  # and as sent
    assert step.safety.counters["clamp.velocity"] == 1


# ---- decoding the cameras in parallel ------------------------------------------------------------

DECODE_WAIT_S = 2.0  # how long a decoder below waits for another camera's: one after another, it fails
THREE_CAMERAS = FakeProfile(camera_slots={"cam_a": "base_0_rgb", "cam_b": "left_wrist_0_rgb",
                                          "cam_c": "right_wrist_0_rgb"})


class RecordingDecoder:
    """`decode`, recording the thread each call ran on; with a barrier, it decodes only once every
    camera's decoder has reached it (they run at the same time), else raises BrokenBarrierError."""

    def __init__(self, barrier: threading.Barrier | None = None) -> None:
        self.barrier = barrier
        self.threads: list[str] = []

    def __call__(self, value: object) -> np.ndarray:
        self.threads.append(threading.current_thread().name)
        if self.barrier is not None:
            self.barrier.wait(DECODE_WAIT_S)
        return decode(value)


class FailingDecoder:
    """Raises `error`: once `after` is set (another camera failed first in time) when given, else
    at once; `failed` is set just before."""

    def __init__(self, error: Exception, after: threading.Event | None = None) -> None:
        self.error = error
        self.after = after
        self.failed = threading.Event()

    def __call__(self, value: object) -> np.ndarray:
        if self.after is not None and not self.after.wait(DECODE_WAIT_S):
            raise AssertionError("the other camera never failed: the cameras decode one after another")
        self.failed.set()
        raise self.error


class SlowDecoder:
    """`decode` after `delay_s`; `done` is set when it returns."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.done = threading.Event()

    def __call__(self, value: object) -> np.ndarray:
        time.sleep(self.delay_s)
        self.done.set()
        return decode(value)


def feed_cameras(step: ControlStep, t_s: float) -> None:
    for name in step.decoders:
        step.buffer.put_image(name, IMAGE, t_s, t_s)
    step.buffer.put_state(STATE, t_s, t_s)


def decode_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    """The step pools' threads started since `before` (other tests' steps may still have theirs)."""
    return [t for t in threading.enumerate() if t.name.startswith("pi0-decode") and t not in before]


def test_the_cameras_of_a_tick_decode_at_the_same_time_one_thread_each() -> None:
    barrier = threading.Barrier(3)
    decoders = {name: RecordingDecoder(barrier) for name in THREE_CAMERAS.camera_slots}
    step = make_step(FakePolicy(PolicyConfig(), THREE_CAMERAS), decoders=decoders)
    feed_cameras(step, 10.0)
    result = step.run(lambda: 10.02)
    step.close()
    assert result.published and list(result.observation.images) == ["cam_a", "cam_b", "cam_c"]
    threads = [name for decoder in decoders.values() for name in decoder.threads]
    assert len(set(threads)) == 3 and decoders["cam_a"].threads == [threading.current_thread().name]
    expected = expected_actions(THREE_CAMERAS, STATE, dict.fromkeys(decoders, IMAGE))
    np.testing.assert_array_equal(result.chunk.actions, expected)


@pytest.mark.parametrize("first_error,later_error", [
    (ObservationError("expected rgb8, found 'yuv422'"), ObservationError("truncated JPEG")),
    (ObservationError("expected rgb8, found 'yuv422'"), RuntimeError("a bug in cam_b's decoder")),
    (RuntimeError("a bug in cam_a's decoder"), ObservationError("truncated JPEG")),
], ids=["both_bad_images", "later_one_a_bug", "first_one_a_bug"])
def test_the_first_camera_in_camera_order_decides_even_when_a_later_one_fails_first(
        first_error: Exception, later_error: Exception) -> None:
    """As decoding one camera after another: cam_a's ObservationError holds naming cam_a, cam_a's
    other exception propagates, whatever cam_b (which failed earlier, on its own thread) raised."""
    later = FailingDecoder(later_error)
    step = make_step(decoders={"cam_a": FailingDecoder(first_error, after=later.failed), "cam_b": later})
    feed_cameras(step, 10.0)
    try:
        if isinstance(first_error, ObservationError):
            held = step.run(lambda: 10.02)
            assert (held.outcome, held.kind) == (HOLD, BAD_IMAGE)
            assert held.reason == "camera 'cam_a': expected rgb8, found 'yuv422'"
        else:
            with pytest.raises(RuntimeError, match="a bug in cam_a's decoder"):
                step.run(lambda: 10.02)
    finally:
        step.close()
    assert not step.scheduler_status().in_flight


def test_a_tick_that_holds_on_a_bad_image_returns_after_every_camera_decoded() -> None:
    slow = SlowDecoder(0.2)
    step = make_step(decoders={"cam_a": decode, "cam_b": slow})
    step.buffer.put_image("cam_a", "corrupt", 10.0, 10.0)
    step.buffer.put_image("cam_b", IMAGE, 10.0, 10.0)
    step.buffer.put_state(STATE, 10.0, 10.0)
    held = step.run(lambda: 10.02)
    assert slow.done.is_set()  # no decode outlives the tick (nor a `close` after it)
    step.close()
    assert held.kind == BAD_IMAGE and held.reason.startswith("camera 'cam_a': ")


def test_a_single_camera_decodes_on_the_ticks_thread() -> None:
    before = set(threading.enumerate())
    decoder = RecordingDecoder()
    step = make_step(FakePolicy(PolicyConfig(), FakeProfile(camera_slots={"cam_a": "base_0_rgb"})),
                     decoders={"cam_a": decoder})
    feed_cameras(step, 10.0)
    assert step.run(lambda: 10.02).published
    assert decoder.threads == [threading.current_thread().name] and decode_threads(before) == []


def test_only_the_parallel_cameras_leave_the_ticks_thread() -> None:
    """The node's raw cameras (read in place in microseconds) stay on the tick's thread, with the
    first compressed one; one compressed camera alone starts no thread."""
    before = set(threading.enumerate())
    decoders = {name: RecordingDecoder() for name in THREE_CAMERAS.camera_slots}
    policy = FakePolicy(PolicyConfig(), THREE_CAMERAS)
    for parallel, on_pool in ((["cam_b", "cam_c"], ["cam_c"]), (["cam_b"], []), ([], [])):
        step = make_step(policy, decoders=decoders, parallel_cameras=parallel)
        feed_cameras(step, 10.0)
        assert step.run(lambda: 10.02).published
        pool_threads = [t.name for t in decode_threads(before)]
        step.close()
        for name, decoder in decoders.items():
            expected = pool_threads if name in on_pool else [threading.current_thread().name]
            assert decoder.threads == expected, (parallel, name)
            decoder.threads.clear()
        assert len(pool_threads) == len(on_pool)
    with pytest.raises(ConfigError, match=r"parallel_cameras: expected cameras from \['cam_a', 'cam_b', "
                                          r"'cam_c'\], found \['cam_d'\]"):
        make_step(policy, decoders=decoders, parallel_cameras=["cam_d", "cam_a"])


def test_close_ends_the_decode_threads_and_later_ticks_decode_on_the_callers_thread() -> None:
    before = set(threading.enumerate())
    decoder = RecordingDecoder()
    step = make_step(decoders={"cam_a": decoder, "cam_b": decoder})
    feed_cameras(step, 10.0)
    assert step.run(lambda: 10.02).published
    started = decode_threads(before)
    assert len(started) == 1 and sorted(decoder.threads) == sorted([threading.current_thread().name, started[0].name])
    step.close()
    step.close()  # idempotent
    assert not any(t.is_alive() for t in started)
    feed_cameras(step, 10.1)
    assert step.run(lambda: 10.12).published
    assert decoder.threads[-2:] == [threading.current_thread().name] * 2 and decode_threads(before) == []


def test_an_unknown_hold_mode_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"hold_mode: expected one of \['stop', 'hold_position'\], found 'freeze'"):
        make_step(hold_mode="freeze")


def test_stop_plan_sends_a_hold_point_only_over_a_trajectory_of_ours_and_only_once() -> None:
    step = make_step(hold_mode=HOLD_POSITION)
    feed(step, 10.0)
    assert step.stop_plan(10.0) == (None, "")  # nothing of ours runs yet: nothing to stop
    assert step.run(lambda: 10.0).published and step.executing
    plan, refusal = step.stop_plan(10.05)
    assert refusal == "" and not step.executing
    np.testing.assert_array_equal(plan.positions, STATE[None, :])
    assert step.stop_plan(10.1) == (None, "")  # the hold point already replaced our trajectory


def test_reset_forgets_the_trajectory_and_the_clock() -> None:
    # Activation after a pause: a clock behind the reading before the reset (a simulation restarted
    # while inactive) is no jump, and no trajectory of ours runs to send a hold point over.
    step = make_step(hold_mode=HOLD_POSITION)
    feed(step, 100.0)
    assert step.run(lambda: 100.01).published and step.executing
    step.reset()
    assert not step.executing
    feed(step, 5.0, image="corrupt")
    held = step.run(lambda: 5.01)
    assert (held.kind, held.plan) == (BAD_IMAGE, None)
    feed(step, 5.02)
    assert step.run(lambda: 5.03).published


def test_a_second_clock_jump_back_is_a_jump_too() -> None:
    step = make_step()
    feed(step, 100.0)
    assert step.run(lambda: 100.01).published
    assert step.run(lambda: 50.0).kind == CLOCK_JUMP
    result = step.run(lambda: 5.0)  # 45 s behind the reading that saw the first jump
    assert (result.outcome, result.kind) == (HOLD, CLOCK_JUMP) and "45.000 s" in result.reason


def test_the_delay_follows_a_control_rate_changed_after_prepare() -> None:
    # The points go out one control period ahead: at 5 Hz that is 0.2 s, 4 action periods of d.
    step = make_step(scheduler=SchedulerConfig(mode="rtc", execute_horizon=4))
    step.prepare(PROFILE.action_horizon, PROFILE.action_period_s)
    assert step.scheduler_status().delay_steps == 1
    step.buffer.config = ControlConfig(control_rate_hz=5.0, max_observation_age_s=0.3)
    assert step.run(lambda: 10.0).kind == "missing_input"
    assert step.scheduler_status().delay_steps == 4


def test_rate_limits_without_measured_action_joints_publish() -> None:
    # Actions that are not measured joints (state_indices None) have no measured position to go
    # stale: the chunk goes out, its steps checked within the chunk only.
    step = make_step(safety=SafetyConfig(max_velocity=(100.0,)), action_joints=("x", "y", "z"))
    feed(step, 10.0)
    assert step.run(lambda: 10.01).published


def test_a_scheduled_chunk_with_one_action_ahead_sends_that_action() -> None:
    # The inference took 0.4 s of the 0.45 s chunk: its last action is exactly one control period
    # ahead, so it alone goes out (the chunk has not expired).
    step = make_step(scheduler=SchedulerConfig(mode="rtc", execute_horizon=4))
    feed(step, 10.0)
    times = iter([10.0, 10.4])
    result = step.run(lambda: next(times))
    assert result.published, result.reason
    assert result.plan.first_index == 9 and result.plan.positions.shape == (1, 3)
    np.testing.assert_allclose(result.plan.times_from_start_s, [CONTROL.control_period_s])


def test_a_hold_point_takes_a_measured_position_exactly_max_observation_age_old() -> None:
    # As the snapshot's age check: a sample max_observation_age_s old is still fresh.
    step = make_step(hold_mode=HOLD_POSITION)
    step.buffer.config = ControlConfig(control_rate_hz=20.0, max_observation_age_s=0.25, max_camera_skew_s=0.3)
    feed(step, 10.0)
    assert step.run(lambda: 10.0).published
    step.buffer.put_image("cam_a", "corrupt", 10.25, 10.25)
    held = step.run(lambda: 10.25)
    assert held.kind == BAD_IMAGE and held.plan is not None
    np.testing.assert_array_equal(held.plan.positions, STATE[None, :])


def test_a_measured_position_outside_the_position_limits_is_not_sent_as_a_hold_point() -> None:
    # A bad measurement (encoder ticks for radians) held at would command the joint outside its limits.
    step = make_step(safety=SafetyConfig(position_lower=(-1.0,), position_upper=(1.0,)), hold_mode=HOLD_POSITION)
    feed(step, 10.0)
    assert step.run(lambda: 10.0).published
    step.buffer.put_state(np.array([5.0, -0.2, 0.3]), 10.05, 10.05)
    step.buffer.put_image("cam_a", "corrupt", 10.05, 10.05)
    held = step.run(lambda: 10.05)
    assert held.kind == BAD_IMAGE and held.plan is None and step.executing
    assert held.reason.endswith("(hold_position: the measured position is outside the position limits, "
                                "dim 0 = 5 is outside [-1, 1]; nothing sent)"), held.reason


def test_a_tick_that_raised_before_the_scheduler_took_its_chunk_leaves_the_chunk_sent_before(monkeypatch) -> None:
    # The raising tick's own request ends (else every later start waits on it); the chunk published
    # by the tick before stays the one the next request continues.
    policy = FakePolicy(PolicyConfig())
    step = make_step(policy, scheduler=SchedulerConfig(mode="rtc", execute_horizon=1))
    feed(step, 10.0)
    assert step.run(lambda: 10.0).published
    feed(step, 10.05)
    monkeypatch.setattr(step.safety, "apply", functools.partial(_raise, RuntimeError("a bug in the safety filter")))
    with pytest.raises(RuntimeError, match="a bug"):
        step.run(lambda: 10.05)
    monkeypatch.undo()
    status = step.scheduler_status()
    assert not status.in_flight and status.chunks_dropped == 0
    feed(step, 10.1)
    assert step.run(lambda: 10.1).published
    assert policy.guidance[-1] is not None  # continues the chunk sent at 10.0


def _raise(error: Exception, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
    raise error


class ShortChunkPolicy(FakePolicy):
    """Returns chunks of 8 actions where the scheduler was prepared for 10."""

    def infer(self, observation, guidance=None):  # noqa: ANN001, ANN201
        chunk = super().infer(observation, guidance)
        return ActionChunk(chunk.actions[:8], chunk.stamp_s, chunk.period_s, chunk.timings_ms)


def test_a_chunk_of_another_horizon_holds_and_leaves_nothing_in_flight() -> None:
    step = make_step(ShortChunkPolicy(PolicyConfig()))
    step.prepare(PROFILE.action_horizon, PROFILE.action_period_s)
    feed(step, 10.0)
    result = step.run(lambda: 10.0)
    assert (result.outcome, result.kind, result.level) == (HOLD, UNUSABLE_CHUNK, ERROR)
    assert "expected actions [10, A], found (8, 3)" in result.reason
    assert not step.scheduler_status().in_flight
    step.policy = FakePolicy(PolicyConfig())
    feed(step, 10.05)
    assert step.run(lambda: 10.05).published


class SlowFailingPolicy(FakePolicy):
    """Takes `latency_s` on the test's clock, then fails: raises, or returns a NaN chunk."""

    def __init__(self, clock_s: list[float], latency_s: float, failure: str) -> None:
        super().__init__(PolicyConfig())
        self.clock_s, self.latency_s_sim, self.failure = clock_s, latency_s, failure

    def infer(self, observation, guidance=None):  # noqa: ANN001, ANN201
        chunk = super().infer(observation, guidance)
        self.clock_s[0] += self.latency_s_sim
        if self.failure == "raises":
            raise RuntimeError("CUDA error")
        return ActionChunk(np.full_like(chunk.actions, np.nan), chunk.stamp_s, chunk.period_s)


@pytest.mark.parametrize("failure,kind", [("raises", INFERENCE_FAILED), ("nan", SAFETY_REJECT)])
def test_a_hold_point_after_a_slow_failed_inference_is_timed_from_when_it_is_sent(failure: str, kind: str) -> None:
    # The chunk sent at 10.01 has the arm at STATE + 0.08 at 10.25 and at its last point, STATE +
    # 0.12, from 10.45. joint_states last came at 10.2 (the arm lagging, at STATE). The tick at
    # 10.25 infers until 10.45 and fails: the hold point goes out at 10.45, from STATE + 0.12, so
    # the velocity limit needs 0.12 / 0.7 s to go back. It was timed from the clock before the
    # inference: 0.08 / 0.7 s, 1.05 units/s.
    clock_s = [10.01]
    step = make_step(safety=SafetyConfig(max_velocity=(0.7,)), hold_mode=HOLD_POSITION)
    feed(step, 10.0)
    assert step.run(lambda: clock_s[0]).published
    step.policy = SlowFailingPolicy(clock_s, 0.2, failure)
    feed(step, 10.2)
    clock_s[0] = 10.25
    held = step.run(lambda: clock_s[0])
    assert held.kind == kind
    np.testing.assert_array_equal(held.plan.positions, STATE[None, :])
    np.testing.assert_allclose(held.plan.times_from_start_s, [0.12 / 0.7], rtol=1e-5)

    # joint_states last came at 10.0: fresh (0.25 s old) at 10.25, not at 10.45 when the point goes out.
    clock_s[0] = 10.01
    step = make_step(safety=SafetyConfig(max_velocity=(0.7,)), hold_mode=HOLD_POSITION)
    feed(step, 10.0)
    assert step.run(lambda: clock_s[0]).published
    step.policy = SlowFailingPolicy(clock_s, 0.2, failure)
    step.buffer.put_image("cam_a", IMAGE, 10.2, 10.2)
    step.buffer.put_image("cam_b", IMAGE, 10.2, 10.2)
    clock_s[0] = 10.25
    held = step.run(lambda: clock_s[0])
    assert held.kind == kind and held.plan is None
    assert "no fresh measured position" in held.reason


def test_a_hold_point_before_the_first_point_is_due_is_timed_from_where_the_joints_are_on_the_way() -> None:
    # The chunk sent at 10.01 has the arm at STATE + 0.08 at 10.25 (joint_states, lagging, read STATE
    # at 10.1). The one sent at 10.25 (observation 10.2) has its first point, STATE + 0.06, 0.1 s ahead:
    # the controller goes there from STATE + 0.08. The next tick, at 10.30, holds: the joints are at
    # STATE + 0.07, 0.1 from the hold point at STATE at 0.7 units/s. The hold was timed from the first
    # point, as if the joints were there already: 0.06 / 0.7 s, 0.82 units/s.
    step = make_step(safety=SafetyConfig(max_velocity=(0.7,)), hold_mode=HOLD_POSITION)
    feed(step, 10.0)
    assert step.run(lambda: 10.01).published
    step.buffer.put_state(STATE, 10.1, 10.1)
    step.buffer.put_image("cam_a", IMAGE, 10.2, 10.2)
    step.buffer.put_image("cam_b", IMAGE, 10.2, 10.2)
    sent = step.run(lambda: 10.25)
    assert sent.published and sent.clamped == ()
    np.testing.assert_allclose(sent.plan.times_from_start_s[0], 0.1)
    np.testing.assert_allclose(sent.plan.positions[0], STATE + 0.06, rtol=1e-6)
    step.buffer.put_image("cam_a", "corrupt", 10.29, 10.29)
    held = step.run(lambda: 10.30)
    assert held.kind == BAD_IMAGE
    np.testing.assert_array_equal(held.plan.positions, STATE[None, :])
    np.testing.assert_allclose(held.plan.times_from_start_s, [0.07 / 0.7], rtol=1e-5)


# ---- property test: what is sent stays inside README's limits, whatever the policy returns ---------
# A robot that tracks the controller's trajectory exactly (Jazzy: a new trajectory replaces the old on
# arrival and starts from the current state), joint_states and camera frames arriving with jitter or
# stopping (also while the policy runs), a policy whose chunks are adversarial and whose inference
# moves the clock. Every trajectory the step sends is checked against what README ("Safety and
# holds", "Smooth motion") promises.

PROP_HORIZON, PROP_PERIOD_S = 10, 0.05
PROP_LOWER, PROP_UPPER = np.array([-1.0, -0.5, -2.0]), np.array([1.0, 0.8, 2.0])
PROP_GRIPPER = (0.0, 1.0)  # dim 2
PROP_IMAGE = np.zeros((2, 2, 3), np.uint8)


class TrackingRobot:
    """The clock, the joints (exactly where the controller's trajectory has them, linear between its
    points) and what reaches the step's buffer."""

    def __init__(self, buffer: ObservationBuffer, start: np.ndarray) -> None:
        self.buffer = buffer
        self.now_s = 100.0
        self.rest = start
        self.sent: tuple[float, np.ndarray, np.ndarray] | None = None  # when, times [K + 1], positions [K + 1, A]
        self.state_stamp_s = self.image_stamp_s = 0.0

    def position(self, t_s: float) -> np.ndarray:
        if self.sent is None:
            return self.rest.copy()
        sent_s, times_s, positions = self.sent
        return np.array([np.interp(t_s, sent_s + times_s, positions[:, d]) for d in range(positions.shape[1])])

    def send(self, plan: TrajectoryPlan) -> None:
        start = self.position(self.now_s)  # the controller starts from the current state
        self.sent = (self.now_s, np.concatenate([[0.0], plan.times_from_start_s]),
                     np.concatenate([start[None], plan.positions]))

    def put_state(self, age_s: float) -> None:
        self.state_stamp_s = max(self.state_stamp_s, self.now_s - age_s)  # stamps never go back
        self.buffer.put_state(self.position(self.state_stamp_s), self.state_stamp_s, self.now_s)

    def put_image(self, age_s: float) -> None:
        self.image_stamp_s = max(self.image_stamp_s, self.now_s - age_s)
        self.buffer.put_image("cam", PROP_IMAGE, self.image_stamp_s, self.now_s)


class AdversarialPolicy:
    """Chunks far outside the limits, jumps, NaN / Inf, alternating extremes, a first action far from
    the state; each inference takes a random time on the robot's clock, during which joint_states keep
    coming (state_p) or stop (outage_p)."""

    def __init__(self, rng: np.random.Generator, robot: TrackingRobot, state_p: float, outage_p: float) -> None:
        self.rng, self.robot, self.state_p, self.outage_p = rng, robot, state_p, outage_p

    def infer(self, observation: Observation, guidance: ChunkGuidance | None = None) -> ActionChunk:
        rng, state, shape = self.rng, observation.state, (PROP_HORIZON, 3)
        kind = int(rng.integers(8))
        if kind == 0:
            actions = rng.uniform(-5.0, 5.0, shape)
        elif kind == 1:  # a jump mid-chunk
            actions = np.repeat(state[None], PROP_HORIZON, 0)
            actions[rng.integers(PROP_HORIZON):] += rng.uniform(-3.0, 3.0, 3)
        elif kind == 2:  # NaN / Inf somewhere in a plausible chunk
            actions = state + rng.normal(0.0, 0.02, shape).cumsum(0)
            actions[rng.integers(PROP_HORIZON), rng.integers(3)] = rng.choice([np.nan, np.inf, -np.inf])
        elif kind == 3:  # alternating extremes
            actions = np.where(np.arange(PROP_HORIZON)[:, None] % 2 == 0, PROP_UPPER + 1.0, PROP_LOWER - 1.0)
        elif kind == 4:  # the first action far from the measured state
            actions = state + rng.uniform(-2.0, 2.0, 3) + np.linspace(0.0, 0.1, PROP_HORIZON)[:, None]
        elif kind == 5 and guidance is not None:  # continues the previous chunk (rtc)
            actions = guidance.prev_actions + rng.normal(0.0, 0.01, shape)
        elif kind == 6:  # a smooth move to anywhere inside the limits, too fast
            actions = state + (rng.uniform(PROP_LOWER, PROP_UPPER) - state) * np.linspace(0, 1, PROP_HORIZON)[:, None]
        else:
            actions = state + rng.normal(0.0, 0.03, shape).cumsum(0)
        latency_s = [0.0, rng.uniform(0.0, 0.02), rng.uniform(0.0, 0.12), rng.uniform(0.1, 0.4)][
            rng.choice(4, p=[0.3, 0.4, 0.2, 0.1])]
        end_s = self.robot.now_s + latency_s
        while self.robot.now_s < end_s:
            self.robot.now_s = min(end_s, self.robot.now_s + 0.01)
            if self.outage_p < rng.random() < self.state_p:
                self.robot.put_state(rng.uniform(0.0, 0.005))
        return ActionChunk(actions.astype(np.float32), observation.stamp_s, PROP_PERIOD_S)


def _violations(plan: TrajectoryPlan, chunk: ActionChunk | None, hold: bool, measured: np.ndarray | None,
                commanded: np.ndarray | None, control_period_s: float, per_period: np.ndarray) -> list[str]:
    """README's promises on one trajectory sent. measured: the latest joint_states at the send time if
    fresh (None: not); commanded: where the trajectory sent before has the joints then; per_period: the
    step and velocity limits' allowance per action period."""
    tol = 1e-5
    times, positions, velocities = plan.times_from_start_s, plan.positions, plan.velocities
    if not all(np.all(np.isfinite(v)) for v in (times, positions, velocities)):
        return ["a value that is not finite"]
    found = []
    if times[0] < control_period_s - 1e-9:
        found.append(f"first point {times[0]:.4f} s ahead, less than one control period")
    if not hold and not np.allclose(np.diff(times), PROP_PERIOD_S):
        found.append("points not one action period apart")
    inside = measured is None or np.all((measured >= PROP_LOWER) & (measured <= PROP_UPPER))
    gripper_inside = measured is None or PROP_GRIPPER[0] <= measured[2] <= PROP_GRIPPER[1]
    # From a measured position outside, the points come back at the rate limits' pace: the last inside.
    checked = positions if (inside and gripper_inside) or hold else positions[-1:]
    if np.any(checked < PROP_LOWER - tol) or np.any(checked > PROP_UPPER + tol):
        found.append(f"positions outside the position limits: {checked.min(0)} .. {checked.max(0)}")
    if np.any(checked[:, 2] < PROP_GRIPPER[0] - tol) or np.any(checked[:, 2] > PROP_GRIPPER[1] + tol):
        found.append(f"gripper outside its range: {checked[:, 2].min()} .. {checked[:, 2].max()}")
    if np.any(np.abs(np.diff(positions, axis=0)) > per_period + tol):
        found.append(f"a step between points over the limit: {np.abs(np.diff(positions, axis=0)).max(0)}")
    if np.any(np.abs(velocities) > per_period / PROP_PERIOD_S + 1e-4) or np.any(velocities[-1] != 0.0):
        found.append(f"velocities over the limit or not at rest at the end: {velocities}")
    if not hold and positions.shape[0] > 1:  # the points' own slopes, or the whole chunk's (naive)
        own = rest_at_end(finite_difference_velocities(positions, PROP_PERIOD_S))
        whole = rest_at_end(finite_difference_velocities(np.asarray(chunk.actions, np.float64),
                                                         PROP_PERIOD_S)[plan.first_index:])
        if not (np.allclose(velocities, own, atol=1e-4) or np.allclose(velocities, whole, atol=1e-4)):
            found.append("velocities that are not the points' slopes")
    # The first point: from the measured position (README; a chunk's from where the arm is may be further
    # by what the measurement lags), a hold point from where the arm is too.
    allowance = per_period * times[0] / PROP_PERIOD_S
    if measured is not None and np.any(np.abs(positions[0] - measured) > allowance + tol):
        found.append(f"first point {np.abs(positions[0] - measured)} from the measured position, over {allowance}")
    if hold and commanded is not None and np.any(np.abs(positions[0] - commanded) > allowance + tol):
        found.append(f"hold point {np.abs(positions[0] - commanded)} from where the arm is, over {allowance}")
    return found


def _adversarial_run(seed: int, mode: str, policy: str, hold_mode: str, ticks: int = 50) -> list[str]:
    rng = np.random.default_rng(seed)
    rate_hz = float(rng.choice([10.0, 20.0, 30.0, 50.0]))  # 10 Hz: 0.1 s lead; 30 Hz: off the action grid
    control = ControlConfig(control_rate_hz=rate_hz, max_observation_age_s=0.3, max_camera_skew_s=0.2)
    max_step = rng.uniform(0.02, 0.1, 3)
    max_velocity = rng.uniform(0.3, 1.5, 3)
    safety = SafetyFilter(SafetyConfig(
        position_lower=tuple(PROP_LOWER), position_upper=tuple(PROP_UPPER), max_step=tuple(max_step),
        max_velocity=tuple(max_velocity), gripper_dims=(2,), gripper_range=PROP_GRIPPER, position_policy=policy,
        step_policy=policy, velocity_policy=policy, gripper_policy=policy), 3, PROP_PERIOD_S)
    per_period = np.minimum(max_step, max_velocity * PROP_PERIOD_S)
    start = rng.uniform(PROP_LOWER, PROP_UPPER)
    start[2] = rng.uniform(*PROP_GRIPPER)
    if rng.random() < 0.2:  # starts a little outside: the chunks bring it back
        start += rng.choice([-1.0, 1.0], 3) * rng.uniform(0.0, 0.1, 3) * (rng.random(3) < 0.5)
    buffer = ObservationBuffer(["cam"], control)
    robot = TrackingRobot(buffer, start)
    state_p = float(rng.choice([1.0, 0.9, 0.3]))
    step = ControlStep(AdversarialPolicy(rng, robot, state_p, float(rng.choice([0.0, 0.5]))), buffer,
                       {"cam": np.asarray}, safety,
                       SchedulerConfig(mode=mode, execute_horizon=int(rng.integers(1, 6)),
                                       initial_latency_s=float(rng.choice([0.0, 0.05, 0.2]))),
                       action_state_indices(["j0", "j1", "j2"], ["j0", "j1", "j2"]), hold_mode)
    if rng.random() < 0.7:  # else the first chunk gives the geometry
        step.prepare(PROP_HORIZON, PROP_PERIOD_S)
    found = []
    tick_s = robot.now_s
    for k in range(ticks):
        if rng.random() < 0.95:
            robot.put_image(rng.uniform(0.0, 0.01))
        if rng.random() < state_p:
            robot.put_state(rng.uniform(0.0, 0.005))
        result = step.run(lambda: robot.now_s)
        if result.plan is not None:  # sent now, when the tick returns
            sample = buffer.latest_state()
            fresh = sample is not None and robot.now_s - sample.stamp_s <= control.max_observation_age_s
            if result.outcome == HOLD and not fresh:
                found.append(f"tick {k}: a hold point at a measured position not fresh when sent")
            where = f"tick {k} ({result.outcome} {result.kind}, seed {seed}, {rate_hz:g} Hz)"
            found += [f"{where}: {v}" for v in _violations(
                result.plan, result.chunk, result.outcome == HOLD, np.asarray(sample.value) if fresh else None,
                robot.position(robot.now_s) if robot.sent is not None else None, control.control_period_s,
                per_period)]
            robot.send(result.plan)
        tick_s = max(tick_s + control.control_period_s, robot.now_s)  # a late tick runs at once
        robot.now_s = max(robot.now_s, tick_s + float(rng.uniform(-0.002, 0.004)))  # timer jitter
    stop, _ = step.stop_plan(robot.now_s)  # deactivate: hold_position sends the hold point too
    if stop is not None:
        sample = buffer.latest_state()
        found += [f"stop plan (seed {seed}): {v}" for v in _violations(
            stop, None, True, np.asarray(sample.value), robot.position(robot.now_s), control.control_period_s,
            per_period)]
    step.close()
    return found


@pytest.mark.parametrize("policy", ["clamp", "reject"])
@pytest.mark.parametrize("mode", ["naive", "temporal_ensemble", "rtc_fast", "rtc"])
def test_nothing_sent_breaks_the_safety_limits_whatever_the_policy_returns(mode: str, policy: str) -> None:
    found = [v for seed in range(6) for hold_mode in ("stop", HOLD_POSITION)
             for v in _adversarial_run(seed, mode, policy, hold_mode)]
    assert not found, "\n".join(found[:10])

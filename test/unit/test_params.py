"""ros/params.py: parameter values -> NodeConfig, validation reasons, profile resolution (no rclpy)."""

from __future__ import annotations

import logging
import re
import types

import numpy as np
import pytest
import yaml

from pi0_policy_ros.control.monitor import ERROR, OK, WARN, ControlMonitor
from pi0_policy_ros.control.observation_buffer import ObservationBuffer
from pi0_policy_ros.control.rate_meter import RateMeter
from pi0_policy_ros.control.safety import SafetyFilter
from pi0_policy_ros.errors import ConfigError
from pi0_policy_ros.policy.robots import get_profile
from pi0_policy_ros.ros.params import PARAMS, SPECS, check_value, config_from_params
from test.paths import REPO_ROOT

BASE = {"camera_names": ["cam_high", "cam_left_wrist"], "robot_profile": "pi0_aloha"}


def test_defaults_and_camera_topics() -> None:
    cfg = config_from_params({**BASE, "camera_types": ["raw", "compressed"]})
    assert [(c.name, c.topic, c.compressed) for c in cfg.cameras] == [
        ("cam_high", "cam_high/image_raw", False), ("cam_left_wrist", "cam_left_wrist/image_raw/compressed", True)]
    assert cfg.control.control_rate_hz == SPECS["control_rate_hz"].default
    assert cfg.policy.robot_profile == "pi0_aloha" and cfg.policy.backend == "torch"


@pytest.mark.parametrize("values,pattern", [
    ({"camera_names": []}, r"camera_names: expected at least one camera"),
    ({**BASE, "camera_topics": ["a"]}, r"camera_topics: expected one entry per camera_names entry \(2\) or \[\], found 1"),
    ({**BASE, "camera_types": ["raw", "jpeg"]}, r"camera_types: expected values from \['raw', 'compressed'\], found \['jpeg'\]"),
    ({**BASE, "backend": "onnx"}, r"backend: expected values from"),
    ({**BASE, "precision": "int4"}, r"precision: expected values from"),
    ({**BASE, "device": "tpu"}, r"device must be one of"),
    ({**BASE, "control_rate_hz": 0.0}, r"control_rate_hz: expected a value in \[0.1, 200.0\], found 0.0"),
    ({**BASE, "seed": -3}, r"seed: expected a value in"),
    ({**BASE, "camera_topics": ["x", ""]}, r"camera_topics\[1\].*expected a topic name"),
    ({**BASE, "joint_names": ["a", "b", "a"]}, r"joint_names: expected unique entries"),
    ({**BASE, "camera_height": 480}, r"camera_height and camera_width must both be > 0 .* found 480 x 0"),
    ({**BASE, "camera_width": -1}, r"camera_width: expected a value in \[0, 8192\], found -1"),
])
def test_invalid_values_give_reasons(values, pattern) -> None:
    with pytest.raises(ConfigError, match=pattern):
        config_from_params(values)


@pytest.mark.parametrize("name,value,expected", [
    ("hold_mode", "x" * 1000, "hold_mode: expected values from ['stop', 'hold_position'], found ['xxx"),
    ("joint_names", [f"j{i % 5000}" for i in range(10000)], "joint_names: expected unique entries, found ['j0', 'j1',"),
])
def test_a_long_value_is_cut_in_the_reason(name: str, value: object, expected: str) -> None:
    # A ~/set_parameters request (any client on the network) with a 1000-character hold_mode
    # got the whole text back, and the log too.
    with pytest.raises(ConfigError) as info:
        check_value(SPECS[name], value)
    assert str(info.value).startswith(expected) and len(str(info.value)) < 300, str(info.value)


def test_camera_size_reaches_the_policy_config() -> None:
    assert config_from_params(BASE).policy.camera_hw is None  # default: resized on the CPU
    cfg = config_from_params({**BASE, "camera_height": 480, "camera_width": 640})
    assert (cfg.policy.camera_height, cfg.policy.camera_width, cfg.policy.camera_hw) == (480, 640, (480, 640))


def test_every_spec_default_is_valid() -> None:
    for spec in PARAMS:
        check_value(spec, spec.default)


def test_resolve_takes_joint_names_from_the_profile() -> None:
    profile = get_profile("pi0_aloha")
    cfg = config_from_params(BASE).resolve(profile)
    assert cfg.joint_names == profile.joint_names and cfg.action_joint_names == profile.joint_names


@pytest.mark.parametrize("values,pattern", [
    ({**BASE, "camera_names": ["cam_high", "cam_top"]}, r"\['cam_top'\] are not cameras of profile 'pi0_aloha'"),
    ({**BASE, "camera_names": ["cam_left_wrist"]}, r"requires cameras \['cam_high'\]"),
    ({**BASE, "joint_names": ["a", "b"]}, r"expects 14 state dims, found 2"),
    ({**BASE, "action_joint_names": ["a"]}, r"expects 14 action dims, found 1"),
])
def test_resolve_refuses_what_does_not_fit(values, pattern) -> None:
    with pytest.raises(ConfigError, match=pattern):
        config_from_params(values).resolve(get_profile("pi0_aloha"))


ARM = ["shoulder_pan_joint", "shoulder_lift_joint", "elbow_joint", "wrist_1_joint", "wrist_2_joint",
       "wrist_3_joint", "finger_joint"]
GENERIC = {"robot_profile": "generic", "camera_names": ["base"], "profile_state_dim": 7, "profile_action_dim": 7,
           "joint_names": ARM, "action_joint_names": [*ARM[:6], "gripper_joint"]}


@pytest.mark.parametrize("values", [{"safety_max_step": [0.1]}, {"safety_max_velocity": [3.0]},
                                    {"hold_mode": "hold_position"}])
def test_an_action_joint_missing_from_joint_names_is_named_where_its_measured_position_is_needed(values) -> None:
    # A typo in one action joint name made the node find no measured position for the action joints:
    # the step and velocity limits silently no longer applied from the measured position (the first
    # point could jump), and hold_position sent nothing. A state without the gripper is legitimate,
    # so it is a warning, named once where the control step is built, not a refusal.
    profile = get_profile("generic", state_dim=7, action_dim=7)
    config = config_from_params({**GENERIC, **values}).resolve(profile)
    assert config.unmeasured_action_joints(profile, config.hold_mode) == ["gripper_joint"]
    assert config_from_params(GENERIC).resolve(profile).unmeasured_action_joints(profile, "stop") == []
    right = config_from_params({**GENERIC, **values, "action_joint_names": ARM[::-1]}).resolve(profile)
    assert right.unmeasured_action_joints(profile, right.hold_mode) == []


def test_the_control_step_warns_of_action_joints_without_a_measured_position(caplog) -> None:
    profile = get_profile("generic", state_dim=7, action_dim=7)
    config = config_from_params({**GENERIC, "safety_max_step": [0.1]}).resolve(profile)
    policy = types.SimpleNamespace(profile=profile)
    safety = SafetyFilter(config.safety, 7, 0.05)
    with caplog.at_level(logging.WARNING, logger="pi0_policy_ros.ros.params"):
        step = config.control_step(policy, ObservationBuffer(["base"], config.control), {"base": np.asarray},
                                   safety, "stop")
    step.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "action_joint_names ['gripper_joint'] are not among joint_names" in warnings[0]
    assert step.state_indices is None  # what the warning is about: no measured position to start from


def test_libero_needs_explicit_names() -> None:
    with pytest.raises(ConfigError, match="expects 8 state dims, found 0"):
        config_from_params({"camera_names": ["image", "wrist_image"]}).resolve(get_profile("pi05_libero"))


def test_monitor_reports_rate_holds_and_percentiles() -> None:
    monitor = ControlMonitor(control_rate_hz=10.0, rate_window_s=1.0)
    assert monitor.report(0.0).message == "inactive"
    monitor.start(0.0)
    for i in range(1, 11):
        monitor.tick_started(i * 0.1 - 0.05)
        monitor.published(i * 0.1, {"infer": float(i)}, 0.02, 0.001)
    report = monitor.report(1.0)
    assert report.level == OK and report.values["achieved_rate_hz"] == "10.000"
    assert report.values["latency_infer_p50_ms"] == "5.500"
    monitor.tick_started(1.25)  # 0.3 s after the last tick: two periods missed
    monitor.held("camera 'a' is stale")
    report = monitor.report(1.4)
    assert report.level == WARN and report.message == "holding: camera 'a' is stale"
    assert report.values["skipped_ticks"] == "2" and report.values["holds"] == "1"
    assert float(monitor.report(5.0).values["achieved_rate_hz"]) == 0.0  # nothing completed in the window


def test_monitor_rate_counts_waits_and_warns_when_slow() -> None:
    # Non-naive modes wait between inference starts: on schedule, so counted toward the rate.
    monitor = ControlMonitor(control_rate_hz=10.0, rate_window_s=1.0)
    monitor.start(0.0)
    for i in range(1, 11):
        monitor.tick_started(i * 0.1)
        if i % 4 == 1:
            monitor.published(i * 0.1, {}, 0.0, 0.0)
        else:
            monitor.waited(i * 0.1)
    report = monitor.report(1.0)
    assert (report.level, report.values["achieved_rate_hz"]) == (OK, "10.000")
    # 2 Hz against the 10 Hz target: below SLOW_RATE_FRACTION
    slow = ControlMonitor(control_rate_hz=10.0, rate_window_s=1.0)
    slow.start(0.0)
    slow.published(0.5, {}, 0.0, 0.0)
    slow.published(1.0, {}, 0.0, 0.0)
    report = slow.report(1.0)
    assert report.level == WARN and report.message.startswith("slow: 2.00 Hz")


def test_monitor_never_reports_a_loop_on_time_slow_after_activation() -> None:
    # A 10 Hz loop on time whose inference takes 0.08 s: its first tick comes one period after the
    # activation and its latest may still be inferring, so 2.9 periods in it has published 1 chunk.
    # The reports of the first periods said "slow: 3.45 Hz of 10.00 Hz target" (WARN) after every
    # activation (`pi0-policy demo`: "slow: 2.06 Hz of 5.00 Hz target").
    monitor = ControlMonitor(control_rate_hz=10.0)
    monitor.start(0.0)
    slow = []
    for k in range(1, 80):
        monitor.tick_started(k * 0.1)
        for now_s in (k * 0.1 + 0.05, k * 0.1 + 0.079):  # the tick still inferring
            report = monitor.report(now_s)
            if report.level != OK:
                slow.append(f"{now_s:.3f} s: {report.message}")
        monitor.published(k * 0.1 + 0.08, {}, 0.0, 0.0)
    assert slow == []
    assert monitor.report(8.0).message.startswith("running at 10.0")
    # Too slow it is still told: 2 of every 3 ticks skipped (an inference of 0.25 s).
    monitor.start(0.0)
    for k in range(1, 16, 3):
        monitor.tick_started(k * 0.1)
        monitor.published(k * 0.1 + 0.25, {}, 0.0, 0.0)
    assert monitor.report(1.6).message.startswith("slow: 3.12 Hz")


def test_monitor_started_before_the_clock_measures_from_the_first_tick() -> None:
    # use_sim_time, activated before /clock (start(None)): the window began at time 0 and the sim's
    # first ticks, at ~1000 s, read as a fraction of the target for the window's first seconds.
    monitor = ControlMonitor(control_rate_hz=10.0, rate_window_s=5.0)
    monitor.start(None)
    for i in range(5):
        monitor.tick_started(1000.0 + i * 0.1)
        monitor.published(1000.0 + i * 0.1 + 0.01, {}, 0.0, 0.0)
    report = monitor.report(1000.41)
    assert report.level == OK and report.message.startswith("running at"), report.message
    assert report.values["rate_window_s"] == "0.410"  # from the first tick, not from time 0
    assert monitor.report(1010.0).values["rate_window_s"] == "5.000"  # then the whole window


def test_monitor_a_publish_ends_the_hold_and_skipped_ticks_round() -> None:
    monitor = ControlMonitor(control_rate_hz=10.0, rate_window_s=1.0)
    monitor.start(0.0)
    monitor.tick_started(0.1)
    monitor.held("camera 'a' is stale")
    monitor.tick_started(0.2999)  # 1.999 periods later (timer jitter): one tick skipped, not none
    monitor.published(0.2999, {}, 0.0, 0.0)
    report = monitor.report(0.3)
    assert not report.message.startswith("holding")  # (slow: one publish in 0.3 s)
    assert report.values["last_hold_reason"] == "" and report.values["skipped_ticks"] == "1"


def test_monitor_observation_age_is_the_latest_ticks_not_the_last_chunks() -> None:
    # A camera stopped: every tick held on it, and /diagnostics kept the last chunk's
    # observation_age_s = 0.2632 through the whole outage, as if the inputs were fresh.
    monitor = ControlMonitor(control_rate_hz=10.0, rate_window_s=1.0)
    monitor.start(0.0)
    monitor.tick_started(0.1)
    monitor.published(0.1, {}, 0.02, 0.001)
    monitor.tick_started(0.2)
    monitor.held("camera 'a' is stale: expected age <= 0.300 s (max_observation_age_s), found 2.958 s")
    values = monitor.report(0.2).values
    assert (values["observation_age_s"], values["camera_skew_s"]) == ("nan", "nan")  # the tick had none
    monitor.tick_started(0.3)
    monitor.held("safety filter rejected the chunk: ...", observation_age_s=0.05, camera_skew_s=0.01)
    values = monitor.report(0.3).values
    assert (values["observation_age_s"], values["camera_skew_s"]) == ("0.0500", "0.0100")


@pytest.mark.parametrize("new_rate_hz", [10.0, 0.5])
def test_monitor_measures_a_new_control_rate_from_the_change(new_rate_hz: float) -> None:
    # 2 Hz for 5 s, then a new rate. The 5 s window read the two mixed: a raise to 10 Hz showed
    # "slow: 2.6 Hz" for seconds and the first tick's gap counted as 3 skipped ticks of 10 Hz; a
    # lowering to 0.5 Hz showed ~2 Hz.
    monitor = ControlMonitor(control_rate_hz=2.0)
    monitor.start(0.0)
    for i in range(1, 10):
        monitor.tick_started(i * 0.5)
        monitor.published(i * 0.5, {}, 0.0, 0.0)
    monitor.change_rate(new_rate_hz, 4.8)
    early = monitor.report(4.85)  # no tick due yet at the new rate: not slow, and no rate said
    assert (early.level, early.message) == (OK, "running (the achieved rate is measured after two control periods)")
    period_s = 1.0 / new_rate_hz
    ticks = [4.8 + period_s, 4.8 + 2 * period_s]
    for t in ticks:
        monitor.tick_started(t)
        monitor.published(t, {}, 0.0, 0.0)
    report = monitor.report(ticks[-1])
    assert report.level == OK and float(report.values["achieved_rate_hz"]) == pytest.approx(new_rate_hz)
    assert report.values["skipped_ticks"] == "0" and report.values["target_rate_hz"] == f"{new_rate_hz:.3f}"


def test_monitor_start_counts_from_zero_and_stop_reports_inactive() -> None:
    monitor = ControlMonitor(control_rate_hz=10.0, rate_window_s=1.0)
    monitor.start(0.0)
    monitor.tick_started(0.1)
    monitor.published(0.1, {"infer": 3.0}, 0.02, 0.001)
    published = monitor.report(0.1).values
    assert (published["observation_age_s"], published["camera_skew_s"]) == ("0.0200", "0.0010")
    monitor.input_rejected("joint_states: stamp went backwards", "joint_states")
    monitor.held("inference failed: boom", ERROR, "inference_failed")
    report = monitor.report(0.2)
    assert (report.level, report.message) == (ERROR, "holding: inference failed: boom")  # the hold's own level
    assert report.values["observation_errors"] == "1"
    assert report.values["last_input_error"] == "joint_states: stamp went backwards"
    assert (report.values["observation_age_s"], report.values["camera_skew_s"]) == ("nan", "nan")  # the hold's
    monitor.stop()
    stopped = monitor.report(0.3)
    assert (stopped.level, stopped.message, stopped.values["achieved_rate_hz"]) == (OK, "inactive", "0.000")
    monitor.start(10.0)  # the next activation
    values = monitor.report(10.0).values
    assert values["ticks"] == values["chunks_published"] == values["holds"] == values["observation_errors"] == "0"
    assert not any(key.startswith(("latency_", "holds.")) for key in values)


def test_monitor_reports_a_rate_from_two_periods_and_warns_below_the_slow_fraction() -> None:
    # Exactly representable times: 10 Hz, a 1 s window from 0. At the start there is no window yet
    # (no division by zero); at 1.5 periods no rate is said, at exactly 2 periods one is.
    monitor = ControlMonitor(control_rate_hz=10.0, rate_window_s=1.0)
    monitor.start(0.0)
    assert monitor.report(0.0).values["achieved_rate_hz"] == "0.000"
    monitor.tick_started(0.125)
    monitor.published(0.125, {}, 0.0, 0.0)
    assert monitor.report(0.15).message == "running (the achieved rate is measured after two control periods)"
    # 5 Hz said at 2 periods, not "slow" yet: until the window fills, two chunks short are allowed.
    assert monitor.report(0.2).message == "running at 5.00 Hz"
    for rate_hz, level in ((8.0, OK), (7.0, WARN)):  # 0.8 of the target is not below it, 0.7 is
        monitor = ControlMonitor(control_rate_hz=10.0, rate_window_s=1.0)
        monitor.start(0.0)
        for k in range(1, int(rate_hz) + 1):
            monitor.tick_started(k / rate_hz)
            monitor.published(k / rate_hz, {}, 0.0, 0.0)
        report = monitor.report(1.0)
        assert (report.level, report.values["achieved_rate_hz"]) == (level, f"{rate_hz:.3f}"), report.message


def test_monitor_a_loop_that_never_published_is_not_running() -> None:
    # Active, no hold, no chunk out for many periods (a first inference that hangs, a timer that
    # never fires): it read "running at 0.00 Hz" at OK, as only a loop with a chunk out could be slow.
    monitor = ControlMonitor(control_rate_hz=10.0, rate_window_s=5.0)
    monitor.start(0.0)
    monitor.tick_started(0.1)
    report = monitor.report(1.0)
    assert (report.level, report.message) == (WARN, "slow: 0.00 Hz of 10.00 Hz target")


def test_monitor_rate_counts_the_periods_in_its_window() -> None:
    # A tick at the window's start (the activation's own time) begins the first period; 11 ticks
    # 0.1 s apart over 1 s are 10 Hz, not 11.
    monitor = ControlMonitor(control_rate_hz=10.0, rate_window_s=1.0)
    monitor.start(0.0)
    for k in range(11):
        monitor.tick_started(k * 0.1)
        monitor.published(k * 0.1, {}, 0.0, 0.0)
    assert monitor.report(1.0).values["achieved_rate_hz"] == "10.000"


def test_monitor_clock_jump_forgets_the_ticks_before_it_and_a_tick_at_the_same_time_is_none() -> None:
    monitor = ControlMonitor(control_rate_hz=10.0, rate_window_s=1.0)
    monitor.start(100.0)
    for t in (100.1, 100.2, 100.2):  # a clock that did not move (a paused simulation) is no jump
        monitor.tick_started(t)
        monitor.published(t, {}, 0.0, 0.0)
    assert monitor.report(100.2).values["clock_jumps"] == "0"
    monitor.tick_started(1.0)  # simulation reset: the ticks at 100.x lie in the new clock's future
    monitor.published(1.05, {}, 0.0, 0.0)
    values = monitor.report(1.1).values
    assert values["clock_jumps"] == "1" and float(values["achieved_rate_hz"]) == pytest.approx(10.0)


def test_monitor_ticks_closer_than_a_period_skip_none() -> None:
    # A timer catching up fires twice in a row: no negative skipped ticks.
    monitor = ControlMonitor(control_rate_hz=10.0, rate_window_s=1.0)
    monitor.start(0.0)
    monitor.tick_started(0.1)
    monitor.tick_started(0.11)
    assert monitor.report(0.2).values["skipped_ticks"] == "0"


def test_monitor_started_before_the_clock_counts_from_the_first_tick_not_the_first_chunk() -> None:
    # The first tick at 1000.0 took 0.1 s to publish: the window runs from the tick, so its one
    # chunk over 0.2 s is 5 Hz (a window from the chunk would have said nothing yet).
    monitor = ControlMonitor(control_rate_hz=10.0, rate_window_s=5.0)
    monitor.start(None)
    monitor.tick_started(1000.0)
    monitor.published(1000.1, {}, 0.0, 0.0)
    assert monitor.report(1000.2).values["achieved_rate_hz"] == "5.000"


def test_monitor_input_without_a_stamp_delay_counts_without_a_nan_delay() -> None:
    monitor = ControlMonitor(control_rate_hz=10.0)
    monitor.input_received("cam_a", float("nan"))
    values = monitor.report(0.0).values
    assert values["inputs.cam_a"] == "1" and not any(key.startswith("input_delay_cam_a") for key in values)


def test_rate_meter_window_and_start() -> None:
    with pytest.raises(ValueError, match="window_s must be > 0, found 0"):
        RateMeter(0)
    meter = RateMeter(1.0)
    meter.reset(None)
    assert not meter.started
    meter.record(3.0)  # without a start time, the first event starts the window
    assert meter.started and meter.span_s(3.5) == 0.5


def test_values_above_the_range_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"control_rate_hz: expected a value in \[0.1, 200.0\], found 1000.0"):
        config_from_params({**BASE, "control_rate_hz": 1000.0})
    with pytest.raises(ConfigError, match=r"input_poll_period_s: expected a value in \[0.0, 0.1\], found 0.5"):
        config_from_params({**BASE, "input_poll_period_s": 0.5})


@pytest.mark.parametrize("values,message", [
    ({"safety_max_step": [-1.0]}, "safety_max_step must be > 0 (per action dim), found [-1.0]"),
    ({"safety_max_velocity": [0.0]}, "safety_max_velocity must be > 0 (per action dim), found [0.0]"),
    ({"safety_gripper_dims": [6], "safety_gripper_range": [1.0]},
     "safety_gripper_range needs (lower, upper), found (1.0,)"),
    ({"safety_gripper_dims": [6], "safety_gripper_range": [1.0, 0.0]},
     "safety_gripper_range needs lower <= upper, found [1.0, 0.0]"),
    ({"safety_gripper_dims": [6]}, "safety_gripper_dims and safety_gripper_range go together"),
    ({"safety_position_lower": [float("nan")], "safety_position_upper": [1.0]},
     "safety_position_lower must be numbers, found NaN in [nan]"),
])
def test_safety_errors_name_the_parameters_the_user_sets(values, message: str) -> None:
    # SafetyConfig (control/, ROS-free) names its fields (max_step); a user of the node or of the
    # replay sets safety_max_step, and found no `max_step` in any parameter file.
    import dataclasses

    from pi0_policy_ros.control.safety import SafetyConfig

    with pytest.raises(ConfigError) as info:
        config_from_params({**BASE, **values})
    assert str(info.value) == message
    # The translation's rule (ros/params.py): each field's parameter is safety_<field>.
    assert {f"safety_{f.name}" for f in dataclasses.fields(SafetyConfig)} <= set(SPECS)


@pytest.mark.parametrize("name,value,pattern", [
    ("control_rate_hz", "fast", r"control_rate_hz: expected a number with a decimal point .* found str 'fast'"),
    # rclpy refuses an integer for a double parameter: the node would fail to configure.
    ("control_rate_hz", 10, r"control_rate_hz: expected a number with a decimal point \(10.0, not 10.*found int 10"),
    ("seed", 1.5, r"seed: expected an integer, found float 1.5"),
    ("seed", True, r"seed: expected an integer, found bool True"),
    ("autostart", "yes", r"autostart: expected true or false, found str 'yes'"),
    ("model_preset", 5, r"model_preset: expected a string, found int 5"),
    ("camera_names", "cam_high", r"camera_names: expected a list whose entries are each a string, found str"),
    ("safety_max_velocity", [3], r"safety_max_velocity: expected a list whose entries are each a number with a "
                                 r"decimal point .* found list \[3\]"),
    ("safety_gripper_dims", [6.0], r"safety_gripper_dims: expected a list whose entries are each an integer"),
])
def test_values_of_another_type_are_refused_as_rclpy_refuses_them(name: str, value, pattern: str) -> None:
    # What a parameter file or a replay's --param gives goes through no rclpy type check; it used to
    # pass (an int for a double) or end in a TypeError traceback (a string against a range).
    with pytest.raises(ConfigError, match=pattern):
        config_from_params({**BASE, name: value})


def test_array_values_as_rclpy_returns_them_are_accepted() -> None:
    import array

    cfg = config_from_params({**BASE, "safety_max_velocity": array.array("d", [3.0]),
                              "safety_gripper_dims": array.array("q", [6]), "safety_gripper_range": [0.0, 1.0],
                              "safety_position_lower": ()})
    assert (cfg.safety.max_velocity, cfg.safety.gripper_dims, cfg.safety.position_lower) == ((3.0,), (6,), ())


def test_every_number_parameter_has_a_range() -> None:
    # README: "Parameters are declared with descriptions and ranges".
    from pi0_policy_ros.ros.params import DOUBLE, INTEGER

    assert [s.name for s in PARAMS if s.kind in (DOUBLE, INTEGER) and s.float_range is None
            and s.int_range is None] == []


def test_dynamic_parameters_are_the_documented_ones() -> None:
    # README: prompt, control_rate_hz, the three observation limits and hold_mode are dynamic; the
    # rest is configure-time (set while unconfigured).
    assert {s.name for s in PARAMS if not s.configure_time} == {
        "prompt", "control_rate_hz", "max_observation_age_s", "max_camera_skew_s", "max_future_stamp_s", "hold_mode"}


def test_readme_parameter_values_are_values_the_node_takes() -> None:
    # README's `name: value` (a parameter file's line) and `name:=value` (-p, --param) snippets are
    # what a user copies: `input_poll_period_s: 0`, an integer for a double, failed configure.
    prose = re.sub(r"```.*?```", "", (REPO_ROOT / "README.md").read_text(), flags=re.S)
    snippets = [(name, value) for name, value in re.findall(r"`(?:--param |-p )?([a-z_0-9]+):=? ?([^`]+)`", prose)
                if name in SPECS]
    assert {"hold_mode", "input_poll_period_s", "max_future_stamp_s"} <= {name for name, _ in snippets}
    for name, value in snippets:
        check_value(SPECS[name], yaml.safe_load(value))


def test_safety_scheduler_and_rtc_values_reach_their_configs() -> None:
    cfg = config_from_params({**BASE, "safety_position_lower": [-1.0], "safety_position_upper": [2.0],
                              "safety_max_step": [0.1], "safety_max_velocity": [3.0], "safety_gripper_dims": [6],
                              "safety_gripper_range": [0.0, 1.0], "safety_position_policy": "reject",
                              "chunk_mode": "rtc_fast", "execute_horizon": 7, "max_camera_skew_s": 0.02,
                              "max_future_stamp_s": 0.03})
    safety = cfg.safety
    assert (safety.position_lower, safety.position_upper, safety.max_step, safety.max_velocity) == (
        (-1.0,), (2.0,), (0.1,), (3.0,))
    assert (safety.gripper_dims, safety.gripper_range, safety.position_policy, safety.step_policy) == (
        (6,), (0.0, 1.0), "reject", "clamp")
    assert (cfg.scheduler.mode, cfg.scheduler.execute_horizon, cfg.policy.rtc_mode) == ("rtc_fast", 7, "rtc_fast")
    assert config_from_params({**BASE, "chunk_mode": "temporal_ensemble"}).policy.rtc_mode == "off"
    assert (cfg.control.max_camera_skew_s, cfg.control.max_future_stamp_s) == (0.02, 0.03)


def test_profile_delta_action_mask_reaches_the_profile_and_is_checked_against_the_action_dims() -> None:
    import array

    from pi0_policy_ros.policy.robots import configured_profile, make_bool_mask

    generic = {"camera_names": ["base"], "robot_profile": "generic", "profile_state_dim": 7, "profile_action_dim": 7}
    assert config_from_params(generic).policy.delta_action_mask == ()
    assert configured_profile(config_from_params(generic).policy).delta_action_mask == ()
    # rclpy hands an integer array back as array('q').
    cfg = config_from_params({**generic, "profile_delta_action_mask": array.array("q", [6, -1])})
    assert cfg.policy.delta_action_mask == (6, -1)
    assert configured_profile(cfg.policy).delta_action_mask == make_bool_mask(6, -1)
    # [] keeps a named profile's own mask; a mask replaces it.
    assert configured_profile(config_from_params(BASE).policy).delta_action_mask == make_bool_mask(6, -1, 6, -1)
    aloha = config_from_params({**BASE, "profile_delta_action_mask": [-14]})
    assert configured_profile(aloha.policy).delta_action_mask == (False,) * 14
    with pytest.raises(ConfigError, match=r"profile_delta_action_mask \[6, -2\] covers 8 action dims: expected at "
                                          r"most the action_dim 7 of robot profile 'generic'"):
        configured_profile(config_from_params({**generic, "profile_delta_action_mask": [6, -2]}).policy)
    with pytest.raises(ConfigError, match=r"profile_delta_action_mask: expected a list whose entries are each an "
                                          r"integer, found list \[True\]"):
        config_from_params({**generic, "profile_delta_action_mask": [True]})

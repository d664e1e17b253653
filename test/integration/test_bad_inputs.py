"""Issue 8, inputs: every bad image, joint state and stamp over DDS. For each: /diagnostics names
what was expected, the node stays up (it resumes once the input is fixed), and nothing unsafe is
published. Assertions read the messages received and /diagnostics; the tests of the log at the end
read /rosout, as an operator's tools would."""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest
from builtin_interfaces.msg import Time
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.node import Node
from rclpy.serialization import serialize_message
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import CompressedImage, Image, JointState

from test.fakes import FakeProfile, expected_actions
from test.integration.harness import IMAGE_B, JOINTS, wait_for
from pi0_policy_ros.ros.convert import seconds_to_stamp

SUCCESS = TransitionCallbackReturn.SUCCESS
PROFILE = FakeProfile()
GOOD_A = dict(height=6, width=8, encoding="rgb8", step=24, data=bytes(range(144)))


def active(make_node, **kwargs):
    node = make_node(**kwargs)
    assert node.trigger_configure() == SUCCESS
    assert node.trigger_activate() == SUCCESS
    return node


def count(values: dict[str, str], key: str) -> int:
    return int(values.get(key, "0"))


def held_for(probe, kind: str, text: str) -> dict[str, str]:
    """Waits for a report that counts holds of `kind` and whose last reason contains `text`."""
    def check() -> dict[str, str]:
        values = probe.latest_values("holding")
        return values if count(values, f"holds.{kind}") > 0 and text in values["last_hold_reason"] else {}
    return wait_for(check)


def rejected(probe, source: str, text: str) -> dict[str, str]:
    def check() -> dict[str, str]:
        values = probe.latest_values()
        return values if count(values, f"input_errors.{source}") > 0 and text in values["last_input_error"] else {}
    return wait_for(check)


def test_a_camera_never_received_is_named_with_the_topic_the_node_listens_on(make_node, probe, namespace) -> None:
    # A topic name or namespace that is not the publisher's is the usual cause: the hold names the
    # resolved topic (namespace and remaps applied), not only the camera.
    active(make_node, params={"camera_topics": ["cam_a/image_raw", "cam_b/compressed"]},
           cli_args=["--ros-args", "-r", "joint_states:=arm/joint_states"])
    # cam_a's frames come at 50 Hz: a tick before the first one names it too, so wait for cam_b alone.
    values = held_for(probe, "missing_input", "no image received yet from camera(s) ['cam_b']")
    assert values["last_hold_reason"] == (f"no image received yet from camera(s) ['cam_b'] (topic "
                                          f"{namespace}/cam_b/compressed); no joint_states received yet (topic "
                                          f"{namespace}/arm/joint_states)")
    assert probe.counts() == (0, 0, 0)


# ---- images -------------------------------------------------------------------------------------

IMAGE_CASES = {
    "yuv422": (dict(GOOD_A, encoding="yuv422"), "unsupported image encoding: expected one of"),
    "16UC1": (dict(GOOD_A, encoding="16UC1"), "found '16UC1'"),
    "made_up": (dict(GOOD_A, encoding="rgb8_but_not_really"), "found 'rgb8_but_not_really'"),
    "step_too_small": (dict(GOOD_A, step=20), "expected >= width*channels = 8*3 = 24 bytes, found 20"),
    "data_too_short": (dict(GOOD_A, data=bytes(100)), "expected step*height = 24*6 = 144 bytes, found 100"),
    "data_too_long": (dict(GOOD_A, data=bytes(192)), "too long: expected step*height = 24*6 = 144 bytes, found 192"),
    "zero_size": (dict(GOOD_A, height=0, width=0, step=0, data=b""), "expected width and height > 0, found 0x0"),
}


@pytest.mark.parametrize("case", sorted(IMAGE_CASES))
def test_bad_raw_image_holds_and_names_the_expectation(make_node, probe, case: str) -> None:
    fields, text = IMAGE_CASES[case]
    probe.image_a = Image(**fields)
    active(make_node)
    values = held_for(probe, "bad_image", text)
    assert "camera 'cam_a'" in values["last_hold_reason"]
    assert probe.counts() == (0, 0, 0)
    probe.image_a = Image(**GOOD_A)
    wait_for(lambda: probe.counts()[0] >= 1)  # still up: it resumes with a good frame


def test_corrupt_jpeg_holds(make_node, probe) -> None:
    probe.image_b = CompressedImage(format="rgb8; jpeg compressed bgr8", data=b"\xff\xd8\xff\xe0" + bytes(60))
    active(make_node)
    values = held_for(probe, "bad_image", "cannot decode compressed image")
    assert "expected JPEG or PNG" in values["last_hold_reason"] and "camera 'cam_b'" in values["last_hold_reason"]
    assert probe.counts() == (0, 0, 0)


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose frame header (SOF0) claims width x height: what a corrupt size field looks like."""
    import struct

    import cv2

    ok, jpeg = cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))
    assert ok
    data = bytearray(jpeg.tobytes())
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def test_jpeg_with_a_corrupt_size_holds_as_a_bad_image_and_sends_the_hold_point(make_node, probe) -> None:
    """OpenCV raises (cv2.error), instead of returning None, for a header over its pixel limit: the
    tick failed as an 'internal error' (ERROR, an OpenCV assertion as the reason) instead of a
    bad_image hold naming the camera and what was expected, and with hold_position no hold point
    went out: the controller ran the last chunk to its end."""
    active(make_node, params={"hold_mode": "hold_position"})
    wait_for(lambda: probe.counts()[0] >= 2)
    good = probe.image_b
    probe.image_b = CompressedImage(format="rgb8; jpeg compressed bgr8", data=_jpeg_claiming(65000, 65000))
    values = held_for(probe, "bad_image", "cannot decode compressed image")
    reason = values["last_hold_reason"]
    assert "camera 'cam_b'" in reason and "expected JPEG or PNG" in reason, reason
    assert count(values, "holds.internal_error") == 0

    def hold_point():
        with probe.lock:
            last = probe.trajectories[-1]
        return len(last.points) == 1 and list(last.points[0].positions) == probe.state.tolist()
    wait_for(hold_point, timeout_s=2.0)
    probe.image_b = good
    before = probe.counts()[0]
    wait_for(lambda: probe.counts()[0] > before + 1)  # resumes with a good frame


def test_resolution_change_mid_run_keeps_working(make_node, probe) -> None:
    node = active(make_node)
    wait_for(lambda: probe.counts()[0] >= 2)
    bigger = (np.arange(12 * 16 * 3) % 200).astype(np.uint8).reshape(12, 16, 3)
    probe.image_a = Image(height=12, width=16, encoding="rgb8", step=48, data=bigger.tobytes())
    wait_for(lambda: node.policy.calls[-1].images["cam_a"].shape == (12, 16, 3))
    expected = expected_actions(PROFILE, probe.state, {"cam_a": bigger, "cam_b": IMAGE_B})
    probe.clear()

    def new_trajectory():
        with probe.lock:
            return [m for m in probe.trajectories
                    if np.allclose(m.points[-1].positions, expected[-1].astype(np.float64))]
    wait_for(new_trajectory)
    assert count(probe.latest_values(), "holds.bad_image") == 0


# ---- joint states -------------------------------------------------------------------------------

JOINT_CASES = {
    "missing_name": ((["j0", "j1"], [0.1, 0.2]), "lacks joints ['j2']"),
    "duplicate_names": ((["j0", "j1", "j2", "j1"], [0.1, 0.2, 0.3, 0.4]), "duplicate names"),
    "position_short": ((list(JOINTS), [0.1]), "expected one per name (3), found 1"),
    "position_long": ((list(JOINTS), [0.1, 0.2, 0.3, 0.4]), "too long: expected one per name (3), found 4"),
    "nan": ((list(JOINTS), [0.1, math.nan, 0.3]), "expected finite values"),
    "inf": ((list(JOINTS), [math.inf, 0.2, 0.3]), "expected finite values"),
    "empty": (([], []), "empty joint_states"),
}


@pytest.mark.parametrize("case", sorted(JOINT_CASES))
def test_bad_joint_states_are_rejected_and_named(make_node, probe, case: str) -> None:
    override, text = JOINT_CASES[case]
    probe.joint_override = override
    active(make_node)
    rejected(probe, "joint_states", text)
    values = held_for(probe, "missing_input", text)  # the hold says why, not "none received"
    assert "no usable joint_states yet: every one received was refused" in values["last_hold_reason"]
    assert probe.counts() == (0, 0, 0)
    probe.joint_override = None
    wait_for(lambda: probe.counts()[0] >= 1)


def _not_plain_cdr() -> bytes:
    good = serialize_message(JointState(name=list(JOINTS), position=[0.1, -0.2, 0.3]))
    return b"\x00\x09" + good[2:]  # encapsulation 0x0009: not plain CDR


@pytest.mark.parametrize("data,text", [
    (_not_plain_cdr(), "unsupported serialization: expected plain CDR"),
    (b"\x00\x01\x00\x00", "malformed message: expected >= 12 serialized bytes"),
], ids=["not_plain_cdr", "too_short"])
def test_joint_states_that_cannot_be_read_are_rejected_naming_joint_states(make_node, probe, data: bytes,
                                                                           text: str) -> None:
    """A JointState whose bytes are not plain CDR or too short for a stamp (a foreign writer, a corrupt
    sample): the refusal said "input rejected: unsupported serialization: ..." without naming the topic,
    where every other joint_states refusal, and a camera's of the same bytes, names its source."""
    active(make_node)
    wait_for(lambda: probe.counts()[0] >= 1)
    raw = probe.create_publisher(JointState, "joint_states", 10)

    def check() -> dict[str, str]:
        raw.publish(data)  # serialized bytes, as sent; sensor-data QoS may drop one
        values = probe.latest_values()
        return values if count(values, "input_errors.joint_states") > 0 else {}
    values = wait_for(check)
    assert values["last_input_error"].startswith(f"joint_states: {text}"), values["last_input_error"]


def test_joint_state_far_outside_the_position_limits_never_reaches_the_trajectory(make_node, probe) -> None:
    """A driver publishing encoder ticks instead of radians: j0 = 1e6 is finite, so it is taken as the
    measured position. With position limits [-1, 1] and a step limit, the step limit rate-limited the
    (clamped) chunk from that measured position, so trajectories at ~1e6 went out, and hold_position's
    hold point at 1e6 too. No trajectory may end outside the position limits: the chunk is rejected
    (a safety_reject hold naming the limits and the measured position) and no hold point goes out."""
    active(make_node, params={"safety_position_lower": [-1.0], "safety_position_upper": [1.0],
                              "safety_max_step": [0.1], "hold_mode": "hold_position"})
    wait_for(lambda: probe.counts()[0] >= 2)
    with probe.lock:
        probe.state = np.array([1e6, -0.2, 0.3])
    values = held_for(probe, "safety_reject", "outside [-1, 1]")
    assert "measured position 1e+06" in values["last_hold_reason"], values["last_hold_reason"]
    time.sleep(0.3)
    with probe.lock:
        worst = max(abs(p) for t in probe.trajectories for point in t.points for p in point.positions)
    assert worst <= 1.0
    with probe.lock:
        probe.state = np.array([0.1, -0.2, 0.3])
    before = probe.counts()[0]
    wait_for(lambda: probe.counts()[0] > before + 1)  # resumes once the measurement is sane


# ---- time ---------------------------------------------------------------------------------------

POISON = [9.9, 9.9, 9.9]


def _never_used(node) -> bool:
    return not any(np.array_equal(call.state, POISON) for call in node.policy.calls)


def test_unstamped_inputs_hold_and_say_so(make_node, probe) -> None:
    probe.stamp_fn = Time  # a driver that never sets header.stamp
    active(make_node)
    values = held_for(probe, "missing_input", "expected a positive header stamp, found 0.0 (unstamped message?)")
    assert "no usable image yet from camera(s) ['cam_a', 'cam_b']" in values["last_hold_reason"]
    assert probe.counts() == (0, 0, 0)
    probe.stamp_fn = None
    wait_for(lambda: probe.counts()[0] >= 1)


def test_out_of_order_stamp_is_rejected(make_node, probe) -> None:
    node = active(make_node)
    wait_for(lambda: probe.counts()[0] >= 2)
    old = seconds_to_stamp(probe.get_clock().now().nanoseconds * 1e-9 - 1.0)
    probe.publish_joint_state(list(JOINTS), POISON, old)
    values = rejected(probe, "joint_states", "stamp went backwards")
    assert "expected >=" in values["last_input_error"]
    before = probe.counts()[0]
    wait_for(lambda: probe.counts()[0] > before + 2)
    assert _never_used(node)


def test_stamp_far_in_the_future_is_rejected(make_node, probe) -> None:
    node = active(make_node)
    wait_for(lambda: probe.counts()[0] >= 2)
    future = seconds_to_stamp(probe.get_clock().now().nanoseconds * 1e-9 + 100.0)
    probe.publish_joint_state(list(JOINTS), POISON, future)
    values = rejected(probe, "joint_states", "in the future")
    assert "clocks not synchronised" in values["last_input_error"]
    before = probe.counts()[0]
    wait_for(lambda: probe.counts()[0] > before + 2)  # the bad sample did not block later ones
    assert _never_used(node)


def test_camera_gap_longer_than_the_age_limit_holds_then_resumes(make_node, probe) -> None:
    active(make_node)
    wait_for(lambda: probe.counts()[0] >= 2)
    with probe.lock:
        probe.cameras_on["cam_a"] = False
    held_for(probe, "stale_observation", "camera 'cam_a' is stale")
    time.sleep(0.1)
    held = probe.counts()
    time.sleep(0.4)
    assert probe.counts() == held  # nothing while the camera is away
    with probe.lock:
        probe.cameras_on["cam_a"] = True
    wait_for(lambda: probe.counts()[0] > held[0] + 1)


class SimClock(Node):
    """Publishes /clock at 100 Hz: sim time runs with wall time from `base_s` until `jump_to`."""

    def __init__(self, base_s: float) -> None:
        super().__init__("sim_clock")
        self._lock = threading.Lock()
        self._base_s, self._wall0 = base_s, time.monotonic()
        self._pub = self.create_publisher(Clock, "/clock", 10)
        self.create_timer(0.01, self._tick)

    def now_s(self) -> float:
        with self._lock:
            return self._base_s + time.monotonic() - self._wall0

    def now_msg(self) -> Time:
        return seconds_to_stamp(self.now_s())

    def jump_to(self, t_s: float) -> None:
        with self._lock:
            self._base_s, self._wall0 = t_s, time.monotonic()
        self._tick()

    def _tick(self) -> None:
        self._pub.publish(Clock(clock=self.now_msg()))


@pytest.fixture
def sim_clock(attach):
    return attach(SimClock(1000.0))


def test_sim_clock_jumping_back_resets_and_recovers(make_node, probe, sim_clock) -> None:
    probe.stamp_fn = sim_clock.now_msg
    node = make_node(params={"use_sim_time": True})
    wait_for(lambda: node.get_clock().now().nanoseconds > 999e9)  # the node follows /clock
    assert node.trigger_configure() == SUCCESS and node.trigger_activate() == SUCCESS
    wait_for(lambda: probe.counts()[1] >= 2)
    assert all(s.stamp.sec >= 1000 for s in probe.stamps)

    sim_clock.jump_to(10.0)  # simulation reset, as a bag replay's /clock going backwards
    values = wait_for(lambda: (v := probe.latest_values()) and count(v, "clock_jumps") + count(v, "holds.clock_jump")
                      and v)
    assert count(values, "holds.clock_jump") >= 1

    def after_reset():
        with probe.lock:
            return [s for s in probe.stamps if s.stamp.sec < 100]
    wait_for(after_reset, timeout_s=8.0)  # chunks again, from observations in the new time line


# ---- the log (/rosout) --------------------------------------------------------------------------

def test_each_bad_source_is_logged_while_another_keeps_failing(make_node, probe) -> None:
    """Bad joint_states all along, then one unstamped frame on cam_a: the camera's refusal reaches
    the log at once. Every source shared one throttled line, so the frame was never logged while
    joint_states kept failing."""
    from rcl_interfaces.msg import Log

    probe.joint_override = (["j0", "j1"], [0.1, 0.2])
    active(make_node)
    wait_for(lambda: probe.log_lines(Log.WARN, "input rejected: joint_states lacks joints ['j2']"))
    for _ in range(3):  # stamp 0; a few, as sensor-data QoS may drop one
        probe.publish_image_a(Image(**GOOD_A))
        time.sleep(0.02)
    line = wait_for(lambda: probe.log_lines(Log.WARN, "input rejected: camera 'cam_a'"), timeout_s=3.0)
    assert line == ["input rejected: camera 'cam_a': expected a positive header stamp, found 0.0 (unstamped message?)"]
    # Still throttled per source: 50 bad joint_states a second give one line every 2 s.
    wait_for(lambda: len(probe.log_lines(Log.WARN, "input rejected: joint_states")) >= 2, timeout_s=3.0)
    assert len(probe.log_lines(Log.WARN, "input rejected: joint_states")) <= 3


def test_hold_on_refused_input_does_not_repeat_the_refusal(make_node, probe) -> None:
    """Bad joint_states: one warning says what was expected ("input rejected"); the hold's line says
    the node holds and why in short, instead of the same refusal again every 2 s."""
    from rcl_interfaces.msg import Log

    probe.joint_override = (["j0", "j1"], [0.1, 0.2])
    active(make_node)
    expected = "input rejected: joint_states lacks joints ['j2']: expected all of ['j0', 'j1', 'j2'], found ['j0', 'j1']"
    wait_for(lambda: probe.log_lines(Log.WARN, expected))
    holds = wait_for(lambda: probe.log_lines(Log.WARN, "holding (missing_input)"))
    assert holds[0] == ("holding (missing_input): no usable joint_states yet: every one received was refused "
                        "(see the 'input rejected' warning for joint_states)")
    values = held_for(probe, "missing_input", "lacks joints ['j2']")  # /diagnostics keeps the whole reason
    assert "expected all of ['j0', 'j1', 'j2']" in values["last_hold_reason"]


@pytest.mark.parametrize("case", ["long_encoding", "10000_joint_names"])
def test_text_a_sender_chose_is_cut_in_diagnostics_and_the_log(make_node, probe, case: str) -> None:
    """A fuzzer's frame with a 1000-character encoding, or joint_states of 10000 names: the whole
    text went into /diagnostics (the status message, last_hold_reason, last_input_error) and into
    the log line. Each stays short and still says what was expected."""
    from rcl_interfaces.msg import Log

    if case == "long_encoding":
        probe.image_a = Image(**dict(GOOD_A, encoding="x" * 1000))
        kind, expected = "bad_image", "expected one of ['bgr8', 'bgra8', 'mono8', 'rgb8', 'rgba8'], found 'xxx"
    else:
        names = [f"joint_{i}" for i in range(10000)]
        probe.joint_override = (names, [0.0] * len(names))
        kind, expected = "missing_input", "expected all of ['j0', 'j1', 'j2'], found ['joint_0', 'joint_1',"
    active(make_node)
    values = held_for(probe, kind, expected)
    texts = {key: values[key] for key in ("last_hold_reason", "last_input_error")}
    texts["status"] = probe.latest_status(expected).message
    lines = wait_for(lambda: probe.log_lines(Log.WARN, expected))
    texts.update({f"log {i}": line for i, line in enumerate(lines)})
    for name, text in texts.items():
        assert len(text) < 400, (name, text)
    assert probe.counts() == (0, 0, 0)

"""control/observation_buffer.py: latest-of-each snapshots with age, skew and stamp checks."""

import sys
import threading

import numpy as np
import pytest

from pi0_policy_ros.control.config import ControlConfig
from pi0_policy_ros.control.observation_buffer import ObservationBuffer
from pi0_policy_ros.errors import ConfigError, ObservationError

CFG = ControlConfig(control_rate_hz=10.0, max_observation_age_s=0.5, max_camera_skew_s=0.1, max_future_stamp_s=0.05)
T0 = 1000.0


def filled(now: float = T0) -> ObservationBuffer:
    buf = ObservationBuffer(["a", "b"], CFG)
    buf.put_image("a", "img-a", now - 0.03, now)
    buf.put_image("b", "img-b", now - 0.01, now)
    buf.put_state(np.array([1.0, 2.0]), now - 0.005, now)
    return buf


def test_snapshot_takes_the_latest_of_each() -> None:
    buf = filled()
    buf.put_image("a", "img-a2", T0 - 0.02, T0)
    buf.put_prompt("pick")
    snap = buf.snapshot(T0 + 0.01)
    assert snap.images == {"a": "img-a2", "b": "img-b"}
    np.testing.assert_array_equal(snap.state, [1.0, 2.0])
    assert snap.prompt == "pick"
    assert snap.stamp_s == pytest.approx(T0 - 0.005)  # the newest sample used
    assert snap.age_s == pytest.approx(0.03)  # the oldest sample used
    assert snap.camera_skew_s == pytest.approx(0.01)


def test_empty_prompt_means_default() -> None:
    buf = filled()
    buf.put_prompt("")
    assert buf.snapshot(T0).prompt is None


def test_missing_camera_and_state() -> None:
    buf = ObservationBuffer(["a", "b"], CFG)
    buf.put_image("a", "x", T0, T0)
    with pytest.raises(ObservationError, match=r"no image received yet from camera\(s\) \['b'\]"):
        buf.snapshot(T0)
    buf.put_image("b", "x", T0, T0)
    with pytest.raises(ObservationError, match="no joint_states received yet"):
        buf.snapshot(T0)


def test_a_source_never_received_is_named_with_its_topic() -> None:
    # A wrong topic or namespace is the usual cause: the hold names where the node listens.
    buf = ObservationBuffer(["a", "b"], CFG)
    buf.set_topics({"a": "/robot1/a/image_raw", "b": "/robot1/b/image_raw", "joint_states": "/robot1/joint_states"})
    with pytest.raises(ObservationError) as missing:
        buf.snapshot(T0)
    assert str(missing.value) == ("no image received yet from camera(s) ['a', 'b'] (topics /robot1/a/image_raw, "
                                  "/robot1/b/image_raw); no joint_states received yet (topic /robot1/joint_states)")
    buf.put_image("a", "x", T0, T0)
    buf.put_image("b", "x", T0, T0)
    with pytest.raises(ObservationError, match=r"^no joint_states received yet \(topic /robot1/joint_states\)$"):
        buf.snapshot(T0)


def test_a_source_whose_messages_are_all_refused_is_held_for_that_reason() -> None:
    # Messages arrive but none is usable (unstamped, missing joints): the hold names why, not
    # "no joint_states received yet".
    buf = ObservationBuffer(["a"], CFG)
    with pytest.raises(ObservationError):
        buf.put_image("a", "unstamped", 0.0, T0)
    buf.refused("joint_states", "joint_states lacks joints ['gripper']: expected all of ['j0', 'gripper']")
    with pytest.raises(ObservationError, match=r"no usable image yet from camera\(s\) \['a'\]: every one received "
                                               r"was refused, the last: camera 'a': expected a positive header stamp"):
        buf.snapshot(T0)
    buf.put_image("a", "x", T0, T0)
    with pytest.raises(ObservationError, match=r"no usable joint_states yet: every one received was refused, the "
                                               r"last: joint_states lacks joints \['gripper'\]") as info:
        buf.snapshot(T0)
    assert info.value.kind == "missing_input"


def test_a_stale_source_names_the_refusals_since_its_last_sample() -> None:
    buf = filled()
    buf.refused("joint_states", "joint_states has non-finite positions: expected finite values, found {'j1': nan}")
    buf.put_image("a", "img-a2", T0 + 0.4, T0 + 0.4)
    buf.put_image("b", "img-b2", T0 + 0.4, T0 + 0.4)
    with pytest.raises(ObservationError, match=r"joint_states is stale: .* found 0.505 s; every one received since "
                                               r"was refused, the last: joint_states has non-finite positions"):
        buf.snapshot(T0 + 0.5)
    buf.put_state(np.zeros(2), T0 + 0.45, T0 + 0.45)  # a usable sample clears it
    buf.snapshot(T0 + 0.5)
    buf.put_state(np.zeros(2), T0 + 0.5, T0 + 0.5)
    with pytest.raises(ObservationError, match=r"camera 'a' is stale: .* found 0.600 s$"):
        buf.snapshot(T0 + 1.0)


def test_stale_camera_is_named() -> None:
    buf = filled()
    with pytest.raises(ObservationError, match=r"camera 'a' is stale: expected age <= 0.500 s .* found 0.530 s"):
        buf.snapshot(T0 + 0.5)


def test_stale_state() -> None:
    buf = ObservationBuffer(["a"], CFG)
    buf.put_state(np.zeros(2), T0 - 0.6, T0)
    buf.put_image("a", "x", T0, T0)
    with pytest.raises(ObservationError, match="joint_states is stale"):
        buf.snapshot(T0)


def test_camera_skew() -> None:
    buf = filled()
    buf.put_image("b", "late", T0 + 0.2, T0 + 0.2)
    spread = r"cameras out of sync: expected stamp spread <= 0.100 s .* found 0.230 s"
    with pytest.raises(ObservationError, match=spread) as info:
        buf.snapshot(T0 + 0.2)
    assert info.value.kind == "camera_skew"  # the hold reason counted in /diagnostics


def test_a_camera_and_joint_states_both_missing_are_both_named() -> None:
    buf = ObservationBuffer(["a", "b"], CFG)
    buf.put_image("a", "x", T0, T0)
    with pytest.raises(ObservationError, match=r"no image received yet from camera\(s\) \['b'\]; "
                                               r"no joint_states received yet$"):
        buf.snapshot(T0)


def test_the_limits_are_inclusive() -> None:
    # age == max_observation_age_s and skew == max_camera_skew_s are within the limits ("<=" as the
    # errors say); 0.0, a valid choice, means cameras stamped together, not "never".
    buf = ObservationBuffer(["a", "b"], ControlConfig(max_observation_age_s=0.5, max_camera_skew_s=0.0))
    buf.put_image("a", "x", T0, T0)
    buf.put_image("b", "y", T0, T0)
    buf.put_state(np.zeros(2), T0, T0)
    snap = buf.snapshot(T0 + 0.5)
    assert snap.age_s == 0.5 and snap.camera_skew_s == 0.0


def test_no_future_stamp_allowed_still_takes_stamps_of_now_and_refuses_older_ones() -> None:
    # max_future_stamp_s = 0 (simulation: sensors stamp with our clock): a stamp equal to now is
    # not in the future, and a later one older than it went backwards (not a clock reset).
    buf = ObservationBuffer(["a"], ControlConfig(max_future_stamp_s=0.0))
    buf.put_image("a", "now", T0, T0)
    buf.put_state(np.zeros(2), T0, T0)
    assert buf.snapshot(T0).images["a"] == "now"
    with pytest.raises(ObservationError, match="camera 'a': stamp went backwards"):
        buf.put_image("a", "older", T0 - 0.01, T0)
    with pytest.raises(ObservationError, match=r"camera 'a': stamp is 0.010 s in the future"):
        buf.put_image("a", "ahead", T0 + 0.01, T0)


def test_limits_follow_a_config_change() -> None:
    buf = filled()
    buf.config = ControlConfig(max_observation_age_s=1.0)
    assert buf.snapshot(T0 + 0.9).age_s == pytest.approx(0.93)


@pytest.mark.parametrize("stamp,pattern", [
    (T0 - 0.05, r"stamp went backwards: expected >= 999.970000 s, found 999.950000 s"),
    (T0 + 0.2, r"0.200 s in the future"),
    (T0 + 0.07, r"0.070 s in the future: expected <= 0.050 s ahead"),  # over max_future_stamp_s only
    (0.0, r"expected a positive header stamp, found 0.0"),
    (float("nan"), "positive header stamp"),
])
def test_bad_stamps(stamp: float, pattern: str) -> None:
    buf = filled()
    with pytest.raises(ObservationError, match=pattern):
        buf.put_image("a", "bad", stamp, T0)
    assert buf.snapshot(T0).images["a"] == "img-a"  # the bad sample was not stored


def test_state_stamp_going_backwards() -> None:
    buf = filled()
    with pytest.raises(ObservationError, match="joint_states: stamp went backwards"):
        buf.put_state(np.zeros(2), T0 - 0.1, T0)


def test_a_sample_after_our_clock_went_back_replaces_the_old_timelines() -> None:
    # A simulator reset: our clock and the inputs restart near 0, and the next control tick resets
    # the buffer. Until then each source's first new sample was refused as "stamp went backwards"
    # against a sample now 1000 s in our future (a WARN and an input error per source, each reset).
    buf = filled()
    buf.put_image("a", "after-reset", 0.009, 0.01)
    buf.put_image("b", "after-reset-b", 0.008, 0.01)
    buf.put_state(np.ones(2), 0.009, 0.01)
    assert buf.snapshot(0.01).images == {"a": "after-reset", "b": "after-reset-b"}


def test_a_sample_stamped_before_one_at_most_our_future_limit_ahead_is_still_refused() -> None:
    # Our clock 0.04 s behind a stored stamp is within max_future_stamp_s (0.05): no clock jump, so
    # an older stamp is out of order as before.
    buf = filled()
    with pytest.raises(ObservationError, match="stamp went backwards"):
        buf.put_image("a", "old", T0 - 0.05, T0 - 0.04 - 0.03)


def test_equal_stamp_replaces() -> None:
    buf = filled()
    buf.put_image("a", "same-stamp", T0 - 0.03, T0)
    assert buf.snapshot(T0).images["a"] == "same-stamp"


def test_reset_forgets_samples_and_stamps() -> None:
    buf = filled()
    buf.refused("joint_states", "joint_states lacks joints ['gripper']")
    buf.reset()
    buf.put_image("a", "old", T0 - 0.2, T0)  # older than before the reset: accepted
    with pytest.raises(ObservationError, match="no image"):
        buf.snapshot(T0)
    buf.put_image("b", "old", T0 - 0.2, T0)
    # the refusal before the reset is forgotten with the rest
    with pytest.raises(ObservationError, match="no joint_states received yet"):
        buf.snapshot(T0)


def test_an_accepted_sample_clears_its_refusal() -> None:
    buf = filled()
    buf.refused("joint_states", "joint_states has non-finite positions")
    buf.put_state(np.zeros(2), T0 + 0.45, T0 + 0.45)
    buf.put_image("a", "img-a2", T0 + 0.9, T0 + 0.9)
    buf.put_image("b", "img-b2", T0 + 0.9, T0 + 0.9)
    # stale now, but nothing was refused since the accepted sample
    with pytest.raises(ObservationError, match=r"joint_states is stale: .* found 0.550 s$"):
        buf.snapshot(T0 + 1.0)
    # the same for a camera
    buf.refused("a", "camera 'a': expected rgb8, found yuv422")
    buf.put_image("a", "img-a3", T0 + 0.95, T0 + 0.95)
    buf.put_state(np.zeros(2), T0 + 2.0, T0 + 2.0)
    buf.put_image("b", "img-b3", T0 + 2.0, T0 + 2.0)
    with pytest.raises(ObservationError, match=r"camera 'a' is stale: .* found 1.050 s$"):
        buf.snapshot(T0 + 2.0)


def test_unknown_camera_and_bad_construction() -> None:
    with pytest.raises(ObservationError, match=r"unknown camera 'z': expected one of \['a', 'b'\]"):
        filled().put_image("z", "x", T0, T0)
    with pytest.raises(ObservationError, match="at least one camera"):
        ObservationBuffer([], CFG)
    with pytest.raises(ObservationError, match="unique camera names"):
        ObservationBuffer(["a", "a"], CFG)


@pytest.mark.parametrize("kwargs", [dict(control_rate_hz=0.0), dict(control_rate_hz=float("inf")),
                                    dict(max_observation_age_s=-1.0), dict(max_camera_skew_s=11.0)])
def test_control_config_validation(kwargs) -> None:
    with pytest.raises(ConfigError, match="must be a finite number in"):
        ControlConfig(**kwargs)


def test_control_config_bounds() -> None:
    # The ranges are closed: no skew and no future stamp allowed at all are valid choices.
    assert ControlConfig(max_camera_skew_s=0.0, max_future_stamp_s=0.0).max_future_stamp_s == 0.0
    for bad in (-0.1, 11.0, float("nan")):
        with pytest.raises(ConfigError, match="max_future_stamp_s must be a finite number in"):
            ControlConfig(max_future_stamp_s=bad)


def test_concurrent_puts_and_snapshots() -> None:
    """The writer stores image t, then state t, t rising by 1e-4. A snapshot reads its sources
    together, so it sees state t (or the one before it while image t is new): never a state newer
    than the image, never more than one step older. Reading them apart lets the writer slip in
    between. (The old check, image value <= snapshot stamp, was true by construction.)"""
    buf = ObservationBuffer(["a"], ControlConfig(max_observation_age_s=10.0))
    stop = threading.Event()

    def writer() -> None:
        t = T0
        while not stop.is_set():
            t += 1e-4
            buf.put_image("a", t, t, t)
            buf.put_state(np.array([t]), t, t)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, so that an unguarded read would be caught
    thread = threading.Thread(target=writer)
    thread.start()
    try:
        seen = 0
        while seen < 50_000:
            try:
                snap = buf.snapshot(T0 + 1.0)
            except ObservationError:
                continue
            image_t, state_t = snap.images["a"], float(snap.state[0])
            assert image_t - 1e-4 - 1e-9 <= state_t <= image_t, (image_t, state_t)
            seen += 1
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)


class _ImagesReadHook(dict):
    """The buffer's image store, which runs `callback` on another thread while the snapshot copies
    it (dict() of a dict subclass with its own __iter__ goes through keys()), and waits up to 0.2 s
    for it: a callback that needs the buffer's lock cannot finish while a locked snapshot reads."""

    def __init__(self, images: dict, callback) -> None:  # noqa: ANN001
        super().__init__(images)
        self.thread = threading.Thread(target=callback)

    def keys(self):  # noqa: ANN201
        if not self.thread.is_alive() and self.thread.ident is None:
            self.thread.start()
            self.thread.join(0.2)
        return super().keys()

    def __iter__(self):  # noqa: ANN204
        return super().__iter__()


def test_a_state_arriving_during_a_snapshot_is_not_mixed_into_it() -> None:
    """Deterministic form of the race above: a state callback runs while the snapshot reads the
    images. The snapshot holds the lock over all its reads, so it keeps the state of the moment it
    read the images; the new state waits for the next snapshot."""
    buf = ObservationBuffer(["a"], ControlConfig(max_observation_age_s=10.0))
    buf.put_image("a", "img", T0, T0)
    buf.put_state(np.array([0.0]), T0, T0)
    hook = _ImagesReadHook(buf._images, lambda: buf.put_state(np.array([1.0]), T0 + 0.01, T0 + 0.01))
    buf._images = hook
    snap = buf.snapshot(T0 + 0.02)
    hook.thread.join()
    assert snap.state[0] == 0.0 and snap.stamp_s == T0
    assert buf.snapshot(T0 + 0.02).state[0] == 1.0

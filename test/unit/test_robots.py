"""Robot profiles and transforms: spec sections 4 and 5 on synthetic observations."""

from __future__ import annotations

import re

import numpy as np
import pytest

from pi0_policy_ros.errors import ConfigError, ObservationError
from pi0_policy_ros.policy.robots import (
    IMAGE_SLOTS,
    PROFILES,
    aloha_gripper_from_pi,
    aloha_gripper_from_pi_inverse,
    aloha_gripper_to_pi,
    finalize_actions,
    get_profile,
    make_bool_mask,
    prepare_inputs,
    resize_with_pad,
    robot_actions_to_model,
    state_in_action_units,
)

BASE, LEFT, RIGHT = IMAGE_SLOTS


def image(height: int, width: int, value: int = 200) -> np.ndarray:
    return np.full((height, width, 3), value, dtype=np.uint8)


def test_make_bool_mask_runs() -> None:
    assert make_bool_mask(2, -2, 2) == (True, True, False, False, True, True)
    assert make_bool_mask(6, -1) == (True,) * 6 + (False,)


@pytest.mark.parametrize(
    ("name", "state_dim", "action_dim", "horizon", "delta", "discrete", "period_s"),
    [
        ("pi05_libero", 8, 7, 10, (), False, 0.05),
        ("pi0_libero", 8, 7, 50, make_bool_mask(6, -1), False, 0.05),
        ("pi05_droid", 8, 8, 15, (), True, 1 / 15),
        ("pi0_droid", 8, 8, 10, (), False, 1 / 15),
        ("pi0_aloha", 14, 14, 50, make_bool_mask(6, -1, 6, -1), False, 0.02),
        ("pi05_aloha", 14, 14, 50, make_bool_mask(6, -1, 6, -1), True, 0.02),
    ],
)
def test_profiles_follow_the_openpi_configs(
    name: str, state_dim: int, action_dim: int, horizon: int, delta: tuple[bool, ...], discrete: bool, period_s: float
) -> None:
    profile = get_profile(name)
    assert profile.name == name
    assert (profile.state_dim, profile.action_dim, profile.action_horizon) == (state_dim, action_dim, horizon)
    assert profile.delta_action_mask == delta and profile.discrete_state_input is discrete
    assert profile.action_period_s == pytest.approx(period_s)
    assert not profile.joint_names or len(profile.joint_names) == action_dim


def test_get_profile_aliases_overrides_and_errors() -> None:
    assert get_profile("libero") is PROFILES["pi05_libero"]
    with pytest.raises(KeyError, match=r"valid names: \[.*'generic'.*'pi05_libero'"):
        get_profile("franka")
    generic = get_profile("generic", state_dim=6, action_dim=6, camera_slots={"front": BASE}, action_horizon=20)
    assert generic.camera_slots == (("front", BASE),) and generic.state_dim == 6
    with pytest.raises(ConfigError, match="unknown robot profile fields"):
        get_profile("generic", horizon=20)
    with pytest.raises(ConfigError, match="state_dim must be > 0, found 0"):
        get_profile("generic", state_dim=0)
    with pytest.raises(ConfigError, match="camera slots must be among"):
        get_profile("generic", camera_slots={"front": "base_1_rgb"})
    with pytest.raises(ConfigError, match="delta_action_mask"):
        get_profile("generic", action_dim=2, delta_action_mask=(True,) * 3)


def test_libero_maps_cameras_pads_the_right_wrist_and_keeps_the_state() -> None:
    state = np.arange(8, dtype=np.float64) / 10
    inputs = prepare_inputs(get_profile("pi05_libero"), {"image": image(224, 224, 10),
                                                           "wrist_image": image(224, 224, 20)}, state)
    assert list(inputs.images) == list(IMAGE_SLOTS)
    assert inputs.image_masks == {BASE: True, LEFT: True, RIGHT: False}
    assert (inputs.images[BASE] == 10).all() and (inputs.images[LEFT] == 20).all()
    assert inputs.images[RIGHT].shape == (224, 224, 3) and not inputs.images[RIGHT].any()
    assert inputs.state.dtype == np.float32
    np.testing.assert_allclose(inputs.state, state, rtol=1e-7)


def test_droid_maps_exterior_and_wrist_cameras() -> None:
    inputs = prepare_inputs(get_profile("pi05_droid"),
                            {"exterior_image_1_left": image(180, 320, 1), "wrist_image_left": image(180, 320, 2)},
                            np.zeros(8))
    assert inputs.image_masks == {BASE: True, LEFT: True, RIGHT: False}
    assert inputs.images[BASE].max() == 1 and inputs.images[LEFT].max() == 2


def test_aloha_missing_wrist_is_black_and_masked_cam_low_is_ignored() -> None:
    profile = get_profile("pi0_aloha")
    images = {"cam_high": image(480, 640), "cam_low": image(480, 640), "cam_right_wrist": image(480, 640, 7)}
    inputs = prepare_inputs(profile, images, np.zeros(14))
    assert inputs.image_masks == {BASE: True, LEFT: False, RIGHT: True}
    assert not inputs.images[LEFT].any() and inputs.images[RIGHT].max() == 7
    # openpi training/config.py: the ALOHA configs' policy_metadata {"reset_pose": [0, -1.5, 1.5, 0, 0, 0]}.
    assert profile.reset_pose == (0.0, -1.5, 1.5, 0.0, 0.0, 0.0)


def test_frames_for_the_engine_pass_unresized_and_other_sizes_are_refused() -> None:
    """frame_hw (the engine resizes on the GPU): frames pass as they are, empty slots are black at
    that size, and a camera sending another size is one error naming the size expected."""
    profile = get_profile("pi0_aloha")
    high = image(480, 640, 3)
    inputs = prepare_inputs(profile, {"cam_high": high, "cam_right_wrist": image(480, 640, 7)}, np.zeros(14),
                            frame_hw=(480, 640))
    assert inputs.images[BASE] is high
    assert inputs.image_masks == {BASE: True, LEFT: False, RIGHT: True}
    assert inputs.images[LEFT].shape == (480, 640, 3) and not inputs.images[LEFT].any()
    with pytest.raises(ObservationError, match=r"camera 'cam_right_wrist': expected a uint8 RGB image \[480, 640, 3\] "
                                               r"\(camera_height x camera_width.*found shape \(240, 320, 3\)"):
        prepare_inputs(profile, {"cam_high": high, "cam_right_wrist": image(240, 320)}, np.zeros(14),
                       frame_hw=(480, 640))


def test_missing_required_and_unknown_cameras_are_observation_errors() -> None:
    profile = get_profile("pi0_aloha")
    with pytest.raises(ObservationError, match=r"requires cameras \['cam_high'\], missing \['cam_high'\]"):
        prepare_inputs(profile, {"cam_left_wrist": image(224, 224)}, np.zeros(14))
    with pytest.raises(ObservationError, match=r"found unknown \['top'\]"):
        prepare_inputs(profile, {"cam_high": image(224, 224), "top": image(224, 224)}, np.zeros(14))


@pytest.mark.parametrize(
    ("bad", "found"),
    [
        (np.zeros((224, 224, 3), dtype=np.float32), "dtype float32"),
        (np.zeros((3, 224, 224), dtype=np.uint8), r"shape \(3, 224, 224\)"),
        (np.zeros((224, 224), dtype=np.uint8), r"shape \(224, 224\)"),
        (np.zeros((224, 224, 4), dtype=np.uint8), r"shape \(224, 224, 4\)"),
        (np.zeros((0, 10, 3), dtype=np.uint8), "non-empty"),
        ([[0, 1]], "found list"),
    ],
)
def test_bad_images_name_expected_and_found(bad: object, found: str) -> None:
    with pytest.raises(ObservationError, match=found) as error:
        prepare_inputs(get_profile("pi05_libero"), {"image": bad, "wrist_image": image(224, 224)}, np.zeros(8))
    assert "camera 'image'" in str(error.value)


@pytest.mark.parametrize("state", [np.zeros(7), np.zeros((1, 8)), np.array([0.0] * 7 + [np.nan])])
def test_bad_state_is_an_observation_error(state: np.ndarray) -> None:
    with pytest.raises(ObservationError, match="state"):
        prepare_inputs(get_profile("pi05_libero"), {"image": image(224, 224), "wrist_image": image(224, 224)}, state)


# --- resize_with_pad --------------------------------------------------------------------------------

def test_resize_with_pad_wide_image_is_centred_with_bars_top_and_bottom() -> None:
    out = resize_with_pad(image(480, 640, 255))
    # ratio = 640 / 224, so 224 x 168 pasted at row int(56 / 2) = 28.
    rows = np.flatnonzero(out[:, :, 0].any(axis=1))
    assert (rows[0], rows[-1]) == (28, 195)
    assert (out[28:196] == 255).all() and not out[:28].any() and not out[196:].any()


def test_resize_with_pad_tall_image_puts_the_odd_pixel_right() -> None:
    out = resize_with_pad(image(300, 200, 255))
    # ratio = 300 / 224, width int(200 / ratio) = 149, left offset int(75 / 2) = 37, 38 black on the right.
    cols = np.flatnonzero(out[:, :, 0].any(axis=0))
    assert (cols[0], cols[-1]) == (37, 185)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8


def test_resize_with_pad_upscales_and_keeps_224_images_as_they_are() -> None:
    small = np.zeros((50, 100, 3), dtype=np.uint8)
    small[:, :50] = 255  # left half white
    out = resize_with_pad(small)
    rows = np.flatnonzero(out.any(axis=(1, 2)))
    assert (rows[0], rows[-1]) == (56, 167)
    assert (out[56:168, :100] == 255).all() and not out[56:168, 124:].any()
    square = image(224, 224)
    assert resize_with_pad(square) is square


def test_resize_with_pad_rejects_too_thin_images() -> None:
    with pytest.raises(ObservationError, match="too thin"):
        resize_with_pad(image(1, 1000))


def test_unknown_camera_names_of_mixed_types_are_one_observation_error() -> None:
    # sorted() of {3, "foo"} raised TypeError: '<' not supported between instances of 'str' and 'int'.
    cameras = {"image": image(224, 224), "wrist_image": image(224, 224), 3: image(224, 224), "foo": image(224, 224)}
    with pytest.raises(ObservationError,
                       match=r"expects cameras \['image', 'wrist_image'\], found unknown \['foo', 3\]"):
        prepare_inputs(get_profile("pi05_libero"), cameras, np.zeros(8))


def test_a_too_thin_image_names_its_camera() -> None:
    # The error said "image 4x5000 is too thin ..." without the camera: with two cameras of a
    # profile the user could not tell which one sent it.
    cameras = {"image": image(224, 224), "wrist_image": image(5000, 4)}
    with pytest.raises(ObservationError, match=r"camera 'wrist_image': image 4x5000 is too thin to resize into "
                                               r"224x224 \(it becomes 0x223\)"):
        prepare_inputs(get_profile("pi05_libero"), cameras, np.zeros(8))


# --- Outputs ----------------------------------------------------------------------------------------

def test_pi05_libero_keeps_the_first_7_dims_unchanged() -> None:
    actions = np.random.default_rng(0).normal(size=(10, 32))
    out = finalize_actions(get_profile("pi05_libero"), actions, np.ones(8))
    assert out.shape == (10, 7) and out.dtype == np.float32
    np.testing.assert_allclose(out, actions[:, :7], rtol=1e-6)


def test_pi0_libero_rebuilds_absolute_arm_actions_but_not_the_gripper() -> None:
    profile = get_profile("pi0_libero")
    state = np.arange(1, 9, dtype=np.float64)
    inputs = prepare_inputs(profile, {"image": image(224, 224), "wrist_image": image(224, 224)}, state)
    deltas = np.full((50, 32), 0.5)
    out = finalize_actions(profile, deltas, inputs.state)
    np.testing.assert_allclose(out[:, :6], np.tile(state[:6] + 0.5, (50, 1)))
    np.testing.assert_allclose(out[:, 6], 0.5)


def test_aloha_round_trip_zero_deltas_give_back_the_joint_state() -> None:
    profile = get_profile("pi0_aloha")
    joints = np.random.default_rng(1).uniform(-1, 1, size=14)
    joints[[6, 13]] = [0.2, 0.8]  # grippers, normalized linear position
    inputs = prepare_inputs(profile, {"cam_high": image(224, 224)}, joints)
    # Input transform: sign flips on joints 1, 2, 8, 9, grippers mapped to pi's angle.
    flips = np.array([1, -1, -1, 1, 1, 1, 1, 1, -1, -1, 1, 1, 1, 1])
    arm = [0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12]
    np.testing.assert_allclose(inputs.state[arm], (flips * joints)[arm], rtol=1e-6)
    np.testing.assert_allclose(inputs.state[[6, 13]], aloha_gripper_to_pi(joints[[6, 13]]), rtol=1e-6)
    # Output: zero deltas on the joints -> the original joints; grippers are absolute.
    gripper_pi = np.array([0.1, 0.3])
    actions = np.zeros((50, 32))
    actions[:, [6, 13]] = gripper_pi
    out = finalize_actions(profile, actions, inputs.state)
    assert out.shape == (50, 14)
    np.testing.assert_allclose(out[:, arm], np.tile(joints[arm], (50, 1)), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out[:, [6, 13]], np.tile(aloha_gripper_from_pi(gripper_pi), (50, 1)), rtol=1e-6)


def test_aloha_gripper_maps() -> None:
    # Fully open linear position 0.058 m gives sin = 1, i.e. pi / 2 rad on pi's (0.5476, 1.6296) scale.
    assert aloha_gripper_to_pi(np.array(1.0)) == pytest.approx((np.pi / 2 - 0.5476) / (1.6296 - 0.5476))
    linear = np.linspace(0.0, 1.0, 11)
    assert np.all(np.diff(aloha_gripper_to_pi(linear)) > 0)
    # Action map: value + 0.5476 on ALOHA's gripper joint range (-0.6213, 1.4910), and its inverse.
    assert aloha_gripper_from_pi(np.array(-0.5476 - 0.6213)) == pytest.approx(0.0)
    assert aloha_gripper_from_pi(np.array(1.4910 - 0.5476)) == pytest.approx(1.0)
    values = np.linspace(-1.0, 2.0, 7)
    np.testing.assert_allclose(aloha_gripper_from_pi_inverse(aloha_gripper_from_pi(values)), values, atol=1e-12)


def test_aloha_gripper_to_pi_follows_openpi_over_the_whole_range() -> None:
    # openpi aloha_policy._gripper_to_angular, with its constants: linear position (0.01844 ..
    # 0.05800 m), Interbotix horn radius 0.022 and arm length 0.036, pi's angle range (0.5476, 1.6296).
    # At 1.0 the arcsin is clipped to pi / 2, so only values below it check the constants.
    value = np.array([0.0, 0.1, 0.25, 0.5, 0.75, 0.9])
    linear = value * (0.05800 - 0.01844) + 0.01844
    angle = np.arcsin(np.clip((0.022**2 + linear**2 - 0.036**2) / (2 * 0.022 * linear), -1.0, 1.0))
    np.testing.assert_allclose(aloha_gripper_to_pi(value), (angle - 0.5476) / (1.6296 - 0.5476), rtol=1e-12)


def test_a_measured_aloha_gripper_in_action_units_commands_the_same_opening() -> None:
    # The state gripper is the finger position (0.01844 .. 0.05800 m), the action gripper the joint
    # (-0.6213 .. 1.4910 rad), both normalized. Interbotix's horn linkage (r = 0.022 m, L = 0.036 m)
    # puts the finger at r sin(theta) + sqrt(L^2 - (r cos(theta))^2) for the joint angle theta: the
    # action must take the joint to where the finger is. Not the identity (state 0.5 is ~0.48).
    profile = get_profile("pi0_aloha")
    gripper = np.linspace(0.0, 1.0, 21)
    state = np.tile(np.linspace(-1.0, 1.0, 14), (21, 1))
    state[:, 6], state[:, 13] = gripper, gripper[::-1]
    converted = np.stack([state_in_action_units(profile, s) for s in state])
    arm = [d for d in range(14) if d not in (6, 13)]
    np.testing.assert_array_equal(converted[:, arm], state[:, arm])
    theta = converted[:, [6, 13]] * (1.4910 + 0.6213) - 0.6213
    finger_m = 0.022 * np.sin(theta) + np.sqrt(0.036**2 - (0.022 * np.cos(theta)) ** 2)
    np.testing.assert_allclose(finger_m, 0.01844 + state[:, [6, 13]] * (0.05800 - 0.01844), atol=1e-9)
    # Closed is the joint's closed (-0.6213 rad, ALOHA's constants round it); fully open the linkage's
    # widest, pi / 2 rad, past the joint's 1.4910 rad.
    assert converted[0, 6] == pytest.approx(0.0, abs=1e-3)
    assert converted[-1, 6] == pytest.approx((np.pi / 2 + 0.6213) / (1.4910 + 0.6213), rel=1e-9)
    assert converted[10, 6] == pytest.approx(0.4816, abs=1e-4)
    with pytest.raises(ObservationError, match=re.escape("profile 'pi0_aloha': expected state of shape (14,), "
                                                         "found (7,)")):
        state_in_action_units(profile, np.zeros(7))  # was numpy's IndexError for a short state
    # Profiles whose state and actions share units: the state as it is.
    for name in ("pi05_libero", "pi05_droid", "generic"):
        other = get_profile(name)
        values = np.linspace(-2.0, 2.0, other.state_dim)
        np.testing.assert_array_equal(state_in_action_units(other, values), values)


def test_a_measured_aloha_gripper_the_linkage_cannot_reach_is_not_taken_for_open() -> None:
    # The horn linkage reaches finger positions L - r .. L + r (0.014 .. 0.058 m). A reading under
    # 0 m once flipped the inverse's sign and came out fully open (1.038): a hold point that opens
    # the gripper. Every unreachable reading is now the nearest reachable one, and the map rises.
    profile = get_profile("pi0_aloha")
    low = (0.036 - 0.022 - 0.01844) / (0.05800 - 0.01844)
    closest = (-np.pi / 2 + 0.6213) / (1.4910 + 0.6213)
    readings = np.linspace(-3.0, 3.0, 601)
    state = np.zeros((readings.size, 14))
    state[:, 6] = readings
    gripper = np.stack([state_in_action_units(profile, s) for s in state])[:, 6]
    assert np.all(np.diff(gripper) >= 0.0)
    np.testing.assert_allclose(gripper[readings <= low], closest, rtol=1e-12)
    np.testing.assert_allclose(gripper[readings >= 1.0], (np.pi / 2 + 0.6213) / (1.4910 + 0.6213), rtol=1e-12)


def test_finalize_actions_checks_shapes() -> None:
    profile = get_profile("pi0_aloha")
    with pytest.raises(ObservationError, match=r"expected actions \[H, >= 14\], found shape \(50, 8\)"):
        finalize_actions(profile, np.zeros((50, 8)), np.zeros(14))
    with pytest.raises(ObservationError, match=r"expected state of shape \(14,\)"):
        finalize_actions(profile, np.zeros((50, 32)), np.zeros(8))


def test_generic_profile_from_parameters() -> None:
    profile = get_profile("generic", state_dim=6, action_dim=6, delta_action_mask=make_bool_mask(5, -1),
                          camera_slots={"front": BASE, "hand": RIGHT})
    inputs = prepare_inputs(profile, {"front": image(100, 100), "hand": image(100, 100)}, np.ones(6))
    assert inputs.image_masks == {BASE: True, LEFT: False, RIGHT: True}
    out = finalize_actions(profile, np.zeros((4, 32)), inputs.state)
    assert out.shape == (4, 6) and out[:, :5].tolist() == [[1.0] * 5] * 4 and not out[:, 5].any()


@pytest.mark.parametrize("name", sorted({p.name for p in PROFILES.values()}))
def test_robot_actions_to_model_inverts_finalize_actions(name: str) -> None:
    """RTC expresses the executed chunk the way the model predicts it: the exact inverse of the
    output transform (deltas, ALOHA signs and gripper map) on the robot's dims."""
    profile = PROFILES[name]
    rng = np.random.default_rng(7)
    model_side = rng.normal(scale=0.3, size=(profile.action_horizon, 32))
    state = rng.normal(scale=0.3, size=profile.state_dim)
    robot = finalize_actions(profile, model_side, state)
    back = robot_actions_to_model(profile, robot, state)
    np.testing.assert_allclose(back, model_side[:, : profile.action_dim], atol=1e-5)
    with pytest.raises(ObservationError, match=rf"expected actions \[H, {profile.action_dim}\]"):
        robot_actions_to_model(profile, robot[:, :-1], state)


def test_parallel_resizing_gives_the_same_inputs_and_errors() -> None:
    """`prepare_inputs` with an executor (what `Policy` passes: one thread per camera) resizes the
    cameras concurrently; each slot gets exactly what the serial path gives it."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(5)
    profile = get_profile("pi05_aloha")
    images = {"cam_high": rng.integers(0, 256, (480, 640, 3), dtype=np.uint8),
              "cam_left_wrist": rng.integers(0, 256, (240, 320, 3), dtype=np.uint8),
              "cam_right_wrist": rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)}
    serial = prepare_inputs(profile, images, np.zeros(14))
    with ThreadPoolExecutor(3) as pool:
        parallel = prepare_inputs(profile, images, np.zeros(14), pool)
        assert parallel.image_masks == serial.image_masks
        for slot in IMAGE_SLOTS:
            np.testing.assert_array_equal(parallel.images[slot], serial.images[slot])
        with pytest.raises(ObservationError, match="cam_left_wrist.*dtype float32"):
            prepare_inputs(profile, {**images, "cam_left_wrist": np.zeros((224, 224, 3), np.float32)}, np.zeros(14),
                           pool)

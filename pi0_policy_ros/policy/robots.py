"""Robot profiles and the robot-specific input / output transforms (spec: openpi_pipeline.md, 1, 4, 5).

A profile is data: which camera feeds which image slot, the robot's state / action dims, the
delta-action mask, ALOHA's joint / gripper conventions, the chunk horizon and the action period.
The transforms below read it; no code branches on a profile's name.

Public API:
    IMAGE_SLOTS, IMAGE_SIZE
    RobotProfile (frozen dataclass), PROFILES, get_profile(name, **overrides) -> RobotProfile
    make_bool_mask(*runs) -> tuple[bool, ...]
    resize_with_pad(image, height=224, width=224) -> uint8 [height, width, 3]
    prepare_inputs(profile, images, state, executor=None, frame_hw=None) -> PreparedInputs
    transform_state(profile, state) -> float32 [state_dim]      (the state part of prepare_inputs)
    finalize_actions(profile, actions, state) -> float32 [H, action_dim]
    state_in_action_units(profile, state) -> float64 [state_dim]   (a measured state as actions)
    aloha_gripper_to_pi / aloha_gripper_from_pi / aloha_gripper_from_pi_inverse / aloha_gripper_state_to_action

Order at inference (openpi `policy_config.py`): prepare_inputs -> normalize state -> tokenize / pad
-> network -> unnormalize actions -> finalize_actions. `finalize_actions` takes the state that
`prepare_inputs` returned (robot transform applied, not normalized), as openpi's AbsoluteActions
sees the unnormalized model-side state.

Simulator quirks stay outside: the LIBERO example client rotates both images by 180 degrees before
sending them; do that where the images come from, not here.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import Executor
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Mapping, NamedTuple

import numpy as np

from pi0_policy_ros.errors import ConfigError, ObservationError
from pi0_policy_ros.policy.types import as_real_array
from pi0_policy_ros.resize import pad_geometry, pil_bilinear_resize

if TYPE_CHECKING:
    from pi0_policy_ros.policy.config import PolicyConfig

BASE_SLOT = "base_0_rgb"
LEFT_WRIST_SLOT = "left_wrist_0_rgb"
RIGHT_WRIST_SLOT = "right_wrist_0_rgb"
IMAGE_SLOTS = (BASE_SLOT, LEFT_WRIST_SLOT, RIGHT_WRIST_SLOT)
IMAGE_SIZE = 224
MODEL_TYPES = ("pi0", "pi05", "")
ACTION_SPACES = ("joint_position", "joint_velocity", "eef_delta", "unspecified")
# What a joint_trajectory_controller may receive as joint positions: never velocities or end-effector
# deltas (it would drive the joints to those values); "unspecified" (the generic profile) is the user's call.
TRAJECTORY_ACTION_SPACES = ("joint_position", "unspecified")


def make_bool_mask(*runs: int) -> tuple[bool, ...]:
    """openpi's mask builder: a positive run gives that many True, a negative one that many False.

    make_bool_mask(6, -1) == (True,) * 6 + (False,)
    """
    mask: list[bool] = []
    for run in runs:
        mask.extend([run > 0] * abs(run))
    return tuple(mask)


@dataclass(frozen=True)
class RobotProfile:
    """How one robot's observations and actions map to the model's.

    name: the canonical profile name.
    model_type: "pi0" or "pi05" when the profile follows one openpi config, "" for any.
    camera_slots: (camera name, image slot) pairs; a Mapping is accepted and turned into pairs.
    always_valid_slots: slots whose image mask is always True, so their camera is required (openpi
        reads these cameras unconditionally). Other slots without a camera get black, mask False.
    ignored_cameras: cameras the robot may send that no slot uses (ALOHA's cam_low).
    state_dim, action_dim: the robot's own dims (the model pads both to its width).
    delta_action_mask: action dims trained as deltas from the state; () for none. At the output
        `actions[:, :n] += where(mask, state[:n], 0)` rebuilds absolute actions.
    joint_signs: per-dim sign flips applied to state and actions (ALOHA adapt_to_pi); () for none.
    aloha_gripper_dims: dims converted with ALOHA's gripper maps (state: linear -> pi angular,
        actions: pi angular -> ALOHA gripper joint); () for none.
    discrete_state_input: pi0.5 writes the discretized state into the prompt. Ignored where the
        profile has no model_type (generic) or the checkpoint is LeRobot's: the model config decides.
    action_horizon: actions per chunk of the openpi config. The generic profile's (no model_type)
        is a default: the policy samples the horizon its checkpoint records unless it is overridden.
    action_period_s: time between two actions (the rate the policy was trained at).
    action_space: what the action dims mean, one of ACTION_SPACES.
    joint_names: default names of the state / action dims (JointState / JointTrajectory); () if
        the dims are not joints or are unknown.
    reset_pose: openpi policy metadata "reset_pose" (joint positions per arm); () if none.
    """

    name: str
    model_type: str
    camera_slots: tuple[tuple[str, str], ...]
    always_valid_slots: tuple[str, ...]
    state_dim: int
    action_dim: int
    action_horizon: int
    action_period_s: float
    ignored_cameras: tuple[str, ...] = ()
    delta_action_mask: tuple[bool, ...] = ()
    joint_signs: tuple[float, ...] = ()
    aloha_gripper_dims: tuple[int, ...] = ()
    discrete_state_input: bool = False
    action_space: str = "unspecified"
    joint_names: tuple[str, ...] = ()
    reset_pose: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.camera_slots, Mapping):
            object.__setattr__(self, "camera_slots", tuple(self.camera_slots.items()))
        for name in ("always_valid_slots", "ignored_cameras", "delta_action_mask", "joint_signs",
                     "aloha_gripper_dims", "joint_names", "reset_pose"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        self._validate_scalars()
        self._validate_cameras()
        self._validate_dims()

    @property
    def slot_of_camera(self) -> dict[str, str]:
        """camera name -> image slot."""
        return dict(self.camera_slots)

    @property
    def camera_of_slot(self) -> dict[str, str]:
        """image slot -> camera name, for the slots that have a camera."""
        return {slot: camera for camera, slot in self.camera_slots}

    @property
    def required_cameras(self) -> tuple[str, ...]:
        """Cameras that must be in every observation (those of the always-valid slots)."""
        return tuple(camera for camera, slot in self.camera_slots if slot in self.always_valid_slots)

    def _validate_scalars(self) -> None:
        _require(self.model_type in MODEL_TYPES, f"model_type must be one of {MODEL_TYPES}", self.model_type)
        _require(self.action_space in ACTION_SPACES, f"action_space must be one of {ACTION_SPACES}",
                 self.action_space)
        for name in ("state_dim", "action_dim", "action_horizon"):
            _require(getattr(self, name) > 0, f"{name} must be > 0", getattr(self, name))
        _require(self.action_period_s > 0, "action_period_s must be > 0", self.action_period_s)

    def _validate_cameras(self) -> None:
        slots = [slot for _, slot in self.camera_slots]
        unknown = sorted(set(slots) - set(IMAGE_SLOTS))
        _require(not unknown, f"camera slots must be among {IMAGE_SLOTS}", unknown)
        _require(len(set(slots)) == len(slots), "each image slot takes at most one camera", slots)
        cameras = [camera for camera, _ in self.camera_slots]
        _require(len(set(cameras)) == len(cameras), "each camera feeds one slot", cameras)
        unmapped = sorted(set(self.always_valid_slots) - set(slots))
        _require(not unmapped, "always_valid_slots must have a camera", unmapped)
        both = sorted(set(self.ignored_cameras) & set(cameras))
        _require(not both, "a camera cannot be both mapped and ignored", both)

    def _validate_dims(self) -> None:
        _require(len(self.delta_action_mask) <= self.action_dim,
                 f"delta_action_mask must have at most action_dim={self.action_dim} entries",
                 len(self.delta_action_mask))
        if self.joint_signs:
            _require(len(self.joint_signs) == self.state_dim == self.action_dim,
                     f"joint_signs needs state_dim == action_dim == its length (state_dim={self.state_dim}, "
                     f"action_dim={self.action_dim})", len(self.joint_signs))
        bad = [d for d in self.aloha_gripper_dims if not 0 <= d < min(self.state_dim, self.action_dim)]
        _require(not bad, f"aloha_gripper_dims must be < min(state_dim, action_dim) = "
                          f"{min(self.state_dim, self.action_dim)}", bad)
        if self.joint_names:
            _require(len(self.joint_names) == self.action_dim,
                     f"joint_names must have action_dim={self.action_dim} entries", len(self.joint_names))


def _require(ok: bool, expected: str, found: object) -> None:
    if not ok:
        raise ConfigError(f"robot profile: {expected}, found {found!r}")


# --- Profiles (openpi configs at commit 15a9616a) -------------------------------------------------

_LIBERO_CAMERAS = (("image", BASE_SLOT), ("wrist_image", LEFT_WRIST_SLOT))
_DROID_CAMERAS = (("exterior_image_1_left", BASE_SLOT), ("wrist_image_left", LEFT_WRIST_SLOT))
_ALOHA_CAMERAS = (("cam_high", BASE_SLOT), ("cam_left_wrist", LEFT_WRIST_SLOT),
                  ("cam_right_wrist", RIGHT_WRIST_SLOT))
# Interbotix ViperX joint names, left arm then right arm (state layout [6 joints, gripper] x 2).
_ALOHA_JOINTS = tuple(f"{side}_{joint}" for side in ("left", "right") for joint in
                      ("waist", "shoulder", "elbow", "forearm_roll", "wrist_angle", "wrist_rotate", "gripper"))
_DROID_JOINTS = tuple(f"panda_joint{i}" for i in range(1, 8)) + ("gripper",)
# openpi aloha_policy._joint_flip_mask: ALOHA's joint directions -> the pi runtime's.
_ALOHA_JOINT_SIGNS = (1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0, 1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0)

# Periods: the rates the robots execute actions at (openpi's configs do not state them). LIBERO 20 Hz:
# its ControlEnv defaults to control_freq=20, which openpi's examples/libero/main.py keeps, one action
# per env.step (the fps=10 of openpi's LIBERO data set and replay videos is a label; no step is
# skipped). DROID 15 Hz, ALOHA 50 Hz: the rates their data sets were recorded at.
_LIBERO = dict(camera_slots=_LIBERO_CAMERAS, always_valid_slots=(BASE_SLOT, LEFT_WRIST_SLOT), state_dim=8,
               action_dim=7, action_period_s=0.05, action_space="eef_delta")
_DROID = dict(camera_slots=_DROID_CAMERAS, always_valid_slots=(BASE_SLOT, LEFT_WRIST_SLOT), state_dim=8,
              action_dim=8, action_period_s=1.0 / 15.0, action_space="joint_velocity", joint_names=_DROID_JOINTS)
_ALOHA = dict(camera_slots=_ALOHA_CAMERAS, always_valid_slots=(BASE_SLOT,), ignored_cameras=("cam_low",),
              state_dim=14, action_dim=14, action_horizon=50, action_period_s=0.02,
              delta_action_mask=make_bool_mask(6, -1, 6, -1), joint_signs=_ALOHA_JOINT_SIGNS,
              aloha_gripper_dims=(6, 13), action_space="joint_position", joint_names=_ALOHA_JOINTS,
              reset_pose=(0.0, -1.5, 1.5, 0.0, 0.0, 0.0))

_CANONICAL = (
    RobotProfile(name="pi05_libero", model_type="pi05", action_horizon=10, discrete_state_input=False, **_LIBERO),
    # pi0_libero was trained with openpi's extra delta transform on the 6 arm dims.
    RobotProfile(name="pi0_libero", model_type="pi0", action_horizon=50,
                 delta_action_mask=make_bool_mask(6, -1), **_LIBERO),
    RobotProfile(name="pi05_droid", model_type="pi05", action_horizon=15, discrete_state_input=True, **_DROID),
    RobotProfile(name="pi0_droid", model_type="pi0", action_horizon=10, **_DROID),
    RobotProfile(name="pi0_aloha", model_type="pi0", **_ALOHA),
    RobotProfile(name="pi05_aloha", model_type="pi05", discrete_state_input=True, **_ALOHA),
    # Any robot: set state_dim / action_dim / cameras / horizon through get_profile's overrides.
    RobotProfile(name="generic", model_type="",
                 camera_slots=(("base", BASE_SLOT), ("left_wrist", LEFT_WRIST_SLOT),
                               ("right_wrist", RIGHT_WRIST_SLOT)),
                 always_valid_slots=(BASE_SLOT,), state_dim=32, action_dim=32, action_horizon=50,
                 action_period_s=0.1),
)
# Short names follow PolicyConfig's default model_preset, "pi05".
_ALIASES = {"libero": "pi05_libero", "droid": "pi05_droid", "aloha": "pi05_aloha"}
PROFILES: Mapping[str, RobotProfile] = MappingProxyType({
    **{profile.name: profile for profile in _CANONICAL},
    **{alias: next(p for p in _CANONICAL if p.name == target) for alias, target in _ALIASES.items()},
})


def openpi_training_transforms(profile: RobotProfile) -> tuple[str, ...]:
    """The transforms of openpi's training configs that `profile` applies to states and actions,
    by name (a model trained without them, e.g. in LeRobot, needs a profile without them)."""
    found = []
    if any(profile.delta_action_mask):
        found.append("delta actions")
    if any(sign != 1.0 for sign in profile.joint_signs):
        found.append("ALOHA joint sign flips")
    if profile.aloha_gripper_dims:
        found.append("ALOHA gripper conversions")
    return tuple(found)


def get_profile(name: str, **overrides: object) -> RobotProfile:
    """The profile called `name`, with any fields replaced by `overrides` (validated).

    Raises KeyError listing the valid names for an unknown name, ConfigError for a bad override.
    """
    if name not in PROFILES:
        raise KeyError(f"unknown robot profile {name!r}; valid names: {sorted(PROFILES)}")
    profile = PROFILES[name]
    if not overrides:
        return profile
    fields = {f.name for f in dataclasses.fields(RobotProfile)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(f"unknown robot profile fields {unknown}; valid fields: {sorted(fields)}")
    return dataclasses.replace(profile, **overrides)  # type: ignore[arg-type]


def configured_profile(config: PolicyConfig) -> RobotProfile:
    """The profile `config` names, with its profile_* values (the generic profile's dims, a delta
    mask replacing the profile's), as the policy runs it; an unknown name is a ConfigError listing
    the valid ones. (The generic profile's horizon may still come from the checkpoint: Policy.)"""
    try:
        profile = get_profile(config.robot_profile, **config.profile_overrides())
    except KeyError as exc:
        raise ConfigError(str(exc.args[0])) from None
    runs = config.delta_action_mask
    if not runs:
        return profile
    mask = make_bool_mask(*runs)
    # Any profile takes it, as the other profile_* values: e.g. (-14,) turns the ALOHA deltas off.
    if len(mask) > profile.action_dim:
        raise ConfigError(f"profile_delta_action_mask {list(runs)} covers {len(mask)} action dims: expected at "
                          f"most the action_dim {profile.action_dim} of robot profile {profile.name!r} "
                          "(set profile_action_dim, or shorten the runs)")
    return dataclasses.replace(profile, delta_action_mask=mask)


# --- Images ---------------------------------------------------------------------------------------

def resize_with_pad(image: np.ndarray, height: int = IMAGE_SIZE, width: int = IMAGE_SIZE) -> np.ndarray:
    """openpi_client's resize_with_pad: scale to fit, keep the aspect ratio, pad black, centred.

    An image already at the size is returned as is. Otherwise the geometry is `resize.pad_geometry`
    and the resize PIL's bilinear filter (which antialiases when shrinking; reproduced exactly by
    `resize.pil_bilinear_resize`). Pixel for pixel what openpi_client returns for a uint8 RGB image.
    """
    if image.shape[:2] == (height, width):
        return image
    try:
        (new_height, new_width), (top, left) = pad_geometry(image.shape[:2], (height, width))
    except ValueError as exc:
        raise ObservationError(str(exc)) from None
    resized = pil_bilinear_resize(image, new_height, new_width)
    canvas = np.zeros((height, width) + image.shape[2:], dtype=image.dtype)
    canvas[top : top + new_height, left : left + new_width] = resized
    return canvas


def _check_image(camera: str, image: object, frame_hw: tuple[int, int] | None = None) -> np.ndarray:
    size = "H, W" if frame_hw is None else f"{frame_hw[0]}, {frame_hw[1]}"
    expected = f"a uint8 RGB image [{size}, 3]"
    if not isinstance(image, np.ndarray):
        raise ObservationError(f"camera '{camera}': expected {expected}, found {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ObservationError(f"camera '{camera}': expected {expected}, found dtype {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ObservationError(f"camera '{camera}': expected {expected}, found shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ObservationError(f"camera '{camera}': expected a non-empty image, found shape {image.shape}")
    if frame_hw is not None and image.shape[:2] != tuple(frame_hw):
        raise ObservationError(f"camera '{camera}': expected {expected} (camera_height x camera_width: the "
                               f"engine resizes them), found shape {image.shape}")
    if frame_hw is None:
        # Here, not in resize_with_pad, so that the error says which camera sent it.
        try:
            pad_geometry(image.shape[:2], (IMAGE_SIZE, IMAGE_SIZE))
        except ValueError as exc:
            raise ObservationError(f"camera '{camera}': {exc}") from None
    return image


def _check_camera_names(profile: RobotProfile, images: Mapping[str, np.ndarray]) -> None:
    known = set(profile.slot_of_camera) | set(profile.ignored_cameras)
    if not isinstance(images, Mapping):
        raise ObservationError(f"profile '{profile.name}': expected images as a mapping of camera name -> image "
                               f"(cameras {sorted(known)}), found {type(images).__name__}")
    unknown = sorted(set(images) - known, key=repr)  # names of mixed types (str, int) do not compare
    if unknown:
        raise ObservationError(
            f"profile '{profile.name}' expects cameras {sorted(known)}, found unknown {unknown}"
        )
    missing = [camera for camera in profile.required_cameras if camera not in images]
    if missing:
        raise ObservationError(
            f"profile '{profile.name}' requires cameras {list(profile.required_cameras)}, missing {missing}"
        )


# --- State and actions ----------------------------------------------------------------------------

# ALOHA gripper constants, as in openpi aloha_policy.py (from the ALOHA and Interbotix code).
# ALOHA normalizes both gripper ranges from closed (0) to open (1): openpi examples/aloha_real/constants.py
# has PUPPET_GRIPPER_POSITION_CLOSE = 0.01844, _OPEN = 0.05800 and PUPPET_GRIPPER_JOINT_CLOSE = -0.6213,
# _OPEN = 1.4910.
_ALOHA_GRIPPER_LINEAR_M = (0.01844, 0.05800)  # puppet gripper (finger) position in m, closed .. open
_INTERBOTIX_ARM_LENGTH_M = 0.036
_INTERBOTIX_HORN_RADIUS_M = 0.022
# pi's gripper range: encoder counts 2405 .. 3110 of 4096 around zero 2048, in radians.
_PI_GRIPPER_RAD = (0.5476, 1.6296)
_ALOHA_GRIPPER_JOINT_RAD = (-0.6213, 1.4910)  # puppet gripper joint in rad, closed .. open
# The normalized finger positions the horn linkage can reach: L - r .. L + r.
_ALOHA_GRIPPER_REACH = tuple(
    (reach_m - _ALOHA_GRIPPER_LINEAR_M[0]) / (_ALOHA_GRIPPER_LINEAR_M[1] - _ALOHA_GRIPPER_LINEAR_M[0])
    for reach_m in (_INTERBOTIX_ARM_LENGTH_M - _INTERBOTIX_HORN_RADIUS_M,
                    _INTERBOTIX_ARM_LENGTH_M + _INTERBOTIX_HORN_RADIUS_M))


def _to_unit(x: np.ndarray, low: float, high: float) -> np.ndarray:
    return (x - low) / (high - low)


def _from_unit(x: np.ndarray, low: float, high: float) -> np.ndarray:
    return x * (high - low) + low


def _aloha_gripper_angle_rad(value: np.ndarray) -> np.ndarray:
    """ALOHA state gripper (finger position normalized by ALOHA: 0 closed, 1 open) -> the gripper
    horn's angle in rad."""
    linear = _from_unit(np.asarray(value, dtype=np.float64), *_ALOHA_GRIPPER_LINEAR_M)
    horn, arm = _INTERBOTIX_HORN_RADIUS_M, _INTERBOTIX_ARM_LENGTH_M
    # Inverse of Interbotix's angle -> linear gripper mapping (law of cosines on the horn linkage).
    with np.errstate(divide="ignore", invalid="ignore"):
        sine = (horn**2 + linear**2 - arm**2) / (2.0 * horn * linear)
    return np.arcsin(np.clip(sine, -1.0, 1.0))


def aloha_gripper_to_pi(value: np.ndarray) -> np.ndarray:
    """ALOHA state gripper (finger position normalized by ALOHA: 0 closed, 1 open) -> pi's
    normalized gripper angle."""
    return _to_unit(_aloha_gripper_angle_rad(value), *_PI_GRIPPER_RAD)


def aloha_gripper_state_to_action(value: np.ndarray) -> np.ndarray:
    """ALOHA state gripper (normalized finger position) -> the action gripper (normalized gripper
    joint) that commands the same opening: finger position -> horn angle -> joint normalized.
    Not the identity: state 0.5 is action 0.48, state 1 (the linkage's widest) action 1.038."""
    # A reading the linkage cannot reach (finger under L - r = 14 mm: state < -0.112) is taken at
    # the nearest reachable one. Unclipped, one under 0 m (state < -0.466) flipped the sine's sign
    # and came out fully open. `aloha_gripper_to_pi` keeps openpi's unclipped map for the model.
    clipped = np.clip(np.asarray(value, dtype=np.float64), *_ALOHA_GRIPPER_REACH)
    return _to_unit(_aloha_gripper_angle_rad(clipped), *_ALOHA_GRIPPER_JOINT_RAD)


def aloha_gripper_from_pi(value: np.ndarray) -> np.ndarray:
    """pi's gripper action -> ALOHA's normalized gripper joint (0 closed at -0.6213 rad, 1 open at
    1.4910 rad; the model predicts radians)."""
    return _to_unit(np.asarray(value, dtype=np.float64) + _PI_GRIPPER_RAD[0], *_ALOHA_GRIPPER_JOINT_RAD)


def aloha_gripper_from_pi_inverse(value: np.ndarray) -> np.ndarray:
    """Exact inverse of `aloha_gripper_from_pi` (openpi uses it on training actions)."""
    return _from_unit(np.asarray(value, dtype=np.float64), *_ALOHA_GRIPPER_JOINT_RAD) - _PI_GRIPPER_RAD[0]


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _check_state(profile: RobotProfile, state: np.ndarray) -> np.ndarray:
    # A ragged list ([eef_pos, axis_angle, gripper] not concatenated) raised numpy's ValueError.
    values = as_real_array(state, f"profile '{profile.name}': expected state of {profile.state_dim} real numbers")
    if values.shape != (profile.state_dim,):
        raise ObservationError(
            f"profile '{profile.name}': expected state of shape ({profile.state_dim},), found {values.shape}"
        )
    # The model side is float32: a finite value beyond its range would become inf there.
    if not np.all(np.abs(values) <= _FLOAT32_MAX):
        raise ObservationError(f"profile '{profile.name}': state must be finite (float32 range), "
                               f"found {values.tolist()}")
    return values


def transform_state(profile: RobotProfile, state: np.ndarray) -> np.ndarray:
    """The robot input transform of the state (ALOHA: sign flips, gripper to pi's angle)."""
    values = _check_state(profile, state).copy()
    if profile.joint_signs:
        values *= np.asarray(profile.joint_signs)
    dims = list(profile.aloha_gripper_dims)
    if dims:
        values[dims] = aloha_gripper_to_pi(values[dims])
    return values.astype(np.float32)


class PreparedInputs(NamedTuple):
    """Model-side inputs of one observation, before normalization.

    images: slot -> uint8 [224, 224, 3] (or [*frame_hw, 3]), every slot of IMAGE_SLOTS, in that order.
    image_masks: slot -> bool, False for a slot without a camera (its image is black).
    state: float32 [state_dim], after the robot input transform.
    """

    images: dict[str, np.ndarray]
    image_masks: dict[str, bool]
    state: np.ndarray


def prepare_inputs(profile: RobotProfile, images: Mapping[str, np.ndarray], state: np.ndarray,
                   executor: Executor | None = None, frame_hw: tuple[int, int] | None = None) -> PreparedInputs:
    """Map a robot observation to the model's image slots, masks and transformed state.

    executor: resizes the cameras in parallel when given (numpy's passes release the GIL: 3
    cameras of 640x480 take ~2x less on two cores); the results are the same.
    frame_hw: the engine resizes (on the GPU): every camera must send frames of exactly this
    (height, width), which pass as they are; empty slots are black at that size.
    Raises ObservationError for an unknown or missing required camera, a bad image (not uint8
    [H, W, 3], or not frame_hw when given) or a state of the wrong length.
    """
    _check_camera_names(profile, images)
    camera_of_slot = profile.camera_of_slot
    present = {slot: _check_image(camera, images[camera], frame_hw) for slot in IMAGE_SLOTS
               if (camera := camera_of_slot.get(slot)) is not None and camera in images}
    if frame_hw is not None:
        resized = present
    elif executor is not None and len(present) > 1:
        resized = dict(zip(present, executor.map(resize_with_pad, present.values())))
    else:
        resized = {slot: resize_with_pad(image) for slot, image in present.items()}
    black = np.zeros((*(frame_hw or (IMAGE_SIZE, IMAGE_SIZE)), 3), dtype=np.uint8)
    black.flags.writeable = False  # one array serves every empty slot
    slot_images = {slot: resized.get(slot, black) for slot in IMAGE_SLOTS}
    slot_masks = {slot: slot in resized for slot in IMAGE_SLOTS}
    return PreparedInputs(images=slot_images, image_masks=slot_masks, state=transform_state(profile, state))


def finalize_actions(profile: RobotProfile, actions: np.ndarray, state: np.ndarray) -> np.ndarray:
    """The robot output transform: absolute actions where trained on deltas, robot dims, ALOHA maps.

    actions: [H, D >= action_dim], unnormalized model output.
    state: what `prepare_inputs` returned as state (robot transform applied, not normalized).
    Returns float32 [H, action_dim] in the robot's units and conventions.
    """
    values = np.array(actions, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] < profile.action_dim:
        raise ObservationError(
            f"profile '{profile.name}': expected actions [H, >= {profile.action_dim}], found shape {values.shape}"
        )
    reference = _check_state(profile, state)
    values = _add_delta_reference(profile.delta_action_mask, values, reference)[:, : profile.action_dim]
    if profile.joint_signs:
        values *= np.asarray(profile.joint_signs)
    dims = list(profile.aloha_gripper_dims)
    if dims:
        values[:, dims] = aloha_gripper_from_pi(values[:, dims])
    return values.astype(np.float32)


def state_in_action_units(profile: RobotProfile, state: np.ndarray) -> np.ndarray:
    """A measured state [state_dim] in the robot's action units, float64: the command that holds the
    robot where it is, or the reference an action is compared with. ALOHA's gripper dims go from
    finger position to gripper joint (`aloha_gripper_state_to_action`); every other dim is in the
    same units in both (joint signs and delta actions are model-side only)."""
    values = np.array(state, dtype=np.float64)
    if values.shape != (profile.state_dim,):  # NaN passes: the safety filter skips such a reference
        raise ObservationError(f"profile '{profile.name}': expected state of shape ({profile.state_dim},), "
                               f"found {values.shape}")
    dims = list(profile.aloha_gripper_dims)
    if dims:
        values[dims] = aloha_gripper_state_to_action(values[dims])
    return values


def robot_actions_to_model(profile: RobotProfile, actions: np.ndarray, state: np.ndarray) -> np.ndarray:
    """The inverse of `finalize_actions` on the robot's dims: robot actions [H, action_dim] back to
    the model's unnormalized convention (deltas where trained on deltas, pi's gripper angle, signs).
    RTC needs it to express the previous chunk the way the model predicts actions."""
    values = np.array(actions, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] != profile.action_dim:
        raise ObservationError(
            f"profile '{profile.name}': expected actions [H, {profile.action_dim}], found shape {values.shape}")
    reference = _check_state(profile, state)
    dims = list(profile.aloha_gripper_dims)
    if dims:
        values[:, dims] = aloha_gripper_from_pi_inverse(values[:, dims])
    if profile.joint_signs:
        values *= np.asarray(profile.joint_signs)  # ±1: its own inverse
    mask = profile.delta_action_mask  # at most action_dim entries (RobotProfile checks it)
    if mask:
        values[:, : len(mask)] -= _delta_reference(mask, reference)
    return values


def _add_delta_reference(mask: tuple[bool, ...], actions: np.ndarray, state: np.ndarray) -> np.ndarray:
    """openpi AbsoluteActions: actions[:, :n] += where(mask, state[:n], 0), n = len(mask)."""
    if mask:
        actions[:, : len(mask)] += _delta_reference(mask, state)
    return actions


def _delta_reference(mask: tuple[bool, ...], state: np.ndarray) -> np.ndarray:
    """[len(mask)]: the state where the mask is set, else 0. The model-side state is zero-padded,
    so dims past the robot's state add nothing."""
    n = len(mask)
    reference = np.zeros(n)
    reference[: min(n, len(state))] = state[:n]
    return np.where(np.asarray(mask), reference, 0.0)

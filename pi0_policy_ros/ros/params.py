"""The node's parameters: one table of specs, and one function from values to config dataclasses.

ROS-free on purpose (no rclpy import): `node.py` turns each `ParamSpec` into a declared
parameter with a descriptor, and unit tests check the validation without a ROS graph.

Three kinds of parameters:
- configure-time (`configure_time=True`): read in `on_configure`. They may be set only while the
  node is unconfigured (cleanup -> set -> configure), so a failed configure can be fixed without a
  restart. They are not rclpy `read_only`, because read-only ones can never change after start.
- start-up (`read_only=True`): read once when the node starts (`autostart`); rclpy `read_only`,
  so that setting one on a running node is refused instead of accepted and never used.
- dynamic: applied at once, also while active.

Safety limits (`safety_*`, see control/safety.py) are per robot and belong in its parameter file:
one value applies to every action dim, or one value per action dim; an empty list switches the
limit off. `hold_mode` says what a hold sends to the controller (see ros/node.py). The scheduler
parameters (`chunk_mode`, `execute_horizon`, ...) choose how chunks follow each other (see
control/scheduler.py); `naive` runs one inference per tick and sends each chunk as it is.

`load_params_file` reads a ROS parameter YAML the way rcl does for one node, for the tools that
run the node's configuration without ROS (offline replay, demo bags, soak).

Camera parameters are parallel lists: `camera_names[i]` (a camera name of the robot profile) is
read from `camera_topics[i]` (default `<name>/image_raw`, or `<name>/image_raw/compressed` for
compressed) with message type `camera_types[i]` (`raw` = sensor_msgs/Image, `compressed` =
sensor_msgs/CompressedImage; default raw).
"""

from __future__ import annotations

import array
import dataclasses
import difflib
import functools
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import yaml

from pi0_policy_ros.control.config import (
    CAMERA_SKEW_RANGE_S,
    CONTROL_RATE_RANGE_HZ,
    FUTURE_STAMP_RANGE_S,
    OBSERVATION_AGE_RANGE_S,
    ControlConfig,
)
from pi0_policy_ros.control.safety import POLICIES as SAFETY_POLICIES
from pi0_policy_ros.control.safety import SafetyConfig, SafetyFilter
from pi0_policy_ros.control.scheduler import MASK_SCHEDULES, RTC_SCHEDULER_MODES, SCHEDULER_MODES, SchedulerConfig
from pi0_policy_ros.control.observation_buffer import ObservationBuffer
from pi0_policy_ros.control.step import (HOLD_MODES, HOLD_POSITION, ControlStep, Decoder, InferencePolicy,
                                         action_state_indices)
from pi0_policy_ros.errors import ConfigError, echo
from pi0_policy_ros.policy.config import BACKENDS, MAX_CAMERA_SIDE_PX, PRECISIONS, SEED_RANGE, PolicyConfig
from pi0_policy_ros.policy.robots import TRAJECTORY_ACTION_SPACES, state_in_action_units

log = logging.getLogger(__name__)

NODE_NAME = "pi0_policy"
# The launch file's remappings (here, so that the integration tests start nodes with them). Relative,
# as `joint_states` is: under `namespace:=robot1` they are the topics of a ros2_control stack in
# /robot1 (joint_state_broadcaster, joint_trajectory_controller), so that two robots do not share
# them; without a namespace, /joint_states and /joint_trajectory_controller/joint_trajectory.
LAUNCH_REMAPPINGS = (("~/joint_trajectory", "joint_trajectory_controller/joint_trajectory"),)
PARAMS_KEY = "ros__parameters"
CAMERA_TYPES = ("raw", "compressed")
DIAGNOSTICS_PERIOD_RANGE_S = (0.05, 60.0)

# Value kinds, mapped to rclpy parameter types in node.py.
STRING, STRING_ARRAY, DOUBLE, INTEGER, BOOL = "string", "string_array", "double", "integer", "bool"
DOUBLE_ARRAY, INTEGER_ARRAY = "double_array", "integer_array"
ARRAY_KINDS = (STRING_ARRAY, DOUBLE_ARRAY, INTEGER_ARRAY)


@dataclass(frozen=True)
class ParamSpec:
    name: str
    kind: str
    default: Any
    description: str
    configure_time: bool
    float_range: tuple[float, float] | None = None
    int_range: tuple[int, int] | None = None
    choices: tuple[str, ...] | None = None  # for strings, or for every element of a string array
    read_only: bool = False  # read at start-up only: a parameter file, -p or a launch argument sets it


TRAJECTORY_ACTIONS = ("positions", "any")


def publishes_trajectory(trajectory_actions: str, action_space: str) -> bool:
    """Whether the node publishes ~/joint_trajectory for a profile with this action space."""
    return trajectory_actions == "any" or action_space in TRAJECTORY_ACTION_SPACES


PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec("checkpoint_path", STRING, "", "openpi PyTorch or LeRobot checkpoint directory; '' = random "
              "weights at the preset's geometry (demos, benchmarks)", True),
    ParamSpec("model_preset", STRING, "pi05", "model geometry preset, e.g. pi0, pi05, pi05_small", True),
    ParamSpec("robot_profile", STRING, "libero", "robot profile: camera slots, state/action dims", True),
    ParamSpec("asset_id", STRING, "", "norm stats asset id of an openpi checkpoint; '' = the only one", True),
    ParamSpec("tokenizer_path", STRING, "", "SentencePiece model; '' = look in the checkpoint", True),
    ParamSpec("device", STRING, "cpu", "torch device: cpu, cuda or cuda:N", True),
    ParamSpec("backend", STRING, "torch", "inference backend", True, choices=BACKENDS),
    ParamSpec("precision", STRING, "float32", "weights / activation precision", True, choices=PRECISIONS),
    ParamSpec("seed", INTEGER, 0, "seed of the denoising noise (same observation -> same actions)", True,
              int_range=SEED_RANGE),
    ParamSpec("cpu_threads", INTEGER, 0, "torch intra-op threads for CPU inference; 0 = torch's default. "
              "1 is fastest on small machines, where extra threads compete with the executor", True,
              int_range=(0, 256)),
    ParamSpec("profile_state_dim", INTEGER, 0, "robot state dims; 0 = the robot profile's (set it for `generic`)",
              True, int_range=(0, 32)),
    ParamSpec("profile_action_dim", INTEGER, 0, "robot action dims; 0 = the robot profile's (set it for `generic`)",
              True, int_range=(0, 32)),
    ParamSpec("profile_action_horizon", INTEGER, 0, "actions per chunk; 0 = the robot profile's, or for `generic` "
              "the checkpoint's (openpi config.json action_horizon, else 50). LeRobot checkpoints always sample "
              "their chunk_size", True, int_range=(0, 1000)),
    ParamSpec("profile_delta_action_mask", INTEGER_ARRAY, [], "action dims trained as deltas from the state, as "
              "openpi make_bool_mask runs: [6, -1] = 6 delta dims, then 1 absolute (the state is added back to the "
              "delta dims); [] = the robot profile's mask (generic: none); [-n] = none", True),
    ParamSpec("profile_action_period_s", DOUBLE, 0.0, "seconds between actions; 0 = the robot profile's", True,
              float_range=(0.0, 10.0)),
    ParamSpec("switch_interval_s", DOUBLE, 2e-4, "Python's thread switch interval for this process (set at "
              "configure); 0 leaves Python's 5 ms. Short: eager CPU inference gives up the GIL at every "
              "torch op, and with sensor callbacks busy each op would otherwise wait up to the interval",
              True, float_range=(0.0, 0.1)),
    ParamSpec("input_poll_period_s", DOUBLE, 0.002, "period at which one thread takes the camera and "
              "joint_states messages that arrived (ros/poller.py); keep it below 5 / the fastest input rate "
              "(sensor QoS depth 5). 0 = the executor runs one callback per message: far more Python per "
              "message, which at 1 kHz starves CPU inference of the GIL (bench/results/load_cpu.md)", True,
              float_range=(0.0, 0.1)),
    ParamSpec("camera_names", STRING_ARRAY, [], "camera names of the robot profile, one per camera", True),
    ParamSpec("camera_topics", STRING_ARRAY, [], "topic per camera_names entry; [] = <name>/image_raw "
              "(or <name>/image_raw/compressed)", True),
    ParamSpec("camera_types", STRING_ARRAY, [], "message type per camera: raw (sensor_msgs/Image) or "
              "compressed (sensor_msgs/CompressedImage); [] = all raw", True, choices=CAMERA_TYPES),
    ParamSpec("camera_height", INTEGER, 0, "height every camera sends; with camera_width > 0 the frames are "
              "resized with pad inside the engine (on the GPU: no CPU resize) and any other size is refused. "
              "0 = resized to 224x224 on the CPU, any size", True, int_range=(0, MAX_CAMERA_SIDE_PX)),
    ParamSpec("camera_width", INTEGER, 0, "width every camera sends (see camera_height); 0 with camera_height 0",
              True, int_range=(0, MAX_CAMERA_SIDE_PX)),
    ParamSpec("joint_names", STRING_ARRAY, [], "joint_states names, in the profile's state order; "
              "[] = the profile's joint names", True),
    ParamSpec("action_joint_names", STRING_ARRAY, [], "JointTrajectory joint names, one per action dim; "
              "[] = joint_names when the dims match, else the profile's", True),
    ParamSpec("diagnostics_period_s", DOUBLE, 1.0, "period of the /diagnostics status", True,
              float_range=DIAGNOSTICS_PERIOD_RANGE_S),
    ParamSpec("autostart", BOOL, False, "configure and activate on start-up", True, read_only=True),
    ParamSpec("prompt", STRING, "", "task instruction; '' = none: the node holds ('Prompt is required') "
              "until one comes. The ~/prompt topic overrides it until the parameter is set again", False),
    ParamSpec("control_rate_hz", DOUBLE, 10.0, "target rate of inference and command publishing; at least "
              "1 / ((horizon - 1) x action period), since points go out one control period ahead", False,
              float_range=CONTROL_RATE_RANGE_HZ),
    ParamSpec("max_observation_age_s", DOUBLE, 0.5, "hold when any sample used is older than this", False,
              float_range=OBSERVATION_AGE_RANGE_S),
    ParamSpec("max_camera_skew_s", DOUBLE, 0.1, "hold when camera stamps spread wider than this", False,
              float_range=CAMERA_SKEW_RANGE_S),
    ParamSpec("max_future_stamp_s", DOUBLE, 0.1, "reject samples stamped further ahead of our clock", False,
              float_range=FUTURE_STAMP_RANGE_S),
    ParamSpec("hold_mode", STRING, "stop", "what a hold sends: stop = no new trajectory (the controller "
              "finishes the last one and stays at its end point); hold_position = one point at the measured "
              "position, one control period ahead", False, choices=HOLD_MODES),
    ParamSpec("trajectory_actions", STRING, "positions", "which actions go out on ~/joint_trajectory: positions "
              "= only a profile's joint positions (and the generic profile's), never joint velocities or "
              "end-effector deltas, which a joint_trajectory_controller would drive the joints to; any = every "
              "profile's (for an adapter of your own that reads them)", True, choices=TRAJECTORY_ACTIONS),
    # Chunk scheduling (control/scheduler.py).
    ParamSpec("chunk_mode", STRING, "naive", "how chunks follow each other: naive (one inference per tick, each "
              "chunk sent as it is), temporal_ensemble, rtc_fast (guided by the error alone) or rtc (guided "
              "by the true vector-Jacobian product)", True, choices=SCHEDULER_MODES),
    ParamSpec("execute_horizon", INTEGER, 5, "non-naive modes: action periods between inference starts", True,
              int_range=(1, 1000)),
    ParamSpec("rtc_max_guidance_weight", DOUBLE, 5.0, "rtc modes: clip of the guidance weight (beta)", True,
              float_range=(0.0, 1000.0)),
    ParamSpec("rtc_mask_schedule", STRING, "exp", "rtc modes: decay of the soft mask over the overlap", True,
              choices=MASK_SCHEDULES),
    ParamSpec("ensemble_decay", DOUBLE, 0.01, "temporal_ensemble: m of the weights exp(-m i), i = 0 oldest", True,
              float_range=(0.0, 1000.0)),
    ParamSpec("latency_percentile", DOUBLE, 90.0, "the inference delay estimate is this percentile of the "
              "measured latencies", True, float_range=(0.0, 100.0)),
    # Safety limits (control/safety.py), in the robot's action units; [] = off.
    ParamSpec("safety_position_lower", DOUBLE_ARRAY, [], "lower joint position limit: one value or one per "
              "action dim", True),
    ParamSpec("safety_position_upper", DOUBLE_ARRAY, [], "upper joint position limit: one value or one per "
              "action dim", True),
    ParamSpec("safety_max_step", DOUBLE_ARRAY, [], "largest change between consecutive actions (and from the "
              "measured position to the first)", True),
    ParamSpec("safety_max_velocity", DOUBLE_ARRAY, [], "largest |action change| / action period, per second",
              True),
    ParamSpec("safety_gripper_dims", INTEGER_ARRAY, [], "action dims that are grippers", True),
    ParamSpec("safety_gripper_range", DOUBLE_ARRAY, [], "[lower, upper] of the gripper dims", True),
    ParamSpec("safety_position_policy", STRING, "clamp", "position limit: clamp or reject the chunk", True,
              choices=SAFETY_POLICIES),
    ParamSpec("safety_step_policy", STRING, "clamp", "max step: clamp or reject the chunk", True,
              choices=SAFETY_POLICIES),
    ParamSpec("safety_velocity_policy", STRING, "clamp", "max velocity: clamp or reject the chunk", True,
              choices=SAFETY_POLICIES),
    ParamSpec("safety_gripper_policy", STRING, "clamp", "gripper range: clamp or reject the chunk", True,
              choices=SAFETY_POLICIES),
)
SPECS: dict[str, ParamSpec] = {spec.name: spec for spec in PARAMS}
# Parameters every rclpy node has, besides ours.
NODE_PARAMETERS = ("use_sim_time", "start_type_description_service")
# rclpy declares `qos_overrides.<topic>.<entity>.<policy>` only for the policies a publisher or
# subscription names in its QoSOverridingOptions; the node names none (its QoS is fixed, ros/qos.py).
QOS_OVERRIDES_PREFIX = "qos_overrides."


def check_parameter_names(names: Sequence[str], what: str) -> None:
    """ConfigError naming each of `names` that the node does not declare, with the closest declared
    name: rclpy ignores an undeclared parameter without a word, so a mistyped one would silently
    leave its parameter at the default (and a QoS override its topic's QoS unchanged)."""
    unknown = sorted(n for n in set(names) if n not in SPECS and n not in NODE_PARAMETERS)
    if not unknown:
        return
    found = []
    for name in unknown:
        if name.startswith(QOS_OVERRIDES_PREFIX):
            found.append(f"{name!r} (the node takes no QoS overrides: its QoS is fixed, see ros/qos.py)")
            continue
        close = difflib.get_close_matches(name, SPECS, n=1)
        found.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise ConfigError(f"{what}: expected names of the node's parameters, found {', '.join(found)}")


class RobotProfileLike(Protocol):
    """What the node reads of `policy.robots.RobotProfile`.

    Optional attributes, read with defaults: always_valid_slots (slots whose camera is required),
    joint_names (default names of the action dims), action_space.
    """

    name: str
    camera_slots: Any  # Mapping[camera, slot] or ((camera, slot), ...)
    state_dim: int
    action_dim: int
    aloha_gripper_dims: tuple[int, ...]  # state dims measured in other units than the actions (state_in_action_units)


@dataclass(frozen=True)
class CameraConfig:
    name: str
    topic: str
    compressed: bool


@dataclass(frozen=True)
class NodeConfig:
    """Everything the node needs. joint_names / action_joint_names may be empty until `resolve`."""

    policy: PolicyConfig
    control: ControlConfig
    cameras: tuple[CameraConfig, ...]
    joint_names: tuple[str, ...]
    action_joint_names: tuple[str, ...]
    diagnostics_period_s: float
    safety: SafetyConfig = SafetyConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    hold_mode: str = "stop"
    trajectory_actions: str = "positions"
    switch_interval_s: float = 2e-4
    input_poll_period_s: float = 0.002

    def resolve(self, profile: RobotProfileLike) -> "NodeConfig":
        """Fill empty joint names from the loaded policy's profile and check that everything fits it."""
        slots = dict(profile.camera_slots)
        unknown = [c.name for c in self.cameras if c.name not in slots]
        if unknown:
            raise ConfigError(f"camera_names {unknown} are not cameras of profile {profile.name!r}: "
                              f"expected names from {list(slots)}")
        required = [cam for cam, slot in slots.items() if slot in getattr(profile, "always_valid_slots", ())]
        missing = [cam for cam in required if cam not in {c.name for c in self.cameras}]
        if missing:
            raise ConfigError(f"camera_names: profile {profile.name!r} requires cameras {required}, "
                              f"found {[c.name for c in self.cameras]} (missing {missing})")
        profile_joints = tuple(getattr(profile, "joint_names", ()))
        joint_names = self.joint_names or (profile_joints if len(profile_joints) == profile.state_dim else ())
        if len(joint_names) != profile.state_dim:
            raise ConfigError(f"joint_names: profile {profile.name!r} expects {profile.state_dim} state "
                              f"dims, found {len(joint_names)} names {list(joint_names)}")
        action_joint_names = self.action_joint_names or (
            joint_names if len(joint_names) == profile.action_dim else profile_joints)
        if len(action_joint_names) != profile.action_dim:
            raise ConfigError(f"action_joint_names: profile {profile.name!r} expects {profile.action_dim} "
                              f"action dims, found {len(action_joint_names)} names {list(action_joint_names)}")
        return dataclasses.replace(self, joint_names=joint_names, action_joint_names=action_joint_names)

    def unmeasured_action_joints(self, profile: RobotProfileLike, hold_mode: str) -> list[str]:
        """The action joints that have no measured position (not in joint_names) where something needs
        one: the step and velocity limits start from the measured position of each action joint, and
        hold_position holds there. Not an error: a model may act on a joint its state leaves out (a
        gripper), and then those start from the previous action only."""
        uses_measured = bool(self.safety.max_step or self.safety.max_velocity) or hold_mode == HOLD_POSITION
        if not uses_measured or getattr(profile, "action_space", "joint_position") not in TRAJECTORY_ACTION_SPACES:
            return []
        return [name for name in self.action_joint_names if name not in self.joint_names]

    def unmeasured_warning(self, profile: RobotProfileLike, hold_mode: str) -> str:
        """What to warn of `unmeasured_action_joints` ("" when none): at configure, and when hold_mode
        changes to hold_position on the running node."""
        unmeasured = self.unmeasured_action_joints(profile, hold_mode)
        if not unmeasured:
            return ""
        return (f"action_joint_names {echo(unmeasured)} are not among joint_names {list(self.joint_names)} (the "
                "joints read from joint_states): safety_max_step and safety_max_velocity limit only the steps "
                "between a chunk's actions, not the first one from the measured position, and hold_position "
                "holds nothing; check the names for a typo")

    def control_step(self, policy: InferencePolicy, buffer: ObservationBuffer, decoders: Mapping[str, Decoder],
                     safety: SafetyFilter, hold_mode: str) -> ControlStep:
        """The control tick of this (resolved) config: the node and the offline replay build it here,
        so that a replay runs the node's tick. hold_mode is a dynamic parameter: the caller passes its
        value now."""
        profile = policy.profile
        warning = self.unmeasured_warning(profile, hold_mode)
        if warning:
            log.warning(warning)
        return ControlStep(policy, buffer, decoders, safety, self.scheduler,
                           action_state_indices(self.joint_names, self.action_joint_names,
                                                getattr(profile, "action_space", "joint_position")),
                           hold_mode, functools.partial(state_in_action_units, profile),
                           [c.name for c in self.cameras if c.compressed])


# What each kind accepts, as rclpy's declared types do: an integer is not a double, nor a bool an integer.
_KIND_NAMES = {STRING: "a string", BOOL: "true or false", INTEGER: "an integer",
               DOUBLE: "a number with a decimal point (10.0, not 10: ROS refuses an integer for a double)"}
_ELEMENT_KINDS = {STRING_ARRAY: STRING, DOUBLE_ARRAY: DOUBLE, INTEGER_ARRAY: INTEGER}


def _is_kind(kind: str, value: Any) -> bool:
    if kind == INTEGER:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, {STRING: str, BOOL: bool, DOUBLE: float}[kind])


def _check_kind(spec: ParamSpec, value: Any) -> None:
    """ConfigError unless `value` has the parameter's type. rclpy checks this for the node; a
    parameter file read by `load_params_file` or a replay's --param come here unchecked."""
    element = _ELEMENT_KINDS.get(spec.kind)
    if element is None:
        if not _is_kind(spec.kind, value):
            raise ConfigError(f"{spec.name}: expected {_KIND_NAMES[spec.kind]}, found "
                              f"{type(value).__name__} {value!r}")
    elif not isinstance(value, (list, tuple, array.array)) or not all(_is_kind(element, v) for v in value):
        raise ConfigError(f"{spec.name}: expected a list whose entries are each {_KIND_NAMES[element]}, "
                          f"found {type(value).__name__} {value!r}")


def check_value(spec: ParamSpec, value: Any) -> None:
    """Type, choices and ranges (rclpy checks types and numeric ranges itself; the choices it cannot)."""
    _check_kind(spec, value)
    if spec.choices is not None:
        items = value if spec.kind == STRING_ARRAY else [value]
        bad = [v for v in items if v not in spec.choices]
        if bad:
            raise ConfigError(f"{spec.name}: expected values from {list(spec.choices)}, found {echo(bad)}")
    if spec.float_range is not None or spec.int_range is not None:
        lo, hi = spec.float_range or spec.int_range  # type: ignore[misc]
        if not lo <= value <= hi:
            raise ConfigError(f"{spec.name}: expected a value in [{lo}, {hi}], found {value!r}")
    if spec.kind == STRING_ARRAY and len(set(value)) != len(value) and spec.name != "camera_types":
        raise ConfigError(f"{spec.name}: expected unique entries, found {echo(list(value))}")


def control_config_from(values: Mapping[str, Any]) -> ControlConfig:
    return ControlConfig(
        control_rate_hz=float(_get(values, "control_rate_hz")),
        max_observation_age_s=float(_get(values, "max_observation_age_s")),
        max_camera_skew_s=float(_get(values, "max_camera_skew_s")),
        max_future_stamp_s=float(_get(values, "max_future_stamp_s")),
    )


def config_from_params(values: Mapping[str, Any]) -> NodeConfig:
    """Parameter values (name -> value; absent = default) -> validated `NodeConfig`, or ConfigError."""
    for spec in PARAMS:
        check_value(spec, _get(values, spec.name))
    cameras = _cameras(_get(values, "camera_names"), _get(values, "camera_topics"), _get(values, "camera_types"))
    policy = PolicyConfig(
        checkpoint_path=_get(values, "checkpoint_path"),
        model_preset=_get(values, "model_preset"),
        robot_profile=_get(values, "robot_profile"),
        asset_id=_get(values, "asset_id"),
        tokenizer_path=_get(values, "tokenizer_path"),
        default_prompt=_get(values, "prompt"),
        device=_get(values, "device"),
        backend=_get(values, "backend"),
        precision=_get(values, "precision"),
        seed=int(_get(values, "seed")),
        cpu_threads=int(_get(values, "cpu_threads")),
        state_dim=int(_get(values, "profile_state_dim")),
        action_dim=int(_get(values, "profile_action_dim")),
        action_horizon=int(_get(values, "profile_action_horizon")),
        action_period_s=float(_get(values, "profile_action_period_s")),
        delta_action_mask=tuple(int(v) for v in _get(values, "profile_delta_action_mask")),
        camera_height=int(_get(values, "camera_height")),
        camera_width=int(_get(values, "camera_width")),
        # The rtc chunk modes build their guidance into the engine (captured with the chain).
        rtc_mode=_get(values, "chunk_mode") if _get(values, "chunk_mode") in RTC_SCHEDULER_MODES else "off",
        max_guidance_weight=float(_get(values, "rtc_max_guidance_weight")),
        rtc_mask_schedule=_get(values, "rtc_mask_schedule"),
    )
    return NodeConfig(
        policy=policy,
        control=control_config_from(values),
        cameras=cameras,
        joint_names=tuple(_get(values, "joint_names")),
        action_joint_names=tuple(_get(values, "action_joint_names")),
        diagnostics_period_s=float(_get(values, "diagnostics_period_s")),
        safety=safety_config_from(values),
        scheduler=scheduler_config_from(values),
        hold_mode=str(_get(values, "hold_mode")),
        trajectory_actions=str(_get(values, "trajectory_actions")),
        switch_interval_s=float(_get(values, "switch_interval_s")),
        input_poll_period_s=float(_get(values, "input_poll_period_s")),
    )


def safety_config_from(values: Mapping[str, Any]) -> SafetyConfig:
    """The `safety_*` parameters -> SafetyConfig (per-dim sizes are checked against the policy at configure)."""
    try:
        return SafetyConfig(
            position_lower=tuple(float(v) for v in _get(values, "safety_position_lower")),
            position_upper=tuple(float(v) for v in _get(values, "safety_position_upper")),
            max_step=tuple(float(v) for v in _get(values, "safety_max_step")),
            max_velocity=tuple(float(v) for v in _get(values, "safety_max_velocity")),
            gripper_dims=tuple(int(v) for v in _get(values, "safety_gripper_dims")),
            gripper_range=tuple(float(v) for v in _get(values, "safety_gripper_range")),
            position_policy=_get(values, "safety_position_policy"),
            step_policy=_get(values, "safety_step_policy"),
            velocity_policy=_get(values, "safety_velocity_policy"),
            gripper_policy=_get(values, "safety_gripper_policy"),
        )
    except ValueError as exc:
        raise safety_parameter_error(exc) from None


# A SafetyConfig field, as a word (not inside its parameter's name): `safety_<field>` is its parameter.
_SAFETY_FIELD = re.compile(r"\b(" + "|".join(f.name for f in dataclasses.fields(SafetyConfig)) + r")\b")


def safety_parameter_error(exc: ValueError) -> ConfigError:
    """A refusal of SafetyConfig or SafetyFilter (control/, ROS-free: it names its fields, `max_step`)
    naming the parameters the user sets instead (`safety_max_step`)."""
    return ConfigError(_SAFETY_FIELD.sub(r"safety_\1", str(exc)))


def scheduler_config_from(values: Mapping[str, Any]) -> SchedulerConfig:
    return SchedulerConfig(
        mode=_get(values, "chunk_mode"),
        execute_horizon=int(_get(values, "execute_horizon")),
        max_guidance_weight=float(_get(values, "rtc_max_guidance_weight")),
        mask_schedule=_get(values, "rtc_mask_schedule"),
        ensemble_decay=float(_get(values, "ensemble_decay")),
        latency_percentile=float(_get(values, "latency_percentile")),
    )


def _cameras(names: Sequence[str], topics: Sequence[str], types: Sequence[str]) -> tuple[CameraConfig, ...]:
    if not names:
        raise ConfigError("camera_names: expected at least one camera of the robot profile, found []")
    for param, values in (("camera_topics", topics), ("camera_types", types)):
        if values and len(values) != len(names):
            raise ConfigError(f"{param}: expected one entry per camera_names entry ({len(names)}) or [], "
                              f"found {len(values)}")
    types = list(types) or ["raw"] * len(names)
    out = []
    for i, name in enumerate(names):
        compressed = types[i] == "compressed"
        topic = topics[i] if topics else f"{name}/image_raw" + ("/compressed" if compressed else "")
        if not topic:
            raise ConfigError(f"camera_topics[{i}] for camera {name!r}: expected a topic name, found ''")
        out.append(CameraConfig(name=name, topic=topic, compressed=compressed))
    return tuple(out)


def _get(values: Mapping[str, Any], name: str) -> Any:
    value = values.get(name)
    return SPECS[name].default if value is None else value


# ---- parameter files -------------------------------------------------------------------------


def resolve_topic(name: str, namespace: str = "/", node_name: str = NODE_NAME) -> str:
    """A topic name as rcl resolves it for node `<namespace>/<node_name>`: `/a` stays, `~/a` is
    `<namespace>/<node_name>/a`, `a` is `<namespace>/a`."""
    ns = "/" + namespace.strip("/") if namespace.strip("/") else ""
    if name.startswith("/"):
        resolved = name
    elif name.startswith("~"):
        resolved = f"{ns}/{node_name}/{name[1:].lstrip('/')}"
    else:
        resolved = f"{ns}/{name}"
    return re.sub("/+", "/", resolved).rstrip("/") or "/"


def diagnostics_status_name(node_fqn: str, task: str = "control") -> str:
    """The node's status name on /diagnostics: `robot1/pi0_policy: control` (`pi0_policy: control` at the
    root). With the namespace, as diagnostic_updater's `use_fqn`: diagnostic_aggregator and
    rqt_robot_monitor key statuses by name, and two robots' nodes of one name would be one entry."""
    return f"{node_fqn.lstrip('/')}: {task}"


# A block's node key, token by token between slashes, as rcl's parameter file parser takes it:
# `**` = any number of tokens (none included), `*` = exactly one, anything else a ROS name token.
WILDCARD_TOKENS = ("*", "**")
NAME_TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# A fully resolved topic name as rmw_validate_full_topic_name takes it, and its length limit
# (RMW_TOPIC_MAX_NAME_LENGTH: 255 less the DDS prefix rmw adds).
FULL_TOPIC_NAME = re.compile(r"(/[A-Za-z_][A-Za-z0-9_]*)+\Z")
MAX_TOPIC_NAME_LENGTH = 255 - 8
ROS_NAME_RULE = "names of letters, digits and '_', not starting with a digit"


def node_namespace(namespace: str) -> str:
    """The namespace as `-r __ns:=` must give it to rcl, absolute and without a trailing '/'
    (`robot1` and `/robot1/` are `/robot1`, as launch_ros makes them). ConfigError for one that rmw
    refuses: the node would not start, and no topic in it could be published or subscribed."""
    normalized = "/" + namespace.strip("/")
    if normalized != "/" and not FULL_TOPIC_NAME.match(normalized):
        raise ConfigError(f"namespace {namespace!r}: expected '/' or {ROS_NAME_RULE}, separated by '/' "
                          f"(/robot1, /fleet/robot1), found {namespace!r}")
    return normalized


def check_node_name(node_name: str) -> None:
    if not NAME_TOKEN.match(node_name):
        raise ConfigError(f"node name {node_name!r}: expected one name of letters, digits and '_', not starting "
                          f"with a digit (pi0_policy), found {node_name!r}")


def check_topic_name(resolved: str, what: str) -> None:
    """ConfigError unless `resolved` (a `resolve_topic` result) is a topic name that rmw accepts."""
    if not (FULL_TOPIC_NAME.match(resolved) and len(resolved) <= MAX_TOPIC_NAME_LENGTH):
        raise ConfigError(f"{what}: expected a topic name ROS accepts ({ROS_NAME_RULE}, separated by '/', "
                          f"at most {MAX_TOPIC_NAME_LENGTH} characters resolved), found {resolved!r}")


def _check_node_key(pattern: str, path: Path) -> None:
    """ConfigError for a node key rcl refuses: a token other than `*`, `**` or a ROS name (letters,
    digits and '_', not starting with a digit: `/robot*/pi0_policy`, `/robot-1/pi0_policy`,
    `/2d/pi0_policy`), or an empty one (`//`). rcl's parser validates each namespace token and the
    node name with rmw's rules, and one bad key fails the whole file and the node with it
    (rcl_yaml_param_parser parse.c `_validate_name`)."""
    for token in pattern.strip("/").split("/"):
        if token not in WILDCARD_TOKENS and not NAME_TOKEN.match(token):
            raise ConfigError(f"params file {path}, block {pattern}: expected every token of the node key to be '*', "
                              f"'**' (whole tokens only: /**/pi0_policy, /robot1/*) or a ROS name (letters, digits "
                              f"and '_', not starting with a digit), found {token!r}; rcl refuses the whole file "
                              "for it")


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A node key (checked by `_check_node_key`) as rclpy matches it against a fully qualified name."""
    parts = []
    for token in pattern.strip("/").split("/"):
        if token == "**":
            parts.append("(?:/[^/]+)*")
        elif token == "*":
            parts.append("/[^/]+")
        else:
            parts.append("/" + re.escape(token))
    return re.compile("".join(parts) + r"\Z")


def _node_sections(tree: Any, prefix: str = "") -> list[tuple[str, dict[str, Any]]]:
    """(node pattern, parameters) for every `ros__parameters` block, in file order; namespaces may
    be nested mappings (`ns: {node: {ros__parameters: ...}}`) or slash-joined keys."""
    sections: list[tuple[str, dict[str, Any]]] = []
    if not isinstance(tree, dict):
        return sections
    for key, value in tree.items():
        if key == PARAMS_KEY:
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix or '/'}: expected a mapping under {PARAMS_KEY}, found {value!r}")
            sections.append((prefix or "/", _flatten(value)))
        else:
            sections.extend(_node_sections(value, f"{prefix}/{str(key).strip('/')}"))
    return sections


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested parameter mappings become dotted names, as rcl reads them."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


class NoBlockForNode(ConfigError):
    """A parameter file that gives the node no parameters: rcl skips it without a word."""


def yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's error in one line, what and where (its own message quotes the text with carets over
    several lines): "expected ',' or ']', but got '}' at line 2, column 26, while parsing a flow sequence"."""
    problem, mark = getattr(exc, "problem", None), getattr(exc, "problem_mark", None)
    if problem is None:
        return " ".join(str(exc).split())
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    context = getattr(exc, "context", None)
    return f"{problem}{where}" + (f", {context}" if context else "")


def load_params_file(path: str | Path, namespace: str = "/", node_name: str = NODE_NAME) -> dict[str, Any]:
    """The parameters a ROS parameter file gives node `<namespace>/<node_name>` (later blocks win).
    ConfigError for a name the node does not declare in a block that names the node; NoBlockForNode
    when no block applies to the node."""
    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"params file {path}: cannot read it: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"params file {path}: expected ROS parameter YAML, found invalid YAML "
                          f"({yaml_problem(exc)})") from None
    fqn = resolve_topic(node_name, namespace)
    sections = _node_sections(tree)
    if not sections:
        raise NoBlockForNode(f"params file {path}: expected '<node>: {{{PARAMS_KEY}: ...}}' blocks, found none")
    for pattern, _ in sections:  # every block: rcl refuses the file, not only the block for this node
        _check_node_key(pattern, path)
    values: dict[str, Any] = {}
    matched = False
    for pattern, params in sections:
        if _pattern_regex(pattern).match(fqn):
            values.update(params)
            matched = True
            # A block that names this node holds its parameters only; a wildcard block (`/**`)
            # may also hold other nodes' parameters.
            if pattern.rstrip("/").rsplit("/", 1)[-1] == node_name:
                check_parameter_names(list(params), f"params file {path}, block {pattern}")
    if not matched:
        raise NoBlockForNode(f"params file {path}: no block applies to node {fqn}; found blocks for "
                          f"{[pattern for pattern, _ in sections]}")
    return values

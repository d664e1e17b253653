"""The pi0 / pi0.5 policy as an rclpy lifecycle node (glue only: the logic lives in control/ and policy/).

Lifecycle:
- configure: parameters -> `NodeConfig` (`config_from_params`), load the policy, check it
  against the parameters, one warm-up inference, then subscriptions and publishers. Any failure
  returns FAILURE with the reason logged, frees what was built, and leaves the node unconfigured,
  so that it can be configured again once the parameter is fixed.
- activate: start the control timer. deactivate: stop it; no command goes out while inactive.
- cleanup / shutdown / error: `_release()` (idempotent) closes the policy and destroys entities.

Topics (relative names resolve in the node's namespace; remap them in the launch file):
- subscribed: one per camera (`camera_topics`, Image or CompressedImage, sensor-data QoS),
  `joint_states` (JointState, mapped by name), `~/prompt` (String).
- published, once per successful control tick and in this order:
  1. `~/action_chunk_stamp` (std_msgs/Header): `stamp` = the observation stamp of the chunk,
     `frame_id` = the chunk's sequence number (decimal, from 0 at each activation);
  2. `~/action_chunk` (std_msgs/Float32MultiArray): the whole chunk [horizon, action], dims
     `horizon` / `action`, data_offset 0. It has no header: pair the n-th chunk with the n-th
     stamp (both reliable, depth 10, published back to back from one thread);
  3. `~/joint_trajectory` (trajectory_msgs/JointTrajectory) for joint_trajectory_controller:
     header stamp zero, past points dropped, first point >= one control period ahead.
- `/diagnostics` (DiagnosticArray) every `diagnostics_period_s` from configure to cleanup.

A tick that cannot act (stale or missing observation, bad input, inference error, expired chunk)
holds: it publishes nothing, logs (throttled) and reports the reason in /diagnostics. The timer
sits in its own mutually exclusive callback group, so a slow inference skips ticks instead of
queueing them.
"""

from __future__ import annotations

import functools
import threading
import time
from typing import Any, Callable, Protocol

import numpy as np
import rclpy
from rcl_interfaces.msg import (
    FloatingPointRange,
    IntegerRange,
    ParameterDescriptor,
    ParameterType,
    SetParametersResult,
)
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.exceptions import (
    InvalidParameterTypeException,
    InvalidParameterValueException,
    ParameterUninitializedException,
)
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.timer import Timer
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import Float32MultiArray, Header, String
from trajectory_msgs.msg import JointTrajectory

from pi0_policy_ros.control.monitor import ERROR, WARN, ControlMonitor
from pi0_policy_ros.control.observation_buffer import ObservationBuffer
from pi0_policy_ros.control.trajectory import expired_reason, plan_trajectory
from pi0_policy_ros.errors import ConfigError, ObservationError, Pi0PolicyError
from pi0_policy_ros.policy.config import PolicyConfig
from pi0_policy_ros.policy.types import ActionChunk, Observation
from pi0_policy_ros.ros import convert
from pi0_policy_ros.ros.diagnostics import DiagnosticsPublisher
from pi0_policy_ros.ros.params import (
    BOOL,
    DOUBLE,
    INTEGER,
    PARAMS,
    SPECS,
    STRING,
    STRING_ARRAY,
    NodeConfig,
    ParamSpec,
    RobotProfileLike,
    check_value,
    config_from_params,
    control_config_from,
)
from pi0_policy_ros.ros.qos import CHUNK_QOS, COMMAND_QOS, PROMPT_QOS, SENSOR_QOS

NODE_NAME = "pi0_policy"
LOG_THROTTLE_S = 2.0
WARMUP_IMAGE_SHAPE = (224, 224, 3)

_PARAM_TYPES = {
    STRING: ParameterType.PARAMETER_STRING,
    STRING_ARRAY: ParameterType.PARAMETER_STRING_ARRAY,
    DOUBLE: ParameterType.PARAMETER_DOUBLE,
    INTEGER: ParameterType.PARAMETER_INTEGER,
    BOOL: ParameterType.PARAMETER_BOOL,
}


class PolicyLike(Protocol):
    profile: RobotProfileLike

    def infer(self, observation: Observation) -> ActionChunk: ...

    def close(self) -> None: ...


PolicyFactory = Callable[[PolicyConfig], PolicyLike]


def load_policy(config: PolicyConfig) -> PolicyLike:
    """The default factory; imported lazily so that this module loads without torch."""
    from pi0_policy_ros.policy.policy import Policy

    return Policy.from_config(config)


def _descriptor(spec: ParamSpec) -> ParameterDescriptor:
    when = "configure-time (set while unconfigured)" if spec.configure_time else "dynamic"
    constraints = [when]
    if spec.choices:
        constraints.append(f"one of {list(spec.choices)}")
    descriptor = ParameterDescriptor(
        name=spec.name, type=_PARAM_TYPES[spec.kind], description=spec.description,
        additional_constraints="; ".join(constraints))
    if spec.float_range:
        descriptor.floating_point_range = [FloatingPointRange(from_value=spec.float_range[0],
                                                              to_value=spec.float_range[1])]
    if spec.int_range:
        descriptor.integer_range = [IntegerRange(from_value=spec.int_range[0], to_value=spec.int_range[1], step=1)]
    return descriptor


class PolicyNode(LifecycleNode):
    """Lifecycle node running a `PolicyLike` at `control_rate_hz`.

    policy_factory: builds the policy at configure (default `load_policy`); tests inject fakes.
    Other keyword arguments go to rclpy's Node (namespace, parameter_overrides, cli_args, ...).
    """

    def __init__(self, node_name: str = NODE_NAME, *, policy_factory: PolicyFactory | None = None,
                 **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        self._policy_factory: PolicyFactory = policy_factory or load_policy
        # Overrides (YAML, launch) that rclpy refused at declaration: configure fails until they are fixed.
        self._bad_overrides: dict[str, str] = {}
        for spec in PARAMS:
            self._declare(spec)
        self.add_on_set_parameters_callback(self._validate_parameters)
        self.add_post_set_parameters_callback(self._apply_parameters)

        self._sensor_group = MutuallyExclusiveCallbackGroup()
        self._control_group = MutuallyExclusiveCallbackGroup()
        # Held by a control tick and by transitions, so that deactivate/cleanup wait for an
        # in-flight inference and no tick publishes after deactivate returns.
        self._lock = threading.Lock()
        self._config: NodeConfig | None = None
        self._policy: PolicyLike | None = None
        self._buffer: ObservationBuffer | None = None
        self._monitor: ControlMonitor | None = None
        self._diagnostics: DiagnosticsPublisher | None = None
        self._subscriptions_: list[Any] = []
        self._trajectory_pub: Any = None
        self._chunk_pub: Any = None
        self._stamp_pub: Any = None
        self._control_timer: Timer | None = None
        self._diagnostics_timer: Timer | None = None
        self._sequence = 0
        self._prompt: str | None = self.get_parameter("prompt").value or None
        self._autostart_timer: Timer | None = None
        if self.get_parameter("autostart").value:
            self._autostart_timer = self.create_timer(0.0, self._autostart)

    # ---- parameters -------------------------------------------------------------------------

    def _declare(self, spec: ParamSpec) -> None:
        descriptor = _descriptor(spec)
        # rclpy infers BYTE_ARRAY from an empty list, so empty arrays are declared by type.
        default = Parameter.Type.STRING_ARRAY if spec.kind == STRING_ARRAY and not spec.default else spec.default
        try:
            self.declare_parameter(spec.name, default, descriptor)
        except (InvalidParameterValueException, InvalidParameterTypeException) as exc:
            self.declare_parameter(spec.name, default, descriptor, ignore_override=True)
            self._bad_overrides[spec.name] = str(exc)
            self.get_logger().error(f"parameter {spec.name}: {exc}; configure will fail until it is set")

    def parameter_values(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for spec in PARAMS:
            try:
                values[spec.name] = self.get_parameter(spec.name).value
            except ParameterUninitializedException:
                values[spec.name] = spec.default
        return values

    def _validate_parameters(self, params: list[Parameter]) -> SetParametersResult:
        configured = self._config is not None
        updates: dict[str, Any] = {}
        for param in params:
            spec = SPECS.get(param.name)
            if spec is None:
                continue
            if spec.configure_time and configured:
                return SetParametersResult(successful=False, reason=(
                    f"{param.name} is a configure-time parameter: expected the node unconfigured, "
                    "found it configured (cleanup, set, then configure)"))
            try:
                check_value(spec, param.value)
            except ConfigError as exc:
                return SetParametersResult(successful=False, reason=str(exc))
            updates[param.name] = param.value
        try:
            control_config_from({**self.parameter_values(), **updates})
        except ConfigError as exc:
            return SetParametersResult(successful=False, reason=str(exc))
        return SetParametersResult(successful=True)

    def _apply_parameters(self, params: list[Parameter]) -> None:
        names = {p.name for p in params}
        for name in names:
            self._bad_overrides.pop(name, None)
        if "prompt" in names:
            self._set_prompt(self.get_parameter("prompt").value)
        if names & {"control_rate_hz", "max_observation_age_s", "max_camera_skew_s", "max_future_stamp_s"}:
            control = control_config_from(self.parameter_values())
            buffer, monitor, timer = self._buffer, self._monitor, self._control_timer
            if buffer is not None:
                buffer.config = control
            if monitor is not None:
                monitor.control_rate_hz = control.control_rate_hz
            if timer is not None:
                timer.timer_period_ns = int(round(control.control_period_s * 1e9))

    def _set_prompt(self, prompt: str) -> None:
        self._prompt = prompt or None
        if self._buffer is not None:
            self._buffer.put_prompt(self._prompt)

    # ---- lifecycle --------------------------------------------------------------------------

    def _autostart(self) -> None:
        if self._autostart_timer is not None:
            self.destroy_timer(self._autostart_timer)
            self._autostart_timer = None
        if self.trigger_configure() == TransitionCallbackReturn.SUCCESS:
            self.trigger_activate()

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        """SUCCESS once the policy is loaded and warmed up; FAILURE (reason logged) otherwise."""
        try:
            self._configure()
        except Exception as exc:  # noqa: BLE001 - any load failure is a FAILURE, never a dead process
            self.get_logger().error(f"configure failed: {exc}")
            self._release()
            return TransitionCallbackReturn.FAILURE
        self.get_logger().info(
            f"configured: profile {self._config.policy.robot_profile!r}, cameras "
            f"{[c.name for c in self._config.cameras]}, {self._config.control.control_rate_hz} Hz")
        return TransitionCallbackReturn.SUCCESS

    def _configure(self) -> None:
        if self._bad_overrides:
            raise ConfigError("; ".join(self._bad_overrides.values()))
        config = config_from_params(self.parameter_values())
        policy = self._policy_factory(config.policy)
        self._policy = policy  # owned from here on, so that _release() closes it on failure
        config = config.resolve(policy.profile)
        action_space = getattr(policy.profile, "action_space", "joint_position")
        if action_space != "joint_position":
            self.get_logger().warning(
                f"profile {policy.profile.name!r} predicts {action_space} actions: ~/joint_trajectory "
                "positions carry them as they are; a robot that needs joint positions should consume "
                "~/action_chunk through its own adapter")
        self._warm_up(policy, config)

        self._buffer = ObservationBuffer([c.name for c in config.cameras], config.control)
        self._buffer.put_prompt(self._prompt)
        self._monitor = ControlMonitor(config.control.control_rate_hz)
        for camera in config.cameras:
            msg_type = CompressedImage if camera.compressed else Image
            self._subscriptions_.append(self.create_subscription(
                msg_type, camera.topic, functools.partial(self._on_image, camera.name), SENSOR_QOS,
                callback_group=self._sensor_group))
        self._subscriptions_.append(self.create_subscription(
            JointState, "joint_states", self._on_joint_state, SENSOR_QOS, callback_group=self._sensor_group))
        self._subscriptions_.append(self.create_subscription(
            String, "~/prompt", self._on_prompt, PROMPT_QOS, callback_group=self._sensor_group))
        self._stamp_pub = self.create_lifecycle_publisher(Header, "~/action_chunk_stamp", CHUNK_QOS)
        self._chunk_pub = self.create_lifecycle_publisher(Float32MultiArray, "~/action_chunk", CHUNK_QOS)
        self._trajectory_pub = self.create_lifecycle_publisher(JointTrajectory, "~/joint_trajectory", COMMAND_QOS)
        self._diagnostics = DiagnosticsPublisher(self)
        self._diagnostics_timer = self.create_timer(
            config.diagnostics_period_s, self._publish_diagnostics, callback_group=self._sensor_group)
        self._config = config

    def _warm_up(self, policy: PolicyLike, config: NodeConfig) -> None:
        """One inference on a black frame per camera: fails configure early, and pays first-call costs now."""
        images = {c.name: np.zeros(WARMUP_IMAGE_SHAPE, np.uint8) for c in config.cameras}
        state = np.zeros(len(config.joint_names), np.float64)
        chunk = policy.infer(Observation(images=images, state=state, prompt=self._prompt, stamp_s=0.0))
        width = chunk.actions.shape[1] if chunk.actions.ndim == 2 else None
        if width != len(config.action_joint_names):
            raise ConfigError(f"warm-up: expected actions [H, {len(config.action_joint_names)}] for "
                              f"action_joint_names, found shape {chunk.actions.shape}")

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        result = super().on_activate(state)  # enables the lifecycle publishers before the first tick
        if result != TransitionCallbackReturn.SUCCESS:
            return result
        with self._lock:
            assert self._config is not None and self._buffer is not None and self._monitor is not None
            self._buffer.reset()
            self._monitor.start(time.perf_counter())
            self._sequence = 0
            self._control_timer = self.create_timer(
                self._buffer.config.control_period_s, self._on_control_tick, callback_group=self._control_group)
        self.get_logger().info("activated")
        return result

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        with self._lock:  # waits for an in-flight tick
            self._stop_control()
        self.get_logger().info("deactivated")
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def _stop_control(self) -> None:
        if self._control_timer is not None:
            self.destroy_timer(self._control_timer)
            self._control_timer = None
        if self._monitor is not None:
            self._monitor.stop()

    def _release(self) -> None:
        """Free everything configure built; safe to call in any state, any number of times."""
        with self._lock:
            self._stop_control()
            if self._diagnostics_timer is not None:
                self.destroy_timer(self._diagnostics_timer)
                self._diagnostics_timer = None
            for sub in self._subscriptions_:
                self.destroy_subscription(sub)
            self._subscriptions_.clear()
            for name in ("_stamp_pub", "_chunk_pub", "_trajectory_pub"):
                pub = getattr(self, name)
                if pub is not None:
                    self.destroy_lifecycle_publisher(pub)
                    setattr(self, name, None)
            if self._diagnostics is not None:
                self._diagnostics.destroy()
                self._diagnostics = None
            policy, self._policy = self._policy, None
            self._config = None
            self._buffer = None
            self._monitor = None
        if policy is not None:
            try:
                policy.close()
            except Exception as exc:  # noqa: BLE001 - cleanup must finish; the reason is logged
                self.get_logger().error(f"policy.close() failed: {exc}")

    # ---- sensor callbacks: store only --------------------------------------------------------

    def _now_s(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def _on_image(self, camera: str, msg: Image | CompressedImage) -> None:
        buffer = self._buffer
        if buffer is None:
            return
        try:
            # Decoding waits for the control tick: most frames are never used.
            buffer.put_image(camera, msg, convert.stamp_to_seconds(msg.header.stamp), self._now_s())
        except ObservationError as exc:
            self._input_rejected(f"camera {camera!r}: {exc}")

    def _on_joint_state(self, msg: JointState) -> None:
        buffer, config = self._buffer, self._config
        if buffer is None or config is None:
            return
        try:
            state = convert.joint_positions(msg, config.joint_names)
            buffer.put_state(state, convert.stamp_to_seconds(msg.header.stamp), self._now_s())
        except ObservationError as exc:
            self._input_rejected(str(exc))

    def _on_prompt(self, msg: String) -> None:
        self._set_prompt(msg.data)

    def _input_rejected(self, reason: str) -> None:
        monitor = self._monitor
        if monitor is not None:
            monitor.input_rejected(reason)
        self.get_logger().warning(f"input rejected: {reason}", throttle_duration_sec=LOG_THROTTLE_S)

    # ---- control loop -----------------------------------------------------------------------

    def _on_control_tick(self) -> None:
        # Timer callbacks never raise: anything unexpected holds and is reported as an ERROR.
        try:
            with self._lock:
                if self._control_timer is not None:
                    self._control_step()
        except Exception as exc:  # noqa: BLE001
            self._hold(f"internal error: {exc!r}", ERROR)

    def _hold(self, reason: str, level: int = WARN) -> None:
        monitor = self._monitor
        if monitor is not None:
            monitor.held(reason, level)
        log = self.get_logger().error if level == ERROR else self.get_logger().warning
        log(f"holding: {reason}", throttle_duration_sec=LOG_THROTTLE_S)

    def _control_step(self) -> None:
        config, policy, buffer, monitor = self._config, self._policy, self._buffer, self._monitor
        assert config is not None and policy is not None and buffer is not None and monitor is not None
        t0 = time.perf_counter()
        monitor.tick_started(t0)
        try:
            snapshot = buffer.snapshot(self._now_s())
            images = {c.name: self._decode(c.compressed, snapshot.images[c.name]) for c in config.cameras}
        except ObservationError as exc:
            self._hold(str(exc))
            return
        t_decoded = time.perf_counter()
        observation = Observation(images=images, state=snapshot.state, prompt=snapshot.prompt,
                                  stamp_s=snapshot.stamp_s)
        try:
            chunk = policy.infer(observation)
        except ObservationError as exc:
            self._hold(f"policy refused the observation: {exc}")
            return
        except Exception as exc:  # noqa: BLE001 - a failed inference holds; the node stays up
            self._hold(f"inference failed: {exc!r}", ERROR)
            return
        t_inferred = time.perf_counter()

        now_s = self._now_s()
        min_lead_s = buffer.config.control_period_s
        try:
            plan = plan_trajectory(chunk.actions, chunk.period_s, chunk.stamp_s, now_s, min_lead_s)
        except Pi0PolicyError as exc:
            self._hold(f"unusable chunk: {exc}", ERROR)
            return
        if plan.empty:
            self._hold(expired_reason(chunk.horizon, chunk.period_s, chunk.stamp_s, now_s, min_lead_s))
            return
        trajectory = convert.trajectory_message(plan, config.action_joint_names)

        self._stamp_pub.publish(Header(stamp=convert.seconds_to_stamp(chunk.stamp_s), frame_id=str(self._sequence)))
        self._chunk_pub.publish(convert.action_chunk_message(chunk.actions))
        self._trajectory_pub.publish(trajectory)
        self._sequence += 1
        t_done = time.perf_counter()
        timings = {f"policy_{k}": v for k, v in chunk.timings_ms.items()}
        timings.update(decode=(t_decoded - t0) * 1e3, infer=(t_inferred - t_decoded) * 1e3,
                       tick=(t_done - t0) * 1e3, observation_to_publish=(self._now_s() - chunk.stamp_s) * 1e3)
        monitor.published(t_done, timings, snapshot.age_s, snapshot.camera_skew_s)

    @staticmethod
    def _decode(compressed: bool, msg: Any) -> np.ndarray:
        return convert.compressed_image_to_rgb(msg) if compressed else convert.image_to_rgb(msg)

    def _publish_diagnostics(self) -> None:
        monitor, diagnostics = self._monitor, self._diagnostics
        if monitor is not None and diagnostics is not None:
            diagnostics.publish(monitor.report(time.perf_counter()))

    # ---- introspection (tests, demo) --------------------------------------------------------

    @property
    def config(self) -> NodeConfig | None:
        return self._config

    @property
    def policy(self) -> PolicyLike | None:
        return self._policy


def main(args: list[str] | None = None) -> None:
    rclpy.init(args=args)
    node: PolicyNode | None = None
    try:
        node = PolicyNode()
        executor = MultiThreadedExecutor(num_threads=4)
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            node._release()
            node.destroy_node()
        rclpy.try_shutdown()

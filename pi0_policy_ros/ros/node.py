"""The pi0 / pi0.5 policy as an rclpy lifecycle node (glue only: the logic lives in control/ and policy/).

Lifecycle:
- configure: parameters -> `NodeConfig` (`config_from_params`), load the policy, check it
  against the parameters, one warm-up inference, the safety filter and the chunk scheduler, then
  subscriptions and publishers. Any failure returns FAILURE, frees what was built, and leaves the
  node unconfigured, so that it can be configured again once the parameter is fixed. The reason
  is logged and published on /diagnostics (level ERROR, "configure failed: <reason>").
- activate: start the control timer. deactivate: stop it; no command goes out while inactive
  (with `hold_mode: hold_position`, the hold point goes out first: see Holds).
- cleanup / shutdown / error: `_release()` (idempotent) closes the control step (its decode threads)
  and the policy and destroys entities.
  Before the trajectory publisher goes, it waits (at most FLUSH_TIMEOUT_S) until every matched
  reliable subscriber has acknowledged the hold point: DDS drops what a deleted writer had not
  delivered. `destroy_node()` does the same for the last /diagnostics status (shutdown, a failed
  transition). A subscriber that does not acknowledge in time is named in a WARN. The chunk
  topics are not waited for: a depth-10 writer is acknowledged only at its 3 s heartbeat
  (ros/qos.py), and a chunk is not a command.
- A transition callback that raises (a bug): rclpy would turn it into ERROR without a word. The
  exception is logged at ERROR ("<transition> failed: <type>: <message>"), on_error releases
  everything and publishes a last /diagnostics status with that text (level ERROR); the node is
  then unconfigured (finalized if releasing fails too).

Topics (relative names resolve in the node's namespace; remap them in the launch file):
- subscribed: one per camera (`camera_topics`, Image or CompressedImage, sensor-data QoS),
  `joint_states` (JointState, mapped by name; each message must carry every joint of
  `joint_names`: partial ones, arm and gripper published apart, are refused, not merged),
  `~/prompt` (String; subscribed in every state, from the node's start). Cameras and
  joint_states are taken serialized (`raw`) by one polling thread every `input_poll_period_s`
  (2 ms; ros/poller.py), not by the executor, whose Python cost per message starved CPU
  inference of the GIL at 1 kHz: a camera callback reads only the header stamp (frames are
  read, in place where their bytes are plain (convert.image_fields_from_cdr), and decoded when a
  tick uses them), a joint_states callback checks every message (convert.JointStateReader). A refused message is counted
  (`input_errors.<source>`, `last_input_error`) and logged ("input rejected: <reason>", naming
  what was expected) at most once every LOG_THROTTLE_S (2 s) per source (each camera,
  joint_states), so that one source that keeps failing does not hide another.
- published, once per chunk and in this order:
  1. `~/action_chunk_stamp` (std_msgs/Header): `stamp` = the observation stamp of the chunk,
     `frame_id` = the chunk's sequence number (decimal, from 0 at each activation);
  2. `~/action_chunk` (std_msgs/Float32MultiArray): the whole chunk [horizon, action] after the
     safety filter, dims `horizon` / `action`, data_offset 0. It has no header: pair the n-th
     chunk with the n-th stamp (both reliable, depth 10, published back to back from one thread);
  3. `~/joint_trajectory` (trajectory_msgs/JointTrajectory) for joint_trajectory_controller:
     header stamp zero, past points dropped, first point >= one control period ahead. Not
     published (not even advertised) when the profile's actions are joint velocities or
     end-effector deltas, which a controller would take for joint positions, unless
     `trajectory_actions: any`.
- `/diagnostics` (DiagnosticArray) every `diagnostics_period_s` of wall time (a steady clock, also
  under `use_sim_time`) from configure to cleanup, stamped with the node's clock, once
  at cleanup ("cleaned up", level OK), once after a failed configure or a transition that raised;
  a last one ("shut down", level OK) at shutdown, which `main()` also runs on SIGINT and SIGTERM.
  A signal while a transition runs (configure loading or warming up) waits for it to end first
  (configure stops at its next step); a second signal then ends the process at once, exit code 1,
  with nothing shut down.
  While `use_sim_time` is true and the node's time is still 0 (nobody publishes /clock: a bag
  played without --clock), the periodic status is WARN, WAITING_FOR_CLOCK, logged once too; its
  stamp is then 0, the node's time, so that the stamps never jump back when /clock starts.
  A node time that later stands still for CLOCK_STALL_S of wall time (simulation paused, /clock
  gone) makes the status WARN "sim time stopped ...", until it advances again.

The control tick (control/step.py, shared with the offline replay): snapshot -> decode ->
`Policy.infer` -> safety filter -> scheduler / trajectory plan. Times come from the node's clock
(sim time under `use_sim_time`). A clock that jumps backwards (simulation reset) clears the
observation buffers and the schedule; samples stamped before the jump are refused until then.

Chunk modes (`chunk_mode`, control/scheduler.py):
- `naive` (default): one inference per tick; each chunk goes out as it is, its points that are
  less than one control period ahead dropped.
- `temporal_ensemble`: an inference every `execute_horizon` action periods; the trajectory is the
  ACT-weighted average (`ensemble_decay`) of every chunk covering each time.
- `rtc_fast`, `rtc`: an inference every `execute_horizon` action periods; each one is guided toward
  the actions the previous chunk will still execute (real-time chunking: the scheduler's previous
  actions, the predicted delay d as the frozen prefix; the guidance is captured with the engine's
  denoise chain, `engine/guidance.py`), and the new chunk replaces the previous one from the
  current time on. `rtc` takes the true vector-Jacobian product, `rtc_fast` the error alone.
/diagnostics shows `scheduler.mode`, the measured latency and the delay in action steps.

Safety (`safety_*` parameters, control/safety.py): a NaN/Inf guard, then gripper range, joint
position limits, max step and max velocity, each `clamp` or `reject`. Every clamp and reject is
counted in /diagnostics (`safety.clamp.<limit>`, `safety.reject.<limit>`; from zero at each
activation, as the other counters) and logged (throttled).

Holds. A tick that cannot act holds: a rejected chunk, a stale observation (age >
`max_observation_age_s`), missing or bad inputs, a failed inference, an expired chunk. It logs
(throttled; a hold on refused inputs points to their "input rejected" warning instead of repeating
the refusal), counts the hold per kind in /diagnostics (`holds.<kind>`, plus `last_hold_reason`,
which keeps the whole reason), and, by `hold_mode`:
- `stop` (default): publishes no new trajectory. joint_trajectory_controller (Jazzy) keeps
  executing the trajectory it has, to its last point (at most one chunk, e.g. 10 x 50 ms), and
  then holds that last point. The controller's `cmd_timeout` does not stop it sooner: Jazzy
  counts it from the trajectory's last point (then holds the measured position).
- `hold_position`: on the first held tick after a trajectory of ours, publishes one point at the
  measured position of the action joints (latest joint_states), velocity zero, one control period
  ahead, with no chunk and no stamp (consumers pairing trajectories with `~/action_chunk_stamp`
  must use `stop`). The controller replaces what it was executing and stops there. Nothing is
  sent when the measured position is older than `max_observation_age_s`, lies outside the safety
  position limits or gripper range, or the action joints are not measured joints (end-effector
  actions): the hold then behaves like `stop`. Leaving the active state (deactivate, shutdown,
  error) is such a hold too: the point goes out before the publishers stop.
The timer sits in its own mutually exclusive callback group, so a slow inference skips ticks
instead of queueing them.
"""

from __future__ import annotations

import array
import dataclasses
import functools
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Protocol, Sequence

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
from rclpy.clock import Clock, ClockType, ROSClock
from rclpy.duration import Duration
from rclpy.exceptions import (
    InvalidHandle,
    InvalidParameterTypeException,
    InvalidParameterValueException,
    InvalidTopicNameException,
    ParameterNotDeclaredException,
    ParameterUninitializedException,
)
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.logging import LoggingSeverity
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.publisher import Publisher
from rclpy.serialization import deserialize_message
from rclpy.signals import SignalHandlerOptions
from rclpy.timer import Timer
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import Float32MultiArray, Header, String
from trajectory_msgs.msg import JointTrajectory

from pi0_policy_ros.control.monitor import (ERROR, WARN, ControlMonitor, HealthReport, cleanup_report,
                                            configure_failure_report, shutdown_report, transition_failure_report)
from pi0_policy_ros.control.observation_buffer import STATE_SOURCE, ObservationBuffer
from pi0_policy_ros.control.safety import SafetyFilter
from pi0_policy_ros.control.step import HOLD, HOLD_POSITION, INTERNAL_ERROR, WAIT, ControlStep, StepResult
from pi0_policy_ros.errors import ConfigError, ObservationError, Pi0PolicyError, echo
from pi0_policy_ros.policy.config import PolicyConfig
from pi0_policy_ros.policy.types import ActionChunk, Observation
from pi0_policy_ros.ros import convert
from pi0_policy_ros.ros.diagnostics import DiagnosticsPublisher
from pi0_policy_ros.ros.params import (
    ARRAY_KINDS,
    BOOL,
    DOUBLE,
    DOUBLE_ARRAY,
    INTEGER,
    INTEGER_ARRAY,
    NODE_NAME,
    PARAMS,
    SPECS,
    STRING,
    STRING_ARRAY,
    NoBlockForNode,
    NodeConfig,
    ParamSpec,
    RobotProfileLike,
    check_parameter_names,
    check_value,
    config_from_params,
    control_config_from,
    load_params_file,
    publishes_trajectory,
    safety_parameter_error,
)
from pi0_policy_ros.ros.poller import PolledCallbackGroup, SubscriptionPoller
from pi0_policy_ros.ros.qos import CHUNK_QOS, COMMAND_QOS, PROMPT_QOS, SENSOR_QOS

LOG_THROTTLE_S = 2.0
# How long leaving (cleanup, shutdown, error, exit) waits for subscribers to acknowledge the hold
# point and the last status (depth-1 writers: ~6 ms on loopback); it bounds a stalled subscriber.
FLUSH_TIMEOUT_S = 1.0
FLUSH_POLL_S = 0.001
WARMUP_IMAGE_HW = (224, 224)
WARMUP_PROMPT = "warm up"
# rcl_lifecycle's primary states; any other label is a transition still running (configuring, ...).
PRIMARY_STATES = frozenset({"unconfigured", "inactive", "active", "finalized"})
EXIT_POLL_S = 0.05  # how often an exiting process looks whether the running transition has ended
EXIT_FORCED = 1  # main()'s exit code when a second signal cut the wait for a running transition
PROMPT_SHOWN_CHARS = 200  # of the prompt in /diagnostics (prompt.text); a longer one ends in "…"
CALLBACKS_TIMEOUT_S = 2.0  # how long leaving waits for callbacks already handed to the executor's threads
# /diagnostics and the log while use_sim_time is true and the node's time is still 0: a bag played
# without --clock (or a simulator not started) leaves the control timer, on the node's clock, idle.
WAITING_FOR_CLOCK = ("waiting for /clock: use_sim_time is true and the node's time is still 0 (no /clock "
                     "received), so the control loop does not run; play the bag with --clock "
                     "(ros2 bag play --clock), or set use_sim_time false")
# /diagnostics while use_sim_time is true and the node's time has stood still this long (wall time):
# the simulator paused or gone, the control timer idle. Under it, /clock gaps of a loaded simulator.
CLOCK_STALL_S = 1.0

_PARAM_TYPES = {
    STRING: ParameterType.PARAMETER_STRING,
    STRING_ARRAY: ParameterType.PARAMETER_STRING_ARRAY,
    DOUBLE: ParameterType.PARAMETER_DOUBLE,
    INTEGER: ParameterType.PARAMETER_INTEGER,
    BOOL: ParameterType.PARAMETER_BOOL,
    DOUBLE_ARRAY: ParameterType.PARAMETER_DOUBLE_ARRAY,
    INTEGER_ARRAY: ParameterType.PARAMETER_INTEGER_ARRAY,
}
_EMPTY_ARRAY_TYPES = {
    STRING_ARRAY: Parameter.Type.STRING_ARRAY,
    DOUBLE_ARRAY: Parameter.Type.DOUBLE_ARRAY,
    INTEGER_ARRAY: Parameter.Type.INTEGER_ARRAY,
}
_ANY_ARRAY_TYPES = (Parameter.Type.BYTE_ARRAY, Parameter.Type.BOOL_ARRAY, Parameter.Type.INTEGER_ARRAY,
                    Parameter.Type.DOUBLE_ARRAY, Parameter.Type.STRING_ARRAY)


def _same_value(new: Any, current: Any) -> bool:
    """Parameter values equal as set: an array by its elements (rclpy keeps array.array, a request
    brings a list), a scalar also by its type (True is not 1)."""
    arrays = (list, tuple, array.array)
    if isinstance(new, arrays) and isinstance(current, arrays):
        return list(new) == list(current)
    return type(new) is type(current) and new == current


class _UndeclaredParameter(ParameterNotDeclaredException):
    """ParameterNotDeclaredException with our reason: rclpy's services answer its text."""

    def __init__(self, reason: str) -> None:
        Exception.__init__(self, reason)


class _ExitRequested(Exception):
    """Raised by configure at its next step once the process is exiting (`prepare_exit`)."""


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
    if spec.read_only:
        when = "read-only: read at start-up (parameter file, -p or launch argument)"
    else:
        when = "configure-time (set while unconfigured)" if spec.configure_time else "dynamic"
    constraints = [when]
    if spec.choices:
        constraints.append(f"one of {list(spec.choices)}")
    descriptor = ParameterDescriptor(
        name=spec.name, type=_PARAM_TYPES[spec.kind], description=spec.description,
        additional_constraints="; ".join(constraints), read_only=spec.read_only)
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
        self.undeclared_overrides = self._undeclared_overrides()
        if self.undeclared_overrides:
            self.get_logger().warning(self.undeclared_overrides)
        if hasattr(self, "add_post_set_parameters_callback"):  # Iron and later
            self.add_pre_set_parameters_callback(self._before_set_parameters)
            self.add_on_set_parameters_callback(self._validate_parameters)
            self.add_post_set_parameters_callback(self._apply_parameters)
        else:  # Humble: rclpy has no post-set callbacks (rclpy PR #966, Iron+)
            self.add_on_set_parameters_callback(self._validate_and_apply_parameters)

        self._sensor_group = MutuallyExclusiveCallbackGroup()
        self._control_group = MutuallyExclusiveCallbackGroup()
        # Cameras and joint_states, taken by `_poller` rather than the executor (ros/poller.py).
        self._polled_group = PolledCallbackGroup()
        self._poller: SubscriptionPoller | None = None
        self._joint_reader: convert.JointStateReader | None = None
        # Held by a control tick and by transitions, so that deactivate/cleanup wait for an
        # in-flight inference and no tick publishes after deactivate returns.
        self._lock = threading.Lock()
        # Held by `_apply_parameters` and where transitions build or destroy what it applies to
        # (buffer, monitor, control timer): a value set meanwhile reaches what is built, and never
        # a destroyed timer.
        self._params_lock = threading.Lock()
        self._config: NodeConfig | None = None
        self._policy: PolicyLike | None = None
        self._buffer: ObservationBuffer | None = None
        self._monitor: ControlMonitor | None = None
        self._step: ControlStep | None = None
        self._safety: SafetyFilter | None = None
        self._prompt_status: dict[str, str] = {}
        # Source (camera name, joint_states) -> its latest refusal, and log key -> when it was last
        # logged: refused inputs are logged per source (see _input_rejected).
        self._rejections: dict[str, str] = {}
        self._logged_at: dict[str, float] = {}
        # Lives as long as the node: a supervisor sees why a configure failed. Its lock keeps a
        # report in flight from publishing on a publisher that destroy_node() is destroying.
        self._diagnostics_lock = threading.Lock()
        self._diagnostics: DiagnosticsPublisher | None = DiagnosticsPublisher(self)
        self._subscriptions_: list[Any] = []
        self._trajectory_pub: Any = None  # stays None for velocity or end-effector actions (trajectory_actions)
        self._chunk_pub: Any = None
        self._stamp_pub: Any = None
        self._control_timer: Timer | None = None
        self._diagnostics_timer: Timer | None = None
        self._clock_wait_logged = False  # WAITING_FOR_CLOCK is logged once per wait
        self._clock_seen: tuple[int, float] = (0, time.monotonic())  # node time (ns), and since when (steady s)
        self._sequence = 0
        # (transition, reason) of the transition that raised, for on_error's last status (see _transition).
        self._failed_transition: tuple[str, str] | None = None
        self._prompt: str | None = self.get_parameter("prompt").value or None
        # For the node's whole life, as the prompt parameter: a task manager may send the instruction
        # before a lifecycle manager configures the node (a subscription made at configure lost it).
        self._prompt_sub = self.create_subscription(String, "~/prompt", self._on_prompt, PROMPT_QOS,
                                                    callback_group=self._sensor_group)
        # Set by a signal (prepare_exit): configure stops at its next step, autostart does not
        # activate. The lock makes "not exiting, so activate" one step against "exiting, so shut down".
        self._exiting = threading.Event()
        self._exit_lock = threading.Lock()
        self._autostart_timer: Timer | None = None
        # The interpreter's thread switch interval before configure set switch_interval_s (None: not set).
        self._switch_interval_before: float | None = None
        # torch's intra-op threads before the policy set cpu_threads (None: not set).
        self._torch_threads_before: int | None = None
        if self.get_parameter("autostart").value:
            self._autostart_timer = self.create_timer(0.0, self._autostart)
        # rclpy's ~/change_state raises RCLError for a transition the current state lacks (activate
        # twice, activate while unconfigured): unanswered, and raised out of the executor's spin.
        change_state = getattr(self, "_service_change_state", None)
        if change_state is not None:
            change_state.callback = functools.partial(self._on_change_state, change_state.callback)

    # ---- parameters -------------------------------------------------------------------------

    def _undeclared_overrides(self) -> str:
        """Why some overrides (parameter file, `-p`) are ignored, or "": rclpy drops a name the node
        does not declare without a word, so a typo left its parameter at the default. Not an error
        here: a wildcard block (`/**`) may hold other nodes' parameters (the launch file refuses
        unknown names in blocks that name this node)."""
        try:
            check_parameter_names(list(getattr(self, "_parameter_overrides", {})), "parameter overrides")
        except ConfigError as exc:
            return f"{exc}; rclpy ignores them (another node's parameters from a wildcard block?)"
        return ""

    def _declare(self, spec: ParamSpec) -> None:
        descriptor = _descriptor(spec)
        # rclpy infers BYTE_ARRAY from an empty list, so empty arrays are declared by type.
        default = _EMPTY_ARRAY_TYPES[spec.kind] if spec.kind in ARRAY_KINDS and not spec.default else spec.default
        try:
            self.declare_parameter(spec.name, default, descriptor)
        except (InvalidParameterValueException, InvalidParameterTypeException) as exc:
            self.declare_parameter(spec.name, default, descriptor, ignore_override=True)
            if spec.read_only:  # read at start-up only, and never settable: failing configure would need a restart
                self.get_logger().error(f"parameter {spec.name}: {exc}; not started automatically ({spec.name} is "
                                        f"{spec.default}: read-only, a restart with a valid value changes it)")
                return
            self._bad_overrides[spec.name] = str(exc)
            self.get_logger().error(f"parameter {spec.name}: {exc}; configure will fail until it is set")
        if default is not spec.default and self.get_parameter_or(spec.name).type_ == Parameter.Type.NOT_SET:
            # Declared by type alone it has no value, and rclpy's ~/get_parameters then answers no
            # value for the whole request (`ros2 param get` / `dump` found nothing): give it [].
            self.set_parameters([Parameter(spec.name, default, [])])

    def parameter_values(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for spec in PARAMS:
            try:
                values[spec.name] = self.get_parameter(spec.name).value
            except ParameterUninitializedException:
                values[spec.name] = spec.default
        return values

    def _before_set_parameters(self, params: list[Parameter]) -> list[Parameter]:
        """rclpy's pre-set hook (one only: rclpy joins the lists each hook returns).

        An undeclared name raises `ParameterNotDeclaredException` naming it and the closest declared
        name (as the ~/set_parameters services answer it); rclpy's own names none ("[]").
        An empty list of any array type becomes the parameter's own empty list: `ros2 param set
        <node> safety_max_step "[]"` and `ros2 param load` guess a list's type from its elements and
        send an empty one as a bool array, which rclpy refuses for a double array."""
        undeclared = [param.name for param in params if not self.has_parameter(param.name)]
        if undeclared:
            try:
                check_parameter_names(undeclared, "parameter names")
            except ConfigError as exc:
                raise _UndeclaredParameter(str(exc)) from None
        out = []
        for param in params:
            spec = SPECS.get(param.name)
            if (spec is not None and spec.kind in ARRAY_KINDS and param.type_ in _ANY_ARRAY_TYPES
                    and len(param.value) == 0):
                param = Parameter(param.name, _EMPTY_ARRAY_TYPES[spec.kind], [])
            out.append(param)
        return out

    def _validate_parameters(self, params: list[Parameter]) -> SetParametersResult:
        # While configuring too: configure has read the parameters already (the config comes last).
        state = self._state_machine.current_state[1]
        configured = self._config is not None or state == "configuring"
        updates: dict[str, Any] = {}
        for param in params:
            spec = SPECS.get(param.name)
            if spec is None:
                continue
            if state == "finalized":  # nothing reads them any more; accepted, they would only mislead
                return SetParametersResult(successful=False, reason=(
                    f"{param.name}: expected a node that can still run, found it finalized (shut down): "
                    "restart the node to change its parameters"))
            if spec.configure_time and configured:
                if _same_value(param.value, self.get_parameter(param.name).value):
                    continue  # unchanged: `ros2 param load` of a `ros2 param dump` sets every parameter
                return SetParametersResult(successful=False, reason=(
                    f"{param.name} is a configure-time parameter: expected the node unconfigured, "
                    f"found it {state} (cleanup, set, then configure)"))
            try:
                check_value(spec, param.value)
            except ConfigError as exc:
                return SetParametersResult(successful=False, reason=str(exc))
            updates[param.name] = param.value
        try:
            control = control_config_from({**self.parameter_values(), **updates})
            step = self._step
            if step is not None and "control_rate_hz" in updates:
                step.check_control_period(control.control_period_s)  # against the configured chunk
        except ConfigError as exc:
            return SetParametersResult(successful=False, reason=str(exc))
        return SetParametersResult(successful=True)

    def _validate_and_apply_parameters(self, params: list[Parameter]) -> SetParametersResult:
        """Humble's only hook, called before the values are stored: validate, then apply the new values."""
        result = self._validate_parameters(params)
        if result.successful:
            self._apply_parameters(params)
        return result

    def _apply_parameters(self, params: list[Parameter]) -> None:
        with self._params_lock:
            self._apply_parameters_locked(params)

    def _apply_parameters_locked(self, params: list[Parameter]) -> None:
        names = {p.name for p in params}
        # The new values from `params`: on Humble they are not stored yet when this runs.
        values = {**self.parameter_values(), **{p.name: p.value for p in params if p.name in SPECS}}
        for name in names:
            self._bad_overrides.pop(name, None)
        if "prompt" in names:
            self._set_prompt(values["prompt"])
        step = self._step
        if "hold_mode" in names and step is not None:
            step.hold_mode = values["hold_mode"]
            config, policy = self._config, self._policy
            warning = "" if config is None or policy is None else config.unmeasured_warning(policy.profile,
                                                                                            values["hold_mode"])
            if warning and values["hold_mode"] == HOLD_POSITION:  # configure warned of the limits already
                self.get_logger().warning(warning)
        if names & {"control_rate_hz", "max_observation_age_s", "max_camera_skew_s", "max_future_stamp_s"}:
            control = control_config_from(values)
            buffer, monitor, timer = self._buffer, self._monitor, self._control_timer
            if buffer is not None:
                buffer.config = control
            if monitor is not None and control.control_rate_hz != monitor.control_rate_hz:
                monitor.change_rate(control.control_rate_hz, self._rate_start_s())
            if timer is not None:
                period_ns = int(round(control.control_period_s * 1e9))
                timer.timer_period_ns = period_ns
                # rcl keeps the next call where the old period put it: after a slow rate the new
                # one would start only up to one old period later.
                if (timer.time_until_next_call() or 0) > period_ns:
                    timer.reset()

    def _set_prompt(self, prompt: str) -> None:
        self._prompt = prompt or None
        buffer = self._buffer  # read once: cleanup, on another thread, may set it to None meanwhile
        if buffer is not None:
            buffer.put_prompt(self._prompt)
        self._check_prompt()

    def _check_prompt(self) -> None:
        """Warn when the prompt does not fit the policy's token budget (the policy cuts it)."""
        policy, prompt = self._policy, self._prompt
        tokenizer = getattr(policy, "tokenizer", None)
        # The task the node acts on, for an operator: a prompt from ~/prompt leaves the parameter as it was.
        text = prompt if prompt is None or len(prompt) <= PROMPT_SHOWN_CHARS else prompt[:PROMPT_SHOWN_CHARS] + "…"
        if policy is None or tokenizer is None or not prompt:
            self._prompt_status = {"source": "prompt" if prompt else "none", "truncated": "False", "text": text or ""}
            return
        state = np.zeros(policy.profile.state_dim, np.float32)
        try:
            tokens = tokenizer.tokenize(prompt, state)
        except ObservationError as exc:
            self.get_logger().warning(f"prompt refused by the tokenizer: {exc}")
            self._prompt_status = {"source": "prompt", "truncated": "False", "text": text, "error": str(exc)}
            return
        # A prompt over the budget is logged by the tokenizer, once per prompt (a second warning
        # here said the same thing again).
        self._prompt_status = {"source": "prompt", "truncated": str(bool(tokens.truncated)), "text": text,
                               "token_budget": str(tokenizer.max_token_len)}

    # ---- lifecycle --------------------------------------------------------------------------

    def _autostart(self) -> None:
        if self._autostart_timer is not None:
            self.destroy_timer(self._autostart_timer)
            self._autostart_timer = None
        if self.trigger_configure() == TransitionCallbackReturn.SUCCESS:
            with self._exit_lock:
                if not self._exiting.is_set():
                    self.trigger_activate()

    def _on_change_state(self, handle: Callable[[Any, Any], Any], request: Any, response: Any) -> Any:
        """~/change_state: a transition the current state does not have is refused (success false) and
        logged, naming those it has; the others go to rclpy's handler (`handle`)."""
        transition = request.transition
        available = [(t[0], t[1]) for t in self._state_machine.available_transitions]
        if transition.label:  # rclpy looks a label up among the current state's transitions
            known = any(label == transition.label for _, label in available)
            asked = echo(transition.label)
        else:
            known = any(tid == transition.id for tid, _ in available)
            asked = str(transition.id)
        if not known:
            state = self._state_machine.current_state[1]
            self.get_logger().warning(
                f"change_state refused: transition {asked} is not available in state {state!r}: expected one of "
                f"[{', '.join(f'{label!r} ({tid})' for tid, label in available)}]")
            response.success = False
            return response
        return handle(request, response)

    def _transition(self, name: str, body: Callable[[], TransitionCallbackReturn | None]) -> TransitionCallbackReturn:
        """Runs a transition callback's body (None: SUCCESS). rclpy turns an exception raised in a
        transition callback into ERROR without logging it, and calls on_error with the state the
        transition started from: the exception is logged here, once, and kept for on_error."""
        try:
            result = body()
        except Exception as exc:  # noqa: BLE001 - rclpy would swallow it
            reason = f"{type(exc).__name__}: {exc}"
            self.get_logger().error(f"{name} failed: {reason}")
            self._failed_transition = (name, reason)
            return TransitionCallbackReturn.ERROR
        if result == TransitionCallbackReturn.ERROR:
            reason = "a managed entity returned ERROR"
            self.get_logger().error(f"{name} failed: {reason}")
            self._failed_transition = (name, reason)
        return TransitionCallbackReturn.SUCCESS if result is None else result

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        """SUCCESS once the policy is loaded and warmed up; FAILURE (reason logged) otherwise."""
        return self._transition("configure", self._configure_or_fail)

    def _configure_or_fail(self) -> TransitionCallbackReturn:
        try:
            self._configure()
        except _ExitRequested as exc:  # not a fault: no ERROR status before the "shut down" one
            self.get_logger().info(f"configure stopped: {exc}")
            self._release()
            return TransitionCallbackReturn.FAILURE
        except Exception as exc:  # noqa: BLE001 - any load failure is a FAILURE, never a dead process
            # Our own errors carry their reason; others (out of memory, ...) also need their type.
            reason = str(exc) if isinstance(exc, Pi0PolicyError) else f"{type(exc).__name__}: {exc}"
            self.get_logger().error(f"configure failed: {reason}")
            self._release()
            self._publish_report(configure_failure_report(reason))
            return TransitionCallbackReturn.FAILURE
        self.get_logger().info(
            f"configured: profile {self._config.policy.robot_profile!r}, cameras "
            f"{[c.name for c in self._config.cameras]}, {self._config.control.control_rate_hz} Hz")
        return TransitionCallbackReturn.SUCCESS

    def _configure(self) -> None:
        if self._bad_overrides:
            raise ConfigError("; ".join(self._bad_overrides.values()))
        config = config_from_params(self.parameter_values())
        if config.switch_interval_s > 0:
            # Process-wide, on purpose: the node owns its process (one node per launch process).
            # _release() puts the interval back, so that 0 at a later configure leaves Python's own.
            if self._switch_interval_before is None:
                self._switch_interval_before = sys.getswitchinterval()
            sys.setswitchinterval(config.switch_interval_s)
        if config.policy.cpu_threads > 0 and self._torch_threads_before is None:
            # The policy sets them process-wide (Policy.from_config); _release() puts them back, so
            # that 0 at a later configure leaves torch's own count. torch only when asked for.
            import torch

            self._torch_threads_before = torch.get_num_threads()
        # The prompt reaches the policy through the buffer (parameter or ~/prompt). As the policy's
        # default_prompt it would outlive the parameter: a '' set later would fall back to it.
        policy = self._policy_factory(dataclasses.replace(config.policy, default_prompt=""))
        self._policy = policy  # owned from here on, so that _release() closes it on failure
        self._stop_if_exiting("the policy was loaded")
        config = config.resolve(policy.profile)
        action_space = getattr(policy.profile, "action_space", "joint_position")
        trajectory = publishes_trajectory(config.trajectory_actions, action_space)
        if not trajectory:
            self.get_logger().warning(
                f"profile {policy.profile.name!r} predicts {action_space} actions: no ~/joint_trajectory "
                "(a joint_trajectory_controller would drive the joints to those values); consume "
                "~/action_chunk through an adapter for your robot, or set trajectory_actions: any")
        elif action_space != "joint_position":
            self.get_logger().warning(
                f"profile {policy.profile.name!r} predicts {action_space} actions: ~/joint_trajectory "
                "positions carry them as they are; a robot that needs joint positions should consume "
                "~/action_chunk through its own adapter")
        chunk = self._warm_up(policy, config)
        self._stop_if_exiting("the warm-up")
        try:
            self._safety = SafetyFilter(config.safety, len(config.action_joint_names), chunk.period_s)
        except ValueError as exc:  # limits that do not fit the action dims
            raise safety_parameter_error(exc) from None

        decoders = {c.name: functools.partial(self._decode, c.compressed) for c in config.cameras}
        with self._params_lock:
            # The dynamic parameters as they are now: one set during the load and warm-up (read
            # above) found nothing to apply to yet.
            config = dataclasses.replace(config, control=control_config_from(self.parameter_values()))
            self._buffer = ObservationBuffer([c.name for c in config.cameras], config.control)
            self._buffer.put_prompt(self._prompt)
            self._step = config.control_step(policy, self._buffer, decoders, self._safety,
                                             self.get_parameter("hold_mode").value)
            self._monitor = ControlMonitor(config.control.control_rate_hz)
        self._step.prepare(chunk.horizon, chunk.period_s)
        self._check_prompt()
        polled = config.input_poll_period_s > 0
        input_group = self._polled_group if polled else self._sensor_group
        inputs = []
        for index, camera in enumerate(config.cameras):
            msg_type = CompressedImage if camera.compressed else Image
            # raw: frames stay serialized until a tick uses one (most never are).
            try:
                inputs.append(self.create_subscription(
                    msg_type, camera.topic, functools.partial(self._on_image, camera.name), SENSOR_QOS,
                    callback_group=input_group, raw=True))
            except InvalidTopicNameException as exc:  # rclpy's message names the topic, not the parameter
                raise ConfigError(f"camera_topics[{index}] (camera {camera.name!r}): expected a valid ROS topic "
                                  f"name, found {camera.topic!r}: {exc}") from None
            # Owned at once: a later camera's topic may fail, and _release() must destroy this one.
            self._subscriptions_.append(inputs[-1])
        # raw too: JointStateReader reads the positions in place when the names repeat.
        self._joint_reader = convert.JointStateReader(
            config.joint_names, functools.partial(deserialize_message, message_type=JointState))
        inputs.append(self.create_subscription(
            JointState, "joint_states", self._on_joint_state, SENSOR_QOS, callback_group=input_group, raw=True))
        self._subscriptions_.append(inputs[-1])
        # Resolved (namespace, remaps): what a hold on a source never received names.
        sources = [camera.name for camera in config.cameras] + [STATE_SOURCE]
        self._buffer.set_topics({source: sub.topic_name for source, sub in zip(sources, inputs)})
        if polled:
            self._poller = SubscriptionPoller(config.input_poll_period_s, self._on_poll_error,
                                              name=f"{self.get_name()}_inputs")
            for sub in inputs:
                self._poller.add(sub)
        self._stamp_pub = self.create_lifecycle_publisher(Header, "~/action_chunk_stamp", CHUNK_QOS)
        self._chunk_pub = self.create_lifecycle_publisher(Float32MultiArray, "~/action_chunk", CHUNK_QOS)
        if trajectory:
            self._trajectory_pub = self.create_lifecycle_publisher(JointTrajectory, "~/joint_trajectory",
                                                                   COMMAND_QOS)
        # On a steady clock, not the node's: under use_sim_time without /clock the node's time stays at
        # 0, a timer on it never fires, and the node published no /diagnostics at all.
        self._diagnostics_timer = self.create_timer(
            config.diagnostics_period_s, self._publish_diagnostics, callback_group=self._sensor_group,
            clock=Clock(clock_type=ClockType.STEADY_TIME))
        self._config = config
        if self._poller is not None:
            self._poller.start()  # last: its callbacks need the config

    def _warm_up(self, policy: PolicyLike, config: NodeConfig) -> ActionChunk:
        """One inference on a black frame per camera: fails configure early, and pays first-call costs now."""
        frame_hw = config.policy.camera_hw or WARMUP_IMAGE_HW  # the size the policy takes, if it names one
        images = {c.name: np.zeros(frame_hw + (3,), np.uint8) for c in config.cameras}
        state = np.zeros(len(config.joint_names), np.float64)
        # Never the node's prompt: one may come later (~/prompt), and one the policy refuses (blanks)
        # must hold the active node as '' does, not fail configure. Tokens are padded: same shapes.
        chunk = policy.infer(Observation(images=images, state=state, prompt=WARMUP_PROMPT, stamp_s=0.0))
        width = chunk.actions.shape[1] if chunk.actions.ndim == 2 else None
        if width != len(config.action_joint_names):
            raise ConfigError(f"warm-up: expected actions [H, {len(config.action_joint_names)}] for "
                              f"action_joint_names, found shape {chunk.actions.shape}")
        return chunk

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        return self._transition("activate", functools.partial(self._activate, state))

    def _activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        result = super().on_activate(state)  # enables the lifecycle publishers before the first tick
        if result != TransitionCallbackReturn.SUCCESS:
            return result
        with self._lock:
            assert self._config is not None and self._step is not None and self._monitor is not None
            assert self._safety is not None
            self._step.reset()
            self._monitor.start(self._rate_start_s())
            self._safety.reset_counters()  # safety.clamp.* / safety.reject.* count from activation too
            self._sequence = 0
            with self._params_lock:
                self._control_timer = self.create_timer(
                    self._buffer.config.control_period_s, self._on_control_tick, callback_group=self._control_group)
        self.get_logger().info("activated")
        return result

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        return self._transition("deactivate", functools.partial(self._deactivate, state))

    def _deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        with self._lock:  # waits for an in-flight tick
            self._stop_control()
        self.get_logger().info("deactivated")
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        return self._transition("cleanup", self._clean_up)

    def _clean_up(self) -> None:
        self._release()
        self._publish_report(cleanup_report())  # the periodic status stops here
        self.get_logger().info("cleaned up")

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        return self._transition("shutdown", self._shut_down)

    def _shut_down(self) -> None:
        self._release()
        # Said on purpose: a monitor would otherwise only see the last periodic status go stale.
        # The /diagnostics publisher lives until destroy_node().
        self._publish_report(shutdown_report())
        self.get_logger().info("shut down")

    def _stop_if_exiting(self, after: str) -> None:
        if self._exiting.is_set():
            raise _ExitRequested(f"the process is exiting (SIGINT or SIGTERM), stopped after {after}")

    def prepare_exit(self, give_up: Callable[[], bool] = lambda: False) -> bool:
        """The process is ending on a signal; first, nothing new may start: configure ends at its
        next step (`_stop_if_exiting`) and autostart does not activate. A transition still running
        (configure: loading, warming up) is waited for, since its thread cannot be stopped and would
        go on with what `shut_down_for_exit` released under it. False: `give_up()` (a second
        signal) ended that wait; the transition's thread still runs."""
        with self._exit_lock:
            self._exiting.set()
        running = self._state_machine.current_state[1]
        if running in PRIMARY_STATES:
            return True
        self.get_logger().warning(f"exiting: waiting for the running transition ({running}) to end first; "
                                  "signal again to exit at once")
        while self._state_machine.current_state[1] not in PRIMARY_STATES:
            if give_up():
                self.get_logger().error(f"second signal: exiting at once, during {running}; nothing was shut "
                                        "down (no hold point, no last status)")
                return False
            time.sleep(EXIT_POLL_S)
        return True

    def shut_down_for_exit(self) -> None:
        """The process is ending: the shutdown transition from unconfigured, inactive or active, as
        `ros2 lifecycle set <node> shutdown` would (hold point, "shut down" status, transition event).
        In any other state (finalized, or a transition still running) only what is left is released."""
        if self._state_machine.current_state[1] in ("unconfigured", "inactive", "active"):
            try:
                self.trigger_shutdown()
                return
            except Exception as exc:  # noqa: BLE001 - the process ends either way; release what is left
                self.get_logger().error(f"shutdown transition failed: {type(exc).__name__}: {exc}")
        self._release()

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        """After a transition that raised (logged by `_transition`): everything is released and a last
        /diagnostics status (ERROR, "<transition> failed: <reason>") says why the node stopped.
        SUCCESS leaves it unconfigured; if releasing fails too, ERROR (rclpy: finalized)."""
        transition, reason = self._failed_transition or ("transition", f"unknown (error processing from {state.label})")
        self._failed_transition = None
        result = TransitionCallbackReturn.SUCCESS
        try:
            self._release()
        except Exception as exc:  # noqa: BLE001 - the last status must still go out
            self.get_logger().error(f"error processing: releasing failed: {type(exc).__name__}: {exc}")
            reason = f"{reason}; releasing failed too: {type(exc).__name__}: {exc}"
            result = TransitionCallbackReturn.ERROR
        self._publish_report(transition_failure_report(transition, reason))
        if result == TransitionCallbackReturn.SUCCESS:
            self.get_logger().info(f"error processing after the failed {transition}: everything released, the node "
                                   "is unconfigured (configure it again once the cause is fixed)")
        return result

    def _stop_control(self) -> None:
        if self._control_timer is not None:
            with self._params_lock:  # `_apply_parameters` may be changing its period
                self.destroy_timer(self._control_timer)
                self._control_timer = None
            self._send_stop_point()
        if self._monitor is not None:
            self._monitor.stop()

    def _send_stop_point(self) -> None:
        """Leaving the active state (deactivate, shutdown, error) is a hold: with hold_position, the
        hold point goes out while the publishers are still enabled; without it the controller would
        run the last chunk to its end. Called with the lock held, after the timer is gone."""
        step, config, pub = self._step, self._config, self._trajectory_pub
        if step is None or config is None or pub is None or step.hold_mode != HOLD_POSITION or not step.executing:
            return
        try:
            plan, refusal = step.stop_plan(self._now_s())
            if plan is None:
                self.get_logger().warning(f"hold_position: {refusal}; no hold point sent, "
                                          "the controller finishes its trajectory")
                return
            pub.publish(convert.trajectory_message(plan, config.action_joint_names))
        except Exception as exc:  # noqa: BLE001 - the transition must complete (e.g. a context already shut down)
            self.get_logger().error(f"hold_position: the hold point could not be sent: {exc!r}")
            return
        self.get_logger().info("hold_position: hold point sent at the measured position")

    def _release(self) -> None:
        """Free everything configure built; safe to call in any state, any number of times."""
        with self._lock:
            self._stop_control()
            if self._diagnostics_timer is not None:
                self.destroy_timer(self._diagnostics_timer)
                self._diagnostics_timer = None
            self._stop_poller()  # before its subscriptions go
            for sub in self._subscriptions_:
                self.destroy_subscription(sub)
            self._subscriptions_.clear()
            if self._trajectory_pub is not None:
                flush_publisher(self, self._trajectory_pub)  # the hold point just sent by _stop_control()
            for name in ("_stamp_pub", "_chunk_pub", "_trajectory_pub"):
                pub = getattr(self, name)
                if pub is not None:
                    self.destroy_lifecycle_publisher(pub)
                    setattr(self, name, None)
            policy, self._policy = self._policy, None
            step, self._step = self._step, None
            self._config = None
            self._buffer = None
            self._monitor = None
            self._safety = None
            self._joint_reader = None
            interval, self._switch_interval_before = self._switch_interval_before, None
            threads, self._torch_threads_before = self._torch_threads_before, None
        if interval is not None:
            sys.setswitchinterval(interval)
        if step is not None:
            step.close()  # its decode threads; no tick runs it any more (the lock, the timer gone)
        if policy is not None:
            try:
                policy.close()
            except Exception as exc:  # noqa: BLE001 - cleanup must finish; the reason is logged
                self.get_logger().error(f"policy.close() failed: {exc}")
        if threads is not None:
            import torch

            torch.set_num_threads(threads)

    # ---- sensor callbacks: store only --------------------------------------------------------

    def _now_s(self) -> float:
        """Seconds on the node's clock (ROS time; sim time under use_sim_time)."""
        return self.get_clock().now().nanoseconds * 1e-9

    def _on_image(self, camera: str, data: bytes) -> None:
        """A serialized Image / CompressedImage (raw subscription): only its stamp is read here."""
        buffer, monitor = self._buffer, self._monitor
        if buffer is None or monitor is None:
            return
        now_s = self._now_s()
        try:
            stamp_s = convert.stamp_from_cdr(data)
        except ObservationError as exc:
            reason = f"camera {camera!r}: {exc}"
            buffer.refused(camera, reason)  # a hold for this camera names it
            self._input_rejected(reason, camera)
            return
        try:
            # Deserializing and decoding wait for the control tick (`_decode`): most frames are never used.
            buffer.put_image(camera, data, stamp_s, now_s)
        except ObservationError as exc:  # its reason names the camera
            self._input_rejected(str(exc), camera)
            return
        monitor.input_received(camera, now_s - stamp_s)

    def _on_joint_state(self, data: bytes) -> None:
        """A serialized JointState (raw subscription), checked and mapped as `convert.joint_positions` does."""
        buffer, reader, monitor = self._buffer, self._joint_reader, self._monitor
        if buffer is None or reader is None or monitor is None:
            return
        now_s = self._now_s()
        try:
            try:
                stamp_s = convert.stamp_from_cdr(data)
            except ObservationError as exc:  # says what the bytes lack, not whose they are
                raise ObservationError(f"{STATE_SOURCE}: {exc}") from None
            state = reader.positions(data)
            buffer.put_state(state, stamp_s, now_s)
        except ObservationError as exc:
            buffer.refused(STATE_SOURCE, str(exc))  # a hold on joint_states names it
            self._input_rejected(str(exc), STATE_SOURCE)
            return
        monitor.input_received(STATE_SOURCE, now_s - stamp_s)

    def _on_prompt(self, msg: String) -> None:
        self._set_prompt(msg.data)

    def _input_rejected(self, reason: str, source: str) -> None:
        monitor = self._monitor
        if monitor is not None:
            monitor.input_rejected(reason, source)
        self._rejections[source] = reason
        # Throttled per source, not per call site as rclpy's throttle_duration_sec: one source that
        # keeps failing must not hide another in the log.
        if self._log_due(f"input rejected: {source}"):
            self.get_logger().warning(f"input rejected: {reason}")

    def _log_due(self, key: str) -> bool:
        """True at most once every LOG_THROTTLE_S per key (a race between threads may log twice)."""
        now = time.monotonic()
        last = self._logged_at.get(key)
        if last is not None and now - last < LOG_THROTTLE_S:
            return False
        self._logged_at[key] = now
        return True

    def _on_poll_error(self, subscription: Any, exc: Exception) -> None:
        """A take or a sensor callback raised on the poller thread (a bug, not a bad input): logged
        as an error and counted in /diagnostics (`input_errors.poller`); the poller goes on."""
        reason = f"{subscription.topic_name}: {type(exc).__name__}: {exc}"
        monitor = self._monitor
        if monitor is not None:
            monitor.input_rejected(reason, "poller")
        if self._log_due(f"input failed: {subscription.topic_name}"):
            self.get_logger().error(f"input failed: {reason}")

    def _stop_poller(self) -> None:
        poller, self._poller = self._poller, None
        if poller is not None:
            poller.stop()

    # ---- control loop -----------------------------------------------------------------------

    def _on_control_tick(self) -> None:
        # Timer callbacks never raise: anything unexpected holds and is reported as an ERROR.
        try:
            with self._lock:
                if self._control_timer is not None:
                    try:
                        self._control_step()
                    except Exception as exc:  # noqa: BLE001
                        self._hold_on_error(f"internal error: {exc!r}")
        except Exception as exc:  # noqa: BLE001
            self._hold(f"internal error: {exc!r}", ERROR, INTERNAL_ERROR)

    def _hold_on_error(self, reason: str) -> None:
        """A tick that raised (a bug) holds as any other hold: with hold_position the first after a
        trajectory of ours sends the hold point. Under the lock."""
        step = self._step
        if step is None:
            self._hold(reason, ERROR, INTERNAL_ERROR)
        else:
            self._publish_hold(step.hold(INTERNAL_ERROR, reason, self._now_s(), ERROR))

    def _publish_hold(self, result: StepResult) -> None:
        """A held tick: hold_position's point when the step made one, then the log and the counters."""
        config = self._config
        if result.plan is not None and self._trajectory_pub is not None and config is not None:
            self._trajectory_pub.publish(convert.trajectory_message(result.plan, config.action_joint_names))
        self._hold(result.reason, result.level, result.kind, result.age_s, result.camera_skew_s)

    def _hold(self, reason: str, level: int = WARN, kind: str = "other", age_s: float = float("nan"),
              camera_skew_s: float = float("nan")) -> None:
        monitor = self._monitor
        if monitor is not None:
            monitor.held(reason, level, kind, age_s, camera_skew_s)
        reason = self._without_rejection(reason)
        # One call site per severity: rclpy refuses a throttled call site whose severity changes
        # ("Logger severity cannot be changed between calls."), and a WARN hold then an ERROR hold
        # (start-up without inputs, later a failed inference) raised in the control timer.
        if level == ERROR:
            self.get_logger().error(f"holding ({kind}): {reason}", throttle_duration_sec=LOG_THROTTLE_S)
        else:
            self.get_logger().warning(f"holding ({kind}): {reason}", throttle_duration_sec=LOG_THROTTLE_S)

    def _without_rejection(self, reason: str) -> str:
        """A hold on refused inputs ends with the latest refusal, which `_input_rejected` logs (what
        was expected) as often as the hold is: the hold's log line names the source instead.
        /diagnostics keeps the whole reason."""
        for source, rejection in dict(self._rejections).items():
            if rejection and reason.endswith(rejection):
                head = reason[:-len(rejection)].removesuffix(", the last: ")
                return f"{head} (see the 'input rejected' warning for {source})"
        return reason

    def _control_step(self) -> None:
        config, step, monitor = self._config, self._step, self._monitor
        assert config is not None and step is not None and monitor is not None
        t0 = time.perf_counter()
        monitor.tick_started(self._now_s())
        result = step.run(self._now_s)
        if result.outcome == WAIT:
            monitor.waited(self._now_s())
            return
        if result.outcome == HOLD:
            self._publish_hold(result)
            return
        chunk, plan = result.chunk, result.plan
        assert chunk is not None and plan is not None
        self._stamp_pub.publish(Header(stamp=convert.seconds_to_stamp(chunk.stamp_s), frame_id=str(self._sequence)))
        self._chunk_pub.publish(convert.action_chunk_message(chunk.actions))
        if self._trajectory_pub is not None:
            self._trajectory_pub.publish(convert.trajectory_message(plan, config.action_joint_names))
        self._sequence += 1
        if result.clamped:
            self.get_logger().warning(f"safety filter clamped the chunk ({', '.join(result.clamped)})",
                                      throttle_duration_sec=LOG_THROTTLE_S)
        timings = dict(result.timings_ms)
        timings.update(tick=(time.perf_counter() - t0) * 1e3,
                       observation_to_publish=(self._now_s() - chunk.stamp_s) * 1e3)
        monitor.published(self._now_s(), timings, result.age_s, result.camera_skew_s)

    @staticmethod
    def _decode(compressed: bool, msg: Any) -> np.ndarray:
        """A stored frame (serialized bytes from the raw subscription, or a message) -> uint8 RGB."""
        msg_type = CompressedImage if compressed else Image
        if isinstance(msg, bytes):
            # Read in place where the bytes are plain (a copy of the frame less), else deserialized.
            fields = convert.image_fields_from_cdr(msg, compressed)
            if fields is None:
                try:
                    fields = deserialize_message(msg, msg_type)
                except Exception as exc:  # noqa: BLE001 - rclpy raises its RMWError for malformed CDR
                    raise ObservationError(f"cannot deserialize {len(msg)} bytes as {msg_type.__name__}: expected "
                                           f"CDR of sensor_msgs/{msg_type.__name__} ({exc})") from None
            msg = fields
        return convert.compressed_image_to_rgb(msg) if compressed else convert.image_to_rgb(msg)

    def _publish_diagnostics(self) -> None:
        monitor, step, safety = self._monitor, self._step, self._safety
        if monitor is None:
            return
        if safety is not None:
            monitor.set_values("safety", safety.counters)
        if step is not None:
            status = step.scheduler_status()
            monitor.set_values("scheduler", {
                "mode": status.mode, "delay_steps": status.delay_steps, "latency_s": f"{status.latency_s:.4f}",
                "chunks_received": status.chunks_received, "chunks_dropped": status.chunks_dropped,
                "hold_mode": step.hold_mode})
        monitor.set_values("prompt", self._prompt_status)
        report = monitor.report(self._now_s())
        if self._waiting_for_clock():
            report = dataclasses.replace(report, level=max(report.level, WARN), message=WAITING_FOR_CLOCK)
            if not self._clock_wait_logged:
                self._clock_wait_logged = True
                self.get_logger().warning(WAITING_FOR_CLOCK)
        else:
            self._clock_wait_logged = False
            stopped = self._clock_stopped()
            if stopped:
                report = dataclasses.replace(report, level=max(report.level, WARN), message=stopped)
        self._publish_report(report, monitor)

    def _clock_stopped(self) -> str:
        """Why the control loop does not run, when use_sim_time is true and the node's time has not
        advanced for CLOCK_STALL_S of wall time; else ''. The rate of the last sim seconds would
        otherwise read "running" while nothing runs."""
        clock = self.get_clock()
        now_ns = clock.now().nanoseconds
        seen_ns, since = self._clock_seen
        if now_ns != seen_ns:
            self._clock_seen = (now_ns, time.monotonic())
            return ""
        stalled_s = time.monotonic() - since
        if not (isinstance(clock, ROSClock) and clock.ros_time_is_active) or stalled_s < CLOCK_STALL_S:
            return ""
        return (f"sim time stopped at {now_ns * 1e-9:.3f} s: use_sim_time is true and the node's clock has not "
                f"advanced for {stalled_s:.1f} s of wall time (simulation paused, or /clock no longer published: "
                f"{self.count_publishers('/clock')} /clock publishers), so the control loop does not run")

    def _rate_start_s(self) -> float | None:
        """Where the achieved rate's window starts: now, or None (its first tick) while waiting for /clock."""
        return None if self._waiting_for_clock() else self._now_s()

    def _waiting_for_clock(self) -> bool:
        """use_sim_time is true and the node's clock is still 0: rclpy's value before the first /clock."""
        clock = self.get_clock()
        return isinstance(clock, ROSClock) and clock.ros_time_is_active and clock.now().nanoseconds == 0

    def _publish_report(self, report: HealthReport, monitor: ControlMonitor | None = None) -> None:
        """monitor: the one a periodic report comes from; it is dropped if `_release()` ran since, so
        that a report built by a timer callback already under way never follows a last status
        (failed transition, shutdown)."""
        with self._diagnostics_lock:
            if self._diagnostics is not None and (monitor is None or monitor is self._monitor):
                self._diagnostics.publish(report)

    def destroy_node(self) -> None:
        self._stop_poller()  # normally done by _release(); its thread must not outlive the subscriptions
        with self._diagnostics_lock:
            diagnostics, self._diagnostics = self._diagnostics, None  # destroyed with the node's other publishers
        if diagnostics is not None:
            flush_publisher(self, diagnostics.publisher)  # the last status (shutdown, a failed transition)
        super().destroy_node()

    # ---- introspection (tests, demo) --------------------------------------------------------

    @property
    def config(self) -> NodeConfig | None:
        return self._config

    @property
    def publishes_trajectory(self) -> bool:
        """Whether the configured node publishes ~/joint_trajectory (see `trajectory_actions`)."""
        return self._trajectory_pub is not None

    @property
    def policy(self) -> PolicyLike | None:
        return self._policy


def make_executor(context: Any = None) -> MultiThreadedExecutor:
    """The executor `main()` spins the node with (the demo and load-bench use it too). Threads: the
    control tick (inference) runs on one while services, timers and the prompt run on the others;
    cameras and joint_states never reach it (`input_poll_period_s` > 0, ros/poller.py). Not rclpy's
    EventsExecutor: in the Jazzy wheels (rclpy 7.1.6) its spin() ran neither timers nor
    subscriptions, and with spin_once() it runs every callback on one thread, so each inference
    blocked the inputs (it took 243 of 1,000 joint states a second) and would block the lifecycle
    services (bench/results/load_cpu.md)."""
    return MultiThreadedExecutor(num_threads=4, context=context)


def spin_until_shutdown(executor: Any, stop: threading.Event | None = None) -> None:
    """`executor.spin()` until the context shuts down or `stop` is set, except that an entity
    destroyed by a lifecycle transition (cleanup) while the executor was waiting on it does not end
    the process: rclpy raises InvalidHandle for it in the spinning thread, and the next wait set no
    longer holds it. A shutdown that lands between the `ok()` check and the wait ends the loop
    quietly: rclpy then fails to create the wait's timeout timer on the dead context (RCLError "the
    given context is not valid"). A thread spinning beside the caller's is ended with `stop` (and
    joined) before the caller shuts the executor down: `executor.shutdown()` destroys the guard
    condition a running wait is still adding to its wait set."""
    while rclpy.ok(context=executor.context) and not (stop is not None and stop.is_set()):
        try:
            executor.spin_once(timeout_sec=0.1)
        except InvalidHandle:
            continue
        except (ExternalShutdownException, RuntimeError):
            if rclpy.ok(context=executor.context):
                raise
            return


def finish_callbacks(executor: Any, logger: Any, timeout_s: float = CALLBACKS_TIMEOUT_S) -> bool:
    """Once nothing spins `executor` any more, before the caller destroys entities: wait (at most
    `timeout_s`) for the callbacks it already handed to its threads, and take their outcomes.
    rclpy 7.1.6's `Executor.shutdown()` does not wait for them (its wait sits behind a check that
    it has just made false), so a callback still queued ran against an entity destroyed next, and
    its InvalidHandle, never taken, was printed when the task was collected ("The following
    exception was never retrieved: cannot use Destroyable ..."): 17 of 20 shutdowns of a node with
    busy timers. An InvalidHandle left over from an entity destroyed earlier (a cleanup) is what
    spinning would have skipped too; any other exception is logged. False if some were still
    running at the timeout (logged; they finish on their own)."""
    deadline = time.monotonic() + timeout_s
    # MultiThreadedExecutor keeps the tasks it handed out here until a later spin takes them
    # (private in rclpy 7.1.6; a SingleThreadedExecutor runs each callback inside spin_once).
    tasks = list(getattr(executor, "_futures", ()))
    unfinished = 0
    for task in tasks:
        while not task.done() and time.monotonic() < deadline:
            time.sleep(FLUSH_POLL_S)
        if not task.done():
            unfinished += 1
            continue
        exc = task.exception()
        if exc is not None and not isinstance(exc, InvalidHandle):
            logger.error(f"a callback raised while the node was stopping: {type(exc).__name__}: {exc}")
    if unfinished:
        logger.warning(f"{unfinished} callback(s) still running {timeout_s:g} s after the executor stopped; "
                       "destroying the node under them")
    return unfinished == 0


def flush_publisher(node: Node, pub: Publisher, timeout_s: float = FLUSH_TIMEOUT_S) -> None:
    """Wait until every matched reliable subscriber has acknowledged what `pub` sent, at most
    `timeout_s`; a WARN naming the topic if some did not."""
    # Polled with a zero timeout: rclpy's wait_for_all_acked holds the GIL for as long as it waits,
    # which would freeze every other thread of the process for a subscriber that stalled.
    deadline = time.monotonic() + timeout_s
    acked, topic = False, pub.topic_name
    try:
        while not (acked := pub.wait_for_all_acked(Duration(nanoseconds=0))) and time.monotonic() < deadline:
            time.sleep(FLUSH_POLL_S)
    except Exception as exc:  # noqa: BLE001 - e.g. a context already shut down, an rmw without the call
        topic = f"{topic} ({type(exc).__name__}: {exc})"
    if not acked:
        node.get_logger().warning(f"not acknowledged by every subscriber within {timeout_s:g} s, may be lost: "
                                  f"the last messages on {topic}")


class ExitSignals:
    """SIGINT and SIGTERM (Ctrl-C, `ros2 launch`, systemd) counted for main(), never raised. rclpy's
    own handlers shut the context down at once, so that nothing could be sent after them: not
    hold_position's hold point, not the last status. Python's KeyboardInterrupt can land anywhere,
    a second one inside the shutdown itself."""

    def __init__(self) -> None:
        self.received = threading.Event()
        self.count = 0

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.count += 1
        self.received.set()


class RosLogHandler(logging.Handler):
    """This package's Python `logging` records (policy, checkpoint, engine) through the node's logger.
    Without a handler, Python printed only WARNING and above, bare on stderr and not on /rosout, and
    dropped the INFO lines (the policy loaded, a checkpoint's default action horizon)."""

    def __init__(self, logger: Any, previous: tuple[int, bool]) -> None:
        super().__init__()
        self._logger = logger
        self.previous = previous  # the package logger's (level, propagate) before it, for the stop

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            if record.levelno >= logging.ERROR:
                self._logger.error(message)
            elif record.levelno >= logging.WARNING:
                self._logger.warning(message)
            elif record.levelno >= logging.INFO:
                self._logger.info(message)
            else:
                self._logger.debug(message)
        except Exception:  # noqa: BLE001 - logging must not raise into the code that logs
            self.handleError(record)


def forward_package_logging(logger: Any, level: int | None = None) -> RosLogHandler:
    """Routes the package's Python logging to `logger` (an rclpy logger), and only there: a command
    that also configured Python's root logger (`pi0-policy demo`) printed each line twice, and its
    INFO lines, which the root's WARNING level does not stop on the way up.

    level: the Python level to forward from; None: the rclpy logger's (the node's --log-level).
    The commands give theirs (`pi0-policy --log-level`)."""
    package = logging.getLogger(__package__.split(".")[0])
    handler = RosLogHandler(logger, previous=(package.level, package.propagate))
    if level is None:
        level = logging.DEBUG if logger.is_enabled_for(LoggingSeverity.DEBUG) else logging.INFO
    package.addHandler(handler)
    package.setLevel(level)
    package.propagate = False
    return handler


def stop_forwarding_package_logging(handler: RosLogHandler) -> None:
    """Undoes `forward_package_logging` (a command whose node ends before its process does)."""
    package = logging.getLogger(__package__.split(".")[0])
    package.removeHandler(handler)
    package.setLevel(handler.previous[0])
    package.propagate = handler.previous[1]


def params_files(args: Sequence[str]) -> list[str]:
    """The `--params-file` paths among the ROS arguments in `args` (between `--ros-args` and `--`)."""
    files, ros, items = [], False, iter(args)
    for arg in items:
        if arg == "--ros-args":
            ros = True
        elif arg == "--":
            ros = False
        elif ros and arg == "--params-file":
            files.append(next(items, ""))
    return files


def params_files_error(files: Sequence[str], namespace: str, node_name: str) -> str:
    """Why `files` give the node nothing, or "": rcl skips a block for another node (or namespace)
    without a word, so a file keyed `/pi0_policy` ran the node on its defaults under `-r __ns:=...`.
    As the launch file, one file with a block for the node is enough (others may hold other nodes')."""
    reasons = []
    for path in files:
        try:
            load_params_file(path, namespace, node_name)
        except NoBlockForNode as exc:
            reasons.append(str(exc))
        except ConfigError:  # rcl has read it; an undeclared name is logged by the node itself
            return ""
        else:
            return ""
    return "; ".join(reasons) + ": rcl skips them, and the node would run on its defaults" if reasons else ""


def main(args: list[str] | None = None) -> int:
    try:
        rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    except RuntimeError as exc:  # rcl's RCLError: a --params-file missing or not YAML; one line, no traceback
        print(f"pi0_policy_node: error: cannot start: {exc}", file=sys.stderr)
        return 2
    signals = ExitSignals()
    signals.install()
    node: PolicyNode | None = None
    executor: MultiThreadedExecutor | None = None
    try:
        node = PolicyNode()
        error = params_files_error(params_files(sys.argv if args is None else args), node.get_namespace(),
                                   node.get_name())
        if error:
            print(f"pi0_policy_node: error: {error}", file=sys.stderr)
            node.destroy_node()
            node = None
            return 2
        forward_package_logging(node.get_logger())
        executor = make_executor()
        executor.add_node(node)
        spin_until_shutdown(executor, signals.received)  # within one spin timeout of the first signal
    except ExternalShutdownException:
        pass
    finally:
        if node is not None and not node.prepare_exit(give_up=lambda: signals.count > 1):
            # The transition's thread (the executor's) may be blocked in a load for minutes, and the
            # interpreter would join it before exiting: end the process now, as the second signal asked.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_FORCED)
        # Later signals are only counted: the shutdown (each flush bounded by FLUSH_TIMEOUT_S) goes on.
        if node is not None and executor is not None:
            finish_callbacks(executor, node.get_logger())
        if node is not None:
            node.shut_down_for_exit()
        if executor is not None:
            executor.shutdown()
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
        # Only the interpreter's teardown is left, and it puts back the default action of the
        # signals it handled: a signal then killed the process after a clean shutdown (exit code
        # -15; on the H100, a SIGTERM 0.5 s after the SIGINT). Ignored signals stay ignored.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)


if __name__ == "__main__":  # python -m pi0_policy_ros.ros.node, as the console script
    sys.exit(main())

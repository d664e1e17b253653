"""Offline replay: the node's control loop on a simulated clock in bag time, without DDS.

Every message is handed to the same code the node's callbacks run (`convert.joint_positions`,
`ObservationBuffer.put_image` / `put_state` / `put_prompt`) at its bag time, which plays the
node's receive time. A control tick fires every `1 / control_rate_hz` of bag time from the first
message on (messages stamped at or before a tick are fed before it). Each tick runs the node's own
`control.step.ControlStep` (snapshot, decode, `Policy.infer`, safety filter, scheduler /
trajectory plan, hold policy) with the node's decoders, and writes what the node would publish to
the output bag at the tick's bag time: the three chunk messages, or the hold point of
`hold_position` (a trajectory alone). A `ControlMonitor` on bag time counts what the node's
/diagnostics would; its last report is the summary's `diagnostics`.

The clock does not advance during inference (latency zero in bag time), so the outputs depend
only on the bag and the parameters: the same inputs give bit-identical bags on the CPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np

from pi0_policy_ros.bag.inputs import (FLOAT32_MULTI_ARRAY_TYPE, HEADER_TYPE, JOINT_TRAJECTORY_TYPE,
                                       InputTopic, ReplaySetup)
from pi0_policy_ros.bag.reader import InputBag
from pi0_policy_ros.bag.record import OutputBag, rclpy_to_cdr
from pi0_policy_ros.bag.summary import Progress, ReplaySummary
from pi0_policy_ros.control.monitor import ControlMonitor
from pi0_policy_ros.control.observation_buffer import STATE_SOURCE, ObservationBuffer
from pi0_policy_ros.control.safety import SafetyFilter
from pi0_policy_ros.control.step import HOLD, PUBLISH, StepResult
from pi0_policy_ros.errors import ConfigError, ObservationError
from pi0_policy_ros.policy.types import ActionChunk, Observation
from pi0_policy_ros.ros import convert
from pi0_policy_ros.ros.params import NodeConfig, safety_parameter_error

NS_PER_S = 1_000_000_000


class PolicyLike(Protocol):
    """The part of `Policy` a replay uses (the same as ros/node.py's `PolicyLike`)."""

    profile: Any

    def infer(self, observation: Observation) -> ActionChunk: ...


@dataclass(frozen=True)
class TickRecord:
    """One control tick: when, what came out, and (if kept) the observation it used."""

    t_ns: int
    published: bool
    reason: str = ""
    observation: Observation | None = None
    chunk: ActionChunk | None = None


def _decoder(compressed: bool) -> Callable[[Any], np.ndarray]:
    return convert.compressed_image_to_rgb if compressed else convert.image_to_rgb


def _record(tick_ns: int, result: StepResult) -> TickRecord:
    return TickRecord(tick_ns, result.published, result.reason, result.observation, result.chunk)


class OfflineReplay:
    """The node's control loop against a bag.

    keep_ticks: keep a `TickRecord` (with its observation and chunk) per tick in `self.ticks`,
    for tests and debugging; off for long bags.
    """

    def __init__(self, setup: ReplaySetup, policy: PolicyLike, keep_ticks: bool = False) -> None:
        self.setup = setup
        self.policy = policy
        self.config: NodeConfig = setup.config.resolve(policy.profile)
        self.buffer = ObservationBuffer([c.name for c in self.config.cameras], self.config.control)
        self.buffer.put_prompt(setup.params.get("prompt") or None)
        # The bag's topics (after --map): what a hold on a source never found names.
        self.buffer.set_topics({t.camera if t.role == "camera" else STATE_SOURCE: t.bag_topic
                                for t in setup.inputs if t.role != "prompt"})
        self.keep_ticks = keep_ticks
        self.ticks: list[TickRecord] = []
        self._sequence = 0
        period_s = getattr(policy.profile, "action_period_s", self.config.control.control_period_s)
        try:
            self.safety = SafetyFilter(self.config.safety, len(self.config.action_joint_names), period_s)
        except ValueError as exc:  # limits that do not fit the action dims
            raise safety_parameter_error(exc) from None
        decoders = {c.name: _decoder(c.compressed) for c in self.config.cameras}
        self.step = self.config.control_step(policy, self.buffer, decoders, self.safety, self.config.hold_mode)
        # The node prepares the step at configure, from its warm-up chunk: a control period too long
        # for the chunk (or an execute_horizon past it) fails there. The same here, before the bag
        # is read, instead of a replay that "works" with every tick held as an unusable chunk.
        horizon = getattr(policy.profile, "action_horizon", None)
        if horizon is not None:
            try:
                self.step.prepare(horizon, period_s)
            except ConfigError:
                self.step.close()
                raise
        self.monitor = ControlMonitor(self.config.control.control_rate_hz)

    def close(self) -> None:
        """End the step's decode threads; `ticks` and the summary stay. Idempotent."""
        self.step.close()

    def run(self, bag: InputBag, out: OutputBag | None, summary: ReplaySummary,
            progress: Progress | None = None) -> ReplaySummary:
        inputs = {t.bag_topic: t for t in bag.check(self.setup.inputs)}
        if out is not None:
            for topic, msgtype in self.setup.outputs.items():
                out.add_topic(topic, msgtype)
        period_s = self.config.control.control_period_s
        start_ns: int | None = None
        last_ns = 0
        k = 1
        for topic, t_ns, msg in bag.messages(list(inputs)):
            if start_ns is None:
                start_ns = summary.start_ns = t_ns
                # The node's activation: without it the monitor reported "inactive", at 0 Hz and
                # level OK, after any replay (all ticks held included).
                self.monitor.start(t_ns / NS_PER_S)
            while t_ns > (tick_ns := start_ns + round(k * period_s * NS_PER_S)):
                self._tick(tick_ns, out, summary)
                k += 1
            self._feed(inputs[topic], t_ns, msg, summary)
            last_ns = t_ns
            if progress is not None:
                progress.update((t_ns - start_ns) / NS_PER_S, f"{summary.chunks} chunks")
        if start_ns is None:
            return summary
        while (tick_ns := start_ns + round(k * period_s * NS_PER_S)) <= last_ns:
            self._tick(tick_ns, out, summary)
            k += 1
        summary.end_ns = last_ns
        # The chunks went out clamped (or held, rejected): the actions in the output bag are the
        # filter's, not the policy's, which only these counters say.
        summary.safety = dict(self.safety.counters)
        self.monitor.set_values("safety", summary.safety)
        report = self.monitor.report(last_ns / NS_PER_S)
        summary.extra["diagnostics"] = {"level": report.level, "message": report.message,
                                        "values": {k: v for k, v in report.values.items() if not k.startswith("latency_")}}
        return summary

    # ---- the node's subscription callbacks ------------------------------------------------------

    def _feed(self, topic: InputTopic, t_ns: int, msg: Any, summary: ReplaySummary) -> None:
        now_s = t_ns / NS_PER_S
        if topic.role == "prompt":
            self.buffer.put_prompt(msg.data)
            return
        source = topic.camera if topic.role == "camera" else STATE_SOURCE
        stamp_s = convert.stamp_to_seconds(msg.header.stamp)
        try:
            if topic.role == "camera":
                self.buffer.put_image(topic.camera, msg, stamp_s, now_s)
            else:
                self.buffer.put_state(convert.joint_positions(msg, self.config.joint_names), stamp_s, now_s)
        except ObservationError as exc:
            self.buffer.refused(source, str(exc))  # as the node does: a hold on this source names it
            summary.reject_input(str(exc))  # it names its source: the label again read "camera 'a': camera 'a': ..."
            self.monitor.input_rejected(str(exc), source)
            return
        self.monitor.input_received(source, now_s - stamp_s)

    # ---- the node's control tick ------------------------------------------------------------------

    def _tick(self, tick_ns: int, out: OutputBag | None, summary: ReplaySummary) -> None:
        summary.ticks += 1
        now_s = tick_ns / NS_PER_S
        t0 = time.perf_counter()
        self.monitor.tick_started(now_s)
        result = self.step.run(lambda: now_s)  # the clock stands still during inference
        if result.outcome == HOLD:
            if out is not None and result.plan is not None:  # hold_position's point
                self._write_trajectory(out, tick_ns, convert.trajectory_message(result.plan,
                                                                                self.config.action_joint_names))
            summary.hold(result.reason)
            self.monitor.held(result.reason, result.level, result.kind, result.age_s, result.camera_skew_s)
        elif result.outcome == PUBLISH:
            assert result.chunk is not None and result.plan is not None
            if out is not None:
                self._write(out, tick_ns, result.chunk,
                            convert.trajectory_message(result.plan, self.config.action_joint_names))
            self._sequence += 1
            summary.chunks += 1
            timings = dict(result.timings_ms)
            timings.update(tick=(time.perf_counter() - t0) * 1e3)
            summary.record_latencies(timings)
            self.monitor.published(now_s, timings, result.age_s, result.camera_skew_s)
        else:
            summary.waited_ticks += 1
            self.monitor.waited(now_s)
        if self.keep_ticks and result.outcome != "wait":
            self.ticks.append(_record(tick_ns, result))

    def _write_trajectory(self, out: OutputBag, tick_ns: int, trajectory: Any) -> None:
        topic = next(t for t, msgtype in self.setup.outputs.items() if msgtype == JOINT_TRAJECTORY_TYPE)
        out.write(topic, JOINT_TRAJECTORY_TYPE, tick_ns, rclpy_to_cdr(trajectory, JOINT_TRAJECTORY_TYPE, out.store))

    def _write(self, out: OutputBag, tick_ns: int, chunk: ActionChunk, trajectory: Any) -> None:
        from std_msgs.msg import Header  # rclpy message classes: the node's own message builders

        topics = {msgtype: topic for topic, msgtype in self.setup.outputs.items()}
        header = Header(stamp=convert.seconds_to_stamp(chunk.stamp_s), frame_id=str(self._sequence))
        for msgtype, msg in ((HEADER_TYPE, header),
                             (FLOAT32_MULTI_ARRAY_TYPE, convert.action_chunk_message(chunk.actions)),
                             (JOINT_TRAJECTORY_TYPE, trajectory)):
            if msgtype in topics:  # no trajectory where the node publishes none (ReplaySetup.outputs)
                out.write(topics[msgtype], msgtype, tick_ns, rclpy_to_cdr(msg, msgtype, out.store))


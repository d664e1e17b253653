"""Offline replay: the node's control loop on a simulated clock in bag time, without DDS.

Every message is handed to the same code the node's callbacks run (`convert.joint_positions`,
`ObservationBuffer.put_image` / `put_state` / `put_prompt`) at its bag time, which plays the
node's receive time. A control tick fires every `1 / control_rate_hz` of bag time from the first
message on (messages stamped at or before a tick are fed before it). Each tick does what
`PolicyNode._control_step` does: snapshot (age and skew rules), decode, `Policy.infer`, plan the
trajectory, and writes the node's three messages to the output bag at the tick's bag time.

The clock does not advance during inference (latency zero in bag time), so the outputs depend
only on the bag and the parameters: the same inputs give bit-identical bags on the CPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from pi0_policy_ros.bag.inputs import (FLOAT32_MULTI_ARRAY_TYPE, HEADER_TYPE, JOINT_TRAJECTORY_TYPE,
                                       InputTopic, ReplaySetup)
from pi0_policy_ros.bag.reader import InputBag
from pi0_policy_ros.bag.record import OutputBag, rclpy_to_cdr
from pi0_policy_ros.bag.summary import Progress, ReplaySummary
from pi0_policy_ros.control.observation_buffer import ObservationBuffer
from pi0_policy_ros.control.trajectory import expired_reason, plan_trajectory
from pi0_policy_ros.errors import ObservationError, Pi0PolicyError
from pi0_policy_ros.policy.types import ActionChunk, Observation
from pi0_policy_ros.ros import convert
from pi0_policy_ros.ros.params import NodeConfig

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


def decode_image(compressed: bool, msg: Any) -> np.ndarray:
    """The node's `_decode`: the message type follows the camera's `camera_types` entry."""
    return convert.compressed_image_to_rgb(msg) if compressed else convert.image_to_rgb(msg)


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
        self.keep_ticks = keep_ticks
        self.ticks: list[TickRecord] = []
        self._sequence = 0
        self._compressed = {c.name: c.compressed for c in self.config.cameras}

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
        return summary

    # ---- the node's subscription callbacks ------------------------------------------------------

    def _feed(self, topic: InputTopic, t_ns: int, msg: Any, summary: ReplaySummary) -> None:
        now_s = t_ns / NS_PER_S
        try:
            if topic.role == "camera":
                self.buffer.put_image(topic.camera, msg, convert.stamp_to_seconds(msg.header.stamp), now_s)
            elif topic.role == "joint_states":
                state = convert.joint_positions(msg, self.config.joint_names)
                self.buffer.put_state(state, convert.stamp_to_seconds(msg.header.stamp), now_s)
            elif topic.role == "prompt":
                self.buffer.put_prompt(msg.data)
        except ObservationError as exc:
            summary.reject_input(f"{topic.label}: {exc}")

    # ---- the node's control tick ------------------------------------------------------------------

    def _tick(self, tick_ns: int, out: OutputBag | None, summary: ReplaySummary) -> None:
        summary.ticks += 1
        now_s = tick_ns / NS_PER_S
        t0 = time.perf_counter()
        try:
            snapshot = self.buffer.snapshot(now_s)
            images = {c.name: decode_image(c.compressed, snapshot.images[c.name]) for c in self.config.cameras}
        except ObservationError as exc:
            return self._hold(tick_ns, str(exc), summary)
        observation = Observation(images=images, state=snapshot.state, prompt=snapshot.prompt,
                                  stamp_s=snapshot.stamp_s)
        t_decoded = time.perf_counter()
        try:
            chunk = self.policy.infer(observation)
        except ObservationError as exc:
            return self._hold(tick_ns, f"policy refused the observation: {exc}", summary, observation)
        except Exception as exc:  # noqa: BLE001 - like the node: a failed inference holds, the replay goes on
            return self._hold(tick_ns, f"inference failed: {exc!r}", summary, observation)
        t_inferred = time.perf_counter()
        min_lead_s = self.config.control.control_period_s
        try:
            plan = plan_trajectory(chunk.actions, chunk.period_s, chunk.stamp_s, now_s, min_lead_s)
        except Pi0PolicyError as exc:
            return self._hold(tick_ns, f"unusable chunk: {exc}", summary, observation, chunk)
        if plan.empty:
            reason = expired_reason(chunk.horizon, chunk.period_s, chunk.stamp_s, now_s, min_lead_s)
            return self._hold(tick_ns, reason, summary, observation, chunk)
        if out is not None:
            self._write(out, tick_ns, chunk, convert.trajectory_message(plan, self.config.action_joint_names))
        self._sequence += 1
        summary.chunks += 1
        timings = {f"policy_{k}": v for k, v in chunk.timings_ms.items()}
        timings.update(decode=(t_decoded - t0) * 1e3, infer=(t_inferred - t_decoded) * 1e3,
                       tick=(time.perf_counter() - t0) * 1e3)
        summary.record_latencies(timings)
        if self.keep_ticks:
            self.ticks.append(TickRecord(tick_ns, True, "", observation, chunk))

    def _hold(self, tick_ns: int, reason: str, summary: ReplaySummary, observation: Observation | None = None,
              chunk: ActionChunk | None = None) -> None:
        summary.hold(reason)
        if self.keep_ticks:
            self.ticks.append(TickRecord(tick_ns, False, reason, observation, chunk))

    def _write(self, out: OutputBag, tick_ns: int, chunk: ActionChunk, trajectory: Any) -> None:
        from std_msgs.msg import Header  # rclpy message classes: the node's own message builders

        topics = {msgtype: topic for topic, msgtype in self.setup.outputs.items()}
        header = Header(stamp=convert.seconds_to_stamp(chunk.stamp_s), frame_id=str(self._sequence))
        for msgtype, msg in ((HEADER_TYPE, header),
                             (FLOAT32_MULTI_ARRAY_TYPE, convert.action_chunk_message(chunk.actions)),
                             (JOINT_TRAJECTORY_TYPE, trajectory)):
            out.write(topics[msgtype], msgtype, tick_ns, rclpy_to_cdr(msg, msgtype, out.store))


"""Real-time replay: the bag over DDS to a real node, and what the node publishes back into a bag.

1. Start the node as its own process (`--node-cmd`, default this Python running
   `pi0_policy_ros.ros.node:main`) with the parameter file, `use_sim_time:=true` and
   `autostart:=false`.
2. Publish `/clock` at the bag's first time, configure and activate the node through its
   lifecycle services, and wait until every input and output topic is matched.
3. Play the node's input topics at bag timing divided by `rate`: the recorded CDR bytes as they
   are (`publisher.publish(raw)`), with `/clock` before each message and at `clock_hz` of bag time
   in between, on an absolute schedule (no drift).
4. Record the node's outputs and `/diagnostics`, stamped with the bag time at receipt; then
   deactivate the node, stop it with SIGINT, and write the output bag (canonical CDR).

rclpy runs in its own `Context`, so this works inside a process that already uses rclpy.
"""

from __future__ import annotations

import importlib
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from pi0_policy_ros.bag.inputs import DIAGNOSTIC_ARRAY_TYPE, FLOAT32_MULTI_ARRAY_TYPE, HEADER_TYPE, ReplaySetup
from pi0_policy_ros.bag.reader import InputBag
from pi0_policy_ros.bag.record import OutputBag, canonical_cdr, check_output_path, decode_cdr, typestore
from pi0_policy_ros.bag.summary import Progress, ReplaySummary, reason_kind
from pi0_policy_ros.errors import ConfigError, Pi0PolicyError
from pi0_policy_ros.policy.robots import configured_profile
from pi0_policy_ros.ros.params import NodeConfig, diagnostics_status_name

NS_PER_S = 1_000_000_000
# main() returns the node's exit code (2: it could not start): sys.exit passes it on.
DEFAULT_NODE_CMD = (sys.executable, "-c", "import sys; from pi0_policy_ros.ros.node import main; sys.exit(main())")
LOG_TAIL_CHARS = 3000
UNREPORTED_HOLD = "(reason not shown: cleared by a later chunk before the next /diagnostics report)"
UNREPORTED_INPUT_ERROR = "(reasons not in /diagnostics: node_diagnostics.last_input_error shows the latest)"


class RealtimeError(Pi0PolicyError):
    """The node could not be started, driven or stopped."""


@dataclass(frozen=True)
class RealtimeOptions:
    """params_file / overrides: passed to the node (`--params-file`, `-p NAME:=VALUE`).
    rate: playback speed factor. node_cmd: shell-style command line, ROS arguments appended.
    startup_timeout_s: for the process to come up and configure. node_log: keep its output here.
    clock_hz: /clock messages per second of bag time between messages. drain_s: wall seconds to
    wait after the last message for the last outputs. distro: the output bag's (`record.DISTROS`)."""

    params_file: str | Path
    overrides: Sequence[str] = ()
    rate: float = 1.0
    node_cmd: str | None = None
    startup_timeout_s: float = 120.0
    node_log: str | Path | None = None
    clock_hz: float = 100.0
    drain_s: float = 1.0
    distro: str = "jazzy"


def message_class(msgtype: str) -> Any:
    """'sensor_msgs/msg/Image' -> the rclpy class sensor_msgs.msg.Image."""
    package, _, name = msgtype.split("/")
    try:
        return getattr(importlib.import_module(f"{package}.msg"), name)
    except (ImportError, AttributeError) as exc:
        raise RealtimeError(f"message type {msgtype}: expected its Python package {package} to be installed, "
                            f"found none ({exc})") from None


def resolved_config(setup: ReplaySetup) -> NodeConfig:
    """The node's configuration resolved against its robot profile (joint names filled in)."""
    return setup.config.resolve(configured_profile(setup.config.policy))


class NodeProcess:
    """The policy node as a child process, its output going to a log file."""

    def __init__(self, setup: ReplaySetup, options: RealtimeOptions, log_path: Path) -> None:
        command = list(shlex.split(options.node_cmd) if options.node_cmd else DEFAULT_NODE_CMD)
        command += ["--ros-args", "-r", f"__node:={setup.node_name}", "-r", f"__ns:={setup.namespace}",
                    "--params-file", str(options.params_file), "-p", "use_sim_time:=true", "-p", "autostart:=false"]
        for item in options.overrides:
            command += ["-p", item]
        self.command = command
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        try:
            self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        except OSError as exc:
            self._log.close()
            raise RealtimeError(f"cannot start the node with {shlex.join(command)}: {exc}") from None

    def check_alive(self, during: str) -> None:
        code = self.process.poll()
        if code is not None:
            raise RealtimeError(f"the node exited with code {code} during {during}; its output ends with:\n"
                                f"{self.log_tail()}")

    def log_tail(self) -> str:
        self._log.flush()
        text = self.log_path.read_bytes()[-LOG_TAIL_CHARS:].decode(errors="replace")
        return text or "(no output)"

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGINT (the node releases and exits), then SIGKILL after `timeout_s`."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout_s)
        self._log.close()
        return self.process.returncode


def recorded_types(setup: ReplaySetup) -> dict[str, str]:
    """What the replay records from the node: its outputs and /diagnostics, topic -> type."""
    return {**setup.outputs, "/diagnostics": DIAGNOSTIC_ARRAY_TYPE}


class Player:
    """The replayer's own rclpy node: publishers of the inputs and /clock, recorder of the outputs."""

    def __init__(self, setup: ReplaySetup, input_types: dict[str, str], rate: float,
                 sink: Callable[[str, str, int, bytes], None] | None = None) -> None:
        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
        from rosgraph_msgs.msg import Clock

        self._rclpy = rclpy
        self.context = rclpy.Context()
        rclpy.init(args=[], context=self.context)
        self.node = rclpy.create_node(f"pi0_policy_replayer_{os.getpid()}", context=self.context,
                                      start_parameter_services=False)
        reliable = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100, reliability=ReliabilityPolicy.RELIABLE,
                              durability=DurabilityPolicy.VOLATILE)
        self._clock_type = Clock
        self._clock_pub = self.node.create_publisher(Clock, "/clock", 10)
        self.publishers = {topic: self.node.create_publisher(message_class(msgtype), topic, reliable)
                           for topic, msgtype in input_types.items()}
        self.lock = threading.Lock()
        # What the summary reads: stamps and /diagnostics in full, chunk messages as their receipt
        # time only. Every message goes to `sink` (the output bag) as it arrives, so memory does not
        # grow with the chunks' payload over a long replay.
        self.records: list[tuple[str, str, int, bytes]] = []
        self._sink = sink
        self.sink_error: Exception | None = None  # the first failed write; recording stops there
        self.chunk_count = 0
        self.output_types = recorded_types(setup)
        self.subscriptions = [
            self.node.create_subscription(message_class(msgtype), topic, self._recorder(topic, msgtype), reliable,
                                          raw=True)
            for topic, msgtype in self.output_types.items()]
        self.rate = rate
        self.t0_ns = 0
        self.wall0: float | None = None
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self.executor.spin, name="replay-executor", daemon=True)
        self._thread.start()

    def bag_now_ns(self) -> int:
        """The bag time that corresponds to now (the first bag time until playback starts)."""
        if self.wall0 is None:
            return self.t0_ns
        return self.t0_ns + int((time.perf_counter() - self.wall0) * self.rate * NS_PER_S)

    def _recorder(self, topic: str, msgtype: str) -> Callable[[bytes], None]:
        def record(raw: bytes) -> None:
            t_ns = self.bag_now_ns()
            with self.lock:
                if self._sink is not None:
                    try:
                        self._sink(topic, msgtype, t_ns, bytes(raw))
                    except Exception as exc:  # noqa: BLE001 - raised on the caller's thread after the run
                        self.sink_error, self._sink = exc, None
                if msgtype in (HEADER_TYPE, DIAGNOSTIC_ARRAY_TYPE, FLOAT32_MULTI_ARRAY_TYPE):
                    kept = b"" if msgtype == FLOAT32_MULTI_ARRAY_TYPE else bytes(raw)
                    self.records.append((topic, msgtype, t_ns, kept))
                self.chunk_count += msgtype == FLOAT32_MULTI_ARRAY_TYPE
        return record

    def publish_clock(self, t_ns: int) -> None:
        from builtin_interfaces.msg import Time

        self._clock_pub.publish(self._clock_type(clock=Time(sec=t_ns // NS_PER_S, nanosec=t_ns % NS_PER_S)))

    def call(self, service_type: Any, name: str, request: Any, timeout_s: float, node: NodeProcess,
             clock_ns: int) -> Any:
        """A service call that keeps /clock going and watches the node process while it waits."""
        client = self.node.create_client(service_type, name)
        try:
            deadline = time.monotonic() + timeout_s
            while not client.service_is_ready():
                node.check_alive(f"start-up (waiting for {name})")
                if time.monotonic() > deadline:
                    raise RealtimeError(f"service {name} did not appear within {timeout_s:.0f} s; node output:\n"
                                        f"{node.log_tail()}")
                self.publish_clock(clock_ns)
                time.sleep(0.05)
            future = client.call_async(request)
            while not future.done():
                node.check_alive(f"the call to {name}")
                if time.monotonic() > deadline:
                    raise RealtimeError(f"service {name} did not answer within {timeout_s:.0f} s")
                self.publish_clock(clock_ns)
                time.sleep(0.05)
            return future.result()
        finally:
            self.node.destroy_client(client)

    def wait_matched(self, timeout_s: float, node: NodeProcess) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            unmatched = [t for t, p in self.publishers.items() if p.get_subscription_count() == 0]
            unmatched += [s.topic_name for s in self.subscriptions
                          if s.topic_name != "/diagnostics" and self.node.count_publishers(s.topic_name) == 0]
            if not unmatched:
                return
            node.check_alive("discovery")
            if time.monotonic() > deadline:
                raise RealtimeError(f"topics {unmatched} were not matched with the node within {timeout_s:.0f} s "
                                    "(different ROS_DOMAIN_ID, or the node subscribes to other names?)")
            time.sleep(0.05)

    def close(self) -> None:
        with self.lock:  # no write into the output bag after this, even from a late callback
            self._sink = None
        self.executor.shutdown()
        self._thread.join(timeout=5.0)
        self.node.destroy_node()
        self._rclpy.try_shutdown(context=self.context)


def _transition(player: Player, node: NodeProcess, setup: ReplaySetup, transition_id: int, label: str,
                timeout_s: float, clock_ns: int) -> None:
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState

    name = setup.output_topic("~/change_state")
    response = player.call(ChangeState, name, ChangeState.Request(transition=Transition(id=transition_id)),
                           timeout_s, node, clock_ns)
    if not response.success:
        raise RealtimeError(f"the node refused to {label}; its output ends with:\n{node.log_tail()}")


def _sleep_until(player: Player, t_ns: int) -> None:
    assert player.wall0 is not None
    delay = player.wall0 + (t_ns - player.t0_ns) / NS_PER_S / player.rate - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


def _advance_clock(player: Player, from_ns: int, bag_s: float, clock_hz: float) -> None:
    """/clock from `from_ns` on for `bag_s` seconds of bag time, at the playback rate."""
    step_ns = int(NS_PER_S / clock_hz)
    start = time.perf_counter()
    for k in range(1, int(bag_s * clock_hz) + 1):
        delay = start + k * step_ns / NS_PER_S / player.rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        player.publish_clock(from_ns + k * step_ns)


def _play(player: Player, bag: InputBag, topics: dict[str, str], options: RealtimeOptions, node: NodeProcess,
          progress: Progress) -> int:
    """Publish every input message at its bag time; returns the last bag time played."""
    clock_step_ns = int(NS_PER_S / options.clock_hz)
    player.wall0 = time.perf_counter()
    next_clock_ns = player.t0_ns
    last_ns = player.t0_ns
    for count, (topic, _, t_ns, raw) in enumerate(bag.raw_messages(list(topics))):
        while next_clock_ns < t_ns:
            _sleep_until(player, next_clock_ns)
            player.publish_clock(next_clock_ns)
            next_clock_ns += clock_step_ns
        _sleep_until(player, t_ns)
        player.publish_clock(t_ns)
        player.publishers[topics[topic]].publish(raw)
        last_ns = t_ns
        if count % 100 == 0:
            node.check_alive("playback")
        progress.update((t_ns - player.t0_ns) / NS_PER_S, f"{player.chunk_count} chunks")
    return last_ns


def _summarize(summary: ReplaySummary, player: Player, setup: ReplaySetup) -> None:
    """Chunks and latencies from the recording; ticks, holds and node timings from its /diagnostics."""
    store = typestore()
    stamps, receipts = [], []
    reports: list[dict[str, str]] = []
    node_fqn = setup.output_topic(setup.node_name)
    status_name = diagnostics_status_name(node_fqn)
    for topic, msgtype, t_ns, raw in player.records:
        if msgtype == HEADER_TYPE:
            msg = decode_cdr(raw, msgtype, store)
            stamps.append(msg.stamp.sec * NS_PER_S + msg.stamp.nanosec)
        elif msgtype == FLOAT32_MULTI_ARRAY_TYPE:
            receipts.append(t_ns)
        elif msgtype == DIAGNOSTIC_ARRAY_TYPE:
            for status in decode_cdr(raw, msgtype, store).status:
                if status.name == status_name and status.hardware_id == node_fqn:
                    reports.append({kv.key: kv.value for kv in status.values})
    summary.chunks = len(receipts)
    summary.latencies_ms["observation_to_receipt"] = [
        (r - s) / 1e6 for s, r in zip(stamps, receipts)]
    seen_reasons: dict[str, int] = {}
    for values in reports:
        reason = values.get("last_hold_reason", "")
        if reason:
            seen_reasons[reason] = seen_reasons.get(reason, 0) + 1
    # The node's last status at SIGINT ("shut down") carries no counters: the loop's latest report does.
    loop_reports = [values for values in reports if "ticks" in values]
    if loop_reports:
        last = loop_reports[-1]
        summary.ticks = int(last.get("ticks", 0))
        summary.skipped_ticks = int(last.get("skipped_ticks", 0))
        held = int(last.get("holds", 0))
        if "chunks_published" in last:  # the rest of its ticks waited on the chunk schedule
            summary.waited_ticks = max(0, summary.ticks - held - int(last["chunks_published"]))
        # /diagnostics shows only the latest hold reason: split the node's hold count over the
        # reasons in proportion to the reports that showed them.
        total_seen = sum(seen_reasons.values())
        assigned = 0
        for reason, n in sorted(seen_reasons.items(), key=lambda item: -item[1]):
            share = min(held - assigned, max(1, round(held * n / total_seen)))
            if share > 0:
                kind = reason_kind(reason)
                summary.holds[kind] += share
                summary.hold_examples.setdefault(kind, reason)
                assigned += share
        if held > assigned:  # a hold followed by a chunk before the next report leaves no reason
            summary.holds[UNREPORTED_HOLD] += held - assigned
        # /diagnostics counts refused inputs per source (with only the latest reason): without these
        # the summary's input_rejections would read "none" whatever the node refused.
        for key, value in last.items():
            if key.startswith("input_errors.") and int(value) > 0:
                summary.input_rejections[f"{key[len('input_errors.'):]}: {UNREPORTED_INPUT_ERROR}"] += int(value)
        summary.safety = {key[len("safety."):]: int(value) for key, value in last.items() if key.startswith("safety.")}
        node_latency: dict[str, dict[str, float]] = {}
        for key, value in last.items():
            if key.startswith("latency_") and key.endswith("_ms"):
                stage, _, pct = key[len("latency_"):-len("_ms")].rpartition("_")
                node_latency.setdefault(stage, {})[pct] = float(value)
        # The report after deactivation keeps the counters but shows 0 Hz: the rate is the last active one.
        # Per second of the node's clock, which is sim time (/clock: bag time), not wall time: at
        # --rate 0.5 the node that keeps 5 Hz of bag time publishes 2.5 chunks a wall second.
        active = [values for values in loop_reports if values.get("active") == "True"]
        rate_hz = float(active[-1].get("achieved_rate_hz", 0.0)) if active else 0.0
        summary.extra["node_diagnostics"] = {"achieved_rate_hz": rate_hz,
                                             "observation_errors": int(last.get("observation_errors", 0)),
                                             "last_input_error": last.get("last_input_error", ""),
                                             "holds": held, "latency_ms": node_latency}
    summary.extra["hold_reasons_counted_from"] = "diagnostics reports (the node's hold count split over them)"


def replay_realtime(bag_path: str | Path, out_path: str | Path, setup: ReplaySetup, options: RealtimeOptions,
                    overwrite: bool = False, progress: bool = False) -> tuple[ReplaySummary, NodeConfig, float]:
    """Play the bag to a node started here; returns the summary, the node's resolved config and its
    action period."""
    if not (math.isfinite(options.rate) and options.rate > 0):
        raise ConfigError(f"rate: expected a finite factor > 0, found {options.rate}")
    config = resolved_config(setup)
    period_s = configured_profile(setup.config.policy).action_period_s
    summary = ReplaySummary("realtime", str(bag_path), str(out_path), config.control.control_rate_hz)
    summary.extra["rate"] = options.rate
    check_output_path(out_path, overwrite)
    with InputBag(bag_path) as bag, tempfile.TemporaryDirectory(prefix="pi0_replay_") as tmp:
        present = bag.check(setup.inputs)
        topics = {t.bag_topic: t.node_topic for t in present}
        first_ns = next(bag.raw_messages(list(topics)))[2]
        log_path = Path(options.node_log) if options.node_log else Path(tmp) / "node.log"
        # Staged: a failed replay leaves no output (OutputBag).
        with OutputBag(out_path, distro=options.distro, overwrite=overwrite) as out:
            for topic, msgtype in recorded_types(setup).items():
                out.add_topic(topic, msgtype)

            def write(topic: str, msgtype: str, t_ns: int, raw: bytes) -> None:
                out.write(topic, msgtype, t_ns, canonical_cdr(raw, msgtype, out.store))

            input_types = {t.node_topic: t.msgtype for t in present}
            _run_node(summary, setup, options, bag, topics, input_types, first_ns, log_path, write, progress)
    return summary, config, period_s


def _run_node(summary: ReplaySummary, setup: ReplaySetup, options: RealtimeOptions, bag: InputBag,
              topics: dict[str, str], input_types: dict[str, str], first_ns: int, log_path: Path,
              sink: Callable[[str, str, int, bytes], None], progress: bool) -> None:
    """Start the node, play the bag to it at bag timing, stop it and summarize what it published;
    every message it publishes also goes to `sink` as it arrives."""
    from lifecycle_msgs.msg import Transition

    config = resolved_config(setup)
    player = Player(setup, input_types, options.rate, sink)
    node: NodeProcess | None = None
    try:
        player.t0_ns = summary.start_ns = first_ns
        node = NodeProcess(setup, options, log_path)
        _transition(player, node, setup, Transition.TRANSITION_CONFIGURE, "configure",
                    options.startup_timeout_s, first_ns)
        _transition(player, node, setup, Transition.TRANSITION_ACTIVATE, "activate", 30.0, first_ns)
        player.wait_matched(30.0, node)
        meter = Progress("replay (realtime)", (bag.end_ns - first_ns) / NS_PER_S, enabled=progress)
        summary.end_ns = _play(player, bag, topics, options, node, meter)
        time.sleep(options.drain_s)
        _transition(player, node, setup, Transition.TRANSITION_DEACTIVATE, "deactivate", 30.0, summary.end_ns)
        # The node's /diagnostics timer runs on sim time: move the clock on (the node is inactive
        # now, so nothing else happens) until it has reported its final counters.
        _advance_clock(player, summary.end_ns, config.diagnostics_period_s * 1.5 + 0.1, options.clock_hz)
        meter.finish(f"{player.chunk_count} chunks")
    finally:
        if node is not None:
            node.stop()
        player.close()
    if player.sink_error is not None:
        raise RealtimeError(f"writing the output bag failed: {player.sink_error!r}") from player.sink_error
    _summarize(summary, player, setup)

"""`pi0-policy load-bench`: the node's control rate under sensor load (issue 8), as JSON.

The node runs in this process from a parameter file (default config/demo.yaml: the tiny pi0.5 with
random weights, eager on the CPU), spun by the executor `main()` uses (`make_executor`). A load
robot (ros/load_robot.py) in a child process publishes the node's cameras and joint_states; an
observer node in this process records the chunk stamps the node publishes and its /diagnostics.

Three phases, one robot process each; the first `warmup_s` of each is not measured, and the first
phase starts with `settle_s` of unmeasured control: the eager model gets faster over its first
minutes (allocator and caches warming; RSS grows for ~3 minutes, see the soak), and that drift
would otherwise count against or for the load.
1. unloaded: cameras at 15 Hz, joint_states at 50 Hz (ordinary rates), `unloaded_s`;
2. loaded: cameras at 60 Hz, joint_states at 1 kHz, `loaded_s` (default 60 s);
3. unloaded again, `unloaded_s` (`unloaded_after=False` skips it). The unloaded rate is that of phases 1 and 3 together,
   so that a drift of the machine's speed over the run (a small VM's neighbours, the eager model's
   allocator settling) does not count as load.

Per phase: the control rate (chunk stamps received), the inputs the node took per second, their
receipt delay as the node reports it (callback time minus header stamp, over windows of its last
256 samples per source: p50 and p90 are the medians of the windows reported during the phase, p99
their maximum), every latency it reports (medians of the windows: decode, infer and its policy /
engine parts, plan, tick), and CPU in cores: this process, the robot, and the rest of the machine.
A busy neighbour on a small machine skews every number, so `other` is reported to tell. RSS and thread count are sampled every 2 s
through the loaded phase. The verdict is the issue's: loaded rate >= 0.95 x unloaded rate.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.context import Context
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.node import Node
from rclpy.parameter import Parameter
from std_msgs.msg import Header

from pi0_policy_ros.errors import ConfigError
from pi0_policy_ros.jsonout import json_text, prepare_output_file
from pi0_policy_ros.ros.demo import check_params_file, default_params_file
from pi0_policy_ros.ros.load_robot import LoadRobot, LoadSpec
from pi0_policy_ros.ros.node import (PolicyFactory, PolicyNode, finish_callbacks, forward_package_logging,
                                     make_executor, spin_until_shutdown, stop_forwarding_package_logging)
from pi0_policy_ros.ros.params import (BOOL, DOUBLE, INTEGER, SPECS, STRING, check_parameter_names,
                                      diagnostics_status_name)
from pi0_policy_ros.ros.qos import CHUNK_QOS, DIAGNOSTICS_READER_QOS
from pi0_policy_ros.soak import proc_status_value

REQUIRED_RATIO = 0.95
SAMPLE_S = 2.0


@dataclass(frozen=True)
class Rates:
    camera_hz: float
    joint_hz: float


UNLOADED = Rates(camera_hz=15.0, joint_hz=50.0)
LOADED = Rates(camera_hz=60.0, joint_hz=1000.0)


@dataclass
class PhaseResult:
    """One phase. chunks / rate_hz: over `measured_s`; inputs_received / inputs_per_s: what the node
    took, between its first and last /diagnostics report of the phase; sent: what the robot sent in
    its whole run (warm-up included); latencies in ms; cpu in cores."""

    name: str
    camera_rate_hz: float
    joint_rate_hz: float
    measured_s: float = 0.0
    chunks: int = 0
    rate_hz: float = 0.0
    inputs_received: dict[str, int] = field(default_factory=dict)
    inputs_per_s: dict[str, float] = field(default_factory=dict)
    sent: dict[str, int] = field(default_factory=dict)
    receipt_delay_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    latency_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    holds: int = 0
    holds_by_kind: dict[str, int] = field(default_factory=dict)
    input_errors: int = 0
    cpu_cores: dict[str, float] = field(default_factory=dict)


@dataclass
class LoadBenchResult:
    """ratio: loaded rate / unloaded rate (chunks over the measured seconds of both unloaded phases)."""

    params: str
    overrides: dict[str, Any]
    unloaded: PhaseResult
    loaded: PhaseResult
    unloaded_after: PhaseResult | None = None
    unloaded_rate_hz: float = 0.0
    ratio: float = 0.0
    required_ratio: float = REQUIRED_RATIO
    passed: bool = False
    rss_mib: list[float] = field(default_factory=list)
    threads: list[int] = field(default_factory=list)


class Observer(Node):
    """Chunk stamp arrivals (monotonic s) and the policy node's /diagnostics values, in this process."""

    def __init__(self, policy_node: PolicyNode, context: Context) -> None:
        super().__init__("load_bench_observer", namespace=policy_node.get_namespace(), context=context)
        self._lock = threading.Lock()
        self._arrivals: list[float] = []
        self._reports: list[tuple[float, dict[str, str]]] = []
        self._hardware_id = policy_node.get_fully_qualified_name()
        self._status_name = diagnostics_status_name(self._hardware_id)
        self.create_subscription(Header, f"{policy_node.get_name()}/action_chunk_stamp", self._on_stamp, CHUNK_QOS)
        self.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, DIAGNOSTICS_READER_QOS)

    def _on_stamp(self, msg: Header) -> None:
        with self._lock:
            self._arrivals.append(time.monotonic())

    def _on_diagnostics(self, msg: DiagnosticArray) -> None:
        now = time.monotonic()
        for status in msg.status:
            if status.name == self._status_name and status.hardware_id == self._hardware_id:
                with self._lock:
                    self._reports.append((now, {kv.key: kv.value for kv in status.values}))

    def chunks_between(self, start: float, end: float) -> int:
        with self._lock:
            return sum(start <= t < end for t in self._arrivals)

    def reports_between(self, start: float, end: float) -> list[tuple[float, dict[str, str]]]:
        """(arrival time, values) of the reports received in [start, end)."""
        with self._lock:
            return [(t, values) for t, values in self._reports if start <= t < end]


class CpuClock:
    """CPU seconds of this process, of a child process, and of the whole machine (Linux /proc)."""

    def __init__(self, child_pid: int | None) -> None:
        self._child_pid = child_pid
        self._tick_s = 1.0 / os.sysconf("SC_CLK_TCK")

    def read(self) -> tuple[float, float, float, float]:
        """(wall, this process, child, machine busy) in seconds."""
        times = os.times()
        child = 0.0
        if self._child_pid is not None:
            try:
                with open(f"/proc/{self._child_pid}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
                child = (int(fields[11]) + int(fields[12])) * self._tick_s  # utime, stime
            except OSError:
                child = 0.0
        with open("/proc/stat") as stat:
            cpu = [int(v) for v in stat.readline().split()[1:]]
        busy = (sum(cpu) - cpu[3] - cpu[4]) * self._tick_s  # all but idle and iowait
        return time.monotonic(), times.user + times.system, child, busy

    @staticmethod
    def cores(start: tuple[float, ...], end: tuple[float, ...]) -> dict[str, float]:
        wall = end[0] - start[0]
        node, robot, busy = ((e - s) / wall for s, e in zip(start[1:], end[1:]))
        return {"node_process": round(node, 3), "robot": round(robot, 3),
                "other": round(max(0.0, busy - node - robot), 3)}


def _growth(first: dict[str, str], last: dict[str, str], key: str) -> int:
    """How much the counter `key` grew from one /diagnostics report to a later one (absent = 0)."""
    return int(last.get(key, "0") or 0) - int(first.get(key, "0") or 0)


def _hold_kinds(first: dict[str, str], last: dict[str, str]) -> dict[str, int]:
    """The holds of each kind between two reports (`holds.<kind>` counters), the kinds that occurred."""
    kinds = sorted({key[len("holds."):] for key in (*first, *last) if key.startswith("holds.")})
    deltas = {kind: _growth(first, last, f"holds.{kind}") for kind in kinds}
    return {kind: n for kind, n in deltas.items() if n}


def _summarise(reports: list[tuple[float, dict[str, str]]], prefix: str) -> dict[str, dict[str, float]]:
    """`<prefix><name>_p50_ms` etc. over the reports -> name -> {p50: median, p90: median, p99: max}."""
    by_name: dict[str, dict[str, list[float]]] = {}
    for _, values in reports:
        for key, value in values.items():
            if key.startswith(prefix) and key.endswith("_ms"):
                name, quantile = key[len(prefix):-len("_ms")].rsplit("_", 1)
                by_name.setdefault(name, {}).setdefault(quantile, []).append(float(value))
    out = {}
    for name, quantiles in sorted(by_name.items()):
        out[name] = {q: round(max(v) if q == "p99" else statistics.median(v), 3) for q, v in sorted(quantiles.items())}
    return out


def _phase(name: str, rates: Rates, seconds: float, warmup_s: float, node: PolicyNode, observer: Observer,
           on_sample: Any = None) -> PhaseResult:
    config = node.config
    assert config is not None
    result = PhaseResult(name, rates.camera_hz, rates.joint_hz)
    spec = LoadSpec(config.cameras, config.joint_names, node.get_namespace(), warmup_s + seconds + 1.0,
                    rates.camera_hz, rates.joint_hz)
    robot = LoadRobot(spec).start()
    try:
        robot.wait_started()
        clock = CpuClock(robot.pid())
        time.sleep(warmup_s)
        start, cpu0 = time.monotonic(), clock.read()
        while time.monotonic() < start + seconds:
            if on_sample is not None:
                on_sample()
            time.sleep(min(SAMPLE_S, max(0.0, start + seconds - time.monotonic())))
        end, cpu1 = time.monotonic(), clock.read()
        report = robot.finish()
    finally:
        robot.stop()
    reports = observer.reports_between(start, end)
    result.measured_s = round(end - start, 3)
    result.chunks = observer.chunks_between(start, end)
    result.rate_hz = round(result.chunks / (end - start), 4)
    result.sent = {"images": report.images_sent, "joint_states": report.joint_states_sent}
    result.cpu_cores = CpuClock.cores(cpu0, cpu1)
    if len(reports) >= 2:  # counters: from the first to the last report of the phase
        (t_first, first), (t_last, last) = reports[0], reports[-1]
        sources = [c.name for c in config.cameras] + ["joint_states"]
        result.inputs_received = {s: _growth(first, last, f"inputs.{s}") for s in sources}
        result.inputs_per_s = {s: round(n / (t_last - t_first), 2) for s, n in result.inputs_received.items()}
        result.holds = _growth(first, last, "holds")
        result.holds_by_kind = _hold_kinds(first, last)
        result.input_errors = _growth(first, last, "observation_errors")
    result.receipt_delay_ms = _summarise(reports, "input_delay_")
    # every timing the node reports: decode, infer, plan, tick and the policy's and engine's parts
    result.latency_ms = _summarise(reports, "latency_")
    return result


def run_load_bench(params_file: str | Path, loaded_s: float = 60.0, unloaded_s: float = 30.0,
                   warmup_s: float = 3.0, settle_s: float = 60.0, unloaded_after: bool = True,
                   overrides: dict[str, Any] | None = None,
                   policy_factory: PolicyFactory | None = None, namespace: str = "") -> LoadBenchResult:
    """The phases against a node configured from `params_file` (+ `overrides`), in its own context.

    Raises ConfigError when the node fails to configure or activate (the reason is in its log).
    """
    check_params_file(params_file)
    for name, value in (("seconds", loaded_s), ("unloaded_s", unloaded_s)):
        if not value > 0:
            raise ConfigError(f"{name}: expected > 0 s, found {value}")
    for name, value in (("warmup_s", warmup_s), ("settle_s", settle_s)):
        if not value >= 0:
            raise ConfigError(f"{name}: expected >= 0 s, found {value}")
    for name, value in (("seconds", loaded_s), ("unloaded_s", unloaded_s), ("warmup_s", warmup_s),
                        ("settle_s", settle_s)):
        # A phase of inf s never ends, and time.sleep(inf) overflows after the node has started.
        if not math.isfinite(value):
            raise ConfigError(f"{name}: expected a finite number of seconds, found {value}")
    overrides = dict(overrides or {})
    context = Context()
    rclpy.init(context=context)
    executor = make_executor(context)
    node = PolicyNode(namespace=namespace, context=context, policy_factory=policy_factory,
                      cli_args=["--ros-args", "--params-file", str(params_file)],
                      parameter_overrides=[Parameter(k, value=v) for k, v in overrides.items()])
    observer = Observer(node, context)
    stop = threading.Event()
    spinner = threading.Thread(target=spin_until_shutdown, args=(executor, stop), name="load_bench_spin",
                               daemon=True)
    # The policy's lines on /rosout, as the node's main() does, at this process's level (--log-level);
    # here, so that the finally below always takes it away again.
    log_handler = forward_package_logging(node.get_logger(), logging.getLogger().getEffectiveLevel())
    try:
        executor.add_node(node)
        executor.add_node(observer)
        spinner.start()
        if node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
            raise ConfigError(f"the policy node failed to configure with {params_file} (see its log)")
        if node.trigger_activate() != TransitionCallbackReturn.SUCCESS:
            raise ConfigError("the policy node failed to activate (see its log)")
        unloaded = _phase("unloaded", UNLOADED, unloaded_s, max(warmup_s, settle_s), node, observer)
        rss_mib: list[float] = []
        threads: list[int] = []

        def sample() -> None:
            rss_mib.append(round(proc_status_value("VmRSS") / 1024.0, 1))
            threads.append(proc_status_value("Threads"))

        loaded = _phase("loaded", LOADED, loaded_s, warmup_s, node, observer, on_sample=sample)
        after = _phase("unloaded_after", UNLOADED, unloaded_s, warmup_s, node, observer) if unloaded_after else None
        node.trigger_deactivate()
    finally:
        stop.set()
        if spinner.ident is not None:  # started
            spinner.join(timeout=5.0)
        finish_callbacks(executor, node.get_logger())
        executor.shutdown()
        node._release()
        stop_forwarding_package_logging(log_handler)
        node.destroy_node()
        observer.destroy_node()
        rclpy.try_shutdown(context=context)
    reference = [p for p in (unloaded, after) if p is not None]
    unloaded_hz = sum(p.chunks for p in reference) / sum(p.measured_s for p in reference)
    ratio = loaded.rate_hz / unloaded_hz if unloaded_hz > 0 else 0.0
    return LoadBenchResult(params=str(params_file), overrides=overrides, unloaded=unloaded, loaded=loaded,
                           unloaded_after=after, unloaded_rate_hz=round(unloaded_hz, 4), ratio=round(ratio, 4),
                           passed=ratio >= REQUIRED_RATIO, rss_mib=rss_mib, threads=threads)


_SCALARS = {DOUBLE: float, INTEGER: int, STRING: str}


def _override(text: str) -> tuple[str, Any]:
    """NAME=VALUE for a scalar node parameter, VALUE converted to the parameter's type (rclpy refuses
    an integer for a double parameter)."""
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE with a node parameter NAME, found {text!r}")
    try:
        check_parameter_names([name], "--set")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    spec = SPECS.get(name)
    if spec is None:  # rclpy's own (use_sim_time, ...): not for this bench
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE with a node parameter NAME, found {text!r}")
    if spec.kind == BOOL:
        if value.lower() not in ("true", "false"):
            raise argparse.ArgumentTypeError(f"{name}: expected true or false, found {value!r}")
        return name, value.lower() == "true"
    if spec.kind not in _SCALARS:
        raise argparse.ArgumentTypeError(f"{name}: array parameters go in the parameter file")
    try:
        return name, _SCALARS[spec.kind](value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name}: expected a {spec.kind}, found {value!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default=None, help="parameter file (default: the package's config/demo.yaml)")
    parser.add_argument("--seconds", type=float, default=60.0, help="measured seconds of the loaded phase (default 60)")
    parser.add_argument("--unloaded-s", type=float, default=30.0,
                        help="measured seconds of each unloaded phase, before and after the loaded one (default 30)")
    parser.add_argument("--warmup-s", type=float, default=3.0, help="unmeasured start of each phase (default 3)")
    parser.add_argument("--settle-s", type=float, default=60.0,
                        help="unmeasured control before the first phase, for the model to warm up (default 60)")
    parser.add_argument("--set", type=_override, action="append", default=[], metavar="NAME=VALUE",
                        help="override a node parameter, e.g. --set control_rate_hz=10 (repeatable)")
    parser.add_argument("--json", default=None, help="write the result here")


def run(args: argparse.Namespace) -> int:
    params = Path(args.params) if args.params else default_params_file("demo.yaml")
    try:
        prepare_output_file(args.json)
        result = run_load_bench(params, loaded_s=args.seconds, unloaded_s=args.unloaded_s,
                                warmup_s=args.warmup_s, settle_s=args.settle_s, overrides=dict(args.set))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    document = {**asdict(result), "host": platform.node(), "cpus": os.cpu_count(),
                "python": platform.python_version()}
    text = json_text(document)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    delay = result.loaded.receipt_delay_ms.get("joint_states", {})
    print(f"control rate {result.unloaded_rate_hz:.2f} Hz unloaded, {result.loaded.rate_hz:.2f} Hz loaded "
          f"({result.ratio:.1%}; required {REQUIRED_RATIO:.0%}); joint_states taken "
          f"{result.loaded.inputs_per_s.get('joint_states', 0):.0f}/s, receipt delay p90 {delay.get('p90', float('nan'))} ms"
          f" -> {'PASS' if result.passed else 'FAIL'}")
    return 0 if result.passed else 1

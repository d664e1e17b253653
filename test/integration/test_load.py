"""Load and lifecycle faults (issue 8).

- Load: `run_load_bench` (pi0_policy_ros/load_bench.py, also `pi0-policy load-bench`) with the CPU
  demo's parameters (config/demo.yaml: the tiny pi0.5 with random weights, eager on the CPU,
  cpu_threads 1, 3 JPEG cameras, 14 joints). The node runs in this process on main()'s executor; a
  load robot in a child process sends 3 cameras at 60 Hz and joint_states at 1 kHz for
  `PI0_LOAD_TEST_S` (default 60 s), between two unloaded phases at 15 Hz / 50 Hz. Bounds are
  generous, as a shared 2-core machine is noisy; the precise numbers come from the command
  (bench/results/load_cpu.md). Before the sensor poller (ros/poller.py) the executor ran one
  callback per message: the loaded rate fell to 3-16 % of the unloaded one (45-58 % on a busy
  machine) and it took 410-670 of the 1,000 joint states a second. The input checks below are
  what tell that regression apart; the rate bound is the looser one. A CI machine half as fast
  as the development VM (1.85 Hz unloaded) gave 75 %: there the sensor traffic's ~0.3 core costs
  the inference thread more, and 7 chunks expired, because demo.yaml's 1 s chunk (50 x 0.02 s)
  does not outlast a 0.8 s inference. The test lengthens the action period (2.5 s chunks) so that
  a slow machine's chunks do not expire: then every hold is one the load caused.
- Lifecycle: deactivate / activate 100 times: RSS and thread count stay flat.
"""

from __future__ import annotations

import argparse
import os
import time

import pytest
from rclpy.lifecycle import TransitionCallbackReturn

from test.integration.harness import wait_for
from test.paths import REPO_ROOT
from pi0_policy_ros.load_bench import LOADED, _hold_kinds, _override, _summarise, run_load_bench
from pi0_policy_ros.soak import proc_status_value

SUCCESS = TransitionCallbackReturn.SUCCESS
LOAD_S = float(os.environ.get("PI0_LOAD_TEST_S", "60"))
UNLOADED_S = 10.0
SETTLE_S = 10.0  # the bench settles 60 s; the generous bounds need less
MIN_RATIO = 0.6  # loaded / unloaded control rate: the 0.95 is the bench's verdict
OVERRIDES = {"device": "cpu", "profile_action_period_s": 0.05}  # 50 actions: a 2.5 s chunk
DEMO = REPO_ROOT / "config" / "demo.yaml"


def test_control_rate_holds_under_sensor_load_with_the_tiny_model(record_property) -> None:
    result = run_load_bench(DEMO, loaded_s=LOAD_S, unloaded_s=UNLOADED_S, settle_s=SETTLE_S,
                            overrides=OVERRIDES, namespace=f"/load{os.getpid()}")
    loaded = result.loaded
    record_property("unloaded_rate_hz", result.unloaded_rate_hz)
    record_property("loaded_rate_hz", loaded.rate_hz)
    print(f"control rate: {result.unloaded_rate_hz:.2f} Hz unloaded, {loaded.rate_hz:.2f} Hz loaded "
          f"({result.ratio:.0%}); taken/s {loaded.inputs_per_s}; receipt delay {loaded.receipt_delay_ms}; "
          f"cpu {loaded.cpu_cores}; RSS MiB {result.rss_mib}")
    assert result.unloaded_rate_hz > 1.0, result  # the model runs at all (demo.yaml asks 5 Hz; 1.85-3.8 Hz on 2 cores)
    assert result.ratio >= MIN_RATIO, result
    # Callbacks keep up: nearly every input is taken (the executor managed 410-670 joint states/s) ...
    assert loaded.inputs_per_s["joint_states"] >= 0.8 * LOADED.joint_hz, loaded
    cameras = [name for name in loaded.inputs_per_s if name != "joint_states"]
    assert len(cameras) == 3 and all(loaded.inputs_per_s[c] >= 0.8 * LOADED.camera_hz for c in cameras), loaded
    # ... within a few milliseconds of its stamp (receipt delay; the poller wakes every 2 ms) ...
    for source in ["joint_states", *cameras]:
        assert loaded.receipt_delay_ms[source]["p90"] < 50.0, (source, loaded.receipt_delay_ms)
    # ... in order and fresh: no input refused, no hold.
    assert loaded.input_errors == 0 and loaded.holds == 0, (loaded.holds_by_kind, loaded)
    # Bounded: DDS keeps the last 5 per topic and the node only the latest sample, so memory levels
    # off. The eager model's allocations swing RSS by up to ~180 MiB between 2 s samples, so this
    # compares the means of the first and last thirds of the loaded phase, and only catches gross
    # growth (every message kept as a Python object, several MiB/s). The memory test is the soak.
    third = max(1, len(result.rss_mib) // 3)
    first, last = result.rss_mib[:third], result.rss_mib[-third:]
    assert sum(last) / len(last) - sum(first) / len(first) < 100.0, result.rss_mib
    assert max(result.threads) <= result.threads[0] + 1, result.threads  # (other tests' threads may end)


def test_load_bench_summaries_and_overrides() -> None:
    reports = [(0.0, {"input_delay_cam_a_p50_ms": "1.0", "input_delay_cam_a_p99_ms": "9.0", "holds": "0"}),
               (0.5, {"input_delay_cam_a_p50_ms": "3.0", "input_delay_cam_a_p99_ms": "4.0"}),
               (1.0, {"input_delay_cam_a_p50_ms": "2.0", "input_delay_cam_a_p99_ms": "5.0"})]
    assert _summarise(reports, "input_delay_") == {"cam_a": {"p50": 2.0, "p99": 9.0}}  # median, max
    first = {"holds": "3", "holds.stale_input": "2", "holds.expired_chunk": "1"}
    last = {"holds": "7", "holds.stale_input": "2", "holds.expired_chunk": "3", "holds.missing_input": "2"}
    assert _hold_kinds(first, last) == {"expired_chunk": 2, "missing_input": 2}  # only kinds that grew
    overrides = [_override(t) for t in ("control_rate_hz=10", "seed=3", "autostart=True", "prompt=a=b")]
    assert overrides == [("control_rate_hz", 10.0), ("seed", 3), ("autostart", True), ("prompt", "a=b")]
    assert isinstance(overrides[0][1], float)  # rclpy refuses an integer for a double parameter
    for bad in ("control_rate_hz", "no_such_parameter=1", "seed=3.5", "autostart=yes", "camera_names=a"):
        with pytest.raises(argparse.ArgumentTypeError):
            _override(bad)


def test_deactivate_activate_100_times_leaks_nothing(make_node, probe, executor) -> None:
    node = make_node()
    assert node.trigger_configure() == SUCCESS

    def cycle(n: int) -> None:
        for _ in range(n):
            assert node.trigger_activate() == SUCCESS
            assert node.trigger_deactivate() == SUCCESS

    def threads() -> int:
        # The session executor's pool starts its (at most 4) workers on demand, one now and then
        # during the cycles: bounded, not a leak, so not counted.
        return proc_status_value("Threads") - len(executor._executor._threads)

    cycle(10)  # warm-up: first-use allocations
    time.sleep(0.2)
    rss_kb, threads_before = proc_status_value("VmRSS"), threads()
    cycle(100)
    time.sleep(0.2)
    assert threads() <= threads_before, (threads(), threads_before)
    assert proc_status_value("VmRSS") - rss_kb < 4_000, (rss_kb, proc_status_value("VmRSS"))
    assert node.trigger_activate() == SUCCESS  # and it still works
    wait_for(lambda: probe.counts()[0] >= 1)

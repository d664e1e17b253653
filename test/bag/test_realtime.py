"""Real-time replay through a real node process over DDS on loopback (domain per test process)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rclpy")

from rosbags.highlevel import AnyReader  # noqa: E402

from pi0_policy_ros.bag.replay import main  # noqa: E402

pytestmark = pytest.mark.ros


def test_realtime_replay_through_the_node(make_bag, params_file: Path, tmp_path: Path, capsys) -> None:
    bag = make_bag("realtime", 3.0)
    out, report = tmp_path / "out", tmp_path / "report"
    # Half speed: the node's CPU inference then costs half as much bag time, so a shared 2-core CI
    # machine still leaves it room to keep up.
    rate = 0.5
    code = main([str(bag), "--params", str(params_file), "--out", str(out), "--realtime", "--report", str(report),
                 "--rate", str(rate), "--quiet", "--node-log", str(tmp_path / "node.log")])
    assert code == 0, capsys.readouterr().err + (tmp_path / "node.log").read_text()
    summary = json.loads((report / "summary.json").read_text())

    # The output bag reads back with plain rosbags.
    with AnyReader([out]) as reader:
        counts = {c.topic: c.msgcount for c in reader.connections}
        chunk_conns = [c for c in reader.connections if c.topic == "/pi0_policy/action_chunk_stamp"]
        stamps = [reader.deserialize(raw, c.msgtype) for c, _, raw in reader.messages(chunk_conns)]
    chunks = counts["/pi0_policy/action_chunk"]
    assert counts["/pi0_policy/action_chunk_stamp"] == counts["/pi0_policy/joint_trajectory"] == chunks
    assert counts["/diagnostics"] > 0
    assert [s.frame_id for s in stamps] == [str(i) for i in range(chunks)]
    stamp_s = np.array([s.stamp.sec + s.stamp.nanosec * 1e-9 for s in stamps])
    assert np.all(np.diff(stamp_s) > 0) and stamp_s[0] >= summary["bag_start_s"]  # bag time, not wall time

    # As many chunks as the achieved rate allows: at most one per control period of bag time, and at
    # least half of what the node's measured inference time permits (the CPU is shared). Inference
    # takes wall time; at `rate` a wall second is `rate` bag seconds.
    duration_s, target_hz = summary["duration_s"], summary["target_rate_hz"]
    infer_p90_s = summary["node_diagnostics"]["latency_ms"]["infer"]["p90"] / 1e3
    possible_hz = min(target_hz, 1.0 / (infer_p90_s * rate))
    assert summary["chunks"] == chunks >= 1
    assert chunks <= duration_s * target_hz + 1
    assert chunks >= 0.5 * possible_hz * duration_s - 1
    assert summary["achieved_rate_hz"] == pytest.approx(chunks / duration_s)
    assert summary["ticks"] >= chunks  # the node's own count, from its final /diagnostics report


def test_the_recorder_streams_to_the_sink_and_keeps_only_the_summarys_share(params_file: Path) -> None:
    # A long real-time replay must not hold every chunk in memory: each message goes to the sink
    # (the output bag) as it arrives; the summary keeps stamps, /diagnostics and chunk receipt times.
    from pi0_policy_ros.bag.inputs import (DIAGNOSTIC_ARRAY_TYPE, FLOAT32_MULTI_ARRAY_TYPE, HEADER_TYPE,
                                           JOINT_TRAJECTORY_TYPE, make_setup)
    from pi0_policy_ros.bag.realtime import Player

    sunk: list[tuple[str, str, int, bytes]] = []
    player = Player(make_setup(params_file), {}, 1.0, lambda *record: sunk.append(record))
    try:
        for topic, msgtype in (("/c", FLOAT32_MULTI_ARRAY_TYPE), ("/t", JOINT_TRAJECTORY_TYPE),
                               ("/s", HEADER_TYPE), ("/diagnostics", DIAGNOSTIC_ARRAY_TYPE)):
            player._recorder(topic, msgtype)(b"payload-" + topic.encode())
    finally:
        player.close()
    player._recorder("/t", JOINT_TRAJECTORY_TYPE)(b"late")  # a callback after close writes nothing
    assert [(topic, raw) for topic, _, _, raw in sunk] == [
        ("/c", b"payload-/c"), ("/t", b"payload-/t"), ("/s", b"payload-/s"), ("/diagnostics", b"payload-/diagnostics")]
    assert [(topic, raw) for topic, _, _, raw in player.records] == [
        ("/c", b""), ("/s", b"payload-/s"), ("/diagnostics", b"payload-/diagnostics")]
    assert player.chunk_count == 1

    def broken(*_: object) -> None:
        raise ValueError("bad CDR")

    failing = Player(make_setup(params_file), {}, 1.0, broken)
    try:
        failing._recorder("/t", JOINT_TRAJECTORY_TYPE)(b"x")  # caught here, not in the executor thread
        failing._recorder("/t", JOINT_TRAJECTORY_TYPE)(b"y")
    finally:
        failing.close()
    assert isinstance(failing.sink_error, ValueError) and str(failing.sink_error) == "bad CDR"


def test_a_node_that_cannot_start_is_reported_with_its_exit_code(params_file: Path, tmp_path: Path) -> None:
    # The default node command called main() without sys.exit: a node that refused to start (here
    # its parameter file vanished) exited 0, and the replay said "the node exited with code 0".
    from pi0_policy_ros.bag.inputs import make_setup
    from pi0_policy_ros.bag.realtime import NodeProcess, RealtimeError, RealtimeOptions

    node = NodeProcess(make_setup(params_file), RealtimeOptions(params_file=tmp_path / "gone.yaml"),
                       tmp_path / "node.log")
    try:
        node.process.wait(60)
        with pytest.raises(RealtimeError, match=r"the node exited with code 2 during start-up"):
            node.check_alive("start-up")
    finally:
        node.stop()

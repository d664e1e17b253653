"""Offline replay: deterministic, and the same as `Policy.infer` on the observations the node would see."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import yaml
from rosbags.highlevel import AnyReader

from pi0_policy_ros.bag.inputs import make_setup
from pi0_policy_ros.bag.replay import main, replay_offline
from pi0_policy_ros.bag.report import read_chunks
from pi0_policy_ros.policy.policy import Policy
from pi0_policy_ros.policy.types import ActionChunk, ChunkGuidance, Observation
from pi0_policy_ros.ros import convert

from test.bag.conftest import JOINTS

NS_PER_S = 1_000_000_000


def messages(bag: Path) -> list[tuple[str, int, bytes]]:
    with AnyReader([bag]) as reader:
        return [(c.topic, t, bytes(raw)) for c, t, raw in reader.messages()]


@pytest.fixture(scope="module")
def first_run(make_bag, params_file: Path, tmp_path_factory: pytest.TempPathFactory):
    bag = make_bag("offline", 1.2)
    out = tmp_path_factory.mktemp("run1") / "out"
    setup = make_setup(params_file)
    summary, replay = replay_offline(bag, out, setup, keep_ticks=True)
    return bag, out, setup, summary, replay


def test_ticks_follow_the_control_clock(first_run) -> None:
    bag, out, setup, summary, replay = first_run
    times = np.array([t.t_ns for t in replay.ticks])
    assert summary.ticks == len(times) == 5  # 5 Hz over the 1.19 s between first and last message
    assert np.all(np.diff(times) == NS_PER_S // 5)
    assert summary.chunks == 5 and not summary.holds and not summary.input_rejections
    stamped = messages(out)
    assert [t for topic, t, _ in stamped if topic.endswith("/action_chunk")] == times.tolist()
    assert {topic for topic, _, _ in stamped} == set(setup.outputs)


def test_observations_are_the_latest_messages(first_run) -> None:
    bag, _, _, _, replay = first_run
    latest: dict[str, list[tuple[int, object]]] = {}
    with AnyReader([bag]) as reader:
        for connection, t_ns, raw in reader.messages():
            latest.setdefault(connection.topic, []).append((t_ns, reader.deserialize(raw, connection.msgtype)))

    def at(topic: str, t_ns: int) -> object:
        return [msg for t, msg in latest[topic] if t <= t_ns][-1]

    for tick in replay.ticks:
        image = at("/image/image_raw", tick.t_ns)
        wrist = at("/wrist_image/image_raw/compressed", tick.t_ns)
        joints = at("/joint_states", tick.t_ns)
        obs = tick.observation
        np.testing.assert_array_equal(obs.images["image"], convert.image_to_rgb(image))
        np.testing.assert_array_equal(obs.images["wrist_image"], convert.compressed_image_to_rgb(wrist))
        np.testing.assert_array_equal(obs.state, convert.joint_positions(joints, JOINTS))
        assert obs.stamp_s == max(convert.stamp_to_seconds(m.header.stamp) for m in (image, wrist, joints))
        assert obs.prompt == "pick up the block"


def test_chunks_equal_policy_infer(first_run) -> None:
    _, out, setup, _, replay = first_run
    chunks = read_chunks(out, setup)
    policy = Policy.from_config(setup.config.policy)
    try:
        assert len(chunks.stamps_s) == len(replay.ticks)
        for tick, stamp_s, actions in zip(replay.ticks, chunks.stamps_s, chunks.actions):
            expected = policy.infer(tick.observation)
            np.testing.assert_array_equal(actions, expected.actions)
            assert stamp_s == pytest.approx(tick.observation.stamp_s, abs=1e-9)
    finally:
        policy.close()


def test_trajectories_are_the_nodes(first_run) -> None:
    _, out, setup, _, replay = first_run
    period_s = 1.0 / setup.config.control.control_rate_hz
    with AnyReader([out]) as reader:
        conns = [c for c in reader.connections if c.topic == "/pi0_policy/joint_trajectory"]
        trajectories = [(t, reader.deserialize(raw, c.msgtype)) for c, t, raw in reader.messages(conns)]
    assert len(trajectories) == len(replay.ticks)
    for (t_ns, msg), tick in zip(trajectories, replay.ticks):
        assert list(msg.joint_names) == JOINTS[:7]
        assert msg.header.stamp.sec == 0 and msg.header.stamp.nanosec == 0
        starts = [p.time_from_start.sec + p.time_from_start.nanosec * 1e-9 for p in msg.points]
        assert starts[0] >= period_s - 1e-9 and np.all(np.diff(starts) > 0)
        kept = len(msg.points)
        np.testing.assert_array_equal([p.positions for p in msg.points], tick.chunk.actions[-kept:].astype(np.float64))


def test_bit_identical_outputs(first_run, params_file: Path, tmp_path: Path) -> None:
    bag, out, _, _, _ = first_run
    again = tmp_path / "out"  # same name, so that metadata.yaml names the same storage file
    replay_offline(bag, again, make_setup(params_file))  # a new setup and a new Policy
    assert (again / "out.mcap").read_bytes() == (out / "out.mcap").read_bytes()
    assert (again / "metadata.yaml").read_bytes() == (out / "metadata.yaml").read_bytes()


def decode_threads(before: set[threading.Thread]) -> set[threading.Thread]:
    """The control steps' decode threads started since `before`."""
    return {t for t in threading.enumerate() if t.name.startswith("pi0-decode") and t not in before}


class DecodeThreadsAtInfer:
    """A `Policy` that records the decode threads alive at each inference (the tick has just decoded)."""

    def __init__(self, policy: Policy, before: set[threading.Thread]) -> None:
        self.policy = policy
        self.profile = policy.profile
        self.before = before
        self.seen: set[threading.Thread] = set()

    def infer(self, observation: Observation, guidance: ChunkGuidance | None = None) -> ActionChunk:
        self.seen |= decode_threads(self.before)
        return self.policy.infer(observation) if guidance is None else self.policy.infer(observation, guidance)


def test_compressed_cameras_decode_on_threads_the_replay_ends(tmp_path: Path) -> None:
    from pi0_policy_ros.bag.demo import demo_topics, write_demo_bag

    from test.bag.conftest import write_params

    params = write_params(tmp_path / "jpeg.yaml", camera_types=["compressed", "compressed"])
    write_demo_bag(tmp_path / "demo", demo_topics(params_file=params), duration_s=1.0)
    setup = make_setup(params)
    policy = DecodeThreadsAtInfer(Policy.from_config(setup.config.policy), set(threading.enumerate()))
    try:
        summary, replay = replay_offline(tmp_path / "demo", tmp_path / "out", setup, policy=policy)
    finally:
        policy.policy.close()
    assert summary.chunks >= 3
    assert len(policy.seen) == 1  # 2 cameras: the tick's thread decodes the first
    # Ended by the replay, not by the garbage collector: the replay returned (`replay`) is still held.
    assert not any(t.is_alive() for t in policy.seen) and decode_threads(policy.before) == set()


def test_humble_sqlite3_bag_gives_the_same_outputs(first_run, make_bag, tmp_path: Path) -> None:
    _, out, setup, _, _ = first_run
    humble = make_bag("offline_humble", 1.2, "sqlite3", "humble")
    replay_offline(humble, tmp_path / "out", setup)
    assert messages(tmp_path / "out") == messages(out)


def humble_can_read(metadata: Path) -> list[str]:
    """What Humble's rosbag2 (metadata_io.cpp) could not decode: it reads every topic's
    `offered_qos_profiles` with `as<std::string>()`, which throws yaml-cpp "bad conversion" on the
    YAML list that version 9 (Jazzy) writes."""
    info = yaml.safe_load(metadata.read_text())["rosbag2_bagfile_information"]
    return [t["topic_metadata"]["name"] for t in info["topics_with_message_count"]
            if not isinstance(t["topic_metadata"]["offered_qos_profiles"], str)]


def test_replay_writes_a_bag_humble_can_open(first_run, make_bag, params_file: Path, tmp_path: Path, capsys) -> None:
    _, out, _, _, _ = first_run
    humble = make_bag("offline_humble", 1.2, "sqlite3", "humble")
    assert humble_can_read(humble / "metadata.yaml") == []  # the demo bag for Humble is
    humble_out = tmp_path / "out_humble"
    code = main([str(humble), "--params", str(params_file), "--out", str(humble_out), "--distro", "humble", "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert humble_can_read(humble_out / "metadata.yaml") == []
    assert messages(humble_out) == messages(out)  # the output messages are the same in both distros


def test_end_effector_deltas_stay_off_the_trajectory_topic(first_run, params_file: Path, tmp_path: Path,
                                                           capsys) -> None:
    # LIBERO's actions are end-effector deltas: with the default trajectory_actions the replay, like
    # the node, writes the chunks and no ~/joint_trajectory (the fixture's parameters say "any").
    bag, out, _, _, _ = first_run
    default_out = tmp_path / "out_positions"
    code = main([str(bag), "--params", str(params_file), "--out", str(default_out), "--quiet",
                 "--param", "trajectory_actions:=positions"])
    assert code == 0, capsys.readouterr().err
    kept = [m for m in messages(out) if not m[0].endswith("/joint_trajectory")]
    assert len(kept) < len(messages(out))  # the fixture's run has trajectories
    assert messages(default_out) == kept



def write_edge_bag(demo: Path, edge: Path) -> int:
    """`demo` with a ~/prompt as its first message, its cameras stopped after 0.5 s (the joints go
    on), and as its last message a joint_states without names, exactly on the 5th tick at 5 Hz.
    Returns the first message's bag time."""
    from pi0_policy_ros.bag.record import OutputBag

    with AnyReader([demo]) as reader:
        start = reader.start_time - 1_000_000  # 1 ms before the first demo message
        with OutputBag(edge) as bag:
            store = bag.store
            bag.write_message("/pi0_policy/prompt", "std_msgs/msg/String", start,
                              store.types["std_msgs/msg/String"](data="stack the cups"))
            for c, t_ns, raw in reader.messages():
                if "image" not in c.topic or t_ns <= start + 500_000_000:
                    bag.write(c.topic, c.msgtype, t_ns, bytes(raw))
            last = start + NS_PER_S
            assert last > reader.end_time
            header = store.types["std_msgs/msg/Header"](
                stamp=store.types["builtin_interfaces/msg/Time"](sec=last // NS_PER_S, nanosec=last % NS_PER_S),
                frame_id="")
            bag.write_message("/joint_states", "sensor_msgs/msg/JointState", last, store.types[
                "sensor_msgs/msg/JointState"](header=header, name=[], position=np.zeros(0), velocity=np.zeros(0),
                                              effort=np.zeros(0)))
    return start


@pytest.fixture(scope="module")
def edge_run(make_bag, params_file: Path, tmp_path_factory: pytest.TempPathFactory):
    edge = tmp_path_factory.mktemp("edge") / "edge"
    start = write_edge_bag(make_bag("edge_source", 1.0), edge)
    out = tmp_path_factory.mktemp("edge_out") / "out"
    summary, replay = replay_offline(edge, out, make_setup(params_file), keep_ticks=True)
    return edge, out, start, summary, replay


def test_bag_edges_prompt_first_and_a_tick_on_the_last_message(edge_run) -> None:
    _, out, start, summary, replay = edge_run
    # The first message (the prompt) is fed, and a tick at exactly the last message's time fires.
    assert [t.t_ns - start for t in replay.ticks] == [k * NS_PER_S // 5 for k in range(1, 6)]
    assert summary.ticks == 5 and summary.chunks == 3 and sum(summary.holds.values()) == 2
    assert all(t.observation.prompt == "stack the cups" for t in replay.ticks if t.published)
    # The joint_states without names is counted among the refused inputs, not among the holds, under
    # the reason the node logs (it names its source; the topic's label was put before it once more).
    rejections = summary.input_rejections.items()
    assert [(kind.startswith("empty joint_states: expected joints"), n) for kind, n in rejections] == [(True, 1)]
    assert all("stale" in kind for kind in summary.holds)
    with AnyReader([out]) as reader:
        conns = [c for c in reader.connections if c.topic == "/pi0_policy/action_chunk_stamp"]
        sequence = [reader.deserialize(raw, c.msgtype).frame_id for c, _, raw in reader.messages(conns)]
    assert sequence == ["0", "1", "2"]  # the node's chunk numbers, from 0


def test_the_summarys_diagnostics_are_those_of_an_active_node(first_run, edge_run) -> None:
    # The monitor was never started: every replay ended "inactive", level OK, at 0 Hz, as if the
    # node had not run, even when its last ticks held.
    from pi0_policy_ros.control.monitor import OK, WARN

    running = first_run[3].extra["diagnostics"]
    assert (running["level"], running["values"]["active"]) == (OK, "True")
    assert running["message"] == f"running at {first_run[3].achieved_rate_hz:.2f} Hz"
    assert float(running["values"]["achieved_rate_hz"]) > 0.0
    held = edge_run[3].extra["diagnostics"]  # its last two ticks held on stale cameras
    assert (held["level"], held["values"]["active"]) == (WARN, "True")
    assert held["message"].startswith("holding: camera ") and "is stale" in held["message"]


def test_hold_position_writes_the_hold_point(tmp_path: Path) -> None:
    # A joint-position robot (LIBERO's end-effector deltas have no measured position to hold).
    from pi0_policy_ros.bag.demo import demo_topics, write_demo_bag
    from pi0_policy_ros.policy.robots import get_profile, state_in_action_units

    from test.bag.conftest import write_params

    joints = list(get_profile("pi0_aloha").joint_names)
    params = write_params(tmp_path / "aloha.yaml", robot_profile="pi0_aloha", camera_names=["cam_high"],
                          camera_types=["raw"], joint_names=joints, action_joint_names=[], hold_mode="hold_position")
    write_demo_bag(tmp_path / "demo", demo_topics(params_file=params), duration_s=1.0)
    write_edge_bag(tmp_path / "demo", tmp_path / "edge")
    _, replay = replay_offline(tmp_path / "edge", tmp_path / "out", make_setup(params), keep_ticks=True)
    with AnyReader([tmp_path / "edge"]) as reader:
        conns = [c for c in reader.connections if c.topic == "/joint_states"]
        states = [(t, reader.deserialize(raw, c.msgtype)) for c, t, raw in reader.messages(conns)]
    with AnyReader([tmp_path / "out"]) as reader:
        conns = [c for c in reader.connections if c.topic == "/pi0_policy/joint_trajectory"]
        trajectories = [(t, reader.deserialize(raw, c.msgtype)) for c, t, raw in reader.messages(conns)]
    assert [t.published for t in replay.ticks] == [True, True, True, False, False]
    # 3 chunks, then one hold point at the first hold's tick, and nothing on the next hold.
    assert [t for t, _ in trajectories] == [t.t_ns for t in replay.ticks[:4]]
    point = trajectories[3][1].points
    measured = [msg for t, msg in states if t <= replay.ticks[3].t_ns][-1]
    assert len(point) == 1
    # ALOHA's grippers are measured as finger positions, commanded as joints: the hold point holds
    # them at the same opening (the other joints as measured).
    expected = state_in_action_units(get_profile("pi0_aloha"), convert.joint_positions(measured, joints))
    assert not np.allclose(expected[[6, 13]], convert.joint_positions(measured, joints)[[6, 13]])
    np.testing.assert_allclose(point[0].positions, expected, rtol=1e-12)
    assert point[0].time_from_start.sec + point[0].time_from_start.nanosec * 1e-9 == pytest.approx(0.2)


def test_a_rosbag2_directory_named_like_a_ros1_bag_is_read(make_bag, params_file: Path, tmp_path: Path,
                                                           capsys) -> None:
    # rosbags' AnyReader takes every path ending in .bag for a ROS 1 bag file: a rosbag2 directory
    # `ros2 bag record -o pick.bag` was refused as unreadable, and `--out out.bag --report DIR`
    # failed reading its own output back after the whole replay.
    import json
    import shutil

    bag = tmp_path / "pick.bag"
    shutil.copytree(make_bag("good", 1.0), bag)
    out, report = tmp_path / "out.bag", tmp_path / "report"
    code = main([str(bag), "--params", str(params_file), "--out", str(out), "--report", str(report), "--quiet"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((report / "summary.json").read_text())
    assert summary["chunks"] == summary["chunks_in_output"] == 4


def test_a_hold_before_some_inputs_start_names_every_one_missing(make_bag, params_file: Path, tmp_path: Path) -> None:
    # A recording whose wrist camera and joint_states start late: the holds named the wrist camera
    # alone, and joint_states only once that camera came, as if it had just gone missing.
    from rosbags.rosbag2 import Reader, Writer

    late = tmp_path / "late"
    with Reader(make_bag("good", 1.0)) as reader, Writer(late, version=9) as writer:
        conns = {c.id: writer.add_connection(c.topic, c.msgtype, typestore=None, msgdef=c.msgdef.data,
                                             rihs01=c.digest) for c in reader.connections}
        for c, t_ns, raw in reader.messages():
            if c.topic == "/image/image_raw" or t_ns >= reader.start_time + 500_000_000:
                writer.write(conns[c.id], t_ns, raw)
    summary, _ = replay_offline(late, tmp_path / "out", make_setup(params_file))
    assert summary.chunks > 0
    missing = [kind for kind in summary.holds if "received yet" in kind]
    assert missing == ["no image received yet from camera(s) ['wrist_image'] (topic /wrist_image/image_raw/compressed); "
                       "no joint_states received yet (topic /joint_states)"], \
        dict(summary.holds)

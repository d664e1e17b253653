"""The synthetic demo bag: topics, types, rates, changing images; MCAP and sqlite3, Jazzy and Humble."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from rosbags.highlevel import AnyReader

from pi0_policy_ros.bag.demo import demo_topics, main, write_demo_bag
from pi0_policy_ros.bag.inputs import COMPRESSED_IMAGE_TYPE, IMAGE_TYPE, JOINT_STATE_TYPE
from pi0_policy_ros.bag.reader import InputBag
from pi0_policy_ros.ros import convert

from test.bag.conftest import JOINTS


@pytest.mark.parametrize("storage,distro", [("mcap", "jazzy"), ("sqlite3", "humble")])
def test_demo_bag_topics_rates_and_images(make_bag, storage: str, distro: str) -> None:
    bag_path = make_bag(f"demo_{storage}_{distro}", 2.0, storage, distro)
    suffix = {"mcap": ".mcap", "sqlite3": ".db3"}[storage]
    assert sorted(p.name for p in bag_path.iterdir()) == sorted(["metadata.yaml", bag_path.name + suffix])
    with InputBag(bag_path) as bag:
        assert {t: i.msgtype for t, i in bag.topics.items()} == {
            "/image/image_raw": IMAGE_TYPE,
            "/wrist_image/image_raw/compressed": COMPRESSED_IMAGE_TYPE,
            "/joint_states": JOINT_STATE_TYPE,
        }
        assert bag.topics["/image/image_raw"].message_count == 60  # 30 Hz
        assert bag.topics["/wrist_image/image_raw/compressed"].message_count == 60
        assert bag.topics["/joint_states"].message_count == 200  # 100 Hz
        raw = [convert.image_to_rgb(m) for _, _, m in bag.messages(["/image/image_raw"])]
        jpeg = [convert.compressed_image_to_rgb(m) for _, _, m in bag.messages(["/wrist_image/image_raw/compressed"])]
        states = [(convert.stamp_to_seconds(m.header.stamp), convert.joint_positions(m, JOINTS))
                  for _, _, m in bag.messages(["/joint_states"])]
    assert raw[0].shape == jpeg[0].shape == (48, 64, 3)
    assert not np.array_equal(raw[0], raw[15]) and not np.array_equal(jpeg[0], jpeg[15])  # shapes move
    assert np.allclose(np.diff([t for t, _ in states]), 0.01, atol=1e-6)  # float seconds near 1.7e9
    assert not np.allclose(states[0][1], states[100][1])


def test_demo_bag_is_reproducible_and_readable_by_rosbags(tmp_path: Path, params_file: Path) -> None:
    topics = demo_topics(params_file=params_file)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        write_demo_bag(tmp_path / name / "bag", topics, duration_s=0.5)
    assert (tmp_path / "a/bag/bag.mcap").read_bytes() == (tmp_path / "b/bag/bag.mcap").read_bytes()
    with AnyReader([tmp_path / "a/bag"]) as reader:  # plain rosbags, from the embedded definitions
        assert reader.message_count == 2 * 15 + 50


def test_demo_bag_cli_profile_defaults(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "aloha"), "--profile", "pi05_aloha", "--duration", "0.2"]) == 0
    with InputBag(tmp_path / "aloha") as bag:
        types = {t: i.msgtype for t, i in bag.topics.items()}
    assert types["/cam_high/image_raw"] == IMAGE_TYPE  # first camera raw, the others JPEG
    assert types["/cam_left_wrist/image_raw/compressed"] == COMPRESSED_IMAGE_TYPE
    assert types["/cam_right_wrist/image_raw/compressed"] == COMPRESSED_IMAGE_TYPE
    assert main([str(tmp_path / "aloha"), "--profile", "pi05_aloha"]) == 2  # exists: not overwritten
    assert "already exists" in capsys.readouterr().err


def test_demo_bag_default_has_three_cameras_at_30_hz_and_joints_at_100_hz(tmp_path: Path) -> None:
    from rosbags.highlevel import AnyReader

    assert main([str(tmp_path / "default"), "--duration", "1.0"]) == 0
    with AnyReader([tmp_path / "default"]) as reader:
        counts = {c.topic: c.msgcount for c in reader.connections}
    cameras = [t for t in counts if "image" in t]
    assert len(cameras) == 3 and all(28 <= counts[t] <= 31 for t in cameras), counts
    assert 98 <= counts["/joint_states"] <= 101, counts


def test_demo_bag_for_a_generic_profile_params_file(tmp_path: Path) -> None:
    # The node sizes the generic profile from profile_state_dim / profile_action_dim; the demo bag
    # took the profile's 32 dims and refused the file's 8 joint names.
    from test.bag.conftest import write_params

    params = write_params(tmp_path / "generic.yaml", robot_profile="generic", camera_names=["base"],
                          camera_types=["raw"], profile_state_dim=8, profile_action_dim=7)
    topics = demo_topics(params_file=params)
    assert topics.config.joint_names == tuple(JOINTS) and topics.config.action_joint_names == tuple(JOINTS[:7])
    assert main([str(tmp_path / "bag"), "--params", str(params), "--duration", "0.1"]) == 0


def test_demo_bag_stamps_joints_and_colours(make_bag) -> None:
    from pi0_policy_ros.bag.demo import TRANSPORT_DELAY_NS, joint_positions, render_frame

    with InputBag(make_bag("demo_mcap_jazzy", 2.0, "mcap", "jazzy")) as bag:
        messages = list(bag.messages(["/image/image_raw", "/wrist_image/image_raw/compressed", "/joint_states"]))
    start_s = min(convert.stamp_to_seconds(m.header.stamp) for _, _, m in messages)
    for topic, t_ns, msg in messages[:40]:
        stamp_ns = msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec
        assert t_ns - stamp_ns == TRANSPORT_DELAY_NS  # captured, then recorded 1 ms later
        t_s = convert.stamp_to_seconds(msg.header.stamp) - start_s
        if topic == "/joint_states":  # each joint its own sine, under its own name
            np.testing.assert_allclose(convert.joint_positions(msg, JOINTS), joint_positions(8, t_s)[0], atol=1e-6)
        else:
            camera = 0 if topic == "/image/image_raw" else 1
            decoded = (convert.image_to_rgb(msg) if camera == 0 else convert.compressed_image_to_rgb(msg))
            expected = render_frame(camera, t_s, 64, 48).astype(np.int16)
            assert np.abs(decoded.astype(np.int16) - expected).mean() < 8  # RGB, not BGR, through the JPEG


def test_demo_topics_in_a_namespace_and_profile_over_the_params_file(params_file: Path) -> None:
    topics = demo_topics(params_file=params_file, namespace="/robot")
    assert [topics.camera_topic(i) for i in range(2)] == ["/robot/image/image_raw",
                                                        "/robot/wrist_image/image_raw/compressed"]
    assert topics.joint_states_topic == "/robot/joint_states"
    assert demo_topics("pi0_libero", params_file=params_file).config.policy.robot_profile == "pi0_libero"


@pytest.mark.parametrize("name", ["run#1", "take?2", "50%25"])
def test_demo_bag_sqlite3_refuses_a_path_sqlite_would_read_as_a_uri(tmp_path: Path, params_file: Path,
                                                                  capsys: pytest.CaptureFixture[str],
                                                                  name: str) -> None:
    # rosbags opens its sqlite3 file as the URI `file:PATH`: `run#1` said "wrote run#1: 80 messages",
    # left run#1/ with a metadata.yaml and no .db3, and wrote the database to a stray `.run` beside it.
    out = tmp_path / name
    code = main([str(out), "--params", str(params_file), "--storage", "sqlite3", "--duration", "0.2"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"output {out}: sqlite3 storage" in err and "--storage mcap" in err
    assert list(tmp_path.iterdir()) == []  # nothing written, no stray file
    assert main([str(out), "--params", str(params_file), "--duration", "0.2"]) == 0  # MCAP has no such limit
    with InputBag(out) as bag:
        assert bag.topics["/joint_states"].message_count == 20


@pytest.mark.parametrize("start", ["-5", "nan", "1e12", "2147483647", "0"])
def test_demo_bag_start_time_outside_the_stamp_range_is_one_error(tmp_path: Path, params_file: Path,
                                                                  capsys: pytest.CaptureFixture[str],
                                                                  start: str) -> None:
    # A negative, NaN or past-2038 start ended in a traceback (OverflowError, ValueError,
    # struct.error) half way through writing; 0 stamped the first messages 0 s, which the node
    # refuses as unstamped.
    out = tmp_path / "bag"
    code = main([str(out), "--params", str(params_file), "--duration", "1.0", "--start-time", start])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: start time: expected") and "found" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("size", [("7", "48"), ("100000", "100000")], ids=["small", "huge"])
def test_demo_bag_image_size_outside_a_cameras_is_one_error(tmp_path: Path, params_file: Path,
                                                            capsys: pytest.CaptureFixture[str],
                                                            size: tuple[str, str]) -> None:
    # 100000 x 100000 ended in numpy's MemoryError traceback.
    out = tmp_path / "bag"
    code = main([str(out), "--params", str(params_file), "--duration", "1.0", "--width", size[0], "--height", size[1]])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err == f"error: image size: expected 8x8 to 4096x4096, found {size[0]}x{size[1]}\n"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("namespace", "expected"), [
    ("robot-1", "error: namespace 'robot-1': expected"),
    ("/2d", "error: namespace '/2d': expected"),
])
def test_demo_bag_in_a_namespace_ros_refuses_is_one_error(tmp_path: Path, params_file: Path,
                                                          capsys: pytest.CaptureFixture[str],
                                                          namespace: str, expected: str) -> None:
    # It wrote the bag on /robot-1/... topics, which no node can subscribe to and which the
    # realtime replay could not publish (a traceback).
    out = tmp_path / "bag"
    code = main([str(out), "--params", str(params_file), "--duration", "0.2", "--namespace", namespace])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith(expected) and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []
    assert main([str(out), "--params", str(params_file), "--duration", "0.2", "--namespace", "robot1/"]) == 0
    with InputBag(out) as bag:
        assert "/robot1/joint_states" in bag.topics


def test_demo_bag_duration_past_the_stamp_range_names_the_duration(tmp_path: Path, params_file: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    # It said "start time: expected seconds since the epoch > 0 and < 1147483647 ..., found 1700000000"
    # for --duration 1e9 alone, and gave a negative bound from 2.2e9 s on.
    out = tmp_path / "bag"
    assert main([str(out), "--params", str(params_file), "--duration", "1e9"]) == 2
    err = capsys.readouterr().err
    assert err == ("error: duration: expected at most 447483647 s after the start time 1700000000 (a stamp's seconds "
                   "are an int32: the last is 2147483647), found 1e+09 s\n")
    assert list(tmp_path.iterdir()) == []

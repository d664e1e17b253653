"""Each bad bag is one clear error (bag, topic, problem), exit code 1, and no output at all."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from pi0_policy_ros.bag.demo import demo_topics, write_demo_bag
from pi0_policy_ros.bag.inputs import JOINT_STATE_TYPE
from pi0_policy_ros.bag.record import OutputBag
from pi0_policy_ros.bag.replay import main

from test.bag.conftest import write_params


def replay(bag: Path, params: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> str:
    code = main([str(bag), "--params", str(params), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no staging left
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and str(bag) in lines[0], err
    return lines[0]


def test_missing_topic(make_bag, tmp_path: Path, capsys) -> None:
    params = write_params(tmp_path / "p.yaml", camera_topics=["front/image_raw", "wrist_image/image_raw/compressed"])
    error = replay(make_bag("good", 1.0), params, tmp_path / "out", capsys)
    assert "topic /front/image_raw (camera 'image', sensor_msgs/msg/Image) is missing" in error
    assert "--map /front/image_raw:=BAG_TOPIC" in error


def test_wrong_message_type(make_bag, tmp_path: Path, capsys) -> None:
    params = write_params(tmp_path / "p.yaml", camera_types=["compressed", "compressed"],
                          camera_topics=["image/image_raw", "wrist_image/image_raw/compressed"])
    error = replay(make_bag("good", 1.0), params, tmp_path / "out", capsys)
    assert "topic /image/image_raw (camera 'image') has type sensor_msgs/msg/Image, " \
           "expected sensor_msgs/msg/CompressedImage" in error


@pytest.mark.parametrize("damage", ["truncated", "garbage", "no_metadata", "not_found"])
def test_unreadable_bag(make_bag, params_file: Path, tmp_path: Path, capsys, damage: str) -> None:
    bag = tmp_path / "bag"
    if damage != "not_found":
        shutil.copytree(make_bag("good", 1.0), bag)
    storage = bag / "good.mcap"
    if damage == "truncated":
        storage.write_bytes(storage.read_bytes()[: storage.stat().st_size // 2])
    elif damage == "garbage":
        storage.write_bytes(b"\x00" * 4096)
    elif damage == "no_metadata":
        (bag / "metadata.yaml").unlink()
    error = replay(bag, params_file, tmp_path / "out", capsys)
    expected = "not found" if damage == "not_found" else "unreadable"
    assert f"error: bag {bag}: {expected}" in error


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_bag_directory_without_metadata_names_what_to_do(params_file: Path, tmp_path: Path, capsys,
                                                        storage: str) -> None:
    # rosbag2 writes metadata.yaml when the recording ends: a bag still being recorded, or one whose
    # recorder was killed, has none. The error read "Expected metadata file '<the directory>' does not
    # exist", naming the directory as the missing file, and said nothing of the storage file, which
    # rosbags reads alone.
    bag = tmp_path / "recording"
    write_demo_bag(bag, demo_topics(params_file=params_file), duration_s=0.6, storage=storage)
    (bag / "metadata.yaml").unlink()
    storage_file = bag / f"recording.{'mcap' if storage == 'mcap' else 'db3'}"
    error = replay(bag, params_file, tmp_path / "out", capsys)
    assert f"error: bag {bag}: unreadable: no metadata.yaml in it" in error
    assert f"give its storage file {storage_file.name}" in error and f"ros2 bag reindex {bag}" in error
    assert "Expected metadata file" not in error
    code = main([str(storage_file), "--params", str(params_file), "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 0, capsys.readouterr().err  # as the error says


def test_empty_bag(params_file: Path, tmp_path: Path, capsys) -> None:
    with OutputBag(tmp_path / "empty") as bag:
        bag.add_topic("/joint_states", JOINT_STATE_TYPE)
    error = replay(tmp_path / "empty", params_file, tmp_path / "out", capsys)
    assert "empty: expected messages on" in error


def test_topic_without_messages(params_file: Path, tmp_path: Path, capsys) -> None:
    with OutputBag(tmp_path / "nojoints") as bag:
        bag.add_topic("/joint_states", JOINT_STATE_TYPE)
        bag.add_topic("/image/image_raw", "sensor_msgs/msg/Image")
        bag.add_topic("/wrist_image/image_raw/compressed", "sensor_msgs/msg/CompressedImage")
        store = bag.store
        header = store.types["std_msgs/msg/Header"](stamp=store.types["builtin_interfaces/msg/Time"](sec=1, nanosec=0),
                                                    frame_id="")
        image = store.types["sensor_msgs/msg/Image"](header=header, height=2, width=2, encoding="rgb8",
                                                     is_bigendian=0, step=6, data=np.zeros(12, np.uint8))
        bag.write_message("/image/image_raw", "sensor_msgs/msg/Image", 10**9, image)
    error = replay(tmp_path / "nojoints", params_file, tmp_path / "out", capsys)
    assert "topic /wrist_image/image_raw/compressed (camera 'wrist_image') has no messages" in error


def test_corrupt_message_mid_bag_leaves_no_output(params_file: Path, tmp_path: Path, capsys) -> None:
    """A message that cannot be decoded half way: the replay stops with the error, nothing is written."""
    good = tmp_path / "good"
    write_demo_bag(good, demo_topics(params_file=params_file), duration_s=0.6)
    from rosbags.rosbag2 import Reader, Writer

    bad = tmp_path / "bad"
    with Reader(good) as reader, Writer(bad, version=9) as writer:
        conns = {c.id: writer.add_connection(c.topic, c.msgtype, typestore=None, msgdef=c.msgdef.data,
                                             rihs01=c.digest) for c in reader.connections}
        for c, t_ns, raw in reader.messages():
            late_joint = c.topic == "/joint_states" and t_ns > reader.start_time + 500_000_000
            writer.write(conns[c.id], t_ns, raw[:12] if late_joint else raw)
    error = replay(bad, params_file, tmp_path / "out", capsys)
    assert "topic /joint_states: message at" in error and "cannot be decoded as sensor_msgs/msg/JointState" in error


@pytest.mark.parametrize(("out_name", "found"), [("bag", "the input bag itself"), ("bag/bag.mcap", "a path inside it"),
                                                ("", "a directory that holds it")])
def test_output_over_the_input_bag_is_refused(make_bag, params_file: Path, tmp_path: Path, capsys,
                                              out_name: str, found: str) -> None:
    bag = tmp_path / "bag"
    shutil.copytree(make_bag("to_keep", 0.5), bag)
    (bag / "to_keep.mcap").rename(bag / "bag.mcap")  # rosbag2 names the storage file after its directory
    metadata = bag / "metadata.yaml"
    metadata.write_text(metadata.read_text().replace("to_keep.mcap", "bag.mcap"))
    before = sorted((p.name, p.read_bytes()) for p in bag.iterdir())
    code = main([str(bag), "--params", str(params_file), "--out", str(tmp_path / out_name), "--overwrite", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"expected a path apart from the input bag {bag}, found {found}" in err
    assert sorted((p.name, p.read_bytes()) for p in bag.iterdir()) == before  # the recording is untouched


@pytest.mark.parametrize("kind", ["directory", "file"])
def test_overwrite_refuses_what_is_not_a_bag(make_bag, params_file: Path, tmp_path: Path, capsys, kind: str) -> None:
    # --overwrite deletes OUT: a mistyped path (a checkpoint, a config folder) must survive it.
    out = tmp_path / "precious"
    if kind == "directory":
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"weights")
    else:
        out.write_text("data")
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main([str(make_bag("to_replay", 0.5)), "--params", str(params_file), "--out", str(out), "--overwrite",
                 "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "--overwrite replaces only a bag directory" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # untouched, no staging left
    assert (out / "model.safetensors").read_bytes() == b"weights" if kind == "directory" else out.read_text() == "data"


@pytest.mark.parametrize("kind", ["directory", "file"])
def test_an_existing_output_that_is_not_a_bag_is_not_met_with_overwrite_advice(make_bag, params_file: Path,
                                                                              tmp_path: Path, capsys, kind: str) -> None:
    # The error said "remove it or pass --overwrite"; doing the latter only got the next refusal.
    out = tmp_path / "precious"
    out.mkdir() if kind == "directory" else out.write_text("data")
    error = main([str(make_bag("to_replay", 0.5)), "--params", str(params_file), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert error == 2 and f"output {out} already exists" in err
    assert "pass --overwrite" not in err and "choose another path" in err


def test_overwrite_replaces_a_bag(make_bag, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(make_bag("old_output", 0.5), out)
    with OutputBag(out, overwrite=True) as bag:
        bag.write_message("/t", "std_msgs/msg/String", 1, bag.store.types["std_msgs/msg/String"](data="x"))
    assert bag.message_count == 1 and (out / "metadata.yaml").is_file()


@pytest.mark.parametrize("target", ["old_bag", "nothing"])
def test_output_that_is_a_symbolic_link_is_refused_before_the_replay(make_bag, params_file: Path, tmp_path: Path,
                                                                     capsys, monkeypatch, target: str) -> None:
    # The output bag is moved into place last: onto a link to a bag (--overwrite) rmtree refused it,
    # onto a dangling link the rename failed "Not a directory", both after the whole replay.
    from pi0_policy_ros.policy.policy import Policy

    def no_load(*_: object, **__: object) -> None:
        raise AssertionError("the policy was loaded before the output path was checked")

    monkeypatch.setattr(Policy, "from_config", no_load)
    old_bag = tmp_path / "old_bag"
    shutil.copytree(make_bag("old_output", 0.5), old_bag)
    before = sorted((p.name, p.read_bytes()) for p in old_bag.iterdir())
    out = tmp_path / "out"
    out.symlink_to(target)
    code = main([str(make_bag("to_replay", 0.5)), "--params", str(params_file), "--out", str(out), "--overwrite",
                 "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"error: output {out}: expected a bag directory or a new path, found a symbolic link to {target}" in err
    assert out.is_symlink() and sorted((p.name, p.read_bytes()) for p in old_bag.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old_bag", "out"]  # no staging left


def test_report_path_that_is_a_file_is_refused_before_the_replay(make_bag, params_file: Path, tmp_path: Path,
                                                                  capsys) -> None:
    # The report comes last: a file in its place used to fail only after the whole replay.
    report = tmp_path / "report"
    report.write_text("notes")
    code = main([str(make_bag("to_report", 0.5)), "--params", str(params_file), "--out", str(tmp_path / "out"),
                 "--report", str(report), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"--report {report}: expected a directory" in err
    assert not (tmp_path / "out").exists() and report.read_text() == "notes"


def test_topic_with_two_message_types(make_bag, params_file: Path, tmp_path: Path, capsys) -> None:
    from rosbags.rosbag2 import Reader, Writer

    from pi0_policy_ros.bag.record import typestore

    bad = tmp_path / "mixed"
    with Reader(make_bag("good", 1.0)) as reader, Writer(bad, version=9) as writer:
        conns = {c.id: writer.add_connection(c.topic, c.msgtype, typestore=None, msgdef=c.msgdef.data,
                                             rihs01=c.digest) for c in reader.connections}
        other = writer.add_connection("/joint_states", "std_msgs/msg/String", typestore=typestore())
        for c, t_ns, raw in reader.messages():
            writer.write(conns[c.id], t_ns, raw)
        writer.write(other, reader.end_time + 1, bytes(typestore().serialize_cdr(
            typestore().types["std_msgs/msg/String"](data="x"), "std_msgs/msg/String")))
    error = replay(bad, params_file, tmp_path / "out", capsys)
    assert "topic /joint_states has several message types" in error


def test_topic_recorded_through_two_connections_counts_both(make_bag, tmp_path: Path) -> None:
    # rosbag2 writes one connection per publisher QoS: a second, silent one must not hide the messages.
    from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime
    from rosbags.rosbag2 import Reader, Writer

    from pi0_policy_ros.bag.reader import InputBag

    never = QosTime(0, 0)
    best_effort = Qos(QosHistory.KEEP_LAST, 5, QosReliability.BEST_EFFORT, QosDurability.VOLATILE, never, never,
                      QosLiveliness.AUTOMATIC, never, False)
    two = tmp_path / "two"
    with Reader(make_bag("good", 1.0)) as reader, Writer(two, version=9) as writer:
        conns = {c.id: writer.add_connection(c.topic, c.msgtype, typestore=None, msgdef=c.msgdef.data,
                                             rihs01=c.digest) for c in reader.connections}
        joints = next(c for c in reader.connections if c.topic == "/joint_states")
        writer.add_connection("/joint_states", joints.msgtype, typestore=None, msgdef=joints.msgdef.data,
                              rihs01=joints.digest, offered_qos_profiles=[best_effort])
        for c, t_ns, raw in reader.messages():
            writer.write(conns[c.id], t_ns, raw)
    with InputBag(two) as bag:
        assert bag.topics["/joint_states"].message_count == 100


def test_ros1_bag_is_refused_at_open(make_bag, params_file: Path, tmp_path: Path, capsys) -> None:
    # rosbags reads ROS 1 bags too: their topics and types passed the checks, then offline every
    # message failed "truncated or corrupt?", and --realtime published ROS 1 bytes to the node as CDR.
    from rosbags.highlevel import AnyReader
    from rosbags.rosbag1 import Writer as Ros1Writer
    from rosbags.typesys import Stores, get_typestore

    ros1 = get_typestore(Stores.ROS1_NOETIC)
    bag = tmp_path / "robot.bag"
    with AnyReader([make_bag("good", 1.0)]) as reader, Ros1Writer(bag) as writer:
        conns = {c.topic: writer.add_connection(c.topic, c.msgtype, typestore=ros1) for c in reader.connections}
        for c, t_ns, raw in reader.messages():
            fields = dict(reader.deserialize(raw, c.msgtype).__dict__)
            stamp = fields["header"].stamp
            fields["header"] = ros1.types["std_msgs/msg/Header"](
                seq=0, stamp=ros1.types["builtin_interfaces/msg/Time"](sec=stamp.sec, nanosec=stamp.nanosec),
                frame_id=fields["header"].frame_id)
            writer.write(conns[c.topic], t_ns, ros1.serialize_ros1(ros1.types[c.msgtype](**fields), c.msgtype))
    error = replay(bag, params_file, tmp_path / "out", capsys)
    assert f"error: bag {bag}: a ROS 1 bag: expected a rosbag2 bag" in error and "rosbags-convert" in error


def test_report_directory_that_cannot_be_made_is_refused_before_the_replay(make_bag, params_file: Path,
                                                                            tmp_path: Path, capsys) -> None:
    # Only a file at the --report path itself was checked: a path under a file (or in a read-only
    # place) failed at the end with an OSError, after the replay had written --out.
    notes = tmp_path / "notes.txt"
    notes.write_text("notes")
    code = main([str(make_bag("to_report", 0.5)), "--params", str(params_file), "--out", str(tmp_path / "out"),
                 "--report", str(notes / "report"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"error: --report {notes / 'report'}: expected a directory (created if missing)" in err
    assert not (tmp_path / "out").exists() and notes.read_text() == "notes"


def test_output_in_a_missing_directory_is_refused_before_the_policy_loads(make_bag, params_file: Path,
                                                                          tmp_path: Path, capsys,
                                                                          monkeypatch) -> None:
    # check_output_path runs before the policy loads (minutes for a full-size model), but the
    # missing parent directory was found only when the output bag was opened, after the load.
    from pi0_policy_ros.policy.policy import Policy

    def no_load(*_: object, **__: object) -> None:
        raise AssertionError("the policy was loaded before the output path was checked")

    monkeypatch.setattr(Policy, "from_config", no_load)
    out = tmp_path / "typo" / "out"
    code = main([str(make_bag("to_replay", 0.5)), "--params", str(params_file), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"error: output {out}: expected an existing directory {out.parent}, found none" in err


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_storage_file_of_a_bag_with_compressed_messages(make_bag, params_file: Path, tmp_path: Path, capsys,
                                                        storage: str) -> None:
    # Only metadata.yaml says that each message is zstd-compressed: read alone, the .mcap / .db3
    # failed offline as "truncated or corrupt?", and --realtime published zstd frames as CDR.
    from rosbags.rosbag2 import Reader, StoragePlugin, Writer
    from rosbags.rosbag2.enums import CompressionFormat, CompressionMode

    bag = tmp_path / "compressed"
    writer = Writer(bag, version=9, storage_plugin=StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3)
    writer.set_compression(CompressionMode.MESSAGE, CompressionFormat.ZSTD)
    with Reader(make_bag("good", 1.0)) as reader, writer:
        conns = {c.id: writer.add_connection(c.topic, c.msgtype, typestore=None, msgdef=c.msgdef.data,
                                             rihs01=c.digest) for c in reader.connections}
        for c, t_ns, raw in reader.messages():
            writer.write(conns[c.id], t_ns, raw)
    storage_file = bag / f"compressed.{'mcap' if storage == 'mcap' else 'db3'}"
    error = replay(storage_file, params_file, tmp_path / "out", capsys)
    assert "its messages are compressed (metadata.yaml: compression_mode message)" in error
    assert f"give the bag directory {bag}" in error


def test_a_topic_with_two_message_types_that_the_replay_does_not_read(make_bag, params_file: Path,
                                                                       tmp_path: Path, capsys) -> None:
    # A merged bag with a /debug topic of two types was refused whole, though no input reads /debug.
    from rosbags.rosbag2 import Reader, Writer

    from pi0_policy_ros.bag.record import typestore

    store = typestore()
    merged = tmp_path / "merged"
    with Reader(make_bag("good", 1.0)) as reader, Writer(merged, version=9) as writer:
        conns = {c.id: writer.add_connection(c.topic, c.msgtype, typestore=None, msgdef=c.msgdef.data,
                                             rihs01=c.digest) for c in reader.connections}
        text = writer.add_connection("/debug", "std_msgs/msg/String", typestore=store)
        header = writer.add_connection("/debug", "std_msgs/msg/Header", typestore=store)
        for c, t_ns, raw in reader.messages():
            writer.write(conns[c.id], t_ns, raw)
        writer.write(text, reader.start_time, store.serialize_cdr(store.types["std_msgs/msg/String"](data="x"),
                                                                 "std_msgs/msg/String"))
        writer.write(header, reader.start_time, store.serialize_cdr(store.types["std_msgs/msg/Header"](
            stamp=store.types["builtin_interfaces/msg/Time"](sec=1, nanosec=0), frame_id=""), "std_msgs/msg/Header"))
    code = main([str(merged), "--params", str(params_file), "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 0, capsys.readouterr().err  # as an input it is still one error (test_topic_with_two_message_types)


def test_sqlite3_bag_under_a_path_sqlite_reads_as_a_uri(make_bag, params_file: Path, tmp_path: Path,
                                                         capsys) -> None:
    # rosbags opens a .db3 as the URI `file:PATH?immutable=1`: a good bag under `take#2/` was
    # called "not a rosbag2 MCAP/sqlite3 bag, or truncated".
    bag = tmp_path / "take#2" / "bag"
    shutil.copytree(make_bag("sqlite_good", 0.5, "sqlite3", "humble"), bag)
    error = replay(bag, params_file, tmp_path / "out", capsys)
    assert "a sqlite3 bag cannot be read under a path containing ['#']" in error and "move or rename" in error
    assert "truncated" not in error


def test_an_infinite_realtime_rate_is_refused_before_anything_starts(params_file: Path, tmp_path: Path,
                                                                     capsys) -> None:
    # --rate inf passed the `> 0` check: the node started, the recorder's first message raised
    # OverflowError on the executor thread (bag time int(elapsed * inf)), and the replay ended
    # 30 s later with "service .../change_state did not answer". The bag is not even opened now.
    from pi0_policy_ros.bag.inputs import make_setup
    from pi0_policy_ros.bag.realtime import RealtimeOptions, replay_realtime
    from pi0_policy_ros.errors import ConfigError

    missing = tmp_path / "no_bag"
    code = main([str(missing), "--params", str(params_file), "--out", str(tmp_path / "out"), "--realtime",
                 "--rate", "inf", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "error: --rate: expected a finite factor > 0, found inf" in err
    with pytest.raises(ConfigError, match="rate: expected a finite factor > 0, found inf"):
        replay_realtime(missing, tmp_path / "out", make_setup(params_file),
                        RealtimeOptions(params_file=params_file, rate=float("inf")))


def test_safety_limits_not_fitting_the_action_dims_name_the_parameter(make_bag, tmp_path: Path, capsys) -> None:
    # Checked against the policy's 7 action dims once it is loaded (SafetyFilter, ROS-free): the
    # error named the SafetyConfig field `position_lower`, which no parameter file has.
    params = write_params(tmp_path / "p.yaml", safety_position_lower=[0.0, 0.0], safety_position_upper=[1.0])
    code = main([str(make_bag("good", 1.0)), "--params", str(params), "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "error: safety_position_lower needs 1 or 7 values (one per action dim), found 2" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option", [["--rate", "2"], ["--startup-timeout", "10"], ["--node-log", "node.log"],
                                    ["--node-cmd", "ros2 run pi0_policy_ros pi0_policy_node"]])
def test_realtime_options_without_realtime_are_refused(make_bag, params_file: Path, tmp_path: Path, capsys,
                                                       option: list[str]) -> None:
    # They were ignored: `--rate 2` ran the offline replay at its own pace and said nothing.
    out = tmp_path / "out"
    code = main([str(make_bag("good", 1.0)), "--params", str(params_file), "--out", str(out), "--quiet", *option])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err == (f"error: {option[0]}: expected with --realtime (an option of the realtime replay), found an "
                   "offline replay: add --realtime, or drop it\n")
    assert not out.exists()


@pytest.mark.parametrize(("option", "expected"), [
    (["--startup-timeout", "0"], "--startup-timeout: expected a finite number of seconds > 0, found 0.0"),
    (["--startup-timeout", "nan"], "--startup-timeout: expected a finite number of seconds > 0, found nan"),
    (["--node-cmd", "python3 -c 'unterminated"], "--node-cmd: expected a command line as a shell splits it, "
                                                 "found \"python3 -c 'unterminated\" (No closing quotation)"),
    (["--node-log", "missing/node.log"], "--node-log missing/node.log: expected a file in an existing directory"),
    (["--node-log", "."], "--node-log .: expected a file, found a directory"),
])
def test_bad_realtime_options_are_one_error_before_the_node_starts(params_file: Path, tmp_path: Path, capsys,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   option: list[str], expected: str) -> None:
    # An unbalanced quote in --node-cmd was shlex's ValueError traceback, a timeout of 0 waited 0 s
    # for the node ("did not appear within 0 s") after starting it, and --node-log in a missing
    # directory was "[Errno 2] No such file or directory" without the option's name. The bag is
    # not even opened now.
    monkeypatch.chdir(tmp_path)
    code = main([str(tmp_path / "no_bag"), "--params", str(params_file), "--out", str(tmp_path / "out"),
                 "--realtime", "--quiet", *option])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith(f"error: {expected}") and err.count("\n") == 1, err


def test_output_under_a_file_says_it_is_a_file(make_bag, params_file: Path, tmp_path: Path, capsys) -> None:
    # "expected an existing directory notes.txt, found none", with notes.txt right there.
    notes = tmp_path / "notes.txt"
    notes.write_text("notes")
    code = main([str(make_bag("to_replay", 0.5)), "--params", str(params_file), "--out", str(notes / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err == f"error: output {notes / 'out'}: expected an existing directory {notes}, found a file\n"
    assert notes.read_text() == "notes"


@pytest.mark.skipif(not Path("/proc/sys").is_dir(), reason="needs Linux's /proc/sys")
def test_output_in_a_folder_that_cannot_be_written_is_refused_before_the_policy_loads(make_bag, params_file: Path,
                                                                                    capsys, monkeypatch) -> None:
    # procfs refuses new files under /proc/sys to root too. A read-only folder passed the check and
    # the replay failed when the output bag was opened, after the policy load (minutes at full
    # size), with "[Errno 30] Read-only file system: 'ro/.out.x1y2.partial'" (a name it never gave).
    from pi0_policy_ros.policy.policy import Policy

    def no_load(*_: object, **__: object) -> None:
        raise AssertionError("the policy was loaded before the output path was checked")

    monkeypatch.setattr(Policy, "from_config", no_load)
    out = Path("/proc/sys/pi0_out")
    code = main([str(make_bag("to_replay", 0.5)), "--params", str(params_file), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err == f"error: output {out}: expected a directory it may write in, found /proc/sys: not writable\n"


@pytest.mark.parametrize(("overrides", "expected"), [
    ({"control_rate_hz": 1.0}, "control_rate_hz: expected at least 2.222 Hz for chunks of 10 actions 0.05 s apart"),
    ({"chunk_mode": "temporal_ensemble", "execute_horizon": 11},
     "execute_horizon (11) must be <= the chunk horizon (10)"),
])
def test_a_chunk_geometry_the_node_refuses_is_refused_by_the_offline_replay(make_bag, tmp_path: Path, capsys,
                                                                            overrides, expected) -> None:
    # The node fails configure on these (after its warm-up chunk). The offline replay used to run
    # them, exit 0, and hold every tick as an unusable chunk: a check that passed what would not start.
    params = write_params(tmp_path / "p.yaml", **overrides)
    out = tmp_path / "out"
    code = main([str(make_bag("good", 1.0)), "--params", str(params), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and expected in lines[0], err
    assert not out.exists()

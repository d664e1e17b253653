"""--report: summary.json with the numbers, and PNG plots per action dimension, through the CLI."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
from rosbags.highlevel import AnyReader

from pi0_policy_ros.bag.replay import main

from test.bag.conftest import JOINTS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_report_json_and_plots(make_bag, tmp_path: Path, capsys) -> None:
    bag = make_bag("report", 1.0)
    params = Path(bag).parent / "libero.yaml"
    # The cameras are 3 ms apart, so a zero skew limit holds every tick.
    code = main([str(bag), "--params", str(params), "--out", str(tmp_path / "out"), "--report",
                 str(tmp_path / "report"), "--param", "max_camera_skew_s:=0.0", "--quiet"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["mode"] == "offline" and summary["ticks"] == 4 and summary["chunks"] == 0
    assert summary["held_ticks"] == 4 and summary["hold_reasons"][0]["count"] == 4
    assert "cameras out of sync" in summary["hold_reasons"][0]["example"]
    assert summary["achieved_rate_hz"] == 0.0 and summary["target_rate_hz"] == 5.0

    code = main([str(bag), "--params", str(params), "--out", str(tmp_path / "out2"), "--report",
                 str(tmp_path / "report2"), "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    assert "offline replay of 0.99 s: 4 ticks, 4 chunks" in out
    summary = json.loads((tmp_path / "report2" / "summary.json").read_text())
    assert summary["chunks"] == summary["chunks_in_output"] == 4
    assert summary["action_period_s"] == 0.05  # LIBERO's action period (chunk times), not the 0.2 s tick
    assert summary["achieved_rate_hz"] == 4 / summary["duration_s"]
    assert set(summary["latency_ms"]["infer"]) >= {"p50", "p90", "p99"}
    assert summary["plots"][0] == "overview.png" and len(summary["plots"]) == 1 + 7
    for name in summary["plots"]:
        assert (tmp_path / "report2" / name).read_bytes()[:8] == PNG_MAGIC


def _diagnostics_cdr(values: dict[str, str]) -> bytes:
    from pi0_policy_ros.bag.record import typestore

    store = typestore()
    msgs = store.types
    status = msgs["diagnostic_msgs/msg/DiagnosticStatus"](
        level=b"\x00"[0], name="pi0_policy: control", message="inactive", hardware_id="/pi0_policy",
        values=[msgs["diagnostic_msgs/msg/KeyValue"](key=k, value=v) for k, v in values.items()])
    header = msgs["std_msgs/msg/Header"](stamp=msgs["builtin_interfaces/msg/Time"](sec=0, nanosec=0), frame_id="")
    array = msgs["diagnostic_msgs/msg/DiagnosticArray"](header=header, status=[status])
    return bytes(store.serialize_cdr(array, "diagnostic_msgs/msg/DiagnosticArray"))


def test_realtime_summary_counts_the_inputs_the_node_refused(params_file: Path) -> None:
    from types import SimpleNamespace

    from pi0_policy_ros.bag.inputs import DIAGNOSTIC_ARRAY_TYPE, make_setup
    from pi0_policy_ros.bag.realtime import _summarize
    from pi0_policy_ros.bag.summary import ReplaySummary

    # The node's last /diagnostics report: 3 joint_states messages and 1 image refused.
    values = {"ticks": "10", "holds": "0", "observation_errors": "4", "input_errors.image": "1",
              "input_errors.joint_states": "3", "last_input_error": "empty joint_states: expected joints [...]"}
    player = SimpleNamespace(records=[("/diagnostics", DIAGNOSTIC_ARRAY_TYPE, 0, _diagnostics_cdr(values))])
    summary = ReplaySummary("realtime", "bag", "out", 5.0)
    _summarize(summary, player, make_setup(params_file))  # type: ignore[arg-type]
    content = summary.to_json()
    assert summary.ticks == 10 and content["node_diagnostics"]["observation_errors"] == 4
    # input_rejections is "input messages the node refused": the node's count, not an empty list.
    assert sum(r["count"] for r in content["input_rejections"]) == 4


def test_realtime_summary_takes_the_rate_of_the_last_active_report(params_file: Path) -> None:
    from types import SimpleNamespace

    from pi0_policy_ros.bag.inputs import DIAGNOSTIC_ARRAY_TYPE, make_setup
    from pi0_policy_ros.bag.realtime import _summarize
    from pi0_policy_ros.bag.summary import ReplaySummary

    # The replay ends with SIGINT: the node's report after deactivation keeps its counters at 0 Hz,
    # and the rate read 0.0 in every real-time summary. It was named achieved_rate_hz_wall, but the
    # node counts on its sim clock (bag time): at --rate 0.5, 4.8 Hz for 2.4 chunks a wall second.
    reports = [{"active": "True", "ticks": "8", "holds": "0", "achieved_rate_hz": "1.5"},
               {"active": "True", "ticks": "12", "holds": "1", "achieved_rate_hz": "1.75"},
               {"active": "False", "ticks": "12", "holds": "1", "achieved_rate_hz": "0.0"}]
    player = SimpleNamespace(records=[("/diagnostics", DIAGNOSTIC_ARRAY_TYPE, i, _diagnostics_cdr(v))
                                      for i, v in enumerate(reports)])
    summary = ReplaySummary("realtime", "bag", "out", 5.0)
    _summarize(summary, player, make_setup(params_file))  # type: ignore[arg-type]
    content = summary.to_json()
    assert summary.ticks == 12 and content["node_diagnostics"]["holds"] == 1  # the final counters
    assert content["node_diagnostics"]["achieved_rate_hz"] == 1.75  # /diagnostics' own name and clock
    assert not [key for key in content["node_diagnostics"] if "wall" in key]


def _libero_config(params_file: Path):
    from pi0_policy_ros.bag.inputs import make_setup
    from pi0_policy_ros.policy.robots import get_profile

    setup = make_setup(params_file)
    return setup, setup.config.resolve(get_profile("libero"))


def test_report_states_are_by_header_stamp_and_matched_by_name(make_bag, params_file: Path) -> None:
    import dataclasses

    from pi0_policy_ros.bag.demo import TRANSPORT_DELAY_NS
    from pi0_policy_ros.bag.reader import InputBag
    from pi0_policy_ros.bag.report import _state_column, read_states

    bag = make_bag("report", 1.0)
    setup, config = _libero_config(params_file)
    states = read_states(bag, setup, config)
    with InputBag(bag) as reader:
        bag_times = [t for _, t, _ in reader.messages(["/joint_states"])]
    np.testing.assert_allclose(states.times_s, (np.array(bag_times) - TRANSPORT_DELAY_NS) / 1e9, rtol=0, atol=1e-6)
    # The panel of an action joint shows the joint state of the same name, wherever it sits.
    permuted = dataclasses.replace(config, action_joint_names=tuple(reversed(JOINTS[:7])))
    assert _state_column(permuted, 0) == (6, "joint state joint_6")
    unnamed = dataclasses.replace(config, action_joint_names=tuple(f"a{i}" for i in range(7)))
    assert _state_column(unnamed, 2) == (2, "joint state [2] joint_2")


def test_plots_show_the_actions(params_file: Path, tmp_path: Path) -> None:
    from pi0_policy_ros.bag.report import OVERVIEW_FILE, ChunkSeries, StateSeries, write_plots

    _, config = _libero_config(params_file)
    rng = np.random.default_rng(0)
    actions = rng.normal(size=(4, 10, 7)).astype(np.float32)
    states = StateSeries(np.arange(20) * 0.05, rng.normal(size=(20, 8)))
    written = {}
    for name, chunk_actions in (("a", actions), ("b", -actions)):
        (tmp_path / name).mkdir()
        files = write_plots(tmp_path / name, ChunkSeries(np.arange(4) * 0.2, chunk_actions), states, config, 0.1, 0.0)
        written[name] = {f: (tmp_path / name / f).read_bytes() for f in files}
    assert list(written["a"]) == list(written["b"]) and len(written["a"]) == 1 + 7
    # Other actions, other pictures: the overview and each panel draw the chunks.
    assert all(written["a"][f] != written["b"][f] for f in written["a"]), OVERVIEW_FILE


def test_the_overview_legend_names_no_single_joint(params_file: Path) -> None:
    # One legend stands for every panel: it said "joint state <the first panel's joint>".
    from matplotlib import pyplot as plt

    from pi0_policy_ros.bag.report import SHARED_STATE_LABEL, ChunkSeries, StateSeries, overview_figure

    _, config = _libero_config(params_file)
    rng = np.random.default_rng(0)
    fig = overview_figure(ChunkSeries(np.arange(4) * 0.2, rng.normal(size=(4, 10, 7)).astype(np.float32)),
                          StateSeries(np.arange(20) * 0.05, rng.normal(size=(20, 8))), config, 0.1, 0.0)
    try:
        (legend,) = fig.legends
        labels = [text.get_text() for text in legend.get_texts()]
    finally:
        plt.close(fig)
    assert labels == ["chunks (4)", "first action of each chunk", SHARED_STATE_LABEL]


def test_plots_of_a_replay_with_nothing_to_draw_warn_nothing(params_file: Path, tmp_path: Path) -> None:
    # Every tick held and no joint state readable: each per-dimension plot printed matplotlib's
    # "No artists with labels found to put in legend" with its source path on stderr.
    from pi0_policy_ros.bag.report import ChunkSeries, StateSeries, write_plots

    _, config = _libero_config(params_file)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        files = write_plots(tmp_path, ChunkSeries(np.zeros(0), np.zeros((0, 0, 0), np.float32)),
                            StateSeries(np.zeros(0), np.zeros((0, 8))), config, 0.1, 0.0)
    assert len(files) == 1 + 7 and all((tmp_path / f).read_bytes().startswith(PNG_MAGIC) for f in files)


def test_report_states_leave_out_the_unstamped_messages_the_node_refuses(make_bag, params_file: Path,
                                                                         tmp_path: Path) -> None:
    # A driver's first joint_states without a stamp (0 s) were drawn 1.7e9 s before the bag: every
    # panel's time axis spanned 54 years, the chunks and states squashed into one vertical line.
    from rosbags.rosbag2 import Reader, Writer

    from pi0_policy_ros.bag.record import typestore
    from pi0_policy_ros.bag.report import read_states

    store = typestore()
    bag = tmp_path / "unstamped"
    joints_seen = 0
    with Reader(make_bag("report", 1.0)) as reader, Writer(bag, version=9) as writer:
        conns = {c.id: writer.add_connection(c.topic, c.msgtype, typestore=None, msgdef=c.msgdef.data,
                                             rihs01=c.digest) for c in reader.connections}
        for c, t_ns, raw in reader.messages():
            if c.topic == "/joint_states":
                joints_seen += 1
                if joints_seen <= 3:
                    msg = store.deserialize_cdr(raw, c.msgtype)
                    msg.header.stamp.sec, msg.header.stamp.nanosec = 0, 0
                    raw = store.serialize_cdr(msg, c.msgtype)
            writer.write(conns[c.id], t_ns, raw)
        start_s = reader.start_time / 1e9
    setup, config = _libero_config(params_file)
    states = read_states(bag, setup, config)
    assert len(states.times_s) == len(states.positions) == joints_seen - 3
    assert states.times_s.min() > start_s - 1.0


def test_report_inside_the_output_bag(make_bag, params_file: Path, tmp_path: Path, capsys) -> None:
    # --report is checked before the replay, not made then: the output bag must not exist yet.
    out = tmp_path / "out"
    code = main([str(make_bag("report", 1.0)), "--params", str(params_file), "--out", str(out),
                 "--report", str(out / "report"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert (out / "metadata.yaml").is_file() and (out / "report" / "summary.json").is_file()


def test_the_summary_counts_the_chunks_the_safety_filter_clamped(make_bag, tmp_path: Path, capsys) -> None:
    # Every action's position limited to [-0.01, 0.01]: each chunk goes out clamped. The summary
    # said 4 chunks, no hold, and nothing of the clamps that the node's /diagnostics counts.
    bag = make_bag("report", 1.0)
    params = Path(bag).parent / "libero.yaml"
    code = main([str(bag), "--params", str(params), "--out", str(tmp_path / "out"), "--report",
                 str(tmp_path / "report"), "--param", "safety_position_lower:=[-0.01]",
                 "--param", "safety_position_upper:=[0.01]", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["chunks"] == 4 and summary["safety"]["clamp.position"] == 4
    assert summary["diagnostics"]["values"]["safety.clamp.position"] == "4"  # as the node's /diagnostics
    assert "safety filter clamped: position 4" in out


def test_realtime_summary_counts_the_safety_filter_from_the_node(params_file: Path) -> None:
    from types import SimpleNamespace

    from pi0_policy_ros.bag.inputs import DIAGNOSTIC_ARRAY_TYPE, make_setup
    from pi0_policy_ros.bag.realtime import _summarize
    from pi0_policy_ros.bag.summary import ReplaySummary

    values = {"active": "True", "ticks": "10", "holds": "1", "safety.clamp.step": "9", "safety.reject.step": "1"}
    player = SimpleNamespace(records=[("/diagnostics", DIAGNOSTIC_ARRAY_TYPE, 0, _diagnostics_cdr(values))])
    summary = ReplaySummary("realtime", "bag", "out", 5.0)
    _summarize(summary, player, make_setup(params_file))  # type: ignore[arg-type]
    assert summary.to_json()["safety"] == {"clamp.step": 9, "reject.step": 1}


def test_the_achieved_rate_counts_the_ticks_that_waited_on_schedule(make_bag, tmp_path: Path, capsys) -> None:
    # rtc_fast infers every 8 actions (0.4 s), every second tick at 5 Hz: the ticks between wait on
    # schedule, which the node's /diagnostics counts toward its achieved rate. The summary counted
    # chunks only and said "achieved 2.02 Hz of 5.00 Hz" for a loop that never missed a tick.
    bag = make_bag("report", 1.0)
    params = Path(bag).parent / "libero.yaml"
    code = main([str(bag), "--params", str(params), "--out", str(tmp_path / "out"), "--report",
                 str(tmp_path / "report"), "--param", "chunk_mode:=rtc_fast", "--param", "execute_horizon:=8",
                 "--quiet"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert (summary["ticks"], summary["chunks"], summary["waited_ticks"], summary["held_ticks"]) == (4, 2, 2, 0)
    assert summary["achieved_rate_hz"] == 4 / summary["duration_s"]
    assert summary["diagnostics"]["message"] == f"running at {summary['achieved_rate_hz']:.2f} Hz"


def test_realtime_summary_counts_the_ticks_that_waited_on_schedule(params_file: Path) -> None:
    from types import SimpleNamespace

    from pi0_policy_ros.bag.inputs import DIAGNOSTIC_ARRAY_TYPE, make_setup
    from pi0_policy_ros.bag.realtime import _summarize
    from pi0_policy_ros.bag.summary import ReplaySummary

    values = {"active": "True", "ticks": "10", "holds": "2", "chunks_published": "3"}
    player = SimpleNamespace(records=[("/diagnostics", DIAGNOSTIC_ARRAY_TYPE, 0, _diagnostics_cdr(values))])
    summary = ReplaySummary("realtime", "bag", "out", 5.0)
    _summarize(summary, player, make_setup(params_file))  # type: ignore[arg-type]
    assert summary.to_json()["waited_ticks"] == 5


def test_the_joint_state_line_breaks_where_the_recording_has_a_gap(params_file: Path) -> None:
    # joint_states at 100 Hz, then nothing for 2 s (a recorder stall), then again: the black line
    # was drawn straight across the 2 s, as if the joints had been measured moving there.
    from matplotlib import pyplot as plt

    from pi0_policy_ros.bag.report import ChunkSeries, StateSeries, overview_figure

    _, config = _libero_config(params_file)
    times = np.concatenate([np.arange(100) * 0.01, 3.0 + np.arange(100) * 0.01])
    positions = np.stack([np.linspace(0.0, 1.0, 200)] * 8, axis=1)
    fig = overview_figure(ChunkSeries(np.zeros(0), np.zeros((0, 0, 0), np.float32)), StateSeries(times, positions),
                          config, 0.05, 0.0)
    try:
        (line,) = [line for line in fig.axes[0].get_lines() if line.get_label().startswith("joint state")]
        x, y = (np.asarray(v, dtype=np.float64) for v in line.get_data())
    finally:
        plt.close(fig)
    assert np.count_nonzero(np.isnan(y)) == 1  # one break, between 0.99 s and 3.0 s
    gap = int(np.flatnonzero(np.isnan(y))[0])
    assert x[gap - 1] == 0.99 and x[gap + 1] == 3.0
    np.testing.assert_array_equal(y[~np.isnan(y)], positions[:, 0])


def test_alohas_gripper_readings_are_drawn_as_the_gripper_joint(params_file: Path) -> None:
    # ALOHA measures its grippers as a finger position and commands them as a joint: the black line
    # of a gripper panel sat up to 0.09 of the range off the actions that held the gripper still.
    import dataclasses

    from matplotlib import pyplot as plt

    from pi0_policy_ros.bag.report import ChunkSeries, StateSeries, overview_figure
    from pi0_policy_ros.policy.robots import PROFILES

    _, libero = _libero_config(params_file)
    aloha = PROFILES["pi05_aloha"]
    config = dataclasses.replace(libero, policy=dataclasses.replace(libero.policy, robot_profile="pi05_aloha"),
                                 joint_names=aloha.joint_names, action_joint_names=aloha.joint_names)
    positions = np.tile(np.linspace(0.0, 1.0, 50)[:, None], (1, 14))
    fig = overview_figure(ChunkSeries(np.zeros(0), np.zeros((0, 0, 0), np.float32)),
                          StateSeries(np.arange(50) * 0.01, positions), config, 0.02, 0.0)
    try:
        drawn = {index: np.asarray(line.get_ydata(), dtype=np.float64) for index, ax in enumerate(fig.axes)
                 for line in ax.get_lines() if line.get_label().startswith("joint state")}
        labels = [line.get_label() for line in fig.axes[6].get_lines()]
    finally:
        plt.close(fig)
    # The joint at the finger's opening, from Interbotix's horn linkage (r 0.022 m, L 0.036 m):
    # finger = r sin(theta) + sqrt(L^2 - (r cos(theta))^2), theta from -0.6213 to 1.4910 rad.
    theta = drawn[6] * (1.4910 + 0.6213) - 0.6213
    finger_m = 0.022 * np.sin(theta) + np.sqrt(0.036**2 - (0.022 * np.cos(theta)) ** 2)
    np.testing.assert_allclose(finger_m, 0.01844 + positions[:, 6] * (0.05800 - 0.01844), atol=1e-9)
    np.testing.assert_allclose(drawn[13], drawn[6])
    for arm_joint in (0, 5, 7, 12):
        np.testing.assert_array_equal(drawn[arm_joint], positions[:, arm_joint])
    assert "joint state left_gripper (as the gripper joint)" in labels


def test_the_summarys_reasons_keep_the_names_that_hold_digits(make_bag, tmp_path: Path, capsys) -> None:
    # joint_states without joint_7: input_rejections read "lacks joints ['joint_#']: expected all of
    # ['joint_#', ...]" (every digit of a name masked, as the numbers that vary), with no example.
    from pi0_policy_ros.bag.record import OutputBag
    from pi0_policy_ros.bag.summary import reason_kind

    bag = make_bag("report", 1.0)
    params = Path(bag).parent / "libero.yaml"
    with AnyReader([bag]) as reader, OutputBag(tmp_path / "seven") as out:
        for c, t_ns, raw in reader.messages():
            msg = reader.deserialize(raw, c.msgtype)
            if c.topic == "/joint_states":
                msg.name, msg.position = msg.name[:7], msg.position[:7]
            out.write_message(c.topic, c.msgtype, t_ns, msg)
    code = main([str(tmp_path / "seven"), "--params", str(params), "--out", str(tmp_path / "out"), "--report",
                 str(tmp_path / "report"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    (rejection,) = json.loads((tmp_path / "report" / "summary.json").read_text())["input_rejections"]
    assert "lacks joints ['joint_7']" in rejection["reason"] and rejection["count"] > 0
    assert rejection["example"].startswith("joint_states lacks joints ['joint_7']: expected all of ['joint_0'")
    # Numbers still group: the same cause with other values is one kind.
    assert reason_kind("camera 'cam_1' is stale: found 0.434 s, limit -1e-3") == \
        reason_kind("camera 'cam_1' is stale: found 2.5 s, limit 7") != reason_kind("camera 'cam_2' is stale: found 2 s")
    assert reason_kind("found '8UC3', expected one of ['bgr8', 'rgb8']") == "found '#UC3', expected one of ['bgr8', 'rgb8']"

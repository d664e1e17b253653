"""Parameter files, topic resolution and --map, without any bag."""

from __future__ import annotations

from pathlib import Path

import pytest

from pi0_policy_ros.bag.inputs import load_params_file, make_setup, parse_param_overrides, resolve_topic
from pi0_policy_ros.errors import ConfigError

from test.bag.conftest import write_params


def test_resolve_topic_like_rcl() -> None:
    assert resolve_topic("joint_states") == "/joint_states"
    assert resolve_topic("joint_states", "/robot") == "/robot/joint_states"
    assert resolve_topic("~/action_chunk", "/robot/", "pi0_policy") == "/robot/pi0_policy/action_chunk"
    assert resolve_topic("/abs/topic", "/robot") == "/abs/topic"


def test_params_file_node_patterns(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("/**:\n  ros__parameters: {seed: 1, cpu_threads: 1, other: {gain: 3}}\n"
                    "robot:\n  pi0_policy:\n    ros__parameters: {cpu_threads: 2}\n"
                    "/other/pi0_policy:\n  ros__parameters: {seed: 9}\n")
    assert load_params_file(path, "/robot") == {"seed": 1, "cpu_threads": 2, "other.gain": 3}
    assert load_params_file(path, "/") == {"seed": 1, "cpu_threads": 1, "other.gain": 3}
    with pytest.raises(ConfigError, match="no block applies to node /x/other_node"):
        (tmp_path / "q.yaml").write_text("/robot/pi0_policy:\n  ros__parameters: {seed: 1}\n")
        load_params_file(tmp_path / "q.yaml", "/x", "other_node")


def test_setup_maps_and_overrides(tmp_path: Path) -> None:
    params = write_params(tmp_path / "p.yaml")
    setup = make_setup(params, parse_param_overrides(["control_rate_hz:=2.5"]),
                       ["joint_states:=/robot/joint_states"], namespace="/ns")
    assert setup.config.control.control_rate_hz == 2.5
    by_role = {(t.role, t.camera): t for t in setup.inputs}
    assert by_role[("joint_states", "")].node_topic == "/ns/joint_states"
    assert by_role[("joint_states", "")].bag_topic == "/robot/joint_states"
    assert by_role[("camera", "wrist_image")].bag_topic == "/ns/wrist_image/image_raw/compressed"
    assert by_role[("prompt", "")].bag_topic == "/ns/pi0_policy/prompt" and not by_role[("prompt", "")].required
    assert setup.output_topic("~/joint_trajectory") == "/ns/pi0_policy/joint_trajectory"
    with pytest.raises(ConfigError, match="--map: expected node topics"):
        make_setup(params, remaps=["/nope:=/x"])
    with pytest.raises(ConfigError, match="expected NAME:=VALUE"):
        parse_param_overrides(["control_rate_hz=2"])


def test_override_of_an_unknown_parameter_is_refused(tmp_path: Path) -> None:
    # The node ignores undeclared parameters, so a typo in --param silently changed nothing.
    params = write_params(tmp_path / "p.yaml")
    with pytest.raises(ConfigError, match=r"--param: .*'control_rate' \(did you mean 'control_rate_hz'\?\)"):
        make_setup(params, parse_param_overrides(["control_rate:=2.5"]))
    assert make_setup(params, {"use_sim_time": True}).params["use_sim_time"] is True  # rclpy's own


def test_a_mistyped_name_in_the_nodes_own_block_is_refused(tmp_path: Path) -> None:
    # rclpy ignores an undeclared parameter: `control_rate: 2.0` for control_rate_hz ran the replay,
    # the demo bag and the launch at the default rate without a word.
    path = tmp_path / "p.yaml"
    path.write_text("/**/pi0_policy:\n  ros__parameters: {control_rate: 2.0, seed: 1}\n")
    with pytest.raises(ConfigError, match=r"params file .*p\.yaml, block /\*\*/pi0_policy: expected names of the "
                                          r"node's parameters, found 'control_rate' \(did you mean 'control_rate_hz'\?\)"):
        load_params_file(path, "/")
    # A wildcard block may hold other nodes' parameters; rclpy's own are the node's. QoS overrides
    # are not: the node creates no entity with QoSOverridingOptions, so rclpy ignores them.
    path.write_text("/**:\n  ros__parameters: {other_nodes_gain: 2.0, qos_overrides: {/js: {depth: 1}}}\n"
                    "pi0_policy:\n  ros__parameters: {use_sim_time: true}\n")
    assert load_params_file(path, "/") == {"other_nodes_gain": 2.0, "qos_overrides./js.depth": 1,
                                           "use_sim_time": True}
    path.write_text("pi0_policy:\n  ros__parameters: {use_sim_time: true, qos_overrides: {/js: {depth: 1}}}\n")
    with pytest.raises(ConfigError, match=r"found 'qos_overrides\./js\.depth' \(the node takes no QoS overrides"):
        load_params_file(path, "/")
    with pytest.raises(ConfigError, match="found 'robot_profil' \\(did you mean 'robot_profile'\\?\\)"):
        make_setup(write_params(tmp_path / "q.yaml", robot_profil="pi05_aloha"))


def test_values_the_node_would_refuse_are_refused_by_the_replay(tmp_path: Path) -> None:
    # `--param control_rate_hz:=fast` ended in a TypeError traceback, and an integer for a double
    # (in --param or the file) replayed offline while the real node refuses it at configure.
    params = write_params(tmp_path / "p.yaml")
    with pytest.raises(ConfigError, match=r"control_rate_hz: expected a number with a decimal point.*found str 'fast'"):
        make_setup(params, parse_param_overrides(["control_rate_hz:=fast"]))
    with pytest.raises(ConfigError, match=r"control_rate_hz: expected a number with a decimal point.*found int 5"):
        make_setup(params, parse_param_overrides(["control_rate_hz:=5"]))
    with pytest.raises(ConfigError, match=r"max_camera_skew_s: .*found int 1"):
        make_setup(write_params(tmp_path / "q.yaml", max_camera_skew_s=1))


def test_the_realtime_replay_sizes_the_generic_profile_as_the_node_does(tmp_path: Path) -> None:
    # The node's policy applies profile_state_dim / _action_dim / _action_period_s to the generic
    # profile; the real-time replay resolved the joints and the report's period without them.
    from pi0_policy_ros.bag.realtime import resolved_config
    from pi0_policy_ros.policy.robots import configured_profile

    params = write_params(tmp_path / "generic.yaml", robot_profile="generic", camera_names=["base"],
                          camera_types=["raw"], profile_state_dim=8, profile_action_dim=7,
                          profile_action_period_s=0.05)
    setup = make_setup(params)
    assert configured_profile(setup.config.policy).action_period_s == 0.05
    config = resolved_config(setup)
    assert len(config.joint_names) == 8 and len(config.action_joint_names) == 7


def test_the_replay_takes_the_delta_mask_and_refuses_one_wider_than_the_actions(tmp_path: Path) -> None:
    from pi0_policy_ros.bag.realtime import resolved_config
    from pi0_policy_ros.policy.robots import configured_profile

    params = write_params(tmp_path / "generic.yaml", robot_profile="generic", camera_names=["base"],
                          camera_types=["raw"], profile_state_dim=8, profile_action_dim=7,
                          profile_delta_action_mask=[6, -1])
    assert configured_profile(make_setup(params).config.policy).delta_action_mask == (True,) * 6 + (False,)
    with pytest.raises(ConfigError, match=r"profile_delta_action_mask \[8\] covers 8 action dims: expected at most "
                                          r"the action_dim 7"):
        resolved_config(make_setup(params, parse_param_overrides(["profile_delta_action_mask:=[8]"])))


def test_node_name_patterns_match_whole_tokens(tmp_path: Path) -> None:
    # rcl: `*` stays within one name token, and a pattern names the whole node, not a prefix of it.
    path = tmp_path / "p.yaml"
    path.write_text("/*/pi0_policy:\n  ros__parameters: {seed: 1}\n/**:\n  ros__parameters: {b: 2}\n")
    assert load_params_file(path, "/robot") == {"seed": 1, "b": 2}
    assert load_params_file(path, "/fleet/robot") == {"b": 2}
    path.write_text("/robot/pi0_policy:\n  ros__parameters: {seed: 1}\n/**:\n  ros__parameters: {b: 2}\n")
    assert load_params_file(path, "/robot", "pi0_policy_2") == {"b": 2}
    assert load_params_file(path, "/robot/arm") == {"b": 2}


def test_map_relative_bag_topic_and_one_bag_topic_per_input(tmp_path: Path) -> None:
    params = write_params(tmp_path / "p.yaml")
    # The bag records resolved names: a relative BAG_TOPIC is taken from the root, not the node's namespace.
    setup = make_setup(params, remaps=["joint_states:=robot/joint_states"], namespace="/ns")
    assert {t.role: t.bag_topic for t in setup.inputs}["joint_states"] == "/robot/joint_states"
    # Two inputs from one bag topic: one of them would be silently dropped.
    with pytest.raises(ConfigError, match=r"one bag topic per input, found \['/image/image_raw'\] used twice"):
        make_setup(params, remaps=["joint_states:=/image/image_raw"])


def test_namespace_node_name_and_camera_topics_as_ros_takes_them(tmp_path: Path) -> None:
    # The realtime replay passes the namespace to the node as `-r __ns:=`: rcl refused `robot1` and
    # the node `/robot1/` (a raw rcl error or a traceback from the node), and a name ROS refuses
    # (`robot-1`, a camera topic with a space) was rclpy's InvalidTopicNameException traceback from
    # the replayer's publisher, while the offline replay and demo-bag took it.
    params = write_params(tmp_path / "p.yaml")
    for given in ("robot1", "/robot1", "/robot1/"):
        setup = make_setup(params, namespace=given)
        assert setup.namespace == "/robot1"
        assert {t.role: t.node_topic for t in setup.inputs}["joint_states"] == "/robot1/joint_states"
    assert make_setup(params, namespace="/").namespace == "/"
    with pytest.raises(ConfigError, match=r"namespace 'robot-1': expected"):
        make_setup(params, namespace="robot-1")
    with pytest.raises(ConfigError, match=r"node name 'pi0 policy': expected"):
        make_setup(params, node_name="pi0 policy")
    bad_topic = write_params(tmp_path / "q.yaml", camera_topics=["cam-a/image_raw", "wrist_image/image_raw"])
    with pytest.raises(ConfigError, match=r"camera_topics\[0\] \(camera 'image'\): expected a topic name ROS "
                                          r"accepts.*found '/cam-a/image_raw'"):
        make_setup(bad_topic)


def test_invalid_yaml_is_one_line_naming_where(tmp_path: Path) -> None:
    # PyYAML's message runs over six lines (two quoted snippets with carets): the commands' one
    # `error:` line became seven.
    with pytest.raises(ConfigError) as override:
        parse_param_overrides(["control_rate_hz:=[1"])
    assert str(override.value) == ("--param control_rate_hz: expected a YAML value, found '[1' (expected ',' or ']', "
                                   "but got '<stream end>' at line 1, column 3, while parsing a flow sequence)")
    path = tmp_path / "p.yaml"
    path.write_text("/**:\n  ros__parameters: {a: [1}\n")
    with pytest.raises(ConfigError) as in_file:
        load_params_file(path)
    assert str(in_file.value) == (f"params file {path}: expected ROS parameter YAML, found invalid YAML (expected "
                                  "',' or ']', but got '}' at line 2, column 26, while parsing a flow sequence)")

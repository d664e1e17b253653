"""Which topics a replay reads, and the node configuration it runs with.

A replay runs the node's parameters (a ROS parameter file, as given to `--params-file`) against
a bag. This module turns that file into the node's `NodeConfig` with the node's own
`config_from_params`, resolves the node's relative topic names the way rcl would for a node
`<namespace>/<node_name>`, and applies `--map NODE_TOPIC:=BAG_TOPIC` remappings.

ROS-free: no rclpy import, so the offline replay needs no middleware.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from pi0_policy_ros.errors import ConfigError
from pi0_policy_ros.policy.robots import configured_profile
from pi0_policy_ros.ros.params import (  # noqa: F401 - load_params_file, resolve_topic: re-exported
    NODE_NAME,
    NodeConfig,
    check_node_name,
    check_parameter_names,
    check_topic_name,
    config_from_params,
    load_params_file,
    node_namespace,
    publishes_trajectory,
    resolve_topic,
    yaml_problem,
)

IMAGE_TYPE = "sensor_msgs/msg/Image"
COMPRESSED_IMAGE_TYPE = "sensor_msgs/msg/CompressedImage"
JOINT_STATE_TYPE = "sensor_msgs/msg/JointState"
STRING_TYPE = "std_msgs/msg/String"
HEADER_TYPE = "std_msgs/msg/Header"
FLOAT32_MULTI_ARRAY_TYPE = "std_msgs/msg/Float32MultiArray"
JOINT_TRAJECTORY_TYPE = "trajectory_msgs/msg/JointTrajectory"
DIAGNOSTIC_ARRAY_TYPE = "diagnostic_msgs/msg/DiagnosticArray"


def parse_assignments(items: Sequence[str], what: str) -> dict[str, str]:
    """`NAME:=VALUE` strings (as ROS `-p` and `-r` take them) -> {NAME: VALUE}."""
    pairs: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition(":=")
        if not sep or not name:
            raise ConfigError(f"{what}: expected NAME:=VALUE, found {item!r}")
        pairs[name] = value
    return pairs


def parse_param_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`--param NAME:=VALUE`; VALUE is YAML, as with `ros2 run ... -p` (`[a, b]`, `10.0`, `true`)."""
    out: dict[str, Any] = {}
    for name, text in parse_assignments(items, "--param").items():
        try:
            out[name] = yaml.safe_load(text) if text else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--param {name}: expected a YAML value, found {text!r} ({yaml_problem(exc)})") from None
    return out


@dataclass(frozen=True)
class InputTopic:
    """One topic the node subscribes to, and where the bag has it.

    role: "camera", "joint_states" or "prompt"; camera: the camera name (cameras only).
    node_topic: the name the node subscribes to (resolved). bag_topic: the bag's topic.
    msgtype: the type the node expects. required: the replay fails without it in the bag.
    """

    role: str
    camera: str
    node_topic: str
    bag_topic: str
    msgtype: str
    required: bool

    @property
    def label(self) -> str:
        return f"camera {self.camera!r}" if self.role == "camera" else self.role


@dataclass(frozen=True)
class ReplaySetup:
    """A node configuration, plus the topics a replay reads and writes for it.

    params: the parameter values (file + overrides); config: `config_from_params(params)`,
    not yet resolved against a policy's profile.
    """

    params: dict[str, Any]
    config: NodeConfig
    namespace: str
    node_name: str
    inputs: tuple[InputTopic, ...]

    def output_topic(self, name: str) -> str:
        """The resolved name of one of the node's `~/` outputs (or `/diagnostics`)."""
        return resolve_topic(name, self.namespace, self.node_name)

    @cached_property  # the offline replay reads it for every chunk it writes
    def outputs(self) -> dict[str, str]:
        """Resolved output topic -> message type, as ros/node.py publishes them (no trajectory for a
        profile whose actions are not joint positions)."""
        topics = {
            self.output_topic("~/action_chunk_stamp"): HEADER_TYPE,
            self.output_topic("~/action_chunk"): FLOAT32_MULTI_ARRAY_TYPE,
        }
        action_space = configured_profile(self.config.policy).action_space
        if publishes_trajectory(self.config.trajectory_actions, action_space):
            topics[self.output_topic("~/joint_trajectory")] = JOINT_TRAJECTORY_TYPE
        return topics


def make_setup(params_file: str | Path, overrides: Mapping[str, Any] | None = None,
               remaps: Sequence[str] = (), namespace: str = "/", node_name: str = NODE_NAME) -> ReplaySetup:
    """The node's configuration from a parameter file, and its input topics in the bag.

    remaps: `NODE_TOPIC:=BAG_TOPIC`; NODE_TOPIC as in the parameters (relative or resolved).
    """
    # The realtime replay starts the node in this namespace and publishes on these topics: a
    # name rcl refuses fails here, before the bag is read, as it would fail there.
    namespace = node_namespace(namespace)
    check_node_name(node_name)
    check_parameter_names(list(overrides or {}), "--param")
    params = {**load_params_file(params_file, namespace, node_name), **(overrides or {})}
    config = config_from_params(params)
    mapping = {resolve_topic(k, namespace, node_name): resolve_topic(v, "/", node_name)
               for k, v in parse_assignments(remaps, "--map").items()}
    wanted = [("camera", c.name, c.topic, COMPRESSED_IMAGE_TYPE if c.compressed else IMAGE_TYPE, True)
              for c in config.cameras]
    wanted += [("joint_states", "", "joint_states", JOINT_STATE_TYPE, True),
               ("prompt", "", "~/prompt", STRING_TYPE, False)]
    inputs = []
    for role, camera, name, msgtype, required in wanted:
        node_topic = resolve_topic(name, namespace, node_name)
        # cameras come first in `wanted`: len(inputs) is the camera's index
        check_topic_name(node_topic, f"camera_topics[{len(inputs)}] (camera {camera!r})" if role == "camera" else role)
        inputs.append(InputTopic(role, camera, node_topic, mapping.pop(node_topic, node_topic), msgtype, required))
    if mapping:
        raise ConfigError(f"--map: expected node topics among {[t.node_topic for t in inputs]}, "
                          f"found {sorted(mapping)}")
    bag_topics = [t.bag_topic for t in inputs]
    duplicates = sorted({t for t in bag_topics if bag_topics.count(t) > 1})
    if duplicates:
        raise ConfigError(f"inputs: expected one bag topic per input, found {duplicates} used twice")
    return ReplaySetup(params=params, config=config, namespace=namespace, node_name=node_name,
                       inputs=tuple(inputs))

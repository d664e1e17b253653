"""One rclpy context and one spinning MultiThreadedExecutor for the whole session; nodes per test."""

from __future__ import annotations

import itertools
import threading
import time
from typing import Callable, Iterator

import pytest

rclpy = pytest.importorskip("rclpy")

from rclpy.exceptions import InvalidHandle  # noqa: E402
from rclpy.executors import MultiThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402

from test.fakes import FakePolicy, FakeProfile  # noqa: E402
from test.integration.harness import JOINTS, Probe  # noqa: E402
from pi0_policy_ros.ros.node import PolicyNode  # noqa: E402

_namespaces = itertools.count()

BASE_PARAMS = {
    "camera_names": ["cam_a", "cam_b"],
    "camera_types": ["raw", "compressed"],
    "joint_names": JOINTS,
    "control_rate_hz": 20.0,
    "max_observation_age_s": 0.3,
    "max_camera_skew_s": 0.2,
    "diagnostics_period_s": 0.1,
}


@pytest.fixture(scope="session")
def executor() -> Iterator[MultiThreadedExecutor]:
    rclpy.init()
    ex = MultiThreadedExecutor(num_threads=4)
    stop = threading.Event()
    errors: list[BaseException] = []

    def spin() -> None:
        # A callback that raises would end executor.spin() and silently stall every later test.
        while not stop.is_set():
            try:
                ex.spin_once(timeout_sec=0.05)
            except InvalidHandle:
                continue  # an entity destroyed by a transition or a teardown: as the node's main() does
            except Exception as exc:  # noqa: BLE001 - recorded and reported at teardown
                errors.append(exc)

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    try:
        yield ex
    finally:
        stop.set()
        thread.join(timeout=5.0)
        ex.shutdown()
        rclpy.try_shutdown()
        assert not errors, f"callbacks raised: {errors[:5]!r}"


@pytest.fixture
def namespace() -> str:
    return f"/it{next(_namespaces)}"


@pytest.fixture
def make_node(executor: MultiThreadedExecutor, namespace: str) -> Iterator[Callable[..., PolicyNode]]:
    """make_node(params=..., profile=..., latency_s=..., policy_factory=..., **node_kwargs) -> PolicyNode on the
    executor; the default factory is a FakePolicy with that profile and latency."""
    nodes: list[PolicyNode] = []

    def make(params: dict | None = None, profile: FakeProfile | None = None, latency_s: float = 0.0,
             **kwargs) -> PolicyNode:
        values = {**BASE_PARAMS, **(params or {})}
        overrides = [Parameter(k, value=v) for k, v in values.items()]
        factory = kwargs.pop("policy_factory", None) or (lambda cfg: FakePolicy(cfg, profile, latency_s))
        node = PolicyNode(namespace=namespace, parameter_overrides=overrides, policy_factory=factory, **kwargs)
        executor.add_node(node)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        executor.remove_node(node)
    let_executor_drop_removed_nodes(nodes)
    for node in nodes:
        node._release()
        node.destroy_node()


@pytest.fixture
def probe(executor: MultiThreadedExecutor, namespace: str) -> Iterator[Probe]:
    node = Probe(namespace)
    executor.add_node(node)
    yield node
    executor.remove_node(node)
    let_executor_drop_removed_nodes([node])
    node.destroy_node()


def let_executor_drop_removed_nodes(nodes: list) -> None:
    """remove_node() does not wait for the executor thread: a wait set it is building may still hold
    the node's entities, and destroying them then raises InvalidHandle in that thread. One spin
    period (0.05 s) and a margin lets it move on."""
    if nodes:
        time.sleep(0.12)

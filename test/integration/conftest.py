"""One rclpy context and one spinning MultiThreadedExecutor for the whole session; nodes per test."""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any, Callable, Iterator

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
def attach(executor: MultiThreadedExecutor) -> Iterator[Callable[[Any], Any]]:
    """attach(node) -> node: spun by the session executor during the test, then removed, released
    (a PolicyNode's policy) and destroyed in the order the executor thread needs."""
    nodes: list[Any] = []

    def add(node: Any) -> Any:
        executor.add_node(node)
        nodes.append(node)
        return node

    yield add
    for node in nodes:
        executor.remove_node(node)
    _let_executor_drop_removed_nodes()
    for node in nodes:
        if isinstance(node, PolicyNode):
            node._release()
        node.destroy_node()


@pytest.fixture
def make_node(attach: Callable[[Any], Any], namespace: str) -> Callable[..., PolicyNode]:
    """make_node(params=..., profile=..., latency_s=..., policy_factory=..., **node_kwargs) -> PolicyNode on the
    executor; the default factory is a FakePolicy with that profile and latency."""

    def make(params: dict | None = None, profile: FakeProfile | None = None, latency_s: float = 0.0,
             **kwargs) -> PolicyNode:
        values = {**BASE_PARAMS, **(params or {})}
        overrides = [Parameter(k, value=v) for k, v in values.items()]
        factory = kwargs.pop("policy_factory", None) or (lambda cfg: FakePolicy(cfg, profile, latency_s))
        return attach(PolicyNode(namespace=namespace, parameter_overrides=overrides, policy_factory=factory,
                                 **kwargs))

    return make


@pytest.fixture
def probe(attach: Callable[[Any], Any], namespace: str) -> Probe:
    return attach(Probe(namespace))


def _let_executor_drop_removed_nodes() -> None:
    """remove_node() does not wait for the executor thread: a wait set it is building may still hold
    the node's entities, and destroying them then raises InvalidHandle in that thread. One spin
    period (0.05 s) and a margin lets it move on."""
    time.sleep(0.12)

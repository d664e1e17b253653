"""ros/poller.py on real rclpy subscriptions over DDS: one pass takes every message a subscription
holds, a raising callback or a destroyed subscription stops nothing else, executors neither take
nor wait on polled messages, and the polling thread outlives a pass longer than its period."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from rclpy.node import Node
from rclpy.qos import QoSProfile
from std_msgs.msg import String

from test.integration.harness import wait_for
from pi0_policy_ros.ros.poller import MAX_PER_PASS, PolledCallbackGroup, SubscriptionPoller

QOS = QoSProfile(depth=10)  # reliable: nothing is lost on loopback
DELIVERY_S = 1.0  # loopback delivery of a few small messages, with a wide margin (a loaded CI machine)


class Pair:
    """A publisher and a polled subscription on `topic` of one node; `received` in callback order."""

    def __init__(self, node: Node, topic: str, group: Any, fail_on: str | None = None,
                 first_takes_s: float = 0.0) -> None:
        self.received: list[str] = []
        self.threads: set[str] = set()
        self._fail_on = fail_on
        self._first_takes_s = first_takes_s
        self.pub = node.create_publisher(String, topic, QOS)
        self.sub = node.create_subscription(String, topic, self._callback, QOS, callback_group=group)
        wait_for(lambda: self.pub.get_subscription_count() == 1)

    def _callback(self, msg: String) -> None:
        self.threads.add(threading.current_thread().name)
        self.received.append(msg.data)
        if msg.data == self._fail_on:
            raise RuntimeError(f"bad {msg.data}")
        if len(self.received) == 1:
            time.sleep(self._first_takes_s)

    def send(self, *texts: str) -> None:
        for text in texts:
            self.pub.publish(String(data=text))


def polling(*pairs: Pair, on_error: Any = lambda sub, exc: None) -> SubscriptionPoller:
    """A poller (not started: the tests call poll_once) over the pairs' subscriptions."""
    poller = SubscriptionPoller(0.01, on_error)
    for pair in pairs:
        poller.add(pair.sub)
    return poller


@pytest.fixture
def node(attach, namespace: str) -> Node:
    return attach(Node("poller_test", namespace=namespace))  # spun by the session executor


def test_one_pass_takes_everything_each_subscription_holds(node: Node) -> None:
    group = PolledCallbackGroup()
    a, b = Pair(node, "a", group), Pair(node, "b", group)
    poller = polling(a, b)
    a.send(*"01234")
    b.send("x", "y")
    time.sleep(DELIVERY_S)
    assert a.received == [] and b.received == []  # the spinning executor took none of them
    assert poller.poll_once() == 7
    assert a.received == list("01234") and b.received == ["x", "y"]
    assert poller.poll_once() == 0 and poller.passes == 2


def test_a_raising_callback_is_reported_and_the_rest_still_run(node: Node) -> None:
    group = PolledCallbackGroup()
    bad, good = Pair(node, "bad", group, fail_on="1"), Pair(node, "good", group)
    errors: list[tuple[str, str]] = []
    poller = polling(bad, good, on_error=lambda sub, exc: errors.append((sub.topic_name, str(exc))))
    bad.send("0", "1", "2")
    good.send("g")
    time.sleep(DELIVERY_S)
    assert poller.poll_once() == 4
    assert bad.received == ["0", "1", "2"] and good.received == ["g"]
    assert errors == [(bad.sub.topic_name, "bad 1")]


def test_a_destroyed_subscription_is_skipped(node: Node) -> None:
    group = PolledCallbackGroup()
    gone, kept = Pair(node, "gone", group), Pair(node, "kept", group)
    poller = polling(gone, kept)
    kept.send("k")
    time.sleep(DELIVERY_S)
    node.destroy_subscription(gone.sub)
    assert poller.poll_once() == 1 and kept.received == ["k"]


def test_the_thread_runs_callbacks_and_survives_a_pass_longer_than_its_period(node: Node) -> None:
    pair = Pair(node, "slow", PolledCallbackGroup(), first_takes_s=0.05)  # ten periods: the next pass is late
    poller = SubscriptionPoller(0.005, lambda sub, exc: None, name="test_poller_thread")
    poller.add(pair.sub)
    poller.start()
    try:
        pair.send("late")
        wait_for(lambda: pair.received == ["late"])
        pair.send("then")
        wait_for(lambda: pair.received == ["late", "then"])
        assert pair.threads == {"test_poller_thread"}
    finally:
        poller.stop()
    assert not any(t.name == "test_poller_thread" for t in threading.enumerate())
    passes = poller.passes
    time.sleep(0.05)
    assert poller.passes == passes  # stopped


def test_argument_and_lifecycle_errors(node: Node) -> None:
    for period_s in (0.0, -0.001, float("nan")):
        with pytest.raises(ValueError, match="expected a polling period > 0 s"):
            SubscriptionPoller(period_s, lambda sub, exc: None)
    pair = Pair(node, "c", PolledCallbackGroup())
    poller = SubscriptionPoller(0.01, lambda sub, exc: None, name="test_poller_once")
    poller.start()
    poller.start()  # idempotent: one thread
    try:
        assert sum(t.name == "test_poller_once" for t in threading.enumerate()) == 1
        with pytest.raises(RuntimeError, match="add subscriptions before start"):
            poller.add(pair.sub)
    finally:
        poller.stop()
        poller.stop()


def test_a_pass_takes_at_most_max_per_pass_from_one_subscription(node: Node) -> None:
    group = PolledCallbackGroup()
    qos = QoSProfile(depth=MAX_PER_PASS + 10)
    received: list[str] = []
    pub = node.create_publisher(String, "many", qos)
    sub = node.create_subscription(String, "many", lambda m: received.append(m.data), qos, callback_group=group)
    wait_for(lambda: pub.get_subscription_count() == 1)
    poller = SubscriptionPoller(0.01, lambda s, exc: None)
    poller.add(sub)
    for i in range(MAX_PER_PASS + 5):
        pub.publish(String(data=str(i)))
    time.sleep(DELIVERY_S)
    assert poller.poll_once() == MAX_PER_PASS
    assert poller.poll_once() == 5
    assert received == [str(i) for i in range(MAX_PER_PASS + 5)]


def test_an_executor_does_not_wake_for_a_polled_message(namespace: str) -> None:
    """A polled subscription holding a message is not in the executor's wait set: spin_once waits its
    whole timeout instead of waking for a message it may not take (a busy loop while inputs flow)."""
    from rclpy.executors import SingleThreadedExecutor

    node = Node("poller_wait_test", namespace=namespace)
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        pair = Pair(node, "waiting", PolledCallbackGroup())
        pair.send("m")
        time.sleep(DELIVERY_S)
        t0 = time.monotonic()
        executor.spin_once(timeout_sec=0.3)
        assert time.monotonic() - t0 >= 0.25
        poller = SubscriptionPoller(0.01, lambda sub, exc: None)
        poller.add(pair.sub)
        assert poller.poll_once() == 1 and pair.received == ["m"]
    finally:
        executor.shutdown()
        node.destroy_node()

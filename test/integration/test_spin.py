"""`spin_until_shutdown`: a shutdown racing the executor's wait ends the loop quietly; any other
error while the context is alive still surfaces. The race itself (rclpy.shutdown from another
thread between `ok()` and the wait's timer creation) cannot be timed reliably with a real
executor, so a stand-in with the executor's `context` / `spin_once` API raises what rclpy raised
there (seen in test_demo), on a real rclpy context."""

from __future__ import annotations

import pytest

rclpy = pytest.importorskip("rclpy")

from rclpy._rclpy_pybind11 import RCLError  # noqa: E402

from pi0_policy_ros.ros.node import spin_until_shutdown  # noqa: E402


class _Executor:
    def __init__(self, shutdown_first: bool) -> None:
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.shutdown_first = shutdown_first
        self.calls = 0

    def spin_once(self, timeout_sec: float) -> None:
        self.calls += 1
        if self.shutdown_first:
            rclpy.shutdown(context=self.context)
        raise RCLError("failed to create timer: the given context is not valid")


def test_shutdown_during_the_wait_ends_the_loop() -> None:
    executor = _Executor(shutdown_first=True)
    spin_until_shutdown(executor)
    assert executor.calls == 1 and not rclpy.ok(context=executor.context)


def test_an_error_while_running_is_raised() -> None:
    executor = _Executor(shutdown_first=False)
    try:
        with pytest.raises(RCLError):
            spin_until_shutdown(executor)
    finally:
        rclpy.shutdown(context=executor.context)


def test_stop_ends_the_loop_before_the_executor_shuts_down() -> None:
    # A spinner thread beside the caller's (demo, load-bench) must be gone before
    # executor.shutdown(), which destroys the guard condition a running wait still adds to its
    # wait set (an AttributeError in the spinner, seen at the end of the demo test).
    import threading

    from rclpy.executors import SingleThreadedExecutor

    context = rclpy.Context()
    rclpy.init(context=context)
    executor = SingleThreadedExecutor(context=context)
    node = rclpy.create_node("spin_stop", context=context)
    executor.add_node(node)
    stop, errors = threading.Event(), []

    def spin() -> None:
        try:
            spin_until_shutdown(executor, stop)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    spinner = threading.Thread(target=spin)
    try:
        spinner.start()
        stop.set()
        spinner.join(timeout=2.0)
        assert not spinner.is_alive() and errors == [] and rclpy.ok(context=context)
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=context)

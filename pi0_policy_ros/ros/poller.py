"""Sensor subscriptions read by one polling thread instead of the executor.

Why: rclpy's Python executors cost far more per message than our callbacks do. For each message a
`MultiThreadedExecutor` rebuilds its wait set from every entity of the node (a lifecycle node has
about twenty: lifecycle and parameter services, timers, subscriptions), wraps the callback in a
task, queues it for its thread pool and is woken twice more by guard conditions. All of that is
Python holding the GIL, which eager CPU inference needs between torch ops. Measured on 2 cores
(bench/results/load_cpu.md): a plain node with empty callbacks needed 1.1 cores to take ~200 of
1,000 joint states a second plus 3 x 60 images; with the tiny model, the same load through the
executor took the control rate to 3-16 % of its unloaded value.

`SubscriptionPoller` wakes every `period_s` and takes what each subscription holds (at most its QoS
depth) with the same call the executor uses (`Subscription.handle.take_message`), then runs the
subscription's callback: per message only the take and our callback run (with raw camera and
joint_states subscriptions, 0.07-0.10 core for 1,180 messages/s). Messages wait at most one period
(plus the GIL) before their callback runs; a topic faster than depth / period drops its oldest
samples in DDS, as a busy executor does.

The subscriptions belong to a `PolledCallbackGroup`, which tells every rclpy executor that they
never can execute (`CallbackGroup.can_execute`, the extension point rclpy's executors consult
before waiting on an entity), so no executor waits on them or takes from them.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from rclpy.callback_groups import CallbackGroup
from rclpy.exceptions import InvalidHandle
from rclpy.subscription import Subscription

# Messages taken from one subscription per pass at most: a DDS reader holds at most its depth, so
# this only bounds a pass when messages arrive faster than they are taken.
MAX_PER_PASS = 64


class PolledCallbackGroup(CallbackGroup):
    """Entities of this group are never run by an executor: a `SubscriptionPoller` takes their messages."""

    def can_execute(self, entity: Any) -> bool:
        return False

    def beginning_execution(self, entity: Any) -> bool:
        return False

    def ending_execution(self, entity: Any) -> None:
        pass


class SubscriptionPoller:
    """One thread that takes the messages of its subscriptions every `period_s` and runs their callbacks.

    on_error(subscription, exc): called (on the polling thread) for an exception raised by a take or
    a callback; the thread goes on with the next message. Add subscriptions before `start()`;
    `stop()` joins the thread and is idempotent, so the owner can stop it before destroying them.
    """

    def __init__(self, period_s: float, on_error: Callable[[Subscription, Exception], None],
                 name: str = "sensor_poller") -> None:
        if not period_s > 0.0:
            raise ValueError(f"expected a polling period > 0 s, found {period_s!r}")
        self.period_s = period_s
        self._on_error = on_error
        self._name = name
        self._subscriptions: list[Subscription] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.passes = 0  # polling passes so far (diagnostics, tests)

    def add(self, subscription: Subscription) -> None:
        if self._thread is not None:
            raise RuntimeError("add subscriptions before start()")
        self._subscriptions.append(subscription)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def poll_once(self) -> int:
        """Take every message the subscriptions hold now and run their callbacks; returns how many."""
        taken = 0
        for sub in self._subscriptions:
            try:
                with sub.handle:
                    taken += self._drain(sub)
            except InvalidHandle:
                continue  # destroyed under us: its owner is shutting down
        self.passes += 1
        return taken

    def _drain(self, sub: Subscription) -> int:
        taken = 0
        for _ in range(MAX_PER_PASS):
            try:
                item = sub.handle.take_message(sub.msg_type, sub.raw)
            except Exception as exc:  # noqa: BLE001 - reported; the other topics keep going
                self._on_error(sub, exc)
                return taken
            if item is None:
                return taken
            taken += 1
            try:
                sub.callback(item[0])
            except Exception as exc:  # noqa: BLE001 - a callback bug must not stop every input
                self._on_error(sub, exc)
        return taken

    def _run(self) -> None:
        # An absolute schedule; a late pass (GIL, CPU) is not made up with a burst.
        next_s = time.monotonic()
        while not self._stop.is_set():
            self.poll_once()
            next_s += self.period_s
            delay_s = next_s - time.monotonic()
            if delay_s < 0.0:
                next_s, delay_s = time.monotonic(), 0.0
            # sleep, not Event.wait: half the cost per pass, and stop() waits at most one period.
            time.sleep(delay_s)

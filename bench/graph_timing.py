"""The bench scripts' one timer for short GPU calls: a run of calls captured in one CUDA graph,
timed by events around its replays."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def graph_time_us(fn: Callable[[int], T], calls: int, replays: int = 30) -> tuple[float, T]:
    """Median µs per call over `replays` replays of fn(0), …, fn(calls - 1) captured in one graph
    (each call warmed up once on a side stream first: compilation and autotuning stay out of the
    capture), and what the last captured call returned (its buffers hold the latest replay's result)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(calls):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            out = fn(i)
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times), out

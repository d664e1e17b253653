"""What stalls the host thread in the end-to-end tail (notes, attempt 49).

Attempt 48 found the e2e p99 tail in `host_prepare` / `host_launch` (1-2 ms in 1-2 % of inferences)
and ruled out the garbage collector and core migration. This probe runs the bench's bf16 engine
(pi0.5, 3 slots of which 2 valid, 24 tokens) and records, around every `infer`, the calling
thread's scheduler counters:
- /proc/thread-self/schedstat: time on a CPU, time runnable but waiting for one (run-queue wait);
- getrusage(RUSAGE_THREAD): voluntary / involuntary context switches, minor / major page faults;
- /proc/stat: the machine's steal time (the hypervisor running something else on our vCPUs).
A tail that comes with run-queue wait or involuntary switches is preemption (another thread or
process took the core); with voluntary switches, the thread blocked (a lock, a driver call); with
neither, the core itself stalled (steal, page faults, an interrupt storm). Phases: the default
policy, SCHED_FIFO (when permitted: what a robot's control process would use), the default again.

    python3 bench/host_tail_probe.py --iterations 1500 --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pi0_policy_ros.engine.bench import _environment  # noqa: E402
from pi0_policy_ros.engine.engine import Engine  # noqa: E402
from pi0_policy_ros.engine.types import EngineShape, random_batch  # noqa: E402
from pi0_policy_ros.model.checkpoint import random_model  # noqa: E402
from pi0_policy_ros.model.config import get_preset  # noqa: E402

FIELDS = ("run_ms", "runqueue_ms", "vol_switches", "invol_switches", "minor_faults", "major_faults", "steal_ms")


def _thread_counters() -> np.ndarray:
    run_ns, wait_ns, _ = (int(v) for v in Path("/proc/thread-self/schedstat").read_text().split())
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    # /proc/stat's first line: cpu user nice system idle iowait irq softirq steal ...; USER_HZ ticks
    steal_ticks = int(Path("/proc/stat").read_text().split("\n", 1)[0].split()[8])
    return np.array([run_ns / 1e6, wait_ns / 1e6, usage.ru_nvcsw, usage.ru_nivcsw, usage.ru_minflt,
                     usage.ru_majflt, steal_ticks * 1e3 / os.sysconf("SC_CLK_TCK")], dtype=np.float64)


def _other_threads() -> dict[str, float]:
    """CPU ms so far of every thread of this process but the caller's, by name."""
    me = str(__import__("threading").get_native_id())
    out: dict[str, float] = {}
    for task in Path("/proc/self/task").iterdir():
        if task.name == me:
            continue
        try:
            name = (task / "comm").read_text().strip()
            run_ns = int((task / "schedstat").read_text().split()[0])
        except OSError:
            continue
        out[f"{name}/{task.name}"] = run_ns / 1e6
    return out


def _phase(engine: Engine, batches: list, iterations: int) -> dict[str, object]:
    rows = []
    before_threads = _other_threads()
    for i in range(iterations):
        c0 = _thread_counters()
        t0 = time.perf_counter()
        engine.infer(batches[i % len(batches)])
        wall = (time.perf_counter() - t0) * 1e3
        c1 = _thread_counters()
        t = engine.last_timings_ms
        rows.append([wall, t["host_prepare"], t["host_launch"], t["host_wait"], *(c1 - c0)])
    after_threads = _other_threads()
    data = np.array(rows)
    host = data[:, 1] + data[:, 2]
    tail = host > max(0.8, 4 * np.median(host))
    columns = ("e2e_ms", "host_prepare_ms", "host_launch_ms", "host_wait_ms", *FIELDS)

    def summary(mask: np.ndarray) -> dict[str, float]:
        if not mask.any():
            return {}
        return {c: round(float(data[mask, j].mean()), 4) for j, c in enumerate(columns)}

    busy = {k: round(after_threads[k] - v, 2) for k, v in before_threads.items() if k in after_threads}
    return {
        "iterations": iterations,
        "e2e_median_ms": float(np.median(data[:, 0])), "e2e_p99_ms": float(np.percentile(data[:, 0], 99)),
        "host_median_ms": float(np.median(host)), "host_p99_ms": float(np.percentile(host, 99)),
        "tail_count": int(tail.sum()),
        "tail_mean": summary(tail), "rest_mean": summary(~tail),
        "tail_rows": [[round(float(v), 3) for v in data[k]] for k in np.flatnonzero(tail)[:40]],
        "columns": list(columns),
        "other_threads_busy_ms": dict(sorted(busy.items(), key=lambda kv: -kv[1])[:12]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=1500)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    device = torch.device("cuda")
    cfg = get_preset("pi05")
    shape = EngineShape.for_model(cfg, num_slots=3)
    batches = [random_batch(shape, i, valid_slots=2, valid_tokens=24) for i in range(3)]
    model = random_model(cfg, device, torch.bfloat16, seed=0)
    engine = Engine.create(model, shape, device, "bfloat16")
    for b in batches * 20:
        engine.infer(b)
    result: dict[str, object] = {"environment": _environment(), "cpus": os.cpu_count(),
                                 "threads": len(list(Path("/proc/self/task").iterdir())), "phases": {}}
    phases = ["default", "fifo", "default_again"]
    for name in phases:
        if name == "fifo":
            try:
                os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(50))
            except PermissionError as exc:
                result["phases"][name] = {"error": f"SCHED_FIFO not permitted: {exc}"}
                continue
        result["phases"][name] = _phase(engine, batches, args.iterations)
        if name == "fifo":
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    Path(args.json).write_text(json.dumps(result, indent=1))
    for name, phase in result["phases"].items():
        if "error" in phase:
            print(name, phase["error"])
            continue
        print(f"{name}: e2e median {phase['e2e_median_ms']:.2f} p99 {phase['e2e_p99_ms']:.2f} ms; host median "
              f"{phase['host_median_ms']:.3f} p99 {phase['host_p99_ms']:.3f}; tails {phase['tail_count']}")
        print("  tail:", phase["tail_mean"])
        print("  rest:", phase["rest_mean"])
        print("  other threads busy ms:", phase["other_threads_busy_ms"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`pi0-policy soak --minutes N`: the demo (node + synthetic robot over DDS) for a long time,
sampling this process's RSS (and GPU memory on CUDA) every `--sample-s` seconds.

Memory must stay flat: growth after warm-up is (mean of the last three samples − the first sample
after warm-up) / that first sample. The node runs in this process, so its RSS is the one sampled;
the robot runs in a child process (as in `pi0-policy demo`).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pi0_policy_ros.errors import ConfigError
from pi0_policy_ros.jsonout import json_text, prepare_output_file
from pi0_policy_ros.ros.demo import DemoReport, default_params_file, run_demo


def proc_status_value(name: str) -> int:
    """A field of /proc/self/status (Linux): kB for memory (VmRSS), a count for Threads."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise OSError(f"no {name} in /proc/self/status")


def rss_bytes() -> int:
    """Resident set size of this process."""
    return proc_status_value("VmRSS") * 1024


def gpu_bytes() -> dict[str, int] | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return {"allocated": int(torch.cuda.memory_allocated()), "reserved": int(torch.cuda.memory_reserved())}


@dataclass
class Sample:
    t_s: float
    rss_bytes: int
    gpu: dict[str, int] | None
    threads: int


@dataclass
class SoakResult:
    minutes: float
    sample_s: float
    warmup_s: float
    samples: list[Sample] = field(default_factory=list)
    demo: dict[str, Any] | None = None
    growth: dict[str, float] = field(default_factory=dict)
    passed: bool = False


def growth_after_warmup(samples: list[Sample], warmup_s: float, key: str) -> float:
    """Relative growth of one series from the first sample after warm-up to the last three; nan
    (not measured, which fails the soak) with fewer than two samples after warm-up."""
    values = [(s.t_s, _value(s, key)) for s in samples]
    values = [(t, v) for t, v in values if v is not None]
    after = [v for t, v in values if t >= warmup_s]
    if len(after) < 2 or after[0] == 0:
        return math.nan
    tail = after[-3:]
    return (sum(tail) / len(tail) - after[0]) / after[0]


def _value(sample: Sample, key: str) -> float | None:
    if key == "rss":
        return float(sample.rss_bytes)
    if sample.gpu is None:
        return None
    return float(sample.gpu[key])


def soak(params: Path, minutes: float, sample_s: float, warmup_s: float, device: str | None,
         max_growth: float = 0.01) -> SoakResult:
    # A sampling period <= 0 made the sampler spin, taking a core from the node it measures.
    for name, value in (("minutes", minutes), ("sample_s", sample_s)):
        if not value > 0:
            raise ConfigError(f"{name}: expected > 0, found {value}")
        if not math.isfinite(value):  # an endless soak measures nothing; time.sleep overflows
            raise ConfigError(f"{name}: expected a finite number, found {value}")
    if not warmup_s >= 0:
        raise ConfigError(f"warmup_s: expected >= 0 s, found {warmup_s}")
    # Growth is measured between samples after warm-up: a shorter soak would measure nothing.
    if minutes * 60.0 < warmup_s + 2 * sample_s:
        raise ConfigError(f"minutes: expected a soak of at least the warm-up plus two samples, "
                          f"{(warmup_s + 2 * sample_s) / 60.0:.3g} min (warmup_s {warmup_s:g} + 2 x sample_s "
                          f"{sample_s:g}), found {minutes:g} min")
    result = SoakResult(minutes=minutes, sample_s=sample_s, warmup_s=warmup_s)
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["report"] = run_demo(params, duration_s=minutes * 60.0, device=device)
        except Exception as exc:  # noqa: BLE001 - reported below, the sampler must stop either way
            outcome["error"] = exc

    worker = threading.Thread(target=run, name="soak_demo", daemon=True)
    start = time.monotonic()
    worker.start()
    while worker.is_alive():
        result.samples.append(Sample(round(time.monotonic() - start, 2), rss_bytes(), gpu_bytes(),
                                     threading.active_count()))
        worker.join(timeout=sample_s)
    if "error" in outcome:
        raise outcome["error"]
    report: DemoReport = outcome["report"]
    result.demo = asdict(report)
    keys = ["rss"] + (["allocated", "reserved"] if result.samples and result.samples[0].gpu else [])
    result.growth = {key: growth_after_warmup(result.samples, warmup_s, key) for key in keys}
    # nan (too few samples after warm-up) fails too.
    result.passed = report.chunks > 0 and all(g <= max_growth for g in result.growth.values())
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--minutes", type=float, default=30.0, help="how long to run (default 30)")
    parser.add_argument("--params", default=None, help="parameter file (default: the package's config/demo.yaml, "
                        "or config/demo_cuda.yaml with --device cuda)")
    parser.add_argument("--device", default=None, choices=("cpu", "cuda"), help="override the file's device")
    parser.add_argument("--sample-s", type=float, default=10.0, help="sampling period (default 10 s)")
    parser.add_argument("--warmup-s", type=float, default=300.0,
                        help="samples before this are warm-up (default 300 s: the CPU demo grows for ~3 minutes)")
    parser.add_argument("--json", default=None, help="write the samples and the verdict here")


def run(args: argparse.Namespace) -> int:
    params = Path(args.params) if args.params else default_params_file(
        "demo_cuda.yaml" if args.device == "cuda" else "demo.yaml")
    try:
        prepare_output_file(args.json)
        result = soak(params, args.minutes, args.sample_s, args.warmup_s, args.device)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    document = {**asdict(result), "params": str(params), "host": platform.node(), "cpus": os.cpu_count()}
    if args.json:
        Path(args.json).write_text(json_text(document))
    last = result.samples[-1]
    print(f"soak {args.minutes:g} min: {result.demo['chunks']} chunks at {result.demo['achieved_rate_hz']:.2f} Hz; "
          f"RSS {last.rss_bytes / 2**20:.1f} MiB, growth after warm-up "
          + ", ".join(f"{k} {v * 100:+.2f} %" for k, v in result.growth.items())
          + f" -> {'flat' if result.passed else 'NOT FLAT'}")
    return 0 if result.passed else 1

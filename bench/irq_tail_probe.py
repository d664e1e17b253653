"""Does the end-to-end tail follow the interrupts of the core the host thread runs on? (notes, attempt 51)

Run 148's tail (2 % of inferences, host_prepare and host_launch 7x slower) came with the thread on
a CPU the whole time: no run-queue wait, no switches, no faults, no steal. Interrupt handlers that
run on the thread's core are counted as the thread's run time, so they would look exactly so.
This runs `host_tail_probe.py` unpinned, reads which CPUs took the interrupts meanwhile
(/proc/interrupts, and irq + softirq time from /proc/stat), then runs it again pinned (taskset)
to the CPU that took the fewest and to the one that took the most.

    python3 bench/irq_tail_probe.py --iterations 1000 --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

PROBE = Path(__file__).resolve().parent / "host_tail_probe.py"


def interrupt_counts() -> dict[str, tuple[int, ...]]:
    """/proc/interrupts now: source (its number or name and description) -> count per CPU. Sources
    with one machine-wide count (ERR, MIS) are left out: they are no CPU's."""
    lines = Path("/proc/interrupts").read_text().splitlines()
    cpus = len(lines[0].split())
    out = {}
    for line in lines[1:]:
        fields = line.split()
        counts = tuple(int(v) for v in fields[1:1 + cpus] if v.isdigit())
        if len(counts) == cpus:
            out[" ".join([fields[0], *fields[1 + cpus:]])] = counts
    return out


def irq_ms_per_cpu() -> list[float]:
    """irq + softirq time of each CPU so far (USER_HZ ticks -> ms)."""
    tick_ms = 1e3 / os.sysconf("SC_CLK_TCK")
    out = []
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name != "cpu":
            out.append((int(values[5]) + int(values[6])) * tick_ms)
    return out


def probe(label: str, iterations: int, out: Path, cpu: int | None) -> dict:
    path = out / f"{label}.json"
    command = [sys.executable, str(PROBE), "--iterations", str(iterations), "--json", str(path)]
    if cpu is not None:
        command = ["taskset", "-c", str(cpu), *command]
    irq0, ms0 = interrupt_counts(), irq_ms_per_cpu()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    irq1, ms1 = interrupt_counts(), irq_ms_per_cpu()
    result = json.loads(path.read_text())
    growth = {source: tuple(y - x for x, y in zip(irq0.get(source, (0,) * len(after)), after))
              for source, after in irq1.items()}
    result["interrupts_per_cpu"] = [sum(column) for column in zip(*growth.values())]
    ranked = sorted(growth.items(), key=lambda kv: -sum(kv[1]))[:6]
    result["busiest_sources"] = [f"{source}: {list(d)}" for source, d in ranked if sum(d)]
    result["irq_softirq_ms_per_cpu"] = [round(b - a, 1) for a, b in zip(ms0, ms1)]
    result["pinned_cpu"] = cpu
    path.write_text(json.dumps(result, indent=1))
    return result


def summary(result: dict) -> str:
    parts = []
    for name, phase in result["phases"].items():
        if "error" in phase:
            continue
        parts.append(f"{name}: e2e {phase['e2e_median_ms']:.2f} / p99 {phase['e2e_p99_ms']:.2f} ms, host p99 "
                     f"{phase['host_p99_ms']:.3f}, tails {phase['tail_count']}")
    return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    free = probe("unpinned", args.iterations, args.out, None)
    print("busiest interrupt sources (per cpu):", *free["busiest_sources"], sep="\n  ")
    counts = free["interrupts_per_cpu"]
    print("unpinned:", summary(free))
    print("interrupts per cpu:", counts)
    print("irq+softirq ms per cpu:", free["irq_softirq_ms_per_cpu"])
    quiet = min(range(len(counts)), key=counts.__getitem__)
    busy = max(range(len(counts)), key=counts.__getitem__)
    for label, cpu in (("quiet", quiet), ("busy", busy)):
        result = probe(f"pinned_{label}_cpu{cpu}", args.iterations, args.out, cpu)
        print(f"pinned to cpu {cpu} ({label}):", summary(result))
        print("  interrupts per cpu:", result["interrupts_per_cpu"])


if __name__ == "__main__":
    main()

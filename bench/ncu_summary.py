"""A table of Nsight Compute's `--print-details all` text output, one row per profiled kernel:
grid, duration, the cycles each SM that ran a block was active (SM Active Cycles is an average
over all SMs), instructions per warp, cycles per issued instruction, DRAM and L2 figures, shared
memory, and the largest stall reasons (warp cycles per issued instruction, by reason).

Usage: python3 bench/ncu_summary.py ncu.txt [--sms 132]
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

HEADER = re.compile(r"^  (\w+) \((\d+), (\d+), (\d+)\)x\((\d+), (\d+), (\d+)\)")
METRICS = {"Duration": "us", "Elapsed Cycles": "elapsed", "SM Active Cycles": "active",
           "Instructions Executed": "inst", "Warp Cycles Per Issued Instruction": "cpi",
           "DRAM Throughput": "dram_pct", "L2 Hit Rate": "l2_hit", "Dynamic Shared Memory Per Block": "smem_kb",
           "Registers Per Thread": "regs"}
STALL = re.compile(r"smsp__average_warps_issue_stalled_(\w+)_per_issue_active\.ratio\s+inst\s+([\d.]+)")


def parse(text: str) -> list[dict[str, object]]:
    kernels: list[dict[str, object]] = []
    for line in text.splitlines():
        if m := HEADER.match(line):
            grid = int(m[2]) * int(m[3]) * int(m[4])
            kernels.append({"kernel": m[1], "grid": grid, "threads": int(m[5]) * int(m[6]) * int(m[7]),
                            "stalls": {}})
            continue
        if not kernels:
            continue
        k = kernels[-1]
        if m := STALL.search(line):
            k["stalls"][m[1]] = float(m[2])
            continue
        for name, key in METRICS.items():
            m = re.match(rf"^\s+{re.escape(name)}\s+\S+(?:/\S+)?\s+([\d,.]+)\s*$", line)
            if m and key not in k:
                k[key] = float(m[1].replace(",", ""))
    return kernels


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("path", type=Path)
    parser.add_argument("--sms", type=int, default=132)
    args = parser.parse_args()
    print(f"{'kernel':<30}{'grid':>5}{'us':>7}{'elapsed':>9}{'active/SM':>10}{'inst/warp':>10}{'cpi':>6}"
          f"{'dram%':>7}{'L2hit':>6}{'smemKB':>7}  top stalls (cycles per issue)")
    for k in parse(args.path.read_text()):
        busy_sms = min(k["grid"], args.sms)
        active = k.get("active", 0.0) * args.sms / busy_sms
        warps = k["grid"] * k["threads"] / 32
        stalls = sorted(k["stalls"].items(), key=lambda kv: -kv[1])[:4]
        print(f"{k['kernel']:<30}{k['grid']:>5}{k.get('us', 0):>7.2f}{k.get('elapsed', 0):>9.0f}{active:>10.0f}"
              f"{k.get('inst', 0) / warps:>10.0f}{k.get('cpi', 0):>6.2f}{k.get('dram_pct', 0):>7.2f}"
              f"{k.get('l2_hit', 0):>6.1f}{k.get('smem_kb', 0):>7.1f}  "
              + ", ".join(f"{n} {v:.2f}" for n, v in stalls))


if __name__ == "__main__":
    main()

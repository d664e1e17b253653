"""One line per bench JSON and precision: the medians the same-call comparisons in the notes quote
(h2d, host_prepare, host_launch, vision, prefix, denoise, e2e), host_prepare's and e2e's p99, in ms,
and e2e's p99 / median (the tail the target bounds).

Usage: python3 bench/bench_summary.py A.json [B.json ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

KEYS = ("h2d", "host_prepare", "host_launch", "vision", "prefix", "denoise", "e2e")


def main(paths: list[str]) -> None:
    print(f"{'file':<24}{'precision':<10}" + "".join(f"{k:>13}" for k in KEYS)
          + f"{'prepare p99':>13}{'e2e p99':>10}{'p99/med':>9}")
    for path in paths:
        result = json.loads(Path(path).read_text())
        for precision, entry in result["precisions"].items():
            t = entry["timings_ms"]
            e2e = t["e2e"]
            print(f"{Path(path).stem:<24}{precision:<10}" + "".join(f"{t[k]['median']:13.3f}" for k in KEYS)
                  + f"{t['host_prepare']['p99']:13.3f}{e2e['p99']:10.3f}{e2e['p99'] / e2e['median']:9.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])

"""One line per bench JSON: e2e and host_prepare median / p99 (ms) for each precision.

    python3 bench/summarize_host.py FILE.json ...
"""

from __future__ import annotations

import json
import sys


def main(paths: list[str]) -> int:
    for path in paths:
        bench = json.load(open(path))
        parts = []
        for precision, result in bench["precisions"].items():
            t = result["timings_ms"]
            parts.append(f"{precision}: e2e {t['e2e']['median']:.3f} / p99 {t['e2e']['p99']:.3f} "
                         f"({t['e2e']['p99'] / t['e2e']['median']:.2f}x), host_prepare {t['host_prepare']['median']:.3f}"
                         f" / {t['host_prepare']['p99']:.3f}, host_launch {t['host_launch']['median']:.3f}")
        print(f"{path.rsplit('/', 1)[-1]}: " + "; ".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""The node's own process (`main()`) signalled at chosen points of its life, as `ros2 launch` or a
Ctrl-C would: while active, during configure, and twice during configure.

Case `active` runs twice first (the first run fills the compile and tokenizer caches): each measures
how long configure takes (start to the "configured" log line) and signals once the node is active.
The configure cases signal at fractions of the second run's time, so that on the GPU one lands while
the model is built and one while the engine warms up and captures; `during_configure` says whether
the node saw the signal there ("exiting: waiting for the running transition").
Per case: the exit code, seconds from the first signal to the exit, and the log lines that say what
the node did. Runs wherever the node runs (the GPU machine: `bench/exit_signals_gpu.sh`).

  python3 bench/exit_signals.py --params config/demo_cuda.yaml --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NODE = [sys.executable, "-c", "import sys; from pi0_policy_ros.ros.node import main; sys.exit(main())"]
TELLING = re.compile(r"configured|activated|exiting|configure stopped|configure failed|second signal|"
                     r"hold point|shut down|may be lost|Traceback|Error|never retrieved")


def run_case(params: Path, name: str, signals: list[tuple[float, int]], until_active: bool,
             log_dir: Path, timeout_s: float) -> dict:
    """signals: (seconds after the start, or after "activated" when until_active, signal number)."""
    log_path = log_dir / f"{name}.log"
    command = [*NODE, "--ros-args", "-r", f"__ns:=/exit_{name}", "--params-file", str(params),
               "-p", "autostart:=true"]
    started = time.monotonic()
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    configured_s = None
    base = started
    if until_active:
        while process.poll() is None and time.monotonic() - started <= timeout_s:
            text = log_path.read_text()  # once a poll: "configured:" and "activated" may come in one read
            if configured_s is None and "configured:" in text:
                configured_s = time.monotonic() - started
            if "activated" in text:
                break
            time.sleep(0.05)
        base = time.monotonic()
    first_signal_at = None
    for delay_s, signum in signals:
        time.sleep(max(0.0, base + delay_s - time.monotonic()))
        if process.poll() is not None:
            break
        process.send_signal(signum)
        first_signal_at = first_signal_at or time.monotonic()
    try:
        code = process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        code = f"killed after {timeout_s:g} s"
    exited = time.monotonic()
    lines = [line.strip()[:200] for line in log_path.read_text().splitlines() if TELLING.search(line)]
    return {"case": name, "signals": [(d, signal.Signals(s).name) for d, s in signals],
            "signalled_at_s": None if first_signal_at is None else round(first_signal_at - started, 2),
            "exit_code": code,
            "exit_after_signal_s": None if first_signal_at is None else round(exited - first_signal_at, 2),
            "configured_after_s": None if configured_s is None else round(configured_s, 2),
            "during_configure": any("exiting: waiting" in line for line in lines), "log": lines}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--timeout-s", type=float, default=240.0)
    args = parser.parse_args()
    log_dir = Path(tempfile.mkdtemp(prefix="exit_signals_"))
    results = [run_case(args.params, name, [(2.0, signal.SIGINT)], True, log_dir, args.timeout_s)
               for name in ("active_cold", "active")]
    configure_s = results[1]["configured_after_s"] or 10.0
    results.append(run_case(args.params, "configure_early", [(0.5 * configure_s, signal.SIGINT)], False,
                            log_dir, args.timeout_s))
    results.append(run_case(args.params, "configure_late", [(0.9 * configure_s, signal.SIGTERM)], False,
                            log_dir, args.timeout_s))
    results.append(run_case(args.params, "configure_twice",
                            [(0.5 * configure_s, signal.SIGINT), (0.5 * configure_s + 0.5, signal.SIGTERM)],
                            False, log_dir, args.timeout_s))
    report = {"params": str(args.params), "commit": os.environ.get("COMMIT", ""), "results": results}
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1))
    for r in results:
        print(f"{r['case']:16s} signals {r['signals']} at {r['signalled_at_s']} s: exit {r['exit_code']} "
              f"{r['exit_after_signal_s']} s later (configured after {r['configured_after_s']} s; "
              f"during configure: {r['during_configure']})")
        for line in r["log"]:
            print(f"    {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

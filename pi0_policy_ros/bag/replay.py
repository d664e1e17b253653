"""`pi0-policy replay BAG --params FILE --out OUT_BAG`: run the policy node against a recording.

- offline (default): the node's control loop on a simulated clock in bag time, no DDS
  (`bag/offline.py`); deterministic.
- `--realtime`: the bag is played over DDS at bag timing (times `--rate`), with `/clock`, to a
  real node started with `use_sim_time`, and what the node publishes is recorded
  (`bag/realtime.py`).
Either way OUT_BAG (MCAP; Jazzy definitions, or Humble's with `--distro humble`) holds the node's
`~/action_chunk_stamp`, `~/action_chunk` and (for joint-position actions, as the node) `~/joint_trajectory`
at their bag times, and `--report DIR` adds
summary.json and plots. A bad bag is one error naming the bag, the topic and the problem, with
exit code 2; the output is then not written at all.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pi0_policy_ros.bag.inputs import NODE_NAME, ReplaySetup, make_setup, parse_param_overrides
from pi0_policy_ros.bag.reader import InputBag
from pi0_policy_ros.bag.record import DISTROS, OutputBag, check_output_path
from pi0_policy_ros.bag.summary import Progress, ReplaySummary
from pi0_policy_ros.errors import Pi0PolicyError

if TYPE_CHECKING:
    from pi0_policy_ros.bag.realtime import RealtimeOptions

EXIT_OK, EXIT_ERROR = 0, 2  # 2: an error in the inputs, as every pi0-policy command


def replay_offline(bag_path: str | Path, out_path: str | Path, setup: ReplaySetup, policy: object | None = None,
                   overwrite: bool = False, progress: bool = False, keep_ticks: bool = False,
                   distro: str = "jazzy") -> tuple[ReplaySummary, object]:
    """Offline replay; returns the summary and the `OfflineReplay` (its `ticks` when keep_ticks).

    policy: a `Policy`-like object; None loads `Policy.from_config` from the parameters (and
    closes it afterwards). The bag is checked before the policy is loaded. distro: the output bag's
    metadata version and definitions (`record.DISTROS`).
    """
    from pi0_policy_ros.bag.offline import OfflineReplay

    summary = ReplaySummary("offline", str(bag_path), str(out_path), setup.config.control.control_rate_hz)
    check_output_path(out_path, overwrite)  # before the minutes a full-size model takes to load
    with InputBag(bag_path) as bag:
        bag.check(setup.inputs)
        owned = policy is None
        if owned:
            from pi0_policy_ros.policy.policy import Policy

            policy = Policy.from_config(setup.config.policy)
        replay: OfflineReplay | None = None
        try:
            replay = OfflineReplay(setup, policy, keep_ticks=keep_ticks)  # type: ignore[arg-type]
            meter = Progress("replay", (bag.end_ns - bag.start_ns) / 1e9, enabled=progress)
            with OutputBag(out_path, distro=distro, overwrite=overwrite) as out:
                replay.run(bag, out, summary, meter)
            meter.finish(f"{summary.chunks} chunks")
        finally:
            if replay is not None:
                replay.close()
            if owned:
                policy.close()  # type: ignore[union-attr]
    return summary, replay


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bag", help="input rosbag2 (directory, .mcap or .db3; Humble or Jazzy)")
    parser.add_argument("--params", required=True, help="the node's ROS parameter file (as for --params-file)")
    parser.add_argument("--out", required=True, help="output bag directory (MCAP); must not exist unless --overwrite")
    parser.add_argument("--map", action="append", default=[], metavar="NODE_TOPIC:=BAG_TOPIC",
                        help="read a node input from another bag topic (repeatable)")
    parser.add_argument("--param", action="append", default=[], metavar="NAME:=VALUE",
                        help="override one parameter of the file; VALUE is YAML (repeatable)")
    parser.add_argument("--namespace", default="/", help="the node's namespace (default /)")
    parser.add_argument("--node-name", default=NODE_NAME, help=f"the node's name (default {NODE_NAME})")
    parser.add_argument("--realtime", action="store_true",
                        help="play the bag over DDS to a real node (with /clock) and record its output")
    # The realtime options default to None, so that one given without --realtime is refused.
    parser.add_argument("--rate", type=float, default=None, help="realtime: playback speed factor (default 1)")
    parser.add_argument("--node-cmd", default=None,
                        help="realtime: the command that starts the node (default: this Python running "
                             "pi0_policy_ros.ros.node:main); ROS arguments are appended")
    parser.add_argument("--startup-timeout", type=float, default=None,
                        help="realtime: seconds allowed for the node to start and configure (default 120)")
    parser.add_argument("--node-log", default=None, help="realtime: keep the node's output in this file")
    parser.add_argument("--report", default=None, metavar="DIR", help="write summary.json and PNG plots here")
    parser.add_argument("--overwrite", action="store_true", help="replace the --out bag if it exists (a bag directory only)")
    # Humble's rosbag2 cannot read Jazzy's metadata.yaml (version 9 lists the QoS profiles where
    # Humble expects a string): a Humble user needs a version 8 output bag.
    parser.add_argument("--distro", choices=sorted(DISTROS), default="jazzy",
                        help="ROS distro whose `ros2 bag` must read the --out bag (default jazzy)")
    parser.add_argument("--quiet", action="store_true", help="no progress display")


REALTIME_OPTIONS = {"rate": "--rate", "node_cmd": "--node-cmd", "startup_timeout": "--startup-timeout",
                    "node_log": "--node-log"}


def _realtime_options(args: argparse.Namespace) -> RealtimeOptions | None:
    """The realtime replay's options (None offline), checked before the bag is read and the node started."""
    given = [flag for name, flag in REALTIME_OPTIONS.items() if getattr(args, name) is not None]
    if not args.realtime:
        if given:  # the offline replay has no node to start and no playback pace: it ignored them
            raise Pi0PolicyError(f"{given[0]}: expected with --realtime (an option of the realtime replay), found an "
                                 f"offline replay: add --realtime, or drop it")
        return None
    from pi0_policy_ros.bag.realtime import RealtimeOptions

    rate = 1.0 if args.rate is None else args.rate
    if not (math.isfinite(rate) and rate > 0):
        # inf passed `> 0`: the recorder's bag time int(elapsed * inf) then raised on the
        # executor thread, and the replay ended 30 s later on an unanswered service call.
        raise Pi0PolicyError(f"--rate: expected a finite factor > 0, found {rate}")
    timeout_s = 120.0 if args.startup_timeout is None else args.startup_timeout
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise Pi0PolicyError(f"--startup-timeout: expected a finite number of seconds > 0, found {timeout_s}")
    if args.node_cmd:
        try:
            shlex.split(args.node_cmd)
        except ValueError as exc:  # an unbalanced quote
            raise Pi0PolicyError(f"--node-cmd: expected a command line as a shell splits it, found "
                                 f"{args.node_cmd!r} ({exc})") from None
    if args.node_log is not None:
        log = Path(args.node_log)
        if log.is_dir():
            raise Pi0PolicyError(f"--node-log {args.node_log}: expected a file, found a directory")
        if not log.parent.is_dir():
            raise Pi0PolicyError(f"--node-log {args.node_log}: expected a file in an existing directory, found no "
                                 f"directory {log.parent}")
    return RealtimeOptions(params_file=args.params, overrides=args.param, rate=rate, node_cmd=args.node_cmd,
                           startup_timeout_s=timeout_s, node_log=args.node_log, distro=args.distro)


def run(args: argparse.Namespace) -> int:
    try:
        options = _realtime_options(args)
        # --overwrite replaces OUT_BAG only after the replay, by when the input is read: an output
        # on (or inside) the input bag would delete the recording without a word.
        bag_path, out_path = Path(args.bag).resolve(), Path(args.out).resolve()
        overlap = ("the input bag itself" if out_path == bag_path else "a path inside it" if bag_path in out_path.parents
                   else "a directory that holds it" if out_path in bag_path.parents else None)
        if overlap is not None:
            raise Pi0PolicyError(f"--out {args.out}: expected a path apart from the input bag {args.bag}, "
                                 f"found {overlap}")
        if args.report and Path(args.report).exists() and not Path(args.report).is_dir():
            # The report is written last: found only then, a file in its place would cost the replay.
            raise Pi0PolicyError(f"--report {args.report}: expected a directory (created if missing), found a file")
        if args.report:
            _check_report_dir(Path(args.report))
        setup = make_setup(args.params, parse_param_overrides(args.param), args.map, args.namespace, args.node_name)
        if options is not None:
            from pi0_policy_ros.bag.realtime import replay_realtime

            summary, config, period_s = replay_realtime(args.bag, args.out, setup, options,
                                                        overwrite=args.overwrite, progress=not args.quiet)
        else:
            summary, replay = replay_offline(args.bag, args.out, setup, overwrite=args.overwrite,
                                             progress=not args.quiet, distro=args.distro)
            config, period_s = replay.config, replay.policy.profile.action_period_s  # type: ignore[attr-defined]
        if args.report:
            from pi0_policy_ros.bag.report import write_report

            content = write_report(args.report, summary, setup, config, period_s, args.bag, args.out)
        else:
            content = summary.to_json()
    except Pi0PolicyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    from pi0_policy_ros.bag.report import format_summary

    print("\n".join(format_summary(content)))
    print(f"wrote {args.out}" + (f" and {Path(args.report) / 'summary.json'}" if args.report else ""))
    return EXIT_OK


def _check_report_dir(report: Path) -> None:
    """Pi0PolicyError unless `report` can be made where it is (a path under a file, or in a
    read-only place, would fail only after the replay). Nothing is created: --report may lie
    inside the --out bag, which must not exist yet."""
    existing = report.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        found = "a file" if not existing.is_dir() else "a directory it may not write in"
        raise Pi0PolicyError(f"--report {report}: expected a directory (created if missing), found {found} "
                             f"at {existing}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pi0_policy_ros.bag.replay", description=__doc__.split("\n")[0])
    parser.add_argument("--log-level", default="WARNING", help="Python logging level (default: WARNING)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())


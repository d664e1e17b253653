"""`pi0-policy`: the command-line tool. Each sub-command lives in its own module, which provides
`add_arguments(parser)` and `run(args) -> exit code`; modules are imported only when chosen, so
that `pi0-policy --help` stays fast."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from pi0_policy_ros.errors import Pi0PolicyError
from pi0_policy_ros.policy.config import SEED_RANGE

# name → (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "selftest": ("pi0_policy_ros.selftest", "compare our model with openpi's reference vectors"),
    "inspect": ("pi0_policy_ros.policy.inspect", "describe an openpi or LeRobot checkpoint directory"),
    "demo": ("pi0_policy_ros.ros.demo", "run the node against a synthetic robot over DDS and report rate and latency"),
    "soak": ("pi0_policy_ros.soak", "run the demo for a long time and check that memory stays flat"),
    "load-bench": ("pi0_policy_ros.load_bench", "control rate under 3 x 60 Hz cameras and 1 kHz joint states (JSON)"),
    "demo-bag": ("pi0_policy_ros.bag.demo", "write a synthetic robot bag (cameras + joint states)"),
    "replay": ("pi0_policy_ros.bag.replay", "replay a bag through the policy (offline or --realtime) and record its output"),
    "bench": ("pi0_policy_ros.engine.bench", "time the engine per stage against the eager reference (JSON)"),
    "export": ("pi0_policy_ros.export_cli", "ONNX export of the vision and prefix stages (--verify with onnxruntime)"),
    "rtc-eval": ("pi0_policy_ros.rtc_eval", "chunk-boundary smoothness of the scheduler modes (closed loop)"),
}


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a command that Ctrl-C ended


def seed_argument(text: str) -> int:
    """argparse type of every command's --seed: an integer in SEED_RANGE. torch's generators take
    [-2**63, 2**64 - 1], numpy's no negative seed, and the commands add offsets to the seed (bench:
    + 100, rtc-eval: * 1_000_003 + chunk); outside the range that was a traceback mid-run."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
        raise argparse.ArgumentTypeError(f"expected an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}] (the node's "
                                         f"seed parameter's range), found {text!r}")
    return value


def _module_for(argv: list[str]) -> str | None:
    args = iter(argv)
    for arg in args:
        if arg in COMMANDS:
            return COMMANDS[arg][0]
        if len(arg) > 2 and "--log-level".startswith(arg):  # `--log-level INFO` (or argparse's `--log INFO`)
            next(args, None)
            continue
        if not arg.startswith("-"):
            return None
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="pi0-policy", description="pi0 / pi0.5 policies for ROS 2")
    parser.add_argument("--log-level", default="WARNING", type=str.upper, choices=LOG_LEVELS,
                        help="Python logging level (default: WARNING)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = _module_for(argv)
    for name, (module_name, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text)
        if module_name == chosen:
            importlib.import_module(module_name).add_arguments(command_parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(importlib.import_module(COMMANDS[args.command][0]).run(args))
    except KeyboardInterrupt:
        # Ctrl-C: the command's own cleanup (its finally blocks) has run; one line, not a traceback.
        print(f"pi0-policy {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (Pi0PolicyError, OSError) as exc:
        # A bad input that a command did not report itself (a missing file, an output path that
        # is a file, a checkpoint that does not match): one line, not a traceback.
        logging.getLogger(__name__).debug("pi0-policy %s failed", args.command, exc_info=True)
        print(f"pi0-policy {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except MemoryError as exc:
        # A size too large for this machine (the commands bound their size options by what the
        # model takes, which a small machine may still lack): numpy's "Unable to allocate 13.7 TiB
        # for an array with shape ..." names the shape; the traceback adds nothing.
        logging.getLogger(__name__).debug("pi0-policy %s ran out of memory", args.command, exc_info=True)
        print(f"pi0-policy {args.command}: error: out of memory: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""`pi0-policy export`: the vision and prefix stages as ONNX files, optionally checked against torch.

    pi0-policy export --reference test/fixtures/openpi_reference/pi05_small.safetensors --out onnx/ --verify
    pi0-policy export --model-preset pi05 --checkpoint ~/ckpt/pi05_libero --out onnx/ --precision fp8 --verify

Writes `<stage>.<precision>.onnx` (+ `.onnx.data` over 1.5 GB of weights; with `--precision fp8`
the vision stage is fp16: `vision.fp16.onnx`) and, once every stage is written, `export.json`
(files, sizes, errors) into `--out`. `--verify` runs each file with onnxruntime on the CPU against the torch fp32 stage on the
same input and prints the errors; the exit code is 1 when one is out of tolerance.
FP8 calibrates its activation scales on that same single input (the fixture's, or a random one).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from pi0_policy_ros.cli import seed_argument
from pi0_policy_ros.errors import Pi0PolicyError
from pi0_policy_ros.jsonout import json_text

DEFAULT_STAGES = "vision,prefix"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pi0_policy_ros.engine.onnx_export import IMAGE_INPUTS, PRECISIONS

    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--reference", type=Path, help="an openpi reference fixture (.safetensors): weights and inputs")
    source.add_argument("--model-preset", help="model preset; weights from --checkpoint, random without it "
                                               "('auto' reads the geometry off the checkpoint)")
    parser.add_argument("--checkpoint", type=Path, help="openpi or LeRobot checkpoint directory (with --model-preset)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS,
                        help="fp32, fp16, or fp8 (fp16 vision, fp16 prefix with FP8 Q/DQ on its linear layers)")
    parser.add_argument("--stages", default=DEFAULT_STAGES, help=f"comma-separated (default {DEFAULT_STAGES})")
    parser.add_argument("--image-input", default="uint8", choices=IMAGE_INPUTS,
                        help="vision input: uint8 [N,224,224,3] images, or float [N,3,224,224] pixels in [-1, 1]")
    parser.add_argument("--verify", action="store_true", help="compare each file with torch fp32 (onnxruntime, CPU)")
    parser.add_argument("--seed", type=seed_argument, default=None, help="seed of the random inputs and random "
                        "weights (default 0); not with --reference, whose fixture holds both")


def _load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """(fp32 model on the CPU, fixture Reference or None)."""
    from pi0_policy_ros.engine.onnx_export import ExportError
    from pi0_policy_ros.model.checkpoint import model_from_tensors, random_model
    from pi0_policy_ros.model.config import PRESETS, get_preset
    from pi0_policy_ros.model.reference import load_reference, reference_model
    from pi0_policy_ros.policy.checkpoint_dir import AUTO_PRESET, load_checkpoint_dir

    if args.reference is not None:
        if args.checkpoint is not None:
            raise ExportError("--checkpoint goes with --model-preset, not with --reference")
        if args.seed is not None:  # it changed nothing: the same files, the same --verify errors
            raise ExportError("--seed draws random weights and inputs, and --reference takes both from its fixture: "
                              "drop --seed, or use --model-preset for random weights and inputs")
        ref = load_reference(args.reference)
        return reference_model(ref), ref
    if args.checkpoint is None:
        if args.model_preset == AUTO_PRESET:
            raise ExportError(f"--model-preset {AUTO_PRESET} reads the geometry off --checkpoint, and none was "
                              f"given: add --checkpoint DIR, or name a preset for random weights ({sorted(PRESETS)})")
        try:
            preset = get_preset(args.model_preset)
        except KeyError as exc:
            raise ExportError(str(exc.args[0])) from None
        print(f"note: no --checkpoint: random weights at preset {args.model_preset!r}", file=sys.stderr)
        return random_model(preset, seed=args.seed or 0), None
    ckpt = load_checkpoint_dir(args.checkpoint, args.model_preset)
    return model_from_tensors(ckpt.model_config, ckpt.tensors, allow_truncated_vocab=ckpt.allow_truncated_vocab,
                              source=str(ckpt.path)), None


def _stages(text: str) -> list[str]:
    from pi0_policy_ros.engine.onnx_export import STAGES, ExportError

    stages = [s.strip() for s in text.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown or not stages:
        raise ExportError(f"--stages: expected a comma-separated subset of {list(STAGES)}, found {text!r}")
    return [s for s in STAGES if s in stages]  # vision first: the prefix takes its output


def _require_onnx_packages(verify: bool) -> None:
    """onnx (and onnxruntime for --verify) are not runtime dependencies (requirements-dev.txt):
    say so up front in one error, not as an ImportError traceback after the model has loaded."""
    from pi0_policy_ros.engine.onnx_export import ExportError

    missing = []
    for name in ("onnx", "onnxruntime") if verify else ("onnx",):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ExportError(f"ONNX export{' --verify' if verify else ''} needs the Python packages "
                          f"{', '.join(missing)}, which are not installed (they are not runtime dependencies): "
                          f"pip install {' '.join(missing)} (versions pinned in requirements-dev.txt)")


def _prepare_out(out: Path) -> None:
    """Create the output directory before minutes of loading and tracing, so that a file in its
    way is one error naming what was expected rather than an OSError after the first stage."""
    from pi0_policy_ros.engine.onnx_export import ExportError

    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: expected a directory, found a file")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"--out {out}: cannot create this directory: {exc.strerror or exc}") from None
    if not os.access(out, os.W_OK | os.X_OK):  # a read-only file system: found at the first file otherwise
        raise ExportError(f"--out {out}: expected a directory it may write in, found one it may not")


def _check_fp8_linears(stage: Any, path: Path, inputs: tuple[torch.Tensor, ...], entry: dict[str, Any]) -> bool:
    """Every FP8 linear of the file on its own against torch fake-quant (see `check_fp8_linears`)."""
    from pi0_policy_ros.engine import onnx_export as ox
    from pi0_policy_ros.engine.tensorrt import FP8_LINEAR_LIMIT, calibrate_fp8, check_fp8_linears

    stage_inputs = ox.cast_inputs(stage.signature, inputs)
    errors = check_fp8_linears(path, stage, calibrate_fp8(stage, [stage_inputs]), stage_inputs)
    worst = ox.worst_error(errors.values()) if errors else float("inf")  # no linear behind Q/DQ fails
    passed = worst <= FP8_LINEAR_LIMIT
    entry["fp8_linears"] = {"count": len(errors), "max_rel_error": worst, "limit": FP8_LINEAR_LIMIT, "passed": passed}
    print(f"{'':<7} fp8 linears: {len(errors)} behind Q/DQ, each vs torch fake-quant: rel error {worst:.3g} "
          f"(limit {FP8_LINEAR_LIMIT:.3g})  {'ok' if passed else 'FAILED'}")
    return passed


def run(args: argparse.Namespace) -> int:
    from pi0_policy_ros.engine import onnx_export as ox
    from pi0_policy_ros.engine.types import EngineShape

    created_out = not args.out.exists()
    try:
        stages = _stages(args.stages)
        _require_onnx_packages(args.verify)
        _prepare_out(args.out)
        # The report describes the files beside it: an earlier run's must not outlive a failed one.
        (args.out / "export.json").unlink(missing_ok=True)
        model, ref = _load_model(args)
        shape = EngineShape.for_model(model.cfg)
        references = {s: ox.stage_module(model, s, shape, "fp32", args.image_input) for s in ox.STAGES}
        # The inputs every file is checked on (and FP8 calibrated on): the fixture's, or random ones.
        # The prefix takes the torch fp32 vision output, so its inputs look like real image tokens.
        if ref is not None:
            inputs = {s: ox.reference_inputs(ref, references[s].signature) for s in ox.STAGES}
        else:
            vision_in = ox.random_inputs(references["vision"].signature, seed=args.seed or 0)
            with torch.no_grad():
                embs = references["vision"](*vision_in)[0]
            prefix_in = ox.random_inputs(references["prefix"].signature, seed=args.seed or 0)
            inputs = {"vision": vision_in, "prefix": (embs, *prefix_in[1:])}
        report: dict[str, Any] = {"model": model.cfg.name, "precision": args.precision, "torch": torch.__version__,
                                  "stages": {}}
        failed = False
        for name in stages:
            precision = ox.stage_precision(name, args.precision)
            stage = ox.stage_module(model, name, shape, precision, args.image_input)
            t0 = time.perf_counter()
            exported = ox.export_stage(stage, args.out / f"{name}.{precision}.onnx", precision, inputs[name])
            entry: dict[str, Any] = {"path": str(exported.path), "file_bytes": exported.file_bytes,
                                     "precision": precision, "export_s": time.perf_counter() - t0,
                                     # what a TensorRT user binds: each name, static shape and dtype
                                     **{kind: [(s.name, list(s.shape), str(s.dtype)) for s in specs]
                                        for kind, specs in (("inputs", exported.signature.inputs),
                                                            ("outputs", exported.signature.outputs))}}
            if ox.data_path(exported.path).exists():  # file_bytes counts it: the graph is useless without it
                entry["data_path"] = str(ox.data_path(exported.path))
            if args.verify:
                check = ox.verify_stage(exported, references[name], inputs[name])
                entry["check"] = check.as_dict()
                failed |= not check.passed
                print(check.line())
                if precision == "fp8":
                    failed |= not _check_fp8_linears(stage, exported.path, inputs[name], entry)
            else:
                print(f"{name:<7} {precision:<5} {exported.file_bytes / 1e6:9.1f} MB  {exported.path}")
            report["stages"][name] = entry
        (args.out / "export.json").write_text(json_text(report))
    except Pi0PolicyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        # A bad preset or checkpoint, or a Ctrl-C, before any file was written (--out is made first):
        # leave no empty directory behind.
        if created_out and args.out.is_dir() and not any(args.out.iterdir()):
            args.out.rmdir()
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pi0-policy export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

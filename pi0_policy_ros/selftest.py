"""`pi0-policy selftest`: our model against openpi's reference vectors, as one JSON object."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from pi0_policy_ros.jsonout import json_text
from pi0_policy_ros.model.reference import ACTION_TOLERANCE, compare_with_reference, load_reference, reference_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reference", required=True, help="an openpi reference fixture (.safetensors)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES))


def run(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"error": "--device cuda requested, but torch sees no CUDA device"}))
        return 2
    ref = load_reference(args.reference)
    model = reference_model(ref, device=args.device, dtype=DTYPES[args.dtype])
    errors = compare_with_reference(ref, model, device=args.device)
    tolerance = ACTION_TOLERANCE[(args.device, args.dtype)]
    report = {
        "reference": str(ref.path),
        "model": ref.config.name,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "dtype": args.dtype,
        "torch": torch.__version__,
        # openpi's GPU numbers use TF32 matmuls; we keep PyTorch's default (full fp32).
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "max_abs_error": errors,
        "action_tolerance": tolerance,
        "passed": errors["actions"] <= tolerance,
    }
    print(json_text(report))
    return 0 if report["passed"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pi0-policy selftest", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

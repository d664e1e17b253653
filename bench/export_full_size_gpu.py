"""Full-size pi0.5 vision and prefix stages (random fp32 weights) exported to ONNX, then run with
onnxruntime on the CPU and compared with torch fp32 on the GPU (TF32 off).

From the repository root on the GPU machine:

    COMMIT=<sha> PYTHONPATH=. python bench/export_full_size_gpu.py --out "$OUT"

Writes `$OUT/export_full_size_<preset>.json`, rewritten after every step, so a run cut short keeps
what finished. The ONNX files (≈ 1.7 GB vision, ≈ 10 GB prefix with its embedding table) go to
`--work`, never to `$OUT`. Expected on a 16-core H100 machine: about 4-6 minutes, most of it the
prefix export and writing its external data.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from pi0_policy_ros.engine import onnx_export as ox
from pi0_policy_ros.engine.types import EngineShape
from pi0_policy_ros.model.checkpoint import random_model
from pi0_policy_ros.model.config import get_preset


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version()}


def _device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"device": str(device), "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_stage(stage: torch.nn.Module, inputs: tuple[torch.Tensor, ...], path: Path, device: torch.device,
              result: dict[str, Any]) -> torch.Tensor:
    """Torch on `device`, export, onnxruntime on the CPU, compare; fills `result`. Returns the
    torch output of the first output (the vision tokens feed the prefix)."""
    dev_inputs = tuple(t.to(device) for t in inputs)
    with torch.no_grad():
        stage(*dev_inputs)  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        expected = stage(*dev_inputs)
        _sync(device)
    result["torch_forward_ms"] = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    exported = ox.export_stage(stage, path, "fp32", dev_inputs)
    result["export_s"] = time.perf_counter() - t0
    result["file_bytes"] = exported.file_bytes
    result["external_data"] = ox.data_path(path).exists()
    t0 = time.perf_counter()
    session = ox.onnxruntime_session(path)
    result["onnxruntime_load_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    got = ox.run_onnxruntime(session, exported.signature, inputs)
    result["onnxruntime_run_s"] = time.perf_counter() - t0
    del session
    check = ox.StageCheck(exported.signature.stage, "fp32", str(path), exported.file_bytes,
                          f"torch fp32 on {device}")
    ox.compare_outputs(check, exported.signature.output_names, got, expected)
    result["max_abs_error"] = check.worst_abs
    result["max_rel_error"] = check.worst_rel
    result["max_abs_reference"] = check.max_ref
    result["max_abs_error_per_output"] = check.max_abs
    result["rel_error_per_output"] = check.rel
    result["within_fixture_tolerance_1e-4"] = check.passed
    return expected[0].detach().cpu()


def _save(report: dict[str, Any], out_file: Path, device: torch.device) -> None:
    report["peak_host_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    if device.type == "cuda":
        report["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    out_file.write_text(json.dumps(report, indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/results")))
    parser.add_argument("--work", type=Path, default=Path("/tmp/pi0_export_full"), help="where the ONNX files go")
    parser.add_argument("--preset", default="pi05")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the ONNX files in --work")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    # Full fp32 on the GPU: the comparison is fp32 GPU vs fp32 CPU, not TF32.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    out_file = args.out / f"export_full_size_{args.preset}.json"
    report: dict[str, Any] = {"preset": args.preset, "commit": os.environ.get("COMMIT", "unknown"),
                              "versions": _versions(), **_device_info(device), "opset": ox.OPSET, "stages": {}}

    t0 = time.perf_counter()
    cfg = get_preset(args.preset)
    model = random_model(cfg, device=device, dtype=torch.float32, seed=args.seed)
    shape = EngineShape.for_model(cfg)
    report["model_build_s"] = time.perf_counter() - t0
    report["shape"] = {"num_slots": shape.num_slots, "prompt_len": shape.prompt_len,
                       "padded_prefix_len": shape.padded_prefix_len}
    _save(report, out_file, device)

    vision = ox.stage_module(model, "vision", shape, "fp32")
    vision_in = ox.random_inputs(vision.signature, seed=args.seed)
    report["stages"]["vision"] = {}
    embs = run_stage(vision, vision_in, args.work / "vision.fp32.onnx", device, report["stages"]["vision"])
    del vision
    _save(report, out_file, device)
    print(json.dumps(report["stages"]["vision"], indent=2), flush=True)

    prefix = ox.stage_module(model, "prefix", shape, "fp32")
    prefix_in = (embs, *ox.random_inputs(prefix.signature, seed=args.seed)[1:])
    report["stages"]["prefix"] = {}
    run_stage(prefix, prefix_in, args.work / "prefix.fp32.onnx", device, report["stages"]["prefix"])
    report["total_s"] = time.perf_counter() - t0
    _save(report, out_file, device)
    print(json.dumps(report["stages"]["prefix"], indent=2), flush=True)
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Compile the denoise step's Triton kernels, exactly as the engine launches them at full size, for
other GPUs than the one at hand (no GPU needed): shared memory and register spills per kernel
against each architecture's limit.

Why: `Engine` picks the Triton kernels on any CUDA GPU in bf16, and a kernel whose pipeline needs
more shared memory than the card has fails at its first launch. Jetson Orin (sm_87) and A100
(sm_80) allow 163 KB a block; RTX 30xx / 40xx / 50xx (sm_86, sm_89, sm_120) 99 KB; Hopper 227 KB.

    PYTHONPATH=. python bench/compile_targets.py [--archs 80,86,87,89,90,100,120] [--pi0] [--rtc] [--json OUT]

How: the engine's launches are recorded (not run) on CPU tensors with a one-layer full-width
expert, then each distinct (kernel, arguments' types, constexprs, warps, stages) is compiled with
`triton.compile` for each target. A kernel over the limit is compiled again with fewer stages, as
`denoise_triton.StageFit` would launch it; the exit status is 0 when every kernel fits one way or
the other.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

# Largest shared memory one block may use (opt-in), bytes; CUDA C Programming Guide, compute
# capabilities table.
SMEM_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
NAMES = {80: "A100", 86: "RTX 30xx / A10", 87: "Jetson Orin", 89: "RTX 40xx / L4 / L40", 90: "H100 / H200",
         100: "B200", 120: "RTX 50xx"}
_TORCH_TO_TRITON = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
                    torch.int64: "i64", torch.bool: "i1", torch.uint8: "u8"}


@dataclass
class Launch:
    fn: JITFunction
    signature: dict[str, str]
    constexprs: dict[str, Any]
    aligned: list[str]
    options: dict[str, Any] = field(default_factory=dict)

    def key(self) -> str:
        return repr((self.fn.__name__, sorted(self.signature.items()), sorted(self.constexprs.items(), key=str),
                     sorted(self.options.items())))


def _bind(fn: JITFunction, args: tuple, kwargs: dict) -> Launch:
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "launch_pdl") if k in kwargs}
    signature: dict[str, str] = {}
    constexprs: dict[str, Any] = {}
    aligned: list[str] = []
    for i, p in enumerate(fn.params):
        value = args[i] if i < len(args) else kwargs.get(p.name, p.default)
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = value
        elif isinstance(value, torch.Tensor):
            signature[p.name] = "*" + _TORCH_TO_TRITON[value.dtype]
            if value.data_ptr() % 16 == 0:
                aligned.append(p.name)
        elif isinstance(value, bool):
            signature[p.name] = "i1"
        elif isinstance(value, int):
            signature[p.name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                aligned.append(p.name)
        elif isinstance(value, float):
            signature[p.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {p.name} of type {type(value)}")
    return Launch(fn, signature, constexprs, aligned, options)


def record_launches(pi05: bool, rtc: bool) -> list[Launch]:
    """The distinct Triton launches of one denoise step (the engine's default config; `rtc`: the
    step with RTC's backward), recorded on the CPU without running them."""
    from pi0_policy_ros.engine.denoise_triton import TritonDenoiseStep
    from pi0_policy_ros.engine.guidance import GuidanceBuffers
    from pi0_policy_ros.engine.rtc_triton import TritonRtcStep
    from pi0_policy_ros.model.config import GEMMA_2B, GEMMA_300M, SIGLIP_SMALL, get_preset
    from test.denoise_setup import make_step_inputs  # needs PYTHONPATH=. (the repository root)

    cfg = get_preset("pi05" if pi05 else "pi0").replace(
        siglip=dataclasses.replace(SIGLIP_SMALL, projection_dim=GEMMA_2B.width),
        paligemma=dataclasses.replace(GEMMA_2B, depth=1), expert=dataclasses.replace(GEMMA_300M, depth=1))
    inputs = make_step_inputs(cfg, torch.bfloat16, "cpu")
    if rtc:  # the forward with its saves, then the hand-written backward's kernels
        guide = GuidanceBuffers.allocate(inputs.shape.action_horizon, inputs.shape.action_dim, torch.device("cpu"))
        step = TritonRtcStep.build(inputs.weights, inputs.tables, inputs.shape, inputs.buf, guide, 5.0)
    else:
        step = TritonDenoiseStep(inputs.weights, inputs.tables, inputs.shape, inputs.buf)
    launches: dict[str, Launch] = {}
    original = JITFunction.run

    def record(self: JITFunction, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        launch = _bind(self, args, dict(kwargs))
        launches.setdefault(launch.key(), launch)

    JITFunction.run = record
    try:
        step.run(inputs.buf, 0)
    finally:
        JITFunction.run = original
    return list(launches.values())


def _spills(ptx: str, arch: int) -> tuple[int | None, int | None]:
    """(registers, spill stores in bytes) from ptxas -v, when Triton's ptxas is found (the newest
    one it ships, which knows every target above)."""
    ptxas = Path(triton.__file__).parent / "backends/nvidia/bin/ptxas-blackwell"
    if not ptxas.exists():
        ptxas = Path(triton.__file__).parent / "backends/nvidia/bin/ptxas"
    if not ptxas.exists():
        return None, None
    target = re.search(r"^\.target (sm_\w+)", ptx, re.MULTILINE)  # sm_90a, sm_120a, ...
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        out = subprocess.run([str(ptxas), "-v", f"--gpu-name={target.group(1) if target else f'sm_{arch}'}", f.name,
                              "-o", "/dev/null"], capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores", out)
    return (int(regs.group(1)) if regs else None), (int(spill.group(1)) if spill else None)


def compile_for(launch: Launch, arch: int) -> dict[str, Any]:
    names = list(launch.signature)
    src = ASTSource(launch.fn, {n: launch.signature[n] for n in names},
                    constexprs={(names.index(n), ): v for n, v in launch.constexprs.items()},
                    attrs={(names.index(n), ): [["tt.divisibility", 16]] for n in launch.aligned})
    options = dict(launch.options)
    if arch < 90:
        options.pop("launch_pdl", None)
    row: dict[str, Any] = {"kernel": launch.fn.__name__, "arch": arch, "gpus": NAMES.get(arch), **options,
                           "constexprs": {k: str(v) for k, v in launch.constexprs.items()}}
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as exc:  # noqa: BLE001 - a report row, not control flow
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return row
    row["shared"] = compiled.metadata.shared
    row["smem_limit"] = SMEM_LIMIT.get(arch)
    row["fits"] = row["smem_limit"] is None or compiled.metadata.shared <= row["smem_limit"]
    row["registers"], row["spill_bytes"] = _spills(compiled.asm["ptx"], arch)
    stages = options.get("num_stages", 3)
    if not row["fits"] and stages > 1:  # what the engine's stage fitting would pick
        smaller = compile_for(dataclasses.replace(launch, options={**launch.options, "num_stages": stages - 1}), arch)
        row["fits_at_stages"] = smaller["num_stages"] if smaller.get("fits") else smaller.get("fits_at_stages")
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="80,86,87,89,90,120")
    parser.add_argument("--pi0", action="store_true")
    parser.add_argument("--rtc", action="store_true", help="the step with RTC's hand-written backward")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    launches = record_launches(pi05=not args.pi0, rtc=args.rtc)
    rows = []
    for arch in (int(a) for a in args.archs.split(",")):
        for launch in launches:
            row = compile_for(launch, arch)
            rows.append(row)
            status = row.get("error") or ("fits" if row["fits"] else
                                          f"TOO MUCH SHARED MEMORY (fits at {row.get('fits_at_stages')} stages)")
            print(f"sm_{arch:<4} {row['kernel']:<34} stages={row.get('num_stages')} "
                  f"shared={row.get('shared', '-')!s:>7} regs={row.get('registers')} "
                  f"spill={row.get('spill_bytes')}  {status}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    # what the engine runs: every kernel fits at its configured depth or at one `StageFit` steps down to
    return 0 if all(r.get("fits") or r.get("fits_at_stages") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

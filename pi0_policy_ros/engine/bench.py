"""`pi0-policy bench`: time the engine per stage and end to end against the same run's eager model.

End to end is what `Policy` sees: numpy batch in (uint8 images copied through pinned memory),
actions out as numpy. Each precision's actions are compared with the float32 eager reference on
the same inputs, and with the eager model in the engine's own dtype. `--rtc` adds the two
RTC-guided chains (cost against the plain chain, error against the eager guided sampler). Random
full-size weights unless `--checkpoint`. Also runnable as `python -m pi0_policy_ros.engine.bench`.
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pi0_policy_ros.cli import seed_argument
from pi0_policy_ros.engine.engine import STAGES, Engine, eager_inputs
from pi0_policy_ros.engine.guidance import EngineGuidance
from pi0_policy_ros.engine.types import PRECISIONS, EngineBatch, EngineShape, hopper_or_newer, plan_prefix, random_batch
from pi0_policy_ros.errors import ConfigError
from pi0_policy_ros.jsonout import json_text, prepare_output_file
from pi0_policy_ros.model.checkpoint import apply_precision, load_checkpoint, model_from_tensors, random_model
from pi0_policy_ros.model.config import GEMMA_MAX_POSITIONS, MAX_DENOISE_STEPS, PRESETS, ModelConfig, get_preset
from pi0_policy_ros.model.pi0 import Pi0Model
from pi0_policy_ros.model.rtc import sample_actions_guided, soft_mask
from pi0_policy_ros.policy.config import MAX_CAMERA_SIDE_PX

log = logging.getLogger(__name__)
GIB = 1024**3


def _image_size(text: str) -> tuple[int, int]:
    """`HxW` with integers in [1, MAX_CAMERA_SIDE_PX] -> (H, W). Larger frames were numpy's out of
    memory (three of 100000x100000) or, a little smaller, the OOM killer."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and 1 <= int(p) <= MAX_CAMERA_SIDE_PX for p in parts):
        raise argparse.ArgumentTypeError(f"expected HxW in pixels, each 1 to {MAX_CAMERA_SIDE_PX} (the node's "
                                         f"camera_height / camera_width range), e.g. 480x640, found {text!r}")
    return int(parts[0]), int(parts[1])


def _steps(text: str) -> int:
    """0 (the preset's) or 1 to MAX_DENOISE_STEPS: 100000000 never ended its Euler times (see there)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_DENOISE_STEPS:
        raise argparse.ArgumentTypeError(
            f"expected 0 (the preset's) or 1 to {MAX_DENOISE_STEPS} denoise steps (beyond that the float32 "
            f"Euler time, t += -1/steps as openpi sums it, no longer takes that many steps), found {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:  # no timed iteration leaves nothing to take a median of
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, found {text!r}")
    return value


def _count(text: str) -> int:
    """An integer >= 0: how many camera slots or prompt tokens the inputs mark valid."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:  # random_batch cannot draw a negative number of tokens
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, found {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="pi05", choices=sorted(PRESETS), help="model geometry")
    parser.add_argument("--checkpoint", default="", help="an openpi or LeRobot checkpoint directory of --preset's "
                        "geometry, or an openpi-named safetensors file; default: random weights")
    parser.add_argument("--cameras", type=int, default=3, help="camera slots in the graph (1 to the model's 3)")
    parser.add_argument("--valid-cameras", type=_count, default=2, help="slots marked valid in the inputs")
    parser.add_argument("--image-size", default="224x224", type=_image_size, help="source image HxW (resized with pad on the GPU)")
    parser.add_argument("--prompt-len", type=int, default=0, help="prompt tokens (0: the preset's; at most "
                        f"Gemma's {GEMMA_MAX_POSITIONS} positions less the image and action tokens)")
    parser.add_argument("--valid-tokens", type=_count, default=24, help="valid prompt tokens in the inputs")
    parser.add_argument("--steps", type=_steps, default=0, help=f"denoise steps (0: the preset's; at most "
                        f"{MAX_DENOISE_STEPS})")
    parser.add_argument("--precision", default="bfloat16",
                        help=f"comma-separated list from {PRECISIONS}, e.g. bfloat16,fp8,float32")
    parser.add_argument("--denoise-kernels", default="auto", choices=("auto", "torch", "triton"))
    parser.add_argument("--iterations", type=_positive_int, default=200, help="timed engine inferences per precision")
    parser.add_argument("--eager-iterations", type=_positive_int, default=10, help="timed eager inferences")
    parser.add_argument("--variants", action="store_true", help="also time denoise-chain variants (torch ops, "
                        "Triton launch configs) on the bf16 engine (needs CUDA)")
    parser.add_argument("--no-fp32-reference", action="store_true", help="skip the float32 eager reference")
    parser.add_argument("--rtc", action="store_true", help="also time the RTC-guided chains (rtc_fast, rtc) in bf16 "
                        "against the plain chain, with their error against the eager guided sampler")
    parser.add_argument("--full-prefix", action="store_true", help="compute every camera slot and the whole "
                        "prompt (the model's fixed shapes) instead of the valid slots and the prompt's bucket")
    parser.add_argument("--seed", type=seed_argument, default=0, help="seed of the random weights and inputs")
    parser.add_argument("--json", default="", help="write the results here")
    parser.add_argument("--cpu", action="store_true", help="time the eager fallback on the CPU (with or without CUDA) "
                        "(engine and reference are then the same code; minutes for a full-size preset)")


def check_sizes(cfg: ModelConfig, cameras: int, prompt_len: int) -> None:
    """--cameras and --prompt-len within what the model takes, before anything is allocated: a
    prompt of 100000000 tokens was a traceback mid-run (or the OOM killer, exit 137)."""
    if not 1 <= cameras <= cfg.num_image_slots:
        raise ConfigError(f"--cameras: expected 1 to {cfg.num_image_slots} (the model's image slots), found {cameras}")
    image_tokens = cameras * cfg.siglip.tokens_per_image
    limit = cfg.max_prompt_len(cameras)
    if not 0 <= prompt_len <= limit:
        raise ConfigError(f"--prompt-len: expected 0 (the preset's {cfg.max_token_len}) or 1 to {limit} tokens "
                          f"(Gemma's {GEMMA_MAX_POSITIONS} positions less {image_tokens} image tokens and "
                          f"{cfg.suffix_len} action tokens), found {prompt_len}")


def _stats(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(a)), "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)),
            "min": float(a.min()), "n": int(a.size)}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _git() -> dict[str, object]:
    """The checkout's commit. The GPU machine gets a copy of the tree without .git, so the caller
    may pass it as PI0_GIT_COMMIT (and PI0_GIT_DIRTY=1)."""
    if os.environ.get("PI0_GIT_COMMIT"):
        return {"commit": os.environ["PI0_GIT_COMMIT"], "dirty": os.environ.get("PI0_GIT_DIRTY", "1") == "1"}
    root = Path(__file__).resolve().parents[2]
    try:
        top = _git_output(root, "rev-parse", "--show-toplevel")
        if not top or Path(top).resolve() != root:
            # Not a checkout of this package (an install in site-packages): git would answer for
            # whatever repository holds that folder, e.g. the one around a .venv.
            return {"commit": "unknown", "dirty": True}
        commit = _git_output(root, "rev-parse", "HEAD")
        dirty = bool(_git_output(root, "status", "--porcelain", "--untracked-files=no"))
    except OSError:
        commit, dirty = "", True
    return {"commit": commit or "unknown", "dirty": dirty}


def _git_output(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True).stdout.strip()


def _environment(device: torch.device | None = None) -> dict[str, object]:
    """device: what was timed (default: the GPU where there is one)."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env: dict[str, object] = {"python": platform.python_version(), "torch": torch.__version__,
                              "cuda": torch.version.cuda, "git": _git(), "argv": sys.argv}
    env["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


@torch.no_grad()
def eager_timings(model: Pi0Model, batch: EngineBatch, shape: EngineShape, device: torch.device,
                  iterations: int) -> dict[str, dict[str, float]]:
    """The eager model per stage (synchronising between stages) and end to end (numpy in, numpy out)."""
    per: dict[str, list[float]] = {name: [] for name in (*STAGES, "e2e")}
    for i in range(iterations + 2):
        t0 = time.perf_counter()
        inputs, noise = eager_inputs(batch, shape, device)
        embs, pad, _ = model.embed_prefix(inputs)
        _sync()
        t1 = time.perf_counter()
        prefix = model.forward_prefix(embs, pad)
        _sync()
        t2 = time.perf_counter()
        x = noise
        dt = -1.0 / model.cfg.num_denoise_steps
        from pi0_policy_ros.model.pi0 import euler_times
        for t_value in euler_times(model.cfg.num_denoise_steps):
            t = torch.full((1,), t_value, dtype=torch.float32, device=device)
            x = x + dt * model.denoise_step(prefix, inputs.state, x, t)
        x.cpu().numpy()
        t3 = time.perf_counter()
        if i >= 2:
            for name, v in zip((*STAGES, "e2e"), (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
                per[name].append(v * 1e3)
    return {k: _stats(v) for k, v in per.items()}


@torch.no_grad()
def eager_actions(model: Pi0Model, batch: EngineBatch, shape: EngineShape, device: torch.device) -> np.ndarray:
    inputs, noise = eager_inputs(batch, shape, device)
    return model.sample_actions(inputs, noise)[0].float().cpu().numpy()


def _errors(got: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    diff = np.abs(got.astype(np.float64) - ref)
    return {"max_abs": float(diff.max()), "rel_l2": float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30)),
            "ref_max_abs": float(np.abs(ref).max())}


def time_engine(engine: Engine, batches: list[EngineBatch], iterations: int,
                guidance: EngineGuidance | None = None) -> dict[str, dict[str, float]]:
    host = ("host_prepare", "host_launch", "host_wait")
    per: dict[str, list[float]] = {name: [] for name in ("h2d", *STAGES, *host, "e2e")}
    for i in range(iterations + 10):
        batch = batches[i % len(batches)]
        t0 = time.perf_counter()
        engine.infer(batch, guidance)
        wall = (time.perf_counter() - t0) * 1e3
        if i >= 10:
            for name in ("h2d", *STAGES, *host):
                per[name].append(engine.last_timings_ms.get(name, float("nan")))
            per["e2e"].append(wall)
    return {k: _stats(v) for k, v in per.items()}


@dataclass
class ChainTiming:
    chain_ms: dict[str, float]  # graph replays of the whole chain
    actions: np.ndarray  # x after the last timed replay
    replay_spread: float  # max |Δ| of the actions over a few more replays of the same inputs


def time_chain_variant(engine: Engine, step_impl: object, iterations: int = 50, spread_replays: int = 5) -> ChainTiming:
    """Capture a denoise step implementation on the engine's buffers (after its own prefix ran)
    and time the chain's replays. Replaying the same inputs must give the same actions up to the
    float32 atomics' summation order (~1e-3 at pi0.5 size): a larger `replay_spread` means a race."""
    buf = engine.buf
    n = engine.shape.num_steps
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(2):
            for k in range(n):
                step_impl.run(buf, k)
    torch.cuda.current_stream().wait_stream(side)
    graphs = []
    with torch.no_grad():
        for k in range(n):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                step_impl.run(buf, k)
            graphs.append(g)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iterations):
        start.record()
        for g in graphs:
            g.replay()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    out = buf.actions.float().cpu().numpy().copy()
    spread = 0.0
    for _ in range(spread_replays):
        for g in graphs:
            g.replay()
        again = buf.actions.float().cpu().numpy()  # .cpu() synchronises
        spread = max(spread, float(np.abs(again - out).max()) if np.isfinite(again).all() else float("inf"))
    del graphs
    return ChainTiming(_stats(times), out, spread)


def run_variants(engine: Engine, batch: EngineBatch) -> list[dict[str, object]]:
    """The torch-op step and every `denoise_triton.CANDIDATES` config, each captured and timed on
    the engine's buffers; differences are against the torch-op step's actions."""
    from pi0_policy_ros.engine.denoise import TorchDenoiseStep
    from pi0_policy_ros.engine.denoise_triton import CANDIDATES, TritonDenoiseStep
    engine.infer(batch)  # buffers now hold this batch's prefix
    results = []
    variants: list[tuple[str, object]] = [("torch ops", TorchDenoiseStep(engine.expert_weights, engine.tables,
                                                                          engine.shape, engine.dtype))]
    for name, cfg in CANDIDATES.items():
        variants.append((f"triton {name}", TritonDenoiseStep(engine.expert_weights, engine.tables, engine.shape,
                                                              engine.buf, cfg)))
    if hopper_or_newer(engine.device):
        from pi0_policy_ros.engine.denoise_gluon import GluonDenoiseStep
        if GluonDenoiseStep.supports(engine.expert_weights, engine.shape):
            try:  # one program per SM: needs ≥ 128 SMs
                variants.append(("gluon persistent", GluonDenoiseStep(TritonDenoiseStep(
                    engine.expert_weights, engine.tables, engine.shape, engine.buf))))
            except ValueError as exc:
                results.append({"variant": "gluon persistent", "error": str(exc)})
    ref = None
    for name, impl in variants:
        try:
            timing = time_chain_variant(engine, impl)
        except Exception as exc:  # a launch config can fail to compile; report it and go on
            results.append({"variant": name, "error": repr(exc)[:300]})
            continue
        ref = timing.actions if ref is None else ref
        results.append({"variant": name, "config": repr(getattr(impl, "cfg", None)), "chain_ms": timing.chain_ms,
                        "max_abs_vs_torch_ops": float(np.abs(timing.actions - ref).max()),
                        "replay_spread": timing.replay_spread})
    return results


def _free(*objs: object) -> None:
    del objs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _load_model(cfg, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Pi0Model:
    if not args.checkpoint:
        return random_model(cfg, device, dtype, seed=args.seed)
    if Path(args.checkpoint).expanduser().is_dir():  # an openpi or LeRobot checkpoint, as the node and export take
        from pi0_policy_ros.policy.checkpoint_dir import load_checkpoint_dir

        loaded = load_checkpoint_dir(args.checkpoint, args.preset)
        return model_from_tensors(cfg, loaded.tensors, device, dtype, loaded.allow_truncated_vocab, str(loaded.path))
    return load_checkpoint(cfg, args.checkpoint, device, dtype, allow_truncated_vocab=True)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    for p in precisions:
        if p not in PRECISIONS:  # one "error:" line, exit 2, as every other bad argument
            raise ConfigError(f"--precision: unknown precision {p!r}; valid: {list(PRECISIONS)}")
    if not precisions:  # the eager model alone was timed, and the run reported success
        raise ConfigError(f"--precision: expected a comma-separated list from {list(PRECISIONS)}, "
                          f"found {args.precision!r}")
    check_sizes(get_preset(args.preset), args.cameras, args.prompt_len)
    prepare_output_file(args.json or None)  # before minutes of benchmarking, not after them
    # --cpu on a machine with CUDA too: timing the fallback must not need another machine.
    cuda = torch.cuda.is_available() and not args.cpu
    if not cuda and not args.cpu:
        # Full-size eager on a CPU ran for many minutes, then compared eager with eager.
        raise ConfigError("bench times the GPU engine: expected a CUDA device, found none; --cpu times the "
                          "eager CPU fallback instead (use a small preset such as pi05_small)")
    if args.variants and not cuda:
        # The variants are denoise chains captured as CUDA graphs; the CPU fallback has none, and the
        # flag was dropped without a word.
        raise ConfigError("--variants times the denoise-chain variants (torch ops, Triton configs) as CUDA graphs: "
                          "expected the GPU engine, found --cpu (the eager CPU fallback), which has none")
    if "fp8" in precisions and not cuda:
        # The eager fallback has no FP8 path: "[fp8]" timed the bf16 model again under that name.
        raise ConfigError("--precision fp8: expected the GPU engine (its FP8 prefix), found --cpu (the eager CPU "
                          "fallback, which has no FP8 path and would run bfloat16): use bfloat16 or float32")
    if args.denoise_kernels != "auto" and not cuda:
        # The eager fallback has no chain to pick kernels for: the option was dropped without a word.
        raise ConfigError(f"--denoise-kernels {args.denoise_kernels}: expected the GPU engine (its CUDA-graph denoise "
                          "chain), found --cpu (the eager CPU fallback, which runs the model's own denoise loop): "
                          "leave it at auto")
    device = torch.device("cuda" if cuda else "cpu")
    cfg = get_preset(args.preset)
    changes = {}
    if args.steps:
        changes["num_denoise_steps"] = args.steps
    if args.prompt_len:
        changes["max_token_len"] = args.prompt_len
    cfg = cfg.replace(**changes) if changes else cfg
    shape = EngineShape.for_model(cfg, num_slots=args.cameras, image_hw=args.image_size)
    # At most what the graph holds: the defaults (2 cameras, 24 tokens) also serve smaller shapes.
    # The JSON records these, the counts that ran, not the ones asked for.
    valid_cameras, valid_tokens = min(args.valid_cameras, args.cameras), min(args.valid_tokens, shape.prompt_len)
    batches = [random_batch(shape, args.seed + i, valid_slots=valid_cameras, valid_tokens=valid_tokens)
               for i in range(3)]
    # The eager fallback computes every slot and the whole prompt, whatever --full-prefix says.
    compact = cuda and not args.full_prefix
    result: dict[str, object] = {"environment": _environment(device), "shape": {**vars(shape), "image_hw": list(args.image_size)},
                                 "preset": cfg.name, "checkpoint": args.checkpoint or None,
                                 "valid_cameras": valid_cameras, "valid_tokens": valid_tokens,
                                 "compact_prefix": compact,
                                 "prefix_rows": _prefix_rows(shape, batches[0], compact),
                                 "iterations": args.iterations, "precisions": {}}
    want_ref = not args.no_fp32_reference
    model = _load_model(cfg, args, device, torch.float32 if (want_ref or "float32" in precisions) else torch.bfloat16)
    ref = [eager_actions(model, b, shape, device) for b in batches] if want_ref else None
    if "float32" in precisions:
        result["precisions"]["float32"] = _bench_precision(model, shape, device, "float32", batches, ref, None, args)
    apply_precision(model, torch.bfloat16)
    _free()
    eager = eager_timings(model, batches[0], shape, device, args.eager_iterations)
    result["eager_bfloat16"] = eager
    eager_bf16 = [eager_actions(model, b, shape, device) for b in batches]
    guidance = rtc_guidance(shape, args.seed)
    eager_guided = {mode: rtc_eager_actions(model, batches[0], shape, device, guidance, mode)
                    for mode in RTC_BENCH_MODES} if args.rtc else {}
    if cuda:
        model.to("cpu")  # the engine keeps its own weights; measure its memory alone
        _free()
    for p in precisions:
        if p != "float32":
            result["precisions"][p] = _bench_precision(model, shape, device, p, batches, ref, eager_bf16, args)
    if args.rtc:
        result["rtc"] = _bench_rtc(model, shape, device, batches, guidance, eager_guided, result, args)
    table = format_table(result)
    print(table)
    if args.json:
        Path(args.json).write_text(json_text(result))
    return 0


def _bench_precision(model: Pi0Model, shape: EngineShape, device: torch.device, precision: str,
                     batches: list[EngineBatch], ref: list[np.ndarray] | None, eager_same: list[np.ndarray] | None,
                     args: argparse.Namespace) -> dict[str, object]:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    engine = Engine.create(model, shape, device, precision, denoise_kernels=args.denoise_kernels,
                           compact_prefix=not args.full_prefix)
    out: dict[str, object] = {"mode": engine.mode, "denoise_kernels": engine.report.denoise_kernels,
                              "fuse_s": engine.report.fuse_s, "warmup_s": engine.report.warmup_s,
                              "capture_s": engine.report.capture_s,
                              # h2d is the copy's GPU time with the copies inside the graphs, else it
                              # also holds the host's enqueueing of the copy
                              "copies_in_graphs": engine.report.copies_in_graphs}
    # every batch, twice, interleaved: new inputs after capture must give new outputs
    actions = [engine.infer(b) for b in batches] + [engine.infer(b) for b in batches]
    n = len(batches)
    out["repeat_max_abs"] = max(float(np.abs(actions[i] - actions[n + i]).max()) for i in range(n))
    if ref is not None:
        out["vs_fp32_eager"] = [_errors(a, r) for a, r in zip(actions[:n], ref)]
    same = eager_same if precision != "float32" else ref
    if same is not None:
        out["vs_eager_same_dtype"] = [_errors(a, r) for a, r in zip(actions[:n], same)]
    out["timings_ms"] = time_engine(engine, batches, args.iterations)
    if device.type == "cuda":
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / GIB
        out["peak_gpu_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
    if args.variants and precision == "bfloat16" and device.type == "cuda":
        out["denoise_variants"] = run_variants(engine, batches[0])
    _free(engine)
    del engine
    _free()
    return out


RTC_BENCH_MODES = ("rtc_fast", "rtc")
# (label, rtc mode, denoise kernels or None for --denoise-kernels): the torch-op `rtc` (autograd)
# is timed beside the default one for comparison.
RTC_BENCH_RUNS = (("rtc_fast", "rtc_fast", None), ("rtc", "rtc", None), ("rtc_torch_ops", "rtc", "torch"))


def rtc_guidance(shape: EngineShape, seed: int, delay: int = 2) -> EngineGuidance:
    """A previous chunk (random, normalized space) and the soft mask for d = 2, s = H / 2, on all dims."""
    h, a = shape.action_horizon, shape.action_dim
    rows = soft_mask(h, delay, h - h // 2).numpy()
    prev = np.random.default_rng(seed + 100).standard_normal((h, a)).astype(np.float32)
    return EngineGuidance(prev=prev, mask=np.repeat(rows[:, None], a, axis=1).astype(np.float32))


def rtc_eager_actions(model: Pi0Model, batch: EngineBatch, shape: EngineShape, device: torch.device,
                      guidance: EngineGuidance, mode: str) -> np.ndarray:
    inputs, noise = eager_inputs(batch, shape, device)

    def t(v: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(v).to(device)[None]

    out = sample_actions_guided(model, inputs, noise, t(guidance.prev), 0, 0, mode=mode, mask=t(guidance.mask))
    return out[0].float().cpu().numpy()


def _bench_rtc(model: Pi0Model, shape: EngineShape, device: torch.device, batches: list[EngineBatch],
               guidance: EngineGuidance, eager_guided: dict[str, np.ndarray], result: dict,
               args: argparse.Namespace) -> dict[str, object]:
    """bf16 engines with the guidance captured in the chain: stage times with a guidance request,
    the denoise chain against the plain bf16 chain of this run, and the error against the eager
    guided sampler (bf16) on the first batch."""
    plain = result["precisions"].get("bfloat16", {}).get("timings_ms", {}).get("denoise", {}).get("median")
    out: dict[str, object] = {"delay_steps": 2, "execute_horizon": shape.action_horizon // 2, "mask_dims": "all"}
    for label, mode, kernels in RTC_BENCH_RUNS:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        engine = Engine.create(model, shape, device, "bfloat16", denoise_kernels=kernels or args.denoise_kernels,
                               rtc_mode=mode, compact_prefix=not args.full_prefix)
        got = engine.infer(batches[0], guidance)
        entry: dict[str, object] = {"denoise_kernels": engine.report.denoise_kernels,
                                    "capture_s": engine.report.capture_s,
                                    "vs_eager_guided_bf16": _errors(got, eager_guided[mode]),
                                    "guided_minus_plain_max_abs": float(np.abs(got - engine.infer(batches[0])).max()),
                                    "timings_ms": time_engine(engine, batches, args.iterations, guidance)}
        if plain:
            entry["denoise_over_plain_chain"] = entry["timings_ms"]["denoise"]["median"] / plain
        if device.type == "cuda":
            entry["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / GIB
        out[label] = entry
        _free(engine)
        del engine
        _free()
    return out


def _prefix_rows(shape: EngineShape, batch: EngineBatch, compact: bool) -> dict[str, int]:
    rows, _ = plan_prefix(shape, batch.image_masks, batch.token_mask, compact)
    return {"slots": rows.slots, "prompt": rows.prompt, "rows": rows.rows(shape.tokens_per_image),
            "full_rows": shape.padded_prefix_len}


def format_table(result: dict) -> str:
    env = result["environment"]
    eager = result.get("eager_bfloat16", {})
    lines = [f"device: {env.get('device', 'cpu')}  torch {env['torch']}  CUDA {env['cuda']}  triton {env.get('triton')}  "
             f"git {env['git']['commit'][:10]}{' (dirty)' if env['git']['dirty'] else ''}",
             f"preset {result['preset']}  shape {result['shape']}",
             f"prefix rows computed: {result['prefix_rows']} ({'compact' if result['compact_prefix'] else 'full'})"]
    for p, r in result["precisions"].items():
        t = r["timings_ms"]
        peak = f"  peak GPU {r['peak_gpu_gib']:.2f} GiB" if "peak_gpu_gib" in r else ""
        lines.append(f"\n[{p}] mode={r['mode']} denoise={r['denoise_kernels']}  configure: fuse {r['fuse_s']:.1f}s "
                     f"warm-up {r['warmup_s']:.1f}s capture {r['capture_s']:.2f}s{peak}")
        lines.append(f"{'stage':<13}{'median':>9}{'p90':>9}{'p99':>9}{'eager bf16':>12}{'speed-up':>10}")
        for name in ("h2d", *STAGES, "host_prepare", "host_launch", "host_wait", "e2e"):
            if name not in t or not math.isfinite(t[name]["median"]):  # not measured: no CUDA events
                continue
            e = eager.get(name, {}).get("median")
            su = f"{e / t[name]['median']:.1f}x" if e else ""
            lines.append(f"{name:<13}{t[name]['median']:9.3f}{t[name]['p90']:9.3f}{t[name]['p99']:9.3f}"
                         f"{(f'{e:.2f}' if e else ''):>12}{su:>10}")
        if "vs_fp32_eager" in r:
            lines.append("max |actions - fp32 eager|: " + ", ".join(f"{e['max_abs']:.2e}" for e in r["vs_fp32_eager"]))
        if "vs_eager_same_dtype" in r:
            lines.append("max |actions - eager same dtype|: " + ", ".join(
                f"{e['max_abs']:.2e}" for e in r["vs_eager_same_dtype"]))
        lines.append(f"repeat max diff: {r['repeat_max_abs']:.2e}")
        for v in r.get("denoise_variants", []):
            if "error" in v:
                lines.append(f"  variant {v['variant']}: ERROR {v['error'][:120]}")
            else:
                lines.append(f"  variant {v['variant']:<24}: chain {v['chain_ms']['median']:.3f} ms "
                             f"(diff {v['max_abs_vs_torch_ops']:.1e}, replay spread {v['replay_spread']:.1e})")
    for label, _, _ in RTC_BENCH_RUNS:
        r = result.get("rtc", {}).get(label)
        if r:
            t = r["timings_ms"]
            chain = ""
            if math.isfinite(t["denoise"]["median"]):  # not measured without CUDA events
                chain = (f"  chain {t['denoise']['median']:.3f} ms median, p99 {t['denoise']['p99']:.3f} = "
                         f"{r.get('denoise_over_plain_chain', float('nan')):.2f}x the plain chain;")
            lines.append(f"\n[bfloat16 {label}] denoise={r['denoise_kernels']}{chain} e2e {t['e2e']['median']:.3f} ms; "
                         f"max |actions - eager guided bf16| {r['vs_eager_guided_bf16']['max_abs']:.2e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m pi0_policy_ros.engine.bench ...` is `pi0-policy bench ...`: the CLI's own parser and
    error handling (one line, exit 2, for a bad argument)."""
    from pi0_policy_ros.cli import main as cli_main

    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

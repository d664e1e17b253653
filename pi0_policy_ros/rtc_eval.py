"""`pi0-policy rtc-eval`: smoothness at chunk boundaries of the four scheduler modes, closed loop.

A simulated position-controlled robot executes one action per action period. The scheduler
(`control/scheduler.py`) decides when inference starts and splices the chunks; the policy's
latency is injected as d whole periods: a chunk started at step k is available from step k + d.
Each inference observes the executed position as its state (pi0's state token; pi0.5 ignores
the state) and draws fresh noise, seeded by chunk number so that every mode sees the same noise.
The prefix (the model's images and prompt) stays fixed, so it is computed once per model.

A boundary is a step k at which the chunks being executed change (a new chunk takes over, a
chunk leaves the ensemble, a hold starts). Its jumps are measured against the counterfactual p̃,
what the previous chunks would have executed had nothing changed, so that the chunks' own motion
(large for random weights, whose chunks are rough) does not count as a jump:
- position jump ‖p_k − p̃_k‖∞;
- velocity jump ‖(p_{k+1} − p_k) − (p̃_{k+1} − p̃_k)‖∞ / period.
Reported per model, delay and mode: their max and RMS over the boundaries, and for scale the RMS
of the executed step ‖p_k − p_{k−1}‖∞ over the whole run.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from pi0_policy_ros.cli import seed_argument
from pi0_policy_ros.control.scheduler import (
    MAX_INITIAL_LATENCY_S,
    SCHEDULER_MODES,
    ChunkScheduler,
    InferenceRequest,
    ScheduledAction,
    SchedulerConfig,
)
from pi0_policy_ros.errors import ConfigError, Pi0PolicyError
from pi0_policy_ros.jsonout import json_text, prepare_output_file
from pi0_policy_ros.model.checkpoint import random_model
from pi0_policy_ros.model.config import get_preset
from pi0_policy_ros.model.pi0 import ModelInputs, Pi0Model, Prefix
from pi0_policy_ros.model.reference import load_reference, reference_model
from pi0_policy_ros.model.rtc import DEFAULT_MAX_GUIDANCE_WEIGHT, compute_prefix, sample_actions_guided, soft_mask
from pi0_policy_ros.policy.config import SEED_RANGE

DEFAULT_FIXTURE_DIR = Path(__file__).resolve().parents[1] / "test" / "fixtures" / "openpi_reference"
FIXTURE_MODELS = {"fixture-pi05": "pi05_small", "fixture-pi0": "pi0_small"}
RANDOM_MODELS = ("pi05", "pi0")  # full-size presets with random weights
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class EvalSettings:
    delays: tuple[int, ...] = (0, 1, 2, 4)
    modes: tuple[str, ...] = SCHEDULER_MODES
    num_chunks: int = 10
    execute_horizon: int | None = None  # None: half the chunk
    period_s: float = 0.02
    max_guidance_weight: float = DEFAULT_MAX_GUIDANCE_WEIGHT
    mask_schedule: str = "exp"
    ensemble_decay: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        # The closed loop stops after num_chunks chunks: with none (or fewer) it would never stop.
        if self.num_chunks < 1:
            raise ConfigError(f"chunks: expected at least 1, found {self.num_chunks}")
        if not self.delays or min(self.delays) < 0:
            raise ConfigError(f"delays: expected whole action periods >= 0, found {list(self.delays)}")
        if self.execute_horizon is not None and self.execute_horizon < 1:
            raise ConfigError(f"execute_horizon: expected at least 1 step, found {self.execute_horizon}")
        if not (math.isfinite(self.period_s) and self.period_s > 0):
            raise ConfigError(f"period_s: expected > 0 s and finite, found {self.period_s}")
        if max(self.delays) * self.period_s > MAX_INITIAL_LATENCY_S:  # each run's scheduler assumes d periods
            most = int(MAX_INITIAL_LATENCY_S // self.period_s)
            raise ConfigError(f"delays: expected at most {MAX_INITIAL_LATENCY_S} s of latency ({most} periods of "
                              f"{self.period_s} s), found {[d for d in self.delays if d > most]}")
        if not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:  # the chunks' noise seeds are seed * 1_000_003 + chunk
            raise ConfigError(f"seed: expected an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}], found {self.seed!r}")


@dataclass(frozen=True)
class RunResult:
    mode: str
    delay_steps: int
    boundaries: int
    position_jump_max: float
    position_jump_rms: float
    velocity_jump_max: float
    velocity_jump_rms: float
    own_step_rms: float  # RMS of ‖p_k − p_{k−1}‖∞ over the whole run: the chunks' own motion, for scale
    chunks: int
    chunks_dropped: int
    inference_s_mean: float


class ChunkSource:
    """One model with a fixed prefix: a chunk for a state, a noise seed and a scheduler request."""

    def __init__(self, model: Pi0Model, inputs: ModelInputs, device: str, settings: EvalSettings) -> None:
        self.model = model
        self.inputs = inputs
        self.device = device
        self.settings = settings
        self.prefix: Prefix = compute_prefix(model, inputs)
        self.dtype_name = str(model.expert.layers[0].self_attn.q_proj.weight.dtype).removeprefix("torch.")
        self.horizon = model.cfg.action_horizon
        self.action_dim = model.cfg.action_dim

    def sample(self, state: np.ndarray, request: InferenceRequest, mode: str) -> np.ndarray:
        gen = torch.Generator().manual_seed(self.settings.seed * 1_000_003 + request.chunk_id)
        noise = torch.randn(1, self.horizon, self.action_dim, generator=gen).to(self.device)
        state_t = torch.as_tensor(state, dtype=torch.float32)[None].to(self.device)
        inputs = ModelInputs(self.inputs.images, self.inputs.image_masks, self.inputs.tokens, self.inputs.token_mask,
                             state_t)
        if request.prev_actions is None:  # naive, temporal_ensemble, or no chunk yet: the plain chain
            actions = sample_actions_guided(self.model, inputs, noise, None, 0, 0, prefix=self.prefix)
        else:
            prev = torch.as_tensor(request.prev_actions, dtype=torch.float32)[None].to(self.device)
            mask = soft_mask(self.horizon, request.delay_steps, request.mask_end, self.settings.mask_schedule)
            actions = sample_actions_guided(self.model, inputs, noise, prev, request.delay_steps, 0,
                                            self.settings.max_guidance_weight, mode, prefix=self.prefix, mask=mask)
        return actions[0].detach().to("cpu", torch.float64).numpy()


def simulate(source: ChunkSource, mode: str, delay_steps: int, settings: EvalSettings) -> RunResult:
    """Run the closed loop until `num_chunks` chunks have been executed."""
    horizon = source.horizon
    s = settings.execute_horizon or max(1, horizon // 2)
    period = settings.period_s
    cfg = SchedulerConfig(mode=mode, execute_horizon=s, max_guidance_weight=settings.max_guidance_weight,
                          mask_schedule=settings.mask_schedule, ensemble_decay=settings.ensemble_decay,
                          initial_latency_s=delay_steps * period)
    sched = ChunkScheduler(cfg, period, horizon)
    state = np.zeros(source.action_dim)
    pending: tuple[InferenceRequest, int, np.ndarray] | None = None
    trace = _Trace()
    started, last_arrival, inference_s = 0, 0, []
    k = 0
    while True:
        now = k * period
        if pending is not None and pending[1] <= k:
            sched.complete(pending[0], pending[2], now)
            pending, last_arrival = None, k
        if started < settings.num_chunks and sched.should_start(now):
            request = sched.begin(now)
            t0 = time.perf_counter()
            actions = source.sample(state, request, mode)
            inference_s.append(time.perf_counter() - t0)
            started += 1
            if delay_steps == 0:
                sched.complete(request, actions, now)
                last_arrival = k
            else:
                pending = (request, k + delay_steps, actions)
        elif started == settings.num_chunks and pending is None and k >= last_arrival + s:
            break
        action = sched.action_at(now)
        if action is not None:
            trace.record(sched, action, now, period)
            state = action.positions
        k += 1
    status = sched.status()
    return _measure(mode, delay_steps, trace, period, status.chunks_received, status.chunks_dropped, inference_s)


class _Trace:
    """The executed positions, and at each boundary (the chunks in use changed) the positions the
    previous chunks would have given at this step and the next: the counterfactual."""

    def __init__(self) -> None:
        self.positions: list[np.ndarray] = []
        self.sources: list[tuple[tuple[int, ...], bool]] = []
        self.counterfactual: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def record(self, sched: ChunkScheduler, action: ScheduledAction, now: float, period: float) -> None:
        k = len(self.positions)
        source = (action.chunk_ids, action.holding)
        if k > 0 and source != self.sources[-1]:
            before = self.sources[-1][0]
            self.counterfactual[k] = (sched.compose(before, now), sched.compose(before, now + period))
        self.positions.append(action.positions)
        self.sources.append(source)


def _measure(mode: str, delay_steps: int, trace: _Trace, period: float, chunks: int, dropped: int,
             inference_s: list[float]) -> RunResult:
    """Jumps against the counterfactual at every boundary k with a next step: position
    ‖p_k − p̃_k‖∞ and velocity ‖(p_{k+1} − p_k) − (p̃_{k+1} − p̃_k)‖∞ / period."""
    p = np.stack(trace.positions)
    pos, vel = [], []
    for k, (cf_now, cf_next) in trace.counterfactual.items():
        if k + 1 >= len(p):
            continue
        pos.append(np.abs(p[k] - cf_now).max())
        vel.append(np.abs((p[k + 1] - p[k]) - (cf_next - cf_now)).max() / period)
    own_step = np.abs(np.diff(p, axis=0)).max(axis=1)
    pos_b, vel_b = np.array(pos), np.array(vel)
    return RunResult(mode=mode, delay_steps=delay_steps, boundaries=len(pos),
                     position_jump_max=_max(pos_b), position_jump_rms=_rms(pos_b),
                     velocity_jump_max=_max(vel_b), velocity_jump_rms=_rms(vel_b),
                     own_step_rms=_rms(own_step), chunks=chunks, chunks_dropped=dropped,
                     inference_s_mean=float(np.mean(inference_s)))


def _max(x: np.ndarray) -> float:
    return float(x.max()) if x.size else float("nan")


def _ratio(a: float, b: float) -> float:
    """a / b, NaN where b is 0 (no jump to compare with, e.g. one step of overlap)."""
    return a / b if b else float("nan")


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x**2))) if x.size else float("nan")


def load_source(name: str, device: str, dtype: torch.dtype, settings: EvalSettings,
                fixture_dir: Path = DEFAULT_FIXTURE_DIR) -> ChunkSource:
    if name in FIXTURE_MODELS:
        path = fixture_dir / f"{FIXTURE_MODELS[name]}.safetensors"
        if not path.exists():  # the default: a colcon or pip install has no test/ beside the package
            raise ConfigError(f"--model {name}: expected the openpi reference fixture {path}, found nothing; the "
                              "fixtures come with a source checkout, not with an install: pass --fixture-dir "
                              "<checkout>/test/fixtures/openpi_reference, or --model pi05 pi0 (full size, random "
                              "weights)")
        ref = load_reference(path)
        model = reference_model(ref, device=device, dtype=dtype)
        inputs = ref.inputs
    elif name in RANDOM_MODELS:
        cfg = get_preset(name)
        model = random_model(cfg, device, dtype, seed=settings.seed).eval()
        inputs = synthetic_inputs(cfg.max_token_len, cfg.action_dim, cfg.num_image_slots, settings.seed)
    else:
        raise KeyError(f"unknown model {name!r}; valid: {sorted(FIXTURE_MODELS) + list(RANDOM_MODELS)}")
    for p in model.parameters():
        p.requires_grad_(False)  # the VJP is taken with respect to x_t only
    inputs = ModelInputs(images=[i.to(device) for i in inputs.images],
                         image_masks=[m.to(device) for m in inputs.image_masks],
                         tokens=inputs.tokens.to(device), token_mask=inputs.token_mask.to(device),
                         state=inputs.state.to(device))
    return ChunkSource(model, inputs, device, settings)


def synthetic_inputs(max_token_len: int, action_dim: int, num_slots: int, seed: int, valid_tokens: int = 24
                     ) -> ModelInputs:
    """Random images in [-1, 1] (the last slot padded, as for a two-camera robot) and a random
    prompt of `valid_tokens` ids after BOS, like the fixtures'."""
    gen = torch.Generator().manual_seed(seed)
    images = [torch.rand(1, 3, 224, 224, generator=gen) * 2 - 1 for _ in range(num_slots)]
    masks = [torch.tensor([i < num_slots - 1 or num_slots == 1]) for i in range(num_slots)]
    tokens = torch.zeros(1, max_token_len, dtype=torch.int64)
    tokens[0, 0] = 2
    tokens[0, 1:valid_tokens] = torch.randint(3, 1024, (valid_tokens - 1,), generator=gen)
    token_mask = torch.arange(max_token_len)[None] < valid_tokens
    return ModelInputs(images, masks, tokens, token_mask, torch.zeros(1, action_dim))


def evaluate(source: ChunkSource, settings: EvalSettings) -> dict:
    too_late = [d for d in settings.delays if d >= source.horizon]
    if too_late:  # every chunk would arrive after its last action: nothing is ever executed
        raise ConfigError(f"delays: expected fewer steps than {source.model.cfg.name}'s chunk horizon "
                          f"{source.horizon}, found {too_late}")
    results = [simulate(source, mode, d, settings) for d in settings.delays for mode in settings.modes]
    by_key = {(r.delay_steps, r.mode): r for r in results}
    ratios = {}
    for d in settings.delays:
        naive = by_key.get((d, "naive"))
        row = {}
        for mode in settings.modes:
            r = by_key[(d, mode)]
            if naive is not None and mode != "naive":
                row[f"{mode}_over_naive_position_rms"] = _ratio(r.position_jump_rms, naive.position_jump_rms)
                row[f"{mode}_over_naive_velocity_rms"] = _ratio(r.velocity_jump_rms, naive.velocity_jump_rms)
        if (d, "rtc") in by_key and (d, "rtc_fast") in by_key:
            vjp, fast = by_key[(d, "rtc")], by_key[(d, "rtc_fast")]
            row["rtc_over_rtc_fast_position_rms"] = _ratio(vjp.position_jump_rms, fast.position_jump_rms)
            row["rtc_over_rtc_fast_velocity_rms"] = _ratio(vjp.velocity_jump_rms, fast.velocity_jump_rms)
        ratios[str(d)] = row
    s = settings.execute_horizon or max(1, source.horizon // 2)
    return {"model": source.model.cfg.name, "horizon": source.horizon, "execute_horizon": s,
            "dtype": source.dtype_name, "results": [asdict(r) for r in results], "ratios": ratios}


def format_table(report: dict) -> str:
    lines = []
    for name, model in report["models"].items():
        lines.append(f"\n{name} (H={model['horizon']}, s={model['execute_horizon']}, {model['dtype']}):")
        lines.append(f"{'d':>2} {'mode':>17} {'pos max':>9} {'pos rms':>9} {'vel max':>9} {'vel rms':>9} "
                     f"{'own step':>9} {'bnd':>4} {'infer s':>8}")
        for r in model["results"]:
            lines.append(f"{r['delay_steps']:>2} {r['mode']:>17} {r['position_jump_max']:9.4f} "
                         f"{r['position_jump_rms']:9.4f} "
                         f"{r['velocity_jump_max']:9.2f} {r['velocity_jump_rms']:9.2f} {r['own_step_rms']:9.4f} "
                         f"{r['boundaries']:>4} {r['inference_s_mean']:8.3f}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", nargs="+", default=["fixture-pi05", "fixture-pi0"],
                        choices=sorted(FIXTURE_MODELS) + list(RANDOM_MODELS),
                        help="fixture models (openpi reference weights) or full-size presets with random weights")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    parser.add_argument("--delays", type=int, nargs="+", default=[0, 1, 2, 4],
                        help="injected latency, in action periods")
    parser.add_argument("--modes", nargs="+", default=list(SCHEDULER_MODES), choices=SCHEDULER_MODES)
    parser.add_argument("--chunks", type=int, default=10, help="inferences per (model, delay, mode) run")
    parser.add_argument("--execute-horizon", type=int, default=None,
                        help="actions executed per chunk before the next one starts (s in the RTC paper; default: half the chunk)")
    parser.add_argument("--period-s", type=float, default=0.02, help="action period, for the velocities")
    parser.add_argument("--max-guidance-weight", type=float, default=DEFAULT_MAX_GUIDANCE_WEIGHT)
    parser.add_argument("--mask-schedule", default="exp", choices=("exp", "linear"))
    parser.add_argument("--ensemble-decay", type=float, default=0.01)
    parser.add_argument("--seed", type=seed_argument, default=0, help="seed of the inputs, noise and random weights")
    parser.add_argument("--fixture-dir", type=Path, default=DEFAULT_FIXTURE_DIR)
    parser.add_argument("--cpu-threads", type=int, default=1,
                        help="torch CPU threads (default 1: the fixture models' matmuls are tiny, and more threads "
                             "only spin on a shared machine)")
    parser.add_argument("--output", type=Path, default=None, help="write the JSON report here")


def run(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: expected a CUDA device, torch sees none (use --device cpu)", file=sys.stderr)
        return 2
    if args.cpu_threads < 1:
        print(f"error: --cpu-threads: expected at least 1, found {args.cpu_threads}", file=sys.stderr)
        return 2
    if args.device == "cpu":
        torch.set_num_threads(args.cpu_threads)
    t0 = time.perf_counter()
    try:
        settings = EvalSettings(delays=tuple(args.delays), modes=tuple(args.modes), num_chunks=args.chunks,
                                execute_horizon=args.execute_horizon, period_s=args.period_s,
                                max_guidance_weight=args.max_guidance_weight, mask_schedule=args.mask_schedule,
                                ensemble_decay=args.ensemble_decay, seed=args.seed)
        prepare_output_file(args.output, "--output")
        report = {"argv": sys.argv,
                  "device": (torch.cuda.get_device_name() if args.device == "cuda"
                             else f"cpu ({platform.processor() or platform.machine()})"),
                  "torch": torch.__version__, "settings": asdict(settings), "models": {}}
        for name in args.model:
            source = load_source(name, args.device, DTYPES[args.dtype], settings, args.fixture_dir)
            report["models"][name] = evaluate(source, settings)
    except Pi0PolicyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    print(format_table(report))
    if args.output is not None:
        args.output.write_text(json_text(report, indent=1) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pi0-policy rtc-eval", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

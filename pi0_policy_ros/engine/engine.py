"""`Engine`: configure once (fuse weights, precompute tables, allocate, warm up, capture), then
every `infer` is three CUDA graph replays (the pinned-host copy in, vision, prefix, the denoise chain,
the copy out) and one sync.

Modes:
- `graphs` (CUDA): vision and prefix captured as CUDA graphs per prefix layout, the chain of denoise
  steps as one graph. The vision graph also holds the copy in and the denoise graph the copy out,
  with the timing events inside, where torch can capture those (`external` events, torch >= 2.8).
- `static`: the same stage code run op by op on static buffers (any device; the CPU tests use it
  to check the engine's math against the eager model without a GPU).
- `eager`: the model's own `sample_actions` (what runs where CUDA is missing).

`rtc_mode` ("off", "rtc_fast", "rtc") adds real-time-chunking guidance to every denoise step
(`engine/guidance.py`); `infer(batch, guidance)` then takes the previous chunk and the soft mask.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch

from pi0_policy_ros.engine.buffers import DeviceBuffers, HostBuffers, allocate_device, allocate_host, upload
from pi0_policy_ros.engine.denoise import DenoiseChain, DenoiseStep, TorchDenoiseStep
from pi0_policy_ros.engine.guidance import (EngineGuidance, GuidanceBuffers, RtcFastStep, RtcStep,
                                            check_rtc_mode)
from pi0_policy_ros.engine.preprocess import plan_resize, preprocess_images
from pi0_policy_ros.engine.rowops import triton_available
from pi0_policy_ros.engine.stages import PrefixStage, VisionStage, flash_varlen_usable
from pi0_policy_ros.engine.tables import StepTables, build_step_tables
from pi0_policy_ros.engine.types import (EngineBatch, EngineShape, PrefixPlanner, PrefixRows, check_precision,
                                        check_precision_on_gpu)
from pi0_policy_ros.engine.weights import fuse_expert, fuse_prefix, fuse_vision
from pi0_policy_ros.errors import ConfigError
from pi0_policy_ros.model.pi0 import ModelInputs, Pi0Model
from pi0_policy_ros.model.rtc import DEFAULT_MAX_GUIDANCE_WEIGHT, sample_actions_guided

log = logging.getLogger(__name__)

MODES = ("auto", "graphs", "static", "eager")
DENOISE_KERNELS = ("auto", "torch", "triton")
STAGES = ("vision", "prefix", "denoise")
_fallback_logged = False
_no_triton_logged = False


@dataclass
class ConfigureReport:
    """What configuring cost (seconds) and what was chosen."""

    mode: str
    denoise_kernels: str
    rtc_mode: str = "off"
    fuse_s: float = 0.0
    warmup_s: float = 0.0
    capture_s: float = 0.0
    copies_in_graphs: bool = False  # the copies and timing events inside the graphs (`Engine._capture`)


class Engine:
    """Fast pi0 / pi0.5 inference at one fixed `EngineShape` (batch 1)."""

    def __init__(self, model: Pi0Model, shape: EngineShape, device: torch.device, precision: str, mode: str,
                 denoise_kernels: str, rtc_mode: str = "off",
                 max_guidance_weight: float = DEFAULT_MAX_GUIDANCE_WEIGHT, compact_prefix: bool = True) -> None:
        self.model: Pi0Model | None = model
        self.shape = shape
        self.device = device
        self.precision = precision
        self.mode = mode
        self.dtype = torch.float32 if precision == "float32" else torch.bfloat16
        self.last_timings_ms: dict[str, float] = {}
        self.report = ConfigureReport(mode, denoise_kernels, rtc_mode)
        self.rtc_mode = rtc_mode
        self.max_guidance_weight = max_guidance_weight
        self._vision_graphs: dict[PrefixRows, torch.cuda.CUDAGraph] = {}
        self._prefix_graphs: dict[PrefixRows, torch.cuda.CUDAGraph] = {}
        # every layout an inference may plan → its (vision, prefix) graphs, twins resolved at capture
        self._layout_graphs: dict[PrefixRows, tuple[torch.cuda.CUDAGraph, torch.cuda.CUDAGraph]] = {}
        self._denoise_graph: torch.cuda.CUDAGraph | None = None
        self.compact_prefix = compact_prefix
        self._plan = PrefixPlanner(shape, compact_prefix)
        self._flash_prefix = flash_varlen_usable(device, self.dtype)
        self.last_prefix_rows = shape.full_prefix
        self._events: list[torch.cuda.Event] = []
        self.guide: GuidanceBuffers | None = None
        if mode == "eager":
            plan_resize(shape.image_hw, shape.model_image_size)  # refuses a camera size it cannot resize
            return
        t0 = time.perf_counter()
        cfg = model.cfg
        with torch.no_grad():
            self.vision_weights = fuse_vision(model.vision, cfg.siglip, self.dtype, device)
            self.prefix_weights = fuse_prefix(model, self.dtype, device, fp8=precision == "fp8")
            self.expert_weights = fuse_expert(model, self.dtype, device)
            self.tables: StepTables = build_step_tables(model, self.expert_weights, device)
        self.host: HostBuffers = allocate_host(shape, pin=device.type == "cuda")
        self.buf: DeviceBuffers = allocate_device(shape, cfg.paligemma, cfg.expert.width, self.dtype, device)
        self.vision = VisionStage(self.vision_weights, shape, self.dtype)
        self.prefix = PrefixStage(self.prefix_weights, self.expert_weights, shape, self.dtype)
        if rtc_mode != "off":
            self.guide = GuidanceBuffers.allocate(shape.action_horizon, shape.action_dim, device)
        self.denoise = DenoiseChain(self._make_step(denoise_kernels), shape.num_steps)
        self.report.fuse_s = time.perf_counter() - t0
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            self.report.fuse_s = time.perf_counter() - t0

    # ---- construction -----------------------------------------------------------------------
    @classmethod
    def create(cls, model: Pi0Model, shape: EngineShape | None = None, device: str | torch.device = "cuda",
               precision: str = "bfloat16", mode: str = "auto", denoise_kernels: str = "auto",
               rtc_mode: str = "off", max_guidance_weight: float = DEFAULT_MAX_GUIDANCE_WEIGHT,
               compact_prefix: bool = True) -> Engine:
        """Build, warm up and (in `graphs` mode) capture. `mode="auto"` is `graphs` on CUDA and
        `eager` elsewhere (logged once: the CPU works, slowly). The model may live on any device;
        the engine keeps its own fused weights on `device` and uses the model only in `eager` mode.
        `rtc_mode` other than "off" captures the guided chain (`engine/guidance.py`); β is
        `max_guidance_weight`. `compact_prefix`: vision and prefix compute only the valid camera
        slots and the prompt up to its bucket (`types.PrefixRows`; the same actions, less work),
        else every slot and the whole prompt, as the model's fixed shapes do.
        """
        check_precision(precision)
        check_rtc_mode(rtc_mode)
        if not (math.isfinite(max_guidance_weight) and max_guidance_weight >= 0.0):
            raise ConfigError(f"max_guidance_weight must be finite and >= 0, found {max_guidance_weight!r}")
        if mode not in MODES:
            raise ConfigError(f"engine mode must be one of {MODES}, found {mode!r}")
        if denoise_kernels not in DENOISE_KERNELS:
            raise ConfigError(f"denoise_kernels must be one of {DENOISE_KERNELS}, found {denoise_kernels!r}")
        shape = EngineShape.for_model(model.cfg) if shape is None else shape
        shape.check_model(model.cfg)
        if model.cfg.paligemma.num_kv_heads != 1:
            raise ConfigError(f"the engine's KV cache assumes one KV head, found {model.cfg.paligemma.num_kv_heads}")
        dev = torch.device(device)
        cuda = dev.type == "cuda" and torch.cuda.is_available()
        if mode == "auto":
            mode = "graphs" if cuda else "eager"
        if mode == "graphs" and not cuda:
            raise ConfigError(f"mode 'graphs' needs CUDA; device {dev} (CUDA available: {torch.cuda.is_available()})")
        if cuda and mode != "eager":
            check_precision_on_gpu(precision, torch.cuda.get_device_capability(dev), torch.cuda.get_device_name(dev))
        if mode == "eager":
            global _fallback_logged
            if dev.type == "cpu":  # asked for: said, not warned (the warning read as a fault on every CPU run)
                log.info("device %s: the engine runs the eager reference model (its CUDA graphs and kernels need "
                         "a CUDA device)", dev)
            elif not cuda and not _fallback_logged:  # a fallback, not eager asked for on a CUDA device
                log.warning("CUDA is not available for device %s: the engine runs the eager reference model "
                            "(correct, but slow)", dev)
                _fallback_logged = True
            return cls(model, shape, next(model.parameters()).device, precision, "eager", "torch", rtc_mode,
                       max_guidance_weight)
        engine = cls(model, shape, dev, precision, mode, denoise_kernels, rtc_mode, max_guidance_weight,
                     compact_prefix)
        if mode == "graphs":
            engine._capture()
            # The graphs replay the fused copies only: dropping the model lets the caller free its
            # own GPU copy of the weights (otherwise half of the engine's memory).
            engine.model = None
        return engine

    def _make_step(self, kernels: str) -> DenoiseStep:
        """The plain step, wrapped in the RTC guidance when configured. `rtc` on the torch ops
        differentiates them with autograd; on the Triton kernels it runs their hand-written
        backward (`rtc_triton`)."""
        step = self._triton_step(kernels) if self._want_triton(kernels) else None
        if step is None:
            self.report.denoise_kernels = "torch"
            step = TorchDenoiseStep(self.expert_weights, self.tables, self.shape, self.dtype)
            if self.rtc_mode == "rtc":
                assert self.guide is not None
                return RtcStep(step, self.guide, self.tables.times, self.max_guidance_weight)
        if self.rtc_mode == "rtc_fast":
            assert self.guide is not None
            return RtcFastStep(step, self.guide, self.tables.times, self.max_guidance_weight)
        return step

    def _triton_step(self, kernels: str) -> DenoiseStep | None:
        """The Triton kernels' step (`rtc`: with its guidance and backward), or None where `auto`
        finds that their tiles do not fit this model."""
        try:
            return self._make_triton_step()
        except ConfigError as exc:
            if kernels == "triton":
                raise
            # `auto`: the kernels' tiles fit the real models' head and MLP sizes, not every
            # geometry (the fixture presets' head_dim 16 raised "pair_block_n 32 must divide ...").
            # A warning: for a real checkpoint of another geometry the chain is then ~4x slower.
            log.warning("the Triton denoise kernels do not fit this model (%s): the denoise chain runs as "
                        "torch-op CUDA graphs (slower)", exc)
            return None

    def _make_triton_step(self) -> DenoiseStep:
        self.report.denoise_kernels = "triton"
        if self.rtc_mode == "rtc":
            assert self.guide is not None
            from pi0_policy_ros.engine.rtc_triton import TritonRtcStep
            return TritonRtcStep.build(self.expert_weights, self.tables, self.shape, self.buf, self.guide,
                                       self.max_guidance_weight)
        from pi0_policy_ros.engine.denoise_triton import TritonDenoiseStep
        plain = TritonDenoiseStep(self.expert_weights, self.tables, self.shape, self.buf)
        if plain.gluon is not None:  # five of each layer's six kernels in Gluon (sm_90, full-size pi0.5)
            self.report.denoise_kernels = "triton+gluon"
        return plain

    def _want_triton(self, kernels: str) -> bool:
        """`auto`: the Triton kernels on CUDA in bf16 (and fp8, whose expert is bf16) where Triton is
        installed (NVIDIA's Jetson torch wheels come without it); else the torch-op step, said once."""
        if kernels == "triton" and (self.dtype != torch.bfloat16 or self.device.type != "cuda"):
            raise ConfigError("the triton denoise kernels need CUDA and bf16 (precision 'bfloat16' or 'fp8')")
        wanted = kernels == "triton" or (kernels == "auto" and self.device.type == "cuda"
                                         and self.dtype == torch.bfloat16)
        if wanted and not triton_available():
            if kernels == "triton":
                raise ConfigError("denoise_kernels 'triton' needs Triton, which is not installed: pip install the "
                                  "triton version that matches torch, or use denoise_kernels 'torch'")
            global _no_triton_logged
            if not _no_triton_logged:
                log.warning("Triton is not installed: the denoise chain runs as torch-op CUDA graphs (on the H100 "
                            "27.6 against 11.7 ms end to end); pip install the triton version that matches torch")
                _no_triton_logged = True
            return False
        return wanted

    # ---- stages ----------------------------------------------------------------------------
    def _buckets(self) -> dict[PrefixRows, list[PrefixRows]]:
        """The prefix layouts to capture, grouped by their vision graph. A vision graph (with the
        prefix's preparation) depends on the slots and prompt rows only, so a layout with and
        without `leading_keys` share one; where flash varlen is unusable (float32, a torch without
        flash) a `leading_keys` layout would repeat its masked twin and is not captured."""
        groups: dict[PrefixRows, list[PrefixRows]] = {}
        for rows in self._layouts():
            if rows == self._captured_layout(rows):
                groups.setdefault(self._vision_layout(rows), []).append(rows)
        return groups

    def _layouts(self) -> list[PrefixRows]:
        """Every prefix layout `plan_prefix` may return for this engine."""
        return self.shape.prefix_buckets() if self.compact_prefix else [self.shape.full_prefix]

    @staticmethod
    def _vision_layout(rows: PrefixRows) -> PrefixRows:
        """The key of the vision graph that serves `rows`: vision does not depend on `leading_keys`."""
        return replace(rows, leading_keys=False)

    def _captured_layout(self, rows: PrefixRows) -> PrefixRows:
        """The captured prefix layout that serves `rows`."""
        return rows if self._flash_prefix else replace(rows, leading_keys=False)

    def _stage_fns(self, rows: PrefixRows) -> dict[str, list[Callable[[], None]]]:
        """One inference's work for the prefix layout `rows`, stage by stage."""
        steps = [lambda k=k: self.denoise.run_step(self.buf, k) for k in range(self.shape.num_steps)]
        return {"vision": [lambda: self._vision_and_prepare(rows)],
                "prefix": [lambda: self.prefix.run(self.buf, rows, prepared=True)], "denoise": steps}

    def _vision_and_prepare(self, rows: PrefixRows) -> None:
        """Vision, and beside it on a second stream (CUDA) the prefix's preparation: text
        embeddings, masks, positions, RoPE tables; a few dozen small kernels that read nothing
        vision writes (`PrefixStage.prepare`), so they leave the prefix stage's critical path
        (prefix 4.23 → 4.11 ms, run 26)."""
        if self.device.type != "cuda":
            self.prefix.prepare(self.buf, rows)
            self.vision.run(self.buf, rows.slots)
            return
        main = torch.cuda.current_stream(self.device)
        side = _process_stream(self.device, "prepare")
        side.wait_stream(main)
        with torch.cuda.stream(side):
            self.prefix.prepare(self.buf, rows)
        self.vision.run(self.buf, rows.slots)
        main.wait_stream(side)

    def _capture(self) -> None:
        """Warm up on a side stream (allocator, cuBLAS handles, Triton compile and autotune),
        then capture into graphs sharing one memory pool: a vision graph (with the prefix's
        preparation beside it) and a prefix graph per `PrefixRows` bucket (`compact_prefix`), and
        one for the chain of denoise steps. Only the static buffers carry data from one graph to the next; each
        graph's own temporaries are dead when its capture ends, so replaying any subset, in any
        order, is safe."""
        groups = self._buckets()
        self.load(_dummy_batch(self.shape))
        self._upload()
        t0 = time.perf_counter()
        side = _process_stream(self.device, "warmup")
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(2):
                for vision_rows, layouts in groups.items():
                    self._vision_and_prepare(vision_rows)
                    for rows in layouts:
                        self.prefix.run(self.buf, rows, prepared=True)
                for fn in self._stage_fns(self.shape.full_prefix)["denoise"]:
                    fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        self.report.warmup_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        self._events, self.report.copies_in_graphs = _timing_events(len(STAGES) + 2)

        def capture(fn: Callable[[], None]) -> torch.cuda.CUDAGraph:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                fn()
            return graph

        with torch.no_grad():
            for vision_rows, layouts in groups.items():
                self._vision_graphs[vision_rows] = capture(self._graphed_fns(vision_rows)["vision"])
                for rows in layouts:
                    self._prefix_graphs[rows] = capture(self._graphed_fns(rows)["prefix"])
            for rows in self._layouts():
                captured = self._captured_layout(rows)
                self._layout_graphs[rows] = (self._vision_graphs[self._vision_layout(captured)],
                                             self._prefix_graphs[captured])
            # the ten steps chained in one graph: one replay, and PDL edges across the step boundaries
            self._denoise_graph = capture(self._graphed_fns(self.shape.full_prefix)["denoise"])
        torch.cuda.synchronize(self.device)
        self.report.capture_s = time.perf_counter() - t0

    def _graphed_fns(self, rows: PrefixRows) -> dict[str, Callable[[], None]]:
        """What each stage's graph holds. With `report.copies_in_graphs` the vision graph starts with the
        copy in and the denoise graph ends with the copy out, and the timing events are recorded
        inside (as event-record nodes), so that an inference is three host calls where it was
        eleven: one replay per stage, none for the copies and events. A slow host delays the
        GPU's start less (attempt 57 in `bench/engine_notes.md`). Otherwise `_replay` makes the
        copies and records the events between the replays."""
        fns = self._stage_fns(rows)
        if not self.report.copies_in_graphs:
            return {name: lambda stage=fns[name]: [fn() for fn in stage] for name in STAGES}
        ev = self._events

        def vision() -> None:
            ev[0].record()
            self._upload(rows.slots)
            ev[1].record()
            fns["vision"][0]()
            ev[2].record()

        def prefix() -> None:
            fns["prefix"][0]()
            ev[3].record()

        def denoise() -> None:
            for step in fns["denoise"]:
                step()
            ev[4].record()
            self.host.actions.copy_(self.buf.actions, non_blocking=True)

        return {"vision": vision, "prefix": prefix, "denoise": denoise}

    def _upload(self, slots: int | None = None) -> None:
        """Host → device: the batch (only the first `slots` images) and the RTC guidance."""
        upload(self.host, self.buf, slots)
        if self.guide is not None:
            self.guide.upload()

    # ---- inference ----------------------------------------------------------------------------
    def load(self, batch: EngineBatch) -> PrefixRows:
        """Check the batch, plan the prefix layout and copy the batch into the pinned host buffers
        (valid camera slots first when `compact_prefix`, and only the images vision computes)."""
        batch.check(self.shape)
        rows, order = self._plan(batch.image_masks, batch.token_mask)
        self.host.load(batch, order, rows.slots)
        return rows

    def infer(self, batch: EngineBatch, guidance: EngineGuidance | None = None) -> np.ndarray:
        """Actions [H, action_dim] float32 for one batch; per-stage times in `last_timings_ms`.
        `guidance` (RTC engines only): the previous chunk and the soft mask; None samples plainly."""
        if guidance is not None:
            if self.rtc_mode == "off":
                raise ConfigError("RTC guidance given, but the engine was built with rtc_mode 'off'")
            guidance.check(self.shape.action_horizon, self.shape.action_dim)
        if self.mode == "eager":
            return self._infer_eager(batch, guidance)
        t_start = time.perf_counter()
        rows = self.load(batch)
        self.last_prefix_rows = rows
        if self.guide is not None:
            self.guide.load(guidance)
        if self.mode == "static":
            t0 = time.perf_counter()
            with torch.no_grad():
                self._upload(rows.slots)
                fns = self._stage_fns(rows)
                for name in STAGES:
                    for fn in fns[name]:
                        fn()
                self.host.actions.copy_(self.buf.actions)
            self.last_timings_ms = {"total": (time.perf_counter() - t0) * 1e3}
            return self.host.actions.numpy().copy()
        return self._replay(rows, t_start)

    def _replay(self, rows: PrefixRows, t_start: float) -> np.ndarray:
        """Host timings besides the stage spans: `host_prepare` (batch check and pinned copies),
        `host_launch` (enqueueing the replays, and the copies where the graphs do not hold them),
        `host_wait` (until the GPU is done), `total` (all of `infer`)."""
        ev = self._events
        stream = torch.cuda.current_stream(self.device)
        graphs = (*self._layout_graphs[rows], self._denoise_graph)
        t0 = time.perf_counter()
        if self.report.copies_in_graphs:
            for graph in graphs:
                graph.replay()
        else:
            ev[0].record(stream)
            self._upload(rows.slots)
            ev[1].record(stream)
            for i, graph in enumerate(graphs):
                graph.replay()
                ev[2 + i].record(stream)
            self.host.actions.copy_(self.buf.actions, non_blocking=True)
        t_launched = time.perf_counter()
        stream.synchronize()
        t_synced = time.perf_counter()
        timings = {"h2d": ev[0].elapsed_time(ev[1])}
        for i, name in enumerate(STAGES):
            timings[name] = ev[1 + i].elapsed_time(ev[2 + i])
        actions = self.host.actions.numpy().copy()
        timings.update(host_prepare=(t0 - t_start) * 1e3, host_launch=(t_launched - t0) * 1e3,
                       host_wait=(t_synced - t_launched) * 1e3, total=(time.perf_counter() - t_start) * 1e3)
        self.last_timings_ms = timings
        return actions

    def _infer_eager(self, batch: EngineBatch, guidance: EngineGuidance | None) -> np.ndarray:
        batch.check(self.shape)
        t0 = time.perf_counter()
        inputs, noise = eager_inputs(batch, self.shape, self.device)
        if guidance is None:
            with torch.no_grad():
                actions = self.model.sample_actions(inputs, noise)
        else:
            def t(v: np.ndarray) -> torch.Tensor:
                return torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)).to(self.device)[None]

            actions = sample_actions_guided(self.model, inputs, noise, t(guidance.prev), 0, 0,
                                            self.max_guidance_weight, self.rtc_mode, mask=t(guidance.mask))
        out = actions[0].float().cpu().numpy()
        self.last_timings_ms = {"total": (time.perf_counter() - t0) * 1e3}
        return out


# The engines' extra streams (warm-up, the prefix preparation), one of each per device for the whole
# process: torch keeps a cuBLAS workspace (~33 MiB on an H100) for every stream that runs a matmul, so
# new streams per engine would leave that much behind at every configure / cleanup cycle (measured:
# +33 MiB per cycle).
_process_streams: dict[tuple[torch.device, str], torch.cuda.Stream] = {}


def _process_stream(device: torch.device, role: str) -> torch.cuda.Stream:
    if (device, role) not in _process_streams:
        _process_streams[device, role] = torch.cuda.Stream(device)
    return _process_streams[device, role]


def _timing_events(count: int) -> tuple[list[torch.cuda.Event], bool]:
    """Timing events, and whether a graph can hold them: `external` events (torch >= 2.8) become
    event-record nodes when captured; older torch records events in a capture as fork / join edges
    only, so there they stay outside the graphs."""
    try:
        return [torch.cuda.Event(enable_timing=True, external=True) for _ in range(count)], True
    except TypeError:
        return [torch.cuda.Event(enable_timing=True) for _ in range(count)], False


def eager_inputs(batch: EngineBatch, shape: EngineShape, device: torch.device) -> tuple[ModelInputs, torch.Tensor]:
    """The batch as the eager model takes it (batch dim 1), preprocessed like the vision stage."""
    def t(v: np.ndarray | torch.Tensor) -> torch.Tensor:
        return (v if isinstance(v, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(v))).to(device)

    plan = plan_resize(shape.image_hw, shape.model_image_size)
    pixels = preprocess_images(t(batch.images), plan)
    masks = t(batch.image_masks)
    inputs = ModelInputs(images=[pixels[i:i + 1] for i in range(shape.num_slots)],
                         image_masks=[masks[i:i + 1] for i in range(shape.num_slots)],
                         tokens=t(batch.tokens)[None], token_mask=t(batch.token_mask)[None],
                         state=t(batch.state)[None].float())
    return inputs, t(batch.noise)[None].float()


def _dummy_batch(shape: EngineShape) -> EngineBatch:
    from pi0_policy_ros.engine.types import random_batch
    return random_batch(shape, seed=12345)

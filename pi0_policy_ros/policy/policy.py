"""`Policy`: a checkpoint plus one robot's raw observation in, that robot's actions out.

ROS-free, and the one entry point for everything above the engine. The order is openpi's
`Policy.infer` (spec §1 and §5): robot input transform → normalize state → tokenize (pi0.5 with
discrete state reads the normalized state) and pad state → network → unnormalize actions →
absolute actions and robot output transform.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from pi0_policy_ros.engine.backend import select_backend
from pi0_policy_ros.engine.engine import Engine
from pi0_policy_ros.engine.guidance import EngineGuidance
from pi0_policy_ros.engine.types import EngineBatch, EngineShape, check_precision_on_gpu
from pi0_policy_ros.errors import ConfigError, ObservationError, Pi0PolicyError
from pi0_policy_ros.model.checkpoint import EMBED_KEY, apply_precision, load_state, random_model, with_tied_embedding
from pi0_policy_ros.model.config import IMAGE_SLOTS, ModelConfig, get_preset
from pi0_policy_ros.model.pi0 import Pi0Model
from pi0_policy_ros.model.rtc import soft_mask
from pi0_policy_ros.policy.checkpoint_dir import AUTO_PRESET, LoadedCheckpoint, load_checkpoint_dir
from pi0_policy_ros.policy.config import PolicyConfig
from pi0_policy_ros.policy.normalize import (ACTIONS_KEY, STATE_KEY, Normalizer, check_stats_dims,
                                             identity_stats)
from pi0_policy_ros.policy.robots import (PROFILES, RobotProfile, configured_profile, finalize_actions,
                                          openpi_training_transforms, prepare_inputs, robot_actions_to_model)
from pi0_policy_ros.policy.tokenizer import (TOKENIZER_FILE_NAMES, PromptTokenizer, find_tokenizer_model,
                                             train_tiny_tokenizer)
from pi0_policy_ros.policy.types import ActionChunk, ChunkGuidance, Observation, as_real_array

log = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _check_device(config: PolicyConfig) -> torch.device:
    device = torch.device(config.device)
    if device.type == "cpu" and config.cpu_threads:
        # Process-wide, and asked for explicitly by the configuration.
        torch.set_num_threads(config.cpu_threads)
        log.info("torch CPU threads set to %d", config.cpu_threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {config.device!r} requested, but torch {torch.__version__} sees no CUDA "
                          "device; use device 'cpu' or install a CUDA build of torch")
    return device


TENSORRT_NOT_RUN = ("the engine does not run TensorRT stages yet (engine/tensorrt.py builds them; running them "
                    "inside the engine is untested)")


def _check_backend(config: PolicyConfig, device: torch.device) -> None:
    """Refuse what cannot run here before any weights are loaded."""
    if config.backend in ("tensorrt", "auto"):
        # Whatever TensorRT this machine has, the engine runs torch: say that first, and once. (This
        # said "TensorRT is not installed; use 'torch' or 'auto'", as if installing it would help;
        # with TensorRT, 'auto' logged "using tensorrt" and then "using torch".)
        choice = select_backend("auto", device)
        found = choice.reason if choice.name == "torch" else f"{choice.reason} is here"
        if config.backend == "tensorrt":
            raise ConfigError(f"backend 'tensorrt': {TENSORRT_NOT_RUN} ({found}); use 'torch' or 'auto'")
        log.warning("backend auto: falling back to torch: %s (%s)", TENSORRT_NOT_RUN, found)
    if config.precision == "fp8" and device.type != "cuda":
        raise ConfigError("precision 'fp8' needs a CUDA device (torch._scaled_mm); use float32 or bfloat16 on the CPU")
    if device.type == "cuda" and config.backend != "eager":
        check_precision_on_gpu(config.precision, torch.cuda.get_device_capability(device),
                               torch.cuda.get_device_name(device))


def _build_engine(model: Pi0Model, config: PolicyConfig, device: torch.device) -> Engine:
    """CUDA graphs on a GPU for the torch/auto backends; the eager reference model otherwise
    (the engine logs that once)."""
    mode = "eager" if config.backend == "eager" else "auto"
    precision = config.precision if device.type == "cuda" else str(next(model.parameters()).dtype).removeprefix("torch.")
    shape = EngineShape.for_model(model.cfg, image_hw=config.camera_hw)
    return Engine.create(model, shape, device=device, precision=precision, mode=mode, rtc_mode=config.rtc_mode,
                         max_guidance_weight=config.max_guidance_weight)


def _tokenizer_for(config: PolicyConfig, model_cfg: ModelConfig, discrete_state: bool,
                   checkpoint_dir: Path | None) -> PromptTokenizer:
    if config.tokenizer_path:
        path = find_tokenizer_model(config.tokenizer_path)
    elif checkpoint_dir is not None:
        path = find_tokenizer_model(*(checkpoint_dir / name for name in TOKENIZER_FILE_NAMES))
    else:
        # Random weights have no vocabulary to match, so a small model trained here is as good as
        # PaliGemma's (which cannot be downloaded). Demos and benchmarks only.
        path = train_tiny_tokenizer(Path(tempfile.gettempdir()) / "pi0_policy_ros_demo_tokenizer.model")
        log.info("random weights: using a small SentencePiece model trained at %s", path)
    return PromptTokenizer(path, model_cfg.max_token_len, discrete_state_input=discrete_state)


def _check_tokenizer_fits(tokenizer: PromptTokenizer, checkpoint: LoadedCheckpoint, model_cfg: ModelConfig) -> None:
    """A tokenizer of another vocabulary than the checkpoint's gives other token ids for the same
    prompt: the policy would run on a garbled instruction. Ids past the stored embedding rows are
    an error (they would read zero rows); a full table with another piece count than PaliGemma's
    is a warning, as a tokenizer file of its own may still match."""
    table = with_tied_embedding(checkpoint.tensors).get(EMBED_KEY)
    rows = int(table.shape[0]) if table is not None else model_cfg.vocab_size
    if tokenizer.vocab_size > rows:
        raise ConfigError(f"tokenizer {tokenizer.model_path}: expected at most the checkpoint's {rows} embedding rows "
                          f"of vocabulary, found {tokenizer.vocab_size} pieces (another model's tokenizer?)")
    if not checkpoint.allow_truncated_vocab and tokenizer.vocab_size != rows:
        log.warning("tokenizer %s has %d pieces, the checkpoint's embedding table %d rows: expected PaliGemma's "
                    "tokenizer (%d pieces); prompts may be tokenized differently from training",
                    tokenizer.model_path, tokenizer.vocab_size, rows, rows)


def _check_profile_model_type(profile: RobotProfile, model_type: str, checkpoint: LoadedCheckpoint | None) -> None:
    """A profile that follows one openpi config applies that config's transforms (pi0_libero's delta
    actions, pi0.5's state in the prompt), which a checkpoint of the other model type was not trained
    with: its actions would come out wrong (off by the state, for deltas). An error for trained
    weights, naming the profile to use (LeRobot's: the generic one, see the README); random weights
    (demos, benchmarks) have nothing to mismatch, so only a warning."""
    if not profile.model_type or profile.model_type == model_type:
        return
    if checkpoint is None:
        log.warning("robot profile %s was made for %s, the model is %s", profile.name, profile.model_type, model_type)
        return
    family = profile.name.split("_", 1)[-1]
    fitting = [name for name, p in PROFILES.items() if p.model_type == model_type and name.endswith(f"_{family}")]
    expected = fitting if fitting and checkpoint.format == "openpi" else ["generic"]
    raise ConfigError(f"robot profile {profile.name!r} follows openpi's {profile.model_type} config, the checkpoint "
                      f"is a {model_type} model, trained with other transforms: expected robot_profile "
                      f"{expected[0]!r}")


def _check_profile_fits(profile: RobotProfile, model_cfg: ModelConfig) -> None:
    """The robot's state and actions are padded to the model's width, so neither may be wider
    (else every inference would fail on the padding)."""
    for name in ("state_dim", "action_dim"):
        if getattr(profile, name) > model_cfg.action_dim:
            raise ConfigError(f"robot profile {profile.name!r}: {name} must be at most the model's width "
                              f"{model_cfg.action_dim} ({model_cfg.name}), found {getattr(profile, name)}")


def _discrete_state_input(model_cfg: ModelConfig, profile: RobotProfile, checkpoint: LoadedCheckpoint | None) -> bool:
    """Whether the pi0.5 prompt carries the discretized state. A LeRobot checkpoint decides (its
    pi05 always does), then a profile made for one openpi config; the generic profile has no
    config, so the model's (the preset's: openpi's default is on) decides."""
    if not model_cfg.pi05:
        return False
    if (checkpoint is not None and checkpoint.format == "lerobot") or not profile.model_type:
        return model_cfg.discrete_state_input
    return profile.discrete_state_input


def _finite_number(value: int | float | np.number) -> bool:
    """math.isfinite, also for Python ints that numpy cannot take (>= 2**64: np.isfinite raised
    TypeError) or float cannot hold (10**400: OverflowError)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


class Policy:
    """`Policy.from_config(config)`, then `infer(observation) -> ActionChunk`."""

    def __init__(self, config: PolicyConfig, model_cfg: ModelConfig, profile: RobotProfile, normalizer: Normalizer,
                 tokenizer: PromptTokenizer, engine: Engine, source: str) -> None:
        self.config = config
        self.model_config = model_cfg
        self.profile = profile
        self.normalizer = normalizer
        self.tokenizer = tokenizer
        self.engine: Engine | None = engine
        self.source = source
        # Resizing the cameras (exact, on the CPU) is most of the host-side time per inference,
        # unless the engine does it (camera_height / camera_width set).
        cameras = len(profile.camera_slots)
        resize_on_host = config.camera_hw is None
        self._resize_pool = ThreadPoolExecutor(cameras, "pi0-resize") if cameras > 1 and resize_on_host else None
        # One inference at a time: the CUDA engine's buffers, graphs and timing events are shared
        # (two threads raised "Both events must be completed" or got each other's actions), and
        # close() must not take the engine and the resize threads from a running inference.
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: PolicyConfig) -> Policy:
        device = _check_device(config)
        _check_backend(config, device)
        profile = configured_profile(config)
        dtype = TORCH_DTYPES.get(config.precision, torch.bfloat16)  # fp8 engine: bf16 base weights
        checkpoint: LoadedCheckpoint | None = None
        if config.checkpoint_path:
            # Spec section 5: the generic profile (no openpi config of its own) samples the horizon
            # the checkpoint was trained with, unless profile_action_horizon says otherwise.
            from_checkpoint = not profile.model_type and not config.action_horizon
            checkpoint = load_checkpoint_dir(config.checkpoint_path, config.model_preset or AUTO_PRESET,
                                             config.asset_id, horizon=profile.action_horizon,
                                             horizon_from_checkpoint=from_checkpoint)
            model_cfg = checkpoint.model_config
            # The chunks' length is the model's (the checkpoint's for LeRobot and the generic profile).
            profile = dataclasses.replace(profile, action_horizon=model_cfg.action_horizon)
            _check_profile_fits(profile, model_cfg)
            _check_profile_model_type(profile, "pi05" if model_cfg.pi05 else "pi0", checkpoint)
            normalizer = checkpoint.normalizer
            check_stats_dims(checkpoint.stats, profile, max_dim=model_cfg.action_dim)
            with torch.device("meta"):
                model = Pi0Model(model_cfg)
            load_state(model, checkpoint.tensors, checkpoint.allow_truncated_vocab, source=str(checkpoint.path))
            model = apply_precision(model, dtype).to(device).eval()
            source = f"{checkpoint.format} checkpoint {checkpoint.path}"
        else:
            try:
                preset = get_preset(config.model_preset)
            except KeyError as exc:
                raise ConfigError(str(exc.args[0])) from None
            model_cfg = preset.replace(action_horizon=profile.action_horizon)
            try:  # load_checkpoint_dir checks a checkpoint's; 100000 allocated tens of GB at the first infer
                model_cfg.check_positions()
            except ConfigError as exc:
                raise ConfigError(f"action_horizon {profile.action_horizon}: {exc}") from None
            _check_profile_fits(profile, model_cfg)
            _check_profile_model_type(profile, "pi05" if model_cfg.pi05 else "pi0", None)
            normalizer = Normalizer(identity_stats(profile.state_dim, profile.action_dim), use_quantiles=model_cfg.pi05)
            model = random_model(model_cfg, device=device, dtype=dtype, seed=config.seed)
            source = f"random weights ({model_cfg.name}, seed {config.seed})"
        transforms = openpi_training_transforms(profile)
        if checkpoint is not None and checkpoint.format == "lerobot" and transforms:
            log.warning("robot profile %s applies openpi's training transforms (%s), which LeRobot's own pipeline "
                        "does not: for a checkpoint trained in LeRobot use the generic profile%s", profile.name,
                        ", ".join(transforms), " without profile_delta_action_mask" if config.delta_action_mask else "")
        discrete_state = _discrete_state_input(model_cfg, profile, checkpoint)
        tokenizer = _tokenizer_for(config, model_cfg, discrete_state,
                                   checkpoint.path if checkpoint is not None else None)
        if checkpoint is not None:
            _check_tokenizer_fits(tokenizer, checkpoint, model_cfg)
        engine = _build_engine(model, config, device)
        log.info("policy ready: %s, profile %s, %s on %s", source, profile.name, config.precision, device)
        return cls(config, model_cfg, profile, normalizer, tokenizer, engine, source)

    def network_batch(self, observation: Observation) -> tuple[EngineBatch, np.ndarray]:
        """The network's inputs for one observation, and the robot-side state that the output
        transform needs."""
        cfg = self.model_config
        # openpi's policies take a dict of arrays: that raised AttributeError on `.stamp_s`.
        if not isinstance(observation, Observation):
            raise ObservationError("expected an Observation(images={camera: image}, state=..., prompt=..., "
                                   f"stamp_s=...), found {type(observation).__name__}")
        stamp = observation.stamp_s
        # The chunk carries the stamp on: its actions are timed from it downstream.
        if isinstance(stamp, bool) or not isinstance(stamp, (int, float, np.integer, np.floating)) \
                or not _finite_number(stamp):
            raise ObservationError(f"stamp_s: expected a finite time in seconds, found {stamp!r}")
        prepared = prepare_inputs(self.profile, observation.images, observation.state, self._resize_pool,
                                  self.config.camera_hw)
        with np.errstate(over="ignore"):  # reported below, naming the state
            state = self.normalizer.normalize(STATE_KEY, prepared.state)
        if not np.all(np.isfinite(state)):
            # Within float32 but far outside the stats (a narrow std or quantile range): inf went to
            # the network, and the error blamed its NaN actions instead of the state.
            dims = np.flatnonzero(~np.isfinite(state)).tolist()
            values = ", ".join(f"{v:g}" for v in prepared.state[dims])
            raise ObservationError(f"profile '{self.profile.name}': expected a state the norm stats can normalize, "
                                   f"found [{values}] at dims {dims}, beyond float32 once normalized")
        prompt = observation.prompt
        # Only None and "" take the default: `prompt or default` raised numpy's ValueError for an
        # array of strings (truth value ambiguous) and silently replaced 0 / False by the default.
        if prompt is None or (isinstance(prompt, str) and not prompt):
            prompt = self.config.default_prompt
        if isinstance(prompt, str) and not prompt:
            raise ObservationError("Prompt is required: the observation has none and no default_prompt is set")
        tokens = self.tokenizer.tokenize(prompt, state if self.tokenizer.discrete_state_input else None)
        padded_state = np.zeros(cfg.action_dim, dtype=np.float32)
        padded_state[: state.shape[0]] = state
        # Fixed noise per call: the same observation gives the same actions (reproducible replays).
        noise = np.random.default_rng(self.config.seed).standard_normal((cfg.action_horizon, cfg.action_dim))
        batch = EngineBatch(
            images=np.stack([prepared.images[slot] for slot in IMAGE_SLOTS]),
            image_masks=np.array([prepared.image_masks[slot] for slot in IMAGE_SLOTS]),
            tokens=tokens.ids.astype(np.int64), token_mask=tokens.mask.astype(bool),
            state=padded_state, noise=noise.astype(np.float32))
        return batch, prepared.state

    def engine_guidance(self, guidance: ChunkGuidance, robot_state: np.ndarray) -> EngineGuidance:
        """The previous chunk in the network's space (the output transforms inverted, normalized,
        padded) and the soft mask, zero on the padded action dims the robot never executes."""
        cfg, profile = self.model_config, self.profile
        # The previous ActionChunk or its actions alone raised AttributeError on `.delay_steps`.
        if not isinstance(guidance, ChunkGuidance):
            raise ObservationError("RTC: expected guidance as a ChunkGuidance(prev_actions, delay_steps, mask_end), "
                                   f"found {type(guidance).__name__}")
        for name in ("delay_steps", "mask_end"):
            value = getattr(guidance, name)
            # Row counts: a fractional or missing one would bend the soft mask or fail inside it.
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ObservationError(f"RTC: expected an integer {name}, found {value!r}")
        if guidance.delay_steps < 0:
            raise ObservationError(f"RTC: expected delay_steps >= 0, found {guidance.delay_steps}")
        expected = f"RTC: expected finite previous actions [{cfg.action_horizon}, {profile.action_dim}]"
        prev = as_real_array(guidance.prev_actions, expected)  # ragged rows, a tensor that requires grad
        if prev.shape != (cfg.action_horizon, profile.action_dim):
            raise ObservationError(f"{expected}, found shape {prev.shape}")
        if not np.all(np.isfinite(prev)):
            raise ObservationError(f"{expected}, found {int(np.sum(~np.isfinite(prev)))} NaN/Inf values")
        model_side = robot_actions_to_model(profile, prev, robot_state)
        padded = np.zeros((cfg.action_horizon, cfg.action_dim), dtype=np.float32)
        padded[:, : profile.action_dim] = self.normalizer.normalize(ACTIONS_KEY, model_side)
        rows = soft_mask(cfg.action_horizon, guidance.delay_steps,
                         min(max(guidance.mask_end, 0), cfg.action_horizon), self.config.rtc_mask_schedule).numpy()
        mask = np.zeros_like(padded)
        mask[:, : profile.action_dim] = rows[:, None]
        return EngineGuidance(prev=padded, mask=mask)

    def infer(self, observation: Observation, guidance: ChunkGuidance | None = None) -> ActionChunk:
        """One chunk. `guidance` (RTC policies, `rtc_mode` not "off"): continue the previous chunk.
        Calls from several threads run one after the other."""
        with self._lock:
            return self._infer(observation, guidance)

    def _infer(self, observation: Observation, guidance: ChunkGuidance | None) -> ActionChunk:
        # First: after close() an observation error (or the resize it paid for) said nothing of why
        # no observation could ever succeed.
        if self.engine is None:
            raise Pi0PolicyError("the policy was closed")
        start = time.perf_counter()
        batch, robot_state = self.network_batch(observation)
        if guidance is not None and self.config.rtc_mode == "off":
            raise ConfigError("RTC guidance given, but the policy was configured with rtc_mode 'off'")
        engine_guidance = None if guidance is None else self.engine_guidance(guidance, robot_state)
        prepared = time.perf_counter()
        actions = self.engine.infer(batch, engine_guidance)
        ran = time.perf_counter()
        if not np.all(np.isfinite(actions)):
            raise Pi0PolicyError("the network produced NaN/Inf actions; the chunk is rejected")
        actions = self.normalizer.unnormalize(ACTIONS_KEY, actions)
        actions = finalize_actions(self.profile, actions, robot_state)
        end = time.perf_counter()
        timings = {"preprocess": (prepared - start) * 1e3, "network": (ran - prepared) * 1e3,
                   "postprocess": (end - ran) * 1e3, "total": (end - start) * 1e3}
        timings.update({f"engine.{k}": v for k, v in self.engine.last_timings_ms.items()})
        return ActionChunk(actions=actions.astype(np.float32), stamp_s=observation.stamp_s,
                           period_s=self.profile.action_period_s, timings_ms=timings)

    def close(self) -> None:
        """Free the model (and GPU memory) once a running inference has ended. Idempotent."""
        with self._lock:
            if self._resize_pool is not None:
                self._resize_pool.shutdown(wait=True)
                self._resize_pool = None
            if self.engine is not None:
                self.engine = None  # drops the model, its fused weights, buffers and graphs
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()

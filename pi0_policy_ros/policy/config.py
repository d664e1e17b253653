"""What a `Policy` is built from. The ROS node turns its parameters into this in one place."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from numbers import Integral, Real

from pi0_policy_ros.errors import ConfigError

BACKENDS = ("torch", "tensorrt", "auto", "eager")
RTC_MODES = ("off", "rtc_fast", "rtc")  # engine/guidance.py
MASK_SCHEDULES = ("exp", "linear")
PRECISIONS = ("float32", "bfloat16", "fp8")
DEVICES = ("cpu", "cuda")
_DEVICE_PATTERN = re.compile(r"(cpu|cuda)(:\d+)?")
# Each field's type is its default's: an int field takes any integer, a float field any real.
_FIELD_TYPES = {str: (str,), int: (Integral,), float: (Real,), tuple: (tuple, list)}
# The ROS parameter's and every command's --seed range too (cli.seed_argument): numpy's generator
# refuses a negative seed (at every inference), torch's one above 2**64 - 1.
SEED_RANGE = (0, 2**31 - 1)
# The largest camera_height / camera_width (ROS parameters) and `bench --image-size` side, in pixels.
MAX_CAMERA_SIDE_PX = 8192


@dataclass(frozen=True)
class PolicyConfig:
    """Everything needed to load a policy and run it for one robot.

    checkpoint_path: an openpi PyTorch or LeRobot checkpoint directory; "" means random weights
        at the geometry of `model_preset` with identity norm stats (demos and benchmarks only).
    model_preset: a name from `model.config.PRESETS`, checked strictly against a checkpoint's
        tensors; "auto" reads the geometry off the checkpoint.
    robot_profile: a name from `policy.robots.PROFILES`.
    asset_id: which `assets/<asset_id>/norm_stats.json` of an openpi checkpoint; "" takes the
        only one there is.
    tokenizer_path: a SentencePiece model; "" looks in the checkpoint directory.
    default_prompt: used when an observation carries no prompt.
    device, backend, precision: where and how the network runs.
    seed: seeds the denoising noise, so that the same observation gives the same actions.
    state_dim, action_dim, action_horizon, action_period_s: replace the robot profile's values when
        non-zero: how the `generic` profile gets a robot's dims (any profile accepts them). With
        action_horizon 0 the generic profile samples the horizon the checkpoint records (openpi's
        converter config.json `action_horizon`; LeRobot's `chunk_size` decides for every profile).
    delta_action_mask: openpi `make_bool_mask` runs ((6, -1): 6 action dims trained as deltas from
        the state, then 1 absolute) replacing the robot profile's delta mask; () keeps the profile's,
        (-n,) turns deltas off. For a custom openpi config trained with DeltaActions / AbsoluteActions.
    cpu_threads: torch's intra-op threads for CPU inference (process-wide, set when the policy is
        built); 0 leaves torch's default. On a small machine 1 is fastest: more threads compete
        with the ROS executor and the camera callbacks.
    camera_height, camera_width: the size every camera sends; when set (both > 0) the frames go to
        the engine as they are and are resized with pad inside its vision stage (on the GPU, in
        the vision graph; the same pixels as the CPU resize). 0 = resized to 224x224 on the CPU.
        Meant for CUDA: with device cpu the engine's torch resize is slower than the default numpy
        one (22.5 against 8.5 ms for three 640x480 cameras on 2 cores).
    rtc_mode: real-time chunking guidance built into the engine: "off", "rtc_fast" (error only) or
        "rtc" (true vector-Jacobian product); `infer(observation, guidance)` then continues the
        previous chunk. max_guidance_weight: its clip β. rtc_mask_schedule: the soft mask's decay.
    """

    checkpoint_path: str = ""
    model_preset: str = "pi05"
    robot_profile: str = "libero"
    asset_id: str = ""
    tokenizer_path: str = ""
    default_prompt: str = ""
    device: str = "cpu"
    backend: str = "torch"
    precision: str = "float32"
    seed: int = 0
    cpu_threads: int = 0
    state_dim: int = 0
    action_dim: int = 0
    action_horizon: int = 0
    action_period_s: float = 0.0
    delta_action_mask: tuple[int, ...] = ()
    camera_height: int = 0
    camera_width: int = 0
    rtc_mode: str = "off"
    max_guidance_weight: float = 5.0
    rtc_mask_schedule: str = "exp"

    def __post_init__(self) -> None:
        for spec in fields(self):
            value = getattr(self, spec.name)
            kind = type(spec.default)
            if isinstance(value, bool) or not isinstance(value, _FIELD_TYPES[kind]):
                raise ConfigError(f"{spec.name} must be {'an' if kind is int else 'a'} {kind.__name__}, found "
                                  f"{type(value).__name__} {value!r}")
        # Runs, as openpi's make_bool_mask takes them; a bool is not a run (True would read as 1).
        if not all(isinstance(run, Integral) and not isinstance(run, bool) for run in self.delta_action_mask):
            raise ConfigError("delta_action_mask must be make_bool_mask runs (integers, e.g. (6, -1)), found "
                              f"{self.delta_action_mask!r}")
        object.__setattr__(self, "delta_action_mask", tuple(int(run) for run in self.delta_action_mask))
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}, found {self.backend!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, found {self.precision!r}")
        for name in ("state_dim", "action_dim", "action_horizon", "action_period_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be ≥ 0 (0 = the robot profile's), found {getattr(self, name)}")
        if self.rtc_mode not in RTC_MODES:
            raise ConfigError(f"rtc_mode must be one of {RTC_MODES}, found {self.rtc_mode!r}")
        if self.rtc_mask_schedule not in MASK_SCHEDULES:
            raise ConfigError(f"rtc_mask_schedule must be one of {MASK_SCHEDULES}, found {self.rtc_mask_schedule!r}")
        if not (math.isfinite(self.max_guidance_weight) and self.max_guidance_weight >= 0.0):
            raise ConfigError(f"max_guidance_weight must be finite and >= 0, found {self.max_guidance_weight!r}")
        if not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ConfigError(f"seed must be an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}], found {self.seed!r}")
        if self.cpu_threads < 0:
            raise ConfigError(f"cpu_threads must be ≥ 0, found {self.cpu_threads}")
        if min(self.camera_height, self.camera_width) < 0 or (self.camera_height > 0) != (self.camera_width > 0):
            raise ConfigError("camera_height and camera_width must both be > 0 (frames resized by the engine) or "
                              f"both 0 (resized on the CPU), found {self.camera_height} x {self.camera_width}")
        if not math.isfinite(self.action_period_s):
            raise ConfigError(f"action_period_s must be finite, found {self.action_period_s}")
        if not _DEVICE_PATTERN.fullmatch(self.device):
            raise ConfigError(f"device must be one of {DEVICES} (optionally 'cuda:N'), found {self.device!r}")

    @property
    def camera_hw(self) -> tuple[int, int] | None:
        """The cameras' (height, width) when the engine resizes them, else None."""
        return (self.camera_height, self.camera_width) if self.camera_height else None

    def profile_overrides(self) -> dict[str, int | float]:
        """The robot profile's dims, horizon and period this configuration replaces (the non-zero
        ones); the delta mask is `robots.configured_profile`'s to check against the action dims."""
        fields = {"state_dim": self.state_dim, "action_dim": self.action_dim,
                  "action_horizon": self.action_horizon, "action_period_s": self.action_period_s}
        return {name: value for name, value in fields.items() if value}

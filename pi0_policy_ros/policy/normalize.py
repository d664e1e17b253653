"""State / action normalization statistics and formulas (spec: openpi_pipeline.md, sections 3, 6).

Public API:
    NormStats(mean, std, q01=None, q99=None)          float32 1-D arrays, read-only
    STATE_KEY = "state", ACTIONS_KEY = "actions"      the keys every stats dict uses
    find_openpi_norm_stats(checkpoint_dir, asset_id="") -> Path
    load_openpi_norm_stats(path) -> dict[str, NormStats]       norm_stats.json (file or its dir)
    load_lerobot_normalization(checkpoint_dir) -> LeRobotNormalization
    load_lerobot_stats(checkpoint_dir) -> dict[str, NormStats]
    Normalizer(stats, use_quantiles, eps=None, convention="openpi")
        .normalize(key, x) / .unnormalize(key, x) -> float32
    check_stats_dims(stats, profile, max_dim=None)            profile: anything with state_dim / action_dim
    identity_stats(state_dim, action_dim) -> dict[str, NormStats]

Conventions (`Normalizer.convention`):
    "openpi" (default eps 1e-6, openpi `transforms.py`):
        z-score      norm (x - mean) / (std + eps)          unnorm x * (std + eps) + mean
        quantile     norm (x - q01) / (q99 - q01 + eps) * 2 - 1
                     unnorm (x + 1) / 2 * (q99 - q01 + eps) + q01
    "lerobot" (default eps 1e-8, lerobot `processor/normalize_processor.py`):
        z-score      norm (x - mean) / (std + eps)          unnorm x * std + mean (no eps)
        quantile     d = q99 - q01, replaced by eps only where it is 0
                     norm 2 * (x - q01) / d - 1             unnorm (x + 1) * d / 2 + q01
Width rules, both conventions: `normalize` cuts the stats to x's width (stats shorter than x are an
error). `unnormalize` pads z-score stats to x's width with mean 0 / std 1, and leaves the dims
past the quantile stats unchanged. Nothing is clipped.
Errors: ConfigError for a mismatch with the configuration (quantiles without q01/q99, dims),
CheckpointError for a missing or malformed stats file.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Protocol

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

from pi0_policy_ros.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

STATE_KEY = "state"
ACTIONS_KEY = "actions"
NORM_STATS_FILE = "norm_stats.json"
Convention = Literal["openpi", "lerobot"]
DEFAULT_EPS: Mapping[str, float] = {"openpi": 1e-6, "lerobot": 1e-8}
PADDING_TOLERANCE = 1e-6  # a padded dim's statistics: 0, up to the rounding of a float32 file

# LeRobot feature names -> our keys, and the processor steps that hold the stats.
LEROBOT_FEATURE_KEYS: Mapping[str, str] = {"observation.state": STATE_KEY, "action": ACTIONS_KEY}
LEROBOT_PROCESSOR_FILES = ("policy_preprocessor.json", "policy_postprocessor.json")
LEROBOT_NORM_STEPS = ("normalizer_processor", "unnormalizer_processor")


@dataclass(frozen=True, eq=False)
class NormStats:
    """Per-dim statistics of one key, over the robot's own dims (float32, read-only)."""

    mean: np.ndarray
    std: np.ndarray
    q01: np.ndarray | None = None
    q99: np.ndarray | None = None

    def __post_init__(self) -> None:
        for name in ("mean", "std", "q01", "q99"):
            value = getattr(self, name)
            if value is None:
                continue
            array = np.array(value, dtype=np.float32).reshape(-1)
            array.setflags(write=False)
            object.__setattr__(self, name, array)
        widths = {name: len(getattr(self, name)) for name in ("mean", "std", "q01", "q99")
                  if getattr(self, name) is not None}
        if len(set(widths.values())) != 1:
            raise ConfigError(f"norm stats entries must have one width, found {widths}")

    @property
    def dim(self) -> int:
        return len(self.mean)

    @property
    def has_quantiles(self) -> bool:
        return self.q01 is not None and self.q99 is not None


# --- openpi norm_stats.json -----------------------------------------------------------------------

def find_openpi_norm_stats(checkpoint_dir: str | Path, asset_id: str = "") -> Path:
    """Path of `<checkpoint_dir>/assets/<asset_id>/norm_stats.json`.

    An asset_id may have several parts ("physical-intelligence/libero"). An empty asset_id takes
    the only asset directory holding a norm_stats.json, at any depth; none or several is a
    ConfigError listing what was found, none and an unreadable folder a CheckpointError naming it.
    """
    assets = Path(checkpoint_dir) / "assets"
    if asset_id:
        path = assets / asset_id / NORM_STATS_FILE
        try:
            path.stat()
        except FileNotFoundError:
            raise ConfigError(f"norm stats not found: expected {path}; assets present: {_asset_ids(assets)}") from None
        except OSError as exc:  # a folder of the path is unreadable: "not found" would be wrong
            raise CheckpointError(f"cannot read {path}: {exc.strerror}") from exc
        return path
    unreadable: list[tuple[Path, OSError]] = []
    found = _asset_ids(assets, unreadable)
    if not found and unreadable:
        folder, exc = unreadable[0]
        raise CheckpointError(f"cannot read {folder}: {exc.strerror}; expected {assets}/<asset_id>/{NORM_STATS_FILE}")
    if len(found) != 1:
        raise ConfigError(
            f"asset_id is empty, so exactly one {assets}/<asset_id>/{NORM_STATS_FILE} is expected; "
            f"found {len(found)}: {found}. Set asset_id."
        )
    return assets / found[0] / NORM_STATS_FILE


def _asset_ids(assets: Path, unreadable: list[tuple[Path, OSError]] | None = None) -> list[str]:
    """Asset ids under `assets`, at any depth: openpi's default asset_id is the data set's repo id,
    e.g. "physical-intelligence/libero" (assets/physical-intelligence/libero/norm_stats.json).
    Symlinked folders are followed: norm stats are often linked in from elsewhere, and `rglob`
    (before Python 3.13) does not enter them. Folders that cannot be read go to `unreadable`."""
    if not assets.is_dir():
        return []
    found: list[str] = []
    _collect_asset_ids(assets, assets, frozenset(), found, [] if unreadable is None else unreadable)
    return sorted(found)


def _collect_asset_ids(folder: Path, assets: Path, walking: frozenset[str], found: list[str],
                       unreadable: list[tuple[Path, OSError]]) -> None:
    """Append the asset id of `folder` (if it holds a norm_stats.json) and of every folder below it.
    `walking`: the real paths of the folders above, so that a link back up is not walked forever."""
    real = os.path.realpath(folder)
    if real in walking:
        return
    # lexists, as rglob matched: a broken link to the stats is then reported by the loader, naming it.
    if folder != assets and os.path.lexists(folder / NORM_STATS_FILE):
        found.append(folder.relative_to(assets).as_posix())
    try:
        children = sorted(child for child in folder.iterdir() if child.is_dir())
    except OSError as exc:  # unreadable: it holds no stats that could be read (rglob skipped it too)
        unreadable.append((folder, exc))
        return
    for child in children:
        _collect_asset_ids(child, assets, walking | {real}, found, unreadable)


def load_openpi_norm_stats(path: str | Path) -> dict[str, NormStats]:
    """Read openpi's `{"norm_stats": {key: {mean, std, q01?, q99?}}}` (a file, or the dir holding it).

    q01 / q99 may be absent or null (older files). Keys other than these four are ignored.
    """
    file = Path(path)
    if file.is_dir():
        file = file / NORM_STATS_FILE
    try:
        document = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read openpi norm stats {file}: {exc}") from exc
    entries = document.get("norm_stats") if isinstance(document, dict) else None
    if not isinstance(entries, dict):
        raise CheckpointError(f"{file}: expected a top-level 'norm_stats' object, found keys "
                              f"{sorted(document) if isinstance(document, dict) else type(document).__name__}")
    return {key: _stats_from_mapping(entry, f"{file}: '{key}'") for key, entry in entries.items()}


def _stats_from_mapping(entry: Any, where: str) -> NormStats:
    if not isinstance(entry, Mapping) or entry.get("mean") is None or entry.get("std") is None:
        found = sorted(entry) if isinstance(entry, Mapping) else type(entry).__name__
        raise CheckpointError(f"{where}: expected 'mean' and 'std' lists, found {found}")
    present = [name for name in ("mean", "std", "q01", "q99") if entry.get(name) is not None]
    try:
        shapes = {name: np.shape(entry[name]) for name in present}
        stats = NormStats(mean=entry["mean"], std=entry["std"], q01=entry.get("q01"), q99=entry.get("q99"))
    except (TypeError, ValueError, ConfigError) as exc:
        raise CheckpointError(f"{where}: {exc}") from exc
    # NormStats flattens: a [2, 7] table would pass as 14 dims (within the model's width).
    if any(len(shape) != 1 for shape in shapes.values()):
        raise CheckpointError(f"{where}: expected 1-D lists over the robot's dims, found shapes "
                              f"{ {name: list(shape) for name, shape in shapes.items()} }")
    # A NaN / Inf (or a JSON null, read as NaN) would make every chunk's actions NaN.
    for name in ("mean", "std", "q01", "q99"):
        values = getattr(stats, name)
        if values is not None and not np.all(np.isfinite(values)):
            bad = np.flatnonzero(~np.isfinite(values)).tolist()
            raise CheckpointError(f"{where}: expected finite '{name}' values, found NaN/Inf/null at dims {bad} "
                                  f"({values[bad[:5]].tolist()})")
    return stats


# --- LeRobot processor files ----------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class LeRobotNormalization:
    """What a LeRobot checkpoint says about normalization.

    stats: "state" / "actions" stats from the normalizer / unnormalizer steps.
    modes: LeRobot's norm_map, e.g. {"STATE": "QUANTILES", "ACTION": "QUANTILES", "VISUAL": "IDENTITY"}.
    eps: the steps' epsilon (LeRobot's default 1e-8).
    """

    stats: Mapping[str, NormStats]
    modes: Mapping[str, str] = field(default_factory=dict)
    eps: float = DEFAULT_EPS["lerobot"]

    @property
    def use_quantiles(self) -> bool:
        """True for QUANTILES (pi05), False for MEAN_STD (pi0); anything else is a ConfigError."""
        used = {self.modes.get(kind) for kind in ("STATE", "ACTION")}
        if used == {"QUANTILES"}:
            return True
        if used == {"MEAN_STD"}:
            return False
        raise ConfigError(
            "LeRobot norm_map must use QUANTILES or MEAN_STD for both STATE and ACTION, found "
            f"STATE={self.modes.get('STATE')!r}, ACTION={self.modes.get('ACTION')!r}"
        )

    def normalizer(self) -> Normalizer:
        """A Normalizer with LeRobot's formulas, mode and epsilon."""
        return Normalizer(self.stats, self.use_quantiles, eps=self.eps, convention="lerobot")


def load_lerobot_normalization(checkpoint_dir: str | Path) -> LeRobotNormalization:
    """Read the (un)normalizer steps of `policy_preprocessor.json` / `policy_postprocessor.json`.

    Each step's stats file is the one its `state_file` entry names (the step index in the name
    changes between LeRobot versions). Actions come from the postprocessor's unnormalizer when it
    has them, the state from the preprocessor's normalizer.
    """
    directory = Path(checkpoint_dir)
    per_file: dict[str, dict[str, NormStats]] = {name: {} for name in LEROBOT_PROCESSOR_FILES}
    modes: dict[str, str] = {}
    eps = DEFAULT_EPS["lerobot"]
    steps_found = 0
    for name in LEROBOT_PROCESSOR_FILES:
        for step in _lerobot_norm_steps(directory / name):
            steps_found += 1
            step_modes, step_eps = _lerobot_step_settings(directory / name, step)
            modes.update(step_modes)
            eps = eps if step_eps is None else step_eps
            per_file[name].update(_read_lerobot_state_file(directory, step))
    if steps_found == 0:
        raise CheckpointError(
            f"no {' / '.join(LEROBOT_NORM_STEPS)} step with a state_file in "
            f"{[str(directory / n) for n in LEROBOT_PROCESSOR_FILES]}"
        )
    # LeRobot saves every data set stat in both files: the state is normalized with the
    # preprocessor's, the actions unnormalized with the postprocessor's (the other file's where
    # one lacks them).
    pre, post = (per_file[name] for name in LEROBOT_PROCESSOR_FILES)
    stats = {**post, **pre}
    if ACTIONS_KEY in post:
        stats[ACTIONS_KEY] = post[ACTIONS_KEY]
    return LeRobotNormalization(stats=stats, modes=modes, eps=eps)


def load_lerobot_stats(checkpoint_dir: str | Path) -> dict[str, NormStats]:
    """Only the stats of `load_lerobot_normalization`, keyed "state" / "actions"."""
    return dict(load_lerobot_normalization(checkpoint_dir).stats)


def _lerobot_norm_steps(path: Path) -> list[dict[str, Any]]:
    """The normalizer-like steps of one processor JSON that carry a state file; [] if no file."""
    if not path.is_file():
        return []
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read LeRobot processor file {path}: {exc}") from exc
    if not isinstance(document, dict):
        raise CheckpointError(f"LeRobot processor file {path}: expected a JSON object with a 'steps' list, "
                              f"found {type(document).__name__}")
    steps = document.get("steps", [])
    if not isinstance(steps, list):
        raise CheckpointError(f"LeRobot processor file {path}: expected 'steps' to be a list, "
                              f"found {type(steps).__name__}")
    return [
        step for step in steps
        if isinstance(step, dict) and step.get("registry_name") in LEROBOT_NORM_STEPS and step.get("state_file")
    ]


def _lerobot_step_settings(path: Path, step: Mapping[str, Any]) -> tuple[dict[str, str], float | None]:
    """The norm_map and eps (None: not set) of one (un)normalizer step of the processor file `path`."""
    where = f"LeRobot processor file {path}, step {step['registry_name']}"
    config = step.get("config") or {}
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: expected 'config' to be an object, found {type(config).__name__}")
    norm_map = config.get("norm_map") or {}
    if not isinstance(norm_map, dict):
        raise CheckpointError(f"{where}: expected 'norm_map' to be an object, found {type(norm_map).__name__}")
    modes = {str(k): str(v) for k, v in norm_map.items()}
    if "eps" not in config:
        return modes, None
    eps = config["eps"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise CheckpointError(f"{where}: expected 'eps' to be a finite number >= 0, found {eps!r}")
    return modes, float(eps)


def _read_lerobot_state_file(directory: Path, step: Mapping[str, Any]) -> dict[str, NormStats]:
    path = Path(os.path.abspath(directory / str(step["state_file"])))
    # The checkpoint names its own files: a path out of its directory reads another checkpoint's stats.
    # Checked on the names, links not followed: in the Hugging Face Hub cache every file of a
    # snapshot is a link to ../../blobs/<hash>, outside the directory, and is still its own.
    if not path.is_relative_to(os.path.abspath(directory)):
        raise CheckpointError(f"LeRobot processor step {step['registry_name']}: expected a state_file inside "
                              f"{directory}, found {str(step['state_file'])!r}")
    try:
        path.open("rb").close()  # safetensors says "No such file or directory" of an unreadable file
        tensors = load_file(str(path))
    except (OSError, SafetensorError, ValueError, TypeError) as exc:
        raise CheckpointError(f"cannot read LeRobot stats {path} (named by {step['registry_name']}): {exc}") from exc
    grouped: dict[str, dict[str, np.ndarray]] = {}
    for flat_key, tensor in tensors.items():
        feature, _, stat = flat_key.rpartition(".")
        grouped.setdefault(feature, {})[stat] = tensor
    return {
        key: _stats_from_mapping(grouped[feature], f"{path}: '{feature}'")
        for feature, key in LEROBOT_FEATURE_KEYS.items()
        if feature in grouped
    }


# --- Normalizer -----------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Normalizer:
    """Normalizes inputs and unnormalizes outputs with one set of stats.

    stats: key -> NormStats ("state", "actions").
    use_quantiles: quantile normalization (pi0.5, pi0-FAST) instead of z-score (pi0).
    eps: None takes the convention's default (openpi 1e-6, LeRobot 1e-8).
    convention: "openpi" or "lerobot"; see the module docstring for the formulas.
    """

    stats: Mapping[str, NormStats]
    use_quantiles: bool
    eps: float | None = None
    convention: Convention = "openpi"

    def __post_init__(self) -> None:
        if self.convention not in DEFAULT_EPS:
            raise ConfigError(f"convention must be one of {tuple(DEFAULT_EPS)}, found {self.convention!r}")
        if self.eps is None:
            object.__setattr__(self, "eps", DEFAULT_EPS[self.convention])
        object.__setattr__(self, "stats", dict(self.stats))
        if self.use_quantiles:
            missing = sorted(k for k, s in self.stats.items() if not s.has_quantiles)
            if missing:
                raise ConfigError(
                    f"quantile normalization needs q01 and q99 for every key; missing for {missing}. "
                    "Use z-score normalization (pi0) or stats with quantiles."
                )
        # No data set gives a negative std or q01 above q99: such stats (swapped or hand-edited)
        # would mirror every action about its mean / mid-range, and still look plausible.
        for key, stats in self.stats.items():
            low, high, what = ((stats.q01, stats.q99, "q01 <= q99 (quantile") if self.use_quantiles
                               else (np.zeros_like(stats.std), stats.std, "std >= 0 (z-score"))
            bad = np.flatnonzero(low > high).tolist()
            if bad:
                raise ConfigError(f"'{key}' norm stats: expected {what} normalization), found the opposite "
                                  f"at dims {bad}")

    def normalize(self, key: str, x: np.ndarray) -> np.ndarray:
        """Normalize `x` [..., D]; a key without stats passes through (as in openpi)."""
        values = np.asarray(x, dtype=np.float64)
        stats = self.stats.get(key)
        if stats is None:
            return values.astype(np.float32)
        width = values.shape[-1]
        if stats.dim < width:
            raise ConfigError(f"'{key}' norm stats have {stats.dim} dims, fewer than the {width} to normalize")
        if self.use_quantiles:
            q01, span = _cut(stats.q01, width), self._quantile_span(stats)[:width]
            out = (values - q01) / span * 2.0 - 1.0
        else:
            out = (values - _cut(stats.mean, width)) / (_cut(stats.std, width) + self.eps)
        return out.astype(np.float32)

    def unnormalize(self, key: str, x: np.ndarray) -> np.ndarray:
        """Unnormalize `x` [..., D]; unlike `normalize`, a key without stats is a ConfigError."""
        values = np.asarray(x, dtype=np.float64)
        stats = self.stats.get(key)
        if stats is None:
            raise ConfigError(f"no norm stats for '{key}' to unnormalize; stats have {sorted(self.stats)}")
        width = values.shape[-1]
        if stats.dim > width:
            raise ConfigError(f"'{key}' norm stats have {stats.dim} dims, more than the {width} to unnormalize")
        if self.use_quantiles:
            return self._unnormalize_quantile(stats, values).astype(np.float32)
        mean = _pad(stats.mean, width, 0.0)
        std = _pad(stats.std, width, 1.0)
        scale = std + self.eps if self.convention == "openpi" else std
        return (values * scale + mean).astype(np.float32)

    def _unnormalize_quantile(self, stats: NormStats, values: np.ndarray) -> np.ndarray:
        dim = stats.dim
        head = (values[..., :dim] + 1.0) / 2.0 * self._quantile_span(stats) + _cut(stats.q01, dim)
        # Dims past the stats (model padding) pass through unchanged.
        return np.concatenate([head, values[..., dim:]], axis=-1)

    def _quantile_span(self, stats: NormStats) -> np.ndarray:
        assert stats.q01 is not None and stats.q99 is not None  # checked in __post_init__
        span = stats.q99.astype(np.float64) - stats.q01.astype(np.float64)
        if self.convention == "openpi":
            return span + self.eps
        return np.where(span == 0.0, self.eps, span)


def _cut(values: np.ndarray | None, width: int) -> np.ndarray:
    assert values is not None
    return values[:width].astype(np.float64)


def _pad(values: np.ndarray, width: int, fill: float) -> np.ndarray:
    out = np.full(width, fill, dtype=np.float64)
    out[: len(values)] = values
    return out


# --- Checks and demo stats ------------------------------------------------------------------------

class HasRobotDims(Protocol):
    """Anything with the robot's dims, e.g. `robots.RobotProfile`."""

    @property
    def state_dim(self) -> int: ...

    @property
    def action_dim(self) -> int: ...


def check_stats_dims(stats: Mapping[str, NormStats], profile: HasRobotDims, max_dim: int | None = None) -> None:
    """Raise ConfigError unless "state" and "actions" stats match the profile's dims.

    max_dim: also accept stats wider than the robot, up to this many dims (the model's width).
        openpi cuts them when normalizing and pads the actions to them when unnormalizing; its
        data transforms padded state and actions to the model's width before June 2025, so the
        norm stats of checkpoints trained before then have 32 dims.
    """
    for key, expected in ((STATE_KEY, profile.state_dim), (ACTIONS_KEY, profile.action_dim)):
        if key not in stats:
            raise ConfigError(f"norm stats have no '{key}' entry; found {sorted(stats)}")
        found = stats[key].dim
        if found == expected:
            continue
        if max_dim is not None and expected < found <= max_dim:
            if not _zero_padding(stats[key], expected):
                # openpi padded with zeros, so its padded dims' statistics are all 0. Real statistics
                # there are another data set's: ALOHA's 14 dims on an 8-dim LIBERO robot loaded silently.
                log.warning("'%s' norm stats have %d dims, the robot profile %d: dims %d-%d are not zero padding "
                            "(openpi's padded stats are 0 there), so they may be another robot's stats (wrong "
                            "asset_id or robot_profile?); the first %d are used, as openpi does",
                            key, found, expected, expected, found - 1, expected)
            continue
        allowed = f"{expected}" if max_dim is None or max_dim <= expected else f"{expected} to {max_dim}"
        # The generic profile's 32 dims are a default to override: blaming the asset id or profile
        # alone sent its users looking in the wrong place.
        dim = "state_dim" if key == STATE_KEY else "action_dim"
        raise ConfigError(
            f"'{key}' norm stats have {found} dims but the robot profile has {expected} (stats of {allowed} dims "
            f"fit): wrong asset_id or robot_profile, or the robot's {dim} not set ({dim} of PolicyConfig, "
            f"profile_{dim} of the node)?"
        )


def _zero_padding(stats: NormStats, start: int) -> bool:
    """Whether every statistic of dims `start`.. is 0, as for dims that were padded with zeros."""
    return all(float(np.max(np.abs(v[start:]))) <= PADDING_TOLERANCE
               for v in (stats.mean, stats.std, stats.q01, stats.q99) if v is not None)


def identity_stats(state_dim: int, action_dim: int) -> dict[str, NormStats]:
    """Stats that (nearly, up to eps) leave values unchanged: for random-weight demos only."""
    return {key: _identity(dim) for key, dim in ((STATE_KEY, state_dim), (ACTIONS_KEY, action_dim))}


def _identity(dim: int) -> NormStats:
    return NormStats(mean=np.zeros(dim), std=np.ones(dim), q01=-np.ones(dim), q99=np.ones(dim))

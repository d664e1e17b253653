"""Checkpoint directories: openpi PyTorch and LeRobot pi0 / pi05 layouts → one `LoadedCheckpoint`.

openpi (spec §6): `model.safetensors` with `PI0Pytorch.state_dict()` names, plus
`assets/<asset_id>/norm_stats.json`, and usually the converter's own `config.json` (no LeRobot
"type"; only its `action_horizon` is read: the generic profile's horizon, or a warning when a
robot profile samples another). The model type is not written down, so it and the geometry are
read off the tensors (pi0.5 has `time_mlp_in`, pi0 has `state_proj`).

LeRobot: `config.json` (`"type": "pi0" | "pi05"`, `chunk_size`, `tokenizer_max_length`, …),
`model.safetensors` with openpi's names under a `model.` prefix (pi05 names the time MLP
`time_mlp_*`, as openpi does), and the stats in processor files (`normalize.load_lerobot_normalization`).
That is LeRobot >= 0.4, whose pi0 / pi05 are ports of openpi's; checkpoints of LeRobot's own earlier
pi0 are refused, naming what marks them (`_refuse_lerobot_before_0_4`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Mapping

import torch

from pi0_policy_ros.errors import CheckpointError, ConfigError
from pi0_policy_ros.model.checkpoint import (EMBED_KEY, UNUSED_KEYS, check_dtypes, check_tensors, read_safetensors,
                                             with_tied_embedding)
from pi0_policy_ros.model.config import MAX_DENOISE_STEPS, PRESETS, ModelConfig, get_preset
from pi0_policy_ros.policy.normalize import (NormStats, Normalizer, find_openpi_norm_stats,
                                             load_lerobot_normalization, load_openpi_norm_stats)

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
SHARD_INDEX_FILE = "model.safetensors.index.json"
LEROBOT_CONFIG = "config.json"
LEROBOT_PREFIX = "model."
# Metadata a weights file may carry to say its embedding table is truncated on purpose (the
# reference fixtures store 1024 of 257152 rows; token ids must then stay below that).
VOCAB_ROWS_METADATA = "vocab_rows_stored"
AUTO_PRESET = "auto"
# LeRobot's pi05 MEM (config.json keys since LeRobot PR #4076): the model takes a history of
# frames or states, which this package does not keep.
LEROBOT_MEMORY_KEYS = ("use_visual_memory", "use_proprioceptive_memory")
# LeRobot < 0.4 (its own pi0, before 0.4.0 ported openpi's) saved the norm stats inside
# model.safetensors, as buffers of the policy's Normalize modules, and PaliGemma in the module
# layout of transformers < 4.52 (which LeRobot 0.3 pinned); its PI0Config had `num_steps` and
# `proj_width` where 0.4's has `num_inference_steps` and named Gemma variants.
LEROBOT_PRE_0_4_STATS_PREFIXES = ("normalize_inputs.", "normalize_targets.", "unnormalize_outputs.")
LEROBOT_PRE_0_4_PALIGEMMA = "model.paligemma_with_expert.paligemma.language_model.model."
LEROBOT_PRE_0_4_CONFIG_KEYS = ("num_steps", "proj_width", "resize_imgs_with_padding")
# The sinusoidal time embedding's periods (`model.pi0.sinusoidal_time_embedding`), as LeRobot's
# config.json names them.
TIME_EMBEDDING_PERIODS = {"min_period": 4e-3, "max_period": 4.0}


@dataclass(frozen=True)
class LoadedCheckpoint:
    """Everything read from a checkpoint directory, before any model is built."""

    path: Path
    format: str  # "openpi" | "lerobot"
    model_config: ModelConfig
    tensors: Mapping[str, torch.Tensor]  # openpi names
    allow_truncated_vocab: bool
    normalizer: Normalizer
    stats: Mapping[str, NormStats]
    asset_id: str
    weights_dtype: str
    lerobot_config: Mapping[str, Any] | None = None

    @property
    def parameter_count(self) -> int:
        """Parameters the policy runs: every tensor but the LM heads, with the token table where the
        file stores it only under the tied PaliGemma head's name (see `with_tied_embedding`)."""
        return sum(t.numel() for name, t in with_tied_embedding(self.tensors).items() if name not in UNUSED_KEYS)

    @property
    def unused_parameter_count(self) -> int:
        """Parameters in the file that are never used for actions: the LM heads (accepted and skipped)."""
        return sum(t.numel() for t in self.tensors.values()) - self.parameter_count


def _json_object(config_file: Path) -> dict[str, Any] | None:
    """`config_file` as a JSON object; None if absent, unreadable or not an object."""
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def _listed(entry: Path) -> str:
    """An entry of a directory of unknown layout, folders marked with "/" (a model.safetensors
    folder), and a broken link named as such (an assets/ link whose target was not copied along)."""
    if entry.is_symlink() and not entry.exists():
        return f"{entry.name} (a link to {os.readlink(entry)}, which does not exist)"
    return f"{entry.name}/" if entry.is_dir() else entry.name


def detect_format(path: Path) -> str:
    """'openpi' or 'lerobot'; anything else is one CheckpointError listing both layouts.

    openpi's converter (`examples/convert_jax_model_to_pytorch.py`) also writes a `config.json`
    (action_dim, action_horizon, variants, precision) but without LeRobot's "type": with `assets/`
    beside it, or with the converter's keys, the directory is openpi's."""
    if (path / WEIGHTS_FILE).is_file():
        config = _json_object(path / LEROBOT_CONFIG)
        lerobot_type = config is not None and "type" in config
        if (path / "assets").is_dir() and not lerobot_type:
            return "openpi"
        # The converter's output often has no assets/ (see _check_assets), but always these keys.
        if config is not None and not lerobot_type and {"action_horizon", "paligemma_variant"} <= set(config):
            return "openpi"
        if (path / LEROBOT_CONFIG).is_file():
            return "lerobot"
    _refuse_sharded(path)
    found = sorted(_listed(p) for p in path.iterdir()) if path.is_dir() else "not a directory"
    raise CheckpointError(
        f"unknown checkpoint layout at {path}: expected either an openpi PyTorch directory "
        f"({WEIGHTS_FILE} + assets/<asset_id>/norm_stats.json) or a LeRobot pi0/pi05 directory "
        f"({LEROBOT_CONFIG} + {WEIGHTS_FILE} + policy_preprocessor.json); found {found}")


def _refuse_sharded(path: Path) -> None:
    """Weights split into shards by an index (transformers' `save_pretrained` above its
    `max_shard_size`; openpi and LeRobot save one file) are one error naming them."""
    index = _json_object(path / SHARD_INDEX_FILE)
    weight_map = index.get("weight_map") if index is not None else None
    if not isinstance(weight_map, dict):
        return
    shards = sorted({str(shard) for shard in weight_map.values()})
    raise CheckpointError(f"{path}: expected one {WEIGHTS_FILE}, found weights sharded into {len(shards)} files by "
                          f"{SHARD_INDEX_FILE} ({', '.join(shards)}); merge them into one {WEIGHTS_FILE} "
                          "(safetensors.torch.load_file each shard, then save_file the union)")


def _is_pi05(tensors: Mapping[str, torch.Tensor], where: Path) -> bool:
    if "time_mlp_in.weight" in tensors:
        return True
    if "state_proj.weight" in tensors:
        return False
    raise CheckpointError(f"{where}: neither time_mlp_in.weight (pi0.5) nor state_proj.weight (pi0) found; "
                          "not a pi0 / pi0.5 checkpoint")


def resolve_geometry(tensors: Mapping[str, torch.Tensor], preset: str, allow_truncated_vocab: bool,
                     where: Path) -> ModelConfig:
    """The preset named by `preset`, checked strictly against the tensors; `auto` picks the preset
    of the right model type whose shapes all match."""
    # Before any preset is tried: a dtype error is the same for all of them.
    check_dtypes(tensors, str(where))
    if preset != AUTO_PRESET:
        try:
            cfg = get_preset(preset)
        except KeyError as exc:
            raise ConfigError(str(exc.args[0])) from None
        try:
            check_tensors(cfg, tensors, allow_truncated_vocab, source=f"{where} (model_preset {preset!r})")
        except CheckpointError as exc:
            # A whole other geometry lists hundreds of tensors: name the preset that fits instead.
            fits = _fitting_preset(tensors, allow_truncated_vocab)
            if fits is None:
                raise
            summary = str(exc).splitlines()[0].rstrip(":")
            raise CheckpointError(f"{summary}; the tensors are those of preset {fits!r}: expected model_preset "
                                  f"{fits!r} (or {AUTO_PRESET!r}), found {preset!r}") from None
        return cfg
    pi05 = _is_pi05(tensors, where)
    candidates = [cfg for cfg in PRESETS.values() if cfg.pi05 == pi05]
    failures: list[tuple[int, str, str]] = []  # (problems listed, preset, the listed lines)
    for cfg in candidates:
        try:
            check_tensors(cfg, tensors, allow_truncated_vocab, source=str(where))
            return cfg
        except CheckpointError as exc:
            summary, _, listed = str(exc).partition("\n")
            failures.append((listed.count("\n") + 1, cfg.name, listed))
    # A damaged file (a tensor missing or cut) is one preset with a few problems: name its tensors.
    _, closest, listed = min(failures)
    counts = "; ".join(f"{name}: {count} problem(s)" for count, name, _ in failures)
    raise CheckpointError(f"{where}: no {'pi05' if pi05 else 'pi0'} preset matches these tensor shapes ({counts}); "
                          f"those of the closest, {closest!r}:\n{listed}")


def _fitting_preset(tensors: Mapping[str, torch.Tensor], allow_truncated_vocab: bool) -> str | None:
    """The name of the first preset whose shapes all match the tensors, or None."""
    for cfg in PRESETS.values():
        try:
            check_tensors(cfg, tensors, allow_truncated_vocab)
        except CheckpointError:
            continue
        return cfg.name
    return None


def _truncated_vocab_allowed(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], where: Path) -> bool:
    rows = metadata.get(VOCAB_ROWS_METADATA)
    if rows is None:
        return False
    if not rows.isdecimal():
        raise CheckpointError(f"{where}: expected metadata {VOCAB_ROWS_METADATA!r} to be a row count, found {rows!r}")
    table = with_tied_embedding(tensors).get(EMBED_KEY)  # also a table saved as the tied lm_head only
    return table is not None and table.shape[0] == int(rows)


def _dtype_name(tensors: Mapping[str, torch.Tensor]) -> str:
    return ",".join(sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()}))


def _trained_action_horizon(path: Path) -> int | None:
    """The training config's `action_horizon` that openpi's converter records in `config.json`;
    None when there is no such file or value (a positive integer)."""
    config = _json_object(path / LEROBOT_CONFIG)
    trained = config.get("action_horizon") if config is not None else None
    if isinstance(trained, int) and not isinstance(trained, bool) and trained > 0:
        return trained
    return None


def _warn_on_trained_horizon(path: Path, horizon: int) -> None:
    """Sampling another horizon than the trained one runs (no weight depends on it) but the expert
    then denoises a sequence length it was not trained on, so say so once."""
    trained = _trained_action_horizon(path)
    if trained is not None and trained != horizon:
        log.warning("%s: the checkpoint was trained with action_horizon %d (its config.json), the robot profile "
                    "samples %d actions; set profile_action_horizon to %d unless that is intended",
                    path, trained, horizon, trained)


def _checkpoint_horizon(path: Path, default: int) -> int:
    """The horizon the checkpoint records, else `default`, saying which."""
    trained = _trained_action_horizon(path)
    if trained is None:
        log.info("%s: config.json records no action_horizon (openpi's converter writes it); sampling %d actions, "
                 "the robot profile's default: set profile_action_horizon to the training horizon", path, default)
        return default
    log.info("%s: action_horizon %d, the training horizon its config.json records", path, trained)
    return trained


def _check_assets(path: Path) -> None:
    """An openpi directory needs the training data's norm stats under assets/. openpi's converter
    copies `<checkpoint_dir>/../assets`, not the JAX checkpoint's own `<checkpoint_dir>/assets`,
    so its output often has none: say where they are, not "set asset_id" (and before the weights
    are read, which takes minutes at full size)."""
    assets = path / "assets"
    if not assets.is_dir():
        raise CheckpointError(
            f"{path}: expected the norm stats of the training data in {assets}/<asset_id>/norm_stats.json, found no "
            f"assets folder; copy the assets/ folder of the openpi checkpoint these weights come from (openpi's "
            "convert_jax_model_to_pytorch.py copies only <checkpoint_dir>/../assets)")


def load_openpi_dir(path: Path, preset: str, asset_id: str, horizon: int | None,
                    horizon_from_checkpoint: bool = False) -> LoadedCheckpoint:
    _check_assets(path)
    tensors, metadata = read_safetensors(path / WEIGHTS_FILE)
    truncated = _truncated_vocab_allowed(tensors, metadata, path / WEIGHTS_FILE)
    cfg = resolve_geometry(tensors, preset, truncated, path / WEIGHTS_FILE)
    # Not in the weights (no weight depends on it): the robot profile decides, or for a profile
    # without one (generic) the converter's config.json, with `horizon` as the default.
    if horizon_from_checkpoint:
        horizon = _checkpoint_horizon(path, cfg.action_horizon if horizon is None else horizon)
    elif horizon is not None:
        _warn_on_trained_horizon(path, horizon)
    if horizon is not None:
        cfg = cfg.replace(action_horizon=horizon)
    stats_file = find_openpi_norm_stats(path, asset_id)
    stats = load_openpi_norm_stats(stats_file)
    # openpi: quantile normalization for every model type except pi0 (spec §3).
    normalizer = Normalizer(stats, use_quantiles=cfg.pi05)
    # The id as given, or the one found (it may have several parts: "physical-intelligence/libero").
    asset = asset_id or stats_file.parent.relative_to(path / "assets").as_posix()
    return LoadedCheckpoint(path, "openpi", cfg, tensors, truncated, normalizer, stats, asset, _dtype_name(tensors))


def _from_lerobot_names(tensors: Mapping[str, torch.Tensor], pi05: bool) -> dict[str, torch.Tensor]:
    """Strip LeRobot's `model.` prefix (added only where missing, as LeRobot's loader does) and
    give pi05's time MLP openpi's name."""
    out = {}
    for key, tensor in tensors.items():
        name = key[len(LEROBOT_PREFIX):] if key.startswith(LEROBOT_PREFIX) else key
        if pi05 and name.startswith("action_time_mlp_"):
            name = name.replace("action_time_mlp_", "time_mlp_", 1)
        out[name] = tensor
    return out


def _lerobot_count(config: Mapping[str, Any], key: str, default: int, path: Path, upper: int | None = None) -> int:
    """A positive integer of LeRobot's config.json (`default` where the key is absent), at most `upper`."""
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (upper is not None and value > upper):
        bound = "a positive integer" if upper is None else f"an integer from 1 to {upper}"
        raise CheckpointError(f"{path / LEROBOT_CONFIG}: expected {key!r} {bound}, found {value!r}")
    return value


def _refuse_observation_memory(config: Mapping[str, Any], path: Path) -> None:
    """LeRobot's pi05 MEM feeds the model past frames (fused inside SigLIP, no weight of their own)
    and past states (one token each, and no state in the prompt). Run on the current observation
    only, the visual variant would load and give plausible but wrong actions: refuse both."""
    used = [key for key in LEROBOT_MEMORY_KEYS if config.get(key)]
    if used:
        raise CheckpointError(
            f"{path / LEROBOT_CONFIG}: expected " + " and ".join(f'"{key}": false' for key in used)
            + f" (one observation per inference), found true (memory_frames {config.get('memory_frames')!r}, "
            f"memory_stride {config.get('memory_stride')!r}); LeRobot's observation memory (MEM) is not supported")


def _refuse_lerobot_before_0_4(config: Mapping[str, Any], names: Collection[str], path: Path) -> None:
    """A checkpoint of LeRobot < 0.4 has none of the tensor names of openpi's model (it failed as "no
    pi0 preset matches these tensor shapes") and its stats in the weights: say which LeRobot it is
    from and what is needed, naming what gave it away."""
    stats = sorted(name for name in names if name.startswith(LEROBOT_PRE_0_4_STATS_PREFIXES))
    old_layout = [name for name in names if name.startswith(LEROBOT_PRE_0_4_PALIGEMMA)]
    if not stats and not old_layout:
        return
    found = []
    if stats:
        more = f" and {len(stats) - 1} more" if len(stats) > 1 else ""
        found.append(f"norm stats inside {WEIGHTS_FILE} ({stats[0]}{more})")
    if old_layout:
        found.append(f"{len(old_layout)} tensors named {LEROBOT_PRE_0_4_PALIGEMMA}* (transformers < 4.52's PaliGemma; "
                     "openpi's is model.paligemma_with_expert.paligemma.model.language_model.*)")
    old_keys = [key for key in LEROBOT_PRE_0_4_CONFIG_KEYS if key in config]
    if old_keys:
        found.append(f"{LEROBOT_CONFIG} keys {old_keys} of LeRobot's earlier PI0Config")
    raise CheckpointError(
        f"{path}: expected a checkpoint saved by LeRobot >= 0.4 (openpi's tensor names under 'model.', norm stats "
        f"in policy_preprocessor.json / policy_postprocessor.json), found the format of LeRobot < 0.4: "
        f"{'; '.join(found)}. LeRobot's pi0 before 0.4 is not supported: use a checkpoint trained with LeRobot >= 0.4 "
        "(e.g. fine-tuned from lerobot/pi0_base) or an openpi one")


def _check_time_embedding_periods(config: Mapping[str, Any], path: Path) -> None:
    """LeRobot's config.json carries the flow-matching time embedding's `min_period` / `max_period`;
    the model here has openpi's, fixed. Others would embed every denoise step's time differently:
    plausible, wrong actions. Refuse them."""
    for key, value in TIME_EMBEDDING_PERIODS.items():
        found = config.get(key, value)
        if not (isinstance(found, (int, float)) and not isinstance(found, bool) and math.isclose(found, value)):
            raise CheckpointError(f"{path / LEROBOT_CONFIG}: expected \"{key}\": {value} (openpi's time embedding, "
                                  f"the only one supported), found {found!r}")


def load_lerobot_dir(path: Path, preset: str) -> LoadedCheckpoint:
    try:
        config = json.loads((path / LEROBOT_CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path / LEROBOT_CONFIG}: {exc}") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{path / LEROBOT_CONFIG}: expected a JSON object, found {type(config).__name__}")
    policy_type = config.get("type")
    if policy_type not in ("pi0", "pi05"):
        # pi0-FAST decodes its actions as tokens, autoregressively: another model than the flow-matching
        # pi0 / pi0.5 this package runs, whatever its weights share with them.
        fast = (" (pi0-FAST predicts action tokens autoregressively; only the flow-matching pi0 and pi0.5 run "
                "here)" if "fast" in str(policy_type).lower() else "")
        raise CheckpointError(f"{path / LEROBOT_CONFIG}: expected \"type\" pi0 or pi05, found {policy_type!r}{fast}")
    if config.get("use_relative_actions"):
        # LeRobot >= 0.5.1: the model predicts actions minus the state on the dims not named in
        # relative_exclude_joints, and LeRobot's postprocessor adds the state back. Read as
        # absolute they would be wrong, so refuse rather than drive the robot with offsets.
        raise CheckpointError(
            f"{path / LEROBOT_CONFIG}: expected \"use_relative_actions\": false (absolute actions), found true "
            f"(relative_exclude_joints {config.get('relative_exclude_joints')!r}); relative actions are not supported")
    _refuse_observation_memory(config, path)
    _check_time_embedding_periods(config, path)
    raw, metadata = read_safetensors(path / WEIGHTS_FILE)
    _refuse_lerobot_before_0_4(config, raw.keys(), path)
    tensors = _from_lerobot_names(raw, pi05=policy_type == "pi05")
    truncated = _truncated_vocab_allowed(tensors, metadata, path / WEIGHTS_FILE)
    cfg = resolve_geometry(tensors, preset, truncated, path / WEIGHTS_FILE)
    if cfg.pi05 != (policy_type == "pi05"):
        raise CheckpointError(f"{path}: config.json says {policy_type}, the weights are {'pi05' if cfg.pi05 else 'pi0'}")
    # LeRobot's pi05 preprocessor (Pi05PrepareStateTokenizerProcessorStep) always writes the
    # normalized state into the prompt; it has no switch like openpi's pi05_libero.
    cfg = cfg.replace(action_horizon=_lerobot_count(config, "chunk_size", cfg.action_horizon, path),
                      max_token_len=_lerobot_count(config, "tokenizer_max_length", cfg.max_token_len, path),
                      num_denoise_steps=_lerobot_count(config, "num_inference_steps", cfg.num_denoise_steps, path,
                                                       MAX_DENOISE_STEPS),
                      discrete_state_input=cfg.pi05)
    normalization = load_lerobot_normalization(path)
    return LoadedCheckpoint(path, "lerobot", cfg, tensors, truncated, normalization.normalizer(),
                            normalization.stats, "", _dtype_name(tensors), lerobot_config=config)


def load_checkpoint_dir(path: str | Path, preset: str = AUTO_PRESET, asset_id: str = "",
                        horizon: int | None = None, horizon_from_checkpoint: bool = False) -> LoadedCheckpoint:
    """Detect the layout of `path` and read it. `asset_id` applies to openpi checkpoints only (a
    LeRobot one with a non-empty asset_id is a ConfigError). `horizon` sets the action horizon of openpi
    checkpoints, whose weights do not record it (the robot profile knows it); with
    `horizon_from_checkpoint` (the generic profile) the converter's config.json `action_horizon`
    does, `horizon` being the default where it is absent. LeRobot's `chunk_size` decides for LeRobot."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    if path.is_file() and path.suffix == ".safetensors":
        raise CheckpointError(f"expected the checkpoint directory, found its weights file {path}: use {path.parent}")
    kind = detect_format(path)
    if kind == "lerobot" and asset_id:
        # LeRobot keeps its stats in processor files: the id was dropped, and the user believed the
        # stats it named were in use.
        raise ConfigError(f"asset_id names an openpi checkpoint's assets/<asset_id>/norm_stats.json, and {path} is "
                          "a LeRobot checkpoint (its stats are named by policy_preprocessor.json / "
                          f"policy_postprocessor.json): expected asset_id '' (empty), found {asset_id!r}")
    loaded = (load_lerobot_dir(path, preset) if kind == "lerobot"
              else load_openpi_dir(path, preset, asset_id, horizon, horizon_from_checkpoint))
    try:  # a token length or horizon from config.json (100000000 stalled configure, then the OOM killer)
        loaded.model_config.check_positions()
    except ConfigError as exc:
        source = ("LeRobot's tokenizer_max_length and chunk_size" if kind == "lerobot"
                  else "the action horizon and the preset's token length")
        raise CheckpointError(f"{path}: {exc} ({source})") from None
    log.info("loaded %s checkpoint %s: %s, %d tensors", kind, path, loaded.model_config.name, len(loaded.tensors))
    return loaded

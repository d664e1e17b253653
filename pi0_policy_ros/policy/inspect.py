"""`pi0-policy inspect PATH`: what a checkpoint directory holds, without building the model."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pi0_policy_ros.errors import Pi0PolicyError
from pi0_policy_ros.jsonout import json_text
from pi0_policy_ros.policy.checkpoint_dir import AUTO_PRESET, LoadedCheckpoint, load_checkpoint_dir


def describe(ckpt: LoadedCheckpoint) -> dict[str, Any]:
    cfg = ckpt.model_config
    description: dict[str, Any] = {
        "path": str(ckpt.path),
        "format": ckpt.format,
        "model_type": "pi05" if cfg.pi05 else "pi0",
        "geometry": cfg.name,
        "vision": {"width": cfg.siglip.width, "depth": cfg.siglip.depth},
        "paligemma": {"width": cfg.paligemma.width, "depth": cfg.paligemma.depth, "mlp_dim": cfg.paligemma.mlp_dim},
        "action_expert": {"width": cfg.expert.width, "depth": cfg.expert.depth, "mlp_dim": cfg.expert.mlp_dim},
        "action_horizon": cfg.action_horizon,
        "max_token_len": cfg.max_token_len,
        "dtype": ckpt.weights_dtype,
        "parameter_count": ckpt.parameter_count,
        "unused_parameter_count": ckpt.unused_parameter_count,  # the LM heads: never used for actions
        "truncated_vocabulary": ckpt.allow_truncated_vocab,
        "asset_id": ckpt.asset_id or None,
        "norm_stats": {key: {"dims": stats.dim, "quantiles": stats.has_quantiles} for key, stats in ckpt.stats.items()},
        "normalization": "quantile" if ckpt.normalizer.use_quantiles else "z-score",
    }
    if ckpt.lerobot_config is not None:
        features = ckpt.lerobot_config.get("input_features")
        features = features if isinstance(features, dict) else {}
        # In the order LeRobot's model takes them (its image slots follow `input_features`), not
        # sorted: with the generic profile they are base, left_wrist and right_wrist, in this order.
        description["cameras"] = [k.removeprefix("observation.images.") for k in features
                                  if k.startswith("observation.images.")]
    return description


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="an openpi PyTorch or LeRobot pi0/pi05 checkpoint directory")
    parser.add_argument("--model-preset", default=AUTO_PRESET, help="check against this preset (default: detect)")
    parser.add_argument("--asset-id", default="", help="openpi assets/<asset_id> to read (default: the only one; "
                        "LeRobot checkpoints have none)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def run(args: argparse.Namespace) -> int:
    try:
        # The horizon the checkpoint records (openpi's converter config.json), as the generic
        # profile samples it; the preset's default only where none is recorded.
        info = describe(load_checkpoint_dir(args.path, args.model_preset, args.asset_id, horizon_from_checkpoint=True))
    except Pi0PolicyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json_text(info))
        return 0
    for key, value in info.items():
        print(f"{key:>20}: {value}")
    return 0

"""`Policy` end to end on the CPU: checkpoint directories (openpi and LeRobot layouts, written
here from the fixture weights), `inspect`, and the whole transform chain."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import sentencepiece
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file, save_file

from pi0_policy_ros.errors import CheckpointError, ConfigError, ObservationError, Pi0PolicyError
from pi0_policy_ros.model.checkpoint import EMBED_KEY, UNUSED_KEYS
from pi0_policy_ros.model.config import IMAGE_SLOTS, PRESETS
from pi0_policy_ros.model.reference import load_reference
from pi0_policy_ros.model.rtc import soft_mask
from pi0_policy_ros.policy.checkpoint_dir import VOCAB_ROWS_METADATA, load_checkpoint_dir
from pi0_policy_ros.policy.config import PolicyConfig
from pi0_policy_ros.policy.inspect import describe
from pi0_policy_ros.engine.types import EngineBatch
from pi0_policy_ros.policy.policy import Policy
from pi0_policy_ros.policy.robots import get_profile, openpi_training_transforms, resize_with_pad
from pi0_policy_ros.policy.tokenizer import train_tiny_tokenizer
from pi0_policy_ros.policy.types import ChunkGuidance, Observation
from test.paths import PI0_FIXTURE, PI05_FIXTURE

STATE_DIM, ACTION_DIM = 8, 7  # LIBERO


def _stats(dim: int, seed: int) -> dict[str, list[float]]:
    rng = np.random.default_rng(seed)
    q01 = rng.uniform(-2, -1, dim)
    return {"mean": rng.normal(size=dim).tolist(), "std": rng.uniform(0.5, 2, dim).tolist(),
            "q01": q01.tolist(), "q99": (q01 + rng.uniform(1, 3, dim)).tolist()}


def write_openpi_dir(root: Path, fixture: Path, asset_id: str = "libero") -> Path:
    ref = load_reference(fixture)
    root.mkdir(parents=True)
    save_file(ref.weights, str(root / "model.safetensors"), metadata={VOCAB_ROWS_METADATA: "1024"})
    (root / "assets" / asset_id).mkdir(parents=True)
    stats = {"norm_stats": {"state": _stats(STATE_DIM, 1), "actions": _stats(ACTION_DIM, 2)}}
    (root / "assets" / asset_id / "norm_stats.json").write_text(json.dumps(stats))
    train_tiny_tokenizer(root / "paligemma_tokenizer.model")
    return root


def write_lerobot_dir(root: Path, fixture: Path, policy_type: str) -> Path:
    ref = load_reference(fixture)
    root.mkdir(parents=True)
    weights = {f"model.{k}": v for k, v in ref.weights.items()}
    save_file(weights, str(root / "model.safetensors"), metadata={VOCAB_ROWS_METADATA: "1024"})
    config = {"type": policy_type, "chunk_size": ref.config.action_horizon, "n_action_steps": ref.config.action_horizon,
              "max_state_dim": 32, "max_action_dim": 32, "num_inference_steps": 10,
              "tokenizer_max_length": ref.config.max_token_len,
              "input_features": {"observation.images.image": {"type": "VISUAL", "shape": [3, 224, 224]},
                                 "observation.images.wrist_image": {"type": "VISUAL", "shape": [3, 224, 224]},
                                 "observation.state": {"type": "STATE", "shape": [STATE_DIM]}}}
    (root / "config.json").write_text(json.dumps(config))
    mode = "QUANTILES" if policy_type == "pi05" else "MEAN_STD"
    for pipeline, step_name, index in (("policy_preprocessor", "normalizer_processor", 3),
                                       ("policy_postprocessor", "unnormalizer_processor", 0)):
        state_file = f"{pipeline}_step_{index}_{step_name}.safetensors"
        tensors = {}
        for feature, dim, seed in (("observation.state", STATE_DIM, 1), ("action", ACTION_DIM, 2)):
            tensors.update({f"{feature}.{k}": np.asarray(v, np.float32) for k, v in _stats(dim, seed).items()})
        save_numpy(tensors, str(root / state_file))
        steps = [{"registry_name": "to_batch_processor", "config": {}}] * index + [
            {"registry_name": step_name, "state_file": state_file,
             "config": {"eps": 1e-8, "norm_map": {"VISUAL": "IDENTITY", "STATE": mode, "ACTION": mode}}}]
        (root / f"{pipeline}.json").write_text(json.dumps({"name": pipeline, "steps": steps}))
    train_tiny_tokenizer(root / "tokenizer.model")
    return root


def write_lerobot_dir_before_0_4(root: Path, fixture: Path) -> Path:
    """A pi0 directory as LeRobot 0.3 saved it (lerobot/policies/pi0 at v0.3.3): PaliGemma in the
    module layout of transformers < 4.52, the Normalize modules' stats among the weights, its
    PI0Config's fields, and no processor files."""
    old_layout = (("paligemma.model.language_model.", "paligemma.language_model.model."),
                  ("paligemma.model.vision_tower.", "paligemma.vision_tower."),
                  ("paligemma.model.multi_modal_projector.", "paligemma.multi_modal_projector."))
    weights = {}
    for name, tensor in load_reference(fixture).weights.items():
        for new, old in old_layout:
            name = name.replace(new, old)
        weights[f"model.{name}"] = tensor
    for module, feature, dim in (("normalize_inputs", "observation_state", STATE_DIM),
                                 ("normalize_targets", "action", ACTION_DIM), ("unnormalize_outputs", "action", ACTION_DIM)):
        weights.update({f"{module}.buffer_{feature}.{stat}": torch.full((dim,), value)
                        for stat, value in (("mean", 0.0), ("std", 1.0))})
    root.mkdir(parents=True)
    save_file(weights, str(root / "model.safetensors"), metadata={VOCAB_ROWS_METADATA: "1024"})
    config = {"type": "pi0", "n_obs_steps": 1, "chunk_size": 10, "n_action_steps": 10, "max_state_dim": 32,
              "max_action_dim": 32, "resize_imgs_with_padding": [224, 224], "tokenizer_max_length": 48,
              "proj_width": 1024, "num_steps": 10, "use_cache": True, "attention_implementation": "eager",
              "normalization_mapping": {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"}}
    (root / "config.json").write_text(json.dumps(config))
    return root


def fixture_batch(fixture: Path) -> tuple[EngineBatch, torch.Tensor]:
    ref = load_reference(fixture)
    batch = EngineBatch(
        images=np.stack([load_u8(fixture, slot) for slot in IMAGE_SLOTS]),
        image_masks=np.array([bool(m[0]) for m in ref.inputs.image_masks]),
        tokens=ref.inputs.tokens[0].numpy(), token_mask=ref.inputs.token_mask[0].numpy(),
        state=ref.inputs.state[0].numpy(), noise=ref.noise[0].numpy())
    return batch, ref.expected["outputs/actions"][0]


def load_u8(fixture: Path, slot: str) -> np.ndarray:
    from safetensors import safe_open

    with safe_open(str(fixture), framework="np") as f:
        return f.get_tensor(f"inputs/image_u8.{slot}")[0]


CASES = [("openpi", PI05_FIXTURE, "pi05"), ("openpi", PI0_FIXTURE, "pi0"),
         ("lerobot", PI05_FIXTURE, "pi05"), ("lerobot", PI0_FIXTURE, "pi0")]


def _write(kind: str, root: Path, fixture: Path, policy_type: str) -> Path:
    return write_openpi_dir(root, fixture) if kind == "openpi" else write_lerobot_dir(root, fixture, policy_type)


@pytest.mark.parametrize("kind,fixture,policy_type", CASES, ids=[f"{k}-{t}" for k, _, t in CASES])
def test_checkpoint_directory_reproduces_fixture_actions(tmp_path: Path, kind: str, fixture: Path,
                                                         policy_type: str) -> None:
    path = _write(kind, tmp_path / "ckpt", fixture, policy_type)
    profile = "pi05_libero" if policy_type == "pi05" else "pi0_libero"
    policy = Policy.from_config(PolicyConfig(checkpoint_path=str(path), model_preset="auto", robot_profile=profile))
    batch, expected = fixture_batch(fixture)
    torch.testing.assert_close(torch.from_numpy(policy.engine.infer(batch)), expected, atol=1e-4, rtol=0)


def test_an_openpi_checkpoint_with_a_symlinked_asset_folder_loads(tmp_path: Path) -> None:
    # assets/<id> linked to the stats kept elsewhere: with asset_id "" the search found none.
    path = write_openpi_dir(tmp_path / "ckpt", PI05_FIXTURE)
    shutil.move(path / "assets" / "libero", tmp_path / "libero_stats")
    (path / "assets" / "libero").symlink_to(tmp_path / "libero_stats", target_is_directory=True)
    loaded = load_checkpoint_dir(path)
    assert loaded.asset_id == "libero" and loaded.stats["state"].dim == STATE_DIM
    policy = Policy.from_config(PolicyConfig(checkpoint_path=str(path), model_preset="auto",
                                             robot_profile="pi05_libero"))
    assert policy.normalizer.stats["actions"].dim == ACTION_DIM


@pytest.mark.parametrize("kind,fixture,policy_type", CASES, ids=[f"{k}-{t}" for k, _, t in CASES])
def test_inspect_reports_the_directory(tmp_path: Path, kind: str, fixture: Path, policy_type: str) -> None:
    path = _write(kind, tmp_path / "ckpt", fixture, policy_type)
    info = describe(load_checkpoint_dir(path))
    ref = load_reference(fixture)
    assert info["format"] == kind
    assert info["model_type"] == policy_type
    assert info["geometry"] == f"{policy_type}_small"
    assert info["paligemma"] == {"width": 64, "depth": 4, "mlp_dim": 128}
    assert info["dtype"] == "float32"
    assert info["parameter_count"] == sum(t.numel() for t in ref.weights.values())
    assert info["norm_stats"]["state"]["dims"] == STATE_DIM and info["norm_stats"]["actions"]["dims"] == ACTION_DIM
    assert info["normalization"] == ("quantile" if policy_type == "pi05" else "z-score")
    if kind == "openpi":
        assert info["asset_id"] == "libero"
    else:
        assert info["cameras"] == ["image", "wrist_image"]


@pytest.mark.parametrize("tied_only", [False, True], ids=["table-and-heads", "table-as-lm-head-only"])
def test_inspect_counts_the_parameters_the_policy_uses(tmp_path: Path, tied_only: bool,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    # openpi's state_dict holds both LM heads, which are never used for actions (accepted and
    # skipped); parameter_count added them: full-size pi0.5 read ~3.6 B for the ~3.35 B it runs.
    # Saved by safetensors' save_model the file holds the token table under the tied PaliGemma
    # head's name only: that one is used, as the token table.
    from pi0_policy_ros.cli import main

    path = write_openpi_dir(tmp_path / "ckpt", PI05_FIXTURE)
    weights = load_file(path / "model.safetensors")
    table = weights[EMBED_KEY]
    expert_head = torch.randn(table.shape[0], load_reference(PI05_FIXTURE).config.expert.width)
    weights.update({UNUSED_KEYS[0]: table.clone(), UNUSED_KEYS[1]: expert_head})
    if tied_only:
        del weights[EMBED_KEY]
    save_file(weights, str(path / "model.safetensors"), metadata={VOCAB_ROWS_METADATA: "1024"})
    used = sum(t.numel() for t in load_reference(PI05_FIXTURE).weights.values())  # every one loaded, no head
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameter_count"] == used
    assert info["unused_parameter_count"] == expert_head.numel() + (0 if tied_only else table.numel())


def test_inspect_lists_lerobot_cameras_in_the_models_slot_order(tmp_path: Path) -> None:
    # LeRobot fills the image slots in config.json's input_features order; inspect sorted the names,
    # so a user mapping them onto the generic profile's base / left_wrist / right_wrist in the order
    # shown would swap the cameras of a checkpoint whose features are not in alphabetical order.
    path = write_lerobot_dir(tmp_path / "ckpt", PI05_FIXTURE, "pi05")
    config = json.loads((path / "config.json").read_text())
    features = config["input_features"]
    order = ["observation.images.wrist_image", "observation.state", "observation.images.image"]
    assert set(order) <= set(features)
    config["input_features"] = {key: features[key] for key in order + [k for k in features if k not in order]}
    (path / "config.json").write_text(json.dumps(config))
    assert describe(load_checkpoint_dir(path))["cameras"] == ["wrist_image", "image"]


def test_inspect_command_prints_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pi0_policy_ros.cli import main

    path = write_openpi_dir(tmp_path / "ckpt", PI05_FIXTURE)
    assert main(["inspect", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["geometry"] == "pi05_small"


def test_inspect_reports_the_action_horizon_the_converter_recorded(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    # It printed the preset's default (10 for pi0.5) for a pi05_droid conversion that records 15,
    # which the generic profile then samples.
    from pi0_policy_ros.cli import main

    path = write_openpi_dir(tmp_path / "ckpt", PI05_FIXTURE)
    _converter_config(path, 15)
    assert main(["inspect", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["action_horizon"] == 15
    (path / "config.json").unlink()  # train_pytorch.py writes none: the preset's default
    assert main(["inspect", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["action_horizon"] == PRESETS["pi05_small"].action_horizon


def test_openpi_directory_with_the_converters_config_json_is_openpi(tmp_path: Path) -> None:
    # openpi's examples/convert_jax_model_to_pytorch.py writes a config.json of its own (no LeRobot "type").
    path = write_openpi_dir(tmp_path / "ckpt", PI05_FIXTURE)
    (path / "config.json").write_text(json.dumps({"action_dim": 32, "action_horizon": 10,
                                                  "paligemma_variant": "gemma_2b",
                                                  "action_expert_variant": "gemma_300m", "precision": "float32"}))
    loaded = load_checkpoint_dir(path)
    assert loaded.format == "openpi" and loaded.asset_id == "libero"


def test_converter_output_without_assets_says_the_norm_stats_are_missing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # openpi's converter copies <checkpoint_dir>/../assets, not the JAX checkpoint's own assets/:
    # its output is often the weights and its config.json only. That was read as a LeRobot
    # directory: 'config.json: expected "type" pi0 or pi05, found None'.
    from pi0_policy_ros.cli import main

    path = write_openpi_dir(tmp_path / "ckpt", PI05_FIXTURE)
    _converter_config(path, 10)
    shutil.rmtree(path / "assets")
    expected = f"expected the norm stats of the training data in {path / 'assets'}/<asset_id>/norm_stats.json"
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        load_checkpoint_dir(path)
    assert main(["inspect", str(path)]) == 2
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize("trained", [10, 50])
def test_a_profile_horizon_other_than_the_converters_is_a_warning(tmp_path: Path, trained: int,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    # The converter's config.json records the training horizon; no weight depends on it, so another
    # one runs, but the expert then denoises a length it was not trained on.
    path = write_openpi_dir(tmp_path / "ckpt", PI05_FIXTURE)
    (path / "config.json").write_text(json.dumps({"action_dim": 32, "action_horizon": trained,
                                                  "paligemma_variant": "gemma_2b",
                                                  "action_expert_variant": "gemma_300m", "precision": "float32"}))
    with caplog.at_level("WARNING", logger="pi0_policy_ros.policy.checkpoint_dir"):
        loaded = load_checkpoint_dir(path, horizon=10)
    assert loaded.model_config.action_horizon == 10
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    if trained == 10:
        assert warnings == []
    else:
        assert len(warnings) == 1
        assert "trained with action_horizon 50" in warnings[0] and "samples 10 actions" in warnings[0]
        assert "profile_action_horizon to 50" in warnings[0]


@pytest.mark.parametrize("policy_type", ["pi0fast", "pi0_fast"])
def test_a_lerobot_pi0_fast_checkpoint_is_refused_as_another_model(tmp_path: Path, policy_type: str) -> None:
    path = write_lerobot_dir(tmp_path / "ckpt", PI0_FIXTURE, "pi0")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "type": policy_type}))
    with pytest.raises(CheckpointError, match=re.escape(f'expected "type" pi0 or pi05, found {policy_type!r} (pi0-FAST '
                                                        "predicts action tokens autoregressively")):
        load_checkpoint_dir(path)


@pytest.mark.parametrize("policy_type,fixture", [("pi05", PI05_FIXTURE), ("pi0", PI0_FIXTURE)])
def test_lerobot_relative_actions_are_refused(tmp_path: Path, policy_type: str, fixture: Path) -> None:
    # LeRobot >= 0.5.1 can train on actions relative to the state; its postprocessor adds the state
    # back. Actions read as absolute would be wrong, so such a checkpoint is one clear error.
    path = write_lerobot_dir(tmp_path / "ckpt", fixture, policy_type)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "use_relative_actions": True,
                                                  "relative_exclude_joints": ["gripper"]}))
    with pytest.raises(CheckpointError, match="use_relative_actions"):
        load_checkpoint_dir(path)
    (path / "config.json").write_text(json.dumps({**config, "use_relative_actions": False}))
    assert load_checkpoint_dir(path).format == "lerobot"


def test_an_asset_id_for_a_lerobot_checkpoint_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # LeRobot keeps its stats in processor files, not assets/<asset_id>/: `inspect --asset-id` and
    # the node's asset_id parameter were dropped without a word, as if the named stats were in use.
    from pi0_policy_ros.cli import main

    path = write_lerobot_dir(tmp_path / "ckpt", PI05_FIXTURE, "pi05")
    expected = (f"asset_id names an openpi checkpoint's assets/<asset_id>/norm_stats.json, and {path} is a LeRobot "
                "checkpoint (its stats are named by policy_preprocessor.json / policy_postprocessor.json): expected "
                "asset_id '' (empty), found 'libero'")
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_checkpoint_dir(path, asset_id="libero")
    with pytest.raises(ConfigError, match=re.escape(expected)):
        Policy.from_config(PolicyConfig(checkpoint_path=str(path), asset_id="libero", robot_profile="generic",
                                        state_dim=STATE_DIM, action_dim=ACTION_DIM))
    assert main(["inspect", str(path), "--asset-id", "libero"]) == 2
    assert capsys.readouterr().err == f"error: {expected}\n"
    assert load_checkpoint_dir(path).asset_id == ""  # the default ''


def test_a_lerobot_checkpoint_saved_before_0_4_names_the_version_it_needs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # LeRobot's own pi0 before 0.4 (which ported openpi's) failed as "no pi0 preset matches these
    # tensor shapes (pi0: 41 problem(s); pi0_small: 41 problem(s))", which says nothing of why.
    from pi0_policy_ros.cli import main

    path = write_lerobot_dir_before_0_4(tmp_path / "ckpt", PI0_FIXTURE)
    expected = (f"{path}: expected a checkpoint saved by LeRobot >= 0.4 (openpi's tensor names under 'model.', norm "
                "stats in policy_preprocessor.json / policy_postprocessor.json), found the format of LeRobot < 0.4: "
                "norm stats inside model.safetensors (normalize_inputs.buffer_observation_state.mean and 5 more); "
                "38 tensors named model.paligemma_with_expert.paligemma.language_model.model.* (transformers < "
                "4.52's PaliGemma; openpi's is model.paligemma_with_expert.paligemma.model.language_model.*); "
                "config.json keys ['num_steps', 'proj_width', 'resize_imgs_with_padding'] of LeRobot's earlier "
                "PI0Config. LeRobot's pi0 before 0.4 is not supported")
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        load_checkpoint_dir(path)
    assert main(["inspect", str(path)]) == 2
    assert expected in capsys.readouterr().err
    # Either mark alone is enough: the stats in the weights (PaliGemma named as openpi names it) ...
    weights = {f"model.{k}": v for k, v in load_reference(PI0_FIXTURE).weights.items()}
    weights["normalize_inputs.buffer_observation_state.mean"] = torch.zeros(STATE_DIM)
    save_file(weights, str(path / "model.safetensors"), metadata={VOCAB_ROWS_METADATA: "1024"})
    with pytest.raises(CheckpointError, match=r"LeRobot < 0.4: norm stats inside model.safetensors "
                                              r"\(normalize_inputs.buffer_observation_state.mean\); config.json keys"):
        load_checkpoint_dir(path)
    # ... and, as LeRobot >= 0.4 writes them, no mark at all: it loads.
    shutil.rmtree(path)
    assert load_checkpoint_dir(write_lerobot_dir(path, PI0_FIXTURE, "pi0")).format == "lerobot"


@pytest.mark.parametrize("key", ["use_visual_memory", "use_proprioceptive_memory"])
def test_lerobot_pi05_observation_memory_is_refused(tmp_path: Path, key: str) -> None:
    # LeRobot's pi05 MEM (configuration_pi05.py) feeds past frames inside SigLIP, with no weight of
    # its own: that checkpoint loaded and ran on one frame. The state memory adds LeRobot's
    # proprio_history_proj (Linear(max_state_dim, PaliGemma width)): a geometry mismatch that did
    # not say why.
    path = write_lerobot_dir(tmp_path / "ckpt", PI05_FIXTURE, "pi05")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, key: True, "memory_frames": 6, "memory_stride": 30}))
    if key == "use_proprioceptive_memory":
        ref = load_reference(PI05_FIXTURE)
        width = ref.config.paligemma.width
        weights = {f"model.{k}": v for k, v in ref.weights.items()}
        weights.update({"model.proprio_history_proj.weight": torch.zeros(width, 32),
                        "model.proprio_history_proj.bias": torch.zeros(width)})
        save_file(weights, str(path / "model.safetensors"), metadata={VOCAB_ROWS_METADATA: "1024"})
    with pytest.raises(CheckpointError, match=f'expected "{key}": false .*found true.*memory_frames 6'):
        load_checkpoint_dir(path)


@pytest.mark.parametrize("key,value", [("min_period", 1e-3), ("max_period", 10.0), ("max_period", None)])
def test_lerobot_time_embedding_periods_other_than_openpis_are_refused(tmp_path: Path, key: str, value: object) -> None:
    # LeRobot's config.json has min_period / max_period for the time embedding; they were ignored,
    # so other values would have embedded each denoise step's time differently from training.
    path = write_lerobot_dir(tmp_path / "ckpt", PI05_FIXTURE, "pi05")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "min_period": 0.004, "max_period": 4}))
    assert load_checkpoint_dir(path).format == "lerobot"  # LeRobot's defaults, as JSON writes them
    (path / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(CheckpointError, match=f'expected "{key}": .*found {value!r}'):
        load_checkpoint_dir(path)


@pytest.mark.parametrize("key,value", [("chunk_size", "abc"), ("chunk_size", 2.7), ("num_inference_steps", None),
                                       ("num_inference_steps", -3), ("tokenizer_max_length", 0)])
def test_lerobot_config_values_that_are_not_positive_integers_are_one_error(
        tmp_path: Path, key: str, value: object, capsys: pytest.CaptureFixture[str]) -> None:
    # "abc" / null raised int()'s ValueError / TypeError, 2.7 was cut to 2 chunks without a word,
    # and 0 or -3 failed in the model config without naming config.json (inspect: not at all for 0).
    from pi0_policy_ros.cli import main

    path = write_lerobot_dir(tmp_path / "ckpt", PI05_FIXTURE, "pi05")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, key: value}))
    bound = "an integer from 1 to 5858" if key == "num_inference_steps" else "a positive integer"
    expected = f"config.json: expected '{key}' {bound}, found {value!r}"
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        Policy.from_config(PolicyConfig(checkpoint_path=str(path), model_preset="auto", robot_profile="generic",
                                        state_dim=STATE_DIM, action_dim=ACTION_DIM))
    assert main(["inspect", str(path)]) == 2
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize("key,value,expected", [
    ("num_inference_steps", 100000000, "config.json: expected 'num_inference_steps' an integer from 1 to 5858, "
                                       "found 100000000"),
    ("tokenizer_max_length", 100000000, "max_token_len 100000000 + 10 action tokens = 100000778 positions, more "
                                        "than Gemma's 8192 (LeRobot's tokenizer_max_length and chunk_size)"),
    ("chunk_size", 8000, "max_token_len 200 + 8000 action tokens = 8968 positions, more than Gemma's 8192"),
])
def test_lerobot_config_counts_beyond_the_model_are_one_error(tmp_path: Path, key: str, value: int,
                                                              expected: str) -> None:
    # A typo's 100000000 loaded: configure then padded the prompt to 1e8 tokens, or never ended its
    # Euler times (the float32 time stops moving), until the OOM killer.
    path = write_lerobot_dir(tmp_path / "ckpt", PI05_FIXTURE, "pi05")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        load_checkpoint_dir(path)


def test_a_converter_horizon_beyond_the_model_is_one_error(tmp_path: Path) -> None:
    # The generic profile samples the horizon openpi's converter recorded, unbounded before.
    path = write_openpi_dir(tmp_path / "ckpt", PI05_FIXTURE)
    _converter_config(path, 100000000)
    with pytest.raises(CheckpointError, match=re.escape("+ 100000000 action tokens = 100000968 positions, more than "
                                                        "Gemma's 8192 (the action horizon and the preset's token "
                                                        "length)")):
        load_checkpoint_dir(path, horizon_from_checkpoint=True)


def test_lerobot_config_json_that_is_not_an_object_is_one_error(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from pi0_policy_ros.cli import main

    path = write_lerobot_dir(tmp_path / "ckpt", PI05_FIXTURE, "pi05")
    (path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"config.json: expected a JSON object, found list"):
        load_checkpoint_dir(path)
    # input_features of another shape than LeRobot's object: inspect still describes the directory
    (path / "config.json").write_text(json.dumps({"type": "pi05", "chunk_size": 10, "input_features": [1, 2]}))
    assert main(["inspect", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cameras"] == []


def test_unknown_layout_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="unknown checkpoint layout.*openpi PyTorch directory.*LeRobot"):
        load_checkpoint_dir(tmp_path)


def test_unknown_layout_says_which_entry_is_a_folder_or_a_broken_link(tmp_path: Path) -> None:
    # An assets/ link whose target was not copied, or a model.safetensors folder, were listed as
    # "found ['assets', 'model.safetensors', ...]": the very names the error says are expected.
    path = write_openpi_dir(tmp_path / "ckpt", PI05_FIXTURE)
    shutil.rmtree(path / "assets")
    (path / "assets").symlink_to(tmp_path / "moved_assets", target_is_directory=True)
    with pytest.raises(CheckpointError, match=re.escape(f"found ['assets (a link to {tmp_path / 'moved_assets'}, "
                                                        "which does not exist)', 'model.safetensors', ")):
        load_checkpoint_dir(path)
    (path / "model.safetensors").unlink()
    (path / "model.safetensors").mkdir()
    (path / "assets").unlink()
    (path / "assets" / "libero").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=re.escape("found ['assets/', 'model.safetensors/', ")):
        load_checkpoint_dir(path)


@pytest.mark.parametrize("kind", ["openpi", "lerobot"])
def test_the_weights_file_given_for_the_directory_names_the_directory(tmp_path: Path, kind: str) -> None:
    # checkpoint_path: .../model.safetensors was "unknown checkpoint layout ...; found not a directory".
    path = _write(kind, tmp_path / "ckpt", PI05_FIXTURE, "pi05")
    with pytest.raises(CheckpointError, match=re.escape(f"expected the checkpoint directory, found its weights file "
                                                        f"{path / 'model.safetensors'}: use {path}")):
        load_checkpoint_dir(path / "model.safetensors")


def test_sharded_weights_are_named_as_such(tmp_path: Path) -> None:
    # model-0000N-of-0000M.safetensors + model.safetensors.index.json (transformers' save_pretrained
    # above its max_shard_size) was "unknown checkpoint layout".
    path = write_openpi_dir(tmp_path / "ckpt", PI05_FIXTURE)
    weights = load_file(str(path / "model.safetensors"))
    (path / "model.safetensors").unlink()
    names = sorted(weights)
    shards = {f"model-0000{i + 1}-of-00002.safetensors": part for i, part in enumerate((names[:10], names[10:]))}
    for shard, part in shards.items():
        save_file({name: weights[name] for name in part}, str(path / shard))
    index = {"metadata": {}, "weight_map": {name: shard for shard, part in shards.items() for name in part}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=re.escape(
            f"{path}: expected one model.safetensors, found weights sharded into 2 files by "
            "model.safetensors.index.json (model-00001-of-00002.safetensors, model-00002-of-00002.safetensors)")):
        load_checkpoint_dir(path)


UNREADABLE = [("openpi", "model.safetensors", ""), ("lerobot", "policy_postprocessor_step_0_unnormalizer_processor.safetensors", ""),
              ("openpi", "assets/libero", ""), ("openpi", "assets/libero", "libero")]


@pytest.mark.parametrize("kind,name,asset_id", UNREADABLE, ids=[f"{k}-{n}-{a}" for k, n, a in UNREADABLE])
def test_an_unreadable_file_or_asset_folder_is_reported_as_unreadable(tmp_path: Path, kind: str, name: str,
                                                                       asset_id: str) -> None:
    # A checkpoint copied with another owner's modes: safetensors said "No such file or directory" of
    # the weights there were, an unreadable assets/libero read as "found 0: []", and with its asset_id
    # named a PermissionError escaped the CheckpointError hierarchy.
    path = _write(kind, tmp_path / "ckpt", PI05_FIXTURE, "pi05")
    (path / name).chmod(0)
    try:
        if os.access(path / name, os.R_OK):
            pytest.skip("running with CAP_DAC_OVERRIDE (root): mode 0 does not stop reads")
        with pytest.raises(CheckpointError, match=rf"{re.escape(str(path / name))}.*Permission denied"):
            load_checkpoint_dir(path, asset_id=asset_id)
    finally:
        (path / name).chmod(0o755)


def test_a_git_lfs_pointer_in_place_of_the_weights_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A Hugging Face repo cloned without git-lfs holds pointer files: safetensors said "header too large".
    from pi0_policy_ros.cli import main

    path = write_lerobot_dir(tmp_path / "ckpt", PI05_FIXTURE, "pi05")
    (path / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:"
                                            f"{'0' * 64}\nsize 7016123456\n")
    expected = (rf"cannot read {re.escape(str(path / 'model.safetensors'))}: expected the weights, found a Git LFS "
                r"pointer to them \(7016123456 bytes\); fetch them with `git lfs pull`")
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint_dir(path)
    assert main(["inspect", str(path)]) == 2
    assert re.search(expected, capsys.readouterr().err)


def test_preset_of_another_geometry_names_the_preset_that_fits(tmp_path: Path) -> None:
    # It listed all 810 tensors of the other geometry, and never said which preset the file is.
    path = write_openpi_dir(tmp_path / "ckpt", PI05_FIXTURE)
    with pytest.raises(CheckpointError) as info:
        Policy.from_config(PolicyConfig(checkpoint_path=str(path), model_preset="pi05"))
    message = str(info.value)
    assert "\n" not in message, message
    assert re.search(r"model_preset 'pi05'\) does not match model geometry 'pi05' \(\d+ problem\(s\).*; the tensors "
                     r"are those of preset 'pi05_small': expected model_preset 'pi05_small' \(or 'auto'\), found 'pi05'",
                     message), message


def test_preset_that_does_not_match_the_weights_lists_every_mismatch(tmp_path: Path) -> None:
    # A file that fits no preset (one tensor cut short): every mismatch, with the preset asked for.
    ref = load_reference(PI05_FIXTURE)
    key = "time_mlp_in.weight"
    ref.weights[key] = ref.weights[key][:, :32].contiguous()
    path = tmp_path / "ckpt"
    write_openpi_dir(path, PI05_FIXTURE)
    save_file(ref.weights, str(path / "model.safetensors"), metadata={VOCAB_ROWS_METADATA: "1024"})
    with pytest.raises(CheckpointError, match=r"(?s)model_preset 'pi05_small'.*\(1 problem\(s\).*wrong shape "
                                              r"time_mlp_in.weight: expected \[64, 64\], found \[64, 32\]"):
        Policy.from_config(PolicyConfig(checkpoint_path=str(path), model_preset="pi05_small"))


@pytest.mark.parametrize("kind", ["openpi", "lerobot"])
def test_auto_preset_names_the_bad_tensors_of_the_closest_preset(tmp_path: Path, kind: str,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # With model_preset auto (inspect's default) one missing, one extra and one cut tensor gave only
    # "no pi05 preset matches these tensor shapes (...; pi05_small: 3 problem(s))": no tensor named.
    from pi0_policy_ros.cli import main

    path = _write(kind, tmp_path / "ckpt", PI05_FIXTURE, "pi05")
    prefix = "model." if kind == "lerobot" else ""
    weights = load_file(str(path / "model.safetensors"))
    missing = "paligemma_with_expert.paligemma.model.language_model.layers.0.self_attn.q_proj.weight"
    del weights[prefix + missing]
    weights[prefix + "time_mlp_in.weight"] = weights[prefix + "time_mlp_in.weight"][:, :32].contiguous()
    weights[prefix + "extra.weight"] = torch.zeros(3)
    save_file(weights, str(path / "model.safetensors"), metadata={VOCAB_ROWS_METADATA: "1024"})
    expected = (rf"(?s){re.escape(str(path / 'model.safetensors'))}: no pi05 preset matches these tensor shapes "
                r"\(.*pi05_small: 3 problem\(s\)\); those of the closest, 'pi05_small':\n"
                rf"  missing {re.escape(missing)}: expected shape \[128, 64\]\n"
                r"  unexpected extra.weight: shape \[3\]\n"
                r"  wrong shape time_mlp_in.weight: expected \[64, 64\], found \[64, 32\]$")
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint_dir(path)
    assert main(["inspect", str(path)]) == 2
    assert re.search(expected, capsys.readouterr().err.strip().removeprefix("error: "))


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool])
def test_weights_of_a_non_float_dtype_are_one_checkpoint_error(tmp_path: Path, dtype: torch.dtype,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    # A quantized (int8) or corrupt tensor raised torch's RuntimeError out of load_state_dict, and
    # inspect reported the directory as fine.
    from pi0_policy_ros.cli import main

    path = write_openpi_dir(tmp_path / "ckpt", PI05_FIXTURE)
    ref = load_reference(PI05_FIXTURE)
    ref.weights["action_out_proj.weight"] = ref.weights["action_out_proj.weight"].to(dtype)
    save_file(ref.weights, str(path / "model.safetensors"), metadata={VOCAB_ROWS_METADATA: "1024"})
    expected = rf"expected floating-point weights .*found 1 tensor\(s\) of another dtype: action_out_proj.weight {str(dtype)[6:]}"
    with pytest.raises(CheckpointError, match=expected):
        Policy.from_config(PolicyConfig(checkpoint_path=str(path), model_preset="auto", robot_profile="pi05_libero"))
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint_dir(path, "pi05_small")
    assert main(["inspect", str(path)]) == 2
    assert re.search(expected, capsys.readouterr().err)


def test_nested_asset_id_is_found_without_being_named(tmp_path: Path) -> None:
    # openpi saves the stats under assets/<asset_id>, and LIBERO's asset_id is its repo id
    # "physical-intelligence/libero" (training/checkpoints.py save_assets): two levels deep.
    path = write_openpi_dir(tmp_path / "ckpt", PI05_FIXTURE, asset_id="physical-intelligence/libero")
    loaded = load_checkpoint_dir(path)
    assert loaded.asset_id == "physical-intelligence/libero"
    assert loaded.stats["state"].dim == STATE_DIM
    assert load_checkpoint_dir(path, asset_id="physical-intelligence/libero").asset_id == "physical-intelligence/libero"
    with pytest.raises(ConfigError, match=r"assets present: \['physical-intelligence/libero'\]"):
        load_checkpoint_dir(path, asset_id="libero")


def test_missing_norm_stats_names_the_expected_file(tmp_path: Path) -> None:
    path = write_openpi_dir(tmp_path / "ckpt", PI05_FIXTURE)
    with pytest.raises(ConfigError, match=r"norm stats not found: expected .*assets/droid/norm_stats.json"):
        Policy.from_config(PolicyConfig(checkpoint_path=str(path), model_preset="auto", asset_id="droid"))


@pytest.mark.parametrize("kind,fixture,policy_type,profile,expected", [
    ("openpi", PI0_FIXTURE, "pi0", "libero", "pi0_libero"),  # "libero" is pi05_libero: no delta actions
    ("openpi", PI05_FIXTURE, "pi05", "pi0_libero", "pi05_libero"),
    ("lerobot", PI0_FIXTURE, "pi0", "pi05_libero", "generic"),  # LeRobot: the generic profile (README)
])
def test_a_profile_made_for_the_other_model_type_is_refused_for_a_checkpoint(
        tmp_path: Path, kind: str, fixture: Path, policy_type: str, profile: str, expected: str) -> None:
    # pi0_libero trained on delta actions, pi05_libero not: the other profile's actions would be off
    # by the state. Random weights (demos) only get a warning.
    path = _write(kind, tmp_path / "ckpt", fixture, policy_type)
    with pytest.raises(ConfigError, match=f"the checkpoint is a {policy_type} model.*expected robot_profile '{expected}'"):
        Policy.from_config(PolicyConfig(checkpoint_path=str(path), model_preset="auto", robot_profile=profile))
    assert Policy.from_config(PolicyConfig(model_preset=f"{policy_type}_small", robot_profile=profile,
                                           default_prompt="go")).profile.name.endswith("_libero")


@pytest.mark.parametrize("kind,fixture,policy_type,stat,value", [
    ("openpi", PI05_FIXTURE, "pi05", "q01", float("nan")),
    ("openpi", PI0_FIXTURE, "pi0", "std", float("inf")),
    ("openpi", PI0_FIXTURE, "pi0", "mean", None),  # JSON null
    ("lerobot", PI05_FIXTURE, "pi05", "q99", float("nan")),
])
def test_non_finite_norm_stats_are_one_checkpoint_error(tmp_path: Path, kind: str, fixture: Path, policy_type: str,
                                                        stat: str, value: float | None) -> None:
    # They loaded, and every chunk's actions came out NaN / Inf (held by the node's safety filter,
    # returned as they were by Policy.infer).
    path = _write(kind, tmp_path / "ckpt", fixture, policy_type)
    if kind == "openpi":
        stats_file = path / "assets" / "libero" / "norm_stats.json"
        content = json.loads(stats_file.read_text())
        content["norm_stats"]["actions"][stat][3] = value
        stats_file.write_text(json.dumps(content))
    else:
        stats_file = path / "policy_postprocessor_step_0_unnormalizer_processor.safetensors"
        from safetensors.numpy import load_file

        tensors = load_file(str(stats_file))
        tensors[f"action.{stat}"][3] = value
        save_numpy(tensors, str(stats_file))
    profile = "pi05_libero" if policy_type == "pi05" else "pi0_libero"
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(stats_file))}: '(actions|action)': expected finite "
                                              rf"'{stat}' values, found NaN/Inf/null at dims \[3\]"):
        Policy.from_config(PolicyConfig(checkpoint_path=str(path), model_preset="auto", robot_profile=profile))


@pytest.mark.parametrize("kind", ["openpi", "lerobot"])
def test_norm_stats_of_more_than_one_dimension_are_one_checkpoint_error(tmp_path: Path, kind: str) -> None:
    # They were flattened: a [2, 7] table passed as 14 action dims (within the model's 32) and the
    # actions were unnormalized with its first row, whatever the second said.
    path = _write(kind, tmp_path / "ckpt", PI05_FIXTURE, "pi05")
    if kind == "openpi":
        stats_file = path / "assets" / "libero" / "norm_stats.json"
        content = json.loads(stats_file.read_text())
        actions = content["norm_stats"]["actions"]
        content["norm_stats"]["actions"] = {k: [v, [x * 10 for x in v]] for k, v in actions.items()}
        stats_file.write_text(json.dumps(content))
    else:
        stats_file = path / "policy_postprocessor_step_0_unnormalizer_processor.safetensors"
        from safetensors.numpy import load_file

        tensors = load_file(str(stats_file))
        save_numpy({k: np.stack([v, v * 10]) if k.startswith("action.") else v for k, v in tensors.items()},
                   str(stats_file))
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(stats_file))}: '(actions|action)': expected 1-D lists "
                                              r"over the robot's dims, found shapes \{'mean': \[2, 7\]"):
        Policy.from_config(PolicyConfig(checkpoint_path=str(path), model_preset="auto", robot_profile="pi05_libero"))


def test_swapped_quantiles_are_refused(tmp_path: Path) -> None:
    # q01 and q99 swapped: pi0.5 loaded and sent every action mirrored about its mid-range.
    path = write_openpi_dir(tmp_path / "ckpt", PI05_FIXTURE)
    stats_file = path / "assets" / "libero" / "norm_stats.json"
    content = json.loads(stats_file.read_text())
    actions = content["norm_stats"]["actions"]
    actions["q01"], actions["q99"] = actions["q99"], actions["q01"]
    stats_file.write_text(json.dumps(content))
    with pytest.raises(ConfigError, match=r"'actions' norm stats: expected q01 <= q99 .*dims \[0, 1, 2, 3, 4, 5, 6\]"):
        Policy.from_config(PolicyConfig(checkpoint_path=str(path), model_preset="auto", robot_profile="pi05_libero"))


def test_stats_with_other_dims_than_the_profile_are_refused(tmp_path: Path) -> None:
    path = write_openpi_dir(tmp_path / "ckpt", PI05_FIXTURE)  # LIBERO stats: 8 state / 7 action dims
    with pytest.raises(ConfigError, match="'state' norm stats have 8 dims but the robot profile has 14"):
        Policy.from_config(PolicyConfig(checkpoint_path=str(path), model_preset="auto", robot_profile="pi05_aloha"))


def _pad_stats_to_model_width(path: Path, asset_id: str = "libero") -> None:
    """Rewrite norm_stats.json as openpi computed it before June 2025: after padding state and
    actions to the model's 32 dims (zeros there: mean, std and quantiles alike)."""
    stats_file = path / "assets" / asset_id / "norm_stats.json"
    content = json.loads(stats_file.read_text())
    for entry in content["norm_stats"].values():
        for name, values in entry.items():
            entry[name] = values + [0.0] * (32 - len(values))
    stats_file.write_text(json.dumps(content))


@pytest.mark.parametrize(("fixture", "profile"), [(PI0_FIXTURE, "pi0_libero"), (PI05_FIXTURE, "pi05_libero")])
def test_stats_padded_to_the_model_width_give_the_same_actions(tmp_path: Path, fixture: Path, profile: str) -> None:
    config = {"model_preset": "auto", "robot_profile": profile, "default_prompt": "pick up the bowl"}
    plain = Policy.from_config(PolicyConfig(checkpoint_path=str(write_openpi_dir(tmp_path / "plain", fixture)),
                                            **config))
    padded_path = write_openpi_dir(tmp_path / "padded", fixture)
    _pad_stats_to_model_width(padded_path)
    padded = Policy.from_config(PolicyConfig(checkpoint_path=str(padded_path), **config))
    obs = _observation()
    np.testing.assert_array_equal(padded.infer(obs).actions, plain.infer(obs).actions)


def test_missing_tokenizer_says_where_it_looked(tmp_path: Path) -> None:
    path = write_openpi_dir(tmp_path / "ckpt", PI05_FIXTURE)
    (path / "paligemma_tokenizer.model").unlink()
    with pytest.raises(ConfigError, match="paligemma_tokenizer.model"):
        Policy.from_config(PolicyConfig(checkpoint_path=str(path), model_preset="auto"))


def test_cuda_without_cuda_is_a_config_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="sees no CUDA device"):
        Policy.from_config(PolicyConfig(model_preset="pi05_small", device="cuda"))


@pytest.fixture(scope="module")
def libero_policy(tmp_path_factory: pytest.TempPathFactory) -> Policy:
    path = write_openpi_dir(tmp_path_factory.mktemp("p") / "ckpt", PI05_FIXTURE)
    return Policy.from_config(PolicyConfig(checkpoint_path=str(path), model_preset="auto", robot_profile="pi05_libero",
                                           default_prompt="put the bowl on the plate"))


def _observation(seed: int = 0, prompt: str | None = None) -> Observation:
    rng = np.random.default_rng(seed)
    return Observation(images={"image": rng.integers(0, 256, (256, 320, 3), dtype=np.uint8),
                               "wrist_image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)},
                       state=rng.normal(size=STATE_DIM).astype(np.float32), prompt=prompt, stamp_s=12.5)


def test_infer_composes_the_documented_transform_chain(libero_policy: Policy) -> None:
    obs = _observation()
    chunk = libero_policy.infer(obs)
    # The same chain by hand: network inputs → engine → unnormalize → robot dims.
    batch, _ = libero_policy.network_batch(obs)
    raw = libero_policy.engine.infer(batch)
    stats = libero_policy.normalizer.stats["actions"]
    span = stats.q99 - stats.q01 + 1e-6
    expected = ((raw[:, :ACTION_DIM] + 1.0) / 2.0 * span + stats.q01).astype(np.float32)
    np.testing.assert_allclose(chunk.actions, expected, rtol=1e-6, atol=1e-6)
    assert chunk.actions.shape == (10, ACTION_DIM)
    assert chunk.stamp_s == 12.5 and chunk.period_s == libero_policy.profile.action_period_s
    assert {"preprocess", "network", "postprocess", "total"} <= set(chunk.timings_ms)
    # Normalized state is not in a pi05_libero prompt, so the tokens depend on the prompt only.
    assert batch.token_mask.sum() == libero_policy.tokenizer.tokenize("put the bowl on the plate").mask.sum()


def test_same_observation_same_actions_new_observation_new_actions(libero_policy: Policy) -> None:
    first = libero_policy.infer(_observation(0)).actions
    np.testing.assert_array_equal(first, libero_policy.infer(_observation(0)).actions)
    assert not np.allclose(first, libero_policy.infer(_observation(1)).actions)
    assert not np.allclose(first, libero_policy.infer(_observation(0, prompt="open the drawer")).actions)


def test_close_from_another_thread_waits_for_the_running_inference() -> None:
    """An evaluation script closing the policy while a worker thread infers: the inference ends with
    its chunk (the engine went away under it: AttributeError), and later calls say it is closed."""
    policy = Policy.from_config(PolicyConfig(model_preset="pi05_small", robot_profile="pi05_libero"))
    obs = _observation(prompt="pick up the cup")
    expected = policy.infer(obs).actions
    in_network = threading.Event()
    policy.engine.model.vision.register_forward_pre_hook(functools.partial(_signal_then_pause, in_network))
    results: list[object] = []
    worker = threading.Thread(target=_collect, args=(results, policy.infer, obs))
    worker.start()
    assert in_network.wait(30)
    policy.close()  # while the worker is inside the network
    worker.join()
    assert len(results) == 1 and not isinstance(results[0], Exception), results
    np.testing.assert_array_equal(results[0].actions, expected)
    with pytest.raises(Pi0PolicyError, match="closed"):
        policy.infer(obs)


def test_a_closed_policy_says_so_before_looking_at_the_observation() -> None:
    """After close() every call fails: an observation error (a wrong state) sent the caller fixing
    the observation, only to be told then that the policy was closed."""
    policy = Policy.from_config(PolicyConfig(model_preset="pi05_small", robot_profile="pi05_libero"))
    policy.close()
    policy.close()  # idempotent
    obs = _observation(prompt="pick up the cup")
    for bad in (Observation(images=obs.images, state=np.zeros(3)), Observation(images={}, state=obs.state)):
        with pytest.raises(Pi0PolicyError, match="the policy was closed") as info:
            policy.infer(bad)
        assert not isinstance(info.value, ObservationError)


def _signal_then_pause(entered: threading.Event, module: torch.nn.Module, args: object) -> None:
    entered.set()
    time.sleep(0.2)


def _collect(results: list[object], fn: Callable[..., object], *args: object) -> None:
    try:
        results.append(fn(*args))
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        results.append(exc)


def test_observation_errors_name_what_was_expected(libero_policy: Policy) -> None:
    obs = _observation()
    with pytest.raises(ObservationError, match="state"):
        libero_policy.infer(Observation(images=obs.images, state=np.zeros(3, np.float32)))
    with pytest.raises(ObservationError):
        libero_policy.infer(Observation(images={"image": obs.images["image"]}, state=obs.state))


def test_cameras_resized_in_the_engine_give_the_same_actions(tmp_path: Path, libero_policy: Policy) -> None:
    """camera_height / camera_width: the frames go to the engine unresized and its resize (on the
    GPU in the vision graph; here the eager engine on the CPU) gives the CPU resize's actions, bit
    for bit. A frame of another size is refused, naming the size expected."""
    path = write_openpi_dir(tmp_path / "ckpt", PI05_FIXTURE)
    policy = Policy.from_config(PolicyConfig(checkpoint_path=str(path), model_preset="auto",
                                             robot_profile="pi05_libero", default_prompt="put the bowl on the plate",
                                             camera_height=256, camera_width=320))
    assert policy.engine.shape.image_hw == (256, 320) and policy._resize_pool is None
    rng = np.random.default_rng(4)
    obs = Observation(images={name: rng.integers(0, 256, (256, 320, 3), dtype=np.uint8)
                              for name in ("image", "wrist_image")},
                      state=rng.normal(size=STATE_DIM).astype(np.float32))
    batch, _ = policy.network_batch(obs)
    assert batch.images.shape == (3, 256, 320, 3)
    np.testing.assert_array_equal(policy.infer(obs).actions, libero_policy.infer(obs).actions)
    with pytest.raises(ObservationError, match=r"camera 'wrist_image': expected a uint8 RGB image \[256, 320, 3\]"):
        policy.infer(Observation(images={**obs.images, "wrist_image": obs.images["wrist_image"][:224, :224]},
                                 state=obs.state))
    with pytest.raises(ConfigError, match="camera_height and camera_width must both be > 0"):
        PolicyConfig(camera_height=256)


def test_backend_tensorrt_is_a_config_error_that_says_why(caplog: pytest.LogCaptureFixture) -> None:
    # The engine runs no TensorRT stages: the error said only "TensorRT is not installed", as if
    # installing it would help.
    with pytest.raises(ConfigError, match=r"backend 'tensorrt': the engine does not run TensorRT stages yet .*"
                                          r"\(device cpu is not a CUDA device\); use 'torch' or 'auto'"):
        Policy.from_config(PolicyConfig(model_preset="pi05_small", backend="tensorrt"))


def test_backend_auto_falls_back_to_torch_and_runs(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO"):
        policy = Policy.from_config(PolicyConfig(model_preset="pi05_small", backend="auto", default_prompt="go"))
    said = [r.getMessage() for r in caplog.records if "backend" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("backend auto: falling back to torch: the engine does not run "
                                                 "TensorRT stages yet"), said
    assert policy.engine is not None


def test_generic_profile_takes_the_robots_dims_from_the_config() -> None:
    config = PolicyConfig(model_preset="pi0_small", robot_profile="generic", default_prompt="go",
                          state_dim=6, action_dim=5, action_horizon=12, action_period_s=0.04)
    policy = Policy.from_config(config)
    assert (policy.profile.state_dim, policy.profile.action_dim) == (6, 5)
    rng = np.random.default_rng(0)
    chunk = policy.infer(Observation(images={"base": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)},
                                     state=np.zeros(6, np.float32)))
    assert chunk.actions.shape == (12, 5) and chunk.period_s == 0.04
    with pytest.raises(ConfigError, match="action_dim must be ≥ 0"):
        PolicyConfig(action_dim=-1)


def test_generic_profile_without_the_robots_dims_names_the_setting(tmp_path: Path) -> None:
    """The generic profile's 32 dims are a default: a checkpoint of an 8-dim robot loaded without
    state_dim was blamed on the asset id or the profile only."""
    path = write_openpi_dir(tmp_path / "ckpt", PI05_FIXTURE)
    with pytest.raises(ConfigError, match=r"'state' norm stats have 8 dims but the robot profile has 32 .*"
                                          r"or the robot's state_dim not set \(state_dim of PolicyConfig, "
                                          r"profile_state_dim of the node\)"):
        Policy.from_config(PolicyConfig(checkpoint_path=str(path), model_preset="auto", robot_profile="generic"))
    with pytest.raises(ConfigError, match=r"'actions' norm stats have 7 dims .* robot's action_dim not set"):
        Policy.from_config(PolicyConfig(checkpoint_path=str(path), model_preset="auto", robot_profile="generic",
                                        state_dim=STATE_DIM))
    policy = Policy.from_config(PolicyConfig(checkpoint_path=str(path), model_preset="auto", robot_profile="generic",
                                             state_dim=STATE_DIM, action_dim=ACTION_DIM))
    assert (policy.profile.state_dim, policy.profile.action_dim) == (STATE_DIM, ACTION_DIM)


@pytest.mark.parametrize("mode", ["rtc_fast", "rtc"])
def test_rtc_policy_continues_the_previous_chunk(tmp_path: Path, libero_policy: Policy, mode: str) -> None:
    """The previous chunk goes to the engine in the network's space (normalized, padded, masked
    off on the padded dims); the guided chunk's first d actions move onto it; no guidance is the
    plain chunk."""
    path = write_openpi_dir(tmp_path / "ckpt", PI05_FIXTURE)
    policy = Policy.from_config(PolicyConfig(checkpoint_path=str(path), model_preset="auto",
                                             robot_profile="pi05_libero", default_prompt="put the bowl on the plate",
                                             rtc_mode=mode))
    obs = _observation(2)
    plain = libero_policy.infer(obs).actions
    np.testing.assert_allclose(policy.infer(obs).actions, plain, atol=1e-5)
    prev = plain + np.random.default_rng(3).normal(scale=0.5, size=plain.shape).astype(np.float32)
    guidance = ChunkGuidance(prev_actions=prev, delay_steps=2, mask_end=6)
    _, robot_state = policy.network_batch(obs)
    engine_guidance = policy.engine_guidance(guidance, robot_state)
    np.testing.assert_allclose(engine_guidance.prev[:, :ACTION_DIM], policy.normalizer.normalize("actions", prev),
                               atol=1e-5)
    assert not engine_guidance.mask[:, ACTION_DIM:].any() and not engine_guidance.prev[:, ACTION_DIM:].any()
    np.testing.assert_allclose(engine_guidance.mask[:, 0], soft_mask(10, 2, 6).numpy())
    guided = policy.infer(obs, guidance).actions
    assert np.abs(guided[:2] - prev[:2]).max() < 0.5 * np.abs(plain[:2] - prev[:2]).max()
    with pytest.raises(ConfigError, match="rtc_mode 'off'"):
        libero_policy.infer(obs, guidance)
    with pytest.raises(ObservationError, match=r"RTC: expected finite previous actions \[10, 7\]"):
        policy.infer(obs, ChunkGuidance(prev_actions=prev[:, :3], delay_steps=2, mask_end=6))


def test_lerobot_pi05_writes_the_state_into_the_prompt(tmp_path: Path) -> None:
    # LeRobot's pi05 preprocessor (Pi05PrepareStateTokenizerProcessorStep, lerobot 0.5-0.6) always
    # writes the quantile-normalized, unpadded state into the prompt, whatever the robot profile.
    path = write_lerobot_dir(tmp_path / "ckpt", PI05_FIXTURE, "pi05")
    policy = Policy.from_config(PolicyConfig(checkpoint_path=str(path), model_preset="auto",
                                             robot_profile="pi05_libero", default_prompt="put_the bowl\n"))
    obs = _observation()
    batch, _ = policy.network_batch(obs)
    stats = _stats(STATE_DIM, 1)
    q01, q99 = np.float32(stats["q01"]), np.float32(stats["q99"])
    normalized = 2.0 * (obs.state - q01) / (q99 - q01) - 1.0  # lerobot normalize_processor, QUANTILES
    bins = np.digitize(normalized, np.linspace(-1, 1, 256 + 1)[:-1]) - 1
    text = f"Task: put the bowl, State: {' '.join(map(str, bins))};\nAction: "
    expected = sentencepiece.SentencePieceProcessor(model_file=str(path / "tokenizer.model")).encode(text, add_bos=True)
    assert batch.tokens[: len(expected)].tolist() == expected
    assert int(batch.token_mask.sum()) == len(expected)


def test_openpi_training_transforms_by_profile() -> None:
    assert openpi_training_transforms(get_profile("pi0_libero")) == ("delta actions",)
    assert openpi_training_transforms(get_profile("pi0_aloha")) == ("delta actions", "ALOHA joint sign flips",
                                                                    "ALOHA gripper conversions")
    assert openpi_training_transforms(get_profile("pi05_libero")) == ()
    assert openpi_training_transforms(get_profile("pi05_droid")) == ()


def test_lerobot_checkpoint_with_a_profile_of_openpi_transforms_is_warned(tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    # LeRobot trains on absolute actions without openpi's delta / ALOHA maps: pi0_libero would add
    # the state to its actions. A checkpoint converted from openpi may need them, so only a warning.
    path = write_lerobot_dir(tmp_path / "ckpt", PI0_FIXTURE, "pi0")
    with caplog.at_level("WARNING", logger="pi0_policy_ros.policy.policy"):
        Policy.from_config(PolicyConfig(checkpoint_path=str(path), model_preset="auto", robot_profile="pi0_libero",
                                        default_prompt="go"))
    warnings = [r.getMessage() for r in caplog.records if "training transforms" in r.getMessage()]
    assert warnings == [("robot profile pi0_libero applies openpi's training transforms (delta actions), which "
                         "LeRobot's own pipeline does not: for a checkpoint trained in LeRobot use the generic profile")]


def test_generic_profile_takes_discrete_state_input_from_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    # openpi's Pi0Config defaults discrete_state_input to True for pi05 (only pi05_libero turns it
    # off); the generic profile follows no openpi config, so the model's (the preset's) setting decides.
    monkeypatch.setitem(PRESETS, "pi05_small_state", PRESETS["pi05_small"].replace(discrete_state_input=True))
    policy = Policy.from_config(PolicyConfig(model_preset="pi05_small_state", robot_profile="generic",
                                             default_prompt="go", state_dim=3, action_dim=3))
    state = np.array([-0.5, 0.0, 0.99], np.float32)
    batch, _ = policy.network_batch(Observation(images={"base": np.zeros((224, 224, 3), np.uint8)}, state=state))
    # openpi transforms.Normalize._normalize_quantile with the identity stats (q01 -1, q99 1).
    normalized = (state.astype(np.float64) + 1.0) / (2.0 + 1e-6) * 2.0 - 1.0
    bins = np.digitize(normalized, np.linspace(-1, 1, 256 + 1)[:-1]) - 1
    expected = policy.tokenizer.encode(f"Task: go, State: {' '.join(map(str, bins))};\nAction: ")
    assert batch.tokens[: len(expected) + 1].tolist() == [policy.tokenizer.bos_id, *expected]


@pytest.fixture(scope="module")
def pi0_libero_policy(tmp_path_factory: pytest.TempPathFactory) -> Policy:
    path = write_openpi_dir(tmp_path_factory.mktemp("p0") / "ckpt", PI0_FIXTURE)
    return Policy.from_config(PolicyConfig(checkpoint_path=str(path), model_preset="auto", robot_profile="pi0_libero",
                                           default_prompt="put the bowl on the plate", rtc_mode="rtc_fast"))


def _zscore(key: str) -> tuple[np.ndarray, np.ndarray]:
    """mean, std + openpi's eps 1e-6 of the stats write_openpi_dir wrote (pi0: z-score, spec section 3)."""
    stats = _stats(STATE_DIM, 1) if key == "state" else _stats(ACTION_DIM, 2)
    return np.float32(stats["mean"]).astype(np.float64), np.float32(stats["std"]).astype(np.float64) + 1e-6


def test_network_batch_puts_each_camera_in_its_slot_and_feeds_pi0_the_normalized_state(
        pi0_libero_policy: Policy) -> None:
    # Slots in openpi's order base_0_rgb, left_wrist_0_rgb, right_wrist_0_rgb; LIBERO has no right
    # wrist camera, so that slot is black with mask False (spec section 1 / 4). pi0 reads the
    # z-score normalized state, zero-padded to the model's 32 dims.
    obs = _observation()
    batch, robot_state = pi0_libero_policy.network_batch(obs)
    np.testing.assert_array_equal(batch.images[0], resize_with_pad(obs.images["image"]))
    np.testing.assert_array_equal(batch.images[1], obs.images["wrist_image"])
    assert not batch.images[2].any()
    assert batch.image_masks.tolist() == [True, True, False]
    mean, scale = _zscore("state")
    np.testing.assert_allclose(batch.state[:STATE_DIM], (obs.state - mean) / scale, rtol=1e-5, atol=1e-6)
    assert batch.state.shape == (32,) and not batch.state[STATE_DIM:].any()
    np.testing.assert_array_equal(robot_state, obs.state)


def test_pi0_libero_actions_are_unnormalized_then_made_absolute_with_the_raw_state(pi0_libero_policy: Policy) -> None:
    # openpi's output chain: Unnormalize, then AbsoluteActions(make_bool_mask(6, -1)) with the
    # state before normalization (spec section 3): the 6 arm dims get the robot's state added.
    obs = _observation(3)
    chunk = pi0_libero_policy.infer(obs)
    batch, _ = pi0_libero_policy.network_batch(obs)
    raw = pi0_libero_policy.engine.infer(batch).astype(np.float64)
    mean, scale = _zscore("actions")
    expected = raw[:, :ACTION_DIM] * scale + mean
    expected[:, :6] += obs.state[:6]
    assert chunk.actions.shape == (50, ACTION_DIM)
    np.testing.assert_allclose(chunk.actions, expected, rtol=1e-5, atol=1e-5)


def test_pi0_libero_rtc_guidance_takes_the_state_off_the_delta_dims_before_normalizing(
        pi0_libero_policy: Policy) -> None:
    # The previous chunk is in robot units (absolute); the network predicts normalized deltas on
    # the 6 arm dims, so the guidance is z-score normalize(prev - state on those dims).
    obs = _observation(4)
    prev = np.random.default_rng(5).normal(size=(50, ACTION_DIM)).astype(np.float32)
    _, robot_state = pi0_libero_policy.network_batch(obs)
    guidance = pi0_libero_policy.engine_guidance(ChunkGuidance(prev_actions=prev, delay_steps=3, mask_end=20),
                                                 robot_state)
    model_side = prev.astype(np.float64)
    model_side[:, :6] -= obs.state[:6]
    mean, scale = _zscore("actions")
    np.testing.assert_allclose(guidance.prev[:, :ACTION_DIM], (model_side - mean) / scale, rtol=1e-5, atol=1e-5)
    assert not guidance.prev[:, ACTION_DIM:].any()


def test_pi05_droid_profile_writes_the_state_into_the_prompt_whatever_the_preset() -> None:
    # openpi's pi05_droid config keeps Pi0Config's discrete_state_input=True; an openpi-config
    # profile decides over the preset (pi05_small has it off).
    policy = Policy.from_config(PolicyConfig(model_preset="pi05_small", robot_profile="pi05_droid", default_prompt="go"))
    assert policy.tokenizer.discrete_state_input
    state = np.array([-0.7, -0.3, 0.0, 0.2, 0.45, 0.6, 0.8, 0.95], np.float32)
    images = {name: np.zeros((224, 224, 3), np.uint8) for name in ("exterior_image_1_left", "wrist_image_left")}
    batch, _ = policy.network_batch(Observation(images=images, state=state))
    # openpi Normalize._normalize_quantile with the identity stats (q01 -1, q99 1).
    normalized = (state.astype(np.float64) + 1.0) / (2.0 + 1e-6) * 2.0 - 1.0
    bins = np.digitize(normalized, np.linspace(-1, 1, 256 + 1)[:-1]) - 1
    expected = [policy.tokenizer.bos_id, *policy.tokenizer.encode(f"Task: go, State: {' '.join(map(str, bins))};\nAction: ")]
    assert batch.tokens[: len(expected)].tolist() == expected and int(batch.token_mask.sum()) == len(expected)


def test_openpi_checkpoint_takes_the_action_horizon_of_the_profile(tmp_path: Path) -> None:
    # openpi checkpoints do not record the horizon; the robot profile (here overridden) sets it.
    path = write_openpi_dir(tmp_path / "ckpt", PI05_FIXTURE)
    policy = Policy.from_config(PolicyConfig(checkpoint_path=str(path), model_preset="auto",
                                             robot_profile="pi05_libero", default_prompt="go", action_horizon=12))
    assert policy.infer(_observation()).actions.shape == (12, ACTION_DIM)


def test_lerobot_config_sets_chunk_size_token_length_and_denoising_steps(tmp_path: Path) -> None:
    # LeRobot config.json: chunk_size, tokenizer_max_length, num_inference_steps (spec section 6).
    path = write_lerobot_dir(tmp_path / "ckpt", PI05_FIXTURE, "pi05")
    config = json.loads((path / "config.json").read_text())
    config.update(chunk_size=12, n_action_steps=12, tokenizer_max_length=96, num_inference_steps=4)
    (path / "config.json").write_text(json.dumps(config))
    loaded = load_checkpoint_dir(path)
    assert loaded.model_config.num_denoise_steps == 4
    policy = Policy.from_config(PolicyConfig(checkpoint_path=str(path), model_preset="auto", robot_profile="generic",
                                             state_dim=STATE_DIM, action_dim=ACTION_DIM, default_prompt="go"))
    batch, _ = policy.network_batch(Observation(images={"base": np.zeros((224, 224, 3), np.uint8)},
                                                state=np.zeros(STATE_DIM, np.float32)))
    assert batch.tokens.shape == (96,) and batch.noise.shape == (12, 32)


def test_lerobot_pi05_weights_named_action_time_mlp_load(tmp_path: Path) -> None:
    # Some LeRobot pi05 checkpoints name the time MLP action_time_mlp_*; LeRobot's loader renames
    # them to time_mlp_* (policies/pi05/modeling_pi05.py), and so must we.
    path = write_lerobot_dir(tmp_path / "ckpt", PI05_FIXTURE, "pi05")
    weights = {f"model.{k}".replace("model.time_mlp_", "model.action_time_mlp_"): v
               for k, v in load_reference(PI05_FIXTURE).weights.items()}
    assert any(k.startswith("model.action_time_mlp_in") for k in weights)
    save_file(weights, str(path / "model.safetensors"), metadata={VOCAB_ROWS_METADATA: "1024"})
    policy = Policy.from_config(PolicyConfig(checkpoint_path=str(path), model_preset="auto",
                                             robot_profile="pi05_libero"))
    batch, expected = fixture_batch(PI05_FIXTURE)
    torch.testing.assert_close(torch.from_numpy(policy.engine.infer(batch)), expected, atol=1e-4, rtol=0)


def test_vocab_rows_metadata_allows_only_a_table_of_exactly_that_many_rows(tmp_path: Path) -> None:
    # The metadata says the table was cut to 1024 rows on purpose; a table of another size is a
    # damaged checkpoint, not one to zero-pad silently.
    path = write_openpi_dir(tmp_path / "ckpt", PI05_FIXTURE)
    weights = dict(load_reference(PI05_FIXTURE).weights)
    weights[EMBED_KEY] = weights[EMBED_KEY][:512].clone()
    save_file(weights, str(path / "model.safetensors"), metadata={VOCAB_ROWS_METADATA: "1024"})
    with pytest.raises(CheckpointError, match=r"wrong shape .*embed_tokens.weight: expected \[257152, 64\], found \[512, 64\]"):
        load_checkpoint_dir(path, preset="pi05_small")


@pytest.mark.parametrize("rows", ["abc", "-1", ""])
def test_vocab_rows_metadata_that_is_not_a_count_is_one_checkpoint_error(tmp_path: Path, rows: str) -> None:
    # int() of it raised ValueError out of Policy.from_config and inspect.
    path = write_openpi_dir(tmp_path / "ckpt", PI05_FIXTURE)
    save_file(load_reference(PI05_FIXTURE).weights, str(path / "model.safetensors"), metadata={VOCAB_ROWS_METADATA: rows})
    with pytest.raises(CheckpointError, match=re.escape(f"model.safetensors: expected metadata '{VOCAB_ROWS_METADATA}' "
                                                        f"to be a row count, found {rows!r}")):
        load_checkpoint_dir(path)


def test_lerobot_type_that_does_not_match_the_weights_is_refused(tmp_path: Path) -> None:
    path = write_lerobot_dir(tmp_path / "ckpt", PI05_FIXTURE, "pi05")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "type": "pi0"}))
    with pytest.raises(CheckpointError, match="config.json says pi0, the weights are pi05"):
        load_checkpoint_dir(path)


def test_pi05_aloha_chain_follows_openpi_from_robot_values_to_robot_values(tmp_path: Path) -> None:
    """openpi's pi05_aloha inference chain, restated from openpi 15a9616a with its constants:
    AlohaInputs (policies/aloha_policy.py: _joint_flip_mask, _gripper_to_angular on dims 6 / 13),
    Normalize with quantiles (transforms.py), the discrete-state prompt (models/tokenizer.py),
    then Unnormalize, AbsoluteActions(make_bool_mask(6, -1, 6, -1)) and AlohaOutputs
    (_joint_flip_mask, _gripper_from_angular)."""
    path = write_openpi_dir(tmp_path / "ckpt", PI05_FIXTURE, asset_id="trossen")
    stats = {"state": _stats(14, 3), "actions": _stats(14, 4)}
    (path / "assets" / "trossen" / "norm_stats.json").write_text(json.dumps({"norm_stats": stats}))
    policy = Policy.from_config(PolicyConfig(checkpoint_path=str(path), model_preset="auto", robot_profile="pi05_aloha"))
    rng = np.random.default_rng(6)
    state = rng.uniform(-1.0, 1.0, 14)
    state[[6, 13]] = [0.3, 0.9]  # grippers: ALOHA's normalized finger position
    images = {name: rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
              for name in ("cam_high", "cam_left_wrist", "cam_right_wrist")}
    obs = Observation(images=images, state=state, prompt=" fold_the\ntowel ", stamp_s=0.0)
    chunk = policy.infer(obs)
    batch, _ = policy.network_batch(obs)
    raw = policy.engine.infer(batch).astype(np.float64)

    flip = np.array([1, -1, -1, 1, 1, 1, 1, 1, -1, -1, 1, 1, 1, 1])
    pi_state = flip * state
    linear = pi_state[[6, 13]] * (0.05800 - 0.01844) + 0.01844
    angle = np.arcsin(np.clip((0.022**2 + linear**2 - 0.036**2) / (2 * 0.022 * linear), -1.0, 1.0))
    pi_state[[6, 13]] = (angle - 0.5476) / (1.6296 - 0.5476)
    q01, q99 = (np.float32(stats["state"][k]).astype(np.float64) for k in ("q01", "q99"))
    normalized = (pi_state - q01) / (q99 - q01 + 1e-6) * 2.0 - 1.0
    bins = np.digitize(normalized, bins=np.linspace(-1, 1, 256 + 1)[:-1]) - 1
    text = f"Task: fold the towel, State: {' '.join(map(str, bins))};\nAction: "
    expected_ids = [policy.tokenizer.bos_id, *policy.tokenizer.encode(text)]
    assert batch.tokens[batch.token_mask].tolist() == expected_ids
    assert batch.image_masks.tolist() == [True, True, True]

    q01, q99 = (np.float32(stats["actions"][k]).astype(np.float64) for k in ("q01", "q99"))
    actions = (raw[:, :14] + 1.0) / 2.0 * (q99 - q01 + 1e-6) + q01
    actions += np.where(np.array([True] * 6 + [False] + [True] * 6 + [False]), pi_state, 0.0)
    actions = flip * actions
    actions[:, [6, 13]] = (actions[:, [6, 13]] + 0.5476 - (-0.6213)) / (1.4910 - (-0.6213))
    assert chunk.actions.shape == (50, 14)
    np.testing.assert_allclose(chunk.actions, actions, rtol=1e-5, atol=1e-5)


def _converter_config(path: Path, horizon: int) -> None:
    """The config.json openpi's convert_jax_model_to_pytorch.py writes beside the weights."""
    (path / "config.json").write_text(json.dumps({"action_dim": 32, "action_horizon": horizon,
                                                  "paligemma_variant": "gemma_2b",
                                                  "action_expert_variant": "gemma_300m", "precision": "float32"}))


def _generic_observation(seed: int) -> Observation:
    rng = np.random.default_rng(seed)
    return Observation(images={"base": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
                               "left_wrist": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)},
                       state=rng.normal(size=STATE_DIM).astype(np.float32), prompt="go", stamp_s=1.0)


@pytest.fixture(scope="module")
def pi0_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_openpi_dir(tmp_path_factory.mktemp("pi0d") / "ckpt", PI0_FIXTURE)


@pytest.mark.parametrize("runs", [(2, -1, 3), (6, -1)])
def test_generic_profile_rebuilds_absolute_actions_with_the_configured_delta_mask(pi0_dir: Path,
                                                                                 runs: tuple[int, ...]) -> None:
    # A custom openpi config trained with DeltaActions(make_bool_mask(*runs)) serves through the
    # generic profile: openpi's AbsoluteActions adds the (unnormalized) state back after Unnormalize,
    # actions[..., :n] += where(mask, state[..., :n], 0).
    policy = Policy.from_config(PolicyConfig(checkpoint_path=str(pi0_dir), model_preset="auto",
                                             robot_profile="generic", state_dim=STATE_DIM, action_dim=ACTION_DIM,
                                             delta_action_mask=runs))
    obs = _generic_observation(7)
    chunk = policy.infer(obs)
    batch, _ = policy.network_batch(obs)
    mean, scale = _zscore("actions")
    expected = policy.engine.infer(batch).astype(np.float64)[:, :ACTION_DIM] * scale + mean
    mask = np.array([run > 0 for run in runs for _ in range(abs(run))])
    expected[:, : mask.size] += np.where(mask, obs.state[: mask.size], 0.0)
    np.testing.assert_allclose(chunk.actions, expected, rtol=1e-5, atol=1e-5)
    # RTC guidance takes the state off the same dims (the inverse of the output transform).
    guidance = policy.engine_guidance(ChunkGuidance(prev_actions=chunk.actions, delay_steps=1, mask_end=5), obs.state)
    model_side = chunk.actions.astype(np.float64)
    model_side[:, : mask.size] -= np.where(mask, obs.state[: mask.size], 0.0)
    np.testing.assert_allclose(guidance.prev[:, :ACTION_DIM], (model_side - mean) / scale, rtol=1e-4, atol=1e-4)


def test_a_delta_mask_replaces_a_named_profiles_mask(pi0_dir: Path) -> None:
    # (-7,): pi0_libero without its delta actions (any profile takes the mask, as the other profile_* values).
    policy = Policy.from_config(PolicyConfig(checkpoint_path=str(pi0_dir), model_preset="auto",
                                             robot_profile="pi0_libero", delta_action_mask=(-ACTION_DIM,)))
    assert policy.profile.delta_action_mask == (False,) * ACTION_DIM
    obs = _observation(3, prompt="go")
    batch, _ = policy.network_batch(obs)
    mean, scale = _zscore("actions")
    expected = policy.engine.infer(batch).astype(np.float64)[:, :ACTION_DIM] * scale + mean
    np.testing.assert_allclose(policy.infer(obs).actions, expected, rtol=1e-5, atol=1e-5)


def test_a_delta_mask_wider_than_the_actions_or_not_runs_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"profile_delta_action_mask \[6, -2\] covers 8 action dims: expected at "
                                          r"most the action_dim 7 of robot profile 'pi05_libero'"):
        Policy.from_config(PolicyConfig(model_preset="pi05_small", robot_profile="pi05_libero",
                                        delta_action_mask=(6, -2)))
    with pytest.raises(ConfigError, match=r"covers 6 action dims: expected at most the action_dim 5 of robot "
                                          r"profile 'generic'"):
        Policy.from_config(PolicyConfig(model_preset="pi05_small", robot_profile="generic", state_dim=5,
                                        action_dim=5, delta_action_mask=(6,)))
    with pytest.raises(ConfigError, match=r"delta_action_mask must be make_bool_mask runs \(integers"):
        PolicyConfig(delta_action_mask=(True, False))


def test_lerobot_checkpoint_with_a_configured_delta_mask_is_warned_to_drop_it(tmp_path: Path,
                                                                             caplog: pytest.LogCaptureFixture) -> None:
    # The advice "use the generic profile" does not help where the generic profile carries the mask.
    path = write_lerobot_dir(tmp_path / "ckpt", PI0_FIXTURE, "pi0")
    with caplog.at_level("WARNING", logger="pi0_policy_ros.policy.policy"):
        Policy.from_config(PolicyConfig(checkpoint_path=str(path), model_preset="auto", robot_profile="generic",
                                        state_dim=STATE_DIM, action_dim=ACTION_DIM, delta_action_mask=(6, -1)))
    assert [r.getMessage() for r in caplog.records if "training transforms" in r.getMessage()] == [
        "robot profile generic applies openpi's training transforms (delta actions), which LeRobot's own pipeline "
        "does not: for a checkpoint trained in LeRobot use the generic profile without profile_delta_action_mask"]


@pytest.mark.parametrize("recorded", [12, None])
def test_generic_profile_samples_the_horizon_the_checkpoint_records(tmp_path: Path, recorded: int | None,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    # Spec section 5: the generic profile's horizon comes from the checkpoint (openpi's converter
    # writes the training config's action_horizon into config.json); without one, the profile's 50.
    path = write_openpi_dir(tmp_path / "ckpt", PI0_FIXTURE)
    if recorded is not None:
        _converter_config(path, recorded)
    with caplog.at_level("INFO", logger="pi0_policy_ros.policy.checkpoint_dir"):
        policy = Policy.from_config(PolicyConfig(checkpoint_path=str(path), model_preset="auto",
                                                 robot_profile="generic", state_dim=STATE_DIM, action_dim=ACTION_DIM))
    horizon = recorded or 50
    assert policy.infer(_generic_observation(1)).actions.shape == (horizon, ACTION_DIM)
    assert policy.model_config.action_horizon == policy.profile.action_horizon == horizon
    messages = [r.getMessage() for r in caplog.records]
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    if recorded is None:
        assert any("config.json records no action_horizon" in m and "sampling 50 actions" in m for m in messages)
    else:
        assert any("action_horizon 12, the training horizon its config.json records" in m for m in messages)


def test_profile_action_horizon_and_named_profiles_keep_their_horizon_over_the_checkpoints(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_openpi_dir(tmp_path / "ckpt", PI05_FIXTURE)
    _converter_config(path, 12)
    with caplog.at_level("WARNING", logger="pi0_policy_ros.policy.checkpoint_dir"):
        generic = Policy.from_config(PolicyConfig(checkpoint_path=str(path), model_preset="auto",
                                                  robot_profile="generic", state_dim=STATE_DIM,
                                                  action_dim=ACTION_DIM, action_horizon=8))
        named = Policy.from_config(PolicyConfig(checkpoint_path=str(path), model_preset="auto",
                                                robot_profile="pi05_libero"))
    assert generic.model_config.action_horizon == 8 and named.model_config.action_horizon == 10
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2 and all("trained with action_horizon 12" in w for w in warnings)


def test_lerobot_chunk_size_is_the_generic_profiles_horizon(tmp_path: Path) -> None:
    path = write_lerobot_dir(tmp_path / "ckpt", PI05_FIXTURE, "pi05")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "chunk_size": 12, "n_action_steps": 12}))
    policy = Policy.from_config(PolicyConfig(checkpoint_path=str(path), model_preset="auto", robot_profile="generic",
                                             state_dim=STATE_DIM, action_dim=ACTION_DIM))
    assert policy.profile.action_horizon == policy.model_config.action_horizon == 12
    assert policy.infer(_generic_observation(2)).actions.shape == (12, ACTION_DIM)


def test_a_tokenizer_larger_than_the_embedding_table_is_refused(tmp_path: Path) -> None:
    # Its ids past the stored rows would read zero rows: the instruction garbled without a word.
    path = write_openpi_dir(tmp_path / "ckpt", PI05_FIXTURE)
    weights = dict(load_reference(PI05_FIXTURE).weights)
    weights[EMBED_KEY] = weights[EMBED_KEY][:256].clone()
    save_file(weights, str(path / "model.safetensors"), metadata={VOCAB_ROWS_METADATA: "256"})
    pieces = sentencepiece.SentencePieceProcessor(model_file=str(path / "paligemma_tokenizer.model")).get_piece_size()
    assert pieces > 256
    with pytest.raises(ConfigError, match=rf"paligemma_tokenizer.model: expected at most the checkpoint's 256 embedding "
                                          rf"rows of vocabulary, found {pieces} pieces"):
        Policy.from_config(PolicyConfig(checkpoint_path=str(path), model_preset="auto", robot_profile="pi05_libero"))


def test_a_full_table_and_a_tokenizer_of_another_size_is_a_warning(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    path = write_openpi_dir(tmp_path / "ckpt", PI05_FIXTURE)
    weights = dict(load_reference(PI05_FIXTURE).weights)
    table = torch.zeros(PRESETS["pi05_small"].vocab_size, weights[EMBED_KEY].shape[1])
    table[:1024] = weights[EMBED_KEY]
    weights[EMBED_KEY] = table
    save_file(weights, str(path / "model.safetensors"))  # a full table: no vocab_rows_stored
    with caplog.at_level("WARNING", logger="pi0_policy_ros.policy.policy"):
        Policy.from_config(PolicyConfig(checkpoint_path=str(path), model_preset="auto", robot_profile="pi05_libero"))
    assert f"the checkpoint's embedding table {table.shape[0]} rows: expected PaliGemma's tokenizer" in caplog.text

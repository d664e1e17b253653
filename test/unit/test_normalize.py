"""Normalization: formulas and width rules of spec section 3, openpi and LeRobot stats files."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from pi0_policy_ros.errors import CheckpointError, ConfigError
from pi0_policy_ros.policy.normalize import (
    LeRobotNormalization,
    NormStats,
    Normalizer,
    check_stats_dims,
    find_openpi_norm_stats,
    identity_stats,
    load_lerobot_normalization,
    load_lerobot_stats,
    load_openpi_norm_stats,
)
from pi0_policy_ros.policy.robots import get_profile

MEAN = np.array([1.0, -2.0, 0.5])
STD = np.array([2.0, 0.5, 1.0])
Q01 = np.array([-1.0, -3.0, 0.0])
Q99 = np.array([3.0, 1.0, 0.0])  # last dim degenerate: q99 == q01


def stats3() -> dict[str, NormStats]:
    entry = NormStats(mean=MEAN, std=STD, q01=Q01, q99=Q99)
    return {"state": entry, "actions": entry}


def test_norm_stats_are_float32_read_only_and_one_width() -> None:
    stats = NormStats(mean=[1, 2], std=[3, 4])
    assert stats.mean.dtype == np.float32 and stats.dim == 2 and not stats.has_quantiles
    with pytest.raises(ValueError):
        stats.mean[0] = 0.0
    with pytest.raises(ConfigError, match="one width"):
        NormStats(mean=[1, 2], std=[3, 4], q01=[0], q99=[1])


def test_openpi_zscore_formula_and_round_trip() -> None:
    normalizer = Normalizer(stats3(), use_quantiles=False)
    x = np.array([[3.0, -1.0, 10.0], [-5.0, 0.0, 0.5]])
    normalized = normalizer.normalize("state", x)
    np.testing.assert_allclose(normalized, (x - MEAN) / (STD + 1e-6), rtol=1e-6)
    assert normalized.dtype == np.float32
    np.testing.assert_allclose(normalizer.unnormalize("actions", normalized), x, rtol=1e-5, atol=1e-5)


def test_openpi_quantile_formula_round_trip_and_no_clipping() -> None:
    normalizer = Normalizer(stats3(), use_quantiles=True)
    x = np.array([10.0, -3.0, 0.0])  # first dim far outside [q01, q99]
    normalized = normalizer.normalize("state", x)
    np.testing.assert_allclose(normalized, (x - Q01) / (Q99 - Q01 + 1e-6) * 2 - 1, rtol=1e-6)
    assert normalized[0] > 1.0 and normalized[1] == pytest.approx(-1.0)
    np.testing.assert_allclose(normalizer.unnormalize("actions", normalized), x, atol=1e-5)


def test_quantile_and_zscore_differ() -> None:
    x = np.array([2.0, 0.0, 0.3])
    quantile = Normalizer(stats3(), use_quantiles=True).normalize("state", x)
    zscore = Normalizer(stats3(), use_quantiles=False).normalize("state", x)
    assert not np.allclose(quantile, zscore)


def test_normalize_cuts_longer_stats_to_the_input_width() -> None:
    normalizer = Normalizer(stats3(), use_quantiles=False)
    np.testing.assert_allclose(normalizer.normalize("state", np.array([3.0, -1.0])),
                               (np.array([3.0, -1.0]) - MEAN[:2]) / (STD[:2] + 1e-6), rtol=1e-6)
    with pytest.raises(ConfigError, match="3 dims, fewer than the 5"):
        normalizer.normalize("state", np.zeros(5))


def test_zscore_unnormalize_pads_mean_with_0_and_std_with_1() -> None:
    x = np.full((2, 5), 0.5)
    out = Normalizer(stats3(), use_quantiles=False).unnormalize("actions", x)
    np.testing.assert_allclose(out[:, :3], np.tile(0.5 * (STD + 1e-6) + MEAN, (2, 1)), rtol=1e-6)
    np.testing.assert_allclose(out[:, 3:], 0.5 * (1.0 + 1e-6), rtol=1e-7)


def test_quantile_unnormalize_passes_dims_past_the_stats_through() -> None:
    x = np.array([[0.0, 1.0, -1.0, 7.0, -7.0]])
    out = Normalizer(stats3(), use_quantiles=True).unnormalize("actions", x)
    np.testing.assert_allclose(out[0, :3], (x[0, :3] + 1) / 2 * (Q99 - Q01 + 1e-6) + Q01, rtol=1e-6)
    assert out[0, 3:].tolist() == [7.0, -7.0]


def test_unnormalize_rejects_narrower_input_and_missing_keys() -> None:
    normalizer = Normalizer(stats3(), use_quantiles=False)
    with pytest.raises(ConfigError, match="more than the 2"):
        normalizer.unnormalize("actions", np.zeros(2))
    with pytest.raises(ConfigError, match="no norm stats for 'other'"):
        normalizer.unnormalize("other", np.zeros(3))


def test_normalize_skips_keys_without_stats() -> None:
    x = np.array([1.5, 2.5])
    np.testing.assert_array_equal(Normalizer(stats3(), use_quantiles=False).normalize("other", x), x)


def test_quantile_normalization_without_quantiles_is_a_config_error() -> None:
    stats = {"state": NormStats(mean=MEAN, std=STD), "actions": stats3()["actions"]}
    with pytest.raises(ConfigError, match=r"q01 and q99.*\['state'\]"):
        Normalizer(stats, use_quantiles=True)
    Normalizer(stats, use_quantiles=False)  # z-score does not need them


def test_lerobot_convention_formulas() -> None:
    normalizer = Normalizer(stats3(), use_quantiles=False, convention="lerobot")
    assert normalizer.eps == 1e-8
    x = np.array([3.0, -1.0, 10.0])
    np.testing.assert_allclose(normalizer.normalize("state", x), (x - MEAN) / (STD + 1e-8), rtol=1e-6)
    np.testing.assert_allclose(normalizer.unnormalize("actions", x), x * STD + MEAN, rtol=1e-6)

    quantile = Normalizer(stats3(), use_quantiles=True, convention="lerobot")
    span = np.array([4.0, 4.0, 1e-8])  # eps only where q99 == q01
    normalized = quantile.normalize("state", np.array([1.0, -1.0, 0.0]))
    np.testing.assert_allclose(normalized, 2 * (np.array([1.0, -1.0, 0.0]) - Q01) / span - 1, rtol=1e-6)
    np.testing.assert_allclose(quantile.unnormalize("actions", np.array([0.0, 0.5, 1.0])),
                               (np.array([0.0, 0.5, 1.0]) + 1) * span / 2 + Q01, rtol=1e-6)


def test_unknown_convention_and_explicit_eps() -> None:
    with pytest.raises(ConfigError, match="convention"):
        Normalizer(stats3(), use_quantiles=False, convention="jax")  # type: ignore[arg-type]
    assert Normalizer(stats3(), use_quantiles=False, eps=1e-3).eps == 1e-3


@pytest.mark.parametrize("use_quantiles,stat,expected", [
    (True, "q99", r"'actions' norm stats: expected q01 <= q99 \(quantile normalization\), found the opposite at dims \[1\]"),
    (False, "std", r"'actions' norm stats: expected std >= 0 \(z-score normalization\), found the opposite at dims \[1\]"),
])
def test_stats_that_would_mirror_the_actions_are_a_config_error(use_quantiles: bool, stat: str, expected: str) -> None:
    # q01 above q99 (or a negative std) loaded: every action came out mirrored about the
    # mid-range (the mean), finite and plausible-looking.
    values = {"mean": MEAN, "std": STD, "q01": Q01, "q99": Q99}
    values[stat] = values[stat] - np.array([0.0, 5.0, 0.0])
    stats = {"state": stats3()["state"], "actions": NormStats(**values)}
    with pytest.raises(ConfigError, match=expected):
        Normalizer(stats, use_quantiles=use_quantiles)
    Normalizer(stats, use_quantiles=not use_quantiles)  # stats the other mode does not read are not checked


def test_identity_stats_leave_values_nearly_unchanged() -> None:
    stats = identity_stats(state_dim=8, action_dim=7)
    assert stats["state"].dim == 8 and stats["actions"].dim == 7
    x = np.linspace(-1, 1, 7)
    for use_quantiles in (False, True):
        normalizer = Normalizer(stats, use_quantiles=use_quantiles)
        np.testing.assert_allclose(normalizer.normalize("actions", x), x, atol=1e-5)
        np.testing.assert_allclose(normalizer.unnormalize("actions", x), x, atol=1e-5)


def test_check_stats_dims_names_both_numbers() -> None:
    stats = identity_stats(state_dim=8, action_dim=7)
    check_stats_dims(stats, get_profile("pi05_libero"))
    with pytest.raises(ConfigError, match=r"'state' norm stats have 8 dims but the robot profile has 14"):
        check_stats_dims(stats, get_profile("pi0_aloha"))
    droid = get_profile("pi05_droid")
    with pytest.raises(ConfigError, match=r"'actions' norm stats have 7 dims but the robot profile has 8"):
        check_stats_dims(stats, droid)
    check_stats_dims(identity_stats(8, 32), droid, max_dim=32)
    with pytest.raises(ConfigError, match=r"'actions' norm stats have 33 dims but the robot profile has 8 \(stats of 8 to 32"):
        check_stats_dims(identity_stats(8, 33), droid, max_dim=32)
    with pytest.raises(ConfigError, match="no 'actions' entry"):
        check_stats_dims({"state": stats["state"]}, get_profile("pi05_libero"))


def test_wider_stats_that_are_not_zero_padding_are_warned(caplog: pytest.LogCaptureFixture) -> None:
    # openpi's stats of checkpoints trained before June 2025 have 32 dims, zero past the robot's
    # (it padded state and actions with zeros first). Another robot's stats (ALOHA's 14 dims on the
    # 8-dim LIBERO robot) loaded without a word: real statistics there are a warning.
    libero = get_profile("pi05_libero")  # state 8, actions 7
    rng = np.random.default_rng(0)

    def stats(width: int, real: int) -> NormStats:
        values = {name: np.zeros(width) for name in ("mean", "std", "q01", "q99")}
        for name, value in values.items():
            value[:real] = rng.uniform(0.1, 1.0, real) * (-1 if name == "q01" else 1)
        return NormStats(**values)

    with caplog.at_level(logging.WARNING, logger="pi0_policy_ros.policy.normalize"):
        check_stats_dims({"state": stats(32, 8), "actions": stats(32, 7)}, libero, max_dim=32)  # padded
        assert caplog.records == []
        check_stats_dims({"state": stats(14, 14), "actions": stats(14, 9)}, libero, max_dim=32)  # ALOHA's
    assert [r.getMessage() for r in caplog.records] == [
        f"'{key}' norm stats have 14 dims, the robot profile {dim}: dims {dim}-13 are not zero padding (openpi's "
        f"padded stats are 0 there), so they may be another robot's stats (wrong asset_id or robot_profile?); the "
        f"first {dim} are used, as openpi does" for key, dim in (("state", 8), ("actions", 7))]


def test_quantile_normalization_needs_both_quantiles() -> None:
    # q99 null in the file (q01 present): quantile normalization cannot run, and says so at load.
    stats = {"state": NormStats(mean=MEAN, std=STD, q01=Q01), "actions": stats3()["actions"]}
    assert not stats["state"].has_quantiles
    with pytest.raises(ConfigError, match=r"q01 and q99.*\['state'\]"):
        Normalizer(stats, use_quantiles=True)


def test_explicit_eps_follows_each_conventions_formula() -> None:
    # A large eps shows where each convention adds it: openpi to every std and quantile span,
    # LeRobot to the z-score's normalize only (unnormalize x * std + mean) and to zero spans only.
    x = np.array([0.5, -0.5, 0.25])
    openpi = Normalizer(stats3(), use_quantiles=True, eps=0.5)
    np.testing.assert_allclose(openpi.unnormalize("actions", x), (x + 1) / 2 * (Q99 - Q01 + 0.5) + Q01, rtol=1e-6)
    lerobot = Normalizer(stats3(), use_quantiles=False, eps=0.5, convention="lerobot")
    np.testing.assert_allclose(lerobot.normalize("state", x), (x - MEAN) / (STD + 0.5), rtol=1e-6)
    np.testing.assert_allclose(lerobot.unnormalize("actions", x), x * STD + MEAN, rtol=1e-6)


def test_the_normalizer_keeps_the_stats_it_checked() -> None:
    # Its stats are checked when it is made: a later change to the caller's dict (here swapped
    # quantiles, which would mirror every action) does not reach it.
    stats = stats3()
    normalizer = Normalizer(stats, use_quantiles=True)
    stats["actions"] = NormStats(mean=MEAN, std=STD, q01=Q99 + 1.0, q99=Q01)
    np.testing.assert_allclose(normalizer.unnormalize("actions", np.array([-1.0, 1.0, 0.0])),
                               [Q01[0], Q99[1], Q01[2] + 0.5e-6], rtol=1e-6, atol=1e-6)


def test_wider_stats_with_real_quantiles_past_the_robot_are_warned(caplog: pytest.LogCaptureFixture) -> None:
    # Zero mean and std past the robot's dims, but another robot's quantiles there (negative q01):
    # not zero padding. Float32 rounding of zero padding (1e-7) is still padding.
    libero = get_profile("pi05_libero")  # state 8, actions 7
    padded = {"state": identity_stats(8, 7)["state"]}
    values = {name: np.zeros(32) for name in ("mean", "std", "q01", "q99")}
    values["std"][:7], values["q01"][:7], values["q99"][:7] = 1.0, -1.0, 1.0
    values["mean"][7:] = 1e-7
    with caplog.at_level(logging.WARNING, logger="pi0_policy_ros.policy.normalize"):
        check_stats_dims({**padded, "actions": NormStats(**values)}, libero, max_dim=32)
        assert caplog.records == []
        values["q01"][7:12] = -0.5
        check_stats_dims({**padded, "actions": NormStats(**values)}, libero, max_dim=32)
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["'actions' norm stats have 32 dims, the robot "
                                                                      "profile 7"]


def test_a_norm_stats_document_of_another_shape_is_a_checkpoint_error(tmp_path: Path) -> None:
    bad = tmp_path / "norm_stats.json"
    bad.write_text(json.dumps({"norm_stats": [{"mean": [0.0], "std": [1.0]}]}))
    with pytest.raises(CheckpointError, match=r"expected a top-level 'norm_stats' object, found keys \['norm_stats'\]"):
        load_openpi_norm_stats(bad)


def test_a_broken_link_to_the_norm_stats_is_found_and_named_by_the_loader(tmp_path: Path) -> None:
    # Not "found 0": the asset is there, its stats file a link to nothing; the loader names it.
    asset = tmp_path / "assets" / "trossen"
    asset.mkdir(parents=True)
    (asset / "norm_stats.json").symlink_to(tmp_path / "gone" / "norm_stats.json")
    path = find_openpi_norm_stats(tmp_path)
    assert path == asset / "norm_stats.json"
    with pytest.raises(CheckpointError, match=rf"cannot read openpi norm stats {re.escape(str(path))}"):
        load_openpi_norm_stats(path)


# --- openpi norm_stats.json -----------------------------------------------------------------------

def write_openpi_stats(directory: Path, with_quantiles: str) -> Path:
    entry: dict[str, object] = {"mean": [0.0, 1.0], "std": [1.0, 2.0]}
    if with_quantiles == "yes":
        entry.update(q01=[-1.0, -2.0], q99=[1.0, 2.0])
    elif with_quantiles == "null":
        entry.update(q01=None, q99=None)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "norm_stats.json"
    path.write_text(json.dumps({"norm_stats": {"state": entry, "actions": entry}}))
    return path


@pytest.mark.parametrize("with_quantiles", ["yes", "null", "absent"])
def test_load_openpi_norm_stats(tmp_path: Path, with_quantiles: str) -> None:
    path = write_openpi_stats(tmp_path, with_quantiles)
    for source in (path, tmp_path):
        stats = load_openpi_norm_stats(source)
        assert sorted(stats) == ["actions", "state"]
        assert stats["state"].std.tolist() == [1.0, 2.0]
        assert stats["actions"].has_quantiles == (with_quantiles == "yes")


def test_load_openpi_norm_stats_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="cannot read"):
        load_openpi_norm_stats(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"stats": {}}))
    with pytest.raises(CheckpointError, match="'norm_stats'"):
        load_openpi_norm_stats(bad)
    bad.write_text(json.dumps({"norm_stats": {"state": {"mean": [0.0]}}}))
    with pytest.raises(CheckpointError, match="'mean' and 'std'"):
        load_openpi_norm_stats(bad)
    bad.write_text(json.dumps({"norm_stats": {"state": {"mean": [0.0], "std": [1.0, 2.0]}}}))
    with pytest.raises(CheckpointError, match="one width"):
        load_openpi_norm_stats(bad)


def test_find_openpi_norm_stats(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="found 0"):
        find_openpi_norm_stats(tmp_path)
    write_openpi_stats(tmp_path / "assets" / "trossen", "yes")
    assert find_openpi_norm_stats(tmp_path) == tmp_path / "assets" / "trossen" / "norm_stats.json"
    write_openpi_stats(tmp_path / "assets" / "droid", "yes")
    with pytest.raises(ConfigError, match=r"found 2: \['droid', 'trossen'\]"):
        find_openpi_norm_stats(tmp_path)
    assert find_openpi_norm_stats(tmp_path, "droid").parent.name == "droid"
    with pytest.raises(ConfigError, match="libero"):
        find_openpi_norm_stats(tmp_path, "libero")


def test_symlinked_asset_folders_are_found(tmp_path: Path) -> None:
    # People link norm stats in (assets/<id> -> a shared folder); rglob did not enter a linked folder,
    # so an empty asset_id found none ("found 0: []").
    ckpt = tmp_path / "ckpt"
    write_openpi_stats(tmp_path / "shared" / "trossen", "yes")
    (ckpt / "assets").mkdir(parents=True)
    (ckpt / "assets" / "trossen").symlink_to(tmp_path / "shared" / "trossen", target_is_directory=True)
    assert find_openpi_norm_stats(ckpt) == ckpt / "assets" / "trossen" / "norm_stats.json"
    # An id of several parts, linked at its first: the walk goes on below the link.
    (ckpt / "assets" / "trossen").unlink()
    write_openpi_stats(tmp_path / "shared" / "physical-intelligence" / "libero", "yes")
    (ckpt / "assets" / "physical-intelligence").symlink_to(tmp_path / "shared" / "physical-intelligence")
    # A link back up would be walked forever: it ends there, and names no asset of its own.
    (tmp_path / "shared" / "physical-intelligence" / "libero" / "up").symlink_to(ckpt / "assets")
    assert find_openpi_norm_stats(ckpt) == ckpt / "assets" / "physical-intelligence" / "libero" / "norm_stats.json"


# --- LeRobot processor files ----------------------------------------------------------------------

def lerobot_step(registry_name: str, state_file: str | None, norm_map: dict[str, str]) -> dict[str, object]:
    step: dict[str, object] = {
        "registry_name": registry_name,
        "config": {
            "eps": 1e-8,
            "features": {"observation.state": {"type": "STATE", "shape": [8]},
                         "action": {"type": "ACTION", "shape": [7]}},
            "norm_map": norm_map,
        },
    }
    if state_file is not None:
        step["state_file"] = state_file
    return step


def write_lerobot_checkpoint(directory: Path, mode: str = "QUANTILES") -> None:
    """Processor files as LeRobot 0.6.x lays them out (normalizer at step 3)."""
    norm_map = {"VISUAL": "IDENTITY", "STATE": mode, "ACTION": mode}
    rng = np.random.default_rng(0)
    pre_stats: dict[str, np.ndarray] = {}
    for feature, dim in (("observation.state", 8), ("action", 7)):
        for stat in ("mean", "std", "min", "max", "q01", "q99"):
            pre_stats[f"{feature}.{stat}"] = rng.normal(size=dim).astype(np.float32)
        # As a data set gives them: std >= 0, q01 <= q99.
        pre_stats[f"{feature}.std"] = np.abs(pre_stats[f"{feature}.std"])
        low, high = pre_stats[f"{feature}.q01"], pre_stats[f"{feature}.q99"]
        pre_stats[f"{feature}.q01"], pre_stats[f"{feature}.q99"] = np.minimum(low, high), np.maximum(low, high)
    pre_stats["observation.images.base.mean"] = np.zeros((3, 1, 1), dtype=np.float32)
    post_stats = {k: v + 100.0 for k, v in pre_stats.items() if k.startswith("action.")}
    save_file(pre_stats, str(directory / "policy_preprocessor_step_3_normalizer_processor.safetensors"))
    save_file(post_stats, str(directory / "policy_postprocessor_step_0_unnormalizer_processor.safetensors"))
    pre = {"name": "policy_preprocessor", "steps": [
        {"registry_name": "rename_observations_processor", "config": {"rename_map": {}}},
        {"registry_name": "to_batch_processor", "config": {}},
        {"registry_name": "pi05_prepare_state_tokenizer_processor_step", "config": {}},
        lerobot_step("normalizer_processor", "policy_preprocessor_step_3_normalizer_processor.safetensors", norm_map),
    ]}
    post = {"name": "policy_postprocessor", "steps": [
        lerobot_step("unnormalizer_processor", "policy_postprocessor_step_0_unnormalizer_processor.safetensors",
                     norm_map),
        {"registry_name": "device_processor", "config": {"device": "cpu"}},
    ]}
    (directory / "policy_preprocessor.json").write_text(json.dumps(pre))
    (directory / "policy_postprocessor.json").write_text(json.dumps(post))


def test_load_lerobot_stats_follows_state_file_entries(tmp_path: Path) -> None:
    write_lerobot_checkpoint(tmp_path)
    stats = load_lerobot_stats(tmp_path)
    assert sorted(stats) == ["actions", "state"]
    assert stats["state"].dim == 8 and stats["actions"].dim == 7 and stats["state"].has_quantiles
    # Actions come from the postprocessor's unnormalizer (its stats were shifted by 100).
    assert stats["actions"].mean.min() > 90.0 and stats["state"].mean.max() < 10.0


def test_the_state_stats_come_from_the_preprocessor_when_both_files_have_them(tmp_path: Path) -> None:
    # LeRobot saves every data set stat in both steps' files, and normalizes the state with the
    # preprocessor's. The postprocessor, read last, replaced them: where the two differ the state
    # was normalized with stats LeRobot never uses for it.
    write_lerobot_checkpoint(tmp_path)
    pre = tmp_path / "policy_preprocessor_step_3_normalizer_processor.safetensors"
    post = tmp_path / "policy_postprocessor_step_0_unnormalizer_processor.safetensors"
    pre_stats, post_stats = load_file(str(pre)), load_file(str(post))
    state_stats = {k: v for k, v in pre_stats.items() if k.startswith("observation.state.")}
    save_file({**post_stats, **{k: v - 100.0 for k, v in state_stats.items()}}, str(post))
    stats = load_lerobot_stats(tmp_path)
    np.testing.assert_array_equal(stats["state"].mean, state_stats["observation.state.mean"])
    assert stats["actions"].mean.min() > 90.0  # still the postprocessor's


def test_a_state_file_outside_the_checkpoint_is_refused(tmp_path: Path) -> None:
    # The stats of another checkpoint beside this one were read as this one's.
    checkpoint, other = tmp_path / "ckpt", tmp_path / "other"
    for directory in (checkpoint, other):
        directory.mkdir()
        write_lerobot_checkpoint(directory)
    document = json.loads((checkpoint / "policy_postprocessor.json").read_text())
    document["steps"][0]["state_file"] = "../other/policy_postprocessor_step_0_unnormalizer_processor.safetensors"
    (checkpoint / "policy_postprocessor.json").write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match=r"unnormalizer_processor: expected a state_file inside .*ckpt, found "
                                              r"'\.\./other/"):
        load_lerobot_stats(checkpoint)


def test_a_checkpoint_in_the_hugging_face_hub_cache_layout_loads(tmp_path: Path) -> None:
    # huggingface_hub's cache (how LeRobot checkpoints are downloaded) keeps each file in blobs/ and
    # links it from snapshots/<revision>/: the stats files resolved outside the snapshot and were
    # refused as another checkpoint's.
    written, snapshot = tmp_path / "written", tmp_path / "models--lerobot--pi05" / "snapshots" / "abc123"
    written.mkdir()
    write_lerobot_checkpoint(written)
    blobs = snapshot.parent.parent / "blobs"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for index, file in enumerate(sorted(written.iterdir())):
        file.rename(blobs / f"blob{index}")
        (snapshot / file.name).symlink_to(f"../../blobs/blob{index}")
    stats = load_lerobot_stats(snapshot)
    assert sorted(stats) == ["actions", "state"]
    assert stats["actions"].mean.min() > 90.0 and stats["state"].mean.max() < 10.0


@pytest.mark.parametrize(("mode", "use_quantiles"), [("QUANTILES", True), ("MEAN_STD", False)])
def test_load_lerobot_normalization_reads_modes_and_eps(tmp_path: Path, mode: str, use_quantiles: bool) -> None:
    write_lerobot_checkpoint(tmp_path, mode)
    loaded = load_lerobot_normalization(tmp_path)
    assert loaded.use_quantiles is use_quantiles and loaded.eps == 1e-8
    normalizer = loaded.normalizer()
    assert normalizer.convention == "lerobot" and normalizer.use_quantiles is use_quantiles


def test_lerobot_mixed_modes_are_a_config_error(tmp_path: Path) -> None:
    write_lerobot_checkpoint(tmp_path)
    document = json.loads((tmp_path / "policy_postprocessor.json").read_text())
    document["steps"][0]["config"]["norm_map"]["ACTION"] = "MIN_MAX"
    (tmp_path / "policy_postprocessor.json").write_text(json.dumps(document))
    with pytest.raises(ConfigError, match="ACTION='MIN_MAX'"):
        _ = load_lerobot_normalization(tmp_path).use_quantiles


def test_lerobot_loader_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="policy_preprocessor.json"):
        load_lerobot_stats(tmp_path)
    write_lerobot_checkpoint(tmp_path)
    (tmp_path / "policy_postprocessor_step_0_unnormalizer_processor.safetensors").unlink()
    with pytest.raises(CheckpointError, match="unnormalizer_processor"):
        load_lerobot_stats(tmp_path)
    (tmp_path / "policy_preprocessor.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read LeRobot processor file"):
        load_lerobot_stats(tmp_path)


def _edit_postprocessor(directory: Path, edit) -> None:
    path = directory / "policy_postprocessor.json"
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document))


@pytest.mark.parametrize("edit,expected", [
    (lambda d: d.update(steps=5), "expected 'steps' to be a list, found int"),
    (lambda d: d["steps"][0].update(config="MEAN_STD"), "step unnormalizer_processor: expected 'config' to be an object"),
    (lambda d: d["steps"][0]["config"].update(norm_map=["QUANTILES"]), "expected 'norm_map' to be an object, found list"),
    (lambda d: d["steps"][0]["config"].update(eps="abc"), "expected 'eps' to be a finite number >= 0, found 'abc'"),
    (lambda d: d["steps"][0]["config"].update(eps=None), "expected 'eps' to be a finite number >= 0, found None"),
    (lambda d: d["steps"][0]["config"].update(eps=-1.0), "expected 'eps' to be a finite number >= 0, found -1.0"),
], ids=["steps", "config", "norm_map", "eps-string", "eps-null", "eps-negative"])
def test_lerobot_processor_file_of_another_shape_is_one_checkpoint_error(tmp_path: Path, edit, expected: str) -> None:
    # These raised TypeError / AttributeError / ValueError tracebacks; a negative eps loaded, and
    # the z-score unnormalizer's std + eps could reach 0.
    write_lerobot_checkpoint(tmp_path)
    _edit_postprocessor(tmp_path, edit)
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'policy_postprocessor.json'}")) as info:
        load_lerobot_normalization(tmp_path)
    assert expected in str(info.value)


def test_lerobot_processor_file_that_is_not_an_object_is_one_checkpoint_error(tmp_path: Path) -> None:
    write_lerobot_checkpoint(tmp_path)
    (tmp_path / "policy_preprocessor.json").write_text("[]")
    with pytest.raises(CheckpointError, match="expected a JSON object with a 'steps' list, found list"):
        load_lerobot_normalization(tmp_path)


def test_lerobot_eps_is_read_from_the_processor_config(tmp_path: Path) -> None:
    # LeRobot's (un)normalizer steps save their own eps (normalize_processor.py: NormalizerProcessorStep.eps);
    # a checkpoint that trained with another one must be normalized with it, not with the 1e-8 default.
    write_lerobot_checkpoint(tmp_path, "MEAN_STD")
    for name in ("policy_preprocessor.json", "policy_postprocessor.json"):
        document = json.loads((tmp_path / name).read_text())
        for step in document["steps"]:
            if "state_file" in step:
                step["config"]["eps"] = 0.25
        (tmp_path / name).write_text(json.dumps(document))
    loaded = load_lerobot_normalization(tmp_path)
    assert loaded.eps == 0.25
    stats = loaded.stats["state"]
    x = np.linspace(-1.0, 1.0, 8)
    np.testing.assert_allclose(loaded.normalizer().normalize("state", x),
                               (x - stats.mean) / (stats.std + 0.25), rtol=1e-5, atol=1e-6)


def test_a_stray_norm_stats_json_at_the_assets_root_is_not_an_asset(tmp_path: Path) -> None:
    # openpi saves stats under assets/<asset_id>/ only; a copy at assets/ itself names no asset.
    write_openpi_stats(tmp_path / "assets", "yes")
    write_openpi_stats(tmp_path / "assets" / "trossen", "yes")
    assert find_openpi_norm_stats(tmp_path) == tmp_path / "assets" / "trossen" / "norm_stats.json"


def test_a_normalizer_step_without_a_state_file_is_skipped(tmp_path: Path) -> None:
    # A processor may list a normalizer step with no stats of its own: it is not read.
    write_lerobot_checkpoint(tmp_path)
    _edit_postprocessor(tmp_path, lambda d: d["steps"].insert(0, lerobot_step("normalizer_processor", None, {})))
    stats = load_lerobot_stats(tmp_path)
    assert sorted(stats) == ["actions", "state"] and stats["actions"].mean.min() > 90.0


@pytest.mark.parametrize("eps,expected", [(0.0, "0.0"), (True, None), (float("inf"), None), (float("nan"), None)])
def test_lerobot_eps_zero_is_a_value_and_booleans_and_non_finite_numbers_are_refused(tmp_path: Path, eps,
                                                                                    expected: str | None) -> None:
    # eps = 0 is a valid LeRobot setting (>= 0), not "unset"; JSON true is no number; Infinity / NaN
    # (which Python's json reads) would make every normalized value 0 or NaN.
    write_lerobot_checkpoint(tmp_path)
    for name in ("policy_preprocessor.json", "policy_postprocessor.json"):
        document = json.loads((tmp_path / name).read_text())
        for step in document["steps"]:
            if "state_file" in step:
                step["config"]["eps"] = eps
        (tmp_path / name).write_text(json.dumps(document))
    if expected is not None:
        assert load_lerobot_normalization(tmp_path).eps == 0.0
        return
    with pytest.raises(CheckpointError, match=re.escape(f"expected 'eps' to be a finite number >= 0, found {eps!r}")):
        load_lerobot_normalization(tmp_path)


def test_lerobot_normalization_defaults_to_lerobots_eps() -> None:
    assert LeRobotNormalization(stats=stats3(), modes={"STATE": "MEAN_STD", "ACTION": "MEAN_STD"}).eps == 1e-8

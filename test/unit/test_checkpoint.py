"""Strict loading of openpi-named safetensors, and full-size key names/shapes on the meta device."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pi0_policy_ros.errors import CheckpointError
from pi0_policy_ros.model.checkpoint import (EMBED_KEY, MAX_LISTED_PROBLEMS, UNUSED_KEYS, check_tensors, expected_tensors, load_checkpoint,
                                            load_state, read_safetensors)
from pi0_policy_ros.model.config import get_preset
from pi0_policy_ros.model.pi0 import Pi0Model
from pi0_policy_ros.model.reference import load_reference
from test.paths import PI05_FIXTURE

PI05 = get_preset("pi05_small")


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    return load_reference(PI05_FIXTURE).weights


def test_fixture_weights_load_and_reproduce_actions(weights, tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file(weights, str(path))
    model = load_checkpoint(PI05, path, allow_truncated_vocab=True)
    ref = load_reference(PI05_FIXTURE)
    actions = model.sample_actions(ref.inputs, ref.noise)
    torch.testing.assert_close(actions, ref.expected["outputs/actions"], atol=1e-4, rtol=0)


def _error(weights: dict[str, torch.Tensor], **kwargs) -> str:
    with pytest.raises(CheckpointError) as info:
        check_tensors(PI05, weights, allow_truncated_vocab=True, **kwargs)
    return str(info.value)


def test_missing_key_is_named_with_its_expected_shape(weights) -> None:
    key = "paligemma_with_expert.gemma_expert.model.layers.2.mlp.up_proj.weight"
    message = _error({k: v for k, v in weights.items() if k != key})
    assert f"missing {key}: expected shape [128, 64]" in message


def test_wrong_shape_names_expected_and_found(weights) -> None:
    key = "time_mlp_in.weight"
    message = _error({**weights, key: torch.zeros(64, 32)})
    assert f"wrong shape {key}: expected [64, 64], found [64, 32]" in message


def test_unexpected_key_is_named(weights) -> None:
    message = _error({**weights, "state_proj.weight": torch.zeros(64, 32)})
    assert "unexpected state_proj.weight: shape [64, 32]" in message


def test_every_problem_is_reported_at_once(weights) -> None:
    broken = {k: v for k, v in weights.items() if k != "action_in_proj.bias"}
    broken["action_out_proj.bias"] = torch.zeros(7)
    broken["made.up.key"] = torch.zeros(1)
    message = _error(broken)
    assert "3 problem(s)" in message
    assert all(s in message for s in ("missing action_in_proj.bias", "wrong shape action_out_proj.bias",
                                      "unexpected made.up.key"))


def test_a_long_list_of_problems_is_cut_with_a_count(weights) -> None:
    message = _error({})  # nothing matches: every tensor missing
    lines = message.splitlines()
    total = int(re.search(r"\((\d+) problem\(s\)", lines[0]).group(1))
    assert total > MAX_LISTED_PROBLEMS and len(lines) == 1 + MAX_LISTED_PROBLEMS + 1
    assert lines[-1].strip() == f"... and {total - MAX_LISTED_PROBLEMS} more (a checkpoint of another geometry?)"


def test_lm_heads_are_accepted_and_ignored(weights) -> None:
    extra = {name: torch.zeros(1024, 64) for name in UNUSED_KEYS}
    check_tensors(PI05, {**weights, **extra}, allow_truncated_vocab=True)


def test_truncated_vocabulary_needs_explicit_permission(weights) -> None:
    with pytest.raises(CheckpointError, match=re.escape(f"wrong shape {EMBED_KEY}: expected [257152, 64], found [1024, 64]")):
        check_tensors(PI05, weights)


def test_pi0_checkpoint_into_pi05_geometry_fails_clearly() -> None:
    pi0_weights = load_reference(PI05_FIXTURE.with_name("pi0_small.safetensors")).weights
    message = _error(pi0_weights)
    assert "unexpected state_proj.weight" in message and "missing time_mlp_in.weight" in message


def test_unreadable_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(PI05, path)


@pytest.mark.parametrize("cut", ["in the data", "in the header", "empty"])
def test_a_half_written_file_is_reported_as_cut_short(weights, tmp_path: Path, cut: str) -> None:
    # An interrupted copy or download gave only safetensors' "Error while deserializing header:
    # incomplete metadata, file not fully covered" (or "invalid header length" when cut in the header).
    path = tmp_path / "model.safetensors"
    save_file(weights, str(path))
    data = path.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    size, expected = {"in the data": (len(data) // 2, f"{len(data)} bytes (its header's)"),
                      "in the header": (100, f"{header_end} bytes (its header's)"),
                      "empty": (0, "8 bytes (the header's length)")}[cut]
    path.write_bytes(data[:size])
    with pytest.raises(CheckpointError, match=rf"cannot read {re.escape(str(path))}: expected at least "
                                              rf"{re.escape(expected)}, found {size}: the file is cut short"):
        read_safetensors(path)


def test_integer_weights_are_refused_not_cast(weights, tmp_path: Path) -> None:
    # load_checkpoint casts to float32: int8 (quantized) values became weights without a word.
    path = tmp_path / "model.safetensors"
    save_file({**weights, "action_in_proj.weight": weights["action_in_proj.weight"].to(torch.int8)}, str(path))
    with pytest.raises(CheckpointError, match="action_in_proj.weight int8"):
        load_checkpoint(PI05, path, allow_truncated_vocab=True)


# ---- full-size geometry on the meta device ----------------------------------------------------
def _full_size_expectation(pi05: bool) -> dict[str, tuple[int, ...]]:
    """openpi's full-size PI0Pytorch names and shapes, written out from the real geometry
    (fixture README: SigLIP 1152/27/16/4304 → 2048; gemma_2b 2048/18/16384/8 heads/1 kv/256;
    gemma_300m 1024/18/4096/8/1/256; vocab 257152)."""
    sig, lm, ex = ("paligemma_with_expert.paligemma.model.vision_tower.vision_model.",
                   "paligemma_with_expert.paligemma.model.language_model.",
                   "paligemma_with_expert.gemma_expert.model.")
    out: dict[str, tuple[int, ...]] = {
        sig + "embeddings.patch_embedding.weight": (1152, 3, 14, 14),
        sig + "embeddings.patch_embedding.bias": (1152,),
        sig + "embeddings.position_embedding.weight": (256, 1152),
        sig + "post_layernorm.weight": (1152,), sig + "post_layernorm.bias": (1152,),
        "paligemma_with_expert.paligemma.model.multi_modal_projector.linear.weight": (2048, 1152),
        "paligemma_with_expert.paligemma.model.multi_modal_projector.linear.bias": (2048,),
        lm + "embed_tokens.weight": (257152, 2048),
        lm + "norm.weight": (2048,),
        "action_in_proj.weight": (1024, 32), "action_in_proj.bias": (1024,),
        "action_out_proj.weight": (32, 1024), "action_out_proj.bias": (32,),
    }
    for i in range(27):
        p = f"{sig}encoder.layers.{i}."
        for n in ("layer_norm1", "layer_norm2"):
            out[p + n + ".weight"] = out[p + n + ".bias"] = (1152,)
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out[p + f"self_attn.{n}.weight"], out[p + f"self_attn.{n}.bias"] = (1152, 1152), (1152,)
        out[p + "mlp.fc1.weight"], out[p + "mlp.fc1.bias"] = (4304, 1152), (4304,)
        out[p + "mlp.fc2.weight"], out[p + "mlp.fc2.bias"] = (1152, 4304), (1152,)
    for prefix, width, mlp in ((lm, 2048, 16384), (ex, 1024, 4096)):
        for i in range(18):
            p = f"{prefix}layers.{i}."
            out[p + "self_attn.q_proj.weight"] = (8 * 256, width)
            out[p + "self_attn.k_proj.weight"] = out[p + "self_attn.v_proj.weight"] = (256, width)
            out[p + "self_attn.o_proj.weight"] = (width, 8 * 256)
            out[p + "mlp.gate_proj.weight"] = out[p + "mlp.up_proj.weight"] = (mlp, width)
            out[p + "mlp.down_proj.weight"] = (width, mlp)
            for n in ("input_layernorm", "post_attention_layernorm"):
                if prefix == ex and pi05:
                    out[p + n + ".dense.weight"], out[p + n + ".dense.bias"] = (3 * 1024, 1024), (3 * 1024,)
                else:
                    out[p + n + ".weight"] = (width,)
    if pi05:
        out[ex + "norm.dense.weight"], out[ex + "norm.dense.bias"] = (3 * 1024, 1024), (3 * 1024,)
        out.update({"time_mlp_in.weight": (1024, 1024), "time_mlp_in.bias": (1024,),
                    "time_mlp_out.weight": (1024, 1024), "time_mlp_out.bias": (1024,)})
    else:
        out[ex + "norm.weight"] = (1024,)
        out.update({"state_proj.weight": (1024, 32), "state_proj.bias": (1024,),
                    "action_time_mlp_in.weight": (1024, 2048), "action_time_mlp_in.bias": (1024,),
                    "action_time_mlp_out.weight": (1024, 1024), "action_time_mlp_out.bias": (1024,)})
    return out


@pytest.mark.parametrize("preset,pi05", [("pi05", True), ("pi0", False)])
def test_full_size_presets_have_openpi_names_and_shapes(preset: str, pi05: bool) -> None:
    got = {name: shape for name, (_, shape) in expected_tensors(get_preset(preset)).items()}
    assert got == _full_size_expectation(pi05)


def test_inconsistent_geometry_is_refused_when_the_config_is_made() -> None:
    """The expert attends to every PaliGemma layer's K/V, so depth, KV heads and head size must agree;
    SigLIP projects into the PaliGemma width. Each caught here, not as a shape error mid-inference."""
    import dataclasses

    from pi0_policy_ros.errors import ConfigError

    lm, expert = PI05.paligemma, PI05.expert
    cases = [({"expert": dataclasses.replace(expert, depth=lm.depth + 1)}, "depths must match"),
             ({"expert": dataclasses.replace(expert, head_dim=lm.head_dim * 2)}, "KV heads/head_dim differ"),
             ({"expert": dataclasses.replace(expert, num_kv_heads=2)}, "KV heads/head_dim differ"),
             ({"siglip": dataclasses.replace(PI05.siglip, projection_dim=lm.width + 1)}, "projection_dim"),
             ({"pi05": False, "discrete_state_input": True}, "discrete_state_input exists only for pi0.5"),
             ({"action_horizon": 0}, "action_horizon and num_denoise_steps must be ≥ 1"),
             ({"num_denoise_steps": 0}, "action_horizon and num_denoise_steps must be ≥ 1")]
    for changes, message in cases:
        with pytest.raises(ConfigError, match=message):
            PI05.replace(**changes)


def test_full_size_parameter_count_is_about_3_3_billion() -> None:
    total = sum(torch.Size(shape).numel() for _, shape in expected_tensors(get_preset("pi05")).values())
    assert 3.2e9 < total < 3.7e9  # pi0.5 ≈ 3.6 B with the 0.5 B expert LM head, which we never load


@pytest.mark.parametrize("preset", ["pi05_small", "pi0_small"])
def test_fixture_key_names_are_exactly_ours(preset: str) -> None:
    path = PI05_FIXTURE if preset == "pi05_small" else PI05_FIXTURE.with_name("pi0_small.safetensors")
    assert set(load_reference(path).weights) == set(expected_tensors(get_preset(preset)))


def test_checkpoint_saved_with_tied_lm_head_only_loads(weights, tmp_path: Path) -> None:
    """openpi's convert_jax_model_to_pytorch.py and train_pytorch.py save with
    `safetensors.torch.save_model`, which keeps one name per shared tensor: the PaliGemma lm_head
    (tied to embed_tokens) sorts first, so the file has `...paligemma.lm_head.weight` and no
    embed_tokens. That table is the token embedding and must load as such."""
    from safetensors.torch import save_model
    from torch import nn

    def child(parent: nn.Module, path: str) -> nn.Module:
        for name in path.split("."):
            if not hasattr(parent, name):
                parent.add_module(name, nn.Module())
            parent = getattr(parent, name)
        return parent

    # openpi's tie, at openpi's module paths, saved the way openpi saves it
    root = nn.Module()
    table = nn.Parameter(weights[EMBED_KEY].clone())
    child(root, EMBED_KEY.removesuffix(".weight")).weight = table
    child(root, UNUSED_KEYS[0].removesuffix(".weight")).weight = table
    path = tmp_path / "tied.safetensors"
    save_model(root, str(path))
    saved, _ = read_safetensors(path)
    assert list(saved) == [UNUSED_KEYS[0]]  # save_model dropped embed_tokens
    tensors = {k: v for k, v in weights.items() if k != EMBED_KEY} | saved

    check_tensors(PI05, tensors, allow_truncated_vocab=True)
    with torch.device("meta"):
        model = Pi0Model(PI05)
    load_state(model, tensors, allow_truncated_vocab=True)
    assert torch.equal(model.embed_tokens.weight[:1024], weights[EMBED_KEY])

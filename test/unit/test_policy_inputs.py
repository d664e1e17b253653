"""Bad inputs at the `Policy` API: each one is a single ConfigError / ObservationError naming what
was expected, never a bare numpy / torch exception, a NaN chunk or a silently wrong one."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from pi0_policy_ros.errors import ConfigError, ObservationError
from pi0_policy_ros.model.rtc import soft_mask
from pi0_policy_ros.policy.config import PolicyConfig
from pi0_policy_ros.policy.normalize import Normalizer, NormStats
from pi0_policy_ros.policy.policy import Policy
from pi0_policy_ros.policy.types import ChunkGuidance, Observation

STATE_DIM = 8  # LIBERO


@pytest.fixture(scope="module")
def policy() -> Policy:
    return Policy.from_config(PolicyConfig(model_preset="pi05_small", robot_profile="libero", default_prompt="go",
                                           cpu_threads=1, rtc_mode="rtc_fast"))


def _observation(**fields: object) -> Observation:
    rng = np.random.default_rng(0)
    values = dict(images={"image": rng.integers(0, 256, (256, 320, 3), dtype=np.uint8),
                          "wrist_image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)},
                  state=rng.normal(size=STATE_DIM).astype(np.float32), prompt="pick up the cup", stamp_s=1.0)
    values.update(fields)
    return Observation(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", [-1, 2**70])
def test_seed_out_of_range_is_a_config_error(seed: object) -> None:
    # A negative seed used to build a policy whose every inference raised numpy's ValueError.
    with pytest.raises(ConfigError, match=r"seed must be an integer in \[0, 2147483647\]"):
        PolicyConfig(seed=seed)  # type: ignore[arg-type]


def test_seed_range_is_closed() -> None:
    # Both ends of [0, 2**31 - 1], the range the error names (and the ROS parameter's), are seeds.
    assert PolicyConfig(seed=0).seed == 0 and PolicyConfig(seed=2**31 - 1).seed == 2**31 - 1


@pytest.mark.parametrize("fields, message", [
    (dict(seed=1.5), "seed must be an int, found float 1.5"),
    (dict(seed=None), "seed must be an int, found NoneType None"),
    (dict(state_dim="8"), "state_dim must be an int, found str '8'"),
    (dict(action_horizon=3.5), "action_horizon must be an int, found float 3.5"),
    (dict(cpu_threads=True), "cpu_threads must be an int, found bool True"),
    (dict(max_guidance_weight="5"), "max_guidance_weight must be a float, found str '5'"),
    (dict(device=None), "device must be a str, found NoneType None"),
    (dict(device="cuda:abc"), "device must be one of"),
    (dict(action_period_s=float("inf")), "action_period_s must be finite, found inf"),
])
def test_config_fields_of_the_wrong_type_are_a_config_error(fields: dict, message: str) -> None:
    # These raised bare TypeError / RuntimeError / AttributeError (from the comparisons,
    # torch.device, torch.manual_seed, set_num_threads), or an infinite period was accepted.
    with pytest.raises(ConfigError, match=re.escape(message)):
        PolicyConfig(**fields)
    assert PolicyConfig(seed=np.int64(3), action_period_s=np.float32(0.05), max_guidance_weight=2).seed == 3


@pytest.mark.parametrize("field", ["state_dim", "action_dim"])
def test_robot_dims_wider_than_the_model_are_a_config_error(field: str) -> None:
    # state_dim 40 used to build a policy whose every infer raised numpy's broadcast ValueError.
    config = PolicyConfig(model_preset="pi05_small", robot_profile="generic", default_prompt="go", **{field: 40})
    with pytest.raises(ConfigError, match=rf"{field} must be at most the model's width 32 .*found 40"):
        Policy.from_config(config)


def test_an_action_horizon_past_gemmas_positions_is_a_config_error_with_random_weights() -> None:
    # A checkpoint refused it; random weights built the policy, and its first infer allocated the
    # suffix attention of 100000 actions (tens of GB) or ran for hours.
    config = PolicyConfig(model_preset="pi05_small", robot_profile="libero", action_horizon=100000)
    with pytest.raises(ConfigError, match=re.escape("action_horizon 100000: ") + ".*more than Gemma's 8192"):
        Policy.from_config(config)


@pytest.mark.parametrize("stamp", [float("nan"), float("inf"), None, "1.0", True, 10**400])
def test_bad_stamp_is_an_observation_error(policy: Policy, stamp: object) -> None:
    # It used to pass through to ActionChunk.stamp_s, which times the actions downstream.
    with pytest.raises(ObservationError, match="stamp_s: expected a finite time in seconds"):
        policy.infer(_observation(stamp_s=stamp))
    assert policy.infer(_observation(stamp_s=np.float64(-2.5))).stamp_s == -2.5


def test_integer_stamp_beyond_numpys_integers_is_not_a_type_error(policy: Policy) -> None:
    # np.isfinite(2**70) raised TypeError (no numpy integer holds it); it is a finite time.
    assert policy.infer(_observation(stamp_s=2**70)).stamp_s == 2**70


@pytest.mark.parametrize("state, found", [
    (["a"] * STATE_DIM, "dtype <U1"),
    (np.ones(STATE_DIM) + 1j, "dtype complex128"),
    (np.array([None] * STATE_DIM), "dtype object"),
    (None, "NoneType of dtype object"),
])
def test_state_that_is_not_real_numbers_is_an_observation_error(policy: Policy, state: object, found: str) -> None:
    # Strings raised numpy's ValueError; complex values lost their imaginary part silently.
    with pytest.raises(ObservationError, match=rf"expected state of 8 real numbers, found .*{found}"):
        policy.infer(_observation(state=state))


@pytest.mark.parametrize("state", [[np.zeros(3), np.zeros(3), np.zeros(2)], [0.0] * 7 + [[0.0]],
                                   torch.zeros(STATE_DIM, requires_grad=True)])
def test_state_that_is_not_one_array_is_an_observation_error(policy: Policy, state: object) -> None:
    # LIBERO's [eef_pos, axis_angle, gripper_qpos] left as a list of arrays raised numpy's ValueError
    # (inhomogeneous shape); a tensor that requires grad torch's RuntimeError.
    with pytest.raises(ObservationError, match=rf"expected state of 8 real numbers, found {type(state).__name__} "
                                               "that is not one numeric array"):
        policy.infer(_observation(state=state))


def test_state_beyond_float32_is_an_observation_error_before_the_network() -> None:
    # 1e39 is finite in float64 but inf in the float32 model state: pi0 then ran the network and
    # reported NaN actions instead of naming the state.
    pi0 = Policy.from_config(PolicyConfig(model_preset="pi0_small", robot_profile="pi0_libero", default_prompt="go",
                                          cpu_threads=1))
    with pytest.raises(ObservationError, match=r"state must be finite \(float32 range\)"):
        pi0.network_batch(_observation(state=np.full(STATE_DIM, 1e39)))
    assert np.isfinite(pi0.infer(_observation(state=[0, 1, 2, 3, 4, 5, 6, True])).actions).all()


def test_state_that_normalizes_beyond_float32_is_an_observation_error_before_the_network() -> None:
    # 3e38 is within float32, but z-scored with a std of 0.5 it is inf: the network then made NaN
    # actions and the error said "the network produced NaN/Inf actions", not naming the state.
    pi0 = Policy.from_config(PolicyConfig(model_preset="pi0_small", robot_profile="pi0_libero", default_prompt="go",
                                          cpu_threads=1))
    pi0.normalizer = Normalizer({"state": NormStats(mean=np.zeros(STATE_DIM), std=np.full(STATE_DIM, 0.5)),
                                 "actions": NormStats(mean=np.zeros(7), std=np.ones(7))}, use_quantiles=False)
    state = np.zeros(STATE_DIM)
    state[2] = 3e38
    with pytest.raises(ObservationError, match=r"expected a state the norm stats can normalize, found \[3e\+38\] "
                                               r"at dims \[2\]"):
        pi0.infer(_observation(state=state))
    state[2] = 1e30
    assert np.isfinite(pi0.infer(_observation(state=state)).actions).all()


@pytest.mark.parametrize("prompt", [np.array(["pick up", "the cup"]), np.array([]), 0, False])
def test_prompt_that_is_not_a_string_is_an_observation_error(policy: Policy, prompt: object) -> None:
    # An array raised numpy's ValueError (truth value ambiguous); 0 and False silently took the
    # default prompt, as if the observation had none.
    with pytest.raises(ObservationError, match="Prompt is required: expected a non-empty string, found"):
        policy.infer(_observation(prompt=prompt))
    assert policy.infer(_observation(prompt="")).actions.shape == (10, 7)  # "" and None: the default


@pytest.mark.parametrize("images", [None, [np.zeros((224, 224, 3), np.uint8)] * 2])
def test_images_that_are_not_a_mapping_are_an_observation_error(policy: Policy, images: object) -> None:
    # None and a list raised bare TypeErrors from the camera name check.
    with pytest.raises(ObservationError, match=r"expected images as a mapping of camera name -> image"):
        policy.infer(_observation(images=images))


def _guidance(policy: Policy, **fields: object) -> ChunkGuidance:
    prev = np.random.default_rng(1).normal(size=(policy.model_config.action_horizon, policy.profile.action_dim))
    values = dict(prev_actions=prev, delay_steps=2, mask_end=8)
    values.update(fields)
    return ChunkGuidance(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize("fields, message", [
    (dict(prev_actions=[["a"] * 7] * 10), r"expected finite previous actions \[10, 7\], found list of dtype <U1"),
    (dict(prev_actions=np.zeros((10, 3))), r"expected finite previous actions \[10, 7\], found shape \(10, 3\)"),
    (dict(prev_actions=np.full((10, 7), np.nan)), r"expected finite previous actions \[10, 7\], found 70 NaN/Inf"),
    (dict(prev_actions=[[0.0] * 7] * 9 + [[0.0] * 6]), r"expected finite previous actions \[10, 7\], found list that "
                                                      "is not one numeric array"),
    (dict(prev_actions=torch.zeros(10, 7, requires_grad=True)), r"found Tensor that is not one numeric array"),
    (dict(delay_steps=None), "expected an integer delay_steps, found None"),
    (dict(delay_steps=2.5), "expected an integer delay_steps, found 2.5"),
    (dict(delay_steps=-1), "expected delay_steps >= 0, found -1"),
    (dict(mask_end=None), "expected an integer mask_end, found None"),
])
def test_bad_guidance_is_an_observation_error(policy: Policy, fields: dict, message: str) -> None:
    # Strings / None raised bare ValueError / TypeError, a fractional delay bent the soft mask
    # silently, and a NaN was reported as "found shape (10, 7)". Ragged rows raised numpy's
    # ValueError, a tensor that requires grad torch's RuntimeError.
    with pytest.raises(ObservationError, match=message):
        policy.infer(_observation(), _guidance(policy, **fields))


def test_mask_end_outside_the_chunk_is_clamped_to_it(policy: Policy) -> None:
    # mask_end past the horizon means every row continues the previous chunk; below 0, none does
    # (rather than soft_mask's ConfigError at every inference).
    _, robot_state = policy.network_batch(_observation())
    horizon = policy.model_config.action_horizon
    beyond = policy.engine_guidance(_guidance(policy, mask_end=horizon + 5), robot_state)
    np.testing.assert_array_equal(beyond.mask[:, 0], soft_mask(horizon, 2, horizon).numpy())
    assert not policy.engine_guidance(_guidance(policy, mask_end=-3), robot_state).mask.any()


def test_guidance_with_numpy_integers_runs(policy: Policy) -> None:
    chunk = policy.infer(_observation(), _guidance(policy, delay_steps=np.int64(2), mask_end=np.int32(8)))
    assert chunk.actions.shape == (10, 7) and chunk.actions.dtype == np.float32 and np.isfinite(chunk.actions).all()


@pytest.mark.parametrize("field, value", [("state", [0.0] * 32), ("noise", None)])
def test_engine_batch_check_names_a_field_that_is_not_an_array(policy: Policy, field: str, value: object) -> None:
    # check() read value.dtype and raised AttributeError.
    batch, _ = policy.network_batch(_observation())
    setattr(batch, field, value)
    with pytest.raises(ObservationError, match=rf"{field}: expected float32 \[.*\], found {type(value).__name__}"):
        batch.check(policy.engine.shape)


@pytest.mark.parametrize("observation", [{"observation/image": np.zeros((224, 224, 3), np.uint8),
                                          "observation/state": np.zeros(STATE_DIM), "prompt": "go"}, None])
def test_an_observation_that_is_not_an_observation_is_an_observation_error(policy: Policy, observation: object) -> None:
    # An openpi-style dict (or None) raised AttributeError: 'dict' object has no attribute 'stamp_s'.
    with pytest.raises(ObservationError, match=r"expected an Observation\(images=.*found "
                                               rf"{type(observation).__name__}"):
        policy.infer(observation)  # type: ignore[arg-type]


def test_guidance_that_is_not_a_chunk_guidance_is_an_observation_error(policy: Policy) -> None:
    # The previous chunk, or its actions alone, raised AttributeError: no attribute 'delay_steps'.
    previous = policy.infer(_observation())
    for guidance in (previous, previous.actions):
        with pytest.raises(ObservationError, match=r"RTC: expected guidance as a ChunkGuidance\(prev_actions, "
                                                   rf"delay_steps, mask_end\), found {type(guidance).__name__}"):
            policy.infer(_observation(), guidance)  # type: ignore[arg-type]

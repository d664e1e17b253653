"""RTC guidance inside the engine's chain (engine/guidance.py), run op by op on the CPU (`static`
mode runs the very step code that CUDA graphs capture), against the eager guided sampler of
model/rtc.py. test/gpu/test_engine_gpu.py checks the captured graphs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pi0_policy_ros.engine.engine import Engine
from pi0_policy_ros.engine.guidance import EngineGuidance
from pi0_policy_ros.engine.types import EngineShape, random_batch
from pi0_policy_ros.errors import ConfigError, ObservationError
from pi0_policy_ros.model.checkpoint import random_model
from pi0_policy_ros.model.config import get_preset
from pi0_policy_ros.model.rtc import soft_mask

DELAY = 2
UNUSED_DIMS = 3  # padded action dims the robot does not use: mask 0


@pytest.fixture(scope="module", params=["pi05_small", "pi0_small"])
def small(request):
    cfg = get_preset(request.param)
    model = random_model(cfg, "cpu", torch.float32, seed=1)
    return cfg, model, EngineShape.for_model(cfg)


def make_guidance(cfg, seed: int, prev: np.ndarray | None = None) -> EngineGuidance:
    h, a = cfg.action_horizon, cfg.action_dim
    rows = soft_mask(h, DELAY, h - h // 2).numpy()
    mask = np.repeat(rows[:, None], a, axis=1)
    mask[:, a - UNUSED_DIMS:] = 0.0
    if prev is None:
        prev = np.random.default_rng(seed).standard_normal((h, a))
    return EngineGuidance(prev=prev.astype(np.float32), mask=mask.astype(np.float32))


@pytest.mark.parametrize("mode", ["rtc_fast", "rtc"])
def test_static_guided_chain_equals_eager_guided_sampler(small, mode: str) -> None:
    cfg, model, shape = small
    engine = Engine.create(model, shape, "cpu", "float32", mode="static", rtc_mode=mode)
    eager = Engine.create(model, shape, "cpu", "float32", mode="eager", rtc_mode=mode)
    plain = Engine.create(model, shape, "cpu", "float32", mode="static")
    for seed in (0, 1):  # a second request with new inputs and a new previous chunk: no stale buffers
        batch = random_batch(shape, seed, valid_slots=2)
        guidance = make_guidance(cfg, seed + 10)
        got = engine.infer(batch, guidance)
        np.testing.assert_allclose(got, eager.infer(batch, guidance), atol=2e-5)
        assert np.abs(got - plain.infer(batch)).max() > 0.1  # the guidance did something


@pytest.mark.parametrize("mode", ["rtc_fast", "rtc"])
def test_no_previous_chunk_and_zero_weight_are_the_plain_chain(small, mode: str) -> None:
    cfg, model, shape = small
    batch = random_batch(shape, 3, valid_slots=2)
    plain = Engine.create(model, shape, "cpu", "float32", mode="static").infer(batch)
    engine = Engine.create(model, shape, "cpu", "float32", mode="static", rtc_mode=mode)
    engine.infer(batch, make_guidance(cfg, 4))  # leaves a mask in the buffers
    np.testing.assert_allclose(engine.infer(batch, None), plain, atol=1e-5)
    zero_beta = Engine.create(model, shape, "cpu", "float32", mode="static", rtc_mode=mode, max_guidance_weight=0.0)
    np.testing.assert_allclose(zero_beta.infer(batch, make_guidance(cfg, 4)), plain, atol=1e-5)


@pytest.mark.parametrize("mode", ["rtc_fast", "rtc"])
def test_frozen_prefix_follows_the_previous_chunk(small, mode: str) -> None:
    """The first d rows land near Y (soft guidance, β = 5: within 15 % of the unguided distance);
    the consistent previous chunk (the plain result itself) moves the result much less."""
    cfg, model, shape = small
    batch = random_batch(shape, 5, valid_slots=2)
    plain = Engine.create(model, shape, "cpu", "float32", mode="static").infer(batch)
    engine = Engine.create(model, shape, "cpu", "float32", mode="static", rtc_mode=mode)
    other = make_guidance(cfg, 6)
    used = slice(0, cfg.action_dim - UNUSED_DIMS)
    guided = engine.infer(batch, other)
    unguided_distance = np.abs(plain[:DELAY, used] - other.prev[:DELAY, used]).max()
    assert np.abs(guided[:DELAY, used] - other.prev[:DELAY, used]).max() < 0.15 * unguided_distance
    consistent = engine.infer(batch, make_guidance(cfg, 0, prev=plain))
    assert np.abs(consistent - plain).max() < 0.25 * np.abs(guided - plain).max()


def test_guidance_is_checked(small) -> None:
    cfg, model, shape = small
    batch = random_batch(shape, 0)
    off = Engine.create(model, shape, "cpu", "float32", mode="static")
    with pytest.raises(ConfigError, match="rtc_mode 'off'"):
        off.infer(batch, make_guidance(cfg, 0))
    engine = Engine.create(model, shape, "cpu", "float32", mode="static", rtc_mode="rtc_fast")
    good = make_guidance(cfg, 0)
    with pytest.raises(ObservationError, match=rf"prev: expected \[{cfg.action_horizon}, {cfg.action_dim}\]"):
        engine.infer(batch, EngineGuidance(prev=good.prev[:-1], mask=good.mask))
    bad = good.prev.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ObservationError, match="finite"):
        engine.infer(batch, EngineGuidance(prev=bad, mask=good.mask))
    # the mask is checked as the previous chunk is: a [1, A] row would broadcast over every row
    with pytest.raises(ObservationError, match=rf"mask: expected \[{cfg.action_horizon}, {cfg.action_dim}\]"):
        engine.infer(batch, EngineGuidance(prev=good.prev, mask=good.mask[:1]))
    with pytest.raises(ObservationError, match="mask: expected finite"):
        engine.infer(batch, EngineGuidance(prev=good.prev, mask=np.where(good.mask > 0.5, np.inf, good.mask)))
    with pytest.raises(ConfigError, match="rtc_mode"):
        Engine.create(model, shape, "cpu", "float32", mode="static", rtc_mode="inpaint")
    with pytest.raises(ConfigError, match="max_guidance_weight"):
        Engine.create(model, shape, "cpu", "float32", mode="static", rtc_mode="rtc", max_guidance_weight=float("nan"))

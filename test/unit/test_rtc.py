"""model/rtc.py: the soft mask, the guidance weights, and the guided chain on the fixture models."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from pi0_policy_ros.errors import ConfigError
from pi0_policy_ros.model.pi0 import Pi0Model, Prefix, euler_times
from pi0_policy_ros.model.reference import Reference, load_reference, reference_model
from pi0_policy_ros.model.rtc import (
    compute_prefix,
    guidance_weight,
    guidance_weights,
    guided_velocity,
    rtc_fast_update_,
    sample_actions_guided,
    soft_mask,
)
from test.paths import PI0_FIXTURE, PI05_FIXTURE

DELAY = 2


@dataclass
class Setup:
    ref: Reference
    model: Pi0Model
    prefix: Prefix
    plain: torch.Tensor  # the plain chain on the fixture's noise
    other: torch.Tensor  # a chunk from other noise: a previous chunk inconsistent with `plain`
    horizon: int
    execute_horizon: int
    cache: dict[tuple[str, float, str], torch.Tensor] = field(default_factory=dict)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The fixture models' matmuls are tiny: extra threads only spin (10x slower on a busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=[PI05_FIXTURE, PI0_FIXTURE], ids=["pi05", "pi0"])
def setup(request: pytest.FixtureRequest, one_thread: None) -> Setup:
    path: Path = request.param
    ref = load_reference(path)
    model = reference_model(ref)
    prefix = compute_prefix(model, ref.inputs)
    plain = model.sample_actions(ref.inputs, ref.noise)
    other = model.sample_actions(ref.inputs, torch.randn(ref.noise.shape, generator=torch.Generator().manual_seed(7)))
    horizon = ref.config.action_horizon
    return Setup(ref, model, prefix, plain, other, horizon, horizon // 2)


def guided(s: Setup, prev_name: str, beta: float, mode: str) -> torch.Tensor:
    """The guided chain toward `plain` or `other`, computed once per module (the CPU is slow)."""
    key = (prev_name, beta, mode)
    if key not in s.cache:
        prev = s.plain if prev_name == "plain" else s.other
        s.cache[key] = sample_actions_guided(s.model, s.ref.inputs, s.ref.noise, prev, DELAY, s.execute_horizon,
                                             beta, mode, prefix=s.prefix)
    return s.cache[key]


# ---- mask and weights ------------------------------------------------------------------------------
def test_soft_mask_linear_matches_the_authors_docstring() -> None:
    # get_prefix_weights(start=2, end=6, total=10, "linear") in real-time-chunking-kinetix
    expected = torch.tensor([1, 1, 4 / 5, 3 / 5, 2 / 5, 1 / 5, 0, 0, 0, 0])
    torch.testing.assert_close(soft_mask(10, 2, 6, "linear"), expected)


def test_soft_mask_exp_follows_the_paper() -> None:
    horizon, d, s = 10, 2, 3
    w = soft_mask(horizon, d, horizon - s, "exp")
    for i in range(horizon):
        c = (horizon - s - i) / (horizon - s - d + 1)
        expected = 1.0 if i < d else (c * (math.exp(c) - 1) / (math.e - 1) if i < horizon - s else 0.0)
        assert float(w[i]) == pytest.approx(expected, abs=1e-6), i


def test_soft_mask_edge_cases() -> None:
    assert torch.count_nonzero(soft_mask(10, 3, 0)) == 0  # nothing left of the previous chunk
    torch.testing.assert_close(soft_mask(10, 8, 5), torch.tensor([1.0] * 5 + [0.0] * 5))  # d capped at the end
    with pytest.raises(ConfigError):
        soft_mask(10, 2, 11)
    with pytest.raises(ConfigError):
        soft_mask(10, 2, 5, "cosine")


def test_guidance_weight_is_the_clipped_paper_formula() -> None:
    beta = 5.0
    for t in euler_times(10):
        tau = 1.0 - t
        if tau == 0.0:
            assert guidance_weight(t, beta) == beta
            continue
        r2 = (1 - tau) ** 2 / (tau**2 + (1 - tau) ** 2)
        assert guidance_weight(t, beta) == pytest.approx(min(beta, (1 - tau) / (tau * r2)))
    assert guidance_weight(0.5, beta) == pytest.approx(2.0)
    assert guidance_weights([1.0, 0.5], 0.0) == [0.0, 0.0]


# ---- the guidance ------------------------------------------------------------------------------------
def test_rtc_vjp_is_exact_for_a_linear_velocity() -> None:
    """v = x·Aᵀ (per row), so x̂ = x − t·v and g = eᵀ ∂x̂/∂x = e − t·e·A."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4, 4, generator=gen)
    x = torch.randn(1, 6, 4, generator=gen)
    prev = torch.randn(1, 6, 4, generator=gen)
    mask = soft_mask(6, 2, 5)
    t, w = 0.7, 3.0
    v = x @ a.t()
    e = mask[None, :, None] * (prev - (x - t * v))
    expected = v - w * (e - t * e @ a)
    got = guided_velocity(lambda y: y @ a.t(), x, t, w, prev, mask, "rtc")
    torch.testing.assert_close(got, expected)
    got_fast = guided_velocity(lambda y: y @ a.t(), x, t, w, prev, mask, "rtc_fast")
    torch.testing.assert_close(got_fast, v - w * e)


@pytest.mark.parametrize("mode", ["rtc", "rtc_fast"])
def test_every_mask_form_weights_the_rows(mode: str) -> None:
    """W as [H], per batch row [B, H], or per row and dim [B, H, A]: row i's error is scaled by W_i.
    A batch of two with different masks gives each item what it gets alone."""
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(4, 4, generator=gen)
    x = torch.randn(2, 6, 4, generator=gen)
    prev = torch.randn(2, 6, 4, generator=gen)
    masks = torch.stack((soft_mask(6, 2, 5), soft_mask(6, 0, 3, "linear")))
    t, w = 0.7, 3.0

    def guide(x_b: torch.Tensor, prev_b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return guided_velocity(lambda y: y @ a.t(), x_b, t, w, prev_b, mask, mode)

    per_row = guide(x, prev, masks)
    torch.testing.assert_close(per_row, guide(x, prev, masks[:, :, None].expand(2, 6, 4)))
    for b in range(2):
        torch.testing.assert_close(per_row[b:b + 1], guide(x[b:b + 1], prev[b:b + 1], masks[b]))


def test_rtc_fast_update_matches_the_guided_velocity() -> None:
    """The engine form (correct an Euler step already taken) equals stepping with the guided v."""
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(4, 4, generator=gen)
    x = torch.randn(1, 6, 4, generator=gen)
    prev = torch.randn(1, 6, 4, generator=gen)
    mask = soft_mask(6, 1, 4)
    t, dt, w = 0.6, -0.1, 2.2
    expected = x + dt * guided_velocity(lambda y: y @ a.t(), x, t, w, prev, mask, "rtc_fast")
    x_out = x + dt * (x @ a.t())
    rtc_fast_update_(x, x_out, t, dt, torch.tensor(w), prev, mask)
    torch.testing.assert_close(x_out, expected)


# ---- the guided chain on the fixtures ---------------------------------------------------------------
def test_execute_horizon_ends_the_mask_at_h_minus_s(setup: Setup) -> None:
    """The default mask ends where the previous chunk does, H − s (spec §7): the chain with (d, s) is
    the chain with the explicit mask `soft_mask(H, d, H − s)`."""
    mask = soft_mask(setup.horizon, DELAY, setup.horizon - setup.execute_horizon)
    explicit = sample_actions_guided(setup.model, setup.ref.inputs, setup.ref.noise, setup.other, 0, 0, 5.0,
                                     "rtc_fast", prefix=setup.prefix, mask=mask)
    torch.testing.assert_close(guided(setup, "other", beta=5.0, mode="rtc_fast"), explicit, rtol=0.0, atol=0.0)


@pytest.mark.parametrize("mode", ["rtc", "rtc_fast"])
def test_guidance_weight_zero_is_the_plain_chain(setup: Setup, mode: str) -> None:
    actions = guided(setup, "other", beta=0.0, mode=mode)
    torch.testing.assert_close(actions, setup.plain, rtol=0.0, atol=1e-6)


def test_no_previous_chunk_is_the_plain_chain(setup: Setup) -> None:
    actions = sample_actions_guided(setup.model, setup.ref.inputs, setup.ref.noise, None, DELAY,
                                    setup.execute_horizon)
    torch.testing.assert_close(actions, setup.plain, rtol=0.0, atol=1e-6)
    torch.testing.assert_close(actions, setup.ref.expected["outputs/actions"], rtol=0.0, atol=1e-4)


@pytest.mark.parametrize("mode", ["rtc", "rtc_fast"])
def test_consistent_previous_chunk_changes_nothing_beyond_tolerance(setup: Setup, mode: str) -> None:
    """Guiding toward the chunk this noise produces anyway moves the result much less than
    guiding toward an unrelated chunk. It is not exactly zero: the intermediate predictions x̂
    differ from the final chunk, so the error is small but not null along the way."""
    mask = soft_mask(setup.horizon, DELAY, setup.horizon - setup.execute_horizon)[None, :, None]
    consistent = guided(setup, "plain", beta=5.0, mode=mode)
    inconsistent = guided(setup, "other", beta=5.0, mode=mode)
    moved_consistent = float(((consistent - setup.plain) * mask).abs().max())
    moved_inconsistent = float(((inconsistent - setup.plain) * mask).abs().max())
    assert moved_consistent <= 0.1 * moved_inconsistent, (moved_consistent, moved_inconsistent)
    assert float((consistent - setup.plain).abs().max()) <= 0.1 * float(setup.plain.abs().max())


@pytest.mark.parametrize("mode", ["rtc", "rtc_fast"])
@pytest.mark.parametrize("beta", [5.0, 10.0])
def test_frozen_prefix_follows_the_previous_chunk(setup: Setup, mode: str, beta: float) -> None:
    """The first d actions land on the previous chunk's: within 10 % of their unguided distance at
    the paper's β = 5, within 3 % at β = 10 (guidance is soft; the scheduler executes the old d
    actions anyway)."""
    actions = guided(setup, "other", beta=beta, mode=mode)
    unguided = float((setup.plain[:, :DELAY] - setup.other[:, :DELAY]).abs().max())
    frozen_error = float((actions[:, :DELAY] - setup.other[:, :DELAY]).abs().max())
    assert frozen_error <= (0.1 if beta == 5.0 else 0.03) * unguided, (frozen_error, unguided)
    # past the mask's end the previous chunk has no say: the tail stays a chunk of this noise
    tail = slice(setup.horizon - setup.execute_horizon, None)
    assert float((actions[:, tail] - setup.other[:, tail]).abs().mean()) > 0.3 * float(
        (setup.plain[:, tail] - setup.other[:, tail]).abs().mean())

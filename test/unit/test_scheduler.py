"""control/scheduler.py: when inference starts, which action runs when, the latency estimate."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pi0_policy_ros.control.scheduler import ChunkScheduler, InferenceRequest, SchedulerConfig
from pi0_policy_ros.errors import ConfigError, Pi0PolicyError

PERIOD_S = 0.1
T0_S = 1_700_000_000.0  # an epoch-sized clock, as ROS time is


def make_chunk(chunk_id: int, horizon: int, dims: int = 2) -> np.ndarray:
    """Action k of chunk c is c·100 + k in every dim: each value names its chunk and index."""
    return np.repeat((100.0 * chunk_id + np.arange(horizon, dtype=np.float64))[:, None], dims, axis=1)


def simulate(scheduler: ChunkScheduler, latency_steps: list[int] | int, num_steps: int
             ) -> tuple[list[float | None], list[int], list[InferenceRequest]]:
    """Step the clock on the action grid. Each tick: deliver a chunk whose latency has passed,
    maybe start an inference (a latency of 0 delivers at once), then read the action.
    Returns the executed value of dim 0 per step (None before the first chunk), the steps at which
    inferences started, and the requests."""
    pending: tuple[InferenceRequest, int] | None = None
    executed: list[float | None] = []
    starts: list[int] = []
    requests: list[InferenceRequest] = []
    for k in range(num_steps):
        now = T0_S + k * PERIOD_S
        if pending is not None and pending[1] <= k:
            scheduler.complete(pending[0], make_chunk(pending[0].chunk_id, scheduler.horizon), now)
            pending = None
        if scheduler.should_start(now):
            request = scheduler.begin(now)
            lat = latency_steps if isinstance(latency_steps, int) else latency_steps[request.chunk_id]
            starts.append(k)
            requests.append(request)
            if lat == 0:
                scheduler.complete(request, make_chunk(request.chunk_id, scheduler.horizon), now)
            else:
                pending = (request, k + lat)
        action = scheduler.action_at(now)
        executed.append(None if action is None else float(action.positions[0]))
    return executed, starts, requests


def test_splicing_uses_the_old_chunk_until_the_new_one_is_available() -> None:
    sched = ChunkScheduler(SchedulerConfig(execute_horizon=4), PERIOD_S, horizon=10)
    executed, starts, _ = simulate(sched, latency_steps=2, num_steps=20)
    assert starts == [0, 4, 8, 12, 16]
    assert executed[:2] == [None, None]
    for k in range(2, 20):
        c = (k - 2) // 4  # chunk c starts at 4c and is available from 4c + 2
        assert executed[k] == pytest.approx(100 * c + (k - 4 * c)), k


def test_zero_latency_switches_at_the_start() -> None:
    sched = ChunkScheduler(SchedulerConfig(execute_horizon=3), PERIOD_S, horizon=5)
    executed, starts, _ = simulate(sched, latency_steps=0, num_steps=9)
    assert starts == [0, 3, 6]
    assert executed == [0, 1, 2, 100, 101, 102, 200, 201, 202]


def test_latency_estimate_is_a_running_percentile_rounded_up_to_steps() -> None:
    cfg = SchedulerConfig(latency_percentile=50.0, latency_window=3, initial_latency_s=0.15)
    sched = ChunkScheduler(cfg, PERIOD_S, horizon=10)
    assert sched.delay_steps == 2 and math.isnan(sched.status().latency_s)
    for i, latency in enumerate([0.05, 0.21, 0.30, 0.31]):
        now = T0_S + i
        request = sched.begin(now - latency + 0.0, stamp_s=now - latency)
        sched.complete(request, make_chunk(i, 10), now)
    # window [0.21, 0.30, 0.31]: median 0.30 -> exactly 3 periods, not 4
    assert sched.latency_s == pytest.approx(0.30)
    assert sched.delay_steps == 3
    assert sched.status().delay_steps == 3 and sched.status().chunks_received == 4


def test_latency_counts_from_the_observation_stamp() -> None:
    sched = ChunkScheduler(SchedulerConfig(), PERIOD_S, horizon=10)
    request = sched.begin(T0_S, stamp_s=T0_S - 0.12)  # the observation was already 0.12 s old
    sched.complete(request, make_chunk(0, 10), T0_S + 0.05)
    assert sched.latency_s == pytest.approx(0.17)
    assert sched.delay_steps == 2
    action = sched.action_at(T0_S + 0.08)  # 0.2 s after the stamp: index 2 of the chunk
    assert action is not None and action.positions[0] == pytest.approx(2.0)


@pytest.mark.parametrize("mode", ["naive", "rtc", "temporal_ensemble"])
def test_no_time_travel_with_jittered_latency(mode: str) -> None:
    """Off-grid completion times: every action comes from a chunk already available, at the index
    of its own time, and the executed indices never go back within a chunk."""
    rng = np.random.default_rng(0)
    sched = ChunkScheduler(SchedulerConfig(mode=mode, execute_horizon=3), PERIOD_S, horizon=8)
    pending: tuple[InferenceRequest, float] | None = None
    arrivals: dict[int, float] = {}
    stamps: dict[int, float] = {}
    last_index: dict[int, float] = {}
    for k in range(300):
        now = T0_S + k * PERIOD_S
        if pending is not None and pending[1] <= now:
            request, done = pending
            sched.complete(request, make_chunk(request.chunk_id, 8), done)
            arrivals[request.chunk_id] = done
            pending = None
        if sched.should_start(now):
            request = sched.begin(now, stamp_s=now - rng.uniform(0.0, 0.05))
            stamps[request.chunk_id] = request.stamp_s
            pending = (request, now + rng.uniform(0.0, 0.45))
        action = sched.action_at(now)
        if action is None:
            continue
        for cid in action.chunk_ids:
            assert arrivals[cid] <= now
            index = (now - stamps[cid]) / PERIOD_S
            assert index >= last_index.get(cid, -1.0)
            last_index[cid] = index
        if mode != "temporal_ensemble":
            (cid,) = action.chunk_ids
            expected = 100 * cid + min((now - stamps[cid]) / PERIOD_S, 7.0)
            assert action.positions[0] == pytest.approx(expected, abs=1e-6)


def test_complete_refuses_time_going_backwards_and_unknown_requests() -> None:
    sched = ChunkScheduler(SchedulerConfig(), PERIOD_S, horizon=10)
    request = sched.begin(T0_S)
    with pytest.raises(Pi0PolicyError, match="in flight"):
        sched.begin(T0_S + 0.01)
    assert not sched.should_start(T0_S + 10.0)
    with pytest.raises(Pi0PolicyError, match="backwards"):
        sched.complete(request, make_chunk(0, 10), T0_S - 0.01)
    stale = InferenceRequest(chunk_id=7, stamp_s=T0_S, delay_steps=0)
    with pytest.raises(Pi0PolicyError, match="in flight"):
        sched.complete(stale, make_chunk(7, 10), T0_S)
    with pytest.raises(Pi0PolicyError, match="expected actions"):
        sched.complete(request, make_chunk(0, 9), T0_S + 0.1)
    sched.abort(request)
    assert sched.should_start(T0_S + 0.5)


def test_slow_inference_holds_then_continues() -> None:
    """Latency 7 periods against s = 3 and H = 10: the next inference starts when the previous
    one completes, the last action is held once the chunk runs out, then the new one continues at
    the index of the current time."""
    sched = ChunkScheduler(SchedulerConfig(execute_horizon=3), PERIOD_S, horizon=10)
    executed, starts, _ = simulate(sched, latency_steps=7, num_steps=21)
    assert starts == [0, 7, 14]
    assert executed[7:10] == [7, 8, 9]
    assert executed[10:14] == [9, 9, 9, 9]  # hold the last action of chunk 0
    assert executed[14:17] == [107, 108, 109]  # chunk 1 (stamp 7), index 7 at step 14
    assert executed[17:21] == [109] * 4
    held = sched.action_at(T0_S + 20 * PERIOD_S)
    assert held is not None and held.holding and held.chunk_ids == (1,)


def test_a_chunk_with_nothing_left_in_the_future_is_dropped() -> None:
    sched = ChunkScheduler(SchedulerConfig(execute_horizon=2), PERIOD_S, horizon=5)
    executed, starts, _ = simulate(sched, latency_steps=[1, 6, 1, 1], num_steps=12)
    # chunk 0: start 0, arrives 1; chunk 1: start 2, arrives 8 (index 6 > 4: dropped);
    # chunk 2 starts at 8 and arrives at 9.
    assert starts == [0, 2, 8, 10]
    assert sched.status().chunks_dropped == 1
    assert executed[5:9] == [4, 4, 4, 4]
    assert executed[9] == 201


def test_temporal_ensemble_weights_the_oldest_most() -> None:
    cfg = SchedulerConfig(mode="temporal_ensemble", execute_horizon=2, ensemble_decay=0.5)
    sched = ChunkScheduler(cfg, PERIOD_S, horizon=6)
    executed, _, _ = simulate(sched, latency_steps=1, num_steps=8)
    # step 3: chunk 0 (index 3) and chunk 1 (stamp 2, index 1, available from 3)
    w = np.exp(-0.5 * np.arange(2))
    assert executed[2] == 2.0
    assert executed[3] == pytest.approx((w[0] * 3 + w[1] * 101) / w.sum())
    # step 5: chunks 0 (index 5), 1 (index 3) and 2 (stamp 4, index 1)
    w = np.exp(-0.5 * np.arange(3))
    assert executed[5] == pytest.approx((w[0] * 5 + w[1] * 103 + w[2] * 201) / w.sum())
    # step 6: chunk 0 has run out
    w = np.exp(-0.5 * np.arange(2))
    assert executed[6] == pytest.approx((w[0] * 104 + w[1] * 202) / w.sum())


def test_rtc_request_carries_the_actions_still_to_execute() -> None:
    sched = ChunkScheduler(SchedulerConfig(mode="rtc", execute_horizon=4), PERIOD_S, horizon=10)
    _, _, requests = simulate(sched, latency_steps=2, num_steps=5)
    first, second = requests
    assert first.prev_actions is None and first.mask_end == 0
    assert second.delay_steps == 2 and second.stamp_s == pytest.approx(T0_S + 0.4)
    # chunk 0 continues from its index 4; past its end (6 rows) the hold value 9
    np.testing.assert_allclose(second.prev_actions[:, 0], [4, 5, 6, 7, 8, 9, 9, 9, 9, 9])
    assert second.mask_end == 6


def test_rtc_request_mask_covers_at_least_the_delay() -> None:
    """After a long stall the previous chunk has fewer rows left than d; the d held actions
    are still what will execute, so the mask keeps them."""
    sched = ChunkScheduler(SchedulerConfig(mode="rtc_fast", execute_horizon=3), PERIOD_S, horizon=10)
    _, _, requests = simulate(sched, latency_steps=8, num_steps=9)
    second = requests[1]  # stamp 8: chunk 0 has indices 8, 9 left; d = 8
    assert second.delay_steps == 8 and second.mask_end == 8
    np.testing.assert_allclose(second.prev_actions[:, 0], [8, 9] + [9] * 8)


def test_naive_and_ensemble_requests_carry_no_previous_chunk() -> None:
    for mode in ("naive", "temporal_ensemble"):
        sched = ChunkScheduler(SchedulerConfig(mode=mode, execute_horizon=2), PERIOD_S, horizon=5)
        _, _, requests = simulate(sched, latency_steps=1, num_steps=5)
        assert all(r.prev_actions is None for r in requests)


def test_off_grid_stamps_interpolate() -> None:
    sched = ChunkScheduler(SchedulerConfig(execute_horizon=2), PERIOD_S, horizon=4)
    request = sched.begin(T0_S)
    sched.complete(request, make_chunk(0, 4), T0_S)
    action = sched.action_at(T0_S + 0.125)
    assert action is not None and action.positions[0] == pytest.approx(1.25)
    plan = sched.plan(T0_S + 0.05, 5)
    assert plan is not None
    np.testing.assert_allclose(plan[:, 0], [0.5, 1.5, 2.5, 3.0, 3.0], atol=1e-4)  # epoch-stamp rounding


@pytest.mark.parametrize("kwargs", [{"mode": "blend"}, {"execute_horizon": 0}, {"mask_schedule": "cos"},
                                    {"max_guidance_weight": -1.0}, {"latency_percentile": 101.0},
                                    {"ensemble_decay": math.nan}, {"latency_window": 0}])
def test_config_rejects_invalid_values(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        SchedulerConfig(**kwargs)


@pytest.mark.parametrize("period_s, horizon, pattern", [(0.0, 10, "action period must be > 0 s"),
                                                        (math.inf, 10, "action period must be > 0 s"),
                                                        (PERIOD_S, 0, "chunk horizon must be >= 1")])
def test_scheduler_rejects_a_geometry_it_cannot_schedule(period_s: float, horizon: int, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        ChunkScheduler(SchedulerConfig(), period_s, horizon)


@pytest.mark.parametrize("mode", ["temporal_ensemble", "rtc"])
def test_execute_horizon_equal_to_the_chunk_is_allowed(mode: str) -> None:
    # s = H: each chunk executes to its end before the next starts.
    assert ChunkScheduler(SchedulerConfig(mode=mode, execute_horizon=10), PERIOD_S, horizon=10).horizon == 10


@pytest.mark.parametrize("mode", ["temporal_ensemble", "rtc_fast", "rtc"])
def test_execute_horizon_longer_than_the_chunk_is_rejected(mode: str) -> None:
    with pytest.raises(ConfigError, match="execute_horizon"):
        ChunkScheduler(SchedulerConfig(mode=mode, execute_horizon=11), PERIOD_S, horizon=10)


def test_naive_mode_takes_any_execute_horizon() -> None:
    # naive starts an inference every tick and never reads execute_horizon: a parameter file made
    # for ALOHA's 50-action chunks (execute_horizon 25) failed configure on a 10-action model.
    sched = ChunkScheduler(SchedulerConfig(mode="naive", execute_horizon=25), PERIOD_S, horizon=10)
    assert sched.horizon == 10


def test_a_failed_inference_does_not_delay_the_next_start() -> None:
    """abort forgets the failed start: the next tick may start another at once, instead of s
    periods after the failure (by then the previous chunk may have run out)."""
    sched = ChunkScheduler(SchedulerConfig(mode="rtc", execute_horizon=5), PERIOD_S, horizon=10)
    sched.complete(sched.begin(T0_S), make_chunk(0, 10), T0_S)
    failed = sched.begin(T0_S + 5 * PERIOD_S)
    sched.abort(failed)
    assert sched.should_start(T0_S + 6 * PERIOD_S)
    retry = sched.begin(T0_S + 6 * PERIOD_S)
    sched.complete(retry, make_chunk(retry.chunk_id, 10), T0_S + 6 * PERIOD_S)
    # the schedule then runs from the start that succeeded
    assert not sched.should_start(T0_S + 10 * PERIOD_S) and sched.should_start(T0_S + 11 * PERIOD_S)


def test_the_lead_of_the_first_point_counts_toward_the_delay() -> None:
    """The node sends a chunk's first point one control period after it arrives; the previous chunk
    is executed until then, so d covers latency + lead (here 0.25 + 0.1 s at 0.1 s periods)."""
    config = SchedulerConfig(mode="rtc", execute_horizon=4, initial_latency_s=0.25)
    assert ChunkScheduler(config, PERIOD_S, horizon=10).delay_steps == 3
    led = ChunkScheduler(config, PERIOD_S, horizon=10, lead_s=0.1)
    assert led.delay_steps == 4 and led.begin(T0_S).delay_steps == 4
    with pytest.raises(ConfigError, match="lead"):
        ChunkScheduler(config, PERIOD_S, horizon=10, lead_s=-0.1)


def test_a_chunk_whose_last_action_has_passed_is_dropped_and_its_latency_counts() -> None:
    """H = 5: a chunk completing 4.5 periods after its stamp has its last action (index 4) behind
    it, so it is dropped; its latency still feeds the delay estimate (else d stays as low as the
    fast chunks say, and the next slow one is dropped too)."""
    sched = ChunkScheduler(SchedulerConfig(execute_horizon=2, latency_percentile=100.0), PERIOD_S, horizon=5)
    request = sched.begin(T0_S)
    assert not sched.complete(request, make_chunk(0, 5), T0_S + 4.5 * PERIOD_S)
    assert sched.status().chunks_dropped == 1 and sched.action_at(T0_S + 0.5) is None
    assert sched.latency_s == pytest.approx(0.45) and sched.delay_steps == 5
    # exactly on the last index: kept (its last action is still to execute)
    request = sched.begin(T0_S + 1.0)
    assert sched.complete(request, make_chunk(1, 5), T0_S + 1.0 + 4 * PERIOD_S)


def test_begin_and_complete_refuse_times_out_of_order() -> None:
    sched = ChunkScheduler(SchedulerConfig(), PERIOD_S, horizon=10)
    with pytest.raises(Pi0PolicyError, match="stamp <= now"):
        sched.begin(T0_S, stamp_s=T0_S + 0.01)
    assert not sched.status().in_flight
    sched.complete(sched.begin(T0_S), make_chunk(0, 10), T0_S + 0.3)
    late = sched.begin(T0_S + 0.25)
    with pytest.raises(Pi0PolicyError, match="backwards"):
        sched.complete(late, make_chunk(1, 10), T0_S + 0.28)  # after its stamp, before the previous arrival


def test_holding_starts_past_the_last_action_not_on_it() -> None:
    sched = ChunkScheduler(SchedulerConfig(execute_horizon=2), PERIOD_S, horizon=10)
    sched.complete(sched.begin(T0_S), make_chunk(0, 10), T0_S)
    last = sched.action_at(T0_S + 9 * PERIOD_S)
    assert last is not None and not last.holding and last.positions[0] == pytest.approx(9.0)
    past = sched.action_at(T0_S + 9.5 * PERIOD_S)
    assert past is not None and past.holding and past.positions[0] == pytest.approx(9.0)


def test_temporal_ensemble_keeps_the_chunks_in_use_one_step_before_a_new_one() -> None:
    """rtc-eval composes the chunks used at the step before a boundary (the counterfactual): with
    H = 6, s = 2 and no latency, chunk 3 arrives at step 6 while step 5 used chunks 0, 1 and 2."""
    cfg = SchedulerConfig(mode="temporal_ensemble", execute_horizon=2, ensemble_decay=0.0)
    sched = ChunkScheduler(cfg, PERIOD_S, horizon=6)
    simulate(sched, latency_steps=0, num_steps=6)
    before = sched.action_at(T0_S + 5 * PERIOD_S)
    assert before is not None and before.chunk_ids == (0, 1, 2)
    newest = sched.begin(T0_S + 6 * PERIOD_S)
    sched.complete(newest, make_chunk(3, 6), T0_S + 6 * PERIOD_S)
    np.testing.assert_allclose(sched.compose((0, 1, 2), T0_S + 6 * PERIOD_S)[0], (5 + 104 + 202) / 3, atol=1e-4)


def test_temporal_ensemble_counts_a_chunk_on_its_last_index_despite_rounding() -> None:
    """Epoch-sized stamps: the time of a chunk's last action may compute a rounding error past
    index H - 1; the chunk still covers it (else the blend jumps for one step)."""
    cfg = SchedulerConfig(mode="temporal_ensemble", execute_horizon=2, ensemble_decay=0.0)
    for horizon in range(3, 13):  # at T0_S, index 4 computes as 4.000001, index 9 as 9.000001, ...
        sched = ChunkScheduler(cfg, PERIOD_S, horizon)
        sched.complete(sched.begin(T0_S), make_chunk(0, horizon), T0_S)
        later = T0_S + 2 * PERIOD_S
        sched.complete(sched.begin(later), make_chunk(1, horizon), later)
        action = sched.action_at(T0_S + (horizon - 1) * PERIOD_S)
        assert action is not None and action.chunk_ids == (0, 1), horizon


def test_rtc_request_continues_from_the_observation_stamp_not_the_start() -> None:
    """The observation is 2 periods old when inference starts: the new chunk's row 0 is meant for
    the stamp, so Y and the mask are taken from there (row i: the previous chunk at stamp + i)."""
    sched = ChunkScheduler(SchedulerConfig(mode="rtc", execute_horizon=4), PERIOD_S, horizon=10)
    sched.complete(sched.begin(T0_S), make_chunk(0, 10), T0_S)
    request = sched.begin(T0_S + 6 * PERIOD_S, stamp_s=T0_S + 4 * PERIOD_S)
    np.testing.assert_allclose(request.prev_actions[:, 0], [4, 5, 6, 7, 8, 9, 9, 9, 9, 9], atol=1e-4)
    assert request.mask_end == 6


def test_a_chunk_with_another_action_width_is_refused() -> None:
    sched = ChunkScheduler(SchedulerConfig(execute_horizon=1), PERIOD_S, horizon=5)
    sched.complete(sched.begin(T0_S), make_chunk(0, 5, dims=2), T0_S)
    request = sched.begin(T0_S + PERIOD_S)
    with pytest.raises(Pi0PolicyError, match="expected 2 action dims, found 3"):
        sched.complete(request, make_chunk(1, 5, dims=3), T0_S + PERIOD_S)


def test_rtc_request_continues_the_newest_chunk() -> None:
    sched = ChunkScheduler(SchedulerConfig(mode="rtc", execute_horizon=2), PERIOD_S, horizon=10)
    _, _, requests = simulate(sched, latency_steps=0, num_steps=5)
    # stamp 4: chunks 0 (stamp 0) and 1 (stamp 2) are held; the one executing is chunk 1, index 2
    np.testing.assert_allclose(requests[2].prev_actions[:3, 0], [102, 103, 104], atol=1e-4)


def test_a_withdrawn_chunk_does_not_delay_the_next_start_even_if_it_came_too_late() -> None:
    """A chunk on an old observation that arrived past its own end (complete drops it) and was
    withdrawn leaves the schedule as an aborted inference does: the next tick may start another."""
    sched = ChunkScheduler(SchedulerConfig(mode="rtc", execute_horizon=8), PERIOD_S, horizon=10)
    sched.complete(sched.begin(T0_S), make_chunk(0, 10), T0_S)
    # started at 8 periods on an observation stamped at 5, back at 14.5: 9.5 periods old, dropped
    late = sched.begin(T0_S + 8 * PERIOD_S, T0_S + 5 * PERIOD_S)
    assert not sched.complete(late, make_chunk(late.chunk_id, 10), T0_S + 14.5 * PERIOD_S)
    sched.withdraw(late)
    assert sched.should_start(T0_S + 14.5 * PERIOD_S) and sched.status().chunks_dropped == 1


def test_rtc_mask_never_exceeds_the_chunk() -> None:
    """A delay longer than the chunk (a dropped chunk came 1.6 s late at 0.1 s periods, H = 10):
    the mask covers every row of Y, not more rows than there are."""
    sched = ChunkScheduler(SchedulerConfig(mode="rtc", execute_horizon=4, latency_percentile=100.0), PERIOD_S, 10)
    sched.complete(sched.begin(T0_S), make_chunk(0, 10), T0_S)
    late = sched.begin(T0_S + 4 * PERIOD_S)
    assert not sched.complete(late, make_chunk(1, 10), T0_S + 20 * PERIOD_S)
    request = sched.begin(T0_S + 20 * PERIOD_S)
    assert request.delay_steps == 16 and request.mask_end == 10


def test_executed_positions_replace_the_newest_chunk_in_splicing_modes_only() -> None:
    clamped = np.full((6, 2), -1.0)
    spliced = ChunkScheduler(SchedulerConfig(mode="rtc", execute_horizon=2), PERIOD_S, horizon=10)
    request = spliced.begin(T0_S)
    spliced.complete(request, make_chunk(0, 10), T0_S)
    spliced.executed(request, 4, clamped)
    assert spliced.action_at(T0_S + 5 * PERIOD_S).positions[0] == pytest.approx(-1.0)
    # temporal_ensemble keeps the chunk as the policy gave it (the points sent were a blend).
    ensemble = ChunkScheduler(SchedulerConfig(mode="temporal_ensemble", execute_horizon=2), PERIOD_S, horizon=10)
    request = ensemble.begin(T0_S)
    ensemble.complete(request, make_chunk(0, 10), T0_S)
    ensemble.executed(request, 4, clamped)
    assert ensemble.action_at(T0_S + 5 * PERIOD_S).positions[0] == pytest.approx(5.0)


def test_executed_refuses_positions_for_a_chunk_that_is_not_the_newest() -> None:
    sched = ChunkScheduler(SchedulerConfig(mode="rtc", execute_horizon=2), PERIOD_S, horizon=10)
    old = sched.begin(T0_S)
    sched.complete(old, make_chunk(0, 10), T0_S)
    new = sched.begin(T0_S + 2 * PERIOD_S)
    sched.complete(new, make_chunk(1, 10), T0_S + 2 * PERIOD_S)
    with pytest.raises(Pi0PolicyError, match="of the newest chunk 1, found .* for chunk 0"):
        sched.executed(old, 0, np.zeros((10, 2)))
    assert sched.action_at(T0_S + 2 * PERIOD_S).positions[0] == pytest.approx(100.0)


def test_compose_weights_the_oldest_most_whatever_order_the_ids_come_in() -> None:
    cfg = SchedulerConfig(mode="temporal_ensemble", execute_horizon=2, ensemble_decay=0.5)
    sched = ChunkScheduler(cfg, PERIOD_S, horizon=6)
    simulate(sched, latency_steps=0, num_steps=3)  # chunks 0 (stamp 0) and 1 (stamp 2)
    t = T0_S + 2 * PERIOD_S
    np.testing.assert_allclose(sched.compose((1, 0), t), sched.compose((0, 1), t))


def test_a_chunk_does_not_act_before_its_own_stamp() -> None:
    """At a time before a chunk's stamp (action 0's time) the ensemble leaves it out, and on its
    own it gives its first action, not an extrapolation from its end."""
    cfg = SchedulerConfig(mode="temporal_ensemble", execute_horizon=2, ensemble_decay=0.0)
    sched = ChunkScheduler(cfg, PERIOD_S, horizon=6)
    simulate(sched, latency_steps=0, num_steps=3)  # chunks 0 (stamp 0) and 1 (stamp 2)
    before = sched.action_at(T0_S + 1.5 * PERIOD_S)
    assert before.chunk_ids == (0,) and before.positions[0] == pytest.approx(1.5)
    naive = ChunkScheduler(SchedulerConfig(execute_horizon=2), PERIOD_S, horizon=6)
    naive.complete(naive.begin(T0_S), make_chunk(0, 6), T0_S)
    early = naive.action_at(T0_S - 1.5 * PERIOD_S)
    assert early.positions[0] == pytest.approx(0.0) and not early.holding


def test_abort_keeps_the_previous_start_and_abort_in_flight_ends_any_request() -> None:
    sched = ChunkScheduler(SchedulerConfig(mode="rtc", execute_horizon=5), PERIOD_S, horizon=10)
    sched.abort_in_flight()  # nothing in flight: nothing to do
    sched.complete(sched.begin(T0_S), make_chunk(0, 10), T0_S)
    # An inference begun early that failed: the schedule runs from the start before it, as if it
    # had never started (not as if nothing had ever started).
    sched.abort(sched.begin(T0_S + 2 * PERIOD_S))
    assert not sched.should_start(T0_S + 3 * PERIOD_S) and sched.should_start(T0_S + 5 * PERIOD_S)
    sched.begin(T0_S + 5 * PERIOD_S)
    sched.abort_in_flight()
    assert not sched.status().in_flight and sched.should_start(T0_S + 5 * PERIOD_S)


def test_plan_before_the_first_chunk_is_none() -> None:
    sched = ChunkScheduler(SchedulerConfig(), PERIOD_S, horizon=10)
    assert sched.plan(T0_S, 5) is None
    sched.begin(T0_S)
    assert sched.plan(T0_S, 5) is None  # in flight, not yet available

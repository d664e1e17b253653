"""SafetyFilter: the last check between the policy and the actuators. ROS-free, numpy only.

Each limit has a policy: `clamp` (bring the chunk inside the limit, count it) or `reject` (drop
the whole chunk, count it). A NaN / Inf anywhere always rejects. Limits, in the order applied:
1. gripper range on the gripper dims;
2. joint position limits [lower, upper] per action dim;
3. max change per action step, |a[k] - a[k-1]| (a[-1] is the current position when known);
4. velocity limit |a[k] - a[k-1]| / period.
Steps 3 and 4 act as a rate limiter when clamping: each action moves at most the allowed amount
from the previous (already limited) one, so the clamped chunk is continuous from the robot's
current position. From a current position outside the position limits (or gripper range), the
points come back inside at that pace; a chunk that still ends outside them (further out than the
rate limits let it come back) is rejected (counted under `position` / `gripper`), so no trajectory
ever ends outside those limits. A rejected chunk means the caller holds (see the node's hold policy).

`limit_start` applies steps 3 and 4 once more to the points actually sent: by then the chunk's
first actions lie in the past, and the controller goes from where it is to the first point sent in
less time than the skipped actions stood for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

POLICIES = ("clamp", "reject")
LIMITS = ("nonfinite", "gripper", "position", "step", "velocity")


def _as_array(values: tuple[float, ...] | float, dim: int, name: str) -> np.ndarray | None:
    """() → no limit; one value → every dim; dim values → per dim."""
    if values == () or values is None:
        return None
    array = np.atleast_1d(np.asarray(values, dtype=np.float64))
    if array.size == 1:
        return np.full(dim, float(array[0]))
    if array.size != dim:
        raise ValueError(f"{name} needs 1 or {dim} values (one per action dim), found {array.size}")
    return array


@dataclass(frozen=True)
class SafetyConfig:
    """Limits in the robot's action units; empty tuples switch a limit off."""

    position_lower: tuple[float, ...] = ()
    position_upper: tuple[float, ...] = ()
    max_step: tuple[float, ...] = ()
    max_velocity: tuple[float, ...] = ()  # units per second
    gripper_dims: tuple[int, ...] = ()
    gripper_range: tuple[float, ...] = ()  # (lower, upper)
    position_policy: str = "clamp"
    step_policy: str = "clamp"
    velocity_policy: str = "clamp"
    gripper_policy: str = "clamp"

    def __post_init__(self) -> None:
        for name in ("position_policy", "step_policy", "velocity_policy", "gripper_policy"):
            if getattr(self, name) not in POLICIES:
                raise ValueError(f"{name} must be one of {POLICIES}, found {getattr(self, name)!r}")
        if self.gripper_range and len(self.gripper_range) != 2:
            raise ValueError(f"gripper_range needs (lower, upper), found {self.gripper_range}")
        if bool(self.gripper_dims) != bool(self.gripper_range):
            raise ValueError("gripper_dims and gripper_range go together")
        # NaN compares false, so a NaN limit would silently switch the limit off.
        for name in ("position_lower", "position_upper", "max_step", "max_velocity", "gripper_range"):
            values = np.atleast_1d(np.asarray(getattr(self, name), dtype=np.float64))
            if np.any(np.isnan(values)):
                raise ValueError(f"{name} must be numbers, found NaN in {values.tolist()}")
        # np.clip with a negative bound moves every action by that bound: a negative or zero limit
        # would drive the robot steadily one way instead of limiting it.
        for name in ("max_step", "max_velocity"):
            values = np.atleast_1d(np.asarray(getattr(self, name), dtype=np.float64))
            if np.any(values <= 0.0):
                raise ValueError(f"{name} must be > 0 (per action dim), found {values.tolist()}")
        if self.gripper_range and not self.gripper_range[0] <= self.gripper_range[1]:
            raise ValueError(f"gripper_range needs lower <= upper, found {list(self.gripper_range)}")


@dataclass(frozen=True)
class SafetyResult:
    """actions: the chunk to execute, or None when rejected. reason: why it was rejected or
    which limits clamped it ("" when untouched)."""

    actions: np.ndarray | None
    rejected: bool
    reason: str = ""
    clamped: tuple[str, ...] = ()


@dataclass
class SafetyFilter:
    config: SafetyConfig
    action_dim: int
    period_s: float
    clamp_counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LIMITS, 0))
    reject_counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LIMITS, 0))

    def __post_init__(self) -> None:
        if self.period_s <= 0:
            raise ValueError(f"period_s must be > 0, found {self.period_s}")
        cfg, dim = self.config, self.action_dim
        self._lower = _as_array(cfg.position_lower, dim, "position_lower")
        self._upper = _as_array(cfg.position_upper, dim, "position_upper")
        if (self._lower is None) != (self._upper is None):
            raise ValueError("position_lower and position_upper go together")
        if self._lower is not None and np.any(self._lower > self._upper):
            raise ValueError(f"position_lower must be ≤ position_upper, found {self._lower} > {self._upper}")
        self._max_step = _as_array(cfg.max_step, dim, "max_step")
        max_velocity = _as_array(cfg.max_velocity, dim, "max_velocity")
        self._max_velocity_step = None if max_velocity is None else max_velocity * self.period_s
        bad = [d for d in cfg.gripper_dims if not 0 <= d < dim]
        if bad:
            raise ValueError(f"gripper_dims {bad} are outside the {dim} action dims")
        if self._lower is not None and cfg.gripper_dims:
            # No value satisfies both: every chunk ended outside one of them (rejected), or, with no
            # measured position, the position clamp won and sent a gripper value outside its range.
            low, high = cfg.gripper_range
            apart = [d for d in cfg.gripper_dims if self._upper[d] < low or self._lower[d] > high]
            if apart:
                raise ValueError(f"gripper_range [{low:g}, {high:g}] must overlap position_lower / position_upper "
                                 f"on the gripper dims, found dims {apart} limited to "
                                 f"{[[float(self._lower[d]), float(self._upper[d])] for d in apart]}")

    @property
    def limits_rates(self) -> bool:
        """Whether a step or velocity limit is set (what `limit_start` checks)."""
        return self._max_step is not None or self._max_velocity_step is not None

    def min_travel_s(self, start: np.ndarray, end: np.ndarray) -> float:
        """The shortest time in which the step and velocity limits let a joint go from `start` to
        `end` [action_dim] (0 without those limits, or when either point is not finite)."""
        gap = np.abs(np.asarray(end, dtype=np.float64) - np.asarray(start, dtype=np.float64))
        if not np.all(np.isfinite(gap)):
            return 0.0
        periods = 0.0
        for per_period in (self._max_step, self._max_velocity_step):
            if per_period is not None:
                periods = max(periods, float(np.max(gap / per_period)))
        return periods * self.period_s

    @property
    def counters(self) -> dict[str, int]:
        """Flat counters for diagnostics: clamp.<limit> and reject.<limit>."""
        return {**{f"clamp.{k}": v for k, v in self.clamp_counts.items()},
                **{f"reject.{k}": v for k, v in self.reject_counts.items()}}

    def reset_counters(self) -> None:
        """Count from zero again (the node's activation, as its other /diagnostics counters)."""
        for counts in (self.clamp_counts, self.reject_counts):
            counts.update(dict.fromkeys(counts, 0))  # same keys: a reader on another thread never sees them change

    def apply(self, actions: np.ndarray, current: np.ndarray | None = None) -> SafetyResult:
        """Check one chunk [H, action_dim]. `current`: the robot's position in the same units,
        the reference for the first step (None skips the first step's check)."""
        actions = np.asarray(actions, dtype=np.float64)
        if actions.ndim != 2 or actions.shape[1] != self.action_dim:
            return self._reject("nonfinite", f"chunk shape {actions.shape}, expected [H, {self.action_dim}]")
        if not np.all(np.isfinite(actions)):
            bad = np.argwhere(~np.isfinite(actions))[0]
            return self._reject("nonfinite", f"NaN/Inf in the model output (first at step {bad[0]}, dim {bad[1]})")
        current = self._reference(current, "current")  # None: check the steps within the chunk only
        out = actions.copy()
        clamped: list[str] = []
        cfg = self.config
        if cfg.gripper_dims:
            dims = list(cfg.gripper_dims)
            lower, upper = cfg.gripper_range
            outside = (out[:, dims] < lower) | (out[:, dims] > upper)
            if np.any(outside):
                if cfg.gripper_policy == "reject":
                    return self._reject("gripper", f"gripper outside [{lower}, {upper}]")
                out[:, dims] = np.clip(out[:, dims], lower, upper)
                clamped.append("gripper")
        if self._lower is not None:
            outside = (out < self._lower) | (out > self._upper)
            if np.any(outside):
                step, dim = np.argwhere(outside)[0]
                if cfg.position_policy == "reject":
                    return self._reject("position", f"dim {dim} = {out[step, dim]:.4g} at step {step} is outside "
                                                    f"[{self._lower[dim]:.4g}, {self._upper[dim]:.4g}]")
                out = np.clip(out, self._lower, self._upper)
                clamped.append("position")
        return self._limit_rates(out, current, np.full(out.shape[0], self.period_s), clamped, "action")

    def limit_start(self, positions: np.ndarray, first_lead_s: float, reference: np.ndarray | None,
                    counted: tuple[str, ...] = ()) -> SafetyResult:
        """The step and velocity limits on the points sent [K, action_dim]: the first is reached
        `first_lead_s` after now from `reference` (where the controller starts the new trajectory:
        the latest measured position), the others one action period apart. The first segment's
        allowance is the limit scaled by first_lead_s / period_s. Nothing to check without a
        reference. counted: the limits that already clamped this chunk in `apply` (its
        `clamped`): the counters count a chunk once per limit, not once per check."""
        positions = np.asarray(positions, dtype=np.float64)
        if reference is None or positions.shape[0] == 0:
            return SafetyResult(positions.astype(np.float32), rejected=False)
        reference = self._reference(reference, "reference")
        if reference is None:
            return SafetyResult(positions.astype(np.float32), rejected=False)
        spans_s = np.full(positions.shape[0], self.period_s)
        spans_s[0] = max(first_lead_s, 0.0)
        return self._limit_rates(positions, reference, spans_s, [], "point sent", counted)

    def _limit_rates(self, out: np.ndarray, reference: np.ndarray | None, spans_s: np.ndarray, clamped: list[str],
                     what: str, counted: tuple[str, ...] = ()) -> SafetyResult:
        """The step and velocity limits (steps 3-4) on out [K, action_dim] from `reference`, row k
        reached spans_s[k] after the one before it (its allowance: the per-period limit scaled by
        spans_s[k] / period_s); then the result, with every limit that clamped counted once (those
        already in `clamped` included, those in `counted` not again)."""
        scale = (spans_s / self.period_s)[:, None]
        for name, limit, policy in (("step", self._max_step, self.config.step_policy),
                                    ("velocity", self._max_velocity_step, self.config.velocity_policy)):
            if limit is None:
                continue
            allowance = limit * scale
            limited, first = _rate_limit(out, reference, allowance)
            if first is not None:
                if policy == "reject":
                    k, dim, change = first
                    return self._reject(name, f"{what} {k} moves dim {dim} by {change:.4g} in {spans_s[k]:.3g} s, "
                                              f"over the {name} limit's {allowance[k, dim]:.4g}")
                out = limited
                clamped.append(name)
        if reference is not None and out.shape[0] > 0:
            # From a reference outside the position limits (or gripper range) the rate limits bring
            # the points back at their pace. A chunk that still ends outside (where the controller
            # stays) cannot honour both: nothing goes out (e.g. a measured 1e6, ticks for radians).
            outside = self.outside_limits(out[-1])
            if outside is not None:
                limit, _, dim, detail = outside
                plural = "points sent" if what == "point sent" else f"{what}s"  # not "point sents"
                return self._reject(limit, f"the {plural} end outside the limits ({detail} at the last {what}): the "
                                           f"measured position {reference[dim]:.4g} of dim {dim} is further outside "
                                           "than the step and velocity limits let the chunk come back from (expected "
                                           "a measured position inside the limits, or within reach of them)")
        for name in clamped:
            if name not in counted:
                self.clamp_counts[name] += 1
        return SafetyResult(out.astype(np.float32), rejected=False, reason=",".join(clamped), clamped=tuple(clamped))

    def _reference(self, position: np.ndarray | None, name: str) -> np.ndarray | None:
        """The robot's measured position as a reference, or None where it cannot be trusted (a
        NaN or Inf reading: only the steps within the chunk are checked, nothing NaN is sent). A
        wrong length is the caller's mistake, not a reading: it was skipped the same way, without a
        word, so the first step went unchecked for a driver that passed its whole state."""
        if position is None:
            return None
        values = np.asarray(position, dtype=np.float64)
        if values.shape != (self.action_dim,):
            raise ValueError(f"{name}: expected the measured position of the {self.action_dim} action joints, "
                             f"found shape {values.shape}")
        return values if np.all(np.isfinite(values)) else None

    def outside_limits(self, positions: np.ndarray) -> tuple[str, int, int, str] | None:
        """The first point of positions [K, action_dim] (or one point [action_dim]) outside the gripper
        range or the position limits, as (limit, row, dim, "dim d = v is outside [lo, hi]"); None when
        every point is inside (or no such limit is set)."""
        points = np.atleast_2d(np.asarray(positions, dtype=np.float64))
        bounds = []
        if self.config.gripper_dims:
            lower = np.full(self.action_dim, -np.inf)
            upper = np.full(self.action_dim, np.inf)
            dims = list(self.config.gripper_dims)
            lower[dims], upper[dims] = self.config.gripper_range
            bounds.append(("gripper", lower, upper))
        if self._lower is not None:
            bounds.append(("position", self._lower, self._upper))
        # Rounding only: points sent are float32 actions (0.4 clamped is 0.4000000059604645 there).
        tolerance = 1e-6 * np.maximum(1.0, np.abs(points))
        for limit, lower, upper in bounds:
            outside = (points < lower - tolerance) | (points > upper + tolerance)
            if np.any(outside):
                k, dim = (int(i) for i in np.argwhere(outside)[0])
                return limit, k, dim, (f"dim {dim} = {points[k, dim]:.4g} is outside "
                                       f"[{lower[dim]:.4g}, {upper[dim]:.4g}]")
        return None

    def _reject(self, limit: str, reason: str) -> SafetyResult:
        self.reject_counts[limit] += 1
        return SafetyResult(None, rejected=True, reason=f"{limit}: {reason}")


def _rate_limit(actions: np.ndarray, current: np.ndarray | None,
                max_step: np.ndarray) -> tuple[np.ndarray, tuple[int, int, float] | None]:
    """Limit each action's change from the previous one to ±max_step ([A], or [H, A] per action),
    in order. Returns the limited chunk and the first change over the limit (with a small
    tolerance for rounding) as (row, dim, |change|), or None when nothing was over it. Nothing is
    limited before the first one, so it is the input's own change there."""
    out = actions.copy()
    steps = np.broadcast_to(max_step, out.shape)
    # Rows before the first change over the limit are left as they are, so their changes are the
    # input's own: found for every row at once (a chunk inside the limits, the usual case, is done
    # here), the row loop starts at that row. The same subtractions and comparisons as the loop's.
    previous_rows = out[:-1] if current is None else np.concatenate([current[None, :], out[:-1]])
    offset = 1 if current is None else 0
    over_any = np.abs(out[offset:] - previous_rows) > steps[offset:] * (1 + 1e-9) + 1e-12
    rows_over = np.flatnonzero(over_any.any(axis=1))
    if rows_over.size == 0:
        return out, None
    start = int(rows_over[0]) + offset
    previous = out[start - 1] if start > 0 else current
    first: tuple[int, int, float] | None = None
    for k in range(start, out.shape[0]):
        if previous is not None:
            delta = out[k] - previous
            over = np.abs(delta) > steps[k] * (1 + 1e-9) + 1e-12
            if np.any(over):
                if first is None:
                    dim = int(np.argmax(over))
                    first = (k, dim, abs(float(delta[dim])))
                out[k] = previous + np.clip(delta, -steps[k], steps[k])
        previous = out[k]
    return out, first

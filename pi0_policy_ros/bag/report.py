"""`--report DIR`: what a replay did, as `summary.json`, and its actions as PNG plots.

The plots read the bags back, so they show what was written: the chunks from the output bag
(`~/action_chunk`, paired in order with `~/action_chunk_stamp`), and the joint states from the
input bag, mapped by name with the node's own `convert.joint_positions`.

- `overview.png`: one panel per action dimension.
- `action_<i>_<name>.png`: the same panel, larger.
Each panel draws every chunk as a line over its own times (observation stamp + k * action
period), coloured from early (dark) to late (light), and the recorded joint state of the same
name in black (or of the same index, when no joint has the action's name), broken where the
recording has no joint state for longer than `max_observation_age_s`. ALOHA's gripper readings
(finger positions) are drawn as the gripper joint, the units of its actions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pi0_policy_ros.bag.inputs import ReplaySetup
from pi0_policy_ros.bag.reader import InputBag
from pi0_policy_ros.bag.summary import ReplaySummary
from pi0_policy_ros.errors import ConfigError, ObservationError
from pi0_policy_ros.jsonout import json_text
from pi0_policy_ros.policy.robots import aloha_gripper_state_to_action, configured_profile
from pi0_policy_ros.ros import convert
from pi0_policy_ros.ros.params import NodeConfig

SUMMARY_FILE = "summary.json"
OVERVIEW_FILE = "overview.png"
SHARED_STATE_LABEL = "joint state (the panel's joint)"


@dataclass(frozen=True)
class ChunkSeries:
    """stamps_s [N] observation stamps; actions [N, H, A]."""

    stamps_s: np.ndarray
    actions: np.ndarray


@dataclass(frozen=True)
class StateSeries:
    """times_s [M] header stamps; positions [M, state_dim] in the node's joint order."""

    times_s: np.ndarray
    positions: np.ndarray


def read_chunks(out_bag: str | Path, setup: ReplaySetup) -> ChunkSeries:
    """The n-th `~/action_chunk` with the n-th `~/action_chunk_stamp` (as the node publishes them)."""
    stamp_topic = setup.output_topic("~/action_chunk_stamp")
    chunk_topic = setup.output_topic("~/action_chunk")
    stamps: list[float] = []
    chunks: list[np.ndarray] = []
    with InputBag(out_bag) as bag:
        for topic, _, msg in bag.messages([stamp_topic, chunk_topic]):
            if topic == stamp_topic:
                stamps.append(convert.stamp_to_seconds(msg.stamp))
            else:
                chunks.append(convert.action_chunk_from_message(msg))
    count = min(len(stamps), len(chunks))
    if count == 0:
        return ChunkSeries(np.zeros(0), np.zeros((0, 0, 0), np.float32))
    return ChunkSeries(np.asarray(stamps[:count]), np.stack(chunks[:count]))


def read_states(in_bag: str | Path, setup: ReplaySetup, config: NodeConfig) -> StateSeries:
    topic = next(t.bag_topic for t in setup.inputs if t.role == "joint_states")
    times, rows = [], []
    with InputBag(in_bag) as bag:
        for _, _, msg in bag.messages([topic]):
            stamp_s = convert.stamp_to_seconds(msg.header.stamp)
            if not stamp_s > 0.0:
                continue  # unstamped, refused by the node: at 0 s it would stretch the time axis over decades
            try:
                rows.append(convert.joint_positions(msg, config.joint_names))
            except ObservationError:
                continue  # the summary counts rejected inputs; a plot shows what could be read
            times.append(stamp_s)
    positions = np.stack(rows) if rows else np.zeros((0, len(config.joint_names)))
    return StateSeries(np.asarray(times), positions)


def _state_column(config: NodeConfig, dim: int) -> tuple[int | None, str]:
    name = config.action_joint_names[dim] if dim < len(config.action_joint_names) else f"action {dim}"
    if name in config.joint_names:
        return config.joint_names.index(name), f"joint state {name}"
    if dim < len(config.joint_names):
        return dim, f"joint state [{dim}] {config.joint_names[dim]}"
    return None, ""


def _draw_panel(ax: Any, dim: int, chunks: ChunkSeries, states: StateSeries, config: NodeConfig,
                period_s: float, t0_s: float) -> None:
    from matplotlib.collections import LineCollection

    name = config.action_joint_names[dim] if dim < len(config.action_joint_names) else f"action {dim}"
    if chunks.actions.size:
        horizon = chunks.actions.shape[1]
        times = chunks.stamps_s[:, None] - t0_s + np.arange(horizon)[None, :] * period_s  # [N, H]
        segments = np.stack([times, chunks.actions[:, :, dim]], axis=-1)  # [N, H, 2]
        lines = LineCollection(list(segments), array=np.arange(len(segments)), cmap="viridis", linewidths=0.8,
                               alpha=0.7, label=f"chunks ({len(segments)})")
        ax.add_collection(lines)
        ax.plot(times[:, 0], chunks.actions[:, 0, dim], ".", color="tab:red", markersize=2.5,
                label="first action of each chunk")
    column, label = _state_column(config, dim)
    if column is not None and states.times_s.size:
        measured, label = _in_action_units(config, states.positions, column, label)
        times_s, values = _break_at_gaps(states.times_s - t0_s, measured, config.control.max_observation_age_s)
        ax.plot(times_s, values, color="black", linewidth=1.0, label=label)
    ax.autoscale_view()
    ax.set_title(f"[{dim}] {name}", fontsize=9)
    ax.set_xlabel("bag time (s)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(True, alpha=0.3)


def _in_action_units(config: NodeConfig, positions: np.ndarray, column: int, label: str) -> tuple[np.ndarray, str]:
    """Joint state `column` in the units of the actions it is drawn with, as the safety filter and
    the hold point take it: ALOHA measures its grippers as a finger position and commands them as a
    joint, so the raw reading sat up to 0.09 of the range off the actions that held it still."""
    try:
        gripper_dims = configured_profile(config.policy).aloha_gripper_dims
    except ConfigError:  # the replay refused such a configuration before any plot
        gripper_dims = ()
    if column not in gripper_dims:
        return positions[:, column], label
    return aloha_gripper_state_to_action(positions[:, column]), f"{label} (as the gripper joint)"


def _break_at_gaps(times_s: np.ndarray, values: np.ndarray, max_gap_s: float) -> tuple[np.ndarray, np.ndarray]:
    """A NaN point (where matplotlib breaks the line) between samples further apart than
    `max_gap_s`: across a recording gap the line read as joints measured moving, where the node
    had no state at all (older than max_observation_age_s: it held)."""
    gaps = np.flatnonzero(np.diff(times_s) > max_gap_s) + 1
    return (np.insert(times_s.astype(np.float64), gaps, np.nan),
            np.insert(values.astype(np.float64), gaps, np.nan))


def _file_name(dim: int, name: str) -> str:
    return f"action_{dim:02d}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.png"


def _action_dim(chunks: ChunkSeries, config: NodeConfig) -> int:
    """The chunks' action width, or the configured one where there is no chunk to draw."""
    return chunks.actions.shape[2] if chunks.actions.size else len(config.action_joint_names)


def _pyplot() -> Any:
    """matplotlib's pyplot drawing to files (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


def overview_figure(chunks: ChunkSeries, states: StateSeries, config: NodeConfig, period_s: float,
                    t0_s: float) -> Any:
    """Every action dimension's panel in one matplotlib figure, with one legend for them all."""
    plt = _pyplot()

    action_dim = _action_dim(chunks, config)
    cols = min(3, max(1, action_dim))
    rows = (action_dim + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 2.6 * rows), squeeze=False, constrained_layout=True)
    for dim in range(rows * cols):
        ax = axes[dim // cols][dim % cols]
        if dim < action_dim:
            _draw_panel(ax, dim, chunks, states, config, period_s, t0_s)
        else:
            ax.set_visible(False)
    handles, labels = axes[0][0].get_legend_handles_labels()
    # The first panel's labels stand for every panel: its joint's name would not.
    labels = [SHARED_STATE_LABEL if label.startswith("joint state") else label for label in labels]
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=3, fontsize=8)
    fig.suptitle(f"actions vs joint states ({len(chunks.stamps_s)} chunks)", fontsize=11)
    return fig


def write_plots(report_dir: Path, chunks: ChunkSeries, states: StateSeries, config: NodeConfig,
                period_s: float, t0_s: float) -> list[str]:
    """overview.png plus one PNG per action dimension; returns the file names."""
    plt = _pyplot()

    action_dim = _action_dim(chunks, config)
    fig = overview_figure(chunks, states, config, period_s, t0_s)
    fig.savefig(report_dir / OVERVIEW_FILE, dpi=90)
    plt.close(fig)
    files = [OVERVIEW_FILE]
    for dim in range(action_dim):
        fig, ax = plt.subplots(figsize=(9, 3.5), constrained_layout=True)
        _draw_panel(ax, dim, chunks, states, config, period_s, t0_s)
        if ax.get_legend_handles_labels()[0]:  # nothing drawn (no chunk, no state): matplotlib warns
            ax.legend(fontsize=8, loc="upper right")
        name = config.action_joint_names[dim] if dim < len(config.action_joint_names) else f"action_{dim}"
        files.append(_file_name(dim, name))
        fig.savefig(report_dir / files[-1], dpi=90)
        plt.close(fig)
    return files


def write_report(report_dir: str | Path, summary: ReplaySummary, setup: ReplaySetup, config: NodeConfig,
                 action_period_s: float, in_bag: str | Path, out_bag: str | Path) -> dict[str, Any]:
    """summary.json and the plots in `report_dir` (created); returns the JSON content."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    chunks = read_chunks(out_bag, setup)
    states = read_states(in_bag, setup, config)
    t0_s = summary.start_ns / 1e9
    plots = write_plots(report_dir, chunks, states, config, action_period_s, t0_s)
    content = summary.to_json()
    content.update(chunks_in_output=int(len(chunks.stamps_s)), action_period_s=action_period_s,
                   action_joint_names=list(config.action_joint_names), plots=plots)
    (report_dir / SUMMARY_FILE).write_text(json_text(content) + "\n")
    return content


def format_summary(content: dict[str, Any]) -> Sequence[str]:
    """A few human lines for the terminal."""
    lines = [f"{content['mode']} replay of {content['duration_s']:.2f} s: {content['ticks']} ticks, "
             f"{content['chunks']} chunks, achieved {content['achieved_rate_hz']:.2f} Hz of "
             f"{content['target_rate_hz']:.2f} Hz"]
    for hold in content["hold_reasons"][:5]:
        lines.append(f"  held {hold['count']} x: {hold['example']}")
    for action in ("clamp", "reject"):
        counts = [f"{key.partition('.')[2]} {n}" for key, n in content.get("safety", {}).items()
                  if key.startswith(f"{action}.") and n]
        if counts:
            lines.append(f"  safety filter {action}ed: {', '.join(counts)}")
    for stage in ("infer", "observation_to_receipt"):
        pct = content["latency_ms"].get(stage)
        if pct:
            lines.append(f"  latency {stage}: p50 {pct['p50']:.1f} ms, p99 {pct['p99']:.1f} ms")
    return lines

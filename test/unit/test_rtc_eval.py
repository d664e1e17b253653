"""`pi0-policy rtc-eval` on the CPU with the pi0.5 fixture: the ordering of the modes at a delay of
2 steps. The numbers themselves go in bench/results/rtc_eval_cpu.json, not in assertions."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from pi0_policy_ros import rtc_eval


@pytest.fixture
def restore_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_boundary_jumps_order_naive_ensemble_rtc(tmp_path: Path, restore_threads: None) -> None:
    parser = argparse.ArgumentParser()
    rtc_eval.add_arguments(parser)
    out = tmp_path / "rtc_eval.json"
    args = parser.parse_args(["--model", "fixture-pi05", "--delays", "2", "--chunks", "6", "--output", str(out)])
    assert rtc_eval.run(args) == 0
    report = json.loads(out.read_text())
    results = {r["mode"]: r for r in report["models"]["fixture-pi05"]["results"]}
    assert set(results) == {"naive", "temporal_ensemble", "rtc_fast", "rtc"}
    assert all(r["boundaries"] >= 4 and r["chunks_dropped"] == 0 for r in results.values())
    jump = {mode: r["position_jump_rms"] for mode, r in results.items()}
    assert jump["naive"] > jump["temporal_ensemble"] >= jump["rtc"], jump
    assert jump["temporal_ensemble"] >= jump["rtc_fast"], jump
    velocity = {mode: r["velocity_jump_rms"] for mode, r in results.items()}
    assert velocity["naive"] > velocity["temporal_ensemble"] >= velocity["rtc"], velocity

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
from pi0_policy_ros.errors import ConfigError


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


@pytest.mark.parametrize(("argv", "expected"), [
    (["--chunks", "-3"], "chunks: expected at least 1"),  # used to loop forever
    (["--chunks", "0"], "chunks: expected at least 1"),
    (["--delays", "-1"], "delays: expected whole action periods >= 0"),
    (["--delays", "10"], "chunk horizon 10, found [10]"),  # pi05_small: H = 10; nothing would run
    (["--execute-horizon", "0"], "execute_horizon: expected at least 1"),
    (["--period-s", "0"], "period_s: expected > 0"),
    # both were "initial_latency_s must be a finite number in [0.0, 60.0], found nan" (or 70.0): a
    # setting rtc-eval has no option for
    (["--period-s", "inf"], "period_s: expected > 0 s and finite, found inf"),
    (["--period-s", "10", "--delays", "7"], "delays: expected at most 60.0 s of latency (6 periods of 10.0 s), "
                                            "found [7]"),
    (["--cpu-threads", "0"], "--cpu-threads: expected at least 1"),
    (["--fixture-dir", "/nonexistent"], "expected the openpi reference fixture /nonexistent/pi05_small.safetensors, "
                                        "found nothing"),
    pytest.param(["--device", "cuda"], "--device cuda: expected a CUDA device, torch sees none",  # was JSON on stdout
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")),
])
def test_bad_arguments_are_one_error_line(argv: list[str], expected: str, restore_threads: None,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    rtc_eval.add_arguments(parser)
    args = parser.parse_args(["--model", "fixture-pi05", "--modes", "naive", "--chunks", "2", *argv])
    assert rtc_eval.run(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and expected in err and "\n" not in err, err


@pytest.mark.parametrize(("under", "expected"), [
    ("", "expected a file name, found a directory"),
    ("taken/rtc.json", "expected {tmp}/taken to be a directory, found a file"),
    ("taken/sub/rtc.json", "cannot create its directory: Not a directory"),
])
def test_output_that_cannot_be_written_fails_before_the_runs(under: str, expected: str, tmp_path: Path,
                                                             restore_threads: None,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    # The report was written after every run (minutes for the full-size models), then lost to
    # an IsADirectoryError (or NotADirectoryError for a file in the folder's place).
    (tmp_path / "taken").write_text("a file")
    out = tmp_path / under
    parser = argparse.ArgumentParser()
    rtc_eval.add_arguments(parser)
    args = parser.parse_args(["--model", "fixture-pi05", "--modes", "naive", "--chunks", "2", "--output", str(out)])
    assert rtc_eval.run(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # no run: its table would be here
    assert captured.err == f"error: --output {out}: {expected.format(tmp=tmp_path)}\n"
    assert (tmp_path / "taken").read_text() == "a file"


def test_one_step_of_overlap_gives_nan_ratios(restore_threads: None) -> None:
    # d = H - 1: naive's jumps can all be 0; the ratios are then NaN, not a ZeroDivisionError.
    settings = rtc_eval.EvalSettings(delays=(9,), modes=("naive", "rtc_fast"), num_chunks=3)
    source = rtc_eval.load_source("fixture-pi05", "cpu", torch.float32, settings)
    report = rtc_eval.evaluate(source, settings)
    assert len(report["results"]) == 2 and set(report["ratios"]["9"]) == {
        "rtc_fast_over_naive_position_rms", "rtc_fast_over_naive_velocity_rms"}


@pytest.mark.parametrize("seed", [-1, 2**31, 2**64])
def test_settings_refuse_a_seed_outside_the_node_range(seed: int) -> None:
    # Each chunk's noise generator is seeded with seed * 1_000_003 + chunk: 2**64 overflowed torch's
    # manual_seed at the first chunk, after the model had loaded.
    with pytest.raises(ConfigError, match=rf"seed: expected an integer in \[0, 2147483647\], found {seed}"):
        rtc_eval.EvalSettings(seed=seed)

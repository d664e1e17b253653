"""The Triton denoise kernels under Triton's CPU interpreter: each `CANDIDATES` config against
the torch step and the default kernels, twice on the same buffers (`test/triton_interpreter_check.py`),
and the `rtc` step's backward against autograd (`test/triton_rtc_check.py`), and the vision and
prefix stages' kernels against their torch forms (`test/triton_prefix_check.py`).
Skipped where Triton is not installed (requirements-dev.txt installs it). A process of its own,
because `TRITON_INTERPRET=1` must be set before Triton decorates the kernels."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from test.paths import REPO_ROOT

pytest.importorskip("triton")


def _check_under_interpreter(module: str, *args: str, timeout: int = 1800) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


# The engine's own configs run in both geometries; the other candidates (earlier defaults and
# variants the bench times) are shared out between them, each run once: all of them in both took
# ~8 of the suite's 15 minutes on 2 cores.
ENGINE_CONFIGS = ["triton_default", "long_suffix"]
PI05_ALSO = ["run3", "relaxed_wide", "run10_default", "default_no_pdl", "fused_combine"]
PI0_ALSO = ["relaxed", "run4_default", "swap", "split4_head8_wide", "qkv_split2", "per_tile_norm_sum"]


def test_every_candidate_runs_in_one_geometry() -> None:
    from pi0_policy_ros.engine.denoise_triton import CANDIDATES

    assert sorted(ENGINE_CONFIGS + PI05_ALSO + PI0_ALSO) == sorted(CANDIDATES)


@pytest.mark.parametrize("geometry", [["--steps", "2", "--depth", "1", "--configs", ",".join(ENGINE_CONFIGS + PI05_ALSO)],
                                      ["--pi0", "--steps", "1", "--depth", "1",
                                       "--configs", ",".join(ENGINE_CONFIGS + PI0_ALSO)]],
                         ids=["pi05", "pi0"])
def test_candidates_match_under_interpreter(geometry: list[str]) -> None:
    _check_under_interpreter("test.triton_interpreter_check", *geometry)


@pytest.mark.parametrize("geometry", [["--steps", "2", "--depth", "2"], ["--pi0", "--steps", "1", "--depth", "1"]],
                         ids=["pi05", "pi0"])
def test_rtc_backward_matches_autograd_under_interpreter(geometry: list[str]) -> None:
    """`test/triton_rtc_check.py`: the Triton `rtc` step's hand-written VJP against autograd."""
    _check_under_interpreter("test.triton_rtc_check", *geometry)


def test_prefix_row_kernels_under_interpreter() -> None:
    """`test/triton_prefix_check.py`: the prefix's RoPE / GEGLU / quantization kernels, vision's
    residual + LayerNorm and attention."""
    _check_under_interpreter("test.triton_prefix_check", timeout=600)

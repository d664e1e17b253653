"""`StageFit`: a kernel variant whose pipeline needs more shared memory than the GPU has is
launched with fewer stages (found once, then reused); one that cannot fit at all is a clear error.
The kernel here is a stand-in with Triton's launch interface that refuses a launch the way Triton
does (`OutOfResources` before anything runs); the real kernels are fitted on the H100 in
test/gpu/test_denoise_triton_gpu.py, and `bench/compile_targets.py` compiles them for other GPUs."""

from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("triton")
from triton.runtime.errors import OutOfResources  # noqa: E402  (after the skip)

from pi0_policy_ros.engine.denoise_triton import StageFit  # noqa: E402
from pi0_policy_ros.errors import ConfigError  # noqa: E402


class RefusingKernel:
    """Launches run only when stages × `stage_bytes` fits `limit` (Triton's check at launch)."""

    __name__ = "demo_kernel"

    def __init__(self, stage_bytes: int, limit: int, resource: str = "shared memory") -> None:
        self.stage_bytes, self.limit, self.resource = stage_bytes, limit, resource
        self.attempts: list[int] = []
        self.runs: list[tuple] = []

    def __getitem__(self, grid: tuple[int, ...]):
        def launch(*args, num_stages: int, **meta) -> None:
            self.attempts.append(num_stages)
            if num_stages * self.stage_bytes > self.limit:
                raise OutOfResources(num_stages * self.stage_bytes, self.limit, self.resource)
            self.runs.append((grid, args, num_stages, meta))
        return launch


def test_steps_down_once_then_reuses_the_depth(caplog) -> None:
    fit = StageFit()
    kernel = RefusingKernel(stage_bytes=48_000, limit=101_376)  # pi0's pair tile on a 99 KB card
    x = torch.zeros(4)
    with caplog.at_level(logging.INFO, logger="pi0_policy_ros.engine.denoise_triton"):
        fit.launch(kernel, (8,), x, 3, num_stages=4, BLOCK_K=128)
    assert kernel.attempts == [4, 3, 2]
    assert kernel.runs == [((8,), (x, 3), 2, {"BLOCK_K": 128})]
    assert "demo_kernel: 4 pipeline stages" in caplog.text and "using 2" in caplog.text
    kernel.attempts.clear()
    fit.launch(kernel, (8,), x, 5, num_stages=4, BLOCK_K=128)  # same variant, other runtime values
    assert kernel.attempts == [2]


def test_variants_are_fitted_separately() -> None:
    fit = StageFit()
    kernel = RefusingKernel(stage_bytes=30_000, limit=100_000)
    fit.launch(kernel, (1,), torch.zeros(2), num_stages=4, BLOCK_K=128)
    fit.launch(kernel, (1,), torch.zeros(2), num_stages=3, BLOCK_K=64)  # a different constexpr: its own entry
    fit.launch(kernel, (1,), torch.zeros(2, dtype=torch.bfloat16), num_stages=4, BLOCK_K=128)  # other dtype
    assert kernel.attempts == [4, 3, 3, 4, 3]
    assert sorted(fit.stages.values()) == [3, 3, 3]


def test_a_kernel_that_fits_runs_at_its_depth_silently(caplog) -> None:
    fit = StageFit()
    kernel = RefusingKernel(stage_bytes=10_000, limit=232_448)
    with caplog.at_level(logging.INFO):
        fit.launch(kernel, (1,), num_stages=4)
    assert kernel.attempts == [4] and caplog.text == ""


def test_no_depth_fits_is_a_clear_error() -> None:
    kernel = RefusingKernel(stage_bytes=200_000, limit=101_376)
    with pytest.raises(ConfigError, match=r"demo_kernel needs 200000 bytes of shared memory at 1 .*has 101376.*"
                                          r"torch-op step \(Engine.create\(denoise_kernels='torch'\)"):
        StageFit().launch(kernel, (1,), num_stages=3)
    assert kernel.attempts == [3, 2, 1]


def test_other_resources_are_not_retried() -> None:
    kernel = RefusingKernel(stage_bytes=1, limit=0, resource="threads")
    with pytest.raises(ConfigError, match="threads"):
        StageFit().launch(kernel, (1,), num_stages=4)
    assert kernel.attempts == [4]

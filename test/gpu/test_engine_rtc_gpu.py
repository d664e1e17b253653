"""RTC guidance in the captured chain (skipped without CUDA): graph replay equals the eager guided
sampler, also for a second request with new inputs and a new previous chunk after capture, and
no previous chunk replays the plain chain."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pi0_policy_ros.engine.engine import Engine
from pi0_policy_ros.engine.guidance import EngineGuidance
from pi0_policy_ros.engine.types import EngineShape, random_batch
from pi0_policy_ros.model.checkpoint import random_model
from pi0_policy_ros.model.config import ModelConfig
from pi0_policy_ros.model.rtc import soft_mask
from test.gpu.medium import medium_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _guidance(cfg: ModelConfig, seed: int) -> EngineGuidance:
    h, a = cfg.action_horizon, cfg.action_dim
    mask = np.repeat(soft_mask(h, 2, h - h // 2).numpy()[:, None], a, axis=1)
    mask[:, 7:] = 0.0  # a 7-dim robot
    prev = np.random.default_rng(seed).standard_normal((h, a))
    return EngineGuidance(prev=prev.astype(np.float32), mask=mask.astype(np.float32))


@pytest.mark.parametrize("pi05", [True, False])
@pytest.mark.parametrize("mode", ["rtc_fast", "rtc"])
def test_guided_graphs_equal_eager_guided_fp32(pi05: bool, mode: str) -> None:
    cfg = medium_config(pi05)
    model = random_model(cfg, "cuda", torch.float32, seed=7)
    shape = EngineShape.for_model(cfg)
    engine = Engine.create(model, shape, "cuda", "float32", rtc_mode=mode)
    eager = Engine.create(model, shape, "cuda", "float32", mode="eager", rtc_mode=mode)
    plain = Engine.create(model, shape, "cuda", "float32")
    assert engine.mode == "graphs" and engine.rtc_mode == mode
    outs = []
    for seed in (0, 1):
        batch, guidance = random_batch(shape, seed, valid_slots=2), _guidance(cfg, 10 + seed)
        got = engine.infer(batch, guidance)
        np.testing.assert_allclose(got, eager.infer(batch, guidance), atol=1e-3)
        np.testing.assert_allclose(engine.infer(batch, None), plain.infer(batch), atol=1e-3)
        outs.append(got)
    assert np.abs(outs[0] - outs[1]).max() > 1e-2


@pytest.mark.parametrize("mode", ["rtc_fast", "rtc"])
def test_guided_graphs_bf16_close_to_eager(mode: str) -> None:
    """bf16 on the Triton kernels (`rtc`: their hand-written backward): within 2e-2 of the bf16
    eager guided sampler, or as close to the float32 one as that is."""
    cfg = medium_config(True)
    ref_model = random_model(cfg, "cuda", torch.float32, seed=7)
    model = random_model(cfg, "cuda", torch.bfloat16, seed=7)
    shape = EngineShape.for_model(cfg)
    engine = Engine.create(model, shape, "cuda", "bfloat16", rtc_mode=mode)
    eager = Engine.create(model, shape, "cuda", "bfloat16", mode="eager", rtc_mode=mode)
    ref = Engine.create(ref_model, shape, "cuda", "float32", mode="eager", rtc_mode=mode)
    assert engine.report.denoise_kernels == "triton"
    for seed in (0, 1):
        batch, guidance = random_batch(shape, seed, valid_slots=2), _guidance(cfg, 20 + seed)
        got, want, exact = engine.infer(batch, guidance), eager.infer(batch, guidance), ref.infer(batch, guidance)
        err = np.abs(got - want).max()
        assert err <= 2e-2 or np.abs(got - exact).max() <= 1.5 * np.abs(want - exact).max() + 1e-3, err


@pytest.mark.parametrize("geometry", [[], ["--pi0"]], ids=["pi05", "pi0"])
def test_triton_rtc_backward_matches_autograd(geometry: list[str]) -> None:
    """`test/triton_rtc_check.py` on the GPU: the hand-written VJP (fp16 kernels) against autograd
    through the float32 torch step, and the guided chain against the torch `rtc` step."""
    pytest.importorskip("triton")
    from test.triton_rtc_check import main
    assert main(["--device", "cuda", "--steps", "3", "--depth", "3", *geometry]) == 0

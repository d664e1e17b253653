"""GPU test of the persistent Gluon step (`denoise_gluon`; sm_90, skipped elsewhere): the ten-step
chain on the full-size pi0.5 expert (random weights) against the Triton step on the same inputs,
twice on the same buffers (the barrier counters and the cache rows must start clean each time)."""

from __future__ import annotations

import pytest
import torch

from pi0_policy_ros.model.config import get_preset
from test.denoise_setup import make_step_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                                reason="needs an sm_90 GPU")


def test_gluon_chain_matches_triton_chain() -> None:
    from pi0_policy_ros.engine.denoise_gluon import GluonDenoiseStep
    from pi0_policy_ros.engine.denoise_triton import TritonDenoiseStep

    inputs = make_step_inputs(get_preset("pi05"), torch.bfloat16, "cuda", seed=3, valid_prefix=600)
    shape, steps = inputs.shape, inputs.shape.num_steps
    pp = shape.padded_prefix_len
    want_buf = inputs.fresh_buffers()
    plain = TritonDenoiseStep(inputs.weights, inputs.tables, shape, want_buf)
    got_buf = inputs.fresh_buffers()
    fast = GluonDenoiseStep(TritonDenoiseStep(inputs.weights, inputs.tables, shape, got_buf))
    with torch.no_grad():
        for k in range(steps):
            plain.run(want_buf, k)
        results = []
        for _ in range(2):
            for k in range(steps):
                fast.run(got_buf, k)
            torch.cuda.synchronize()
            results.append(got_buf.x[1:steps + 1].float().clone())
    want = want_buf.x[1:steps + 1].float()
    scale = float(want.abs().max())
    assert torch.isfinite(results[0]).all()
    # both sum split-K partials with float32 atomics in no fixed order: a few bf16 ulps apart
    assert float((results[0] - want).abs().max()) <= 2e-2 * scale, float((results[0] - want).abs().max())
    assert float((results[1] - results[0]).abs().max()) <= 1e-2 * scale
    for cache in ("keys", "values"):
        w, g = getattr(want_buf, cache)[:, pp:].float(), getattr(got_buf, cache)[:, pp:].float()
        assert float((w - g).abs().max()) <= 2e-2 * float(w.abs().max()), cache

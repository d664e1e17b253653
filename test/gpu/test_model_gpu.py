"""The eager model on CUDA (skipped without it): float32 against openpi's reference vectors, every
intermediate included, and `gemma.attention`'s padded query rows (every key masked) against the
explicit softmax. Run 161 found the padded rows 0 on the H100, not openpi's uniform average: the
actions matched, `prefix_last_hidden` was 3.9 off."""

from __future__ import annotations

import pytest
import torch

from pi0_policy_ros.model.gemma import additive_mask, attention
from pi0_policy_ros.model.reference import compare_with_reference, load_reference, reference_model
from test.paths import PI0_FIXTURE, PI05_FIXTURE

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# float32 without TF32 lands at float32 rounding on the GPU too (1e-5 in bench/results/selftest_h100.md).
TOLERANCE = 1e-4


@pytest.mark.parametrize("path", [PI05_FIXTURE, PI0_FIXTURE], ids=["pi05_small", "pi0_small"])
def test_float32_on_cuda_matches_every_openpi_intermediate(path) -> None:
    ref = load_reference(path)
    errors = compare_with_reference(ref, reference_model(ref, "cuda"), "cuda")
    assert {name: e for name, e in errors.items() if e > TOLERANCE} == {}


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("head_dim", [16, 256])
def test_attention_on_cuda_gives_rows_masked_everywhere_the_uniform_average(dtype, tol, head_dim: int) -> None:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 8, 40, head_dim, generator=gen)
    k, v = torch.randn(1, 1, 40, head_dim, generator=gen), torch.randn(1, 1, 40, head_dim, generator=gen)
    pad = torch.arange(40) < 30
    mask = additive_mask((pad[:, None] & pad[None, :])[None])
    probs = torch.softmax(q.double() @ k.double().transpose(2, 3) * head_dim**-0.5 + mask.double(), dim=-1)
    want = (probs @ v.double()).transpose(1, 2).reshape(1, 40, 8 * head_dim)
    got = attention(*(t.cuda().to(dtype) for t in (q, k, v)), mask.cuda()).double().cpu()
    assert torch.isfinite(got).all()
    assert (got - want).abs().max() <= tol  # the padded rows 30-39 included

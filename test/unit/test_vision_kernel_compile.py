"""SigLIP's Triton attention kernel compiled ahead of time for sm_90 (no GPU needed): at the
engine's configuration and SigLIP's shape it must fit the H100's shared memory, or configuring the
engine would fail there with Triton's out-of-resource error."""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from pi0_policy_ros.engine import kernels_vision_triton as KV  # noqa: E402
from pi0_policy_ros.engine.rowops import VISION_ATTENTION_BLOCK_Q, VISION_ATTENTION_WARPS  # noqa: E402
from pi0_policy_ros.model.config import get_preset  # noqa: E402

H100_SHARED_MEMORY_PER_BLOCK = 227 * 1024  # the opt-in maximum on sm_90


def test_siglip_attention_fits_sm90_shared_memory() -> None:
    cfg = get_preset("pi05").siglip
    tokens = cfg.tokens_per_image
    signature = {"qkv_ptr": "*bf16", "out_ptr": "*bf16", "T": "i32", "stride_qkv": "i32", "stride_out": "i32",
                 "scale": "fp32", "HEADS": "constexpr", "HD": "constexpr", "BLOCK_Q": "constexpr",
                 "BLOCK_T": "constexpr", "BLOCK_D": "constexpr"}
    constants = {"HEADS": cfg.num_heads, "HD": cfg.head_dim, "BLOCK_Q": VISION_ATTENTION_BLOCK_Q,
                 "BLOCK_T": triton.next_power_of_2(tokens), "BLOCK_D": triton.next_power_of_2(cfg.head_dim)}
    source = ASTSource(fn=KV.vision_attention_kernel, signature=signature, constexprs=constants)
    # Triton's wheel brings its own ptxas, so this needs no CUDA install
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": VISION_ATTENTION_WARPS})
    assert 0 < kernel.metadata.shared <= H100_SHARED_MEMORY_PER_BLOCK

"""One denoise step's inputs without the vision and prefix stages: fused random expert weights,
step tables and static buffers whose KV cache, masks and RoPE tables hold random but valid data.
Shared by the Triton kernel tests (GPU, and the interpreter check on the CPU)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from pi0_policy_ros.engine.buffers import DeviceBuffers, allocate_device
from pi0_policy_ros.engine.tables import (StepTables, build_step_tables, rope_tables, suffix_attention_bias,
                                          suffix_positions)
from pi0_policy_ros.engine.types import EngineShape
from pi0_policy_ros.engine.weights import ExpertWeights, fuse_expert
from pi0_policy_ros.model.checkpoint import random_model
from pi0_policy_ros.model.config import GemmaConfig, ModelConfig, SiglipConfig

# Big enough for the Triton kernels' tiles (head_dim 64, width 256), small enough to be quick.
SIGLIP = SiglipConfig(width=128, depth=2, mlp_dim=256, num_heads=4, projection_dim=256)


def medium_config(pi05: bool, depth: int = 3) -> ModelConfig:
    gemma = GemmaConfig(width=256, depth=depth, mlp_dim=512, num_heads=8, num_kv_heads=1, head_dim=64)
    return ModelConfig("medium", pi05=pi05, siglip=SIGLIP, paligemma=gemma, expert=gemma,
                       action_horizon=10 if pi05 else 50, max_token_len=200 if pi05 else 48)


@dataclass
class StepInputs:
    weights: ExpertWeights
    tables: StepTables
    shape: EngineShape
    buf: DeviceBuffers

    def fresh_buffers(self) -> DeviceBuffers:
        """A deep copy: each step implementation writes x[k + 1] and the suffix K/V rows."""
        return copy.deepcopy(self.buf)


@torch.no_grad()
def make_step_inputs(cfg: ModelConfig, dtype: torch.dtype, device: str | torch.device, seed: int = 0,
                     valid_prefix: int = 700) -> StepInputs:
    """`valid_prefix` of the padded prefix rows are unmasked; the rest get the mask value."""
    dev = torch.device(device)
    model = random_model(cfg, dev, torch.float32, seed=seed)
    weights = fuse_expert(model, dtype, dev)
    tables = build_step_tables(model, weights, dev)
    shape = EngineShape.for_model(cfg)
    buf = allocate_device(shape, cfg.paligemma, cfg.expert.width, dtype, dev)
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    pp = shape.padded_prefix_len

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(size, generator=gen)

    buf.keys[:, :pp].copy_(randn(cfg.paligemma.depth, pp, cfg.paligemma.head_dim))
    buf.values[:, :pp].copy_(randn(cfg.paligemma.depth, pp, cfg.paligemma.head_dim))
    buf.prefix_pad[:min(valid_prefix, pp)] = True
    suffix_attention_bias(buf.prefix_pad, buf.suffix_pattern, buf.suffix_bias)
    cos, sin = rope_tables(suffix_positions(buf.prefix_pad, buf.suffix_offsets), buf.inv_freq, dtype)
    buf.suffix_cos.copy_(cos)
    buf.suffix_sin.copy_(sin)
    buf.state_token.copy_(randn(cfg.expert.width))
    buf.x[0].copy_(randn(shape.action_horizon, shape.action_dim))
    return StepInputs(weights, tables, shape, buf)


def chain_x(step: object, buf: DeviceBuffers, steps: int) -> torch.Tensor:
    """Run a denoise step implementation eagerly for `steps` steps on `buf`: x[1 .. steps], copied."""
    with torch.no_grad():
        for k in range(steps):
            step.run(buf, k)
    return buf.x[1:steps + 1].float().clone()


def warm_up_on_side_stream(step: object, buf: DeviceBuffers, steps: int) -> None:
    """Run the chain once on a side stream, as the engine does before it captures one (CUDA)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        chain_x(step, buf, steps)
    torch.cuda.current_stream().wait_stream(side)

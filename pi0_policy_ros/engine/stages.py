"""Vision and prefix stages: plain torch ops on static buffers, capturable as CUDA graphs.

Both only read and write `DeviceBuffers`; neither syncs with the host nor branches on tensor data,
so each runs identically eagerly (CPU checks) and as a captured graph.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pi0_policy_ros.engine.buffers import DeviceBuffers
from pi0_policy_ros.engine.preprocess import ResizePlan, preprocess_images
from pi0_policy_ros.engine.rowops import geglu, geglu_quantized, rope_qkv
from pi0_policy_ros.engine.tables import rope_tables, suffix_attention_bias, suffix_positions
from pi0_policy_ros.engine.types import EngineShape, PrefixRows
from pi0_policy_ros.engine.weights import ExpertWeights, PrefixWeights, VisionWeights, fp8_linear
from pi0_policy_ros.model.gemma import MASK_VALUE


class VisionStage:
    """The first `slots` camera slots (default: all) in one batch: uint8 HWC → resize-with-pad →
    SigLIP → projected tokens, written straight into the prefix embedding rows [0, slots·T)."""

    def __init__(self, weights: VisionWeights, shape: EngineShape, dtype: torch.dtype) -> None:
        self.w = weights
        self.shape = shape
        self.dtype = dtype
        from pi0_policy_ros.engine.preprocess import plan_resize
        self.plan: ResizePlan = plan_resize(shape.image_hw, shape.model_image_size)

    def run(self, buf: DeviceBuffers, slots: int | None = None) -> None:
        w, cfg = self.w, self.w.cfg
        n, t = self.shape.num_slots if slots is None else slots, self.shape.tokens_per_image
        pixels = preprocess_images(buf.images[:n], self.plan, out=buf.pixels[:n])
        patches = F.conv2d(pixels, w.patch_weight, w.patch_bias, stride=cfg.patch_size)  # [N, W, g, g]
        x = (patches.flatten(2).transpose(1, 2) + w.position).to(self.dtype).reshape(n * t, cfg.width)
        heads, hd = cfg.num_heads, cfg.head_dim
        for lw in w.layers:
            h = F.layer_norm(x, (cfg.width,), eps=cfg.layer_norm_eps)
            qkv = lw.qkv(h).view(n, t, 3, heads, hd).permute(2, 0, 3, 1, 4)  # [3, N, heads, T, hd]
            attn = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # [N, heads, T, hd]
            x = x + lw.out(attn.transpose(1, 2).reshape(n * t, cfg.width))
            h = F.layer_norm(x, (cfg.width,), eps=cfg.layer_norm_eps)
            x = x + lw.fc2(F.gelu(lw.fc1(h), approximate="tanh"))
        h = F.layer_norm(x, (cfg.width,), eps=cfg.layer_norm_eps)
        buf.prefix_embs[: n * t].copy_(w.head(h))


class PrefixStage:
    """Prompt embedding, masks, RoPE tables, then PaliGemma over the whole prefix, writing the
    K/V cache rows [0, Pp). Also prepares what the denoise steps need from this observation:
    the suffix attention bias, suffix RoPE tables and (pi0) the state token."""

    def __init__(self, weights: PrefixWeights, expert: ExpertWeights, shape: EngineShape, dtype: torch.dtype) -> None:
        self.w = weights
        self.expert = expert
        self.shape = shape
        self.dtype = dtype

    def prepare(self, buf: DeviceBuffers, rows: PrefixRows) -> None:
        """Everything derived from the masks and the state (no PaliGemma work), for the prefix laid
        out as `rows` says: its slots' image tokens, then its prompt tokens; every row after them
        is masked."""
        shape, cfg = self.shape, self.w.cfg
        n, t, l = rows.slots, shape.tokens_per_image, rows.prompt
        text = F.embedding(buf.tokens[:l], self.w.embed)
        torch.mul(text, math.sqrt(cfg.width), out=buf.prefix_embs[n * t: n * t + l])
        buf.prefix_pad[: n * t].view(n, t).copy_(buf.image_masks[:n, None].expand(n, t))
        buf.prefix_pad[n * t: n * t + l].copy_(buf.token_mask[:l])
        buf.prefix_pad[n * t + l:].zero_()
        zero = torch.zeros((), dtype=self.dtype, device=buf.prefix_bias.device)
        buf.prefix_bias.view(-1).copy_(torch.where(buf.prefix_pad, zero, torch.full_like(zero, MASK_VALUE)))
        positions = torch.cumsum(buf.prefix_pad.to(torch.int64), 0) - 1
        cos, sin = rope_tables(positions, buf.inv_freq, self.dtype)
        buf.prefix_cos.copy_(cos)
        buf.prefix_sin.copy_(sin)
        suffix_attention_bias(buf.prefix_pad, buf.suffix_pattern, buf.suffix_bias)
        cos, sin = rope_tables(suffix_positions(buf.prefix_pad, buf.suffix_offsets), buf.inv_freq, self.dtype)
        buf.suffix_cos.copy_(cos)
        buf.suffix_sin.copy_(sin)
        if self.expert.state_proj is not None:
            buf.state_token.copy_(self.expert.state_proj(buf.state[None])[0])

    def run(self, buf: DeviceBuffers, rows: PrefixRows | None = None) -> None:
        """PaliGemma over the prefix rows `rows` covers (default: all), K/V into cache rows [0, P)."""
        rows = self.shape.full_prefix if rows is None else rows
        self.prepare(buf, rows)
        cfg = self.w.cfg
        pp = rows.rows(self.shape.tokens_per_image)
        nh, hd = cfg.num_heads, cfg.head_dim
        x = buf.prefix_embs[:pp]
        cos, sin, bias = buf.prefix_cos[:pp], buf.prefix_sin[:pp], buf.prefix_bias[..., :pp]
        for i, lw in enumerate(self.w.layers):
            h = F.rms_norm(x, (cfg.width,), eps=cfg.rms_norm_eps)
            kv_only = lw.out is None
            q = rope_qkv(lw.qkv(h), cos, sin, 0 if kv_only else nh, buf.keys[i, :pp], buf.values[i, :pp])
            if kv_only:
                continue
            # q [Pp, nh·hd] seen as [1, nh, Pp, hd]: SDPA keeps that layout for its output, so the
            # heads go back to [Pp, nh·hd] without a copy.
            q = q.view(1, pp, nh, hd).transpose(1, 2)
            k = buf.keys[i, :pp][None, None].expand(1, nh, pp, hd)
            v = buf.values[i, :pp][None, None].expand(1, nh, pp, hd)
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # [1, nh, Pp, hd]
            x = x + lw.out(attn.transpose(1, 2).reshape(pp, nh * hd))
            h = F.rms_norm(x, (cfg.width,), eps=cfg.rms_norm_eps)
            gu = lw.gate_up(h)
            if lw.down.scale is not None:
                x = x + fp8_linear(gu, lw.down, quantized=geglu_quantized(gu))
            else:
                x = x + lw.down(geglu(gu))

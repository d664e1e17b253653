"""Vision and prefix stages: plain torch ops on static buffers, capturable as CUDA graphs.

Both only read and write `DeviceBuffers`; neither syncs with the host nor branches on tensor data,
so each runs identically eagerly (CPU checks) and as a captured graph.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pi0_policy_ros.engine.buffers import DeviceBuffers
from pi0_policy_ros.engine.preprocess import ImagePreprocessor, plan_resize
from pi0_policy_ros.engine.rowops import (fp8_linear_residual, geglu, geglu_quantized, residual_layer_norm,
                                          rope_qkv, vision_attention)
from pi0_policy_ros.engine.tables import rope_tables, suffix_attention_bias, suffix_positions
from pi0_policy_ros.engine.types import EngineShape, PrefixRows
from pi0_policy_ros.engine.weights import ExpertWeights, PrefixWeights, VisionWeights
from pi0_policy_ros.model.gemma import MASK_VALUE


def flash_varlen_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """torch's flash attention: built in, enabled, sm80+, half precision (else: SDPA with the mask)."""
    return (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
            and torch.backends.cuda.is_flash_attention_available() and torch.backends.cuda.flash_sdp_enabled()
            and torch.cuda.get_device_capability(device) >= (8, 0))


def prefix_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor,
                     seq_ends: torch.Tensor | None) -> torch.Tensor:
    """q [P, heads·hd] over the one KV head's keys / values [P, hd] → [P, heads·hd].

    The heads are rows of one head (row p·heads + h: q seen as [P·heads, hd]), so K/V need no
    per-head copies and the output has q's layout as it is. With `seq_ends` (the valid keys are
    the first ones, `PrefixRows.leading_keys`) flash varlen stops at their count, read from the
    device: half the time of SDPA with the additive key mask (`bias` [1, 1, 1, P]) at the bench's
    544 rows, 20.8 against 40.2 µs (H100, notes attempt 14). Elsewhere (CPU, float32): the mask."""
    p, hd = keys.shape
    rows = q.numel() // hd
    if seq_ends is not None and flash_varlen_usable(q.device, q.dtype):
        out = torch.ops.aten._flash_attention_forward(q.view(rows, 1, hd), keys[:, None], values[:, None],
                                                      seq_ends[0], seq_ends[1], rows, p, 0.0, False, False)[0]
        return out.view(p, -1)
    out = F.scaled_dot_product_attention(q.view(1, 1, rows, hd), keys[None, None], values[None, None], attn_mask=bias)
    return out.view(p, -1)


class VisionStage:
    """The first `slots` camera slots (default: all) in one batch: uint8 HWC → resize-with-pad →
    SigLIP → projected tokens, written straight into the prefix embedding rows [0, slots·T)."""

    def __init__(self, weights: VisionWeights, shape: EngineShape, dtype: torch.dtype) -> None:
        self.w = weights
        self.shape = shape
        self.dtype = dtype
        self.preprocess = ImagePreprocessor(plan_resize(shape.image_hw, shape.model_image_size),
                                            weights.patch_matrix.device)

    def run(self, buf: DeviceBuffers, slots: int | None = None) -> None:
        w, cfg = self.w, self.w.cfg
        n, t = self.shape.num_slots if slots is None else slots, self.shape.tokens_per_image
        pixels = self.preprocess(buf.images[:n], out=buf.pixels[:n])
        # The stride-p patch conv as one float32 matmul over the patches as rows (c, i, j): 56 → 22
        # µs on the H100 for two images (the conv ran as a small-tile implicit GEMM; run 28 profile).
        p, g = cfg.patch_size, self.shape.model_image_size // cfg.patch_size
        patches = pixels.view(n, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(n * t, 3 * p * p)
        x = torch.matmul(patches, w.patch_matrix.t()).view(n, t, cfg.width).add_(w.position_bias)
        x = x.to(self.dtype).view(n * t, cfg.width)
        heads, eps = cfg.num_heads, cfg.layer_norm_eps
        h = F.layer_norm(x, (cfg.width,), eps=eps)
        for lw in w.layers:
            attn = vision_attention(lw.qkv(h), n, heads)  # [N·T, heads·hd]
            # the residual add, the linear's bias and the next norm in one pass (x updated in place)
            h = residual_layer_norm(x, F.linear(attn, lw.out.weight), lw.out.bias, eps)
            h = residual_layer_norm(x, F.linear(lw.fc1.gelu_tanh(h), lw.fc2.weight), lw.fc2.bias, eps)
        buf.prefix_embs[: n * t].copy_(w.head(h))  # h: the post-layernorm (folded into `head`)


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
        # flash varlen's sequence ends (all query rows; the valid keys), written for every layout
        # so that one vision graph serves a layout with and without `leading_keys`
        buf.prefix_seq_ends[0, 1].fill_(rows.rows(t) * cfg.num_heads)
        buf.prefix_seq_ends[1, 1].copy_(buf.prefix_pad.sum())
        suffix_attention_bias(buf.prefix_pad, buf.suffix_pattern, buf.suffix_bias)
        cos, sin = rope_tables(suffix_positions(buf.prefix_pad, buf.suffix_offsets), buf.inv_freq, self.dtype)
        buf.suffix_cos.copy_(cos)
        buf.suffix_sin.copy_(sin)
        if self.expert.state_proj is not None:
            buf.state_token.copy_(self.expert.state_proj(buf.state[None])[0])

    def run(self, buf: DeviceBuffers, rows: PrefixRows | None = None, prepared: bool = False) -> None:
        """PaliGemma over the prefix rows `rows` covers (default: all), K/V into cache rows [0, P).
        `prepared`: `prepare(buf, rows)` has run already (the engine runs it beside vision)."""
        rows = self.shape.full_prefix if rows is None else rows
        if not prepared:
            self.prepare(buf, rows)
        cfg = self.w.cfg
        pp = rows.rows(self.shape.tokens_per_image)
        nh = cfg.num_heads
        x = buf.prefix_embs[:pp].clone()  # the residual stream, updated in place from here on
        cos, sin, bias = buf.prefix_cos[:pp], buf.prefix_sin[:pp], buf.prefix_bias[..., :pp]
        for i, lw in enumerate(self.w.layers):
            h = F.rms_norm(x, (cfg.width,), eps=cfg.rms_norm_eps)
            kv_only = lw.out is None
            q = rope_qkv(lw.qkv(h), cos, sin, 0 if kv_only else nh, buf.keys[i, :pp], buf.values[i, :pp])
            if kv_only:
                continue
            attn = prefix_attention(q, buf.keys[i, :pp], buf.values[i, :pp], bias,
                                    buf.prefix_seq_ends if rows.leading_keys else None)
            lw.out.add_into(x, attn)
            h = F.rms_norm(x, (cfg.width,), eps=cfg.rms_norm_eps)
            gu = lw.gate_up(h)
            if lw.down.scale is not None:
                fp8_linear_residual(x, geglu_quantized(gu), lw.down)
            else:
                lw.down.add_into(x, geglu(gu))

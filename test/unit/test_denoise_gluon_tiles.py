"""The persistent Gluon step's weight layout (`denoise_gluon.tile_expert`), on the CPU: each
[64, 256] tile holds the rows and columns its kernel unit multiplies, in the kernel's order. The
kernel itself runs only on an sm_90 GPU (`test/gpu/test_denoise_gluon_gpu.py`)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")


def _layer(gen: torch.Generator) -> SimpleNamespace:
    def linear(rows: int, cols: int) -> SimpleNamespace:
        return SimpleNamespace(weight=torch.randn(rows, cols, generator=gen).to(torch.bfloat16))
    return SimpleNamespace(qkv=linear(2560, 1024), out=linear(1024, 2048), gate_up=linear(8192, 1024),
                           down=linear(1024, 4096))


def test_tiles_follow_the_kernel_units() -> None:
    from pi0_policy_ros.engine.denoise_gluon import TILES_PER_LAYER, tile_expert

    gen = torch.Generator().manual_seed(0)
    layers = [_layer(gen), _layer(gen)]
    tiles = tile_expert(SimpleNamespace(layers=layers)).view(-1, 64, 256)
    assert tiles.shape[0] == 2 * TILES_PER_LAYER
    lw, t = layers[1], tiles[TILES_PER_LAYER:]  # the second layer's tiles
    # qkv unit u, K tile j: head u // 4, pairs (u % 4)·32 … +32 of its first half, then the same of its second
    u, j = 37, 2  # the v head's last pair block
    head, pair0 = u // 4, u % 4 * 32
    rows = torch.cat([torch.arange(32) + head * 256 + pair0, torch.arange(32) + head * 256 + 128 + pair0])
    assert torch.equal(t[u * 4 + j], lw.qkv.weight[rows, j * 256:(j + 1) * 256])
    # o_proj unit u: output rows (u // 8)·64 …, head u % 8's 256 input columns
    u = 93
    assert torch.equal(t[160 + u], lw.out.weight[u // 8 * 64:u // 8 * 64 + 64, u % 8 * 256:u % 8 * 256 + 256])
    # gate_up unit u, K tile j: gate rows u·32 … +32, then their up rows 4096 + u·32 …
    u, j = 101, 3
    rows = torch.cat([torch.arange(32) + u * 32, torch.arange(32) + 4096 + u * 32])
    assert torch.equal(t[288 + u * 4 + j], lw.gate_up.weight[rows, j * 256:(j + 1) * 256])
    # down unit u, K tile j: output rows (u // 8)·64 …, input columns (u % 8)·512 + j·256 …
    u, j = 58, 1
    cols = u % 8 * 512 + j * 256
    assert torch.equal(t[800 + u * 2 + j], lw.down.weight[u // 8 * 64:u // 8 * 64 + 64, cols:cols + 256])

"""Probe kernels (runs 68-72, `engine_notes.md` attempt 29; not used by the engine): the prefix's
FP8 MLP as two fused Triton GEMMs instead of cuBLASLt's row-scaled GEMMs, a GEGLU pass and an add.

    h, s   = e4m3(RMSNorm(x))                          per-row scale s [P]
    act, a = e4m3(GEGLU(h · s · W_gate_upᵀ · sw))       one scale per (row, 128-column group)
    acc   += (act · a) · W_downᵀ · sw                   float32 workspace, K split over programs
    x     ← x + acc at the next layer's first norm, which also clears acc

- `gate_up_geglu_kernel`: a program multiplies one activation tile by a group of 128 gate columns
  and their 128 up columns; its epilogue applies GEGLU and quantizes the group to e4m3, so the
  [P, 2·mlp] bf16 gate/up output never reaches memory.
- `down_splitk_kernel`: one K tile per group, each tile's products scaled by its group's scale in
  float32 before they are summed (1 × 128 block scaling, as DeepSeek-V3's FP8 GEMMs); float32
  atomics into the workspace. `ROW_SCALED` (a timing probe) uses the first group's scale per row.
- `norm_rows_kernel`: RMSNorm, optionally after folding the workspace into the residual.
`bench/fp8_tma_probe.py` has the same GEMMs on TMA descriptors. Outcome: slower than, or level
with, cuBLASLt at the prefix's 544 rows; see the notes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from pi0_policy_ros.engine.kernels_triton import _gelu_tanh
from pi0_policy_ros.engine.weights import FP8_MAX, Linear

GROUP = 128  # columns sharing one activation scale: gate_up's column group = down's K tile


@triton.jit
def geglu_e4m3_epilogue(acc_g, acc_u, rm, rn, group, P, MLP, sx_ptr, sw_ptr, out_ptr, so_ptr, stride_out, stride_so,
                         FP8_MAX: tl.constexpr):
    """The gate and up sums of rows rm × columns rn (column group `group`) → GEGLU → e4m3 with one
    scale per row of the group; the scales to so[rm, group]."""
    rows_ok = rm < P
    sx = tl.load(sx_ptr + rm, mask=rows_ok, other=0.0)
    gate = acc_g * sx[:, None] * tl.load(sw_ptr + rn)[None, :]
    up = acc_u * sx[:, None] * tl.load(sw_ptr + MLP + rn)[None, :]
    act = _gelu_tanh(gate) * up
    scale = tl.maximum(tl.max(tl.abs(act), axis=1), 1e-12) / FP8_MAX
    q = tl.minimum(tl.maximum(act / scale[:, None], -FP8_MAX), FP8_MAX)
    tl.store(out_ptr + rm[:, None].to(tl.int64) * stride_out + rn[None, :], q.to(out_ptr.dtype.element_ty),
             mask=rows_ok[:, None])
    tl.store(so_ptr + rm * stride_so + group, scale, mask=rows_ok)


@triton.jit
def gate_up_tma_sums(x_desc, w_desc, off_m, off_n, K, MLP, BLOCK_M: tl.constexpr, GROUP_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    """The gate and up sums of one [BLOCK_M, GROUP_N] tile from TMA descriptors of x [P, K] and
    W = [gate; up] [2·MLP, K] (any dtype the MMA takes)."""
    acc_g = tl.zeros([BLOCK_M, GROUP_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, GROUP_N], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = x_desc.load([off_m, k])
        acc_g = tl.dot(a, w_desc.load([off_n, k]).T, acc_g)
        acc_u = tl.dot(a, w_desc.load([MLP + off_n, k]).T, acc_u)
    return acc_g, acc_u


@triton.jit
def gate_up_geglu_kernel(x_ptr, sx_ptr, w_ptr, sw_ptr, out_ptr, so_ptr, P, K, MLP, stride_x, stride_w, stride_out,
                         stride_so, FP8_MAX: tl.constexpr, BLOCK_M: tl.constexpr, GROUP_N: tl.constexpr,
                         BLOCK_K: tl.constexpr):
    """out[r, g·G : (g + 1)·G] = e4m3(gelu_tanh(gate) ⊙ up / so[r, g]) for x [P, K] e4m3 with row
    scales sx [P], W = [gate; up] [2·MLP, K] e4m3 with row scales sw [2·MLP]."""
    num_m = tl.cdiv(P, BLOCK_M)
    pid = tl.program_id(0)
    # the row blocks of one column group are neighbours: its weight tiles come from HBM once
    pid_m, group = pid % num_m, pid // num_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = group * GROUP_N + tl.arange(0, GROUP_N)
    rk = tl.arange(0, BLOCK_K)
    rows_ok = rm < P
    a_ptrs = x_ptr + rm[:, None].to(tl.int64) * stride_x + rk[None, :]
    g_ptrs = w_ptr + rn[:, None].to(tl.int64) * stride_w + rk[None, :]
    u_ptrs = g_ptrs + MLP.to(tl.int64) * stride_w
    acc_g = tl.zeros([BLOCK_M, GROUP_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, GROUP_N], dtype=tl.float32)
    for _ in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=rows_ok[:, None], other=0.0)
        acc_g = tl.dot(a, tl.trans(tl.load(g_ptrs)), acc_g)
        acc_u = tl.dot(a, tl.trans(tl.load(u_ptrs)), acc_u)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    geglu_e4m3_epilogue(acc_g, acc_u, rm, rn, group, P, MLP, sx_ptr, sw_ptr, out_ptr, so_ptr, stride_out, stride_so,
                         FP8_MAX)


@triton.jit
def down_splitk_kernel(a_ptr, sa_ptr, w_ptr, sw_ptr, acc_ptr, P, N, K, stride_a, stride_sa, stride_w, stride_acc,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_K: tl.constexpr, SPLITS: tl.constexpr,
                       ROW_SCALED: tl.constexpr = False):
    """acc[P, N] += Σ_k a[:, k] · sa[:, k / G] · W[:, k]ᵀ · sw, for the K range of program_id(1)
    (K / SPLITS columns, whole groups); a [P, K] e4m3, W [N, K] e4m3 with row scales sw [N]."""
    num_m = tl.cdiv(P, BLOCK_M)
    pid = tl.program_id(0)
    pid_m, pid_n = pid % num_m, pid // num_m
    k_len = K // SPLITS
    k0 = tl.program_id(1) * k_len
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, GROUP_K)
    rows_ok = rm < P
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * stride_a + (k0 + rk)[None, :]
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * stride_w + (k0 + rk)[None, :]
    s_ptrs = sa_ptr + rm * stride_sa + k0 // GROUP_K
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for _ in range(0, k_len, GROUP_K):
        a = tl.load(a_ptrs, mask=rows_ok[:, None], other=0.0)
        if ROW_SCALED:  # timing probe: one scale per row (sa's first column)
            acc = tl.dot(a, tl.trans(tl.load(w_ptrs)), acc)
        else:
            s = tl.load(s_ptrs, mask=rows_ok, other=0.0)
            acc += tl.dot(a, tl.trans(tl.load(w_ptrs))) * s[:, None]
        a_ptrs += GROUP_K
        w_ptrs += GROUP_K
        s_ptrs += 1
    if ROW_SCALED:
        acc = acc * tl.load(sa_ptr + rm * stride_sa, mask=rows_ok, other=0.0)[:, None]
    acc = acc * tl.load(sw_ptr + rn)[None, :]
    tl.atomic_add(acc_ptr + rm[:, None] * stride_acc + rn[None, :], acc, mask=rows_ok[:, None], sem="relaxed")


@triton.jit
def norm_rows_kernel(x_ptr, acc_ptr, out_ptr, scale_ptr, N, stride_x, stride_acc, stride_out, eps,
                     ADD_ACC: tl.constexpr, CLEAR_ACC: tl.constexpr, QUANT: tl.constexpr, FP8_MAX: tl.constexpr,
                     BLOCK: tl.constexpr):
    """One row: with ADD_ACC, x ← x + acc (rounded once to x's dtype, in place); with CLEAR_ACC,
    acc ← 0; then h = x / rms(x) (the gain is folded into the next linear) to out: x's dtype, or
    with QUANT e4m3 with the row's scale amax / FP8_MAX at scale_ptr[row]."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if ADD_ACC:
        x = (x.to(tl.float32) + tl.load(acc_ptr + row * stride_acc + cols, mask=mask, other=0.0)).to(x.dtype)
        tl.store(x_ptr + row * stride_x + cols, x, mask=mask)
    # The clear below is laid out 4 floats a thread, the load above 8 (to match bf16 x): without a
    # barrier one warp zeroes values another has not loaded yet (runs 68-77: 5-20 of 20 folds wrong).
    tl.debug_barrier()
    if CLEAR_ACC:
        tl.store(acc_ptr + row * stride_acc + cols, tl.zeros([BLOCK], dtype=tl.float32), mask=mask)
    v = x.to(tl.float32)
    h = v / tl.sqrt(tl.sum(v * v, axis=0) / N + eps)
    if QUANT:
        scale = tl.maximum(tl.max(tl.abs(h), axis=0), 1e-12) / FP8_MAX
        tl.store(scale_ptr + row, scale)
        h = tl.minimum(tl.maximum(h / scale, -FP8_MAX), FP8_MAX)
    tl.store(out_ptr + row * stride_out + cols, h.to(out_ptr.dtype.element_ty), mask=mask)



@dataclass(frozen=True)
class Fp8MlpConfig:
    """Tile sizes and pipeline depths (`bench/fp8_mlp_micro.py` times candidates on a GPU)."""

    gate_up_block_m: int = 128
    gate_up_warps: int = 8
    gate_up_stages: int = 3
    down_block_m: int = 128
    down_block_n: int = 128
    down_splits: int = 4
    down_warps: int = 8
    down_stages: int = 4


DEFAULT_CONFIG = Fp8MlpConfig()


def quantize_groups(act: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric e4m3 with one scale per (row, `group` columns): (q [P, N], scale [P, N / group])."""
    p, n = act.shape
    grouped = act.float().view(p, n // group, group)
    scale = grouped.abs().amax(dim=2).clamp(min=1e-12) / FP8_MAX
    q = (grouped / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(p, n), scale


def gate_up_geglu_reference(hq: torch.Tensor, hs: torch.Tensor, gate_up: Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """What `gate_up_geglu_kernel` computes, in float32 torch: hq [P, K] e4m3 with row scales hs
    [P, 1]; gate_up's e4m3 weight [2·mlp, K] with its scale [1, 2·mlp]."""
    y = (hq.float() * hs) @ (gate_up.weight.float() * gate_up.scale.t()).t()
    mlp = y.shape[1] // 2
    return quantize_groups(F.gelu(y[:, :mlp], approximate="tanh") * y[:, mlp:])


def down_reference(act: torch.Tensor, act_scale: torch.Tensor, down: Linear) -> torch.Tensor:
    """What `down_splitk_kernel` adds to its workspace, in float32 torch."""
    p, k = act.shape
    a = (act.float().view(p, k // GROUP, GROUP) * act_scale[..., None]).view(p, k)
    return a @ (down.weight.float() * down.scale.t()).t()


class Fp8Mlp:
    """The fused FP8 MLP of one prefix; needs CUDA and Triton (or TRITON_INTERPRET=1 on the CPU)."""

    def __init__(self, rows: int, width: int, mlp: int, device: torch.device,
                 config: Fp8MlpConfig = DEFAULT_CONFIG) -> None:
        if mlp % GROUP or width % config.down_block_n or (mlp // GROUP) % config.down_splits:
            raise ValueError(f"FP8 MLP: mlp {mlp} must be a multiple of {GROUP}·{config.down_splits} splits and "
                             f"width {width} of {config.down_block_n}")
        self.config = config
        self.acc = torch.zeros(rows, width, dtype=torch.float32, device=device)

    def norm(self, x: torch.Tensor, eps: float, fold: bool) -> torch.Tensor:
        """RMSNorm(x) in x's dtype. `fold`: first x ← x + acc, acc ← 0 (the previous layer's MLP);
        otherwise acc ← 0 only (the first layer: nothing may be pending)."""
        h = torch.empty_like(x)
        self._norm(x, h, h, eps, fold=fold, clear=True, quant=False)
        return h

    def __call__(self, x: torch.Tensor, gate_up: Linear, down: Linear, eps: float) -> None:
        """acc += MLP(RMSNorm(x)) for x [P, W] (P ≤ the workspace's rows)."""
        p, cfg = x.shape[0], self.config
        mlp = gate_up.out_features // 2
        hq = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
        hs = torch.empty(p, 1, dtype=torch.float32, device=x.device)
        self._norm(x, hq, hs, eps, fold=False, clear=False, quant=True)
        act = torch.empty(p, mlp, dtype=torch.float8_e4m3fn, device=x.device)
        act_scale = torch.empty(p, mlp // GROUP, dtype=torch.float32, device=x.device)
        num_m = -(-p // cfg.gate_up_block_m)
        gate_up_geglu_kernel[(num_m * (mlp // GROUP),)](
            hq, hs, gate_up.weight, gate_up.scale, act, act_scale, p, x.shape[1], mlp, hq.stride(0),
            gate_up.weight.stride(0), act.stride(0), act_scale.stride(0), FP8_MAX=FP8_MAX, BLOCK_M=cfg.gate_up_block_m,
            GROUP_N=GROUP, BLOCK_K=128, num_warps=cfg.gate_up_warps, num_stages=cfg.gate_up_stages)
        n = down.out_features
        num_m = -(-p // cfg.down_block_m)
        down_splitk_kernel[(num_m * (n // cfg.down_block_n), cfg.down_splits)](
            act, act_scale, down.weight, down.scale, self.acc, p, n, mlp, act.stride(0), act_scale.stride(0),
            down.weight.stride(0), self.acc.stride(0), BLOCK_M=cfg.down_block_m, BLOCK_N=cfg.down_block_n,
            GROUP_K=GROUP, SPLITS=cfg.down_splits, num_warps=cfg.down_warps, num_stages=cfg.down_stages)

    def _norm(self, x: torch.Tensor, out: torch.Tensor, scale: torch.Tensor, eps: float, fold: bool, clear: bool,
              quant: bool) -> None:
        norm_rows_kernel[(x.shape[0],)](x, self.acc, out, scale, x.shape[1], x.stride(0), self.acc.stride(0),
                                        out.stride(0), eps, ADD_ACC=fold, CLEAR_ACC=clear, QUANT=quant,
                                        FP8_MAX=FP8_MAX, BLOCK=triton.next_power_of_2(x.shape[1]), num_warps=4)


def probe_layer(device: torch.device, rows: int = 544, width: int = 2048, mlp: int = 16384, seed: int = 0
                ) -> tuple[Linear, Linear, torch.Tensor]:
    """The probes' layer: e4m3 gate_up [2·mlp, width] and down [width, mlp] from random normal
    weights (1/√fan-in), and a bf16 residual [rows, width] of scale 4."""
    gen = torch.Generator().manual_seed(seed)
    from pi0_policy_ros.engine.weights import to_fp8
    gate_up = to_fp8(Linear((torch.randn(2 * mlp, width, generator=gen) / width**0.5).to(device)))
    down = to_fp8(Linear((torch.randn(width, mlp, generator=gen) / mlp**0.5).to(device)))
    x0 = (torch.randn(rows, width, generator=gen) * 4).to(device, torch.bfloat16)
    return gate_up, down, x0

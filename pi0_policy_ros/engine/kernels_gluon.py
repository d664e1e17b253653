"""Gluon (sm_90) forms of five of the denoise step's six kernels per layer: qkv and gate_up (RMSNorm
in the prologue, RoPE / GEGLU in the epilogue), o_proj and down (split over K, gated residual by
float32 atomics), and the split-KV attention. Same inputs, outputs and launch order as their Triton
counterparts in `kernels_triton` (the attention's combine stays Triton); `TritonDenoiseStep`
launches them when `TritonConfig.gluon` is set and `supported` holds.

Why they are faster (`bench/engine_notes.md` attempts 40-41): every kernel of the chain is launched
with programmatic dependent launch, so its programs are resident while the kernel before it still
runs. These copy what no earlier kernel writes (their weight block, or the attention's prefix K/V
tiles) into shared memory with TMA as soon as they are resident, then wait (`griddepcontrol.wait`),
then read the previous kernel's output once and run asynchronous wgmmas on the weights already
there. The Triton kernels can only request their first weight bytes after the wait. A program must
fit beside the previous kernel's on an SM (228 KB of shared memory): the pair kernels take 164 KB,
so down is split 16 ways (40 KB a program) instead of 8. With `TritonConfig.pdl_early` every
kernel lets the next one launch before its own wait, so the weight copies start one kernel sooner.

Geometry: the full-size pi0.5 expert only (width 1024, 8 query heads and 1 KV head of 256, mlp
4096, adaRMS) with at most 16 suffix rows (the MMA's N side), in bf16.
"""

from __future__ import annotations

import os

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from pi0_policy_ros.engine.weights import ExpertWeights

WIDTH, HEAD_DIM, Q_HEADS, MLP, TOKENS = 1024, 256, 8, 4096, 16
TILE_K = 256  # K per weight tile (wgmma's K loop inside one [64, 256] tile)
PAIR_TILES = gl.constexpr(WIDTH // TILE_K)
KEYS_PER_SPLIT, ROWS_PER_PROGRAM = 64, 16  # the attention's split and query rows per program


# ---- helpers (shared with the persistent step, `denoise_gluon`) ----------------------------------
@gluon.jit
def _gelu_tanh(x):
    inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return 0.5 * x * (1.0 + (2.0 / (1.0 + gl.exp(-2.0 * inner)) - 1.0))


@gluon.jit
def _load_rows(src_ptr, row_stride, col0, S, BL: gl.constexpr):
    """src[t, col0 : col0 + 256] of the 16 token rows (rows ≥ S read as 0), in BL."""
    rm = gl.arange(0, 16, layout=gl.SliceLayout(1, BL))
    rk = gl.arange(0, 256, layout=gl.SliceLayout(0, BL))
    return gl.load(src_ptr + rm[:, None] * row_stride + (col0 + rk)[None, :], mask=(rm < S)[:, None], other=0.0)


@gluon.jit
def _normed_rows_to_smem(resid_ptr, mul_ptr, x_smem, S, BL: gl.constexpr):
    """x_smem ← bf16(resid ⊙ mul) for the S token rows; returns Σ resid² per row (the norm is a
    per-row scale, applied to the products, as the Triton kernels do). Every load is issued
    before the first is used: one round trip to L2."""
    rk = gl.arange(0, 256, layout=gl.SliceLayout(0, BL))
    x0 = _load_rows(resid_ptr, 1024, 0, S, BL)
    x1 = _load_rows(resid_ptr, 1024, 256, S, BL)
    x2 = _load_rows(resid_ptr, 1024, 512, S, BL)
    x3 = _load_rows(resid_ptr, 1024, 768, S, BL)
    m0 = gl.load(mul_ptr + rk)
    m1 = gl.load(mul_ptr + 256 + rk)
    m2 = gl.load(mul_ptr + 512 + rk)
    m3 = gl.load(mul_ptr + 768 + rk)
    ss = gl.sum(x0 * x0, axis=1) + gl.sum(x1 * x1, axis=1) + gl.sum(x2 * x2, axis=1) + gl.sum(x3 * x3, axis=1)
    x_smem.slice(0, 256, dim=1).store((x0 * m0[None, :]).to(gl.bfloat16))
    x_smem.slice(256, 256, dim=1).store((x1 * m1[None, :]).to(gl.bfloat16))
    x_smem.slice(512, 256, dim=1).store((x2 * m2[None, :]).to(gl.bfloat16))
    x_smem.slice(768, 256, dim=1).store((x3 * m3[None, :]).to(gl.bfloat16))
    fence_async_shared()
    gl.thread_barrier()
    return ss


@gluon.jit
def _halves(acc, scratch, BLT: gl.constexpr):
    """The two 32-row halves of a [64, 16] accumulator (RoPE's lo / hi, or gate / up), in BLT."""
    scratch.store(acc)
    gl.thread_barrier()
    lo = scratch.slice(0, 32, dim=0).load(BLT)
    hi = scratch.slice(32, 32, dim=0).load(BLT)
    gl.thread_barrier()
    return lo, hi


@gluon.jit
def _residual_add(resid_ptr, gate, acc, row0, S, MMA: gl.constexpr):
    """resid[t, row0 + r] += gate[r] · acc[r, t] (float32 atomics: split-K partial sums)."""
    rows = row0 + gl.arange(0, 64, layout=gl.SliceLayout(1, MMA))
    t = gl.arange(0, 16, layout=gl.SliceLayout(0, MMA))
    gl.atomic_add(resid_ptr + t[None, :] * 1024 + rows[:, None], acc * gate[:, None], mask=(t < S)[None, :],
                  sem="relaxed", scope="gpu")


@gluon.jit
def _softmax_to_smem(st, bias, scale, p_smem):
    """One split's scoresᵀ [64 keys, 16 rows] → p_smem ← Pᵀ = exp(scaled, biased scores − row max) in
    bf16; returns the rows' (max, sum) for the combine."""
    st = st * scale + bias
    m = gl.max(st, axis=0)
    pt = gl.exp(st - m[None, :])
    p_smem.store(gl.permute(pt.to(gl.bfloat16), (1, 0)))
    fence_async_shared()
    gl.thread_barrier()
    return m, gl.sum(pt, axis=0)


@gluon.jit
def _store_partial(part_o_ptr, part_ml_ptr, ot, m, l, split, r_m, R, MMA: gl.constexpr):
    """Split `split`'s unnormalised outputᵀ [256 dims, 16 rows] and (max, sum) of rows r_m (as
    `kernels_triton._store_attention_partial`)."""
    d_m = gl.arange(0, 256, layout=gl.SliceLayout(1, MMA))
    rmask = r_m < R
    gl.store(part_o_ptr + (split * R + r_m)[None, :] * 256 + d_m[:, None], ot, mask=rmask[None, :])
    gl.store(part_ml_ptr + split * 2 * R + r_m, m, mask=rmask)
    gl.store(part_ml_ptr + (split * 2 + 1) * R + r_m, l, mask=rmask)


@gluon.jit
def _pdl_enter(PDL: gl.constexpr):
    """As `kernels_triton._pdl_enter` (PDL 1): wait for the previous kernel, then let the next one's
    programs become resident. PDL 2: the other way round, so that the next kernel's programs (and
    their weight copies) can start while this one still waits. Either way a kernel writes nothing
    before its wait, and the wait returns only once the previous kernel has finished, which itself
    waited for the one before it. Everything before it may only read what no kernel of the chain writes."""
    if PDL == 1:
        gl.inline_asm_elementwise("griddepcontrol.wait;\n\tgriddepcontrol.launch_dependents;\n\tmov.u32 $0, 0;",
                                  "=r", [], dtype=gl.int32, is_pure=False, pack=1)
    if PDL == 2:
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents;\n\tgriddepcontrol.wait;\n\tmov.u32 $0, 0;",
                                  "=r", [], dtype=gl.int32, is_pure=False, pack=1)


# ---- kernels -------------------------------------------------------------------------------------
@gluon.jit
def norm_pair_kernel(w_desc, x_ptr, mul_ptr, bias_ptr, out_ptr, stride_om, k_out_ptr, v_out_ptr, cos_ptr, sin_ptr,
                     M, eps, pair_offset,
                     EPI: gl.constexpr, NQ: gl.constexpr, X_LAYOUT: gl.constexpr, W_LAYOUT: gl.constexpr,
                     PDL: gl.constexpr):
    """`kernels_triton.norm_linear_pair` for one program's 32 column pairs (RoPE halves of one head,
    EPI 0; gate and up, EPI 1): 64 weight rows × all of K, fetched as four [64, 256] tiles, each
    two [32, 256] boxes (the pairs' first columns, then their second ones)."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 16, 16])
    bl: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
    blt: gl.constexpr = gl.BlockedLayout([1, 1], [2, 16], [4, 1], [1, 0])  # [32 columns, 16 tokens]
    plain: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    w_smem = gl.allocate_shared_memory(gl.bfloat16, [PAIR_TILES, 64, 256], W_LAYOUT)
    bars = gl.allocate_shared_memory(gl.int64, [PAIR_TILES, 1], mbarrier.MBarrierLayout())
    x_smem = gl.allocate_shared_memory(gl.bfloat16, [16, 1024], X_LAYOUT)
    scratch = gl.allocate_shared_memory(gl.float32, [64, 16], plain)
    pid = gl.program_id(0)
    if EPI == 0:
        row_lo = (pid // 4) * 256 + (pid % 4) * 32
        row_hi = row_lo + 128
    else:
        row_lo = pid * 32
        row_hi = row_lo + pair_offset
    for j in gl.static_range(PAIR_TILES):
        mbarrier.init(bars.index(j), count=1)
    gl.thread_barrier()
    for j in gl.static_range(PAIR_TILES):
        mbarrier.expect(bars.index(j), 2 * w_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(w_desc, [row_lo, j * 256], bars.index(j), w_smem.index(j).slice(0, 32))
        tma.async_copy_global_to_shared(w_desc, [row_hi, j * 256], bars.index(j), w_smem.index(j).slice(32, 32))
    t = gl.arange(0, 16, layout=gl.SliceLayout(0, blt))
    tmask = (t < M)[None, :]
    col = row_lo + gl.arange(0, 32, layout=gl.SliceLayout(1, blt))
    cin = col % 256  # RoPE: the column inside its head
    b_lo = gl.load(bias_ptr + col)
    b_hi = gl.load(bias_ptr + col + (row_hi - row_lo))
    if EPI == 0:
        trig = t[None, :] * 256 + cin[:, None]
        c_lo = gl.load(cos_ptr + trig, mask=tmask, other=0.0).to(gl.float32)
        c_hi = gl.load(cos_ptr + trig + 128, mask=tmask, other=0.0).to(gl.float32)
        s_lo = gl.load(sin_ptr + trig, mask=tmask, other=0.0).to(gl.float32)
        s_hi = gl.load(sin_ptr + trig + 128, mask=tmask, other=0.0).to(gl.float32)
    _pdl_enter(PDL)
    ss = _normed_rows_to_smem(x_ptr, mul_ptr, x_smem, M, bl)
    inv = gl.convert_layout(1.0 / gl.sqrt(ss / 1024 + eps), gl.SliceLayout(0, blt))
    acc = gl.zeros([64, 16], gl.float32, layout=mma)
    for j in gl.static_range(PAIR_TILES):
        mbarrier.wait(bars.index(j), 0)
        acc = warpgroup_mma(w_smem.index(j), x_smem.slice(j * 256, 256, dim=1).permute((1, 0)), acc, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    lo, hi = _halves(acc, scratch, blt)
    lo = lo * inv[None, :] + b_lo[:, None]
    hi = hi * inv[None, :] + b_hi[:, None]
    if EPI == 0:
        head = pid // 4
        if head <= NQ:  # the q heads and the k head are rotated; v is not
            lo, hi = lo * c_lo - hi * s_lo, hi * c_hi + lo * s_hi
        if head < NQ:
            dst = out_ptr + t[None, :] * stride_om + col[:, None]
        elif head == NQ:
            dst = k_out_ptr + t[None, :] * 256 + cin[:, None]
        else:
            dst = v_out_ptr + t[None, :] * 256 + cin[:, None]
        gl.store(dst, lo.to(gl.bfloat16), mask=tmask)
        gl.store(dst + 128, hi.to(gl.bfloat16), mask=tmask)
    else:
        act = _gelu_tanh(lo) * hi
        gl.store(out_ptr + t[None, :] * stride_om + col[:, None], act.to(gl.bfloat16), mask=tmask)
    for j in gl.static_range(PAIR_TILES):
        mbarrier.invalidate(bars.index(j))


@gluon.jit
def residual_splitk_kernel(w_desc, x_ptr, stride_x, gate_ptr, resid_ptr, M, KT: gl.constexpr,
                           X_LAYOUT: gl.constexpr, W_LAYOUT: gl.constexpr, PDL: gl.constexpr):
    """`kernels_triton.linear_splitk` with the gated residual epilogue: program (n block, k split)
    adds gate ⊙ (W[n0 : n0 + 64, k0 : k0 + 256·KT] · x[:, k0 : …]ᵀ) to the residual rows."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 16, 16])
    bl: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
    w_smem = gl.allocate_shared_memory(gl.bfloat16, [KT, 64, 256], W_LAYOUT)
    bars = gl.allocate_shared_memory(gl.int64, [KT, 1], mbarrier.MBarrierLayout())
    x_smem = gl.allocate_shared_memory(gl.bfloat16, [16, 256 * KT], X_LAYOUT)
    n0 = gl.program_id(0) * 64
    k0 = gl.program_id(1) * (256 * KT)
    for j in gl.static_range(KT):
        mbarrier.init(bars.index(j), count=1)
    gl.thread_barrier()
    for j in gl.static_range(KT):
        mbarrier.expect(bars.index(j), w_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(w_desc, [n0, k0 + j * 256], bars.index(j), w_smem.index(j))
    gate = gl.load(gate_ptr + n0 + gl.arange(0, 64, layout=gl.SliceLayout(1, mma)))
    _pdl_enter(PDL)
    rm = gl.arange(0, 16, layout=gl.SliceLayout(1, bl))
    rk = gl.arange(0, 256 * KT, layout=gl.SliceLayout(0, bl))
    x_smem.store(gl.load(x_ptr + rm[:, None] * stride_x + (k0 + rk)[None, :], mask=(rm < M)[:, None], other=0.0))
    fence_async_shared()
    gl.thread_barrier()
    acc = gl.zeros([64, 16], gl.float32, layout=mma)
    for j in gl.static_range(KT):
        mbarrier.wait(bars.index(j), 0)
        acc = warpgroup_mma(w_smem.index(j), x_smem.slice(j * 256, 256, dim=1).permute((1, 0)), acc, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    _residual_add(resid_ptr, gate, acc, n0, M, mma)
    for j in gl.static_range(KT):
        mbarrier.invalidate(bars.index(j))


@gluon.jit
def attention_split_kernel(k_desc, v_desc, q_ptr, bias_ptr, part_o_ptr, part_ml_ptr, R, NKEYS, PP, stride_bias, S,
                           scale, Q_LAYOUT: gl.constexpr, P_LAYOUT: gl.constexpr, PDL: gl.constexpr):
    """`kernels_triton.attention_split` for 64-key splits and 16 query rows (r = token·8 + head) a
    program, the same partials. The K/V tiles of the prefix (rows < PP: the prefix stage wrote them,
    the chain never does) are fetched before the wait; the tile holding the suffix rows after it."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 16, 16])
    bl: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
    k_smem = gl.allocate_shared_memory(gl.bfloat16, [64, 256], k_desc.layout)
    v_smem = gl.allocate_shared_memory(gl.bfloat16, [64, 256], v_desc.layout)
    q_smem = gl.allocate_shared_memory(gl.bfloat16, [16, 256], Q_LAYOUT)
    p_smem = gl.allocate_shared_memory(gl.bfloat16, [16, 64], P_LAYOUT)
    bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    split = gl.program_id(0)
    key0 = split * 64
    mbarrier.init(bars.index(0), count=1)
    mbarrier.init(bars.index(1), count=1)
    gl.thread_barrier()
    prefix_only = key0 + 64 <= PP
    if prefix_only:
        mbarrier.expect(bars.index(0), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [key0, 0], bars.index(0), k_smem)
        mbarrier.expect(bars.index(1), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [key0, 0], bars.index(1), v_smem)
    keys_m = key0 + gl.arange(0, 64, layout=gl.SliceLayout(1, mma))
    r_m = gl.program_id(1) * 16 + gl.arange(0, 16, layout=gl.SliceLayout(0, mma))
    tok_m = gl.minimum(r_m // 8, S - 1)
    b = gl.load(bias_ptr + tok_m[None, :] * stride_bias + keys_m[:, None], mask=(keys_m < NKEYS)[:, None],
                other=float("-inf"))
    _pdl_enter(PDL)
    if not prefix_only:
        mbarrier.expect(bars.index(0), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [key0, 0], bars.index(0), k_smem)
        mbarrier.expect(bars.index(1), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [key0, 0], bars.index(1), v_smem)
    r = gl.program_id(1) * 16 + gl.arange(0, 16, layout=gl.SliceLayout(1, bl))
    d = gl.arange(0, 256, layout=gl.SliceLayout(0, bl))
    tok = gl.minimum(r // 8, S - 1)
    q_smem.store(gl.load(q_ptr + tok[:, None] * 2048 + (r % 8)[:, None] * 256 + d[None, :], mask=(r < R)[:, None],
                         other=0.0))
    fence_async_shared()
    gl.thread_barrier()
    mbarrier.wait(bars.index(0), 0)
    st = warpgroup_mma(k_smem, q_smem.permute((1, 0)), gl.zeros([64, 16], gl.float32, layout=mma))  # scoresᵀ
    m, l = _softmax_to_smem(st, b, scale, p_smem)
    mbarrier.wait(bars.index(1), 0)
    ot = warpgroup_mma(v_smem.permute((1, 0)), p_smem.permute((1, 0)), gl.zeros([256, 16], gl.float32, layout=mma))
    _store_partial(part_o_ptr, part_ml_ptr, ot, m, l, split, r_m, R, mma)
    mbarrier.invalidate(bars.index(0))
    mbarrier.invalidate(bars.index(1))


# ---- host side -----------------------------------------------------------------------------------
def supported(weights: ExpertWeights, suffix_len: int, pi05: bool, device: torch.device) -> str | None:
    """None where these kernels can run the step, else why not (one line)."""
    ec = weights.cfg
    if tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 6):
        return f"need Triton ≥ 3.6 (written against its Gluon API; found {triton.__version__})"
    if os.environ.get("TRITON_INTERPRET") == "1" or device.type != "cuda":
        return "need a CUDA GPU (not the interpreter)"
    if torch.cuda.get_device_capability(device) != (9, 0):
        return "need sm_90 (Hopper's wgmma and TMA)"
    if weights.layers[0].qkv.weight.dtype != torch.bfloat16:
        return "need bf16 weights"
    if not pi05 or suffix_len > TOKENS:
        return f"need pi0.5 with at most {TOKENS} suffix rows"
    if (ec.width, ec.head_dim, ec.num_heads, ec.num_kv_heads, ec.mlp_dim) != (WIDTH, HEAD_DIM, Q_HEADS, 1, MLP):
        return "need the full-size expert (width 1024, 8 query heads and 1 KV head of 256, mlp 4096)"
    return None


def _descriptor(t: torch.Tensor, block: list[int]) -> TensorDescriptor:
    layout = gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16)
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block, layout)


class GluonLaunches:
    """The TMA descriptors of the expert's weights and of the K/V cache, and the launches. A
    descriptor is a host object holding the address: made once here, captured into the graphs."""

    def __init__(self, weights: ExpertWeights, pdl: bool, pdl_early: bool = False) -> None:
        self.launch_pdl = pdl
        self.pdl = (2 if pdl_early else 1) if pdl else 0  # `_pdl_enter`'s PDL
        self.weights: dict[int, TensorDescriptor] = {}  # a matrix's data_ptr → its descriptor
        for lw in weights.layers:
            self.weights[lw.qkv.weight.data_ptr()] = _descriptor(lw.qkv.weight, [32, TILE_K])
            self.weights[lw.gate_up.weight.data_ptr()] = _descriptor(lw.gate_up.weight, [32, TILE_K])
            self.weights[lw.out.weight.data_ptr()] = _descriptor(lw.out.weight, [64, TILE_K])
            self.weights[lw.down.weight.data_ptr()] = _descriptor(lw.down.weight, [64, TILE_K])
        # (K cache rows' data_ptr, V's) → their descriptors, made on first use
        self.cache: dict[tuple[int, int], tuple[TensorDescriptor, TensorDescriptor]] = {}
        self.layouts = {n: gl.NVMMASharedLayout.get_default_for(shape, gl.bfloat16)
                        for n, shape in (("x_pair", [16, WIDTH]), ("w", [64, TILE_K]), ("q", [16, HEAD_DIM]),
                                         ("p", [16, KEYS_PER_SPLIT]))}

    def pair(self, w: torch.Tensor, resid: torch.Tensor, mul: torch.Tensor, bias: torch.Tensor, out: torch.Tensor,
             epi: int, pair_offset: int, eps: float, k_out: torch.Tensor, v_out: torch.Tensor, cos: torch.Tensor,
             sin: torch.Tensor) -> None:
        norm_pair_kernel[(w.shape[0] // 64,)](
            self.weights[w.data_ptr()], resid, mul, bias, out, out.stride(0), k_out, v_out, cos, sin,
            resid.shape[0], eps, pair_offset, EPI=epi, NQ=Q_HEADS, X_LAYOUT=self.layouts["x_pair"],
            W_LAYOUT=self.layouts["w"], PDL=self.pdl, num_warps=4, launch_pdl=self.launch_pdl)

    def residual(self, w: torch.Tensor, x: torch.Tensor, gate: torch.Tensor, resid: torch.Tensor, splits: int) -> None:
        kt = w.shape[1] // splits // TILE_K
        x_layout = self.layouts.get(f"x_splitk{kt}")
        if x_layout is None:
            x_layout = self.layouts[f"x_splitk{kt}"] = gl.NVMMASharedLayout.get_default_for([16, TILE_K * kt],
                                                                                             gl.bfloat16)
        residual_splitk_kernel[(w.shape[0] // 64, splits)](
            self.weights[w.data_ptr()], x, x.stride(0), gate, resid, x.shape[0], KT=kt, X_LAYOUT=x_layout,
            W_LAYOUT=self.layouts["w"], PDL=self.pdl, num_warps=4, launch_pdl=self.launch_pdl)

    def attention(self, keys: torch.Tensor, values: torch.Tensor, q: torch.Tensor, bias: torch.Tensor,
                  part_o: torch.Tensor, part_ml: torch.Tensor, rows: int, n_splits: int, prefix_rows: int,
                  suffix_len: int) -> None:
        """keys, values: one layer's cache rows [Pp + S, 256]; rows [0, prefix_rows) are the prefix's."""
        key = (keys.data_ptr(), values.data_ptr())
        if key not in self.cache:
            self.cache[key] = (_descriptor(keys, [KEYS_PER_SPLIT, HEAD_DIM]), _descriptor(values, [KEYS_PER_SPLIT,
                                                                                                 HEAD_DIM]))
        k_desc, v_desc = self.cache[key]
        attention_split_kernel[(n_splits, -(-rows // ROWS_PER_PROGRAM))](
            k_desc, v_desc, q, bias, part_o, part_ml, rows, keys.shape[0], prefix_rows, bias.stride(0),
            suffix_len, HEAD_DIM**-0.5, Q_LAYOUT=self.layouts["q"], P_LAYOUT=self.layouts["p"], PDL=self.pdl,
            num_warps=4, launch_pdl=self.launch_pdl)

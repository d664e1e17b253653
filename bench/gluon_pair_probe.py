"""The denoise step's two norm-fused projections (qkv, gate_up) as Gluon kernels that fetch their
whole weight block before the programmatic-dependent-launch wait, timed against the Triton chain.

    PYTHONPATH=. python bench/gluon_pair_probe.py [--iterations 100] [--json OUT]
    PYTHONPATH=. python bench/gluon_pair_probe.py --compile-only   # sm_90 compile check, no GPU

Why (notes attempt 40): a Triton pair kernel program streams its 64 weight rows in 8 dependent K
steps whose wgmma is synchronous (the activation goes registers → shared memory every step), and its
first weight bytes are requested only after `griddepcontrol.wait`. Here a program issues the TMA
copies of its whole [64, 1024] weight block (4 tiles, 128 KB; weights are no kernel's output) as
soon as it is resident, which under PDL is while the previous kernel still runs; after the wait it
normalises the residual rows once into shared memory, then runs four asynchronous wgmmas.

Needs sm_90, the full-size pi0.5 expert, and programs that fit beside the previous kernel's
(168 KB here: the split-K kernels' 82 KB at 4 stages and 61 KB at 3 are too many; 2 stages, 41 KB, fit).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

from pi0_policy_ros.engine import kernels_triton as K
from pi0_policy_ros.engine.denoise_gluon import _gelu_tanh, _halves, _normed_rows_to_smem, _residual_add
from pi0_policy_ros.engine.denoise_triton import DEFAULT_CONFIG, TritonConfig, TritonDenoiseStep

KT = gl.constexpr(4)  # [64, 256] weight tiles per program: K = 1024


@gluon.jit
def _pdl_enter(PDL: gl.constexpr):
    if PDL:
        gl.inline_asm_elementwise("griddepcontrol.wait;\n\tgriddepcontrol.launch_dependents;\n\tmov.u32 $0, 0;",
                                  "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def gluon_pair_kernel(w_desc, x_ptr, mul_ptr, bias_ptr, out_ptr, stride_om, k_out_ptr, v_out_ptr, cos_ptr, sin_ptr,
                      M, eps, pair_offset,
                      EPI: gl.constexpr, NQ: gl.constexpr, X_LAYOUT: gl.constexpr, W_LAYOUT: gl.constexpr,
                      OUT_LAYOUT: gl.constexpr, PDL: gl.constexpr):
    """One program: 32 column pairs (RoPE halves of one head, or gate and up) = 64 weight rows, all
    of K. w_desc: the layer's [rows, 1024] matrix in [32, 256] boxes; each [64, 256] tile in
    shared memory is two boxes, the pairs' first columns then their second ones."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 16, 16])
    bl: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
    plain: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    w_smem = gl.allocate_shared_memory(gl.bfloat16, [KT, 64, 256], W_LAYOUT)
    bars = gl.allocate_shared_memory(gl.int64, [KT, 1], mbarrier.MBarrierLayout())
    x_smem = gl.allocate_shared_memory(gl.bfloat16, [16, 1024], X_LAYOUT)
    scratch = gl.allocate_shared_memory(gl.float32, [64, 16], plain)
    pid = gl.program_id(0)
    if EPI == 0:
        head = pid // 4
        row_lo = head * 256 + (pid % 4) * 32
        row_hi = row_lo + 128
    else:
        row_lo = pid * 32
        row_hi = row_lo + pair_offset
    for j in gl.static_range(KT):
        mbarrier.init(bars.index(j), count=1)
    gl.thread_barrier()
    for j in gl.static_range(KT):  # the weights: before the wait, they are no kernel's output
        mbarrier.expect(bars.index(j), 2 * w_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(w_desc, [row_lo, j * 256], bars.index(j), w_smem.index(j).slice(0, 32))
        tma.async_copy_global_to_shared(w_desc, [row_hi, j * 256], bars.index(j), w_smem.index(j).slice(32, 32))
    t = gl.arange(0, 16, layout=gl.SliceLayout(0, OUT_LAYOUT))
    tmask = (t < M)[None, :]
    cin = row_lo % 256 + gl.arange(0, 32, layout=gl.SliceLayout(1, OUT_LAYOUT))  # RoPE: column in the head
    col = row_lo + gl.arange(0, 32, layout=gl.SliceLayout(1, OUT_LAYOUT))
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
    inv = gl.convert_layout(1.0 / gl.sqrt(ss / 1024 + eps), gl.SliceLayout(0, OUT_LAYOUT))
    acc = gl.zeros([64, 16], gl.float32, layout=mma)
    for j in gl.static_range(KT):
        mbarrier.wait(bars.index(j), 0)
        acc = warpgroup_mma(w_smem.index(j), x_smem.slice(j * 256, 256, dim=1).permute((1, 0)), acc, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    lo, hi = _halves(acc, scratch, OUT_LAYOUT)
    lo = lo * inv[None, :] + b_lo[:, None]
    hi = hi * inv[None, :] + b_hi[:, None]
    if EPI == 0:
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
    for j in gl.static_range(KT):
        mbarrier.invalidate(bars.index(j))


@gluon.jit
def gluon_residual_kernel(w_desc, x_ptr, stride_x, gate_ptr, resid_ptr, M, KT: gl.constexpr, TILE_K: gl.constexpr,
                          X_LAYOUT: gl.constexpr, W_LAYOUT: gl.constexpr, PDL: gl.constexpr):
    """o_proj / down, split over K: program (n block, k split) adds gate ⊙ (W[n0:n0 + 64, k0:k0 + 256·KT]
    · x[:, k0:...]ᵀ) to the residual (float32 atomics). Its weight tiles are fetched before the wait."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 16, 16])
    bl: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
    w_smem = gl.allocate_shared_memory(gl.bfloat16, [KT, 64, TILE_K], W_LAYOUT)
    bars = gl.allocate_shared_memory(gl.int64, [KT, 1], mbarrier.MBarrierLayout())
    x_smem = gl.allocate_shared_memory(gl.bfloat16, [16, TILE_K * KT], X_LAYOUT)
    n0 = gl.program_id(0) * 64
    k0 = gl.program_id(1) * (TILE_K * KT)
    for j in gl.static_range(KT):
        mbarrier.init(bars.index(j), count=1)
    gl.thread_barrier()
    for j in gl.static_range(KT):
        mbarrier.expect(bars.index(j), w_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(w_desc, [n0, k0 + j * TILE_K], bars.index(j), w_smem.index(j))
    gate = gl.load(gate_ptr + n0 + gl.arange(0, 64, layout=gl.SliceLayout(1, mma)))
    _pdl_enter(PDL)
    rm = gl.arange(0, 16, layout=gl.SliceLayout(1, bl))
    rk = gl.arange(0, TILE_K * KT, layout=gl.SliceLayout(0, bl))
    x = gl.load(x_ptr + rm[:, None] * stride_x + (k0 + rk)[None, :], mask=(rm < M)[:, None], other=0.0)
    x_smem.store(x)
    fence_async_shared()
    gl.thread_barrier()
    acc = gl.zeros([64, 16], gl.float32, layout=mma)
    for j in gl.static_range(KT):
        mbarrier.wait(bars.index(j), 0)
        acc = warpgroup_mma(w_smem.index(j), x_smem.slice(j * TILE_K, TILE_K, dim=1).permute((1, 0)), acc,
                            is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    _residual_add(resid_ptr, gate, acc, n0, M, mma)
    for j in gl.static_range(KT):
        mbarrier.invalidate(bars.index(j))


@gluon.jit
def gluon_attention_kernel(k_desc, v_desc, q_ptr, bias_ptr, part_o_ptr, part_ml_ptr, R, NKEYS, PP, stride_bias, S,
                           scale, Q_LAYOUT: gl.constexpr, P_LAYOUT: gl.constexpr, PDL: gl.constexpr):
    """`attention_split` for 64-key splits and 16 query rows (row r = token·8 + head) in one program,
    the same partials. The prefix's K/V tiles (rows < PP: written by the prefix stage, the same for
    the whole chain) are fetched before the wait; the tile holding the suffix rows after it."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 16, 16])
    bl: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
    k_smem = gl.allocate_shared_memory(gl.bfloat16, [64, 256], k_desc.layout)
    v_smem = gl.allocate_shared_memory(gl.bfloat16, [64, 256], v_desc.layout)
    q_smem = gl.allocate_shared_memory(gl.bfloat16, [16, 256], Q_LAYOUT)
    p_smem = gl.allocate_shared_memory(gl.bfloat16, [16, 64], P_LAYOUT)
    bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    split = gl.program_id(0)
    rb = gl.program_id(1)
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
    r_m = rb * 16 + gl.arange(0, 16, layout=gl.SliceLayout(0, mma))
    tok_m = gl.minimum(r_m // 8, S - 1)
    b = gl.load(bias_ptr + tok_m[None, :] * stride_bias + keys_m[:, None], mask=(keys_m < NKEYS)[:, None],
                other=float("-inf"))
    _pdl_enter(PDL)
    if not prefix_only:
        mbarrier.expect(bars.index(0), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [key0, 0], bars.index(0), k_smem)
        mbarrier.expect(bars.index(1), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [key0, 0], bars.index(1), v_smem)
    r = rb * 16 + gl.arange(0, 16, layout=gl.SliceLayout(1, bl))
    d = gl.arange(0, 256, layout=gl.SliceLayout(0, bl))
    tok = gl.minimum(r // 8, S - 1)
    q = gl.load(q_ptr + tok[:, None] * 2048 + (r % 8)[:, None] * 256 + d[None, :], mask=(r < R)[:, None], other=0.0)
    q_smem.store(q)
    fence_async_shared()
    gl.thread_barrier()
    mbarrier.wait(bars.index(0), 0)
    st = warpgroup_mma(k_smem, q_smem.permute((1, 0)), gl.zeros([64, 16], gl.float32, layout=mma))  # scoresᵀ
    st = st * scale + b
    m = gl.max(st, axis=0)
    pt = gl.exp(st - m[None, :])
    l = gl.sum(pt, axis=0)
    p_smem.store(gl.permute(pt.to(gl.bfloat16), (1, 0)))
    fence_async_shared()
    gl.thread_barrier()
    mbarrier.wait(bars.index(1), 0)
    ot = warpgroup_mma(v_smem.permute((1, 0)), p_smem.permute((1, 0)), gl.zeros([256, 16], gl.float32, layout=mma))
    d_m = gl.arange(0, 256, layout=gl.SliceLayout(1, mma))
    rmask = r_m < R
    gl.store(part_o_ptr + (split * R + r_m)[None, :] * 256 + d_m[:, None], ot, mask=rmask[None, :])
    gl.store(part_ml_ptr + split * 2 * R + r_m, m, mask=rmask)
    gl.store(part_ml_ptr + (split * 2 + 1) * R + r_m, l, mask=rmask)
    mbarrier.invalidate(bars.index(0))
    mbarrier.invalidate(bars.index(1))


def kv_descriptor(rows: torch.Tensor):
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    layout = gl.NVMMASharedLayout.get_default_for([64, 256], gl.bfloat16)
    return TensorDescriptor(rows, list(rows.shape), list(rows.stride()), [64, 256], layout)


# [32 columns, 16 tokens]: the tokens along a warp's lanes (as the persistent kernel), or the columns
# (32 contiguous bf16 per store)
TOKENS_ALONG_LANES = gl.BlockedLayout([1, 1], [2, 16], [4, 1], [1, 0])
COLUMNS_ALONG_LANES = gl.BlockedLayout([1, 1], [32, 1], [1, 4], [0, 1])


def pair_descriptor(weight: torch.Tensor):
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    layout = gl.NVMMASharedLayout.get_default_for([32, 256], gl.bfloat16)
    return TensorDescriptor(weight, list(weight.shape), list(weight.stride()), [32, 256], layout)


class GluonPairStep(TritonDenoiseStep):
    """The Triton step with qkv and gate_up through `gluon_pair_kernel` (pi0.5, no RTC saves)."""

    def __init__(self, weights, tables, shape, buf, config: TritonConfig = DEFAULT_CONFIG,
                 out_layout=TOKENS_ALONG_LANES) -> None:
        super().__init__(weights, tables, shape, buf, config)
        self.descriptors = {}
        for lw in weights.layers:
            for wt in (lw.qkv.weight, lw.gate_up.weight):
                self.descriptors[wt.data_ptr()] = pair_descriptor(wt)
        self.layouts = {"X_LAYOUT": gl.NVMMASharedLayout.get_default_for([16, 1024], gl.bfloat16),
                        "W_LAYOUT": gl.NVMMASharedLayout.get_default_for([64, 256], gl.bfloat16),
                        "OUT_LAYOUT": out_layout}

    def _pair(self, w, out, epi, mul, bias, pair_offset, k_out=None, v_out=None, cos=None, sin=None, save_x=None,
              save_pre=None) -> None:
        assert save_x is None and save_pre is None and mul is not None and bias is not None
        d = self.dummy
        pdl = bool(self.pdl_launch)
        gluon_pair_kernel[(w.shape[0] // 64,)](
            self.descriptors[w.data_ptr()], self.resid, mul, bias, out, out.stride(0), d if k_out is None else k_out,
            d if v_out is None else v_out, d if cos is None else cos, d if sin is None else sin,
            self.resid.shape[0], self.w.cfg.rms_norm_eps, pair_offset,
            EPI=epi, NQ=self.w.cfg.num_heads, PDL=pdl, num_warps=4, launch_pdl=pdl, **self.layouts)


class GluonStep(GluonPairStep):
    """`GluonPairStep` with o_proj and down through `gluon_residual_kernel` too (K split in
    `o_splits` / `down_splits` programs, 256 · KT columns each); `pair` False: the Triton pair kernels."""

    def __init__(self, weights, tables, shape, buf, config: TritonConfig = DEFAULT_CONFIG, pair: bool = True,
                 o_tile_k: int = 256, down_tile_k: int = 256, attention: bool = False) -> None:
        super().__init__(weights, tables, shape, buf, config)
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
        self.gluon_pair = pair
        self.gluon_attention = attention
        self.kv = {}  # id(keys[layer]) → (k_desc, v_desc), made on first use (the buffers are the engine's)
        self.tile_k = {}
        for lw in weights.layers:
            for wt, tile_k in ((lw.out.weight, o_tile_k), (lw.down.weight, down_tile_k)):
                layout = gl.NVMMASharedLayout.get_default_for([64, tile_k], gl.bfloat16)
                self.descriptors[wt.data_ptr()] = TensorDescriptor(wt, list(wt.shape), list(wt.stride()),
                                                                   [64, tile_k], layout)
                self.tile_k[wt.data_ptr()] = tile_k

    def _pair(self, *args, **kwargs) -> None:
        if self.gluon_pair:
            return super()._pair(*args, **kwargs)
        return TritonDenoiseStep._pair(self, *args, **kwargs)

    def _attention(self, buf, layer, q, out, lse) -> None:
        if not self.gluon_attention or lse is not None:
            return super()._attention(buf, layer, q, out, lse)
        c, ec = self.cfg, self.w.cfg
        keys = buf.keys[layer]
        key = (keys.data_ptr(), layer)
        if key not in self.kv:
            self.kv[key] = (kv_descriptor(keys), kv_descriptor(buf.values[layer]))
        k_desc, v_desc = self.kv[key]
        assert c.attn_keys_per_split == 64 and c.attn_block_r == 16 and c.attn_combine == "wide"
        pdl = bool(self.pdl_launch)
        gluon_attention_kernel[(self.n_splits, -(-self.rows // 16))](
            k_desc, v_desc, q, buf.suffix_bias, self.part_o, self.part_ml, self.rows, keys.shape[0],
            self.shape.padded_prefix_len, buf.suffix_bias.stride(0), self.shape.suffix_len, ec.head_dim**-0.5,
            Q_LAYOUT=gl.NVMMASharedLayout.get_default_for([16, 256], gl.bfloat16),
            P_LAYOUT=gl.NVMMASharedLayout.get_default_for([16, 64], gl.bfloat16), PDL=pdl, num_warps=4,
            launch_pdl=pdl)
        splits_p2 = triton.next_power_of_2(self.n_splits)
        grid = (triton.cdiv(self.rows, c.combine_block_r), ec.head_dim // c.combine_block_d)
        K.attention_combine_wide_kernel[grid](
            self.part_o, self.part_ml, out, self.rows, self.n_splits, HD=ec.head_dim, SPLITS_P2=splits_p2,
            BLOCK_R=c.combine_block_r, BLOCK_D=c.combine_block_d, lse_ptr=self.dummy, SAVE_LSE=False, num_warps=4,
            **self.pdl_launch)

    def _splitk(self, x, w, out, epi, bias=None, gate=None, splits=1) -> None:
        if epi != K.EPI_RESIDUAL or w.data_ptr() not in self.descriptors:
            return super()._splitk(x, w, out, epi, bias=bias, gate=gate, splits=splits)
        tile_k = self.tile_k[w.data_ptr()]
        kt = w.shape[1] // splits // tile_k
        assert kt * tile_k * splits == w.shape[1] and gate is not None and out is self.resid
        pdl = bool(self.pdl_launch)
        gluon_residual_kernel[(w.shape[0] // 64, splits)](
            self.descriptors[w.data_ptr()], x, x.stride(0), gate, out, x.shape[0], KT=kt, TILE_K=tile_k,
            X_LAYOUT=gl.NVMMASharedLayout.get_default_for([16, tile_k * kt], gl.bfloat16),
            W_LAYOUT=gl.NVMMASharedLayout.get_default_for([64, tile_k], gl.bfloat16), PDL=pdl, num_warps=4,
            launch_pdl=pdl)


def compile_only() -> int:
    """Compile the kernel for sm_90 on this machine (no GPU): both epilogues, PDL on."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import compile as triton_compile, make_backend
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import create_function_from_signature
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    fn = gluon_pair_kernel
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    desc = pair_descriptor(torch.zeros(8192, 1024, dtype=torch.bfloat16))
    f32, bf16 = torch.zeros(16 * 8192), torch.zeros(16 * 4096, dtype=torch.bfloat16)
    for epi, out_layout in ((0, TOKENS_ALONG_LANES), (1, COLUMNS_ALONG_LANES)):
        kwargs = dict(EPI=epi, NQ=8, X_LAYOUT=gl.NVMMASharedLayout.get_default_for([16, 1024], gl.bfloat16),
                      W_LAYOUT=gl.NVMMASharedLayout.get_default_for([64, 256], gl.bfloat16), OUT_LAYOUT=out_layout,
                      PDL=True, num_warps=4, launch_pdl=True)
        args = (desc, f32, f32, f32, bf16, 2048, bf16, bf16, bf16, bf16, 10, 1e-6, 4096)
        bound, spec, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
        compiled = triton_compile(GluonASTSource(fn, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
        print(f"EPI={epi}: shared {compiled.metadata.shared} bytes, {compiled.asm['ptx'].count('wgmma.mma_async')} "
              f"wgmma, {compiled.asm['ptx'].count('cp.async.bulk.tensor')} TMA copies", flush=True)
    fn = gluon_residual_kernel
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    w = torch.zeros(1024, 4096, dtype=torch.bfloat16)
    desc = TensorDescriptor(w, list(w.shape), list(w.stride()), [64, 256],
                            gl.NVMMASharedLayout.get_default_for([64, 256], gl.bfloat16))
    for kt, tile_k in ((1, 256), (2, 256), (1, 128)):
        kwargs = dict(KT=kt, TILE_K=tile_k, X_LAYOUT=gl.NVMMASharedLayout.get_default_for([16, tile_k * kt], gl.bfloat16),
                      W_LAYOUT=gl.NVMMASharedLayout.get_default_for([64, tile_k], gl.bfloat16), PDL=True, num_warps=4,
                      launch_pdl=True)
        bound, spec, options = binder(desc, bf16, 4096, f32, f32, 10, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
        compiled = triton_compile(GluonASTSource(fn, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
        print(f"residual KT={kt} TILE_K={tile_k}: shared {compiled.metadata.shared} bytes", flush=True)
    fn = gluon_attention_kernel
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kv = kv_descriptor(torch.zeros(986, 256, dtype=torch.bfloat16))
    kwargs = dict(Q_LAYOUT=gl.NVMMASharedLayout.get_default_for([16, 256], gl.bfloat16),
                  P_LAYOUT=gl.NVMMASharedLayout.get_default_for([16, 64], gl.bfloat16), PDL=True, num_warps=4,
                  launch_pdl=True)
    bound, spec, options = binder(kv, kv, bf16, f32, f32, f32, 80, 986, 976, 986, 10, 0.0625, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
    compiled = triton_compile(GluonASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    print(f"attention: shared {compiled.metadata.shared} bytes", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--compile-only", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.compile_only:
        return compile_only()
    from pi0_policy_ros.engine.bench import time_chain_variant
    from pi0_policy_ros.engine.engine import Engine
    from pi0_policy_ros.engine.types import EngineShape, random_batch
    from pi0_policy_ros.model.checkpoint import random_model
    from pi0_policy_ros.model.config import get_preset
    cfg = get_preset("pi05")
    model = random_model(cfg, "cuda", torch.bfloat16, seed=0)
    shape = EngineShape.for_model(cfg, num_slots=3)
    engine = Engine.create(model, shape, "cuda", "bfloat16")
    engine.infer(random_batch(shape, 0, valid_slots=2, valid_tokens=24))
    ew, tab, buf = engine.expert_weights, engine.tables, engine.buf

    # one layer's projections, Triton against Gluon, on the same residual rows
    triton_step = TritonDenoiseStep(ew, tab, shape, buf, DEFAULT_CONFIG)
    gluon_step = GluonPairStep(ew, tab, shape, buf, DEFAULT_CONFIG)
    gluon_cols = GluonPairStep(ew, tab, shape, buf, DEFAULT_CONFIG, COLUMNS_ALONG_LANES)
    gen = torch.Generator(device="cuda").manual_seed(1)
    resid = torch.randn(triton_step.resid.shape, device="cuda", generator=gen)
    lw, pp = ew.layers[3], shape.padded_prefix_len
    results = {}
    for name, step in (("triton", triton_step), ("gluon", gluon_step), ("gluon_cols", gluon_cols)):
        step.resid.copy_(resid)
        step._pair(lw.qkv.weight, step.q, K.EPI_ROPE, tab.norm_mul[2, 3, 0], tab.qkv_bias[2, 3], 0,
                   k_out=buf.keys[3, pp:], v_out=buf.values[3, pp:], cos=buf.suffix_cos, sin=buf.suffix_sin)
        step._pair(lw.gate_up.weight, step.act, K.EPI_GEGLU, tab.norm_mul[2, 3, 1], tab.gate_up_bias[2, 3], ew.cfg.mlp_dim)
        torch.cuda.synchronize()
        rows = shape.suffix_len
        results[name] = [step.q.float().clone(), buf.keys[3, pp:pp + rows].float().clone(),
                         buf.values[3, pp:pp + rows].float().clone(), step.act.float().clone()]
    check = {}
    for other in ("gluon", "gluon_cols"):
        for label, a, b in zip(("q", "k", "v", "act"), results["triton"], results[other]):
            check[f"{other}.{label}"] = float((a - b).abs().max() / a.abs().max().clamp_min(1e-6))
    residual_step = GluonStep(ew, tab, shape, buf, DEFAULT_CONFIG)
    attn_in = torch.randn(shape.suffix_len, 2048, device="cuda", generator=gen).to(torch.bfloat16)
    act_in = torch.randn(shape.suffix_len, ew.cfg.mlp_dim, device="cuda", generator=gen).to(torch.bfloat16)
    sums = {}
    for name, step in (("triton", triton_step), ("gluon", residual_step)):
        step.resid.copy_(resid)
        step._splitk(attn_in, lw.out.weight, step.resid, K.EPI_RESIDUAL, gate=tab.gate[2, 3, 0], splits=8)
        step._splitk(act_in, lw.down.weight, step.resid, K.EPI_RESIDUAL, gate=tab.gate[2, 3, 1], splits=8)
        torch.cuda.synchronize()
        sums[name] = step.resid - resid
    check["residual_update"] = float((sums["triton"] - sums["gluon"]).abs().max() / sums["triton"].abs().max())
    attention_step = GluonStep(ew, tab, shape, buf, DEFAULT_CONFIG, attention=True)
    q_in = torch.randn(shape.suffix_len, 2048, device="cuda", generator=gen).to(torch.bfloat16)
    outs = {}
    for name, step in (("triton", triton_step), ("gluon", attention_step)):
        step._attention(buf, 3, q_in, step.attn, None)
        torch.cuda.synchronize()
        outs[name] = step.attn.float().clone()
    check["attention"] = float((outs["triton"] - outs["gluon"]).abs().max() / outs["triton"].abs().max())
    print(json.dumps({"one_layer_rel_diff": check}), flush=True)

    rows = []
    base = None
    def config(**fields):
        return dataclasses.replace(DEFAULT_CONFIG, **fields)

    runs = [("triton default", lambda: TritonDenoiseStep(ew, tab, shape, buf, DEFAULT_CONFIG)),
            ("gluon, down split 16", lambda: GluonStep(ew, tab, shape, buf, config(down_splits=16))),
            ("gluon + attention, down split 16",
             lambda: GluonStep(ew, tab, shape, buf, config(down_splits=16), attention=True)),
            ("gluon residual + attention, triton pair",
             lambda: GluonStep(ew, tab, shape, buf, DEFAULT_CONFIG, pair=False, attention=True)),
            ("triton default again", lambda: TritonDenoiseStep(ew, tab, shape, buf, DEFAULT_CONFIG))]
    for name, make in runs:
        try:
            step = make()
            timing = time_chain_variant(engine, step, iterations=args.iterations)
        except Exception as exc:  # report and go on
            print(json.dumps({"variant": name, "error": repr(exc)[:400]}), flush=True)
            continue
        base = timing.actions if base is None else base
        row = {"variant": name, "chain_ms": round(timing.chain_ms["median"], 3), "p90": round(timing.chain_ms["p90"], 3),
               "max_abs_vs_default": float(abs(timing.actions - base).max()), "replay_spread": timing.replay_spread}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "one_layer_rel_diff": check, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One denoise step as ~6 Triton kernels per expert layer (bf16 weights, float32 residual).

Per layer: fused-QKV (norm prologue, RoPE epilogue, K/V written into the cache), split-KV
attention, its combine, o_proj (split-K, `resid += gate ⊙ y` by atomics), gate_up (norm
prologue, GEGLU epilogue), down (split-K, gated residual). Per step: the action input projection
(pi0: + the action-time MLP) and the final norm + output projection + Euler update.
Launch geometry comes from `TritonConfig`; the benchmark compares a few. Variants (defaults keep
the kernels above): split-K for the two norm-fused projections and the output head, whose last
arriving program runs the epilogue (`qkv_splits`, `gate_up_splits`, `head_splits`); attention's
combine folded into its split kernel the same way, or made one load per operand
(`attn_combine`); relaxed instead of acq_rel residual atomics (`residual_atomic_sem`);
programmatic dependent launch between the kernels (`pdl`); the weight tile on the MMA's M side
(`swap_ab`); the norm's Σ x² summed once after the K loop (`pair_late_norm_sum`); qkv, gate_up, o_proj,
down and the split attention as Gluon kernels on sm_90 (`gluon`, `kernels_gluon`). `ForwardSaves`
keeps what `rtc`'s hand-written backward needs (`rtc_triton`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from pi0_policy_ros.engine import kernels_triton as K
from pi0_policy_ros.engine.buffers import DeviceBuffers
from pi0_policy_ros.engine.tables import StepTables
from pi0_policy_ros.engine.types import EngineShape, hopper_or_newer
from pi0_policy_ros.engine.weights import ExpertWeights
from pi0_policy_ros.errors import ConfigError

log = logging.getLogger(__name__)

ATOMIC_SEMS = ("acq_rel", "relaxed")
HEAD_STAGES = 3  # Triton's default pipeline depth, named so that `StageFit` can lower it
ATTN_COMBINES = ("separate", "wide", "fused")


@dataclass(frozen=True)
class TritonConfig:
    pair_block_n: int = 32  # 16 → 32: chain 10.3 → 9.0 ms on the H100 (notes)
    pair_block_k: int = 128
    pair_warps: int = 4
    pair_stages: int = 3
    splitk_block_n: int = 32
    splitk_block_k: int = 128
    o_splits: int = 4
    down_splits: int = 4
    splitk_warps: int = 4
    splitk_stages: int = 3
    attn_keys_per_split: int = 64
    attn_block_n: int = 64
    attn_block_r: int = 16
    attn_warps: int = 4
    combine_block_r: int = 16
    combine_block_d: int = 64  # "wide": columns per program; "fused": columns per combine chunk
    # "acq_rel" = Triton's default: MEMBAR.GPU + L1 invalidate around every residual atomic
    residual_atomic_sem: str = "acq_rel"
    # > 1: split K over this many programs per pair block (last arriver: norm + RoPE / GEGLU)
    qkv_splits: int = 1
    gate_up_splits: int = 1
    head_splits: int = 1  # > 1: the final norm + head split over K the same way
    # "separate": split + combine kernels; "wide": the combine loads all splits at once;
    # "fused": the split kernel's last arriving program per row block combines (one launch)
    attn_combine: str = "separate"
    # Programmatic dependent launch for the default kernels (`kernels_triton._pdl_enter`): the next
    # kernel's programs become resident while this one runs. sm_90+ only; off under the interpreter.
    pdl: bool = False
    # "Swap AB": the weight tile is the MMA's M side (`kernels_triton._pair_accumulate`).
    swap_ab: bool = False
    # The pair kernels' Σ x² summed across columns once after the K loop, not per K tile (LATE_SS).
    pair_late_norm_sum: bool = False
    # qkv, gate_up, o_proj, down and the split attention as Gluon kernels that fetch their weights
    # (the attention: the prefix's K/V) before the PDL wait (`kernels_gluon`; sm_90, full-size pi0.5).
    gluon: bool = False
    # PDL: every kernel lets the next one launch before its own wait, not after it (`kernels_triton._pdl_enter`,
    # `kernels_gluon._pdl_enter`), so the next kernel's programs can start, and fetch their weights, sooner.
    pdl_early: bool = False

    def __post_init__(self) -> None:
        if self.residual_atomic_sem not in ATOMIC_SEMS:
            raise ConfigError(f"residual_atomic_sem must be one of {ATOMIC_SEMS}, found {self.residual_atomic_sem!r}")
        if self.attn_combine not in ATTN_COMBINES:
            raise ConfigError(f"attn_combine must be one of {ATTN_COMBINES}, found {self.attn_combine!r}")
        for name in ("qkv_splits", "gate_up_splits", "head_splits"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ConfigError(f"TritonConfig.{name} must be a power of two ≥ 1, found {value}")
        if self.pdl and self.attn_combine != "wide":
            raise ConfigError(f"pdl is implemented for the 'wide' attention combine only, found {self}")
        if self.gluon and (self.attn_keys_per_split, self.attn_block_r, self.attn_combine, self.qkv_splits,
                           self.gate_up_splits) != (64, 16, "wide", 1, 1):
            raise ConfigError("the Gluon kernels split the attention in 64 keys × 16 rows, combine it 'wide', and "
                              f"do not split qkv / gate_up over K; found {self}")

    @property
    def single_pass_kernels(self) -> bool:
        """No split-K pair kernels and the wide combine: the kernels RTC's saves exist for."""
        return self.qkv_splits == 1 and self.gate_up_splits == 1 and self.attn_combine == "wide"


# Named configs the benchmark times side by side (and the kernel tests check). Chain medians on the
# H100, pi0.5 (pi0), 10 steps: run 4: run3 9.04 ms, relaxed 8.80, + wide combine 8.41, + head
# split 8.08; fused combine 15.9; 4- / 8-way pair splits 9.29 / 10.6. Run 13: run4_default 8.02
# (12.92), + PDL 7.47 (13.62), + swap AB 6.30 (11.46), + 64-row split-K tiles and 8-way o / down
# splits 5.90 (10.83; without PDL 6.46 / 11.14), + 4 stages 5.74 (10.56) = the default. Also tried
# in run 13 on top of that config without 4 stages: BLOCK_K 64 6.78 (12.65), BLOCK_K 256 6.01 (pi0:
# out of shared memory), 8 warps 6.31 (11.34), 16-way o / down splits 6.10 (10.78), 128-row
# split-K tiles 6.03 (13.27). `bench/engine_notes.md`, attempts 8 and 10.
_RELAXED = TritonConfig(residual_atomic_sem="relaxed")
_SPLIT = replace(_RELAXED, qkv_splits=4, gate_up_splits=4)  # 160 + 512 programs, ~125 registers
_RUN4_DEFAULT = replace(_RELAXED, head_splits=8, attn_combine="wide", combine_block_d=16)
_SWAP = replace(_RUN4_DEFAULT, pdl=True, swap_ab=True)
# The engine's default where the Gluon kernels cannot run (`GLUON_CONFIG` below): relaxed residual
# atomics, the head split 8 ways, the wide combine, PDL,
# swap AB with 64-row split-K tiles split 8 ways, 4 pipeline stages (5 in the pair kernels), and the
# pair kernels' Σ x² summed after their K loop. The last two (runs 88-90, `bench/denoise_sweep.py`,
# H100, same call): pi0.5 5.67-5.72 → 5.52 ms (notes attempt 35; not in the long-suffix config below).
DEFAULT_CONFIG = replace(_SWAP, splitk_block_n=64, o_splits=8, down_splits=8, pair_stages=5, splitk_stages=4,
                         pair_late_norm_sum=True)
# Long suffixes (pi0's 51 rows, pi0.5 with a 50-action horizon: 400+ attention rows): 128-key splits
# of 128-key tiles and 32 rows per attention program, i.e. half the partials to combine. H100, chain of ten
# steps (`bench/denoise_sweep.py`, runs 63-64): pi0 10.38 → 9.35 ms, pi0.5 at H = 50 10.62 → 9.35;
# pi0.5 at H = 10 stays on the default (5.66 against 5.87 with these tiles). The pair kernels keep
# their per-tile Σ x² and 4 stages here: the late sum's [64, 128] float32 accumulator took pi0's
# 9.38 ms to 9.13 on the H100 (run 91) but its pair kernel to 254-255 registers everywhere and into
# spills on sm_86-sm_120 (`bench/compile_targets.py`), none of which has been timed.
LONG_SUFFIX_CONFIG = replace(DEFAULT_CONFIG, attn_keys_per_split=128, attn_block_n=128, attn_block_r=32,
                             pair_late_norm_sum=False, pair_stages=4)
LONG_SUFFIX_TOKENS = 32
# Where `kernels_gluon.supported` holds (the H100 / H200 and full-size pi0.5 with ≤ 16 rows): five of
# a layer's six kernels in Gluon, with down split 16 ways so that its programs fit beside gate_up's,
# and every kernel letting the next one launch before its own wait. H100, chain of ten steps (notes
# attempts 40-41): 5.45-5.50 → 4.29-4.33 ms (run 107, `bench/denoise_sweep.py` runs 114-116) → with
# `pdl_early` 3.97-3.98 (runs 115-116; early launches from the Gluon kernels alone 4.38, from the
# Triton ones alone 4.44; and `pdl_early` on the Triton-only default 5.55).
GLUON_CONFIG = replace(DEFAULT_CONFIG, gluon=True, down_splits=16, pdl_early=True)


def default_config(suffix_len: int, gluon: bool = False) -> TritonConfig:
    """The engine's config for a suffix of `suffix_len` tokens (action rows, pi0's state row);
    `gluon`: the Gluon kernels can run this step (`kernels_gluon.supported`)."""
    if suffix_len >= LONG_SUFFIX_TOKENS:
        return LONG_SUFFIX_CONFIG
    return GLUON_CONFIG if gluon else DEFAULT_CONFIG


CANDIDATES: dict[str, TritonConfig] = {
    "run3": TritonConfig(),  # the kernels of run 3 (acq_rel atomics, separate combine)
    "relaxed": _RELAXED,
    "relaxed_wide": replace(_RELAXED, attn_combine="wide", combine_block_d=16),
    "run4_default": _RUN4_DEFAULT,
    "run10_default": replace(_RUN4_DEFAULT, pdl=True),
    "swap": _SWAP,
    "triton_default": DEFAULT_CONFIG,  # the engine's config where the Gluon kernels cannot run
    "long_suffix": LONG_SUFFIX_CONFIG,
    "default_no_pdl": replace(DEFAULT_CONFIG, pdl=False),
    "split4_head8_wide": replace(_SPLIT, head_splits=8, attn_combine="wide", combine_block_d=16),
    "fused_combine": replace(_RELAXED, head_splits=8, attn_combine="fused", combine_block_d=32),
    "qkv_split2": replace(DEFAULT_CONFIG, qkv_splits=2),
    "per_tile_norm_sum": replace(DEFAULT_CONFIG, pair_late_norm_sum=False, pair_stages=4),  # the default before a45dd55
}


def _block_m(m: int) -> int:
    return max(16, triton.next_power_of_2(m))


def _split_block_k(k: int, splits: int, block_k: int) -> int:
    """BLOCK_K for K split `splits` ways: at most `block_k`, dividing K / splits."""
    if k % splits:
        raise ConfigError(f"K={k} is not a multiple of {splits} splits")
    block = min(block_k, k // splits)
    if (k // splits) % block or block < 16 or block & (block - 1):
        raise ConfigError(f"K / splits = {k // splits} is not a multiple of a power-of-two BLOCK_K ≥ 16 "
                          f"(at most {block_k})")
    return block


def _why_not_gluon(weights: ExpertWeights, shape: EngineShape, device: torch.device,
                   saves: ForwardSaves | None) -> str | None:
    """None where `kernels_gluon` can run this step, else why not."""
    if saves is not None:
        return "keep no saves for RTC's backward"
    try:
        from pi0_policy_ros.engine import kernels_gluon
    except Exception as exc:  # noqa: BLE001 - a Triton without Gluon, or with another Gluon API
        return f"need Triton's Gluon dialect as in Triton 3.6 ({type(exc).__name__}: {exc})"
    return kernels_gluon.supported(weights, shape.suffix_len, shape.pi05, device)


class StageFit:
    """Launches each kernel variant with the deepest software pipeline (`num_stages`) that fits
    this GPU's shared memory. The configs are tuned on Hopper (227 KB a block); Jetson Orin and
    A100 allow 163 KB, RTX 30xx-50xx 99 KB, and pi0's 64-row tiles need more than those at 4 stages
    (`bench/compile_targets.py`). Triton refuses such a launch before it reaches the GPU
    (`OutOfResources`), so the first launch of a variant (in warm-up, before any capture) steps
    its stages down until it fits, and later launches reuse that depth."""

    def __init__(self) -> None:
        self.stages: dict[tuple, int] = {}

    def launch(self, kernel: Any, grid: tuple[int, ...], *args: Any, num_stages: int, **meta: Any) -> None:
        key = (kernel.__name__, tuple(a.dtype for a in args if isinstance(a, torch.Tensor)),
               tuple(sorted((k, v) for k, v in meta.items() if not isinstance(v, torch.Tensor))))
        stages = self.stages.get(key, num_stages)
        while True:
            try:
                kernel[grid](*args, num_stages=stages, **meta)
                break
            except OutOfResources as exc:
                if exc.name != "shared memory" or stages == 1:
                    raise ConfigError(f"denoise kernel {kernel.__name__} needs {exc.required} bytes of "
                                      f"{exc.name} at {stages} pipeline stage(s); this GPU has {exc.limit}: use "
                                      "the torch-op step (Engine.create(denoise_kernels='torch'), bench "
                                      "--denoise-kernels torch)") from exc
                stages -= 1
        if key not in self.stages:
            self.stages[key] = stages
            if stages < num_stages:
                log.info("denoise kernel %s: %d pipeline stages need more shared memory than this GPU has; "
                         "using %d", kernel.__name__, num_stages, stages)


@dataclass
class ForwardSaves:
    """What the forward keeps per layer for RTC's backward (`rtc_triton`); all else is recomputed.
    resid: float32 [L, 2, S, W], the residual rows entering the input / post-attention norms;
    pre: float32 [L, S, 2·mlp], GEGLU's [gate | up]; q, attn: [L, S, heads·hd] (RoPE'd queries,
    attention output); lse: float32 [L, S·heads], the attention rows' log-sum-exp."""

    resid: torch.Tensor
    pre: torch.Tensor
    q: torch.Tensor
    attn: torch.Tensor
    lse: torch.Tensor

    @classmethod
    def allocate(cls, weights: ExpertWeights, suffix_len: int, device: torch.device) -> ForwardSaves:
        ec, layers = weights.cfg, len(weights.layers)
        act_dtype = weights.layers[0].qkv.weight.dtype
        f32 = torch.float32
        q_size = (layers, suffix_len, ec.num_heads * ec.head_dim)
        return cls(resid=torch.zeros(layers, 2, suffix_len, ec.width, dtype=f32, device=device),
                   pre=torch.zeros(layers, suffix_len, 2 * ec.mlp_dim, dtype=f32, device=device),
                   q=torch.zeros(q_size, dtype=act_dtype, device=device),
                   attn=torch.zeros(q_size, dtype=act_dtype, device=device),
                   lse=torch.zeros(layers, suffix_len * ec.num_heads, dtype=f32, device=device))


class TritonDenoiseStep:
    """`saves`: also keep the activations RTC's backward needs (needs the default pair kernels,
    no split-K there, and the "wide" attention combine, which writes the log-sum-exp)."""

    def __init__(self, weights: ExpertWeights, tables: StepTables, shape: EngineShape, buf: DeviceBuffers,
                 config: TritonConfig | None = None, saves: ForwardSaves | None = None) -> None:
        self.w = weights
        self.tables = tables
        self.shape = shape
        dev = buf.x.device
        why_not_gluon = _why_not_gluon(weights, shape, dev, saves)
        self.cfg = config or default_config(shape.suffix_len, gluon=why_not_gluon is None)
        self.saves = saves
        if saves is not None and not self.cfg.single_pass_kernels:
            raise ConfigError("saving activations for RTC needs qkv_splits = gate_up_splits = 1 and "
                              f"attn_combine 'wide', found {self.cfg}")
        if self.cfg.gluon and why_not_gluon:
            raise ConfigError(f"TritonConfig.gluon: the Gluon kernels {why_not_gluon}")
        ec = weights.cfg
        if ec.head_dim // 2 % self.cfg.pair_block_n:
            raise ConfigError(f"pair_block_n {self.cfg.pair_block_n} must divide head_dim/2 = {ec.head_dim // 2}")
        s = shape.suffix_len
        self.rows = s * ec.num_heads
        self.n_splits = triton.cdiv(buf.keys.shape[1], self.cfg.attn_keys_per_split)
        f32, bf16 = torch.float32, weights.layers[0].qkv.weight.dtype  # bf16 (fp16 only in interpreter tests)
        self.resid = torch.zeros(s, ec.width, dtype=f32, device=dev)
        self.q = torch.zeros(s, ec.num_heads * ec.head_dim, dtype=bf16, device=dev)
        self.attn = torch.zeros_like(self.q)
        self.act = torch.zeros(s, ec.mlp_dim, dtype=bf16, device=dev)
        self.part_o = torch.zeros(self.n_splits, self.rows, ec.head_dim, dtype=f32, device=dev)
        self.part_ml = torch.zeros(self.n_splits, 2, self.rows, dtype=f32, device=dev)
        self.pre = torch.zeros(shape.action_horizon, ec.width, dtype=f32, device=dev)
        self.dummy = torch.zeros(1, dtype=f32, device=dev)
        self.block_m = _block_m(s)
        self.fit = StageFit()
        # PDL: sm_90+ (griddepcontrol) and compiled kernels only
        pdl = self.cfg.pdl and K.FENCE and hopper_or_newer(dev)
        self.pdl_launch = {"PDL": 2 if self.cfg.pdl_early else True, "launch_pdl": True} if pdl else {}
        self.gluon = None
        if self.cfg.gluon:
            from pi0_policy_ros.engine.kernels_gluon import TILE_K, GluonLaunches
            for name, k, splits in (("o", ec.num_heads * ec.head_dim, self.cfg.o_splits),
                                    ("down", ec.mlp_dim, self.cfg.down_splits)):
                if k % (splits * TILE_K):
                    raise ConfigError(f"TritonConfig.gluon: {name}'s K = {k} is not a multiple of {splits} splits × "
                                      f"{TILE_K}")
            self.gluon = GluonLaunches(weights, pdl, self.cfg.pdl_early)
        # Last-arriver state: float32 partial slots (fully rewritten each launch) and int32
        # counters that every launch leaves at zero. One set serves all layers and both pair
        # projections: the kernels run one after another on one stream.
        c = self.cfg
        pair_ws = 0
        for splits, rows in ((c.qkv_splits, weights.layers[0].qkv.weight.shape[0]),
                             (c.gate_up_splits, weights.layers[0].gate_up.weight.shape[0])):
            if splits > 1:
                pairs = rows // 2
                _split_block_k(ec.width, splits, c.pair_block_k)
                pair_ws = max(pair_ws, splits * s * (2 * pairs + pairs // c.pair_block_n))
        self.pair_part = torch.zeros(max(pair_ws, 1), dtype=f32, device=dev)
        n_head = weights.out_head.weight.shape[0]
        self.head_block_n = min(32, triton.next_power_of_2(n_head))
        if c.head_splits > 1:
            _split_block_k(ec.width, c.head_splits, 128)
        self.head_part = torch.zeros(max(1, c.head_splits * shape.action_horizon * n_head), dtype=f32, device=dev)
        n_counters = max(triton.cdiv(weights.layers[0].gate_up.weight.shape[0] // 2, c.pair_block_n),
                         triton.cdiv(weights.layers[0].qkv.weight.shape[0] // 2, c.pair_block_n),
                         triton.cdiv(self.rows, c.attn_block_r), triton.cdiv(n_head, self.head_block_n))
        self.counters = torch.zeros(n_counters, dtype=torch.int32, device=dev)

    # ---- launchers ----------------------------------------------------------------------------
    def _splitk(self, x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, epi: int, bias: torch.Tensor | None = None,
                gate: torch.Tensor | None = None, splits: int = 1) -> None:
        c = self.cfg
        if self.gluon is not None and epi == K.EPI_RESIDUAL and gate is not None and w.data_ptr() in self.gluon.weights:
            self.gluon.residual(w, x, gate, out, splits)
            return
        m, k = x.shape
        n = w.shape[0]
        ieee = w.dtype == torch.float32
        block_k = min(c.splitk_block_k, triton.next_power_of_2(k)) if k % c.splitk_block_k else c.splitk_block_k
        splits = max(1, min(splits, k // block_k))
        if k % (splits * block_k):
            raise ConfigError(f"K={k} is not a multiple of splits {splits} × BLOCK_K {block_k}")
        block_n = c.splitk_block_n
        grid = (triton.cdiv(n, block_n), splits)
        self.fit.launch(
            K.linear_splitk_kernel, grid, x, x.stride(0), w, self.dummy if bias is None else bias,
            self.dummy if gate is None else gate, out, out.stride(0), m, n, k, k // splits,
            EPI=epi, HAS_BIAS=bias is not None, HAS_GATE=gate is not None, IEEE=ieee,
            BLOCK_M=_block_m(m), BLOCK_N=block_n, BLOCK_K=block_k, SEM=c.residual_atomic_sem,
            num_warps=c.splitk_warps, num_stages=c.splitk_stages, SWAP=c.swap_ab, **self.pdl_launch)

    def _pair(self, w: torch.Tensor, out: torch.Tensor, epi: int, mul: torch.Tensor | None, bias: torch.Tensor | None,
              pair_offset: int, k_out: torch.Tensor | None = None, v_out: torch.Tensor | None = None,
              cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
              save_x: torch.Tensor | None = None, save_pre: torch.Tensor | None = None) -> None:
        c, ec = self.cfg, self.w.cfg
        x = self.resid
        pairs = w.shape[0] // 2
        splits = c.qkv_splits if epi == K.EPI_ROPE else c.gate_up_splits
        d = self.dummy
        if self.gluon is not None and save_x is None and save_pre is None:
            self.gluon.pair(w, x, mul, bias, out, epi, pair_offset, ec.rms_norm_eps, d if k_out is None else k_out,
                            d if v_out is None else v_out, d if cos is None else cos, d if sin is None else sin)
            return
        args = (x, x.stride(0), w, d if mul is None else mul, d if bias is None else bias,
                out, out.stride(0), d if k_out is None else k_out, d if v_out is None else v_out,
                d if cos is None else cos, d if sin is None else sin)
        meta = {"EPI": epi, "HAS_MUL": mul is not None, "HAS_BIAS": bias is not None, "NQ": ec.num_heads,
                "HD": ec.head_dim, "BLOCK_M": self.block_m, "BLOCK_N": c.pair_block_n, "num_warps": c.pair_warps,
                "num_stages": c.pair_stages, "LATE_SS": c.pair_late_norm_sum}
        if splits == 1:
            self.fit.launch(
                K.norm_linear_pair_kernel, (pairs // c.pair_block_n,), *args, x.shape[0], x.shape[1], ec.rms_norm_eps,
                pair_offset, BLOCK_K=c.pair_block_k,
                xsave_ptr=d if save_x is None else save_x, pre_ptr=d if save_pre is None else save_pre,
                SAVE_X=save_x is not None, SAVE_PRE=save_pre is not None, SWAP=c.swap_ab, **meta,
                **self.pdl_launch)
            return
        self.fit.launch(
            K.norm_linear_pair_splitk_kernel, (pairs // c.pair_block_n, splits), *args, self.pair_part, self.counters,
            x.shape[0], x.shape[1], ec.rms_norm_eps, pair_offset, pairs,
            SPLITS=splits, FENCE=K.FENCE, BLOCK_K=_split_block_k(x.shape[1], splits, c.pair_block_k), SWAP=c.swap_ab,
            **meta, **self.pdl_launch)

    def _attention(self, buf: DeviceBuffers, layer: int, q: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor | None) -> None:
        c, ec = self.cfg, self.w.cfg
        keys, values = buf.keys[layer], buf.values[layer]
        grid = (self.n_splits, triton.cdiv(self.rows, c.attn_block_r))
        args = (q, keys, values, buf.suffix_bias, self.part_o, self.part_ml)
        scalars = (self.rows, keys.shape[0], c.attn_keys_per_split, buf.suffix_bias.stride(0), self.shape.suffix_len,
                   ec.head_dim**-0.5)
        meta = {"HEADS": ec.num_heads, "HD": ec.head_dim, "BLOCK_R": c.attn_block_r, "BLOCK_N": c.attn_block_n,
                "num_warps": c.attn_warps, "num_stages": 2}
        splits_p2 = triton.next_power_of_2(self.n_splits)
        if c.attn_combine == "fused":
            self.fit.launch(K.attention_fused_kernel, grid, *args, out, self.counters, *scalars, self.n_splits,
                            SPLITS_P2=splits_p2, BLOCK_D=min(c.combine_block_d, ec.head_dim), FENCE=K.FENCE, **meta)
            return
        if self.gluon is not None and lse is None:
            self.gluon.attention(keys, values, q, buf.suffix_bias, self.part_o, self.part_ml, self.rows, self.n_splits,
                                 self.shape.padded_prefix_len, self.shape.suffix_len)
        else:
            self.fit.launch(K.attention_split_kernel, grid, *args, *scalars, **meta, **self.pdl_launch)
        grid = (triton.cdiv(self.rows, c.combine_block_r), ec.head_dim // c.combine_block_d)
        if c.attn_combine == "wide":
            K.attention_combine_wide_kernel[grid](
                self.part_o, self.part_ml, out, self.rows, self.n_splits,
                HD=ec.head_dim, SPLITS_P2=splits_p2, BLOCK_R=c.combine_block_r, BLOCK_D=c.combine_block_d,
                lse_ptr=self.dummy if lse is None else lse, SAVE_LSE=lse is not None, num_warps=4,
                **self.pdl_launch)
            return
        K.attention_combine_kernel[grid](
            self.part_o, self.part_ml, out, self.rows, self.n_splits,
            HD=ec.head_dim, BLOCK_R=c.combine_block_r, BLOCK_D=c.combine_block_d, num_warps=4)

    # ---- one step -----------------------------------------------------------------------------
    def run(self, buf: DeviceBuffers, step: int) -> None:
        w, tab, shape, ec = self.w, self.tables, self.shape, self.w.cfg
        pp = shape.padded_prefix_len
        ada = shape.pi05
        x_in = buf.x[step]
        if ada:
            self._splitk(x_in, w.action_in.weight, self.resid, K.EPI_STORE, bias=w.action_in.bias)
        else:
            self._splitk(x_in, w.action_in.weight, self.pre, K.EPI_SILU, bias=tab.action_time_bias[step])
            self._splitk(self.pre, w.time_mlp_out.weight, self.resid[1:], K.EPI_STORE, bias=w.time_mlp_out.bias)
            self.resid[0].copy_(buf.state_token)
        sv = self.saves
        for i, lw in enumerate(w.layers):
            q, attn = (self.q, self.attn) if sv is None else (sv.q[i], sv.attn[i])
            self._pair(lw.qkv.weight, q, K.EPI_ROPE, tab.norm_mul[step, i, 0] if ada else None,
                       tab.qkv_bias[step, i] if ada else None, 0, k_out=buf.keys[i, pp:], v_out=buf.values[i, pp:],
                       cos=buf.suffix_cos, sin=buf.suffix_sin, save_x=None if sv is None else sv.resid[i, 0])
            self._attention(buf, i, q, attn, None if sv is None else sv.lse[i])
            self._splitk(attn, lw.out.weight, self.resid, K.EPI_RESIDUAL,
                         gate=tab.gate[step, i, 0] if ada else None, splits=self.cfg.o_splits)
            self._pair(lw.gate_up.weight, self.act, K.EPI_GEGLU, tab.norm_mul[step, i, 1] if ada else None,
                       tab.gate_up_bias[step, i] if ada else None, ec.mlp_dim,
                       save_x=None if sv is None else sv.resid[i, 1], save_pre=None if sv is None else sv.pre[i])
            self._splitk(self.act, lw.down.weight, self.resid, K.EPI_RESIDUAL,
                         gate=tab.gate[step, i, 1] if ada else None, splits=self.cfg.down_splits)
        self._head(buf, step)

    def _head(self, buf: DeviceBuffers, step: int) -> None:
        """Final norm → float32 output projection → x[step + 1] = x[step] + W'h + b'."""
        w, tab, shape, ec, c = self.w, self.tables, self.shape, self.w.cfg, self.cfg
        ada = shape.pi05
        x_in = buf.x[step]
        hrows = self.resid[shape.suffix_len - shape.action_horizon:]
        out = w.out_head.weight
        n, k = out.shape
        block_n = self.head_block_n
        args = (hrows, hrows.stride(0), tab.final_mul[step] if ada else self.dummy, out, tab.out_bias[step],
                x_in, buf.x[step + 1])
        round_to = tl.float16 if self.q.dtype == torch.float16 else tl.bfloat16
        if c.head_splits == 1:
            self.fit.launch(
                K.norm_head_kernel, (triton.cdiv(n, block_n),), *args, hrows.shape[0], n, k, ec.rms_norm_eps,
                HAS_MUL=ada, ROUND_TO=round_to, BLOCK_M=_block_m(hrows.shape[0]), BLOCK_N=block_n, BLOCK_K=128,
                num_warps=4, num_stages=HEAD_STAGES, **self.pdl_launch)
            return
        block_m = _block_m(hrows.shape[0])
        block_kall = min(triton.next_power_of_2(k), max(128, 16384 // block_m))  # ≤ 128 fp32 registers a thread
        while k % block_kall:
            block_kall //= 2
        self.fit.launch(
            K.norm_head_splitk_kernel, (triton.cdiv(n, block_n), c.head_splits), *args, self.head_part, self.counters,
            hrows.shape[0], n, k, ec.rms_norm_eps,
            HAS_MUL=ada, ROUND_TO=round_to, SPLITS=c.head_splits, FENCE=K.FENCE, BLOCK_M=block_m,
            BLOCK_N=block_n, BLOCK_K=_split_block_k(k, c.head_splits, 128), BLOCK_KALL=block_kall, num_warps=4,
            num_stages=HEAD_STAGES, **self.pdl_launch)

"""Vision and prefix kernels against what torch runs (notes attempt 53), on the H100.

Parts (`--parts`, comma-separated):
- `splitk`: SigLIP's out (K = 1152) and fc2 (K = 4304) at 512 rows, each with the residual +
  LayerNorm row kernel after it: cuBLAS + the engine's row kernel against a split-K Triton GEMM
  (TMA) into float32 partials + a row kernel summing them (both defined here: not kept in the
  engine, run 155), for a sweep of tiles, splits, warps and stages; 27 distinct weights a graph.
- `attention`: SigLIP's attention of one layer (SDPA on the permuted views against the engine's
  `vision_attention_kernel`), and the prefix's (544 rows, 8 query heads on one KV head of 256, 536
  valid keys: torch's flash varlen, what the engine runs, against a Triton flash kernel defined
  here, for a sweep of row / key blocks, warps and stages; not kept in the engine, run 157).
- `stage`: the bench engine's vision and prefix stages (2 valid images, 24 prompt tokens) as
  graphs, with torch's attention and with the Triton kernels (the best configs of `attention`),
  in two interleaved rounds. (Run 155's form of this script, ddab67f, also timed both stages with
  cuBLASLt preferred for their GEMMs: slower, vision 1.77 against 1.61 ms, prefix 4.46 against 4.24.)

    PYTHONPATH=. python3 bench/vision_micro.py [--parts attention,stage] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from bench.chain_setup import bench_pi05_engine
from bench.graph_timing import graph_time_us
from pi0_policy_ros.engine import rowops, stages

ROWS, WIDTH, MLP, HEADS, EPS, LAYERS = 512, 1152, 4304, 16, 1e-6, 27
PREFIX_ROWS, PREFIX_VALID, PREFIX_HEADS, PREFIX_HD, PREFIX_LAYERS = 544, 536, 8, 256, 17
SplitkConfig = tuple[tuple[int, int, int], int, int, int]


# ---- splitk -------------------------------------------------------------------------------------
@triton.jit
def _splitk_partials_kernel(a_desc, w_desc, part_ptr, M, N, K_SPLIT,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (output tile, split s): part[s] = a[:, ks]·W[:, ks]ᵀ in float32 (TMA reads past K as 0)."""
    num_m = tl.cdiv(M, BLOCK_M)
    pid, split = tl.program_id(0), tl.program_id(1)
    off_m, off_n = (pid % num_m) * BLOCK_M, (pid // num_m) * BLOCK_N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(split * K_SPLIT, (split + 1) * K_SPLIT, BLOCK_K):
        acc = tl.dot(a_desc.load([off_m, k]), w_desc.load([off_n, k]).T, acc)
    rm, rn = off_m + tl.arange(0, BLOCK_M), off_n + tl.arange(0, BLOCK_N)
    tl.store(part_ptr + split.to(tl.int64) * M * N + rm[:, None].to(tl.int64) * N + rn[None, :], acc,
             mask=(rm < M)[:, None] & (rn < N)[None, :])


@triton.jit
def _partials_residual_layer_norm_kernel(x_ptr, part_ptr, bias_ptr, h_ptr, M, N, eps, SPLITS: tl.constexpr,
                                         BLOCK: tl.constexpr):
    """One row: x ← x + Σ part[s] + bias (rounded once), h = LayerNorm(x) without gain or shift."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    y = tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    for s in tl.static_range(SPLITS):
        y += tl.load(part_ptr + (s * M + row) * N + cols, mask=mask, other=0.0)
    x = (tl.load(x_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32) + y).to(x_ptr.dtype.element_ty)
    tl.store(x_ptr + row * N + cols, x, mask=mask)
    v = x.to(tl.float32)
    centred = tl.where(mask, v - tl.sum(v, axis=0) / N, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / N + eps)
    tl.store(h_ptr + row * N + cols, (centred * rstd).to(h_ptr.dtype.element_ty), mask=mask)


def splitk_linear_layer_norm(x: torch.Tensor, a: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
                             config: SplitkConfig) -> torch.Tensor:
    from triton.tools.tensor_descriptor import TensorDescriptor
    (bm, bn, bk), splits, warps, stages_ = config
    (p, k), n = a.shape, w.shape[0]
    part = torch.empty(splits, p, n, dtype=torch.float32, device=a.device)
    _splitk_partials_kernel[(triton.cdiv(p, bm) * triton.cdiv(n, bn), splits)](
        TensorDescriptor.from_tensor(a, [bm, bk]), TensorDescriptor.from_tensor(w, [bn, bk]), part, p, n,
        triton.cdiv(triton.cdiv(k, bk), splits) * bk, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
        num_stages=stages_)
    h = torch.empty_like(x)
    _partials_residual_layer_norm_kernel[(p,)](x, part, b, h, p, n, EPS, SPLITS=splits,
                                               BLOCK=triton.next_power_of_2(n), num_warps=4)
    return h


def splitk_configs(k: int) -> list[SplitkConfig]:
    splits = (1, 2, 3) if k <= 2048 else (2, 3, 4)
    out: list[SplitkConfig] = [((128, 128, 64), s, w, st) for s in splits for w in (4, 8) for st in (3, 4)]
    out += [((64, 128, 64), s, 4, st) for s in splits for st in (3, 4)]
    out += [((128, 64, 64), s, 4, 4) for s in splits]
    out += [((128, 128, 128), s, 8, 3) for s in splits]
    return out


def time_splitk(result: dict) -> None:
    for name, k in (("out", WIDTH), ("fc2", MLP)):
        gen = torch.Generator(device="cuda").manual_seed(0)
        a = torch.randn(ROWS, k, device="cuda", generator=gen).to(torch.bfloat16)
        ws = [(torch.randn(WIDTH, k, device="cuda", generator=gen) * k**-0.5).to(torch.bfloat16) for _ in range(LAYERS)]
        bs = [torch.randn(WIDTH, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(LAYERS)]
        x0 = torch.randn(ROWS, WIDTH, device="cuda", generator=gen).to(torch.bfloat16)
        x = x0.clone()
        ref_x = x0.clone()
        ref_h = rowops.residual_layer_norm(ref_x, F.linear(a, ws[0]), bs[0], EPS)
        rows: dict[str, dict] = {"cublas": {"us": round(graph_time_us(lambda i: rowops.residual_layer_norm(
            x, F.linear(a, ws[i % LAYERS]), bs[i % LAYERS], EPS), LAYERS)[0], 2)}}
        for cfg in splitk_configs(k):
            try:
                us, _ = graph_time_us(lambda i, cfg=cfg: splitk_linear_layer_norm(x, a, ws[i % LAYERS], bs[i % LAYERS],
                                                                                    cfg), LAYERS)
            except Exception as e:  # a config that does not fit (shared memory): recorded, skipped
                rows[str(cfg)] = {"error": str(e).splitlines()[0][:160]}
                continue
            got_x = x0.clone()
            got_h = splitk_linear_layer_norm(got_x, a, ws[0], bs[0], cfg)
            rows[str(cfg)] = {"us": round(us, 2), "h_max_diff": float((got_h.float() - ref_h.float()).abs().max()),
                              "x_max_diff": float((got_x.float() - ref_x.float()).abs().max())}
        best_us, best = min((r["us"], c) for c, r in rows.items() if c != "cublas" and "us" in r)
        result[name] = {"k": k, "variants": rows, "best": best, "best_us": best_us}
        print(name, "cublas", rows["cublas"]["us"], "best", best, best_us, flush=True)


# ---- attention ----------------------------------------------------------------------------------
@triton.jit
def _prefix_attention_kernel(q_ptr, k_ptr, v_ptr, bias_ptr, out_ptr, R, P, stride_kv, scale,
                             HD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (block of BLOCK_M query rows): softmax(q·kᵀ · scale + bias)·v over the P keys, with
    an online softmax over blocks of BLOCK_N keys. q rows [R, HD] (contiguous: the query heads as
    rows of the one KV head), keys and values [P, HD] (rows stride_kv apart), bias [P] the additive
    key mask (0 or the model's large negative mask value), out rows [R, HD]. At least one key must
    be unmasked (the prefix always has one)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, HD)
    row_ok = (rows < R)[:, None]
    q = tl.load(q_ptr + rows[:, None].to(tl.int64) * HD + d[None, :], mask=row_ok, other=0.0)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HD], tl.float32)
    for k0 in range(0, P, BLOCK_N):
        keys = k0 + tl.arange(0, BLOCK_N)
        key_ok = keys < P
        k = tl.load(k_ptr + keys[:, None] * stride_kv + d[None, :], mask=key_ok[:, None], other=0.0)
        v = tl.load(v_ptr + keys[:, None] * stride_kv + d[None, :], mask=key_ok[:, None], other=0.0)
        bias = tl.load(bias_ptr + keys, mask=key_ok, other=float("-inf")).to(tl.float32)
        s = tl.dot(q, k.T) * scale + bias[None, :]
        # the running max, taken as 0 while every key so far is masked by -inf (float16's mask
        # value): then alpha and p are 0 instead of NaN. bfloat16's finite mask value gives the
        # masked keys weight until a real score arrives, and alpha = 0 then drops them.
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_use)  # 0 on the first block (m = -inf)
        p = tl.exp(s - m_use[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    tl.store(out_ptr + rows[:, None].to(tl.int64) * HD + d[None, :], (acc / l[:, None]).to(out_ptr.dtype.element_ty),
             mask=row_ok)


def prefix_attention_triton(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor,
                            config: tuple[int, int, int, int]) -> torch.Tensor:
    """q [P, heads·hd] over the one KV head's keys / values [P, hd], additive key mask `bias`."""
    block_m, block_n, warps, stages_ = config
    p, hd = keys.shape
    rows = q.numel() // hd
    out = torch.empty_like(q)
    _prefix_attention_kernel[(triton.cdiv(rows, block_m),)](
        q, keys, values, bias, out, rows, p, keys.stride(0), hd**-0.5, HD=hd, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=warps, num_stages=stages_)
    return out


def time_vision_attention(result: dict) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(1)
    qkv = torch.randn(ROWS, 3 * WIDTH, device="cuda", generator=gen).to(torch.bfloat16)
    ref = rowops.vision_attention_torch(qkv, 2, HEADS)
    rows = {"sdpa": {"us": round(graph_time_us(lambda i: rowops.vision_attention_torch(qkv, 2, HEADS), LAYERS)[0], 2)}}
    for block_q in (64, 128):
        for warps in (4, 8):
            kw = {"block_q": block_q, "warps": warps}
            us, out = graph_time_us(lambda i, kw=kw: rowops.vision_attention_triton(qkv, 2, HEADS, **kw), LAYERS)
            rows[str(kw)] = {"us": round(us, 2), "max_diff": float((out.float() - ref.float()).abs().max()), **kw}
    best = min((r["us"], n) for n, r in rows.items() if n != "sdpa")[1]
    result["vision_attention"] = {"variants": rows, "best": best}
    print("vision attention", json.dumps(rows), flush=True)
    return {k: rows[best][k] for k in ("block_q", "warps")}


def time_prefix_attention(result: dict) -> tuple[int, int, int, int]:
    gen = torch.Generator(device="cuda").manual_seed(2)
    rows, valid = PREFIX_ROWS, PREFIX_VALID
    q = torch.randn(rows, PREFIX_HEADS * PREFIX_HD, device="cuda", generator=gen).to(torch.bfloat16)
    k, v = (torch.randn(rows, PREFIX_HD, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(2))
    bias = torch.zeros(1, 1, 1, rows, device="cuda", dtype=torch.bfloat16)
    bias[..., valid:] = stages.MASK_VALUE
    seq_ends = torch.tensor([[0, rows * PREFIX_HEADS], [0, valid]], device="cuda", dtype=torch.int32)
    ref = F.scaled_dot_product_attention(q.float().view(1, 1, -1, PREFIX_HD), k[:valid].float()[None, None],
                                         v[:valid].float()[None, None]).view(rows, -1)

    def flash() -> torch.Tensor:
        n = rows * PREFIX_HEADS
        return torch.ops.aten._flash_attention_forward(q.view(n, 1, PREFIX_HD), k[:, None], v[:, None], seq_ends[0],
                                                       seq_ends[1], n, rows, 0.0, False, False)[0].view(rows, -1)

    us, out = graph_time_us(lambda i: flash(), PREFIX_LAYERS)
    table = {"flash_varlen": {"us": round(us, 2), "max_err": float((out.float() - ref).abs().max())}}
    for block_m in (16, 32, 64):
        for block_n in (32, 64):
            for warps in (4, 8):
                for stages_ in (2, 3):
                    cfg = (block_m, block_n, warps, stages_)
                    try:
                        us, out = graph_time_us(lambda i, cfg=cfg: prefix_attention_triton(q, k, v, bias, cfg),
                                                PREFIX_LAYERS)
                    except Exception as e:  # out of shared memory or registers: recorded, skipped
                        table[str(cfg)] = {"error": str(e).splitlines()[0][:160]}
                        continue
                    table[str(cfg)] = {"us": round(us, 2), "max_err": float((out.float() - ref).abs().max())}
    best = min((r["us"], n) for n, r in table.items() if n != "flash_varlen" and "us" in r)[1]
    result["prefix_attention"] = {"variants": table, "best": best}
    print("prefix attention", json.dumps(table), flush=True)
    return tuple(int(x) for x in best.strip("()").split(","))


# ---- stage --------------------------------------------------------------------------------------
def time_stages(result: dict, vision_kw: dict, prefix_cfg: tuple[int, int, int, int]) -> None:
    engine = bench_pi05_engine()
    buf, rows = engine.buf, engine.last_prefix_rows
    torch_prefix_attention = stages.prefix_attention
    variants = {
        "torch": (rowops.vision_attention_torch, torch_prefix_attention),
        "triton": (lambda qkv, images, heads: rowops.vision_attention_triton(qkv, images, heads, **vision_kw),
                   lambda q, keys, values, bias, seq_ends: prefix_attention_triton(q, keys, values, bias, prefix_cfg)),
    }
    out: dict[str, dict] = {}
    ref: dict[str, torch.Tensor] = {}
    for _ in range(2):  # two rounds, interleaved, to see the drift between them
        for name, (vision_attn, prefix_attn) in variants.items():
            stages.vision_attention, stages.prefix_attention = vision_attn, prefix_attn
            v_us, _ = graph_time_us(lambda i: engine.vision.run(buf, rows.slots), 1, replays=300)
            emb = buf.prefix_embs[: rows.slots * 256].float().clone()
            p_us, _ = graph_time_us(lambda i: engine.prefix.run(buf, rows, prepared=True), 1, replays=300)
            kv = buf.keys[:, : rows.rows(256)].float().clone()
            ref.setdefault("emb", emb)
            ref.setdefault("kv", kv)
            entry = out.setdefault(name, {"vision_us": [], "prefix_us": [],
                                          "vision_max_diff": float((emb - ref["emb"]).abs().max()),
                                          "keys_max_diff": float((kv - ref["kv"]).abs().max())})
            entry["vision_us"].append(round(v_us, 1))
            entry["prefix_us"].append(round(p_us, 1))
            print("stage", name, round(v_us, 1), round(p_us, 1), flush=True)
    stages.vision_attention, stages.prefix_attention = rowops.vision_attention, torch_prefix_attention
    result["stage"] = out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="attention,stage")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    result: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    if "splitk" in parts:
        time_splitk(result)
    vision_kw, prefix_cfg = {"block_q": 64, "warps": 4}, (64, 64, 4, 2)
    if "attention" in parts:
        vision_kw = time_vision_attention(result)
        prefix_cfg = time_prefix_attention(result)
    if "stage" in parts:
        time_stages(result, vision_kw, prefix_cfg)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

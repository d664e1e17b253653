"""Run 70: the probe MLP of `bench/fp8_mlp_kernels.py` step by step on the GPU, and the down kernel's
time with block and row scales. `PYTHONPATH=. python bench/fp8_debug.py`."""
import torch, time
from bench import fp8_mlp_kernels as M, fp8_mlp_kernels as K
dev = torch.device("cuda")
P, W, MLP = 544, 2048, 16384
gu, dn, x0 = K.probe_layer(dev, P, W, MLP)
fp = M.Fp8Mlp(P, W, MLP, dev)
x = x0.clone()
# chain, step by step, as __call__ does
hq = torch.empty(P, W, dtype=torch.float8_e4m3fn, device=dev); hs = torch.empty(P, 1, device=dev)
fp._norm(x, hq, hs, 1e-6, fold=False, clear=False, quant=True)
act = torch.empty(P, MLP, dtype=torch.float8_e4m3fn, device=dev); asc = torch.empty(P, MLP // 128, device=dev)
K.gate_up_geglu_kernel[(5 * 128,)](hq, hs, gu.weight, gu.scale, act, asc, P, W, MLP, W, W, MLP, 128,
    FP8_MAX=448.0, BLOCK_M=128, GROUP_N=128, BLOCK_K=128, num_warps=8, num_stages=3)
ref_act, ref_s = M.gate_up_geglu_reference(hq, hs, gu)
deq = (act.float().view(P, -1, 128) * asc[..., None]).view(P, MLP)
rdeq = (ref_act.float().view(P, -1, 128) * ref_s[..., None]).view(P, MLP)
e = (deq - rdeq).abs()
print("act abs err max", e.max().item(), "ref max", rdeq.abs().max().item())
print("per row-block max err", [e[i*128:(i+1)*128].max().item() for i in range(5)])
print("per col quarter", [e[:, i*4096:(i+1)*4096].max().item() for i in range(4)])
fp.acc.zero_()
K.down_splitk_kernel[(5 * 16, 4)](act, asc, dn.weight, dn.scale, fp.acc, P, W, MLP, MLP, 128, MLP, W,
    BLOCK_M=128, BLOCK_N=128, GROUP_K=128, SPLITS=4, num_warps=8, num_stages=4)
want = M.down_reference(act, asc, dn)
print("down rel", ((fp.acc - want).abs().max() / want.abs().max()).item())
fp.acc.zero_()
fp(x, gu, dn, 1e-6)
print("call vs stepwise", ((fp.acc - want).abs().max() / want.abs().max()).item())
print("stage cache", "(no StageFit)")
def t(fn, n=50):
    for _ in range(3): fn()
    torch.cuda.synchronize(); s = time.perf_counter()
    for _ in range(n): fn()
    torch.cuda.synchronize(); return (time.perf_counter() - s) / n * 1e6
for rs in (False, True):
    for sp, st in ((4, 4), (4, 3), (2, 4), (8, 3)):
        f = lambda: K.down_splitk_kernel[(5 * 16, sp)](act, asc, dn.weight, dn.scale, fp.acc, P, W, MLP, MLP, 128, MLP, W,
            BLOCK_M=128, BLOCK_N=128, GROUP_K=128, SPLITS=sp, ROW_SCALED=rs, num_warps=8, num_stages=st)
        print("down row_scaled", rs, "splits", sp, "stages", st, f"{t(f):.1f} us")
y = torch.empty(P, W, dtype=torch.bfloat16, device=dev)
print("cublas down", f"{t(lambda: torch._scaled_mm(act, dn.weight.t(), scale_a=asc[:, :1].contiguous(), scale_b=dn.scale, out_dtype=torch.bfloat16)):.1f} us")
print("cublas gate_up", f"{t(lambda: torch._scaled_mm(hq, gu.weight.t(), scale_a=hs, scale_b=gu.scale, out_dtype=torch.bfloat16, use_fast_accum=True)):.1f} us")

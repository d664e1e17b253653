"""Runs 74-77: where does the probe MLP's intermittent whole-MLP error (runs 68, 69) come from?
The chain (norm → gate_up → down → fold) 20 times per form, fresh residual each time, against float32
on the dequantized weights (run 74: fold right after down, a torch copy of the workspace between, a
device sync between); then each kernel against its torch reference on its actual inputs, every
iteration (run 75: norm e4m3 vs torch's, gate_up + GEGLU vs `gate_up_geglu_reference` on the
kernel's own e4m3 input, down vs `down_reference` on gate_up's output, for gate_up's pipeline
depths 2-4); run 76: the workspace right after `Fp8Mlp.__call__` against the stepwise run's, and
the fold alone on the stepwise workspace; run 77: call and fold in one iteration, each checked.

    PYTHONPATH=. python bench/fp8_race_probe.py
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from bench import fp8_mlp_kernels as M
from pi0_policy_ros.engine.weights import FP8_MAX


def main() -> None:
    dev = torch.device("cuda")
    P, W, MLP = 544, 2048, 16384
    gu, dn, x0 = M.probe_layer(dev, P, W, MLP)
    h = F.rms_norm(x0.float(), (W,), eps=1e-6)
    y = h @ (gu.weight.float() * gu.scale.t()).t()
    update = (F.gelu(y[:, :MLP], approximate="tanh") * y[:, MLP:]) @ (dn.weight.float() * dn.scale.t()).t()
    fp = M.Fp8Mlp(P, W, MLP, dev)
    for form in ("fold right after down", "copy between", "sync between"):
        errs = []
        for _ in range(20):
            x = x0.clone()
            fp.acc.zero_()
            fp(x, gu, dn, 1e-6)
            if form == "copy between":
                fp.acc.clone()
            elif form == "sync between":
                torch.cuda.synchronize()
            fp.norm(x, 1e-6, fold=True)
            errs.append(float(((x.float() - x0.float()) - update).abs().max() / update.abs().max()))
        print(f"{form:<24} errors: min {min(errs):.3f} max {max(errs):.3f} "
              f"bad {sum(e > 0.1 for e in errs)} / {len(errs)}", flush=True)
    for stages in (3, 2, 4):
        fp = M.Fp8Mlp(P, W, MLP, dev, dataclasses.replace(M.DEFAULT_CONFIG, gate_up_stages=stages))
        bad = {"norm": 0, "gate_up": 0, "down": 0}
        worst = {k: 0.0 for k in bad}
        for _ in range(20):
            x = x0.clone()
            hq = torch.empty(P, W, dtype=torch.float8_e4m3fn, device=dev)
            hs = torch.empty(P, 1, device=dev)
            fp._norm(x, hq, hs, 1e-6, fold=False, clear=False, quant=True)
            e = float((hq.float() * hs - h).abs().max() / h.abs().max())
            act = torch.empty(P, MLP, dtype=torch.float8_e4m3fn, device=dev)
            asc = torch.empty(P, MLP // M.GROUP, device=dev)
            cfg = fp.config
            M.gate_up_geglu_kernel[(5 * (MLP // M.GROUP),)](
                hq, hs, gu.weight, gu.scale, act, asc, P, W, MLP, W, W, MLP, MLP // M.GROUP, FP8_MAX=FP8_MAX,
                BLOCK_M=cfg.gate_up_block_m, GROUP_N=M.GROUP, BLOCK_K=128, num_warps=cfg.gate_up_warps,
                num_stages=cfg.gate_up_stages)
            ra, rs = M.gate_up_geglu_reference(hq, hs, gu)
            deq = (act.float().view(P, -1, M.GROUP) * asc[..., None]).view(P, MLP)
            rdeq = (ra.float().view(P, -1, M.GROUP) * rs[..., None]).view(P, MLP)
            g = float((deq - rdeq).abs().max() / rdeq.abs().max())
            fp.acc.zero_()
            M.down_splitk_kernel[(5 * (W // cfg.down_block_n), cfg.down_splits)](
                act, asc, dn.weight, dn.scale, fp.acc, P, W, MLP, MLP, MLP // M.GROUP, MLP, W,
                BLOCK_M=cfg.down_block_m, BLOCK_N=cfg.down_block_n, GROUP_K=M.GROUP, SPLITS=cfg.down_splits,
                num_warps=cfg.down_warps, num_stages=cfg.down_stages)
            want = M.down_reference(act, asc, dn)
            d = float((fp.acc - want).abs().max() / want.abs().max())
            for k, v, tol in (("norm", e, 0.07), ("gate_up", g, 0.07), ("down", d, 1e-3)):
                bad[k] += v > tol
                worst[k] = max(worst[k], v)
        print(f"gate_up stages {stages}: bad {bad}, worst " + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()),
              flush=True)
    # run 76: the stepwise workspace (kept), then 20 × (__call__ → compare), 20 × (fold of a copy of it)
    fp = M.Fp8Mlp(P, W, MLP, dev)
    fp.acc.zero_()
    fp(x0.clone(), gu, dn, 1e-6)
    ref_acc = fp.acc.clone()
    call_err, fold_err = [], []
    for _ in range(20):
        fp.acc.zero_()
        fp(x0.clone(), gu, dn, 1e-6)
        call_err.append(float((fp.acc - ref_acc).abs().max() / ref_acc.abs().max()))
    want_x = (x0.float() + ref_acc).to(torch.bfloat16)
    for _ in range(20):
        fp.acc.copy_(ref_acc)
        x = x0.clone()
        fp.norm(x, 1e-6, fold=True)
        fold_err.append(float((x.float() - want_x.float()).abs().max()))
    print(f"first call vs float32: {float((ref_acc - update).abs().max() / update.abs().max()):.3f}; "
          f"calls vs the first: max {max(call_err):.2e}, bad {sum(e > 1e-3 for e in call_err)} / 20; "
          f"fold alone vs x0 + acc: max {max(fold_err):.2e}, bad {sum(e > 0 for e in fold_err)} / 20", flush=True)
    # run 77: call → check the workspace → fold → check x against x0 + that workspace
    rows = []
    for _ in range(10):
        x = x0.clone()
        fp.acc.zero_()
        fp(x, gu, dn, 1e-6)
        acc_now = fp.acc.clone()
        x_before = x.clone()
        fp.norm(x, 1e-6, fold=True)
        rows.append((float((acc_now - ref_acc).abs().max() / ref_acc.abs().max()),
                     float((x_before.float() - x0.float()).abs().max()),
                     float((x.float() - (x0.float() + acc_now).to(torch.bfloat16).float()).abs().max()),
                     float(fp.acc.abs().max())))
    for r in rows:
        print("acc vs first %.2e | x changed by call %.2e | fold vs x0 + acc %.2e | acc after fold %.2e" % r)


if __name__ == "__main__":
    main()

"""Where the denoise chain's time goes inside its CUDA graph: the chain timed with one kind of kernel
left out at a time (the actions are then wrong; only the time is used). With programmatic dependent
launch the kernels overlap, so a kernel's cost in the chain is what leaving it out saves, not its
time run alone (`bench/engine_profile.py`).

`--shared-weights` times the same rows with every layer reading layer 0's weights (35 MB, which stay
in the 50 MB L2): what the chain would take if its 620 MB weight stream from HBM cost nothing, i.e.
how much of its time is that stream and how much the kernels' own dependent latency.

    PYTHONPATH=. python bench/chain_ablation.py [--iterations 100] [--shared-weights] [--json OUT]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import torch

from bench.chain_setup import bench_pi05_engine
from pi0_policy_ros.engine import kernels_triton as K
from pi0_policy_ros.engine.bench import time_chain_variant
from pi0_policy_ros.engine.denoise_triton import TritonDenoiseStep
from pi0_policy_ros.engine.engine import Engine
from pi0_policy_ros.engine.weights import ExpertWeights


class AblatedStep(TritonDenoiseStep):
    """The engine's step without the launches of one kind (`skip`)."""

    def __init__(self, *args, skip: str = "") -> None:
        super().__init__(*args)
        self.skip = skip

    def _pair(self, w, out, epi, *args, **kwargs) -> None:
        if self.skip != ("qkv" if epi == K.EPI_ROPE else "gate_up"):
            super()._pair(w, out, epi, *args, **kwargs)

    def _splitk(self, x, w, out, epi, bias=None, gate=None, splits=1) -> None:
        layer = next((i for i, lw in enumerate(self.w.layers) if w is lw.out.weight or w is lw.down.weight), None)
        kind = "other" if layer is None else ("o" if w is self.w.layers[layer].out.weight else "down")
        if self.skip != kind:
            super()._splitk(x, w, out, epi, bias=bias, gate=gate, splits=splits)

    def _attention(self, buf, layer, q, out, lse) -> None:
        if self.skip == "attention":
            return
        if self.skip == "combine":  # the split kernel only: the Triton or Gluon form the engine uses
            original = K.attention_combine_wide_kernel
            K.attention_combine_wide_kernel = _NoLaunch()
            try:
                super()._attention(buf, layer, q, out, lse)
            finally:
                K.attention_combine_wide_kernel = original
            return
        super()._attention(buf, layer, q, out, lse)


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--shared-weights", action="store_true",
                        help="also time every row with all layers on layer 0's weights (L2-resident)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    engine = bench_pi05_engine()
    rows = []
    weight_sets = [("own", engine.expert_weights)]
    if args.shared_weights:
        ew = engine.expert_weights
        weight_sets.append(("layer 0's", dataclasses.replace(ew, layers=[ew.layers[0]] * len(ew.layers))))
    for weights_name, weights in weight_sets:
        for skip in ("", "qkv", "attention", "combine", "o", "gate_up", "down", "",
                     "qkv,attention,combine,o,gate_up,down"):
            rows.append(_time_row(engine, weights, weights_name, skip, args.iterations))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    return 0


def _time_row(engine: Engine, weights: ExpertWeights, weights_name: str, skip: str, iterations: int) -> dict:
    step = AblatedStep(weights, engine.tables, engine.shape, engine.buf, skip=skip)
    if "," in skip:  # every layer kernel left out: action_in and the head only
        step.skip = "all"
        step._pair = lambda *a, **k: None
        step._attention = lambda *a, **k: None
        step._splitk = lambda x, w, out, epi, **k: (TritonDenoiseStep._splitk(step, x, w, out, epi, **k)
                                                    if epi != K.EPI_RESIDUAL else None)
    timing = time_chain_variant(engine, step, iterations=iterations)
    row = {"left_out": skip or "nothing", "weights": weights_name,
           "kernels": "triton+gluon" if step.gluon is not None else "triton",
           "chain_ms": round(timing.chain_ms["median"], 3), "p90": round(timing.chain_ms["p90"], 3)}
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    sys.exit(main())

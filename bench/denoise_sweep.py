"""Time Triton denoise-chain configs side by side on one engine's buffers (full-size random model).

    python bench/denoise_sweep.py --preset pi0 [--cameras 3 --valid-cameras 3] \
        rows32:attn_block_r=32 stages3:pair_stages=3,splitk_stages=3 ...

Each argument is NAME:FIELD=VALUE[,FIELD=VALUE...] over `denoise_triton.DEFAULT_CONFIG` (the Triton
kernels; `gluon:gluon=True,down_splits=16,pdl_early=True` is `GLUON_CONFIG`, the engine's choice on
sm_90 for full-size pi0.5); that default itself is always timed first, and again last (drift check). Prints one JSON line per config: chain
median / p90 ms, max |actions - default's|, and the replay spread (`bench.time_chain_variant`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import torch

from pi0_policy_ros.engine.bench import time_chain_variant
from pi0_policy_ros.engine.denoise_triton import DEFAULT_CONFIG, TritonConfig, TritonDenoiseStep
from pi0_policy_ros.engine.engine import Engine
from pi0_policy_ros.engine.types import EngineShape, random_batch
from pi0_policy_ros.model.checkpoint import random_model
from pi0_policy_ros.model.config import get_preset


def parse_config(spec: str) -> tuple[str, TritonConfig]:
    name, _, fields = spec.partition(":")
    changes = {}
    for item in filter(None, fields.split(",")):
        key, _, value = item.partition("=")
        kind = type(getattr(DEFAULT_CONFIG, key))
        changes[key] = value if kind is str else (value == "True" if kind is bool else kind(value))
    return name, dataclasses.replace(DEFAULT_CONFIG, **changes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="pi0")
    parser.add_argument("--cameras", type=int, default=3)
    parser.add_argument("--valid-cameras", type=int, default=3)
    parser.add_argument("--valid-tokens", type=int, default=20)
    parser.add_argument("--action-horizon", type=int, default=0, help="override the preset's horizon (0: keep)")
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("configs", nargs="*")
    args = parser.parse_args(argv)
    cfg = get_preset(args.preset)
    if args.action_horizon:
        cfg = cfg.replace(action_horizon=args.action_horizon)
    model = random_model(cfg, "cuda", torch.bfloat16, seed=0)
    shape = EngineShape.for_model(cfg, num_slots=args.cameras)
    engine = Engine.create(model, shape, "cuda", "bfloat16")
    engine.infer(random_batch(shape, 0, valid_slots=args.valid_cameras, valid_tokens=args.valid_tokens))
    runs = [("default", DEFAULT_CONFIG)] + [parse_config(s) for s in args.configs] + [("default again", DEFAULT_CONFIG)]
    base = None
    for name, config in runs:
        try:
            step = TritonDenoiseStep(engine.expert_weights, engine.tables, engine.shape, engine.buf, config)
            timing = time_chain_variant(engine, step, iterations=args.iterations)
        except Exception as exc:  # a config may not compile or fit; report it and go on
            print(json.dumps({"config": name, "error": repr(exc)[:300]}), flush=True)
            continue
        base = timing.actions if base is None else base
        print(json.dumps({"config": name, "preset": args.preset, "horizon": cfg.action_horizon,
                          "chain_ms": round(timing.chain_ms["median"], 3), "p90": round(timing.chain_ms["p90"], 3),
                          "max_abs_vs_default": float(abs(timing.actions - base).max()),
                          "replay_spread": timing.replay_spread, "fitted_stages": sorted(set(step.fit.stages.values())),
                          "fields": {k: v for k, v in dataclasses.asdict(config).items()
                                     if v != getattr(DEFAULT_CONFIG, k)}}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

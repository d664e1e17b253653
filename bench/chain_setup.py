"""The engine the chain probes run on: full-size random pi0.5 (seed 0) with the bench's geometry (3
camera slots, 2 valid, 24 valid prompt tokens), its buffers holding that batch's prefix."""

from __future__ import annotations

import torch

from pi0_policy_ros.engine.engine import Engine
from pi0_policy_ros.engine.types import EngineShape, random_batch
from pi0_policy_ros.model.checkpoint import random_model
from pi0_policy_ros.model.config import get_preset


def bench_pi05_engine() -> Engine:
    cfg = get_preset("pi05")
    model = random_model(cfg, "cuda", torch.bfloat16, seed=0)
    shape = EngineShape.for_model(cfg, num_slots=3)
    engine = Engine.create(model, shape, "cuda", "bfloat16")
    engine.infer(random_batch(shape, 0, valid_slots=2, valid_tokens=24))
    return engine

"""Shows that `test_an_inference_allocates_nothing_and_waits_only_for_its_actions` (test/gpu/test_engine_gpu.py)
can fail: it runs the test on an engine mutated four ways: a host sync (`.item()`), a device tensor made inside
each inference, a second stream synchronize and a copy into pageable host memory, and prints whether the test caught each (run 135).

    PYTHONPATH=. python bench/sync_test_mutations.py
"""

from __future__ import annotations

import torch

from pi0_policy_ros.engine import engine as engine_mod
from test.gpu import test_engine_gpu as t

original = engine_mod.Engine._replay


def with_item(self: engine_mod.Engine, rows: object, t_start: float) -> object:
    float(self.buf.actions.sum().item())  # a host sync inside the inference (and a sum's allocation)
    return original(self, rows, t_start)


def with_sync(self: engine_mod.Engine, rows: object, t_start: float) -> object:
    torch.cuda.current_stream().synchronize()  # a second wait, with no allocation
    return original(self, rows, t_start)


def with_pageable_copy(self: engine_mod.Engine, rows: object, t_start: float) -> object:
    self.buf.actions.cpu()  # a device-to-host copy into pageable memory: syncs, allocates nothing on the GPU
    return original(self, rows, t_start)


def with_alloc(self: engine_mod.Engine, rows: object, t_start: float) -> object:
    self._scratch = torch.empty(1024, device=self.device)  # a device tensor made per inference
    return original(self, rows, t_start)


for name, patched in (("item", with_item), ("alloc", with_alloc), ("second_sync", with_sync),
                      ("pageable_copy", with_pageable_copy)):
    engine_mod.Engine._replay = patched
    try:
        t.test_an_inference_allocates_nothing_and_waits_only_for_its_actions("bfloat16", "triton")
        print(name, "MUTATION NOT CAUGHT")
    except AssertionError as exc:
        print(name, "caught:", (str(exc).splitlines() or [repr(exc)])[0][:200])
    finally:
        engine_mod.Engine._replay = original

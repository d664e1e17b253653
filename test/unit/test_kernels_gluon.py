"""The Gluon denoise kernels (`engine/kernels_gluon.py`) on the CPU: compiled for sm_90 here (no GPU
runs them in CI; `test/gpu/test_kernels_gluon_gpu.py` does on an H100), and the engine's choice of
them. What the compile checks is what their speed rests on (notes attempt 40): the copies that
fetch what no kernel writes are issued before `griddepcontrol.wait`, and each kernel's shared memory
leaves room beside its neighbour in the chain, so that its programs become resident early."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch

pytest.importorskip("triton.experimental.gluon")

from pi0_policy_ros.engine import kernels_gluon as G  # noqa: E402  (after the skip)
from pi0_policy_ros.engine.denoise_triton import (DEFAULT_CONFIG, GLUON_CONFIG, LONG_SUFFIX_CONFIG,  # noqa: E402
                                                  TritonDenoiseStep, default_config)
from pi0_policy_ros.errors import ConfigError  # noqa: E402
from test.denoise_setup import make_step_inputs, medium_config  # noqa: E402

SM_SHARED = 228 * 1024  # an H100 SM's shared memory; each resident program also reserves 1 KB
WIDE = G.gl.NVMMASharedLayout.get_default_for


def _compile(fn, args: tuple, **kwargs):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import compile as triton_compile
    from triton.compiler import make_backend
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
    return triton_compile(GluonASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


@pytest.fixture(scope="module")
def compiled() -> dict[str, object]:
    """The engine's launches of the five kernels (pi0.5 at H = 10), compiled for sm_90 with PDL as
    `GLUON_CONFIG` launches them (`pdl_early`: the next kernel may launch before this one's wait)."""
    bf16 = torch.zeros(16 * 8192, dtype=torch.bfloat16)
    f32 = torch.zeros(16 * 8192)
    assert GLUON_CONFIG.pdl and GLUON_CONFIG.pdl_early
    pdl = {"PDL": 2, "num_warps": 4, "launch_pdl": True}
    w = {"W_LAYOUT": WIDE([64, G.TILE_K], G.gl.bfloat16)}
    out = {}
    pair_w = G._descriptor(torch.zeros(8192, G.WIDTH, dtype=torch.bfloat16), [32, G.TILE_K])
    for epi, name in ((0, "qkv"), (1, "gate_up")):
        out[name] = _compile(G.norm_pair_kernel, (pair_w, f32, f32, f32, bf16, 2048, bf16, bf16, bf16, bf16, 10,
                                                  1e-6, 4096),
                             EPI=epi, NQ=8, X_LAYOUT=WIDE([16, G.WIDTH], G.gl.bfloat16), **w, **pdl)
    for name, k, splits in (("o", 2048, GLUON_CONFIG.o_splits), ("down", G.MLP, GLUON_CONFIG.down_splits)):
        kt = k // splits // G.TILE_K
        desc = G._descriptor(torch.zeros(G.WIDTH, k, dtype=torch.bfloat16), [64, G.TILE_K])
        out[name] = _compile(G.residual_splitk_kernel, (desc, bf16, k, f32, f32, 10), KT=kt,
                             X_LAYOUT=WIDE([16, G.TILE_K * kt], G.gl.bfloat16), **w, **pdl)
    kv = G._descriptor(torch.zeros(986, G.HEAD_DIM, dtype=torch.bfloat16), [G.KEYS_PER_SPLIT, G.HEAD_DIM])
    out["attention"] = _compile(G.attention_split_kernel, (kv, kv, bf16, f32, f32, f32, 80, 986, 976, 986, 10, 0.0625),
                                Q_LAYOUT=WIDE([16, G.HEAD_DIM], G.gl.bfloat16),
                                P_LAYOUT=WIDE([16, G.KEYS_PER_SPLIT], G.gl.bfloat16), **pdl)
    return out


def _copies_before_wait(ptx: str) -> tuple[int, int]:
    """(TMA copies before `griddepcontrol.wait`, all TMA copies) in the PTX's text order."""
    wait = ptx.index("griddepcontrol.wait")
    copies = [m.start() for m in re.finditer(r"cp\.async\.bulk\.tensor", ptx)]
    return sum(c < wait for c in copies), len(copies)


def test_weights_are_fetched_before_the_wait(compiled: dict[str, object]) -> None:
    for name, c in compiled.items():
        ptx = c.asm["ptx"]
        assert ptx.index("griddepcontrol.launch_dependents") < ptx.index("griddepcontrol.wait"), name
    for name in ("qkv", "gate_up", "o", "down"):
        before, total = _copies_before_wait(compiled[name].asm["ptx"])
        assert total > 0 and before == total, (name, before, total)
    # the attention: the prefix tiles before the wait, the suffix tile (the same copies again) after it
    before, total = _copies_before_wait(compiled["attention"].asm["ptx"])
    assert 0 < before < total, (before, total)


def test_each_kernel_fits_beside_its_neighbours(compiled: dict[str, object]) -> None:
    shared = {name: c.metadata.shared for name, c in compiled.items()}
    # the layer's order: down → qkv → attention → (combine) → o → gate_up → down
    for earlier, later in (("down", "qkv"), ("o", "gate_up"), ("gate_up", "down")):
        assert shared[earlier] + shared[later] + 2048 <= SM_SHARED, (earlier, later, shared)
    # down split 8 ways (the Triton config's) would not fit beside gate_up: why GLUON_CONFIG splits it 16
    desc = G._descriptor(torch.zeros(G.WIDTH, G.MLP, dtype=torch.bfloat16), [64, G.TILE_K])
    down8 = _compile(G.residual_splitk_kernel, (desc, torch.zeros(8, dtype=torch.bfloat16), G.MLP, torch.zeros(8),
                                                torch.zeros(8), 10), KT=2,
                     X_LAYOUT=WIDE([16, 2 * G.TILE_K], G.gl.bfloat16), W_LAYOUT=WIDE([64, G.TILE_K], G.gl.bfloat16),
                     PDL=True, num_warps=4, launch_pdl=True)
    assert shared["gate_up"] + down8.metadata.shared + 2048 > SM_SHARED


def test_the_engine_picks_them_only_where_they_run() -> None:
    assert default_config(10, gluon=True) is GLUON_CONFIG
    assert default_config(10, gluon=False) is DEFAULT_CONFIG
    assert default_config(51, gluon=True) is LONG_SUFFIX_CONFIG
    inputs = make_step_inputs(medium_config(pi05=True), torch.float16, "cpu")
    step = TritonDenoiseStep(inputs.weights, inputs.tables, inputs.shape, inputs.fresh_buffers())
    assert step.cfg is DEFAULT_CONFIG and step.gluon is None  # the CPU: the Triton kernels
    with pytest.raises(ConfigError, match="Gluon kernels need a CUDA GPU"):
        TritonDenoiseStep(inputs.weights, inputs.tables, inputs.shape, inputs.fresh_buffers(), GLUON_CONFIG)
    why = G.supported(inputs.weights, inputs.shape.suffix_len, True, torch.device("cpu"))
    assert why is not None and "CUDA" in why


def test_gluon_config_keeps_the_attention_tiles_it_is_written_for() -> None:
    with pytest.raises(ConfigError, match="64 keys × 16 rows"):
        replace(GLUON_CONFIG, attn_keys_per_split=128)
    with pytest.raises(ConfigError, match="64 keys × 16 rows"):
        replace(GLUON_CONFIG, qkv_splits=2)


def test_an_older_triton_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """Written against Triton 3.6's Gluon API: an older Triton keeps the Triton kernels, and says why."""
    inputs = make_step_inputs(medium_config(pi05=True), torch.float16, "cpu")
    monkeypatch.setattr(G.triton, "__version__", "3.5.1")
    why = G.supported(inputs.weights, inputs.shape.suffix_len, True, torch.device("cpu"))
    assert why is not None and "Triton ≥ 3.6" in why and "3.5.1" in why

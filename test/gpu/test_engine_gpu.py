"""GPU tests of the engine (skipped without CUDA): graph replay equals the eager path, every
precision stays within tolerance, and re-running after capture with new inputs gives new,
correct outputs (no stale buffers)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from test.paths import PI0_FIXTURE, PI05_FIXTURE
from pi0_policy_ros.engine.engine import Engine, eager_inputs
from pi0_policy_ros.engine.preprocess import ImagePreprocessor, plan_resize, preprocess_images
from pi0_policy_ros.engine.types import EngineBatch, EngineShape, PrefixRows, random_batch
from pi0_policy_ros.model.checkpoint import random_model, read_safetensors
from pi0_policy_ros.model.reference import load_reference, reference_model
from pi0_policy_ros.policy.robots import resize_with_pad
from test.gpu.medium import medium_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _fixture_batch(path) -> EngineBatch:
    tensors, _ = read_safetensors(path)
    slots = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
    return EngineBatch(images=torch.cat([tensors[f"inputs/image_u8.{s}"] for s in slots]).numpy(),
                       image_masks=torch.cat([tensors[f"inputs/image_mask.{s}"] for s in slots]).numpy(),
                       tokens=tensors["inputs/tokenized_prompt"][0].numpy(),
                       token_mask=tensors["inputs/tokenized_prompt_mask"][0].numpy(),
                       state=tensors["inputs/state"][0].numpy(), noise=tensors["inputs/noise"][0].numpy())


@torch.no_grad()
def _eager(model, batch: EngineBatch, shape: EngineShape) -> np.ndarray:
    inputs, noise = eager_inputs(batch, shape, torch.device("cuda"))
    return model.sample_actions(inputs, noise)[0].float().cpu().numpy()


@pytest.mark.parametrize("pi05", [True, False])
@pytest.mark.parametrize("precision,kernels", [("float32", "torch"), ("bfloat16", "torch"), ("bfloat16", "triton")])
def test_graph_chain_equals_eager(pi05: bool, precision: str, kernels: str) -> None:
    """float32: the graphs equal the eager model to 1e-3. bf16: the engine is within 2e-2 of the
    eager model in bf16, or at least as close to the float32 eager model as eager bf16 itself is
    (on this small random model bf16 rounding alone moves actions by a few 1e-2)."""
    cfg = medium_config(pi05)
    ref_model = random_model(cfg, "cuda", torch.float32, seed=7)
    model = ref_model if precision == "float32" else random_model(cfg, "cuda", torch.bfloat16, seed=7)
    shape = EngineShape.for_model(cfg)
    engine = Engine.create(model, shape, "cuda", precision, denoise_kernels=kernels)
    assert engine.mode == "graphs"
    outs = []
    for seed, valid in ((0, 2), (1, 3), (2, 1)):
        batch = random_batch(shape, seed, valid_slots=valid, valid_tokens=20 + seed)
        got = engine.infer(batch)
        same = _eager(model, batch, shape)
        diff = np.abs(got - same).max()
        if precision == "float32":
            assert diff <= 1e-3, (seed, diff)
        else:
            exact = _eager(ref_model, batch, shape)
            eager_err = np.abs(same - exact).max()
            assert diff <= 2e-2 or np.abs(got - exact).max() <= 2.0 * eager_err, (seed, diff, eager_err)
        outs.append(got)
    assert np.abs(outs[0] - outs[1]).max() > 1e-2  # new inputs, new outputs
    again = engine.infer(random_batch(shape, 0, valid_slots=2, valid_tokens=20))
    # split-K float32 atomics make bf16 results vary in the last bits between runs
    assert np.abs(again - outs[0]).max() <= (1e-5 if precision == "float32" else 2e-2)


@pytest.mark.parametrize("precision,kernels", [("bfloat16", "triton"), ("bfloat16", "torch"), ("fp8", "triton")])
def test_an_inference_allocates_nothing_and_waits_only_for_its_actions(precision: str, kernels: str) -> None:
    """No device tensor creation and no host sync inside an inference but the one wait for the
    actions: across warm inferences with new inputs (every camera layout) the CUDA allocator counts
    no allocation, and torch's sync debug mode reports synchronizing calls only from the lines that
    call `synchronize()` (an `.item()`, a pageable copy or a sync inside an op would be reported
    from elsewhere)."""
    import linecache
    import warnings

    cfg = medium_config(True)
    model = random_model(cfg, "cuda", torch.bfloat16, seed=7)
    shape = EngineShape.for_model(cfg)
    engine = Engine.create(model, shape, "cuda", precision, denoise_kernels=kernels)
    assert engine.mode == "graphs"
    batches = [random_batch(shape, seed, valid_slots=valid, valid_tokens=20 + seed)
               for seed, valid in ((0, 2), (1, 3), (2, 1), (3, 2))]
    for batch in batches:
        engine.infer(batch)
    torch.cuda.synchronize()
    allocations = torch.cuda.memory_stats()["allocation.all.allocated"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            outs = [engine.infer(batch) for batch in batches]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == allocations
    # (The mode's one-time "prototype feature" notice is not a sync.)
    syncs = [(w.filename, w.lineno) for w in caught if "called a synchronizing CUDA operation" in str(w.message)]
    elsewhere = [(f, n, linecache.getline(f, n).strip()) for f, n in syncs
                 if "synchronize()" not in linecache.getline(f, n)]
    assert not elsewhere, elsewhere
    assert len(syncs) == len(batches), syncs  # one wait an inference (run 135: exactly that)
    assert np.abs(outs[0] - outs[1]).max() > 1e-2  # they did run, on new inputs


@pytest.mark.parametrize("copies_in_graphs", [True, False], ids=["inside", "outside"])
def test_copies_and_timing_events_inside_or_outside_the_graphs(monkeypatch, copies_in_graphs: bool) -> None:
    """Where torch captures timing events (torch >= 2.8), the vision graph holds the copy in, the
    denoise graph the copy out and the stage events; with the events outside (older torch, forced
    here) `_replay` makes the copies and records the events between the replays. Either way new
    inputs in any camera layout give the eager actions, and the stage spans are measured: each
    positive, together within the inference's own wall time."""
    import inspect

    from pi0_policy_ros.engine import engine as engine_module
    if copies_in_graphs and "external" not in inspect.signature(torch.cuda.Event).parameters:
        pytest.skip(f"torch {torch.__version__} cannot capture timing events")
    if not copies_in_graphs:
        monkeypatch.setattr(engine_module, "_timing_events",
                            lambda n: ([torch.cuda.Event(enable_timing=True) for _ in range(n)], False))
    cfg = medium_config(True)
    ref_model = random_model(cfg, "cuda", torch.float32, seed=13)
    model = random_model(cfg, "cuda", torch.bfloat16, seed=13)
    shape = EngineShape.for_model(cfg)
    engine = Engine.create(model, shape, "cuda", "bfloat16")
    assert engine.report.copies_in_graphs is copies_in_graphs
    outs = []
    for seed, valid in ((0, 2), (1, 3), (2, 1)):
        batch = random_batch(shape, seed, valid_slots=valid, valid_tokens=18 + seed)
        got = engine.infer(batch)
        t = engine.last_timings_ms
        spans = [t[name] for name in ("h2d", "vision", "prefix", "denoise")]
        assert all(span > 0 for span in spans) and sum(spans) <= t["total"], t
        same, exact = _eager(model, batch, shape), _eager(ref_model, batch, shape)
        diff, eager_err = np.abs(got - same).max(), np.abs(same - exact).max()
        assert diff <= 2e-2 or np.abs(got - exact).max() <= 2.0 * eager_err, (seed, diff, eager_err)
        outs.append(got)
    assert np.abs(outs[0] - outs[1]).max() > 1e-2  # new inputs, new outputs


@pytest.mark.parametrize("pi05", [True, False])
def test_compact_prefix_graphs_equal_full_prefix(pi05: bool) -> None:
    """float32 graphs: the compact prefix (one graph per slot count and prompt bucket, switched
    from call to call) against the full-prefix graphs and the eager model, including a missing
    middle camera, no camera, and valid tokens that are not the prompt's first (whole prompt)."""
    cfg = medium_config(pi05)
    model = random_model(cfg, "cuda", torch.float32, seed=5)
    shape = EngineShape.for_model(cfg)
    compact = Engine.create(model, shape, "cuda", "float32")
    full = Engine.create(model, shape, "cuda", "float32", compact_prefix=False)
    cases = [((True, True, True), 40, None), ((True, False, True), 5, None), ((False, True, False), 100, None),
             ((True, True, False), 6, 30), ((False, False, False), 3, None), ((True, True, True), 40, None)]
    for seed, (masks, n_tokens, hole) in enumerate(cases):
        batch = random_batch(shape, seed, valid_tokens=min(n_tokens, shape.prompt_len))
        batch.image_masks = np.array(masks)
        if hole is not None:
            batch.token_mask[hole] = True
        got = compact.infer(batch)
        assert compact.last_prefix_rows.slots == max(1, sum(masks))
        assert np.abs(got - full.infer(batch)).max() <= 1e-4, seed
        assert np.abs(got - _eager(model, batch, shape)).max() <= 1e-3, seed


def test_bf16_layouts_sharing_a_vision_graph() -> None:
    """bf16: a layout whose valid tokens lead (flash varlen) and its masked twin (a valid token
    past the prompt's first ones) replay one vision graph, in turns, each within the tolerance of
    `test_graph_chain_equals_eager`."""
    cfg = medium_config(True)
    ref_model = random_model(cfg, "cuda", torch.float32, seed=11)
    model = random_model(cfg, "cuda", torch.bfloat16, seed=11)
    shape = EngineShape.for_model(cfg)
    engine = Engine.create(model, shape, "cuda", "bfloat16")
    if engine._flash_prefix:  # two prefix graphs for each vision graph
        assert 2 * len(engine._vision_graphs) == len(engine._prefix_graphs)
    for seed, hole in enumerate((None, 30, None, 30)):
        batch = random_batch(shape, seed, valid_slots=2, valid_tokens=shape.prompt_len if hole is None else 6)
        if hole is not None:
            batch.token_mask[hole] = True
        got = engine.infer(batch)
        assert engine.last_prefix_rows == PrefixRows(2, shape.prompt_len, leading_keys=hole is None)
        same, exact = _eager(model, batch, shape), _eager(ref_model, batch, shape)
        diff, eager_err = np.abs(got - same).max(), np.abs(same - exact).max()
        assert diff <= 2e-2 or np.abs(got - exact).max() <= 2.0 * eager_err, (seed, diff, eager_err)


def test_fp8_prefix_within_tolerance() -> None:
    cfg = medium_config(True)
    model = random_model(cfg, "cuda", torch.bfloat16, seed=3)
    shape = EngineShape.for_model(cfg)
    batch = random_batch(shape, 0, valid_slots=2)
    want = _eager(model, batch, shape)
    got = Engine.create(model, shape, "cuda", "fp8").infer(batch)
    assert np.abs(got - want).max() <= 0.15 * np.abs(want).max()


@pytest.mark.parametrize("path", [PI05_FIXTURE, PI0_FIXTURE], ids=["pi05", "pi0"])
def test_fixture_fp32_on_gpu(path) -> None:
    """The openpi reference actions, float32 engine on the GPU (torch ops; small geometry)."""
    ref = load_reference(path)
    model = reference_model(ref, "cuda", torch.float32)
    shape = EngineShape.for_model(ref.config)
    batch = _fixture_batch(path)
    got = Engine.create(model, shape, "cuda", "float32").infer(batch)
    assert np.abs(got - ref.expected["outputs/actions"][0].numpy()).max() <= 5e-3


def test_prefix_row_kernels_on_gpu() -> None:
    """`test/triton_prefix_check.py` on the GPU, where e4m3 rounding is the hardware's."""
    pytest.importorskip("triton")
    from test.triton_prefix_check import main
    assert main(["--device", "cuda"]) == 0


def test_gelu_epilogue_is_the_tanh_form() -> None:
    """`Linear.gelu_tanh` on CUDA puts the GELU in cuBLASLt's epilogue; it must be SigLIP's tanh
    form. With a zero weight the pre-activation is exactly the bias, so the bf16 output can be
    compared ulp for ulp: on about [-3.4, -2.3] the two forms round ≥ 2 bf16 ulps apart. Outputs
    under 1e-3 are left out (the epilogue flushes GELU's far negative tail, ~1e-10, to 0)."""
    from pi0_policy_ros.engine.weights import Linear
    pre = torch.linspace(-6, 6, 4801).bfloat16().unique()[:1296].cuda()
    lin = Linear(torch.zeros(pre.numel(), 64, dtype=torch.bfloat16, device="cuda"), pre)
    x = torch.randn(32, 64, device="cuda").bfloat16()
    got = lin.gelu_tanh(x).double()
    tanh_form = torch.nn.functional.gelu(pre.double(), approximate="tanh").bfloat16().double()
    erf_form = torch.nn.functional.gelu(pre.double()).bfloat16().double()
    ulp = tanh_form.abs() * 2.0**-7
    keep = tanh_form.abs() >= 1e-3
    err = ((got - tanh_form).abs() / ulp)[:, keep]
    assert bool((err <= 1.0).all()), float(err.max())
    apart = ((tanh_form - erf_form).abs() >= 2 * ulp) & keep
    assert int(apart.sum()) > 50
    assert bool(((got - erf_form).abs()[:, apart] > ulp[apart]).all())


def test_prefix_flash_varlen_equals_masked_attention() -> None:
    """The prefix attention with the valid key count on the device (flash varlen) equals SDPA with
    the additive key mask; the padded keys hold random values, so attending them would show."""
    from pi0_policy_ros.engine.stages import flash_varlen_usable, prefix_attention
    from pi0_policy_ros.model.gemma import MASK_VALUE
    torch.manual_seed(0)
    p, heads, hd, valid = 544, 8, 256, 536
    q = torch.randn(p, heads * hd, device="cuda").bfloat16()
    k, v = torch.randn(p, hd, device="cuda").bfloat16(), torch.randn(p, hd, device="cuda").bfloat16()
    bias = torch.zeros(1, 1, 1, p, device="cuda", dtype=torch.bfloat16)
    bias[..., valid:] = MASK_VALUE
    ends = torch.tensor([[0, p * heads], [0, valid]], dtype=torch.int32, device="cuda")
    assert flash_varlen_usable(q.device, q.dtype)
    got = prefix_attention(q, k, v, bias, ends).float()
    masked = prefix_attention(q, k, v, bias, None).float()
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float().view(1, 1, p * heads, hd), k.float()[None, None, :valid], v.float()[None, None, :valid]).view(p, -1)
    assert float((masked - ref).abs().max()) <= 1e-2
    assert float((got - ref).abs().max()) <= 1e-2, float((got - ref).abs().max())


_WITHOUT_TRITON = r"""
import json, sys
sys.modules["triton"] = None  # `import triton` raises ImportError, as with NVIDIA's Jetson torch wheels
import numpy as np, torch
from pi0_policy_ros.engine.engine import Engine
from pi0_policy_ros.engine.types import EngineShape, random_batch
from pi0_policy_ros.model.checkpoint import random_model
from test.gpu.medium import medium_config
from test.gpu.test_engine_gpu import _eager

cfg = medium_config(True)
model = random_model(cfg, "cuda", torch.bfloat16, seed=7)
exact_model = random_model(cfg, "cuda", torch.float32, seed=7)
shape = EngineShape.for_model(cfg)
engine = Engine.create(model, shape, "cuda", "bfloat16")
batch = random_batch(shape, 0, valid_slots=2, valid_tokens=20)
got = engine.infer(batch)
same, exact = _eager(model, batch, shape), _eager(exact_model, batch, shape)
print(json.dumps({"mode": engine.mode, "kernels": engine.report.denoise_kernels,
                  "diff": float(np.abs(got - same).max()), "eager_err": float(np.abs(same - exact).max()),
                  "err": float(np.abs(got - exact).max())}))
"""


def test_engine_without_triton_runs_torch_graphs() -> None:
    """Where Triton is missing (Jetson), `auto` captures the torch-op denoise step and torch row ops
    instead, with one warning, and the actions are as correct as with the kernels. A process of its
    own: this one has imported Triton already."""
    import json
    import os
    import subprocess
    import sys

    from test.paths import REPO_ROOT

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_TRITON], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["mode"] == "graphs" and result["kernels"] == "torch", result
    assert proc.stderr.count("Triton is not installed") == 1, proc.stderr[-3000:]
    assert result["diff"] <= 2e-2 or result["err"] <= 2.0 * result["eager_err"], result


@pytest.mark.parametrize("hw", [(480, 640), (120, 160), (300, 224)])
def test_resize_on_the_gpu_equals_the_cpu_resize_inside_a_graph(hw: tuple[int, int]) -> None:
    """The int32 tap passes on CUDA, captured in a graph and replayed on new frames, give the
    canvas of the policy's numpy (PIL-exact) resize, preprocessed on the same GPU."""
    rng = np.random.default_rng(sum(hw))
    preprocess = ImagePreprocessor(plan_resize(hw, 224), "cuda")
    frames = torch.zeros((3,) + hw + (3,), dtype=torch.uint8, device="cuda")
    out = torch.zeros(3, 3, 224, 224, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        preprocess(frames, out)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        preprocess(frames, out)
    for _ in range(2):
        images = rng.integers(0, 256, frames.shape, dtype=np.uint8)
        frames.copy_(torch.from_numpy(images))
        graph.replay()
        canvas = torch.from_numpy(np.stack([resize_with_pad(image) for image in images])).cuda()
        assert torch.equal(out, preprocess_images(canvas, plan_resize((224, 224), 224)))


def test_engine_resizing_camera_frames_gives_the_cpu_resized_pixels_and_actions() -> None:
    """An engine configured for 480x640 frames (resized in its vision graph) against one fed the
    CPU-resized 224x224 frames: the same pixels in the vision stage, the same actions."""
    cfg = medium_config(True)
    model = random_model(cfg, "cuda", torch.float32, seed=3)
    on_gpu = Engine.create(model, EngineShape.for_model(cfg, image_hw=(480, 640)), "cuda", "float32")
    on_cpu = Engine.create(model, EngineShape.for_model(cfg), "cuda", "float32")
    for seed in (0, 1):
        batch = random_batch(on_gpu.shape, seed, valid_slots=2)
        resized = replace(batch, images=np.stack([resize_with_pad(image) for image in batch.images]))
        got, want = on_gpu.infer(batch), on_cpu.infer(resized)
        assert torch.equal(on_gpu.buf.pixels[:2], on_cpu.buf.pixels[:2])
        assert np.abs(got - want).max() <= 1e-5, seed

"""Engine code paths that run without CUDA: shapes and batch checks, the precomputed step tables
against the model's on-the-fly ones, the fused/folded static engine against `sample_actions`,
GPU-style preprocessing, and the eager fallback."""

from __future__ import annotations

import itertools
from dataclasses import replace
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pi0_policy_ros.engine.engine import Engine
from pi0_policy_ros.engine.preprocess import ImagePreprocessor, plan_resize, preprocess_images
from pi0_policy_ros.engine.tables import build_step_tables, suffix_attention_bias, suffix_pattern
from pi0_policy_ros.engine.types import (EngineBatch, EngineShape, PrefixPlanner, PrefixRows, check_precision_on_gpu,
                                        plan_prefix, random_batch)
from pi0_policy_ros.engine.weights import fuse_expert, quantize_rows, to_fp8, Linear
from pi0_policy_ros.errors import ConfigError, ObservationError
from pi0_policy_ros.model.checkpoint import random_model, read_safetensors
from pi0_policy_ros.model.config import get_preset
from pi0_policy_ros.model.gemma import MASK_VALUE
from pi0_policy_ros.model.pi0 import euler_times
from pi0_policy_ros.model.reference import load_reference, reference_model
from pi0_policy_ros.policy.robots import resize_with_pad
from test.paths import PI0_FIXTURE, PI05_FIXTURE

SLOTS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")


@pytest.fixture(scope="module", params=["pi05_small", "pi0_small"])
def small(request):
    cfg = get_preset(request.param)
    return cfg, random_model(cfg, "cpu", torch.float32, seed=1)


def _fixture_batch(path) -> EngineBatch:
    tensors, _ = read_safetensors(path)
    return EngineBatch(images=torch.cat([tensors[f"inputs/image_u8.{s}"] for s in SLOTS]).numpy(),
                       image_masks=torch.cat([tensors[f"inputs/image_mask.{s}"] for s in SLOTS]).numpy(),
                       tokens=tensors["inputs/tokenized_prompt"][0].numpy(),
                       token_mask=tensors["inputs/tokenized_prompt_mask"][0].numpy(),
                       state=tensors["inputs/state"][0].numpy(), noise=tensors["inputs/noise"][0].numpy())


def test_shape_geometry() -> None:
    shape = EngineShape.for_model(get_preset("pi05"))
    assert (shape.prefix_len, shape.padded_prefix_len, shape.suffix_len) == (968, 976, 10)
    shape = EngineShape.for_model(get_preset("pi0"))
    assert (shape.prefix_len, shape.padded_prefix_len, shape.suffix_len) == (816, 816, 51)
    with pytest.raises(ConfigError):
        EngineShape.for_model(get_preset("pi0")).check_model(get_preset("pi05"))
    # same geometry, other head: pi0's state token makes the suffix one row longer
    with pytest.raises(ConfigError, match="pi05"):
        EngineShape.for_model(get_preset("pi05_libero")).check_model(get_preset("pi05_libero").replace(pi05=False))
    for name in ("num_slots", "prompt_len", "action_horizon", "action_dim", "num_steps", "tokens_per_image"):
        with pytest.raises(ConfigError, match=rf"EngineShape.{name} must be ≥ 1, found 0"):
            replace(shape, **{name: 0})


def test_batch_check_names_expected_and_found() -> None:
    shape = EngineShape.for_model(get_preset("pi05_small"))
    batch = random_batch(shape)
    batch.check(shape)
    batch.images = batch.images[:, :100]
    with pytest.raises(ObservationError, match=r"images: expected uint8 \[3, 224, 224, 3\], found uint8 \[3, 100"):
        batch.check(shape)


@pytest.mark.parametrize("name, wrong", [("images", np.float32), ("image_masks", np.uint8), ("tokens", np.int32),
                                         ("token_mask", np.int64), ("state", np.float64), ("noise", np.float64)])
def test_batch_check_refuses_a_right_shaped_input_of_another_dtype(name: str, wrong: type) -> None:
    """numpy or torch: a float64 noise or int32 prompt would be reinterpreted by the slab copy (or fail
    inside it), so it is refused up front, naming expected and found."""
    shape = EngineShape.for_model(get_preset("pi05_small"))
    batch = random_batch(shape)
    value = getattr(batch, name)
    for bad in (value.astype(wrong), torch.from_numpy(value.astype(wrong))):
        with pytest.raises(ObservationError, match=rf"{name}: expected {value.dtype} .*, found {np.dtype(wrong)} "):
            replace(batch, **{name: bad}).check(shape)


def test_batch_of_torch_tensors_is_accepted_and_loaded_like_numpy() -> None:
    from pi0_policy_ros.engine.buffers import allocate_host
    shape = EngineShape.for_model(get_preset("pi05_small"), image_hw=(30, 40))
    batch = random_batch(shape, 4, valid_slots=2)
    batch.image_masks = np.array([False, True, True])
    as_torch = EngineBatch(**{k: torch.from_numpy(v) for k, v in vars(batch).items()})
    as_torch.check(shape)
    rows, order = plan_prefix(shape, as_torch.image_masks, as_torch.token_mask)
    assert order == [1, 2, 0]
    from_numpy, from_torch = allocate_host(shape, pin=False), allocate_host(shape, pin=False)
    from_numpy.load(batch, order, rows.slots)
    from_torch.load(as_torch, order, rows.slots)
    assert torch.equal(from_torch.slab, from_numpy.slab)
    np.testing.assert_array_equal(from_torch.images[:2].numpy(), batch.images[[1, 2]])


def test_step_tables_equal_on_the_fly(small) -> None:
    cfg, model = small
    weights = fuse_expert(model, torch.float32, torch.device("cpu"))
    tables = build_step_tables(model, weights, torch.device("cpu"))
    assert tables.times == euler_times(cfg.num_denoise_steps)
    for step, t_value in enumerate(tables.times):
        t = torch.full((1,), t_value)
        if cfg.pi05:
            cond = model.time_condition(t)
            for i, layer in enumerate(model.expert.layers):
                scale, shift, gate = layer.input_layernorm.dense(cond)[0].chunk(3)
                torch.testing.assert_close(tables.norm_mul[step, i, 0], 1 + scale)
                torch.testing.assert_close(tables.gate[step, i, 0], gate)
                torch.testing.assert_close(tables.qkv_bias[step, i], weights.layers[i].qkv.weight @ shift)
        else:
            x = torch.randn(1, cfg.action_horizon, cfg.action_dim)
            emb, _ = model.embed_suffix(torch.zeros(1, cfg.action_dim), x, t)
            pre = F.silu(x[0] @ weights.action_in.weight.t() + tables.action_time_bias[step])
            torch.testing.assert_close(weights.time_mlp_out(pre), emb[0, 1:], atol=1e-5, rtol=1e-5)


def test_suffix_mask_and_positions_match_model(small) -> None:
    cfg, model = small
    pad = torch.rand(1, 40) > 0.3
    allowed, positions = model.suffix_attention(pad)
    pattern = suffix_pattern(cfg.suffix_len, cfg.action_horizon, torch.device("cpu"))
    bias = suffix_attention_bias(pad[0], pattern, torch.empty(cfg.suffix_len, 40 + cfg.suffix_len))
    torch.testing.assert_close(bias == 0, allowed[0])
    assert torch.all(bias[~allowed[0]] == MASK_VALUE)
    assert positions[0, 0] == pad.sum()


def test_static_engine_equals_eager(small) -> None:
    """The fused/folded engine code, run op by op on the CPU, computes the model's function
    (the fixture test below covers two valid slots)."""
    cfg, model = small
    shape = EngineShape.for_model(cfg)
    engine = Engine.create(model, shape, "cpu", "float32", mode="static")
    eager = Engine.create(model, shape, "cpu", "float32", mode="eager")
    for seed, valid_slots in ((0, 1), (1, 3)):
        batch = random_batch(shape, seed, valid_slots=valid_slots, valid_tokens=10 + seed)
        got = engine.infer(batch)
        assert got.shape == (cfg.action_horizon, cfg.action_dim) and got.dtype == np.float32
        np.testing.assert_allclose(got, eager.infer(batch), atol=2e-5)


def test_plan_prefix_buckets_and_slot_order() -> None:
    shape = EngineShape.for_model(get_preset("pi05"))  # 3 slots of 256 tokens, a 200-token prompt
    assert shape.prompt_buckets() == [16, 32, 64, 128, 200]
    assert EngineShape.for_model(get_preset("pi0")).prompt_buckets() == [16, 32, 48]
    leading = np.arange(200) < 24
    rows, order = plan_prefix(shape, np.array([True, False, True]), leading)
    assert (rows, order, rows.rows(256)) == (PrefixRows(2, 32, leading_keys=True), [0, 2, 1], 544)
    holes = leading.copy()
    holes[50] = True  # valid tokens that are not the prompt's first: the whole prompt
    assert plan_prefix(shape, np.zeros(3, bool), holes) == (PrefixRows(1, 200), [0, 1, 2])
    assert plan_prefix(shape, np.ones(3, bool), np.ones(200, bool))[0] == PrefixRows(3, 200, leading_keys=True)
    assert plan_prefix(shape, np.array([False, True, True]), leading)[0] == PrefixRows(2, 32, leading_keys=True)
    assert shape.full_prefix.rows(256) == shape.padded_prefix_len
    assert plan_prefix(shape, np.array([True, False, True]), leading, compact=False) == (shape.full_prefix, [0, 1, 2])
    # the smallest bucket that holds every valid token: one token past a bucket needs the next one
    for valid, bucket in ((1, 16), (16, 16), (17, 32), (32, 32), (33, 64), (128, 128), (129, 200), (200, 200)):
        assert plan_prefix(shape, np.ones(3, bool), np.arange(200) < valid)[0].prompt == bucket, valid


@pytest.mark.parametrize("compact", [True, False])
def test_the_remembered_plan_is_plan_prefix(compact: bool) -> None:
    shape = EngineShape.for_model(get_preset("pi05"))
    planner = PrefixPlanner(shape, compact, capacity=5)
    rng = np.random.default_rng(0)
    holes = np.arange(200) < 30
    holes[rng.choice(200, 5)] = True
    token_masks = [np.arange(200) < 24, np.arange(200) < 150, np.ones(200, bool), holes]
    cases = [(np.array(bits, bool), tokens) for bits in itertools.product([False, True], repeat=3)
             for tokens in token_masks]
    for _ in range(2):  # computed, then (mostly) remembered: the same answers
        for masks, tokens in cases:
            want = plan_prefix(shape, masks, tokens, compact)
            assert planner(masks, tokens) == want, (masks, tokens)
            assert planner(torch.from_numpy(masks), torch.from_numpy(tokens)) == want  # not remembered
            assert len(planner) <= 5
    # the same masks in other arrays (a new observation each time) are the same key
    masks, tokens = np.array([True, False, True]), np.arange(200) < 24
    planner(masks, tokens)
    kept = len(planner)
    assert planner(masks.copy(), tokens.copy()) == plan_prefix(shape, masks, tokens, compact) and len(planner) == kept


def test_captured_layouts_share_vision_graphs(small) -> None:
    """One vision graph per (slots, prompt) pair; the `leading_keys` twin of a layout gets a prefix
    graph of its own only where flash varlen can use it, else it replays the masked one."""
    cfg, model = small
    shape = EngineShape.for_model(cfg)
    engine = Engine.create(model, shape, "cpu", "float32", mode="static")
    pairs = [PrefixRows(n, p) for n in range(1, shape.num_slots + 1) for p in shape.prompt_buckets()]
    assert engine._buckets() == {rows: [rows] for rows in pairs}  # the CPU: no flash
    assert engine._captured_layout(PrefixRows(2, 32, leading_keys=True)) == PrefixRows(2, 32)
    engine._flash_prefix = True  # as on an sm80+ GPU in half precision
    assert engine._buckets() == {rows: [PrefixRows(rows.slots, rows.prompt, True), rows] for rows in pairs}
    assert engine._captured_layout(PrefixRows(2, 32, leading_keys=True)) == PrefixRows(2, 32, leading_keys=True)
    full = Engine.create(model, shape, "cpu", "float32", mode="static", compact_prefix=False)
    assert full._buckets() == {shape.full_prefix: [shape.full_prefix]}


def test_timing_events_stay_outside_the_graphs_where_torch_cannot_capture_them(monkeypatch) -> None:
    """torch >= 2.8 builds `external` events (captured as event-record nodes, so the graphs can
    hold the copies and the timing); an older torch's Event has no such argument, and the engine
    then keeps the events and the copies outside its graphs instead of failing to configure.
    (Stand-ins for torch.cuda.Event: a CPU build of torch cannot make one; the GPU test
    `test_copies_and_timing_events_inside_or_outside_the_graphs` runs the real ones.)"""
    from pi0_policy_ros.engine import engine as engine_module

    class Event:  # torch >= 2.8's signature
        def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False,
                     external: bool = False) -> None:
            self.timing, self.external = enable_timing, external

    class EventBefore28:
        def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False) -> None:
            self.timing, self.external = enable_timing, False

    for cls, inside in ((Event, True), (EventBefore28, False)):
        monkeypatch.setattr(torch.cuda, "Event", cls)
        events, got = engine_module._timing_events(5)
        assert got is inside and len(events) == 5
        assert all(isinstance(e, cls) and e.timing and e.external is inside for e in events)


def test_engine_with_camera_sized_frames_equals_the_cpu_resized_frames(small) -> None:
    """Static buffers with 240x320 frames (the upload slab, the vision stage's resize) and the eager
    fallback give what the 224 engine gives on the numpy-resized frames: the same pixels, actions."""
    cfg, model = small
    shape = EngineShape.for_model(cfg, image_hw=(240, 320))
    static = Engine.create(model, shape, "cpu", "float32", mode="static")
    eager = Engine.create(model, shape, "cpu", "float32", mode="eager")
    on_cpu = Engine.create(model, EngineShape.for_model(cfg), "cpu", "float32", mode="static")
    batch = random_batch(shape, 0, valid_slots=2)
    resized = replace(batch, images=np.stack([resize_with_pad(image) for image in batch.images]))
    want = on_cpu.infer(resized)
    np.testing.assert_array_equal(static.infer(batch), want)
    assert torch.equal(static.buf.pixels[:2], on_cpu.buf.pixels[:2])
    np.testing.assert_allclose(eager.infer(batch), want, atol=1e-5)


def test_compact_prefix_equals_full_prefix_and_eager(small) -> None:
    """Leaving the masked rows out (valid slots moved to the front, the prompt cut to its bucket)
    changes no action. One engine switches layouts from call to call, so rows a larger layout
    wrote before must stay masked for the next one."""
    cfg, model = small
    shape = EngineShape.for_model(cfg)
    compact = Engine.create(model, shape, "cpu", "float32", mode="static")
    full = Engine.create(model, shape, "cpu", "float32", mode="static", compact_prefix=False)
    eager = Engine.create(model, shape, "cpu", "float32", mode="eager")
    cases = [((True, True, True), 40, None), ((False, True, False), 5, None), ((True, False, True), 20, None),
             ((True, True, False), 6, 30), ((False, False, False), 3, None), ((True, False, False), 17, None)]
    for seed, (masks, n_tokens, hole) in enumerate(cases):
        batch = random_batch(shape, seed, valid_tokens=n_tokens)
        batch.image_masks = np.array(masks)
        if hole is not None:
            batch.token_mask[hole] = True
        got = compact.infer(batch)
        bucket = shape.prompt_len if hole is not None else next(b for b in shape.prompt_buckets() if b >= n_tokens)
        assert compact.last_prefix_rows == PrefixRows(max(1, sum(masks)), bucket,
                                                      leading_keys=hole is None and any(masks))
        # what flash varlen reads on the GPU (query rows: every computed row × heads; keys: the valid ones)
        heads = cfg.paligemma.num_heads
        rows = compact.last_prefix_rows.rows(shape.tokens_per_image)
        valid_keys = sum(masks) * shape.tokens_per_image + int(batch.token_mask.sum())
        assert compact.buf.prefix_seq_ends.tolist() == [[0, rows * heads], [0, valid_keys]]
        np.testing.assert_allclose(got, full.infer(batch), atol=2e-5)
        assert full.last_prefix_rows == shape.full_prefix  # compact_prefix=False: every slot, the whole prompt
        np.testing.assert_allclose(got, eager.infer(batch), atol=2e-5)


@pytest.mark.parametrize("path", [PI05_FIXTURE, PI0_FIXTURE], ids=["pi05", "pi0"])
def test_static_engine_matches_openpi_fixture(path) -> None:
    ref = load_reference(path)
    model = reference_model(ref, "cpu", torch.float32)
    engine = Engine.create(model, EngineShape.for_model(ref.config), "cpu", "float32", mode="static")
    got = engine.infer(_fixture_batch(path))
    assert np.abs(got - ref.expected["outputs/actions"][0].numpy()).max() <= 1e-4


def test_engine_refuses_what_it_cannot_run(small) -> None:
    """An unknown precision, and a PaliGemma with more than one KV head (the K/V cache holds one),
    are configuration errors, not a wrong dtype or a shape error in the first inference."""
    cfg, model = small
    shape = EngineShape.for_model(cfg)
    for mode in ("static", "eager"):
        with pytest.raises(ConfigError, match=r"precision must be one of .*found 'fp16'"):
            Engine.create(model, shape, "cpu", "fp16", mode=mode)
    lm = replace(cfg.paligemma, num_kv_heads=2)
    two_kv = cfg.replace(paligemma=lm, expert=replace(cfg.expert, num_kv_heads=2))
    with pytest.raises(ConfigError, match="one KV head, found 2"):
        Engine.create(random_model(two_kv, "cpu", torch.float32), shape, "cpu", "float32", mode="static")


def _small_model_actions(precision: str, mode: str) -> np.ndarray:
    """pi05_small (random weights, seed 1) on one random batch, through an engine on the CPU."""
    cfg = get_preset("pi05_small")
    shape = EngineShape.for_model(cfg)
    model = random_model(cfg, "cpu", torch.float32, seed=1)
    return Engine.create(model, shape, "cpu", precision, mode=mode).infer(random_batch(shape, 3))


def test_static_engine_bf16_close() -> None:
    got, want = _small_model_actions("bfloat16", "static"), _small_model_actions("float32", "eager")
    assert np.abs(got - want).max() <= 0.1


def test_fallback_without_cuda_logs_once(small, caplog) -> None:
    cfg, model = small
    if torch.cuda.is_available():
        pytest.skip("the fallback is for machines without CUDA")
    shape = EngineShape.for_model(cfg)
    import pi0_policy_ros.engine.engine as engine_mod
    engine_mod._fallback_logged = False
    with caplog.at_level(logging.WARNING, logger="pi0_policy_ros.engine.engine"):
        first = Engine.create(model, shape, "cuda")
        Engine.create(model, shape, "cuda")
    assert first.mode == "eager"
    assert sum("eager reference" in r.message for r in caplog.records) == 1
    batch = random_batch(shape, 0)
    out = first.infer(batch)
    assert out.shape == (cfg.action_horizon, cfg.action_dim)
    assert "total" in first.last_timings_ms
    with pytest.raises(ConfigError):
        Engine.create(model, shape, "cpu", mode="graphs")


def test_the_cpu_asked_for_is_said_not_warned(small, caplog) -> None:
    # "CUDA is not available for device cpu" was a WARNING on every CPU run (the demo, a replay),
    # false on a GPU machine told to use the CPU, and read as a fault.
    cfg, model = small
    import pi0_policy_ros.engine.engine as engine_mod
    engine_mod._fallback_logged = False
    with caplog.at_level(logging.INFO, logger="pi0_policy_ros.engine.engine"):
        engine = Engine.create(model, EngineShape.for_model(cfg), "cpu")
    assert engine.mode == "eager" and not engine_mod._fallback_logged
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.INFO, "device cpu: the engine runs the eager reference model (its CUDA graphs and kernels need "
                       "a CUDA device)")]


def test_eager_asked_for_on_a_cuda_device_is_no_fallback(small, caplog, monkeypatch) -> None:
    cfg, model = small
    import pi0_policy_ros.engine.engine as engine_mod
    engine_mod._fallback_logged = False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # eager never touches the device
    with caplog.at_level(logging.WARNING, logger="pi0_policy_ros.engine.engine"):
        engine = Engine.create(model, EngineShape.for_model(cfg), "cuda", mode="eager")
    assert engine.mode == "eager" and not caplog.records and not engine_mod._fallback_logged


@pytest.mark.parametrize("hw", [(224, 224), (480, 640), (120, 160), (7, 13), (300, 224), (224, 500), (50, 224)])
def test_engine_resize_equals_the_policys_cpu_resize_exactly(hw: tuple[int, int]) -> None:
    """The engine's resize-with-pad (int32 taps, any torch device) gives the very pixels of the
    policy's numpy resize (PIL-exact, test_resize.py) followed by the identity preprocessing:
    shrinking, enlarging, one axis unchanged (PIL skips that pass), padding either way."""
    images = np.random.default_rng(sum(hw)).integers(0, 256, (3,) + hw + (3,), dtype=np.uint8)
    resized_on_cpu = torch.from_numpy(np.stack([resize_with_pad(image) for image in images]))
    want = preprocess_images(resized_on_cpu, plan_resize((224, 224), 224))
    torch.testing.assert_close(want, resized_on_cpu.permute(0, 3, 1, 2).float() / 255.0 * 2.0 - 1.0)
    preprocess = ImagePreprocessor(plan_resize(hw, 224), "cpu")
    out = torch.full((3, 3, 224, 224), 7.0)
    assert preprocess(torch.from_numpy(images), out) is out
    assert torch.equal(out, want)
    # The tables are reused: new frames into the same buffer give the new frames' pixels.
    assert torch.equal(preprocess(torch.from_numpy(images[::-1].copy()), out), want.flip(0))


def test_resize_plan_pads_black_and_refuses_a_too_thin_camera() -> None:
    plan = plan_resize((120, 160), 224)  # 4:3 → 224 × 168, centred with 28 black rows each side
    assert plan.dst_hw == (168, 224) and plan.offset_yx == (28, 0)
    out = preprocess_images(torch.full((1, 120, 160, 3), 200, dtype=torch.uint8), plan)
    assert torch.all(out[:, :, :28] == -1) and torch.all(out[:, :, 196:] == -1)
    torch.testing.assert_close(out[:, :, 28:196], torch.full_like(out[:, :, 28:196], 200 / 255 * 2 - 1))
    with pytest.raises(ConfigError, match=r"camera images of 1000x3 \(HxW\).*too thin"):
        plan_resize((1000, 3), 224)


def test_fp8_quantization_round_trip() -> None:
    w = torch.randn(64, 32)
    lin = to_fp8(Linear(w))
    deq = lin.weight.float() * lin.scale.t()
    assert (deq - w).abs().max() <= 0.07 * w.abs().max()
    x = torch.randn(5, 32)
    q, s = quantize_rows(x)
    assert (q.float() * s - x).abs().max() <= 0.07 * x.abs().max()


def test_fp8_scales_are_per_output_channel_and_per_token() -> None:
    """Weights scale per output channel (a row of W), activations per token (a row of x): a row of
    tiny values keeps its own relative precision next to rows 10⁷ times larger, and each row's
    largest value lands on the e4m3 maximum."""
    rows = torch.logspace(-6, 1, 8)[:, None]
    w, x = torch.randn(8, 32) * rows, torch.randn(8, 32) * rows
    lin = to_fp8(Linear(w))
    q, s = quantize_rows(x)
    assert lin.scale.shape == (1, 8) and s.shape == (8, 1)
    for quantized, scale, original in ((lin.weight, lin.scale.t(), w), (q, s, x)):
        assert torch.equal(quantized.float().abs().amax(dim=1), torch.full((8,), 448.0))
        error = (quantized.float() * scale - original).abs().amax(dim=1) / original.abs().amax(dim=1)
        assert error.max() <= 0.07, error


def test_static_engine_fp8_close() -> None:
    """The FP8 prefix MLP (per-token e4m3 activations, `torch._scaled_mm`) runs on the CPU too: near
    the float32 model, and really quantized."""
    got, want = _small_model_actions("fp8", "static"), _small_model_actions("float32", "eager")
    bf16 = _small_model_actions("bfloat16", "static")
    assert np.abs(got - want).max() <= 0.1
    assert np.abs(got - bf16).max() > 1e-3  # not the bf16 engine


def test_host_load_copies_the_computed_images_in_slot_order() -> None:
    """Only the images vision computes travel (valid slots first); every mask is copied, in order."""
    from pi0_policy_ros.engine.buffers import allocate_host
    shape = EngineShape.for_model(get_preset("pi05"))
    batch = random_batch(shape, 0, valid_slots=3)
    batch.image_masks = np.array([True, False, True])
    rows, order = plan_prefix(shape, batch.image_masks, batch.token_mask)
    host = allocate_host(shape, pin=False)
    host.load(batch, order, rows.slots)
    assert order == [0, 2, 1] and rows.slots == 2
    np.testing.assert_array_equal(host.images[:2].numpy(), batch.images[[0, 2]])
    assert not host.images[2].any()  # the invalid slot's image stays where it was (zeros here)
    np.testing.assert_array_equal(host.image_masks.numpy(), [True, True, False])
    host.load(batch, order)  # no slot count: every image
    np.testing.assert_array_equal(host.images[2].numpy(), batch.images[1])


def test_upload_moves_every_input_and_the_computed_images_in_one_copy() -> None:
    """Host and device share one slab layout: after one upload of `slots` images every input view
    on the device equals the host's, the skipped slots' images stay as they were, and no two
    inputs overlap."""
    from pi0_policy_ros.engine.buffers import SlabLayout, allocate_device, allocate_host, upload
    cfg = get_preset("pi05")
    shape = EngineShape.for_model(cfg, num_slots=3, image_hw=(30, 40))
    host = allocate_host(shape, pin=False)
    dev = allocate_device(shape, cfg.paligemma, cfg.expert.width, torch.float32, torch.device("cpu"))
    batch = random_batch(shape, 3, valid_slots=2, valid_tokens=7)
    rows, order = plan_prefix(shape, batch.image_masks, batch.token_mask)
    host.load(batch, order, rows.slots)
    dev.images.fill_(77)
    upload(host, dev, rows.slots)
    for name in ("image_masks", "tokens", "token_mask", "state"):
        torch.testing.assert_close(getattr(dev, name), getattr(host, name), rtol=0, atol=0)
    torch.testing.assert_close(dev.x[0], torch.from_numpy(batch.noise), rtol=0, atol=0)
    np.testing.assert_array_equal(dev.images[:2].numpy(), batch.images[:2])
    assert (dev.images[2] == 77).all()  # the slot vision skips was not copied
    layout = SlabLayout.for_shape(shape)
    spans = sorted((off, off + int(np.prod(size)) * dtype.itemsize) for off, size, dtype in layout.fields.values())
    assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans))
    assert layout.copied_bytes(rows.slots) == layout.nbytes - 30 * 40 * 3
    upload(host, dev)  # no slot count: every image
    np.testing.assert_array_equal(dev.images[2].numpy(), host.images[2].numpy())


def test_fp8_prefix_quantizes_the_mlp_only() -> None:
    """`precision="fp8"`: gate_up (fast accumulation) and down in e4m3; qkv and out stay in the
    compute dtype (FP8 measured slower for them, notes attempt 21); the KV-only last layer too."""
    from pi0_policy_ros.engine.weights import fuse_prefix
    model = random_model(get_preset("pi05_small"), "cpu", torch.float32, seed=1)
    layers = fuse_prefix(model, torch.bfloat16, torch.device("cpu"), fp8=True).layers
    for lw in layers[:-1]:
        assert lw.qkv.scale is None and lw.qkv.weight.dtype == torch.bfloat16
        assert lw.out.scale is None and lw.out.weight.dtype == torch.bfloat16
        assert lw.gate_up.weight.dtype == torch.float8_e4m3fn and lw.gate_up.fast_accum
        assert lw.down.weight.dtype == torch.float8_e4m3fn and not lw.down.fast_accum
    assert layers[-1].qkv.scale is None and layers[-1].gate_up is None


@pytest.mark.parametrize("precision, capability, name, fallback", [
    ("fp8", (8, 7), "Orin", "bfloat16"),  # Jetson Orin: bf16 tensor cores, no FP8
    ("fp8", (8, 6), "NVIDIA GeForce RTX 3090", "bfloat16"),
    ("bfloat16", (7, 5), "Tesla T4", "float32"),
    ("fp8", (7, 2), "Xavier", "float32"),
])
def test_precision_the_gpu_cannot_run_is_refused(precision, capability, name, fallback) -> None:
    need = {"fp8": "8.9", "bfloat16": "8.0"}[precision]
    with pytest.raises(ConfigError, match=rf"precision '{precision}' needs a GPU of compute capability {need} or "
                                          rf"newer; {name} is {capability[0]}.{capability[1]}: use precision "
                                          rf"'{fallback}'"):
        check_precision_on_gpu(precision, capability, name)


@pytest.mark.parametrize("precision, capability", [("fp8", (8, 9)), ("fp8", (9, 0)), ("bfloat16", (8, 0)),
                                                   ("bfloat16", (8, 7)), ("float32", (7, 0)), ("fp8", (12, 0))])
def test_precision_the_gpu_can_run_passes(precision, capability) -> None:
    check_precision_on_gpu(precision, capability, "gpu")


def test_auto_denoise_kernels_without_triton_use_torch_and_say_so_once(monkeypatch, caplog) -> None:
    """NVIDIA's Jetson torch wheels ship without Triton: `auto` must not import it, `triton` must say
    what is missing. (`_want_triton` only reads the engine's device and dtype.)"""
    from types import SimpleNamespace

    from pi0_policy_ros.engine import engine as engine_module

    gpu_bf16 = SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16)
    monkeypatch.setattr(engine_module, "_no_triton_logged", False)
    monkeypatch.setattr(engine_module, "triton_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="pi0_policy_ros.engine.engine"):
        assert Engine._want_triton(gpu_bf16, "auto") is False
        assert Engine._want_triton(gpu_bf16, "auto") is False
    assert caplog.text.count("Triton is not installed") == 1
    with pytest.raises(ConfigError, match="denoise_kernels 'triton' needs Triton, which is not installed"):
        Engine._want_triton(gpu_bf16, "triton")
    assert Engine._want_triton(gpu_bf16, "torch") is False
    monkeypatch.setattr(engine_module, "triton_available", lambda: True)
    assert Engine._want_triton(gpu_bf16, "auto") is True
    assert Engine._want_triton(SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32), "auto") is False

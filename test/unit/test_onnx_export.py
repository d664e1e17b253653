"""ONNX export of the vision and prefix stages, checked with onnxruntime on the CPU; FP8 Q/DQ graphs;
the TensorRT pieces that need no GPU; backend selection without TensorRT."""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from pi0_policy_ros import atomic_write, export_cli  # noqa: E402
from pi0_policy_ros.engine import onnx_export as ox  # noqa: E402
from pi0_policy_ros.engine import tensorrt as trt_mod  # noqa: E402
from pi0_policy_ros.engine.backend import BackendChoice, resolve_backend, select_backend  # noqa: E402
from pi0_policy_ros.engine.types import EngineShape  # noqa: E402
from pi0_policy_ros.engine.weights import Linear, to_fp8  # noqa: E402
from pi0_policy_ros.errors import ConfigError  # noqa: E402
from pi0_policy_ros.model.checkpoint import read_safetensors  # noqa: E402
from pi0_policy_ros.model.config import IMAGE_SLOTS  # noqa: E402
from pi0_policy_ros.model.reference import Reference, load_reference, reference_model  # noqa: E402
from test.paths import PI0_FIXTURE, PI05_FIXTURE  # noqa: E402

SPEC_TOLERANCE = 1e-4  # float32 on the CPU (ARCHITECTURE.md)


class Exported:
    """One fixture's model and its fp32 stages, exported once per module."""

    def __init__(self, path: Path, out: Path) -> None:
        self.ref: Reference = load_reference(path)
        self.model = reference_model(self.ref)
        self.shape = EngineShape.for_model(self.model.cfg)
        self.stages = {s: ox.stage_module(self.model, s, self.shape, "fp32") for s in ox.STAGES}
        self.inputs = {s: ox.reference_inputs(self.ref, m.signature) for s, m in self.stages.items()}
        self.files = {s: ox.export_stage(m, out / f"{s}.fp32.onnx", "fp32", self.inputs[s])
                      for s, m in self.stages.items()}


@pytest.fixture(scope="module", params=[PI05_FIXTURE, PI0_FIXTURE], ids=["pi05_small", "pi0_small"])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    return Exported(request.param, tmp_path_factory.mktemp(request.param.stem))


@pytest.fixture(scope="module")
def pi05(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    return Exported(PI05_FIXTURE, tmp_path_factory.mktemp("pi05_base"))


# ---- graphs ---------------------------------------------------------------------------------------
def test_graphs_have_the_stage_names_and_static_shapes(exported: Exported) -> None:
    cfg = exported.model.cfg
    lm = cfg.paligemma
    n, t, pp = cfg.num_image_slots, 256, exported.shape.padded_prefix_len
    assert pp % 16 == 0 and pp >= cfg.prefix_len
    vision_in, vision_out = ox.graph_signature(onnx.load(str(exported.files["vision"].path)))
    assert vision_in == [("images", (n, 224, 224, 3), "uint8")]
    assert vision_out == [("image_embs", (n, t, lm.width), "float32")]
    prefix_in, prefix_out = ox.graph_signature(onnx.load(str(exported.files["prefix"].path)))
    assert prefix_in == [("image_embs", (n, t, lm.width), "float32"), ("image_masks", (n,), "bool"),
                         ("tokens", (cfg.max_token_len,), "int64"), ("token_mask", (cfg.max_token_len,), "bool")]
    kv = (1, lm.num_kv_heads, pp, lm.head_dim)
    want = [(f"{k}_{i}", kv, "float32") for i in range(lm.depth) for k in ("key", "value")]
    assert prefix_out == want + [("prefix_pad", (1, pp), "bool")]


@pytest.mark.parametrize("stage", ox.STAGES)
def test_graphs_pass_the_checker_and_strict_shape_inference(exported: Exported, stage: str) -> None:
    path = str(exported.files[stage].path)
    onnx.checker.check_model(path, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(onnx.load(path), strict_mode=True, data_prop=True)
    assert ox.graph_signature(inferred) == ox.graph_signature(onnx.load(path))


def test_a_graph_or_inputs_off_the_signature_are_refused(pi05: Exported) -> None:
    """`check_signature` compares names, static dims and dtypes; `cast_inputs` the input shapes."""
    import dataclasses

    proto = onnx.load(str(pi05.files["vision"].path))
    sig = pi05.stages["vision"].signature
    ox.check_signature(proto, sig)
    (out,) = sig.outputs
    for wrong in (dataclasses.replace(out, shape=(*out.shape[:-1], out.shape[-1] + 1)),
                  dataclasses.replace(out, dtype=torch.float16), dataclasses.replace(out, name="embs")):
        with pytest.raises(ox.ExportError, match="vision graph outputs: expected"):
            ox.check_signature(proto, dataclasses.replace(sig, outputs=(wrong,)))
    with pytest.raises(ox.ExportError, match="prefix graph inputs: expected"):
        ox.check_signature(proto, pi05.stages["prefix"].signature)
    images = pi05.inputs["vision"][0]
    with pytest.raises(ox.ExportError, match=r"vision input shapes: expected \[\(3, 224, 224, 3\)\], found"):
        ox.cast_inputs(sig, (images[:2],))


def test_fp8_check_still_needs_the_pad_mask_exact() -> None:
    """FP8 is judged by relative error, but a bool output (`prefix_pad`) that differs fails it."""
    def check(pad: list[bool]) -> ox.StageCheck:
        out = ox.StageCheck("prefix", "fp8", "prefix.fp8.onnx", 0, "torch fp32")
        return ox.compare_outputs(out, ["key_0", "prefix_pad"], [np.full((1, 4), 1.01, np.float32), np.array([pad])],
                                  [torch.ones(1, 4), torch.tensor([[True, False]])])
    assert check([True, False]).passed
    bad = check([True, True])
    assert bad.error == 1.0 and not bad.passed


@pytest.mark.parametrize("precision", ["fp32", "fp16", "fp8"])
def test_a_differing_pad_mask_fails_at_every_precision(precision: str) -> None:
    """fp16's limit is 1e-2 × max |reference|: with K/V values of 100 or more it reached the 1.0 a
    differing `prefix_pad` counts as, and a graph with a wrong mask passed."""
    def check(pad: list[bool]) -> ox.StageCheck:
        out = ox.StageCheck("prefix", precision, "prefix.onnx", 0, "torch fp32")
        keys = torch.tensor([[200.0, -3.0, 1.0, 0.5]])
        return ox.compare_outputs(out, ["key_0", "prefix_pad"], [keys.numpy(), np.array([pad])],
                                  [keys, torch.tensor([[True, False]])])
    assert check([True, False]).passed
    bad = check([True, True])
    assert not bad.passed and bad.line().endswith("(prefix_pad differs)")


@pytest.mark.parametrize("precision", ["fp32", "fp16", "fp8"])
def test_a_nan_in_any_output_fails_the_check(pi05: Exported, tmp_path: Path, precision: str) -> None:
    """A NaN in a later layer's K/V (fp16 overflow deep in the model) passed --verify as 'ok': the
    worst error was Python's max over the outputs, which drops a NaN that is not first."""
    file = pi05.files["prefix"]
    got = ox.run_onnxruntime(ox.onnxruntime_session(file.path), file.signature, pi05.inputs["prefix"])
    got[3] = np.full_like(got[3], np.nan)  # value_1
    with torch.no_grad():
        want = pi05.stages["prefix"](*pi05.inputs["prefix"])
    check = ox.compare_outputs(ox.StageCheck("prefix", precision, str(file.path), 0, "torch fp32"),
                               file.signature.output_names, got, want)
    assert not check.passed and "FAILED" in check.line()
    assert np.isnan(check.error)


def test_large_graphs_keep_their_weights_in_one_data_file(pi05: Exported, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Above EXTERNAL_DATA_BYTES the weights go to `<name>.onnx.data` next to the graph, found from
    any working directory; a later save below the limit removes it."""
    proto = onnx.load(str(pi05.files["vision"].path))
    path = tmp_path / "vision.fp32.onnx"
    monkeypatch.setattr(ox, "EXTERNAL_DATA_BYTES", 1000)
    ox.save_onnx(proto, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vision.fp32.onnx", "vision.fp32.onnx.data"]
    assert path.stat().st_size < 100_000 and ox.onnx_file_bytes(path) > 400_000
    monkeypatch.chdir(tmp_path.parent)
    sig = pi05.stages["vision"].signature
    got = ox.run_onnxruntime(ox.onnxruntime_session(path), sig, pi05.inputs["vision"])
    want = ox.run_onnxruntime(ox.onnxruntime_session(pi05.files["vision"].path), sig, pi05.inputs["vision"])
    assert np.array_equal(got[0], want[0])
    monkeypatch.setattr(ox, "EXTERNAL_DATA_BYTES", 10**12)
    ox.save_onnx(proto, path)
    assert [p.name for p in tmp_path.iterdir()] == ["vision.fp32.onnx"]


def test_a_data_file_gets_the_permissions_of_its_graph(pi05: Exported, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """onnx made `.onnx.data` 0600 whatever the umask, beside a 0644 graph: exported by one user (a
    build container, sudo), the weights could not be read by trtexec run as another."""
    monkeypatch.setattr(ox, "EXTERNAL_DATA_BYTES", 1000)
    path = tmp_path / "vision.fp32.onnx"
    old = os.umask(0o022)
    try:
        ox.save_onnx(onnx.load(str(pi05.files["vision"].path)), path)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"vision.fp32.onnx": 0o644, "vision.fp32.onnx.data": 0o644}


def _disk_full(proto: object, f: str, *args: object, **kwargs: object) -> None:
    Path(f).write_bytes(b"\x08\x09 the first bytes of a graph")
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("external", [False, True])
def test_a_failed_save_leaves_no_truncated_graph(pi05: Exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 external: bool) -> None:
    """A save that fails half way (disk full, Ctrl-C) used to leave a truncated graph under the
    final name, which trtexec or onnxruntime then fail on far from the cause. Now nothing is left:
    not the partial file, not the earlier export's graph or `.data`, no temporary files."""
    proto = onnx.load(str(pi05.files["vision"].path))
    path = tmp_path / "vision.fp32.onnx"
    monkeypatch.setattr(ox, "EXTERNAL_DATA_BYTES", 1000 if external else ox.EXTERNAL_DATA_BYTES)
    ox.save_onnx(proto, path)  # the earlier export
    monkeypatch.setattr(onnx, "save_model", _disk_full)
    with pytest.raises(OSError, match="No space left"):
        ox.save_onnx(proto, path)
    assert list(tmp_path.iterdir()) == []


# ---- fp32 -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", ox.STAGES)
def test_fp32_onnxruntime_matches_torch(exported: Exported, stage: str) -> None:
    check = ox.verify_stage(exported.files[stage], exported.stages[stage], exported.inputs[stage])
    assert check.worst_abs <= SPEC_TOLERANCE, check.as_dict()
    assert check.passed


def test_fp32_onnxruntime_matches_openpi(exported: Exported) -> None:
    """The exported graphs compute what openpi computed: image tokens and layer 0's prefix K/V."""
    tensors, _ = read_safetensors(exported.ref.path)
    vision, prefix = exported.files["vision"], exported.files["prefix"]
    got = ox.run_onnxruntime(ox.onnxruntime_session(vision.path), vision.signature, exported.inputs["vision"])[0]
    want = torch.cat([tensors[f"intermediate/image_emb.{s}"] for s in IMAGE_SLOTS])
    assert np.abs(got - want.numpy()).max() <= SPEC_TOLERANCE
    outs = ox.run_onnxruntime(ox.onnxruntime_session(prefix.path), prefix.signature, exported.inputs["prefix"])
    p = exported.model.cfg.prefix_len
    for i, kind in enumerate(("key", "value")):
        want = tensors[f"intermediate/prefix_kv.layer0.{kind}"].numpy()
        assert np.abs(outs[i][:, :, :p] - want).max() <= SPEC_TOLERANCE
    pad = outs[-1][0]
    assert (pad[:p] == tensors["intermediate/prefix_pad_masks"][0].numpy()).all() and not pad[p:].any()


# ---- fp16 -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", ox.STAGES)
def test_fp16_is_within_tolerance_of_torch_fp32(pi05: Exported, stage: str, tmp_path: Path) -> None:
    module = ox.stage_module(pi05.model, stage, pi05.shape, "fp16")
    file = ox.export_stage(module, tmp_path / f"{stage}.onnx", "fp16", pi05.inputs[stage])
    assert file.signature.outputs[0].dtype == torch.float16
    check = ox.verify_stage(file, pi05.stages[stage], pi05.inputs[stage])
    assert check.passed, check.as_dict()
    assert 0 < check.worst_abs  # really fp16
    assert file.file_bytes < pi05.files[stage].file_bytes * 0.6


# ---- FP8 ------------------------------------------------------------------------------------------
def _linears_behind_qdq(proto: object) -> list[str]:
    """Names of MatMuls both of whose inputs come out of DequantizeLinear nodes."""
    producers = {out: node for node in proto.graph.node for out in node.output}
    return [node.name for node in proto.graph.node if node.op_type == "MatMul"
            and all(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in node.input)]


def test_fp8_qdq_graph_computes_the_fake_quant_reference(pi05: Exported, tmp_path: Path) -> None:
    """An fp32-based FP8 graph: onnxruntime runs the Q/DQ arithmetic, torch fake-quant predicts it."""
    module = ox.stage_module(pi05.model, "prefix", pi05.shape, "fp8", dtype=torch.float32)
    inputs = pi05.inputs["prefix"]
    file = ox.export_stage(module, tmp_path / "prefix.fp8.onnx", "fp8", inputs)
    proto = onnx.load(str(file.path))
    depth = pi05.model.cfg.paligemma.depth
    # every layer's 7 linears, except the last layer's, of which only k and v feed the cache
    assert len(_linears_behind_qdq(proto)) == 7 * (depth - 1) + 2
    weight_q = [n for n in proto.graph.node if n.op_type == "QuantizeLinear" and ".weight_fp8" in n.name]
    assert len(weight_q) == 7 * (depth - 1) + 2
    inits = {t.name: t for t in proto.graph.initializer}
    for node in weight_q:
        weight, scale, zero = (inits[i] for i in node.input)
        assert [a.i for a in node.attribute if a.name == "axis"] == [1]  # per output channel of [K, N]
        assert list(scale.dims) == [weight.dims[1]] and zero.data_type == onnx.TensorProto.FLOAT8E4M3FN
    plan = trt_mod.calibrate_fp8(module, [inputs])
    # Every linear on its own: the same quantized operands give the same product.
    per_linear = trt_mod.check_fp8_linears(file.path, module, plan, inputs)
    assert len(per_linear) == 7 * (depth - 1) + 2 and max(per_linear.values()) <= 1e-6, per_linear
    # End to end, the first layer's K/V (nothing upstream to round differently) match exactly.
    got = ox.run_onnxruntime(ox.onnxruntime_session(file.path, fp8=True), file.signature, inputs)
    with torch.no_grad():
        before = module(*inputs)
        with trt_mod.fp8_fake_quant(module, plan):
            want = module(*inputs)
        after = module(*inputs)
    for i in (0, 1):  # key_0, value_0
        assert np.abs(got[i] - want[i].numpy()).max() <= SPEC_TOLERANCE
        assert np.abs(got[i] - before[i].numpy()).max() > 100 * SPEC_TOLERANCE  # quantized for real
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # fake quant leaves the stage as it was
    assert trt_mod.has_fp8_qdq(proto)


def test_fp8_graph_on_fp16_runs_within_sanity_bound(pi05: Exported, tmp_path: Path) -> None:
    module = ox.stage_module(pi05.model, "prefix", pi05.shape, "fp8")
    file = ox.export_stage(module, tmp_path / "prefix.fp8.onnx", "fp8", pi05.inputs["prefix"])
    proto = onnx.load(str(file.path))
    scales = [t for t in proto.graph.initializer if t.name.endswith("_fp8.scale")]
    assert scales and all(t.data_type == onnx.TensorProto.FLOAT16 for t in scales)
    check = ox.verify_stage(file, pi05.stages["prefix"], pi05.inputs["prefix"])
    assert check.passed, check.as_dict()
    assert 0.005 < check.worst_rel  # quantized for real


def test_fp8_weight_rounding_matches_the_engine_torch_path() -> None:
    w = torch.randn(48, 32) * torch.logspace(-3, 1, 48)[:, None]
    engine = to_fp8(Linear(w))
    dequantized = engine.weight.float() * engine.scale[0][:, None]
    scale = trt_mod.fp8_scale(w.abs().amax(dim=1), torch.float32)
    assert torch.equal(trt_mod.fake_quant(w, scale[:, None]), dequantized)


def test_fp8_rejects_a_linear_it_did_not_calibrate(pi05: Exported) -> None:
    module = ox.stage_module(pi05.model, "prefix", pi05.shape, "fp8", dtype=torch.float32)
    proto = ox.trace_to_onnx(module, pi05.inputs["prefix"])
    plan = trt_mod.calibrate_fp8(module, [pi05.inputs["prefix"]])
    partial = trt_mod.Fp8Plan(plan.scales, dict(list(plan.fingerprints.items())[1:]))
    with pytest.raises(ox.ExportError, match="not in the FP8 plan"):
        trt_mod.insert_fp8_qdq(proto, partial)


# ---- CLI ------------------------------------------------------------------------------------------
def test_cli_exports_and_verifies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = export_cli.main(["--reference", str(PI0_FIXTURE), "--out", str(tmp_path), "--stages", "vision",
                            "--verify"])
    assert code == 0
    report = json.loads((tmp_path / "export.json").read_text())
    assert report["stages"]["vision"]["check"]["passed"]
    assert (tmp_path / "vision.fp32.onnx").exists() and "vision" in capsys.readouterr().out


def test_cli_report_has_the_graphs_signatures(tmp_path: Path) -> None:
    """export.json's "outputs" were names only: README promises input and output signatures, and a
    TensorRT user binds each output by its shape and dtype."""
    assert export_cli.main(["--reference", str(PI05_FIXTURE), "--out", str(tmp_path), "--precision", "fp16"]) == 0
    report = json.loads((tmp_path / "export.json").read_text())
    for name, entry in report["stages"].items():
        graph = ox.graph_signature(onnx.load(entry["path"]))
        for kind, values in zip(("inputs", "outputs"), graph):
            found = [(n, tuple(shape), dtype.removeprefix("torch.")) for n, shape, dtype in entry[kind]]
            assert found == values, (name, kind)


def test_cli_report_names_every_file_it_wrote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A graph with external data had only its .onnx in export.json, with the pair's size: a copy
    made from the report left the weights behind."""
    monkeypatch.setattr(ox, "EXTERNAL_DATA_BYTES", 1_000_000)  # the prefix's weights go out, vision's stay in
    assert export_cli.main(["--reference", str(PI0_FIXTURE), "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "export.json").read_text())
    listed = [Path(e[key]) for e in report["stages"].values() for key in ("path", "data_path") if key in e]
    assert sorted(p.name for p in listed) == sorted(p.name for p in tmp_path.iterdir() if p.name != "export.json")
    assert "data_path" in report["stages"]["prefix"] and "data_path" not in report["stages"]["vision"]
    for entry in report["stages"].values():
        assert entry["file_bytes"] == sum(Path(entry[k]).stat().st_size for k in ("path", "data_path") if k in entry)


def test_cli_fp8_file_names_are_the_readmes(tmp_path: Path) -> None:
    """`--precision fp8` exports an fp16 vision graph and an FP8 Q/DQ prefix graph (README, ONNX section)."""
    assert export_cli.main(["--reference", str(PI0_FIXTURE), "--out", str(tmp_path), "--precision", "fp8"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export.json", "prefix.fp8.onnx", "vision.fp16.onnx"]


def test_cli_fp16_verify_prints_only_its_lines(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """onnxruntime's own warnings (six colored "Could not find a CPU kernel and hence can't constant
    fold Sqrt node" lines for the fp16 prefix) went to the terminal between the report's lines."""
    argv = ["--reference", str(PI0_FIXTURE), "--out", str(tmp_path), "--stages", "prefix", "--precision", "fp16",
            "--verify"]
    assert export_cli.main(argv) == 0
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out.startswith("prefix  fp16") and captured.out.count("\n") == 1


def _fail_on_prefix(export_stage: Any, stage: Any, *args: Any) -> ox.ExportedStage:
    if stage.signature.stage == "prefix":
        raise ox.ExportError("prefix export failed")
    return export_stage(stage, *args)


def test_cli_failed_export_leaves_no_earlier_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A re-export that failed half way left the earlier run's export.json (its files, errors and
    'passed') beside a vision graph it had already replaced."""
    argv = ["--reference", str(PI0_FIXTURE), "--out", str(tmp_path), "--verify"]
    assert export_cli.main(argv) == 0 and (tmp_path / "export.json").exists()
    monkeypatch.setattr(ox, "export_stage", functools.partial(_fail_on_prefix, ox.export_stage))
    assert export_cli.main(argv) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prefix.fp32.onnx", "vision.fp32.onnx"]


def _interrupted(args: Any) -> Any:
    raise KeyboardInterrupt  # Ctrl-C while the model loads


def test_cli_interrupted_before_any_file_leaves_no_empty_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The --out directory it had just made was left behind, empty (a bad preset already removed it).
    monkeypatch.setattr(export_cli, "_load_model", _interrupted)
    out = tmp_path / "export"
    with pytest.raises(KeyboardInterrupt):
        export_cli.main(["--reference", str(PI0_FIXTURE), "--out", str(out)])
    assert not out.exists()
    out.mkdir()  # one that was there before stays
    with pytest.raises(KeyboardInterrupt):
        export_cli.main(["--reference", str(PI0_FIXTURE), "--out", str(out)])
    assert out.is_dir()


def test_cli_rejects_unknown_stage(tmp_path: Path) -> None:
    assert export_cli.main(["--reference", str(PI0_FIXTURE), "--out", str(tmp_path), "--stages", "denoise"]) == 2


# ---- TensorRT pieces without a GPU ----------------------------------------------------------------
def test_engine_key_changes_with_every_field(tmp_path: Path) -> None:
    key = trt_mod.EngineKey("prefix", "fp8", "abc", "NVIDIA H100", "9.0", "10.3.0", "[]", "pi0_policy_ros 0.1.0",
                            "2.7.1", "example inputs")
    changed = [trt_mod.EngineKey(**{**vars(key), name: "x"}) for name in vars(key)]
    assert len({key.digest, *(k.digest for k in changed)}) == 1 + len(changed)
    cache = trt_mod.EngineCache(tmp_path)
    assert cache.load(key) is None
    path = cache.store(key, b"engine bytes")
    assert cache.load(key) == b"engine bytes" and json.loads(path.with_suffix(".json").read_text())["gpu_name"]
    assert "H100" in cache.timing_cache_path(key).name


def _replace_on_a_full_disk(src: str, dst: str) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_cache_write_leaves_no_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An engine that could not be stored used to leave its bytes behind in a hidden temporary file
    (gigabytes for a full-size prefix), one more per retry, in the cache directory."""
    key = trt_mod.EngineKey("prefix", "fp16", "abc", "NVIDIA H100", "9.0", "10.3.0", "[]", "pi0_policy_ros 0.1.0",
                            "2.7.1", "example inputs")
    cache = trt_mod.EngineCache(tmp_path)
    monkeypatch.setattr(atomic_write.os, "replace", _replace_on_a_full_disk)
    with pytest.raises(OSError, match="No space left"):
        cache.store(key, b"engine bytes")
    assert list(tmp_path.iterdir()) == [] and cache.load(key) is None


def test_cache_files_get_the_permissions_of_a_plain_write(tmp_path: Path) -> None:
    """The atomic write made its files with mkstemp, which are 0600 whatever the umask: an engine
    cache built by one user (a setup script, sudo) could not be read by the node's user."""
    key = trt_mod.EngineKey("prefix", "fp16", "abc", "NVIDIA H100", "9.0", "10.3.0", "[]", "pi0_policy_ros 0.1.0",
                            "2.7.1", "example inputs")
    old = os.umask(0o022)
    try:
        path = trt_mod.EngineCache(tmp_path).store(key, b"engine bytes")
        (tmp_path / "plain").write_bytes(b"")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (path, path.with_suffix(".json"), tmp_path / "plain")}
    assert set(modes.values()) == {0o644}, modes
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(modes)  # no temporary file left


def test_calibration_digest_follows_the_calibration_data() -> None:
    batch = [torch.zeros(2, 3), torch.ones(4, dtype=torch.int64)]
    digest = trt_mod.calibration_digest([batch])
    assert digest == trt_mod.calibration_digest([[t.clone() for t in batch]])
    assert digest != trt_mod.calibration_digest([[torch.zeros(2, 3), torch.full((4,), 2, dtype=torch.int64)]])
    assert digest != trt_mod.calibration_digest([[torch.zeros(3, 2), batch[1]]])  # same bytes, other shape
    assert digest != trt_mod.calibration_digest([batch, batch])
    assert trt_mod.calibration_digest(None) == "example inputs"


def test_kv_cache_bindings_write_into_the_engine_cache() -> None:
    keys, values = torch.zeros(3, 20, 4), torch.zeros(3, 20, 4)
    views = trt_mod.kv_cache_bindings(keys, values, 16)
    assert views["key_2"].shape == (1, 1, 16, 4) and len(views) == 6
    views["key_1"].fill_(1.0)
    views["value_2"].fill_(2.0)
    assert keys[1, :16].eq(1).all() and keys[1, 16:].eq(0).all() and values[2, :16].eq(2).all()


# ---- backend selection ----------------------------------------------------------------------------
def test_auto_falls_back_to_torch_without_tensorrt(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="pi0_policy_ros.engine.backend"):
        choice = resolve_backend("auto", "cuda", check=None, tensorrt_version=None)
    assert choice.name == "torch" and "not installed" in choice.reason
    assert len([r for r in caplog.records if r.name == "pi0_policy_ros.engine.backend"]) == 1
    assert caplog.records[-1].levelno == logging.WARNING


def test_auto_without_tensorrt_here() -> None:
    if trt_mod.tensorrt_version() is not None:
        pytest.skip("TensorRT is installed here")
    assert select_backend("auto", "cuda").name == "torch"
    assert select_backend("auto", "cpu", tensorrt_version="10.3.0").name == "torch"


def test_explicit_backends() -> None:
    torch_choice = BackendChoice("torch", "backend 'torch' requested")
    assert select_backend("torch", "cuda", tensorrt_version="10.3.0") == torch_choice
    assert select_backend("tensorrt", "cuda:0", tensorrt_version="10.3.0").name == "tensorrt"
    with pytest.raises(ConfigError, match="not installed"):
        select_backend("tensorrt", "cuda", tensorrt_version=None)
    with pytest.raises(ConfigError, match="older"):
        select_backend("tensorrt", "cuda", tensorrt_version="8.6.1")
    with pytest.raises(ConfigError, match="one of"):
        select_backend("onnx", "cuda")


def _failing_check() -> trt_mod.EngineCheck:
    raise RuntimeError("parser error: unsupported node")


def test_tensorrt_failure_at_configure_falls_back_or_fails_cleanly() -> None:
    choice = resolve_backend("auto", "cuda", check=_failing_check, tensorrt_version="10.3.0")
    assert choice.name == "torch" and "unsupported node" in choice.reason
    with pytest.raises(ConfigError, match="unsupported node"):
        resolve_backend("tensorrt", "cuda", check=_failing_check, tensorrt_version="10.3.0")
    nan = trt_mod.EngineCheck(float("nan"), 0.02)
    assert resolve_backend("auto", "cuda", check=lambda: nan, tensorrt_version="10.3.0").name == "torch"
    good = trt_mod.EngineCheck(0.004, 0.02, "vision 0.004")
    assert resolve_backend("auto", "cuda", check=lambda: good, tensorrt_version="10.3.0").name == "tensorrt"


@pytest.mark.parametrize("precision", ["fp16", "fp8"])
def test_building_an_engine_without_tensorrt_says_so(pi05: Exported, tmp_path: Path, precision: str) -> None:
    """For FP8 the GPU's FP8 support was checked first, which without CUDA failed with torch's bare
    AssertionError ("Torch not compiled with CUDA enabled") instead of naming the missing TensorRT."""
    if trt_mod.tensorrt_version() is not None:
        pytest.skip("TensorRT is installed here")
    stage = ox.stage_module(pi05.model, "prefix", pi05.shape, precision)
    with pytest.raises(trt_mod.TensorRTError, match=r"^TensorRT is not installed \(import tensorrt failed\)$"):
        trt_mod.ensure_engine(stage, precision, trt_mod.EngineCache(tmp_path / "cache"), "abc")
    assert not (tmp_path / "cache").exists()

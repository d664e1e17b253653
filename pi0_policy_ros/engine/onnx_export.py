"""ONNX export of the vision and prefix stages, and their check against torch with onnxruntime.

A stage is any `nn.Module` with a `signature` (`StageSignature`: input and output names, static
shapes and dtypes) whose `forward` takes the inputs and returns a tuple of the outputs, both in
signature order (`ExportableStage`). The two modules here wrap the eager `Pi0Model`; a module
over the engine's fused stages exports the same way when it has the same signature.

Signatures (batch 1, shapes from `EngineShape`; N camera slots, T = 256 tokens per image, S = 224,
D the PaliGemma width, L the prompt length, Pp the prefix padded to `PREFIX_ALIGN` rows exactly as
the engine pads it):
- vision: `images` uint8 [N, S, S, 3] (or `pixels` [N, 3, S, S] in [-1, 1]) → `image_embs` [N, T, D]
- prefix: `image_embs` [N, T, D], `image_masks` bool [N], `tokens` int64 [L], `token_mask` bool [L]
  → `key_{i}`, `value_{i}` [1, nkv, Pp, hd] for every layer i, then `prefix_pad` bool [1, Pp].
  Rows [P, Pp) are masked padding: `prefix_pad` is False there and no valid output reads them.

Export goes through torch's TorchScript exporter (`dynamo=False`): it needs no onnxscript and
keeps the traced shapes static. Opset 19 is the first with FP8 Q/DQ (`tensorrt.insert_fp8_qdq`).
"""

from __future__ import annotations

import os
import stat
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from pi0_policy_ros.engine.types import EngineShape
from pi0_policy_ros.errors import Pi0PolicyError
from pi0_policy_ros.model.config import IMAGE_SLOTS
from pi0_policy_ros.model.pi0 import ModelInputs, Pi0Model
from pi0_policy_ros.model.reference import Reference

OPSET = 19
# Above this many bytes of weights a graph is saved with one external data file next to it
# (protobuf cannot serialize a model over 2 GB).
EXTERNAL_DATA_BYTES = 1_500_000_000
PRECISIONS = ("fp32", "fp16", "fp8")
STAGES = ("vision", "prefix")
IMAGE_INPUTS = ("uint8", "float")
# The graph dtype per precision. FP8 only adds Q/DQ nodes to the prefix's linear layers of an fp16
# graph; the vision stage of an FP8 engine is plain fp16 (`stage_precision`).
STAGE_DTYPE = {"fp32": torch.float32, "fp16": torch.float16, "fp8": torch.float16}
# Bounds on the error against torch fp32, each on its own measure (`StageCheck.error`):
# - fp32: max abs error, absolute: the spec (1e-4 on the fixtures, ARCHITECTURE.md);
# - fp16: max abs error as a fraction of max(1, max |reference|); the fixtures measure about 1e-3;
# - fp8: the worst output's ‖onnx − torch‖ / ‖torch‖, a sanity bound: the fixtures measure 4-9 %,
#   growing with depth. The exact check of an FP8 graph is against torch fake-quant arithmetic
#   (`tensorrt.fp8_fake_quant`), which the unit tests run on an fp32-based FP8 graph.
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "fp8": 0.15}


class ExportError(Pi0PolicyError):
    """An export was asked for something unsupported, or its graph lacks the signature it must have."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class StageSignature:
    """What one stage consumes and produces; every shape is static."""

    stage: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.outputs]


class ExportableStage(Protocol):
    """An `nn.Module` with a signature. `quantizable_linears` names the linear layers that FP8
    puts behind Q/DQ nodes (none for the vision stage)."""

    signature: StageSignature

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]: ...

    def quantizable_linears(self) -> dict[str, nn.Linear]: ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...


def vision_signature(width: int, shape: EngineShape, dtype: torch.dtype, image_input: str = "uint8") -> StageSignature:
    n, s = shape.num_slots, shape.model_image_size
    if image_input == "uint8":
        images = TensorSpec("images", (n, s, s, 3), torch.uint8)
    elif image_input == "float":
        images = TensorSpec("pixels", (n, 3, s, s), dtype)
    else:
        raise ExportError(f"image_input must be one of {IMAGE_INPUTS}, found {image_input!r}")
    return StageSignature("vision", (images,), (TensorSpec("image_embs", (n, shape.tokens_per_image, width), dtype),))


def prefix_output_names(depth: int) -> list[str]:
    return [f"{kind}_{i}" for i in range(depth) for kind in ("key", "value")] + ["prefix_pad"]


def prefix_signature(model: Pi0Model, shape: EngineShape, dtype: torch.dtype) -> StageSignature:
    lm = model.cfg.paligemma
    n, pp = shape.num_slots, shape.padded_prefix_len
    inputs = (TensorSpec("image_embs", (n, shape.tokens_per_image, lm.width), dtype),
              TensorSpec("image_masks", (n,), torch.bool), TensorSpec("tokens", (shape.prompt_len,), torch.int64),
              TensorSpec("token_mask", (shape.prompt_len,), torch.bool))
    kv = (1, lm.num_kv_heads, pp, lm.head_dim)
    outputs = [TensorSpec(name, kv, dtype) for name in prefix_output_names(lm.depth)[:-1]]
    return StageSignature("prefix", inputs, (*outputs, TensorSpec("prefix_pad", (1, pp), torch.bool)))


def _stage_model(model: Pi0Model, dtype: torch.dtype, parts: tuple[str, ...]) -> Pi0Model:
    """A `Pi0Model` holding only `parts` (top-level children), in `dtype`. The others are None, so
    a stage never holds (or, in fp16, copies) the rest of the network. Tensors already in `dtype`
    are shared with `model`, not copied."""
    with torch.device("meta"):
        shell = Pi0Model(model.cfg)
    for name, _ in list(shell.named_children()):
        if name not in parts:
            setattr(shell, name, None)
    state = {k: v.detach().to(dtype) for k, v in model.state_dict().items() if k.split(".")[0] in parts}
    shell.load_state_dict(state, strict=True, assign=True)
    return shell.eval()


class VisionExportModule(nn.Module):
    """uint8 HWC images already at the model size (or [-1, 1] pixels) → projected image tokens."""

    def __init__(self, model: Pi0Model, shape: EngineShape, dtype: torch.dtype = torch.float32,
                 image_input: str = "uint8") -> None:
        super().__init__()
        self.signature = vision_signature(model.cfg.paligemma.width, shape, dtype, image_input)
        self.model = _stage_model(model, dtype, ("vision",))
        self.image_input = image_input

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor]:
        if self.image_input == "uint8":
            # x / 255 * 2 - 1 in float32, openpi's order (as engine/preprocess.py). Cast before the
            # transpose: TensorRT takes uint8 only at the input and in Cast.
            images = images.to(torch.float32).permute(0, 3, 1, 2) / 255.0 * 2.0 - 1.0  # [N, 3, S, S]
        return (self.model.embed_images(images).to(self.signature.outputs[0].dtype),)  # [N, T, D]

    def quantizable_linears(self) -> dict[str, nn.Linear]:
        return {}


class PrefixExportModule(nn.Module):
    """Image tokens, prompt and masks → every PaliGemma layer's K/V over the padded prefix."""

    def __init__(self, model: Pi0Model, shape: EngineShape, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        shape.check_model(model.cfg)
        self.signature = prefix_signature(model, shape, dtype)
        self.model = _stage_model(model, dtype, ("embed_tokens", "language_model"))
        self.padded_len = shape.padded_prefix_len

    def forward(self, image_embs: torch.Tensor, image_masks: torch.Tensor, tokens: torch.Tensor,
                token_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = image_embs.shape[0]
        # embed_prefix takes one [1] mask and one [1, T, D] embedding per slot; it ignores `state`.
        inputs = ModelInputs(images=[], image_masks=[image_masks[i:i + 1] for i in range(n)], tokens=tokens[None],
                             token_mask=token_mask[None], state=torch.empty(1, 0))
        embs, pad, _ = self.model.embed_prefix(inputs, image_embs=[image_embs[i:i + 1] for i in range(n)])
        rows = self.padded_len - embs.shape[1]
        embs = torch.cat((embs, embs.new_zeros(1, rows, embs.shape[2])), dim=1)  # [1, Pp, D]
        pad = torch.cat((pad, pad.new_zeros(1, rows)), dim=1)  # [1, Pp]
        prefix = self.model.forward_prefix(embs, pad)  # kv: per layer [1, nkv, Pp, hd]
        kv_dtype = self.signature.outputs[0].dtype
        return (*(t.to(kv_dtype) for layer in prefix.kv for t in layer), pad)

    def quantizable_linears(self) -> dict[str, nn.Linear]:
        return {name: m for name, m in self.model.language_model.named_modules() if isinstance(m, nn.Linear)}


def stage_precision(stage: str, precision: str) -> str:
    """What a stage is exported as at an engine precision: FP8 is for the prefix only."""
    return "fp16" if stage == "vision" and precision == "fp8" else precision


def stage_module(model: Pi0Model, stage: str, shape: EngineShape, precision: str, image_input: str = "uint8",
                 dtype: torch.dtype | None = None) -> nn.Module:
    """The export module of `stage` at `precision` (graph dtype `STAGE_DTYPE` unless `dtype`), in
    eval mode on the model's device."""
    if precision not in PRECISIONS:
        raise ExportError(f"precision must be one of {PRECISIONS}, found {precision!r}")
    dtype = STAGE_DTYPE[precision] if dtype is None else dtype
    if stage == "vision":
        return VisionExportModule(model, shape, dtype, image_input).eval()
    if stage == "prefix":
        return PrefixExportModule(model, shape, dtype).eval()
    raise ExportError(f"stage must be one of {STAGES}, found {stage!r}")


def stage_device(stage: ExportableStage) -> torch.device:
    return next(stage.parameters()).device


# ---- inputs ---------------------------------------------------------------------------------------
def random_inputs(signature: StageSignature, device: torch.device | str = "cpu", seed: int = 0,
                  vocab_rows: int = 1024) -> tuple[torch.Tensor, ...]:
    """Valid random inputs: any pixels, the last camera slot and all but 24 tokens masked, token
    ids below `vocab_rows` (the fixtures keep only the first 1024 embedding rows)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for spec in signature.inputs:
        if spec.dtype == torch.uint8:
            t = torch.randint(0, 256, spec.shape, generator=gen, dtype=torch.uint8)
        elif spec.dtype == torch.int64:
            t = torch.randint(0, vocab_rows, spec.shape, generator=gen, dtype=torch.int64)
        elif spec.dtype == torch.bool:
            valid = max(1, spec.shape[0] - 1) if spec.name == "image_masks" else min(spec.shape[0], 24)
            t = torch.arange(spec.shape[0]) < valid
        elif spec.name == "pixels":
            t = (torch.rand(spec.shape, generator=gen) * 2 - 1).to(spec.dtype)
        else:
            t = torch.randn(spec.shape, generator=gen).to(spec.dtype)
        out.append(t.to(device))
    return tuple(out)


def reference_inputs(ref: Reference, signature: StageSignature) -> tuple[torch.Tensor, ...]:
    """A fixture's own inputs for a stage: its uint8 (or [-1, 1]) images for vision; openpi's
    image embeddings, image masks and prompt for the prefix."""
    from pi0_policy_ros.model.checkpoint import read_safetensors

    tensors, _ = read_safetensors(ref.path)
    if signature.stage == "vision":
        if signature.inputs[0].name == "images":
            images = torch.cat([tensors[f"inputs/image_u8.{s}"] for s in IMAGE_SLOTS])  # [N, S, S, 3]
        else:
            images = torch.cat(ref.inputs.images)  # [N, 3, S, S]
        return cast_inputs(signature, (images,))
    embs = torch.cat([tensors[f"intermediate/image_emb.{s}"] for s in IMAGE_SLOTS])  # [N, T, D]
    masks = torch.cat(ref.inputs.image_masks)
    return cast_inputs(signature, (embs, masks, ref.inputs.tokens[0], ref.inputs.token_mask[0]))


def cast_inputs(signature: StageSignature, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """`inputs` in the signature's dtypes (an fp16 stage takes fp16 image tokens), shapes checked."""
    found = [tuple(t.shape) for t in inputs]
    want = [s.shape for s in signature.inputs]
    if found != want:
        raise ExportError(f"{signature.stage} input shapes: expected {want}, found {found}")
    return tuple(t.to(s.dtype) for s, t in zip(signature.inputs, inputs))


# ---- export ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExportedStage:
    stage: str
    precision: str
    path: Path
    file_bytes: int  # the .onnx file plus its external data file, if any
    signature: StageSignature


def data_path(path: Path) -> Path:
    """Where `save_onnx` puts the weights of a large graph."""
    return path.with_name(path.name + ".data")


def onnx_file_bytes(path: Path) -> int:
    data = data_path(path)
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def trace_to_onnx(stage: ExportableStage, inputs: Sequence[torch.Tensor], opset: int = OPSET) -> Any:
    """Trace a stage into an in-memory `onnx.ModelProto`, weights included."""
    import onnx

    signature = stage.signature
    with tempfile.TemporaryDirectory(prefix="pi0_onnx_") as tmp:
        raw = Path(tmp) / f"{signature.stage}.onnx"  # a graph over 2 GB gets one file per weight here
        with torch.no_grad(), warnings.catch_warnings():
            # The TorchScript exporter is deprecated in favour of the dynamo one, which needs onnxscript.
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*legacy TorchScript")
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            torch.onnx.export(stage, tuple(inputs), str(raw), input_names=signature.input_names,
                              output_names=signature.output_names, opset_version=opset, dynamo=False)
        return onnx.load(str(raw))


def save_onnx(proto: Any, path: Path) -> None:
    """Write `proto` to `path`; weights go to one `path.data` file when they are too big for one.

    A graph saved there before is removed first, both files (onnx appends to an existing `.data`),
    and not kept until the new one is in place: a full-size prefix is 10 GB, and twice that may not
    fit. The new files are written under temporary names and renamed into place, so a save that
    fails or is interrupted (disk full, Ctrl-C) leaves no truncated graph at `path`."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    data = data_path(path)
    path.unlink(missing_ok=True)
    data.unlink(missing_ok=True)
    weight_bytes = sum(len(t.raw_data) for t in proto.graph.initializer)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        staged = Path(tmp) / path.name
        if weight_bytes > EXTERNAL_DATA_BYTES:
            # the location is relative to the graph, so the pair keeps working after the rename
            onnx.save_model(proto, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data.name, size_threshold=1024)
            # onnx creates the data file 0600 whatever the umask: give it the graph's mode, or a
            # user who can read the graph (trtexec on the robot) cannot read its weights
            os.chmod(Path(tmp) / data.name, stat.S_IMODE(staged.stat().st_mode))
            os.replace(Path(tmp) / data.name, data)
        else:
            onnx.save_model(proto, str(staged))
        os.replace(staged, path)


GraphValue = tuple[str, tuple[Any, ...], str]  # (name, dims, numpy dtype name)


def _describe_values(values: Any) -> list[GraphValue]:
    from onnx import helper

    out = []
    for v in values:
        t = v.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim)
        out.append((v.name, dims, helper.tensor_dtype_to_np_dtype(t.elem_type).name))
    return out


def graph_signature(proto: Any) -> tuple[list[GraphValue], list[GraphValue]]:
    """(inputs, outputs) of a graph; a dynamic dim shows as its name (or '?')."""
    return _describe_values(proto.graph.input), _describe_values(proto.graph.output)


def check_signature(proto: Any, signature: StageSignature) -> None:
    """The graph's inputs and outputs are exactly the signature's, in order, all static."""
    found_in, found_out = graph_signature(proto)
    for kind, found, specs in (("inputs", found_in, signature.inputs), ("outputs", found_out, signature.outputs)):
        want = [(s.name, s.shape, str(s.dtype).removeprefix("torch.")) for s in specs]
        if found != want:
            raise ExportError(f"{signature.stage} graph {kind}: expected {want}, found {found}")


def export_stage(stage: ExportableStage, path: str | Path, precision: str,
                 example_inputs: Sequence[torch.Tensor] | None = None,
                 fp8_calibration: Sequence[Sequence[torch.Tensor]] | None = None) -> ExportedStage:
    """Export one stage to `path` (+ `path.data` for a large graph), checking its signature. With
    `precision="fp8"` the stage's quantizable linears get FP8 Q/DQ nodes, calibrated on
    `fp8_calibration` (default: the example inputs, themselves random by default)."""
    path = Path(path)
    signature = stage.signature
    if example_inputs is None:
        example_inputs = random_inputs(signature, stage_device(stage))
    inputs = cast_inputs(signature, example_inputs)
    proto = trace_to_onnx(stage, inputs)
    if precision == "fp8" and stage.quantizable_linears():
        from pi0_policy_ros.engine.tensorrt import calibrate_fp8, insert_fp8_qdq

        insert_fp8_qdq(proto, calibrate_fp8(stage, fp8_calibration or [inputs]))
    check_signature(proto, signature)
    save_onnx(proto, path)
    return ExportedStage(signature.stage, precision, path, onnx_file_bytes(path), signature)


# ---- verification ---------------------------------------------------------------------------------
def onnxruntime_session(path: str | Path, fp8: bool = False) -> Any:
    """A CPU session. FP8 graphs get basic optimizations only: the extended level fuses Q/DQ +
    MatMul into integer kernels that reject float8. Errors only: at warning level onnxruntime prints
    a line per fp16 node it cannot constant-fold on the CPU (harmless: the node just runs)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # ERROR
    if fp8:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnxruntime(session: Any, signature: StageSignature, inputs: Sequence[torch.Tensor]) -> list[np.ndarray]:
    feeds = {spec.name: t.detach().cpu().numpy() for spec, t in zip(signature.inputs, inputs)}
    return session.run(signature.output_names, feeds)


def worst_error(errors: Iterable[float]) -> float:
    """The largest error, NaN when any is NaN (0 for none). Python's `max` keeps a NaN only in
    first place: a NaN from a later output (fp16 overflow in a deep layer) read as the others' max."""
    values = list(errors)
    return float(np.max(values)) if values else 0.0


@dataclass
class StageCheck:
    """One exported file against torch: the worst output's errors and whether they pass."""

    stage: str
    precision: str
    path: str
    file_bytes: int
    reference: str  # what the ONNX outputs were compared with
    max_abs: dict[str, float] = field(default_factory=dict)  # per output; bool outputs: 1.0 if any differs
    rel: dict[str, float] = field(default_factory=dict)  # per float output: ‖onnx − ref‖ / ‖ref‖
    max_ref: float = 0.0  # max |reference| over the float outputs
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def worst_abs(self) -> float:
        return worst_error(self.max_abs.values())

    @property
    def worst_rel(self) -> float:
        return worst_error(self.rel.values())

    @property
    def limit(self) -> float:
        """The bound on `error` (see TOLERANCE)."""
        tol = TOLERANCE[self.precision]
        return tol * max(1.0, self.max_ref) if self.precision == "fp16" else tol

    @property
    def differing_masks(self) -> list[str]:
        """The bool outputs (`prefix_pad`) that differ anywhere."""
        return [k for k, v in self.max_abs.items() if k not in self.rel and v != 0]

    @property
    def error(self) -> float:
        """The measure the tolerance applies to: relative for fp8, max abs otherwise."""
        bool_mismatch = max((v for k, v in self.max_abs.items() if k not in self.rel), default=0.0)
        return max(self.worst_rel, bool_mismatch) if self.precision == "fp8" else self.worst_abs

    @property
    def passed(self) -> bool:
        # a mask must match exactly at every precision: fp16's limit scales with the values and
        # can exceed the 1.0 a differing mask counts as
        return bool(np.isfinite(self.error)) and self.error <= self.limit and not self.differing_masks

    def as_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "precision": self.precision, "path": self.path, "file_bytes": self.file_bytes,
                "reference": self.reference, "max_abs_error": self.worst_abs, "max_rel_error": self.worst_rel,
                "max_abs_reference": self.max_ref, "error_measure": "rel" if self.precision == "fp8" else "max_abs",
                "limit": self.limit, "passed": self.passed, "max_abs_error_per_output": self.max_abs,
                "seconds": self.seconds}

    def line(self) -> str:
        measure = "rel" if self.precision == "fp8" else "max abs"
        return (f"{self.stage:<7} {self.precision:<5} {self.file_bytes / 1e6:9.1f} MB  {measure} error "
                f"{self.error:.3g} (limit {self.limit:.3g}, vs {self.reference})  "
                f"{'ok' if self.passed else 'FAILED'}  {self.path}"
                + "".join(f"  ({name} differs)" for name in self.differing_masks))


def compare_outputs(check: StageCheck, names: Sequence[str], got: Sequence[np.ndarray],
                    expected: Sequence[torch.Tensor]) -> StageCheck:
    for name, a, b in zip(names, got, expected):
        ref = b.detach().cpu()
        onnx_out = torch.from_numpy(np.asarray(a))
        if ref.dtype == torch.bool:
            check.max_abs[name] = float((onnx_out != ref).any())
            continue
        ref, onnx_out = ref.double(), onnx_out.double()
        check.max_abs[name] = float((onnx_out - ref).abs().max())
        check.rel[name] = float((onnx_out - ref).norm() / ref.norm().clamp(min=1e-30))
        check.max_ref = max(check.max_ref, float(ref.abs().max()))
    return check


def verify_stage(exported: ExportedStage, reference: ExportableStage, inputs: Sequence[torch.Tensor],
                 reference_name: str = "torch fp32") -> StageCheck:
    """Run the exported file with onnxruntime on the CPU and compare it with `reference` (a stage
    with the same names, on any device) on the same inputs, each cast to its side's dtypes."""
    sig = exported.signature
    t0 = time.perf_counter()
    session = onnxruntime_session(exported.path, fp8=exported.precision == "fp8")
    t1 = time.perf_counter()
    got = run_onnxruntime(session, sig, cast_inputs(sig, inputs))
    t2 = time.perf_counter()
    device = stage_device(reference)
    with torch.no_grad():
        expected = reference(*(t.to(device) for t in cast_inputs(reference.signature, inputs)))
    check = StageCheck(sig.stage, exported.precision, str(exported.path), exported.file_bytes, reference_name,
                       seconds={"onnxruntime_load": t1 - t0, "onnxruntime_run": t2 - t1})
    return compare_outputs(check, sig.output_names, got, expected)

"""TensorRT: FP8 Q/DQ graphs, engine building and caching, and running an engine on static buffers.

Nothing here imports `tensorrt` at module level: `tensorrt_version()` is the one clean check, and
the FP8 Q/DQ rewrite works without it (it only edits the ONNX graph).

FP8 (explicit quantization, as the engine's torch FP8 path): every linear layer of the prefix gets
- its weight behind QuantizeLinear → DequantizeLinear, e4m3, one scale per output channel,
  `scale = amax / 448`;
- its input behind a per-tensor Q/DQ pair with a static scale from calibration. TensorRT only
  runs a GEMM in FP8 when *both* operands come out of DQ nodes; with weight-only Q/DQ it would
  dequantize the weights and run the GEMM in fp16, gaining nothing. The torch path quantizes
  activations per token on the fly, which a static TensorRT graph cannot express, so the two
  differ by that choice of activation scale.
TensorRT then folds each pair into the FP8 GEMM. onnxruntime (CPU) runs the same graph as
fake-quant arithmetic, which is how it is checked without TensorRT (`fp8_fake_quant`).

Engines are built as strongly typed networks (TensorRT ≥ 10): the precision is the ONNX graph's
(fp16 weights and activations, fp32 where the model computes in fp32, FP8 where Q/DQ say so).
The runtime path is not exercised by this repository's CI.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from pi0_policy_ros import __version__
from pi0_policy_ros.atomic_write import write_atomic
from pi0_policy_ros.engine.onnx_export import (STAGES, ExportableStage, ExportError, StageSignature, cast_inputs,
                                               export_stage, onnxruntime_session, random_inputs, save_onnx,
                                               stage_device, stage_module, stage_precision)
from pi0_policy_ros.engine.types import EngineShape
from pi0_policy_ros.engine.weights import FP8_MAX
from pi0_policy_ros.errors import ConfigError, Pi0PolicyError
from pi0_policy_ros.model.pi0 import Pi0Model

log = logging.getLogger(__name__)

MIN_TENSORRT = (10, 0)
# TensorRT wants I/O addresses aligned to this many bytes; other tensors go through a copy.
IO_ALIGNMENT = 256
# FP8 e4m3 GEMMs need compute capability 8.9 (Ada), 9.0 (Hopper) or later. Jetson Orin is 8.7.
FP8_MIN_CAPABILITY = (8, 9)


class TensorRTError(Pi0PolicyError):
    """TensorRT is missing, too old, or failed to build, load or run an engine."""


class EngineLoadError(TensorRTError):
    """TensorRT could not deserialize an engine file (damaged, truncated, or from another build)."""


# ---- the import check -----------------------------------------------------------------------------
@functools.cache
def _import_tensorrt() -> ModuleType | None:
    try:
        return importlib.import_module("tensorrt")
    except (ImportError, OSError) as exc:  # OSError: the wheel is there but libnvinfer is not
        log.debug("tensorrt is not importable: %s", exc)
        return None


def tensorrt_version() -> str | None:
    """The installed TensorRT version, or None when `import tensorrt` fails."""
    trt = _import_tensorrt()
    return None if trt is None else str(trt.__version__)


def require_tensorrt() -> ModuleType:
    trt = _import_tensorrt()
    if trt is None:
        raise TensorRTError("TensorRT is not installed (import tensorrt failed)")
    version = tuple(int(p) for p in str(trt.__version__).split(".")[:2])
    if version < MIN_TENSORRT:
        raise TensorRTError(f"TensorRT ≥ {'.'.join(map(str, MIN_TENSORRT))} is needed (strongly typed networks, "
                            f"int64 inputs), found {trt.__version__}")
    return trt


# ---- FP8 Q/DQ -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fp8Scales:
    weight: torch.Tensor  # [N] per output channel, in the weight's dtype
    input: torch.Tensor  # [] per tensor, in the weight's dtype


@dataclass(frozen=True)
class Fp8Plan:
    """Scales per linear layer (by module name) and which weight is which (by content)."""

    scales: dict[str, Fp8Scales]
    fingerprints: dict[str, str]  # fingerprint of the [K, N] weight → module name


def fp8_scale(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """amax / 448 rounded to `dtype` (Q/DQ scales have the activations' type), never zero."""
    return (amax.float() / FP8_MAX).clamp(min=torch.finfo(dtype).tiny).to(dtype)


def weight_fingerprint(kn: np.ndarray) -> str:
    """Identifies a weight in an ONNX graph by content: a [K, N] array (MatMul's layout)."""
    return hashlib.sha1(f"{kn.shape}{kn.dtype}".encode() + np.ascontiguousarray(kn).tobytes()).hexdigest()


def _record_amax(amax: dict[str, float], name: str, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
    amax[name] = max(amax.get(name, 0.0), float(args[0].detach().abs().max()))


@torch.no_grad()
def calibrate_fp8(stage: ExportableStage, batches: Sequence[Sequence[torch.Tensor]]) -> Fp8Plan:
    """Per-channel weight scales, and per-tensor input scales from the max |input| over `batches`."""
    linears = stage.quantizable_linears()
    amax: dict[str, float] = {}
    handles = [lin.register_forward_pre_hook(functools.partial(_record_amax, amax, name))
               for name, lin in linears.items()]
    try:
        for batch in batches:
            stage(*batch)
    finally:
        for handle in handles:
            handle.remove()
    scales, fingerprints = {}, {}
    for name, lin in linears.items():
        w = lin.weight.detach()  # [N, K]
        scales[name] = Fp8Scales(fp8_scale(w.float().abs().amax(dim=1), w.dtype),
                                 fp8_scale(torch.tensor(amax.get(name, 0.0)), w.dtype))
        fingerprints[weight_fingerprint(w.t().cpu().numpy())] = name
    return Fp8Plan(scales, fingerprints)


def fake_quant(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What QuantizeLinear → DequantizeLinear (e4m3, saturating) computes, in x's dtype."""
    s = scale.to(x.device).float()
    q = (x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return (q.float() * s).to(x.dtype)


def _quantize_input(scale: torch.Tensor, module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return (fake_quant(args[0], scale), *args[1:])


@contextlib.contextmanager
def fp8_fake_quant(stage: ExportableStage, plan: Fp8Plan) -> Iterator[ExportableStage]:
    """Inside the block, `stage` computes what its FP8 Q/DQ graph computes (the torch reference)."""
    linears = stage.quantizable_linears()
    saved = {name: lin.weight.data for name, lin in linears.items()}
    handles = []
    try:
        for name, lin in linears.items():
            s = plan.scales[name]
            lin.weight.data = fake_quant(lin.weight.data, s.weight[:, None])
            handles.append(lin.register_forward_pre_hook(functools.partial(_quantize_input, s.input)))
        yield stage
    finally:
        for handle in handles:
            handle.remove()
        for name, lin in linears.items():
            lin.weight.data = saved[name]


def _linear_weight(node: Any, initializers: Mapping[str, Any]) -> tuple[str, bool] | None:
    """(weight name, stored as [N, K]) when `node` is a linear layer with a constant 2-D weight."""
    if node.op_type == "MatMul" and node.input[1] in initializers and len(initializers[node.input[1]].dims) == 2:
        return node.input[1], False
    if node.op_type == "Gemm" and node.input[1] in initializers:
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return node.input[1], bool(trans_b)
    return None


def _qdq_pair(src: str, scale: np.ndarray, axis: int, tag: str) -> tuple[list[Any], list[Any], str]:
    """QuantizeLinear → DequantizeLinear of `src` to e4m3 with `scale` (zero point 0): (nodes,
    initializers, name of the dequantized tensor)."""
    from onnx import TensorProto, helper, numpy_helper

    zero = helper.make_tensor(f"{tag}.zero", TensorProto.FLOAT8E4M3FN, list(scale.shape), [0] * scale.size)
    inits = [numpy_helper.from_array(scale, f"{tag}.scale"), zero]
    nodes = [helper.make_node("QuantizeLinear", [src, f"{tag}.scale", f"{tag}.zero"], [f"{tag}.q"],
                              name=f"{tag}/QuantizeLinear", axis=axis),
             helper.make_node("DequantizeLinear", [f"{tag}.q", f"{tag}.scale", f"{tag}.zero"], [f"{tag}.dq"],
                              name=f"{tag}/DequantizeLinear", axis=axis)]
    return nodes, inits, f"{tag}.dq"


def insert_fp8_qdq(proto: Any, plan: Fp8Plan) -> int:
    """Put every linear layer of `proto` (MatMul / Gemm with a constant weight) behind FP8 Q/DQ
    pairs: per output channel on the weight, per tensor on the input. Linears reading the same
    input (q, k, v; gate, up) share its pair. Returns the number of linears rewritten; a linear the
    plan does not know is an error, so no layer stays in high precision by accident."""
    from onnx import numpy_helper

    graph = proto.graph
    initializers = {t.name: t for t in graph.initializer}
    nodes, new_inits, shared_inputs = [], [], {}
    count = 0
    for node in graph.node:
        found = _linear_weight(node, initializers)
        if found is None:
            nodes.append(node)
            continue
        weight_name, n_by_k = found
        weight = numpy_helper.to_array(initializers[weight_name])
        name = plan.fingerprints.get(weight_fingerprint(weight.T if n_by_k else weight))
        if name is None:
            raise ExportError(f"linear {node.name!r} (weight {weight_name!r} {list(weight.shape)}) is not in the FP8 "
                              f"plan: expected one of its {len(plan.scales)} calibrated layers")
        scales = plan.scales[name]
        key = (node.input[0], float(scales.input))
        if key not in shared_inputs:
            pair_nodes, pair_inits, shared_inputs[key] = _qdq_pair(node.input[0], scales.input.cpu().numpy(), 1,
                                                                   f"{name}.input_fp8")
            nodes += pair_nodes
            new_inits += pair_inits
        pair_nodes, pair_inits, weight_dq = _qdq_pair(weight_name, scales.weight.cpu().numpy(), 0 if n_by_k else 1,
                                                      f"{name}.weight_fp8")
        nodes += pair_nodes
        new_inits += pair_inits
        node.input[0], node.input[1] = shared_inputs[key], weight_dq
        nodes.append(node)
        count += 1
    graph.ClearField("node")
    graph.node.extend(nodes)
    graph.initializer.extend(new_inits)
    proto.ir_version = max(proto.ir_version, 9)  # float8 tensors need IR 9
    return count


# Bound on `check_fp8_linears` for an fp16 graph: fp16 rounding of the products gives about 3e-4;
# a wrong scale, axis or operand gives errors of order 1.
FP8_LINEAR_LIMIT = 1e-2


def check_fp8_linears(path: str | Path, stage: ExportableStage, plan: Fp8Plan, inputs: Sequence[torch.Tensor]
                      ) -> dict[str, float]:
    """Each FP8 linear of an exported graph on its own: onnxruntime's MatMul output against torch's
    fake-quant linear applied to onnxruntime's own MatMul input. Per linear ‖onnx − torch‖ / ‖torch‖.

    Checking layer by layer keeps this exact: end to end, a last-bit difference upstream can move
    an activation across an e4m3 rounding boundary, and that one-step difference then grows
    through the following layers."""
    import onnx
    from onnx import helper

    proto = onnx.load(str(path))
    producers = {out: node for node in proto.graph.node for out in node.output}
    linears = stage.quantizable_linears()
    probes: dict[str, tuple[str, str]] = {}  # linear name → (activation before Q/DQ, MatMul output)
    for node in proto.graph.node:
        if node.op_type != "MatMul":
            continue
        w_dq, x_dq = producers.get(node.input[1]), producers.get(node.input[0])
        if w_dq is None or x_dq is None or not w_dq.name.endswith(".weight_fp8/DequantizeLinear"):
            continue
        x_q = producers[x_dq.input[0]]
        probes[w_dq.name.removesuffix(".weight_fp8/DequantizeLinear")] = (x_q.input[0], node.output[0])
    for name in {t for pair in probes.values() for t in pair}:
        proto.graph.output.append(helper.make_empty_tensor_value_info(name))
    with tempfile.TemporaryDirectory(prefix="pi0_fp8_check_") as tmp:
        probe_path = Path(tmp) / "probe.onnx"
        save_onnx(proto, probe_path)
        session = onnxruntime_session(probe_path, fp8=True)
        names = [o.name for o in session.get_outputs()]
        feeds = {s.name: t.detach().cpu().numpy() for s, t in zip(stage.signature.inputs, inputs)}
        values = dict(zip(names, session.run(names, feeds)))
    errors = {}
    for name, (x_name, y_name) in probes.items():
        lin, scales = linears[name], plan.scales[name]
        x = torch.from_numpy(values[x_name])
        w = fake_quant(lin.weight.detach().cpu(), scales.weight.cpu()[:, None])
        want = (fake_quant(x, scales.input.cpu()).double() @ w.double().t())
        got = torch.from_numpy(values[y_name]).double()
        errors[name] = float((got - want).norm() / want.norm().clamp(min=1e-30))
    return errors


def has_fp8_qdq(proto: Any) -> bool:
    from onnx import TensorProto

    return any(t.data_type == TensorProto.FLOAT8E4M3FN for t in proto.graph.initializer)


# ---- engine cache ---------------------------------------------------------------------------------
def file_sha256(path: str | Path, chunk_bytes: int = 1 << 24) -> str:
    """Content hash of a checkpoint file (about 1 GB/s; a few seconds for pi0.5)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def module_sha256(module: nn.Module) -> str:
    """Content hash of a module's weights (random-weight or fixture models with no file)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class EngineKey:
    """Everything a serialized engine depends on; any change means a rebuild."""

    stage: str
    precision: str
    checkpoint_sha256: str
    gpu_name: str
    compute_capability: str
    tensorrt_version: str
    signature: str  # names, shapes and dtypes of the inputs and outputs
    exporter: str  # this package's version: its export code shapes the ONNX graph
    torch_version: str  # torch traces and lowers the ONNX graph: another torch can export another one
    calibration: str  # where an FP8 engine's activation scales came from

    @classmethod
    def create(cls, signature: StageSignature, precision: str, checkpoint_sha256: str, device: torch.device,
               calibration: Sequence[Sequence[torch.Tensor]] | None = None) -> EngineKey:
        trt = require_tensorrt()
        major, minor = torch.cuda.get_device_capability(device)
        io = [(s.name, list(s.shape), str(s.dtype)) for s in (*signature.inputs, *signature.outputs)]
        return cls(signature.stage, precision, checkpoint_sha256, torch.cuda.get_device_name(device),
                   f"{major}.{minor}", str(trt.__version__), json.dumps(io), f"pi0_policy_ros {__version__}",
                   str(torch.__version__), calibration_digest(calibration))

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:20]

    @property
    def filename(self) -> str:
        return f"{self.stage}-{self.precision}-{self.digest}.engine"


def calibration_digest(batches: Sequence[Sequence[torch.Tensor]] | None) -> str:
    """Content hash of FP8 calibration batches; without them export_stage calibrates on its seeded
    random example inputs, which the package version pins."""
    if batches is None:
        return "example inputs"
    digest = hashlib.sha256()
    for batch in batches:
        for tensor in batch:
            digest.update(f"{tensor.dtype}{list(tensor.shape)}".encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:20]


class EngineCache:
    """Serialized engines in one directory, named by `EngineKey.digest`, each with a JSON sidecar
    saying what it was built from; one timing cache per GPU and TensorRT version."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).expanduser()

    def engine_path(self, key: EngineKey) -> Path:
        return self.directory / key.filename

    def timing_cache_path(self, key: EngineKey) -> Path:
        gpu = "".join(c if c.isalnum() else "_" for c in key.gpu_name)
        return self.directory / f"timing-{gpu}-sm{key.compute_capability}-trt{key.tensorrt_version}.cache"

    def load(self, key: EngineKey) -> bytes | None:
        path = self.engine_path(key)
        return path.read_bytes() if path.exists() else None

    def store(self, key: EngineKey, engine: bytes) -> Path:
        path = self.engine_path(key)
        write_atomic(path, engine)
        write_atomic(path.with_suffix(".json"), json.dumps(asdict(key), indent=2).encode())
        return path


# ---- building -------------------------------------------------------------------------------------
@functools.cache
def _trt_logger() -> Any:
    """One logger for the process: TensorRT keeps the first one it is given."""
    trt = require_tensorrt()
    return trt.Logger(trt.Logger.WARNING)


def check_fp8_support(device: torch.device) -> None:
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        raise ConfigError(f"FP8 needs compute capability ≥ {FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]} "
                          f"(Ada, Hopper, Blackwell); {torch.cuda.get_device_name(device)} is "
                          f"{capability[0]}.{capability[1]}: use precision fp16")


def build_serialized_engine(onnx_path: str | Path, timing_cache: Path | None = None,
                            workspace_bytes: int | None = None) -> bytes:
    """Parse an ONNX file (external data next to it) into a strongly typed network and build it.
    The timing cache is read if present and written back, so rebuilds skip kernel timing."""
    trt = require_tensorrt()
    logger = _trt_logger()
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache and timing_cache.exists() else b"")
    # set_timing_cache returns False for a cache from other device properties (same GPU name,
    # e.g. another Jetson power mode); an unreadable file gives no cache. Start a fresh one then.
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("TensorRT timing cache %s is unusable here; building without it", timing_cache)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    if timing_cache is not None:
        write_atomic(timing_cache, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def ensure_engine(stage: ExportableStage, precision: str, cache: EngineCache, checkpoint_sha256: str,
                  force_engine_update: bool = False,
                  calibration: Sequence[Sequence[torch.Tensor]] | None = None) -> Path:
    """The cached engine of `stage`, exported and built first when missing or when forced."""
    return _cached_or_built_engine(stage, precision, cache, checkpoint_sha256, force_engine_update, calibration)[0]


def _cached_or_built_engine(stage: ExportableStage, precision: str, cache: EngineCache, checkpoint_sha256: str,
                            force_engine_update: bool,
                            calibration: Sequence[Sequence[torch.Tensor]] | None) -> tuple[Path, bool]:
    """`ensure_engine`, and whether the engine came from the cache (True) or was just built."""
    require_tensorrt()  # first: without it, the FP8 check's CUDA query fails with torch's AssertionError
    device = stage_device(stage)
    if precision == "fp8" and stage.quantizable_linears():
        check_fp8_support(device)
    key = EngineKey.create(stage.signature, precision, checkpoint_sha256, device, calibration)
    path = cache.engine_path(key)
    if path.exists() and not force_engine_update:
        log.info("TensorRT %s engine from cache: %s", stage.signature.stage, path)
        return path, True
    log.info("building the TensorRT %s engine (%s); this takes minutes once per GPU and checkpoint",
             stage.signature.stage, precision)
    cache.directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache.directory, prefix=".onnx-") as tmp:
        exported = export_stage(stage, Path(tmp) / f"{stage.signature.stage}.onnx", precision,
                                fp8_calibration=calibration)
        # TensorRT builds for the current CUDA device, which need not be the stage's (cuda:1)
        with torch.cuda.device(device):
            engine = build_serialized_engine(exported.path, cache.timing_cache_path(key))
    return cache.store(key, engine), False


# ---- running --------------------------------------------------------------------------------------
def _torch_dtype(trt: ModuleType, dtype: Any) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
             trt.int32: torch.int32, trt.int64: torch.int64, trt.bool: torch.bool, trt.uint8: torch.uint8,
             trt.int8: torch.int8}
    if dtype not in table:
        raise TensorRTError(f"no torch dtype for TensorRT {dtype}")
    return table[dtype]


class TensorRTStage:
    """One deserialized engine, bound once to static CUDA tensors and run on the current torch
    stream. Nothing in `run` touches the host, so it can be captured in a CUDA graph after a
    first run. A bound tensor with the engine's dtype and an aligned address is used in place
    (the prefix writes the engine's KV cache directly); any other goes through a copy."""

    def __init__(self, engine_path: str | Path, device: torch.device) -> None:
        trt = require_tensorrt()
        # With an index: tensors report one ("cuda:0"), and `bind` compares devices.
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._runtime = trt.Runtime(_trt_logger())
        # An engine and its contexts belong to the CUDA device current at deserialization.
        with torch.cuda.device(self.device):
            self.engine = self._runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
            if self.engine is None:
                raise EngineLoadError(f"TensorRT could not deserialize {engine_path} (damaged, or built by another "
                                      "version or GPU?)")
            self.context = self.engine.create_execution_context()
        self.io: dict[str, tuple[bool, tuple[int, ...], torch.dtype]] = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            self.io[name] = (is_input, tuple(self.engine.get_tensor_shape(name)),
                             _torch_dtype(trt, self.engine.get_tensor_dtype(name)))
        self._before: list[tuple[torch.Tensor, torch.Tensor]] = []  # (staging, source)
        self._after: list[tuple[torch.Tensor, torch.Tensor]] = []  # (destination, staging)
        # Every tensor whose address the context holds: TensorRT keeps only the raw pointer, so a
        # tensor bound in place must not be freed (and its memory reused) while bound.
        self._addressed: dict[str, torch.Tensor] = {}
        self._bound = False

    def bind(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Bind every input and output to a static tensor; call once, before the first `run`."""
        missing = sorted(set(self.io) - set(tensors))
        if missing:
            raise TensorRTError(f"TensorRT engine tensors not bound: {missing}")
        self._before, self._after, self._addressed = [], [], {}
        for name, (is_input, shape, dtype) in self.io.items():
            t = tensors[name]
            if tuple(t.shape) != shape or t.device != self.device:
                raise TensorRTError(f"{name}: expected {list(shape)} on {self.device}, found {list(t.shape)} on "
                                    f"{t.device}")
            direct = t.dtype == dtype and t.is_contiguous() and t.data_ptr() % IO_ALIGNMENT == 0
            target = t if direct else torch.empty(shape, dtype=dtype, device=self.device)
            if not direct and is_input:
                self._before.append((target, t))
            elif not direct:
                self._after.append((t, target))
            # False (never an exception) for an unknown name or an address TensorRT cannot use
            if not self.context.set_tensor_address(name, target.data_ptr()):
                raise TensorRTError(f"TensorRT refused the address of {name} ({target.data_ptr():#x})")
            self._addressed[name] = target
        self._bound = True

    def run(self) -> None:
        if not self._bound:
            raise TensorRTError("TensorRTStage.run before bind")
        stream = torch.cuda.current_stream(self.device)
        for staging, source in self._before:
            staging.copy_(source)
        with torch.cuda.device(self.device):  # enqueue from the engine's device, as TensorRT requires
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise TensorRTError("TensorRT execute_async_v3 failed")
        for destination, staging in self._after:
            destination.copy_(staging)


def kv_cache_bindings(keys: torch.Tensor, values: torch.Tensor, padded_prefix_len: int) -> dict[str, torch.Tensor]:
    """Views of the engine's KV cache ([layers, rows, hd], one KV head) as the prefix engine's
    `key_{i}` / `value_{i}` outputs [1, 1, Pp, hd]: rows [0, Pp) of layer i, written in place."""
    out = {}
    for i in range(keys.shape[0]):
        out[f"key_{i}"] = keys[i, :padded_prefix_len].view(1, 1, padded_prefix_len, keys.shape[-1])
        out[f"value_{i}"] = values[i, :padded_prefix_len].view(1, 1, padded_prefix_len, values.shape[-1])
    return out


@torch.no_grad()
def relative_error(trt_stage: TensorRTStage, reference: ExportableStage, inputs: Sequence[torch.Tensor]) -> float:
    """Run the engine and the torch stage on the same inputs (each side in its own dtypes); the
    worst output's ‖trt − torch‖ / ‖torch‖ (a mismatching bool output counts as 1)."""
    device = trt_stage.device
    bound = {}
    for name, t in zip(reference.signature.input_names, inputs):
        bound[name] = t.to(device=device, dtype=trt_stage.io[name][2])
    outputs = {name: torch.empty(shape, dtype=dtype, device=device)
               for name, (is_input, shape, dtype) in trt_stage.io.items() if not is_input}
    trt_stage.bind({**bound, **outputs})
    trt_stage.run()
    expected = reference(*(t.to(device) for t in cast_inputs(reference.signature, inputs)))
    torch.cuda.synchronize(device)
    worst = 0.0
    for name, want in zip(reference.signature.output_names, expected):
        got = outputs[name]
        if want.dtype == torch.bool:
            worst = max(worst, float((got != want).any()))
            continue
        err = float((got.double() - want.double()).norm() / want.double().norm().clamp(min=1e-30))
        worst = max(worst, err if np.isfinite(err) else float("inf"))
    return worst


def load_engine(stage: ExportableStage, precision: str, cache: EngineCache, checkpoint_sha256: str,
                device: torch.device, force_engine_update: bool = False,
                calibration: Sequence[Sequence[torch.Tensor]] | None = None) -> tuple[Path, TensorRTStage]:
    """`ensure_engine`, deserialized on `device`. A cached file TensorRT cannot deserialize (cut short
    by a full disk or a copy, damaged) is rebuilt once with a warning: otherwise every configure
    would fail on it until someone deleted it or forced an update. A fresh build that does not
    load is an error, as building it again would give the same."""
    path, from_cache = _cached_or_built_engine(stage, precision, cache, checkpoint_sha256, force_engine_update,
                                               calibration)
    try:
        return path, TensorRTStage(path, device)
    except EngineLoadError as exc:
        if not from_cache:
            raise
        log.warning("cached TensorRT %s engine %s is unusable (%s); rebuilding it", stage.signature.stage, path, exc)
    path = ensure_engine(stage, precision, cache, checkpoint_sha256, True, calibration)
    return path, TensorRTStage(path, device)


# ---- the whole TensorRT setup of an engine --------------------------------------------------------
# The engine's precision → what the TensorRT stages are built as (the vision stage of "fp8" is fp16).
TENSORRT_PRECISION = {"float32": "fp32", "bfloat16": "fp16", "fp8": "fp8"}
# Relative error against torch allowed at configure (`backend: auto`): catches broken engines
# (NaN, wrong bindings, overflow), not a precision spec.
CHECK_LIMIT = {"fp32": 1e-3, "fp16": 2e-2, "fp8": 0.15}


@dataclass(frozen=True)
class EngineCheck:
    """The configure-time comparison of the TensorRT engines with torch."""

    error: float  # the worst stage's relative error (`relative_error`)
    limit: float
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.error <= self.limit  # False for NaN


@dataclass
class TensorRTStages:
    """Loaded engines per stage name, ready to `bind` to the engine's static buffers."""

    precision: str
    stages: dict[str, TensorRTStage]
    engine_paths: dict[str, Path]


def prepare_tensorrt(model: Pi0Model, shape: EngineShape, engine_precision: str, cache_dir: str | Path,
                     checkpoint_sha256: str, force_engine_update: bool = False, image_input: str = "float",
                     stages: Sequence[str] = STAGES) -> TensorRTStages:
    """Build (or load from the cache) and deserialize the engines of `stages` for a model on CUDA.
    `image_input="float"` takes the engine's preprocessed pixels, so resizing stays in torch."""
    precision = TENSORRT_PRECISION[engine_precision]
    device = next(model.parameters()).device
    cache = EngineCache(cache_dir)
    loaded, paths = {}, {}
    for name in stages:
        stage = stage_module(model, name, shape, stage_precision(name, precision), image_input)
        paths[name], loaded[name] = load_engine(stage, stage_precision(name, precision), cache, checkpoint_sha256,
                                                device, force_engine_update)
        del stage  # an fp16 copy of the stage's weights; the engine has its own
    return TensorRTStages(precision, loaded, paths)


def check_tensorrt(setup: TensorRTStages, model: Pi0Model, shape: EngineShape, image_input: str = "float",
                   seed: int = 0) -> EngineCheck:
    """Each engine against the torch stage (in the model's compute dtype) on a random input."""
    dtype = model.language_model.compute_dtype
    errors = {}
    for name, trt_stage in setup.stages.items():
        reference = stage_module(model, name, shape, "fp32", image_input, dtype=dtype)
        inputs = random_inputs(reference.signature, trt_stage.device, seed)
        errors[name] = relative_error(trt_stage, reference, inputs)
    worst = max(errors.values(), default=0.0)
    detail = ", ".join(f"{k} {v:.3g}" for k, v in errors.items())
    return EngineCheck(worst, CHECK_LIMIT[setup.precision], detail)

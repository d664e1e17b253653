"""`engine/tensorrt.py` against a STAND-IN `tensorrt` module, because TensorRT cannot run here.

The fake below is not TensorRT: it only has TensorRT 10's Python API surface as this module uses
it, with the keyword names and return conventions of the real bindings (NVIDIA/TensorRT
python/src/infer/pyCore.cpp and python/src/parsers/pyOnnx.cpp at v10.0.0 and v10.16): e.g.
`set_tensor_address(name, memory) -> bool`, `execute_async_v3(stream_handle) -> bool`,
`set_timing_cache(cache, ignore_mismatch) -> bool`. TensorRT 8 names that 10 removed
(`build_engine`, `max_workspace_size`, `execute_async_v2`, `get_binding_*`) are absent, and the
objects take no new attributes, so using one fails here as it would there. It records the CUDA
device current at each call (through a patched `torch.cuda.device`). Passing these tests says the
calls are well-formed, nothing about engines."""

from __future__ import annotations

import contextlib
import enum
import functools
import gc
import logging
import sys
import types
import weakref
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from torch import nn

from pi0_policy_ros.engine import tensorrt as trt_mod
from pi0_policy_ros.engine.onnx_export import StageSignature, TensorSpec
from pi0_policy_ros.engine.types import EngineShape
from pi0_policy_ros.model.checkpoint import random_model
from pi0_policy_ros.model.config import get_preset
from pi0_policy_ros.model.pi0 import Pi0Model


class _DataType(enum.Enum):
    FLOAT = "float32"
    HALF = "float16"
    BF16 = "bfloat16"
    INT32 = "int32"
    INT64 = "int64"
    BOOL = "bool"
    UINT8 = "uint8"
    INT8 = "int8"
    FP8 = "fp8"


class _NetworkDefinitionCreationFlag(enum.IntEnum):
    EXPLICIT_BATCH = 0  # deprecated and ignored in TensorRT 10
    STRONGLY_TYPED = 1


class _MemoryPoolType(enum.Enum):
    WORKSPACE = 0


class _TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class _Severity(enum.IntEnum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class FakeTRT:
    """State shared by the fake's objects: the current device, the calls made, the engine's I/O."""

    def __init__(self) -> None:
        self.current_device = "cuda:0"
        self.calls: list[tuple[str, str]] = []  # (call, device current at the call)
        # name → (is input, shape, dtype) of the engine that `deserialize_cuda_engine` returns
        self.io = {"x": (True, (2, 4), _DataType.HALF), "y": (False, (2, 4), _DataType.HALF)}
        self.cache_device = "H100"  # what `set_timing_cache` accepts without ignore_mismatch
        self.rejected_addresses: set[str] = set()  # names `set_tensor_address` refuses

    def record(self, call: str) -> None:
        self.calls.append((call, self.current_device))


class _Logger:
    __slots__ = ("min_severity",)

    def __init__(self, min_severity: _Severity = _Severity.WARNING) -> None:
        self.min_severity = min_severity


for _name, _value in _Severity.__members__.items():
    setattr(_Logger, _name, _value)


class _HostMemory(bytes):
    """IHostMemory: the real one exposes the buffer protocol, which `bytes(...)` reads."""


class _TimingCache:
    __slots__ = ("blob",)

    def __init__(self, blob: bytes) -> None:
        self.blob = blob

    def serialize(self) -> _HostMemory:
        return _HostMemory(self.blob)


class _Network:
    __slots__ = ("flags",)

    def __init__(self, flags: int) -> None:
        self.flags = flags


class _BuilderConfig:
    __slots__ = ("fake", "pools", "cache")

    def __init__(self, fake: FakeTRT) -> None:
        self.fake, self.pools, self.cache = fake, {}, None

    def set_memory_pool_limit(self, pool: _MemoryPoolType, pool_size: int) -> None:
        assert isinstance(pool, _MemoryPoolType) and isinstance(pool_size, int)
        self.pools[pool] = pool_size

    def create_timing_cache(self, serialized_timing_cache: bytes) -> _TimingCache | None:
        blob = bytes(memoryview(serialized_timing_cache))
        if blob and not blob.startswith(b"CACHE:"):
            return None  # an unreadable blob
        return _TimingCache(blob or f"CACHE:{self.fake.cache_device}".encode())

    def set_timing_cache(self, cache: _TimingCache, ignore_mismatch: bool) -> bool:
        if not isinstance(cache, _TimingCache):  # pybind: None does not convert to `ITimingCache const&`
            raise TypeError(f"set_timing_cache(): incompatible function arguments: {cache!r}")
        if not ignore_mismatch and cache.blob != f"CACHE:{self.fake.cache_device}".encode():
            return False  # "a failure will be reported if the CUDA device property ... is different"
        self.cache = cache
        return True

    def get_timing_cache(self) -> _TimingCache | None:
        return self.cache


class _Builder:
    __slots__ = ("fake", "logger")

    def __init__(self, logger: _Logger) -> None:
        self.fake, self.logger = _FAKE[0], logger

    def create_network(self, flags: int = 0) -> _Network:
        assert isinstance(flags, int)
        return _Network(flags)

    def create_builder_config(self) -> _BuilderConfig:
        return _BuilderConfig(self.fake)

    def build_serialized_network(self, network: _Network, config: _BuilderConfig) -> _HostMemory:
        assert network.flags & (1 << int(_NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        self.fake.record("build_serialized_network")
        return _HostMemory(b"ENGINE")


class _OnnxParser:
    __slots__ = ("network",)

    def __init__(self, network: _Network, logger: _Logger) -> None:
        self.network = network

    def parse_from_file(self, model: str) -> bool:
        assert isinstance(model, str) and Path(model).exists()
        return True

    @property
    def num_errors(self) -> int:
        return 0

    def get_error(self, index: int) -> str:
        raise IndexError(index)


class _Context:
    __slots__ = ("fake", "addresses")

    def __init__(self, fake: FakeTRT) -> None:
        self.fake, self.addresses = fake, {}

    def set_tensor_address(self, name: str, memory: int) -> bool:
        assert isinstance(name, str) and isinstance(memory, int)
        if name not in self.fake.io or name in self.fake.rejected_addresses:
            return False
        self.addresses[name] = memory
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        assert isinstance(stream_handle, int)
        self.fake.record("execute_async_v3")
        return set(self.addresses) == set(self.fake.io)


class _Engine:
    __slots__ = ("fake", "names")

    def __init__(self, fake: FakeTRT) -> None:
        self.fake, self.names = fake, list(fake.io)

    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    def get_tensor_name(self, index: int) -> str:
        return self.names[index]

    def get_tensor_mode(self, name: str) -> _TensorIOMode:
        return _TensorIOMode.INPUT if self.fake.io[name][0] else _TensorIOMode.OUTPUT

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.fake.io[name][1]

    def get_tensor_dtype(self, name: str) -> _DataType:
        return self.fake.io[name][2]

    def create_execution_context(self) -> _Context:
        self.fake.record("create_execution_context")
        return _Context(self.fake)


class _Runtime:
    __slots__ = ("fake",)

    def __init__(self, logger: _Logger) -> None:
        self.fake = _FAKE[0]

    def deserialize_cuda_engine(self, serialized_engine: bytes) -> _Engine | None:
        self.fake.record("deserialize_cuda_engine")
        return _Engine(self.fake) if bytes(serialized_engine) == b"ENGINE" else None


_FAKE: list[FakeTRT] = []


def _fake_module(fake: FakeTRT) -> types.ModuleType:
    m = types.ModuleType("tensorrt")
    m.__version__ = "10.3.0.26"
    m.Logger, m.Builder, m.OnnxParser, m.Runtime = _Logger, _Builder, _OnnxParser, _Runtime
    m.NetworkDefinitionCreationFlag, m.MemoryPoolType, m.TensorIOMode = (_NetworkDefinitionCreationFlag,
                                                                         _MemoryPoolType, _TensorIOMode)
    m.DataType = _DataType
    # the module-level aliases of pyFoundationalTypes.cpp
    for alias, member in (("float32", "FLOAT"), ("float16", "HALF"), ("bfloat16", "BF16"), ("int32", "INT32"),
                          ("int64", "INT64"), ("bool", "BOOL"), ("uint8", "UINT8"), ("int8", "INT8"), ("fp8", "FP8")):
        setattr(m, alias, _DataType[member])
    return m


@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeTRT]:
    """The fake `tensorrt` in sys.modules, and torch.cuda's device / stream calls made CPU-safe."""
    fake = FakeTRT()
    _FAKE[:] = [fake]
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_module(fake))

    @contextlib.contextmanager
    def device(d: Any) -> Iterator[None]:
        before, fake.current_device = fake.current_device, str(torch.device(d))
        try:
            yield
        finally:
            fake.current_device = before

    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda d=None: types.SimpleNamespace(cuda_stream=7))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100")
    trt_mod._import_tensorrt.cache_clear()
    trt_mod._trt_logger.cache_clear()
    yield fake
    trt_mod._import_tensorrt.cache_clear()
    trt_mod._trt_logger.cache_clear()


def _engine_file(tmp_path: Path) -> Path:
    path = tmp_path / "stage.engine"
    path.write_bytes(b"ENGINE")
    return path


def test_build_uses_the_tensorrt_10_builder_api(fake_trt: FakeTRT, tmp_path: Path) -> None:
    onnx_path = tmp_path / "stage.onnx"
    onnx_path.write_bytes(b"onnx")
    cache = tmp_path / "timing.cache"
    assert trt_mod.build_serialized_engine(onnx_path, cache, workspace_bytes=1 << 30) == b"ENGINE"
    assert cache.read_bytes() == b"CACHE:H100"
    assert trt_mod.build_serialized_engine(onnx_path, cache) == b"ENGINE"  # with the cache it wrote


def test_stage_binds_and_runs_with_the_tensorrt_10_runtime_api(fake_trt: FakeTRT, tmp_path: Path) -> None:
    stage = trt_mod.TensorRTStage(_engine_file(tmp_path), torch.device("cpu"))
    assert stage.io == {"x": (True, (2, 4), torch.float16), "y": (False, (2, 4), torch.float16)}
    x, y = torch.ones(2, 4), torch.zeros(2, 4)  # float32: both go through staging copies
    stage.bind({"x": x, "y": y})
    stage.run()
    assert [c for c, _ in fake_trt.calls][-1] == "execute_async_v3"


class _TinyStage(nn.Module):
    """An exportable stage of one input and one output, on cuda:1 as far as ensure_engine knows."""

    signature = StageSignature("vision", (TensorSpec("x", (2, 4), torch.float16),),
                               (TensorSpec("y", (2, 4), torch.float16),))

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def quantizable_linears(self) -> dict[str, nn.Linear]:
        return {}


def _export_to_fake_onnx(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """export_stage writes a stand-in file; returns the calibrations it was given."""
    calibrations: list[Any] = []

    def export_stage(stage: Any, path: Path, precision: str, fp8_calibration: Any = None) -> Any:
        calibrations.append(fp8_calibration)
        path.write_bytes(b"onnx")
        return types.SimpleNamespace(path=path)

    monkeypatch.setattr(trt_mod, "export_stage", export_stage)
    monkeypatch.setattr(trt_mod, "stage_device", lambda stage: torch.device("cuda", 1))
    return calibrations


def test_engine_is_built_loaded_and_run_on_the_stage_device(fake_trt: FakeTRT, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """TensorRT binds an engine to the CUDA device current when it is built or deserialized, and
    enqueue must run there too (TensorRT FAQ, "How do I use TensorRT on multiple GPUs?"). With
    cuda:0 current, a stage on cuda:1 must switch for each of those calls."""

    _export_to_fake_onnx(monkeypatch)
    path = trt_mod.ensure_engine(_TinyStage(), "fp16", trt_mod.EngineCache(tmp_path), "sha")
    stage = trt_mod.TensorRTStage(path, torch.device("cuda", 1))
    stage.device = torch.device("cpu")  # the fake's tensors live on the CPU
    stage.bind({"x": torch.ones(2, 4), "y": torch.zeros(2, 4)})
    stage.device = torch.device("cuda", 1)
    stage.run()
    assert fake_trt.current_device == "cuda:0"
    assert fake_trt.calls == [("build_serialized_network", "cuda:1"), ("deserialize_cuda_engine", "cuda:1"),
                              ("create_execution_context", "cuda:1"), ("execute_async_v3", "cuda:1")]


def test_each_calibration_gets_its_own_cached_engine(fake_trt: FakeTRT, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    calibrations = _export_to_fake_onnx(monkeypatch)
    cache = trt_mod.EngineCache(tmp_path)
    real = [[torch.ones(2, 4)]]
    random_path = trt_mod.ensure_engine(_TinyStage(), "fp8", cache, "sha")
    real_path = trt_mod.ensure_engine(_TinyStage(), "fp8", cache, "sha", calibration=real)
    assert real_path != random_path and calibrations == [None, real]
    assert trt_mod.ensure_engine(_TinyStage(), "fp8", cache, "sha", calibration=[[torch.ones(2, 4)]]) == real_path
    assert len(calibrations) == 2  # the same data again: from the cache, no rebuild


def test_another_torch_gets_its_own_cached_engine(fake_trt: FakeTRT, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """torch exports the ONNX graph the engine is built from, and another torch can trace or lower
    the same stage differently: an engine cached under one torch must not load under another."""
    calibrations = _export_to_fake_onnx(monkeypatch)
    cache = trt_mod.EngineCache(tmp_path)
    monkeypatch.setattr(torch, "__version__", "2.7.1+cu128")
    old_path = trt_mod.ensure_engine(_TinyStage(), "fp16", cache, "sha")
    assert trt_mod.ensure_engine(_TinyStage(), "fp16", cache, "sha") == old_path and len(calibrations) == 1
    monkeypatch.setattr(torch, "__version__", "2.8.0+cu128")
    new_path = trt_mod.ensure_engine(_TinyStage(), "fp16", cache, "sha")
    assert new_path != old_path and len(calibrations) == 2  # exported and built again
    assert '"torch_version": "2.8.0+cu128"' in new_path.with_suffix(".json").read_text()


@pytest.fixture(scope="module")
def tiny_model() -> Pi0Model:
    """Made before the fake is installed: building on the meta device imports torch._dynamo, which
    asks importlib for a `tensorrt` spec that the stand-in module does not have."""
    return random_model(get_preset("pi0_small"))


def test_a_damaged_cached_engine_is_rebuilt(tiny_model: Pi0Model, fake_trt: FakeTRT, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """`deserialize_cuda_engine` returns None for a cut-short or damaged file. A cached one used to
    fail every configure ("could not deserialize") until deleted by hand; now it is rebuilt, with
    a warning. A fresh build that does not deserialize still fails, once."""
    _export_to_fake_onnx(monkeypatch)
    shape = EngineShape.for_model(tiny_model.cfg)
    prepare = functools.partial(trt_mod.prepare_tensorrt, tiny_model, shape, "bfloat16", tmp_path, stages=("vision",))
    path = prepare("sha").engine_paths["vision"]
    path.write_bytes(b"ENG")  # cut short
    with caplog.at_level(logging.WARNING, logger=trt_mod.__name__):
        setup = prepare("sha")
    assert setup.engine_paths["vision"] == path and path.read_bytes() == b"ENGINE"
    assert "vision" in setup.stages and "rebuilding it" in caplog.text
    calls = [c for c, _ in fake_trt.calls]
    assert calls.count("build_serialized_network") == 2 and calls.count("deserialize_cuda_engine") == 3
    monkeypatch.setattr(_Builder, "build_serialized_network", lambda self, network, config: _HostMemory(b"ENG"))
    with pytest.raises(trt_mod.TensorRTError, match="could not deserialize"):
        prepare("other sha")
    assert [c for c, _ in fake_trt.calls].count("deserialize_cuda_engine") == 4  # no second build


def test_a_refused_tensor_address_fails_bind(fake_trt: FakeTRT, tmp_path: Path) -> None:
    """`set_tensor_address` returns False (it does not raise) for a name or an address TensorRT
    refuses (NvInferRuntime.h: 'The pointer must have at least 256-byte alignment')."""
    stage = trt_mod.TensorRTStage(_engine_file(tmp_path), torch.device("cpu"))
    fake_trt.rejected_addresses.add("y")
    with pytest.raises(trt_mod.TensorRTError, match="refused the address of y"):
        stage.bind({"x": torch.ones(2, 4), "y": torch.zeros(2, 4)})


def _aligned(numel: int) -> torch.Tensor:
    """A float16 tensor at a 256-byte aligned address (bound in place), its base not kept here."""
    base = torch.zeros(numel + 128, dtype=torch.float16)
    offset = (-base.data_ptr() % trt_mod.IO_ALIGNMENT) // base.element_size()
    return base[offset:offset + numel]


def test_bound_tensors_live_while_bound(fake_trt: FakeTRT, tmp_path: Path) -> None:
    """The context holds raw addresses only: a tensor bound in place must stay alive (held by the
    stage) even when the caller drops it, or the engine would read and write freed memory."""
    stage = trt_mod.TensorRTStage(_engine_file(tmp_path), torch.device("cpu"))
    x, y = _aligned(8).view(2, 4), _aligned(8).view(2, 4)
    refs = [weakref.ref(x), weakref.ref(y)]
    stage.bind({"x": x, "y": y})
    assert not stage._before and not stage._after  # both bound in place
    del x, y
    gc.collect()
    assert all(r() is not None for r in refs)
    stage.run()


@pytest.mark.parametrize("stale", [b"CACHE:H100 at another clock", b"garbage"])
def test_an_unusable_timing_cache_is_replaced(fake_trt: FakeTRT, tmp_path: Path, stale: bytes) -> None:
    """`set_timing_cache` returns False for a cache whose device properties differ (it does not
    raise); the build must then start a fresh cache. What TensorRT does when the False is ignored
    is undocumented: the fake then has no cache to serialize, and None for an unreadable blob."""
    onnx_path, cache = tmp_path / "stage.onnx", tmp_path / "timing.cache"
    onnx_path.write_bytes(b"onnx")
    cache.write_bytes(stale)
    assert trt_mod.build_serialized_engine(onnx_path, cache) == b"ENGINE"
    assert cache.read_bytes() == b"CACHE:H100"

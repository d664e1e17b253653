"""Which backend runs the vision and prefix stages: `torch` (CUDA graphs) or `tensorrt`.

`select_backend` decides from facts alone: what was asked, the device, the TensorRT version.
`resolve_backend` adds the configure-time check (build or load the engines, compare them with
torch on a random input) and logs the outcome in exactly one line.

- `torch`: always torch.
- `tensorrt`: TensorRT or a `ConfigError` saying why not. The node's configure then returns
  FAILURE with that reason; it never crashes the node and never silently runs something else.
- `auto`: TensorRT when it imports, the device is CUDA and the engines pass the check; otherwise
  torch, with one warning line giving the reason. A TensorRT failure never escapes `auto`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from pi0_policy_ros.engine.tensorrt import MIN_TENSORRT, EngineCheck
from pi0_policy_ros.engine.tensorrt import tensorrt_version as probe_tensorrt_version
from pi0_policy_ros.errors import ConfigError

log = logging.getLogger(__name__)

BACKENDS = ("torch", "tensorrt", "auto")
_PROBE = "probe"  # default of `tensorrt_version`: ask `import tensorrt`


@dataclass(frozen=True)
class BackendChoice:
    name: str  # "torch" | "tensorrt"
    reason: str


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".")[:2] if p.isdigit())


def select_backend(requested: str, device: str | torch.device, tensorrt_version: str | None = _PROBE) -> BackendChoice:
    """The backend to try. Pure given `tensorrt_version` (None: not installed); by default it is
    probed with `import tensorrt`. Raises ConfigError for an unknown name, or for `tensorrt` when
    it cannot run here."""
    if requested not in BACKENDS:
        raise ConfigError(f"backend must be one of {BACKENDS}, found {requested!r}")
    if requested == "torch":
        return BackendChoice("torch", "backend 'torch' requested")
    version = probe_tensorrt_version() if tensorrt_version == _PROBE else tensorrt_version
    dev = torch.device(device)
    problem = None
    if dev.type != "cuda":
        problem = f"device {dev} is not a CUDA device"
    elif version is None:
        problem = "TensorRT is not installed (import tensorrt failed)"
    elif _version_tuple(version) < MIN_TENSORRT:
        problem = f"TensorRT {version} is older than {'.'.join(map(str, MIN_TENSORRT))}"
    if problem is None:
        return BackendChoice("tensorrt", f"TensorRT {version} on {dev}")
    if requested == "tensorrt":
        raise ConfigError(f"backend 'tensorrt' requested, but {problem}; use backend 'torch' or 'auto'")
    return BackendChoice("torch", problem)


def resolve_backend(requested: str, device: str | torch.device, check: Callable[[], EngineCheck] | None = None,
                    tensorrt_version: str | None = _PROBE) -> BackendChoice:
    """`select_backend`, then, when TensorRT is chosen and `check` is given, build / load and verify
    the engines through `check`. Logs the final choice in one line."""
    choice = select_backend(requested, device, tensorrt_version)
    if choice.name == "tensorrt" and check is not None:
        failure = None
        try:
            result = check()
            if not result.passed:
                failure = (f"engines differ from torch: relative error {result.error:.3g} > {result.limit:.3g}"
                           f"{' (' + result.detail + ')' if result.detail else ''}")
        except Exception as exc:  # TensorRT and CUDA raise many unrelated types; each becomes the reason
            failure = f"TensorRT failed at configure: {type(exc).__name__}: {exc}"
            if requested == "tensorrt":
                raise ConfigError(f"backend 'tensorrt' requested, but {failure}") from exc
        if failure is not None:
            if requested == "tensorrt":
                raise ConfigError(f"backend 'tensorrt' requested, but {failure}")
            choice = BackendChoice("torch", failure)
        else:
            choice = BackendChoice("tensorrt", f"{choice.reason}; engines match torch ({result.error:.3g} ≤ "
                                               f"{result.limit:.3g})")
    if requested == "auto" and choice.name == "torch":
        log.warning("backend auto: falling back to torch: %s", choice.reason)
    else:
        log.info("backend %s: using %s (%s)", requested, choice.name, choice.reason)
    return choice

"""The commands' JSON reports: text that strict parsers read (NaN and ±inf become null), and the
check of the output path made before a long run.

`json.dumps` writes a non-finite float as a bare `NaN` / `Infinity`, which is not JSON: jq,
JavaScript's `JSON.parse` and most languages' JSON libraries refuse the whole document. Our
reports have such values where nothing was measured (stage times without CUDA events, a growth
over fewer than two samples).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from pi0_policy_ros.errors import ConfigError


def finite_or_null(value: Any) -> Any:
    """`value` with every non-finite float (in dicts, lists and tuples, at any depth) as None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(item) for item in value]
    return value


def json_text(value: Any, indent: int | None = 2) -> str:
    """`json.dumps` of `value` with NaN and ±inf as null; raises on any other non-JSON value."""
    return json.dumps(finite_or_null(value), indent=indent, allow_nan=False)


def prepare_output_file(path: str | Path | None, option: str = "--json") -> None:
    """Make a report's output path writable before a run of minutes, not after it: create its
    folder; refuse a directory, a file where its folder should be, or a folder or file it may not
    write (ConfigError naming `option`)."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{option} {path}: expected a file name, found a directory")
    if path.parent.exists() and not path.parent.is_dir():  # mkdir would say only "File exists"
        raise ConfigError(f"{option} {path}: expected {path.parent} to be a directory, found a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{option} {path}: cannot create its directory: {exc.strerror or exc}") from None
    # A read-only folder (or file) is found only by the write after the run otherwise; access()
    # also says so for root on a read-only file system, where the mode bits do not.
    folder = path.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {path}: expected a folder it may write in, found {folder}: not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"{option} {path}: expected a file it may overwrite, found one it may not write")

"""JSON text that strict parsers read: NaN and ±inf become null.

`json.dumps` writes a non-finite float as a bare `NaN` / `Infinity`, which is not JSON: jq,
JavaScript's `JSON.parse` and most languages' JSON libraries refuse the whole document. Our
reports have such values where nothing was measured (stage times without CUDA events, a growth
over fewer than two samples).
"""

from __future__ import annotations

import json
import math
from typing import Any


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

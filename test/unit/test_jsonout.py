"""jsonout: the reports' JSON stays JSON where nothing was measured (NaN, inf)."""

from __future__ import annotations

import json
import math

import pytest

from pi0_policy_ros.jsonout import finite_or_null, json_text


def test_non_finite_floats_become_null_at_any_depth() -> None:
    value = {"a": math.nan, "b": [1.5, math.inf, (-math.inf, 2)], "c": {"d": {"e": math.nan}}, "f": "nan", "g": 3}
    assert finite_or_null(value) == {"a": None, "b": [1.5, None, [None, 2]], "c": {"d": {"e": None}}, "f": "nan",
                                     "g": 3}
    text = json_text(value, indent=None)
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == finite_or_null(value)


def test_other_values_that_are_not_json_still_raise() -> None:
    with pytest.raises(TypeError):
        json_text({"path": object()})

"""The check scripts' report (`test/triton_prefix_check.py`, `bench/fp8_mlp_check.py`): one line per
compared quantity, and whether every one held."""

from __future__ import annotations


class CheckReport:
    def __init__(self, name_width: int) -> None:
        self.name_width = name_width
        self.ok = True

    def __call__(self, name: str, err: float, tol: float) -> None:
        held = err <= tol  # False for NaN
        self.ok &= held
        print(f"{name:<{self.name_width}} max err {err:.2e} (tol {tol:.0e}) {'ok' if held else 'FAIL'}", flush=True)

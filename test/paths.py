"""Paths shared by the tests."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURE_DIR = REPO_ROOT / "test" / "fixtures" / "openpi_reference"
PI05_FIXTURE = FIXTURE_DIR / "pi05_small.safetensors"
PI0_FIXTURE = FIXTURE_DIR / "pi0_small.safetensors"
